"""``qflare bench abuse``: an honest federation against one ``qflare server`` while attackers run.

A ``qflare server`` child (:class:`~qflare.server.process.ServerProcess`, its default limits, ``--no-eval``)
on loopback serves a small federation (digits, mlp; ``devices`` devices, ``devices - 1`` selected each
round, so every round has an unselected device).  Each honest device is a real
:class:`~qflare.protocol.Device` over :class:`~qflare.transport.HttpTransport` from 127.0.0.1, pinned to
the server's key id read out of band (:func:`qflare.device.pin_server_key`), with its own thread: it
re-runs the handshake every ``probe_interval_s`` (each one timed: the honest handshake latency), polls
for its task, and when selected fetches the model, trains on its partition and submits (timed: the
honest upload latency).

Timeline: a baseline phase (honest traffic only), then each attacker alone for ``duration_s`` (at most
30 s), then a drain until the federation finishes (bounded).  The honest rounds are paced over the
attack window - round ``k`` is not trained before ``k - 1`` R-ths of it have passed - so they run
while the attackers do.  The attackers, each a bounded pool of threads that stops by itself, every one
from its own loopback address(es):

* ``slow_uploads`` (127.0.0.18): ``SLOW_CONNECTIONS`` connections POST ``/v1/update`` declaring a
  32 MB body (under the route's limit) and dribble one byte a second; half carry a bogus session id,
  half the live session id of an enrolled device that the open round did not select.  A connection the
  server closes is reopened.
* ``handshake_flood`` (16 addresses, 127.0.0.2 .. 127.0.0.17): what anyone on the wire can send now that
  a CLIENT_HELLO is signed by its device: three in four name an enrolled device's key id (public) with a
  fresh nonce, ephemeral KEM key and timestamp, signed with the attacker's own key (refused
  ``bad_signature`` after one verification); one in four replay one captured honest hello of an enrolled
  device (answered once, then refused ``replay`` after a digest lookup).
* ``enroll_flood`` (127.0.0.19): ENROLL_REQUESTs validly signed by fresh keys, with random tokens.
* ``bad_bodies`` (127.0.0.20): raw HTTP requests cycling through oversized bodies (declared, chunked,
  on every route), invalid ``Content-Length`` values, short bodies, garbage and truncated envelopes,
  junk session ids, wrong methods, oversized headers and malformed admin JSON.

Every HTTP status an attacker got back is counted; ``http_5xx`` is the larger of the 5xx statuses the
attackers saw and the 5xx the server's own ``/metrics`` counted (every route, honest traffic included).
The server's RSS (its process tree) is sampled throughout.  After a clean stop, ``orphan_blobs`` counts
files in the blob store that no update or model row references, plus temporary files of unfinished
writes.  The figures are measured, never tuned: a server without the defences fails targets.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from ..crypto import EphemeralKem, Field, MsgType, SignedEnvelope, SigningKey, Suite
from ..crypto.envelope import u64
from ..crypto.handshake import NONCE_LEN
from ..device import Workload, load_workload, pin_server_key
from ..errors import ConfigError, QflareError
from ..federation import FederationSpec
from ..protocol import Device, TaskInfo
from ..server.gate import SESSION_HEADER
from ..server.process import ServerProcess
from ..storage import Database, Store
from ..transport import HttpTransport, RetryPolicy
from .procs import PeakRss
from .remote import enroll_devices

__all__ = ["ATTACKERS", "MAX_DURATION_S", "TARGETS", "count_orphan_blobs", "run_abuse_bench"]

MAX_DURATION_S = 30.0
ATTACKERS: tuple[str, ...] = ("slow_uploads", "handshake_flood", "enroll_flood", "bad_bodies")
TARGETS: dict[str, str] = {
    "honest_rounds_completed": "== rounds",
    "honest_handshake_p99_ms_under_attack": "<= 3 x honest_handshake_p99_ms_baseline",
    "server_peak_rss_mb": "< 1024",
    "http_5xx": "0",
    "orphan_blobs": "0",
}

HONEST_ADDRESS = "127.0.0.1"
FLOOD_ADDRESSES: tuple[str, ...] = tuple(f"127.0.0.{i}" for i in range(2, 18))
SLOW_ADDRESS, ENROLL_ADDRESS, BODIES_ADDRESS = "127.0.0.18", "127.0.0.19", "127.0.0.20"
ADDRESSES: dict[str, tuple[str, ...]] = {
    "slow_uploads": (SLOW_ADDRESS,),
    "handshake_flood": FLOOD_ADDRESSES,
    "enroll_flood": (ENROLL_ADDRESS,),
    "bad_bodies": (BODIES_ADDRESS,),
}

SLOW_CONNECTIONS = 16
SLOW_DECLARED_BYTES = 32 * 1024 * 1024
FLOOD_THREADS_PER_ADDRESS = 2
ENROLL_THREADS = 4
BODIES_THREADS = 2
MAX_REQUESTS_PER_THREAD = 100_000
"""A bound on every attacker loop besides its deadline."""

_IO_TIMEOUT_S = 10.0
_BODY_ANSWER_S = 3.0
"""How long ``bad_bodies`` waits for an answer (a short body never completes: the server may wait for it)."""
_START_TIMEOUT_S = 180.0
"""An attacker process imports qflare (torch) before it starts: minutes on a loaded machine."""


# ---------------------------------------------------------------------------------------- recording
@dataclass
class Tally:
    """What one attacker sent and what it got back (thread-safe)."""

    addresses: list[str]
    requests: int = 0
    bytes_sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)
    by_case: dict[str, Counter[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def sent(self, nbytes: int, *, request: bool = True) -> None:
        with self._lock:
            self.requests += int(request)
            self.bytes_sent += nbytes

    def got(self, status: str) -> None:
        """An HTTP status ("413"), or what happened instead ("no_response", "timeout", "conn_error")."""
        with self._lock:
            (self.statuses if status.isdigit() else self.errors)[status] += 1

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.extra[key] = self.extra.get(key, 0) + n

    def case(self, name: str, status: str) -> None:
        with self._lock:
            self.by_case.setdefault(name, Counter())[status] += 1

    def to_json(self) -> dict[str, Any]:
        refused = sum(n for s, n in self.statuses.items() if s.startswith("4"))
        return {
            "addresses": self.addresses,
            "requests": self.requests,
            "bytes_sent": self.bytes_sent,
            "statuses": dict(sorted(self.statuses.items())),
            "refused_4xx": refused,
            "http_5xx": sum(n for s, n in self.statuses.items() if s.startswith("5")),
            "no_status": dict(sorted(self.errors.items())),
            **self.extra,
            **(
                {"by_case": {k: dict(sorted(v.items())) for k, v in sorted(self.by_case.items())}}
                if self.by_case
                else {}
            ),
        }


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic() at the start
    ms: float
    ok: bool


@dataclass
class HonestLog:
    handshakes: list[Sample] = field(default_factory=list)
    uploads: list[Sample] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    tasks: dict[int, TaskInfo] = field(default_factory=dict)
    sessions: dict[int, str] = field(default_factory=dict)
    receipts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Schedule:
    """Paces the honest rounds over the attacks: round ``k`` of ``rounds`` may be trained once the attackers
    have run ``(k - 1) * window / rounds`` seconds in all (the time their processes take to start excluded)."""

    def __init__(self, rounds: int, window_s: float) -> None:
        self.rounds, self.window_s = rounds, window_s
        self._done = 0.0
        self._since: float | None = None
        self.released = False
        """Set when the attacks are over: every round may be trained."""
        self._lock = threading.Lock()

    def attack_started(self, at: float) -> None:
        with self._lock:
            self._since = at

    def attack_stopped(self, at: float) -> None:
        with self._lock:
            if self._since is not None:
                self._done += max(0.0, at - self._since)
            self._since = None

    def attacked_s(self, now: float) -> float:
        with self._lock:
            return self._done + (max(0.0, now - self._since) if self._since is not None else 0.0)

    def ready(self, rnd: int, now: float) -> bool:
        due = (max(rnd, 1) - 1) * self.window_s / self.rounds
        return self.released or ((self._since is not None or self._done > 0) and self.attacked_s(now) >= due)


def _percentile(samples: Sequence[Sample], q: float) -> float | None:
    return round(float(np.percentile([s.ms for s in samples], q)), 1) if samples else None


def _within(samples: Sequence[Sample], spans: Sequence[tuple[float, float]]) -> list[Sample]:
    """The samples whose time overlaps one of ``spans`` (one that began just before an attack and waited
    through it was slowed by it)."""
    return [s for s in samples if any(s.at < b and s.at + s.ms / 1000 > a for a, b in spans)]


def _inside(samples: Sequence[Sample], span: tuple[float, float]) -> list[Sample]:
    """The samples wholly inside ``span``."""
    return [s for s in samples if s.at >= span[0] and s.at + s.ms / 1000 <= span[1]]


# ---------------------------------------------------------------------------------------- honest devices
def _honest_device(
    index: int,
    dev: Device,
    workload: Workload,
    log: HonestLog,
    schedule: Schedule,
    stop: threading.Event,
    deadline: float,
    probe_interval_s: float,
) -> None:
    """One honest device's loop (see the module docstring); ends on ``stop`` or the deadline, so it keeps
    measuring handshakes after the federation finished."""
    next_probe, trained = 0.0, set[int]()
    while not stop.is_set() and time.monotonic() < deadline:
        now = time.monotonic()
        try:
            if now >= next_probe:
                next_probe = now + probe_interval_s
                t = time.perf_counter()
                try:
                    sid = dev.connect()
                    ok = True
                except QflareError:
                    ok = False
                    raise
                finally:
                    with log.lock:
                        log.handshakes.append(Sample(now, (time.perf_counter() - t) * 1000, ok))
                with log.lock:
                    log.sessions[index] = sid
            task = dev.task()
            with log.lock:
                log.tasks[index] = task
            if (
                task.state == "open"
                and task.selected
                and not task.submitted
                and task.round not in trained
                and schedule.ready(task.round, time.monotonic())
            ):
                model = dev.fetch_model(task)
                update = dev.prepare_update(task, model, workload.train(model.flat, task.round))
                start, t = time.monotonic(), time.perf_counter()
                ok = False
                try:
                    dev.submit(update)
                    ok = True
                    trained.add(task.round)
                finally:
                    with log.lock:
                        log.uploads.append(Sample(start, (time.perf_counter() - t) * 1000, ok))
                        log.receipts += int(ok)
                continue
        except QflareError as exc:
            with log.lock:
                log.errors[f"{type(exc).__name__}:{exc.code}"] += 1
        stop.wait(0.1)


# ---------------------------------------------------------------------------------------- raw HTTP
def _status_of(data: bytes) -> str:
    """The status code of an HTTP/1.x response's first line ("no_response" when there is none)."""
    line = data.split(b"\r\n", 1)[0].split()
    return line[1].decode("ascii", "replace") if len(line) >= 2 and line[0].startswith(b"HTTP/") else "no_response"


