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
