"""Random 4 KiB O_DIRECT writes through a real mount: what fsync promised survives kill -9.

The mount runs with a small data cache (512 KiB: a flush every 64 dirty blocks), so the
writes below go through many flushes on the data cache's ring (nexfs/store/datacache.py),
overwrites take the short path that touches the inode instead of writing its record, and
the commits write the touched records (nexfs/core/inode_cache.py).  After an fsync the
writer keeps writing, then the daemon is killed.  The remounted file must hold, block by
block, the fsync'd contents or a later write of that block, and its size and mtime must be
at least what ``fstat`` showed at the fsync; fsck must be clean after the replay.
"""

from __future__ import annotations

import mmap
import os
import random

import pytest
from mountutil import Mounter, fsck, mounter_fixture  # noqa: F401

pytestmark = pytest.mark.mount

BS = 4096
NBLOCKS = 1024  # a 4 MiB file
SYNCED_WRITES = 3000
LATER_WRITES = 300


def _write(fd: int, buf: mmap.mmap, blkno: int, data: bytes) -> None:
    buf.seek(0)
    buf.write(data)
    assert os.pwrite(fd, memoryview(buf)[: len(data)], blkno * BS) == len(data)


@pytest.mark.parametrize("seed", [1, 2])
def test_fsynced_direct_writes_survive_kill_9(mounter: Mounter, seed: int) -> None:
    rnd = random.Random(seed)
    image = mounter.image()
    mnt = mounter.mountpoint()
    m = mounter.mount(image, mnt, options=["data_cache=512K"])
    path = mnt / "f"
    synced = [rnd.randbytes(BS) for _ in range(NBLOCKS)]
    buf = mmap.mmap(-1, 64 * BS)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        for first in range(0, NBLOCKS, 64):
            _write(fd, buf, first, b"".join(synced[first : first + 64]))
        for _ in range(SYNCED_WRITES):
            b = rnd.randrange(NBLOCKS)
            n = min(rnd.choice((1, 1, 1, 2, 5)), NBLOCKS - b)  # scattered, and short runs
            data = rnd.randbytes(n * BS)
            _write(fd, buf, b, data)
            for i in range(n):
                synced[b + i] = data[i * BS : (i + 1) * BS]
        os.fsync(fd)
        at_fsync = os.fstat(fd)
        later: dict[int, list[bytes]] = {}
        for _ in range(LATER_WRITES):
            b = rnd.randrange(NBLOCKS)
            data = rnd.randbytes(BS)
            _write(fd, buf, b, data)
            later.setdefault(b, []).append(data)
    finally:
        os.close(fd)
    m.kill()

    again = mounter.mount(image, mnt)
    st = os.stat(path)
    assert st.st_size == NBLOCKS * BS
    assert st.st_mtime_ns >= at_fsync.st_mtime_ns, (st.st_mtime_ns, at_fsync.st_mtime_ns)
    got = path.read_bytes()
    wrong = [b for b in range(NBLOCKS)
             if got[b * BS : (b + 1) * BS] not in (synced[b], *later.get(b, ()))]
    assert not wrong, f"{len(wrong)} blocks hold neither the fsync'd data nor a later write: " \
                      f"{wrong[:10]}"
    assert again.unmount() == 0
    code, out = fsck(image)
    assert code == 0, out
