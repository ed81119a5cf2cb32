"""Adaptive gradient clipping: the closed form, which parameters it touches, and the trainer wiring."""

import torch
import torch.nn as nn

from fedmef_toolkit.fl.agc import adaptive_clip_, agc_weights
from fedmef_toolkit.models import get_model


def test_each_unit_is_clipped_to_clip_times_its_weight_norm():
    w = nn.Parameter(torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]]))  # row norms 5, 1, 0 (-> eps)
    w.grad = torch.tensor([[30.0, 40.0], [0.01, 0.0], [1.0, 0.0]])      # row norms 50, 0.01, 1
    adaptive_clip_([w], clip=0.1, eps=1e-3)
    g = w.grad
    assert torch.allclose(g[0].norm(), torch.tensor(0.5))             # 50 -> 0.1 * 5, same direction
    assert torch.allclose(g[0] / g[0].norm(), torch.tensor([0.6, 0.8]))
    assert torch.equal(g[1], torch.tensor([0.01, 0.0]))                # under the bound: untouched
    assert torch.allclose(g[2].norm(), torch.tensor(1e-4))             # zero weight: bound 0.1 * eps


def test_conv_units_are_output_channels_and_vectors_count_as_one_unit():
    conv = nn.Parameter(torch.ones(2, 3, 3, 3))        # each output channel has norm sqrt(27)
    conv.grad = torch.zeros(2, 3, 3, 3)
    conv.grad[0] = 10.0                                  # channel 0 norm 10 sqrt(27); channel 1 zero
    gain = nn.Parameter(torch.tensor([1.0, 1.0, 1.0, 1.0]))  # norm 2
    gain.grad = torch.tensor([4.0, 0.0, 0.0, 0.0])
    adaptive_clip_([conv, gain], clip=0.5)
    assert torch.allclose(conv.grad[0].norm(), torch.tensor(0.5 * 27 ** 0.5))
    assert torch.equal(conv.grad[1], torch.zeros(3, 3, 3))
    assert torch.allclose(gain.grad, torch.tensor([1.0, 0.0, 0.0, 0.0]))  # 4 -> 0.5 * 2


def test_agc_leaves_the_classifier_out_and_covers_gains_and_biases():
    model = get_model("resnet18", 10, norm="nsconv", width=0.25)
    params = {id(p) for p in agc_weights(model)}
    assert id(model.fc.weight) not in params and id(model.fc.bias) not in params
    assert id(model.stem.gain) in params and id(model.stem.bias) in params and id(model.stem.weight) in params
    assert len(params) == sum(1 for _ in model.parameters()) - 2


def test_trainer_applies_agc_only_when_asked(tmp_path):
    from fedmef_toolkit.fl.simulator import Simulator
    from fedmef_toolkit.recipe import recipe_from_dict
    from conftest import small_recipe

    finals = {}
    for agc in (0.0, 1e-3):
        r = recipe_from_dict(small_recipe(tmp_path, **{"fl.agc": agc, "fl.rounds": 1, "output.name": f"agc{agc}"}))
        sim = Simulator(r, tmp_path / f"agc{agc}", show_progress=False)
        start = {k: v.clone() for k, v in sim.model.state_dict().items()}
        sim.write_run_files()
        sim.run()
        moved = {k: float((v.float() - start[k].float()).norm() / start[k].float().norm().clamp_min(1e-12))
                 for k, v in sim.model.state_dict().items() if k.endswith("weight") and v.dim() > 1}
        finals[agc] = moved
    # clipped to 0.1% of each unit's norm per step: conv weights move far less than unclipped
    conv_keys = [k for k in finals[0.0] if not k.startswith("fc")]
    assert all(finals[1e-3][k] < 0.5 * finals[0.0][k] for k in conv_keys)
    assert all(finals[1e-3][k] < 0.02 for k in conv_keys)  # at most ~steps * 1e-3 * lr-scaled growth


def test_vectors_and_matrices_clip_as_the_unit_by_unit_reference():
    """The grouped path for vectors gives what clipping each unit on its own gives."""
    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (4,), (6, 4), (6,), (1,)]
    ws = [nn.Parameter(torch.randn(s)) for s in shapes]
    for w in ws:
        w.grad = torch.randn(w.shape) * 10
    ws[1].grad.zero_()  # a zero gradient stays zero (no division by zero)
    expected = []
    for w in ws:
        units = w.detach().reshape(w.shape[0], -1) if w.dim() > 1 else w.detach().reshape(1, -1)
        grads = w.grad.reshape(units.shape)
        rows = [g * min(1.0, 0.3 * max(float(u.norm()), 1e-3) / max(float(g.norm()), 1e-6))
                for u, g in zip(units, grads)]
        expected.append(torch.stack(rows).reshape(w.shape))
    adaptive_clip_(ws, clip=0.3)
    for w, e in zip(ws, expected):
        assert torch.allclose(w.grad, e, rtol=1e-5, atol=1e-7)
