"""The whole local step (fl/stepgraph.py) against the training loop it replaced.

`GraphedStep._step` is the code a CUDA graph captures and the code every
eager step runs, so these CPU tests check the captured code itself: one
step at a time against torch.optim.SGD + masking + AGC (within 1e-6), and
whole clients against a copy of the old `ClientTrainer.train` loop (within
1e-5 relative) for every kind of plan: masks only, FedDST's mid-training
mask change (an eager gradient pass between steps), FedMef's BaE penalty
and per-step step size with SAP, momentum on and off, AGC on and off.
Replay against eager on a GPU: tests/test_cuda_graphs.py.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import small_recipe

from fedmef_toolkit.fl.agc import adaptive_clip_, agc_weights
from fedmef_toolkit.fl.client import ClientData, ClientResult, ClientTrainer, client_generator
from fedmef_toolkit.fl.plan import ClientPlan
from fedmef_toolkit.fl.simulator import Simulator
from fedmef_toolkit.fl.stepgraph import GraphedStep, batch_mixing_layer, masked_weights
from fedmef_toolkit.fl.strategies.feddst import LocalAdjustPlan
from fedmef_toolkit.fl.strategies.fedmef import BaEPlan, BaESpec
from fedmef_toolkit.models import get_model
from fedmef_toolkit.recipe import recipe_from_dict
from fedmef_toolkit.sap import enable_sap
from fedmef_toolkit.sparse.adjust import smallest_active
from fedmef_toolkit.sparse.masks import attach_masks, get_masks, init_masks, prunable_modules
from fedmef_toolkit.sparse.schedules import round_lr

ADJUST = {"method.sparsity.delta_t": 2, "method.sparsity.t_end": 4}  # round 2 adjusts masks
FEDMEF = {"method.name": "fedmef", "model.norm": "nsconv", "method.sap.enabled": True, **ADJUST,
          "fl.lr_schedule": "exp", "fl.lr_decay": 0.5, "method.bae.psi": 100.0}  # BaE's step size above eta


# -- the loop GraphedStep replaced (reference) -----------------------------------------
def apply_step_masks(opt: torch.optim.Optimizer, weights: list, masks: list, clip=None) -> None:
    """The old masked optimizer step: masked gradients, `clip`, opt.step(), masked weights and momentum."""
    for w, m in zip(weights, masks):
        if w.grad is not None:
            w.grad.mul_(m)
    if clip is not None:
        clip()
    opt.step()
    for w, m in zip(weights, masks):
        w.mul_(m)
        buf = opt.state.get(w, {}).get("momentum_buffer")
        if buf is not None:
            buf.mul_(m)


def reference_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum)


def reference_step(model, opt, plan, x, y, lr, agc: float, autocast) -> torch.Tensor:
    pairs = masked_weights(model)
    for group in opt.param_groups:
        group["lr"] = float(lr)  # BaE's step size comes as a device tensor
    with autocast():
        loss = F.cross_entropy(model(x), y)
    extra = plan.extra_loss(model)
    total = loss if extra is None else loss + extra
    penalty = plan.penalty()  # BaE's term through autograd (the step adds its gradient in closed form)
    if penalty is not None:
        mods = prunable_modules(model)
        total = total + penalty.value([mods[n].weight for n in penalty.masks])
    opt.zero_grad(set_to_none=True)
    total.backward()
    clipped = agc_weights(model)
    with torch.no_grad():
        apply_step_masks(opt, [w for w, _ in pairs], [m for _, m in pairs],
                         clip=(lambda: adaptive_clip_(clipped, agc)) if agc > 0 else None)
    return loss.detach()


def reference_train(trainer: ClientTrainer, model, client, plan, gen) -> ClientResult:
    """`ClientTrainer.train` before whole-step graphs."""
    model.train()
    opt = reference_optimizer(model, plan.lr, trainer.momentum, trainer.weight_decay)
    plan.begin(model, trainer.total_steps(client.num_samples))
    loss_sum, step = 0.0, 0
    for x, y in trainer.batches(client, gen, trainer.epochs):
        plan.at_step(step, model, trainer, client, gen)
        lr = plan.step_lr(step, model)
        loss_sum += float(reference_step(model, opt, plan, x, y, lr, trainer.agc, trainer.autocast))
        step += 1
    upload = plan.finish(model, trainer, client, gen)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ClientResult(client.cid, client.num_samples, state, loss_sum / max(1, step), step, upload, plan.logs)


# -- one step against torch.optim.SGD --------------------------------------------------
def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = get_model("cnn4", 4, norm="nsconv", width=0.25, image_size=8)
    attach_masks(model, init_masks(model, 0.3, "erk", "random", seed=0))
    return model


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("agc", [0.0, 0.05])
def test_each_step_equals_torch_sgd(momentum, agc):
    """Same parameters and momentum as torch.optim.SGD (two groups: decay on dim > 1 only),
    masks and AGC after every one of several steps, with the learning rate changing per step."""
    ref = small_model()
    model = copy.deepcopy(ref)
    opt = reference_optimizer(ref, 0.1, momentum, 5e-3)
    step = GraphedStep(model, batch_size=8, momentum=momentum, weight_decay=5e-3, agc=agc,
                       autocast=contextlib.nullcontext, cuda_graphs=False)
    plan = ClientPlan(0.1)
    step.begin(plan)
    gen = torch.Generator().manual_seed(1)
    loss_sum = 0.0
    for i, lr in enumerate([0.1, 0.3, 0.05, 0.2, 0.1]):
        x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        loss_sum += float(reference_step(ref, opt, plan, x, y, lr, agc, contextlib.nullcontext))
        step.step(x, y, lr)
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=f"step {i} {name}")
        if momentum:
            for a, buf in zip(ref.parameters(), step.bufs):  # every parameter trains: one buffer each
                torch.testing.assert_close(buf, opt.state[a]["momentum_buffer"], rtol=0, atol=1e-6)
        assert float(step.loss_sum) == pytest.approx(loss_sum, rel=1e-6)
    position = {id(p): i for i, p in enumerate(step.params)}
    for w, m in masked_weights(model):  # pruned entries and their momentum stay exactly 0
        assert not w[~m].any()
        if momentum:
            assert not step.bufs[position[id(w)]][~m].any()
    assert step.eager_steps == 5 and step.replays == 0 and step.status() == "CUDA graphs: off"


def test_momentum_restarts_at_each_client():
    """begin() zeroes momentum and restores torch.optim.SGD's first-step rule (buf = grad)."""
    model = small_model()
    ref = copy.deepcopy(model)
    step = GraphedStep(model, batch_size=8, momentum=0.9, weight_decay=0.0, agc=0.0, autocast=contextlib.nullcontext,
                       cuda_graphs=False)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(4)]
    for client in range(2):
        step.begin(ClientPlan(0.1))
        opt = reference_optimizer(ref, 0.1, 0.9, 0.0)  # a new optimizer per client, as the old loop had
        for x, y in batches[2 * client:2 * client + 2]:
            reference_step(ref, opt, ClientPlan(0.1), x, y, 0.1, 0.0, contextlib.nullcontext)
            step.step(x, y, 0.1)
        for a, b in zip(ref.parameters(), model.parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("gamma", [None, 0.5])
def test_padded_short_batch_trains_as_the_short_batch(gamma):
    """A short batch padded with zero-weight samples to the full size (what lets it replay on
    a GPU) makes the step of the short batch itself: same parameters, momentum and loss."""
    ref = small_model()
    if gamma is not None:
        enable_sap(ref, gamma)  # per-sample selection: padding cannot change the real samples' picks
    model = copy.deepcopy(ref)
    kw = dict(batch_size=8, momentum=0.9, weight_decay=5e-3, agc=0.05, autocast=contextlib.nullcontext,
              cuda_graphs=False)
    plain, padded = GraphedStep(ref, pad_short_batches=False, **kw), GraphedStep(model, pad_short_batches=True, **kw)
    for s in (plain, padded):
        s.begin(ClientPlan(0.1))
    gen = torch.Generator().manual_seed(3)
    for i, (n, lr) in enumerate([(8, 0.1), (5, 0.3), (8, 0.05), (1, 0.2), (3, 0.1)]):
        x, y = torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)
        plain.step(x, y, lr)
        padded.step(x, y, lr)
        for (name, a), b in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=f"step {i} (batch of {n}) {name}")
        for a, b in zip(plain.bufs, padded.bufs):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        assert float(padded.loss_sum) == pytest.approx(float(plain.loss_sum), rel=1e-6)


