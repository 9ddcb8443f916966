"""One training step, free of host syncs: nothing in it waits for the GPU to finish."""

from __future__ import annotations

import torch

from pipeline.batch import Batch


def train_step(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    batch: Batch,
    *,
    amp: bool,
    channels_last: bool,
    clip_grad_norm: float,
) -> dict[str, torch.Tensor]:
    """Forward, loss, backward, (clip), optimizer update on ``batch`` (already on the model's device).

    Returns the loss dict with tensors still on the device (``loss``, ``loss_cls``, ``loss_box`` scalars,
    ``num_foreground``, and ``grad_norm``: the gradients' total 2-norm before clipping, for the divergence
    guard); reading them is left to the logging steps. The targets go to the loss in their
    padded form and ``loss_fn`` should not check them (the loader validated them on the host), so the
    step holds no ``.item()``, no data-dependent shape and no device-to-host copy.
    """
    images = batch.images.contiguous(memory_format=torch.channels_last) if channels_last else batch.images
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        losses = loss_fn(model(images), batch.padded_targets())
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if clip_grad_norm:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.step()
    return {**losses, "grad_norm": grad_norm}
