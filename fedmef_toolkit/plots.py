"""Pictures of a run: accuracy curves with the mask adjustments marked."""

from __future__ import annotations

from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics rows (a torn last line, from a kill mid-write, is skipped)."""
    from .rundir import RunDir

    return RunDir(run_dir).read_metrics()


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None without the `plot` extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def draw_accuracy(ax, evals: list[tuple[int, float]], adjustments, label: str) -> None:
    """One run's accuracy per round; at each mask adjustment `(round, before, after)` a short
    vertical segment from the accuracy just before pruning to just after (a dot on the curve
    where only the round is known)."""
    line, = ax.plot(*zip(*evals), label=label)
    acc = dict(evals)
    for t, before, after in adjustments:
        if before is not None and after is not None:
            ax.plot([t, t], [before, after], color=line.get_color(), marker="_", linewidth=2)
        elif t in acc:
            ax.plot([t], [acc[t]], color=line.get_color(), marker="v", markersize=4)


def label_accuracy_axes(ax, ylabel: str, legend_size: int) -> None:
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def write_accuracy_curves(run_dirs: list[Path], out: Path) -> bool:
    """Validation accuracy per round for one or more runs, mask adjustments marked
    (`draw_accuracy`). Returns False when matplotlib (the `plot` extra) is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for run in run_dirs:
        rows = read_metrics(run)
        evals = [(r["round"], r["eval_acc"]) for r in rows if "eval_acc" in r]
        if evals:
            draw_accuracy(ax, evals, [(r["round"], r["acc_before_adjust"], r["acc_after_adjust"])
                                      for r in rows if r.get("adjusted")], Path(run).name)
    label_accuracy_axes(ax, "validation accuracy", 8)
    save_figure(fig, out)
    return True


def save_figure(fig, path) -> None:
    """Write a figure as a PNG atomically (a kill leaves the old picture or the new) and close it."""
    import io

    import matplotlib.pyplot as plt

    from .storage import replace_bytes

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    replace_bytes(Path(path), buf.getvalue())
