"""Device faults in the write-behind path while reads of the same and neighbouring ranges go
on (nexfs/store/writebehind.py, the data path in nexfs/store/store.py).

The rule checked: a read returns, for every byte, the data last written there, or fails
with EIO; never anything else — in particular never what a block held before it was
allocated to the file (another file's data).  The worker's progress is held at the gate of
tests/wbgate.py, so each run replays one chosen interleaving of the request side and the
write-behind thread; faults are injected at every write-behind write index of a workload.
After a fault the volume must end in its error state (read-only, fsync failing), and the
device it leaves behind must open with a clean fsck scan and hold, per file, only data some
version of that file held since its last successful fsync.
"""

from __future__ import annotations

import errno
import os
import random
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest
from fsview import ROOT
from memdev import MemDevice
from wbgate import WorkerGate

import nexfs.store.writebehind as writebehind_module
from nexfs.check.checker import scan
from nexfs.core.attr import SetAttr
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.datacache import SMALL_MAX
from nexfs.types import FsError
from valve import Rights, Valve

MiB = 1024 * 1024
LONG = os.environ.get("NEXFS_LONG") == "1"
BIG = (SMALL_MAX + 16) * BLOCK_SIZE  # a write that goes to the write-behind thread


@pytest.fixture(autouse=True)
def _worker_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate follows one worker thread: keep it from ending while idle mid-test."""
    monkeypatch.setattr(writebehind_module, "IDLE_EXIT", 3600.0)


@contextmanager
def _volume(kind: str, tmp_path: Path, size: int) -> Iterator[Any]:
    """A freshly formatted device: in memory, or a valve capability on an image file."""
    if kind == "memdev":
        dev = MemDevice.of_size(size)
        FileSystem.format(dev)
        yield dev
        return
    img = tmp_path / "vol.img"
    with open(img, "wb") as f:
        f.truncate(size)
    with Valve.open(img) as v:
        cap = v.grant(Rights.READ | Rights.WRITE)
        FileSystem.format(cap)
        yield cap


def _phys(fs: FileSystem, ino: int, lblk: int, count: int) -> list[tuple[int, int, int]]:
    return fs.objects.data(fs.inodes.get(ino)).emap.map(lblk, count)


def _fill(fs: FileSystem, name: bytes, byte: int) -> int:
    """A file of ``byte`` filling the volume (until even one block gets ENOSPC)."""
    ino = fs.create(ROOT_INO, name, 0o644, ROOT).ino
    off = 0
    size = MiB
    while size >= BLOCK_SIZE:
        try:
            off += fs.write(ino, off, bytes([byte]) * size, ROOT)
        except FsError as e:
            assert e.errno == errno.ENOSPC
            size //= 2
    return ino


def test_writes_queued_behind_a_failed_one_never_read_as_another_files_data() -> None:
    """A's blocks are freed and reused by B; B's first write-behind write fails while two
    more are queued behind it.  Reading B before any commit must give B's data or EIO: the
    old code skipped the queued writes without recording them, so the read returned A."""
    dev = MemDevice.of_size(16 * MiB)
    FileSystem.format(dev)
    gate = WorkerGate(dev)
    fs = FileSystem.open(gate)
    gate.install(fs.store.data.write_behind)
    a = fs.create(ROOT_INO, b"a", 0o644, ROOT).ino
    fs.write(a, 0, b"A" * 8 * BIG, ROOT)  # room for B, and for what a write reserves
    a_blocks = {p + i for _l, p, n in _phys(fs, a, 0, 8 * BIG // BLOCK_SIZE) for i in range(n)}
    _fill(fs, b"filler", ord("F"))  # so that B's allocation wraps around to A's blocks
    fs.fsync(a, False)
    fs.unlink(ROOT_INO, b"a", ROOT)
    fs.store.checkpoint()  # A's blocks become allocatable
    b = fs.create(ROOT_INO, b"b", 0o644, ROOT).ino
    gate.fail_at = {gate.worker_writes + 1}
    new = os.urandom(3 * BIG)
    for i in range(3):  # three writes queued: the worker holds the first at the gate
        assert fs.write(b, i * BIG, new[i * BIG : (i + 1) * BIG], ROOT) == BIG
    b_blocks = {p + i for _l, p, n in _phys(fs, b, 0, 3 * BIG // BLOCK_SIZE) for i in range(n)}
    assert b_blocks <= a_blocks, "precondition: B reuses A's blocks"
    # Ranges of the queued writes first: an EIO puts the volume in its error state, whose
    # discarded transaction takes B away.
    for lo, size in ((BIG, BIG), (2 * BIG + 5, 3 * BLOCK_SIZE), (BIG - 1, 2), (0, 3 * BIG)):
        try:
            got = fs.read(b, lo, size)
        except FsError as e:
            assert e.errno == errno.EIO
            break
        assert b"A" * 64 not in got, f"read of {size} at {lo} returned A's deleted data"
        assert got == new[lo : lo + size]
    assert gate.injected == 1
    with pytest.raises(FsError) as failed:
        fs.fsync(ROOT_INO, False)
    assert failed.value.errno == errno.EIO and fs.read_only
    fs.close()


@pytest.mark.parametrize("kind", ["memdev", "image"])
def test_in_flight_check_is_not_fooled_by_the_worker_finishing_a_write(
        kind: str, tmp_path: Path) -> None:
    """One request's data in three extents: three queued writes from one buffer.  While a
    read of the second extent checks what is in flight, the worker finishes the first.  The
    old unlocked check iterated the list the worker was shrinking, skipped the second
    write, and read the device before it landed (the block's previous contents)."""
    with _volume(kind, tmp_path, 32 * MiB) as dev:
        _three_queued_writes_and_a_read(dev)


def _three_queued_writes_and_a_read(dev: Any) -> None:
    gate = WorkerGate(dev)
    fs = FileSystem.open(gate)
    gate.install(fs.store.data.write_behind)
    f = fs.create(ROOT_INO, b"f", 0o644, ROOT).ino
    g = fs.create(ROOT_INO, b"g", 0o644, ROOT).ino
    ext = (SMALL_MAX + 4) * BLOCK_SIZE
    for i in range(3):  # f's extents apart: g's blocks between them
        fs.write(f, i * ext, b"o" * ext, ROOT)
        fs.write(g, i * ext, b"g" * ext, ROOT)
    fs.fsync(f, False)
    runs = _phys(fs, f, 0, 3 * ext // BLOCK_SIZE)
    assert len(runs) == 3, "precondition: three extents"
    new = os.urandom(3 * ext)
    assert fs.write(f, 0, new, ROOT) == 3 * ext  # three writes queued, the first held
    first = runs[0][1]
    fired: list[bool] = []

    def after_first(frame: object) -> bool:
        # The check has looked at the first write and moves on: let the worker finish it.
        if fired or getattr(frame, "f_locals", {}).get("b") != first:
            return False
        fired.append(True)
        return True

    with gate.preempt(after_first):
        got = fs.read(f, ext, ext)
    assert got == new[ext : 2 * ext], "the read returned the block's old contents"
    fs.close()


def test_a_buffer_is_not_handed_out_while_a_write_from_it_is_in_flight() -> None:
    """Two files written in turn, equal data in every other request buffer.  The pool found
    a buffer's index with ``list.index``, which compares by value: a bytearray buffer (the
    in-memory device's) equal to an earlier one had its write booked on that one, and was
    handed out again while its own write was still queued."""
    dev = MemDevice.of_size(32 * MiB)
    FileSystem.format(dev)
    gate = WorkerGate(dev)
    fs = FileSystem.open(gate)
    gate.install(fs.store.data.write_behind)
    f = fs.create(ROOT_INO, b"f", 0o644, ROOT).ino
    g = fs.create(ROOT_INO, b"g", 0o644, ROOT).ino
    ext = (SMALL_MAX + 4) * BLOCK_SIZE
    for i in range(3):  # the worker holds the first write: the others queue behind it
        fs.write(f, i * ext, b"o" * ext, ROOT)
        fs.write(g, i * ext, b"g" * ext, ROOT)
    fs.fsync(f, False)
    assert fs.read(f, 0, 3 * ext) == b"o" * 3 * ext
    assert fs.read(g, 0, 3 * ext) == b"g" * 3 * ext
    fs.close()


# -- the explorer ------------------------------------------------------------------------------

NAMES = (b"f0", b"f1", b"f2")
SIZES = (1, 700, BLOCK_SIZE, 3 * BLOCK_SIZE + 5, (SMALL_MAX + 1) * BLOCK_SIZE,
         40 * BLOCK_SIZE + 123, 130 * BLOCK_SIZE, 260 * BLOCK_SIZE - 7)
SPAN = 768 * 1024  # write offsets: files overlap their own earlier writes often


class Op:
    """One step of a workload, drawn before any run so every run replays the same steps."""

    def __init__(self, kind: str, name: bytes = b"", lo: int = 0, size: int = 0,
                 data: bytes = b"", steps: int = 0, preempt: float = 0.0) -> None:
        self.kind, self.name, self.lo, self.size = kind, name, lo, size
        self.data, self.steps, self.preempt = data, steps, preempt

    def __repr__(self) -> str:
        return f"{self.kind}({self.name.decode()}, {self.lo}, {self.size})"


def _plan(seed: int, nops: int) -> list[Op]:
    rng = random.Random(seed)
    last: dict[bytes, tuple[int, int]] = {}
    recent: list[tuple[bytes, int, int]] = []
    ops: list[Op] = []
    for _ in range(nops):
        name = rng.choice(NAMES)
        preempt = rng.choice((0.0, 0.0, 0.05, 0.2, 0.5))
        r = rng.random()
        if r < 0.38:
            size = rng.choice(SIZES)
            # Anywhere, block-aligned, or over the start of the file's last write: large
            # writes over earlier ones span several extents, each its own queued write.
            back = rng.randrange(3) * 17 * BLOCK_SIZE
            lo = rng.choice((rng.randrange(SPAN), rng.randrange(SPAN // BLOCK_SIZE) * BLOCK_SIZE,
                             max(0, last.get(name, (0, 0))[0] - back)))
            last[name] = (lo, size)
            recent = [*recent[-3:], (name, lo, size)]
            # Mostly random bytes; zeros and one repeated byte too (whole buffers alike).
            fill = rng.random()
            data = (rng.randbytes(size) if fill < 0.7 else bytes(size) if fill < 0.9
                    else bytes([rng.randrange(1, 256)]) * size)
            ops.append(Op("write", name, lo, size, data, preempt=preempt))
            if rng.random() < 0.4:  # read back at once: the worker is still on it
                part = rng.choice((0, size // 2, size - 1))
                ops.append(Op("read", name, lo + part, size - part,
                              preempt=rng.choice((0.0, 0.1, 0.3, 0.5))))
        elif r < 0.72:
            # The same range as one of the last few writes (of any file: one queued
            # behind another), or one next to it, or anywhere.
            if recent and rng.random() < 0.7:
                name, w_lo, w_size = rng.choice(recent)
            else:
                w_lo, w_size = last.get(name, (0, BLOCK_SIZE))
            lo = max(0, w_lo + rng.choice((0, 0, -BLOCK_SIZE, -1, 1, w_size - 1, w_size,
                                           w_size + BLOCK_SIZE - 1, -w_size)))
            if rng.random() < 0.2:
                lo = rng.randrange(SPAN)
            size = rng.choice((1, 2, BLOCK_SIZE, w_size, w_size + 2 * BLOCK_SIZE, 300_000))
            kind = "read-beside-worker" if rng.random() < 0.25 else "read"
            ops.append(Op(kind, name, lo, size, steps=rng.randrange(1, 4), preempt=preempt))
        elif r < 0.80:
            ops.append(Op("step", steps=rng.randrange(1, 4)))
        elif r < 0.86:
            ops.append(Op("fsync", name, preempt=preempt))
        elif r < 0.90:
            ops.append(Op("unlink", name))
        elif r < 0.94:
            ops.append(Op("truncate", name, size=rng.randrange(SPAN)))
        else:
            ops.append(Op("commit", preempt=preempt))
    return ops


class Model:
    """What each file holds now, and every version it had since the last successful fsync
    (what a remount, or the volume after its error state discarded the running
    transaction, may show)."""

    def __init__(self) -> None:
        self.cur: dict[bytes, bytearray | None] = dict.fromkeys(NAMES)
        self.since_sync: dict[bytes, list[bytes | None]] = {n: [None] for n in NAMES}

    def changed(self, name: bytes) -> None:
        v = self.cur[name]
        self.since_sync[name].append(None if v is None else bytes(v))

    def synced(self) -> None:
        for n in NAMES:
            v = self.cur[n]
            self.since_sync[n] = [None if v is None else bytes(v)]


def _apply_write(cur: bytearray, lo: int, data: bytes) -> None:
    if lo > len(cur):
        cur.extend(bytes(lo - len(cur)))
    cur[lo : lo + len(data)] = data


def _check_strict(model: Model, op: Op, got: bytes) -> None:
    cur = model.cur[op.name]
    assert cur is not None
    want = bytes(cur[op.lo : op.lo + op.size])
    if got != want:
        at = next((i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y),
                  min(len(got), len(want)))
        raise AssertionError(f"{op}: {len(got)} bytes, expected {len(want)}; first "
                             f"difference at byte {op.lo + at} (block {(op.lo + at) // 4096})")


def _check_lenient(versions: list[bytes | None], lo: int, got: bytes, what: str) -> None:
    """Every byte is the one some version held there (or zero: a hole, a cut-off tail)."""
    present = [v for v in versions if v is not None]
    assert present or not got, f"{what}: data from a file that had no version"
    assert any(len(got) <= max(0, len(v) - lo) for v in present) or not got, (
        f"{what}: longer than any version")
    for i in range(0, len(got), BLOCK_SIZE):
        chunk = got[i : i + BLOCK_SIZE]
        if chunk == bytes(len(chunk)) or any(v[lo + i : lo + i + len(chunk)] == chunk
                                             for v in present):
            continue
        for j, byte in enumerate(chunk):
            pos = lo + i + j
            if byte and not any(pos < len(v) and v[pos] == byte for v in present):
                raise AssertionError(f"{what}: byte {pos} (block {pos // BLOCK_SIZE}) is "
                                     f"{byte:#x}, which no version of the file held there")


CACHE_BLOCKS = 24
"""Metadata cache of the explorer's volumes: small, so that commits checkpoint often."""


class Explorer:
    """One run of a plan against a device, with the given faults (see the module
    docstring for what it checks)."""

    def __init__(self, dev: Any, plan: list[Op], gate: WorkerGate, seed: int) -> None:
        self.dev = dev
        self.plan = plan
        self.gate = gate
        self.rng = random.Random(seed)
        self.model = Model()
        self.fs = FileSystem.open(gate, cache_blocks=CACHE_BLOCKS)
        gate.install(self.fs.store.data.write_behind)
        self.reads = self.eio = 0

    def _ino(self, name: bytes) -> int:
        return self.fs.lookup(ROOT_INO, name, ROOT).ino

    def _read(self, op: Op, beside_worker: bool) -> bytes:
        ino = self._ino(op.name)
        if not beside_worker:
            return self.fs.read(ino, op.lo, op.size)
        # The read runs on a second thread while this one lets the worker go on: the
        # request side and the worker really run at once (the core itself only ever has
        # one caller at a time, as under the mount).
        out: list[bytes | BaseException] = []

        def reader() -> None:
            try:
                out.append(self.fs.read(ino, op.lo, op.size))
            except BaseException as e:  # handed to the main thread
                out.append(e)

        t = threading.Thread(target=reader)
        t.start()
        for _ in range(op.steps):
            self.gate.step()
        t.join()
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def run(self) -> None:
        fs, model = self.fs, self.model
        for n, op in enumerate(self.plan):
            errored = fs.store.error is not None
            ctx = self.gate.at_random(self.rng, op.preempt) if op.preempt else nullcontext()
            try:
                with ctx:
                    self._do(op, errored)
            except FsError as e:
                if not errored:
                    assert e.errno == errno.EIO, f"op {n} {op}: {e!r}"
                    assert fs.read_only, f"op {n} {op}: EIO without the error state"
                    self.eio += 1
                    if op.kind == "write" and model.cur[op.name] is not None:
                        # It may have written part of its data: a version to allow.
                        tried = bytearray(model.cur[op.name] or b"")
                        _apply_write(tried, op.lo, op.data)
                        model.since_sync[op.name].append(bytes(tried))
                else:
                    assert e.errno in (errno.EIO, errno.EROFS, errno.ENOENT), (
                        f"op {n} {op} after the error state: {e!r}")

    def _do(self, op: Op, errored: bool) -> None:
        fs, model = self.fs, self.model
        cur = model.cur.get(op.name)
        if op.kind == "write":
            if cur is None:
                fs.create(ROOT_INO, op.name, 0o644, ROOT)
                cur = model.cur[op.name] = bytearray()
                model.changed(op.name)
            assert fs.write(self._ino(op.name), op.lo, op.data, ROOT) == op.size
            _apply_write(cur, op.lo, op.data)
            model.changed(op.name)
        elif op.kind in ("read", "read-beside-worker"):
            if cur is None and not errored:
                return
            got = self._read(op, op.kind != "read")
            self.reads += 1
            if fs.store.error is None:
                _check_strict(model, op, got)
            else:
                _check_lenient(model.since_sync[op.name], op.lo, got, f"{op} (error state)")
        elif op.kind == "step":
            for _ in range(op.steps):
                self.gate.step()
        elif op.kind == "fsync":
            fs.fsync(ROOT_INO, False)
            assert not errored, "fsync succeeded after the error state"
            model.synced()
        elif op.kind == "unlink" and cur is not None:
            fs.unlink(ROOT_INO, op.name, ROOT)
            model.cur[op.name] = None
            model.changed(op.name)
        elif op.kind == "truncate" and cur is not None:
            fs.setattr(self._ino(op.name), SetAttr(size=op.size), ROOT)
            del cur[op.size :]
            cur.extend(bytes(op.size - len(cur)))
            model.changed(op.name)
        elif op.kind == "commit":
            # What the mount's timer does.  With the small metadata cache a commit also
            # checkpoints, so blocks freed earlier become allocatable: later writes reuse
            # other files' old blocks.  (Not store.checkpoint() directly: a failure there
            # would bypass the FileSystem's handling, which re-reads its inodes.)
            fs.commit(durable=False)

    def finish(self) -> None:
        """Close; the volume must be in its error state exactly when a fault was injected."""
        fs = self.fs
        try:
            fs.close()
        except FsError as e:
            assert e.errno == errno.EIO, repr(e)
        if self.gate.injected:
            with pytest.raises(FsError) as failed:
                fs.fsync(ROOT_INO, False)
            assert failed.value.errno == errno.EIO, "fsync after a fault must fail"
            assert fs.store.error is not None, "an injected fault left no error state"
        else:
            assert fs.store.error is None and self.eio == 0, fs.store.error


def check_remounted(dev: Any, model: Model, how: str) -> None:
    """The device as it was left: opens, fsck's scan is clean, and each file holds (byte
    for byte) what one of its versions since the last successful fsync held."""
    fs = FileSystem.open(dev)
    try:
        found = scan(fs.store)
        assert found.clean, f"remounted {how}: {found.problems[:5]}"
        for name in NAMES:
            versions = model.since_sync[name]
            try:
                ino = fs.lookup(ROOT_INO, name, ROOT).ino
            except FsError as e:
                assert e.errno == errno.ENOENT
                assert None in versions, f"remounted {how}: {name!r} is gone"
                continue
            got = fs.read(ino, 0, 4 * SPAN)
            assert any(v is not None and len(v) == len(got) for v in versions), (
                f"remounted {how}: {name!r} has {len(got)} bytes, no version had")
            _check_lenient(versions, 0, got, f"remounted {how}: {name!r}")
    finally:
        fs.close()


def _explore(kind: str, tmp_path: Path, plan: list[Op], seed: int, **faults: Any) -> Explorer:
    """One run of ``plan``; checks everything, remounts included.  Returns the explorer
    (its gate says how many write-behind writes there were, and how many faults fired)."""
    switch = sys.getswitchinterval()
    with _volume(kind, tmp_path, 24 * MiB) as dev:
        ex = Explorer(dev, plan, WorkerGate(dev, **faults), seed)
        if faults.get("free"):
            sys.setswitchinterval(1e-5)
        try:
            ex.run()
        finally:
            sys.setswitchinterval(switch)
        ex.finish()
        if kind == "memdev":
            check_remounted(dev.snapshot(), ex.model, "as left")
            check_remounted(dev.crash(), ex.model, "after a power cut")
        else:
            check_remounted(dev, ex.model, "as left")
        return ex


SEEDS = range(40) if LONG else range(3)
IMAGE_SEEDS = range(10) if LONG else range(2)  # the valve: slower, fewer


@pytest.mark.parametrize("kind", ["memdev", "image"])
def test_explore_interleavings_without_faults(kind: str, tmp_path: Path) -> None:
    """Reads of the same and neighbouring ranges at every kind of point of the worker's
    progress, no fault: every read is exactly the last write."""
    reads = 0
    for seed in SEEDS if kind == "memdev" else IMAGE_SEEDS:
        ex = _explore(kind, tmp_path, _plan(seed, 120), seed)
        reads += ex.reads
    print(f"{kind}: {reads} reads checked")


@pytest.mark.parametrize("kind", ["memdev", "image"])
def test_explore_a_fault_at_every_write_behind_write(kind: str, tmp_path: Path) -> None:
    """For each write-behind write of a workload: a run where exactly that write fails
    (and, for every third, where it is cut short: its first half written); then a few runs
    with random sets of failing writes, with a dead device from some write on, and with
    one failing device write of any kind."""
    seeds = SEEDS if kind == "memdev" else IMAGE_SEEDS
    runs = faults = eio_reads = 0
    for seed in seeds:
        plan = _plan(seed, 90)
        dry = _explore(kind, tmp_path, plan, seed).gate
        total = dry.worker_writes
        assert total >= 8, f"seed {seed}: only {total} write-behind writes"
        cases: list[dict[str, Any]] = []
        for n in range(1, total + 1):
            cases.append({"fail_at": {n}})
            if n % 3 == 0:
                cases.append({"short_at": {n}})
        rng = random.Random(seed)
        for _ in range(4):
            cases.append({"fail_at": set(rng.sample(range(1, total + 1), 3))})
        cases.append({"fail_at": {rng.randrange(1, total + 1)}, "sticky": True})
        # Any device write too (journal, metadata, data cache flushes): the same oracle.
        for n in rng.sample(range(1, dry.writes + 1), min(dry.writes, 30 if LONG else 6)):
            cases.append({"fail_any_at": {n}})
        # And the worker not held at all: the scheduler decides (switching threads often).
        for _ in range(2):
            cases.append({"fail_at": {rng.randrange(1, total + 1)}, "free": True})
        for case in cases:
            ex = _explore(kind, tmp_path, plan, seed, **case)
            runs += 1
            faults += ex.gate.injected
            eio_reads += ex.eio
    print(f"{kind}: {runs} runs, {faults} injected faults, {eio_reads} ops failed with EIO")


def _at_lines(rng: random.Random, upto: int) -> Any:
    """A preempt rule: the worker finishes a write at one or two of the first ``upto``
    traced lines (chosen at random; a read runs about 20 lines of write-behind code)."""
    at = set(rng.sample(range(upto), rng.choice((1, 1, 2))))
    seen = [0]

    def when(frame: object) -> bool:
        seen[0] += 1
        return seen[0] - 1 in at

    return when


@pytest.mark.parametrize("kind", ["memdev", "image"])
def test_explore_reads_racing_the_worker(kind: str, tmp_path: Path) -> None:
    """Files in interleaved extents; a large overwrite of several of them queues one write
    per extent; reads of parts of it and of its neighbours, each with the worker finishing
    one write at a random line of the request side's write-behind code (and sometimes at
    a random number of further points).  Every read must be exactly the last write."""
    rounds = 0
    for seed in range(20 if LONG else 4):
        rng = random.Random(seed)
        with _volume(kind, tmp_path, 24 * MiB) as dev:
            gate = WorkerGate(dev)
            fs = FileSystem.open(gate)
            gate.install(fs.store.data.write_behind)
            f = fs.create(ROOT_INO, b"f", 0o644, ROOT).ino
            g = fs.create(ROOT_INO, b"g", 0o644, ROOT).ino
            model = bytearray()
            for _ in range(10):  # f's extents with g's in between
                chunk = rng.randbytes(rng.randrange(SMALL_MAX + 1, 60) * BLOCK_SIZE)
                fs.write(f, len(model), chunk, ROOT)
                model += chunk
                fs.write(g, 0, chunk, ROOT)
                fs.write(g, 10 * MiB + len(model), chunk, ROOT)
            for _ in range(25 if LONG else 12):
                lo = rng.randrange(len(model) // BLOCK_SIZE - 40) * BLOCK_SIZE
                lo += rng.choice((0, 0, rng.randrange(BLOCK_SIZE)))
                size = min(len(model) - lo, rng.randrange(40, 200) * BLOCK_SIZE)
                data = rng.randbytes(size) if rng.random() < 0.8 else bytes(size)
                if rng.random() < 0.8:
                    # Mostly with nothing else queued: the worker's next write is then the
                    # first of this request's, the list a reader looks at the one it shrinks.
                    gate.steps_until_idle()
                assert fs.write(f, lo, data, ROOT) == size
                model[lo : lo + size] = data
                for _ in range(4):
                    r_lo = max(0, lo + rng.randrange(-2 * BLOCK_SIZE, size))
                    r_size = rng.choice((1, BLOCK_SIZE, 3 * BLOCK_SIZE, 40 * BLOCK_SIZE))
                    with gate.preempt(_at_lines(rng, 24)):
                        got = fs.read(f, r_lo, r_size)
                    want = bytes(model[r_lo : r_lo + r_size])
                    assert got == want, (f"seed {seed}: read of {r_size} at {r_lo} is not the "
                                         f"last write")
                    rounds += 1
                for _ in range(rng.randrange(3)):
                    gate.step()
                if rng.random() < 0.2:
                    fs.fsync(f, False)
            fs.close()
    print(f"{kind}: {rounds} racing reads checked")
