"""The data path's caches: the data cache (nexfs/store/datacache.py) and write-behind
(nexfs/store/writebehind.py), in process on the in-memory device and on a real image through the
valve.  What is checked: reads always see the latest write; ordered data (every data block a
commit points at is on the device before the commit block); dirty data never outlives
memory bounds; device errors of deferred writes reach fsync; a crash loses only what was
never made durable."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
from faultdev import FaultDevice
from fsview import ROOT
from memdev import MemDevice

from nexfs.check.checker import scan
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.blockdev import BlockDev
from nexfs.store.datacache import SMALL_MAX, DataCache
from nexfs.store.store import Store
from nexfs.store.writebehind import WriteBehind
from nexfs.types import FsError
from valve import Rights, Valve

MiB = 1024 * 1024


def _fresh(size: int = 64 * MiB) -> MemDevice:
    dev = MemDevice.of_size(size)
    FileSystem.format(dev)
    return dev


def _block(byte: int) -> bytes:
    return bytes([byte]) * BLOCK_SIZE


# -- the data cache alone ----------------------------------------------------------------------


def test_cache_serves_latest_and_flushes_sorted_runs() -> None:
    dev = MemDevice.of_size(8 * MiB)
    bdev = BlockDev(dev)
    cache = DataCache(bdev, capacity=64, dirty_limit=32)
    for b in (20, 10, 11, 12, 30):
        cache.write(b, 1, _block(b))
    assert dev.writes == 0 and cache.dirty_count == 5
    out = memoryview(bytearray(3 * BLOCK_SIZE))
    cache.read(10, 3, out)
    assert bytes(out) == _block(10) + _block(11) + _block(12)
    assert dev.reads == 0  # all three from memory
    cache.flush()
    # 10-12 leave as one write, 20 and 30 alone: three writes, in block order.
    assert dev.writes == 3 and cache.dirty_count == 0
    assert bytes(bdev.read_blocks(11, 1)) == _block(11)


def test_flushed_cache_data_still_needs_a_barrier() -> None:
    """A commit with no metadata writes the cached data but no barrier: fsync must still
    issue one (the store's bookkeeping of written-but-not-durable data)."""
    dev = _fresh()
    store = Store.open(dev)
    start, _ = store.alloc_data(None, 1)
    store.commit()
    store.data.write(start, 1, _block(7))  # cached
    store.checkpoint()  # a barrier while the block is still only in the cache
    writes, barriers = dev.writes, dev.barriers
    store.commit(durable=False)  # nothing to commit: only the cached block is written
    assert dev.writes == writes + 1 and dev.barriers == barriers
    assert store.needs_barrier
    store.sync()
    assert dev.barriers == barriers + 1 and not store.needs_barrier
    store.close()


def test_cache_bounds_dirty_and_total_blocks() -> None:
    dev = MemDevice.of_size(8 * MiB)
    cache = DataCache(BlockDev(dev), capacity=32, dirty_limit=8)
    for b in range(100, 140):
        cache.write(b, 1, _block(b % 251))
        assert cache.dirty_count <= 8
        assert len(cache) <= 32
    cache.flush()
    bdev = BlockDev(dev)
    for b in range(100, 140):
        assert bytes(bdev.read_blocks(b, 1)) == _block(b % 251)


def test_large_read_overlays_dirty_blocks_and_discard_forgets() -> None:
    dev = MemDevice.of_size(8 * MiB)
    bdev = BlockDev(dev)
    bdev.write_blocks(200, SMALL_MAX + 4, _block(1) * (SMALL_MAX + 4))
    cache = DataCache(bdev, capacity=64)
    cache.write(205, 1, _block(9))
    out = memoryview(bytearray((SMALL_MAX + 4) * BLOCK_SIZE))
    cache.read(200, SMALL_MAX + 4, out)
    assert bytes(out[5 * BLOCK_SIZE : 6 * BLOCK_SIZE]) == _block(9)
    assert bytes(out[:BLOCK_SIZE]) == _block(1)
    cache.discard(205, 1)  # freed: the dirty copy must never be written
    cache.flush()
    assert bytes(bdev.read_blocks(205, 1)) == _block(1)


# -- write-behind alone ------------------------------------------------------------------------


def test_write_behind_writes_in_order_and_reports_errors() -> None:
    dev = FaultDevice(MemDevice.of_size(8 * MiB))
    bdev = BlockDev(dev)
    wb = WriteBehind(bdev, nbuffers=2, buffer_bytes=4 * BLOCK_SIZE)
    try:
        for value in (1, 2, 3):  # three writes of the same blocks through two buffers
            buf = wb.buffer(4 * BLOCK_SIZE)
            buf[:] = _block(value) * 4
            assert wb.submit(300, 4, buf)
        wb.wait_overlapping(300, 1)
        assert bytes(bdev.read_blocks(300, 4)) == _block(3) * 4  # the last one won
        assert not wb.submit(300, 1, bytearray(BLOCK_SIZE))  # not a pool buffer
        dev.fail_write(1)
        buf = wb.buffer(BLOCK_SIZE)
        buf[:] = _block(7)
        assert wb.submit(310, 1, buf)
        with pytest.raises(OSError) as exc:
            wb.wait_all()
        assert exc.value.errno == errno.EIO
        wb.wait_all()  # reported once
    finally:
        wb.close()


# -- through the filesystem --------------------------------------------------------------------


@pytest.mark.parametrize("cache_blocks", [64, 0], ids=["cache", "no-cache"])
def test_fs_mixed_sizes_read_back_before_and_after_remount(cache_blocks: int) -> None:
    """Random small and large writes and overwrites against a model, read back at random
    moments (cache hits, in-flight writes), then after a clean remount; also with the data
    cache off (mount option data_cache=0)."""
    dev = _fresh()
    fs = FileSystem.open(dev, data_cache_blocks=cache_blocks)
    rng = random.Random(5)
    ino = fs.create(ROOT_INO, b"f", 0o644, ROOT).ino
    model = bytearray()
    for step in range(300):
        size = rng.choice((1, 100, BLOCK_SIZE, 3 * BLOCK_SIZE + 5, 40 * BLOCK_SIZE,
                           256 * BLOCK_SIZE))
        offset = rng.randrange(0, 2 * MiB)
        data = rng.randbytes(size)
        assert fs.write(ino, offset, data, ROOT) == size
        if offset > len(model):
            model.extend(bytes(offset - len(model)))
        model[offset : offset + size] = data
        if step % 7 == 0:
            lo = rng.randrange(0, len(model))
            assert fs.read(ino, lo, 300_000) == bytes(model[lo : lo + 300_000])
        if step % 50 == 0:
            fs.fsync(ino, False)
    fs.close()
    fs = FileSystem.open(dev)
    try:
        assert fs.read(ino, 0, len(model) + 10) == bytes(model)
        assert scan(fs.store).clean
    finally:
        fs.close()


def test_crash_keeps_exactly_what_fsync_promised() -> None:
    dev = _fresh()
    fs = FileSystem.open(dev)
    kept = fs.create(ROOT_INO, b"kept", 0o644, ROOT).ino
    fs.write(kept, 0, b"k" * 10_000, ROOT)  # small: held by the data cache
    fs.write(kept, 10_000, b"K" * (SMALL_MAX + 1) * BLOCK_SIZE, ROOT)  # large: write-behind
    fs.fsync(kept, False)
    fs.write(kept, 0, b"n" * 5000, ROOT)  # after the fsync: may be lost, not required
    fs.store.abort()
    fs = FileSystem.open(dev.crash())
    try:
        data = fs.read(kept, 0, 1 << 20)
        assert data[5000:10_000] == b"k" * 5000
        assert data[10_000:] == b"K" * (SMALL_MAX + 1) * BLOCK_SIZE
        assert data[:5000] in (b"k" * 5000, b"n" * 5000)
        assert scan(fs.store).clean
    finally:
        fs.close()


def test_commit_block_follows_the_data_it_points_at() -> None:
    """Ordered data with deferred writes: every data block a commit makes reachable is
    already on the device (volatile is fine: the commit's barrier covers it) when the
    commit block is written."""
    dev = _fresh()
    fs = FileSystem.open(dev)
    writes: list[tuple[int, bytes]] = []
    inner_write = dev.block_write

    def recording(lba: int, count: int, data: object, *, durable: bool = False) -> None:
        inner_write(lba, count, data, durable=durable)
        writes.append((lba, bytes(memoryview(data).cast("B")[:16])))  # type: ignore[arg-type]

    dev.block_write = recording  # type: ignore[method-assign]
    ino = fs.create(ROOT_INO, b"f", 0o644, ROOT).ino
    fs.write(ino, 0, b"A" * 6000, ROOT)
    fs.write(ino, 1 << 20, b"B" * (SMALL_MAX + 2) * BLOCK_SIZE, ROOT)
    fs.fsync(ino, False)
    spb = BLOCK_SIZE // dev.sector_size
    jstart = fs.store.geo.journal_start * spb
    jend = jstart + fs.store.geo.journal_len * spb
    first_journal = next(i for i, (lba, _) in enumerate(writes) if jstart <= lba < jend)
    data_writes = [i for i, (_lba, head) in enumerate(writes) if head[:1] in (b"A", b"B")]
    assert len(data_writes) == 2 and max(data_writes) < first_journal
    fs.close()


def test_deferred_write_error_reaches_fsync_on_a_real_image(tmp_path: Path) -> None:
    img = tmp_path / "vol.img"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
    with Valve.open(img) as v:
        FileSystem.format(v.grant(Rights.READ | Rights.WRITE))
        dev = FaultDevice(v.grant(Rights.READ | Rights.WRITE))
        fs = FileSystem.open(dev)
        ino = fs.create(ROOT_INO, b"f", 0o644, ROOT).ino
        fs.fsync(ino, False)
        dev.fail_write(1)
        big = os.urandom((SMALL_MAX + 8) * BLOCK_SIZE)
        assert fs.write(ino, 0, big, ROOT) == len(big)  # answered before the device wrote
        with pytest.raises(FsError) as failed_read:  # never the stale blocks, silently
            fs.read(ino, 0, len(big))
        assert failed_read.value.errno == errno.EIO
        with pytest.raises(FsError) as exc:
            fs.fsync(ino, False)
        assert exc.value.errno == errno.EIO and fs.read_only
        fs.close()


def test_every_lookup_counts_as_a_hit_or_a_miss() -> None:
    """The hit rate ``nexfs stats`` shows is hits / (hits + misses): every block a small read
    looked up is one or the other, also for reads in flight (read_cached), whose missing
    blocks come from the device without filling the cache.  Only large reads, which never
    look, count as bypassed."""
    rng = random.Random(7)
    dev = MemDevice.of_size(8 * MiB)
    cache = DataCache(BlockDev(dev), capacity=64, dirty_limit=32)
    looked = 0
    for _ in range(200):
        blkno, count = rng.randrange(0, 256), rng.randint(1, 4)
        out = memoryview(bytearray(count * BLOCK_SIZE))
        if rng.random() < 0.5:
            cache.read(blkno, count, out)
        else:
            cache.read_cached(blkno, count, out)
        looked += count
        assert cache.hits + cache.misses == looked
    assert cache.hits > 0 and cache.misses > 0
    big = SMALL_MAX + 1
    cache.read(0, big, memoryview(bytearray(big * BLOCK_SIZE)))
    assert cache.hits + cache.misses == looked and cache.bypassed == big