def test_a_mask_registered_anew_within_a_client_is_the_one_applied():
    """The step re-reads what it works on when a tensor is replaced (here a mask buffer
    assigned anew mid-client, not changed in place): its update applies the new mask."""
    model = small_model()
    step = GraphedStep(model, batch_size=8, momentum=0.0, weight_decay=0.0, agc=0.0,
                       autocast=contextlib.nullcontext, cuda_graphs=False)
    step.begin(ClientPlan(0.1))
    gen = torch.Generator().manual_seed(4)
    batch = lambda: (torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen))
    step.step(*batch(), 0.1)
    conv = next(m for m in prunable_modules(model).values() if getattr(m, "weight_mask", None) is not None)
    new = conv.weight_mask.clone()
    new.view(-1)[new.view(-1).nonzero()[::2]] = False  # half the active entries pruned
    conv.weight_mask = new  # a new tensor under the same name
    step.step(*batch(), 0.1)
    assert not conv.weight[~new].any() and conv.weight[new].any()


def test_padding_only_where_the_samples_are_independent():
    nsconv = small_model()
    assert batch_mixing_layer(nsconv) is None
    assert batch_mixing_layer(enable_sap(copy.deepcopy(nsconv), 0.5, "per_sample")) is None
    per_batch = enable_sap(copy.deepcopy(nsconv), 0.5, "per_batch")
    assert getattr(batch_mixing_layer(per_batch), "sap", None) is not None
    bn = get_model("cnn4", 4, norm="bn", width=0.25, image_size=8)
    assert isinstance(batch_mixing_layer(bn), nn.BatchNorm2d)
    assert isinstance(batch_mixing_layer(nn.Sequential(nsconv, nn.Dropout(0.1))), nn.Dropout)
    assert isinstance(batch_mixing_layer(nn.Sequential(nn.InstanceNorm2d(3, track_running_stats=True))),
                      nn.InstanceNorm2d)
    assert batch_mixing_layer(nn.Sequential(nsconv, nn.InstanceNorm2d(3))) is None  # per-sample statistics
    kw = dict(batch_size=8, momentum=0.0, weight_decay=0.0, agc=0.0, autocast=contextlib.nullcontext,
              cuda_graphs=False)
    with pytest.raises(ValueError, match="BatchNorm2d mixes the samples"):
        GraphedStep(bn, pad_short_batches=True, **kw)
    assert not GraphedStep(nsconv, **kw).pads  # default: not on the CPU (padding would only add work)
    assert not GraphedStep(bn, **kw).pads


