"""Requests in flight together, through a real mount, checked by a model.

Threads of this process hammer a fresh volume at once with O_DIRECT I/O (so every read and
write is a request to the daemon, not the page cache): writers stamp 4 KiB blocks of a few
shared files with ``(file, block, version)``, readers read overlapping ranges, a truncator
shrinks and regrows the files and fsyncs them, and a churner creates, fills, re-reads and
unlinks files so that freed blocks are reused under everyone's feet.

What every read must show, block by block:

* **nothing from another file or another place**: a block holds zeros, or a whole stamp of
  this file and this block (a torn block, or another file's or block's stamp, fails);
* **a state that existed** (per block, a linearizable register): the version read was
  written by a write that started before the read ended, and no other write of that block
  (a truncate counts as a write of zeros) both started after that write ended and ended
  before the read started.

The churner checks its own files the same way (its stamps carry a per-incarnation tag, and
an unlinked file still open must read back what was written into it).  The default run is
a few seconds; ``NEXFS_LONG=1`` runs longer.  fsck after the test (the fixture) must be
clean.
"""

from __future__ import annotations

import itertools
import mmap
import os
import random
import struct
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mountutil import Mount, Mounter, mounted_fixture, mounter_fixture  # noqa: F401

pytestmark = pytest.mark.mount

BS = 4096
SECONDS = 60.0 if os.environ.get("NEXFS_LONG") else 6.0
FILES = 3
NBLOCKS = 48
ZERO = 0  # the "version" of a block of zeros
_STAMP = struct.Struct("<QQQQ")  # magic, file tag, block, version
_MAGIC = 0x4E45584653544D50


