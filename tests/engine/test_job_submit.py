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


def _stop_ours(temp_dir: Path, gcs_port: int) -> None:
    """Ends the head this test started: processes naming its temp dir or its GCS port (the client
    server), and all their descendants (Ray's agents rename themselves and name neither)."""
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            parts = proc.info["cmdline"] or []
            if any(str(temp_dir) in p or (p.startswith("--address=") and p.endswith(f":{gcs_port}")) for p in parts):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    ours = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)]}
    for proc in ours.values():
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(ours.values()), timeout=15)
    for proc in alive:
        proc.kill()


def test_ray_job_submit_runs_the_training_job(data, tmp_path) -> None:  # noqa: F811
    temp_dir = Path("/tmp") / f"rayjob-{os.getpid()}-{time.time_ns() % 10**8}"  # short: socket paths are limited
    # The job's "python" is the one on the head's PATH: put this environment's first.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard, agent, client, metrics = (free_port() for _ in range(5))
    head = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
        f"--ray-client-server-port={client}",
        f"--metrics-export-port={metrics}",
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
        for _ in range(30):  # the head's job agent comes up a few seconds after `ray start` returns
            done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in done.stdout + done.stderr:
                break
            time.sleep(2)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in (done.stdout + done.stderr).lower()
        assert (runs / "submitted" / checkpoint_name(10) / MODEL).exists()
        steps = [json.loads(line)["step"] for line in (runs / "submitted" / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1] == 10
    finally:
        _stop_ours(temp_dir, port)
