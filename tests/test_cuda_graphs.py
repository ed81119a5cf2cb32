"""Client steps replayed from CUDA graphs train exactly like eager steps.

The graph tests need a CUDA GPU: CI has none, so they run on the device
machine (`python -m pytest tests/test_cuda_graphs.py` there; see
docs/benchmarks.md for the last run). On a CPU-only machine they are
reported as skipped with that reason, and the CPU fallback test runs.
"""

from __future__ import annotations

import pytest
import torch

from fedmef_toolkit.data.augment import DeviceAugment
from fedmef_toolkit.fl.client import ClientData, ClientTrainer, client_generator
from fedmef_toolkit.fl.graphs import GraphedForward
from fedmef_toolkit.fl.plan import ClientPlan
from fedmef_toolkit.models import get_model
from fedmef_toolkit.sap import enable_sap
from fedmef_toolkit.sparse.masks import attach_masks, get_masks, init_masks

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


def make_trainer(device, graphs: bool, n=44, batch=8, precision="fp32") -> ClientTrainer:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=gen).to(device)
    y = torch.randint(0, 4, (n,), generator=gen).to(device)
    aug = DeviceAugment(torch.full((3,), 0.5), torch.full((3,), 0.25)).to(device)
    return ClientTrainer(x, y, aug, epochs=2, batch_size=batch, momentum=0.9, weight_decay=5e-4,
                         precision=precision, cuda_graphs=graphs)


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


@cuda
@pytest.mark.parametrize("arch,norm,density,gamma,precision", [
    ("cnn4", "bn", 1.0, None, "fp32"),          # BN running statistics in the graph
    ("cnn4", "nsconv", 0.3, 0.5, "fp32"),       # NSConv + SAP at gamma 0.5
    ("resnet18", "nsconv", 0.1, 0.9, "fp32"),
    ("mobilenetv2", "bn", 0.1, 0.9, "fp32"),    # SAP on plain convs, masked ReLU6
    ("cnn4", "bn", 1.0, None, "bf16"),
    ("mobilenetv2", "bn", 0.1, 0.9, "bf16"),
])
def test_graphed_training_matches_eager(arch, norm, density, gamma, precision):
    """Graphed training ends where eager training ends, as closely as two eager runs do
    (cuDNN may pick nondeterministic kernels) or within float tolerance."""
    dev = torch.device("cuda")
    states = []
    for graphs in (False, False, True):
        trainer = make_trainer(dev, graphs, precision=precision)
        model = make_model(arch, norm, density, gamma, dev)
        states.append(train(trainer, model).state)
        if graphs:
            g = trainer.graphed
            assert g.refused is None, g.refused
            # 44 samples at batch 8: 5 full batches (replayed) and one of 4 (eager) per epoch
            assert (g.replays, g.eager_calls) == (10, 2)
    eager, eager_again, graphed = states
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
    for k, v in eager.items():
        if not v.is_floating_point():
            assert torch.equal(graphed[k], v), k
            continue
        noise = (eager_again[k].float() - v.float()).abs().max().item()
        diff = (graphed[k].float() - v.float()).abs().max().item()
        if diff > 2 * noise:
            torch.testing.assert_close(graphed[k], v, **tol, msg=f"{k}: graphed-eager {diff:.3g}, eager-eager {noise:.3g}")


@cuda
@pytest.mark.parametrize("arch,norm,density,gamma", [
    ("cnn4", "bn", 1.0, None), ("resnet18", "nsconv", 0.1, 0.9), ("mobilenetv2", "bn", 0.1, 0.9),
    ("mobilenetv2", "nsconv", 0.1, 0.5)])
def test_graphed_steps_are_bitwise_eager_steps(arch, norm, density, gamma):
    """Three forward/backward passes (fp32): outputs, gradients and buffers bit for bit."""
    dev = torch.device("cuda")
    model = make_model(arch, norm, density, gamma, dev)
    xs = [torch.randn(8, 3, 16, 16, device=dev) for _ in range(3)]
    y = torch.randint(0, 4, (8,), device=dev)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def run(forward):
        outs = []
        for x in xs:
            model.zero_grad(set_to_none=True)
            out = forward(x)
            torch.nn.functional.cross_entropy(out, y).backward()
            outs.append([out.detach().clone()] + [p.grad.clone() for p in model.parameters()])
        return outs, {k: v.clone() for k, v in model.state_dict().items()}

    eager = run(model)
    model.load_state_dict(start)
    graphed_forward = GraphedForward(model, 8)
    graphed = run(graphed_forward)
    assert graphed_forward.replays == 3
    for i, (step_e, step_g) in enumerate(zip(eager[0], graphed[0])):
        worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(step_e, step_g))
        assert worst == 0.0, f"step {i}: largest difference {worst:.3g}"
    worst = max((eager[1][k].float() - graphed[1][k].float()).abs().max().item() for k in eager[1])
    assert worst == 0.0, f"state after: largest difference {worst:.3g}"


@cuda
def test_in_place_mask_change_is_seen_by_the_graph():
    dev = torch.device("cuda")
    states = {}
    for graphs in (False, True):
        model = make_model("cnn4", "nsconv", 0.3, 0.9, dev)
        states[graphs] = train(make_trainer(dev, graphs), model, SwapMaskPlan).state
    for k, v in states[False].items():
        torch.testing.assert_close(states[True][k], v, rtol=1e-4, atol=1e-5)
    masks = {k: v for k, v in states[True].items() if k.endswith("weight_mask")}
    for k, m in masks.items():  # pruned entries of the swapped mask stayed exactly zero
        assert not states[True][k[: -len("_mask")]][m == 0].any()


@cuda
def test_replaced_tensor_triggers_a_new_capture_and_hooks_run_eagerly():
    dev = torch.device("cuda")
    model = make_model("cnn4", "nsconv", 0.3, None, dev)
    fwd = GraphedForward(model, batch_size=8)
    x = torch.randn(8, 3, 16, 16, device=dev)
    fwd(x).sum().backward()
    first = fwd._graphed
    assert fwd.replays == 1
    conv = next(m for m in model.modules() if hasattr(m, "weight_mask"))
    conv.weight_mask = conv.weight_mask.clone()  # a new tensor: the old graph reads stale memory
    out = fwd(x)
    assert fwd._graphed is not first
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    conv.capture_effective_grad = True  # forward registers Python hooks: never replayed
    fwd(x)
    conv.capture_effective_grad = False
    assert fwd.eager_calls == 1


def test_without_cuda_the_trainer_runs_the_model_itself():
    trainer = make_trainer(torch.device("cpu"), graphs=True)
    model = make_model("cnn4", "nsconv", 0.3, 0.5, torch.device("cpu"))
    assert trainer.forward_for(model) is model
    assert trainer.graph_status() == "CUDA graphs: off"
    fwd = GraphedForward(model, batch_size=8)
    out = fwd(torch.randn(8, 3, 16, 16))
    assert out.shape == (8, 4) and fwd.replays == 0 and fwd.eager_calls == 1