def stamp(tag: int, block: int, version: int) -> bytes:
    return _STAMP.pack(_MAGIC, tag, block, version) * (BS // _STAMP.size)


def decode(block: bytes | memoryview, tag: int, index: int) -> int:
    """The version a block holds (ZERO for zeros); AssertionError for anything else."""
    raw = bytes(block)
    if raw.count(0) == BS:
        return ZERO
    magic, t, b, v = _STAMP.unpack_from(raw)
    assert magic == _MAGIC, f"block {index} of file {tag}: not a stamp: {raw[:32].hex()}"
    assert (t, b) == (tag, index), f"block {index} of file {tag} holds file {t} block {b}"
    assert raw == stamp(t, b, v), f"block {index} of file {tag}: torn (version {v} and more)"
    assert v != ZERO
    return v


@dataclass
class History:
    """Per (file, block): writes as (start, end, version) and reads as (start, end, version)."""

    writes: dict[tuple[int, int], list[tuple[int, int, int]]] = field(
        default_factory=lambda: defaultdict(list))
    reads: dict[tuple[int, int], list[tuple[int, int, int]]] = field(
        default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wrote(self, tag: int, first: int, n: int, t0: int, t1: int, version: int) -> None:
        with self.lock:
            for b in range(first, first + n):
                self.writes[tag, b].append((t0, t1, version))

    def read(self, tag: int, first: int, versions: list[int], t0: int, t1: int) -> None:
        with self.lock:
            for i, v in enumerate(versions):
                self.reads[tag, first + i].append((t0, t1, v))

    def violations(self) -> list[str]:
        bad = []
        for key, reads in self.reads.items():
            writes = [(-2, -1, ZERO), *self.writes.get(key, [])]  # the initial zeros
            for rs, re, v in reads:
                ok = False
                for ws, we, wv in writes:
                    if wv != v or ws >= re:
                        continue
                    if not any(xs > we and xe < rs for xs, xe, _ in writes):
                        ok = True
                        break
                if not ok:
                    bad.append(f"file {key[0]} block {key[1]}: read version {v} during "
                               f"[{rs}, {re}], writes {sorted(writes)[-6:]}")
        return bad


def aligned(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, nbytes)  # page aligned: good for O_DIRECT


def test_concurrent_requests_against_a_model(mounted: Mount) -> None:
    root = mounted.mountpoint
    hist = History()
    versions = itertools.count(1)
    vlock = threading.Lock()
    errors: list[BaseException] = []
    stop = time.monotonic() + SECONDS
    counts: defaultdict[str, int] = defaultdict(int)
    paths = [root / f"shared{i}" for i in range(FILES)]
    for p in paths:
        p.touch()
    tags = list(range(1, FILES + 1))

    def next_version() -> int:
        with vlock:
            return next(versions)

    def open_direct(path: Path, flags: int = os.O_RDWR) -> int:
        return os.open(path, flags | os.O_DIRECT)

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        buf = aligned(4 * BS)
        fds = [open_direct(p) for p in paths]
        try:
            while time.monotonic() < stop:
                f = rnd.randrange(FILES)
                n = rnd.randint(1, 4)
                first = rnd.randrange(NBLOCKS - n + 1)
                v = next_version()
                for i in range(n):
                    buf[i * BS:(i + 1) * BS] = stamp(tags[f], first + i, v)
                t0 = time.monotonic_ns()
                assert os.pwrite(fds[f], memoryview(buf)[: n * BS], first * BS) == n * BS
                hist.wrote(tags[f], first, n, t0, time.monotonic_ns(), v)
                counts["write"] += 1
        finally:
            for fd in fds:
                os.close(fd)

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        buf = aligned(8 * BS)
        fds = [open_direct(p, os.O_RDONLY) for p in paths]
        try:
            while time.monotonic() < stop:
                f = rnd.randrange(FILES)
                n = rnd.randint(1, 8)
                first = rnd.randrange(NBLOCKS - n + 1)
                t0 = time.monotonic_ns()
                got = os.preadv(fds[f], [memoryview(buf)[: n * BS]], first * BS)
                t1 = time.monotonic_ns()
                view = memoryview(buf)
                # Past the end of file reads as zeros (a short read).
                vs = [decode(view[i * BS:(i + 1) * BS], tags[f], first + i)
                      if (i + 1) * BS <= got else ZERO for i in range(n)]
                assert got % BS == 0 or got == n * BS, f"read of {n} blocks returned {got}"
                hist.read(tags[f], first, vs, t0, t1)
                counts["read"] += 1
        finally:
            for fd in fds:
                os.close(fd)

    def truncator(seed: int) -> None:
        rnd = random.Random(seed)
        fds = [os.open(p, os.O_RDWR) for p in paths]
        try:
            while time.monotonic() < stop:
                f = rnd.randrange(FILES)
                keep = rnd.randrange(NBLOCKS // 2, NBLOCKS + 1)
                t0 = time.monotonic_ns()
                os.ftruncate(fds[f], keep * BS)
                t1 = time.monotonic_ns()
                with hist.lock:
                    for b in range(keep, NBLOCKS):
                        hist.writes[tags[f], b].append((t0, t1, ZERO))
                if rnd.random() < 0.3:
                    os.fsync(fds[f])
                    counts["fsync"] += 1
                counts["truncate"] += 1
                time.sleep(0.002)  # pacing, not synchronisation: let the data build up
        finally:
            for fd in fds:
                os.close(fd)

    def churner(seed: int) -> None:
        rnd = random.Random(seed)
        buf = aligned(16 * BS)
        for k in itertools.count():
            if time.monotonic() >= stop:
                return
            tag = 1000 + seed * 100_000 + k
            path = root / f"churn-{seed}-{k}"
            n = rnd.randint(1, 16)
            for i in range(n):
                buf[i * BS:(i + 1) * BS] = stamp(tag, i, 1)
            fd = open_direct(path, os.O_RDWR | os.O_CREAT)
            try:
                assert os.pwrite(fd, memoryview(buf)[: n * BS], 0) == n * BS
                if rnd.random() < 0.2:
                    os.fsync(fd)
                if rnd.random() < 0.5:
                    path.unlink()  # still open: must read back what it holds
                back = aligned(16 * BS)
                assert os.preadv(fd, [memoryview(back)[: n * BS]], 0) == n * BS
                for i in range(n):
                    assert decode(memoryview(back)[i * BS:(i + 1) * BS], tag, i) == 1
                if rnd.random() < 0.5:
                    os.ftruncate(fd, rnd.randrange(n) * BS)
            finally:
                os.close(fd)
            path.unlink(missing_ok=True)
            counts["churn"] += 1

    def run(fn: object, seed: int) -> None:
        try:
            fn(seed)  # type: ignore[operator]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn, seed)) for fn, seed in [
        (writer, 1), (writer, 2), (writer, 3),
        (reader, 4), (reader, 5), (reader, 6), (reader, 7),
        (truncator, 8), (churner, 9), (churner, 10),
    ]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert counts["read"] > 100 and counts["write"] > 100 and counts["churn"] > 5, dict(counts)
    assert counts["truncate"] > 10, dict(counts)
    bad = hist.violations()
    assert not bad, f"{len(bad)} reads saw no state that existed, e.g.:\n" + "\n".join(bad[:5])


def test_the_model_catches_what_it_must() -> None:
    """The checker itself: a stale read, a read from the future, another file's block and
    a torn block are each refused; a read overlapping the write it saw is fine."""
    h = History()
    h.wrote(1, 0, 1, 10, 20, 5)
    h.wrote(1, 0, 1, 30, 40, 6)
    h.read(1, 0, [5], 25, 28)  # between the two writes: fine
    h.read(1, 0, [6], 35, 45)  # overlaps the write of 6: fine
    h.read(1, 0, [5], 35, 45)  # overlaps 6, 5 not yet overwritten for sure: fine
    h.read(1, 0, [ZERO], 5, 15)  # overlaps the first write: zeros still possible
    assert h.violations() == []
    h.read(1, 0, [5], 50, 60)  # 6 completed before this read began: stale
    h.read(1, 0, [6], 21, 29)  # 6 was written only later: from the future
    h.read(1, 0, [ZERO], 22, 29)  # zeros after 5 was acknowledged
    assert len(h.violations()) == 3
    assert decode(stamp(1, 3, 9), 1, 3) == 9
    assert decode(bytes(BS), 1, 3) == ZERO
    for wrong, tag, index in ((stamp(2, 3, 9), 1, 3), (stamp(1, 4, 9), 1, 3),
                              (stamp(1, 3, 9)[: BS // 2] + stamp(1, 3, 8)[BS // 2:], 1, 3),
                              (bytes(BS - 1) + b"x", 1, 3)):
        with pytest.raises((AssertionError, struct.error)):
            decode(wrong, tag, index)
