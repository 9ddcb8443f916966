"""Every cross-rank collective of the training loop, in one place.

Each is called by every rank at the same point: the hooks decide ``due`` from the step alone (or from the
result of an earlier collective of the same step), so the collectives line up. With one process (or no
process group) each is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_cpu_groups: dict[int, object] = {}


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _cpu_group():
    """A gloo group for CPU tensors: the default group when it is gloo, else one made on first use (every
    rank reaches this call at the same point, as ``new_group`` needs)."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _cpu_groups:
        _cpu_groups[key] = dist.new_group(backend="gloo")
    return _cpu_groups[key]


def max_over_ranks(value: int) -> int:
    """The largest ``value`` of all ranks; on the CPU, so the GPU is never waited for (stop requests, per step)."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_cpu_group())
    return int(tensor.item())


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (``max_over_ranks`` of 0/1)."""
    return bool(max_over_ranks(1 if flag else 0))


def any_rank_on_device(flag: torch.Tensor) -> bool:
    """``flag`` (a bool or 0/1 tensor on the training device) true on any rank; reads it back (one sync)."""
    value = flag.reshape(1).float()
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_losses_sum_rate(values: torch.Tensor, num_losses: int) -> list[float]:
    """``values = [loss_1 .. loss_K, images/s]`` of this rank (device) -> the mean loss over ranks and the
    summed images/s, as floats (the read-back is the log step's one host sync)."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values[:num_losses] /= world_size()
    return values.tolist()


def gather_rows(row: torch.Tensor) -> torch.Tensor:
    """``row [D]`` of every rank -> ``[world_size, D]`` on the host (divergence guard: flag, step, losses)."""
    if world_size() == 1:
        return row[None].cpu()
    rows = [torch.empty_like(row) for _ in range(world_size())]
    dist.all_gather(rows, row.contiguous())
    return torch.stack(rows).cpu()


def gather_objects(obj: object) -> list:
    """Every rank's picklable ``obj``, in rank order (data positions, worker placement, eval results)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(net: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) everywhere: DDP syncs them only at the start of a forward, so
    after a step each rank holds its own. Evaluation and the checkpoint must see the same."""
    if world_size() > 1:
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)
