"""Checkpoints: plain types loaded with ``weights_only=True``, a crafted pickle refused without running it,
a commit marker written last (a folder without it is refused), format versions, a model-only ``best/``."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import apply_overrides, to_dict
from engine.recipes import get_recipe
from model import build_retinanet

ROOT = Path(__file__).resolve().parents[2]
CATEGORIES = [{"id": i + 1, "name": f"shape{i}", "label": i} for i in range(5)]


class _Armed:
    """Unpickling this opens (creates) ``marker`` for writing: stands for any code a crafted file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _net_and_cfg():
    cfg = apply_overrides(get_recipe("tiny_cpu"), ["data.train_uri=unused"])
    torch.manual_seed(0)
    net, loss_fn, _ = build_retinanet(cfg.model)
    return net, loss_fn, cfg


def _trained_state(net, loss_fn, optimizer) -> ckpt.TrainState:
    images = torch.randn(1, 3, 128, 128)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])}]
    loss_fn(net(images), targets)["loss"].backward()
    optimizer.step()
    positions = [{"world_size": 2, "workers": 1, "rank": r, "streams": [{"epoch": 1, "shard": 2, "done": {"3": ["k"]}}]}
                 for r in range(2)]  # fmt: skip
    history = [{"step": 5, "loss": np.float64(1.5), "lr": 1e-3}, {"step": 5, "event": "resumed"}]
    return ckpt.TrainState(step=5, optimizer=optimizer.state_dict(), data_positions=positions, history=history,
                           best_ap=0.25, lr_scale=0.5, rollbacks=1)  # fmt: skip


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_real_checkpoint_round_trips_with_weights_only(kind: str, tmp_path) -> None:
    net, loss_fn, cfg = _net_and_cfg()
    params = [p for p in net.parameters() if p.requires_grad]
    make = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
    optimizer = make(params, lr=1e-3, **({"momentum": 0.9} if kind == "sgd" else {}))
    state = _trained_state(net, loss_fn, optimizer)
    ckpt.save(tmp_path, net, state, to_dict(cfg), {"step": 5, "AP": np.float32(0.25)}, CATEGORIES)

    assert ckpt.incomplete_reason(str(tmp_path)) is None
    loaded = ckpt.load_train_state(tmp_path)  # weights_only=True inside
    assert torch.load(tmp_path / ckpt.TRAIN, weights_only=True)["format"] == ckpt.FORMAT_VERSION
    assert (loaded.step, loaded.best_ap, loaded.lr_scale, loaded.rollbacks) == (5, 0.25, 0.5, 1)
    assert loaded.data_positions == state.data_positions
    assert loaded.history[0] == {"step": 5, "loss": 1.5, "lr": 1e-3}
    fresh = make(params, lr=1e-3)
    fresh.load_state_dict(loaded.optimizer)
    for a, b in zip(fresh.state.values(), optimizer.state.values(), strict=True):
        for key in b:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))
    other, _, _ = _net_and_cfg()
    torch.nn.init.zeros_(other.head.cls_logits.weight)
    ckpt.load_weights(tmp_path, other)
    assert torch.equal(other.head.cls_logits.weight, net.head.cls_logits.weight)


def test_a_crafted_train_pt_is_refused_without_running_it(tmp_path) -> None:
    net, _, cfg = _net_and_cfg()
    ckpt.save(tmp_path / "c", net, ckpt.TrainState(step=3), to_dict(cfg), {"step": 3}, CATEGORIES)
    marker = tmp_path / "code-ran"
    torch.save({"format": 2, "step": _Armed(marker)}, tmp_path / "c" / ckpt.TRAIN)
    ckpt.commit(tmp_path / "c", 3)
    with pytest.raises(ValueError, match=r"needs arbitrary unpickling.*untrusted or from an incompatible version"):
        ckpt.restore(tmp_path / "c", "runs/x/checkpoint_00000003", str(tmp_path))  # the resume path
    assert not marker.exists()
    with open(tmp_path / "c" / ckpt.TRAIN, "rb") as f:  # so the test can fail: plain unpickling runs it
        torch.load(f, weights_only=False)
    assert marker.exists()


