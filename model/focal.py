"""Sigmoid focal loss (RetinaNet eq. 5), with the all-negatives sum as a fused, chunked autograd function."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of [rows, K] processed at a time on the CPU: a few hundred KB, so every pass stays in cache.
_CPU_CHUNK_ELEMENTS = 1 << 17
_TINY = torch.finfo(torch.float32).tiny


def focal_loss_terms(logits: torch.Tensor, alpha: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element focal loss ``FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)`` for target 0 and for target 1.

    ``logits`` any shape; returns ``(loss_if_negative, loss_if_positive)`` of that shape. Uses
    ``-log(1 - p) = softplus(x)`` and ``-log(p) = softplus(-x)``, exact and stable for large ``|x|``.
    """
    p = torch.sigmoid(logits)
    q = torch.sigmoid(-logits)  # 1 - p without cancellation
    neg = F.softplus(logits)
    pos = F.softplus(-logits)
    if gamma != 0.0:
        neg = neg * p.pow(gamma)
        pos = pos * q.pow(gamma)
    return (1 - alpha) * neg, alpha * pos


def _neg_softplus(x: torch.Tensor) -> torch.Tensor:
    """``-softplus(x) = log(sigmoid(-x))``, several times faster than ``F.softplus`` on CPUs. Where
    ``sigmoid(-x)`` underflows (x > 87) the clamp would cap the value, and ``min(., -x)`` restores it:
    ``softplus(x) >= x``, equal to float32 precision there."""
    nx = torch.neg(x)
    out = torch.sigmoid(nx).clamp_(min=_TINY).log_()
    return torch.minimum(out, nx, out=out)


class NegativeFocalSum(torch.autograd.Function):
    """``sum_k (1 - alpha) p_k^gamma softplus(x_k)`` over the last dim: the focal loss of every class as a
    negative. ``[..., K] -> [...]``. Forward and backward run in cache-sized row chunks on the CPU (one
    chunk on GPUs) and save nothing but the input; the backward is
    ``(1 - alpha) p^gamma (gamma (1 - p) softplus(x) + p)``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.alpha, ctx.gamma = alpha, gamma
        flat = logits.reshape(-1, logits.shape[-1])
        out = torch.empty(flat.shape[0], dtype=logits.dtype, device=logits.device)
        for rows in _chunks(flat):
            x = flat[rows]
            out[rows] = _neg_softplus(x).mul_(_pow(torch.sigmoid(x), gamma)).sum(-1)
        return out.reshape(logits.shape[:-1]) * (alpha - 1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (logits,) = ctx.saved_tensors
        alpha, gamma = ctx.alpha, ctx.gamma
        flat = logits.reshape(-1, logits.shape[-1])
        scale = (grad_out * (1 - alpha)).reshape(-1, 1)
        grad = torch.empty_like(flat)
        for rows in _chunks(flat):
            x = flat[rows]
            p = torch.sigmoid(x)
            inner = p if gamma == 0.0 else _neg_softplus(x).mul_(p - 1).mul_(gamma).add_(p)
            grad[rows] = inner.mul_(_pow(p, gamma)).mul_(scale[rows])
        return grad.reshape(logits.shape), None, None


def negative_focal_sum(logits: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """``[N, A, K]`` logits -> ``[N, A]`` focal loss summed over classes, every class taken as negative."""
    return NegativeFocalSum.apply(logits, alpha, gamma)


def _pow(p: torch.Tensor, gamma: float) -> torch.Tensor:
    if gamma == 2.0:
        return p * p
    if gamma == 0.0:
        return torch.ones_like(p)
    return p.pow(gamma)


def _chunks(flat: torch.Tensor) -> list[slice]:
    rows = flat.shape[0]
    step = rows if flat.is_cuda else max(1, _CPU_CHUNK_ELEMENTS // max(1, flat.shape[1]))
    return [slice(s, min(s + step, rows)) for s in range(0, rows, step)]
