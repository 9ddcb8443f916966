"""Configs: recipes build and round-trip, dotted overrides parse by type, errors name the fix, the lr schedule."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from engine.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    ScalingConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    to_dict,
)
from engine.recipes import RECIPES, get_recipe


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_builds_and_round_trips_through_json(name: str) -> None:
    cfg = get_recipe(name)
    assert isinstance(cfg, TrainConfig) and cfg.recipe == name
    back = from_dict(json.loads(json.dumps(to_dict(cfg))))
    assert back == cfg
    assert to_dict(back) == to_dict(cfg)
    assert isinstance(back.model.anchor_scales, tuple) and isinstance(back.data.loader.aug.train_sizes, tuple)
    assert back.model.anchor_scales == cfg.model.anchor_scales  # 2 ** (1/3) survives JSON bit for bit


def test_recipe_key_values() -> None:
    tiny = get_recipe("tiny_cpu")
    assert (tiny.model.backbone, tiny.model.fpn_channels, tiny.model.head_num_convs) == ("resnet18", 64, 2)
    assert tiny.data.loader.aug.train_sizes == (128,) and tiny.data.loader.aug.max_size == 256
    assert (tiny.data.loader.batch_size, tiny.scaling.num_workers, tiny.scaling.use_gpu) == (2, 2, False)
    assert tiny.optim.max_iters <= 50
    paper = get_recipe("coco_r50_1x")
    assert (paper.model.backbone, paper.model.backbone_norm, paper.model.fpn_channels) == ("resnet50", "frozen_bn", 256)
    assert paper.data.loader.batch_size * paper.scaling.num_workers == 16
    o = paper.optim
    assert (o.optimizer, o.base_lr, o.max_iters, o.steps, o.momentum, o.weight_decay) == (
        "sgd", 0.01, 90000, (60000, 80000), 0.9, 1e-4
    )  # fmt: skip
    assert o.lr_for(16) == 0.01 and o.amp and paper.scaling.use_gpu and paper.scaling.backend == "nccl"
    assert paper.data.loader.aug.train_sizes == (800,) and paper.data.loader.aug.max_size == 1333
    assert paper.data.train_uri.startswith("s3://")
    assert get_recipe("demo").scaling.backend == "gloo"


def test_get_recipe_is_fresh_and_unknown_lists_names() -> None:
    assert get_recipe("demo") is not get_recipe("demo")
    with pytest.raises(ValueError, match=r"unknown recipe 'nope'.*tiny_cpu.*demo.*coco_r50_1x"):
        get_recipe("nope")


def test_overrides_of_each_type() -> None:
    base = get_recipe("tiny_cpu")
    cfg = apply_overrides(
        base,
        [
            "model.focal_gamma=1.5",  # float, inside the model's own config
            "model.num_classes=7",  # int
            "model.backbone=resnet34",  # str
            "model.head_group_norm=true",  # bool (64 channels divide by 32)
            "optim.amp=1",
            "log.tensorboard=FALSE",
            "data.loader.batch_size=4",  # two levels into a component config
            "data.loader.aug.train_sizes=[96, 128]",  # three levels, tuple from a JSON list
            "optim.steps=10,20",  # tuple from a bare comma list
            "model.anchor_ratios=(0.5,1,2)",  # tuple of floats, ints accepted
            "checkpoint.storage_path=s3://b/runs",  # '=' and '://' kept in the value
            "data.val_uri=none",  # Optional -> None
            "optim.clip_grad_norm=null",
            "eval.max_images=5",  # Optional[int] -> int
            "seed=3",
        ],
    )
    assert cfg.model.focal_gamma == 1.5 and cfg.model.num_classes == 7 and cfg.model.backbone == "resnet34"
    assert cfg.model.head_group_norm is True and cfg.optim.amp is True and cfg.log.tensorboard is False
    assert cfg.data.loader.batch_size == 4 and cfg.data.loader.aug.train_sizes == (96, 128)
    assert cfg.optim.steps == (10, 20) and cfg.model.anchor_ratios == (0.5, 1.0, 2.0)
    assert all(type(r) is float for r in cfg.model.anchor_ratios)
    assert cfg.checkpoint.storage_path == "s3://b/runs"
    assert cfg.data.val_uri is None and cfg.optim.clip_grad_norm is None and cfg.eval.max_images == 5
    assert cfg.seed == 3
    # the original is untouched, everything else is carried over
    assert base.model.focal_gamma == 2.0 and base.data.val_uri is not None
    assert cfg.data.loader.aug.eval_size == base.data.loader.aug.eval_size
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_later_override_wins_and_empty_tuple() -> None:
    cfg = apply_overrides(get_recipe("tiny_cpu"), ["optim.base_lr=0.1", "optim.base_lr=0.2", "optim.steps=[]"])
    assert cfg.optim.base_lr == 0.2 and cfg.optim.steps == ()


def test_unknown_key_lists_valid_keys_and_suggests() -> None:
    cfg = get_recipe("tiny_cpu")
    with pytest.raises(ValueError, match=r"unknown key 'optim.lrr'.*Valid keys under 'optim': base_lr, base_batch"):
        apply_overrides(cfg, ["optim.lrr=0.1"])
    with pytest.raises(ValueError, match=r"Did you mean 'model.focal_gamma'\?.*num_classes"):
        apply_overrides(cfg, ["model.focal_gama=1"])
    with pytest.raises(ValueError, match=r"Did you mean 'data.loader.aug.flip_prob'\?"):
        apply_overrides(cfg, ["data.loader.aug.flip_prb=0"])
    with pytest.raises(ValueError, match=r"Did you mean 'optim'\?.*at the top level"):
        apply_overrides(cfg, ["optm.base_lr=1"])
    with pytest.raises(ValueError, match="not a section"):
        apply_overrides(cfg, ["optim.base_lr.x=1"])
    with pytest.raises(ValueError, match="model is a section"):
        apply_overrides(cfg, ["model=resnet18"])
    with pytest.raises(ValueError, match=r"dotted\.key=value"):
        apply_overrides(cfg, ["optim.base_lr"])


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("optim.base_lr=fast", "float"),
        ("optim.max_iters=1.5", "int"),
        ("log.tensorboard=yes please", "bool"),
        ("optim.steps=[10,x]", "tuple[int, ...]"),
        ("model.box_coder_weights=[1,2]", "tuple[float, float, float, float]"),
        ("scaling.num_workers=none", "int"),  # not Optional
    ],
)
def test_wrong_type_names_key_type_and_value(item: str, expected: str) -> None:
    key, _, value = item.partition("=")
    with pytest.raises(ValueError, match=re.escape(f"{key} expects {expected}, got '{value}'")) as e:
        apply_overrides(get_recipe("tiny_cpu"), [item])
    assert key in str(e.value) and value in str(e.value)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("optim.base_lr=-0.01", "base_lr must be > 0"),
        ("optim.steps=[20,40]", "must lie in 1..max_iters-1"),  # tiny_cpu runs 30 iterations
        ("optim.steps=[20,10]", "strictly increasing"),
        ("optim.steps=[10,10]", "strictly increasing"),
        ("optim.warmup_factor=0", r"warmup_factor must be in \(0, 1\]"),
        ("optim.warmup_factor=1.5", r"warmup_factor must be in \(0, 1\]"),
        ("optim.optimizer=lamb", "not one of"),
        ("optim.gamma=0", "gamma"),
        ("optim.clip_grad_norm=0", "clip_grad_norm"),
        ("scaling.min_workers=3", "min_workers"),  # above num_workers=2
        ("checkpoint.name=a/b", "checkpoint.name"),
        ("checkpoint.every=0", "checkpoint.every"),
        ("eval.max_images=0", "max_images"),
        ("log.every=0", "log.every"),
        ("data.eval_batch_size=0", "eval_batch_size"),
        ("data.train_uri=", "train_uri is empty"),
        ("model.backbone=resnet19", "backbone='resnet19' is not one of"),  # the model config's own check
        ("data.loader.aug.train_sizes=[16]", ">= 32 px"),  # the augmentation config's own check
        ("data.loader.batch_size=0", "batch_size"),
        ("optim.compile_mode=fast", "compile_mode='fast' is not one of"),
        ("optim.ddp_bucket_mb=0", "ddp_bucket_mb must be > 0"),
        ("data.loader.aug.pad_to=300", "pad_to must be 0 or a multiple of 128"),
        ("data.loader.pad_boxes_to=-2", "pad_boxes_to must be >= 0"),
    ],
)
def test_invalid_value_is_rejected_after_override(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as e:
        apply_overrides(get_recipe("tiny_cpu"), [item])
    assert str(e.value).startswith(item)  # the message says which override did it


def test_sections_validate_on_construction() -> None:
    with pytest.raises(ValueError, match="base_lr"):
        OptimConfig(base_lr=0.0)
    with pytest.raises(ValueError, match="steps"):
        OptimConfig(max_iters=1000)  # the default steps 60k/80k lie beyond it
    with pytest.raises(ValueError, match="val_uri is empty"):
        DataConfig(train_uri="x", val_uri="")
    with pytest.raises(ValueError, match="max_failures"):
        CheckpointConfig(max_failures=-2)
    with pytest.raises(ValueError, match=r"eval\.every"):
        EvalConfig(every=-1)
    with pytest.raises(ValueError, match=r"log\.every"):
        LogConfig(every=0)
    with pytest.raises(ValueError, match="data must be a DataConfig"):
        TrainConfig(recipe="x", model=get_recipe("tiny_cpu").model, data={"train_uri": "x"})  # type: ignore[arg-type]
    assert ScalingConfig(use_gpu=True).backend == "nccl" and ScalingConfig().backend == "gloo"
    with pytest.raises(ValueError, match="gpus_per_worker"):
        ScalingConfig(use_gpu=True, gpus_per_worker=0)


def test_from_dict_rejects_unknown_and_missing_keys_and_bad_types() -> None:
    d = to_dict(get_recipe("tiny_cpu"))
    with pytest.raises(ValueError, match=r"unknown key 'surprise'.*top level"):
        from_dict({**d, "surprise": 1})
    bad = json.loads(json.dumps(d))
    bad["data"]["loader"]["aug"]["bogus"] = 1
    with pytest.raises(ValueError, match=r"unknown key 'data.loader.aug.bogus'.*train_sizes"):
        from_dict(bad)
    with pytest.raises(ValueError, match="data"):
        from_dict({k: v for k, v in d.items() if k != "data"})
    with pytest.raises(ValueError, match=r"optim\.max_iters expects int"):
        from_dict({**d, "optim": {**d["optim"], "max_iters": "30"}})
    with pytest.raises(ValueError, match=r"log\.tensorboard expects bool"):
        from_dict({**d, "log": {**d["log"], "tensorboard": 1}})
    # keys left out take their defaults (a config saved before a field was added still loads)
    partial = from_dict({"recipe": "x", "model": {}, "data": {"train_uri": "t"}})
    assert partial.optim == OptimConfig() and partial.data.val_uri is None


def test_to_dict_is_plain_json() -> None:
    d = to_dict(get_recipe("coco_r50_1x"))
    assert d["optim"]["steps"] == [60000, 80000] and d["data"]["loader"]["aug"]["train_sizes"] == [800]
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_lr_schedule_by_hand() -> None:
    o = OptimConfig(base_lr=0.01, base_batch=16, max_iters=1000, steps=(600, 800), warmup_iters=100, warmup_factor=0.1)
    assert o.lr_at(0, 16) == pytest.approx(0.001)  # warm-up starts at warmup_factor * lr
    assert o.lr_at(50, 16) == pytest.approx(0.01 * (0.1 * 0.5 + 0.5))  # halfway: 0.0055
    assert o.lr_at(99, 16) == pytest.approx(0.01 * (0.1 * 0.01 + 0.99))
    assert o.lr_at(100, 16) == pytest.approx(0.01)  # warm-up over
    assert o.lr_at(599, 16) == pytest.approx(0.01)
    assert o.lr_at(600, 16) == pytest.approx(0.001)  # first decay applies from iteration 600
    assert o.lr_at(799, 16) == pytest.approx(0.001)
    assert o.lr_at(800, 16) == pytest.approx(0.0001)  # second decay
    assert o.lr_at(999, 16) == pytest.approx(0.0001)
    # linear scaling with the global batch, warm-up and decay included
    assert o.lr_for(8) == pytest.approx(0.005) and o.lr_for(32) == pytest.approx(0.02)
    assert o.lr_at(0, 4) == pytest.approx(0.00025) and o.lr_at(700, 64) == pytest.approx(0.004)
    # no warm-up, no steps: constant
    flat = OptimConfig(max_iters=10, steps=(), warmup_iters=0)
    assert {flat.lr_at(s, 16) for s in range(10)} == {0.01}
    with pytest.raises(ValueError, match="global_batch"):
        o.lr_for(0)
    with pytest.raises(ValueError, match="step"):
        o.lr_at(-1, 16)


def test_paper_schedule() -> None:
    o = get_recipe("coco_r50_1x").optim
    assert o.lr_at(0, 16) == pytest.approx(1e-5)
    assert o.lr_at(250, 16) == pytest.approx(0.01 * (0.001 * 0.5 + 0.5))
    assert o.lr_at(500, 16) == pytest.approx(0.01)
    assert o.lr_at(60000, 16) == pytest.approx(0.001) and o.lr_at(80000, 16) == pytest.approx(0.0001)


def test_overrides_are_validated_together_in_any_order() -> None:
    """Shrinking a schedule needs max_iters and steps changed together; their order must not matter."""
    base = get_recipe("tiny_cpu")
    for order in (["optim.max_iters=10", "optim.steps=[8]"], ["optim.steps=[8]", "optim.max_iters=10"]):
        cfg = apply_overrides(base, order)
        assert cfg.optim.max_iters == 10 and cfg.optim.steps == (8,)
    with pytest.raises(ValueError, match=r"optim.max_iters=10: optim.steps \[20\] must lie in"):
        apply_overrides(base, ["optim.max_iters=10"])


def test_retinanet_storage_is_the_default_storage_path(monkeypatch) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from engine.config import storage_default

    monkeypatch.delenv("RETINANET_STORAGE", raising=False)
    assert storage_default(["optim.max_iters=10"]) == ["optim.max_iters=10"]
    monkeypatch.setenv("RETINANET_STORAGE", "s3://cluster-bucket/runs")
    cfg = apply_overrides(get_recipe("demo"), storage_default([]))
    assert cfg.checkpoint.storage_path == "s3://cluster-bucket/runs"
    mine = apply_overrides(get_recipe("demo"), storage_default(["checkpoint.storage_path=s3://mine/runs"]))
    assert mine.checkpoint.storage_path == "s3://mine/runs"  # an explicit --set wins
    root = Path(__file__).resolve().parents[2]
    shown = subprocess.run([sys.executable, "jobs/train.py", "--recipe", "demo", "--print-config"], cwd=root,
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(shown.stdout)["checkpoint"]["storage_path"] == "s3://cluster-bucket/runs"
