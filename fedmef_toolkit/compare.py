"""Runs side by side: the table and pictures of `fedmef compare`.

`load_run` reads one run directory (recipe.yaml, metrics.jsonl, memory.json
when present) into a `RunSummary`; `group_runs` puts runs of the same data
set and model together (accuracies of different tasks are never mixed);
`comparison_rows` makes the table; `write_markdown`, `write_csv`,
`write_accuracy_png` and `write_resources_png` write it out.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import rundir as rd
from .errors import UserError
from .plots import draw_accuracy, label_accuracy_axes, save_figure
from .plots import pyplot as _pyplot
from .rundir import RunDir

COLUMNS = ["group", "run", "method", "model", "density", "rounds", "best acc", "best round", "final acc",
           "bytes up", "bytes down", "client memory MiB", "wall time s"]


@dataclass
class RunSummary:
    path: Path
    name: str
    method: str
    dataset: str
    model: str  # arch and norm, e.g. "resnet18 bn"
    arch: str
    density: float
    rounds_done: int
    rounds_planned: int
    evals: list[tuple[int, float]]  # (round, accuracy)
    adjusted: list[tuple[int, float | None, float | None]]  # (round, acc before, acc after)
    bytes_up: int
    bytes_down: int
    wall_s: float
    memory_bytes: float | None  # the memory report's paper figure: weights + saved activations
    extra: dict = field(default_factory=dict)

    @property
    def group(self) -> str:
        return f"{self.dataset} / {self.arch}"

    @property
    def best(self) -> tuple[int, float] | None:
        return max(self.evals, key=lambda e: (e[1], -e[0])) if self.evals else None

    @property
    def final(self) -> float | None:
        return self.evals[-1][1] if self.evals else None

    def acc_at(self, t: int) -> float | None:
        return dict(self.evals).get(t)


def _read_metrics(path: Path) -> list[dict]:
    rows = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read metrics.jsonl ({exc.__class__.__name__})", str(path)) from None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                break  # a torn last line (the run was killed mid-write)
            raise UserError(f"line {i + 1} of metrics.jsonl is not JSON", str(path)) from None
        if not isinstance(row, dict) or not isinstance(row.get("round"), int):
            raise UserError(f"line {i + 1} of metrics.jsonl has no round", str(path))
        rows.append(row)
    return rows


def load_run(run_dir: Path) -> RunSummary:
    """One run directory; a UserError naming the path if it is not one."""
    from .recipe import load_saved_recipe

    run = RunDir.open(run_dir)
    run_dir = run.path
    if not run.metrics.is_file():
        raise UserError(f"no {rd.METRICS}: the run has not logged a round", str(run_dir))
    recipe = load_saved_recipe(str(run.recipe))[0]
    rows = _read_metrics(run.metrics)
    if not rows:
        raise UserError(f"{rd.METRICS} holds no rounds", str(run_dir))
    memory = None
    mem_path = run_dir / rd.MEMORY_JSON
    if mem_path.is_file():
        try:
            memory = float(json.loads(mem_path.read_text())["configurations"][0]["paper_figure"])
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            raise UserError("memory.json is not a memory report", str(mem_path)) from None
    evals = [(r["round"], float(r["eval_acc"])) for r in rows if "eval_acc" in r]
    adjusted = [(r["round"], r.get("acc_before_adjust"), r.get("acc_after_adjust")) for r in rows if r.get("adjusted")]
    last = rows[-1]
    m = recipe.model
    from .fl.strategies import method_info

    density = recipe.method.sparsity.density if method_info(recipe.method.name).sparse else 1.0
    return RunSummary(
        path=run_dir, name=run_dir.name, method=recipe.method.name, dataset=recipe.data.dataset,
        model=f"{m.arch}{'' if m.width == 1 else f' x{m.width:g}'} {m.norm}", arch=m.arch, density=density,
        rounds_done=max(r["round"] for r in rows), rounds_planned=recipe.fl.rounds, evals=evals, adjusted=adjusted,
        bytes_up=int(last.get("bytes_up_total", 0)), bytes_down=int(last.get("bytes_down_total", 0)),
        wall_s=float(sum(r.get("time_s", 0.0) for r in rows)), memory_bytes=memory)


def group_runs(runs: list[RunSummary]) -> dict[str, list[RunSummary]]:
    """Runs by (data set, model architecture), in the order first seen."""
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    return groups


def common_rounds(runs: list[RunSummary], most: int = 3) -> list[int]:
    """Up to `most` rounds evaluated in every run of a group, spread over the shortest run
    (its last evaluated round among them)."""
    shared = sorted(set.intersection(*(set(t for t, _ in r.evals if t > 0) for r in runs))) if runs else []
    if len(shared) <= most:
        return shared
    picks = {shared[round(i * (len(shared) - 1) / (most - 1))] for i in range(most)}
    return sorted(picks)


def _fmt_acc(a):
    return "-" if a is None else f"{a:.4f}"


def _fmt_bytes(n):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def comparison_rows(runs: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the table: per group, accuracy at the group's common rounds too."""
    groups = group_runs(runs)
    rounds_cols = sorted({t for g in groups.values() for t in common_rounds(g)})
    header = COLUMNS[:9] + [f"acc@{t}" for t in rounds_cols] + COLUMNS[9:]
    rows = []
    for gname, members in groups.items():
        shared = set(common_rounds(members))
        for r in members:
            best = r.best
            rows.append([gname, r.name, r.method, r.model, f"{r.density:g}", f"{r.rounds_done}/{r.rounds_planned}",
                         _fmt_acc(best[1] if best else None), str(best[0]) if best else "-", _fmt_acc(r.final)]
                        + [_fmt_acc(r.acc_at(t)) if t in shared else "" for t in rounds_cols]
                        + [_fmt_bytes(r.bytes_up), _fmt_bytes(r.bytes_down),
                           "-" if r.memory_bytes is None else f"{r.memory_bytes / 2**20:.2f}", f"{r.wall_s:.1f}"])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in row] for row in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines) + "\n"


