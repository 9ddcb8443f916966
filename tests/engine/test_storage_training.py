"""Training against object storage that fails, as a user runs it (``jobs/train.py`` in a subprocess, its own
embedded Ray), on the real S3 test server behind the fault-injecting proxy: an outage and throttling cost
time, not images or checkpoints; a checkpoint that cannot be written is not registered; workers that may not
write fail before step 1; a second driver on a run is refused until it takes the run over."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest

from engine import checkpoint as ckpt
from tests.engine.test_train import data  # noqa: F401  (fixture)
from tests.fault_proxy import FaultProxy

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
WRITES = (b"PUT", b"POST", b"DELETE")


@pytest.fixture
def proxy(s3_endpoint):
    # seed 1: the proxy's first draw is 0.13, so a 20% SlowDown hits from the first request on (seed 0's first
    # 25 draws are all above 0.2: a short run might never be throttled)
    with FaultProxy(urlparse(s3_endpoint).port, seed=1) as p:
        yield p


def _upload(folder: str, bucket: str, prefix: str) -> str:
    """Copies a local shard folder into the S3 server directly (not through the proxy); its ``s3://`` URI."""
    client = boto3.client("s3")
    for path in sorted(Path(folder).iterdir()):
        client.upload_file(str(path), bucket.removeprefix("s3://"), f"{prefix}/{path.name}")
    return f"{bucket}/{prefix}"


def _command(sets: list[str], *flags: str) -> list[str]:
    return [sys.executable, "jobs/train.py", "--recipe", "tiny_cpu", *[a for s in sets for a in ("--set", s)], *flags]


def _env(endpoint: str) -> dict[str, str]:
    return {**os.environ, "AWS_ENDPOINT_URL": endpoint, "RAY_AUTH_MODE": "disabled"}


