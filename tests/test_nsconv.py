import pytest
import torch

from fedmef_toolkit.layers import NSConv2d
from fedmef_toolkit.layers.activations import RELU_GAIN, ScaledReLU
from fedmef_toolkit.layers.nsconv import standardize_weight, standardize_weight_reference
from fedmef_toolkit.models import get_model


def rand_mask(shape, p=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (6, 1, 3, 3), (5, 7)])  # conv, depthwise, linear-shaped
def test_zero_mean_unit_norm_over_active_entries(masked, shape):
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64) * 3 + 1.5
    gain = torch.rand(shape[0], dtype=torch.float64) + 0.5
    mask = rand_mask(shape) if masked else None
    if masked:
        mask.view(shape[0], -1)[:, :2] = True  # every channel keeps at least two entries
    w_hat = standardize_weight(w, gain, mask).view(shape[0], -1)
    m = torch.ones_like(w_hat, dtype=torch.bool) if mask is None else mask.view(shape[0], -1)
    assert torch.all(w_hat[~m] == 0)
    mean = (w_hat * m).sum(1) / m.sum(1)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-12)
    assert torch.allclose((w_hat ** 2).sum(1), gain ** 2, rtol=1e-10)  # sum (w-mu)^2 / (n var) = 1


@pytest.mark.parametrize("masked", [False, True])
def test_uncentred_standardisation_is_unit_norm_and_keeps_the_mean(masked):
    torch.manual_seed(0)
    shape = (6, 1, 3, 3)
    w = torch.randn(shape, dtype=torch.float64) + 1.0
    gain = torch.rand(6, dtype=torch.float64) + 0.5
    mask = rand_mask(shape, 0.6) if masked else None
    if masked:
        mask.view(6, -1)[:, :2] = True
    w_hat = standardize_weight(w, gain, mask, center=False)
    wm = w if mask is None else w * mask
    ref = wm / wm.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * gain.view(-1, 1, 1, 1)
    assert torch.allclose(w_hat, ref)
    assert (w_hat.flatten(1).sum(1).abs() > 1e-3).all()  # the filter's mean is not removed


def test_uncentred_gradcheck_and_custom_backward():
    torch.manual_seed(5)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    mask = rand_mask(w.shape, 0.7, seed=6)
    mask.view(4, -1)[:, :2] = True
    for m in (mask, None):
        assert torch.autograd.gradcheck(lambda a, b: standardize_weight(a, b, m, center=False), (w, g))
        up = torch.randn(4, 1, 3, 3, dtype=torch.float64)
        a = torch.autograd.grad((standardize_weight(w, g, m, center=False) * up).sum(), (w, g))
        b = torch.autograd.grad((standardize_weight_reference(w, g, m, center=False) * up).sum(), (w, g))
        for x, y in zip(a, b):
            assert torch.allclose(x, y, atol=1e-12)


def test_input_mean_shift_is_a_conv_of_the_centred_input():
    """With input_mean c the layer computes conv(x - c): the input centred, then zero-padded."""
    torch.manual_seed(2)
    conv = NSConv2d(5, 5, 3, padding=1, groups=5, center=False, input_mean=0.7).double()
    x = torch.rand(2, 5, 6, 6, dtype=torch.float64) * 2
    w = conv.standardized_weight()
    ref = torch.nn.functional.conv2d(x - 0.7, w, conv.bias, padding=1, groups=5)
    assert torch.allclose(conv(x), ref)
    # an input equal to its mean gives the bias alone, at the border too
    flat = conv(torch.full((1, 5, 6, 6), 0.7, dtype=torch.float64))
    assert torch.allclose(flat, conv.bias.view(1, -1, 1, 1).expand_as(flat))
    # the shift's gradient (through a function that saves no tensor) against autograd's
    from fedmef_toolkit.layers.nsconv import response_to_ones
    w = conv.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: response_to_ones(x, v, 2, 1, 1, 5), (w,))


def test_unbiased_variance_scale():
    w = torch.randn(4, 10, dtype=torch.float64)
    w_hat = standardize_weight(w, torch.ones(4, dtype=torch.float64), unbiased=True)
    assert torch.allclose((w_hat ** 2).sum(1), torch.full((4,), 9 / 10, dtype=torch.float64))


def test_all_entries_variant_differs_and_is_masked():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64) + 2.0
    mask = rand_mask(w.shape, 0.5)
    a = standardize_weight(w, torch.ones(4, dtype=torch.float64), mask, stats="active")
    b = standardize_weight(w, torch.ones(4, dtype=torch.float64), mask, stats="all")
    assert torch.all(b[~mask] == 0) and not torch.allclose(a, b)
    # 'all' statistics over the masked weight = plain standardisation of w*m, then masked
    ref = standardize_weight(w * mask, torch.ones(4, dtype=torch.float64)) * mask
    assert torch.allclose(b, ref)


