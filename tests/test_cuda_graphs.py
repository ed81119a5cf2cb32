"""Whole client steps replayed from CUDA graphs (fl/stepgraph.py) train exactly like eager steps.

The graph tests need a CUDA GPU: CI has none, so they run on the device
machine (`python -m pytest tests/test_cuda_graphs.py` there; see
docs/benchmarks.md for the last run). On a CPU-only machine they are
reported as skipped with that reason, and the CPU fallback test runs.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from fedmef_toolkit.data.augment import DeviceAugment
from fedmef_toolkit.fl.client import ClientData, ClientTrainer, client_generator
from fedmef_toolkit.fl.plan import ClientPlan, MaskedWeightPenalty
from fedmef_toolkit.fl.stepgraph import GraphedStep
from fedmef_toolkit.fl.strategies.feddst import LocalAdjustPlan
from fedmef_toolkit.fl.strategies.fedmef import BaEPlan, BaESpec
from fedmef_toolkit.models import get_model
from fedmef_toolkit.sap import enable_sap
from fedmef_toolkit.sparse.adjust import smallest_active
from fedmef_toolkit.sparse.masks import attach_masks, get_masks, init_masks, prunable_modules
from fedmef_toolkit.sparse.schedules import swap_count

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (device machine)")


@pytest.fixture(autouse=True)
def _deterministic_cudnn():
    """cuDNN's default algorithms may differ from run to run in the last bits (measured:
    up to 2e-7 after one step), which a dozen steps amplify. With deterministic algorithms
    graphed and eager steps are compared bit for bit."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def make_trainer(device, graphs: bool, n=44, batch=8, precision="fp32", agc=0.0) -> ClientTrainer:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=gen).to(device)
    y = torch.randint(0, 4, (n,), generator=gen).to(device)
    aug = DeviceAugment(torch.full((3,), 0.5), torch.full((3,), 0.25)).to(device)
    return ClientTrainer(x, y, aug, epochs=2, batch_size=batch, momentum=0.9, weight_decay=5e-4,
                         precision=precision, cuda_graphs=graphs, agc=agc)


def make_model(arch, norm, density, gamma, device):
    torch.manual_seed(0)
    model = get_model(arch, 4, norm=norm, width=0.25, image_size=16)
    if density < 1:
        attach_masks(model, init_masks(model, density, "erk", "random", seed=0))
    if gamma is not None:
        enable_sap(model, gamma)
    return model.to(device)


class SwapMaskPlan(ClientPlan):
    """Changes every mask in place before step 3, as FedDST's mid-training update does."""

    def at_step(self, step, model, trainer, client, gen):
        if step == 3:
            with torch.no_grad():
                for m in get_masks(model).values():
                    m.copy_(m.flip(0))


def train(trainer, model, plan_cls=ClientPlan):
    n = trainer.train_x.shape[0]
    client = ClientData(0, torch.arange(n, device=trainer.train_x.device))
    gen = client_generator(0, 1, 0, trainer.train_x.device)
    result = trainer.train(model, client, plan_cls(0.01), gen)
    return result


def cuda_trainer(graphs: bool, **kw) -> ClientTrainer:
    return make_trainer(torch.device("cuda"), graphs, **kw)


def assert_same_states(graphed: dict, eager: dict, eager_again: dict | None = None, tol=None):
    """Graphed training ends where eager training ends: within float tolerance, or as closely
    as two eager runs do (cuDNN may pick nondeterministic kernels)."""
    tol = tol or dict(rtol=1e-4, atol=1e-5)
    for k, v in eager.items():
        if not v.is_floating_point():
            assert torch.equal(graphed[k], v), k
            continue
        diff = (graphed[k].float() - v.float()).abs().max().item()
        noise = 0.0 if eager_again is None else (eager_again[k].float() - v.float()).abs().max().item()
        if diff > 2 * noise:
            torch.testing.assert_close(graphed[k], v, **tol, msg=f"{k}: graphed-eager {diff:.3g}, eager-eager {noise:.3g}")


