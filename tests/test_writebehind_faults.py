"""Device faults in the write-behind path while reads of the same and neighbouring ranges go
on (nexfs/writebehind.py, the data path in nexfs/store.py).

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
from pathlib import Path

import pytest
from fsview import ROOT
from memdev import MemDevice
from wbgate import WorkerGate

import nexfs.writebehind as writebehind_module
from nexfs.checker import scan
from nexfs.datacache import SMALL_MAX
from nexfs.fs import ROOT_INO, FileSystem
from nexfs.metastore import BLOCK_SIZE
from nexfs.types import FsError
from valve import Rights, Valve

MiB = 1024 * 1024
LONG = os.environ.get("NEXFS_LONG") == "1"
BIG = (SMALL_MAX + 16) * BLOCK_SIZE  # a write that goes to the write-behind thread


@pytest.fixture(autouse=True)
def _worker_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate follows one worker thread: keep it from ending while idle mid-test."""
    monkeypatch.setattr(writebehind_module, "IDLE_EXIT", 3600.0)


def _phys(fs: FileSystem, ino: int, lblk: int, count: int) -> list[tuple[int, int, int]]:
    return fs._data(fs.inodes.get(ino)).emap.map(lblk, count)


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
    gate.install(fs.store._wb)
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
        fs.fsync(b, False)
    assert failed.value.errno == errno.EIO and fs.read_only
    fs.close()