# -- whole clients against the old loop ------------------------------------------------
def simulator(tmp_path, **over) -> Simulator:
    return Simulator(recipe_from_dict(small_recipe(tmp_path, **over)), tmp_path / "runs" / "run", show_progress=False)


def both_loops(sim: Simulator, t: int):
    """Round t's clients, each trained by ClientTrainer.train and by the reference loop."""
    model, strategy, r = sim.model, sim.strategy, sim.recipe
    strategy.begin_round(t, model)
    lr = round_lr(t, r.fl.rounds, r.fl.lr, r.fl.lr_schedule, r.fl.lr_decay)
    device = sim.train_x.device
    worker = copy.deepcopy(model)
    state = model.state_dict()
    new, old, plans = [], [], []
    for cid in sim.sample_clients(t):
        client = ClientData(cid, sim.client_indices[cid])
        for results, train in ((new, sim.trainer.train), (old, lambda *a: reference_train(sim.trainer, *a))):
            worker.load_state_dict(state)
            plans.append(strategy.client_plan(t, lr, model))
            results.append(train(worker, client, plans[-1], client_generator(r.seed, t, cid, device)))
    return new, old, plans


def assert_same_clients(new, old, tol=1e-5):
    assert len({r.steps for r in new}) > 1  # unequal client sizes
    for a, b in zip(new, old):
        assert (a.cid, a.num_samples, a.steps) == (b.cid, b.num_samples, b.steps)
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        for key, x in b.state.items():
            y = a.state[key]
            if x.is_floating_point():
                err = float((x - y).abs().max()) / (float(x.abs().max()) + 1e-12)
                assert err <= tol, f"client {a.cid} {key}: relative difference {err:.2e}"
            else:
                assert torch.equal(x, y), f"client {a.cid} {key}"
        assert a.upload.keys() == b.upload.keys()
        for name, (idx, val) in b.upload.get("grow", {}).items():
            idx2, val2 = a.upload["grow"][name]  # top-k entries, in no particular order
            assert torch.equal(idx.sort().values, idx2.sort().values), name
            dense = torch.zeros(int(idx.max()) + 1).index_put_((idx,), val)
            dense2 = torch.zeros_like(dense).index_put_((idx2,), val2)
            torch.testing.assert_close(dense2, dense, rtol=1e-4, atol=1e-6 * float(val.abs().max()))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("agc", [0.0, 0.16])