def _read_response(sock: socket.socket, timeout_s: float) -> str:
    sock.settimeout(timeout_s)
    buf = b""
    try:
        while b"\r\n" not in buf and len(buf) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        return "timeout" if not buf else _status_of(buf)
    except OSError:
        return "conn_error" if not buf else _status_of(buf)
    return _status_of(buf)


def _connect(port: int, local: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=_IO_TIMEOUT_S, source_address=(local, 0))


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _raw_exchange(port: int, local: str, parts: Sequence[bytes], tally: Tally) -> str:
    """Send ``parts`` on a fresh connection (stopping early when the server answers or closes); the answer."""
    tally.sent(0)
    try:
        sock = _connect(port, local)
    except OSError:
        return "conn_error"
    with sock:
        sent = 0
        try:
            for part in parts:
                sock.sendall(part)
                sent += len(part)
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
        except OSError:
            pass
        finally:
            tally.sent(sent, request=False)
        return _read_response(sock, _BODY_ANSWER_S)


# ---------------------------------------------------------------------------------------- attackers
def _slow_uploads(port: int, deadline: float, insider: Callable[[], str], tally: Tally) -> None:
    """SLOW_CONNECTIONS connections to /v1/update dribbling a byte a second (see the module docstring)."""
    conns: dict[int, tuple[socket.socket, float]] = {}
    bogus = os.urandom(32).hex()
    opened = 0

    def session_for(slot: int) -> str:
        if slot % 2 == 0:
            return bogus
        sid = insider()
        if sid:
            tally.count("real_unselected_session_connections")
            return sid
        return bogus

    def open_slot(slot: int) -> None:
        nonlocal opened
        sid = session_for(slot)
        head = _head(
            "POST",
            "/v1/update",
            {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(SLOW_DECLARED_BYTES),
                SESSION_HEADER: sid,
            },
        )
        try:
            sock = _connect(port, SLOW_ADDRESS)
            sock.sendall(head)
        except OSError:
            tally.got("conn_error")
            return
        opened += 1
        tally.sent(len(head))
        conns[slot] = (sock, time.monotonic())

    def close_slot(slot: int, status: str | None) -> None:
        sock, since = conns.pop(slot)
        held = time.monotonic() - since
        tally.extra["max_held_s"] = round(max(tally.extra.get("max_held_s", 0.0), held), 1)
        if status is not None:
            tally.got(status)
        sock.close()

    for slot in range(SLOW_CONNECTIONS):
        open_slot(slot)
    rounds = 0
    while time.monotonic() < deadline and rounds < MAX_REQUESTS_PER_THREAD:
        rounds += 1
        for slot in range(SLOW_CONNECTIONS):
            if slot not in conns:
                if opened < SLOW_CONNECTIONS * 100:
                    open_slot(slot)
                continue
            sock = conns[slot][0]
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:  # the server answered or closed: count it, reopen next pass
                tally.count("closed_by_server")
                close_slot(slot, _read_response(sock, 1.0))
                continue
            try:
                sock.sendall(b"\0")
                tally.sent(1, request=False)
            except OSError:
                tally.count("closed_by_server")
                close_slot(slot, "conn_error")
        time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))
    tally.extra["open_at_end"] = len(conns)  # held to the end: never answered nor closed by the server
    for slot in list(conns):
        close_slot(slot, None)
    tally.extra["connections_opened"] = opened


