"""Decoded-image cache: a data set is decoded once into uint8 tensors.

The cache file is a safetensors file keyed by the source's absolute path,
size and modification time, so a changed source is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from ..errors import UserError

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    base = os.environ.get("FEDMEF_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "fedmef")
    return Path(base).expanduser()


def _source_key(path: Path, tag: str) -> str:
    st = path.stat()
    blob = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, tag, CACHE_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cached_decode(path: Path, tag: str, cache_dir: str | None, decode: Callable[[], dict]) -> dict:
    """Return decode()'s dict of tensors (+ 'classes' list), from cache if present."""
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    file = directory / f"{tag}-{_source_key(path, tag)}.safetensors"
    if file.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:
                meta = f.metadata() or {}
            out = dict(load_file(str(file)))
            out["classes"] = json.loads(meta.get("classes", "[]"))
            return out
        except Exception:  # a damaged cache is rebuilt, never trusted
            file.unlink(missing_ok=True)
    result = _decode_with_progress(path, file, decode)
    tensors = {k: v.contiguous() for k, v in result.items() if isinstance(v, torch.Tensor)}
    try:
        from safetensors.torch import save

        from ..storage import replace_bytes  # a temp file of this process's own, then rename

        directory.mkdir(parents=True, exist_ok=True)
        replace_bytes(file, save(tensors, metadata={"classes": json.dumps(result.get("classes", []))}))
    except (OSError, UserError):
        pass  # an unwritable cache only costs time
    return result


def _decode_with_progress(path: Path, file: Path, decode: Callable[[], dict]) -> dict:
    """Run decode() with a line on stderr when it starts, every 5000 images and when done (the
    first run on CIFAR-10's or CINIC-10's JPEGs takes a while; later runs read the cache)."""
    import sys
    import time

    from . import sources

    t0 = time.perf_counter()
    print(f"decoding {path} once into the cache {file} (later runs start in seconds)", file=sys.stderr, flush=True)
    sources._decoded = 0
    sources.progress_hook = lambda n: print(f"  {n:,} images decoded ({time.perf_counter() - t0:.0f} s)",
                                            file=sys.stderr, flush=True)
    try:
        result = decode()
    finally:
        sources.progress_hook = None
    n = sum(len(v) for k, v in result.items() if k.endswith("_y"))
    print(f"  decoded {n:,} images in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return result
