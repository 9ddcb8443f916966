"""How a run ends when it cannot go on: which worker errors no restart can fix, and the driver's final error.

Workers raise ``ValueError`` for bad input (a label outside the manifest, a shard deleted after the start, a
record the trainer cannot use) and ``Diverged`` for a non-finite loss under ``optim.on_divergence=stop``.
The driver restarts the worker group for anything else (a dead worker, a broken connection, a stall) and
ends the run at once, with ``TrainingError``, for these.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # bad input or config: the user fixes it
EXIT_FAILED = 1  # the run itself failed (diverged, restarts exhausted)


class Diverged(Exception):
    """The loss or the gradient norm became non-finite; raised on every rank at the same step."""


class TrainingError(Exception):
    """The run ended without reaching ``max_iters``; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def is_final(error: BaseException) -> bool:
    """Whether restarting the worker group would only repeat ``error``."""
    return isinstance(error, ValueError | Diverged)


def exit_code(error: BaseException) -> int:
    return EXIT_USER_ERROR if isinstance(error, ValueError) else EXIT_FAILED