def client_hello(suite: Suite, key_id: str, key: SigningKey | None = None) -> bytes:
    """A CLIENT_HELLO naming ``key_id``, with a fresh nonce, ephemeral KEM key and timestamp, signed with
    ``key`` (a fresh one when None): what anyone who read a device's key id off the wire can send.  Unless
    ``key`` is that device's own key, the coordinator refuses it ``bad_signature``."""
    signer = key or SigningKey.generate(suite.sig)
    return SignedEnvelope.sign(
        suite,
        MsgType.CLIENT_HELLO,
        {
            Field.DEVICE_KEY_ID: bytes.fromhex(key_id),
            Field.CLIENT_NONCE: os.urandom(NONCE_LEN),
            Field.KEM_PUBLIC: EphemeralKem.generate(suite).public_bytes(),
            Field.TIMESTAMP: u64(int(time.time())),
        },
        signer,
    ).to_bytes()


def _flood_worker(
    url: str, local: str, deadline: float, known: Sequence[str], suite: Suite, captured: bytes, tally: Tally
) -> None:
    """Three in four: a forged hello for an enrolled key id, signed with this worker's own fresh key; one
    in four: the ``captured`` honest hello again."""
    rng = random.Random()
    own = SigningKey.generate(suite.sig)
    transport = httpx.HTTPTransport(local_address=local, retries=0)
    with httpx.Client(base_url=url, transport=transport, timeout=_IO_TIMEOUT_S) as client:
        for n in range(MAX_REQUESTS_PER_THREAD):
            if time.monotonic() >= deadline:
                return
            body = captured if n % 4 == 0 else client_hello(suite, rng.choice(known), own)
            _post(client, "/v1/handshake/hello", body, tally)


