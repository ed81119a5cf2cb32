"""Readers for the data set layouts users have on disk.

Each reader returns a dict: train_x/train_y (uint8 [N,3,H,W], int64 [N]),
optionally test_x/test_y, and 'classes' (names in label order).
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import UserError, brief
from .files import iter_files

MAX_IMAGE_PIXELS = 1 << 26  # 67 Mpixel: far above any data set image, far below a bomb's size
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm")
SPLIT_NAMES = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": "test"}


# Decoding progress: set by `cache.cached_decode` while a data set is decoded (a callable
# taking the number of images decoded so far), None otherwise.
progress_hook = None
_decoded = 0


def _decode(blob: bytes, name: str, size: int | None, source: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    global _decoded
    _decoded += 1
    if progress_hook is not None and _decoded % 5000 == 0:
        progress_hook(_decoded)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
            with Image.open(io.BytesIO(blob)) as img:  # reads the header only
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:  # a decompression bomb, or no image of a data set
                    raise UserError(f"image {name} is {w}x{h} pixels, more than {MAX_IMAGE_PIXELS:,} "
                                    "(a decompression bomb?)", source)
                img = img.convert("RGB")
                if size is not None and img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR)
                return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
    except UserError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError,
            MemoryError) as exc:
        raise UserError(f"cannot decode image {name}: {brief(exc)}", source) from None


def _stack(images: list[np.ndarray], labels: list[int]):
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def _is_image(rel: str) -> bool:
    base = PurePosixPath(rel).name
    return rel.lower().endswith(IMAGE_SUFFIXES) and not base.startswith(".") and "__MACOSX" not in rel


def read_image_folder(root: Path, image_size: int | None = None) -> dict:
    """An image-folder tree: [top/]<split>/<class>/<img> or [top/]<class>/<img>.

    Splits named train, valid/val and test are recognised (CINIC-10 uses
    train/valid/test); without split folders everything is training data.
    """
    entries: list[tuple[tuple[str, ...], bytes]] = [
        (PurePosixPath(rel).parts, blob) for rel, blob in iter_files(root, _is_image)
    ]
    if not entries:
        raise UserError("no images found (expected <split>/<class>/<image> or <class>/<image>)", str(root))
    # Strip leading folders shared by every file that are not split names.
    while all(len(p) > 2 for p, _ in entries) and len({p[0] for p, _ in entries}) == 1 and entries[0][0][0].lower() not in SPLIT_NAMES:
        entries = [(p[1:], b) for p, b in entries]
    has_splits = any(p[0].lower() in SPLIT_NAMES and len(p) >= 3 for p, _ in entries)
    grouped: dict[str, list[tuple[str, str, bytes]]] = {}
    for parts, blob in entries:
        if has_splits:
            if parts[0].lower() not in SPLIT_NAMES or len(parts) < 3:
                continue
            split, cls = SPLIT_NAMES[parts[0].lower()], parts[-2]
        else:
            split, cls = "train", parts[-2] if len(parts) >= 2 else None
            if cls is None:
                raise UserError(f"image {'/'.join(parts)} is not inside a class folder", str(root))
        grouped.setdefault(split, []).append(("/".join(parts), cls, blob))
    if "train" not in grouped:
        raise UserError("no 'train' split found", str(root))
    classes = sorted({cls for items in grouped.values() for _, cls, _ in items})
    index = {c: i for i, c in enumerate(classes)}
    if image_size is None:
        first = _decode(grouped["train"][0][2], grouped["train"][0][0], None, str(root))
        image_size = first.shape[1]
    out: dict = {"classes": classes}
    for split in ("train", "val", "test"):
        if split not in grouped:
            continue
        items = sorted(grouped[split], key=lambda t: t[0])
        imgs = [_decode(blob, name, image_size, str(root)) for name, _, blob in items]
        out[f"{split}_x"], out[f"{split}_y"] = _stack(imgs, [index[c] for _, c, _ in items])
    return out


def read_tinyimagenet(root: Path, image_size: int = 64) -> dict:
    """Tiny ImageNet's official layout: train/<wnid>/images/*, val/images/* + val/val_annotations.txt."""
    files: dict[tuple[str, ...], bytes] = {}
    for rel, blob in iter_files(root, lambda r: _is_image(r) or r.endswith("val_annotations.txt")):
        files[PurePosixPath(rel).parts] = blob
    # Locate the folder that holds train/ (the official zip has a top folder).
    tops = {p[: p.index("train")] for p in files if "train" in p}
    if not tops:
        raise UserError("no train/<wnid>/images folder found (not the Tiny ImageNet layout)", str(root))
    top = min(tops, key=len)
    n = len(top)
    train = [(p, b) for p, b in files.items() if p[:n] == top and len(p) == n + 4 and p[n] == "train" and p[n + 2] == "images"]
    if not train:
        raise UserError("no train/<wnid>/images/<image> files found", str(root))
    classes = sorted({p[n + 1] for p, _ in train})
    index = {c: i for i, c in enumerate(classes)}
    train.sort(key=lambda t: t[0])
    out: dict = {"classes": classes}
    out["train_x"], out["train_y"] = _stack(
        [_decode(b, "/".join(p), image_size, str(root)) for p, b in train], [index[p[n + 1]] for p, _ in train]
    )
    ann = files.get(top + ("val", "val_annotations.txt"))
    if ann is not None:
        labels = {}
        for line in ann.decode("utf-8", "replace").splitlines():
            cols = line.split("\t")
            if len(cols) >= 2:
                labels[cols[0]] = cols[1]
        val = sorted((p, b) for p, b in files.items() if p[:n] == top and len(p) == n + 3 and p[n:n + 2] == ("val", "images"))
        val = [(p, b) for p, b in val if labels.get(p[-1]) in index]
        if val:
            out["test_x"], out["test_y"] = _stack(
                [_decode(b, "/".join(p), image_size, str(root)) for p, b in val], [index[labels[p[-1]]] for p, _ in val]
            )
    return out


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch files without executing arbitrary code: only the
    numpy array reconstruction helpers and builtin containers are allowed."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "dict"),
        ("builtins", "list"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as exc:
        raise UserError(f"not a valid CIFAR-10 batch file: {exc}", str(path)) from None


def read_cifar10(root: Path, download: bool = False) -> dict:
    """torchvision's CIFAR-10 folder (cifar-10-batches-py), or an image-folder tree/archive."""
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if not (folder / "data_batch_1").exists():
        if root.exists() and (root.is_file() or any(root.iterdir())) and not (folder / "data_batch_1").exists():
            return read_image_folder(root, 32)
        if not download:
            raise UserError("CIFAR-10 not found (expected cifar-10-batches-py/); set data.download: true to fetch it", str(root))
        import torchvision

        try:
            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        except Exception as exc:  # network errors of any kind
            raise UserError(f"CIFAR-10 download failed: {exc}", str(root)) from None
        folder = root / "cifar-10-batches-py"

    def read(names):
        xs, ys = [], []
        for name in names:
            batch = _load_cifar_batch(folder / name)
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(int(v) for v in batch["labels"])
        return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.int64)

    out: dict = {}
    out["train_x"], out["train_y"] = read([f"data_batch_{i}" for i in range(1, 6)])
    if (folder / "test_batch").exists():
        out["test_x"], out["test_y"] = read(["test_batch"])
    meta = folder / "batches.meta"
    out["classes"] = list(_load_cifar_batch(meta)["label_names"]) if meta.exists() else [str(i) for i in range(10)]
    return out
