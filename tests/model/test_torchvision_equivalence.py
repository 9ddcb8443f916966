"""Ours equals torchvision's RetinaNet on the same weights: head outputs, anchors, loss and detections."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

import model
from tests.model.tv_reference import split_levels, torchvision_retinanet


def _pair(version: str) -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    tv = torchvision_retinanet(version).eval()
    ours = model.build_retinanet(model.torchvision_config(version))
    model.load_torchvision_state_dict(ours[0], tv.state_dict())
    ours[0].eval()
    return tv, ours


def _targets(image_size: int, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Image 0 has no boxes, image 1 has 50 boxes of all sizes."""
    xy = torch.rand(50, 2, generator=generator) * (image_size - 40)
    wh = 4 + torch.rand(50, 2, generator=generator) * (image_size / 2)
    boxes = torch.cat([xy, (xy + wh).clamp(max=image_size)], dim=1)
    return [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": boxes, "labels": torch.randint(0, 91, (50,), generator=generator)},
    ]


def _tv_forward(tv, images):
    features = list(tv.backbone(images).values())
    head = tv.head(features)
    image_list = ImageList(images, [tuple(images.shape[-2:])] * images.shape[0])
    return head, tv.anchor_generator(image_list, features)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_head_outputs_anchors_and_loss_match(version: str) -> None:
    tv, (net, loss_fn, _) = _pair(version)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 256, 384, generator=g)
    with torch.no_grad():
        tv_head, tv_anchors = _tv_forward(tv, images)
        out = net(images)
    # Folding frozen BN into the convolutions rounds differently from conv-then-BN: float32 ulps of the
    # logits (about -4.6 at the prior), which vary with the CPU's kernels (1.7e-5 seen on one AMD EPYC).
    torch.testing.assert_close(out["cls_logits"], tv_head["cls_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["bbox_deltas"], tv_head["bbox_regression"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["anchors"], tv_anchors[0], atol=0, rtol=0)

    targets = _targets(256, g)
    tv_loss = tv.compute_loss(targets, tv_head, tv_anchors)
    ours = loss_fn(out, targets)
    assert ours["num_foreground"] > 0
    torch.testing.assert_close(ours["loss_cls"], tv_loss["classification"], rtol=1e-4, atol=0)
    torch.testing.assert_close(ours["loss_box"], tv_loss["bbox_regression"], rtol=1e-4, atol=0)


@pytest.mark.parametrize("image_sizes", [[(256, 384), (256, 384)], [(200, 384), (256, 301)]])
def test_detections_match(image_sizes: list[tuple[int, int]]) -> None:
    tv, (net, _, postprocess) = _pair("v1")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        out = net(torch.zeros(2, 3, 256, 384))
    n, a, k = out["cls_logits"].shape
    # Many candidates above the score threshold, some levels past top-1000, and boxes that need clipping.
    out["cls_logits"] = torch.randn(n, a, k, generator=g) * 1.5 - 4.0
    out["bbox_deltas"] = torch.randn(n, a, 4, generator=g) * 0.5
    per_level = out["num_anchors_per_level"]
    tv_dets = tv.postprocess_detections(
        {
            "cls_logits": split_levels(out["cls_logits"], per_level),
            "bbox_regression": split_levels(out["bbox_deltas"], per_level),
        },
        [list(out["anchors"].split(per_level))] * n,
        image_sizes,
    )
    ours = postprocess(out, image_sizes)
    for mine, theirs in zip(ours, tv_dets, strict=True):
        assert len(theirs["scores"]) == 100  # the cap is reached: the test covers the top-k and NMS paths
        torch.testing.assert_close(mine["scores"], theirs["scores"])
        torch.testing.assert_close(mine["boxes"], theirs["boxes"])
        assert torch.equal(mine["labels"], theirs["labels"])


def test_old_torchvision_key_layout_loads() -> None:
    """Published v1 weights predate torchvision 0.13: towers are Sequential(conv, relu, ...) and FPN
    blocks are bare convs. Both layouts load to the same parameters."""
    tv, (net, _, _) = _pair("v1")
    old = {}
    for key, value in tv.state_dict().items():
        key = key.replace("inner_blocks.0.0.", "inner_blocks.0.").replace("inner_blocks.1.0.", "inner_blocks.1.")
        key = key.replace("inner_blocks.2.0.", "inner_blocks.2.")
        for i in range(3):
            key = key.replace(f"layer_blocks.{i}.0.", f"layer_blocks.{i}.")
        for i in range(4):
            key = key.replace(f"head.conv.{i}.0.", f"head.conv.{2 * i}.")
            key = key.replace(f"_head.conv.{i}.0.", f"_head.conv.{2 * i}.")
        old[key] = value
    assert "head.classification_head.conv.6.weight" in old
    fresh = model.build_retinanet(model.torchvision_config("v1"))[0]
    model.load_torchvision_state_dict(fresh, old)
    for (name, a), b in zip(net.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_v2_weights_into_v1_config_is_a_clear_error() -> None:
    tv = torchvision_retinanet("v2")
    net = model.build_retinanet(model.torchvision_config("v1"))[0]
    with pytest.raises(ValueError, match="torchvision_config"):
        model.load_torchvision_state_dict(net, tv.state_dict())
