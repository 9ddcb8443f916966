"""Which operators of a piece of PyTorch code would make the host wait for a GPU: recorded on the CPU.

``SyncRecorder`` is a ``TorchDispatchMode`` that notes every call of an operator that reads a device
value back to the host (``.item()``, ``bool(t)``, ``int(t)``), or whose output size depends on the data
(``nonzero``, ``masked_select``, indexing with a boolean mask, ``unique``...): on a GPU each of those
blocks the CPU until the queue drains. It cannot see ``Tensor.tolist()`` (no operator call on the CPU).
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNCING = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::masked_scatter",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::repeat_interleave",
    "aten::argwhere",
}
_INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


class SyncRecorder(TorchDispatchMode):
    """``with SyncRecorder() as rec: ...``; then ``rec.calls``: ``[(operator, where)]`` in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _SYNCING or (name in _INDEXING and _has_bool_index(args)):
            self.calls.append((name, _caller()))
        return func(*args, **(kwargs or {}))


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _caller() -> str:
    frames = [f for f in traceback.extract_stack()[:-3] if "/torch/" not in f.filename]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
