"""Reads that survive a flaky object store, against the real S3 test server behind the fault-injecting proxy:
connections reset mid-shard, an endpoint that refuses connections for a while, throttling (503 SlowDown).
Nothing is lost or read twice, every retry is counted, only shards whose bytes end early count as truncated,
and a read that cannot complete within the retry window fails naming the shard (it never hangs)."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

from pipeline import retry, storage
from pipeline.loader import DetectionLoader, LoaderConfig, open_dataset
from pipeline.reader import ShardStream
from tests.fault_proxy import FaultProxy
from tests.pipeline.shard_util import coco_records, split, tar_bytes, write_dataset
from tests.pipeline.test_loader import SMALL


@pytest.fixture
def proxy(s3_endpoint, monkeypatch):
    """The proxy in front of moto_server; clients of this test go through it."""
    with FaultProxy(urlparse(s3_endpoint).port) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


@pytest.fixture
def window():
    """A test-sized retry window, restored afterwards."""
    before = retry.window()
    yield retry.configure
    retry.configure(before)


@pytest.fixture
def coco_s3(coco128, s3_bucket):
    """24 coco128 images in 4 shards of 6 in the S3 server (written directly, not through the proxy)."""
    samples, cats = coco_records(coco128, 24)
    uri = f"{s3_bucket}/coco24"
    write_dataset(uri, [tar_bytes(s) for s in split(samples, 6)], cats)
    return uri, sorted(r["image_id"] for _, r in samples)


def _all_samples(uri: str, **stream) -> tuple[list[int], ShardStream]:
    shards = open_dataset(uri).shards
    reader = ShardStream(shards, group=0, num_groups=1, train=False, **stream)
    return sorted(s.image_id for s in reader), reader


@pytest.mark.timeout(180)
def test_resets_on_30_percent_of_connections_never_block_a_reader(coco_s3, proxy, window) -> None:
    """The hang of issue 16 (a reset left the reader waiting on its read-ahead forever), as a regression test."""
    uri, ids = coco_s3
    window(60)
    proxy.reset(share=0.3, after_bytes=6 * 1024)
    got, reader = _all_samples(uri)
    assert got == ids
    assert reader.stats["truncated_shards"] == 0
    assert proxy.stats["resets"] > 0


@pytest.mark.timeout(120)
def test_a_read_that_cannot_complete_in_the_window_names_the_shard(coco_s3, proxy, window) -> None:
    uri, _ = coco_s3
    shards = open_dataset(uri).shards
    window(3)
    proxy.reset(share=1.0, after_bytes=0)  # every answer cut before its first byte: no progress at all
    with pytest.raises(storage.StorageError, match=r"reading \(at byte 0 of \d+\) " + shards[0] + ".*failed after"):
        list(ShardStream(shards, group=0, num_groups=1, train=False))


@pytest.mark.timeout(240)
def test_a_reset_in_every_shard_loses_and_repeats_nothing(coco_s3, coco128, s3_bucket, proxy, window) -> None:
    """The first read of every shard is reset after 48 KB (in the middle: shards are 200-600 KB): the loader
    (DALI, eval mode) still yields every image once, counts the re-opens, and counts no shard as truncated,
    while a shard that really ends inside a tar member still is."""
    uri, ids = coco_s3
    window(60)
    proxy.reset(share=1.0, after_bytes=48 * 1024, once_per_object=True)
    ds = open_dataset(uri)
    cfg = LoaderConfig(batch_size=4, num_workers=2, aug=SMALL)
    loader = DetectionLoader(ds, rank=0, world_size=1, train=False, cfg=cfg)
    seen = [i for batch in loader for i in batch.image_ids.tolist()]
    assert sorted(seen) == ids
    assert loader.stats["storage_retries"] >= len(ds.shards)
    assert loader.stats.get("truncated_shards", 0) == 0

    samples, cats = coco_records(coco128, 12)
    short = tar_bytes(samples[6:])
    write_dataset(f"{s3_bucket}/short", [tar_bytes(samples[:6]), short[: len(short) // 2]], cats)
    got, reader = _all_samples(f"{s3_bucket}/short")
    assert reader.stats["truncated_shards"] == 1 and len(got) < 12 and reader.stats["storage_retries"] > 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_endpoint_refusing_connections_for_30_s_mid_epoch_costs_time_not_images(coco_s3, proxy, window) -> None:
    uri, ids = coco_s3
    window(120)
    proxy.slowdown(share=0.2)  # throttled all along, too
    reader = ShardStream(open_dataset(uri).shards, group=0, num_groups=1, train=False, shuffle_buffer=1)
    got = []
    for sample in reader:
        got.append(sample.image_id)
        if len(got) == 3:  # mid-epoch, inside the first shard's stream
            proxy.refuse(30)
    assert sorted(got) == ids
    assert reader.stats["storage_retries"] > 0 and reader.stats.get("truncated_shards", 0) == 0
    assert proxy.stats["refused_windows"] == 1


def test_missing_objects_and_denied_writes_are_not_retried(coco_s3, proxy, window) -> None:
    uri, _ = coco_s3
    window(60)
    before = sum(retry.RETRIES.values())
    with pytest.raises(storage.MissingObject):
        storage.read_bytes(f"{uri}/nope.tar")
    proxy.deny_writes()
    with pytest.raises(storage.AccessDenied, match=r"at once.*credentials may not do this"):
        storage.write_bytes(f"{uri}/new.bin", b"x")
    assert sum(retry.RETRIES.values()) == before, "neither may be retried"
