"""The driver: checks what can be checked before any worker starts, then runs ``TorchTrainer`` attempts until
the run is done, restarting after failures and preemptions and stopping at once for errors no restart fixes.
``jobs/train.py`` calls it for one run and ``jobs/tune.py`` once per trial: one code path for both."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys

import ray
from ray.train import Result

from engine import checkpoint as ckpt
from engine import lease
from engine.attempts import fit
from engine.config import TrainConfig
from engine.errors import EXIT_USER_ERROR, TrainingError
from engine.faults import Faults
from engine.init_from import check_source
from engine.lease import Lease
from engine.trainer import ROOT, absolute, build_trainer, checkpoint_uri, log_dir, run_uri, storage_path
from pipeline import storage
from pipeline.loader import open_dataset

__all__ = [
    "absolute",
    "build_trainer",
    "checkpoint_uri",
    "fit",
    "init_ray",
    "log_dir",
    "preflight",
    "run",
    "run_job",
    "storage_path",
]


def init_ray(verbose: bool = False) -> None:
    """Joins the cluster at ``RAY_ADDRESS``, or starts an embedded local one bound to 127.0.0.1.

    What the user reads is ours: Ray's own INFO lines stay in its log files (``--verbose`` shows them). Train
    V2 patches print() in workers to also log it (every progress line would show twice, and pycocotools'
    output would escape redirect_stdout), and its PreemptionWatcher (node drains) logs an error line at every
    start; SIGTERM is how our runs see preemption (``engine.preemption``), so the watcher is off.
    """
    if ray.is_initialized():
        return
    env = {"PYTHONPATH": str(ROOT), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    options = {"runtime_env": {"env_vars": env}, "logging_level": logging.INFO if verbose else logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **options)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # an embedded head on loopback only
    # Ray Train's actors find the state API by auto-detection, which fails when another Ray runs on this
    # machine ("Found multiple active Ray instances"): name this head's dashboard to them.
    dashboard = _free_port()
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    ray.init(
        _node_ip_address="127.0.0.1",
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard,
        num_cpus=max(os.cpu_count() or 1, 4),  # logical CPUs: room for the trainer's own actors
        log_to_driver=True,
        **options,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preflight(cfg: TrainConfig) -> None:
    """Errors before work starts: unreachable storage, no shards, classes that do not match the model, an
    ``init_from`` that is neither a file nor a checkpoint (checked only for a new run: a resume wins)."""
    datasets = [("train", cfg.data.train_uri)] + ([("val", cfg.data.val_uri)] if cfg.data.val_uri else [])
    for split, uri in datasets:
        ds = open_dataset(uri)
        if ds.num_classes != cfg.model.num_classes:
            names = [c["name"] for c in ds.manifest["categories"]][:8]
            raise ValueError(
                f"the {split} data at {uri} has {ds.num_classes} classes ({', '.join(names)}...) but the model has "
                f"num_classes={cfg.model.num_classes}: add --set model.num_classes={ds.num_classes}"
            )
    storage.ensure_reachable(storage_path(cfg))
    if cfg.model.init_from and ckpt.latest_complete(run_uri(cfg)) is None:
        check_source(cfg.model.init_from)


def run(cfg: TrainConfig, faults: Faults | None = None, force: bool = False) -> Result:
    """Checks, starts or joins Ray, takes the run's lease (``force``: from another driver), trains (resuming
    if the run name has checkpoints), returns the result. ``TrainingError`` when it cannot reach ``max_iters``."""
    preflight(cfg)
    uri = run_uri(cfg)
    held = lease.acquire(uri, cfg.checkpoint.lease_ttl_s, force)  # a second driver is refused before Ray starts
    lost: list[Lease] = []
    try:
        init_ray(cfg.log.verbose)
        check_shared_storage(cfg)
        check_workers_can_write(cfg)
        with lease.LeaseKeeper(uri, held, lost.append):
            return fit(cfg, faults=faults, held=held, lost=lost)
    finally:
        with contextlib.suppress(storage.StorageError):
            lease.release(uri, held)


def run_job(cfg: TrainConfig, force: bool = False) -> Result | int:
    """``run(cfg)`` for the jobs: the result, or the exit code after printing ``error: ...`` for every error
    a user can act on (bad config or data: 2; storage unreachable: 2; the run failed for good: its code)."""
    try:
        return run(cfg, force=force)
    except (ValueError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def check_shared_storage(cfg: TrainConfig) -> None:
    """A local folder as storage on a cluster of several nodes: a worker group restarted on other nodes
    could not read its checkpoints back. ``ValueError`` before anything trains."""
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and "://" not in cfg.checkpoint.storage_path:
        raise ValueError(
            f"checkpoint.storage_path={cfg.checkpoint.storage_path} is a local folder, but this Ray cluster has "
            f"{nodes} nodes: set checkpoint.storage_path=s3://BUCKET/runs (or gs://), or RETINANET_STORAGE"
        )


def check_workers_can_write(cfg: TrainConfig) -> None:
    """Writes and deletes a small object in the run's storage from a Ray task placed like a training worker
    (its resources, the job's runtime environment and credentials), so that storage the workers may not
    write fails before step 1, naming the URI, instead of at the first checkpoint."""
    from engine.probe import try_write

    s = cfg.scaling
    task = ray.remote(num_cpus=s.cpus_per_worker, num_gpus=s.gpus_per_worker if s.use_gpu else 0, max_retries=0)
    error = ray.get(task(try_write).remote(run_uri(cfg)))
    if error:
        raise ValueError(
            f"the training workers cannot write to {run_uri(cfg)}: {error} Give the workers' credentials write access "
            "to it (their instance role, service account or runtime environment), or set checkpoint.storage_path"
        )
