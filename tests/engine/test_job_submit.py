"""``ray start --head`` on 127.0.0.1 + ``ray job submit --working-dir . -- python jobs/train.py``: the job
succeeds and its checkpoint and metrics land where the config says."""

from __future__ import annotations

import json

import pytest

from engine.checkpoint import MODEL, checkpoint_name
from tests.engine.test_train import data  # noqa: F401  (fixture)
from tests.ray_head import ray_head, submit

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ray_job_submit_runs_the_training_job(data, tmp_path) -> None:  # noqa: F811
    runs = tmp_path / "runs"
    with ray_head() as (address, env):
        done = submit(
            address,
            env,
            ["python", "jobs/train.py", "--recipe", "tiny_cpu", "--set", f"data.train_uri={data['train']}",
             "--set", f"data.val_uri={data['val']}", "--set", f"checkpoint.storage_path={runs}",
             "--set", "checkpoint.name=submitted", "--set", "optim.steps=[8]", "--set", "optim.max_iters=10",
             "--set", "eval.at_end=false"],
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in (done.stdout + done.stderr).lower()
    assert (runs / "submitted" / checkpoint_name(10) / MODEL).exists()
    steps = [json.loads(line)["step"] for line in (runs / "submitted" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 10
