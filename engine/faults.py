"""Faults injected on purpose, for the reliability tests and drills (``docs/reliability.md``): a NaN loss at a
step, a data source that stops answering on one rank. ``driver.run(cfg, faults=Faults(...))`` passes them to
the workers; nothing else sets them, and a run without them has none of this code in its path."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(kw_only=True)
class Faults:
    nan_at_step: int | None = None  # the loss of this step (1-based) is NaN, once
    stall_at_step: int | None = None  # the data source of stall_rank blocks before this step's batch
    stall_rank: int = 0
    stall_s: float = 3600.0
    once_dir: str | None = None  # marker files here make each fault happen once per run, across restarts

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> Faults | None:
        return cls(**data) if data else None

    def _first_time(self, name: str) -> bool:
        if self.once_dir is None:
            return True
        marker = Path(self.once_dir) / name
        if marker.exists():
            return False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return True

    def wrap_loss(self, loss_fn: torch.nn.Module, step: Callable[[], int]) -> Callable:
        """``loss_fn`` whose total loss is NaN in step ``nan_at_step`` (``step()`` = steps done before it)."""
        if self.nan_at_step is None:
            return loss_fn
        fired = []

        def faulty(outputs, targets):
            losses = loss_fn(outputs, targets)
            if not fired and step() + 1 == self.nan_at_step and self._first_time("nan"):
                fired.append(True)
                losses = {**losses, "loss": losses["loss"] * float("nan")}
            return losses

        faulty.check_inputs = loss_fn.check_inputs
        return faulty

    def wrap_batches(self, batches: Iterator, rank: int, step: Callable[[], int]) -> Iterator:
        """``batches`` that block for ``stall_s`` on ``stall_rank`` before step ``stall_at_step``'s batch."""
        if self.stall_at_step is None or rank != self.stall_rank:
            return batches

        def stalling():
            for batch in batches:
                if step() + 1 == self.stall_at_step and self._first_time(f"stall-rank{rank}"):
                    _data_source_stalls(self.stall_s)
                yield batch

        return stalling()


def _data_source_stalls(seconds: float) -> None:
    time.sleep(seconds)
