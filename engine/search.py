"""Ray Tune over training runs: a ``Tuner`` whose trials each launch one ``TorchTrainer`` through
``engine.driver.build_trainer``, the same code path as ``jobs/train.py``.

Layout under ``checkpoint.storage_path``::

    NAME/                  Tune's experiment (restored by --resume), one trial_<id>/ per trial
    NAME/search.json       what was searched: recipe, overrides, spaces (a resume must match it)
    NAME/runs/<trial id>/  each trial's Ray Train run: checkpoints, metrics.jsonl and TensorBoard (under logs/
                           for object storage)
    NAME/results.{csv,json,png}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.config import TrainConfig, apply_overrides, from_dict, to_dict
from engine.driver import absolute, check_shared_storage, fit, init_ray, preflight, storage_path
from engine.recipes import get_recipe
from engine.spaces import Param, as_override, resolve
from pipeline import storage
from pipeline.loader import open_dataset

SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")
DRIVER_CPU = 0.25  # each trial's driver function only waits on its workers (Tune refuses 0)
METRIC = "AP"  # COCO AP on the validation split, reported at every evaluation: the default to rank by


@dataclass(kw_only=True)
class SearchConfig:
    """A search: the base run (``recipe`` + ``overrides``) and what varies around it."""

    name: str
    recipe: str
    overrides: list[str] = field(default_factory=list)  # --set items applied to every trial
    space: str = ""  # named spaces joined by "+"
    params: list[str] = field(default_factory=list)  # extra --param KEY=V1,V2 grids
    samples: int = 1  # per grid point (random searcher) or in all (optuna)
    scheduler: str = "asha"
    searcher: str = "random"
    grace_period: int | None = None  # steps before ASHA may stop a trial; default: eval.every
    reduction_factor: int = 2
    max_concurrent: int | None = None  # default: as many as the cluster's resources hold
    metric: str = METRIC  # what trials are ranked and stopped by: a COCO number, AP/<class> or AP50/<class>

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"the search name must be non-empty without '/', got {self.name!r}")
        if self.scheduler not in SCHEDULERS or self.searcher not in SEARCHERS:
            raise ValueError(
                f"scheduler must be one of {list(SCHEDULERS)} and searcher one of {list(SEARCHERS)}, "
                f"got {self.scheduler!r}, {self.searcher!r}"
            )
        if self.samples < 1 or self.reduction_factor < 2:
            raise ValueError(f"need samples >= 1 and reduction_factor >= 2: {self.samples}, {self.reduction_factor}")
        if self.grace_period is not None and self.grace_period < 1:
            raise ValueError(f"grace_period must be >= 1 step, got {self.grace_period}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")


def base_config(search: SearchConfig) -> TrainConfig:
    cfg = apply_overrides(get_recipe(search.recipe), search.overrides)
    if not cfg.data.val_uri:
        raise ValueError(f"a search ranks trials by validation {search.metric}: set data.val_uri")
    return cfg


def check_metric(metric: str, class_names: list[str]) -> None:
    """``metric`` is one that every evaluation reports: a COCO summary number (``METRIC_NAMES``) or
    ``AP/<class>`` / ``AP50/<class>`` for a class of the validation data; ``ValueError`` otherwise."""
    from engine.coco_eval import METRIC_NAMES

    kind, sep, name = metric.partition("/")
    if not sep and metric in METRIC_NAMES:
        return
    if sep and kind in ("AP", "AP50") and name in class_names:
        return
    shown = ", ".join(class_names[:6]) + (", ..." if len(class_names) > 6 else "")
    raise ValueError(f"--metric {metric!r} is not reported: use one of {', '.join(METRIC_NAMES)}, or AP/<class> or "
                     f"AP50/<class> with a class of the validation data ({shown})")  # fmt: skip


def search_uri(cfg: TrainConfig, search: SearchConfig) -> str:
    return f"{storage_path(cfg).rstrip('/')}/{search.name}"


def trial_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one trial holds: its Train workers plus the Tune function that drives them."""
    s = cfg.scaling
    need = {"CPU": s.num_workers * s.cpus_per_worker + DRIVER_CPU}
    if s.use_gpu:
        need["GPU"] = s.num_workers * s.gpus_per_worker
    return need


def max_concurrent_trials(per_trial: dict[str, float], cluster: dict[str, float]) -> int:
    """How many trials' workers fit in ``cluster`` at once (``ray.cluster_resources()``)."""
    fits = []
    for name, need in per_trial.items():
        have = cluster.get(name, 0.0)
        if need > 0 and have < need:
            raise ValueError(
                f"one trial needs {need:g} {name} (scaling.num_workers x per-worker) but the cluster has {have:g}: "
                "lower scaling.num_workers or add nodes; on an autoscaling cluster whose GPU nodes start on "
                "demand, give --max-concurrent N"
            )
        if need > 0:
            fits.append(math.floor(have / need + 1e-9))
    return max(1, min(fits, default=1))


