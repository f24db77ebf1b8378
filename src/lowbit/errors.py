"""The one exception type users see: a single line that names the problem and the fix.

Everything the pipeline can diagnose about *input* (paths, configs, checkpoints, numbers) raises
`LowbitError`; the CLI prints its message on one line and exits non-zero without a traceback.
Anything else is a bug in lowbit and keeps its traceback.
"""


class LowbitError(Exception):
    """A user-facing error: `str(err)` is one line saying what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        message = problem if fix is None else f"{problem}; {fix}"
        super().__init__(message.replace("\n", " "))
