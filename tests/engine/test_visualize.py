from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.visualize import MEAN, STD, denormalize, draw_detections, grid, plot_curves, save_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def gray_image(h: int = 240, w: int = 320) -> np.ndarray:
    return np.full((h, w, 3), 90, dtype=np.uint8)


def test_draw_detections_marks_boxes_above_threshold() -> None:
    image = gray_image()
    drawn = draw_detections(
        image,
        torch.tensor([[40.0, 60.0, 160.0, 200.0], [200.0, 20.0, 300.0, 100.0]]),
        torch.tensor([0, 1]),
        torch.tensor([0.87, 0.1]),  # the second is below score_thresh
        ["person", "dog"],
        gt_boxes=torch.tensor([[180.0, 120.0, 300.0, 220.0]]),
        gt_labels=torch.tensor([1]),
    )
    assert isinstance(drawn, Image.Image) and drawn.size == (320, 240)
    pixels = np.asarray(drawn)
    changed = (pixels != image).any(axis=2)
    assert changed[60:200, 40:44].any() and changed[198:202, 40:160].any()  # prediction outline
    assert not changed[30:90, 230:280].any()  # low-score box not drawn
    assert changed[118:122, 180:300].any()  # ground truth
    assert (pixels[118:122, 180:300] == 255).all(axis=2).any()  # in white
    assert (image == 90).all()  # input untouched


def test_draw_detections_accepts_numpy_and_empty() -> None:
    drawn = draw_detections(gray_image(), np.zeros((0, 4)), np.zeros(0), np.zeros(0), [])
    assert (np.asarray(drawn) == gray_image()).all()


def test_grid_and_save_png(tmp_path) -> None:
    images = [Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("RGB", (30, 60), (0, 255, 0))] * 3
    canvas = grid(images, cols=4)
    assert canvas.width >= 4 * 50 and canvas.height >= 2 * 60
    save_png(canvas, tmp_path / "sub" / "grid.png")
    data = (tmp_path / "sub" / "grid.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(tmp_path / "sub" / "grid.png") as loaded:
        assert loaded.size == canvas.size
    with pytest.raises(ValueError):
        grid([], cols=2)


def test_plot_curves_writes_a_png(tmp_path) -> None:
    history = [
        {"step": s, "loss": 2.0 / (1 + s / 50), "loss_cls": 1.2 / (1 + s / 50), "loss_box": 0.8 / (1 + s / 50)}
        for s in range(0, 500, 20)
    ] + [{"step": s, "AP": s / 1000, "AP50": s / 600, "APs": -1.0} for s in (100, 200, 300, 400)]
    path = tmp_path / "curves.png"
    plot_curves(history, path)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as loaded:
        assert loaded.width > loaded.height > 100
    plot_curves([], tmp_path / "empty.png")  # nothing to plot yet still gives a picture
    assert (tmp_path / "empty.png").read_bytes().startswith(PNG_SIGNATURE)


def test_denormalize_inverts_normalisation() -> None:
    pixels = torch.randint(0, 256, (2, 3, 8, 10), generator=torch.Generator().manual_seed(0))
    normalised = (pixels.float() - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    batch = denormalize(normalised)
    assert batch.dtype == np.uint8 and batch.shape == (2, 8, 10, 3)
    assert (batch == pixels.permute(0, 2, 3, 1).numpy()).all()
    single = denormalize(normalised[1])
    assert single.shape == (8, 10, 3) and (single == batch[1]).all()


def test_constants_match_the_pipeline() -> None:
    dali = pytest.importorskip("pipeline.dali")
    assert list(MEAN) == dali.MEAN and list(STD) == dali.STD
