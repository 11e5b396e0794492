"""The short path of the hot requests (native/hotpath.c, nexfs/store/datacache.py) against
the plain Python it replaced, by random exploration.

Two explorers, seeded, a few seconds by default and ``NEXFS_LONG=1`` for many more seeds:

* **The cache alone.**  The C data cache (``DataCache``) and the Python cache it replaced
  (tests/datacache_model.py, ``ModelCache``: an ``OrderedDict`` of bytearrays) run the same
  random sequence of small and large reads, reads in flight (``read_cached``), writes,
  discards, flushes, clears and short-path reads and writes over random extent maps (holes,
  blocks outside the data area), each over its own in-memory device.  After every step:
  every byte read is equal, and so are the cache's blocks in LRU order, the dirty set, the
  hit and miss counters and the device's contents; the short path's answer is the model's
  (served exactly when every block is mapped and cached, or mapped, in the area and needing
  no flush).
* **Through the filesystem.**  Two volumes take the same random writes (aligned and not,
  small and large, into holes, past the end), reads (the adapter's order: the short path
  first, the general path when it declines), truncates, hole punches, unlinks and new files
  reusing freed blocks, fsyncs and commits: one with the short path, one with it switched off
  (the general Python path only).  Every read is compared byte for byte with the other volume
  and with a byte model of each file, and the data caches' blocks, LRU order and dirty bits
  are equal after every step.  This is what catches a stale packed extent map (a read
  served from blocks the file no longer owns).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest
from datacache_model import ModelCache
from fsview import ROOT
from memdev import MemDevice

from nexfs.check.checker import scan
from nexfs.core.attr import SetAttr
from nexfs.core.filedata import FileData
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.blockdev import BlockDev
from nexfs.store.datacache import HOT_BLOCKS, SMALL_MAX, DataCache, Extents

T = TypeVar("T")
LONG = bool(os.environ.get("NEXFS_LONG"))
MiB = 1 << 20
NBLOCKS = 512  # the cache explorer's device: 2 MiB


# -- the cache alone ---------------------------------------------------------------------------


def _random_extents(rng: random.Random) -> list[tuple[int, int, int]]:
    """A file's extents: sorted, not overlapping, holes between, physical runs anywhere on
    the device (blocks 0..NBLOCKS), some of them past ``hi`` (outside the "data area")."""
    out: list[tuple[int, int, int]] = []
    lblk = rng.randrange(0, 3)
    for _ in range(rng.randint(0, 6)):
        n = rng.randint(1, 12)
        out.append((lblk, rng.randrange(1, NBLOCKS - n), n))
        lblk += n + rng.choice((0, 0, 1, 3))
    return out


def _map(extents: list[tuple[int, int, int]], lblk: int) -> int:
    for lb, p, n in extents:
        if lb <= lblk < lb + n:
            return p + lblk - lb
    return 0


def _model_read_hot(m: ModelCache, extents: list[tuple[int, int, int]], lblk: int,
                    count: int) -> bytes | None:
    """What the short read must do, on the model: all mapped and cached -> hits, in order."""
    if count > HOT_BLOCKS:
        return None
    phys = [_map(extents, lblk + k) for k in range(count)]
    if not all(p and p in m._blocks for p in phys):
        return None
    out = b""
    for p in phys:
        m._blocks.move_to_end(p)
        out += bytes(m._blocks[p])
    m.hits += count
    return out


def _model_write_hot(m: ModelCache, extents: list[tuple[int, int, int]], lblk: int,
                     count: int, data: bytes, lo: int, hi: int, slots: int) -> bool:
    """What the short write must do, on the model: every block mapped into [lo, hi), no
    flush needed, room for the new blocks -> the model's own write."""
    if not 0 < count <= SMALL_MAX:
        return False
    phys = [_map(extents, lblk + k) for k in range(count)]
    if not all(p and lo <= p < hi for p in phys):
        return False
    fresh = sum(1 for p in phys if p not in m._blocks)
    new_dirty = sum(1 for p in phys if p not in m._dirty)
    if len(m._dirty) + new_dirty > m.dirty_limit or len(m._blocks) + fresh > slots:
        return False
    k = 0
    while k < count:  # one write per extent's part, as the general path
        lb, _p, n = next(e for e in extents if e[0] <= lblk + k < e[0] + e[2])
        j = min(count, lb + n - lblk)
        m.write(phys[k], j - k, data[k * BLOCK_SIZE : j * BLOCK_SIZE])
        k = j
    return True


def _same_state(c: DataCache, m: ModelCache, cdev: MemDevice, mdev: MemDevice,
                where: str) -> None:
    assert c.cached_blocks() == list(m._blocks), where
    assert c.dirty_blocks() == sorted(m._dirty), where
    assert (c.hits, c.misses, c.bypassed) == (m.hits, m.misses, m.bypassed), where
    for b in m._blocks:
        assert bytes(c.block(b) or b"") == bytes(m._blocks[b]), (where, b)
    assert cdev.image_bytes() == mdev.image_bytes(), where