@cuda
@pytest.mark.parametrize("arch,norm,density,gamma,precision", [
    ("cnn4", "bn", 1.0, None, "fp32"),          # BN running statistics in the graph
    ("cnn4", "nsconv", 0.3, 0.5, "fp32"),       # NSConv + SAP at gamma 0.5
    ("resnet18", "nsconv", 0.1, 0.9, "fp32"),
    ("mobilenetv2", "bn", 0.1, 0.9, "fp32"),    # SAP on plain convs, masked ReLU6
    ("cnn4", "bn", 1.0, None, "bf16"),
    ("mobilenetv2", "bn", 0.1, 0.9, "bf16"),
])
@pytest.mark.parametrize("agc", [0.0, 0.16])
def test_graphed_training_matches_eager(arch, norm, density, gamma, precision, agc):
    """A client's whole training, every full-batch step replayed from one graph, against eager steps."""
    dev = torch.device("cuda")
    states = []
    for graphs in (False, False, True):
        trainer = cuda_trainer(graphs, precision=precision, agc=agc)
        model = make_model(arch, norm, density, gamma, dev)
        states.append(train(trainer, model).state)
        step = trainer.stepper
        if graphs:
            assert step.refused is None, step.refused
            # 44 samples at batch 8: 5 full batches and one of 4 per epoch; the short one is
            # padded and replayed too, except in a BatchNorm model (batch statistics)
            expected = (10, 2, 1) if norm == "bn" else (12, 0, 1)
            assert (step.replays, step.eager_steps, step.captures) == expected
            assert f"{expected[0]} replayed" in trainer.graph_status()
        else:
            assert (step.replays, step.eager_steps) == (0, 12)
        # on CUDA the short batch is padded with graphs on or off: the same function
        assert step.pads == (norm != "bn")
    eager, eager_again, graphed = states
    tol = None if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    assert_same_states(graphed, eager, eager_again, tol)


@cuda
@pytest.mark.parametrize("arch,norm,density,gamma", [
    ("cnn4", "bn", 1.0, None), ("resnet_narrow", "nsconv", 0.1, 0.9), ("resnet18", "nsconv", 0.1, 0.5),
    ("mobilenetv2", "nsconv", 0.1, 0.5)])
def test_replayed_steps_are_bitwise_eager_steps(arch, norm, density, gamma):
    """fp32, deterministic cuDNN: after every step, parameters, buffers, momentum and the loss
    sum of a replayed step equal those of the same step run eagerly, bit for bit."""
    dev = torch.device("cuda")
    models = [make_model(arch, norm, density, gamma, dev).train() for _ in range(2)]
    pads = norm != "bn"  # the eager step pads its short batch as the graphed one does: the same function
    steps = [GraphedStep(m, batch_size=8, momentum=0.9, weight_decay=5e-4, agc=0.16, autocast=contextlib.nullcontext,
                         cuda_graphs=graphs, pad_short_batches=pads) for m, graphs in zip(models, (False, True))]
    gen = torch.Generator(device=dev).manual_seed(0)
    for s in steps:
        s.begin(ClientPlan(0.1))
    for i, (n, lr) in enumerate([(8, 0.1), (8, 0.05), (5, 0.2), (8, 0.1)]):  # a short batch of 5
        x, y = torch.randn(n, 3, 16, 16, device=dev, generator=gen), torch.randint(0, 4, (n,), device=dev, generator=gen)
        for s in steps:
            s.step(x, y, lr)
        eager, graphed = ([*m.state_dict().values(), *s.bufs, s.loss_sum] for m, s in zip(models, steps))
        worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(eager, graphed))
        assert worst == 0.0, f"step {i}: largest difference {worst:.3g}"
    assert steps[1].replays == (4 if pads else 3) and steps[1].refused is None


@cuda
def test_in_place_mask_change_is_seen_by_the_graph():
    dev = torch.device("cuda")
    states, replays = {}, {}
    for graphs in (False, True):
        model = make_model("cnn4", "nsconv", 0.3, 0.9, dev)
        trainer = make_trainer(dev, graphs)
        states[graphs] = train(trainer, model, SwapMaskPlan).state
        replays[graphs] = trainer.stepper.replays
    assert replays == {False: 0, True: 12}  # short batches padded (NSConv: samples independent)
    assert_same_states(states[True], states[False])
    masks = {k: v for k, v in states[True].items() if k.endswith("weight_mask")}
    for k, m in masks.items():  # pruned entries of the swapped mask stayed exactly zero
        assert not states[True][k[: -len("_mask")]][m == 0].any()


