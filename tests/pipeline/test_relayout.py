"""Data positions saved by 2 ranks x 2 readers on different epochs, resumed by 3 ranks and by 1: every new
reader is on one epoch, and the rest of that epoch is split disjointly and completely."""

from __future__ import annotations

import pytest

from pipeline import relayout
from pipeline.loader import open_dataset
from pipeline.reader import ShardStream
from tests.pipeline.shard_util import coco_records, split, tar_bytes, write_dataset

SEED = 1


@pytest.fixture(scope="module")
def coco_shards(coco128, tmp_path_factory):
    """30 coco128 images in 10 local shards of 3."""
    samples, cats = coco_records(coco128, 30)
    uri = str(tmp_path_factory.mktemp("coco30"))
    write_dataset(uri, [tar_bytes(s) for s in split(samples, 3)], cats)
    return open_dataset(uri).shards, {f"{r['image_id']:012d}" for _, r in samples}


def _stream(shards, group: int, num_groups: int) -> ShardStream:
    return ShardStream(shards, group=group, num_groups=num_groups, train=True, seed=SEED, shuffle_buffer=4)


def _take(stream: ShardStream, count: int) -> list[tuple[int, str]]:
    """``count`` samples as ``(epoch they belong to, key)``."""
    out = []
    for sample in stream:
        out.append((stream._progress.epoch, sample.key))
        if len(out) == count:
            break
    return out


def _rest_of_epoch(stream: ShardStream, epoch: int) -> list[str]:
    keys = []
    for sample in stream:
        if stream._progress.epoch != epoch:
            break
        keys.append(sample.key)
    return keys


@pytest.mark.parametrize("new_world", [3, 1])
def test_positions_of_2x2_readers_on_two_epochs_resume_one_epoch_on_a_new_layout(coco_shards, new_world) -> None:
    shards, keys = coco_shards
    # Old layout: 2 ranks x 2 readers, each with 2-3 shards (6-9 samples) per epoch. Readers 0 and 1 go on
    # into epoch 1 (1 finishes a shard of it); readers 2 and 3 stay in epoch 0.
    taken = {0: 10, 1: 14, 2: 4, 3: 2}
    old = {g: _stream(shards, g, 4) for g in range(4)}
    seen = {g: _take(old[g], n) for g, n in taken.items()}
    positions = [
        {"world_size": 2, "workers": 2, "rank": r, "streams": [old[2 * r].state_dict(), old[2 * r + 1].state_dict()]}
        for r in range(2)
    ]
    streams = [s for p in positions for s in p["streams"]]
    assert {s["epoch"] for s in streams} == {0, 1}, "the readers must be on two epochs"
    assert any(s["epoch"] == 1 and s["shard"] > 0 for s in streams), "a shard of epoch 1 was finished"
    assert any(s["epoch"] == 1 and s["done"] for s in streams), "a shard of epoch 1 was started"
    consumed = [key for g in seen for epoch, key in seen[g] if epoch == 1]
    assert consumed, "some samples of epoch 1 were handed out before the restart"

    new_keys: list[str] = []
    for rank in range(new_world):
        states = relayout.stream_states(positions, shards, SEED, rank, new_world, 2)
        assert {s["epoch"] for s in states} == {1}, "every new reader resumes the newest epoch"
        for w, state in enumerate(states):
            stream = _stream(shards, rank * 2 + w, new_world * 2)
            stream.load_state_dict(state)
            new_keys += _rest_of_epoch(stream, 1)
    assert len(new_keys) == len(set(new_keys)), "a sample was handed out twice after the restart"
    assert not set(new_keys) & set(consumed), "a sample handed out before the restart came again"
    assert set(new_keys) | set(consumed) == keys, "samples of the epoch were lost"


def test_same_layout_keeps_each_rank_position(coco_shards) -> None:
    from pipeline.loader import DetectionLoader, LoaderConfig

    shards, _ = coco_shards
    ds = open_dataset(shards[0].rsplit("/", 1)[0])
    loader = DetectionLoader(ds, rank=1, world_size=2, train=True, cfg=LoaderConfig(num_workers=2, seed=SEED))
    state = {"world_size": 2, "workers": 2, "rank": 1, "streams": [{"epoch": 3, "shard": 1, "done": {}}] * 2}
    other = {**state, "rank": 0, "streams": [{"epoch": 2, "shard": 0, "done": {}}] * 2}
    assert loader.resume([other, state]) is False
    assert [s["epoch"] for s in loader.state_dict()["streams"]] == [3, 3]
    three = [{"world_size": 3, "workers": 2, "rank": r, "streams": state["streams"]} for r in range(3)]
    assert loader.resume(three) is True  # saved by 3 ranks: carried over to this layout
    assert [s["epoch"] for s in loader.state_dict()["streams"]] == [3, 3]
