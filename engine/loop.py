"""The per-worker training function that Ray Train runs on every rank.

Ray is read once here (rank, world size, local rank, node, the checkpoint to resume) and handed down as plain
values; reporting goes through the one ``report`` function below. The loop is a step plus hooks
(``engine.hooks``): progress, preemption, divergence guard, evaluation, checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray
import ray.train

from engine import checkpoint as ckpt
from engine import preemption
from engine.config import TrainConfig, from_dict
from engine.faults import Faults
from engine.guard import DivergenceGuard
from engine.hooks import CheckpointHook, EvalHook, Hook, ProgressHook, run_hooks
from engine.watchdog import StallWatchdog
from engine.worker import Worker, setup_worker


def train_loop_per_worker(config: dict) -> str | None:
    """Entry point for ``TorchTrainer``: ``config = {"cfg": to_dict(TrainConfig), "log_dir": str, "run_uri": str,
    "faults": dict | None}``. Returns why the attempt ended early ("preempted"), or None at ``max_iters``."""
    cfg = from_dict(config["cfg"])
    quiet_logging(cfg.log.verbose)
    ctx = ray.train.get_context()
    run_uri = config["run_uri"]
    return run_worker(
        cfg, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), Path(config["log_dir"]),
        run_uri=run_uri, report=report, node_id=ray.get_runtime_context().get_node_id(),
        restored=_restored(ray.train.get_checkpoint(), run_uri), faults=Faults.from_dict(config.get("faults")),
    )  # fmt: skip


def run_worker(cfg: TrainConfig, rank: int, world_size: int, local_rank: int, log_dir: Path, **setup) -> str | None:
    """Set-up, then steps until ``max_iters`` or until a hook stops the attempt (returns its reason)."""
    w = setup_worker(cfg, rank, world_size, local_rank, log_dir, **setup)
    hooks = default_hooks(w)
    ctx = None
    try:
        with StallWatchdog(cfg.optim.stall_timeout_s, rank, log_dir) as watchdog, preemption.armed():
            while w.state.step < cfg.optim.max_iters:
                ctx = w.train_one_step()
                run_hooks(hooks, ctx, watchdog)
                if ctx.stop:
                    break
    finally:
        for hook in hooks:
            hook.close()
        w.log.close()
    w.publisher.publish()
    return ctx.stop if ctx is not None else None


def default_hooks(w: Worker) -> list[Hook]:
    """In this order: the guard sees every step before anything is evaluated or written."""
    return [ProgressHook(w), preemption.PreemptionHook(w), DivergenceGuard(w), EvalHook(w), CheckpointHook(w)]


def report(metrics: dict, directory: Path | None, name: str) -> None:
    """``ray.train.report`` (a barrier: every rank calls it equally often); rank 0 attaches the checkpoint."""
    checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def _restored(checkpoint: ray.train.Checkpoint | None, run_uri: str) -> ckpt.Restored | None:
    if checkpoint is None:
        return None
    uri = f"{run_uri}/{checkpoint.path.rstrip('/').rsplit('/', 1)[-1]}"
    with checkpoint.as_directory() as directory:
        return ckpt.restore(Path(directory), uri, run_uri)


def quiet_logging(verbose: bool) -> None:
    """Our workers log warnings and errors; Ray Train sets their root logger to INFO, which lets through
    every library's chatter (botocore's "Found credentials..." once per connection, matplotlib's font cache)."""
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
