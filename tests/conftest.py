"""Shared fixtures: small generated data sets and recipes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg-train.tar.xz"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test decodes into its own cache directory."""
    monkeypatch.setenv("FEDMEF_CACHE", str(tmp_path / "cache"))


def png_bytes(rng: np.random.Generator, size: int = 8, color: int | None = None) -> bytes:
    from PIL import Image

    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    if color is not None:
        arr[..., color % 3] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_image_tree(root: Path, splits=("train", "valid", "test"), classes=("cat", "dog", "frog"), per_class=4,
                    size=8, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split in splits:
        for ci, cls in enumerate(classes):
            d = root / split / cls if split else root / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (d / f"{i:04d}.png").write_bytes(png_bytes(rng, size, ci))
    return root


def small_recipe(tmp_path: Path, **over) -> dict:
    """A recipe dict that trains in a second or two on the CPU."""
    recipe = {
        "name": "t", "seed": 0, "device": "cpu",
        "data": {"dataset": "synthetic", "num_clients": 8, "min_samples": 5,
                 "synthetic": {"num_samples": 600, "num_classes": 4, "image_size": 12, "noise": 0.3}},
        "model": {"arch": "cnn4", "norm": "bn", "width": 0.25},
        "fl": {"rounds": 4, "clients_per_round": 3, "local_epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
        "eval": {"every": 1},
        "output": {"dir": str(tmp_path / "runs"), "name": "run", "checkpoint_every": 2, "memory_report": False},
    }
    for key, value in over.items():
        node = recipe
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return recipe


def pytest_report_header(config):
    return f"shared CIFAR-10 archive: {'found' if SHARED_CIFAR.exists() else 'absent'} ({SHARED_CIFAR}); threads {os.cpu_count()}"


def stop_run(proc, sig: int, run_dir: Path, lines: int, timeout: float = 300.0) -> tuple[str, int]:
    """Send `sig` to the `fedmef train` process `proc` (stderr piped, text) once metrics.jsonl of
    `run_dir` holds at least `lines` lines, and check how it stopped: exit code 128+signal, no
    traceback, one line with the exact resume command, the checkpoint at the last logged round.
    Returns (stderr, that round)."""
    import json
    import signal
    import time

    from fedmef_toolkit.fl.checkpoint import load_checkpoint_round

    metrics = run_dir / "metrics.jsonl"
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before the signal: {proc.stderr.read()[-3000:]}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["round"]
    assert load_checkpoint_round(run_dir) == last  # the last logged round, not the periodic checkpoint
    said = [ln for ln in err.splitlines() if "--resume" in ln]
    assert said == [f"stopped by {signal.Signals(sig).name} after round {last} (checkpoint saved); "
                    f"continue with: fedmef train --resume {run_dir}"], err[-3000:]
    return err, last
