"""``model.init_from``: a run without checkpoints of its own starts from a trained detector, either a
torchvision RetinaNet state dict file (v1 or v2 layout, told apart by its keys) or one of our checkpoints
(a folder or ``s3://`` URI; ``best/`` and run folders included). A resume always wins: once the run has
checkpoints, ``init_from`` is not read again."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from model.retinanet import RetinaNet
from model.torchvision_compat import convert_torchvision_state_dict
from model.transfer import Transfer, transfer
from pipeline import storage

EXPECTED = (
    "expected a torchvision RetinaNet state dict (a .pth file of retinanet_resnet50_fpn or _v2) or a checkpoint "
    "of this project (a folder or s3:// URI holding model.pt, config.json and commit.json; best/ or a run folder)"
)


def _is_file(uri: str) -> bool:
    return Path(uri).is_file() if "://" not in uri else storage.size(uri) is not None


def check_source(uri: str) -> None:
    """The driver's check before any worker starts: ``uri`` is a file (read as weights by the workers) or
    resolves to a complete checkpoint; otherwise the ``ValueError`` that says what was expected."""
    if not _is_file(uri):
        try:
            ckpt.resolve(uri)
        except ValueError as e:
            raise ValueError(f"model.init_from={uri}: {e}; {EXPECTED}") from None


def source_weights(uri: str) -> tuple[dict[str, torch.Tensor], list[str] | None, str]:
    """``(state dict in our key layout, class names by label or None, what it is)``; ``ValueError`` if
    ``uri`` is neither kind."""
    if _is_file(uri):
        return _weights_file(uri)
    try:
        resolved = ckpt.resolve(uri)
    except ValueError as e:
        raise ValueError(f"model.init_from={uri}: {e}; {EXPECTED}") from None
    with tempfile.TemporaryDirectory() as tmp:
        directory = ckpt.fetch(resolved, Path(tmp))
        weights = ckpt.load_trusted(directory / ckpt.MODEL)
        categories = ckpt.read_categories(directory)
    names = [c["name"] for c in sorted(categories, key=lambda c: c["label"])] if categories else None
    return weights, names, f"checkpoint {resolved}"


def _weights_file(uri: str) -> tuple[dict[str, torch.Tensor], list[str] | None, str]:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(uri) if "://" not in uri else Path(tmp) / "weights.pth"
        if "://" in uri:
            local.write_bytes(storage.read_bytes(uri))
        try:
            state = ckpt.load_trusted(local)
        except ValueError as e:
            raise ValueError(f"model.init_from={uri}: {e}; {EXPECTED}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not any(str(k).startswith("backbone.body.") for k in state):
        raise ValueError(f"model.init_from={uri} is not a RetinaNet state dict; {EXPECTED}")
    layout = "v2" if any(".conv.0.1.weight" in k for k in state) else "v1"  # v2's head has GroupNorm
    return convert_torchvision_state_dict(state), coco_names_torchvision(), f"torchvision {layout} state dict {uri}"


def coco_names_torchvision() -> list[str]:
    """torchvision's 91 COCO labels (index 0 background, some "N/A"), from its code (no download)."""
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

    return list(RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def init_from(net: RetinaNet, uri: str, names: list[str], by_name: bool) -> tuple[Transfer, str]:
    """Loads ``uri`` into ``net`` (see ``model.transfer``); ``names``: this run's class names by label.
    Returns what was loaded, initialised afresh and ignored, and what the source was."""
    weights, source_names, what = source_weights(uri)
    class_map = None
    if by_name:
        if source_names is None:
            raise ValueError(f"model.init_class_map=by_name: {uri} records no class names")
        index = {n: i for i, n in enumerate(source_names)}
        class_map = {t: index[n] for t, n in enumerate(names) if n in index}
    return transfer(net, weights, class_map), what
