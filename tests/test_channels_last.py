"""Channels-last client models (`channels_last`, on by default on CUDA): the layers keep the
layout (no conversion around each convolution) and train exactly as channels-first ones."""

from __future__ import annotations

import pytest
import torch
from conftest import small_recipe

from fedmef_toolkit.fl.simulator import Simulator
from fedmef_toolkit.layers import layout
from fedmef_toolkit.layers.nsconv import NSConv2d
from fedmef_toolkit.recipe import recipe_from_dict
from fedmef_toolkit.sap.functions import SAPConfig, masked_relu, sap_linear


def test_rows_are_views_in_memory_order_and_from_rows_inverts_them():
    x = torch.randn(3, 4, 5, 6)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert layout.is_channels_last(cl) and not layout.is_channels_last(x)
    r = layout.rows(cl, 3)
    assert r.data_ptr() == cl.data_ptr() and r.is_contiguous()  # a view: no copy
    assert torch.equal(r[1], cl[1].permute(1, 2, 0).reshape(-1))  # H, W, C order
    back = layout.from_rows(r, cl.shape, True)
    assert torch.equal(back, x) and layout.is_channels_last(back)
    assert torch.equal(layout.from_rows(layout.rows(x, 3), x.shape, False), x)
    one = torch.randn(2, 1, 3, 3).contiguous(memory_format=torch.channels_last)  # C = 1: also contiguous
    assert not layout.is_channels_last(one) and torch.equal(layout.rows(one, 2), one.reshape(2, -1))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9])
def test_nsconv_sap_chain_keeps_the_layout_and_the_gradients(gamma):
    """A masked NSConv with SAP, the masked ReLU and a SAP linear layer: channels-last weights and
    input give channels-last activations and the channels-first gradients (PyTorch path, CPU)."""
    torch.manual_seed(0)
    conv = NSConv2d(3, 8, 3, padding=1)
    conv.register_buffer("weight_mask", torch.rand_like(conv.weight) < 0.5)
    conv.sap = SAPConfig(gamma)
    fc = torch.nn.Linear(8 * 6 * 6, 5)
    x = torch.randn(4, 3, 6, 6)
    grads, outs = {}, {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        conv.to(memory_format=fmt)
        h = masked_relu(conv(x.contiguous(memory_format=fmt)), 1.7)
        outs[fmt] = h
        loss = sap_linear(h.flatten(1), fc.weight, fc.bias, SAPConfig(gamma)).square().sum()
        # what a step sees: autograd.grad's outputs (.grad would take the parameter's layout anyway)
        grads[fmt] = torch.autograd.grad(loss, (conv.weight, conv.gain, conv.bias, fc.weight, fc.bias))
    assert layout.is_channels_last(outs[torch.channels_last]) and layout.is_channels_last(grads[torch.channels_last][0])
    torch.testing.assert_close(outs[torch.channels_last], outs[torch.contiguous_format])
    for a, b in zip(grads[torch.channels_last], grads[torch.contiguous_format]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["fedmef", "feddst"])
def test_channels_last_clients_train_as_channels_first_ones(tmp_path, method):
    """One round (FedMef: BaE, AGC, growth gradients at an adjustment round; FedDST: masks
    changed mid-training) with channels-last worker models equals the channels-first round.
    SAP is off here: the images are uint8, so a sample's |x| has many ties, and SAP keeps the
    first of equal entries in memory order, which differs between the layouts (an equally
    exact top-k); the SAP layers themselves are compared above, on tie-free inputs."""
    over = {"method.name": method, "model.norm": "nsconv", "method.sparsity.delta_t": 1,
            "method.sparsity.t_end": 4, "fl.agc": 0.16}
    results = {}
    for fmt in ("off", "on"):
        rec = recipe_from_dict(small_recipe(tmp_path / fmt, **over, channels_last=fmt == "on"))
        sim = Simulator(rec, tmp_path / fmt / "runs" / "run", show_progress=False)
        sim.run_round(1)
        results[fmt] = sim.model.state_dict()
        if fmt == "on":
            conv_weights = [p for p in sim.engine.worker.parameters() if p.dim() == 4]
            assert sim.trainer.channels_last and conv_weights and all(map(layout.is_channels_last, conv_weights))
            if method == "fedmef":  # BaE's tensors in the workers' layout (multi-tensor kernels' fast path)
                masks = [m for m in sim.strategy.penalty.masks.values() if m.dim() == 4]
                assert masks and all(map(layout.is_channels_last, masks))
    for k, v in results["off"].items():
        torch.testing.assert_close(results["on"][k].float(), v.float(), rtol=1e-4, atol=1e-5, msg=k)


def test_a_step_takes_its_batch_layout_from_the_model():
    """A 1x1 conv (or one with one input channel) is both layouts at once: the model counts as
    channels-last when any conv weight is only channels-last, and every batch is put in it."""
    import contextlib

    from fedmef_toolkit.fl.stepgraph import GraphedStep

    def step_of(model):
        return GraphedStep(model, batch_size=4, momentum=0.0, weight_decay=0.0, agc=0.0,
                           autocast=contextlib.nullcontext, cuda_graphs=False)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 4, 3), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3))
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(layout.is_channels_last(args[0])))
    batch = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    step_of(model).step(*batch, 0.1)
    model.to(memory_format=torch.channels_last)
    assert not layout.is_channels_last(model[0].weight)  # (4, 3, 1, 1): contiguous in both layouts
    step_of(model).step(*batch, 0.1)  # a channels-first batch, converted by the step
    assert seen == [False, True]
