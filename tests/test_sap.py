import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fedmef_toolkit.memory.measure import saved_tensor_bytes
from fedmef_toolkit.memory.report import MemoryConfig, analytic_activation_bytes, build_report, write_report
from fedmef_toolkit.models import get_model
from fedmef_toolkit.sap import SAPConv2d, enable_sap
from fedmef_toolkit.sap.functions import SAPConfig, masked_relu, sap_conv2d, sap_linear
from fedmef_toolkit.sap.packing import keep_count, pack_activation, pack_bits, topk_keep_mask, unpack_activation, unpack_bits


def test_bit_packing_round_trip():
    m = torch.rand(1001) < 0.3
    bits = pack_bits(m)
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(1001 / 8)
    assert torch.equal(unpack_bits(bits, 1001), m)


@pytest.mark.parametrize("gamma", [0.5, 0.9])
@pytest.mark.parametrize("per_sample", [True, False])
def test_kept_fraction_is_exact_and_largest(gamma, per_sample):
    x = torch.randn(4, 3, 5, 5)
    mask = topk_keep_mask(x, gamma, per_sample)
    if per_sample:
        assert mask.view(4, -1).sum(1).tolist() == [keep_count(75, gamma)] * 4
        for i in range(4):
            kept, dropped = x[i].abs()[mask[i]], x[i].abs()[~mask[i]]
            assert kept.min() >= dropped.max()
    else:
        assert int(mask.sum()) == keep_count(300, gamma)
    bits, vals = pack_activation(x, gamma, per_sample)
    assert torch.equal(unpack_activation(bits, vals, x.shape), x * mask)


def dense_conv_grads(x, w, b, gy, stride=1, padding=1, groups=1):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_()
    F.conv2d(x, w, b, stride, padding, 1, groups).backward(gy)
    return x.grad, w.grad, b.grad


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9])
def test_sap_conv_gradients_against_dense_reference(groups, gamma):
    torch.manual_seed(0)
    x = torch.randn(3, 8, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 8 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    cfg = SAPConfig(gamma, True)
    y = sap_conv2d(x, w, b, (2, 2), (1, 1), (1, 1), groups, cfg)
    assert torch.allclose(y, F.conv2d(x, w, b, 2, 1, 1, groups))  # forward is exact
    gy = torch.randn_like(y)
    y.backward(gy)
    kept = x.detach() * topk_keep_mask(x.detach(), gamma, True) if gamma > 0 else x.detach()
    gx_ref, _, gb_ref = dense_conv_grads(x, w, b, gy, 2, 1, groups)
    _, gw_ref, _ = dense_conv_grads(kept, w, b, gy, 2, 1, groups)  # dense formula on the pruned input
    assert torch.allclose(x.grad, gx_ref)
    assert torch.allclose(w.grad, gw_ref)
    assert torch.allclose(b.grad, gb_ref)


@pytest.mark.parametrize("frozen", ["weight", "input", "bias"])
def test_sap_conv_gradients_for_each_subset_of_inputs(frozen):
    """Only the gradients asked for are computed, each as in the full case: a frozen weight
    (no pruned input needed) or a frozen input or bias (a channels-last input, too)."""
    torch.manual_seed(2)
    x0 = torch.randn(2, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w0, b0 = torch.randn(4, 6, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    gy = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    x, w, b = (t.clone().requires_grad_(name != frozen) for name, t in (("input", x0), ("weight", w0), ("bias", b0)))
    sap_conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1, SAPConfig(0.5, True)).backward(gy)
    kept = x0 * topk_keep_mask(x0, 0.5, True)
    gx_ref, _, gb_ref = dense_conv_grads(x0, w0, b0, gy, 1, 1, 1)
    _, gw_ref, _ = dense_conv_grads(kept, w0, b0, gy, 1, 1, 1)
    for t, ref, name in ((x, gx_ref, "input"), (w, gw_ref, "weight"), (b, gb_ref, "bias")):
        assert (t.grad is None) if name == frozen else torch.allclose(t.grad, ref), name


@pytest.mark.parametrize("gamma", [0.0, 0.7])
def test_sap_linear_gradients(gamma):
    torch.manual_seed(1)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = sap_linear(x, w, b, SAPConfig(gamma, True))
    gy = torch.randn_like(y)
    y.backward(gy)
    kept = x.detach() * topk_keep_mask(x.detach(), gamma, True) if gamma > 0 else x.detach()
    assert torch.allclose(x.grad, gy @ w.detach())
    assert torch.allclose(w.grad, gy.t() @ kept)
    assert torch.allclose(b.grad, gy.sum(0))


def test_masked_relu_matches_relu_and_saves_bits():
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    y = masked_relu(x, 1.7, None)
    assert torch.allclose(y, 1.7 * torch.relu(x))
    y.sum().backward()
    assert torch.allclose(x.grad, 1.7 * (x > 0).float())
    x2 = (torch.randn(2, 4, 6, 6) * 8).requires_grad_()
    masked_relu(x2, 1.0, 6.0).sum().backward()
    assert torch.equal(x2.grad, ((x2 > 0) & (x2 < 6)).float())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        masked_relu(torch.randn(64, 64, requires_grad=True), 1.0, None)
    assert [t.dtype for t in saved] == [torch.uint8] and saved[0].numel() == 64 * 64 // 8


@pytest.mark.parametrize("norm", ["bn", "nsconv"])
def test_gamma_zero_equals_dense_training(norm):
    torch.manual_seed(0)
    ref = get_model("resnet18", 10, norm=norm, width=0.25)
    sap = enable_sap(copy.deepcopy(ref), 0.0)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for m in (ref, sap):
        m.train()
        F.cross_entropy(m(x), y).backward()
    for (n, p), q in zip(ref.named_parameters(), sap.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), n
    if norm == "bn":
        assert any(isinstance(m, SAPConv2d) for m in sap.modules())
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(ref.parameters(), sap.parameters()))


def test_nsconv_sap_composition_grads_reach_weight_and_gain():
    torch.manual_seed(0)
    model = enable_sap(get_model("mobilenetv2", 10, norm="nsconv", width=0.25), 0.9)
    F.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([1, 2])).backward()
    conv = model.stem[0]
    assert conv.weight.grad is not None and conv.gain.grad is not None and conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))  # eval runs the plain layers


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])
@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_saved_bytes_match_analytic_count(arch, gamma):
    torch.manual_seed(0)
    model = MemoryConfig("c", arch, "nsconv", 0.25, 0.2, True, gamma).build(10, 16)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    analytic = sum(analytic_activation_bytes(copy.deepcopy(model), x).values())
    measured = saved_tensor_bytes(model, x, y)
    # stated tolerance: 2% (bit masks are padded to whole bytes; the loss keeps its logits)
    assert abs(measured["activations"] - analytic) <= 0.02 * analytic + 4096, (measured["activations"], analytic)


