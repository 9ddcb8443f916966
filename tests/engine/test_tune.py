"""Tune searches on a real local Ray: 4 trials of 1-worker CPU training, 2 at a time under ASHA, one trial
given a corrupt weights file, under ``ray job submit`` with the driver stopped mid-search and resumed with
--resume (the whole report is checked after the resume); and an embedded search with Optuna."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from tests.engine.test_train import data  # noqa: F401  (fixture)
from tests.ray_head import RAY, job_logs, ray_head, submit

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
MAX_ITERS = 10


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    """Two loadable ResNet-18 state dicts and a truncated one (a broken download)."""
    root = tmp_path_factory.mktemp("weights")
    paths = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths[f"r18_{seed}"] = str(root / f"r18_{seed}.pth")
        torch.save(torchvision.models.resnet18().state_dict(), paths[f"r18_{seed}"])
    paths["broken"] = str(root / "broken.pth")
    Path(paths["broken"]).write_bytes(Path(paths["r18_1"]).read_bytes()[:4096])
    return paths


def _args(data: dict, weights: dict, runs: Path, name: str) -> list[str]:  # noqa: F811
    grid = ",".join(["none", weights["r18_1"], weights["broken"], weights["r18_2"]])
    sets = [f"data.train_uri={data['train']}", f"data.val_uri={data['val']}", f"checkpoint.storage_path={runs}",
            "scaling.num_workers=1", f"optim.max_iters={MAX_ITERS}", "optim.steps=[8]", "eval.every=5",
            "eval.max_images=8", "checkpoint.every=5", "checkpoint.max_failures=0", "log.every=5"]  # fmt: skip
    return ["--recipe", "tiny_cpu", "--name", name, "--param", f"model.backbone_weights={grid}",
            *(a for s in sets for a in ("--set", s))]  # fmt: skip


def _check_results(search: Path, weights: dict, out: str) -> list[dict]:
    trials = json.loads((search / "results.json").read_text())["trials"]
    assert len(trials) == 4, trials
    assert len((search / "results.csv").read_text().splitlines()) == 5
    assert (search / "results.png").read_bytes().startswith(b"\x89PNG")
    broken = [t for t in trials if t["backbone_weights"] == weights["broken"]]
    assert len(broken) == 1 and broken[0]["status"] == "error"
    assert "not a complete torch.save state dict" in broken[0]["error"]
    others = [t for t in trials if t is not broken[0]]
    assert {t["status"] for t in others} <= {"finished", "stopped"} and any(t["status"] == "finished" for t in others)
    for t in others:  # ASHA stops a trial only at an evaluation step, before the end
        assert t["AP"] is not None and (t["step"] == MAX_ITERS) == (t["status"] == "finished"), t
        assert t["step"] % 5 == 0
        assert (search / "runs" / t["trial"] / "metrics.jsonl").exists()
    assert f"{broken[0]['trial']}: cannot read backbone weights" in out
    best = re.search(r"^python jobs/train.py --recipe tiny_cpu .*$", out, re.M)
    assert best and "model.backbone_weights=" in best.group(0), out[-3000:]
    return trials


def test_submitted_search_stopped_mid_way_resumes(data, weights, tmp_path) -> None:  # noqa: F811
    """3 CPUs hold 2 trials (1 worker + 0.25 for the trial's driver each). The job is stopped once one
    trial has finished and another has a checkpoint; the resubmitted --resume keeps the finished trial's
    work and continues the interrupted one from its checkpoint."""
    search = tmp_path / "resumed"
    args = ["python", "jobs/tune.py", *_args(data, weights, tmp_path, "resumed")]
    with ray_head(num_cpus=3) as (address, env):
        first = submit(address, env, args, "--no-wait", "--submission-id", "search-1")
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        done_before, interrupted = _wait_for_a_finished_and_a_running_trial(search, address)
        stop = subprocess.run([RAY, "job", "stop", "--address", address, "search-1"], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert stop.returncode == 0, stop.stderr[-2000:]
        (tmp_path / "first.log").write_text(job_logs(address, "search-1"))
        # a trial seen mid-way can still reach its last checkpoint before the stop lands: it then counts as done
        reached_end = {t for t in interrupted if max(_registered(search / "runs" / t), default=0) == MAX_ITERS}
        done_before, interrupted = done_before | reached_end, interrupted - reached_end
        second = submit(address, env, [*args, "--resume"])
    out = second.stdout + second.stderr
    assert second.returncode == 0 and "succeeded" in out.lower(), out[-4000:]
    assert "4 trials, 2 at a time" in out
    trials = {t["trial"]: t for t in _check_results(search, weights, out)}
    for trial in done_before:  # trained to the end before the stop: no step trained again
        assert trials[trial]["status"] == "finished"
        # (if Tune had not yet saved its state when stopped, the run restarts at its final checkpoint)
        resumed = _resumed_at(search / "runs" / trial)
        assert all(step == trials[trial]["step"] for step in resumed), (trial, done_before, interrupted, resumed)
    for trial in interrupted:  # had a checkpoint when stopped: continued from it
        if trials[trial]["status"] == "finished":
            resumed = _resumed_at(search / "runs" / trial)
            assert resumed and all(0 < step < MAX_ITERS for step in resumed), (trial, resumed)


def _wait_for_a_finished_and_a_running_trial(search: Path, address: str) -> tuple[set, set]:
    deadline = time.time() + 600
    while time.time() < deadline:
        logs = job_logs(address, "search-1")
        done = set(re.findall(r"Trial run_trial_(\w+) completed after", logs))
        running = {  # a checkpoint counts once Train has registered it (its folder is written first)
            d.name
            for d in (search / "runs").glob("*")
            if d.name not in done and 0 < max(_registered(d), default=0) < MAX_ITERS
        }
        if done and running:  # "completed" includes trials ASHA stopped: keep those that trained to the end
            return {t for t in done if (search / "runs" / t / f"checkpoint_{MAX_ITERS:08d}").exists()}, running
        if "train it with:" in logs:  # the whole search ended first
            break
        time.sleep(1)
    return set(), set()  # the timing did not allow an interruption mid-trial; the resume still has to work


def _registered(run: Path) -> list[int]:
    """Steps of the checkpoints Train has registered for this run (its snapshot), not just written."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or caught mid-write
        return []
    return [c["metrics"]["step"] for c in snapshot.get("checkpoint_results", [])]


def _resumed_at(run: Path) -> list[int]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r.get("event") == "resumed"]


