import json
import subprocess
import sys

import torch
from conftest import small_recipe

from fedmef_toolkit.fl.aggregate import masked_average, weighted_average
from fedmef_toolkit.fl.simulator import Simulator
from fedmef_toolkit.recipe import recipe_from_dict

TIME_KEYS = {"time_s", "samples_per_s", "cpu_max_rss_mib"}  # measurements, not results


def strip_times(rows):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


def read_metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_weighted_average_math():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    out = weighted_average([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert int(out["n"]) == 5  # integer buffers (num_batches_tracked) take the max


def test_weighted_average_ignores_masks():
    a = {"conv.weight": torch.ones(2), "conv.weight_mask": torch.tensor([True, False])}
    assert "conv.weight_mask" not in weighted_average([a, a], [1, 1])


def test_masked_average_counts_only_holders():
    vals = [torch.tensor([1.0, 5.0, 0.0]), torch.tensor([3.0, 0.0, 0.0])]
    masks = [torch.tensor([True, True, False]), torch.tensor([True, False, False])]
    out = masked_average(vals, masks, [1.0, 3.0])
    assert torch.allclose(out, torch.tensor([2.5, 5.0, 0.0]))


def run(tmp_path, recipe_dict, resume=False):
    recipe = recipe_from_dict(recipe_dict)
    run_dir = tmp_path / "runs" / "run"
    sim = Simulator(recipe, run_dir, show_progress=False)
    if resume:
        sim.resume()
    else:
        sim.write_run_files()
    return sim, sim.run()


def test_end_to_end_learns_above_chance(tmp_path):
    sim, rows = run(tmp_path, small_recipe(tmp_path, **{"fl.rounds": 8, "model.width": 0.5}))
    assert rows[-1]["eval_acc"] > 0.6  # 4 classes: chance is 0.25
    assert rows[-1]["eval_acc"] > rows[0]["eval_acc"]
    d = sim.run_dir
    for f in ["recipe.yaml", "partition.json", "metrics.jsonl", "checkpoint.safetensors", "model.safetensors"]:
        assert (d / f).exists(), f
    part = json.loads((d / "partition.json").read_text())
    assert sum(part["sizes"]) == len(sim.data.train_y) and len(part["class_histograms"]) == 8
    row = rows[0]
    assert row["bytes_down"] == row["bytes_up"] > 0 and row["density"] == 1.0 and len(row["clients"]) == 3


def test_resume_after_ctrl_c_reproduces_uninterrupted_run(tmp_path):
    import pytest

    _, full = run(tmp_path / "full", small_recipe(tmp_path / "full", **{"fl.rounds": 4, "output.checkpoint_every": 3}))
    part = tmp_path / "part"
    recipe = small_recipe(part, **{"fl.rounds": 4, "output.checkpoint_every": 3})
    sim = Simulator(recipe_from_dict(recipe), part / "runs" / "run", show_progress=False)
    sim.write_run_files()
    real = sim.engine.run_round

    def interrupt_in_round_3(t, *args):
        if t == 3:
            raise KeyboardInterrupt
        return real(t, *args)

    sim.engine.run_round = interrupt_in_round_3
    with pytest.raises(KeyboardInterrupt):
        sim.run()
    state = json.loads((sim.run_dir / "checkpoint.json").read_text())
    assert state["round"] == 2  # Ctrl-C saved the last completed round, not the periodic one
    _, resumed = run(part, recipe, resume=True)
    assert [r["round"] for r in resumed] == [3, 4]
    assert strip_times(read_metrics(sim.run_dir)) == strip_times(full)


def test_a_signal_while_the_server_aggregates_finishes_that_round(tmp_path):
    """SIGTERM (or Ctrl-C) while clients train abandons the round; while the server aggregates, the
    round is finished, logged and checkpointed, and the run stops before the next one."""
    import os
    import signal

    import pytest

    from fedmef_toolkit import interrupts
    from fedmef_toolkit.training import run_rounds

    recipe = small_recipe(tmp_path, **{"fl.rounds": 4, "output.checkpoint_every": 3})
    for sig, when, stopped in [(signal.SIGTERM, "aggregate", 2), (signal.SIGINT, "clients", 1)]:
        sim = Simulator(recipe_from_dict(recipe), tmp_path / f"{sig}" / "run", show_progress=False)
        sim.write_run_files()
        target = (sim.strategy, "aggregate") if when == "aggregate" else (sim.engine, "run_round")
        real = getattr(*target)

        def signal_in_round_2(*args, real=real, sig=sig):
            if args[-1 if when == "aggregate" else 0] == 2:
                os.kill(os.getpid(), sig)
            return real(*args)

        setattr(*target, signal_in_round_2)
        with pytest.raises(interrupts.Interrupted) as info:
            run_rounds(sim)
        assert info.value.signum == sig and info.value.exit_code == 128 + sig
        assert [r["round"] for r in read_metrics(sim.run_dir)] == list(range(1, stopped + 1))
        assert json.loads((sim.run_dir / "checkpoint.json").read_text())["round"] == stopped
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not interrupts.requested()


def test_cli_train_and_resume(tmp_path):
    import yaml

    rpath = tmp_path / "r.yaml"
    rpath.write_text(yaml.safe_dump(small_recipe(tmp_path, **{"fl.rounds": 2})))
    cmd = [sys.executable, "-m", "fedmef_toolkit.cli.main", "train", "--recipe", str(rpath), "--no-progress"]
    proc = subprocess.run(cmd + ["--set", "fl.rounds=2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "final val accuracy" in proc.stdout
    assert (tmp_path / "runs" / "run" / "accuracy.png").stat().st_size > 1000
    run_dir = tmp_path / "runs" / "run"
    proc = subprocess.run([sys.executable, "-m", "fedmef_toolkit.cli.main", "train", "--resume", str(run_dir),
                           "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0 and "nothing left" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "fedmef_toolkit.cli.main", "train", "--resume", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr


def test_evaluation_does_not_depend_on_how_the_split_is_chunked():
    """The CPU caps images per forward pass (memory); accuracy and loss must not change."""
    from fedmef_toolkit.fl import evaluate as ev
    from fedmef_toolkit.models import get_model

    torch.manual_seed(0)
    model = get_model("cnn4", 10, width=0.25)
    x = torch.randint(0, 256, (300, 3, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 10, (300,))
    norm = lambda v: v.float() / 255.0  # noqa: E731
    whole = ev.evaluate(model, x, y, norm, batch_size=512)
    assert ev.CPU_MAX_EVAL_BATCH < 300  # the cap really splits this split
    for bs in (7, 64):
        acc, loss = ev.evaluate(model, x, y, norm, batch_size=bs)
        assert acc == whole[0] and abs(loss - whole[1]) < 1e-5


def _trainer(n_total: int, batch: int, epochs: int, augment: bool):
    from fedmef_toolkit.data.augment import DeviceAugment
    from fedmef_toolkit.fl.client import ClientTrainer

    x = torch.randint(0, 256, (n_total, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n_total)  # labels name the sample: batches show which samples they hold
    aug = DeviceAugment(torch.full((3,), 0.5), torch.full((3,), 0.25), enabled=augment)
    return ClientTrainer(x, y, aug, epochs=epochs, batch_size=batch, momentum=0.0, weight_decay=0.0)


def test_client_batches_cover_each_epoch_once_in_the_generators_order():
    from fedmef_toolkit.fl.client import CHUNK_STEPS, ClientData, client_generator

    cases = [(23, 8, [8, 8, 7]), (17, 8, [8, 8]), (16, 8, [8, 8]),  # a trailing batch of one is dropped
             (70, 4, [4] * 17 + [2])]  # more steps than one chunk of batches
    assert len(cases[-1][2]) > CHUNK_STEPS
    for n, b, sizes in cases:
        tr = _trainer(100, b, 3, augment=False)
        client = ClientData(4, torch.arange(100)[torch.randperm(100, generator=torch.Generator().manual_seed(n))[:n]])
        runs = [list(tr.batches(client, client_generator(0, 2, 4, torch.device("cpu")), 3)) for _ in range(2)]
        epochs = [runs[0][i * len(sizes):(i + 1) * len(sizes)] for i in range(3)]
        assert [x.shape[0] for x, _ in runs[0]] == sizes * 3 and len(runs[0]) == tr.total_steps(n)
        for epoch in epochs:
            seen = torch.cat([y for _, y in epoch])
            assert len(set(seen.tolist())) == len(seen) and set(seen.tolist()) <= set(client.indices.tolist())
            assert len(seen) == (n if n % b != 1 else n - 1)
            for x, y in epoch:  # images are those samples' images
                torch.testing.assert_close(x, tr.augment.normalize(tr.train_x[y]))
        assert not torch.equal(torch.cat([y for _, y in epochs[0]]), torch.cat([y for _, y in epochs[1]]))
        for (x0, y0), (x1, y1) in zip(*runs):  # same generator, same batches
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
        for steps in (1, len(sizes) + 5):  # the first batches of each epoch; at most an epoch's
            part = list(tr.batches(client, client_generator(0, 2, 4, torch.device("cpu")), 2, steps=steps))
            assert [x.shape[0] for x, _ in part] == sizes[:steps] * 2


def test_augmented_batches_are_random_crops_and_flips_of_their_samples():
    from fedmef_toolkit.fl.client import ClientData, client_generator

    tr = _trainer(200, 8, 1, augment=True)
    client = ClientData(0, torch.arange(200))
    gen = lambda: client_generator(0, 1, 0, torch.device("cpu"))
    offsets, flips = set(), 0
    runs = [list(tr.batches(client, gen(), 1)) for _ in range(2)]
    for (x, y), (x2, y2) in zip(*runs):
        assert torch.equal(x, x2) and torch.equal(y, y2)  # the generator decides everything
        padded = torch.nn.functional.pad(tr.augment.normalize(tr.train_x[y]), (4, 4, 4, 4))
        for img, src in zip(x, padded):  # each image: one 8x8 window of its padded source, maybe flipped
            windows = src.unfold(1, 8, 1).unfold(2, 8, 1).permute(1, 2, 0, 3, 4)  # (9, 9, 3, 8, 8)
            for flipped, cand in enumerate((img, img.flip(2))):
                err = (windows - cand).abs().amax(dim=(2, 3, 4))
                if err.min() < 1e-6:
                    offsets.add(divmod(int(err.argmin()), 9))
                    flips += flipped
                    break
            else:
                raise AssertionError("an augmented image is no crop of its sample")
    assert len(offsets) > 20 and (4, 4) in offsets  # random offsets (uncropped among them)
    assert 0.3 < flips / 200 < 0.7  # about half flipped


def test_growth_gradient_pass_reads_one_batch_or_the_whole_epoch(tmp_path):
    """effective_weight_grads(full=False) uses the client's first batch, scaled to the client;
    full=True every batch of one epoch: each equals the gradient computed from those batches
    (compared where the weights are active: there the effective weight's gradient is the
    weight's)."""
    from fedmef_toolkit.fl.client import ClientData, client_generator
    from fedmef_toolkit.sparse.masks import prunable_modules

    sim = Simulator(recipe_from_dict(small_recipe(tmp_path, **{"method.name": "fedavg_sparse"})),
                    tmp_path / "runs" / "g", show_progress=False)
    tr, model = sim.trainer, sim.model
    cid = max(range(len(sim.client_indices)), key=lambda c: len(sim.client_indices[c]))
    client = ClientData(cid, sim.client_indices[cid])
    assert tr.steps_per_epoch(client.num_samples) > 1
    for full in (False, True):
        got = tr.effective_weight_grads(model, client, client_generator(0, 3, cid, torch.device("cpu")), full)
        model.zero_grad(set_to_none=True)
        used = list(tr.batches(client, client_generator(0, 3, cid, torch.device("cpu")), 1, steps=None if full else 1))
        assert len(used) == (tr.steps_per_epoch(client.num_samples) if full else 1)
        count = sum(x.shape[0] for x, _ in used)
        for x, y in used:
            torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        for name, m in prunable_modules(model).items():  # active entries: the weight's own gradient
            active = m.weight_mask.bool()
            torch.testing.assert_close(got[name][active], m.weight.grad[active] / count, rtol=1e-4, atol=1e-7)
        model.zero_grad(set_to_none=True)
