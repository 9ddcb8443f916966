"""A ``ray start --head`` on 127.0.0.1 that a test owns, for ``ray job submit`` tests. Only the processes
this head started are stopped (found by its own temp dir and port), never with ``ray stop``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from tests.conftest import free_port

RAY = str(Path(sys.executable).with_name("ray"))


@contextlib.contextmanager
def ray_head(num_cpus: int = 4) -> Iterator[tuple[str, dict[str, str]]]:
    """Yields ``(dashboard address, env)``: ``env`` runs ``ray job`` commands against this head, and
    puts this environment's Python first on PATH (a job's ``python`` is the one on the head's PATH)."""
    temp_dir = Path("/tmp") / f"rayjob-{os.getpid()}-{time.time_ns() % 10**8}"  # short: socket paths are limited
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)  # it would override --address
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
        f"--num-cpus={num_cpus}",
        "--disable-usage-stats",
    ]
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop_ours(temp_dir, port)


def submit(address: str, env: dict[str, str], entrypoint: list[str], *options: str) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir REPO [options] -- entrypoint``, retried while the head's job agent
    is still coming up (a few seconds after ``ray start`` returns)."""
    root = Path(__file__).resolve().parents[1]
    command = [RAY, "job", "submit", "--address", address, "--working-dir", str(root), *options, "--", *entrypoint]
    for _ in range(30):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stdout + done.stderr:
            return done
        time.sleep(2)
    return done


def job_logs(address: str, submission_id: str) -> str:
    """A job's output so far, through the head's job API in this process: polling with ``ray job logs``
    started a Python process (about 2 CPU seconds) per look, taken from the job under test."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address).get_job_logs(submission_id)


def _stop_ours(temp_dir: Path, gcs_port: int) -> None:
    """Ends the head: processes naming its temp dir or its GCS port (the client server), and all their
    descendants (Ray's agents rename themselves and name neither)."""
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
