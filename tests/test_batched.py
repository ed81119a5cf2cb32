"""The batched engine (fl/batched.py) against the sequential one.

Equivalence: every client's update from the batched engine equals the
sequential engine's within fp32 tolerance TOL (max |difference| per tensor
relative to the tensor's largest entry; measured about 5e-7 on the CPU; MobileNetV2, whose
sparse depthwise NSConvs amplify fp32 rounding to ~5e-4, is checked in float64, where it agrees to 2e-15), masks
and integer buffers exactly, for every method, with unequal client sizes,
short last batches, mid-training mask changes (FedDST), BaE (per-client
penalty and step size), SAP, AGC and the growth-gradient upload.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from conftest import small_recipe

from fedmef_toolkit.errors import UserError
from fedmef_toolkit.fl.batched import BatchedEngine
from fedmef_toolkit.fl.client import ClientData
from fedmef_toolkit.fl.engine import SequentialEngine, select_engine
from fedmef_toolkit.fl.simulator import Simulator
from fedmef_toolkit.fl.stacked import stack_inputs, stack_model, stacking_problem
from fedmef_toolkit.fl.strategies.feddst import LocalAdjustPlan
from fedmef_toolkit.fl.strategies.fedmef import BaEPlan
from fedmef_toolkit.recipe import recipe_from_dict
from fedmef_toolkit.sparse.masks import get_masks
from fedmef_toolkit.sparse.schedules import round_lr

TOL = 1e-4
ADJUST = {"method.sparsity.delta_t": 2, "method.sparsity.t_end": 4}  # round 2 adjusts masks
FEDMEF = {"method.name": "fedmef", "model.norm": "nsconv", "fl.agc": 0.16, "method.sap.enabled": True, **ADJUST,
          "fl.lr_schedule": "exp", "fl.lr_decay": 0.5, "method.bae.psi": 100.0}  # BaE's step size above eta


def simulator(tmp_path, **over) -> Simulator:
    return Simulator(recipe_from_dict(small_recipe(tmp_path, **over)), tmp_path / "runs" / "run", show_progress=False)


def to_float64(sim: Simulator) -> Simulator:
    sim.model.double()
    sim.augment.mean, sim.augment.std = sim.augment.mean.double(), sim.augment.std.double()
    return sim


def both_engines(sim: Simulator, t: int, clients=None, max_clients: int = 0):
    """Run round t's clients through both engines from the same global model and plans."""
    model, strategy, r = sim.model, sim.strategy, sim.recipe
    strategy.begin_round(t, model)
    lr = round_lr(t, r.fl.rounds, r.fl.lr, r.fl.lr_schedule, r.fl.lr_decay)
    if clients is None:
        clients = [ClientData(c, sim.client_indices[c]) for c in sim.sample_clients(t)]
    plans = []

    def make_plan():
        plans.append(strategy.client_plan(t, lr, model))
        return plans[-1]

    seq = SequentialEngine(sim.trainer, r.seed).run_round(t, model, clients, make_plan)
    bat = BatchedEngine(sim.trainer, r.seed, max_clients).run_round(t, model, clients, make_plan)
    return seq, bat, plans


def assert_same_updates(seq, bat):
    assert [r.cid for r in seq] == [r.cid for r in bat]
    for a, b in zip(seq, bat):
        assert (a.num_samples, a.steps) == (b.num_samples, b.steps)
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert a.state.keys() == b.state.keys()
        for key, x in a.state.items():
            y = b.state[key]
            if x.is_floating_point():
                err = float((x - y).abs().max()) / (float(x.abs().max()) + 1e-12)
                assert err <= TOL, f"client {a.cid} {key}: relative difference {err:.2e}"
            else:
                assert torch.equal(x, y), f"client {a.cid} {key}"
        assert a.upload.keys() == b.upload.keys()
        for name, (idx, val) in a.upload.get("grow", {}).items():
            idx2, val2 = b.upload["grow"][name]
            da = torch.zeros(int(idx.max()) + 1 if idx.numel() else 0).index_put_((idx,), val)
            db = torch.zeros_like(da).index_put_((idx2,), val2)
            assert torch.allclose(da, db, rtol=1e-4, atol=1e-6 * float(val.abs().max())), f"upload {name}"


def test_fedavg_bn(tmp_path):
    sim = simulator(tmp_path)
    seq, bat, _ = both_engines(sim, 1)
    assert len({r.num_samples for r in seq}) == len(seq)  # unequal client sizes
    assert len({r.steps for r in seq}) > 1  # so unequal numbers of local steps
    assert_same_updates(seq, bat)


def test_fedavg_sparse(tmp_path):
    seq, bat, _ = both_engines(simulator(tmp_path, **{"method.name": "fedavg_sparse"}), 1)
    assert_same_updates(seq, bat)


def test_feddst_mid_training_mask_change(tmp_path):
    sim = simulator(tmp_path, **{"method.name": "feddst", **ADJUST})
    global_masks = {n: m.clone() for n, m in get_masks(sim.model).items()}
    seq, bat, plans = both_engines(sim, 2)
    assert all(isinstance(p, LocalAdjustPlan) for p in plans)
    for r in bat:  # every client changed its own mask, differently
        assert any(not torch.equal(r.state[f"{n}.weight_mask"], m) for n, m in global_masks.items())
    assert any(not torch.equal(bat[0].state[f"{n}.weight_mask"], bat[1].state[f"{n}.weight_mask"]) for n in global_masks)
    assert_same_updates(seq, bat)