def _enroll_worker(url: str, deadline: float, suite: Suite, tally: Tally) -> None:
    transport = httpx.HTTPTransport(local_address=ENROLL_ADDRESS, retries=0)
    with httpx.Client(base_url=url, transport=transport, timeout=_IO_TIMEOUT_S) as client:
        for _ in range(MAX_REQUESTS_PER_THREAD):
            if time.monotonic() >= deadline:
                return
            key = SigningKey.generate(suite.sig)
            req = SignedEnvelope.sign(
                suite,
                MsgType.ENROLL_REQUEST,
                {
                    Field.DEVICE_ID: key.key_id.encode(),
                    Field.SIGNING_PUBLIC: key.public.raw,
                    Field.ENROLL_TOKEN: os.urandom(24).hex().encode(),
                    Field.CLIENT_NONCE: os.urandom(32),
                    Field.TIMESTAMP: u64(int(time.time())),
                },
                key,
            ).to_bytes()
            _post(client, "/v1/enroll", req, tally)


def _post(client: httpx.Client, path: str, body: bytes, tally: Tally, headers: dict[str, str] | None = None) -> None:
    tally.sent(len(body))
    try:
        r = client.post(path, content=body, headers={"content-type": "application/octet-stream", **(headers or {})})
        tally.got(str(r.status_code))
    except httpx.TimeoutException:
        tally.got("timeout")
    except httpx.HTTPError:
        tally.got("conn_error")


