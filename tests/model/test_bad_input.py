"""User errors are ValueErrors that name what is wrong."""

from __future__ import annotations

import pytest
import torch

import model


@pytest.fixture(scope="module")
def tiny():
    cfg = model.RetinaNetConfig(num_classes=4, backbone="resnet18", fpn_channels=32, head_num_convs=1)
    return model.build_retinanet(cfg)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(3, 128, 128), "rank 4"),
        (torch.zeros(1, 1, 128, 128), "3 channels"),
        (torch.zeros(1, 3, 128, 200), "multiples of 128"),
        (torch.zeros(1, 3, 128, 128, dtype=torch.uint8), "float"),
    ],
)
def test_bad_images(tiny, images: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny[0](images)


@pytest.mark.parametrize(
    "boxes, labels, message",
    [
        ([[10.0, 10.0, 5.0, 40.0]], [0], "degenerate"),
        ([[10.0, 10.0, 40.0, 10.0]], [0], "degenerate"),
        ([[-5.0, 10.0, 40.0, 50.0]], [0], "outside the image"),
        ([[10.0, 10.0, 300.0, 50.0]], [0], "outside the image"),
        ([[10.0, 10.0, 40.0, 50.0]], [4], "label 4 is outside"),
        ([[10.0, 10.0, 40.0, 50.0]], [-1], "label -1 is outside"),
    ],
)
def test_bad_targets(tiny, boxes, labels, message: str) -> None:
    net, loss_fn, _ = tiny
    out = net(torch.zeros(2, 3, 128, 256))
    good = {"boxes": torch.tensor([[1.0, 1.0, 20.0, 20.0]]), "labels": torch.tensor([1])}
    bad = {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}
    with pytest.raises(ValueError, match=message) as err:
        loss_fn(out, [good, bad])
    assert "targets[1] box 0" in str(err.value)


def test_bad_target_structure(tiny) -> None:
    net, loss_fn, post = tiny
    out = net(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="list of 1"):
        loss_fn(out, [])
    with pytest.raises(ValueError, match=r"\[M, 4\]"):
        loss_fn(out, [{"boxes": torch.zeros(3), "labels": torch.zeros(3, dtype=torch.int64)}])
    with pytest.raises(ValueError, match="one \\(H, W\\) per image"):
        post(out, [(128, 128), (128, 128)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone": "vgg16"}, "backbone='vgg16' is not one of"),
        ({"fg_iou_thresh": 0.3}, "bg_iou_thresh <= fg_iou_thresh"),
        ({"anchor_sizes": (32.0, 64.0)}, "one size per level"),
        ({"prior_prob": 0.0}, "prior_prob"),
        ({"box_loss": "mse"}, "box_loss"),
        ({"trainable_stages": 6}, "trainable_stages"),
        ({"head_group_norm": True, "fpn_channels": 48}, "32 groups"),
    ],
)
def test_bad_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model.RetinaNetConfig(**kwargs)


def test_unknown_config_key_is_an_error() -> None:
    with pytest.raises(TypeError, match="focal_beta"):
        model.RetinaNetConfig(focal_beta=1.0)  # type: ignore[call-arg]