def _armed_checkpoint(directory: Path, marker: Path, part: str) -> Path:
    """A checkpoint whose ``part`` (model.pt, committed; or train.pt, with no commit marker as in format 1)
    creates ``marker`` when unpickled."""
    net, _, cfg = _net_and_cfg()
    ckpt.save(directory, net, ckpt.TrainState(step=3), to_dict(cfg), {"step": 3}, CATEGORIES)
    with open(directory / part, "wb") as f:
        pickle.dump(_Armed(marker), f)
    ckpt.commit(directory, 3)
    if part == ckpt.TRAIN:
        (directory / ckpt.COMMIT).unlink()
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("part", [ckpt.MODEL, ckpt.TRAIN])
def test_evaluate_and_predict_refuse_a_crafted_checkpoint(part: str, tmp_path) -> None:
    marker = tmp_path / "code-ran"
    directory = _armed_checkpoint(tmp_path / "checkpoint_00000003", marker, part)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48)).save(images / "a.jpg")
    for job in (["jobs/evaluate.py", "--data", str(tmp_path)], ["jobs/predict.py", "--images", str(images),
                                                               "--output", str(tmp_path / "out")]):  # fmt: skip
        done = subprocess.run([sys.executable, *job, "--checkpoint", str(directory)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "error:" in done.stderr and "untrusted" in done.stderr and "Traceback" not in done.stderr
        assert not marker.exists()


def test_a_folder_without_its_commit_marker_is_incomplete(tmp_path) -> None:
    net, _, cfg = _net_and_cfg()
    run = tmp_path / "run"
    for step in (5, 10):
        ckpt.save(run / ckpt.checkpoint_name(step), net, ckpt.TrainState(step=step), to_dict(cfg), {"step": step},
                  CATEGORIES)  # fmt: skip
    latest = run / ckpt.checkpoint_name(10)
    assert ckpt.resolve(str(run)) == str(latest)  # a run folder: its newest complete checkpoint
    (latest / ckpt.COMMIT).unlink()
    assert "no commit.json" in ckpt.incomplete_reason(str(latest))
    newest = r"checkpoint_00000010 is an incomplete .*newest complete .*checkpoint_00000005"
    with pytest.raises(ValueError, match=newest):
        ckpt.resolve(str(latest))
    assert ckpt.latest_complete(str(run)) == str(run / ckpt.checkpoint_name(5))
    ckpt.commit(latest, 10)
    (latest / "model.pt").write_bytes(b"short")  # a file cut off after the marker was written
    assert "model.pt is 5 bytes" in ckpt.incomplete_reason(str(latest))


def test_format_versions(tmp_path) -> None:
    net, _, cfg = _net_and_cfg()
    legacy = tmp_path / "legacy"  # format 1: no commit marker, no format field; still read
    ckpt.save(legacy, net, ckpt.TrainState(step=7), to_dict(cfg), {"step": 7}, CATEGORIES)
    (legacy / ckpt.COMMIT).unlink()
    old = {k: v for k, v in torch.load(legacy / ckpt.TRAIN, weights_only=True).items() if k not in ("format",
           "lr_scale", "rollbacks")}  # fmt: skip
    torch.save(old, legacy / ckpt.TRAIN)
    assert ckpt.incomplete_reason(str(legacy)) is None
    assert ckpt.load_train_state(legacy).step == 7
    future = tmp_path / "future"
    ckpt.save(future, net, ckpt.TrainState(step=7), to_dict(cfg), {"step": 7}, CATEGORIES)
    torch.save({**torch.load(future / ckpt.TRAIN, weights_only=True), "format": 9}, future / ckpt.TRAIN)
    with pytest.raises(ValueError, match="checkpoint format 9; this version of the project reads formats 1 to 2"):
        ckpt.load_train_state(future)


def test_best_is_a_complete_model_only_checkpoint(tmp_path) -> None:
    net, _, cfg = _net_and_cfg()
    uri = ckpt.save_best(str(tmp_path / "run"), net, to_dict(cfg), CATEGORIES, {"step": 4, "AP": 0.5})
    best = Path(uri)
    assert ckpt.incomplete_reason(uri) is None
    assert sorted(p.name for p in best.iterdir()) == sorted(
        [ckpt.MODEL, ckpt.CONFIG, ckpt.METRICS, ckpt.CATEGORIES, ckpt.COMMIT]
    )
    assert json.loads((best / ckpt.METRICS).read_text())["AP"] == 0.5
    with pytest.raises(ValueError, match="model-only checkpoint"):
        ckpt.load_train_state(best)


def test_plain_refuses_what_weights_only_could_not_load() -> None:
    with pytest.raises(TypeError, match=r"train state\['x'\] is a PosixPath"):
        ckpt.plain({"x": Path("/")})


def test_a_run_restarted_at_its_end_reports_its_last_metrics_again(tmp_path) -> None:
    """A restart at ``max_iters`` trains nothing: the restored checkpoint's metrics are reported once more
    (without it), so a caller that missed the end (Tune stopped before saving its state) sees it."""
    from types import SimpleNamespace

    from engine.loop import report_if_ended

    net, _, cfg = _net_and_cfg()
    metrics = {"step": 20, "AP": 0.5, "loss": 0.75}
    ckpt.save(tmp_path / "c", net, ckpt.TrainState(step=20), to_dict(cfg), metrics, CATEGORIES)
    restored = ckpt.restore(tmp_path / "c", "runs/x/checkpoint_00000020", str(tmp_path))
    assert restored.metrics == metrics
    for max_iters, expected in ((20, [(metrics, None, "checkpoint_00000020")]), (30, [])):
        reports: list[tuple] = []
        ended = apply_overrides(cfg, [f"optim.max_iters={max_iters}", "optim.steps=[10]"])
        w = SimpleNamespace(state=restored.state, cfg=ended, report=lambda *a, into=reports: into.append(a))
        report_if_ended(w, restored)
        assert reports == expected
    report_if_ended(w, None)  # a fresh run: nothing restored, nothing reported
    assert reports == []
