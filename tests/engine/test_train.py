"""Training with Ray Train on a real local cluster: 2 CPU workers, synthetic shards, checkpoints in a real
S3-protocol server; evaluation, resume, and recovery from a killed worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import apply_overrides
from engine.driver import log_dir, run
from engine.recipes import get_recipe
from pipeline import storage
from pipeline.coco import load_coco
from pipeline.shards import ShardOptions, write_shards
from pipeline.synthetic import generate

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root / "raw", num_train=48, num_val=16, image_size=128, seed=3)
    uris = {}
    for split in ("train", "val"):
        uri = str(root / "shards" / split)
        dataset = load_coco(root / "raw" / split / "annotations.json")
        write_shards(dataset, root / "raw" / split / "images", uri, ShardOptions(shard_images=8, progress=False))
        uris[split] = uri
    return uris


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    from engine.driver import init_ray

    init_ray()
    yield
    ray.shutdown()


def _cfg(data: dict[str, str], storage_path: str, name: str, *extra: str):
    base = get_recipe("tiny_cpu")
    return apply_overrides(
        base,
        [
            f"data.train_uri={data['train']}",
            f"data.val_uri={data['val']}",
            f"checkpoint.storage_path={storage_path}",
            f"checkpoint.name={name}",
            *extra,
        ],
    )


def _history(cfg) -> list[dict]:
    return [json.loads(line) for line in (log_dir(cfg) / "metrics.jsonl").read_text().splitlines()]


def test_two_workers_learn_checkpoint_to_s3_and_evaluate_like_pycocotools(data, ray_local, s3_bucket, tmp_path) -> None:
    cfg = _cfg(data, f"{s3_bucket}/runs", "tiny-s3", "optim.max_iters=20", "optim.steps=[15]", "log.every=5",
               "checkpoint.every=10", "eval.every=0", "eval.at_end=true", "eval.max_images=none")  # fmt: skip
    result = run(cfg)
    assert result.error is None
    assert result.metrics["step"] == 20
    losses = [h["loss"] for h in _history(cfg) if "loss" in h]
    assert losses[-1] < losses[0], losses
    names = storage.list_matching(f"{s3_bucket}/runs/tiny-s3", "checkpoint_0*")
    assert [n.rsplit("/", 1)[1] for n in names] == [ckpt.checkpoint_name(10), ckpt.checkpoint_name(20)]
    assert storage.exists(f"{s3_bucket}/runs/tiny-s3/{ckpt.checkpoint_name(20)}/{ckpt.MODEL}")

    # The run's AP equals pycocotools run directly on the same detections of the same weights.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from engine.coco_eval import detections_to_coco
    from model import build_retinanet
    from pipeline.loader import DetectionLoader, open_dataset

    net, _, postprocess = build_retinanet(cfg.model)
    with result.checkpoint.as_directory() as directory:  # downloads from the S3 server
        net.load_state_dict(torch.load(Path(directory) / ckpt.MODEL, weights_only=True))
    net.eval()
    val = open_dataset(data["val"])
    dets = []
    with torch.no_grad():
        eval_cfg = cfg.data.loader.__class__(**{**vars(cfg.data.loader), "batch_size": cfg.data.eval_batch_size})
        for batch in DetectionLoader(val, rank=0, world_size=1, train=False, cfg=eval_cfg):
            out = postprocess(net(batch.images), batch.image_sizes)
            out = [{**d, "boxes": batch.scale_to_original(d["boxes"], i)} for i, d in enumerate(out)]
            dets += detections_to_coco(batch.image_ids.tolist(), out, val.category_ids())
    gt_file, res_file = tmp_path / "gt.json", tmp_path / "res.json"
    gt_file.write_bytes(storage.read_bytes(val.ground_truth_uri))
    res_file.write_text(json.dumps(dets))
    gt = COCO(str(gt_file))
    evaluator = COCOeval(gt, gt.loadRes(str(res_file)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert result.metrics["AP"] == pytest.approx(evaluator.stats[0], abs=1e-9)
    assert result.metrics["AP50"] == pytest.approx(evaluator.stats[1], abs=1e-9)

    # jobs/evaluate.py on the checkpoint in S3 reproduces the run's numbers; jobs/predict.py draws.
    checkpoint_uri = f"{s3_bucket}/runs/tiny-s3/{ckpt.checkpoint_name(20)}"
    out = tmp_path / "metrics.json"
    job = [
        sys.executable,
        "jobs/evaluate.py",
        "--checkpoint",
        checkpoint_uri,
        "--data",
        data["val"],
        "--output",
        str(out),
        "--out",
        str(tmp_path / "eval"),
    ]
    subprocess.run(job, check=True, cwd=ROOT, capture_output=True, timeout=300)
    assert json.loads(out.read_text())["AP"] == pytest.approx(result.metrics["AP"], abs=1e-9)
    # Its per-class files: thresholds for every class, detections that pycocotools scores the same.
    names = [c["name"] for c in sorted(val.manifest["categories"], key=lambda c: c["label"])]
    saved = json.loads((tmp_path / "eval" / "thresholds.json").read_text())
    assert set(saved["classes"]) == set(names)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())[f"AP/{names[0]}"] == pytest.approx(
        result.metrics[f"AP/{names[0]}"], abs=1e-9)  # fmt: skip
    again = COCOeval(gt, gt.loadRes(str(tmp_path / "eval" / "detections.json")), "bbox")
    again.evaluate()
    again.accumulate()
    again.summarize()
    assert again.stats[0] == pytest.approx(evaluator.stats[0], abs=1e-9)
    assert (tmp_path / "eval" / "pr_curves.png").stat().st_size > 0
    # The checkpoint saved after the evaluation carries the same operating points.
    carried = json.loads(storage.read_bytes(f"{checkpoint_uri}/{ckpt.THRESHOLDS}"))
    # The run's evaluation (2 ranks) and evaluate.py's (1 process) batch differently, so the scores
    # that become thresholds agree to float32 rounding, not bit for bit.
    assert carried["classes"].keys() == saved["classes"].keys()
    for name, point in saved["classes"].items():
        assert carried["classes"][name] == pytest.approx(point, abs=1e-5), name
    images = Path(data["val"]).parent.parent / "raw" / "val" / "images"
    predict = [sys.executable, "jobs/predict.py", "--checkpoint", checkpoint_uri, "--images", str(images),
               "--output", str(tmp_path / "pred"), "--score-thresh", "0.05"]  # fmt: skip
    subprocess.run(predict, check=True, cwd=ROOT, capture_output=True, timeout=300)
    assert len(list((tmp_path / "pred").glob("*.png"))) == len(list(images.glob("*.jpg"))) == 16
    # One preprocessing path: predict.py's detections on the image files are evaluate.py's on the shards
    # (the same boxes and scores, to the 2 and 4 decimals predict.py writes).
    names = [c["name"] for c in sorted(val.manifest["categories"], key=lambda c: c["label"])]
    scored = json.loads((tmp_path / "eval" / "detections.json").read_text())
    cat_names = {c["id"]: c["name"] for c in val.manifest["categories"]}
    compared = 0
    for path in sorted((tmp_path / "pred").glob("*.json")):
        predicted = json.loads(path.read_text())["detections"]
        image_id = int(path.stem) + 1  # the synthetic set's file 000000.jpg is image 1
        evaluated = [r for r in scored if r["image_id"] == image_id and r["score"] >= 0.05]
        assert len(predicted) == len(evaluated), path.name
        for p, r in zip(sorted(predicted, key=lambda d: -d["score"]), sorted(evaluated, key=lambda d: -d["score"]),
                        strict=True):  # fmt: skip
            x, y, w, h = r["bbox"]
            assert p["class"] == cat_names[r["category_id"]] and p["score"] == pytest.approx(r["score"], abs=1e-4)
            assert p["box_xyxy"] == pytest.approx([x, y, x + w, y + h], abs=0.01)
            compared += 1
    assert compared > 0 and len(names) == len(cat_names)
    auto = [*predict[:-2], "--score-thresh", "auto", "--output", str(tmp_path / "auto")]
    subprocess.run(auto, check=True, cwd=ROOT, capture_output=True, timeout=300)
    for path in (tmp_path / "auto").glob("*.json"):
        for d in json.loads(path.read_text())["detections"]:
            assert d["score"] >= round(saved["classes"][d["class"]]["threshold"], 4) - 1e-4
    bad = subprocess.run([sys.executable, "jobs/evaluate.py", "--checkpoint", str(tmp_path), "--data", data["val"]],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "not a checkpoint directory" in bad.stderr


def test_rerun_resumes_and_new_name_starts_fresh(data, ray_local, tmp_path) -> None:
    runs = str(tmp_path / "runs")
    quiet = ["checkpoint.every=10", "eval.at_end=false", "log.every=5"]
    assert run(_cfg(data, runs, "resume", "optim.steps=[8]", "optim.max_iters=10", *quiet)).metrics["step"] == 10
    # A resume wins over model.init_from: it is not even read (this path does not exist).
    again = _cfg(data, runs, "resume", "optim.steps=[8]", "optim.max_iters=20", "model.init_from=/nonexistent", *quiet)
    assert run(again).metrics["step"] == 20
    # One log for the run name: steps 5 and 10 from the first run, then resumed at 10, never redone.
    kept = [h for h in _history(again) if "loss" in h or h.get("event") in ("workers", "resumed")]
    assert [(h["step"], h.get("event")) for h in kept] == [
        (0, "workers"),
        (5, None),
        (10, None),
        (10, "resumed"),
        (10, "workers"),
        (15, None),
        (20, None),
    ]
    # A new run name starts fresh, here from the first run's weights (its folder: the newest checkpoint).
    fresh = _cfg(data, runs, "fresh", "optim.steps=[4]", "optim.max_iters=5", f"model.init_from={runs}/resume", *quiet)
    assert run(fresh).metrics["step"] == 5
    assert [h["step"] for h in _history(fresh) if "loss" in h] == [5]
    (init,) = [h for h in _history(fresh) if h.get("event") == "init_from"]
    assert init["source"] == f"checkpoint {runs}/resume/{ckpt.checkpoint_name(20)}"
    assert init["fresh"] == {} and init["loaded"]["head.cls_logits"] == 2 and init["ignored"] == {}


def test_killed_worker_recovers_from_checkpoint(data, ray_local, tmp_path) -> None:
    from ray.util.state import list_actors

    cfg = _cfg(data, str(tmp_path / "runs"), "killed", "optim.max_iters=20", "optim.steps=[15]", "checkpoint.every=5",
               "log.every=5", "eval.at_end=false", "checkpoint.max_failures=2")  # fmt: skip
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=run(cfg)))
    thread.start()
    snapshot = tmp_path / "runs" / "killed" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    # The controller registers a reported checkpoint when it next polls the workers; kill only after that.
    while not (snapshot.exists() and "checkpoint_000000" in snapshot.read_text()):
        assert time.time() < deadline and thread.is_alive(), "no checkpoint was registered"
        time.sleep(0.2)
    workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "TrainWorker" in a.class_name]
    assert workers, "no Ray Train worker actors found"
    os.kill(workers[-1].pid, signal.SIGKILL)
    thread.join(timeout=600)
    result = box["result"]
    assert result.error is None
    assert result.metrics["step"] == 20
    assert (tmp_path / "runs" / "killed" / ckpt.checkpoint_name(20) / ckpt.MODEL).exists()
    resumed = [h["step"] for h in _history(cfg) if h.get("event") == "resumed"]
    assert resumed and resumed[0] >= 5, _history(cfg)  # restarted from a checkpoint, not from scratch


def test_a_few_steps_on_coco128_from_s3_complete_and_evaluate(coco128, s3_bucket, ray_local, tmp_path) -> None:
    for split_name in ("train", "val"):
        dataset = load_coco(coco128 / "annotations" / "instances_train2017.json")
        uri = f"{s3_bucket}/coco128/{split_name}"
        write_shards(dataset, coco128 / "images" / "train2017", uri, ShardOptions(shard_images=32, progress=False))
    cfg = _cfg(
        {"train": f"{s3_bucket}/coco128/train", "val": f"{s3_bucket}/coco128/val"},
        str(tmp_path / "runs"),
        "coco128",
        "model.num_classes=80",
        "optim.steps=[3]",
        "optim.warmup_iters=2",
        "optim.max_iters=4",
        "log.every=2",
        "eval.max_images=16",
    )
    result = run(cfg)
    assert result.error is None and result.metrics["step"] == 4
    assert 0.0 <= result.metrics["AP"] <= 1.0 and "APl" in result.metrics
    assert (log_dir(cfg) / "predictions_00000004.png").exists()


def test_compiled_training_with_two_ddp_workers(data, ray_local, tmp_path) -> None:
    """``optim.compile=true`` with ``optim.channels_last=true`` and the static-shape settings (every batch
    256 x 256 with 64 box rows; mode ``reduce-overhead``, which records CUDA graphs on GPUs and is plain
    inductor on CPUs; smaller DDP buckets): each rank compiles (inductor, C++ on the CPU) after the trial
    step, DDP around the compiled network; the run trains its steps and records no ``compile_failed``."""
    cfg = _cfg(data, str(tmp_path / "runs"), "compiled", "optim.compile=true", "optim.channels_last=true",
               "optim.compile_mode=reduce-overhead", "data.loader.aug.pad_to=256", "data.loader.pad_boxes_to=64",
               "optim.ddp_bucket_mb=4", "optim.steps=[4]", "optim.warmup_iters=2", "optim.max_iters=6",
               "log.every=3", "eval.at_end=false")  # fmt: skip
    result = run(cfg)
    assert result.error is None and result.metrics["step"] == 6
    history = _history(cfg)
    assert not [h for h in history if h.get("event") == "compile_failed"], history
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 100 for x in losses)
