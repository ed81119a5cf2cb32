"""The method registry, PruneFL and FedTiny: their distinctive rules and short end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import small_recipe

from fedmef_toolkit.errors import UserError
from fedmef_toolkit.fl.client import ClientResult
from fedmef_toolkit.fl.simulator import Simulator
from fedmef_toolkit.fl.strategies import METHODS, FedAvg, Strategy, build_strategy, register_method
from fedmef_toolkit.fl.strategies.fedtiny import (block_of, block_sequence, pooled_bn_stats, progressive_counts,
                                                  select_candidate)
from fedmef_toolkit.fl.strategies.prunefl import accumulate_importance, importance_swap, mask_change
from fedmef_toolkit.models import get_model
from fedmef_toolkit.recipe import load_recipe, recipe_from_dict
from fedmef_toolkit.sparse.masks import attach_masks, get_masks, init_masks, layer_counts, prunable_modules

ROOT = Path(__file__).resolve().parents[1]


# -- registry ---------------------------------------------------------------------

def test_registry_drives_recipe_choices_and_sections():
    assert list(METHODS) == ["fedavg", "fedavg_sparse", "feddst", "fedmef", "prunefl", "fedtiny"]
    r = recipe_from_dict({"method": {"name": "prunefl", "prunefl": {"init_tol": 0.2}}})
    assert r.method.prunefl.init_tol == 0.2 and r.method.fedtiny.candidates == 4
    with pytest.raises(UserError, match="prunefl"):
        recipe_from_dict({"method": {"name": "prunefll"}})  # the choices come from the registry
    with pytest.raises(UserError, match="unknown key 'method.fedtiny.candidatez'"):
        recipe_from_dict({"method": {"name": "fedtiny", "fedtiny": {"candidatez": 2}}})
    assert type(build_strategy(r)).__name__ == "PruneFL"
    with pytest.raises(ValueError, match="already registered"):
        register_method("fedavg")(type("Again", (FedAvg,), {}))
    with pytest.raises(TypeError):  # the interface is abstract: FedAvg's behaviour lives in FedAvg
        Strategy(r)


def test_digests_of_existing_recipes_unchanged_and_other_sections_ignored():
    # digests computed before the registry existed (issue 13): resuming old runs still works.
    # Those runs' saved recipes lack fl.flower, model.nsconv.center_head and channels_last (added
    # later), which resume leaves out of the digest (`load_saved_recipe`), as here
    old = ("fl.flower", "model.nsconv.center_head", "channels_last")
    assert load_recipe("quickstart.yaml").digest(without=old) == "336c1c474782b381"
    over = ["data.root=null", "data.dataset=synthetic"]
    assert load_recipe("feddst_resnet18_cifar10.yaml", over).digest(without=old) == "5336e309576dcdd4"
    then = ["model.nsconv.calibrate=false", "fl.lr=0.01", "fl.agc=0.0", "fl.momentum=0.9"]  # its settings then
    assert load_recipe("fedmef_mobilenetv2_cinic10.yaml", over + then).digest(without=old) == "9a607262d7a663ed"
    base = load_recipe("quickstart.yaml", ["method.name=fedmef"]).digest()
    assert load_recipe("quickstart.yaml", ["method.name=fedmef", "method.fedtiny.candidates=2"]).digest() == base
    tiny = load_recipe("quickstart.yaml", ["method.name=fedtiny"]).digest()
    assert load_recipe("quickstart.yaml", ["method.name=fedtiny", "method.fedtiny.candidates=2"]).digest() != tiny


def test_memory_report_density_reference_and_docs_follow_the_registry():
    from fedmef_toolkit.cli.main import main
    from fedmef_toolkit.memory.report import configs_for_recipe

    def subject_density(name):
        r = load_recipe("quickstart.yaml", [f"method.name={name}"])
        return configs_for_recipe(r, r.data.synthetic.num_classes, r.data.synthetic.image_size)[0].density

    dens = {n: subject_density(n) for n in METHODS}
    assert dens == {n: (0.1 if METHODS[n].sparse else 1.0) for n in METHODS} and dens["fedavg"] == 1.0
    out = CliRunner().invoke(main, ["recipes", "--reference"], terminal_width=200).output
    for n, info in METHODS.items():
        assert n in out
        if info.section:
            assert f"method.{info.section}." in out
    docs = (ROOT / "docs" / "methods.md").read_text() + (ROOT / "README.md").read_text()
    assert all(f"`{n}`" in docs for n in METHODS)


# -- PruneFL --------------------------------------------------------------------------

def test_prunefl_importance_accumulates_weighted_squared_gradients():
    g1, g2 = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.5]])
    acc = accumulate_importance({}, [{"l": g1.square()}, {"l": g2.square()}], [10, 30])
    assert torch.allclose(acc["l"], 0.25 * g1.square() + 0.75 * g2.square())
    acc2 = accumulate_importance(acc, [{"l": g1.square()}], [7])
    assert torch.allclose(acc2["l"], acc["l"] + g1.square())  # added to, across rounds
    assert torch.allclose(acc["l"], 0.25 * g1.square() + 0.75 * g2.square())  # the input is not mutated


def test_prunefl_swap_drops_smallest_magnitude_and_grows_largest_importance():
    w = torch.tensor([0.5, -0.1, 0.3, 0.0, 0.0, 0.0, 0.02, 0.0])
    mask = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    imp = torch.tensor([0.0, 9.0, 0.0, 1.0, 5.0, 2.0, 0.0, 0.1])
    new, grown = importance_swap(w, mask, imp, 2)
    # pruned: entries 6 (0.02) and 1 (-0.1); grown: the largest importance among the now-inactive
    # entries, which include the just-pruned entry 1 (9.0), then entry 4 (5.0)
    assert new.tolist() == [True, True, True, False, True, False, False, False]
    assert grown.tolist() == [False, True, False, False, True, False, False, False]
    assert int(new.sum()) == int(mask.sum())
    assert mask_change({"l": mask}, {"l": new}) == pytest.approx(1 / 4)  # entry 1 left and came back


def fake_result(model, sq, n):
    return ClientResult(0, n, {k: v.clone() for k, v in model.state_dict().items()}, 0.0, 1, {"sqgrad": sq})


def test_prunefl_strategy_accumulates_until_adjustment_then_resets(tmp_path):
    rec = recipe_from_dict(small_recipe(tmp_path, **{"method.name": "prunefl", "method.sparsity.density": 0.3,
                                                     "method.sparsity.delta_t": 2, "method.sparsity.t_end": 4}))
    strat = build_strategy(rec)
    model = get_model("cnn4", 4, width=0.25, image_size=12)
    strat.setup(model, 0)
    attach_masks(model, init_masks(model, 0.3, "erk", "random", 0))
    layers = [n for n, m in get_masks(model).items() if not m.all()]
    gen = torch.Generator().manual_seed(1)
    sq = [{n: torch.rand(prunable_modules(model)[n].weight.shape, generator=gen) for n in layers} for _ in range(3)]
    strat.aggregate(model, [fake_result(model, sq[0], 1), fake_result(model, sq[1], 3)], 1)
    assert strat.end_round(1, model, [], lambda m: (0.0, 0.0)) == {}  # not an adjustment round
    strat.aggregate(model, [fake_result(model, sq[2], 2)], 2)
    expect = {n: 0.25 * sq[0][n] + 0.75 * sq[1][n] + sq[2][n] for n in layers}
    for n in layers:
        assert torch.allclose(strat.importance[n], expect[n])
    mods = prunable_modules(model)
    before = {n: m.clone() for n, m in get_masks(model).items()}
    weights = {n: mods[n].weight.detach().clone() for n in layers}
    row = strat.end_round(2, model, [], lambda m: (0.5, 0.5))
    assert row["adjusted"] and not strat.importance
    from fedmef_toolkit.sparse.schedules import adjustment_fraction, swap_count

    for n in layers:
        k = swap_count(adjustment_fraction(2, 0.2, 4), int(before[n].sum()))
        want, _ = importance_swap(weights[n], before[n], expect[n], k)
        assert torch.equal(get_masks(model)[n], want)


def run_method(tmp_path, method, norm="bn", rounds=6, **over):
    rec = small_recipe(tmp_path, **{"method.name": method, "model.norm": norm, "fl.rounds": rounds,
                                    "method.sparsity.density": 0.3, "method.sparsity.delta_t": 2,
                                    "method.sparsity.t_end": 5, **over})
    sim = Simulator(recipe_from_dict(rec), tmp_path / "runs" / "run", show_progress=False)
    sim.write_run_files()
    rows = sim.run()
    lines = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    return sim, rows, lines


@pytest.mark.parametrize("norm", ["bn", "nsconv"])
def test_prunefl_end_to_end_exact_density(tmp_path, norm):
    sim, rows, lines = run_method(tmp_path, "prunefl", norm, **{"method.prunefl.init_max_iters": 4})
    prep = lines[0]
    assert prep["round"] == 0 and 1 <= prep["init_passes"] <= 4
    assert prep["init_mask_change"] <= 0.05 or prep["init_passes"] == 4
    assert prep["bytes_up"] > 0 and rows[0]["bytes_up_total"] == prep["bytes_up"] + rows[0]["bytes_up"]
    counts = layer_counts(sim.model, 0.3, "erk")
    masks = get_masks(sim.model)
    assert {n: int(m.sum()) for n, m in masks.items()} == counts  # exact ERK counts after every swap
    assert len({r["density"] for r in lines}) == 1
    for m in prunable_modules(sim.model).values():
        assert torch.all(m.weight[~m.weight_mask] == 0)
    assert [r["round"] for r in rows if r.get("adjusted")] == [2, 4]
    # clients send dense squared gradients while adjustments lie ahead, only their model after
    assert rows[-1]["bytes_up"] < rows[0]["bytes_up"]


# -- FedTiny ----------------------------------------------------------------------------

def test_fedtiny_candidate_selection_is_sample_weighted():
    losses = np.array([[10.0, 12.0], [300.0, 240.0]])  # summed losses: client 0 (10 samples), client 1 (100)
    samples = np.array([10.0, 100.0])
    assert select_candidate(losses, samples) == 1  # (10+300)/110 > (12+240)/110
    assert select_candidate(np.array([[1.0, 1.0]]), np.array([1.0])) == 0  # ties: the first


def test_fedtiny_pooled_bn_statistics_equal_those_of_the_union():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 3, generator=gen) + 2, torch.randn(13, 3, generator=gen)
    stats = [{"bn.running_mean": x.mean(0), "bn.running_var": x.var(0, unbiased=False)} for x in (a, b)]
    pooled = pooled_bn_stats(stats, [7, 13])
    both = torch.cat([a, b])
    assert torch.allclose(pooled["bn.running_mean"], both.mean(0), atol=1e-5)
    assert torch.allclose(pooled["bn.running_var"], both.var(0, unbiased=False), atol=1e-5)


def test_fedtiny_blocks_and_their_order():
    names = list(prunable_modules(get_model("resnet18", 10, width=0.25)))
    assert block_of("layer2.0.shortcut.0") == "layer2.0" and block_of("fc") == "fc"
    assert block_of("features.3.block.0.0") == "features.3"
    fwd = [b for b, _ in block_sequence(names, "forward")]
    assert fwd == ["stem.0", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
                   "layer4.1", "fc"]
    assert [b for b, _ in block_sequence(names, "backward")] == fwd[::-1]
    assert dict(block_sequence(names))["layer2.0"] == ["layer2.0.conv1.0", "layer2.0.conv2.0", "layer2.0.shortcut.0"]
    assert progressive_counts(100, 60, 0.1) == (46, 6)  # k = ceil(0.1 * 60) = 6, plus 40 to the target
    assert progressive_counts(50, 60, 0.1) == (5, 15)


@pytest.mark.parametrize("norm,order", [("bn", "forward"), ("nsconv", "backward")])
def test_fedtiny_end_to_end_progressive_blocks_reach_exact_target(tmp_path, norm, order):
    rec = small_recipe(tmp_path, **{"method.name": "fedtiny", "model.norm": norm, "fl.rounds": 5,
                                    "method.sparsity.density": 0.3, "method.sparsity.delta_t": 1,
                                    "method.sparsity.t_end": 5, "method.fedtiny.initial_density": 0.5,
                                    "method.fedtiny.block_order": order})
    sim = Simulator(recipe_from_dict(rec), tmp_path / "runs" / "run", show_progress=False)
    sim.write_run_files()
    prep = sim.prepare()
    assert prep["selected_candidate"] == int(np.argmin(prep["candidate_losses"]))
    assert len(prep["candidate_losses"]) == 4 and len(prep["selection_clients"]) == 3
    start = {n: int(m.sum()) for n, m in get_masks(sim.model).items()}
    assert start == layer_counts(sim.model, 0.5, "erk")  # the candidate's exact counts
    bns = [m for m in sim.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert (norm == "bn") == bool(bns)
    if bns:  # statistics re-estimated on the clients' data, not the defaults
        assert not torch.allclose(bns[0].running_var, torch.ones_like(bns[0].running_var))
    target = layer_counts(sim.model, 0.3, "erk")
    blocks = sim.strategy.blocks(sim.model)
    assert len(blocks) == 3  # cnn4 at density 0.3: the first conv and the classifier stay dense under ERK
    seen = []
    for t in range(1, 5):
        before = {n: m.clone() for n, m in get_masks(sim.model).items()}
        row = sim.run_round(t)
        block, layers = blocks[(t - 1) % len(blocks)]
        assert row["block"] == block and row["adjusted"]
        seen.append(block)
        for n, m in get_masks(sim.model).items():
            assert torch.equal(m, before[n]) == (n not in layers)  # only the block's layers change
            if n in layers:
                assert int(m.sum()) == target[n]  # exact target counts from the block's first adjustment
    names = [b for b, _ in block_sequence(list(target), order) if b in dict(blocks)]
    assert seen[:3] == names and seen[3] == names[0]
    assert {n: int(m.sum()) for n, m in get_masks(sim.model).items()} == target
    for m in prunable_modules(sim.model).values():
        assert torch.all(m.weight[~m.weight_mask] == 0)


def test_memory_report_measures_prunefl_and_fedtiny_at_their_target_density():
    """Both hold all-ones masks until their preparation before round 1; the report must measure
    the sparse model clients train, as the reference (BN, same density) is measured."""
    import torch

    from fedmef_toolkit.memory.report import build_report, configs_for_recipe

    for name in ("prunefl", "fedtiny"):
        r = load_recipe("quickstart.yaml", [f"method.name={name}", "method.sparsity.density=0.2"])
        configs = configs_for_recipe(r, r.data.synthetic.num_classes, r.data.synthetic.image_size)
        report = build_report(configs, 8, r.data.synthetic.image_size, r.data.synthetic.num_classes,
                              torch.device("cpu"))
        subject, ref = report["configurations"]
        assert abs(subject["density"] - 0.2) < 0.01 and abs(ref["density"] - 0.2) < 0.01, name
        assert subject["analytic"]["weights"] < 0.5 * (subject["parameters"] * 4), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CPU-saved theta_low meets a CUDA model only on a GPU")
def test_fedmef_resumed_mid_window_on_cuda_uses_theta_low_on_the_model_device(tmp_path):
    """A checkpoint written between computing theta_low and the adjustment round holds theta_low;
    read back (on the CPU) into a run on CUDA, the adjustment round must still work."""
    over = {"method.name": "fedmef", "model.norm": "nsconv", "device": "cuda",
            "method.sparsity.delta_t": 2, "method.sparsity.t_end": 4, "method.bae.rounds": 2}
    sim = Simulator(recipe_from_dict(small_recipe(tmp_path, **over)), tmp_path / "r", show_progress=False)
    sim.strategy.begin_round(1, sim.model)  # the window of adjustment round 2 starts: theta_low computed
    saved = {k: v.cpu() for k, v in sim.strategy.state_tensors().items()}
    assert any(k.startswith("low.") for k in saved)
    fresh = build_strategy(sim.recipe)
    fresh.load_state_tensors(saved)
    fresh.begin_round(2, sim.model)
    assert fresh.low and all(m.is_cuda for m in fresh.low.values())
    assert all(keep.is_cuda for _, keep in fresh.request.values())