@pytest.mark.parametrize("stats", ["active", "all"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_gradcheck_float64(stats, unbiased):
    torch.manual_seed(1)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    mask = rand_mask(w.shape, 0.6, seed=2)
    mask.view(3, -1)[:, :2] = True
    assert torch.autograd.gradcheck(lambda a, b: standardize_weight(a, b, mask, stats, unbiased), (w, g))
    assert torch.autograd.gradcheck(lambda a, b: standardize_weight(a, b, None, stats, unbiased), (w, g))


def test_custom_backward_matches_autograd_reference():
    torch.manual_seed(3)
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.rand(16, dtype=torch.float64, requires_grad=True)
    mask = rand_mask(w.shape, 0.3, seed=4)
    up = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    a = torch.autograd.grad((standardize_weight(w, g, mask) * up).sum(), (w, g))
    b = torch.autograd.grad((standardize_weight_reference(w, g, mask) * up).sum(), (w, g))
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-12)


def test_zero_and_one_active_entry_channels_are_zero_and_finite():
    w = torch.randn(3, 4, 3, 3, requires_grad=True)
    g = torch.ones(3, requires_grad=True)
    mask = torch.ones(3, 4, 3, 3, dtype=torch.bool)
    mask[0] = False  # no active entry
    mask[1] = False
    mask[1, 2, 1, 1] = True  # exactly one
    out = standardize_weight(w, g, mask)
    assert torch.all(out[0] == 0) and torch.all(out[1] == 0)
    out.sum().backward()
    assert torch.isfinite(w.grad).all() and torch.isfinite(g.grad).all()
    assert torch.all(w.grad[0] == 0) and torch.all(w.grad[1] == 0)


def test_nsconv_layer_matches_functional_and_supports_groups_and_masks():
    conv = NSConv2d(6, 6, 3, padding=1, groups=6)
    x = torch.randn(2, 6, 5, 5)
    ref = torch.nn.functional.conv2d(x, standardize_weight(conv.weight, conv.gain), conv.bias, padding=1, groups=6)
    assert torch.allclose(conv(x), ref)
    conv.register_buffer("weight_mask", rand_mask(conv.weight.shape, 0.5))
    w_hat = conv.standardized_weight()
    assert torch.all(w_hat[~conv.weight_mask] == 0)
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv.gain.grad is not None


def test_scaled_relu_unit_variance():
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    y = ScaledReLU()(x)
    assert abs(RELU_GAIN - 1.7139) < 2e-3  # sqrt(2 / (1 - 1/pi)), the normalizer-free gain
    assert abs(float(y.var()) - 1.0) < 0.02


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])
def test_signal_variance_stays_near_one(arch):
    torch.manual_seed(0)
    model = get_model(arch, 10, norm="nsconv")
    stages = {"resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
              "mobilenetv2": ["stem", "features.3", "features.9", "features.16", "head"]}[arch]
    var = {}
    for name in stages:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: var.__setitem__(n, float(o.var())))
    model.eval()
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32))
    for name, v in var.items():
        assert 0.2 < v < 5.0, (name, v)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])
def test_nsconv_models_train_at_batch_size_one(arch):
    model = get_model(arch, 10, norm="nsconv", width=0.25)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(1, 3, 32, 32)), torch.tensor([3]))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_effective_grad_recording_sums_dl_dw_hat_between_start_and_stop():
    """What growth reads: the gradient wrt the standardised weight, summed over the backward
    passes between start and stop; dense where dL/dw is zero at pruned entries."""
    torch.manual_seed(0)
    conv = NSConv2d(3, 4, 3, padding=1)
    conv.register_buffer("weight_mask", (torch.rand_like(conv.weight) < 0.5).float())
    xs = [torch.randn(2, 3, 5, 5) for _ in range(3)]
    expect = torch.zeros_like(conv.weight)
    for x in xs[:2]:
        w_hat = conv.standardized_weight().detach().requires_grad_(True)
        expect += torch.autograd.grad(torch.nn.functional.conv2d(x, w_hat, conv.bias, padding=1).square().sum(), w_hat)[0]
    conv.start_effective_grad()
    for x in xs[:2]:
        conv(x).square().sum().backward()
    got = conv.stop_effective_grad()
    torch.testing.assert_close(got, expect)
    assert bool((got[conv.weight_mask == 0] != 0).any())  # dense: pruned entries have a gradient too
    conv(xs[2]).square().sum().backward()  # after stop nothing is recorded
    assert conv.stop_effective_grad() is None