@pytest.mark.parametrize("selection", ["per_sample", "per_tensor"])
def test_fedmef_bae_sap_agc(tmp_path, selection):
    sim = simulator(tmp_path, **{**FEDMEF, "method.sap.selection": selection})
    seq, bat, plans = both_engines(sim, 2)
    assert all(isinstance(p, BaEPlan) for p in plans)  # extrusion: per-client penalty and step size
    first_steps = {p.step_lr(0, None) for p in plans[len(bat):]}  # the batched engine's plans: client views
    assert len(first_steps) == len(bat) and max(first_steps) > plans[0].lr  # beta_s wins, differently per client
    assert all("grow" in r.upload for r in bat)  # adjustment round: top-k gradient uploads
    assert_same_updates(seq, bat)


@pytest.mark.parametrize("arch", ["resnet_narrow", "mobilenetv2"])
def test_fedmef_residual_models_in_groups(tmp_path, arch):
    """Normalizer-free residual models (depthwise convs too), and more clients than train at
    once (two groups)."""
    gentle = {"method.bae.psi": 1.0, "fl.lr_schedule": "constant"}  # BaE's big steps diverge on MobileNetV2
    sim = simulator(tmp_path, **{**FEDMEF, **gentle, "model.arch": arch,
                                 "model.width": 0.5 if arch == "resnet_narrow" else 0.25})
    if arch == "mobilenetv2":  # fp32 rounding grows to ~5e-4 through its sparse depthwise NSConvs; float64: 2e-15
        to_float64(sim)
    seq, bat, _ = both_engines(sim, 2, max_clients=2)
    assert_same_updates(seq, bat)


def test_short_batches_of_non_adjacent_clients(tmp_path):
    """Clients 0 and 2 have full batches where client 1 has its short one: the batched call of
    0 and 2 runs on a gathered copy whose BatchNorm statistics must be written back. In float64:
    with these clients' data, fp32 rounding differences (grouped vs plain convolution) grow
    chaotically over the second epoch (float64 agrees to 1e-15, so the engine is exact)."""
    sim = to_float64(simulator(tmp_path, **{"fl.local_epochs": 2, "fl.batch_size": 16}))
    idx = torch.randperm(len(sim.train_y), generator=torch.Generator().manual_seed(0))
    clients = [ClientData(0, idx[:48]), ClientData(1, idx[48:88]), ClientData(2, idx[88:136])]
    assert [sim.trainer.total_steps(c.num_samples) for c in clients] == [6, 6, 6]
    seq, bat, _ = both_engines(sim, 1, clients)
    assert_same_updates(seq, bat)


def test_quickstart_like_run_matches_sequential(tmp_path):
    """Whole runs: the batched engine's accuracy follows the sequential engine's."""
    over = {"fl.rounds": 5, "model.width": 0.5, "method.name": "fedmef", "model.norm": "nsconv", **ADJUST}
    rows = {}
    for engine in ("sequential", "batched"):
        sim = simulator(tmp_path / engine, **{**over, "fl.engine": engine})
        sim.write_run_files()
        rows[engine] = sim.run()
        assert {r["engine"] for r in rows[engine]} == {engine}
    for a, b in zip(rows["sequential"], rows["batched"]):
        assert abs(a["eval_acc"] - b["eval_acc"]) <= 0.02
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


# -- engine selection and stacking checks -----------------------------------------


def test_auto_is_sequential_on_cpu_and_batched_is_checked(tmp_path):
    sim = simulator(tmp_path)
    x = sim.augment.normalize(sim.train_x[:2])
    assert select_engine("auto", sim.model, x)[0] == "sequential"
    assert select_engine("batched", sim.model, x) == ("batched", "fl.engine: batched")
    assert sim.engine_name == "sequential" and "CPU" in sim.engine_reason
    cuda_like = SimpleNamespace(device=SimpleNamespace(type="cuda"))  # auto: sequential on GPUs too
    assert select_engine("auto", sim.model, cuda_like)[0] == "sequential"


class ChannelMixer(nn.Module):
    """A forward that is not channel-agnostic: stacking clients would mix them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(h - h.mean(dim=1, keepdim=True)).mean(dim=(1, 2)).view(x.shape[0], -1).repeat(1, 2)[:, :2]


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x):
        return self.norm(self.conv(x)).mean(dim=(2, 3))


def test_stacking_problem_detects_what_cannot_stack():
    x = torch.randn(2, 3, 8, 8)
    assert "GroupNorm" in stacking_problem(WithLayerNorm(), x)
    assert stacking_problem(ChannelMixer(), x) is not None
    with pytest.raises(UserError, match="fl.engine: batched cannot train this model"):
        select_engine("batched", WithLayerNorm(), x)


def test_stacked_model_matches_each_client(tmp_path):
    sim = simulator(tmp_path, **{"model.norm": "nsconv", "method.name": "fedavg_sparse"})
    model = sim.model.eval()
    stacked = stack_model(model, 3).eval()
    x = [sim.augment.normalize(sim.train_x[i * 4:(i + 1) * 4]) for i in range(3)]
    with torch.no_grad():
        y = stacked(stack_inputs(x)).view(4, 3, -1)
        for c in range(3):
            assert torch.allclose(y[:, c], model(x[c]), atol=1e-5)


def test_recipe_engine_keys():
    assert recipe_from_dict({}).fl.engine == "auto"
    with pytest.raises(UserError, match="fl.engine"):
        recipe_from_dict({"fl": {"engine": "vmap"}})
    with pytest.raises(UserError, match="fl.batched_clients"):
        recipe_from_dict({"fl": {"batched_clients": -1}})


def test_memory_estimate_groups_clients(tmp_path):
    sim = simulator(tmp_path)
    engine = BatchedEngine(sim.trainer, 0)
    assert 1 <= engine.clients_at_once(sim.model, 100) <= 16
    assert BatchedEngine(sim.trainer, 0, max_clients=2).clients_at_once(sim.model, 5) == 2
