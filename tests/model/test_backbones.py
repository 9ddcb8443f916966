"""Every backbone builds, freezes what it should, loads a local ImageNet file, and feeds the FPN."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import model
from model.config import BACKBONES


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_runs(name: str) -> None:
    torch.manual_seed(0)
    net = model.build_retinanet(model.RetinaNetConfig(num_classes=2, backbone=name))[0]
    with torch.no_grad():
        out = net(torch.randn(1, 3, 128, 128))
    assert out["cls_logits"].shape == (1, 9 * (256 + 64 + 16 + 4 + 1), 2)
    assert out["bbox_deltas"].shape == (1, 9 * 341, 4)


def test_frozen_stages_and_norms() -> None:
    net = model.build_retinanet(model.RetinaNetConfig(backbone="resnet18", trainable_stages=3))[0]
    assert not net.backbone.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in net.backbone.layer1.parameters())
    assert all(p.requires_grad for p in net.backbone.layer2.parameters())
    assert isinstance(net.backbone.bn1, FrozenBatchNorm2d)
    everything = model.build_retinanet(
        model.RetinaNetConfig(backbone="resnet18", trainable_stages=5, backbone_norm="bn")
    )[0]
    assert all(p.requires_grad for p in everything.parameters())
    assert isinstance(everything.backbone.bn1, nn.BatchNorm2d)
    sync = model.build_retinanet(model.RetinaNetConfig(backbone="resnet18", backbone_norm="sync_bn"))[0]
    assert isinstance(sync.backbone.bn1, nn.SyncBatchNorm)


def test_head_init_follows_the_paper() -> None:
    net = model.build_retinanet(model.RetinaNetConfig(backbone="resnet18"))[0]
    bias = net.head.cls_logits.bias
    assert torch.allclose(torch.sigmoid(bias), torch.full_like(bias, 0.01))
    for conv in [*net.head.cls_tower.modules(), net.head.bbox_pred]:
        if isinstance(conv, nn.Conv2d):
            assert abs(conv.weight.std().item() - 0.01) < 0.001
            assert conv.bias is None or not conv.bias.any()
    assert len(net.head.cls_tower) == 4 and net.head.cls_tower[0][0] is not net.head.box_tower[0][0]


def test_p6_from_c5_or_p5() -> None:
    paper = model.build_retinanet(model.RetinaNetConfig(backbone="resnet50"))[0]
    assert paper.fpn.p6.in_channels == 2048  # P6 = conv(C5)
    v1 = model.build_retinanet(model.torchvision_config("v1"))[0]
    assert v1.fpn.p6.in_channels == 256


def test_backbone_weights_from_local_file(tmp_path) -> None:
    torch.manual_seed(3)
    imagenet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)
    net = model.build_retinanet(model.RetinaNetConfig(backbone="resnet18", backbone_weights=str(path)))[0]
    assert torch.equal(net.backbone.layer3[0].conv1.weight, imagenet.layer3[0].conv1.weight)
    assert torch.equal(net.backbone.bn1.running_var, imagenet.bn1.running_var)
    with pytest.raises(ValueError, match="not a torchvision ResNet state dict"):
        model.build_retinanet(model.RetinaNetConfig(backbone="resnet50", backbone_weights=str(path)))
    with pytest.raises(ValueError, match="not found"):
        model.build_retinanet(model.RetinaNetConfig(backbone="resnet18", backbone_weights=str(tmp_path / "nope.pth")))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"not a complete torch\.save state dict"):
        model.build_retinanet(model.RetinaNetConfig(backbone="resnet18", backbone_weights=str(truncated)))
