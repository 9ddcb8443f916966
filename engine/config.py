"""The training run's typed configuration: sections validated on construction, dotted overrides, JSON.

A run is a named recipe (``engine.recipes``) plus overrides such as ``optim.base_lr=0.02``; the
resolved config (``to_dict``) is saved with every checkpoint and read back with ``from_dict``.
The model and loader sections are the components' own configs (``RetinaNetConfig``, ``LoaderConfig``).
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from model import RetinaNetConfig
from pipeline.loader import LoaderConfig

OPTIMIZERS = ("sgd", "adamw")
ON_DIVERGENCE = ("stop", "rollback")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(kw_only=True)
class DataConfig:
    """Converted datasets (``jobs/convert.py`` output: a folder or ``s3://`` / ``gs://`` prefix)."""

    train_uri: str
    val_uri: str | None = None  # None: no evaluation
    loader: LoaderConfig = field(default_factory=LoaderConfig)  # per rank; eval uses eval_batch_size
    eval_batch_size: int = 4
    # How long a worker keeps retrying object storage (reads re-open where they broke; checkpoint uploads):
    # outages shorter than this cost time, not the run
    storage_retry_s: float = 300.0

    def __post_init__(self) -> None:
        if self.storage_retry_s < 0:
            raise ValueError(f"data.storage_retry_s must be >= 0 seconds, got {self.storage_retry_s}")
        if not self.train_uri:
            raise ValueError("data.train_uri is empty: point it at a converted dataset (data.train_uri=s3://b/train)")
        if self.val_uri == "":
            raise ValueError("data.val_uri is empty: give a dataset URI, or data.val_uri=none to skip evaluation")
        if self.eval_batch_size < 1:
            raise ValueError(f"data.eval_batch_size must be >= 1, got {self.eval_batch_size}")


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and LR schedule; defaults are the paper's 1x schedule (SGD, lr 0.01 at batch 16, 90k its)."""

    base_lr: float = 0.01  # at a global batch of base_batch; scaled linearly with the actual global batch
    base_batch: int = 16
    momentum: float = 0.9  # SGD momentum; AdamW's beta1
    weight_decay: float = 1e-4
    max_iters: int = 90000
    steps: tuple[int, ...] = (60000, 80000)  # iterations at which the lr is multiplied by gamma
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 0.001  # lr multiplier at iteration 0, rising linearly to 1 at warmup_iters
    clip_grad_norm: float | None = None
    amp: bool = False  # bf16 autocast; only on GPU
    channels_last: bool = False
    compile: bool = False  # torch.compile the network; if compiling fails, the run trains eagerly (logged)
    # torch.compile's mode: "reduce-overhead" also records CUDA graphs on GPUs (needs static shapes:
    # data.loader.aug.pad_to and data.loader.pad_boxes_to), the "max-autotune" modes search kernels
    compile_mode: str = "default"
    ddp_bucket_mb: float = 25.0  # DDP gradient bucket size (MiB): all-reduces start as buckets fill
    optimizer: str = "sgd"  # "adamw" for small demos
    # A non-finite loss or gradient norm: "stop" ends the run naming the step and the last good checkpoint;
    # "rollback" restores the last good state, skips the batches since, and goes on at lr x rollback_lr_factor
    on_divergence: str = "stop"
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3  # then it stops as with "stop"
    # No step completed in this long (evaluation and checkpoint writes excluded): every rank dumps its Python
    # stacks and the attempt fails, so the run restarts from its last checkpoint. 0: no watchdog
    stall_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.on_divergence not in ON_DIVERGENCE:
            raise ValueError(f"optim.on_divergence={self.on_divergence!r} is not one of {list(ON_DIVERGENCE)}")
        if not 0 < self.rollback_lr_factor <= 1 or self.max_rollbacks < 0:
            raise ValueError(
                f"need optim.rollback_lr_factor in (0, 1] and max_rollbacks >= 0, got {self.rollback_lr_factor}, "
                f"{self.max_rollbacks}"
            )
        if self.stall_timeout_s < 0:
            raise ValueError(f"optim.stall_timeout_s must be >= 0 (0: no watchdog), got {self.stall_timeout_s}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"optim.compile_mode={self.compile_mode!r} is not one of {list(COMPILE_MODES)}")
        if not self.ddp_bucket_mb > 0:
            raise ValueError(f"optim.ddp_bucket_mb must be > 0, got {self.ddp_bucket_mb}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer={self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        if not self.base_lr > 0:
            raise ValueError(f"optim.base_lr must be > 0, got {self.base_lr}")
        if self.base_batch < 1 or self.max_iters < 1:
            raise ValueError(
                f"optim.base_batch and optim.max_iters must be >= 1, got {self.base_batch}, {self.max_iters}"
            )
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError(
                f"need optim.momentum in [0, 1) and weight_decay >= 0, got {self.momentum}, {self.weight_decay}"
            )
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError(f"optim.steps must be strictly increasing, got {list(self.steps)}")
        if self.steps and not 0 < self.steps[0] <= self.steps[-1] < self.max_iters:
            raise ValueError(
                f"optim.steps {list(self.steps)} must lie in 1..max_iters-1 ({self.max_iters - 1}): scale them with "
                f"the schedule, e.g. optim.steps=[{self.max_iters * 2 // 3},{self.max_iters * 8 // 9}]"
            )
        if not 0 < self.gamma <= 1:
            raise ValueError(f"optim.gamma must be in (0, 1], got {self.gamma}")
        if not 0 <= self.warmup_iters <= self.max_iters:
            raise ValueError(f"optim.warmup_iters must be in 0..max_iters ({self.max_iters}), got {self.warmup_iters}")
        if not 0 < self.warmup_factor <= 1:
            raise ValueError(f"optim.warmup_factor must be in (0, 1], got {self.warmup_factor}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(f"optim.clip_grad_norm must be > 0 or none, got {self.clip_grad_norm}")

    def lr_for(self, global_batch: int) -> float:
        """The linear scaling rule: ``base_lr * global_batch / base_batch``."""
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        return self.base_lr * global_batch / self.base_batch

    def lr_at(self, step: int, global_batch: int) -> float:
        """The lr of the iteration ``step`` (0-based: the number of iterations already done).

        ``lr_for(global_batch) * warmup * gamma ** k``, where ``k`` is the number of ``steps`` that are
        ``<= step`` and ``warmup = warmup_factor * (1 - t) + t`` with ``t = step / warmup_iters`` while
        ``step < warmup_iters``, else 1 (detectron2's ``WarmupMultiStepLR`` with linear warm-up). So step 0
        runs at ``warmup_factor`` times the lr, step ``warmup_iters`` at the full lr, and a decay at
        ``s`` applies from iteration ``s`` on.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        warmup = 1.0
        if step < self.warmup_iters:
            t = step / self.warmup_iters
            warmup = self.warmup_factor * (1 - t) + t
        return self.lr_for(global_batch) * warmup * self.gamma ** bisect.bisect_right(self.steps, step)


@dataclass(kw_only=True)
class ScalingConfig:
    """Ray Train workers (one DDP rank each). ``min_workers`` set: elastic between it and ``num_workers``."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0  # used only with use_gpu
    min_workers: int | None = None

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker < 1:
            raise ValueError(
                f"scaling.num_workers and cpus_per_worker must be >= 1, got {self.num_workers}, {self.cpus_per_worker}"
            )
        if self.use_gpu and not self.gpus_per_worker > 0:
            raise ValueError(f"scaling.gpus_per_worker must be > 0 with use_gpu, got {self.gpus_per_worker}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(
                f"scaling.min_workers must be in 1..num_workers ({self.num_workers}) or none, got {self.min_workers}"
            )

    @property
    def backend(self) -> str:
        """torch.distributed backend: NCCL between GPUs, gloo on CPUs."""
        return "nccl" if self.use_gpu else "gloo"


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where and how often checkpoints go; resuming is rerunning with the same storage_path and name."""

    storage_path: str = "runs"  # local folder or s3:// / gs:// prefix
    name: str = "retinanet"
    every: int = 1000  # steps
    keep_last: int = 3
    keep_best: bool = True  # write the best model by eval AP to NAME/best/ (a checkpoint evaluate.py takes)
    max_failures: int = 3  # worker failures to recover from by restarting at the last checkpoint; -1: no limit
    # SIGTERM (spot reclaim, node drain): every rank finishes its step, checkpoints, and the run restarts from
    # that step; not counted in max_failures. -1: no limit
    max_preemptions: int = -1
    # A checkpoint that cannot be uploaded within data.storage_retry_s is not registered (the previous one
    # stays the latest): "continue" training, or "stop" with the URI named
    on_upload_failure: str = "continue"
    # One driver per run: a second one on this name is refused until the lease (STORAGE/NAME/.lease) has gone
    # this long without renewal, or is taken over with jobs/train.py --force
    lease_ttl_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.storage_path:
            raise ValueError("checkpoint.storage_path is empty: give a folder or an s3:// prefix")
        if not self.name or "/" in self.name:
            raise ValueError(f"checkpoint.name must be a non-empty name without '/', got {self.name!r}")
        if self.every < 1 or self.keep_last < 1:
            raise ValueError(f"checkpoint.every and keep_last must be >= 1, got {self.every}, {self.keep_last}")
        if not self.lease_ttl_s > 0:
            raise ValueError(f"checkpoint.lease_ttl_s must be > 0 seconds, got {self.lease_ttl_s}")
        if self.on_upload_failure not in ("continue", "stop"):
            raise ValueError(f"checkpoint.on_upload_failure={self.on_upload_failure!r}: use 'continue' or 'stop'")
        if self.max_failures < -1 or self.max_preemptions < -1:
            raise ValueError(
                f"checkpoint.max_failures and max_preemptions must be >= -1 (-1: no limit), got {self.max_failures}, "
                f"{self.max_preemptions}"
            )


@dataclass(kw_only=True)
class EvalConfig:
    every: int = 5000  # steps; 0: only at the end
    at_end: bool = True
    max_images: int | None = None  # None: the whole validation set
    num_vis_images: int = 4  # images with drawn detections for TensorBoard

    def __post_init__(self) -> None:
        if self.every < 0 or self.num_vis_images < 0:
            raise ValueError(f"eval.every and num_vis_images must be >= 0, got {self.every}, {self.num_vis_images}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"eval.max_images must be >= 1 or none, got {self.max_images}")


@dataclass(kw_only=True)
class LogConfig:
    every: int = 20  # steps
    tensorboard: bool = True
    verbose: bool = False  # also show Ray's own INFO messages (always in Ray's log files)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"log.every must be >= 1, got {self.every}")


@dataclass(kw_only=True)
class TrainConfig:
    model: RetinaNetConfig
    data: DataConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0
    recipe: str  # the recipe this config started from, for the record

    def __post_init__(self) -> None:
        for name, tp in typing.get_type_hints(TrainConfig).items():
            if dataclasses.is_dataclass(tp) and not isinstance(getattr(self, name), tp):
                raise ValueError(f"{name} must be a {tp.__name__}, got {type(getattr(self, name)).__name__}")
        if not self.recipe:
            raise ValueError("recipe is empty: name the recipe this config came from")


# --- overrides and serialisation ---------------------------------------------------------------------------


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A new config with each ``dotted.key=value`` applied, then validated once as a whole (so the
    order of overrides does not matter: ``optim.max_iters=10 optim.steps=[8]`` works).

    Values are parsed by the field's type: ``true``/``false``/``1``/``0`` for bools, ``none``/``null`` for
    optional fields, ``[1,2]`` or ``1,2`` for tuples.
    """
    data = to_dict(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form dotted.key=value (e.g. optim.base_lr=0.02)")
        try:
            _set(type(cfg), data, key.split("."), text.strip(), "")
        except ValueError as e:
            raise ValueError(f"{item}: {e}") from e
    try:
        return from_dict(data, type(cfg))
    except ValueError as e:
        raise ValueError(f"{' '.join(overrides)}: {e}") from e


STORAGE_ENV = "RETINANET_STORAGE"


def storage_default(overrides: list[str]) -> list[str]:
    """``overrides`` after ``checkpoint.storage_path=$RETINANET_STORAGE`` when that variable is set (the cluster
    YAMLs set it on every node to the cluster's bucket), so a job stores there unless told otherwise."""
    where = os.environ.get(STORAGE_ENV, "").strip()
    return [f"checkpoint.storage_path={where}", *overrides] if where else list(overrides)


def format_override(key: str, value: Any) -> str:
    """``key=value`` in the form ``apply_overrides`` parses back to ``value`` (``[1.0,2.0]``, ``none``, ``true``):
    how sampled search values become a config, and how a best config is printed as ``--set`` arguments."""
    return f"{key}={_format_value(value)}"


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def _set(cls: type, data: dict, path: list[str], text: str, prefix: str) -> None:
    """Sets one parsed value in the plain-dict form of a ``cls`` config."""
    hints = _fields(cls)
    name, key = path[0], prefix + path[0]
    if name not in hints:
        raise ValueError(_unknown(key, prefix, hints))
    tp = hints[name]
    if len(path) > 1:
        if not dataclasses.is_dataclass(tp):
            raise ValueError(f"{key} is a value ({_type_name(tp)}), not a section: it has no key {path[1]!r}")
        _set(tp, data[name], path[1:], text, key + ".")
        return
    if dataclasses.is_dataclass(tp):
        raise ValueError(f"{key} is a section: set one of its keys, {', '.join(_fields(tp))}")
    data[name] = _plain(_parse(text, tp, key))


def to_dict(cfg: Any) -> dict:
    """The config as plain JSON types (tuples become lists); ``from_dict`` inverts it exactly."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def from_dict(d: dict, cls: type = TrainConfig) -> Any:
    """Rebuilds (and validates) a config from ``to_dict`` output; unknown keys are a ValueError."""
    return _build(cls, d, "")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def _build(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {d!r}")
    hints = _fields(cls)
    for key in d:
        if key not in hints:
            raise ValueError(_unknown(prefix + key, prefix, hints))
    values = {
        k: _build(hints[k], v, prefix + k + ".")
        if dataclasses.is_dataclass(hints[k])
        else _coerce(v, hints[k], prefix + k)
        for k, v in d.items()
    }
    try:
        return cls(**values)
    except TypeError as e:  # a required key is missing
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _fields(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's init fields (the component configs use postponed annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown(key: str, prefix: str, hints: dict[str, Any]) -> str:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, list(hints), n=1)
    hint = f" Did you mean {prefix + close[0]!r}?" if close else ""
    where = f"under {prefix.rstrip('.')!r}" if prefix else "at the top level"
    return f"unknown key {key!r}.{hint} Valid keys {where}: {', '.join(hints)}"


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp).replace("typing.", "")


def _optional(tp: Any) -> tuple[bool, Any]:
    """(whether None is allowed, the type without None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return len(args) < len(typing.get_args(tp)), args[0]
    return False, tp


def _parse(text: str, tp: Any, key: str) -> Any:
    """A command-line string -> a value of type ``tp``."""
    nullable, inner = _optional(tp)
    if nullable and text.lower() in ("none", "null"):
        return None
    bad = ValueError(f"{key} expects {_type_name(tp)}, got {text!r}")
    if inner is bool:
        bools = {"true": True, "false": False, "1": True, "0": False}
        if text.lower() not in bools:
            raise bad
        return bools[text.lower()]
    if inner in (int, float):
        try:
            return inner(text)
        except ValueError:
            raise bad from None
    if typing.get_origin(inner) is tuple:
        body = text[1:-1] if text[:1] + text[-1:] in ("[]", "()") else text
        items = [s.strip().strip("'\"") for s in body.split(",")] if body.strip() else []
        try:
            return _coerce([_parse(s, _item_type(inner, i), key) for i, s in enumerate(items)], inner, key)
        except ValueError:
            raise bad from None
    return _coerce(text, tp, key)


def _item_type(tp: Any, i: int) -> Any:
    args = typing.get_args(tp)
    return args[0] if len(args) == 2 and args[1] is Ellipsis else args[min(i, len(args) - 1)]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """A JSON value -> a value of type ``tp`` (lists become tuples; ints are accepted for floats)."""
    nullable, inner = _optional(tp)
    if value is None and nullable:
        return None
    if inner is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if inner in (bool, int, str) and type(value) is inner:
        return value
    if typing.get_origin(inner) is tuple and isinstance(value, list | tuple):
        args = typing.get_args(inner)
        if not (len(args) == 2 and args[1] is Ellipsis) and len(value) != len(args):
            raise ValueError(f"{key} expects {len(args)} values ({_type_name(tp)}), got {list(value)!r}")
        return tuple(_coerce(v, _item_type(inner, i), key) for i, v in enumerate(value))
    raise ValueError(f"{key} expects {_type_name(tp)}, got {value!r}")
