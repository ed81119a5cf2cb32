"""Evaluation of the global model on the held-out split (device-resident data)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

#: images per forward pass on the CPU at most: a MobileNetV2 at 32 px holds about 5 MB of
#: activations per image in eval mode, so 512 at a time peaked at 2.7 GB (issue 12)
CPU_MAX_EVAL_BATCH = 128


@torch.no_grad()
def evaluate(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, normalize, batch_size: int = 512,
             precision: str = "fp32") -> tuple[float, float]:
    """Return (accuracy, mean cross-entropy); one host sync at the end."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=x_uint8.device)
    loss = torch.zeros((), device=x_uint8.device)
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" and x_uint8.is_cuda
           else contextlib.nullcontext())
    if not x_uint8.is_cuda:
        batch_size = min(batch_size, CPU_MAX_EVAL_BATCH)
    for i in range(0, len(y), batch_size):
        xb, yb = normalize(x_uint8[i:i + batch_size]), y[i:i + batch_size]
        with ctx:
            logits = model(xb)
        loss += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    n = max(1, len(y))
    return float(correct) / n, float(loss) / n
