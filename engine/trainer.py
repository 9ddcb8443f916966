"""One attempt's ``TorchTrainer``, and where a run keeps its checkpoints and progress files."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from engine.config import TrainConfig, to_dict
from engine.faults import Faults
from engine.lease import Lease
from engine.loop import train_loop_per_worker
from engine.ray_storage import ray_storage
from engine.sigterm import SigtermCallback
from pipeline import storage

ROOT = Path(__file__).resolve().parents[1]


def storage_path(cfg: TrainConfig) -> str:
    return storage.absolute(cfg.checkpoint.storage_path)


def absolute(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with local relative data, storage and ``model.init_from`` paths made absolute against this
    process's folder, so that workers (whose working folder Ray and Tune choose) read and write where the
    user meant."""
    val = cfg.data.val_uri and storage.absolute(cfg.data.val_uri)
    data = replace(cfg.data, train_uri=storage.absolute(cfg.data.train_uri), val_uri=val)
    model = replace(cfg.model, init_from=cfg.model.init_from and storage.absolute(cfg.model.init_from))
    return replace(cfg, data=data, model=model, checkpoint=replace(cfg.checkpoint, storage_path=storage_path(cfg)))


def log_dir(cfg: TrainConfig) -> Path:
    """Where rank 0 writes progress files: beside the checkpoints for local storage, else ./runs/NAME.
    Checkpoints carry copies of them either way."""
    path = cfg.checkpoint.storage_path
    base = Path(path) if "://" not in path else ROOT / "runs"
    return (base / cfg.checkpoint.name).resolve()


def build_trainer(
    cfg: TrainConfig, callbacks: list | None = None, faults: Faults | None = None, held: Lease | None = None
) -> TorchTrainer:
    """One attempt's ``TorchTrainer``; ``callbacks`` are Train ``UserCallback``s (a Tune trial passes the one
    that forwards each report to Tune); ``held``: the driver's lease, which rank 0 renews. Ray Train itself
    never retries (``max_failures=0``): ``engine.attempts.fit`` does, so that an error no restart can fix ends
    the run at once."""
    s = cfg.scaling
    path, filesystem = ray_storage(storage_path(cfg), cfg.data.storage_retry_s)
    workers = (s.min_workers, s.num_workers) if s.min_workers else s.num_workers
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    loop_config = {"cfg": to_dict(absolute(cfg)), "log_dir": str(log_dir(cfg)), "run_uri": run_uri(cfg)}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            **loop_config,
            "faults": faults.to_dict() if faults else None,
            "lease": asdict(held) if held else None,
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend=s.backend),
        run_config=RunConfig(
            name=cfg.checkpoint.name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=0),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            logging_config=LoggingConfig(log_level="INFO" if cfg.log.verbose else "CRITICAL"),
            callbacks=[*(callbacks or []), SigtermCallback()],
        ),
    )


def run_uri(cfg: TrainConfig) -> str:
    """``STORAGE/NAME``: the run's checkpoints, ``best/``, lease (and ``logs/`` on object storage)."""
    return storage.join(storage_path(cfg), cfg.checkpoint.name)


def checkpoint_uri(cfg: TrainConfig, result) -> str | None:
    """The URI of a result's checkpoint as the user names it (``s3://...``; Ray's path has no scheme)."""
    if result.checkpoint is None:
        return None
    return storage.join(run_uri(cfg), result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
