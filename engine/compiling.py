"""``optim.compile``: the network through ``torch.compile``, or eagerly when compiling fails."""

from __future__ import annotations

import torch

from engine import collectives
from engine.progress import ProgressLog
from pipeline.batch import Batch


def compile_or_eager(
    net: torch.nn.Module,
    loss_fn: torch.nn.Module,
    batch: Batch,
    amp: bool,
    channels_last: bool,
    log: ProgressLog,
    step: int,
    rank: int,
    mode: str = "default",
) -> torch.nn.Module | None:
    """``torch.compile(net, mode=mode)``, tried with one forward + backward on ``batch`` (the run's first batch, on
    the device) before DDP wraps the network: outside DDP, a failure on one rank cannot leave the others
    waiting in a gradient all-reduce. Under DDP the loop then compiles DDP(net) once more, so that the
    graph breaks at the gradient buckets. Compile errors (no C++ compiler, an unsupported operator)
    surface in that trial: then it returns ``None`` on every rank (train eagerly), rank 0 prints a warning
    and writes the event ``compile_failed`` to metrics.jsonl. The trial's gradients are discarded and no
    weight changes (BatchNorm running statistics of a trainable-BN backbone see this batch once more)."""
    compiled = torch.compile(net, mode=mode)
    images = batch.images.contiguous(memory_format=torch.channels_last) if channels_last else batch.images
    reason = ""
    try:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(compiled(images), batch.padded_targets())["loss"]
        loss.backward()
    except Exception as e:  # any failure means: do not compile; a real input error recurs eagerly
        text = str(e).strip()
        reason = f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"
    net.zero_grad(set_to_none=True)
    if not collectives.any_rank(bool(reason)):  # one rank failing: all run eagerly, in step
        return compiled
    if rank == 0:
        why = reason or "on another rank"
        print(f"WARNING: torch.compile failed ({why}); training without it (set optim.compile=false)", flush=True)
        log.event(step, "compile_failed", reason=why)
    return None
