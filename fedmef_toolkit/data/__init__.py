"""Data: read a data set once, keep it as uint8 tensors, split it over clients."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .cache import cached_decode
from .sources import read_cifar10, read_image_folder, read_tinyimagenet
from .synthetic import make_synthetic


@dataclass
class DataBundle:
    train_x: torch.Tensor  # uint8 [N,3,H,W]
    train_y: torch.Tensor  # int64 [N]
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    classes: list[str]
    eval_name: str  # "val" (held out from training data or the data set's own) or "test"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.train_x[: min(len(self.train_x), 20000)].float() / 255.0
        return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)


def _read_raw(spec, seed: int) -> dict:
    if spec.dataset == "synthetic":
        s = spec.synthetic
        x, y = make_synthetic(s.num_samples, s.num_classes, s.image_size, s.noise, seed)
        return {"train_x": x, "train_y": y, "classes": [f"class{i}" for i in range(s.num_classes)]}
    root = Path(spec.root).expanduser()
    if spec.dataset == "cifar10":
        if not root.exists() and spec.download:
            root.mkdir(parents=True, exist_ok=True)
        if root.is_dir() and (root / "cifar-10-batches-py").is_dir() or spec.download:
            return read_cifar10(root, spec.download)
        if not root.exists():
            raise UserError("data set path not found", str(root))
        return cached_decode(root, "cifar10", spec.cache_dir, lambda: read_cifar10(root))
    if not root.exists():
        raise UserError("data set path not found", str(root))
    if spec.dataset == "tinyimagenet":
        return cached_decode(root, "tinyimagenet", spec.cache_dir, lambda: read_tinyimagenet(root))
    size = 32 if spec.dataset == "cinic10" else None
    return cached_decode(root, spec.dataset, spec.cache_dir, lambda: read_image_folder(root, size))


def holdout_split(labels: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the last `fraction` of its samples (in file order) are held out."""
    train_idx, val_idx = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        n_val = int(round(len(idx) * fraction))
        train_idx.append(idx[: len(idx) - n_val])
        val_idx.append(idx[len(idx) - n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def load_data(spec, split: str, seed: int) -> DataBundle:
    raw = _read_raw(spec, seed)
    x, y = raw["train_x"], raw["train_y"]
    if split == "test":
        if "test_x" not in raw:
            raise UserError(f"eval.split is 'test' but the data set at {spec.root} has no test split")
        bundle = DataBundle(x, y, raw["test_x"], raw["test_y"], list(raw["classes"]), "test")
    elif "val_x" in raw:  # the data set ships its own validation split (CINIC-10's valid/)
        bundle = DataBundle(x, y, raw["val_x"], raw["val_y"], list(raw["classes"]), "val")
    else:
        tr, va = holdout_split(y, spec.val_split)
        bundle = DataBundle(x[tr], y[tr], x[va], y[va], list(raw["classes"]), "val")
        if not len(va):
            raise UserError(f"the validation set is empty: data.val_split {spec.val_split} of at most "
                            f"{int(torch.bincount(y).max()) if len(y) else 0} images per class rounds to none; "
                            "raise data.val_split or use more images", spec.root or spec.dataset)
    if not len(bundle.train_y):
        raise UserError("no training images left after holding out the validation set", spec.root or spec.dataset)
    if not len(bundle.eval_y):
        raise UserError(f"the {bundle.eval_name} split has no images", spec.root or spec.dataset)
    return bundle
