"""Live statistics of a mounted volume: what ``nexfs stats MOUNTPOINT`` shows.

What is counted: per FUSE operation, the requests, the ones answered with an errno, and a
latency histogram (the handler's time in the daemon, from its start to its reply; for a
WRITE the core's part, without the rare wait for the kernel to drop cached pages after an
O_DIRECT write, nexfs/fuse/invalidate.py); requests in flight
(now and the most seen); hits and misses of the metadata block cache and of the data cache;
the valve's operations, bytes, bounce copies and barriers; commits, checkpoints and how full
the journal is.

How it is read: the root directory of the mount answers ``getxattr("user.nexfs.stats")``
with :meth:`Stats.snapshot` as JSON.  Chosen over a virtual file (it would show in
``readdir`` and ``du``, and every tool that walks the tree would read it) and over a unix
socket (a second server in the daemon, a path to place and clean up, and permissions of its
own): an xattr needs no new code path in the daemon beyond one comparison in ``getxattr``,
works for every user who may read the root directory (the kernel checks that, as for any
``user.*`` name), travels through the same request loop it measures, and is invisible to
``listxattr`` and to copies.  The name is reserved on the root directory only: setting or
removing it there is refused (EPERM); elsewhere it is an ordinary name.

One document per question: a C caller asks the size first (a buffer of 0 bytes) and then
reads with a buffer of that size, and the daemon counts the first request before it
answers the second, so a document made afresh for the read may be longer than the size it
gave (ERANGE).  :class:`Handout` therefore gives a caller (by pid) the document it made for
that caller's previous request, once, if it is at most :data:`HANDOUT_SECONDS` old.

Cost: recording one request is two ``perf_counter_ns`` calls and a handful of integer
operations on preallocated lists (:func:`bucket`), about 0.3 µs against the 30-150 µs a
request costs (docs/BENCHMARKS.md, "Live statistics"); nothing is allocated per request.
Percentiles come from a log-linear histogram: four buckets per power of two, so a reported
percentile is the upper edge of its bucket, at most 25 % above the true value.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

STATS_XATTR = b"user.nexfs.stats"
"""The virtual xattr of the mount's root directory that holds the statistics (JSON)."""

FORMAT_VERSION = 1
"""``version`` in the JSON; raised when a field changes meaning."""

HANDOUT_SECONDS = 2.0
"""How long a document waits for its caller's follow-up read (:class:`Handout`)."""

NBUCKETS = 256
"""Histogram buckets: enough for any latency below 2**63 ns."""

PERCENTILES = (50, 90, 99)


def bucket(ns: int) -> int:
    """The histogram bucket of a latency: exact below 8 ns, then four buckets per power of
    two (the top three bits of the value)."""
    if ns < 8:
        return max(ns, 0)
    shift = ns.bit_length() - 3
    return (shift << 2) + (ns >> shift)


def bucket_upper(index: int) -> int:
    """The largest latency (ns) that falls in bucket ``index``."""
    if index < 8:
        return index
    shift = (index >> 2) - 1
    return (((index & 3) | 4) + 1 << shift) - 1


def percentile(hist: dict[int, int], pct: float) -> int | None:
    """The upper edge (ns) of the bucket holding the ``pct``-th percentile of ``hist``
    (bucket index -> count); None when it is empty."""
    total = sum(hist.values())
    if total == 0:
        return None
    rank = max(1, -(-total * pct // 100))  # ceil: the smallest value with pct % at or below
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            return bucket_upper(index)
    return bucket_upper(max(hist))


class OpStats:
    """One FUSE operation's counters."""

    __slots__ = ("count", "errors", "hist", "max_ns", "total_ns")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.total_ns = 0
        self.max_ns = 0
        self.hist = [0] * NBUCKETS

    def snapshot(self) -> dict[str, Any]:
        hist = {i: n for i, n in enumerate(self.hist) if n}
        out: dict[str, Any] = {
            "count": self.count, "errors": self.errors,
            "mean_us": round(self.total_ns / self.count / 1000, 2) if self.count else None,
            "max_us": round(self.max_ns / 1000, 2),
        }
        for pct in PERCENTILES:
            value = percentile(hist, pct)
            # A bucket's upper edge may lie above the largest value seen.
            out[f"p{pct}_us"] = None if value is None else round(min(value, self.max_ns) / 1000, 2)
        out["hist"] = {str(i): n for i, n in hist.items()}
        return out


Source = Callable[[], dict[str, Any]]
"""Sections of the snapshot computed when it is read (caches, valve, journal)."""


class Stats:
    """Every counter of one mount; the FUSE adapter records into it, ``getxattr`` on the
    root reads :meth:`snapshot`."""

    def __init__(self) -> None:
        self.ops: dict[str, OpStats] = {}
        self.in_flight = 0
        self.in_flight_max = 0
        self.started = time.monotonic()
        self.sources: list[Source] = []

    def op(self, name: str) -> OpStats:
        """The counters of operation ``name`` (made on first use)."""
        rec = self.ops.get(name)
        if rec is None:
            rec = self.ops[name] = OpStats()
        return rec

    def record(self, name: str, ns: int, failed: bool) -> None:
        """One request of operation ``name`` finished after ``ns``."""
        self.in_flight -= 1
        rec = self.ops.get(name)
        if rec is None:
            rec = self.ops[name] = OpStats()
        # Counted here, not in an OpStats method: a call is a fifth of the cost of counting.
        # The bucket is bucket(ns), inlined for the same reason.
        rec.count += 1
        rec.errors += failed
        rec.total_ns += ns
        if ns > rec.max_ns:
            rec.max_ns = ns
        if ns < 8:
            rec.hist[max(ns, 0)] += 1
        else:
            shift = ns.bit_length() - 3
            rec.hist[(shift << 2) + (ns >> shift)] += 1

    def snapshot(self) -> dict[str, Any]:
        """Everything, as plain JSON-ready data (see the module docstring)."""
        out: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "requests": {"in_flight": self.in_flight, "in_flight_max": self.in_flight_max},
            "ops": {name: rec.snapshot() for name, rec in sorted(self.ops.items())
                    if rec.count},
        }
        for source in self.sources:
            out.update(source())
        return out


def valve_counters(valve: Any, sector_size: int) -> dict[str, Any]:
    """The ``valve`` section: ``valve.stats`` (valve/interface.py, ``ValveStats``) in bytes."""
    s = valve.stats
    return {"valve": {"reads": s.reads, "writes": s.writes,
                      "bytes_read": s.sectors_read * sector_size,
                      "bytes_written": s.sectors_written * sector_size,
                      "bounce_copies": s.bounce_copies, "barriers": s.barriers,
                      "denials": s.denials}}


def hit_rate(hits: int, misses: int) -> float | None:
    return round(hits / (hits + misses), 4) if hits + misses else None


class Handout:
    """Documents by caller: each request of a pid gets the document made for that pid's
    previous request if it has not been handed out yet and is at most ``keep`` seconds old
    (the read after a size probe), otherwise a new one, kept for the next request."""

    def __init__(self, make: Callable[[], bytes], keep: float = HANDOUT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._make = make
        self._keep = keep
        self._clock = clock
        self._kept: dict[int, tuple[float, bytes]] = {}

    def get(self, pid: int) -> bytes:
        now = self._clock()
        kept = self._kept.pop(pid, None)
        if kept is not None and now - kept[0] <= self._keep:
            return kept[1]
        for other in [p for p, (t, _) in self._kept.items() if now - t > self._keep]:
            del self._kept[other]  # callers that never came back
        doc = self._make()
        self._kept[pid] = (now, doc)
        return doc
