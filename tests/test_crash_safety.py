"""Crash safety of a run (issue 11, items 1-4): one-file atomic checkpoints, resume after
SIGKILL at any moment, SIGTERM checkpoints, torn metrics lines, run directories that
never collide."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import small_recipe, stop_run
from safetensors.torch import load_file

from fedmef_toolkit.fl.checkpoint import load_checkpoint, save_checkpoint

CLI = [sys.executable, "-m", "fedmef_toolkit.cli.main", "train", "--no-progress"]
TIME_KEYS = {"time_s", "samples_per_s", "cpu_max_rss_mib"}


def _metrics(run_dir):
    return [{k: v for k, v in json.loads(ln).items() if k not in TIME_KEYS}
            for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _recipe_file(tmp_path, name, **over):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(small_recipe(tmp_path, **{"output.name": name, **over})))
    return path


def test_checkpoint_state_travels_with_the_tensors(tmp_path):
    totals = {"bytes_up": 0, "bytes_down": 0, "samples": 0, "time_s": 0.0}
    save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"s": torch.zeros(2)}, {"round": 4, "totals": totals})
    # a kill between the two files used to leave a stale checkpoint.json: it no longer matters
    (tmp_path / "checkpoint.json").write_text(json.dumps({"round": 3, "totals": totals}))
    model, strat, state = load_checkpoint(tmp_path)
    assert state["round"] == 4 and torch.equal(model["w"], torch.ones(3)) and set(strat) == {"s"}
    (tmp_path / "checkpoint.json").unlink()
    assert load_checkpoint(tmp_path)[2]["round"] == 4
    assert not list(tmp_path.glob("*.tmp"))


def _wait_for_lines(path, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return True
        time.sleep(0.05)
    return False


def test_sigkill_at_random_moments_then_resume_matches_the_uninterrupted_run(tmp_path):
    over = {"fl.rounds": 6, "output.checkpoint_every": 1}
    full = subprocess.run(CLI + ["--recipe", str(_recipe_file(tmp_path, "full", **over))], capture_output=True,
                          text=True)
    assert full.returncode == 0, full.stderr
    full_dir = tmp_path / "runs" / "full"
    rng = random.Random(0)
    part_dir = tmp_path / "runs" / "part"
    proc = subprocess.Popen(CLI + ["--recipe", str(_recipe_file(tmp_path, "part", **over))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kills = 0
    while True:
        # kill at a random moment after a random number of logged rounds (inside training,
        # metrics writes or checkpoint writes alike), then resume, until the run finishes
        metrics = part_dir / "metrics.jsonl"
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if _wait_for_lines(metrics, logged + rng.randint(1, 2), proc):
            time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (part_dir / "model.safetensors").exists() and proc.returncode == 0:
            break
        assert kills < 12, "the run never finished"
        proc = subprocess.Popen(CLI[:-1] + ["--resume", str(part_dir), "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert kills >= 1
    assert _metrics(part_dir) == _metrics(full_dir)
    a, b = load_file(str(full_dir / "model.safetensors")), load_file(str(part_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _uninterrupted(tmp_path, name, **over):
    """The same recipe run in this process without interruption (no process start: faster)."""
    from fedmef_toolkit.fl.simulator import Simulator
    from fedmef_toolkit.recipe import load_recipe

    sim = Simulator(load_recipe(str(_recipe_file(tmp_path, name, **over))), tmp_path / "runs" / name,
                    show_progress=False)
    sim.write_run_files()
    sim.run()
    return sim.run_dir


def test_sigterm_and_ctrl_c_checkpoint_the_last_round_and_resume_matches_the_uninterrupted_run(tmp_path):
    """SIGTERM, then (after a resume) SIGINT: each stops the run with exit code 128+signal, one line
    with the resume command and no traceback, and a checkpoint of the last logged round (not the
    periodic one); resuming to the end gives the uninterrupted run's metrics and model."""
    over = {"fl.rounds": 12, "output.checkpoint_every": 100}
    run_dir = tmp_path / "runs" / "part"
    proc = subprocess.Popen(CLI + ["--recipe", str(_recipe_file(tmp_path, "part", **over))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, first = stop_run(proc, signal.SIGTERM, run_dir, 2)
    resume = CLI[:-1] + ["--resume", str(run_dir), "--no-progress"]
    proc = subprocess.Popen(resume, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, second = stop_run(proc, signal.SIGINT, run_dir, first + 1)
    assert first < second < 12
    rest = subprocess.run(resume, capture_output=True, text=True)
    assert rest.returncode == 0 and f"resuming after round {second}" in rest.stderr, rest.stderr[-3000:]
    full_dir = _uninterrupted(tmp_path, "full", **over)
    assert _metrics(run_dir) == _metrics(full_dir)
    a, b = load_file(str(full_dir / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torn_line_after_the_checkpoint_is_dropped(tmp_path):
    from fedmef_toolkit.fl.simulator import Simulator
    from fedmef_toolkit.recipe import recipe_from_dict

    recipe = recipe_from_dict(small_recipe(tmp_path, **{"fl.rounds": 2, "output.checkpoint_every": 1}))
    sim = Simulator(recipe, tmp_path / "r", show_progress=False)
    sim.write_run_files()
    sim.run()
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "lr"')
    again = Simulator(recipe, tmp_path / "r", show_progress=False)
    again.resume()
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]


def test_a_new_run_never_writes_into_an_old_one(tmp_path):
    path = _recipe_file(tmp_path, "same", **{"fl.rounds": 1})
    assert subprocess.run(CLI + ["--recipe", str(path)], capture_output=True).returncode == 0
    before = (tmp_path / "runs" / "same" / "metrics.jsonl").read_text()
    again = subprocess.run(CLI + ["--recipe", str(path)], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert (tmp_path / "runs" / "same" / "metrics.jsonl").read_text() == before


def test_default_run_names_in_the_same_second_do_not_collide(tmp_path, monkeypatch):
    from fedmef_toolkit.cli.train import _new_run_dir
    from fedmef_toolkit.recipe import recipe_from_dict

    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")
    recipe = recipe_from_dict(small_recipe(tmp_path, **{"output.name": None}))
    dirs = [_new_run_dir(recipe) for _ in range(3)]
    assert [d.name for d in dirs] == ["t-20260101-000000", "t-20260101-000000-2", "t-20260101-000000-3"]
    assert all(d.is_dir() for d in dirs)


def test_a_failed_start_leaves_no_run_directory(tmp_path):
    init = tmp_path / "not-a-model.safetensors"
    init.write_bytes(b"garbage")
    path = _recipe_file(tmp_path, "bad", **{"model.init": str(init)})
    proc = subprocess.run(CLI + ["--recipe", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "bad").exists()  # so the fixed recipe can use the same name


def test_divergence_stops_the_run_with_one_line_and_keeps_the_checkpoint(tmp_path):
    path = _recipe_file(tmp_path, "nan", **{"fl.rounds": 6, "fl.lr": 50.0, "output.checkpoint_every": 1})
    proc = subprocess.run(CLI + ["--recipe", str(path)], capture_output=True, text=True)
    run_dir = tmp_path / "runs" / "nan"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "training diverged in round" in proc.stderr and "fl.agc" in proc.stderr
    diverged = int(proc.stderr.split("diverged in round")[1].split()[0])
    _, _, state = load_checkpoint(run_dir)
    assert state["round"] == diverged - 1  # the last good round, not the diverged one
    model, _, _ = load_checkpoint(run_dir)
    assert all(torch.isfinite(v.float()).all() for v in model.values())
    assert not (run_dir / "model.safetensors").exists()


# The fault hook (FEDMEF_FAULT, fedmef_toolkit/storage.py) kills the run with SIGKILL at the
# n-th write point matching a pattern. One chain of kills, each resumed with the next fault,
# walks through every kind of write: the run's own files, the round-0 and periodic checkpoints
# (half written, written but not renamed, renamed before its JSON copy), metrics lines (after
# a line, mid-line), the cut of an uncommitted tail on resume and the final model.
KILL_CHAIN = [
    "partial:partition.json,1",  # a new run, killed before its round-0 checkpoint
    "written:checkpoint.safetensors,1",  # the round-0 checkpoint written, not renamed
    "appended:metrics.jsonl,1",  # round 1 logged, its checkpoint not yet written
    "truncate:metrics.jsonl,1",  # resume, before it cuts round 1 off
    "partial:metrics.jsonl,2",  # round 2 torn mid-line
    "partial:checkpoint.safetensors,2",  # the round-2 checkpoint half written
    "replaced:checkpoint.safetensors,2",  # renamed, before its checkpoint.json copy
    "partial:checkpoint.json,1",  # the round-4 checkpoint's JSON copy half written
    "partial:metrics.jsonl,2",  # round 6 torn after round 5
    "partial:model.safetensors,1",  # the final model half written
]


def test_fault_hook_kills_at_every_kind_of_write_and_resume_matches(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    over = {"fl.rounds": 6, "output.checkpoint_every": 2}
    full = subprocess.run(CLI + ["--recipe", str(_recipe_file(tmp_path, "full", **over))], capture_output=True,
                          text=True, env=env)
    assert full.returncode == 0, full.stderr
    part_dir = tmp_path / "runs" / "part"
    cmd = CLI + ["--recipe", str(_recipe_file(tmp_path, "part", **over))]
    for fault in KILL_CHAIN:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "FEDMEF_FAULT": fault})
        assert proc.returncode == -signal.SIGKILL, f"{fault} did not fire: {proc.stderr[-500:]}"
        cmd = CLI + ["--resume", str(part_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert _metrics(part_dir) == _metrics(tmp_path / "runs" / "full")
    a, b = load_file(str(tmp_path / "runs" / "full" / "model.safetensors")), load_file(str(part_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_saved_before_newer_recipe_keys_resumes_as_it_trained(tmp_path):
    """A recipe.yaml written by an older version lacks keys added since (here
    model.nsconv.center_depthwise, model.nsconv.center_head and fl.batched_clients): resume fills
    them with the values that reproduce that run (centred depthwise filters, plain classifier
    input) and accepts its checkpoint's digest."""
    from fedmef_toolkit.fl.checkpoint import load_checkpoint
    from fedmef_toolkit.recipe import load_saved_recipe

    path = _recipe_file(tmp_path, "old", **{"fl.rounds": 1, "output.checkpoint_every": 1})
    assert subprocess.run(CLI + ["--recipe", str(path)], capture_output=True).returncode == 0
    run = tmp_path / "runs" / "old"
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    del saved["model"]["nsconv"]["center_depthwise"], saved["model"]["nsconv"]["center_head"]
    del saved["fl"]["batched_clients"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    recipe, legacy = load_saved_recipe(str(run / "recipe.yaml"))
    assert set(legacy) == {"model.nsconv.center_depthwise", "model.nsconv.center_head", "fl.batched_clients"}
    assert recipe.model.nsconv.center_depthwise is True and recipe.model.nsconv.center_head is False
    # the checkpoint as the older version wrote it: its digest over the keys it knew
    model_state, strat, state = load_checkpoint(run)
    state["recipe_digest"] = recipe.digest(without=legacy)
    state.pop("digest_except_rounds", None)
    save_checkpoint(run, model_state, strat, state)
    assert recipe.digest(without=legacy) != recipe.digest()
    again = subprocess.run(CLI + ["--resume", str(run), "--set", "fl.rounds=2"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    rounds = [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]


def test_a_run_killed_after_its_preparation_line_but_before_its_first_checkpoint_starts_over(tmp_path):
    """PruneFL/FedTiny log their preparation (round 0) before the round-0 checkpoint; a run
    killed between the two has no checkpoint to resume from, so resume starts it over."""
    from fedmef_toolkit.fl.simulator import Simulator
    from fedmef_toolkit.recipe import recipe_from_dict

    recipe = recipe_from_dict(small_recipe(tmp_path, **{"fl.rounds": 1, "method.name": "fedavg_sparse"}))
    run = tmp_path / "r"
    sim = Simulator(recipe, run, show_progress=False)
    sim.write_run_files()
    sim.unlock()
    (run / "metrics.jsonl").write_text('{"round": 0, "prepared": true}\n{"round": 1, "lr"')  # + a torn line
    again = Simulator(recipe, run, show_progress=False)
    again.resume()
    assert again.start_round == 0 and (run / "metrics.jsonl").read_text() == ""
    again.run()
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