def _train(sets: list[str], endpoint: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(_command(sets, *flags), cwd=ROOT, env=_env(endpoint), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _when_committed(bucket: str, key: str, then, timeout: float = 300) -> threading.Thread:
    """Calls ``then()`` once ``key`` exists in the S3 server (asked directly, not through the proxy)."""
    client = boto3.client("s3")

    def watch() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if client.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount"):
                then()
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _history(name: str) -> list[dict]:
    """The run's metrics.jsonl (object storage runs log to ./runs/NAME on the driver's machine)."""
    return [json.loads(line) for line in (ROOT / "runs" / name / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def run_name():
    name = f"storage-{uuid.uuid4().hex[:8]}"
    yield name
    shutil.rmtree(ROOT / "runs" / name, ignore_errors=True)


@pytest.mark.timeout(600)
def test_an_outage_and_throttling_cost_time_not_images_or_checkpoints(data, s3_bucket, proxy, run_name) -> None:  # noqa: F811
    """After the first checkpoint the endpoint refuses every connection for 30 s, and 20% of reads are
    answered 503 SlowDown throughout; no restart is allowed. The run reaches max_iters, every registered
    checkpoint is complete, and each complete epoch handed out every image exactly once."""
    train_uri = _upload(data["train"], s3_bucket, "shards/train")
    bucket = s3_bucket.removeprefix("s3://")
    sets = [f"data.train_uri={train_uri}", "data.val_uri=none", f"checkpoint.storage_path={s3_bucket}/runs",
            f"checkpoint.name={run_name}", "checkpoint.max_failures=0", "checkpoint.every=4", "checkpoint.keep_last=10",
            "optim.max_iters=16", "optim.steps=[12]", "log.every=4", "eval.every=0"]  # fmt: skip
    proxy.slowdown(share=0.2, methods=(b"GET", b"HEAD"))  # reads

    def outage() -> None:
        proxy.refuse(30)

    watcher = _when_committed(bucket, f"runs/{run_name}/{ckpt.checkpoint_name(4)}/{ckpt.COMMIT}", outage)
    job = _train(sets, proxy.url)
    out, err = job.communicate(timeout=540)
    watcher.join(timeout=1)
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    assert proxy.stats["refused_windows"] == 1 and proxy.stats["slowdowns"] > 0, proxy.stats
    history = _history(run_name)
    assert max(h["step"] for h in history if "loss" in h) == 16
    assert not [h for h in history if h.get("event") in ("checkpoint_failed", "workers") and h["step"] > 0]

    run_uri = f"{s3_bucket}/runs/{run_name}"
    steps = [4, 8, 12, 16]
    for step in steps:
        assert ckpt.incomplete_reason(f"{run_uri}/{ckpt.checkpoint_name(step)}") is None, step
    (seen,) = [h for h in history if h.get("event") == "data_seen"]
    ids = _image_ids(data["train"])
    epochs = {int(e): v for e, v in seen["epochs"].items()}
    complete = [e for e in epochs if e < max(epochs)]  # the last one may be read only in part
    assert complete and all(epochs[e] == [len(ids), sum(ids)] for e in complete), (epochs, len(ids), sum(ids))
    assert seen["stats"].get("truncated_shards", 0) == 0, seen["stats"]
    assert "failed (EndpointConnectionError" in err, "the outage must have been met and waited out"
    assert f"checkpoint: {run_uri}/{ckpt.checkpoint_name(16)}" in out


def _image_ids(folder: str) -> list[int]:
    return [image["id"] for image in json.loads((Path(folder) / "ground_truth.json").read_text())["images"]]


@pytest.mark.timeout(600)
def test_a_checkpoint_that_cannot_be_written_is_not_registered(data, s3_bucket, proxy, run_name) -> None:  # noqa: F811
    """Data on local disk, checkpoints in S3 through the proxy. After the first checkpoint, every write is
    answered 503 SlowDown until a checkpoint upload has failed (its retry window, ``data.storage_retry_s``,
    is 3 s here). Training completes; the failed checkpoint never got its commit marker and is not the
    latest; the one before it is intact; the next ones are written."""
    bucket = s3_bucket.removeprefix("s3://")
    sets = [f"data.train_uri={data['train']}", "data.val_uri=none", f"checkpoint.storage_path={s3_bucket}/runs",
            f"checkpoint.name={run_name}", "checkpoint.max_failures=0", "checkpoint.every=4", "checkpoint.keep_last=10",
            "optim.max_iters=16", "optim.steps=[12]", "log.every=4", "eval.every=0",
            "data.storage_retry_s=3"]  # fmt: skip
    _when_committed(bucket, f"runs/{run_name}/{ckpt.checkpoint_name(4)}/{ckpt.COMMIT}",
                    lambda: proxy.slowdown(share=1.0, methods=WRITES))  # fmt: skip
    job = _train(sets, proxy.url)
    log = ROOT / "runs" / run_name / "metrics.jsonl"
    deadline = time.time() + 400
    while job.poll() is None and time.time() < deadline:
        if log.exists() and '"checkpoint_failed"' in log.read_text():
            proxy.clear()  # writes work again
            break
        time.sleep(0.2)
    out, err = job.communicate(timeout=400)
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    (failed,) = [h for h in _history(run_name) if h.get("event") == "checkpoint_failed"]
    step = failed["step"]
    run_uri = f"{s3_bucket}/runs/{run_name}"
    assert failed["uri"] == f"{run_uri}/{ckpt.checkpoint_name(step)}"
    assert f"the checkpoint of step {step} could not be written to {failed['uri']}" in out + err
    assert ckpt.incomplete_reason(failed["uri"]) is not None
    assert ckpt.incomplete_reason(f"{run_uri}/{ckpt.checkpoint_name(step - 4)}") is None
    assert ckpt.latest_complete(run_uri) == f"{run_uri}/{ckpt.checkpoint_name(16)}"
    assert ckpt.latest_complete(run_uri, before_step=step + 1) == f"{run_uri}/{ckpt.checkpoint_name(step - 4)}"


@pytest.mark.timeout(300)
def test_workers_that_may_not_write_fail_before_step_1_naming_the_uri(data, s3_bucket, proxy, run_name) -> None:  # noqa: F811
    """The driver writes through the S3 server directly (its lease is taken), the workers get read-only
    access through the job's runtime environment (every write through the proxy is denied)."""
    import ray

    from engine.driver import run
    from tests.engine.test_train import _cfg

    proxy.deny_writes()
    cfg = _cfg(data, f"{s3_bucket}/runs", run_name, "data.val_uri=none", "optim.max_iters=10", "optim.steps=[8]")
    env = {"PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL": proxy.url}
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, runtime_env={"env_vars": env},
             logging_level="WARNING")  # fmt: skip
    try:
        with pytest.raises(ValueError) as raised:
            run(cfg)
    finally:
        ray.shutdown()
    message = str(raised.value)
    assert f"the training workers cannot write to {s3_bucket}/runs/{run_name}" in message, message
    assert "AccessDenied" in message or "denied" in message.lower(), message
    assert proxy.stats["denied"] > 0
    assert not (ROOT / "runs" / run_name / "metrics.jsonl").exists(), "nothing may have trained"


@pytest.mark.timeout(600)
def test_a_second_driver_is_refused_until_it_takes_the_run_over(data, tmp_path, s3_endpoint) -> None:  # noqa: F811
    sets = [f"data.train_uri={data['train']}", "data.val_uri=none", f"checkpoint.storage_path={tmp_path}",
            "checkpoint.name=twice", "checkpoint.every=4", "optim.max_iters=30", "optim.steps=[25]", "log.every=2",
            "eval.every=0", "checkpoint.lease_ttl_s=6"]  # fmt: skip
    log = tmp_path / "twice" / "metrics.jsonl"
    first = _train(sets, s3_endpoint)
    try:
        _wait_for(lambda: log.exists() and '"loss"' in log.read_text(), first)
        refused = subprocess.run(_command(sets), cwd=ROOT, env=_env(s3_endpoint), capture_output=True, text=True,
                                 timeout=300)  # fmt: skip
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert f"{tmp_path}/twice is being written by driver" in refused.stderr
        assert f"pid {first.pid} on " in refused.stderr and "--force" in refused.stderr
        assert "Traceback" not in refused.stderr

        second = _train(sets, s3_endpoint, "--force")  # resumes from the first driver's latest checkpoint
        out, err = first.communicate(timeout=300)
        assert first.returncode != 0, out[-2000:] + err[-2000:]
        assert "error: another driver took this run over" in err and f"pid {second.pid}" in err, err[-2000:]
        assert "Traceback" not in err
        out, err = second.communicate(timeout=400)
        assert second.returncode == 0, out[-2000:] + err[-2000:]
    finally:
        for job in (first, locals().get("second")):
            if job is not None and job.poll() is None:
                job.kill()
    assert ckpt.latest_complete(str(tmp_path / "twice")).endswith(ckpt.checkpoint_name(30))
    resumed = [json.loads(line) for line in log.read_text().splitlines() if '"resumed"' in line]
    assert resumed and resumed[-1]["step"] > 0, "the second driver goes on from the first one's checkpoint"


def _wait_for(condition, job: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and job.poll() is None:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not reached; the job ended with {job.returncode}: {job.stderr.read()[-2000:]}")
