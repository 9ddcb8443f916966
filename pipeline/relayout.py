"""Data positions saved by one layout of readers (ranks x loader workers) carried over to another.

A run restarted on a different number of workers (a node lost, an elastic run grown back) cannot reuse each
reader's position: shard splits depend on the number of readers. Instead, every new reader resumes one and
the same epoch, the newest one any old reader had reached, and that epoch's shards are split afresh over the
new readers. Shards the old readers had finished in that epoch are skipped, samples they had handed out of
unfinished shards are skipped by key, so no sample of the epoch is seen twice and none is left out.
Old readers still in an earlier epoch had consumed nothing of this one; what they had left of their earlier
epoch is not replayed.
"""

from __future__ import annotations

from pipeline.reader import shards_for


def layout(state: dict) -> tuple[int, int]:
    """``(world_size, workers)`` of a loader's ``state_dict()``."""
    return int(state["world_size"]), int(state["workers"])


def merged_epoch(positions: list[dict], shards: list[str], seed: int) -> tuple[int, set[str], dict[str, set[str]]]:
    """From every old rank's loader state: the epoch to resume, the shards finished in it, and the keys handed
    out of each shard it had started. ``positions[r]`` is rank ``r``'s ``DetectionLoader.state_dict()``."""
    world_size, workers = layout(positions[0])
    streams = [(r * workers + w, s) for r, pos in enumerate(positions) for w, s in enumerate(pos["streams"])]
    epoch = max(int(s["epoch"]) for _, s in streams)
    finished: set[str] = set()
    handed_out: dict[str, set[str]] = {}
    for group, s in streams:
        if int(s["epoch"]) != epoch:
            continue
        mine = shards_for(shards, group, world_size * workers, epoch, seed, train=True)
        start = int(s["shard"])
        finished.update(mine[:start])
        finished.update(s.get("skip", []))
        for index, keys in s["done"].items():
            handed_out.setdefault(mine[int(index)], set()).update(keys)
    return epoch, finished, handed_out


def stream_states(
    positions: list[dict], shards: list[str], seed: int, rank: int, world_size: int, workers: int
) -> list[dict]:
    """The ``ShardStream`` states of the new ``rank`` (one per loader worker) under ``world_size`` x ``workers``."""
    epoch, finished, handed_out = merged_epoch(positions, shards, seed)
    out = []
    for w in range(workers):
        mine = shards_for(shards, rank * workers + w, world_size * workers, epoch, seed, train=True)
        done = {str(i): sorted(handed_out[name]) for i, name in enumerate(mine) if name in handed_out}
        skip = sorted({name for name in mine if name in finished})
        out.append({"epoch": epoch, "shard": 0, "done": done, "skip": skip})
    return out
