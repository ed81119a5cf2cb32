"""The batched engine (fl/streams.py: clients on CUDA streams) against the sequential one.

Every client runs the sequential engine's code with its own generator,
worker model, momentum and graph, so its update must be the sequential
engine's exactly. On the CPU (no streams) the engine interleaves the
clients' steps round-robin in host order: these tests check that
interleaving, with unequal client sizes, more clients than workers,
mid-training mask changes (FedDST), BaE's penalty and step size with SAP
and AGC, and growth-gradient uploads. On a GPU (skipped here) the same
checks run with streams and graphs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import small_recipe

from fedmef_toolkit.errors import UserError
from fedmef_toolkit.fl.client import ClientData
from fedmef_toolkit.fl.engine import SequentialEngine, build_engine, select_engine
from fedmef_toolkit.fl.simulator import Simulator
from fedmef_toolkit.fl.streams import StreamsEngine, clients_at_once
from fedmef_toolkit.fl.strategies.feddst import LocalAdjustPlan
from fedmef_toolkit.fl.strategies.fedmef import BaEPlan
from fedmef_toolkit.recipe import recipe_from_dict
from fedmef_toolkit.sparse.masks import get_masks
from fedmef_toolkit.sparse.schedules import round_lr

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams need a CUDA GPU (device machine)")

ADJUST = {"method.sparsity.delta_t": 2, "method.sparsity.t_end": 4}  # round 2 adjusts masks
FEDMEF = {"method.name": "fedmef", "model.norm": "nsconv", "fl.agc": 0.16, "method.sap.enabled": True, **ADJUST,
          "fl.lr_schedule": "exp", "fl.lr_decay": 0.5, "method.bae.psi": 100.0}  # BaE's step size above eta


def simulator(tmp_path, **over) -> Simulator:
    return Simulator(recipe_from_dict(small_recipe(tmp_path, **over)), tmp_path / "runs" / "run", show_progress=False)


def both_engines(sim: Simulator, t: int, max_clients: int = 0):
    """Round t's clients through both engines from the same global model and plans."""
    model, strategy, r = sim.model, sim.strategy, sim.recipe
    strategy.begin_round(t, model)
    lr = round_lr(t, r.fl.rounds, r.fl.lr, r.fl.lr_schedule, r.fl.lr_decay)
    clients = [ClientData(c, sim.client_indices[c]) for c in sim.sample_clients(t)]
    plans = []

    def make_plan():
        plans.append(strategy.client_plan(t, lr, model))
        return plans[-1]

    seq = SequentialEngine(sim.trainer, r.seed).run_round(t, model, clients, make_plan)
    engine = StreamsEngine(sim.trainer, r.seed, max_clients)
    streams = engine.run_round(t, model, clients, make_plan)
    return seq, streams, plans, engine


def assert_same_updates(seq, streams, tol=0.0):
    assert len({r.steps for r in seq}) > 1  # unequal client sizes, so unequal numbers of steps
    assert all(type(r.loss) is float for r in seq + streams)  # engines return the losses read
    assert [r.cid for r in seq] == [r.cid for r in streams]
    for a, b in zip(seq, streams):
        assert (a.num_samples, a.steps, a.logs) == (b.num_samples, b.steps, b.logs)
        assert a.loss == pytest.approx(b.loss, rel=tol, abs=0 if tol == 0 else 1e-12)
        assert a.state.keys() == b.state.keys()
        for key, x in a.state.items():
            y = b.state[key]
            if tol == 0 or not x.is_floating_point():
                assert torch.equal(x, y), f"client {a.cid} {key}"
            else:
                err = float((x - y).abs().max()) / (float(x.abs().max()) + 1e-12)
                assert err <= tol, f"client {a.cid} {key}: relative difference {err:.2e}"
        assert a.upload.keys() == b.upload.keys()
        for name, (idx, val) in a.upload.get("grow", {}).items():
            idx2, val2 = b.upload["grow"][name]
            assert torch.equal(idx, idx2) and (torch.equal(val, val2) if tol == 0 else
                                               torch.allclose(val, val2, rtol=1e-4, atol=1e-6)), f"upload {name}"


