"""ResNet / ResNeXt trunks from torchvision that return C3, C4, C5."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from model.folded import conv_bn, stage_forward

# Output channels of C3, C4, C5 per architecture family.
_BASIC_CHANNELS = (128, 256, 512)
_BOTTLENECK_CHANNELS = (512, 1024, 2048)
_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


class ResNetTrunk(nn.Module):
    """Runs a torchvision ResNet up to ``layer4`` and returns C3, C4, C5.

    Input ``[N, 3, H, W]`` float; outputs strides 8, 16, 32: ``[N, C_l, H / 2^l, W / 2^l]`` for l = 3, 4, 5.
    Parameter names match torchvision's ``backbone.body`` (``conv1``, ``bn1``, ``layer1``...). Frozen
    BatchNorm is folded into the convolution before it (``model.folded``), the same function in fewer passes.
    """

    def __init__(self, resnet: nn.Module, out_channels: tuple[int, int, int]) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(F.relu(conv_bn(self.conv1, self.bn1, x), inplace=True))
        c2 = stage_forward(self.layer1, x)
        c3 = stage_forward(self.layer2, c2)
        c4 = stage_forward(self.layer3, c3)
        c5 = stage_forward(self.layer4, c4)
        return [c3, c4, c5]


def build_backbone(name: str, norm: str, trainable_stages: int, weights_path: str | None = None) -> ResNetTrunk:
    """Builds the trunk. ``norm`` is ``frozen_bn``, ``bn`` or ``sync_bn`` (``sync_bn`` is ``bn`` here;
    ``build_retinanet`` converts it). The lowest ``5 - trainable_stages``
    stages (stem first) get ``requires_grad=False``.
    """
    norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
    resnet = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
    if weights_path is not None:
        load_backbone_weights(resnet, weights_path)
    basic = name in ("resnet18", "resnet34")
    trunk = ResNetTrunk(resnet, _BASIC_CHANNELS if basic else _BOTTLENECK_CHANNELS)
    frozen = _STAGES[: 5 - trainable_stages]
    for stage in frozen:
        modules = [trunk.conv1, trunk.bn1] if stage == "stem" else [getattr(trunk, stage)]
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(False)
    return trunk


def load_backbone_weights(resnet: nn.Module, path: str) -> None:
    """Loads an ImageNet classification state dict (torchvision layout, e.g. ``resnet50-0676ba61.pth``)
    from a local file; the ``fc`` classifier is dropped. Raises ``ValueError`` if the layout does not fit.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise ValueError(f"backbone weights file not found: {path}") from e
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(
            f"cannot read backbone weights {path}: not a complete torch.save state dict ({type(e).__name__}); "
            "download it again or point model.backbone_weights at another file"
        ) from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = OrderedDict((k, v) for k, v in state.items() if not k.startswith("fc."))
    # FrozenBatchNorm2d has no num_batches_tracked buffer.
    own = resnet.state_dict()
    state = OrderedDict((k, v) for k, v in state.items() if k in own or not k.endswith("num_batches_tracked"))
    missing = [k for k in own if k not in state and not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a torchvision ResNet state dict for this backbone: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    resnet.load_state_dict(state, strict=False)
