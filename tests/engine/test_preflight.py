"""Errors before any worker starts: class mismatch, unreachable storage, no data, bad recipe or key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import apply_overrides
from engine.driver import preflight
from engine.recipes import get_recipe
from pipeline import retry, storage
from tests.pipeline.shard_util import tar_bytes, write_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_dataset(tmp_path, coco128) -> str:
    from tests.pipeline.shard_util import coco_records

    samples, cats = coco_records(coco128, 4)
    uri = str(tmp_path / "data")
    write_dataset(uri, [tar_bytes(samples)], cats)
    return uri


def _cfg(uri: str, *extra: str):
    return apply_overrides(get_recipe("tiny_cpu"), [f"data.train_uri={uri}", "data.val_uri=none", *extra])


def test_classes_must_match_the_model(tiny_dataset: str) -> None:
    with pytest.raises(ValueError, match=r"has 80 classes .* num_classes=5: add --set model.num_classes=80"):
        preflight(_cfg(tiny_dataset))
    preflight(_cfg(tiny_dataset, "model.num_classes=80"))  # fits


def test_an_init_from_that_is_neither_kind_fails_before_any_worker(tiny_dataset: str, tmp_path) -> None:
    store = f"checkpoint.storage_path={tmp_path / 'runs'}"
    with pytest.raises(ValueError, match=r"model.init_from=.*nothing.*expected a torchvision RetinaNet state dict"):
        preflight(_cfg(tiny_dataset, "model.num_classes=80", store, f"model.init_from={tmp_path / 'nothing'}"))


def test_missing_data_and_unreachable_storage(tiny_dataset: str, tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"no manifest\.json"):
        preflight(_cfg(str(tmp_path / "nothing"), "model.num_classes=80"))
    monkeypatch.setitem(retry._settings, "window_s", 0.5)  # a test-sized retry window
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(storage.StorageError, match="s3://nowhere/runs"):
        preflight(_cfg(tiny_dataset, "model.num_classes=80", "checkpoint.storage_path=s3://nowhere/runs"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--recipe", "nope"], "unknown recipe 'nope'; valid recipes: .*demo"),
        (["--recipe", "demo", "--set", "optim.lerning_rate=1"], "unknown key 'optim.lerning_rate'.*base_lr"),
        (["--recipe", "demo", "--set", "model.focal_gama=1"], "Did you mean 'model.focal_gamma'"),
        (["--recipe", "demo", "--set", "optim.base_lr=fast"], "optim.base_lr expects float"),
    ],
)
def test_train_cli_errors(args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "jobs/train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert re.search(message, done.stderr), done.stderr


def test_a_relative_init_from_is_made_absolute_for_the_workers(tmp_path, monkeypatch) -> None:
    from engine.trainer import absolute

    monkeypatch.chdir(tmp_path)
    cfg = absolute(apply_overrides(get_recipe("tiny_cpu"), ["model.init_from=runs/demo/best"]))
    assert cfg.model.init_from == str(tmp_path.resolve() / "runs" / "demo" / "best")  # workers run elsewhere
    assert absolute(apply_overrides(get_recipe("tiny_cpu"), ["model.init_from=s3://b/x"])).model.init_from == "s3://b/x"
