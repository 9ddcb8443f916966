"""Streams samples from WebDataset shards: split by rank and loader worker, shuffled, resumable.

Ranks and workers arrive as plain ints; nothing here knows about Ray or torch.distributed.
"""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline import format as fmt
from pipeline import storage
from pipeline.jpeg import jpeg_size
from pipeline.prefetch import ReadAhead

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One image: JPEG bytes, boxes ``[M, 4]`` float32 xyxy pixels of the original image, labels ``[M]`` int64."""

    key: str
    jpeg: bytes
    image_id: int
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray


@dataclass
class Position:
    """Where one stream is: the epoch, the first shard of that epoch's list with samples not yet handed
    out, per shard from there on the keys already handed out (skipped when resuming), and the names of
    shards to skip whole (finished by the readers of another layout: ``pipeline.relayout``)."""

    epoch: int = 0
    shard: int = 0
    done: dict[int, list[str]] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)


class _Progress:
    """Follows one epoch: samples read but not handed out (in the shuffle buffer), per shard."""

    def __init__(self, start: Position) -> None:
        self.epoch, self.first, self.skip = start.epoch, start.shard, list(start.skip)
        self.done = {int(k): list(v) for k, v in start.done.items()}
        self.pending: Counter[int] = Counter()
        self.fully_read: set[int] = set()

    def read(self, shard: int) -> None:
        self.pending[shard] += 1

    def finished(self, shard: int) -> None:
        self.fully_read.add(shard)
        self._advance()

    def handed_out(self, shard: int, key: str) -> None:
        self.pending[shard] -= 1
        self.done.setdefault(shard, []).append(key)
        self._advance()

    def _advance(self) -> None:
        while self.first in self.fully_read and self.pending[self.first] == 0:
            self.done.pop(self.first, None)
            self.first += 1

    def position(self) -> Position:
        return Position(self.epoch, self.first, {s: list(keys) for s, keys in self.done.items()}, list(self.skip))


def shards_for(shards: list[str], group: int, num_groups: int, epoch: int, seed: int, train: bool) -> list[str]:
    """The shards of reader ``group`` out of ``num_groups`` (= rank * workers + worker) in one epoch.

    Evaluation: a disjoint split in order (a reader may get none). Training: the epoch's shuffled order
    (same on every rank, from ``seed + epoch``), split disjointly; with fewer shards than readers, a reader
    repeats one shard so that none idles.
    """
    if not train:
        return shards[group::num_groups]
    order = list(shards)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    mine = order[group::num_groups]
    return mine or [order[group % len(order)]]


class ShardStream:
    """Samples of one reader (a rank's loader worker). Training is endless (epoch after epoch) through a
    shuffle buffer; evaluation reads each of its shards once, in order. Bad samples are skipped, counted
    in ``stats`` and logged with their key."""

    def __init__(
        self,
        shards: list[str],
        *,
        group: int,
        num_groups: int,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 256,
        drop_crowd: bool = True,
        read_ahead: bool = True,
    ) -> None:
        if not shards:
            raise ValueError("no shards to read")
        self.shards, self.group, self.num_groups = shards, group, num_groups
        self.train, self.seed, self.shuffle_buffer, self.drop_crowd = train, seed, shuffle_buffer, drop_crowd
        self.read_ahead = read_ahead
        self._start = Position()
        self._progress: _Progress | None = None
        self.stats: Counter[str] = Counter()
        self.seen: dict[int, list[int]] = {}  # epoch -> [samples handed out, sum of their image ids]

    def assigned(self) -> list[str]:
        """The shards this reader reads in its current epoch."""
        epoch = (self._progress.position() if self._progress else self._start).epoch
        return shards_for(self.shards, self.group, self.num_groups, epoch, self.seed, self.train)

    def state_dict(self) -> dict:
        """JSON-able position after the last sample handed out."""
        pos = self._progress.position() if self._progress else self._start
        state = {"epoch": pos.epoch, "shard": pos.shard, "done": {str(s): k for s, k in pos.done.items()}}
        return {**state, "skip": list(pos.skip)} if pos.skip else state

    def load_state_dict(self, state: dict) -> None:
        done = {int(s): list(keys) for s, keys in state["done"].items()}
        skip = [str(name) for name in state.get("skip", [])]
        self._start, self._progress = Position(int(state["epoch"]), int(state["shard"]), done, skip), None

    def __iter__(self) -> Iterator[Sample]:
        while True:
            yield from self._epoch(self._start)
            if not self.train:
                return
            self._start, self._progress = Position(self._start.epoch + 1), None

    def _epoch(self, start: Position) -> Iterator[Sample]:
        shard_list = shards_for(self.shards, self.group, self.num_groups, start.epoch, self.seed, self.train)
        skip = {key for keys in start.done.values() for key in keys}
        rng = random.Random(f"{self.seed}/{start.epoch}/{self.group}/{start.shard}/{len(skip)}")
        progress = self._progress = _Progress(start)
        buffer: list[tuple[int, Sample]] = []

        seen = self.seen.setdefault(start.epoch, [0, 0])

        def hand_out(index: int) -> Sample:
            shard, sample = buffer.pop(index)
            progress.handed_out(shard, sample.key)
            seen[0] += 1
            seen[1] += sample.image_id
            return sample

        for shard in range(start.shard, len(shard_list)):
            if shard_list[shard] in start.skip:
                progress.finished(shard)
                continue
            for sample in self._read_shard(shard_list[shard]):
                if sample.key in skip:
                    continue
                progress.read(shard)
                buffer.append((shard, sample))
                if not self.train:
                    yield hand_out(0)
                elif len(buffer) >= self.shuffle_buffer:
                    yield hand_out(rng.randrange(len(buffer)))
            progress.finished(shard)
        while buffer:
            yield hand_out(rng.randrange(len(buffer)))
        self._start = Position(start.epoch, len(shard_list))

    def _read_shard(self, uri: str) -> Iterator[Sample]:
        """Samples of one shard, streamed; a truncated or corrupt tar ends the shard with a warning."""
        members: dict[str, bytes] = {}
        current = None
        try:
            raw = storage.open_stream(uri, on_retry=self._count_retry)
            stream = io.BufferedReader(ReadAhead(raw)) if self.read_ahead else raw
            with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    key, _, ext = info.name.partition(".")
                    if current is not None and key != current:
                        sample = self._sample(current, members)
                        if sample is not None:
                            yield sample
                        members = {}
                    current = key
                    members[ext] = tar.extractfile(info).read()
        except FileNotFoundError as e:  # deleted after the start (storage.MissingObject, or a local path)
            raise ValueError(
                f"shard {uri} is missing ({e}): it was in the dataset's manifest when the run started. Restore it, "
                "or reconvert the dataset and start a new run"
            ) from None
        except (tarfile.TarError, EOFError, OSError) as e:
            if isinstance(e, storage.StorageError):
                raise  # storage did not answer within the retry window: the attempt fails, naming the shard
            # The bytes themselves end early (object storage re-opens a broken stream, so this is the shard)
            self.stats["truncated_shards"] += 1
            log.warning("shard %s is truncated or corrupt after sample %s (%s); skipping its rest", uri, current, e)
            return
        if current is not None:
            sample = self._sample(current, members)
            if sample is not None:
                yield sample

    def _count_retry(self, error: BaseException) -> None:
        self.stats["storage_retries"] += 1

    def _sample(self, key: str, members: dict[str, bytes]) -> Sample | None:
        if fmt.IMAGE_EXT not in members or fmt.RECORD_EXT not in members:
            return self._bad(key, "incomplete_samples", f"missing .{fmt.IMAGE_EXT} or .{fmt.RECORD_EXT}")
        try:
            record = json.loads(members[fmt.RECORD_EXT])
            boxes = np.asarray(record["boxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(record["labels"], dtype=np.int64)
            crowd = np.asarray(record.get("iscrowd", [0] * len(labels)), dtype=bool)
            height, width = int(record["height"]), int(record["width"])
        except (ValueError, KeyError, TypeError) as e:
            return self._bad(key, "bad_records", f"bad record: {e}")
        try:
            if jpeg_size(members[fmt.IMAGE_EXT]) != (height, width):
                return self._bad(key, "size_mismatch", f"JPEG size differs from the record's {width}x{height}")
        except ValueError as e:
            return self._bad(key, "corrupt_images", str(e))
        if self.drop_crowd and crowd.any():
            boxes, labels = boxes[~crowd], labels[~crowd]
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not ok.all():
            self.stats["dropped_boxes"] += int((~ok).sum())
            boxes, labels = boxes[ok], labels[ok]
        self.stats["samples"] += 1
        return Sample(key, members[fmt.IMAGE_EXT], int(record["image_id"]), height, width, boxes, labels)

    def _bad(self, key: str, counter: str, reason: str) -> None:
        self.stats[counter] += 1
        log.warning("skipping sample %s: %s", key, reason)
        return None
