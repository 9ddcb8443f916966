"""How a run ends when it cannot go on: which worker errors no restart can fix, and the driver's final error.

Workers raise ``ValueError`` for bad input (a label outside the manifest, a shard deleted after the start, a
record the trainer cannot use) and ``RunStopped`` when the run must end (a non-finite loss under
``optim.on_divergence=stop``, a checkpoint that could not be written under ``on_upload_failure=stop``,
another driver taking the run over).
The driver restarts the worker group for anything else (a dead worker, a broken connection, a stall) and
ends the run at once, with ``TrainingError``, for these.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # bad input or config: the user fixes it
EXIT_FAILED = 1  # the run itself failed (diverged, restarts exhausted)


class RunStopped(Exception):
    """The run must end now, not be restarted: raised on a worker for a reason that is not bad input."""


class Diverged(RunStopped):
    """The loss or the gradient norm became non-finite; raised on every rank at the same step."""


class CheckpointUploadFailed(RunStopped):
    """A checkpoint could not be written within the storage retry window (``checkpoint.on_upload_failure=stop``)."""


class TrainingError(Exception):
    """The run ended without reaching ``max_iters``; the message says why and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def is_final(error: BaseException) -> bool:
    """Whether restarting the worker group would only repeat ``error``."""
    return isinstance(error, ValueError | RunStopped)


def exit_code(error: BaseException) -> int:
    return EXIT_USER_ERROR if isinstance(error, ValueError) else EXIT_FAILED
