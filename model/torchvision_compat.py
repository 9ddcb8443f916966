"""Loads torchvision RetinaNet state dicts (v1 and v2, old and new key layouts) into our network."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from model.retinanet import RetinaNet

_RULES = [
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?", r"fpn.lateral.\1."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?", r"fpn.output.\1."),
    (r"^backbone\.fpn\.extra_blocks\.(p6|p7)\.", r"fpn.\1."),
    (r"^head\.classification_head\.conv\.", "head.cls_tower."),
    (r"^head\.classification_head\.cls_logits\.", "head.cls_logits."),
    (r"^head\.regression_head\.conv\.", "head.box_tower."),
    (r"^head\.regression_head\.bbox_reg\.", "head.bbox_pred."),
]
# torchvision < 0.13 saved the head towers as Sequential(conv, relu, conv, relu, ...): "conv.2.weight".
_OLD_TOWER = re.compile(r"^(head\.(?:cls|box)_tower)\.(\d+)\.(weight|bias)$")


def convert_torchvision_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames torchvision ``RetinaNet`` keys to ours; drops ``num_batches_tracked``."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = key
        for pattern, repl in _RULES:
            new, hits = re.subn(pattern, repl, new)
            if hits:
                break
        old = _OLD_TOWER.match(new)
        if old:
            new = f"{old[1]}.{int(old[2]) // 2}.0.{old[3]}"
        out[new] = value
    return out


def load_torchvision_state_dict(net: RetinaNet, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copies torchvision ``retinanet_resnet50_fpn`` (v1, with ``torchvision_config("v1")``) or
    ``retinanet_resnet50_fpn_v2`` (with ``torchvision_config("v2")``) weights into ``net``.

    Raises ``ValueError`` naming the keys or shapes that do not fit (e.g. a v2 file into a v1 config).
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    converted = convert_torchvision_state_dict(state_dict)
    own = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    wrong = [
        f"{k} {tuple(converted[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in converted and converted[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            "state dict does not fit this RetinaNetConfig (v1 weights need torchvision_config('v1'), "
            "v2 weights torchvision_config('v2'), num_classes must match): "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}, shape mismatch {wrong[:4]}"
        )
    net.load_state_dict(converted, strict=False)
