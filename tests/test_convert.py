import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from fedmef_toolkit.convert import convert_file, convert_module, load_converted
from fedmef_toolkit.errors import UserError
from fedmef_toolkit.layers import NSConv2d
from fedmef_toolkit.models import get_model


class UserCNN(nn.Module):
    """A user-defined CNN of Conv2d/BatchNorm2d/ReLU blocks."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)  # a conv without BN
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.head(self.body(x))).flatten(1)


def randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def check_converted(model, size=32):
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, NSConv2d) for m in model.modules())
    model.train()
    out = model(torch.randn(1, 3, size, size))
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "vgg11_bn"])
def test_torchvision_models_convert(name):
    model = randomize_bn(getattr(torchvision.models, name)(weights=None, num_classes=10))
    report = convert_module(model)
    n_bn = len(report.folded_bn)
    assert n_bn > 0 and len(report.converted) >= n_bn
    check_converted(model)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2", "cnn4"])
def test_registry_models_convert(arch):
    model = randomize_bn(get_model(arch, 10, width=0.25))
    convert_module(model)
    check_converted(model)


def test_fold_is_exact_for_zero_mean_filters():
    torch.manual_seed(0)
    model = randomize_bn(UserCNN())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight.view(m.out_channels, -1)
                w -= w.mean(dim=1, keepdim=True)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    convert_module(model)
    model.eval()
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_state_dict_file_round_trip(tmp_path):
    src = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    path = tmp_path / "r18.pt"
    torch.save(src.state_dict(), path)
    out = tmp_path / "r18_ns.safetensors"
    report, desc = convert_file(path, out, arch="resnet18")
    assert desc["source"]["source"] == "torchvision" and len(report.folded_bn) == 20
    rebuilt = load_converted(out)
    check_converted(rebuilt)
    direct = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    direct.load_state_dict(src.state_dict())
    convert_module(direct)
    x = torch.randn(2, 3, 32, 32)
    rebuilt.eval(), direct.eval()
    assert torch.equal(rebuilt(x), direct(x))


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "user.pt"
    torch.save(randomize_bn(UserCNN()), path)
    with pytest.raises(UserError, match="--trust-pickle"):
        convert_file(path, tmp_path / "o.safetensors")
    report, desc = convert_file(path, tmp_path / "o.safetensors", trust_pickle=True)
    assert len(report.folded_bn) == 2 and "head" in report.converted and desc["source"] is None


class Boom:
    def __reduce__(self):
        return (exec, ("open('/tmp/fedmef-pwned', 'w').write('x')",))


def test_hostile_pickle_is_never_executed(tmp_path):
    import os

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(UserError):
        convert_file(path, tmp_path / "o.safetensors", arch="resnet18")
    assert not os.path.exists("/tmp/fedmef-pwned")


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"PK\x03\x04truncated"])
def test_corrupt_files_give_one_line_errors(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserError):
        convert_file(path, tmp_path / "o.safetensors", arch="resnet18")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(UserError, match="safetensors"):
        convert_file(bad, tmp_path / "o.safetensors", arch="resnet18")


def test_truncated_state_dict(tmp_path):
    path = tmp_path / "r.pt"
    torch.save(get_model("cnn4", 10).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError):
        convert_file(path, tmp_path / "o.safetensors", arch="cnn4")


def test_wrong_arch_and_unsupported_bn(tmp_path):
    path = tmp_path / "r.pt"
    torch.save(get_model("cnn4", 10).state_dict(), path)
    with pytest.raises(UserError, match="do not fit"):
        convert_file(path, tmp_path / "o.safetensors", arch="resnet18")
    lonely = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3))
    with pytest.raises(UserError, match="BatchNorm '0'"):
        convert_module(lonely)


def test_cli_convert_and_train_from_converted(tmp_path):
    import yaml
    from conftest import small_recipe

    src = tmp_path / "cnn.pt"
    torch.save(get_model("cnn4", 4, width=0.25).state_dict(), src)
    out = tmp_path / "cnn_ns.safetensors"
    proc = subprocess.run([sys.executable, "-m", "fedmef_toolkit.cli.main", "convert", str(src), "--arch", "cnn4",
                           "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "BatchNorm layers folded and removed" in proc.stdout
    refused = subprocess.run([sys.executable, "-m", "fedmef_toolkit.cli.main", "convert", str(tmp_path / "missing.pt")],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(small_recipe(tmp_path, **{"fl.rounds": 1, "model.init": str(out)})))
    proc = subprocess.run([sys.executable, "-m", "fedmef_toolkit.cli.main", "train", "--recipe", str(recipe),
                           "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    final = load_converted(tmp_path / "runs" / "run" / "model.safetensors")
    assert isinstance(final.features[0][0], NSConv2d)


@pytest.mark.parametrize("arch, recipe, shipped", [
    ("resnet18", "fedmef_resnet18_cifar10.yaml", ("lr: 0.3", "agc: 0.16")),
    ("mobilenetv2", "fedmef_mobilenetv2_cinic10.yaml", ("lr: 0.1", "agc: 0.16")),
])
def test_converted_model_trains_stably_under_the_shipped_fedmef_settings(tmp_path, arch, recipe, shipped):
    """The FedMef recipes' settings (ResNet18: lr 0.3 with AGC; MobileNetV2: lr 0.1 with AGC)
    must not make a converted model diverge."""
    import json

    src = tmp_path / "bn.pt"
    torch.manual_seed(0)
    bn_model = get_model(arch, 4, width=0.25)
    for m in bn_model.modules():  # BN statistics as a trained network has them, not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(bn_model.state_dict(), src)
    out = tmp_path / "ns.safetensors"
    proc = subprocess.run([sys.executable, "-m", "fedmef_toolkit.cli.main", "convert", str(src), "--arch", arch,
                           "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    sets = ["data.dataset=synthetic", "data.root=", "data.num_clients=6", "data.synthetic.num_samples=400",
            "data.synthetic.num_classes=4", "data.synthetic.image_size=16", "fl.clients_per_round=2",
            "fl.local_epochs=1", "fl.rounds=3", "fl.batch_size=16", "method.sparsity.delta_t=2", "eval.every=1",
            f"model.init={out}", f"output.dir={tmp_path / 'runs'}", "output.name=conv", "output.memory_report=false",
            "device=cpu"]
    cmd = [sys.executable, "-m", "fedmef_toolkit.cli.main", "train", "--recipe", recipe, "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "runs" / "conv" / "metrics.jsonl").read_text().splitlines()]
    recipe = (tmp_path / "runs" / "conv" / "recipe.yaml").read_text()
    assert all(s in recipe for s in shipped)  # the shipped settings were in force
    assert len(rows) == 3 and all(np.isfinite(r["train_loss"]) and np.isfinite(r["eval_loss"]) for r in rows)
