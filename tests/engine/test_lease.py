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


def test_a_renewal_that_raced_a_takeover_is_undone_by_the_new_holder(run_uri) -> None:
    first = lease.acquire(run_uri, ttl_s=60)
    second = lease.acquire(run_uri, ttl_s=60, force=True)
    lease._write(run_uri, first)  # the first's renewal read its own lease before the takeover, wrote after it
    assert lease.renew(run_uri, first) is None  # it cannot tell: the lease it finds is its own
    assert lease.renew(run_uri, second) is None  # the newer lease is written back
    assert lease.read(run_uri).owner == second.owner
    holder = lease.renew(run_uri, first)
    assert holder is not None and holder.owner == second.owner


def test_a_takeover_is_newer_even_if_its_clock_is_behind(run_uri) -> None:
    first = lease.acquire(run_uri, ttl_s=60)
    first.started += 3600  # the first driver's host clock runs an hour ahead
    lease._write(run_uri, first)
    second = lease.acquire(run_uri, ttl_s=60, force=True)
    assert second.newer_than(first)
    assert lease.renew(run_uri, first).owner == second.owner


def test_the_keeper_renews_and_calls_back_once_when_taken_over(run_uri) -> None:
    first = lease.acquire(run_uri, ttl_s=1.5)
    renewed = lease.read(run_uri).renewed
    lost: list[lease.Lease] = []
    called = threading.Event()
    with lease.LeaseKeeper(run_uri, first, lambda h: (lost.append(h), called.set())):
        threading.Event().wait(1.2)  # past one renewal interval (at most 0.5 s here)
        assert lease.read(run_uri).renewed > renewed
        second = lease.acquire(run_uri, ttl_s=1.5, force=True)
        lost_second: list[lease.Lease] = []
        with lease.LeaseKeeper(run_uri, second, lost_second.append):  # the new driver renews as well
            assert called.wait(30)
            threading.Event().wait(1.2)
        assert not lost_second and lease.read(run_uri).owner == second.owner
    assert [h.owner for h in lost] == [second.owner]
