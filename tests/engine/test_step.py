"""The training step is free of host syncs, and the padded targets it feeds the loss give the same loss."""

from __future__ import annotations

import pytest
import torch

from engine.step import train_step
from model import RetinaNetConfig, build_retinanet
from model.boxes import IGNORE
from pipeline.dali import AugmentConfig
from pipeline.loader import DetectionLoader, LoaderConfig, open_dataset
from tests.pipeline.shard_util import coco_records, split, tar_bytes, write_dataset
from tests.sync_ops import SyncRecorder


@pytest.fixture(scope="module")
def batch_and_classes(coco128, tmp_path_factory):
    """One real training batch (DALI, CPU) of 3 coco128 images at 256 px, with static shapes."""
    samples, cats = coco_records(coco128, 9)
    uri = str(tmp_path_factory.mktemp("coco9"))
    write_dataset(uri, [tar_bytes(s) for s in split(samples, 3)], cats)
    aug = AugmentConfig(train_sizes=(224, 256), eval_size=256, max_size=384, pad_to=384)
    cfg = LoaderConfig(batch_size=3, num_workers=1, pad_boxes_to=48, aug=aug)
    batch = next(iter(DetectionLoader(open_dataset(uri), rank=0, world_size=1, train=True, cfg=cfg)))
    assert int(batch.num_boxes.min()) < 48 and batch.boxes.shape[1] == 48  # padding rows are present
    return batch, len(cats)


def _model(num_classes: int):
    torch.manual_seed(0)
    net, loss_fn, _ = build_retinanet(RetinaNetConfig(num_classes=num_classes, backbone="resnet18"))
    return net, loss_fn


@pytest.mark.parametrize(("channels_last", "clip"), [(False, 0.0), (True, 10.0)])
def test_training_step_holds_no_host_sync(batch_and_classes, channels_last: bool, clip: float) -> None:
    """Forward, loss (matching, focal, box), backward, clipping and the SGD update call no operator that
    reads a device value back or sizes its output by the data: on a GPU the host never waits in a step."""
    batch, k = batch_and_classes
    net, loss_fn = _model(k)
    loss_fn.check_inputs = False  # as in the training loop: the loader checked the targets on the host
    if channels_last:
        net.to(memory_format=torch.channels_last)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):  # the second step also runs SGD with momentum buffers
        with SyncRecorder() as rec:
            losses = train_step(net, loss_fn, optimizer, params, batch, amp=False, channels_last=channels_last,
                                clip_grad_norm=clip)  # fmt: skip
        assert rec.calls == []
    assert torch.isfinite(losses["loss"]) and int(losses["num_foreground"]) > 0


def test_the_recorder_sees_each_kind_of_sync(batch_and_classes) -> None:
    """So that the test above can fail: the input check (``bool(bad.any())``), a boolean-mask assignment
    (how matching used to mark ignored anchors), ``nonzero`` and ``.item()`` are all recorded."""
    batch, k = batch_and_classes
    net, loss_fn = _model(k)
    with torch.no_grad():
        outputs = net(batch.images)
    with SyncRecorder() as rec:
        loss_fn(outputs, batch.padded_targets())  # check_inputs is on by default
        matches = torch.zeros(4, dtype=torch.int64)
        matches[torch.tensor([True, False, True, False])] = IGNORE
        torch.arange(4).nonzero()
        torch.ones(()).item()
    names = [name for name, _ in rec.calls]
    assert names == ["aten::_local_scalar_dense", "aten::index_put_", "aten::nonzero", "aten::_local_scalar_dense"]
    assert rec.calls[0][1].endswith("model/loss.py:" + rec.calls[0][1].rsplit(":", 1)[1])


def test_padded_targets_give_the_loss_and_gradients_of_the_ragged_ones(batch_and_classes) -> None:
    batch, k = batch_and_classes
    net, loss_fn = _model(k)
    results = []
    for targets in (batch.targets(), batch.padded_targets()):
        net.zero_grad(set_to_none=True)
        losses = loss_fn(net(batch.images), targets)
        losses["loss"].backward()
        results.append((losses, [p.grad.clone() for p in net.head.parameters()]))
    (ragged, g_ragged), (padded, g_padded) = results
    for key in ("loss", "loss_cls", "loss_box", "num_foreground"):
        torch.testing.assert_close(padded[key], ragged[key])
    for a, b in zip(g_padded, g_ragged, strict=True):
        torch.testing.assert_close(a, b)


def test_an_image_without_boxes_gives_finite_gradients_in_both_forms(batch_and_classes) -> None:
    """Every anchor of a box-less image is background, its matched index clamps to padding row 0: that
    row must be a harmless box (a zero box gave NaN gradients through the masked box loss)."""
    batch, k = batch_and_classes
    labels = batch.labels.clone()
    labels[0] = -1
    boxes = batch.boxes.clone()
    boxes[0] = 0.0
    ragged = [
        {"boxes": boxes[i, :m], "labels": labels[i, :m]} for i, m in enumerate([0, *batch.num_boxes[1:].tolist()])
    ]
    for box_loss in ("smooth_l1", "giou"):
        torch.manual_seed(0)
        net, loss_fn, _ = build_retinanet(RetinaNetConfig(num_classes=k, backbone="resnet18", box_loss=box_loss))
        grads = []
        for targets in (ragged, {"boxes": boxes, "labels": labels}):
            net.zero_grad(set_to_none=True)
            loss_fn(net(batch.images), targets)["loss"].backward()
            grads.append([p.grad.clone() for p in net.head.parameters()])
        for a, b in zip(*grads, strict=True):
            assert torch.isfinite(b).all(), box_loss
            torch.testing.assert_close(b, a)


def test_bad_padded_targets_are_refused(batch_and_classes) -> None:
    batch, k = batch_and_classes
    net, loss_fn = _model(k)
    with torch.no_grad():
        outputs = net(batch.images)
    with pytest.raises(ValueError, match=r"boxes must have shape \[3, M >= 1, 4\]"):
        loss_fn(outputs, {"boxes": batch.boxes[:2], "labels": batch.labels[:2]})
    with pytest.raises(ValueError, match="labels must be integers of shape"):
        loss_fn(outputs, {"boxes": batch.boxes, "labels": batch.labels.float()})
    bad = batch.labels.clone()
    bad[0, 0] = k
    with pytest.raises(ValueError, match=rf"targets\[0\] box 0: label {k} is outside \[0, {k}\)"):
        loss_fn(outputs, {"boxes": batch.boxes, "labels": bad})
