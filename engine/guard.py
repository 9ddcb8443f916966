"""The divergence guard: a non-finite loss or gradient norm is caught without a host sync per step, and
always before a checkpoint is written, so a non-finite state is never checkpointed nor becomes best."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine import collectives
from engine.errors import Diverged
from engine.hooks import Hook, StepContext

_WATCHED = ("loss", "loss_cls", "loss_box", "grad_norm")


@dataclass
class Snapshot:
    """The last good state (weights and optimizer, on the host) that a rollback returns to."""

    step: int
    model: dict
    optimizer: dict

    @classmethod
    def take(cls, net: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> Snapshot:
        return cls(step, _to_host(net.state_dict()), _to_host(optimizer.state_dict()))


def _to_host(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_host(v) for v in value)
    return value


class DivergenceGuard(Hook):
    """Each step adds, on the device, whether the watched values are finite, and remembers the first
    non-finite step and its values. At log, evaluation and checkpoint steps (the same on every rank) the
    ranks compare; before a checkpoint the weights are checked too. Then ``optim.on_divergence``: ``stop``
    raises ``Diverged`` on every rank; ``rollback`` restores the last good snapshot (the last checkpoint's
    state), keeps the data position (the batches since are skipped) and scales the learning rate."""

    def __init__(self, w) -> None:
        self.w = w
        self._bad = torch.zeros((), dtype=torch.bool, device=w.device)
        self._first = torch.zeros(1 + len(_WATCHED), device=w.device)  # step, then the watched values
        rollback = w.cfg.optim.on_divergence == "rollback"
        self.snapshot = Snapshot.take(w.net, w.optimizer, w.state.step) if rollback else None

    def every_step(self, ctx: StepContext) -> None:
        values = torch.stack([ctx.losses[k].detach().float() for k in _WATCHED])
        now = ~torch.isfinite(values).all()
        row = torch.cat([torch.full((1,), float(ctx.step), device=values.device), values])
        self._first = torch.where(now & ~self._bad, row, self._first)
        self._bad = self._bad | now

    def due(self, ctx: StepContext) -> bool:
        return ctx.log or ctx.eval or ctx.save

    def after_step(self, ctx: StepContext) -> None:
        bad = self._bad
        if ctx.save:
            finite = torch.stack([torch.isfinite(p.detach()).all() for p in self.w.net.parameters()]).all()
            bad = bad | ~finite
        rows = collectives.gather_rows(torch.cat([bad.float()[None], self._first]))  # [ranks, 2 + watched]
        hit = torch.nonzero(rows[:, 0] > 0).flatten().tolist()
        if not hit:
            if ctx.save and self.snapshot is not None:
                self.snapshot = Snapshot.take(self.w.net, self.w.optimizer, ctx.step)
            return
        rank = min(hit, key=lambda r: (rows[r, 1] <= 0, float(rows[r, 1])))  # the earliest non-finite step
        step = int(rows[rank, 1]) or ctx.step  # 0: only the weights are non-finite
        what = self._describe(step, rank, rows[rank, 2:].tolist())
        o = self.w.cfg.optim
        if self.snapshot is None or self.w.state.rollbacks >= o.max_rollbacks:
            raise Diverged(self._stop_message(what))
        self._rollback(ctx, what, step)

    def _describe(self, step: int, rank: int, values: list[float]) -> str:
        loss, cls, box, norm = values
        where = f"rank {rank}" if self.w.world_size > 1 else "the worker"
        return (
            f"step {step} ({where}): loss {loss:.4g} (focal {cls:.4g}, box {box:.4g}), gradient norm {norm:.4g}"
            if any(v != 0 for v in values)
            else f"step {step}: the weights are no longer finite"
        )

    def _stop_message(self, what: str) -> str:
        w, o = self.w, self.w.cfg.optim
        last = f"{w.last_checkpoint} (step {w.last_checkpoint_step})" if w.last_checkpoint else "none yet"
        if self.snapshot is not None:
            advice = f"it had rolled back {w.state.rollbacks} time(s) already (optim.max_rollbacks={o.max_rollbacks})"
        else:
            advice = "lower optim.base_lr, set optim.clip_grad_norm, or set optim.on_divergence=rollback"
        return (
            f"training diverged at {what}. No checkpoint was written from this state; the last good checkpoint "
            f"is {last}. {advice[0].upper()}{advice[1:]}."
        )

    def _rollback(self, ctx: StepContext, what: str, step: int) -> None:
        w, o, snap = self.w, self.w.cfg.optim, self.snapshot
        w.net.load_state_dict(snap.model)
        w.optimizer.load_state_dict(snap.optimizer)
        w.state.step = snap.step
        w.state.lr_scale *= o.rollback_lr_factor
        w.state.rollbacks += 1
        self._bad = torch.zeros_like(self._bad)
        self._first = torch.zeros_like(self._first)
        ctx.rolled_back = True
        if w.rank == 0:
            print(
                f"non-finite at {what}: rolled back to step {snap.step}, skipping the batches since, learning rate "
                f"x{w.state.lr_scale:g} (rollback {w.state.rollbacks}/{o.max_rollbacks})",
                flush=True,
            )
        w.log.event(ctx.step, "rollback", diverged_at=step, to_step=snap.step, lr_scale=w.state.lr_scale,
                    rollbacks=w.state.rollbacks, reason=what)  # fmt: skip