def csv_table(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def render_table(header, rows, console) -> None:
    """One rich table per group (the group is its title): a run per row where that fits the
    terminal, else transposed (a quantity per row, a run per column), so no cell is cut."""
    from rich.table import Table

    groups: dict[str, list[list[str]]] = {}
    for row in rows:
        groups.setdefault(row[0], []).append(row[1:])
    cols = header[1:]
    for gname, members in groups.items():
        wide = sum(max(len(c), *(len(r[i]) for r in members)) + 3 for i, c in enumerate(cols)) + 1
        if wide <= console.width:
            table = Table(title=gname, title_justify="left")
            for col in cols:
                left = col in ("run", "method", "model")
                table.add_column(col, justify="left" if left else "right", no_wrap=col in ("run", "method"))
            for row in members:
                table.add_row(*row)
        else:
            table = Table(title=gname, title_justify="left")
            table.add_column("", justify="left", no_wrap=True)
            for row in members:
                table.add_column(row[0], justify="right")
            for i, col in enumerate(cols[1:], start=1):
                table.add_row(col, *(row[i] for row in members))
        console.print(table)
    console.print("client memory: the memory report's weights + saved activations of one step (memory.json); "
                  "bytes: totals over all rounds and clients", highlight=False)


def write_accuracy_png(runs: list[RunSummary], path: Path) -> bool:
    """Accuracy per round, one panel per group; each mask adjustment is a short vertical segment
    from the accuracy just before to just after it (a dot where only the round is known).
    False when matplotlib (the `plot` extra) is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    groups = group_runs(runs)
    fig, axes = plt.subplots(1, len(groups), figsize=(6.0 * len(groups), 4.0), squeeze=False)
    for ax, (gname, members) in zip(axes[0], groups.items()):
        for r in members:
            if r.evals:
                draw_accuracy(ax, r.evals, r.adjusted, f"{r.method} ({r.name})")
        ax.set_title(gname)
        label_accuracy_axes(ax, "accuracy", 7)
    save_figure(fig, path)
    return True


def write_resources_png(runs: list[RunSummary], path: Path) -> bool:
    """Client memory (left) and total communication up/down (right), one row per group."""
    plt = _pyplot()
    if plt is None:
        return False
    groups = group_runs(runs)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11.0, 3.6 * len(groups)), squeeze=False)
    for (ax_m, ax_c), (gname, members) in zip(axes, groups.items()):
        labels = [f"{r.method}\n{r.name}" for r in members]
        xs = list(range(len(members)))
        ax_m.bar(xs, [(r.memory_bytes or 0) / 2**20 for r in members], color="tab:purple")
        for x, r in zip(xs, members):
            if r.memory_bytes is None:
                ax_m.text(x, 0, "no memory.json", ha="center", va="bottom", fontsize=7, rotation=90)
        ax_m.set_ylabel("MiB (weights + saved activations)")
        ax_m.set_title(f"{gname}: client memory")
        ax_c.bar([x - 0.2 for x in xs], [r.bytes_up / 2**20 for r in members], width=0.4, label="up")
        ax_c.bar([x + 0.2 for x in xs], [r.bytes_down / 2**20 for r in members], width=0.4, label="down")
        ax_c.set_ylabel("MiB, all rounds and clients")
        ax_c.set_title(f"{gname}: communication")
        ax_c.legend(fontsize=8)
        for ax in (ax_m, ax_c):
            ax.set_xticks(xs)
            ax.set_xticklabels(labels, fontsize=7)
            ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    return True