def one_nsconv_client(dev, graphs: bool):
    """(trainer, CNN4 NSConv model with masks and SAP, a client of all the trainer's samples)."""
    trainer = make_trainer(dev, graphs)
    model = make_model("cnn4", "nsconv", 0.3, 0.5, dev)
    return trainer, model, ClientData(0, torch.arange(trainer.train_x.shape[0], device=dev))


@cuda
def test_gradient_passes_between_replays_and_bae():
    """FedDST's growth-gradient pass (eager, through .grad) in the middle of a client, and
    BaE's penalty with its per-step step size: replayed steps train as eager ones do, and
    a new round's BaE targets, written into the same penalty in place, replay the graph
    captured for the first (no new capture)."""
    dev = torch.device("cuda")
    states, steppers = {}, {}
    for graphs in (False, True):
        trainer, model, client = one_nsconv_client(dev, graphs)
        out = []
        swaps = {k: swap_count(0.3, int(m.sum())) for k, m in get_masks(model).items() if not bool(m.all())}
        out.append(trainer.train(model, client, LocalAdjustPlan(0.01, swaps, False), client_generator(0, 1, 0, dev)))
        mods = prunable_modules(model)
        penalty = MaskedWeightPenalty("l2sq", {k: m.weight for k, m in mods.items()})
        for r in (2, 3):  # two rounds of BaE, each with its own theta_low
            penalty.set_({k: smallest_active(m.weight, m.weight_mask, 4) for k, m in mods.items()}, 0.1)
            plan = BaEPlan(0.01, None, False, penalty, BaESpec(lam=0.1, psi=100.0), lr0=0.05, window_offset=0)
            out.append(trainer.train(model, client, plan, client_generator(0, r, 0, dev)))
        states[graphs] = [o.state for o in out]
        steppers[graphs] = trainer.stepper
    g = steppers[True]
    assert g.refused is None and g.replays == 36 and g.captures == 2
    for graphed, eager in zip(states[True], states[False]):
        assert_same_states(graphed, eager)


class SyncingPlan(ClientPlan):
    """An extra loss that synchronises the host (.item()): a graph cannot contain it."""

    def extra_loss(self, model):
        w = next(model.parameters())
        return w.sum() * 0.0 + (1e-3 if w.abs().max().item() > 0 else 0.0)


@cuda
def test_a_host_sync_in_the_step_is_refused_and_steps_run_eagerly():
    dev = torch.device("cuda")
    states = {}
    for graphs in (False, True):
        trainer = make_trainer(dev, graphs)
        states[graphs] = train(trainer, make_model("cnn4", "bn", 1.0, None, dev), SyncingPlan).state
    g = trainer.stepper
    assert g.refused and "synchronises" in g.refused and g.replays == 0 and g.eager_steps == 12
    assert "CUDA graphs: off" in trainer.graph_status()
    assert_same_states(states[True], states[False])  # the refused warm-up left nothing behind


@cuda
def test_replaced_tensor_is_captured_again_at_the_next_client():
    dev = torch.device("cuda")
    trainer = make_trainer(dev, True)
    model = make_model("cnn4", "nsconv", 0.3, None, dev)
    train(trainer, model)
    g = trainer.stepper
    assert (g.replays, g.captures) == (12, 1)
    conv = next(m for m in model.modules() if hasattr(m, "weight_mask"))
    conv.weight_mask = conv.weight_mask.clone()  # a new tensor: the old graph would read stale memory
    train(trainer, model)
    assert (g.replays, g.captures) == (24, 2)


def test_without_cuda_every_step_runs_eagerly():
    trainer = make_trainer(torch.device("cpu"), graphs=True)
    model = make_model("cnn4", "nsconv", 0.3, 0.5, torch.device("cpu"))
    assert trainer.graph_status() == "CUDA graphs: off"
    train(trainer, model)
    assert (trainer.stepper.replays, trainer.stepper.eager_steps) == (0, 12)
    assert trainer.graph_status() == "CUDA graphs: off"
