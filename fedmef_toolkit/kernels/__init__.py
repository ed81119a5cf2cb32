"""Fused GPU kernels (Triton) for the per-layer work NSConv and SAP add to a step.

Each kernel replaces a chain of small PyTorch ops (a dozen to sixty per
layer and step) that computes the same thing; at federated batch sizes
those chains, not the convolutions, set the step time. The PyTorch versions
stay as the reference and as the path everywhere these kernels do not run:
on the CPU, without Triton, or with FEDMEF_KERNELS=torch in the environment.

Tests run every kernel against its reference on the CPU through Triton's
interpreter (TRITON_INTERPRET=1) and on a GPU when there is one.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means: use the PyTorch path
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(t: torch.Tensor) -> bool:
    """Whether the fused kernels run for tensor `t` (checked per call: cheap). They
    compute in fp32, so float64 tensors (gradient checks) take the PyTorch path."""
    if t.dtype not in _KERNEL_DTYPES or os.environ.get("FEDMEF_KERNELS", "triton") == "torch":
        return False
    return (t.is_cuda or interpreting()) and _triton_importable() and _kernels_run_on(t.device.type)


@functools.lru_cache(maxsize=None)
def _kernels_run_on(device_type: str) -> bool:
    """Once per device type: compile and run one kernel on a case with a known answer
    (standardised rows have unit norm). Triton needs a working C compiler and driver at
    first use; where that fails, training goes on with the PyTorch ops and says so."""
    # The first call may come from inside a CUDA-graph preflight (sync debugging set to
    # "error"); reading the answer back is a host sync that must be allowed here.
    previous = torch.cuda.get_sync_debug_mode() if device_type == "cuda" else None
    try:
        if previous is not None:
            torch.cuda.set_sync_debug_mode(0)
        return _known_answer(device_type)
    except Exception as e:  # noqa: BLE001 - any failure means: use the PyTorch path
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        if previous is not None:
            torch.cuda.set_sync_debug_mode(previous)
    log.warning("fused kernels off on %s, using PyTorch ops: %s", device_type, reason)
    return False


def _known_answer(device_type: str) -> bool:
    from .standardize import standardize_forward

    w = torch.arange(36.0, device=device_type).reshape(4, 9).sin()  # no RNG draws: runs stay reproducible
    out = standardize_forward(w, torch.ones(4, device=device_type), None, True, False, 1e-4)
    if not torch.allclose(out.norm(dim=1), torch.ones(4, device=device_type), atol=1e-4):
        raise RuntimeError("a test kernel gave a wrong result")
    return True
