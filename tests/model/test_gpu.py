"""The model on a CUDA GPU gives what it gives on the CPU (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import model
from tests.model.test_torchvision_equivalence import _pair, _targets

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 would move results by ~1e-3; the comparison is about our code, not the matrix units."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_forward_loss_and_detections_match_cpu() -> None:
    _, (net, loss_fn, postprocess) = _pair("v1")
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 256, 384, generator=g)
    targets = _targets(256, g)
    with torch.no_grad():
        cpu = net(images)
        gpu = net.cuda()(images.cuda())
    torch.testing.assert_close(gpu["cls_logits"].cpu(), cpu["cls_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu["anchors"].cpu(), cpu["anchors"])
    cpu_loss = loss_fn(cpu, targets)
    gpu_loss = loss_fn(gpu, [{k: v.cuda() for k, v in t.items()} for t in targets])
    for key in ("loss_cls", "loss_box"):
        torch.testing.assert_close(gpu_loss[key].cpu(), cpu_loss[key], rtol=1e-4, atol=1e-6)
    assert gpu_loss["num_foreground"].item() == cpu_loss["num_foreground"].item()

    n, a, k = cpu["cls_logits"].shape
    cpu["cls_logits"] = torch.randn(n, a, k, generator=g) * 1.5 - 4.0
    cpu["bbox_deltas"] = torch.randn(n, a, 4, generator=g) * 0.5
    gpu = {**gpu, "cls_logits": cpu["cls_logits"].cuda(), "bbox_deltas": cpu["bbox_deltas"].cuda()}
    sizes = [(256, 384), (200, 300)]
    for mine, ref in zip(postprocess(gpu, sizes), postprocess(cpu, sizes), strict=True):
        assert mine["boxes"].is_cuda
        torch.testing.assert_close(mine["scores"].cpu(), ref["scores"])
        torch.testing.assert_close(mine["boxes"].cpu(), ref["boxes"], atol=1e-3, rtol=1e-5)
        assert torch.equal(mine["labels"].cpu(), ref["labels"])


def test_bf16_autocast_training_step() -> None:
    torch.manual_seed(0)
    net, loss_fn, _ = model.build_retinanet(model.RetinaNetConfig(num_classes=5))
    net = net.cuda().to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 384, 512, device="cuda").contiguous(memory_format=torch.channels_last)
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 200.0, 220.0]], device="cuda"), "labels": torch.tensor([3], device="cuda")}
    ] * 2
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(images)
        losses = loss_fn(out, targets)
    assert out["cls_logits"].dtype == torch.bfloat16 and losses["loss"].dtype == torch.float32
    losses["loss"].backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_training_step_never_waits_for_the_gpu() -> None:
    """CUDA's own sync detector (``set_sync_debug_mode("error")``) around the loop's step, bf16 autocast:
    what tests/engine/test_step.py checks on the CPU, plus host-to-device copies, which only a GPU shows."""
    from engine.step import train_step
    from pipeline.batch import Batch

    torch.manual_seed(0)
    net, loss_fn, _ = model.build_retinanet(model.RetinaNetConfig(num_classes=5, backbone="resnet18"))
    net = net.cuda().to(memory_format=torch.channels_last)
    loss_fn.check_inputs = False
    boxes = torch.zeros(2, 8, 4)
    boxes[:, 0] = torch.tensor([10.0, 20.0, 200.0, 220.0])
    labels = torch.full((2, 8), -1)
    labels[:, 0] = 3
    sizes = torch.tensor([[384, 512]] * 2)
    batch = Batch(images=torch.randn(2, 3, 384, 512), image_sizes=sizes, original_sizes=sizes,
                  image_ids=torch.arange(2), boxes=boxes, labels=labels, num_boxes=torch.tensor([1, 1]),
                  flipped=torch.zeros(2, dtype=torch.bool)).to("cuda")  # fmt: skip
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    for step in range(3):  # the first step at an input size builds its anchors on the host (then cached)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            losses = train_step(net, loss_fn, optimizer, params, batch, amp=True, channels_last=True,
                                clip_grad_norm=10.0)  # fmt: skip
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(losses["loss"]).item()
