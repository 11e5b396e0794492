"""Journal timelines: a transaction id is never handed out twice while an older journal block
carrying it can still be read (issue 10, defect 1), and fsck notices a metadata block written
by a transaction of another timeline.

The regression scenario, step by step on the in-memory device: two commits without a barrier
(A: create + write a file, B: set an xattr on another file); the power cut loses A's commit
block but keeps B whole.  Recovery replays nothing (A is incomplete).  After it, C (create +
write another file, the same metadata blocks as A, so the same length) is fsync'd, and the
power is cut again.  If C got A's tid, it ends exactly where B starts and B — stale, from the
lost timeline, with a valid checksum and the next tid — was replayed after it.
"""

from __future__ import annotations

import pytest
from fsutil import ROOT
from memdev import MemDevice

from nexfs.check.checker import Scan, scan
from nexfs.check.repair import Repairer
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk.layout import STATE_DIRTY
from nexfs.ondisk.metablock import BLOCK_SIZE, HEADER, seal_block
from nexfs.store.blockdev import BlockDev
from nexfs.store.store import Store
from nexfs.store.volume import write_superblock
from nexfs.types import CorruptionError


def _fresh() -> MemDevice:
    dev = MemDevice.of_size(16 << 20, 4096)
    FileSystem.format(dev)
    fs = FileSystem.open(dev, atime="noatime")
    fs.create(ROOT_INO, b"other", 0o644, ROOT)
    fs.close()
    return dev


def _crash_losing(dev: MemDevice, lost_block: int) -> MemDevice:
    """The device after a power cut that kept every volatile write except ``lost_block``."""
    image = dict(dev.durable)
    spb = BLOCK_SIZE // dev.sector_size
    for lba, secs in dev.volatile:
        for i, s in enumerate(secs):
            if (lba + i) // spb != lost_block:
                image[lba + i] = s
    return MemDevice(dev.total_sectors, dev.sector_size, sectors=image)


def test_lost_commit_is_not_followed_by_its_stale_successor() -> None:
    dev = _fresh()
    fs = FileSystem.open(dev, atime="noatime")
    jstart = fs.store.geo.journal_start
    a = fs.create(ROOT_INO, b"a", 0o644, ROOT).ino
    fs.write(a, 0, b"A" * 3000, ROOT)
    fs.commit(durable=False)
    len_a = fs.store.journal.head
    other = fs.lookup(ROOT_INO, b"other", ROOT).ino
    fs.setxattr(other, b"user.k", b"v", 0, ROOT)
    fs.commit(durable=False)
    assert fs.store.journal.head > len_a  # B sits right after A
    # Power cut: A's commit block (its last block) is lost, B reached the disk.
    dev1 = _crash_losing(dev, jstart + len_a - 1)
    fs.store.abort()

    fs = FileSystem.open(dev1, atime="noatime")
    head0 = fs.store.journal.head
    c = fs.create(ROOT_INO, b"c", 0o644, ROOT).ino
    fs.write(c, 0, b"C" * 6000, ROOT)
    fs.fsync(c, False)
    assert fs.store.journal.head - head0 == len_a  # C has A's length: the collision case
    dev2 = dev1.crash()  # power cut right after the fsync
    fs.store.abort()

    fs = FileSystem.open(dev2, atime="noatime")
    try:
        names = {n for n, _a, _c in fs.readdir(ROOT_INO, 0)} - {b".", b"..", b"lost+found"}
        assert names == {b"other", b"c"}, names
        attr = fs.lookup(ROOT_INO, b"c", ROOT)
        assert attr.size == 6000, f"fsync'd file c has size {attr.size}, wrote 6000"
        assert fs.read(attr.ino, 0, 10_000) == b"C" * 6000
        assert fs.listxattr(fs.lookup(ROOT_INO, b"other", ROOT).ino, ROOT) == []
        found = scan(fs.store)
        assert found.clean, found.problems
    finally:
        fs.close()


def test_recovery_starts_above_every_tid_the_journal_can_hold() -> None:
    """After an unclean stop the next tid leaves room for every transaction the last
    timeline can have written (each takes at least 3 journal blocks)."""
    dev = _fresh()
    fs = FileSystem.open(dev, atime="noatime")
    first = fs.store.running_tid
    fs.create(ROOT_INO, b"x", 0o644, ROOT)
    fs.commit(durable=True)
    crashed = dev.crash()
    fs.store.abort()
    store = Store.open(crashed)
    try:
        assert store.running_tid >= first + store.geo.journal_len // 3
        assert store.sb.journal_tid == store.running_tid
    finally:
        store.close()