def test_fedavg_sparse(tmp_path, momentum, agc):
    sim = simulator(tmp_path, **{"method.name": "fedavg_sparse", "fl.momentum": momentum, "fl.agc": agc,
                                 "fl.weight_decay": 1e-3})
    assert_same_clients(*both_loops(sim, 1)[:2])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_feddst_mid_training_mask_change(tmp_path, momentum):
    sim = simulator(tmp_path, **{"method.name": "feddst", "fl.momentum": momentum, **ADJUST})
    masks = {n: m.clone() for n, m in get_masks(sim.model).items()}
    new, old, plans = both_loops(sim, 2)
    assert all(isinstance(p, LocalAdjustPlan) for p in plans)
    assert any(not torch.equal(new[0].state[f"{n}.weight_mask"], m) for n, m in masks.items())
    assert_same_clients(new, old)


@pytest.mark.parametrize("momentum,agc", [(0.9, 0.16), (0.0, 0.0), (0.9, 0.0)])
def test_fedmef_bae_sap(tmp_path, momentum, agc):
    sim = simulator(tmp_path, **{**FEDMEF, "fl.momentum": momentum, "fl.agc": agc})
    new, old, plans = both_loops(sim, 2)
    assert all(isinstance(p, BaEPlan) for p in plans)
    assert plans[0].step_lr(0, None) > plans[0].lr  # BaE's step size, above eta
    assert all("grow" in r.upload for r in new)
    assert_same_clients(new, old)


def test_trainer_keeps_one_step_per_model_and_reports_eager_steps(tmp_path):
    sim = simulator(tmp_path, **{"method.name": "fedavg_sparse"})
    new, _, _ = both_loops(sim, 1)
    stepper = sim.trainer.stepper
    assert stepper.eager_steps == sum(r.steps for r in new) and stepper.replays == 0
    assert sim.trainer.graph_status() == "CUDA graphs: off"


@pytest.mark.parametrize("engine", ["sequential", "batched"])
def test_rounds_around_an_adjustment_keep_one_step_binding(tmp_path, engine):
    """BaE's targets and lam are written in place (one penalty object for the run): the rounds
    before, during and after an extrusion round bind each worker's step tensors once, so a CUDA
    graph captured in the first round is replayed in all of them."""
    sim = simulator(tmp_path, **{**FEDMEF, "fl.engine": engine})
    plans = []
    make_plan = sim.strategy.client_plan
    sim.strategy.client_plan = lambda *a: plans.append(make_plan(*a)) or plans[-1]
    rows = [sim.run_round(t) for t in (1, 2, 3)]  # round 2 adjusts the masks and extrudes
    assert [r.get("adjusted", False) for r in rows] == [False, True, False]
    kinds = {type(p).__name__ for p in plans}
    assert kinds == {"GrowthPlan", "BaEPlan"} and len({id(p.penalty()) for p in plans}) == 1
    steps = [w.step for w in sim.engine.workers] if engine == "batched" else [sim.trainer.stepper]
    assert steps and all(s.binds == 1 for s in steps), [s.binds for s in steps]


