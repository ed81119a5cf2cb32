"""The fused Triton kernels give what their PyTorch references give.

On the CPU the checks run under Triton's interpreter in a subprocess (the
interpreter must be chosen before any kernel is defined); on a GPU they run
directly (CI has none: the device machine runs them, see docs/benchmarks.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmef_toolkit.kernels import _triton_importable

HERE = Path(__file__).resolve().parent


def _interpreter_runs_our_loops() -> bool:
    # Triton's interpreter before 3.8 cannot bound a loop by a runtime argument (seen with 3.6)
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 8)


@pytest.mark.skipif(not _triton_importable(), reason="Triton is not installed: the fused kernels are never used")
@pytest.mark.skipif(_triton_importable() and not _interpreter_runs_our_loops(),
                    reason="this Triton's interpreter cannot run runtime-bounded loops; the GPU test covers the kernels")
def test_kernels_match_reference_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("FEDMEF_KERNELS", None)
    proc = subprocess.run([sys.executable, str(HERE / "kernel_checks.py"), "cpu"], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "kernel checks passed" in proc.stdout


def _can_compile_for_hopper() -> bool:
    if not _triton_importable():
        return False
    import inspect

    from triton.compiler import ASTSource

    return "constexprs" in inspect.signature(ASTSource).parameters  # the compile API of Triton >= 3.3


@pytest.mark.skipif(not _can_compile_for_hopper(), reason="needs Triton >= 3.3 with its NVIDIA toolchain")
def test_kernels_compile_for_a_hopper_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # really compile, not a cache hit
    sys.path.insert(0, str(HERE))
    import kernel_checks

    assert len(kernel_checks.compile_for_hopper()) == 20 + 1 + 10 + 2 * 8  # AGC; SAP fp32: 4 radix passes; bf16, fp16: 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device machine)")
def test_kernels_match_reference_on_the_gpu():
    sys.path.insert(0, str(HERE))
    import kernel_checks

    kernel_checks.run_all("cuda")


@pytest.mark.skipif(not _triton_importable(), reason="Triton is not installed: the fused kernels are never used")
def test_kernels_that_cannot_run_fall_back_to_pytorch(monkeypatch, caplog):
    """A Triton that fails at first use (no C compiler, driver trouble) must not stop
    training: the check says no once, with the reason logged."""
    import fedmef_toolkit.kernels as kernels
    import fedmef_toolkit.kernels.standardize as standardize

    def broken(*args, **kwargs):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(standardize, "standardize_forward", broken)
    kernels._kernels_run_on.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert kernels._kernels_run_on("cpu") is False
        assert "Failed to find C compiler" in caplog.text
    finally:
        kernels._kernels_run_on.cache_clear()
