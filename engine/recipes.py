"""Named runs: each recipe is a function returning a complete ``TrainConfig``; change it with overrides."""

from __future__ import annotations

from collections.abc import Callable

from engine.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    ScalingConfig,
    TrainConfig,
)
from model import RetinaNetConfig
from pipeline.dali import AugmentConfig
from pipeline.loader import LoaderConfig


def tiny_cpu() -> TrainConfig:
    """For tests: a few seconds of 2-worker CPU training on 128 px images. The data URIs are placeholders."""
    return TrainConfig(
        recipe="tiny_cpu",
        model=RetinaNetConfig(
            num_classes=5,
            backbone="resnet18",
            backbone_norm="bn",
            trainable_stages=5,
            fpn_channels=64,
            head_num_convs=2,
            detections_per_image=20,
        ),
        data=DataConfig(
            train_uri="REPLACE-ME/tiny/train",
            val_uri="REPLACE-ME/tiny/val",
            loader=LoaderConfig(
                batch_size=2,
                num_workers=1,
                shuffle_buffer=16,
                num_threads=1,
                aug=AugmentConfig(train_sizes=(128,), eval_size=128, max_size=256),
            ),
            eval_batch_size=2,
        ),
        # AdamW: from-scratch weights move far faster than with SGD in 30 steps
        optim=OptimConfig(
            optimizer="adamw",
            base_lr=1e-3,
            base_batch=4,
            max_iters=30,
            steps=(20,),
            warmup_iters=5,
            warmup_factor=0.1,
            clip_grad_norm=10.0,
        ),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=1),
        checkpoint=CheckpointConfig(name="tiny_cpu", every=10, keep_last=2, max_failures=1),
        eval=EvalConfig(every=15, max_images=8, num_vis_images=2),
        log=LogConfig(every=5),
    )


def demo() -> TrainConfig:
    """The demo on the generated 256 px synthetic dataset: a small trainable ResNet-18 RetinaNet that
    learns in a few minutes on 2 CPU workers. Data under ``data/demo/`` (where the demo writes it)."""
    return TrainConfig(
        recipe="demo",
        model=RetinaNetConfig(
            num_classes=5,
            backbone="resnet18",
            backbone_norm="bn",  # from scratch: frozen statistics of random weights would normalise nothing
            trainable_stages=5,
            fpn_channels=128,
            head_num_convs=2,
            detections_per_image=50,
        ),
        data=DataConfig(
            train_uri="data/demo/train",
            val_uri="data/demo/val",
            loader=LoaderConfig(
                batch_size=4,
                num_workers=1,
                shuffle_buffer=128,
                num_threads=1,
                aug=AugmentConfig(train_sizes=(224, 256, 288), eval_size=256, max_size=384),
            ),
            eval_batch_size=8,
        ),
        optim=OptimConfig(
            optimizer="adamw",
            base_lr=1e-3,
            base_batch=8,  # 2 workers x 4
            weight_decay=1e-4,
            max_iters=400,
            steps=(300, 360),
            warmup_iters=50,
            warmup_factor=0.01,
            clip_grad_norm=10.0,
        ),
        scaling=ScalingConfig(num_workers=2, cpus_per_worker=1),
        checkpoint=CheckpointConfig(name="demo", every=100, keep_last=2),
        eval=EvalConfig(every=200, num_vis_images=4),
        log=LogConfig(every=10),
    )


def coco_r50_1x() -> TrainConfig:
    """The paper's R50-FPN 1x on COCO (35.7 AP at 800 px): 8 GPUs x 2 images, SGD lr 0.01, 90k iterations,
    ÷10 at 60k and 80k, flip, shorter side 800. The paper starts from ImageNet weights: add
    ``model.backbone_weights=/path/resnet50.pth`` (torchvision layout). Set the bucket in the URIs."""
    return TrainConfig(
        recipe="coco_r50_1x",
        model=RetinaNetConfig(backbone="resnet50", backbone_norm="frozen_bn", trainable_stages=3),
        data=DataConfig(
            train_uri="s3://YOUR-BUCKET/coco/train2017",
            val_uri="s3://YOUR-BUCKET/coco/val2017",
            loader=LoaderConfig(
                batch_size=2,
                num_workers=4,
                shuffle_buffer=1024,
                num_threads=4,
                aug=AugmentConfig(train_sizes=(800,), eval_size=800, max_size=1333, flip_prob=0.5),
            ),
            eval_batch_size=8,
        ),
        optim=OptimConfig(
            optimizer="sgd",
            base_lr=0.01,
            base_batch=16,
            momentum=0.9,
            weight_decay=1e-4,
            max_iters=90000,
            steps=(60000, 80000),
            gamma=0.1,
            warmup_iters=500,
            warmup_factor=0.001,
            amp=True,
        ),
        scaling=ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=8, gpus_per_worker=1.0),
        checkpoint=CheckpointConfig(storage_path="s3://YOUR-BUCKET/runs", name="coco_r50_1x", every=5000),
        eval=EvalConfig(every=10000, num_vis_images=8),
        log=LogConfig(every=20),
    )


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "tiny_cpu": tiny_cpu,
    "demo": demo,
    "coco_r50_1x": coco_r50_1x,
}


def get_recipe(name: str) -> TrainConfig:
    """A fresh ``TrainConfig`` of the named recipe."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    return RECIPES[name]()
