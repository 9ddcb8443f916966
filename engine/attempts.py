"""Attempts of one run: ``TorchTrainer.fit`` again after a failure or a preemption, until the run is done or
an error no restart can fix ends it."""

from __future__ import annotations

from collections.abc import Callable

from ray.train import Result, TrainingFailedError

from engine import checkpoint as ckpt
from engine.config import TrainConfig
from engine.errors import TrainingError, exit_code, is_final
from engine.faults import Faults
from engine.lease import Lease
from engine.trainer import run_uri


def fit(
    cfg: TrainConfig,
    callbacks: Callable[[], list] | None = None,
    faults: Faults | None = None,
    held: Lease | None = None,
    lost: list[Lease] | None = None,
) -> Result:
    """Attempts until the run reaches ``max_iters``. Each attempt resumes from the run's latest checkpoint. A
    preempted attempt (SIGTERM: it checkpointed and stopped) starts again, up to ``checkpoint.max_preemptions``;
    a failed one (a dead or stalled worker, a broken connection) up to ``checkpoint.max_failures``; an error no
    restart can fix (bad data, divergence) ends the run at once. ``held``: the run's lease (rank 0 renews it);
    ``lost``: filled by the driver's lease keeper when another driver took the run over (no more attempts)."""
    from engine.driver import build_trainer  # the driver imports this module

    limits = {"failure": cfg.checkpoint.max_failures, "preemption": cfg.checkpoint.max_preemptions}
    counts = dict.fromkeys(limits, 0)
    while True:
        if lost:
            raise TrainingError(f"another driver took this run over: {lost[0].describe()}; this one stops here")
        try:
            result = build_trainer(cfg, callbacks() if callbacks else None, faults, held).fit()
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
    latest = ckpt.latest_complete(run_uri(cfg))
    key = "max_failures" if kind == "failure" else "max_preemptions"
    return (
        f"{error}\ngave up after {count} {kind}s (checkpoint.{key}={getattr(cfg.checkpoint, key)}); the latest "
        f"complete checkpoint is {latest or 'none'}: rerun the same command to resume from it"
    )
