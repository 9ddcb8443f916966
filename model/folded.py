"""ResNet forward with frozen BatchNorm folded into the convolution before it.

A frozen BN is an affine map per channel, ``y = x * s + t`` with ``s = w / sqrt(var + eps)`` and
``t = b - mean * s``. After a convolution, ``conv(x, W) * s + t == conv(x, W * s[:, None, None, None], t)``:
one convolution with a bias instead of a convolution and two passes over the activation (and, in the
backward of trainable stages, one more). The weights stay the trainable parameters (the gradient flows
through ``W * s``) and the modules and their names are torchvision's, so checkpoints and torchvision
state dicts load unchanged. Layers whose norm is not ``FrozenBatchNorm2d`` (``bn``, ``sync_bn``) run as
they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d


def conv_bn(conv: nn.Conv2d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(conv(x))`` with a frozen ``norm`` folded in; ``x [N, C_in, H, W]`` -> ``[N, C_out, H', W']``."""
    if type(norm) is not FrozenBatchNorm2d or conv.bias is not None or conv.padding_mode != "zeros":
        return norm(conv(x))
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    shift = norm.bias - norm.running_mean * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    return F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One torchvision ``Bottleneck`` or ``BasicBlock`` (ResNet, ResNeXt) with its frozen BNs folded."""
    if isinstance(block, Bottleneck):
        out = F.relu(conv_bn(block.conv1, block.bn1, x), inplace=True)
        out = F.relu(conv_bn(block.conv2, block.bn2, out), inplace=True)
        out = conv_bn(block.conv3, block.bn3, out)
    elif isinstance(block, BasicBlock):
        out = F.relu(conv_bn(block.conv1, block.bn1, x), inplace=True)
        out = conv_bn(block.conv2, block.bn2, out)
    else:
        return block(x)
    identity = x
    if block.downsample is not None:
        down = block.downsample
        is_pair = isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[0], nn.Conv2d)
        identity = conv_bn(down[0], down[1], x) if is_pair else down(x)
    return F.relu(out.add_(identity), inplace=True)  # a conv output: not saved for its own backward


def stage_forward(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for block in stage:
        x = block_forward(block, x)
    return x
