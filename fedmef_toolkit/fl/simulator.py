"""The built-in federated simulator: rounds of sample -> train -> aggregate -> adjust.

`Simulator(recipe, run_dir)` builds data, model and strategy from the recipe;
`run()` executes the remaining rounds, writing metrics.jsonl, checkpoints and
the final model into the run directory. Resuming reloads the checkpoint and
continues; every random draw is derived from (seed, round, client), so a
resumed CPU run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import __version__
from ..data import DataBundle, load_data
from ..data.augment import DeviceAugment
from ..data.partition import class_histograms, partition
from ..errors import TrainingDiverged, UserError, brief
from ..architecture import describe
from ..assembly import build_model, load_init_weights, prepare_for_training  # noqa: F401 (load_init_weights: compat)
from ..recipe import Recipe, recipe_to_yaml
from .. import interrupts
from .. import rundir as rd
from ..sparse.masks import get_masks, mask_density
from ..sparse.schedules import round_lr
from ..storage import append_line, io_error, lock_run_dir, open_append, truncate_to, write_text_atomic
from .checkpoint import CKPT, load_checkpoint, load_checkpoint_round, save_checkpoint, save_model
from .client import ClientData, ClientTrainer
from .engine import build_engine, select_engine
from .evaluate import evaluate
from .strategies import ServerContext, build_strategy


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: '{name}' requested but CUDA is not available")
    return torch.device(name)


def digest_except_rounds(recipe: Recipe) -> str:
    """The recipe's digest with fl.rounds left out: a run may be extended (`--resume --set
    fl.rounds=N`) and still resume from checkpoints written before."""
    import dataclasses

    return dataclasses.replace(recipe, fl=dataclasses.replace(recipe.fl, rounds=1)).digest()


def _round_of(line: bytes) -> float:
    """The round of a metrics line; a torn line (a kill mid-write) counts as after any checkpoint."""
    try:
        return int(json.loads(line)["round"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def committed_length(metrics: Path, last_round: int) -> int:
    """Bytes of metrics.jsonl up to the line of `last_round`: the lines of later rounds and a
    torn last line are the tail after it (the file is only ever appended, in round order)."""
    size = 0
    with open(metrics, "rb") as f:
        for line in f:
            if not line.endswith(b"\n") or _round_of(line) > last_round:
                break
            size += len(line)
    return size


def _rounds_logged(metrics: Path) -> bool:
    """Whether metrics.jsonl holds a complete line of a round after 0 (training has run)."""
    if not metrics.exists():
        return False
    with open(metrics, "rb") as f:
        return any(line.endswith(b"\n") and _round_of(line) > 0 for line in f)


class Simulator:
    def __init__(self, recipe: Recipe, run_dir: Path, console=None, show_progress: bool = True):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.console = console
        self.show_progress = show_progress
        # what the run is doing: "idle", "clients" (training; the global model untouched) or
        # "server" (folding results into the model); signals wait for "server" to end
        self.phase = "idle"
        self.device = resolve_device(recipe.device)
        torch.manual_seed(recipe.seed)
        self.data: DataBundle = load_data(recipe.data, recipe.eval.split, recipe.seed)
        self._partition()
        self.model = self.build_model().to(self.device)
        mean, std = self.data.channel_stats()
        self.augment = DeviceAugment(mean, std, enabled=recipe.data.augment).to(self.device)
        self.train_x = self.data.train_x.to(self.device)
        self.train_y = self.data.train_y.to(self.device)
        self.eval_x = self.data.eval_x.to(self.device)
        self.eval_y = self.data.eval_y.to(self.device)
        # masks, SAP and the NSConv gain calibration: fedmef_toolkit.assembly, like every model
        self.strategy, self.calibration = prepare_for_training(
            self.model, recipe, build_strategy(recipe), self.calibration_images())
        fl = recipe.fl
        self.trainer = ClientTrainer(self.train_x, self.train_y, self.augment, epochs=fl.local_epochs,
                                     batch_size=fl.batch_size, momentum=fl.momentum,
                                     weight_decay=fl.weight_decay, precision=recipe.precision,
                                     cuda_graphs=recipe.cuda_graphs, agc=fl.agc,
                                     channels_last=recipe.channels_last)
        example = self.augment.normalize(self.train_x[:2])
        self.engine_name, self.engine_reason = select_engine(fl.engine, self.model, example)
        self.engine = build_engine(self.engine_name, self.trainer, recipe.seed, fl.batched_clients, recipe,
                                   self.arch_desc)
        self.start_round = 0
        self.resumed = False
        self.totals = {"bytes_up": 0, "bytes_down": 0, "samples": 0, "time_s": 0.0}
        self._lock = None  # the run directory's advisory lock, from the first write on

    # -- construction -------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The recipe's model, or the one `model.init`'s file describes
        (`fedmef_toolkit.assembly.build_model`)."""
        self.built = build_model(self.recipe.model, self.data.num_classes, self.data.image_size)
        self.arch_desc = self.built.description
        return self.built.model

    def calibration_images(self) -> torch.Tensor | None:
        """BN-free models start from gains fitted to real data (models/signal.py): client 0
        runs one forward pass over up to 256 of its images and sends back the gains. The
        masks are already attached (they change what each filter passes); weights loaded
        from `model.init` are kept as they are."""
        spec = self.recipe.model
        if spec.norm != "nsconv" or not spec.nsconv.calibrate or spec.init:
            return None
        idx = self.client_indices[0][:256].to(self.device)
        return self.augment.normalize(self.train_x[idx])

    def _partition(self) -> None:
        d = self.recipe.data
        labels = self.data.train_y.numpy()
        self.parts = partition(labels, d.partition, d.num_clients, d.alpha, d.min_samples, self.recipe.seed)
        self.histograms = class_histograms(labels, self.parts, self.data.num_classes)
        self.client_indices = [torch.from_numpy(p).to(torch.int64) for p in self.parts]

    # -- run directory ------------------------------------------------------
    def write_run_files(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise io_error(exc, self.run_dir, "cannot create the run directory") from None
        self.lock()
        try:
            write_text_atomic(self.run_dir / rd.RECIPE, self.recipe_text())
            write_text_atomic(self.run_dir / rd.PARTITION, json.dumps({
                "num_clients": len(self.parts), "classes": self.data.classes,
                "sizes": [len(p) for p in self.parts], "class_histograms": self.histograms}))
        except BaseException:
            self.unlock()
            raise

    def lock(self) -> None:
        """Take the run directory's lock (kept until `unlock`): one process writes a run."""
        if self._lock is None:
            self._lock = lock_run_dir(self.run_dir, rd.LOCK)

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def recipe_text(self) -> str:
        """The resolved recipe; when model.init's file decided the architecture, a comment on
        top says which model trained (model.arch/norm/width/nsconv are then not used)."""
        text = recipe_to_yaml(self.recipe)
        if not self.built.from_recipe_arch:
            text = (f"# model trained: {describe(self.arch_desc)}, from model.init ({self.built.init});\n"
                    "# model.arch, model.norm, model.width and model.nsconv are not used for it\n" + text)
        return text

    def resume(self, previous_digest: str | None = None) -> None:
        """Continue from the run's checkpoint. `previous_digest`: the digest of the recipe the
        run was started with, when only fl.rounds changed (`--resume --set fl.rounds=N`).
        The run directory stays locked for `run`; a failed resume releases it."""
        self.lock()
        try:
            self._resume(previous_digest)
        except BaseException:
            self.unlock()
            raise

    def _resume(self, previous_digest: str | None) -> None:
        metrics = self.run_dir / rd.METRICS
        if not (self.run_dir / CKPT).exists() and not _rounds_logged(metrics):
            # killed before its round-0 checkpoint: nothing to lose (at most the line of the
            # method's preparation, which runs again), start over
            if metrics.exists() and metrics.stat().st_size:
                truncate_to(metrics, 0)
            self.write_run_files()
            return
        model_state, strat, state = load_checkpoint(self.run_dir)
        accepted = {self.recipe.digest(), previous_digest, *([state.get("recipe_digest")] if state.get(
            "digest_except_rounds") == digest_except_rounds(self.recipe) else [])} - {None}
        if state.get("recipe_digest") not in accepted:
            raise UserError("checkpoint was written by a different recipe; refusing to mix them", str(self.run_dir))
        own = self.model.state_dict()  # masks are buffers: loaded too
        bad = sorted(set(own) ^ set(model_state)) or [k for k in own if model_state[k].shape != own[k].shape]
        if bad:
            raise UserError(f"cannot resume: the checkpoint's tensors do not fit the recipe's model ({bad[0]})",
                            str(self.run_dir))
        try:
            self.model.load_state_dict(model_state)
            self.strategy.load_state_tensors(strat)
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise UserError(f"cannot resume: checkpoint does not fit the recipe ({brief(exc)})",
                            str(self.run_dir)) from None
        self.start_round = int(state["round"])
        self.resumed = True
        self.totals = state["totals"]
        if metrics.exists():  # cut rounds logged after the checkpoint (and a torn line) off the end
            try:
                keep = committed_length(metrics, self.start_round)
            except OSError as exc:
                raise io_error(exc, metrics, "cannot read") from None
            if keep < metrics.stat().st_size:
                truncate_to(metrics, keep)

    def checkpoint(self, t: int) -> None:
        save_checkpoint(self.run_dir, self.model.state_dict(), self.strategy.state_tensors(),
                        {"round": t, "recipe_digest": self.recipe.digest(), "totals": self.totals,
                         "digest_except_rounds": digest_except_rounds(self.recipe),
                         "version": __version__}, arch=self.arch_desc)

    def save_final_model(self, t: int, acc: float | None) -> None:
        meta = {rd.FORMAT_KEY: rd.DENSE_FORMAT, rd.ROUND_KEY: t, rd.ARCH_KEY: json.dumps(self.arch_desc),
                rd.RECIPE_DIGEST_KEY: self.recipe.digest(),
                rd.VAL_ACCURACY_KEY: "" if acc is None else f"{acc:.6f}", rd.VERSION_KEY: __version__}
        save_model(self.run_dir / rd.MODEL, self.model.state_dict(), meta)

    # -- before round 1 -----------------------------------------------------
    def server_context(self) -> ServerContext:
        def run_clients(tag, model, cids, make_plan):
            clients = [ClientData(c, self.client_indices[c].to(self.device)) for c in cids]
            return self.engine.run_round(tag, model, clients, make_plan)

        def client_batches(cid, max_batches):
            idx = self.client_indices[cid].to(self.device)
            bs = self.recipe.fl.batch_size
            for s in range(0, min(len(idx), max_batches * bs), bs):
                part = idx[s:s + bs]
                yield self.augment.normalize(self.train_x[part]), self.train_y[part]

        return ServerContext(len(self.parts), self.recipe.seed, self.recipe.fl.lr, run_clients, client_batches,
                             [len(p) for p in self.parts], self.evaluate)

    def prepare(self) -> dict | None:
        """The strategy's one-off work with clients before round 1 (round 0 of metrics.jsonl)."""
        t0 = time.perf_counter()
        row = self.strategy.prepare(self.model, self.server_context())
        if not row:
            return None
        up, down = int(row.pop("bytes_up", 0)), int(row.pop("bytes_down", 0))
        self.totals["bytes_up"] += up
        self.totals["bytes_down"] += down
        elapsed = time.perf_counter() - t0
        self.totals["time_s"] += elapsed
        acc, loss = self.evaluate(self.model)
        masks = get_masks(self.model)
        return {"round": 0, **row, "density": mask_density(masks) if masks else 1.0, "bytes_up": up,
                "bytes_down": down, "bytes_up_total": self.totals["bytes_up"],
                "bytes_down_total": self.totals["bytes_down"], "time_s": round(elapsed, 4), "eval_acc": acc,
                "eval_loss": loss, "eval_split": self.data.eval_name}

    # -- one round ----------------------------------------------------------
    def sample_clients(self, t: int) -> list[int]:
        rng = np.random.default_rng([self.recipe.seed, t])
        return sorted(rng.choice(len(self.parts), self.recipe.fl.clients_per_round, replace=False).tolist())

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        return evaluate(model, self.eval_x, self.eval_y, self.augment.normalize, self.recipe.eval.batch_size,
                        self.recipe.precision)

    def run_round(self, t: int) -> dict:
        fl = self.recipe.fl
        t0 = time.perf_counter()
        lr = round_lr(t, fl.rounds, fl.lr, fl.lr_schedule, fl.lr_decay)
        cids = self.sample_clients(t)
        clients = [ClientData(c, self.client_indices[c].to(self.device)) for c in cids]
        row: dict = {"round": t, "lr": lr, "clients": cids, "engine": self.engine_name}
        row.update(self.strategy.begin_round(t, self.model))
        down = self.strategy.download_bytes(self.model, t) * len(clients)
        self.phase = "clients"  # the global model is untouched until aggregation
        results = self.engine.run_round(t, self.model, clients, lambda: self.strategy.client_plan(t, lr, self.model))
        self.phase = "server"
        row.update(getattr(self.engine, "round_log", dict)())  # e.g. Flower: failed clients, bytes on the wire
        up = sum(self.strategy.upload_bytes(r) for r in results)
        self.strategy.aggregate(self.model, results, t)
        row.update(self.strategy.end_round(t, self.model, results, self.evaluate))
        samples = sum(r.num_samples for r in results) * fl.local_epochs
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        weights = [r.num_samples for r in results]
        row["train_loss"] = float(np.average([r.loss for r in results], weights=weights))
        for key in sorted({k for r in results for k in r.logs}):
            vals = [r.logs[key] for r in results if key in r.logs]
            row[f"client_{key}"] = float(np.mean(vals))
        masks = get_masks(self.model)
        row["density"] = mask_density(masks) if masks else 1.0
        self.totals["bytes_up"] += up
        self.totals["bytes_down"] += down
        self.totals["samples"] += samples
        self.totals["time_s"] += elapsed
        row.update({"bytes_up": up, "bytes_down": down, "bytes_up_total": self.totals["bytes_up"],
                    "bytes_down_total": self.totals["bytes_down"], "samples": samples,
                    "time_s": round(elapsed, 4), "samples_per_s": round(samples / max(elapsed, 1e-9), 1)})
        if t % self.recipe.eval.every == 0 or t == fl.rounds:
            acc, loss = self.evaluate(self.model)
            row.update({"eval_acc": acc, "eval_loss": loss, "eval_split": self.data.eval_name})
        if self.device.type == "cuda":
            row["cuda_max_mem_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        else:  # peak resident memory of the whole process (Linux reports KiB)
            row["cpu_max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return row

    def check_finite(self, t: int, row: dict) -> None:
        """Stop at the first round whose loss or aggregated model is NaN/inf (one host sync):
        nothing of it is checkpointed, so `--resume` after changing nothing would diverge
        again, and the last checkpoint stays the last good state."""
        state = [v.detach() for v in self.model.state_dict().values() if v.is_floating_point()]
        norms = torch.stack(torch._foreach_norm(state)) if state else torch.zeros(1)  # weights and BN statistics
        if math.isfinite(row["train_loss"]) and bool(torch.isfinite(norms).all()):
            return
        last = load_checkpoint_round(self.run_dir)
        raise TrainingDiverged(
            f"training diverged in round {t} (NaN/inf in the {'loss' if not math.isfinite(row['train_loss']) else 'model'}); "
            f"the last checkpoint (round {last}) is intact; lower fl.lr or set fl.agc (e.g. 0.16) and start again",
            str(self.run_dir))

    # -- the loop -----------------------------------------------------------
    def run(self) -> list[dict]:
        """Run the remaining rounds; the run directory stays locked until they end."""
        self.lock()
        try:
            return self._run()
        finally:
            self.unlock()

    def _run(self) -> list[dict]:
        from ..progress import RoundProgress

        fl, out = self.recipe.fl, self.recipe.output
        rows: list[dict] = []
        last_acc = None
        prep = self.prepare() if self.start_round == 0 and not self.resumed else None
        if prep is not None:  # logged before the round-0 checkpoint (resume cuts what follows it)
            with open_append(self.run_dir / rd.METRICS) as log:
                append_line(log, self.run_dir / rd.METRICS, json.dumps(prep))
        if self.start_round == 0:  # a run killed before its first periodic checkpoint still resumes
            self.checkpoint(0)
        done = self.start_round  # the last round whose result is in the model and in metrics.jsonl
        self.phase = "idle"
        with RoundProgress(fl.rounds, self.start_round, self.console, enabled=self.show_progress) as progress, \
                open_append(self.run_dir / rd.METRICS) as log:
            try:
                for t in range(self.start_round + 1, fl.rounds + 1):
                    interrupts.check()  # a stop requested by a signal (interrupts.py): before the round
                    row = self.run_round(t)  # phase "clients", then "server" once the model changes
                    append_line(log, self.run_dir / rd.METRICS, json.dumps(row))
                    self.check_finite(t, row)
                    done = t
                    self.phase = "idle"
                    rows.append(row)
                    last_acc = row.get("eval_acc", last_acc)
                    progress.update(row)
                    if t == self.start_round + 1 and self.console is not None:
                        self.console.print(f"{self.engine.status()} ({self.engine_reason})", highlight=False)
                    if t % out.checkpoint_every == 0 or t == fl.rounds:
                        self.checkpoint(t)
            except KeyboardInterrupt:
                # While clients train, the global model is that of round `done`; when idle it is
                # too (also mid-checkpoint: the write is atomic and is simply redone). During
                # server work it is neither, so the last periodic checkpoint stands (SIGINT/SIGTERM
                # wait for the server work to end: fedmef_toolkit.interrupts, training.run_rounds).
                if self.phase in ("clients", "idle") and done > self.start_round:
                    self.checkpoint(done)
                raise
        self.save_final_model(fl.rounds, last_acc)
        return rows
