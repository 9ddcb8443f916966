"""The per-worker training function that Ray Train runs on every rank.

Ray is read once here (rank, world size, local rank, node, the checkpoint to resume) and handed down as plain
values; reporting goes through the one ``report`` function below. The loop is a step plus hooks
(``engine.hooks``): progress, preemption, divergence guard, evaluation, checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import ray
import ray.train
from ray.train import CheckpointUploadMode

from engine import checkpoint as ckpt
from engine import lease, preemption, sigterm
from engine.checkpointing import CheckpointHook
from engine.config import TrainConfig, from_dict
from engine.faults import Faults
from engine.guard import DivergenceGuard
from engine.hooks import DataSeenHook, EvalHook, Hook, ProgressHook, run_hooks
from engine.watchdog import StallWatchdog
from engine.worker import Worker, setup_worker


def train_loop_per_worker(config: dict) -> str | None:
    """Entry point for ``TorchTrainer``: ``config = {"cfg": to_dict(TrainConfig), "log_dir": str, "run_uri": str,
    "faults": dict | None, "lease": dict | None}``. Returns why the attempt ended early ("preempted"), or None
    at ``max_iters``."""
    cfg = from_dict(config["cfg"])
    quiet_logging(cfg.log.verbose)
    ctx = ray.train.get_context()
    run_uri = config["run_uri"]
    return run_worker(
        cfg, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), Path(config["log_dir"]),
        run_uri=run_uri, report=report, node_id=ray.get_runtime_context().get_node_id(),
        restored=_restored(ray.train.get_checkpoint(), run_uri), faults=Faults.from_dict(config.get("faults")),
        lease=config.get("lease"),
    )  # fmt: skip


def run_worker(cfg: TrainConfig, rank: int, world_size: int, local_rank: int, log_dir: Path, **setup) -> str | None:
    """Set-up, then steps until ``max_iters`` or until a hook stops the attempt (returns its reason)."""
    held = setup.pop("lease", None)
    w = setup_worker(cfg, rank, world_size, local_rank, log_dir, **setup)
    report_if_ended(w, setup.get("restored"))
    hooks = default_hooks(w)
    ctx = None
    try:
        watchdog = StallWatchdog(cfg.optim.stall_timeout_s, rank, log_dir)
        with watchdog, sigterm.armed(), _renewing(w, held):
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


def report_if_ended(w: Worker, restored: ckpt.Restored | None) -> None:
    """A run restarted at its last checkpoint (``max_iters`` reached) trains nothing; its caller may not have
    seen that end (a search stopped after a trial's last report but before Tune saved its state), so the
    metrics reported with that checkpoint are reported again, without the checkpoint. Every rank calls it."""
    if restored is not None and restored.metrics and w.state.step >= w.cfg.optim.max_iters:
        w.report(restored.metrics, None, restored.uri.rstrip("/").rsplit("/", 1)[-1])


def _renewing(w: Worker, held: dict | None):
    """Rank 0 renews the driver's lease while it trains; if another driver took the run over, every rank
    stops at its next step, writing nothing more."""
    if w.rank != 0 or held is None:
        return contextlib.nullcontext()

    def lost(holder: lease.Lease) -> None:
        sigterm.request_abort(f"another driver took this run over: {holder.describe()}. This one stops here; "
                                 f"its checkpoints stay in {w.run_uri}")  # fmt: skip

    return lease.LeaseKeeper(w.run_uri, lease.Lease(**held), lost)


def default_hooks(w: Worker) -> list[Hook]:
    """In this order: the guard sees every step before anything is evaluated or written."""
    return [ProgressHook(w), preemption.PreemptionHook(w), DivergenceGuard(w), EvalHook(w), CheckpointHook(w),
            DataSeenHook(w)]  # fmt: skip


def report(metrics: dict, uri: str | None, name: str) -> None:
    """``ray.train.report`` (a barrier: every rank calls it equally often). ``uri``: the checkpoint rank 0 has
    uploaded and committed as ``name`` in the run's folder; Ray Train registers it without copying it."""
    checkpoint = None
    if uri is not None:
        store = ray.train.get_context().get_storage()
        path = f"{store.experiment_fs_path.rstrip('/')}/{name}"
        checkpoint = ray.train.Checkpoint(path=path, filesystem=store.storage_filesystem)
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)  # fmt: skip


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