def test_fedavg_bn(tmp_path):
    seq, streams, _, engine = both_engines(simulator(tmp_path), 1)
    assert len(engine.workers) == 3  # every client of the round at once (CPU limit: 4)
    assert_same_updates(seq, streams)


def test_fedavg_sparse_more_clients_than_workers(tmp_path):
    """Five clients on two workers: a worker whose client is done takes the next one."""
    sim = simulator(tmp_path, **{"method.name": "fedavg_sparse", "fl.clients_per_round": 5})
    seq, streams, _, engine = both_engines(sim, 1, max_clients=2)
    assert len(engine.workers) == 2 and engine.capacity_reason == "fl.batched_clients"
    assert_same_updates(seq, streams)


def test_feddst_mid_training_mask_change(tmp_path):
    sim = simulator(tmp_path, **{"method.name": "feddst", **ADJUST})
    global_masks = {n: m.clone() for n, m in get_masks(sim.model).items()}
    seq, streams, plans, _ = both_engines(sim, 2)
    assert all(isinstance(p, LocalAdjustPlan) for p in plans)
    for r in streams:  # every client changed its own mask
        assert any(not torch.equal(r.state[f"{n}.weight_mask"], m) for n, m in global_masks.items())
    assert_same_updates(seq, streams)


@pytest.mark.parametrize("arch", ["cnn4", "resnet_narrow"])
def test_fedmef_bae_sap_agc(tmp_path, arch):
    sim = simulator(tmp_path, **{**FEDMEF, "model.arch": arch, "model.width": 0.5 if arch == "resnet_narrow" else 0.25})
    seq, streams, plans, _ = both_engines(sim, 2, max_clients=2)
    assert all(isinstance(p, BaEPlan) for p in plans)  # extrusion: per-client penalty and step size
    assert all("grow" in r.upload for r in streams)  # adjustment round: top-k gradient uploads
    assert_same_updates(seq, streams)


def test_whole_runs_match_sequential(tmp_path):
    """Whole runs through the simulator with `fl.engine: batched`: the same metrics."""
    over = {"fl.rounds": 3, "method.name": "fedmef", "model.norm": "nsconv", **ADJUST}
    rows = {}
    for engine in ("sequential", "batched"):
        sim = simulator(tmp_path / engine, **{**over, "fl.engine": engine})
        sim.write_run_files()
        rows[engine] = sim.run()
        assert {r["engine"] for r in rows[engine]} == {engine}
        assert ("CUDA streams" in sim.engine.status()) == (engine == "batched")
    for a, b in zip(rows["sequential"], rows["batched"]):
        assert (a["eval_acc"], a["train_loss"]) == (b["eval_acc"], b["train_loss"])


# -- engine selection and capacity ----------------------------------------------------


def test_auto_is_sequential_on_the_cpu_and_batched_on_a_gpu(tmp_path):
    sim = simulator(tmp_path)
    x = sim.augment.normalize(sim.train_x[:2])
    assert select_engine("auto", sim.model, x)[0] == "sequential"
    assert select_engine("batched", sim.model, x) == ("batched", "fl.engine: batched")
    assert sim.engine_name == "sequential" and "CPU" in sim.engine_reason
    cuda_like = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    name, why = select_engine("auto", sim.model, cuda_like)
    assert name == "batched" and "the sequential engine" in why  # the log says why
    assert isinstance(build_engine("batched", sim.trainer, 0, 2), StreamsEngine)


def test_recipe_engine_keys():
    assert recipe_from_dict({}).fl.engine == "auto"
    with pytest.raises(UserError, match="fl.engine"):
        recipe_from_dict({"fl": {"engine": "vmap"}})
    with pytest.raises(UserError, match="fl.batched_clients"):
        recipe_from_dict({"fl": {"batched_clients": -1}})


