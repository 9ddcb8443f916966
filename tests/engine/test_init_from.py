"""``model.init_from``: starting from a torchvision RetinaNet state dict or from one of our checkpoints.
Loaded tensors are bit-equal to the source; another class count gets a fresh classification output with the
paper's prior bias; ``by_name`` keeps the rows of the classes both have; anything else is a ValueError that
says what was expected."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from engine import checkpoint as ckpt
from engine.init_from import EXPECTED, check_source, init_from
from model import build_retinanet, torchvision_config
from model.config import RetinaNetConfig
from model.torchvision_compat import convert_torchvision_state_dict

PRIOR_BIAS = -math.log(99)
TINY = {"backbone": "resnet18", "backbone_norm": "bn", "trainable_stages": 5, "fpn_channels": 64, "head_num_convs": 1}


def _rows(weight: torch.Tensor, label: int, classes: int, anchors: int = 9) -> torch.Tensor:
    return torch.stack([weight[a * classes + label] for a in range(anchors)])


def test_a_torchvision_state_dict_loads_bit_equal_and_maps_classes_by_name(tmp_path) -> None:
    torch.manual_seed(0)
    tv = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    source = convert_torchvision_state_dict(tv.state_dict())
    names = ["dog", "unicorn", "person"]
    net, _, _ = build_retinanet(torchvision_config("v1", num_classes=3))
    report, what = init_from(net, str(path), names, by_name=True)
    assert what.startswith("torchvision v1 state dict")
    own = net.state_dict()
    for key, value in source.items():
        if not key.startswith("head.cls_logits"):
            assert torch.equal(own[key], value), key
    assert report.fresh == {"head.cls_logits": 2} and not report.ignored and report.mapped_classes == 2
    coco = tv.state_dict()["head.classification_head.cls_logits.weight"]
    dog, person = 18, 1  # torchvision's COCO label indices
    assert torch.equal(_rows(own["head.cls_logits.weight"], 0, 3), _rows(coco, dog, 91))
    assert torch.equal(_rows(own["head.cls_logits.weight"], 2, 3), _rows(coco, person, 91))
    assert torch.allclose(own["head.cls_logits.bias"][1::3], torch.full((9,), PRIOR_BIAS))  # unicorn: fresh


def test_our_checkpoint_with_other_classes_gives_a_fresh_output_layer(tmp_path) -> None:
    torch.manual_seed(1)
    source, _, _ = build_retinanet(RetinaNetConfig(num_classes=5, **TINY))
    categories = [{"id": i + 1, "name": f"c{i}", "label": i} for i in range(5)]
    ckpt.save(tmp_path / "best", source, None, {}, {"step": 7}, categories)
    net, _, _ = build_retinanet(RetinaNetConfig(num_classes=2, **TINY))
    report, what = init_from(net, str(tmp_path / "best"), ["x", "y"], by_name=False)
    assert what == f"checkpoint {tmp_path / 'best'}"
    own, theirs = net.state_dict(), source.state_dict()
    assert all(torch.equal(own[k], theirs[k]) for k in own if not k.startswith("head.cls_logits"))
    assert report.fresh == {"head.cls_logits": 2} and report.mapped_classes == 0
    assert torch.allclose(own["head.cls_logits.bias"], torch.full_like(own["head.cls_logits.bias"], PRIOR_BIAS))
    assert "loaded: backbone" in report.describe() and "initialised afresh: head.cls_logits 2" in report.describe()


def test_a_file_of_neither_kind_says_what_was_expected(tmp_path) -> None:
    net, _, _ = build_retinanet(RetinaNetConfig(num_classes=2, **TINY))
    backbone_only = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), backbone_only)
    with pytest.raises(ValueError, match="is not a RetinaNet state dict") as raised:
        init_from(net, str(backbone_only), ["x", "y"], by_name=False)
    assert EXPECTED in str(raised.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"model.init_from=.*empty"):
        init_from(net, str(tmp_path / "empty"), ["x", "y"], by_name=False)
    with pytest.raises(ValueError, match=r"model.init_from=.*empty"):
        check_source(str(tmp_path / "empty"))  # the driver's preflight: before any worker starts
    check_source(str(backbone_only))  # a file: its tensors are checked by the workers, as above
