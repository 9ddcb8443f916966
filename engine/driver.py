"""The driver: checks what can be checked before any worker starts, then runs one ``TorchTrainer``.
``jobs/train.py`` calls it for one run and ``jobs/tune.py`` once per trial: one code path for both."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from engine.config import TrainConfig, to_dict
from engine.loop import train_loop_per_worker
from pipeline import storage
from pipeline.loader import open_dataset

ROOT = Path(__file__).resolve().parents[1]


def init_ray() -> None:
    """Joins the cluster at ``RAY_ADDRESS``, or starts an embedded local one bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    # Train V2 patches print() in workers to also log it: every progress line would show twice, and
    # pycocotools' output would escape redirect_stdout.
    runtime_env = {"env_vars": {"PYTHONPATH": str(ROOT), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # an embedded head on loopback only
    ray.init(
        _node_ip_address="127.0.0.1",
        dashboard_host="127.0.0.1",
        num_cpus=max(os.cpu_count() or 1, 4),  # logical CPUs: room for the trainer's own actors
        runtime_env=runtime_env,
        log_to_driver=True,
    )


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


def build_trainer(cfg: TrainConfig, callbacks: list | None = None) -> TorchTrainer:
    """The run's ``TorchTrainer``; ``callbacks`` are Train ``UserCallback``s (a Tune trial passes the one
    that forwards each report to Tune)."""
    s = cfg.scaling
    workers = (s.min_workers, s.num_workers) if s.min_workers else s.num_workers
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(absolute(cfg)), "log_dir": str(log_dir(cfg))},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=s.backend),
        run_config=RunConfig(
            name=cfg.checkpoint.name,
            storage_path=storage_path(cfg),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            callbacks=callbacks,
        ),
    )


def run(cfg: TrainConfig) -> Result:
    """Checks, starts or joins Ray, trains (resuming if the run name has checkpoints), returns the result."""
    preflight(cfg)
    init_ray()
    check_shared_storage(cfg)
    return build_trainer(cfg).fit()


def check_shared_storage(cfg: TrainConfig) -> None:
    """A local folder as storage on a cluster of several nodes: a worker group restarted on other nodes
    could not read its checkpoints back. ``ValueError`` before anything trains."""
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and "://" not in cfg.checkpoint.storage_path:
        raise ValueError(
            f"checkpoint.storage_path={cfg.checkpoint.storage_path} is a local folder, but this Ray cluster has "
            f"{nodes} nodes: set checkpoint.storage_path=s3://BUCKET/runs (or gs://), or RETINANET_STORAGE"
        )
