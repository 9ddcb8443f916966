"""Dataset discovery and the DALI-backed batch loader of one rank."""

from __future__ import annotations

import json
import logging
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from pipeline import format as fmt
from pipeline import relayout, storage
from pipeline.batch import Batch
from pipeline.dali import AugmentConfig, detection_pipeline
from pipeline.reader import Sample, ShardStream

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """A converted dataset: its manifest, shard URIs and categories (COCO id -> label)."""

    uri: str
    manifest: dict
    shards: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.manifest["categories"])

    @property
    def ground_truth_uri(self) -> str:
        return storage.join(self.uri, self.manifest.get("ground_truth", fmt.GROUND_TRUTH))

    def category_ids(self) -> list[int]:
        """COCO category id of each contiguous label."""
        return [c["id"] for c in sorted(self.manifest["categories"], key=lambda c: c["label"])]


def open_dataset(uri: str) -> Dataset:
    """Reads the manifest and checks that its shards exist; fails before any worker starts.

    ``StorageError`` if the storage cannot be reached; ``ValueError`` if there is no dataset or no shard.
    """
    manifest_uri = storage.join(uri, fmt.MANIFEST)
    if not storage.exists(manifest_uri):
        raise ValueError(f"no {fmt.MANIFEST} at {uri}: convert a dataset there first (python jobs/convert.py ...)")
    manifest = json.loads(storage.read_bytes(manifest_uri))
    if manifest.get("format") != fmt.FORMAT:
        raise ValueError(f"{manifest_uri} has format {manifest.get('format')!r}, expected {fmt.FORMAT!r}")
    listed = [storage.join(uri, s["name"]) for s in manifest["shards"]]
    present = set(storage.list_matching(uri, "*.tar"))
    missing = [s for s in listed if s not in present]
    if not listed:
        raise ValueError(f"{manifest_uri} lists no shards: the dataset is empty")
    if missing:
        raise ValueError(
            f"{len(missing)} shard(s) in the manifest are missing, e.g. {missing[0]}: rerun the conversion"
        )
    return Dataset(uri, manifest, listed)


@dataclass(kw_only=True)
class LoaderConfig:
    batch_size: int = 2
    num_workers: int = 2  # shard streams per rank; shards are split across rank x worker
    shuffle_buffer: int = 256
    seed: int = 0
    num_threads: int = 2  # DALI CPU threads
    prefetch: int = 2
    # > 0: box tensors of every batch have this many rows (more only if an image has more boxes): with
    # aug.pad_to, the training step sees one set of shapes (torch.compile, CUDA graphs); 0: the batch's max
    pad_boxes_to: int = 0
    aug: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 1 or self.num_threads < 1 or self.prefetch < 1:
            raise ValueError("batch_size, num_workers, num_threads and prefetch must be >= 1")
        if self.pad_boxes_to < 0:
            raise ValueError(f"pad_boxes_to must be >= 0 (0: the batch's largest count), got {self.pad_boxes_to}")


