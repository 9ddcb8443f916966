"""SIGTERM on a Train worker: the flag the training loop's ``PreemptionHook`` reads, and the worker callback
that installs its handler.

Ray Train runs the training function in a thread of the worker actor, and Python handles signals only in
the main thread. ``SigtermCallback`` is a Train worker callback: it runs in the actor's main thread right
after the train context is set up, and installs a handler there that only raises a flag.
``WorkerCallback`` is Ray Train's developer API for code in the worker actor (pinned Ray version; the
preemption test fails if it changes).
While no training loop runs, SIGTERM gets Ray's own handler (the worker exits); so does a second SIGTERM.

This module imports only the standard library and Ray. The callback travels in ``RunConfig(callbacks=...)``,
so Ray Train's controller unpickles it and imports this module. When it lived beside the hook, the controller
imported torch, torchvision and the model at every attempt (1.6 CPU s more per attempt, measured on a 2-core
machine); an import contract keeps it light.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from ray.train.v2._internal.execution.callback import WorkerCallback

_requested = threading.Event()
_armed = threading.Event()
_abort: list[str] = []  # reasons to stop at once, without a checkpoint (the run was taken over)
_signal_step: list[int] = []  # the step that was running when SIGTERM came
_current_step = [0]


def _handler(previous):
    def on_sigterm(signum, frame) -> None:
        if not _armed.is_set() or _requested.is_set():
            signal.signal(signal.SIGTERM, previous)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGTERM)
            return
        _signal_step.append(_current_step[0])
        _requested.set()
        print(f"SIGTERM at step {_current_step[0]}: finishing the step, checkpointing, then exiting", flush=True,
              file=sys.stderr)  # fmt: skip

    return on_sigterm


def install() -> bool:
    """Installs the handler; only possible in the main thread (returns whether it was)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _handler(signal.getsignal(signal.SIGTERM)))
    return True


class SigtermCallback(WorkerCallback):
    """Passed in ``RunConfig(callbacks=...)``; Ray Train copies it to every worker."""

    def after_init_train_context(self) -> None:
        install()


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """While the training loop runs, SIGTERM means "checkpoint and stop" instead of "exit now"."""
    _requested.clear()
    _signal_step.clear()
    _abort.clear()
    _armed.set()
    try:
        yield
    finally:
        _armed.clear()


def request() -> None:
    """What the handler does, for callers without a signal (tests, other notices)."""
    _signal_step.append(_current_step[0])
    _requested.set()


def request_abort(reason: str) -> None:
    """End the attempt at the next step on every rank, writing nothing more (``RunStopped(reason)``)."""
    _abort.append(reason)


def state() -> tuple[bool, list[str], list[int]]:
    """(a SIGTERM or request came, the abort reasons, the steps that were running when they came)."""
    return _requested.is_set(), list(_abort), list(_signal_step)


def set_current_step(step: int) -> None:
    """The step that runs next: a SIGTERM from now on arrives during it."""
    _current_step[0] = step
