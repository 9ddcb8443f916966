"""One writer per run: the lease in ``STORAGE/NAME/.lease``, on the real S3 test server. A second driver is
refused naming the holder, takes over with ``force`` or once the lease has gone its TTL without renewal, and
the holder that lost it learns so at its next renewal (the keeper thread calls back once)."""

from __future__ import annotations

import os
import threading

import pytest

from engine import lease


@pytest.fixture
def run_uri(s3_bucket: str) -> str:
    return f"{s3_bucket}/runs/r1"


def test_a_second_driver_is_refused_naming_the_holder(run_uri) -> None:
    first = lease.acquire(run_uri, ttl_s=60)
    with pytest.raises(ValueError) as e:
        lease.acquire(run_uri, ttl_s=60)
    message = str(e.value)
    assert f"pid {os.getpid()}" in message and first.owner in message and first.host in message
    assert "--force" in message and "checkpoint.lease_ttl_s=60" in message
    assert lease.read(run_uri).owner == first.owner  # the refused driver changed nothing


def test_force_takes_over_and_the_first_holder_learns_it_at_renewal(run_uri) -> None:
    first = lease.acquire(run_uri, ttl_s=60)
    second = lease.acquire(run_uri, ttl_s=60, force=True)
    assert second.owner != first.owner
    holder = lease.renew(run_uri, first)
    assert holder is not None and holder.owner == second.owner
    assert lease.renew(run_uri, second) is None
    lease.release(run_uri, first)  # not the holder: releases nothing
    assert lease.read(run_uri).owner == second.owner
    lease.release(run_uri, second)
    assert lease.read(run_uri) is None


def test_a_lease_not_renewed_within_its_ttl_can_be_taken(run_uri) -> None:
    first = lease.acquire(run_uri, ttl_s=30)
    first.renewed -= 31
    lease._write(run_uri, first)  # as if its driver died 31 s ago
    assert lease.read(run_uri).expired()
    assert lease.acquire(run_uri, ttl_s=30).owner != first.owner


def test_the_keeper_renews_and_calls_back_once_when_taken_over(run_uri) -> None:
    first = lease.acquire(run_uri, ttl_s=1.5)
    renewed = lease.read(run_uri).renewed
    lost: list[lease.Lease] = []
    called = threading.Event()
    with lease.LeaseKeeper(run_uri, first, lambda h: (lost.append(h), called.set())):
        threading.Event().wait(1.2)  # past one renewal interval (ttl / 3, at least 0.5 s)
        assert lease.read(run_uri).renewed > renewed
        second = lease.acquire(run_uri, ttl_s=60, force=True)
        assert called.wait(10)
    assert [h.owner for h in lost] == [second.owner]
