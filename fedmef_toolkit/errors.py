"""User-facing errors: one line, naming the file and the problem.

The CLI catches `UserError` and prints its message with exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (recipe, data set, model file)."""

    exit_code = 2

    def __init__(self, message: str, source: str | None = None):
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class TrainingDiverged(UserError):
    """The loss or the aggregated model became NaN/inf: the run stops, its checkpoints intact."""

    exit_code = 1


def brief(exc: BaseException, limit: int = 200) -> str:
    """First line of an exception's message (or its type name), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
