"""A fault-injecting TCP proxy on 127.0.0.1 in front of the S3 test server (``moto_server``): clients point
``AWS_ENDPOINT_URL`` at it. It forwards bytes both ways and, when told to, for a bounded time:

- refuses connections (its listening socket is closed: clients see ECONNREFUSED);
- resets a share of connections after K bytes of response (TCP RST mid-body);
- answers 503 SlowDown (S3's throttling error) to a share of requests, instead of forwarding them;
- answers 403 AccessDenied to writes (PUT, POST, DELETE): read-only credentials;
- adds latency before each forwarded request.

Every fault ends by itself (``seconds``), and the proxy stops with its context manager. Counters in ``stats``.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator

_SLOWDOWN = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Please reduce your request rate."
    b"</Message></Error>"
)
_DENIED = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
)
_WRITES = (b"PUT", b"POST", b"DELETE")


class FaultProxy:
    def __init__(self, upstream_port: int, seed: int = 0, max_lifetime_s: float = 1800) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.rng = random.Random(seed)
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._faults: dict[str, tuple[float, dict]] = {}  # name -> (until, settings)
        self._stopped = threading.Event()
        self._open: set[socket.socket] = set()
        self._cut_objects: set[bytes] = set()
        self._deadline = time.monotonic() + max_lifetime_s
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)

    # -- faults ----------------------------------------------------------------------------------
    def refuse(self, seconds: float) -> None:
        """Connections are refused for ``seconds`` (from now); open ones are cut at once."""
        self._set("refuse", seconds)
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            _hard_close(sock)

    def reset(
        self,
        share: float,
        after_bytes: int,
        seconds: float = 3600,
        methods: tuple[bytes, ...] = (b"GET",),
        once_per_object: bool = False,
    ) -> None:
        """A ``share`` of new connections is reset once ``after_bytes`` of response have passed (requests of
        ``methods``; GETs by default: shard reads). ``once_per_object``: only the first such request of each
        object is cut (a reset in the middle of every shard, once)."""
        self._set("reset", seconds, share=share, after=after_bytes, methods=methods, once=once_per_object)

    def slowdown(self, share: float, seconds: float = 3600, methods: tuple[bytes, ...] = (b"GET",)) -> None:
        """A ``share`` of requests (of ``methods``) is answered 503 SlowDown."""
        self._set("slowdown", seconds, share=share, methods=methods)

    def deny_writes(self, seconds: float = 3600) -> None:
        self._set("deny", seconds)

    def latency(self, delay_s: float, seconds: float = 3600) -> None:
        self._set("latency", seconds, delay=delay_s)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _set(self, name: str, seconds: float, **settings) -> None:
        with self._lock:
            self._faults[name] = (time.monotonic() + seconds, settings)

    def _active(self, name: str) -> dict | None:
        with self._lock:
            entry = self._faults.get(name)
            if entry is None or time.monotonic() > entry[0]:
                return None
            return entry[1]

    def _chance(self, share: float) -> bool:
        with self._lock:
            return self.rng.random() < share

    # -- serving ---------------------------------------------------------------------------------
    def _listen(self, port: int) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        s.settimeout(0.2)
        return s

    def _serve(self) -> None:
        while not self._stopped.is_set() and time.monotonic() < self._deadline:
            if self._active("refuse") is not None:
                self._listener.close()
                while self._active("refuse") is not None and not self._stopped.is_set():
                    time.sleep(0.05)
                self.stats["refused_windows"] += 1
                self._listener = self._listen(self.port)
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self.stats["connections"] += 1
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            _hard_close(client)
            return
        with self._lock:
            self._open.add(client)
        reset = self._active("reset")
        victim = None
        if reset and self._chance(reset["share"]):
            victim = {"after": reset["after"], "methods": reset["methods"], "once": reset["once"]}
        state = {"done": False, "reset_armed": False}
        threading.Thread(target=self._responses, args=(upstream, client, victim, state), daemon=True).start()
        try:
            self._requests(client, upstream, victim, state)
        except OSError:
            pass
        finally:
            state["done"] = True
            with self._lock:
                self._open.discard(client)
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _requests(self, client: socket.socket, upstream: socket.socket, victim: dict | None, state: dict) -> None:
        """Client -> upstream, one HTTP request at a time (framed by Content-Length), so that a request can be
        answered by the proxy itself instead. The head goes on at once and the body as it comes (a client that
        sent ``Expect: 100-continue`` waits for the answer before sending the body)."""
        stream = _Incoming(client)
        while (head := stream.head()) is not None:
            method = head.split(b" ", 1)[0]
            if self._active("deny") is not None and method in _WRITES:
                self.stats["denied"] += 1
                client.sendall(_response(403, "Forbidden", _DENIED))
                return
            slowdown = self._active("slowdown")
            if slowdown and method in slowdown["methods"] and self._chance(slowdown["share"]):
                self.stats["slowdowns"] += 1
                client.sendall(_response(503, "Slow Down", _SLOWDOWN))
                return
            latency = self._active("latency")
            if latency:
                time.sleep(latency["delay"])
            if victim and method in victim["methods"] and self._first_cut(victim, head):
                state["reset_armed"] = True
            upstream.sendall(head)
            for chunk in stream.body(_content_length(head)):
                upstream.sendall(chunk)

    def _first_cut(self, victim: dict, head: bytes) -> bool:
        if not victim["once"]:
            return True
        target = head.split(b" ", 2)[1].split(b"?", 1)[0]
        with self._lock:
            if target in self._cut_objects:
                return False
            self._cut_objects.add(target)
            return True

    def _responses(self, upstream: socket.socket, client: socket.socket, victim: dict | None, state: dict) -> None:
        sent = 0
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if victim and state["reset_armed"] and sent + len(data) > victim["after"]:
                    client.sendall(data[: max(0, victim["after"] - sent)])
                    self.stats["resets"] += 1
                    _hard_close(client)
                    return
                client.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_WR)


def _hard_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees ECONNRESET, not a clean end. The socket's other thread may
    be blocked in recv() on it, which would keep it open: shutting down its reading side wakes that first."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


def _response(code: int, reason: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Incoming:
    """The client's side of a connection, read request by request."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def head(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buffer += data
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"

    def body(self, length: int) -> Iterator[bytes]:
        while length > 0:
            if not self.buffer:
                self.buffer = self.sock.recv(65536)
                if not self.buffer:
                    return
            chunk, self.buffer = self.buffer[:length], self.buffer[length:]
            length -= len(chunk)
            yield chunk


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0
