"""A tiny RetinaNet learns one synthetic image: the loss falls and the box is detected."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

import model


def _image() -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.full((1, 3, 128, 128), -1.0)
    image[0, 0, 30:90, 20:70] = 2.0  # a red 50 x 60 rectangle of class 2
    return image, torch.tensor([[20.0, 30.0, 70.0, 90.0]])


def test_tiny_model_overfits_one_image() -> None:
    torch.manual_seed(0)
    cfg = model.RetinaNetConfig(
        num_classes=3, backbone="resnet18", backbone_norm="bn", trainable_stages=5, fpn_channels=64, head_num_convs=2
    )
    net, loss_fn, postprocess = model.build_retinanet(cfg)
    image, box = _image()
    targets = [{"boxes": box, "labels": torch.tensor([2])}]
    optim = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    net.train()
    losses = []
    for _ in range(120):
        loss = loss_fn(net(image), targets)["loss"]
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.2 * sum(losses[:10]) / 10, losses[::10]
    net.eval()
    with torch.no_grad():
        dets = postprocess(net(image), [(128, 128)])[0]
    assert dets["labels"][0].item() == 2 and dets["scores"][0].item() > 0.5
    assert box_iou(dets["boxes"][:1], box).item() > 0.7
