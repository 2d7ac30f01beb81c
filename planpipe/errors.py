"""The root of planpipe's own exceptions.

Every error planpipe raises on purpose derives from `PlanpipeError`, so a caller can tell
"planpipe refused" from a bug or a library failure with one except-clause. Each keeps the
built-in base it had before (`RuntimeError`, `ValueError`, ...), so existing handlers still match.
"""


class PlanpipeError(Exception):
    """Base of every exception planpipe raises on purpose."""


class OperatorError(PlanpipeError):
    """Something an operator must fix (a port taken, a spool held by another process).

    The message is one line that says what went wrong and what to do; `details`
    (log tails, tool output) is printed after it for whoever wants to dig. The
    `planpipe` command prints these without a traceback.
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details
