"""Pictures of a run: accuracy curves with the mask adjustments marked."""

from __future__ import annotations

from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    """A run's metrics rows (a torn last line, from a kill mid-write, is skipped)."""
    from .rundir import RunDir

    return RunDir(run_dir).read_metrics()


def write_accuracy_curves(run_dirs: list[Path], out: Path) -> bool:
    """Validation accuracy per round for one or more runs; at each mask adjustment the
    accuracy just before and just after pruning is drawn as a short vertical segment.
    Returns False when matplotlib (the `plot` extra) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for run in run_dirs:
        rows = read_metrics(run)
        evals = [(r["round"], r["eval_acc"]) for r in rows if "eval_acc" in r]
        if not evals:
            continue
        line, = ax.plot(*zip(*evals), label=Path(run).name)
        for r in rows:
            if r.get("adjusted"):
                ax.plot([r["round"]] * 2, [r["acc_before_adjust"], r["acc_after_adjust"]], color=line.get_color(),
                        marker="_", linewidth=2)
    ax.set_xlabel("round")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
