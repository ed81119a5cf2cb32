"""RealRowsBatchNorm2d: BatchNorm whose statistics leave a padded batch's padding out."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fedmef_toolkit.fl.stepgraph import batch_mixing_layer
from fedmef_toolkit.layers.batchnorm import RealRowsBatchNorm2d, real_rows_of, use_real_rows
from fedmef_toolkit.models import get_model


def net() -> nn.Module:
    torch.manual_seed(0)
    # convs without bias, as before BatchNorm in the models (its gradient would be rounding noise)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False))


@pytest.mark.parametrize("channels_last", [False, True])
def test_padded_batch_is_the_short_batch(channels_last):
    """Outputs of the real rows, gradients (input, weights) and running statistics: those of
    plain BatchNorm on the unpadded short batch; the padding gets no gradient."""
    ref = net()
    model = copy.deepcopy(ref)
    rows = use_real_rows(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(1)
    n, full = 5, 8
    x = torch.randn(n, 3, 8, 8, generator=gen)
    padded = torch.cat([x, torch.zeros(full - n, 3, 8, 8)]).to(memory_format=fmt).requires_grad_(True)
    short = x.clone().to(memory_format=fmt).requires_grad_(True)
    g = torch.randn(n, 4, 6, 6, generator=gen)
    rows.count.fill_(n)
    with rows.padded():
        out = model(padded)
    expect = ref(short)
    torch.testing.assert_close(out[:n], expect, rtol=1e-5, atol=1e-5)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    (out[:n] * g).sum().backward()
    (expect * g).sum().backward()
    torch.testing.assert_close(padded.grad[:n], short.grad, rtol=1e-4, atol=1e-5)
    assert not padded.grad[n:].any()
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(ref.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_outside_padded_steps_it_is_batchnorm():
    """Inactive, in eval mode, or after `padded()` ends: plain BatchNorm, bit for bit; the
    layers keep the very tensors (and state_dict keys) of the BatchNorm they replace."""
    ref = net()
    model = copy.deepcopy(ref)
    before = {k: v for k, v in model.state_dict().items()}
    rows = use_real_rows(model)
    assert all(isinstance(model[i], RealRowsBatchNorm2d) for i in (1, 4)) and real_rows_of(model) is rows
    assert list(model.state_dict()) == list(ref.state_dict())
    assert all(model.state_dict()[k].data_ptr() == v.data_ptr() for k, v in before.items())
    x = torch.randn(6, 3, 8, 8)
    rows.count.fill_(3)
    with rows.padded(False):
        assert torch.equal(model(x), ref(x))
    with rows.padded():
        pass
    assert not rows.active and torch.equal(model(x), ref(x))
    model.eval(), ref.eval()
    with rows.padded():
        assert torch.equal(model(x), ref(x))
    assert use_real_rows(model) is None  # nothing left to replace: the layers are installed once


def test_which_layers_are_replaced_and_what_then_mixes_a_batch():
    cumulative = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None))
    assert use_real_rows(cumulative) is None  # a cumulative average would read the count on the host
    assert isinstance(batch_mixing_layer(cumulative), nn.BatchNorm2d)
    bn = get_model("cnn4", 4, norm="bn", width=0.25, image_size=8)
    assert isinstance(batch_mixing_layer(bn), nn.BatchNorm2d)
    use_real_rows(bn)
    assert batch_mixing_layer(bn) is None  # the padding can be left out of every BatchNorm
    orphan = nn.Sequential(RealRowsBatchNorm2d(3))  # no RealRows to say which rows are real
    assert isinstance(batch_mixing_layer(orphan), RealRowsBatchNorm2d)
    first, second = use_real_rows(net()), use_real_rows(net())
    two = nn.Sequential(RealRowsBatchNorm2d.of(nn.BatchNorm2d(3), first), RealRowsBatchNorm2d.of(nn.BatchNorm2d(3), second))
    with pytest.raises(ValueError, match="different RealRows"):
        real_rows_of(two)