def _explore_cache(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    capacity = rng.choice((8, 24, 64))
    dirty_limit = rng.choice((None, 4, capacity))
    devs = (MemDevice.of_size(NBLOCKS * BLOCK_SIZE), MemDevice.of_size(NBLOCKS * BLOCK_SIZE))
    init = rng.randbytes(NBLOCKS * BLOCK_SIZE)
    for d in devs:
        BlockDev(d).write_blocks(0, NBLOCKS, init)
    cbdev, mbdev = BlockDev(devs[0]), BlockDev(devs[1])
    c = DataCache(cbdev, capacity=capacity, dirty_limit=dirty_limit)
    m = ModelCache(mbdev, capacity=capacity, dirty_limit=dirty_limit)
    slots = capacity + SMALL_MAX  # the C cache's arena (SLACK)
    extents = _random_extents(rng)
    packed = Extents(extents)
    lo, hi = 1, NBLOCKS - rng.choice((0, 40))
    for step in range(steps):
        where = f"seed {seed} step {step}"
        op = rng.random()
        count = rng.choice((1, 1, 1, 2, 3, SMALL_MAX, SMALL_MAX + 1, 40))
        blkno = rng.randrange(1, NBLOCKS - count)
        if op < 0.2:
            cout = memoryview(bytearray(count * BLOCK_SIZE))
            mout = memoryview(bytearray(count * BLOCK_SIZE))
            c.read(blkno, count, cout)
            m.read(blkno, count, mout)
            assert bytes(cout) == bytes(mout), where
        elif op < 0.3:
            cout = memoryview(bytearray(count * BLOCK_SIZE))
            mout = memoryview(bytearray(count * BLOCK_SIZE))
            got = c.read_cached(blkno, count, cout)
            assert got == m.read_cached(blkno, count, mout), where
            for i, j in got:  # what a read in flight fetches, not cached
                cbdev.read_blocks(blkno + i, j - i, cout[i * BLOCK_SIZE : j * BLOCK_SIZE])
                mbdev.read_blocks(blkno + i, j - i, mout[i * BLOCK_SIZE : j * BLOCK_SIZE])
            assert bytes(cout) == bytes(mout), where
        elif op < 0.45:
            data = rng.randbytes(count * BLOCK_SIZE)
            if c.takes(count):
                c.write(blkno, count, data)
                m.write(blkno, count, data)
            else:  # a large write: the data path's order (drop the copies, then write)
                for cache, bdev in ((c, cbdev), (m, mbdev)):
                    cache.discard(blkno, count)
                    bdev.write_blocks(blkno, count, data)
        elif op < 0.52:
            n = rng.choice((1, 5, 100, 1000))
            c.discard(blkno, n)
            m.discard(blkno, n)
        elif op < 0.56:
            c.flush()
            m.flush()
        elif op < 0.57:
            c.clear()
            m.clear()
        elif op < 0.6:
            extents = _random_extents(rng)
            packed = Extents(extents)
        elif op < 0.8:
            lblk = rng.randrange(0, 40)
            n = rng.choice((1, 1, 2, 4, HOT_BLOCKS, HOT_BLOCKS + 1))
            want = _model_read_hot(m, extents, lblk, n)
            hot = c.read_hot(packed, lblk, n, 0, n * BLOCK_SIZE)
            assert (None if hot is None else bytes(hot)) == want, where
        else:
            lblk = rng.randrange(0, 40)
            n = rng.choice((1, 1, 2, 4, SMALL_MAX, SMALL_MAX + 1))
            data = rng.randbytes(n * BLOCK_SIZE)
            want_w = _model_write_hot(m, extents, lblk, n, data, lo, hi, slots)
            assert c.write_hot(packed, lblk, n, data, lo, hi) == want_w, where
        _same_state(c, m, devs[0], devs[1], where)


CACHE_SEEDS = range(200) if LONG else range(12)


@pytest.mark.parametrize("seed", CACHE_SEEDS)
def test_c_cache_matches_the_python_cache(seed: int) -> None:
    _explore_cache(seed, 1500 if LONG else 400)


# -- through the filesystem --------------------------------------------------------------------


@contextmanager
def _no_short_path() -> Iterator[None]:
    """The general path only: FileData never has packed extents (so read_hot and the short
    write decline every request)."""
    mp = pytest.MonkeyPatch()
    # The packed copy is then never current, so it is never used either.
    mp.setattr(FileData, "_extents", lambda self: None)
    try:
        yield
    finally:
        mp.undo()


def _read(fs: FileSystem, ino: int, offset: int, size: int) -> bytes:
    """A READ as the adapter serves it: the short path first, then the general path."""
    hot = fs.read_hot(ino, offset, size)
    if hot is not None:
        return bytes(hot)
    return fs.read(ino, offset, size)


def _cache_state(fs: FileSystem) -> tuple[list[int], list[int], int, int]:
    cache = fs.store.data._cache
    return cache.cached_blocks(), cache.dirty_blocks(), cache.hits, cache.misses


def _punch(fs: FileSystem, ino: int, offset: int, length: int) -> None:
    fs.objects.data(fs.inodes.get(ino)).punch_hole(offset, length)


def _checkpoint(fs: FileSystem) -> None:
    fs.commit(durable=False)
    fs.store.checkpoint()


class _Volume:
    """One volume of the filesystem explorer; ``short`` says whether its short path is on."""

    def __init__(self, short: bool, cache_blocks: int) -> None:
        self.short = short
        self.dev = MemDevice.of_size(64 * MiB)
        FileSystem.format(self.dev)
        self.fs = FileSystem.open(self.dev, data_cache_blocks=cache_blocks)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.short:
            return fn(self.fs, *args)
        with _no_short_path():
            return fn(self.fs, *args)


def _explore_fs(seed: int, steps: int) -> int:
    """Returns how many reads the short path served (the explorer must exercise it)."""
    rng = random.Random(seed)
    cache_blocks = rng.choice((48, 256))
    vols = (_Volume(True, cache_blocks), _Volume(False, cache_blocks))
    files: dict[bytes, tuple[int, bytearray]] = {}
    names = [b"a", b"b", b"c"]
    served = 0
    for name in names:
        inos = {v.fs.create(ROOT_INO, name, 0o644, ROOT).ino for v in vols}
        assert len(inos) == 1
        files[name] = (inos.pop(), bytearray())
    try:
        for step in range(steps):
            where = f"seed {seed} step {step}"
            name = rng.choice(names)
            ino, model = files[name]
            op = rng.random()
            if op < 0.3:
                if rng.random() < 0.6 and len(model) >= BLOCK_SIZE:
                    # An aligned overwrite inside the file: the short write's case.
                    n = rng.choice((1, 1, 2, SMALL_MAX))
                    lblk = rng.randrange(0, max(1, len(model) // BLOCK_SIZE - n + 1))
                    offset, size = lblk * BLOCK_SIZE, n * BLOCK_SIZE
                else:
                    offset = rng.choice((rng.randrange(0, 300_000),
                                         rng.randrange(0, 40) * BLOCK_SIZE))
                    size = rng.choice((1, 100, BLOCK_SIZE, 3 * BLOCK_SIZE + 5,
                                       (SMALL_MAX + 3) * BLOCK_SIZE))
                data = rng.randbytes(size)
                for v in vols:
                    assert v.run(FileSystem.write, ino, offset, data, ROOT) == size, where
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + size] = data
            elif op < 0.75:
                if model and rng.random() < 0.8:
                    offset = rng.randrange(0, len(model))
                    if rng.random() < 0.6:
                        offset -= offset % BLOCK_SIZE
                else:
                    offset = rng.randrange(0, 400_000)
                size = rng.choice((1, 700, BLOCK_SIZE, 2 * BLOCK_SIZE, 128 * 1024, 300_000))
                want = bytes(model[offset : offset + size])
                hot = vols[0].fs.read_hot(ino, offset, size)
                served += hot is not None
                got = [bytes(hot) if hot is not None else vols[0].fs.read(ino, offset, size),
                       vols[1].run(_read, ino, offset, size)]
                assert got[0] == want, where
                assert got[1] == want, where
            elif op < 0.82:
                size = rng.choice((0, 1, 5000, rng.randrange(0, 300_000), len(model) + 9000))
                for v in vols:
                    v.run(FileSystem.setattr, ino, SetAttr(size=size), ROOT)
                del model[size:]
                model.extend(bytes(size - len(model)))
            elif op < 0.87:
                offset = rng.randrange(0, max(1, len(model)))
                length = rng.choice((BLOCK_SIZE, 3 * BLOCK_SIZE, 50_000))
                for v in vols:
                    v.run(_punch, ino, offset, length)
                first = -(-offset // BLOCK_SIZE) * BLOCK_SIZE
                end = min((offset + length) // BLOCK_SIZE * BLOCK_SIZE, len(model))
                if end > first:
                    model[first:end] = bytes(end - first)
            elif op < 0.92:
                # Unlink and create again: the file's blocks are freed, and reused after the
                # next checkpoint by whichever file allocates next.
                new = set()
                for v in vols:
                    v.run(FileSystem.unlink, ROOT_INO, name, ROOT)
                    new.add(v.run(FileSystem.create, ROOT_INO, name, 0o644, ROOT).ino)
                assert len(new) == 1, where
                files[name] = (new.pop(), bytearray())
            elif op < 0.95:
                for v in vols:
                    v.run(FileSystem.fsync, ino, False)
            else:
                # A checkpoint: the blocks freed so far may be allocated again, to any file.
                for v in vols:
                    v.run(_checkpoint)
            assert _cache_state(vols[0].fs) == _cache_state(vols[1].fs), where
        for v in vols:
            for ino, model in files.values():
                assert v.run(_read, ino, 0, len(model) + 1) == bytes(model), seed
            v.fs.commit()
            assert scan(v.fs.store).clean, seed
    finally:
        for v in vols:
            v.fs.close()
    return served


FS_SEEDS = range(300) if LONG else range(24)


@pytest.mark.parametrize("seed", FS_SEEDS)
def test_short_path_reads_what_the_general_path_reads(seed: int) -> None:
    served = _explore_fs(seed, 1500 if LONG else 350)
    assert served > 0  # the short path was taken, not only declined
