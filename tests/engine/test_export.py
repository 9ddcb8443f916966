"""ONNX export with real onnxruntime: a small RetinaNet trained for a few steps on the synthetic data is
exported; its raw outputs and its COCO AP equal PyTorch's; --check reruns the checks; bad input is a
clear error (no config.json, a size that is not a multiple of 128, an opset too old)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import apply_overrides, to_dict
from engine.export import ExportSpec, onnx_detections
from engine.recipes import get_recipe
from model import build_retinanet
from tests.engine.test_train import data  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> str:  # noqa: F811
    """A tiny_cpu model (random weights, fixed seed: detections with spread scores) saved as a checkpoint."""
    cfg = apply_overrides(get_recipe("tiny_cpu"), [f"data.train_uri={data['train']}", f"data.val_uri={data['val']}"])
    torch.manual_seed(0)
    net, _, _ = build_retinanet(cfg.model)
    categories = json.loads((Path(data["val"]) / "manifest.json").read_text())["categories"]
    directory = tmp_path_factory.mktemp("ckpt") / ckpt.checkpoint_name(1)
    ckpt.save(directory, net, None, to_dict(cfg), {"step": 1}, categories)
    return str(directory)


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/export.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_exported_model_matches_pytorch_and_checks_again(checkpoint, data, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "export"
    done = _export("--checkpoint", checkpoint, "--data", data["val"], "--out", str(out), "--dynamic-batch")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "export.json").read_text())
    checks = manifest["checks"]
    assert checks["images"] == 16 and checks["raw_max_abs_diff"] < 1e-4 and checks["ap_diff"] <= 1e-3
    assert checks["passed"] and "raw outputs max |diff|" in done.stdout
    assert manifest["input"]["shape"] == ["batch", 3, 256, 256] and len(manifest["input"]["normalise"]["mean"]) == 3
    assert [c["name"] for c in manifest["categories"]][:2] == ["circle", "rectangle"]
    # the graph runs any batch size in onnxruntime, and the postprocess half gives PyTorch's detections
    import onnxruntime as ort

    from engine.config import from_dict
    from engine.export import RawHead

    cfg = from_dict(manifest["config"])
    net, _, postprocess = build_retinanet(cfg.model)
    net.load_state_dict(torch.load(Path(checkpoint) / ckpt.MODEL, weights_only=True))
    images = torch.randn(3, 3, 256, 256)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, deltas = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        ref = net.eval()(images)
        expected = postprocess(ref, [(256, 256)] * 3)
        torch_logits, _ = RawHead(net)(images)
    assert torch.allclose(torch.from_numpy(logits), torch_logits, atol=1e-4)
    got = onnx_detections(logits, deltas, [(256, 256)] * 3, cfg, (256, 256))
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g["labels"], e["labels"]) and torch.allclose(g["boxes"], e["boxes"], atol=1e-2)
    again = _export("--checkpoint", checkpoint, "--data", data["val"], "--out", str(out), "--check",
                    "--max-images", "4")  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "export.json").read_text())["checks"]["images"] == 4


def test_bad_export_input_says_what_to_do(checkpoint, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"multiples of 128.*use --image-size 384 640"):
        ExportSpec((300, 600))
    with pytest.raises(ValueError, match=r"--opset 9 is too old.*use --opset 18"):
        ExportSpec((256, 256), opset=9)
    no_config = tmp_path / ckpt.checkpoint_name(1)
    no_config.mkdir()
    for name in (ckpt.MODEL, ckpt.CATEGORIES, ckpt.METRICS):
        (no_config / name).write_bytes((Path(checkpoint) / name).read_bytes())
    ckpt.commit(no_config, 1)
    for args, message in [
        (["--checkpoint", str(no_config)], "config.json"),
        (["--checkpoint", checkpoint, "--image-size", "300", "600"], "use --image-size 384 640"),
        (["--checkpoint", checkpoint, "--opset", "9"], "--opset 9 is too old"),
        (["--checkpoint", checkpoint, "--check"], "--check needs --data"),
    ]:
        done = _export(*args, "--out", str(tmp_path / "x"))
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
