"""Storage against a real S3-protocol server and local folders; unreachable endpoints name the URI."""

from __future__ import annotations

import pytest

from pipeline import retry, storage


@pytest.mark.parametrize("where", ["local", "relative", "file", "s3"])
def test_write_read_list(where: str, tmp_path, s3_bucket: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    roots = {"local": str(tmp_path / "out"), "relative": "out", "file": f"file://{tmp_path}/out"}
    root = roots.get(where, f"{s3_bucket}/prefix")
    storage.write_bytes(storage.join(root, "a-000001.tar"), b"one")
    storage.write_bytes(storage.join(root, "a-000000.tar"), b"zero")
    storage.write_bytes(storage.join(root, "manifest.json"), b"{}")
    found = storage.list_matching(root, "a-*.tar")
    assert found == [storage.join(root, "a-000000.tar"), storage.join(root, "a-000001.tar")]
    assert storage.read_bytes(found[1]) == b"one"
    with storage.open_uri(found[0]) as f:
        assert f.read() == b"zero"
    assert storage.exists(found[0]) and not storage.exists(storage.join(root, "nope.tar"))


def test_unreachable_endpoint_is_named(monkeypatch) -> None:
    monkeypatch.setitem(retry._settings, "window_s", 0.5)  # a test-sized retry window
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(storage.StorageError, match=r"s3://bucket/shards.*127\.0\.0\.1:9.*AWS_ENDPOINT_URL"):
        storage.list_matching("s3://bucket/shards", "*.tar")


def test_missing_object_is_named(s3_bucket: str, monkeypatch) -> None:
    monkeypatch.setitem(retry._settings, "window_s", 0.5)  # a test-sized retry window
    with pytest.raises(storage.StorageError, match=f"{s3_bucket}/missing.tar"):
        storage.read_bytes(f"{s3_bucket}/missing.tar")


def test_webdataset_opens_s3_through_fsspec(s3_bucket: str) -> None:
    import webdataset

    storage.register_webdataset_openers()
    storage.write_bytes(f"{s3_bucket}/x.bin", b"payload")
    with webdataset.gopen(f"{s3_bucket}/x.bin") as f:
        assert f.read() == b"payload"
