"""User-facing errors: one line, naming the file and the problem.

The CLI catches `UserError` and prints its message with its exit code (2; 1 for
I/O failures and diverged runs); anything else is a bug and keeps its traceback.
"""


MAX_MESSAGE = 500  # characters of a message (values quoted from hostile files are cut short)
MAX_SOURCE = 300


def one_line(text: str, limit: int) -> str:
    """`text` on one line (line breaks shown as \\n), cut to `limit` characters."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UserError(Exception):
    """A problem with the user's input (recipe, data set, model file). Its message is always
    one line of bounded length, whatever a file or recipe put into it."""

    exit_code = 2

    def __init__(self, message: str, source: str | None = None):
        self.source = source
        message = one_line(str(message), MAX_MESSAGE)
        super().__init__(f"{one_line(str(source), MAX_SOURCE)}: {message}" if source else message)


class TrainingDiverged(UserError):
    """The loss or the aggregated model became NaN/inf: the run stops, its checkpoints intact."""

    exit_code = 1


def brief(exc: BaseException, limit: int = 200) -> str:
    """First line of an exception's message (or its type name), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
