import pytest
import torch
import torch.nn as nn

from fedmef_toolkit.layers import NSConv2d
from fedmef_toolkit.models import get_model, list_models


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2", "cnn4"])
@pytest.mark.parametrize("norm", ["bn", "nsconv"])
@pytest.mark.parametrize("size", [32, 64])
def test_forward_shapes(arch, norm, size):
    m = get_model(arch, 7, norm=norm, width=0.25, image_size=size)
    assert m(torch.randn(2, 3, size, size)).shape == (2, 7)
    has_bn = any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert has_bn == (norm == "bn")
    if norm == "nsconv":
        convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
        assert convs and all(isinstance(c, NSConv2d) for c in convs)


def test_resnet18_is_the_cifar_variant():
    m = get_model("resnet18", 10)
    assert 11.0e6 < sum(p.numel() for p in m.parameters()) < 11.3e6
    assert m.stem[0].kernel_size == (3, 3) and m.stem[0].stride == (1, 1)
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())
    assert get_model("resnet18", 10, image_size=64).stem[0].stride == (2, 2)


def test_mobilenetv2_has_depthwise_convs():
    m = get_model("mobilenetv2", 10, norm="nsconv")
    dw = [c for c in m.modules() if isinstance(c, NSConv2d) and c.groups > 1]
    assert dw and all(c.groups == c.in_channels == c.out_channels for c in dw)


def test_registry_errors():
    assert {"resnet18", "mobilenetv2"} <= set(list_models())
    with pytest.raises(KeyError, match="unknown model"):
        get_model("vgg99")


def test_register_model_extends_the_registry():
    from fedmef_toolkit.models import register_model
    from fedmef_toolkit.models.cnn import CNN4

    register_model("tiny_test_net", CNN4)
    assert "tiny_test_net" in list_models()
    assert get_model("tiny_test_net", 3, width=0.25)(torch.randn(2, 3, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("norm", ["bn", "nsconv"])
def test_narrow_resnet_is_the_fedmef_authors_cifar_model(norm):
    m = get_model("resnet_narrow", 10, norm=norm)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs if c.kernel_size == (3, 3)] == [16] * 5 + [32] * 4 + [64] * 4
    weights = sum(c.weight.numel() for c in convs) + m.fc.weight.numel()
    assert 0.17e6 < weights < 0.18e6  # about 0.18M parameters, as in their library
    assert not hasattr(m, "layer4") and m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_nsconv_resnet_blocks_are_normalizer_free():
    """h + alpha * f(h / beta): with the branch's last gain at zero a block is the identity
    (or its shortcut conv of act(h / beta)), and alpha scales the branch exactly."""
    torch.manual_seed(0)
    m = get_model("resnet18", 10, norm="nsconv", width=0.25, nsconv_alpha=0.3)
    block = m.layer1[1]
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    branch = block.conv2(block.act2(block.conv1(block.act1(x))))
    assert torch.allclose(block(x), x + 0.3 * branch, atol=1e-6)
    assert block.act1.input_scale == pytest.approx(1 / block1_beta(m))
    with torch.no_grad():
        block.conv2.gain.zero_()
        block.conv2.bias.zero_()
    assert torch.allclose(block(x), x)


def block1_beta(m):
    """The stream's predicted std entering layer1[1]: after one block of alpha^2."""
    return (1 + m.layer1[0].alpha ** 2) ** 0.5


def test_scaled_relu_input_scale_is_a_free_multiplication():
    from fedmef_toolkit.layers import ScaledReLU
    from fedmef_toolkit.layers.activations import RELU_GAIN

    x = torch.randn(1000)
    act = ScaledReLU(input_scale=0.5)
    assert torch.allclose(act(x), RELU_GAIN * torch.relu(0.5 * x))
    clipped = ScaledReLU(gain=2.0, max_value=1.0, input_scale=0.25)
    assert torch.allclose(clipped(x * 8), 2.0 * torch.clamp(0.25 * x * 8, 0.0, 1.0))
    act.save_mask = True  # the SAP path (1-bit mask for backward) computes the same function
    xr = x.clone().requires_grad_(True)
    act.train()
    out = act(xr)
    out.sum().backward()
    assert torch.allclose(out, RELU_GAIN * torch.relu(0.5 * x))
    assert torch.allclose(xr.grad, RELU_GAIN * 0.5 * (x > 0).float())
    with pytest.raises(ValueError, match="input_scale"):
        ScaledReLU(input_scale=0.0)


@pytest.mark.parametrize("arch", ["resnet18", "resnet_narrow", "mobilenetv2", "cnn4"])
def test_center_head_feeds_the_classifier_its_input_minus_the_scaled_relu_mean(arch):
    """model.nsconv.center_head: logits = W (x - c) + b with c the scaled ReLU's mean, and
    nothing else changes; BN models and the default keep the plain classifier."""
    from fedmef_toolkit.models.blocks import SCALED_RELU_MEAN

    torch.manual_seed(0)
    plain = get_model(arch, 10, norm="nsconv", width=0.25)
    centred = get_model(arch, 10, norm="nsconv", width=0.25, nsconv_center_head=True)
    centred.load_state_dict(plain.state_dict())
    classifier = [m for m in plain.modules() if isinstance(m, torch.nn.Linear)][-1]
    feats = {}
    classifier.register_forward_hook(lambda mod, inp, out: feats.update(x=inp[0]))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out_plain, out_centred = plain(x), centred(x)
        expected = out_plain - classifier.weight.sum(1) * SCALED_RELU_MEAN
    assert torch.allclose(out_centred, expected, atol=1e-5)
    assert (out_centred - out_plain).abs().max() > 0.1
    assert get_model(arch, 10, norm="bn", width=0.25, nsconv_center_head=True).head_shift == 0.0
    assert plain.head_shift == 0.0 and centred.head_shift == pytest.approx(0.6833, abs=1e-4)
    from fedmef_toolkit.memory.measure import saved_tensor_bytes

    y = torch.randint(0, 10, (3,))
    assert saved_tensor_bytes(centred, x, y)["activations"] == saved_tensor_bytes(plain, x, y)["activations"]