def _timeline_problems(found: Scan) -> list[str]:
    return [p for p in found.problems if "another timeline" in p]


def test_fsck_notices_a_block_from_another_timeline() -> None:
    """A metadata block whose header names a tid newer than the last committed transaction
    was not written by this volume's history: here an attribute block copied back from a
    later copy of the same volume.  Its content is valid on its own (only the value
    differs), so no other check can see it; fsck reports it, and -y rewrites it under the
    current tid."""
    dev = _fresh()
    fs = FileSystem.open(dev, atime="noatime")
    other = fs.lookup(ROOT_INO, b"other", ROOT).ino
    fs.setxattr(other, b"user.k", b"1" * 300, 0, ROOT)
    fs.close()
    past = dev.snapshot()
    fs = FileSystem.open(dev, atime="noatime")
    fs.setxattr(other, b"user.k", b"2" * 300, 0, ROOT)
    fs.close()
    fs = FileSystem.open(past, read_only=True)
    found = scan(fs.store)
    fs.close()
    assert found.clean, found.problems
    xblocks = found.inodes[other].xattr_blocks
    assert xblocks, "the attribute lives in a block of its own"
    for b in xblocks:  # the future's copy of the block, put back home in the past
        past.block_write(b, 1, dev.block_read(b, 1), durable=True)

    fs = FileSystem.open(past, read_only=True)
    try:
        assert fs.getxattr(other, b"user.k", ROOT) == b"2" * 300
        found = scan(fs.store)
        last = fs.store.committed_tid
    finally:
        fs.close()
    problems = _timeline_problems(found)
    assert problems and f"block {xblocks[0]} (attributes of inode {other})" in problems[0], (
        found.problems)
    assert f"newer than the last committed tid {last}" in problems[0]
    assert found.problems == problems  # nothing else could tell

    _repair_and_check_clean(past)


def _repair_and_check_clean(dev: MemDevice) -> None:
    """fsck -y on ``dev``, then the volume must scan clean, as repaired and reopened."""
    store = Store.open(dev)
    try:
        Repairer(store, scan(store), lambda _m: None).run()
        assert scan(store).clean
    finally:
        store.close()
    fs = FileSystem.open(dev, read_only=True)
    try:
        assert scan(fs.store).clean
    finally:
        fs.close()


def test_fsck_timeline_check_covers_state_and_bitmaps() -> None:
    """The state block and the bitmap blocks carry tids too."""
    dev = _fresh()
    store = Store.open(dev, read_only=True)
    committed = store.committed_tid
    geo = store.geo
    seed = store.volume_seed
    store.close()
    for blkno in (1, geo.ibitmap_start, geo.bsummary_start):
        raw = bytearray(dev.block_read(blkno, 1))
        magic, _crc, self_no, owner, _tid = HEADER.unpack_from(raw, 0)
        HEADER.pack_into(raw, 0, magic, 0, self_no, owner, committed + 1000)
        seal_block(memoryview(raw), seed, blkno)
        dev.block_write(blkno, 1, raw, durable=True)
    fs = FileSystem.open(dev, read_only=True)
    try:
        found = scan(fs.store)
    finally:
        fs.close()
    assert found.wrong_timeline == [1, geo.bsummary_start, geo.ibitmap_start], found.problems
    assert len(found.problems) == 3
    _repair_and_check_clean(dev)


def test_no_room_for_a_new_timeline_is_refused_not_written() -> None:
    """A superblock whose journal tid is at the end of its range (a hostile image): the
    restarted sequence could not be recorded, so a writable open refuses it, writing
    nothing, instead of leaving a superblock no later open accepts."""
    dev = _fresh()
    store = Store.open(dev)
    store.sb.journal_tid = (1 << 63) - 2
    store.sb.state = STATE_DIRTY
    write_superblock(BlockDev(dev), store.sb)  # the store's views cannot write superblocks
    store.abort()
    before = dict(dev.sectors)
    with pytest.raises(CorruptionError, match="no room for a new timeline"):
        Store.open(dev)
    assert dev.sectors == before
    Store.open(dev, read_only=True).close()