def test_clients_at_once(tmp_path):
    sim = simulator(tmp_path)
    k, reason = clients_at_once(sim.trainer, sim.model, 0)
    assert 1 <= k <= 4 and "CPU" in reason
    assert clients_at_once(sim.trainer, sim.model, 2) == (2, "fl.batched_clients")


def test_the_client_limit_is_per_model_not_per_round(tmp_path):
    """A one-client round (PruneFL's preparation trains one client first) must not fix the
    number of workers for the rest of the run; a different model gets new workers."""
    sim = simulator(tmp_path, **{"fl.clients_per_round": 3})
    engine = StreamsEngine(sim.trainer, sim.recipe.seed, max_clients=3)
    plan = lambda: sim.strategy.client_plan(1, 0.1, sim.model)  # noqa: E731
    clients = [ClientData(c, sim.client_indices[c]) for c in sim.sample_clients(1)]
    assert len(engine.run_round(1, sim.model, clients[:1], plan)) == 1
    assert len(engine.workers) == 1
    assert len(engine.run_round(2, sim.model, clients, plan)) == 3
    assert len(engine.workers) == 3 and "3 clients at once" in engine.status()
    first = engine.workers[0].model
    other = simulator(tmp_path / "other", **{"fl.clients_per_round": 3, "model.width": 0.5})
    engine.run_round(1, other.model, clients[:2], lambda: other.strategy.client_plan(1, 0.1, other.model))
    assert len(engine.workers) == 2 and engine.workers[0].model is not first


# -- on a GPU: streams and graphs ---------------------------------------------------------


@cuda
@pytest.mark.parametrize("over", [
    {"method.name": "fedavg_sparse"},
    {"method.name": "feddst", **ADJUST},
    {**FEDMEF, "model.arch": "resnet_narrow", "model.width": 0.5},
], ids=["fedavg_sparse", "feddst", "fedmef"])
def test_streams_on_cuda_match_sequential(tmp_path, over):
    """Clients on their own streams, steps replayed from their own graphs, equal the sequential
    engine's within fp32 tolerance (cuDNN may choose other kernels on other streams)."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        sim = simulator(tmp_path, **{**over, "device": "cuda", "fl.clients_per_round": 5})
        seq, streams, _, engine = both_engines(sim, 2, max_clients=3)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    assert all(w.stream is not None for w in engine.workers) and len(engine.workers) == 3
    assert sum(w.step.replays for w in engine.workers) > 0, engine.status()
    assert all(w.step.refused is None for w in engine.workers), engine.status()
    assert_same_updates(seq, streams, tol=1e-4)


def test_losses_are_read_once_per_round(tmp_path, monkeypatch):
    """Reading a finished client's loss waits for its stream, so the engine leaves every loss
    on the device and reads them together after the round's last step (one host sync)."""
    import fedmef_toolkit.fl.streams as streams_module

    calls = []
    real = streams_module.read_losses

    def spy(results):
        calls.append([type(r.loss) for r in results])
        real(results)

    monkeypatch.setattr(streams_module, "read_losses", spy)
    sim = simulator(tmp_path, **{"fl.clients_per_round": 5})
    seq, streams, _, _ = both_engines(sim, 1, max_clients=2)
    assert calls == [[torch.Tensor] * 5]  # one read, of all five clients, none read before
    assert_same_updates(seq, streams)


