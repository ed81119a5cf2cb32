"""Rich progress display for training rounds."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RoundProgress:
    def __init__(self, total: int, done: int, console: Console | None = None, enabled: bool = True):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not enabled,
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
        status = f"{acc}loss {row['train_loss']:.3f} {row['samples_per_s']:.0f} samples/s"
        if row.get("adjusted"):
            status += f" | adjust {row['acc_before_adjust']:.3f}->{row['acc_after_adjust']:.3f}"
        self.progress.update(self.task, advance=1, status=status)
        if self.enabled and not self.console.is_terminal:  # logs and CI: one plain line per round
            self.console.print(f"round {row['round']}: {status}", highlight=False)
