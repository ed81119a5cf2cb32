import math

import pytest
import torch
from conftest import small_recipe

from fedmef_toolkit.data.augment import DeviceAugment
from fedmef_toolkit.fl.client import ClientData, ClientTrainer
from fedmef_toolkit.fl.plan import ClientPlan, MaskedWeightPenalty
from fedmef_toolkit.fl.simulator import Simulator
from fedmef_toolkit.fl.strategies.fedmef import BaEPlan
from fedmef_toolkit.models import get_model
from fedmef_toolkit.recipe import BaESpec, recipe_from_dict
from fedmef_toolkit.sparse.adjust import prune_and_grow, smallest_active, sum_messages, topk_message
from fedmef_toolkit.sparse.densities import erk_densities
from fedmef_toolkit.sparse.masks import attach_masks, get_masks, init_masks, prunable_modules, weight_shapes
from fedmef_toolkit.sparse.schedules import (adjustment_fraction, bae_step_size, is_adjustment_round,
                                             is_extrusion_round, rex_factor, swap_count)


def test_erk_hand_computed():
    shapes = {"conv": (8, 4, 3, 3), "fc": (10, 20)}
    d = erk_densities(shapes, 0.2)
    # raw: conv (8+4+3+3)/(8*4*9) = 18/288 ; fc (10+20)/200 = 30/200
    total = 288 + 200
    eps = 0.2 * total / (18 + 30)  # sum raw_l * size_l = 18 + 30
    assert d["conv"] == pytest.approx(eps * 18 / 288)
    assert d["fc"] == pytest.approx(eps * 30 / 200)
    assert sum(d[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(0.2 * total)


def test_erk_dense_fallback_and_resolve():
    shapes = {"tiny": (2, 1, 1, 1), "big": (64, 64, 3, 3)}
    d = erk_densities(shapes, 0.5)
    assert d["tiny"] == 1.0
    total = 2 + 64 * 64 * 9
    assert d["big"] == pytest.approx((0.5 * total - 2) / (64 * 64 * 9))
    assert all(v <= 1.0 for v in d.values())


def test_init_masks_exact_counts_random_and_magnitude():
    model = get_model("cnn4", 10, width=0.5)
    for init in ("random", "magnitude"):
        masks = init_masks(model, 0.1, "erk", init, seed=0)
        dens = erk_densities(weight_shapes(model), 0.1)
        for name, m in masks.items():
            assert int(m.sum()) == max(1, round(dens[name] * m.numel()))
    mods = prunable_modules(model)
    mag = init_masks(model, 0.3, "uniform", "magnitude", seed=0)
    w = mods["fc"].weight.detach().abs()
    assert w[mag["fc"]].min() >= w[~mag["fc"]].max()


def test_schedules_closed_form():
    assert adjustment_fraction(0, 0.2, 300) == pytest.approx(0.2)
    assert adjustment_fraction(150, 0.2, 300) == pytest.approx(0.1)
    assert adjustment_fraction(300, 0.2, 300) == pytest.approx(0.0)
    assert swap_count(0.1, 95) == 10 and swap_count(0.1, 100) == 10 and swap_count(1.0, 7) == 7
    assert [t for t in range(0, 45) if is_adjustment_round(t, 10, 30)] == [10, 20, 30]
    assert [t for t in range(1, 25) if is_extrusion_round(t, 10, 30, 2)] == [9, 10, 19, 20]
    assert rex_factor(0, 10) == pytest.approx(1.0)
    assert rex_factor(5, 10) == pytest.approx(0.5 / 0.75)
    assert rex_factor(10, 10) == pytest.approx(0.0)


def test_bae_step_size_direct():
    lr0, norm = 0.1, 0.7
    beta = rex_factor(3, 10) * (2 / (1 + math.exp(-norm)) - 1) * lr0
    assert bae_step_size(3, 10, 0.001, lr0, norm) == pytest.approx(beta)
    assert bae_step_size(3, 10, 0.5, lr0, norm) == pytest.approx(0.5)  # max(eta, beta)
    assert bae_step_size(3, 10, 0.001, lr0, norm, psi=2.0) == pytest.approx(2 * beta)
    assert bae_step_size(3, 10, 0.001, lr0, norm, max_lr=0.01) == pytest.approx(0.01)
    for lr, psi, max_lr in [(0.001, 1.0, None), (0.5, 1.0, None), (0.001, 2.0, None), (0.001, 1.0, 0.01)]:
        on_device = bae_step_size(3, 10, lr, lr0, torch.tensor(norm), psi=psi, max_lr=max_lr)
        assert isinstance(on_device, torch.Tensor) and on_device.dim() == 0
        assert float(on_device) == pytest.approx(bae_step_size(3, 10, lr, lr0, norm, psi=psi, max_lr=max_lr))


def test_prune_and_grow_keeps_count_and_picks_extremes():
    torch.manual_seed(0)
    w = torch.randn(50)
    mask = torch.rand(50) < 0.5
    low = smallest_active(w, mask, 5)
    assert int(low.sum()) == 5 and bool((low & ~mask).sum() == 0)
    assert w[low].abs().max() <= w[mask & ~low].abs().min()
    score = torch.randn(50)
    new, grown = prune_and_grow(mask, low, score)
    assert int(new.sum()) == int(mask.sum())
    candidates = ~(mask & ~low)
    assert int(grown.sum()) == 5 and bool((grown & ~candidates).sum() == 0)
    assert score[grown].abs().min() >= score[candidates & ~grown].abs().max()
    # the count the caller knows (no host sync) gives the same masks; on the CPU a wrong one is caught
    counted = prune_and_grow(mask, low, score, 5)
    assert torch.equal(counted[0], new) and torch.equal(counted[1], grown)
    with pytest.raises(ValueError, match="count 4, but prune holds 5"):
        prune_and_grow(mask, low, score, 4)


def test_topk_upload_equals_dense_aggregate_topk():
    torch.manual_seed(1)
    shape, k = (6, 10), 7
    cand = torch.rand(shape) < 0.6
    grads = [torch.randn(shape) for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    dense = sum(w * g for w, g in zip(weights, grads))
    expected = (dense.abs().masked_fill(~cand, -1)).flatten().topk(k).indices.sort().values
    msgs = [(*topk_message(g, cand, int(cand.sum())), w) for g, w in zip(grads, weights)]
    agg = sum_messages(shape, msgs)
    assert torch.allclose(agg[cand], dense[cand])
    got = agg.abs().masked_fill(~cand, -1).flatten().topk(k).indices.sort().values
    assert torch.equal(got, expected)
    idx, val = topk_message(grads[0], cand, k)  # a client's own message holds its top-k candidates
    assert len(idx) == k and bool(cand.flatten()[idx].all())
    assert torch.equal(val, grads[0].flatten()[idx])


def test_topk_message_asking_more_than_the_candidates_adds_only_zeros():
    """k above the candidates' count (no host sync counts them): every candidate is sent with its
    value, the extra entries with 0, so the server's sum of messages is unchanged."""
    torch.manual_seed(2)
    g = torch.randn(5, 4)
    cand = torch.zeros(5, 4, dtype=torch.bool)
    cand.view(-1)[[1, 6, 13]] = True
    idx, val = topk_message(g, cand, 7)
    assert len(idx) == 7 and len(set(idx.tolist())) == 7
    sent = dict(zip(idx.tolist(), val.tolist()))
    assert {i for i in sent if cand.view(-1)[i]} == {1, 6, 13}
    assert all(v == g.view(-1)[i].item() if cand.view(-1)[i] else v == 0.0 for i, v in sent.items())
    assert torch.equal(sum_messages(g.shape, [(idx, val, 1.0)]), g * cand)
    g.view(-1)[6] = float("nan")  # a candidate's diverged gradient still reaches the server as NaN
    idx, val = topk_message(g, cand, 7)
    assert val[idx == 6].isnan().all() and not val[idx != 6].isnan().any()


def make_trainer(n=40, momentum=0.9):
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 4, (n,))
    aug = DeviceAugment(torch.full((3,), 0.5), torch.full((3,), 0.25))
    return ClientTrainer(x, y, aug, epochs=2, batch_size=8, momentum=momentum, weight_decay=5e-4)


@pytest.mark.parametrize("norm", ["bn", "nsconv"])
def test_pruned_entries_and_momentum_stay_zero(norm):
    model = get_model("cnn4", 4, norm=norm, width=0.25)
    attach_masks(model, init_masks(model, 0.2, "erk", "random", seed=0))
    trainer = make_trainer()
    trainer.train(model, ClientData(0, torch.arange(40)), ClientPlan(0.1), torch.Generator().manual_seed(0))
    step = trainer.stepper  # its momentum buffers after the last masked step
    momentum = dict(zip(map(id, step.params), step.bufs))
    for m in prunable_modules(model).values():
        pruned = ~m.weight_mask
        assert torch.all(m.weight[pruned] == 0)
        assert torch.all(momentum[id(m.weight)][pruned] == 0)
        assert m.weight[m.weight_mask].abs().sum() > 0


def test_bae_penalty_gradient_and_step_size():
    """The penalty's closed-form gradient equals autograd's through its value (and the closed
    forms 2 lam w m, lam w m / ||theta_low||); the step size reads ||theta_low||."""
    model = get_model("cnn4", 4, width=0.25)
    attach_masks(model, init_masks(model, 0.5, "uniform", "random", seed=0))
    mods = prunable_modules(model)
    low = {n: smallest_active(m.weight, m.weight_mask, 5) for n, m in mods.items()}
    del low[next(iter(low))]  # a layer without targets: its mask stays zero
    for kind in ("l2sq", "l2"):
        penalty = MaskedWeightPenalty(kind, {n: m.weight for n, m in mods.items()})
        penalty.set_(low, 0.3)
        weights = [mods[n].weight for n in penalty.masks]
        grads = [torch.randn_like(w) for w in weights]
        before = [g.clone() for g in grads]
        penalty.add_grad_([w.detach() for w in weights], grads)
        auto = torch.autograd.grad(penalty.value(weights), weights)
        sq = sum(float((mods[n].weight.detach()[m] ** 2).sum()) for n, m in low.items())
        for n, g, g0, a in zip(penalty.masks, grads, before, auto):
            w = mods[n].weight.detach()
            m = low.get(n, torch.zeros_like(w, dtype=torch.bool))
            expect = 2 * 0.3 * w * m if kind == "l2sq" else 0.3 * w * m / math.sqrt(sq)
            assert torch.allclose(g - g0, expect, atol=1e-6) and torch.allclose(a, expect, atol=1e-6), (kind, n)
        plan = BaEPlan(0.001, None, False, penalty, BaESpec(lam=0.3, penalty=kind), lr0=0.1, window_offset=0)
        plan.begin(model, total_steps=10)
        mu = plan.step_lr(4, model)  # a device tensor: the step reads it without a host sync
        assert isinstance(mu, torch.Tensor) and float(mu) == pytest.approx(bae_step_size(4, 10, 0.001, 0.1, math.sqrt(sq)))
        plan.bae = BaESpec(lam=0.3, penalty=kind, sigmoid_norm="l1")
        l1 = sum(float(mods[n].weight.detach()[m].abs().sum()) for n, m in low.items())
        assert float(plan.step_lr(4, model)) == pytest.approx(bae_step_size(4, 10, 0.001, 0.1, l1), rel=1e-5)
    penalty.set_({}, 0.0)  # a round without extrusion: no term at all
    grads = [torch.ones_like(w) for w in weights]
    penalty.add_grad_([w.detach() for w in weights], grads)
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads) and not penalty.active
    for kind in ("l2sq", "l2"):  # a weight without a gradient gets none; the others autograd's (all norms count)
        penalty = MaskedWeightPenalty(kind, {n: m.weight for n, m in mods.items()})
        penalty.set_(low, 0.5)
        assert list(penalty.masks)[-1] in low  # the layer without a gradient has targets: its norm counts
        grads = [torch.zeros_like(w) for w in weights[:-1]] + [None]
        penalty.add_grad_([w.detach() for w in weights], grads)
        auto = torch.autograd.grad(penalty.value(weights), weights)
        assert grads[-1] is None and all(torch.allclose(g, a, atol=1e-6) for g, a in zip(grads[:-1], auto[:-1])), kind
    with pytest.raises(KeyError, match="no such layer"):
        penalty.set_({"nope": torch.ones(1)}, 0.1)


def sparse_run(tmp_path, method, norm="bn", **over):
    rec = small_recipe(tmp_path, **{"method.name": method, "model.norm": norm, "fl.rounds": 6,
                                    "method.sparsity.density": 0.3, "method.sparsity.delta_t": 2,
                                    "method.sparsity.t_end": 5, **over})
    sim = Simulator(recipe_from_dict(rec), tmp_path / "runs" / "run", show_progress=False)
    counts0 = {n: int(m.sum()) for n, m in get_masks(sim.model).items()}
    masks0 = {n: m.clone() for n, m in get_masks(sim.model).items()}
    sim.write_run_files()
    rows = sim.run()
    return sim, rows, counts0, masks0


@pytest.mark.parametrize("method,norm", [("fedavg_sparse", "bn"), ("feddst", "bn"), ("fedmef", "nsconv"),
                                         ("fedmef", "bn")])
def test_strategies_run_and_preserve_per_layer_counts(tmp_path, method, norm):
    sim, rows, counts0, masks0 = sparse_run(tmp_path, method, norm)
    masks = get_masks(sim.model)
    assert {n: int(m.sum()) for n, m in masks.items()} == counts0
    for m in prunable_modules(sim.model).values():
        assert torch.all(m.weight[~m.weight_mask] == 0)
    changed = any(not torch.equal(masks0[n], masks[n]) for n in masks)
    assert changed == (method != "fedavg_sparse")
    assert rows[-1]["eval_acc"] > 0.3
    assert all(abs(r["density"] - rows[0]["density"]) < 1e-9 for r in rows)
    if method == "fedmef":
        adj = [r for r in rows if r.get("adjusted")]
        assert [r["round"] for r in adj] == [2, 4]
        assert all("acc_before_adjust" in r and "acc_after_adjust" in r for r in adj)
        assert all("low_norm_start" in r and "low_norm_end" in r for r in adj)
        # sparse values + bitmask is smaller than dense values
        assert rows[0]["bytes_down"] < 0.8 * sum(p.numel() * 4 for p in sim.model.parameters()) * 3


def test_fedmef_grown_entries_start_at_zero(tmp_path):
    rec = small_recipe(tmp_path, **{"method.name": "fedmef", "model.norm": "nsconv", "fl.rounds": 2,
                                    "method.sparsity.density": 0.3, "method.sparsity.delta_t": 2,
                                    "method.sparsity.t_end": 4})
    sim = Simulator(recipe_from_dict(rec), tmp_path / "runs" / "run", show_progress=False)
    sim.write_run_files()
    sim.run_round(1)
    before = {n: m.clone() for n, m in get_masks(sim.model).items()}
    row = sim.run_round(2)
    assert row["adjusted"]
    mods = prunable_modules(sim.model)
    grown_any = False
    for n, m in get_masks(sim.model).items():
        grown = m & ~before[n]
        grown_any |= bool(grown.any())
        assert torch.all(mods[n].weight[grown] == 0)
    assert grown_any


def test_bae_off_is_the_ablation(tmp_path):
    _, rows, _, _ = sparse_run(tmp_path, "fedmef", "nsconv", **{"method.bae.enabled": False})
    assert all("low_norm_start" not in r for r in rows)
    assert [r["round"] for r in rows if r.get("adjusted")] == [2, 4]
