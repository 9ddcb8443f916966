"""Training that loses nothing, on a real local Ray cluster: divergence caught (stop and rollback), a data
error that no restart can fix ends the run at once, incomplete checkpoints refused and skipped, a stalled
rank restarts the run, and SIGTERM checkpoints the step it came in."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine.driver import log_dir, run
from engine.errors import TrainingError
from engine.faults import Faults
from tests.engine.test_train import _cfg, _history, data, ray_local  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SHORT = ["data.val_uri=none", "optim.max_iters=20", "optim.steps=[15]", "checkpoint.every=5", "log.every=5"]


def _events(cfg, name: str) -> list[dict]:
    return [h for h in _history(cfg) if h.get("event") == name]


def _finite(directory: Path) -> bool:
    weights = torch.load(directory / ckpt.MODEL, weights_only=True)
    return all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(data, ray_local, tmp_path) -> None:  # noqa: F811
    cfg = _cfg(data, str(tmp_path), "nan-stop", *SHORT, "checkpoint.max_failures=3")
    with pytest.raises(TrainingError) as raised:
        run(cfg, faults=Faults(nan_at_step=8))
    message = str(raised.value)
    assert raised.value.exit_code == 1
    assert "training diverged at step 8" in message and "loss nan" in message, message
    assert f"{tmp_path}/nan-stop/checkpoint_00000005 (step 5)" in message and "on_divergence=rollback" in message
    saved = sorted(p.name for p in (tmp_path / "nan-stop").glob("checkpoint_0*"))
    assert saved == ["checkpoint_00000005"], "nothing may be checkpointed after the last finite step"
    assert _finite(tmp_path / "nan-stop" / saved[0])
    assert len(_events(cfg, "workers")) == 1, "a divergence must not be retried"


def test_nan_loss_rolls_back_and_completes(data, ray_local, tmp_path) -> None:  # noqa: F811
    cfg = _cfg(data, str(tmp_path), "nan-rollback", *SHORT, "optim.on_divergence=rollback")
    result = run(cfg, faults=Faults(nan_at_step=8))
    assert result.metrics["step"] == 20
    (event,) = _events(cfg, "rollback")
    assert (event["diverged_at"], event["to_step"], event["lr_scale"], event["rollbacks"]) == (8, 5, 0.5, 1)
    final = tmp_path / "nan-rollback" / "checkpoint_00000020_r1"
    assert _finite(final) and ckpt.incomplete_reason(str(final)) is None
    state = ckpt.load_train_state(final)
    assert (state.lr_scale, state.rollbacks) == (0.5, 1)
    losses = [h["loss"] for h in _history(cfg) if "loss" in h and h["step"] > 10]
    assert losses and all(x == x for x in losses), losses  # finite again after the rollback


def test_lr_1e12_exits_with_the_divergence_and_no_nan_checkpoint(data, tmp_path) -> None:  # noqa: F811
    """SGD at lr 1e12 is NaN within two steps: the job says so and exits 1, without a traceback, and
    whatever it checkpointed (and its best/) holds finite weights."""
    sets = [f"data.train_uri={data['train']}", f"data.val_uri={data['val']}", f"checkpoint.storage_path={tmp_path}",
            "checkpoint.name=lr1e12", "optim.optimizer=sgd", "optim.base_lr=1e12", "optim.warmup_iters=0",
            "optim.clip_grad_norm=none", "optim.max_iters=10", "optim.steps=[8]", "checkpoint.every=2",
            "log.every=2", "eval.every=4", "eval.max_images=4"]  # fmt: skip
    done = subprocess.run([sys.executable, "jobs/train.py", "--recipe", "tiny_cpu", *[a for s in sets for a in
                           ("--set", s)]], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "error: training diverged at step" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    for folder in [*(tmp_path / "lr1e12").glob("checkpoint_0*"), tmp_path / "lr1e12" / "best"]:
        if folder.exists():
            assert _finite(folder), folder


def _label_outside(shard: Path, label: int) -> int:
    """Rewrites the shard with its first record's first label set to ``label``; returns that image's id."""
    members = []
    with tarfile.open(shard) as tar:
        for info in tar:
            members.append((info, tar.extractfile(info).read()))
    first = next(i for i, (info, _) in enumerate(members) if info.name.endswith(".json"))
    record = json.loads(members[first][1])
    record["labels"] = [label, *record["labels"][1:]]
    members[first] = (members[first][0], json.dumps(record).encode())
    with tarfile.open(shard, "w") as tar:
        for info, payload in members:
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return record["image_id"]


def test_a_label_outside_the_manifest_fails_the_first_attempt(data, ray_local, tmp_path) -> None:  # noqa: F811
    train = tmp_path / "train"
    shutil.copytree(data["train"], train)
    first = _cfg({**data, "train": str(train)}, str(tmp_path), "bad-label", "data.val_uri=none", "optim.max_iters=10",
                 "optim.steps=[8]", "checkpoint.every=5", "log.every=5")  # fmt: skip
    assert run(first).metrics["step"] == 10
    image_id = _label_outside(sorted(train.glob("*.tar"))[2], label=7)  # the data has 5 classes
    again = _cfg({**data, "train": str(train)}, str(tmp_path), "bad-label", *SHORT, "optim.max_iters=40",
                 "optim.steps=[30]", "checkpoint.max_failures=3")  # fmt: skip
    with pytest.raises(TrainingError) as raised:
        run(again)
    assert raised.value.exit_code == 2
    assert f"image {image_id}" in str(raised.value) and "outside the manifest's 5 categories" in str(raised.value)
    assert len(_events(again, "workers")) == 2, "one attempt of the second run, not max_failures + 1"
    for step in (5, 10):
        assert ckpt.incomplete_reason(str(tmp_path / "bad-label" / ckpt.checkpoint_name(step))) is None


def test_incomplete_checkpoint_is_refused_and_skipped_and_best_evaluates(data, ray_local, tmp_path) -> None:  # noqa: F811
    cfg = _cfg(data, str(tmp_path), "commit", "optim.max_iters=10", "optim.steps=[8]", "checkpoint.every=5",
               "log.every=5", "eval.every=0", "eval.max_images=4")  # fmt: skip
    assert run(cfg).metrics["step"] == 10
    evaluate = [sys.executable, "jobs/evaluate.py", "--data", data["val"], "--max-images", "4", "--checkpoint"]
    best = subprocess.run([*evaluate, str(tmp_path / "commit" / "best")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert best.returncode == 0 and "AP50" in best.stdout, best.stderr[-2000:]
    latest = tmp_path / "commit" / ckpt.checkpoint_name(10)
    (latest / ckpt.COMMIT).unlink()  # as if the upload had stopped before its last file
    refused = subprocess.run([*evaluate, str(latest)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "incomplete checkpoint" in refused.stderr
    assert "newest complete checkpoint of this run is" in refused.stderr and "checkpoint_00000005" in refused.stderr

    more = _cfg(data, str(tmp_path), "commit", "data.val_uri=none", "optim.max_iters=15", "optim.steps=[8]",
                "checkpoint.every=5", "log.every=5")  # fmt: skip
    assert run(more).metrics["step"] == 15
    resumed = _events(more, "resumed")
    assert resumed[-1]["step"] == 5 and resumed[-1]["checkpoint"].endswith("checkpoint_00000005"), resumed


def test_a_stalled_rank_trips_the_watchdog_and_the_run_restarts(data, ray_local, tmp_path) -> None:  # noqa: F811
    cfg = _cfg(data, str(tmp_path), "stall", *SHORT[:2], "optim.max_iters=14", "optim.steps=[12]",
               "checkpoint.every=5", "log.every=5", "optim.stall_timeout_s=5", "checkpoint.max_failures=1")  # fmt: skip
    faults = Faults(stall_at_step=8, stall_rank=1, once_dir=str(tmp_path / "faults"))
    assert run(cfg, faults=faults).metrics["step"] == 14
    stacks = list(log_dir(cfg).glob("stall-rank*.txt"))
    assert stacks, "the stalled rank must dump its stacks"
    text = "".join(p.read_text() for p in stacks)
    assert "no training step completed" in text and "_data_source_stalls" in text
    assert [e["step"] for e in _events(cfg, "resumed")] == [5]


def _train_workers(root_pid: int) -> list[int]:
    import psutil

    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def _wait_for_step(jsonl: Path, job: subprocess.Popen, step: int, timeout: float = 240) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and job.poll() is None:
        lines = jsonl.read_text().splitlines() if jsonl.exists() else []
        if any(json.loads(line).get("step", 0) >= step and "loss" in json.loads(line) for line in lines):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} was never logged in {jsonl}")


def test_sigterm_checkpoints_its_step_and_the_job_output_is_ours(data, s3_bucket, tmp_path) -> None:  # noqa: F811
    """A spot reclaim: SIGTERM to one worker process. Every rank finishes that step and checkpoints it, the
    run restarts from exactly there (max_failures=0: no failure is spent) and completes. The job's output
    (data in the S3 server) has our progress and evaluation lines, and none of Ray's or botocore's chatter."""
    import os
    import signal

    from pipeline.coco import load_coco
    from pipeline.shards import ShardOptions, write_shards

    raw = Path(data["train"]).parent.parent / "raw" / "train"
    train = f"{s3_bucket}/train"
    options = ShardOptions(shard_images=8, progress=False)
    write_shards(load_coco(raw / "annotations.json"), raw / "images", train, options)
    sets = [f"data.train_uri={train}", f"data.val_uri={data['val']}", f"checkpoint.storage_path={tmp_path}",
            "checkpoint.name=sigterm", "checkpoint.max_failures=0", "checkpoint.every=1000", "optim.max_iters=16",
            "optim.steps=[14]", "log.every=1", "eval.every=0", "eval.max_images=4"]  # fmt: skip
    command = [sys.executable, "jobs/train.py", "--recipe", "tiny_cpu", *[a for s in sets for a in ("--set", s)]]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(tmp_path / "sigterm" / "metrics.jsonl", job, 5)
        workers = _train_workers(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGTERM)
        out, _ = job.communicate(timeout=600)
    finally:
        job.kill()
    assert job.returncode == 0, out[-3000:]
    history = [json.loads(line) for line in (tmp_path / "sigterm" / "metrics.jsonl").read_text().splitlines()]
    (preempted,) = [h for h in history if h.get("event") == "preempted"]
    resumed = [h for h in history if h.get("event") == "resumed"]
    assert preempted["step"] - preempted["signal_step"] in (0, 1), preempted
    assert [r["step"] for r in resumed] == [preempted["step"]], "the run resumes at the step SIGTERM came in"
    assert [h["step"] for h in history if "loss" in h][-1] == 16
    for line in ("Reporting training result", "PreemptionWatcher", "Found credentials", "INFO", "Traceback"):
        assert line not in out, f"{line!r} in the job's output:\n{out[-3000:]}"
    assert "step 16/16 | loss" in out and "evaluation at step 16" in out and "preempted: checkpoint at step" in out