def run_trial(config: dict[str, Any], base: dict, runs_uri: str) -> None:
    """One trial (a Tune function trainable): the base config plus the sampled values, trained as a
    Train run named by the trial id, so a restarted trial resumes from its checkpoints."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    overrides = [as_override(k, v) for k, v in config.items()]
    where = [f"checkpoint.storage_path={runs_uri}", f"checkpoint.name={trial_id}"]
    cfg = apply_overrides(from_dict(base), [*overrides, *where])
    fit(cfg, callbacks=lambda: [TuneReportCallback()])  # raises if the run failed: the trial errors


def _dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def build_tuner(search: SearchConfig, cfg: TrainConfig, params: list[Param], concurrency: int, resume: bool):
    """A new ``Tuner``, or (``resume``) the one stored at ``search_uri``: finished and errored trials are kept,
    unfinished ones continue (each Train run from its latest checkpoint). A search killed before Tune saved
    its state starts over."""
    from ray import tune

    uri = search_uri(cfg, search)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(absolute(cfg)), runs_uri=f"{uri}/runs"),
        {"CPU": DRIVER_CPU},
    )
    if resume and tune.Tuner.can_restore(uri):
        return tune.Tuner.restore(uri, trainable, resume_unfinished=True, resume_errored=False)
    grid = search.searcher == "random"
    return tune.Tuner(
        trainable,
        param_space={p.key: p.domain(grid) for p in params},
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode="max",
            scheduler=_scheduler(search, cfg),
            search_alg=_searcher(search),
            num_samples=search.samples,
            max_concurrent_trials=concurrency,
            trial_dirname_creator=_dirname,
        ),
        run_config=tune.RunConfig(
            name=search.name,
            storage_path=storage_path(cfg),
            failure_config=tune.FailureConfig(max_failures=0),  # worker failures are Train's to retry
            verbose=1,
        ),
    )


def _scheduler(search: SearchConfig, cfg: TrainConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if search.scheduler == "fifo":
        return FIFOScheduler()
    grace = search.grace_period or cfg.eval.every or cfg.optim.max_iters
    return ASHAScheduler(
        time_attr="step",
        max_t=cfg.optim.max_iters,
        grace_period=min(grace, cfg.optim.max_iters),
        reduction_factor=search.reduction_factor,
    )


def _searcher(search: SearchConfig):
    if search.searcher == "random":
        return None  # Tune's variant generator: grids expanded, ranges sampled
    try:
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch()
    except (ImportError, AssertionError) as e:
        raise ValueError(f"--searcher optuna needs the optuna package ({e}): pip install optuna") from None


@dataclass
class SearchOutcome:
    grid: Any  # ray.tune.ResultGrid: one Result per trial
    cfg: TrainConfig  # the base config every trial started from
    params: list[Param]
    concurrency: int
    uri: str  # the search's folder


def run_search(search: SearchConfig, resume: bool = False) -> SearchOutcome:
    """Checks everything a trial would (config values, data, storage), then runs or resumes the search."""
    import ray

    cfg = base_config(search)
    params = resolve(search.space, cfg, search.params)
    _searcher(search)  # a missing optuna fails here, not after Ray started
    preflight(cfg)
    check_metric(search.metric, [c["name"] for c in open_dataset(cfg.data.val_uri).manifest["categories"]])
    uri = search_uri(cfg, search)
    record = {**asdict(search), "max_concurrent": None}  # concurrency may change between runs
    saved = f"{uri}/search.json"
    started = storage.exists(saved)
    if resume and not started:
        raise ValueError(f"no search named {search.name!r} at {uri} to resume: start it without --resume")
    if started and not resume:
        raise ValueError(f"a search named {search.name!r} exists at {uri}: add --resume to continue it, or pick --name")
    if resume:
        before = {"metric": METRIC, **json.loads(storage.read_bytes(saved)), "max_concurrent": None}
        if before != record:
            raise ValueError(f"--resume must repeat the search's arguments; it was started with {before}")
    init_ray(cfg.log.verbose)
    check_shared_storage(cfg)
    concurrency = search.max_concurrent or max_concurrent_trials(trial_resources(cfg), ray.cluster_resources())
    if not resume:
        storage.write_bytes(saved, json.dumps(record, indent=1).encode())
    tuner = build_tuner(search, cfg, params, concurrency, resume)
    # Only evaluation steps carry AP; the checkpoint-only reports between them do not.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    return SearchOutcome(tuner.fit(), cfg, params, concurrency, uri)
