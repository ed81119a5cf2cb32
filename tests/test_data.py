import pickle
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from conftest import SHARED_CIFAR, make_image_tree, png_bytes

from fedmef_toolkit.data import holdout_split, load_data
from fedmef_toolkit.data.augment import DeviceAugment
from fedmef_toolkit.data.sources import read_cifar10, read_image_folder, read_tinyimagenet
from fedmef_toolkit.data.synthetic import make_synthetic
from fedmef_toolkit.errors import UserError
from fedmef_toolkit.recipe import DataSpec


def archive(src, dest, kind):
    if kind == "zip":
        with zipfile.ZipFile(dest, "w") as zf:
            for p in sorted(src.rglob("*")):
                if p.is_file():
                    zf.write(p, p.relative_to(src.parent).as_posix())
    else:
        mode = {"tar": "w", "tar.gz": "w:gz", "tar.xz": "w:xz"}[kind]
        with tarfile.open(dest, mode) as tf:
            tf.add(src, arcname=src.name)
    return dest


def test_image_folder_directory_with_splits(tmp_path):
    root = make_image_tree(tmp_path / "cinic", per_class=3)
    d = read_image_folder(root, 8)
    assert d["classes"] == ["cat", "dog", "frog"]
    assert d["train_x"].shape == (9, 3, 8, 8) and d["train_x"].dtype == torch.uint8
    assert d["val_x"].shape[0] == 9 and d["test_x"].shape[0] == 9
    assert sorted(d["train_y"].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # pixel content survives: class c has channel c%3 saturated
    for x, y in zip(d["train_x"], d["train_y"]):
        assert (x[int(y) % 3] == 255).all()


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.xz", "zip"])
def test_image_folder_archives_equal_directory(tmp_path, kind):
    root = make_image_tree(tmp_path / "CINIC-10", splits=("train", "test"), per_class=2)
    direct = read_image_folder(root, 8)
    packed = read_image_folder(archive(root, tmp_path / f"cinic.{kind}", kind), 8)
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(direct[key], packed[key])


def test_class_folders_without_splits_and_resize(tmp_path):
    root = make_image_tree(tmp_path / "flat", splits=("",), per_class=2, size=10)
    d = read_image_folder(root, 8)
    assert d["train_x"].shape == (6, 3, 8, 8) and "test_x" not in d


def test_corrupt_image_and_empty_tree(tmp_path):
    root = make_image_tree(tmp_path / "t", splits=("train",), per_class=1)
    (root / "train" / "cat" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.png"):
        read_image_folder(root, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        read_image_folder(tmp_path / "empty")
    (tmp_path / "x.tar.gz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read archive"):
        read_image_folder(tmp_path / "x.tar.gz")


def make_tiny(root, wnids=("n01", "n02"), per_class=2):
    rng = np.random.default_rng(0)
    lines = []
    for ci, w in enumerate(wnids):
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(per_class):
            (d / f"{w}_{i}.JPEG").write_bytes(png_bytes(rng, 64, ci))
        (root / "val" / "images").mkdir(parents=True, exist_ok=True)
        (root / "val" / "images" / f"val_{ci}.JPEG").write_bytes(png_bytes(rng, 64, ci))
        lines.append(f"val_{ci}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids))
    return root


def test_tinyimagenet_directory_and_zip(tmp_path):
    root = make_tiny(tmp_path / "tiny-imagenet-200")
    d = read_tinyimagenet(root)
    assert d["classes"] == ["n01", "n02"] and d["train_x"].shape == (4, 3, 64, 64)
    assert d["test_y"].tolist() == [0, 1]
    z = read_tinyimagenet(archive(root, tmp_path / "tiny.zip", "zip"))
    assert torch.equal(z["train_x"], d["train_x"]) and torch.equal(z["test_y"], d["test_y"])
    with pytest.raises(UserError, match="Tiny ImageNet"):
        read_tinyimagenet(make_image_tree(tmp_path / "other", splits=("",), per_class=1))


def write_cifar_batches(folder, n=20):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_cifar10_torchvision_folder(tmp_path):
    write_cifar_batches(tmp_path / "cifar" / "cifar-10-batches-py")
    d = read_cifar10(tmp_path / "cifar")
    assert d["train_x"].shape == (100, 3, 32, 32) and d["test_x"].shape == (20, 3, 32, 32)
    assert d["classes"][3] == "c3"


class Evil:
    def __reduce__(self):
        return (shutil.rmtree, ("/nonexistent-fedmef-test",))


def test_cifar10_refuses_hostile_pickle(tmp_path):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    write_cifar_batches(folder)
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(UserError, match="refusing to load shutil.rmtree"):
        read_cifar10(tmp_path / "cifar")


def test_cifar10_missing_without_download(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="download"):
        read_cifar10(tmp_path / "empty")


def test_decode_cache_is_reused(tmp_path, monkeypatch):
    root = make_image_tree(tmp_path / "tree", splits=("train",), per_class=5)
    spec = DataSpec(dataset="imagefolder", root=str(root), val_split=0.2)
    first = load_data(spec, "val", 0)
    import fedmef_toolkit.data as data_mod

    monkeypatch.setattr(data_mod, "read_image_folder", lambda *a, **k: pytest.fail("decoded twice"))
    second = load_data(spec, "val", 0)
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.eval_y, second.eval_y)


def test_holdout_split_is_per_class_tail():
    labels = torch.tensor([0, 1] * 10)
    tr, va = holdout_split(labels, 0.2)
    assert len(va) == 4 and set(labels[va].tolist()) == {0, 1}
    assert va.tolist() == [16, 17, 18, 19]
    assert len(set(tr.tolist()) & set(va.tolist())) == 0


def test_synthetic_deterministic_and_balanced():
    x1, y1 = make_synthetic(100, 5, 12, 0.3, seed=1)
    x2, y2 = make_synthetic(100, 5, 12, 0.3, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.bincount(y1).tolist() == [20] * 5


def test_augment_crop_flip_normalize():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    aug = DeviceAugment(torch.tensor([0.5] * 3), torch.tensor([0.25] * 3))
    out = aug.train(x, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 8, 8) and out.dtype == torch.float32
    plain = aug.normalize(x)
    # every output row is a shifted (and maybe flipped) window of the zero-padded input
    assert not torch.equal(out, plain)
    off = DeviceAugment(torch.tensor([0.5] * 3), torch.tensor([0.25] * 3), enabled=False)
    assert torch.equal(off.train(x, torch.Generator()), plain)
    # with pad 0 and no flip the crop is the identity
    same = DeviceAugment(torch.tensor([0.5] * 3), torch.tensor([0.25] * 3), pad=0, flip=False)
    assert torch.equal(same.train(x, torch.Generator()), plain)


def test_augment_crop_is_a_window():
    x = torch.arange(4 * 4, dtype=torch.uint8).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    aug = DeviceAugment(torch.zeros(3), torch.ones(3) / 255.0, pad=1, flip=False)
    padded = torch.nn.functional.pad(x.float(), (1, 1, 1, 1))
    out = aug.train(x, torch.Generator().manual_seed(3))[0, 0]
    windows = [padded[0, 0, i:i + 4, j:j + 4] for i in range(3) for j in range(3)]
    assert any(torch.allclose(out, w, atol=1e-3) for w in windows)


@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="shared CIFAR-10 archive not beside the repo")
def test_real_cifar10_archive(tmp_path):
    spec = DataSpec(dataset="cifar10", root=str(SHARED_CIFAR), val_split=0.1)
    d = load_data(spec, "val", 0)
    assert d.train_x.shape == (45000, 3, 32, 32) and d.eval_x.shape == (5000, 3, 32, 32)
    assert torch.bincount(d.eval_y).tolist() == [500] * 10
    assert d.classes[0] == "airplane" and d.num_classes == 10
