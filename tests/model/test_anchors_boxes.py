"""Anchors, box coding and matching against hand-computed values."""

from __future__ import annotations

import math

import torch
from torchvision.ops import box_iou

from model.anchors import AnchorGenerator, cell_anchors
from model.boxes import BACKGROUND, IGNORE, BoxCoder, batched_box_iou, match, match_anchors

PAPER_SCALES = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
RATIOS = (0.5, 1.0, 2.0)


def test_cell_anchor_shapes_by_hand() -> None:
    a = cell_anchors(32, (1.0,), (1.0, 0.5), round_=False)
    assert torch.allclose(a[0], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    w, h = 32 * math.sqrt(2), 32 / math.sqrt(2)  # ratio h/w = 1/2, area 32^2
    assert torch.allclose(a[1], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]))


def test_paper_areas_on_every_level() -> None:
    for size in (32, 64, 128, 256, 512):
        a = cell_anchors(size, PAPER_SCALES, RATIOS, round_=False)
        areas = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
        expected = torch.tensor([(size * s) ** 2 for s in PAPER_SCALES] * 3)
        torch.testing.assert_close(areas, expected)
        assert len(a) == 9


def test_grid_for_a_small_image() -> None:
    gen = AnchorGenerator((32.0, 64.0, 128.0, 256.0, 512.0), (1.0,), (1.0,))
    sizes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]  # a 128 x 128 input
    anchors, per_level = gen((128, 128), sizes, torch.device("cpu"), torch.float32)
    assert per_level == [256, 64, 16, 4, 1]
    # P3, stride 8: cell (y=0, x=1) is the second anchor; cell (y=1, x=0) the 17th.
    assert anchors[1].tolist() == [8 - 16, -16, 8 + 16, 16]
    assert anchors[16].tolist() == [-16, 8 - 16, 16, 8 + 16]
    assert anchors[-1].tolist() == [-256, -256, 256, 256]  # P7, one cell at the origin
    again, _ = gen((128, 128), sizes, torch.device("cpu"), torch.float32)
    assert again is anchors  # cached per size


def test_box_coder_round_trip_and_clamp() -> None:
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0), clamp=math.log(1000 / 16))
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 50.0, 25.0]])
    boxes = torch.tensor([[1.0, 2.0, 12.0, 18.0], [0.0, 10.0, 40.0, 30.0]])
    deltas = coder.encode(boxes, anchors)
    # dx of the first pair by hand: 10 * ((1 + 12) / 2 - 5) / 10
    assert math.isclose(deltas[0, 0].item(), 1.5, rel_tol=1e-6)
    torch.testing.assert_close(coder.decode(deltas, anchors), boxes)
    huge = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), anchors[:1])
    assert math.isclose((huge[0, 2] - huge[0, 0]).item(), 10 * 1000 / 16, rel_tol=1e-5)


def test_matching_fg_ignore_bg_and_low_quality() -> None:
    box = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]]])  # [1, 2, 4]
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 9.0],  # IoU 0.9 with box 0: foreground
            [0.0, 0.0, 10.0, 4.5],  # IoU 0.45: ignore band
            [0.0, 0.0, 10.0, 3.0],  # IoU 0.3: background
            [100.0, 100.0, 110.0, 103.0],  # IoU 0.3 with box 1, but its best anchor: low-quality match
            [50.0, 50.0, 60.0, 60.0],  # overlaps nothing: background
        ]
    )
    iou = batched_box_iou(box, anchors)
    torch.testing.assert_close(iou[0, 0, :3], torch.tensor([0.9, 0.45, 0.3]))
    valid = torch.tensor([[True, True]])
    got = match(iou, valid, 0.5, 0.4, allow_low_quality=True)
    assert got.tolist() == [[0, IGNORE, BACKGROUND, 1, BACKGROUND]]
    strict = match(iou, valid, 0.5, 0.4, allow_low_quality=False)
    assert strict.tolist() == [[0, IGNORE, BACKGROUND, BACKGROUND, BACKGROUND]]
    # Padding boxes never match, and an image with only padding is all background.
    none = match(iou, torch.tensor([[False, False]]), 0.5, 0.4, allow_low_quality=True)
    assert (none == BACKGROUND).all()


def test_chunked_matching_equals_the_reference() -> None:
    """Many chunks, padding, an image without boxes, and ties: same as IoU-then-match and torchvision's IoU."""
    g = torch.Generator().manual_seed(0)
    anchors = AnchorGenerator((32.0, 64.0, 128.0, 256.0, 512.0), PAPER_SCALES, RATIOS, round_=True)(
        (256, 384), [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)], torch.device("cpu"), torch.float32
    )[0]
    xy = torch.rand(3, 30, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 8 + torch.rand(3, 30, 2, generator=g) * 150], dim=-1)
    boxes[0, 5] = anchors[1000]  # an exact tie with an anchor
    valid = torch.arange(30)[None, :] < torch.tensor([30, 7, 0])[:, None]
    iou = batched_box_iou(boxes, anchors)
    torch.testing.assert_close(iou[1], box_iou(boxes[1], anchors))
    for low_quality in (True, False):
        expected = match(iou, valid, 0.5, 0.4, low_quality)
        assert torch.equal(match_anchors(boxes, valid, anchors, 0.5, 0.4, low_quality), expected)
    assert (expected[2] == BACKGROUND).all() and (expected[0] >= 0).any()
