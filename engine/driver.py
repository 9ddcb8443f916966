"""The driver: checks what can be checked before any worker starts, then runs ``TorchTrainer`` attempts until
the run is done, restarting after failures and preemptions and stopping at once for errors no restart fixes.
``jobs/train.py`` calls it for one run and ``jobs/tune.py`` once per trial: one code path for both."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import ray
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    Result,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchConfig, TorchTrainer

from engine import checkpoint as ckpt
from engine.config import TrainConfig, to_dict
from engine.errors import EXIT_USER_ERROR, TrainingError, exit_code, is_final
from engine.faults import Faults
from engine.loop import train_loop_per_worker
from engine.preemption import SigtermCallback
from pipeline import storage
from pipeline.loader import open_dataset

ROOT = Path(__file__).resolve().parents[1]


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
    """Errors before work starts: unreachable storage, no shards, classes that do not match the model."""
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


def storage_path(cfg: TrainConfig) -> str:
    return storage.absolute(cfg.checkpoint.storage_path)


def absolute(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with local relative data and storage paths made absolute against this process's folder, so
    that workers (whose working folder Ray and Tune choose) read and write where the user meant."""
    val = cfg.data.val_uri and storage.absolute(cfg.data.val_uri)
    data = replace(cfg.data, train_uri=storage.absolute(cfg.data.train_uri), val_uri=val)
    return replace(cfg, data=data, checkpoint=replace(cfg.checkpoint, storage_path=storage_path(cfg)))


def log_dir(cfg: TrainConfig) -> Path:
    """Where rank 0 writes progress files: beside the checkpoints for local storage, else ./runs/NAME.
    Checkpoints carry copies of them either way."""
    path = cfg.checkpoint.storage_path
    base = Path(path) if "://" not in path else ROOT / "runs"
    return (base / cfg.checkpoint.name).resolve()


def build_trainer(cfg: TrainConfig, callbacks: list | None = None, faults: Faults | None = None) -> TorchTrainer:
    """One attempt's ``TorchTrainer``; ``callbacks`` are Train ``UserCallback``s (a Tune trial passes the one
    that forwards each report to Tune). Ray Train itself never retries (``max_failures=0``): ``fit`` does,
    so that an error no restart can fix ends the run at once."""
    s = cfg.scaling
    workers = (s.min_workers, s.num_workers) if s.min_workers else s.num_workers
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    run_uri = storage.join(storage_path(cfg), cfg.checkpoint.name)
    loop_config = {"cfg": to_dict(absolute(cfg)), "log_dir": str(log_dir(cfg)), "run_uri": run_uri}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "faults": faults.to_dict() if faults else None},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=s.backend),
        run_config=RunConfig(
            name=cfg.checkpoint.name,
            storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            logging_config=LoggingConfig(log_level="INFO" if cfg.log.verbose else "CRITICAL"),
            callbacks=[*(callbacks or []), SigtermCallback()],
        ),
    )


def run(cfg: TrainConfig, faults: Faults | None = None) -> Result:
    """Checks, starts or joins Ray, trains (resuming if the run name has checkpoints), returns the result.
    ``TrainingError`` when the run cannot reach ``max_iters``."""
    preflight(cfg)
    init_ray(cfg.log.verbose)
    check_shared_storage(cfg)
    return fit(cfg, faults=faults)


def run_job(cfg: TrainConfig) -> Result | int:
    """``run(cfg)`` for the jobs: the result, or the exit code after printing ``error: ...`` for every error
    a user can act on (bad config or data: 2; storage unreachable: 2; the run failed for good: its code)."""
    try:
        return run(cfg)
    except (ValueError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def fit(cfg: TrainConfig, callbacks: Callable[[], list] | None = None, faults: Faults | None = None) -> Result:
    """Attempts until the run reaches ``max_iters``. Each attempt resumes from the run's latest checkpoint. A
    preempted attempt (SIGTERM: it checkpointed and stopped) starts again, up to ``checkpoint.max_preemptions``;
    a failed one (a dead or stalled worker, a broken connection) up to ``checkpoint.max_failures``; an error no
    restart can fix (bad data, divergence) ends the run at once."""
    limits = {"failure": cfg.checkpoint.max_failures, "preemption": cfg.checkpoint.max_preemptions}
    counts = dict.fromkeys(limits, 0)
    while True:
        try:
            result = build_trainer(cfg, callbacks() if callbacks else None, faults).fit()
        except TrainingFailedError as e:
            error, final = describe_failure(e)
            if final is not None:
                raise TrainingError(error, exit_code(final)) from None
            kind = "failure"
        else:
            if result.return_value != "preempted":
                return result
            kind, error = "preemption", f"preempted at step {(result.metrics or {}).get('step')}"
        counts[kind] += 1
        if limits[kind] != -1 and counts[kind] > limits[kind]:
            raise TrainingError(_gave_up(cfg, kind, counts[kind], error)) from None
        of = "" if limits[kind] == -1 else f"/{limits[kind]}"
        print(f"{error}\nrestarting from the latest checkpoint ({kind} {counts[kind]}{of})", flush=True)


def describe_failure(error: TrainingFailedError) -> tuple[str, BaseException | None]:
    """``(message, the worker error no restart can fix or None)``: one line per failed rank, the original
    exception's message (Ray wraps it with its traceback)."""
    failures = getattr(error, "worker_failures", None) or {}
    lines, final = [], None
    for rank, failure in sorted(failures.items()):
        cause = getattr(failure, "_base_exc", failure)
        if is_final(cause) and final is None:
            final = cause
        lines.append(f"rank {rank}: {type(cause).__name__}: {_first_line(cause)}")
    if final is not None:
        return str(final), final
    died = any(not hasattr(f, "_base_exc") for f in failures.values())
    hint = " (a worker process ended: its last lines above say why, e.g. the stall watchdog's stacks)" if died else ""
    return "training attempt failed: " + ("; ".join(lines) if lines else _first_line(error)) + hint, None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else "(no message)"


def _gave_up(cfg: TrainConfig, kind: str, count: int, error: str) -> str:
    run_uri = storage.join(storage_path(cfg), cfg.checkpoint.name)
    latest = ckpt.latest_complete(run_uri)
    key = "max_failures" if kind == "failure" else "max_preemptions"
    return (
        f"{error}\ngave up after {count} {kind}s (checkpoint.{key}={getattr(cfg.checkpoint, key)}); the latest "
        f"complete checkpoint is {latest or 'none'}: rerun the same command to resume from it"
    )


def check_shared_storage(cfg: TrainConfig) -> None:
    """A local folder as storage on a cluster of several nodes: a worker group restarted on other nodes
    could not read its checkpoints back. ``ValueError`` before anything trains."""
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and "://" not in cfg.checkpoint.storage_path:
        raise ValueError(
            f"checkpoint.storage_path={cfg.checkpoint.storage_path} is a local folder, but this Ray cluster has "
            f"{nodes} nodes: set checkpoint.storage_path=s3://BUCKET/runs (or gs://), or RETINANET_STORAGE"
        )