@cuda
def test_streams_round_syncs_the_host_once(tmp_path):
    """Inside a round the host waits for the GPU once, at the end, where it reads the clients'
    losses: a wait in the middle (e.g. reading a finished client's loss) would stop the host
    issuing the other clients' steps while it waits for one stream."""
    sim = simulator(tmp_path, **{**FEDMEF, "model.arch": "resnet_narrow", "model.width": 0.5, "device": "cuda",
                                 "fl.clients_per_round": 4})  # rounds 1 and 3: no adjustment, no BaE
    engine = StreamsEngine(sim.trainer, sim.recipe.seed, 4)
    _round_with_sync_check(sim, engine, 1)  # captures the graphs (capturing synchronises); round 3 replays them
    results, syncs = _round_with_sync_check(sim, engine, 3)
    assert sum(w.step.captures for w in engine.workers) == len(engine.workers), engine.status()
    assert all(type(r.loss) is float for r in results)
    assert len(syncs) == 1, (syncs, engine.status())


@cuda
@pytest.mark.parametrize("config", [FEDMEF, {"method.name": "feddst", **ADJUST}], ids=["fedmef", "feddst"])
def test_adjustment_round_syncs_the_host_once(tmp_path, config):
    """So does an adjustment round: FedMef's BaE step size and growth-gradient upload, FedDST's
    mid-training prune and grow on each client (the server counts the swaps between rounds)."""
    sim = simulator(tmp_path, **{**config, "model.arch": "resnet_narrow", "model.width": 0.5, "device": "cuda",
                                 "fl.clients_per_round": 4})
    engine = StreamsEngine(sim.trainer, sim.recipe.seed, 4)
    _round_with_sync_check(sim, engine, 1)
    results, syncs = _round_with_sync_check(sim, engine, 2)  # ADJUST: round 2 adjusts the masks
    assert sum(w.step.captures for w in engine.workers) == len(engine.workers), engine.status()
    if config is FEDMEF:
        assert all(r.upload.get("grow") for r in results)
    assert len(syncs) == 1, (syncs, engine.status())


@pytest.mark.parametrize("method", ["feddst", "prunefl"])
def test_client_plans_read_no_masks_once_the_round_began(tmp_path, monkeypatch, method):
    """What a round's client plans need from the masks (FedDST's swap counts, PruneFL's
    adjustable layers) is read in `begin_round`, between rounds: making a plan inside the round
    reads no mask (on a GPU each read waits for the device while other clients' steps queue)."""
    from fedmef_toolkit.fl.strategies import feddst, prunefl

    sim = simulator(tmp_path, **{"method.name": method, **ADJUST})
    module = {"feddst": feddst, "prunefl": prunefl}[method]
    sim.strategy.begin_round(2, sim.model)  # ADJUST: round 2 adjusts (FedDST); PruneFL collects up to t_end

    def no_reads(model):
        raise AssertionError("a client plan read the masks inside the round")

    monkeypatch.setattr(module, "get_masks", no_reads)
    plans = [sim.strategy.client_plan(2, 0.1, sim.model) for _ in range(3)]
    if method == "feddst":
        assert all(isinstance(p, LocalAdjustPlan) and p.swaps for p in plans)
    else:
        assert all(p.layers == plans[0].layers for p in plans)


def _round_with_sync_check(sim, engine, t):
    """(results, where the host synchronised) of round t through `engine`, plans made inside the
    round as the simulator makes them; the server's part (begin_round) before it, unchecked."""
    import warnings

    sim.strategy.begin_round(t, sim.model)
    lr = round_lr(t, sim.recipe.fl.rounds, sim.recipe.fl.lr, sim.recipe.fl.lr_schedule, sim.recipe.fl.lr_decay)
    # on the device, as the simulator gives them (CPU indices would cost a copy, and a sync, per batch)
    clients = [ClientData(c, sim.client_indices[c].to(sim.device)) for c in sim.sample_clients(t)]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            results = engine.run_round(t, sim.model, clients, lambda: sim.strategy.client_plan(t, lr, sim.model))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return results, [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]


@cuda
def test_capacity_from_free_gpu_memory(tmp_path):
    sim = simulator(tmp_path, device="cuda")
    k, reason = clients_at_once(sim.trainer, sim.model, 0)
    assert k >= 1 and "GiB free" in reason
