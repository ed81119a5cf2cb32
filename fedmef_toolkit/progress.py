"""Rich progress display for training rounds."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RoundProgress:
    """A live bar on a terminal (fits 80 columns: a fixed 12-cell bar and a short status);
    one plain line per round where there is no bar (`--no-progress`, logs, CI)."""

    def __init__(self, total: int, done: int, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.bar = enabled and self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(bar_width=12),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not self.bar,
        )
        self.task = self.progress.add_task("train", total=total, completed=done, status="")
        self.acc = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, row: dict) -> None:
        if "eval_acc" in row:
            self.acc = row["eval_acc"]
        acc = f"acc {self.acc:.3f} " if self.acc is not None else ""
        status = f"{acc}loss {row['train_loss']:.3f} {row['samples_per_s']:.0f}/s"
        adjust = (f"round {row['round']}: mask adjusted, accuracy {row['acc_before_adjust']:.3f} -> "
                  f"{row['acc_after_adjust']:.3f}") if row.get("adjusted") else None
        self.progress.update(self.task, advance=1, status=status)
        if not self.bar:  # --no-progress, logs and CI: one plain line per round
            self.console.print(f"round {row['round']}: {status.replace('/s', ' samples/s')}"
                               + (f" | adjust {row['acc_before_adjust']:.3f}->{row['acc_after_adjust']:.3f}"
                                  if adjust else ""), highlight=False)
        elif adjust:
            self.progress.console.print(adjust, highlight=False)
