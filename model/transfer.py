"""Starting a network from another one's weights: every tensor whose name and shape fit is copied; the
classification output (``head.cls_logits``) of another class count is initialised afresh with the paper's
prior bias, or, with a class map, keeps the rows of the classes both networks have.

``cls_logits`` has ``A * K`` output channels, anchor-major: channel ``a * K + k`` is class ``k`` of anchor
``a`` (``model.head``). A class map ``{target_label: source_label}`` copies those rows for every anchor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from model.retinanet import RetinaNet

GROUPS = ("backbone", "fpn", "head.cls_tower", "head.box_tower", "head.cls_logits", "head.bbox_pred")


@dataclass
class Transfer:
    """What happened to each tensor, by group (``GROUPS``): loaded, initialised afresh, or ignored (in the
    source only); ``mapped_classes``: the class rows kept through a class map."""

    loaded: dict[str, int] = field(default_factory=dict)
    fresh: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    mapped_classes: int = 0

    def describe(self) -> str:
        def part(name: str, counts: dict[str, int]) -> str:
            return f"{name}: " + (", ".join(f"{g} {n}" for g, n in counts.items()) or "none")

        mapped = f"; class rows kept by name: {self.mapped_classes}" if self.mapped_classes else ""
        return "; ".join(part(n, c) for n, c in (("loaded", self.loaded), ("initialised afresh", self.fresh),
                                                   ("ignored", self.ignored))) + mapped  # fmt: skip


def group(key: str) -> str:
    return next((g for g in GROUPS if key.startswith(g)), key.split(".")[0])


def transfer(
    net: RetinaNet, source: Mapping[str, torch.Tensor], class_map: Mapping[int, int] | None = None
) -> Transfer:
    """Copies into ``net`` every tensor of ``source`` (our key layout) whose name and shape fit (bit-equal);
    a ``head.cls_logits`` of another shape is re-initialised (normal std ``head_init_std``-like 0.01, bias
    ``-log((1 - pi) / pi)`` with pi = 0.01), then gets the mapped rows of ``class_map``."""
    own = net.state_dict()
    report = Transfer()
    with torch.no_grad():
        for key, target in own.items():
            if key.endswith("num_batches_tracked"):
                continue
            value = source.get(key)
            remap = class_map is not None and key.startswith("head.cls_logits.")
            if value is not None and value.shape == target.shape and not remap:
                target.copy_(value)
                _count(report.loaded, key)
            elif key.startswith("head.cls_logits."):
                _fresh_logits(target, key)
                _count(report.fresh, key)
                if value is not None and class_map is not None:
                    report.mapped_classes = _map_rows(target, value, class_map, net.head.num_anchors)
            else:
                _count(report.fresh, key)  # not in the source, or another shape: kept as built
        for key in source:
            if key not in own and not key.endswith("num_batches_tracked"):
                _count(report.ignored, key)
    return report


def _count(counts: dict[str, int], key: str) -> None:
    counts[group(key)] = counts.get(group(key), 0) + 1


def _fresh_logits(target: torch.Tensor, key: str, std: float = 0.01, prior: float = 0.01) -> None:
    if key.endswith("weight"):
        torch.nn.init.normal_(target, std=std)
    else:
        torch.nn.init.constant_(target, -math.log((1 - prior) / prior))


def _map_rows(target: torch.Tensor, source: torch.Tensor, class_map: Mapping[int, int], anchors: int) -> int:
    k_target, k_source = target.shape[0] // anchors, source.shape[0] // anchors
    for a in range(anchors):
        for t, s in class_map.items():
            target[a * k_target + t] = source[a * k_source + s]
    return len(class_map)