def _chunked(total: int, chunk: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield f"{n:x}\r\n".encode() + b"A" * n + b"\r\n"
        sent += n
    yield b"0\r\n\r\n"


def bad_requests(valid_hello: bytes) -> list[tuple[str, list[bytes]]]:
    """The ``bad_bodies`` cases: (name, the raw bytes to send, in parts)."""
    octet = {"Content-Type": "application/octet-stream"}
    garbage = os.urandom(1024)
    junk_sid = "zz" * 300
    nested = b"[" * 100_000 + b"]" * 100_000
    return [
        ("update_declared_1tb", [_head("POST", "/v1/update", {**octet, "Content-Length": str(2**40)})]),
        ("enroll_declared_10mb", [_head("POST", "/v1/enroll", {**octet, "Content-Length": str(10 * 2**20)})]),
        (
            "hello_chunked_2mb",
            [
                _head("POST", "/v1/handshake/hello", {**octet, "Transfer-Encoding": "chunked"}),
                *_chunked(2 * 2**20, 2**16),
            ],
        ),
        (
            "task_chunked_2mb",
            [_head("POST", "/v1/task", {**octet, "Transfer-Encoding": "chunked"}), *_chunked(2 * 2**20, 2**16)],
        ),
        ("content_length_text", [_head("POST", "/v1/enroll", {**octet, "Content-Length": "abc"}) + garbage[:3]]),
        ("content_length_negative", [_head("POST", "/v1/handshake/hello", {**octet, "Content-Length": "-1"})]),
        (
            "content_length_short_body",
            [_head("POST", "/v1/enroll", {**octet, "Content-Length": "4096"}) + garbage[:100]],
        ),
        ("enroll_garbage", [_head("POST", "/v1/enroll", {**octet, "Content-Length": str(len(garbage))}) + garbage]),
        (
            "hello_garbage",
            [_head("POST", "/v1/handshake/hello", {**octet, "Content-Length": str(len(garbage))}) + garbage],
        ),
        (
            "finish_garbage",
            [_head("POST", "/v1/handshake/finish", {**octet, "Content-Length": str(len(garbage))}) + garbage],
        ),
        (
            "hello_truncated",
            [
                _head("POST", "/v1/handshake/hello", {**octet, "Content-Length": str(len(valid_hello) // 2)})
                + valid_hello[: len(valid_hello) // 2]
            ],
        ),
        (
            "task_junk_session",
            [
                _head("POST", "/v1/task", {**octet, "Content-Length": str(len(garbage)), SESSION_HEADER: junk_sid})
                + garbage
            ],
        ),
        (
            "update_junk_session",
            [
                _head("POST", "/v1/update", {**octet, "Content-Length": str(len(garbage)), SESSION_HEADER: junk_sid})
                + garbage
            ],
        ),
        ("enroll_wrong_method", [_head("GET", "/v1/enroll", {})]),
        ("header_64kb", [_head("POST", "/v1/enroll", {**octet, "X-Junk": "a" * 65536, "Content-Length": "0"})]),
        (
            "admin_nested_json",
            [
                _head(
                    "POST",
                    "/v1/admin/tokens",
                    {
                        "Content-Type": "application/json",
                        "Authorization": "Bearer x",
                        "Content-Length": str(len(nested)),
                    },
                )
                + nested
            ],
        ),
        (
            "admin_bad_json",
            [
                _head("POST", "/v1/admin/tokens", {"Content-Type": "application/json", "Content-Length": "9"})
                + b'{"count":'
            ],
        ),
        ("status_path_nul", [b"GET /v1/status%00%ff HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"]),
    ]


def _bodies_worker(
    port: int, deadline: float, cases: Sequence[tuple[str, list[bytes]]], start: int, tally: Tally
) -> None:
    for n in range(MAX_REQUESTS_PER_THREAD):
        if time.monotonic() >= deadline:
            return
        name, parts = cases[(start + n) % len(cases)]
        status = _raw_exchange(port, BODIES_ADDRESS, parts, tally)
        tally.got(status)
        tally.case(name, status)


# ---------------------------------------------------------------------------------------- after the run
def count_orphan_blobs(data_dir: Path, database_url: str) -> dict[str, int]:
    """Blob files no update or model row references, and unfinished temporary files, in a stopped server's data dir."""
    blobs_root = data_dir / "blobs"
    db = Database(database_url)
    try:
        store = Store(db)
        referenced = {m.model_hash for m in store.list_models()}
        for rnd in store.list_rounds():
            referenced.update(u.update_hash for u in store.updates_for_round(rnd.round_number))
            if rnd.result_model_hash:
                referenced.add(rnd.result_model_hash)
    finally:
        db.dispose()
    files = unreferenced = temp = 0
    if blobs_root.is_dir():
        for path in blobs_root.rglob("*"):
            if not path.is_file():
                continue
            if path.parent == blobs_root:
                temp += 1  # blobs live in shard folders; anything at the top is an unfinished write
                continue
            files += 1
            if path.parent.name + path.name not in referenced:
                unreferenced += 1
    return {"blob_files": files, "unreferenced": unreferenced, "temp_files": temp}


def _server_5xx(metrics_text: str) -> int:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("qflare_http_requests_total{") and 'status="5' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


# ---------------------------------------------------------------------------------------- the run
def run_abuse_bench(
    duration_s: float = 20.0,
    *,
    devices: int = 4,
    rounds: int = 8,
    baseline_s: float | None = None,
    probe_interval_s: float | None = None,
    data_root: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) and return its figures.

    ``probe_interval_s`` (default: one probe per device every ``devices / 4`` s, at least 0.5 s): the
    honest devices share one address, 127.0.0.1, and the server allows each address 5 public-key requests
    a second (``HttpLimits.keys_rate``); real devices handshake once per session, so the probes stay
    below that limit rather than measure it."""
    if probe_interval_s is None:
        probe_interval_s = max(0.5, devices / 4.0)
    if not 0 < duration_s <= MAX_DURATION_S:
        raise ConfigError(f"duration_s must be in (0, {MAX_DURATION_S:g}], got {duration_s}")
    if devices < 2 or rounds < 1:
        raise ConfigError(f"need devices >= 2 (one unselected each round) and rounds >= 1, got {devices}, {rounds}")
    baseline = baseline_s if baseline_s is not None else max(3.0, min(10.0, duration_s / 2))
    window = duration_s * len(ATTACKERS)
    drain_s = max(60.0, 10.0 * rounds)
    torch.set_num_threads(1)
    fed = FederationSpec(
        dataset="digits",
        model="mlp",
        devices=devices,
        per_round=devices - 1,
        rounds=rounds,
        round_timeout_s=3600.0,  # the run's own timers bound it; a round must not fail on its deadline
        data_root=data_root,
    )
    workloads = [load_workload(fed, i) for i in range(devices)]
    layout = workloads[0].layout
    log, schedule, stop = HonestLog(), Schedule(rounds, window), threading.Event()
    tallies: dict[str, dict[str, Any]] = {}
    phases: dict[str, tuple[float, float]] = {}
    retry = RetryPolicy(attempts=3, initial_s=0.2, max_wait_s=2.0)
    server = ServerProcess(fed, args=["--no-eval", "--log-level", "warning"])
    with server:
        server.wait_ready()
        transports = [HttpTransport(server.url, timeout=60.0, retry=retry) for _ in range(devices)]
        rss = PeakRss(server.pid, interval=0.1)
        try:
            with rss:
                key, suite = pin_server_key(server.api.get_json("/v1/identity"), server.key_id())
                devs = enroll_devices(transports, server.tokens(devices, label="bench-abuse"), key, layout, suite)
                end = time.monotonic() + baseline + len(ATTACKERS) * (duration_s + _START_TIMEOUT_S + 60.0) + drain_s
                honest = [
                    threading.Thread(
                        target=_honest_device,
                        args=(i, devs[i], workloads[i], log, schedule, stop, end, probe_interval_s),
                        name=f"qflare-honest-{i}",
                        daemon=True,
                    )
                    for i in range(devices)
                ]
                t = time.monotonic()
                for th in honest:
                    th.start()
                stop.wait(baseline)
                phases["baseline"] = (t, time.monotonic())
                key_ids = [d.device_id for d in devs]
                for name in ATTACKERS:
                    # one honest hello of an enrolled device, as captured off the wire just before the
                    # attack (its timestamp is fresh while the attack runs)
                    hello = client_hello(suite, devs[0].device_id, devs[0].identity)
                    tallies[name], phases[name] = _run_attacker(
                        name, server, duration_s, log, schedule, key_ids, suite, hello
                    )
                schedule.released = True
                t = time.monotonic()
                while time.monotonic() < t + drain_s and any(th.is_alive() for th in honest):
                    with contextlib.suppress(QflareError):
                        if server.status().get("state") == "finished":
                            break
                    stop.wait(0.5)
                stop.set()
                for th in honest:
                    th.join(timeout=120.0)
                phases["drain"] = (t, time.monotonic())
                alive = server.poll() is None
                status: dict[str, Any] = {}
                metrics_text = ""
                with contextlib.suppress(QflareError, httpx.HTTPError):
                    status = server.status()
                    metrics_text = httpx.get(server.url + "/metrics", timeout=30.0).text
        finally:
            stop.set()
            for tr in transports:
                tr.close()
        exit_code = server.stop()
        orphans = count_orphan_blobs(server.data_dir, server.database_url)
    return _report(
        duration_s=duration_s,
        devices=devices,
        rounds=rounds,
        log=log,
        phases=phases,
        tallies=tallies,
        status=status,
        metrics_text=metrics_text,
        peak_rss=rss.peak_bytes,
        alive=alive,
        exit_code=exit_code,
        orphans=orphans,
    )


def _attacker_main(
    name: str,
    url: str,
    port: int,
    duration_s: float,
    key_ids: Sequence[str],
    suite: Suite,
    hello: bytes,
    insider: Any,
    conn: Any,
) -> None:
    """An attacker's process: reports when it starts, runs ``duration_s`` (its threads all end by then, plus
    one I/O timeout), then sends its tally and when it stopped."""
    start = time.monotonic()
    deadline = start + duration_s
    conn.send(("started", start))
    tally = Tally(list(ADDRESSES[name]))

    def insider_session() -> str:
        return bytes(insider.value).decode("ascii", "replace")

    jobs: list[Callable[[], None]]
    if name == "slow_uploads":
        jobs = [lambda: _slow_uploads(port, deadline, insider_session, tally)]
    elif name == "handshake_flood":
        jobs = [
            partial(_flood_worker, url, addr, deadline, key_ids, suite, hello, tally)
            for addr in FLOOD_ADDRESSES
            for _ in range(FLOOD_THREADS_PER_ADDRESS)
        ]
    elif name == "enroll_flood":
        jobs = [lambda: _enroll_worker(url, deadline, suite, tally) for _ in range(ENROLL_THREADS)]
    elif name == "bad_bodies":
        cases = bad_requests(hello)
        tally.extra["cases"] = len(cases)
        jobs = [
            partial(_bodies_worker, port, deadline, cases, k * len(cases) // BODIES_THREADS, tally)
            for k in range(BODIES_THREADS)
        ]
    else:
        raise ConfigError(f"unknown attacker {name!r}")
    try:
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix=f"qflare-{name}") as pool:
            for f in [pool.submit(job) for job in jobs]:
                f.result()
    finally:
        conn.send(("tally", tally.to_json(), time.monotonic()))
        conn.close()


def _insider_feeder(log: HonestLog, insider: Any, stop: threading.Event) -> None:
    """Keeps ``insider`` at the live session id of an enrolled device the open round did not select."""
    while not stop.wait(0.1):
        with log.lock:
            sids = [
                log.sessions[i]
                for i, t in log.tasks.items()
                if t.state == "open" and not t.selected and i in log.sessions
            ]
        insider.value = (sids[0] if sids else "").encode("ascii")


def _run_attacker(
    name: str,
    server: ServerProcess,
    duration_s: float,
    log: HonestLog,
    schedule: Schedule,
    key_ids: Sequence[str],
    suite: Suite,
    hello: bytes,
) -> tuple[dict[str, Any], tuple[float, float]]:
    """Run attacker ``name`` in a child process for ``duration_s``; what it sent and got back, and the span
    (monotonic clock, shared by the processes) during which it attacked."""
    ctx = multiprocessing.get_context("spawn")
    insider = ctx.Array("c", 128)
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_attacker_main,
        args=(name, server.url, server.port, duration_s, list(key_ids), suite, hello, insider, sender),
        name=f"qflare-attacker-{name}",
        daemon=True,
    )
    stop = threading.Event()
    feeder = threading.Thread(target=_insider_feeder, args=(log, insider, stop), daemon=True)
    feeder.start()
    proc.start()
    sender.close()
    t0 = time.monotonic()
    span = (t0, t0)
    result: dict[str, Any] = {}
    try:
        if not receiver.poll(_START_TIMEOUT_S):
            raise QflareError(f"the {name} attacker did not start within {_START_TIMEOUT_S:.0f} s")
        _, started = receiver.recv()
        span = (started, started + duration_s)
        schedule.attack_started(started)
        limit = duration_s + 3 * _IO_TIMEOUT_S + 10.0
        if receiver.poll(limit):
            _, result, stopped = receiver.recv()
            span = (started, stopped)
        else:
            result = {"error": f"the attacker did not report within {limit:.0f} s of starting"}
        proc.join(timeout=10.0)
    except EOFError:
        result = {"error": f"the attacker process exited with status {proc.exitcode} without reporting"}
    finally:
        stop.set()
        feeder.join()
        if proc.is_alive():
            proc.kill()
            proc.join()
        receiver.close()
        schedule.attack_stopped(span[1] if span[1] > span[0] else time.monotonic())
    return result, span


def _report(
    *,
    duration_s: float,
    devices: int,
    rounds: int,
    log: HonestLog,
    phases: dict[str, tuple[float, float]],
    tallies: dict[str, dict[str, Any]],
    status: dict[str, Any],
    metrics_text: str,
    peak_rss: int,
    alive: bool,
    exit_code: int | None,
    orphans: dict[str, int],
) -> dict[str, Any]:
    attack_spans = [phases[n] for n in ATTACKERS if n in phases]
    hs_base = _inside(log.handshakes, phases["baseline"]) if "baseline" in phases else []
    hs_attack = _within(log.handshakes, attack_spans)
    up_attack = _within(log.uploads, attack_spans)
    base_p99, attack_p99 = _percentile(hs_base, 99), _percentile(hs_attack, 99)
    attackers: dict[str, Any] = {}
    for name in ATTACKERS:
        a, b = phases.get(name, (0.0, 0.0))
        hs, up = _within(log.handshakes, [(a, b)]), _within(log.uploads, [(a, b)])
        attackers[name] = {
            **tallies.get(name, {}),
            "ran_s": round(b - a, 1),
            "honest_handshakes": len(hs),
            "honest_handshake_failures": sum(1 for s in hs if not s.ok),
            "honest_handshake_p99_ms": _percentile(hs, 99),
            "honest_uploads": len(up),
            "honest_upload_failures": sum(1 for s in up if not s.ok),
            "honest_upload_p99_ms": _percentile(up, 99),
        }
    client_5xx = sum(int(a.get("http_5xx", 0)) for a in attackers.values())
    server_5xx = _server_5xx(metrics_text)
    model_version = int(status.get("model_version", 0) or 0)
    out: dict[str, Any] = {
        "duration_s_per_attacker": duration_s,
        "devices": devices,
        "rounds": rounds,
        "workload": "digits/mlp",
        "honest_rounds_completed": min(model_version, rounds),
        "honest_receipts": log.receipts,
        "honest_handshake_p99_ms_baseline": base_p99,
        "honest_handshake_p99_ms_under_attack": attack_p99,
        "honest_handshake_p50_ms_baseline": _percentile(hs_base, 50),
        "honest_handshake_p50_ms_under_attack": _percentile(hs_attack, 50),
        "honest_handshakes_baseline": len(hs_base),
        "honest_handshakes_under_attack": len(hs_attack),
        "honest_handshake_failures_under_attack": sum(1 for s in hs_attack if not s.ok),
        "honest_upload_p99_ms_under_attack": _percentile(up_attack, 99),
        "honest_uploads_under_attack": len(up_attack),
        "honest_upload_p99_ms_all": _percentile(log.uploads, 99),
        "honest_errors": dict(sorted(log.errors.items())),
        "server_peak_rss_mb": round(peak_rss / 2**20, 1),
        "http_5xx": max(client_5xx, server_5xx),
        "http_5xx_seen_by_attackers": client_5xx,
        "http_5xx_server_metrics": server_5xx if metrics_text else None,
        "orphan_blobs": orphans["unreferenced"] + orphans["temp_files"],
        "blobs": orphans,
        "server_alive_after_attacks": alive,
        "server_state_after": status.get("state"),
        "server_exit": exit_code,
        "attackers": attackers,
        "targets": TARGETS,
    }
    out["meets_targets"] = bool(
        out["honest_rounds_completed"] == rounds
        and base_p99 is not None
        and attack_p99 is not None
        and attack_p99 <= 3 * base_p99
        and out["server_peak_rss_mb"] < 1024
        and out["http_5xx"] == 0
        and out["orphan_blobs"] == 0
        and alive
    )
    return out
