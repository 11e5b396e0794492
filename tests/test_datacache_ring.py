"""The data cache's flush with its writes in flight on a valve ring (nexfs/store/datacache.py).

Two explorers of the same flush:

* on a real image through the valve and an io_uring ring: random sets of dirty blocks
  (scattered, in runs, longer than a run and than a batch, rewritten between flushes), with
  small batch limits so that every limit is reached; after each flush the device must hold
  exactly the model's blocks and nothing may be dirty or in flight;
* on a fake ring that fails chosen writes at completion and a device view that refuses
  chosen ones at submit: the first error is raised, a block is clean exactly when its own
  write completed, nothing is left in flight, and no buffer slot is refilled while the write
  from it is in flight (the fake ring compares each write's bytes at submit and at
  completion).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store import datacache
from nexfs.store.blockdev import BlockDev
from nexfs.store.datacache import DataCache
from valve import Rights, Valve

SEEDS = 200 if os.environ.get("NEXFS_LONG") else 24
NBLOCKS = 4096  # a 16 MiB image


def _dirty_set(rnd: random.Random, limit: int) -> list[int]:
    """Block numbers to write: scattered ones and runs of every length up to past RUN_MAX."""
    out: set[int] = set()
    for _ in range(rnd.randrange(1, 40)):
        start = rnd.randrange(limit)
        n = rnd.choice((1, 1, 1, 2, 3, 17, 300))
        out.update(range(start, min(limit, start + n)))
    return sorted(out)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_ring_flush_writes_exactly_the_dirty_blocks(tmp_path: Path, seed: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(seed)
    monkeypatch.setattr(datacache, "FLUSH_BLOCKS", rnd.choice((8, 64, 1024)))
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate(NBLOCKS * BLOCK_SIZE)
    model = bytearray(NBLOCKS * BLOCK_SIZE)
    with Valve.open(img) as v:
        bdev = BlockDev(v.grant(Rights.READ | Rights.WRITE))
        ring = v.ring(rnd.choice((1, 4, 64)))
        cache = DataCache(bdev, capacity=NBLOCKS, dirty_limit=NBLOCKS)
        cache.attach_ring(ring)
        for _round in range(4):
            for b in _dirty_set(rnd, NBLOCKS):
                data = rnd.randbytes(BLOCK_SIZE)
                model[b * BLOCK_SIZE : (b + 1) * BLOCK_SIZE] = data
                cache.write(b, 1, data)
            cache.flush()
            assert cache.dirty_count == 0
            assert ring.in_flight == 0
            assert bytes(bdev.read_blocks(0, NBLOCKS)) == bytes(model), seed


class _Completion(NamedTuple):
    tag: int
    error: OSError | None
    view: Any


class _FakeRing:
    """A ring whose writes complete at the next reap; a write that covers a block of
    ``bad`` fails."""

    def __init__(self, depth: int, bad: set[int]) -> None:
        self.depth = depth
        self.bad = bad
        self.pending: dict[int, tuple[int, int, memoryview, bytes]] = {}
        self.tags = 0
        self.torn: list[int] = []
        self.outcome: dict[tuple[int, int], bool] = {}  # (blkno, count) -> written

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def reap(self, wait: int = 0) -> list[_Completion]:
        assert 0 < wait <= len(self.pending), "a reap that could block for ever"
        done = []
        for tag, (blkno, count, view, snapshot) in list(self.pending.items()):
            if bytes(view) != snapshot:
                self.torn.append(blkno)  # the buffer changed under the write
            ok = not self.bad.intersection(range(blkno, blkno + count))
            self.outcome[blkno, count] = ok
            error = None if ok else OSError(5, f"write at {blkno} failed")
            done.append(_Completion(tag, error, None))
            del self.pending[tag]
        return done


class _FakeDev:
    """What the flush needs of a BlockDev: ``alloc`` and ``write_async`` (refusing a write
    that covers a block of ``refused``, as the valve refuses at submit)."""

    def __init__(self, refused: set[int]) -> None:
        self.refused = refused
        self.data: dict[int, bytes] = {}

    def alloc(self, nblocks: int) -> memoryview:
        return memoryview(bytearray(nblocks * BLOCK_SIZE))

    def write_async(self, blkno: int, count: int, data: memoryview, ring: _FakeRing) -> int:
        if self.refused.intersection(range(blkno, blkno + count)):
            raise PermissionError(1, f"write at {blkno} refused")
        assert ring.in_flight < ring.depth, "more writes in flight than the ring's depth"
        assert data.nbytes == count * BLOCK_SIZE
        ring.tags += 1
        ring.pending[ring.tags] = (blkno, count, data, bytes(data))
        for i in range(count):
            self.data[blkno + i] = bytes(data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
        return ring.tags


@pytest.mark.parametrize("seed", range(SEEDS * 4))
def test_ring_flush_failures_leave_exactly_the_failed_blocks_dirty(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(seed)
    monkeypatch.setattr(datacache, "FLUSH_BLOCKS", rnd.choice((4, 32, 1024)))
    blocks = _dirty_set(rnd, 512)
    bad = set(rnd.sample(blocks, min(len(blocks), rnd.choice((0, 1, 3)))))
    refused = set(rnd.sample(blocks, min(len(blocks), rnd.choice((0, 0, 1)))))
    ring = _FakeRing(rnd.choice((1, 3, 64)), bad)
    dev = _FakeDev(refused)
    cache = DataCache(dev, capacity=4096, dirty_limit=4096)  # type: ignore[arg-type]
    cache.attach_ring(ring)
    contents = {b: rnd.randbytes(BLOCK_SIZE) for b in blocks}
    for b in blocks:
        cache.write(b, 1, contents[b])
    raised: OSError | None = None
    try:
        cache.flush()
    except OSError as exc:
        raised = exc
    assert ring.in_flight == 0, "a write left in flight"
    assert not ring.torn, f"buffer refilled under the writes at {ring.torn}"
    written = {b for (b0, n), ok in ring.outcome.items() if ok for b in range(b0, b0 + n)}
    failed = {b for (b0, n), ok in ring.outcome.items() if not ok for b in range(b0, b0 + n)}
    dirty = {b for b in blocks if cache.is_dirty(b)}
    assert written.isdisjoint(dirty), "a block written is still dirty"
    assert dirty == set(blocks) - written, "a block not written was marked clean"
    assert failed <= dirty
    for b in written:
        assert dev.data[b] == contents[b], (seed, b)
    if bad & set(blocks) and not refused:
        assert raised is not None and raised.errno == 5, raised
    if refused:
        assert raised is not None, "a refused write went unreported"
    if raised is None:
        assert not dirty
