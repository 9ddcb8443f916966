"""End-of-step work as hooks: the loop runs a step, then each hook in order.

A hook's ``every_step`` does device-only work (no host sync); ``due(ctx)`` says whether ``after_step`` runs
now, from the step number and the flags of earlier hooks in the same step, so every rank gives the same
answer and the collectives inside (``engine.collectives``) line up. Order: progress, preemption,
divergence guard, evaluation, checkpoint (the guard runs before anything is evaluated or written).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from engine import collectives
from engine.config import TrainConfig
from engine.evaluate import evaluate

_LOSSES = ("loss", "loss_cls", "loss_box")


@dataclass
class StepContext:
    """One finished step. ``step`` counts the steps done; the flags come from ``schedule``, and hooks may
    raise ``save`` (checkpoint now), set ``stop`` (end the attempt after this step, e.g. "preempted"), set
    ``rolled_back`` (the state went back: nothing more is evaluated or written this step) and add ``metrics``
    (what the report and checkpoint carry)."""

    step: int
    losses: dict[str, torch.Tensor]
    lr: float
    num_images: int
    waited_s: float
    seconds: float
    log: bool = False
    eval: bool = False
    save: bool = False
    last: bool = False
    stop: str | None = None
    rolled_back: bool = False
    metrics: dict = field(default_factory=dict)


def schedule(cfg: TrainConfig, step: int, has_val: bool) -> dict[str, bool]:
    """Which boundaries ``step`` is: a pure function of the step and the config (the same on every rank)."""
    last = step >= cfg.optim.max_iters
    evaluate_now = has_val and ((cfg.eval.every and step % cfg.eval.every == 0) or (last and cfg.eval.at_end))
    return {
        "log": step % cfg.log.every == 0 or last,
        "eval": bool(evaluate_now),
        "save": bool(evaluate_now) or last or step % cfg.checkpoint.every == 0,
        "last": last,
    }


class Hook:
    """``exempt``: its ``after_step`` may take long (evaluation, uploads); the stall watchdog pauses."""

    exempt = False

    def every_step(self, ctx: StepContext) -> None:
        pass

    def due(self, ctx: StepContext) -> bool:
        return False

    def after_step(self, ctx: StepContext) -> None:
        pass

    def close(self) -> None:
        pass


def run_hooks(hooks: list[Hook], ctx: StepContext, watchdog) -> None:
    for hook in hooks:
        hook.every_step(ctx)
        if hook.due(ctx):
            with watchdog.paused(hook.exempt):
                hook.after_step(ctx)
    watchdog.beat()


class ProgressHook(Hook):
    """Sums the loss parts on the device each step; at log steps the mean over ranks is read back (the one
    host sync of a log step) and printed by rank 0. The values become ``w.metrics``."""

    def __init__(self, w) -> None:
        self.w = w
        self._sums = torch.zeros(len(_LOSSES), device=w.device)
        self._images = self._steps = self._retries = 0
        self._waited = self._busy = 0.0

    def every_step(self, ctx: StepContext) -> None:
        self._sums += torch.stack([ctx.losses[k].detach().float() for k in _LOSSES])
        self._images += ctx.num_images
        self._steps += 1
        self._waited += ctx.waited_s
        self._busy += ctx.seconds

    def due(self, ctx: StepContext) -> bool:
        return ctx.log

    def after_step(self, ctx: StepContext) -> None:
        retries = self.w.loader.stats.get("storage_retries", 0)
        sums = [self._images / max(self._busy, 1e-9), retries - self._retries]  # summed over ranks
        self._retries = retries
        extra = torch.tensor(sums, device=self._sums.device, dtype=torch.float32)
        values = collectives.mean_losses_sum_rate(torch.cat([self._sums / max(1, self._steps), extra]), len(_LOSSES))
        latest = dict(zip((*_LOSSES, "images_per_s", "storage_retries"), values, strict=True))
        latest.update(lr=ctx.lr, data_wait=self._waited / max(self._busy, 1e-9))
        self.w.metrics = latest
        note = f" | rolled back {self.w.state.rollbacks}x" if self.w.state.rollbacks else ""
        if latest["storage_retries"]:
            note += f" | storage retries {latest['storage_retries']:.0f} (reads re-opened where they broke)"
        self.w.log.progress(ctx.step, latest, note)
        self._sums.zero_()
        self._images = self._steps = 0
        self._waited = self._busy = 0.0


class EvalHook(Hook):
    """COCO evaluation on the validation split (each rank its own shards), at ``eval.every`` and the end."""

    exempt = True

    def __init__(self, w) -> None:
        self.w = w

    def due(self, ctx: StepContext) -> bool:
        return ctx.eval and not ctx.rolled_back

    def after_step(self, ctx: StepContext) -> None:
        w = self.w
        collectives.broadcast_buffers(w.net)
        result = evaluate(
            w.net, w.postprocess, w.val_ds, rank=w.rank, world_size=w.world_size,
            loader_cfg=replace(w.cfg.data.loader, batch_size=w.cfg.data.eval_batch_size), device=w.device,
            max_images=w.cfg.eval.max_images, amp=w.amp, num_samples=w.cfg.eval.num_vis_images,
        )  # fmt: skip
        if result.metrics is not None:
            ctx.metrics.update(result.metrics)
            w.log.evaluation(ctx.step, result, w.val_ds)


class DataSeenHook(Hook):
    """When the attempt ends: per epoch, the samples every rank's loader handed out and the sum of their image
    ids, summed over ranks (event ``data_seen``). A complete epoch equals the dataset: each image once."""

    def __init__(self, w) -> None:
        self.w = w

    def due(self, ctx: StepContext) -> bool:
        return ctx.last or ctx.stop is not None

    def after_step(self, ctx: StepContext) -> None:
        total: dict[int, list[int]] = {}
        for seen in collectives.gather_objects(self.w.loader.seen()):
            for epoch, (count, ids) in seen.items():
                entry = total.setdefault(epoch, [0, 0])
                entry[0], entry[1] = entry[0] + count, entry[1] + ids
        manifest = self.w.loader.dataset.manifest
        self.w.log.event(ctx.step, "data_seen", epochs={str(e): v for e, v in sorted(total.items())},
                         dataset_images=manifest.get("num_images"), stats=dict(self.w.loader.stats))  # fmt: skip
