"""Flower integration (fedmef-toolkit[flower]): the same run on Flower as in the built-in simulator.

Skipped, with the reason, where flwr is not installed. Equivalence tolerance:
sampled clients, bytes and the message layout must be equal; per-round
accuracy within 1e-6 absolute and train loss within 1e-5 relative (measured:
identical, both run the same float ops on the CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedmef-toolkit[flower]')")

import torch  # noqa: E402
from conftest import small_recipe, stop_run  # noqa: E402

from fedmef_toolkit.fl.comm import state_bytes  # noqa: E402
from fedmef_toolkit.fl.simulator import Simulator  # noqa: E402
from fedmef_toolkit.flower import codec  # noqa: E402
from fedmef_toolkit.recipe import recipe_from_dict  # noqa: E402

ACC_TOL, LOSS_RTOL = 1e-6, 1e-5
SPARSE = {"method.sparsity.density": 0.5, "method.sparsity.delta_t": 2, "method.sparsity.t_end": 4}


def _run(tmp_path, engine, **over):
    r = small_recipe(tmp_path / engine, **{"fl.rounds": 2, "fl.engine": engine, **over})
    sim = Simulator(recipe_from_dict(r), tmp_path / engine / "run", show_progress=False)
    sim.write_run_files()
    if engine == "flower":
        from fedmef_toolkit.flower.simulation import run_in_simulation

        return sim, run_in_simulation(sim)
    return sim, sim.run()


def test_bae_plans_travel_with_their_penalty_or_without_one():
    """An extrusion round's plan carries lambda, the kind and theta_low once (the growth request
    is rebuilt from it); a plan whose penalty has no targets (every layer dense, or a round that
    does not extrude) travels without one, and its client still runs (step size from norm 0)."""
    from fedmef_toolkit.fl.plan import MaskedWeightPenalty
    from fedmef_toolkit.fl.strategies.fedmef import BaEPlan
    from fedmef_toolkit.recipe import BaESpec
    from fedmef_toolkit.sparse.schedules import bae_step_size

    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    mask = torch.rand(model[0].weight.shape, generator=g) < 0.5
    model[0].register_buffer("weight_mask", mask)
    low = mask & (torch.rand(mask.shape, generator=g) < 0.3)
    penalty = MaskedWeightPenalty("l2sq", {"0": model[0].weight})
    for targets in ({"0": low}, {}):
        penalty.set_(targets, 0.2)
        request = {"0": (int(low.sum()), ~mask | low)} if targets else None
        plan = BaEPlan(0.001, request, False, penalty, BaESpec(lam=0.2), lr0=0.1, window_offset=0)
        arrays, cfg = codec.encode_plan(plan, {"0": mask})
        back = codec.decode_plan(arrays, cfg, {"0": mask}, "cpu")
        if targets:
            assert back.penalty().targets == ("0",) and back.penalty().lam_value == 0.2
            assert torch.equal(back.penalty().masks["0"].bool(), low) and not any(k.startswith("request.") for k in arrays)
            assert torch.equal(back.request["0"][1], ~mask | low) and back.request["0"][0] == int(low.sum())
        else:
            assert back.penalty() is None and back.request is None
        back.begin(model, total_steps=4)  # BaE's step size from ||theta_low|| (0 without targets)
        norm = float((model[0].weight.detach() * low).norm()) if targets else 0.0
        mu = float(back.step_lr(0, model))
        assert mu == pytest.approx(bae_step_size(0, 4, 0.001, 0.1, norm)) and (mu > 0.0011) == bool(targets)

def test_state_codec_is_exact_and_counts_what_accounting_counts():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 3, 3, generator=g)
    dense_mask = torch.rand(w.shape, generator=g) < 0.5
    sparse_mask = torch.zeros(w.shape, dtype=torch.bool)
    sparse_mask.view(-1)[:3] = True  # few entries: int32 indices beat the bitmask
    state = {"a.weight": w * dense_mask, "a.weight_mask": dense_mask, "b.weight": w * sparse_mask,
             "b.weight_mask": sparse_mask, "a.bias": torch.randn(8), "n": torch.tensor(3)}
    arrays, cfg = codec.encode_state(state)
    assert "b.weight@idx" in arrays and "a.weight@bits" in arrays
    assert codec.arrays_bytes(arrays) == state_bytes(state)
    back = codec.decode_state(arrays, cfg)
    assert set(back) == set(state)
    for k in state:
        assert torch.equal(back[k], state[k]), k


@pytest.mark.parametrize("method,over", [("fedavg", {}), ("feddst", SPARSE),
                                         ("fedmef", {**SPARSE, "method.sap.enabled": True})])
def test_flower_simulation_matches_builtin_simulator(tmp_path, method, over):
    over = {"method.name": method, **over}
    _, ref = _run(tmp_path, "sequential", **over)
    sim, rows = _run(tmp_path, "flower", **over)
    assert len(rows) == len(ref) == 2
    for a, b in zip(ref, rows):
        assert a["clients"] == b["clients"]
        assert abs(a["eval_acc"] - b["eval_acc"]) <= ACC_TOL
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=LOSS_RTOL)
        assert a["density"] == b["density"]
        assert (a["bytes_down"], a["bytes_up"]) == (b["bytes_down"], b["bytes_up"])
        # what travelled in Flower messages is exactly what communication accounting counts
        assert (b["wire_bytes_down"], b["wire_bytes_up"]) == (b["bytes_down"], b["bytes_up"])
        assert "failed_clients" not in b and b["engine"] == "flower"
    if method == "fedmef":
        assert rows[1].get("adjusted") and rows[1]["swapped"] > 0  # growth top-k travelled and was used
    if method == "feddst":
        assert rows[1]["bytes_up"] > 0
    for f in ("metrics.jsonl", "checkpoint.safetensors", "model.safetensors", "recipe.yaml"):
        assert (sim.run_dir / f).exists(), f


def test_failing_client_is_logged_and_the_run_goes_on(tmp_path, monkeypatch):
    """Through `fedmef train`: client 3 (sampled in round 1) fails; the round aggregates the others."""
    rdir = tmp_path / "r"
    rdir.mkdir()
    recipe = small_recipe(rdir, **{"fl.rounds": 2, "fl.engine": "flower", "fl.flower.min_results": 2})
    (rdir / "recipe.yaml").write_text(json.dumps(recipe))
    env = {**os.environ, "FEDMEF_FLOWER_FAULT": "1:3", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "fedmef_toolkit.cli.main", "train", "--recipe",
                        str(rdir / "recipe.yaml"), "--no-progress"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = rdir / "runs" / "run"
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["clients"] == [3, 6, 7] and list(rows[0]["failed_clients"]) == ["3"]
    assert "injected fault" in rows[0]["failed_clients"]["3"]
    assert rows[0]["wire_bytes_up"] == rows[0]["bytes_up"] and rows[0]["bytes_up"] * 3 == rows[1]["bytes_up"] * 2
    assert "failed_clients" not in rows[1]
    assert (run_dir / "model.safetensors").exists()


def _tagged_processes(tag: str) -> list[str]:
    """Processes (ps, with their environment) that inherited `tag`: Ray's GCS, raylet and workers
    started by a run whose environment holds it."""
    out = subprocess.run(["ps", "axww", "e", "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [ln.split(" FEDMEF_")[0][:200] for ln in out.splitlines() if tag in ln]


def _no_tagged_processes(tag: str, seconds: float = 20) -> list[str]:
    end = time.time() + seconds
    while (left := _tagged_processes(tag)) and time.time() < end:
        time.sleep(0.2)
    return left


def test_sigterm_and_ctrl_c_under_flower_checkpoint_the_last_round_and_stop_ray(tmp_path):
    """`fedmef train` with fl.engine: flower gets SIGTERM, then (resumed) SIGINT: each time exit code
    128+signal, one line with the resume command, no traceback, the checkpoint at the last logged
    round, no Ray process left; resuming to the end gives the uninterrupted run's metrics (the
    built-in simulator's, which the Flower run equals: test_flower_simulation_matches_builtin_simulator)."""
    rounds, tag = 10, f"fedmef-test-{uuid.uuid4().hex}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDMEF_TEST_TAG": tag}
    recipe = small_recipe(tmp_path, **{"fl.rounds": rounds, "fl.engine": "flower", "output.checkpoint_every": 100})
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    run_dir = tmp_path / "runs" / "run"
    cli = [sys.executable, "-m", "fedmef_toolkit.cli.main", "train", "--no-progress"]
    popen = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(cli + ["--recipe", str(tmp_path / "recipe.yaml")], **popen)
    try:
        end = time.time() + 300
        while not (run_dir / "metrics.jsonl").exists() and proc.poll() is None and time.time() < end:
            time.sleep(0.05)
        assert any("raylet" in p for p in _tagged_processes(tag))  # what the checks below look for is there
        _, first = stop_run(proc, signal.SIGTERM, run_dir, 1)
        assert _no_tagged_processes(tag) == []
        proc = subprocess.Popen(cli + ["--resume", str(run_dir)], **popen)
        _, second = stop_run(proc, signal.SIGINT, run_dir, first + 1)
        assert first < second < rounds
        assert _no_tagged_processes(tag) == []
    finally:
        if proc.poll() is None:
            proc.kill()
    rest = subprocess.run(cli + ["--resume", str(run_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert rest.returncode == 0 and f"resuming after round {second}" in rest.stderr, rest.stderr[-3000:]
    assert _no_tagged_processes(tag) == []
    ref = small_recipe(tmp_path / "ref", **{"fl.rounds": rounds, "output.checkpoint_every": 100})
    sim = Simulator(recipe_from_dict(ref), tmp_path / "ref" / "run", show_progress=False)
    sim.write_run_files()
    engine_keys = {"engine", "wire_bytes_down", "wire_bytes_up", "time_s", "samples_per_s", "cpu_max_rss_mib"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ClientApps (OMP_NUM_THREADS=1): the same float sums
    try:
        want = [{k: v for k, v in r.items() if k not in engine_keys} for r in sim.run()]
    finally:
        torch.set_num_threads(threads)
    got = [{k: v for k, v in json.loads(ln).items() if k not in engine_keys}
           for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert got == want


class _Reply:
    """Duck-typed Flower reply: what FlowerEngine reads of one."""

    def __init__(self, to, node, content=None, error=None):
        from types import SimpleNamespace

        self.metadata = SimpleNamespace(reply_to_message_id=to, src_node_id=node)
        self.content, self.error = content, (SimpleNamespace(reason=error) if error else None)

    def has_error(self):
        return self.error is not None


class _FailingGrid:
    """Two worker nodes whose train messages all fail (no Ray: fast)."""

    def __init__(self):
        from flwr.supercore.task_identity import TaskIdentity

        self.sent = {}
        for key, value in (("task_id", 1), ("run_id", 1), ("node_id", 0)):
            if getattr(TaskIdentity, f"_{key}") is None:  # Message() reads them; a Flower run sets them
                setattr(TaskIdentity, key, value)

    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, msgs, timeout=None):
        from flwr.app import ConfigRecord, RecordDict

        return [_Reply("q", m.metadata.dst_node_id,
                       RecordDict({"config": ConfigRecord({"partition-id": -1, "num-partitions": 0})}))
                for m in msgs]

    def push_messages(self, msgs):
        ids = [f"m{len(self.sent) + i}" for i, _ in enumerate(msgs)]
        self.sent.update({i: m.metadata.dst_node_id for i, m in zip(ids, msgs)})
        return ids

    def pull_messages(self, ids):
        return [_Reply(i, self.sent[i], error="ClientApp raised: CUDA out of memory") for i in ids]


def test_too_few_results_stop_the_run_at_its_last_checkpoint(tmp_path):
    from fedmef_toolkit.flower.engine import TooFewResults

    r = small_recipe(tmp_path, **{"fl.rounds": 2, "fl.engine": "flower", "fl.flower.min_results": 1})
    sim = Simulator(recipe_from_dict(r), tmp_path / "run", show_progress=False)
    sim.write_run_files()
    sim.engine.grid = _FailingGrid()
    with pytest.raises(TooFewResults, match="fewer than fl.flower.min_results=1") as info:
        sim.run()
    assert "CUDA out of memory" in str(info.value)
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["round"] == 0
    assert sorted(set(sim.engine.grid.sent.values())) == [1, 2]  # the round's clients went to both workers


def _deployment(tmp_path, **over):
    """A SuperLink and two SuperNodes (workers) on 127.0.0.1 and `flwr run` of an app written by
    `fedmef flower app` for a small recipe; returns (deployment, run directory)."""
    from flower_deploy import Deployment, bin_of

    from fedmef_toolkit.flower.app_dir import write_app

    recipe = recipe_from_dict(small_recipe(tmp_path, **{"fl.engine": "flower", "fl.clients_per_round": 2, **over}))
    app = write_app(recipe, tmp_path / "app", min_nodes=2)
    home = tmp_path / "app" / "flwr_home"
    run_dir = tmp_path / "deploy-run"
    path = f"{os.path.dirname(bin_of('flwr'))}{os.pathsep}{os.environ.get('PATH', '')}"  # flower-superexec etc.
    d = Deployment(home, {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "PATH": path})
    cfg = home / "config.toml"
    cfg.write_text(cfg.read_text().replace("127.0.0.1:9093", f"127.0.0.1:{d.port}"))
    try:
        d.superlink()
        d.wait_port()
        d.supernode("node1")
        d.supernode("node2")
        p = subprocess.run([bin_of("flwr"), "run", str(app), "fedmef-local", "--run-config",
                            f"run-dir='{run_dir}' wait-s=60"], env=d.env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    except BaseException:
        d.stop()  # no processes left behind when the start fails
        raise
    return d, run_dir


def _wait_for(path, seconds: float, nonempty: bool = False) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        if path.exists() and (not nonempty or path.read_text().strip()):
            return True
        time.sleep(0.2)
    return False


def test_two_supernode_deployment_on_localhost(tmp_path):
    """SuperLink + 2 SuperNodes (workers) on 127.0.0.1, `flwr run` of an app from `fedmef flower app`."""
    d = None
    try:
        d, run_dir = _deployment(tmp_path, **{"fl.rounds": 2})
        assert _wait_for(run_dir / "model.safetensors", 150), d.logs()
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2] and all("failed_clients" not in r for r in rows)
        assert all(r["wire_bytes_up"] == r["bytes_up"] for r in rows)
    finally:
        if d is not None:
            d.stop()


def test_killing_a_supernode_mid_run_leaves_the_run_going(tmp_path):
    """Deployment on localhost with 2 SuperNodes; one is killed (SIGKILL, with the ClientApp it
    runs) after round 1: the clients it was to train are logged as failed (no reply in time, or
    disconnected) and the run finishes its rounds with the results that came back."""
    d = None
    try:
        d, run_dir = _deployment(tmp_path, **{"fl.rounds": 3, "fl.flower.min_results": 1,
                                              "fl.flower.timeout_s": 20})
        metrics = run_dir / "metrics.jsonl"
        assert _wait_for(metrics, 150, nonempty=True), d.logs()
        d.kill("node2")
        assert _wait_for(run_dir / "model.safetensors", 200), d.logs()
        rows = [json.loads(ln) for ln in metrics.read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2, 3]
        failed = [r for r in rows[1:] if r.get("failed_clients")]
        assert failed, rows
        assert all("node" in why for r in failed for why in r["failed_clients"].values())
    finally:
        if d is not None:
            d.stop()


class _PerClientErrorGrid(_FailingGrid):
    """Two worker nodes whose replies name each client's failure (`error.I`), not a message error."""

    def push_messages(self, msgs):
        self.msgs = list(msgs)
        return super().push_messages(msgs)

    def pull_messages(self, ids):
        out = []
        for i in ids:
            m = next(m for j, m in zip(self.sent, self.msgs) if j == i)
            cids = m.content["config"]["cids"]
            out.append(_Reply(i, self.sent[i], {f"error.{k}": {"reason": f"client {c} failed"}
                                                for k, c in enumerate(cids)}))
        return out


def test_a_round_sends_one_message_per_node_with_its_clients(tmp_path):
    """Flower 1.42 starts a ClientApp process per message: a round sends one message per SuperNode,
    naming its clients in order, the model once; a failure in a reply is that client's alone."""
    from fedmef_toolkit.flower.engine import TooFewResults

    r = small_recipe(tmp_path, **{"fl.rounds": 1, "fl.engine": "flower", "fl.clients_per_round": 5,
                                  "fl.flower.min_results": 1})
    sim = Simulator(recipe_from_dict(r), tmp_path / "run", show_progress=False)
    sim.write_run_files()
    grid = sim.engine.grid = _PerClientErrorGrid()
    with pytest.raises(TooFewResults) as info:
        sim.run()
    assert len(grid.msgs) == 2 and sorted(grid.sent.values()) == [1, 2]
    cids = [list(m.content["config"]["cids"]) for m in grid.msgs]
    assert sorted(len(c) for c in cids) == [2, 3] and sorted(sum(cids, [])) == sorted(sim.sample_clients(1))
    assert all(f"plan.{k}" in m.content and f"plan-config.{k}" in m.content
               for m, c in zip(grid.msgs, cids) for k in range(len(c)))
    for c in sum(cids, []):
        assert f"client {c} failed" in str(info.value)
