"""Preemption: SIGTERM to any worker (a spot reclaim, ``kubectl drain``) makes every rank finish its step,
write one checkpoint at the same step and end the attempt; the driver then starts the run again from it.

``engine.sigterm`` turns the signal into a flag (its worker callback installs the handler in the actor's
main thread). The loop's ``PreemptionHook`` reads the flag on every rank at every step (one CPU all-reduce:
the GPU never waits), as it reads an abort (the run's lease was taken over).
"""

from __future__ import annotations

from engine import collectives, sigterm
from engine.errors import RunStopped
from engine.hooks import Hook, StepContext


class PreemptionHook(Hook):
    """Every step: has any rank been asked to stop? SIGTERM: this step checkpoints and the attempt ends. An
    abort (the run's lease was taken over): every rank raises ``RunStopped`` before anything is written."""

    def __init__(self, w) -> None:
        self.w = w

    def every_step(self, ctx: StepContext) -> None:
        sigterm.set_current_step(ctx.step + 1)

    def due(self, ctx: StepContext) -> bool:
        return True

    def after_step(self, ctx: StepContext) -> None:
        requested, aborts, signal_steps = sigterm.state()
        code = collectives.max_over_ranks(2 if aborts else 1 if requested else 0)
        if code == 2:
            reasons = [r for rank in collectives.gather_objects(aborts) for r in rank]
            raise RunStopped(reasons[0])
        if code == 0 or ctx.last:  # the last step checkpoints and ends anyway
            return
        signalled = [s for rank in collectives.gather_objects(signal_steps) for s in rank]
        ctx.save, ctx.stop = True, "preempted"
        ctx.metrics["preempted"] = True
        if self.w.rank == 0:
            print(f"preempted: checkpoint at step {ctx.step}, then the run restarts from it", flush=True)
        self.w.log.event(ctx.step, "preempted", signal_step=min(signalled, default=ctx.step))
