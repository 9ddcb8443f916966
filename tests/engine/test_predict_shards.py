"""predict.py --data over shards with 2 Ray actors (a real local Ray): one COCO results json per shard, every
image once, the same detections as the evaluation path, and a rerun that redoes only a missing shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.coco_eval import coco_evaluate
from engine.evaluate import evaluate
from engine.inference import load_predictor
from pipeline import storage
from pipeline.loader import open_dataset
from tests.engine.test_export import checkpoint  # noqa: F401  (fixture)
from tests.engine.test_train import data  # noqa: F401  (fixture)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _keeping_low_scores(source: str, into: Path) -> str:
    """The fixture's random-weight checkpoint with model.score_thresh 0.001: its scores sit near the prior 0.01."""
    import shutil

    from engine import checkpoint as ckpt

    shutil.copytree(source, into)
    config = json.loads((into / ckpt.CONFIG).read_text())
    config["model"]["score_thresh"] = 0.001
    (into / ckpt.CONFIG).write_text(json.dumps(config))
    ckpt.commit(into, 1)
    return str(into)


def test_sharded_prediction_equals_evaluation_and_resumes_by_shard(checkpoint, data, tmp_path) -> None:  # noqa: F811
    checkpoint = _keeping_low_scores(checkpoint, tmp_path / "checkpoint_00000001")
    raw = Path(data["val"]).parent.parent / "raw" / "val"
    shards = tmp_path / "val4"
    subprocess.run([sys.executable, "jobs/convert.py", "--annotations", str(raw / "annotations.json"), "--images",
                    str(raw / "images"), "--output", str(shards), "--shard-images", "4", "--no-progress"],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "pred"
    command = [sys.executable, "jobs/predict.py", "--checkpoint", checkpoint, "--data", str(shards), "--output",
               str(out), "--workers", "2"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 shards (0 written by an earlier run): 16 images" in done.stdout
    files = sorted(out.glob("*.json"))
    assert [f.name for f in files] == [f"shard-{i:06d}.json" for i in range(4)]
    results = [r for f in files for r in json.loads(f.read_text())]
    # The evaluation path on the same data: the same detections, so the same AP.
    dataset = open_dataset(str(shards))
    predictor = load_predictor(checkpoint, tmp_path / "ck")
    cfg = predictor.cfg
    loader_cfg = replace(cfg.data.loader, batch_size=cfg.data.eval_batch_size)
    reference = evaluate(predictor.net, predictor.postprocess, dataset, rank=0, world_size=1, loader_cfg=loader_cfg,
                         device=torch.device("cpu"))  # fmt: skip
    truth = json.loads(storage.read_bytes(dataset.ground_truth_uri))
    assert len(results) == len(reference.results) > 0
    assert coco_evaluate(truth, results)["AP"] == pytest.approx(reference.metrics["AP"], abs=1e-9)
    first = files[1].read_text()
    files[1].unlink()
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "4 shards (3 written by an earlier run): 4 images" in again.stdout, again.stdout
    assert files[1].read_text() == first