def test_optuna_searcher_samples_a_range(data, tmp_path) -> None:  # noqa: F811
    """Optuna (Ray's integration) proposes learning rates from the ``lr`` space's log-uniform range, ranked
    by one class's AP50 (``--metric AP50/circle``)."""
    pytest.importorskip("optuna")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    sets = [f"data.train_uri={data['train']}", f"data.val_uri={data['val']}", f"checkpoint.storage_path={tmp_path}",
            "scaling.num_workers=1", "optim.max_iters=10", "optim.steps=[8]", "optim.warmup_iters=2", "eval.every=5",
            "eval.max_images=8", "checkpoint.every=5"]  # fmt: skip
    search = ["--space", "lr", "--searcher", "optuna", "--samples", "2", "--max-concurrent", "2", "--name", "lr",
              "--metric", "AP50/circle"]  # fmt: skip
    command = [
        sys.executable,
        "jobs/tune.py",
        "--recipe",
        "tiny_cpu",
        *search,
        *(a for s in sets for a in ("--set", s)),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    saved = json.loads((tmp_path / "lr" / "results.json").read_text())
    trials = saved["trials"]
    assert len(trials) == 2 and all(t["AP"] is not None and t["AP50/circle"] is not None for t in trials)
    assert saved["metric"] == "AP50/circle" and trials[0]["AP50/circle"] >= trials[1]["AP50/circle"]
    assert "(AP50/circle " in done.stdout
    lrs = [t["base_lr"] for t in trials]
    assert len(set(lrs)) == 2 and all(1e-4 <= lr <= 3e-3 for lr in lrs)  # tiny_cpu's 1e-3: /10 .. x3
