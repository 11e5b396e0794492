"""Every commit carries the times and sizes of every write completed before it.

No operation writes its inode back at its end any more: a changed inode is marked dirty, and
its record is written just before the store's next commit (nexfs/core/inode_cache.py).
What must stay exactly true: whatever commits -- an fsync, the mount's timer, a commit a
later operation triggers because its transaction grew large -- the committed inodes are the
ones the filesystem shows at that moment.

The explorer runs random writes (overwrites, appends, writes past the end, into holes, by a
non-owner of a set-ID file), truncates, time changes, creates and unlinks on a few files,
in process on the in-memory device, and commits at random in the three ways.  At each
commit it rebuilds the device as a crash right then would leave it (after an fsync: only
what a barrier made durable; after any other commit: every write landed) and compares what
the reopened volume shows for every file -- size, mode, mtime, ctime, blocks -- with what the
live filesystem showed.  A second test checks that an inode changed by a write outlives
the inode cache's LRU until it is written.
"""

from __future__ import annotations

import os
import random

import pytest
from fsutil import ROOT, USER
from memdev import MemDevice

from nexfs.core.attr import SetAttr
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.store.store import Store

SEEDS = 120 if os.environ.get("NEXFS_LONG") else 12
STEPS = 90
BS = 4096


def _attrs(fs: FileSystem, files: dict[str, int]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for name, ino in files.items():
        a = fs.getattr(ino)
        out[name] = (a.size, a.mode, a.mtime_ns, a.ctime_ns, a.blocks, a.uid)
    return out


@pytest.mark.parametrize("seed", range(SEEDS))
def test_every_commit_holds_the_times_of_every_write_before_it(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(seed)
    dev = MemDevice.of_size(32 << 20)
    FileSystem.format(dev)
    fs = FileSystem.open(dev, cache_blocks=256)
    files: dict[str, int] = {}
    checks: list[tuple[str, MemDevice, dict[str, tuple[int, ...]]]] = []
    # A later operation's own commit (its transaction grew large), at random.
    real_should = Store.should_commit
    monkeypatch.setattr(Store, "should_commit",
                        lambda self: rnd.random() < 0.1 or real_should(self))
    real_commit = Store.commit

    def commit(self: Store, durable: bool = True) -> int:
        tid = real_commit(self, durable)
        # After the commit returned: a crash now keeps it (all of it once durable).
        checks.append(("durable" if durable else "commit",
                       dev.crash() if durable else dev.snapshot(), _attrs(fs, files)))
        return tid

    monkeypatch.setattr(Store, "commit", commit)
    serial = 0
    for _ in range(STEPS):
        if len(files) < 2 or rnd.random() < 0.05:
            serial += 1
            name = f"f{serial}"
            files[name] = fs.create(ROOT_INO, name.encode(), 0o100666, ROOT).ino
        name = rnd.choice(sorted(files))
        ino = files[name]
        size = fs.getattr(ino).size
        op = rnd.random()
        who = rnd.choice((ROOT, USER))
        if op < 0.5:  # an overwrite inside the file: only the times change
            off = rnd.randrange(max(1, size))
            n = min(rnd.choice((1, 100, BS, 3 * BS)), max(1, size - off))
            fs.write(ino, off, rnd.randbytes(n), who)
        elif op < 0.65:  # past the end: appends, gaps, holes
            off = size + rnd.choice((0, 0, 10, 5 * BS))
            fs.write(ino, off, rnd.randbytes(rnd.choice((1, BS, 20 * BS))), who)
        elif op < 0.72:
            fs.setattr(ino, SetAttr(size=rnd.randrange(size + 2 * BS)), ROOT)
        elif op < 0.79:
            fs.setattr(ino, SetAttr(mtime_ns=rnd.randrange(1 << 60)), ROOT)
        elif op < 0.85:  # set-ID bits a non-root write must clear
            fs.setattr(ino, SetAttr(mode=0o106777), ROOT)
        elif op < 0.88 and len(files) > 2:
            del files[name]  # before: the unlink may commit
            fs.unlink(ROOT_INO, name.encode(), ROOT)
        # And a commit of the other two kinds now and then.
        c = rnd.random()
        if c < 0.1:
            fs.fsync(rnd.choice(list(files.values())), rnd.random() < 0.5)
        elif c < 0.2:
            fs.commit(durable=False)
    fs.fsync(next(iter(files.values())), False)
    monkeypatch.undo()  # the reopened volumes below commit too
    assert len(checks) > 10, len(checks)
    fs.close()
    for i, (kind, image, expect) in enumerate(checks):
        again = FileSystem.open(image)
        try:
            for name, want in expect.items():
                ino = again.lookup(ROOT_INO, name.encode(), ROOT).ino
                a = again.getattr(ino)
                got = (a.size, a.mode, a.mtime_ns, a.ctime_ns, a.blocks, a.uid)
                assert got == want, (f"seed {seed}, commit {i} ({kind}), {name}: "
                                     f"(size, mode, mtime, ctime, blocks, uid) {got} != {want}")
        finally:
            again.close()


def test_an_inode_changed_by_a_write_is_not_evicted_before_it_is_written() -> None:
    dev = MemDevice.of_size(32 << 20)
    FileSystem.format(dev)
    fs = FileSystem.open(dev)
    fs.inodes.limit = 4
    ino = fs.create(ROOT_INO, b"f", 0o100644, ROOT).ino
    fs.write(ino, 0, b"x" * BS, ROOT)
    fs.setattr(ino, SetAttr(mtime_ns=1), ROOT)  # the record's mtime: not the write's
    fs.commit()
    fs.write(ino, 0, b"y" * BS, ROOT)  # dirty: its record is not written yet
    want = fs.getattr(ino)
    for i in range(20):  # push it out of the LRU, were it evictable
        fs.create(ROOT_INO, f"g{i}".encode(), 0o100644, ROOT)
    assert want.mtime_ns > 1
    assert fs.getattr(ino) == want
    fs.fsync(ino, False)
    fs.close()
    again = FileSystem.open(dev.crash())
    assert again.getattr(ino).mtime_ns == want.mtime_ns
    again.close()
