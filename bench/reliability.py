"""Faults injected into real training runs (local Ray, 2 CPU workers, the tiny recipe on synthetic shards), and
what held: steps completed, steps redone, restarts spent, checkpoints complete and finite. Prints a markdown
table for docs/reliability.md.

    .venv/bin/python bench/reliability.py [--only sigterm,stall] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from engine import checkpoint as ckpt
from engine.config import apply_overrides
from engine.driver import init_ray, log_dir, run
from engine.errors import TrainingError
from engine.faults import Faults
from engine.recipes import get_recipe

BASE = ["data.val_uri=none", "optim.max_iters=20", "optim.steps=[15]", "checkpoint.every=5", "log.every=1"]


def make_data(root: Path) -> dict[str, str]:
    from pipeline.coco import load_coco
    from pipeline.shards import ShardOptions, write_shards
    from pipeline.synthetic import generate

    generate(root / "raw", num_train=48, num_val=16, image_size=128, seed=3)
    uris = {}
    for split in ("train", "val"):
        uris[split] = str(root / split)
        dataset = load_coco(root / "raw" / split / "annotations.json")
        options = ShardOptions(shard_images=8, progress=False)
        write_shards(dataset, root / "raw" / split / "images", uris[split], options)
    return uris


def config(data: dict, runs: Path, name: str, *extra: str):
    sets = [f"data.train_uri={data['train']}", f"data.val_uri={data['val']}", f"checkpoint.storage_path={runs}",
            f"checkpoint.name={name}", *BASE, *extra]  # fmt: skip
    return apply_overrides(get_recipe("tiny_cpu"), sets)


def history(cfg) -> list[dict]:
    path = log_dir(cfg) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def checkpoints(cfg) -> dict:
    """Every checkpoint folder of the run: complete (commit marker, sizes) and with finite weights."""
    folders = sorted((Path(cfg.checkpoint.storage_path) / cfg.checkpoint.name).glob("checkpoint_0*"))
    complete = [f for f in folders if ckpt.incomplete_reason(str(f)) is None]
    finite = [f for f in complete if all(torch.isfinite(t).all() for t in ckpt.load_trusted(f / ckpt.MODEL).values()
                                         if t.is_floating_point())]  # fmt: skip
    return {"checkpoints": len(folders), "complete": len(complete), "finite": len(finite),
            "names": [f.name for f in folders]}  # fmt: skip


def outcome(cfg, faults: Faults | None = None) -> dict:
    """Runs ``cfg``; what this run (not an earlier one of the same name) did."""
    before = len(history(cfg))
    start = time.perf_counter()
    try:
        result = run(cfg, faults=faults)
        ended = {"ended": f"completed step {result.metrics['step']}/{cfg.optim.max_iters}"}
    except TrainingError as e:
        ended = {"ended": f"stopped, exit {e.exit_code}", "message": str(e).splitlines()[0][:300]}
    full = history(cfg)
    h = full[before:]
    events = [e for e in h if "event" in e]
    steps = [e["step"] for e in h if "loss" in e]
    earlier = {e["step"] for e in full[:before] if "loss" in e}
    redone = len(steps) - len(set(steps)) + len(set(steps) & earlier)  # steps trained twice
    attempts = sum(1 for e in events if e["event"] == "workers")
    return {**ended, "seconds": round(time.perf_counter() - start, 1), "attempts": attempts, "steps_redone": redone,
            "resumed_at": [e["step"] for e in events if e["event"] == "resumed"], **checkpoints(cfg)}  # fmt: skip


def worker_pids() -> list[int]:
    """The Ray Train worker processes of this process's embedded Ray."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def signal_at_step(cfg, step: int, sig: int) -> dict:
    """Runs ``cfg`` and sends ``sig`` to one training worker once step ``step`` is logged."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(outcome(cfg)))
    thread.start()
    deadline = time.time() + 300
    while thread.is_alive() and time.time() < deadline:
        logged = [e["step"] for e in history(cfg) if "loss" in e]
        if logged and logged[-1] >= step:
            os.kill(worker_pids()[-1], sig)
            box["signal_after_step"] = logged[-1]
            break
        time.sleep(0.1)
    thread.join()
    events = [e for e in history(cfg) if e.get("event") == "preempted"]
    if events:
        box["checkpoint_at"] = events[0]["step"]
        box["signal_during_step"] = events[0]["signal_step"]
    return box


def scenario_nan(data, runs, policy: str) -> dict:
    cfg = config(data, runs, f"nan-{policy}", f"optim.on_divergence={policy}")
    return outcome(cfg, Faults(nan_at_step=8))


def scenario_stall(data, runs) -> dict:
    cfg = config(data, runs, "stall", "optim.stall_timeout_s=5", "checkpoint.max_failures=1")
    return outcome(cfg, Faults(stall_at_step=8, stall_rank=1, once_dir=str(runs / "faults")))


def scenario_bad_label(data, runs) -> dict:
    train = runs / "bad-label-data"
    shutil.copytree(data["train"], train)
    data = {**data, "train": str(train)}
    outcome(config(data, runs, "bad-label", "optim.max_iters=10", "optim.steps=[8]"))
    shard = sorted(train.glob("*.tar"))[2]
    members = []
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    record = json.loads(members[1][1])
    members[1] = (members[1][0], json.dumps({**record, "labels": [7, *record["labels"][1:]]}).encode())
    with tarfile.open(shard, "w") as tar:
        for info, payload in members:
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return outcome(config(data, runs, "bad-label", "optim.max_iters=40", "optim.steps=[30]",
                          "checkpoint.max_failures=3"))  # fmt: skip


def scenario_incomplete(data, runs) -> dict:
    first = config(data, runs, "incomplete", "optim.max_iters=10", "optim.steps=[8]")
    outcome(first)
    (Path(first.checkpoint.storage_path) / "incomplete" / ckpt.checkpoint_name(10) / ckpt.COMMIT).unlink()
    return outcome(config(data, runs, "incomplete", "optim.max_iters=15", "optim.steps=[8]"))


def scenario_crafted(runs: Path) -> dict:
    class Armed:
        def __reduce__(self):
            return (open, (str(runs / "code-ran"), "w"))

    path = runs / "crafted" / ckpt.TRAIN
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps(Armed()))
    try:
        ckpt.load_trusted(path)
        ended = "loaded (!)"
    except ValueError as e:
        ended = f"refused: {str(e)[:120]}"
    return {"ended": ended, "code_ran": (runs / "code-ran").exists()}


SCENARIOS = {
    "nan-stop": lambda d, r: scenario_nan(d, r, "stop"),
    "nan-rollback": lambda d, r: scenario_nan(d, r, "rollback"),
    "sigterm": lambda d, r: signal_at_step(config(d, r, "sigterm", "checkpoint.max_failures=0"), 6, signal.SIGTERM),
    "sigkill": lambda d, r: signal_at_step(config(d, r, "sigkill", "checkpoint.max_failures=1"), 7, signal.SIGKILL),
    "stall": scenario_stall,
    "bad-label": scenario_bad_label,
    "incomplete-checkpoint": scenario_incomplete,
    "crafted-pickle": lambda d, r: scenario_crafted(r),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(SCENARIOS)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root / "data")
        init_ray()
        results = {}
        for name in names:
            runs = root / name
            runs.mkdir()
            results[name] = SCENARIOS[name](data, runs)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print("\n| fault | ended | attempts | steps redone | resumed at | checkpoints (complete, finite) | s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        cks = f"{r.get('checkpoints', '-')} ({r.get('complete', '-')}, {r.get('finite', '-')})"
        print(f"| {name} | {r['ended']} | {r.get('attempts', '-')} | {r.get('steps_redone', '-')} | "
              f"{r.get('resumed_at', '-')} | {cks} | {r.get('seconds', '-')} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