@pytest.mark.parametrize("norm,gamma", [("bn", 0.0), ("nsconv", 0.5)])
def test_measuring_saved_bytes_leaves_nothing_alive(norm, gamma):
    """The measurement's forward graph is freed with its result: nothing of it (or of the
    model) stays alive once the caller drops the model (the batched engine measures a copy)."""
    import gc
    import weakref

    model = MemoryConfig("c", "resnet18", norm, 0.25, 1.0 if norm == "bn" else 0.2, True, gamma).build(10, 16)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    assert saved_tensor_bytes(model, x, y)["activations"] > 0
    param, module = weakref.ref(next(model.parameters())), weakref.ref(model)
    del model
    gc.collect()
    assert param() is None and module() is None


def test_no_dense_copy_of_layer_inputs_under_sap():
    torch.manual_seed(0)
    model = MemoryConfig("c", "resnet18", "nsconv", 0.25, 1.0, True, 0.9).build(10, 16)
    x = torch.randn(8, 3, 16, 16)
    dense_shapes = set()

    def record(mod, inputs, output):
        dense_shapes.add(tuple(inputs[0].shape))

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(record)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model.train()
        model(x)
    big = [t for t in saved if t.dim() == 4 and tuple(t.shape) in dense_shapes and t.is_floating_point()]
    assert not big, [tuple(t.shape) for t in big][:3]


def test_sap_saves_much_less_than_bn_model():
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    ref = saved_tensor_bytes(MemoryConfig("a", "resnet18", "bn", 0.25).build(10, 16), x, y)["activations"]
    sap = saved_tensor_bytes(MemoryConfig("c", "resnet18", "nsconv", 0.25, 1.0, True, 0.9).build(10, 16), x, y)
    assert sap["activations"] <= 0.25 * ref


def test_report_json_schema_and_chart(tmp_path):
    rep = build_report([MemoryConfig("this", "cnn4", "nsconv", 0.5, 0.2, True, 0.9),
                        MemoryConfig("ref", "cnn4", "bn", 0.5, 0.2)], 8, 16, 10, torch.device("cpu"))
    write_report(rep, tmp_path)
    import json

    data = json.loads((tmp_path / "memory.json").read_text())
    assert data["schema"] == "fedmef-memory/1" and len(data["configurations"]) == 2
    assert (data["measured_on"], data["precision"], data["kernels"]) == ("cpu", "fp32", "torch")
    c = data["configurations"][0]
    assert set(c["analytic"]) == {"weights", "gradients", "optimizer", "activations", "total"}
    assert c["paper_figure"] == c["analytic"]["weights"] + c["measured"]["activations"]
    assert 0 < data["reduction_vs_reference"]["activations"] < 1
    assert (tmp_path / "memory.png").stat().st_size > 1000


def test_training_run_with_sap_writes_memory_report(tmp_path):
    import subprocess
    import sys

    import yaml
    from conftest import small_recipe

    rec = small_recipe(tmp_path, **{"model.norm": "nsconv", "method.name": "fedmef", "method.sap.enabled": True,
                                    "method.sap.gamma": 0.9, "fl.rounds": 2, "output.memory_report": True,
                                    "method.sparsity.delta_t": 1, "method.sparsity.t_end": 2})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    p = subprocess.run([sys.executable, "-m", "fedmef_toolkit.cli.main", "train", "--recipe", str(path), "--no-progress"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    run = tmp_path / "runs" / "run"
    assert (run / "memory.json").exists()
    p = subprocess.run([sys.executable, "-m", "fedmef_toolkit.cli.main", "report", str(run), "--json"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and '"fedmef-memory/1"' in p.stdout


def test_disable_sap_restores_plain_layers():
    from fedmef_toolkit.layers import ScaledReLU
    from fedmef_toolkit.sap import disable_sap

    model = enable_sap(get_model("cnn4", 10, norm="nsconv", width=0.25), 0.9)
    disable_sap(model)
    assert all(getattr(m, "sap", None) is None for m in model.modules())
    assert not any(m.save_mask for m in model.modules() if isinstance(m, ScaledReLU))
