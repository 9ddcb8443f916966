"""``ray start --head`` on 127.0.0.1 + ``ray job submit --working-dir . -- python jobs/train.py``: the job
succeeds and its checkpoint and metrics land where the config says. Only the processes this test
started are stopped (found by the test's own Ray temp dir), never ``ray stop``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine.checkpoint import MODEL, checkpoint_name
from tests.conftest import free_port
from tests.engine.test_train import data  # noqa: F401  (fixture)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _stop_ours(temp_dir: Path) -> None:
    ours = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or []):
                ours.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in ours:
        proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(ours, timeout=15)
    for proc in alive:
        proc.kill()


def test_ray_job_submit_runs_the_training_job(data, tmp_path) -> None:  # noqa: F811
    temp_dir = Path("/tmp") / f"rayjob-{os.getpid()}-{time.time_ns() % 10**8}"  # short: socket paths are limited
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    port, dashboard = free_port(), free_port()
    head = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--temp-dir={temp_dir}",
        "--num-cpus=4",
        "--disable-usage-stats",
    ]
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
    runs = tmp_path / "runs"
    try:
        submit = [
            RAY,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{dashboard}",
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "jobs/train.py",
            "--recipe",
            "tiny_cpu",
            "--set",
            f"data.train_uri={data['train']}",
            "--set",
            f"data.val_uri={data['val']}",
            "--set",
            f"checkpoint.storage_path={runs}",
            "--set",
            "checkpoint.name=submitted",
            "--set",
            "optim.steps=[8]",
            "--set",
            "optim.max_iters=10",
            "--set",
            "eval.at_end=false",
        ]
        # The job's "python" is the one on the head's PATH: this environment's.
        job_env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
        done = subprocess.run(submit, env=job_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in (done.stdout + done.stderr).lower()
        assert (runs / "submitted" / checkpoint_name(10) / MODEL).exists()
        steps = [json.loads(line)["step"] for line in (runs / "submitted" / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1] == 10
    finally:
        _stop_ours(temp_dir)
