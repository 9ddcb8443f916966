"""Preemption: SIGTERM to any worker (a spot reclaim, ``kubectl drain``) makes every rank finish its step,
write one checkpoint at the same step and end the attempt; the driver then starts the run again from it.

Ray Train runs the training function in a thread of the worker actor, and Python handles signals only in
the main thread. ``SigtermCallback`` is a Train worker callback: it runs in the actor's main thread right
after the train context is set up, and installs a handler there that only raises a flag. The loop's
``PreemptionHook`` reads the flag on every rank at every step (one CPU all-reduce: the GPU never waits).
``WorkerCallback`` is Ray Train's developer API for code in the worker actor (pinned Ray version; the
preemption test fails if it changes).
While no training loop runs, SIGTERM gets Ray's own handler (the worker exits); so does a second SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from ray.train.v2._internal.execution.callback import WorkerCallback

from engine import collectives
from engine.errors import RunStopped
from engine.hooks import Hook, StepContext

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


class PreemptionHook(Hook):
    """Every step: has any rank been asked to stop? SIGTERM: this step checkpoints and the attempt ends. An
    abort (the run's lease was taken over): every rank raises ``RunStopped`` before anything is written."""

    def __init__(self, w) -> None:
        self.w = w

    def every_step(self, ctx: StepContext) -> None:
        _current_step[0] = ctx.step + 1  # the step that runs next: a SIGTERM from now on arrives during it

    def due(self, ctx: StepContext) -> bool:
        return True

    def after_step(self, ctx: StepContext) -> None:
        code = collectives.max_over_ranks(2 if _abort else 1 if _requested.is_set() else 0)
        if code == 2:
            reasons = [r for rank in collectives.gather_objects(list(_abort)) for r in rank]
            raise RunStopped(reasons[0])
        if code == 0 or ctx.last:  # the last step checkpoints and ends anyway
            return
        signalled = [s for steps in collectives.gather_objects(list(_signal_step)) for s in steps]
        ctx.save, ctx.stop = True, "preempted"
        ctx.metrics["preempted"] = True
        if self.w.rank == 0:
            print(f"preempted: checkpoint at step {ctx.step}, then the run restarts from it", flush=True)
        self.w.log.event(ctx.step, "preempted", signal_step=min(signalled, default=ctx.step))
