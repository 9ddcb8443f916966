"""One writer per run: the driver takes a lease in the run's storage (``STORAGE/NAME/.lease``: owner, host,
process, times) and the running job renews it. A second driver on the same run name is refused, naming the
holder, unless it is started with ``--force`` or the lease has gone ``checkpoint.lease_ttl_s`` without
renewal. The holder that lost it notices at its next renewal and stops.

The lease is an object like any other: read, compare, write, so a renewal can race a takeover (it read its
own lease, the new driver wrote its own, the renewal wrote the old one back). Races settle by age: of two
leases the one started later (``started``, then ``owner`` on a tie) is the run's. A renewal that finds a newer
lease gives up; one that finds an older lease over its own writes its own back, and the older holder learns
at its next renewal. A takeover's lease always starts after the lease it replaced, whatever the clocks.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pipeline import storage

LEASE = ".lease"


@dataclass
class Lease:
    owner: str
    host: str
    pid: int
    started: float
    renewed: float
    ttl_s: float

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) - self.renewed > self.ttl_s

    def newer_than(self, other: Lease) -> bool:
        return (self.started, self.owner) > (other.started, other.owner)

    def describe(self) -> str:
        ago = time.time() - self.renewed
        return f"driver {self.owner} (pid {self.pid} on {self.host}, lease renewed {ago:.0f} s ago)"


def read(run_uri: str) -> Lease | None:
    try:
        return Lease(**json.loads(storage.read_bytes(storage.join(run_uri, LEASE))))
    except storage.MissingObject:
        return None
    except (ValueError, TypeError):
        return None  # unreadable: nobody holds it


def _write(run_uri: str, lease: Lease) -> None:
    storage.write_bytes(storage.join(run_uri, LEASE), json.dumps(asdict(lease)).encode())


def acquire(run_uri: str, ttl_s: float, force: bool = False) -> Lease:
    """This process's lease on the run; ``ValueError`` naming the holder if another live driver has it."""
    held = read(run_uri)
    if held is not None and not held.expired() and not force:
        left = held.ttl_s - (time.time() - held.renewed)
        raise ValueError(
            f"{run_uri} is being written by {held.describe()}. Two drivers on one run would overwrite each "
            f"other's checkpoints. Take it over with --force (that driver stops at its next renewal), wait "
            f"{left:.0f} s for its lease to expire (checkpoint.lease_ttl_s={held.ttl_s:g}), or pick another "
            "checkpoint.name"
        )
    now = time.time()
    started = now if held is None else max(now, held.started + 1e-3)  # newer than the one taken, whatever the clocks
    mine = Lease(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), started, now, ttl_s)
    _write(run_uri, mine)
    return mine


def renew(run_uri: str, lease: Lease) -> Lease | None:
    """Renews ``lease``; returns the new holder instead if another driver has taken the run over (its lease
    is newer). An older lease found over this one (a renewal that raced this driver's takeover) is replaced."""
    held = read(run_uri)
    if held is not None and held.owner != lease.owner and held.newer_than(lease):
        return held
    lease.renewed = time.time()
    _write(run_uri, lease)
    return None


def release(run_uri: str, lease: Lease) -> None:
    held = read(run_uri)
    if held is not None and held.owner == lease.owner:
        storage.delete(storage.join(run_uri, LEASE))


class LeaseKeeper:
    """Renews a lease every ``ttl_s / 3`` or a little sooner (at least 0.25 s) in a thread; calls
    ``on_lost(holder)`` once if it was taken over. A renewal that fails (storage down) is retried at the next
    interval. The interval is drawn at random each time: two keepers at one period could otherwise race at
    every renewal (each writing its own lease just after the other read), and the takeover never settle."""

    def __init__(self, run_uri: str, lease: Lease, on_lost: Callable[[Lease], None]) -> None:
        self.run_uri, self.lease, self.on_lost = run_uri, lease, on_lost
        self.lost: Lease | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="lease-keeper", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _keep(self) -> None:
        while not self._stop.wait(max(0.5, self.lease.ttl_s / 3) * random.uniform(0.5, 1.0)):
            try:
                holder = renew(self.run_uri, self.lease)
            except storage.StorageError:
                continue
            if holder is not None:
                self.lost = holder
                self.on_lost(holder)
                return