class SampleList:
    """A fixed list of samples, read once in order: a stand-in for an evaluation ``ShardStream``."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = list(samples)
        self.stats: Counter[str] = Counter()
        self.seen: dict[int, list[int]] = {}

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DetectionLoader:
    """Batches of one rank. ``train``: endless, shuffled, augmented. Evaluation: every image of this
    rank's shards once, unaugmented, the last batch possibly smaller. ``device_id`` set: DALI decodes on
    that GPU and batches land there; ``None``: all on the CPU.

    ``state_dict()`` is the position after the last batch yielded; ``load_state_dict`` before iterating
    resumes there (same world size and workers), so no sample of the epoch is replayed or skipped.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        rank: int,
        world_size: int,
        train: bool,
        cfg: LoaderConfig | None = None,
        device_id: int | None = None,
        streams: list | None = None,
    ) -> None:
        """``streams``: readers to take instead of the dataset's shards (``over_samples``)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.cfg = cfg or LoaderConfig()
        self.train, self.device_id, self.dataset = train, device_id, dataset
        workers = self.cfg.num_workers
        self.streams = streams or [
            ShardStream(
                dataset.shards,
                group=rank * workers + w,
                num_groups=world_size * workers,
                train=train,
                seed=self.cfg.seed,
                shuffle_buffer=self.cfg.shuffle_buffer,
            )
            for w in range(workers)
        ]
        self._layout = {"world_size": world_size, "workers": workers, "rank": rank}
        self._meta: deque[tuple[list[Sample], list[dict]]] = deque()
        self._state = [s.state_dict() for s in self.streams]
        self._iters: list[Iterator[Sample]] | None = None
        self._next = 0
        self._dropped_boxes = 0

    @classmethod
    def over_samples(
        cls, samples: list[Sample], num_classes: int, cfg: LoaderConfig, device_id: int | None = None
    ) -> DetectionLoader:
        """Evaluation batches of in-memory samples (images to predict on), in their order, through the
        same DALI pipeline as evaluation on shards: the same decode, resize, normalisation and padding."""
        categories = [{"id": i + 1, "label": i, "name": str(i)} for i in range(num_classes)]
        dataset = Dataset("memory", {"categories": categories}, [])
        return cls(dataset, rank=0, world_size=1, train=False, cfg=replace(cfg, num_workers=1), device_id=device_id,
                   streams=[SampleList(samples)])  # fmt: skip

    # -- position -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**self._layout, "streams": [dict(s) for s in self._state]}

    def load_state_dict(self, state: dict) -> None:
        """Resumes this rank at ``state`` (its own ``state_dict()``, saved with the same layout)."""
        layout = {k: state.get(k) for k in self._layout}
        if layout != self._layout:
            raise ValueError(f"data position saved with {layout}, this loader is {self._layout}: use resume()")
        self._load_streams(state["streams"])

    def resume(self, positions: list[dict]) -> bool:
        """Resumes from every old rank's ``state_dict()`` (``positions[r]`` = rank ``r``). Same layout: this
        rank's own position. Another number of ranks or workers: all ranks resume one epoch with its shards
        split afresh (``pipeline.relayout``); returns True then."""
        if not positions:
            return False
        world_size, workers, rank = (self._layout[k] for k in ("world_size", "workers", "rank"))
        if relayout.layout(positions[0]) == (world_size, workers) and len(positions) == world_size:
            self.load_state_dict(positions[rank])
            return False
        shards, seed = self.dataset.shards, self.cfg.seed
        states = relayout.stream_states(positions, shards, seed, rank, world_size, workers)
        log.warning("data position saved by %d ranks x %d workers, now %d x %d: every rank resumes epoch %d with "
                    "its shards split afresh", *relayout.layout(positions[0]), world_size, workers,
                    states[0]["epoch"])  # fmt: skip
        self._load_streams(states)
        return True

    def _load_streams(self, states: list[dict]) -> None:
        for stream, s in zip(self.streams, states, strict=True):
            stream.load_state_dict(s)
        self._state = [s.state_dict() for s in self.streams]

    def assigned_shards(self) -> list[str]:
        """The shards this rank reads in the current epoch (over all its worker streams); disjoint across
        ranks whenever there are at least as many shards as ranks x workers."""
        return sorted({shard for s in self.streams for shard in s.assigned()})

    @property
    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self.streams:
            for k, v in s.stats.items():
                total[k] = total.get(k, 0) + v
        total["dropped_boxes"] = total.get("dropped_boxes", 0) + self._dropped_boxes
        return total

    def seen(self) -> dict[int, list[int]]:
        """Per epoch, since this loader was made: ``[samples handed out, sum of their image ids]`` over its
        worker streams (summed over ranks, a complete epoch gives the dataset's count and id sum: each image
        once)."""
        total: dict[int, list[int]] = {}
        for s in self.streams:
            for epoch, (count, ids) in s.seen.items():
                entry = total.setdefault(epoch, [0, 0])
                entry[0] += count
                entry[1] += ids
        return total

    # -- iteration ------------------------------------------------------------------------------
    def _source(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """DALI external source: the next batch of samples, round-robin over the worker streams."""
        if self._iters is None:
            self._iters = [iter(s) for s in self.streams]
        samples: list[Sample] = []
        while len(samples) < self.cfg.batch_size and self._iters:
            self._next %= len(self._iters)
            try:
                samples.append(next(self._iters[self._next]))
                self._next += 1
            except StopIteration:
                self._iters.pop(self._next)
        if not samples:
            raise StopIteration
        self._meta.append((samples, [s.state_dict() for s in self.streams]))
        jpegs = [np.frombuffer(s.jpeg, dtype=np.uint8) for s in samples]
        boxes, labels = [], []
        for s in samples:
            b, lab = self._checked_targets(s)
            boxes.append(b)
            labels.append(lab)
        return jpegs, boxes, labels

    def _checked_targets(self, s: Sample) -> tuple[np.ndarray, np.ndarray]:
        """Boxes relative to the image and clipped to it, ``[M, 4]`` float32, and labels ``[M]`` int32.
        Checked here, on the host, so that the training step need not check them on the device (a host
        sync per step): a label outside the manifest's categories is a ``ValueError``; a box with no area
        left inside the image is dropped and counted (``stats["dropped_boxes"]``)."""
        k = self.dataset.num_classes
        if s.labels.size and (s.labels.min() < 0 or s.labels.max() >= k):
            bad = int(s.labels[(s.labels < 0) | (s.labels >= k)][0])
            raise ValueError(
                f"image {s.image_id} ({s.key}) has label {bad}, outside the manifest's {k} categories [0, {k}): "
                "the shard does not belong to this manifest; reconvert the dataset (python jobs/convert.py ...)"
            )
        scale = np.array([s.width, s.height, s.width, s.height], dtype=np.float32)
        boxes = np.clip(s.boxes / scale, 0.0, 1.0).reshape(-1, 4)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not keep.all():
            self._dropped_boxes += int((~keep).sum())
            log.warning("image %s (%s): dropped %d box(es) lying outside the image", s.image_id, s.key,
                        int((~keep).sum()))  # fmt: skip
            boxes = boxes[keep]
        return boxes, s.labels[keep].astype(np.int32)

    def __iter__(self) -> Iterator[Batch]:
        pipe = detection_pipeline(
            reader=self._source,
            train=self.train,
            aug=self.cfg.aug,
            gpu=self.device_id is not None,
            batch_size=self.cfg.batch_size,
            num_threads=self.cfg.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.cfg.prefetch,
            seed=self.cfg.seed * 7919 + self._layout["rank"],
            exec_dynamic=True,
        )
        pipe.build()
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:
                return
            samples, state = self._meta.popleft()
            self._state = state
            yield self._to_batch(outputs, samples)

    def _to_batch(self, outputs, samples: list[Sample]) -> Batch:
        images_tl, shapes_tl, boxes_tl, labels_tl, flip_tl = outputs
        images = _to_torch(images_tl, self.device_id)
        device = images.device
        shapes = torch.from_numpy(np.stack([np.asarray(shapes_tl[i]) for i in range(len(samples))]))
        sizes = shapes[:, :2].long()  # (h, w) after resize
        rel = [np.asarray(boxes_tl[i]).reshape(-1, 4) for i in range(len(samples))]
        counts = [len(b) for b in rel]
        m = max(1, self.cfg.pad_boxes_to, *counts)
        boxes = torch.zeros(len(samples), m, 4)
        labels = torch.full((len(samples), m), -1, dtype=torch.int64)
        for i, b in enumerate(rel):
            h, w = sizes[i].tolist()
            boxes[i, : counts[i]] = torch.from_numpy(b) * torch.tensor([w, h, w, h], dtype=torch.float32)
            labels[i, : counts[i]] = torch.from_numpy(np.asarray(labels_tl[i]).reshape(-1).astype(np.int64))
        flips = torch.tensor([bool(np.asarray(flip_tl[i])) for i in range(len(samples))])
        batch = Batch(
            images=images,
            image_sizes=sizes,
            original_sizes=torch.tensor([[s.height, s.width] for s in samples]),
            image_ids=torch.tensor([s.image_id for s in samples]),
            boxes=boxes,
            labels=labels,
            num_boxes=torch.tensor(counts),
            flipped=flips,
        )
        return batch.to(device) if device.type != "cpu" else batch


def _to_torch(tensor_list, device_id: int | None) -> torch.Tensor:
    """A dense DALI TensorList as a torch tensor on its device.

    CPU: no copy. DALI's dynamic executor (``exec_dynamic=True``) does not recycle an output buffer while
    Python holds it, so the tensor aliases DALI's memory safely (copying ~15 MB per image cost 40% of the
    loader's throughput). GPU: one device-to-device copy on the current stream.
    """
    dense = tensor_list.as_tensor()
    if device_id is None:
        return torch.from_numpy(np.asarray(dense))
    from nvidia.dali.plugin.pytorch import feed_ndarray

    device = torch.device("cuda", device_id)
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    return out
