"""The data cache as it was in Python (an ``OrderedDict`` of bytearrays), kept as the model
the C cache (nexfs/store/datacache.py over native/hotpath.c) is compared with block for
block, LRU order and dirty bits included (tests/test_hotpath.py).  Its ring flush is left
out (tests/test_datacache_ring.py checks the C cache's), and so are the counters' stats
plumbing; the short path's two calls are modelled in tests/test_hotpath.py on top of it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.blockdev import RUN_MAX, copy_filler, write_runs

if TYPE_CHECKING:
    from nexfs.store.blockdev import BlockDev

SMALL_MAX = 16
"""Requests of at most this many blocks (64 KiB) go through the cache."""

DEFAULT_BLOCKS = 16384
"""Default capacity: 64 MiB of data."""


class ModelCache:
    """Physical block number -> 4 KiB of file data, least recently used first."""

    def __init__(self, bdev: BlockDev, capacity: int = DEFAULT_BLOCKS,
                 dirty_limit: int | None = None) -> None:
        if capacity < 0:
            raise ValueError("negative data cache size")
        self._bdev = bdev
        self.capacity = capacity
        self.dirty_limit = capacity // 2 if dirty_limit is None else min(dirty_limit, capacity)
        self._blocks: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: set[int] = set()
        self._flush_buf: memoryview | None = None
        # Blocks read from memory, from the device through the cache, and past the cache
        # (large reads): ``nexfs stats``.
        self.hits = self.misses = self.bypassed = 0

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    # -- reading -----------------------------------------------------------------------------

    def read(self, blkno: int, count: int, into: memoryview) -> None:
        """Fill ``into`` (``count`` blocks) with blocks ``blkno..``: cached blocks from
        memory, the rest from the device (and, for small reads, into the cache)."""
        blocks = self._blocks
        if not self.takes(count):
            self.bypassed += count
            self._bdev.read_blocks(blkno, count, into)
            if self._dirty:
                for i in range(count):
                    if blkno + i in self._dirty:
                        into[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = blocks[blkno + i]
            return
        for i, j in self._copy_hits(blkno, count, into):
            self.misses += j - i
            part = into[i * BLOCK_SIZE : j * BLOCK_SIZE]
            self._bdev.read_blocks(blkno + i, j - i, part)
            for k in range(i, j):
                blocks[blkno + k] = bytearray(into[k * BLOCK_SIZE : (k + 1) * BLOCK_SIZE])
        self._evict()

    def read_cached(self, blkno: int, count: int, into: memoryview) -> list[tuple[int, int]]:
        """Copy the cached blocks among ``blkno..`` into ``into``; returns the runs
        ``(first index, end index)`` left to read from the device.  Nothing is read here and
        nothing is filled in (the device reads are in flight: nexfs/store/inflight.py).  The
        blocks left were looked up and not found: misses, for the hit rate of ``nexfs
        stats`` (only large reads, which never look, are ``bypassed``)."""
        blocks = self._blocks
        if not blocks:
            self.misses += count
            return [(0, count)]
        missing = self._copy_hits(blkno, count, into)
        self.misses += sum(j - i for i, j in missing)
        return missing

    def _copy_hits(self, blkno: int, count: int, into: memoryview) -> list[tuple[int, int]]:
        """Copy the cached blocks among ``blkno..`` into ``into`` (counted as hits); returns
        the runs ``(first index, end index)`` that are not cached."""
        blocks = self._blocks
        missing: list[tuple[int, int]] = []
        i = 0
        while i < count:
            data = blocks.get(blkno + i)
            if data is not None:
                blocks.move_to_end(blkno + i)
                into[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = data
                self.hits += 1
                i += 1
                continue
            j = i + 1
            while j < count and blkno + j not in blocks:
                j += 1
            missing.append((i, j))
            i = j
        return missing

    # -- writing -----------------------------------------------------------------------------

    def takes(self, count: int) -> bool:
        """Whether a write of ``count`` blocks goes into the cache (else the caller writes
        it to the device and drops the blocks with :meth:`discard`)."""
        return 0 < count <= SMALL_MAX and self.capacity > 0

    def write(self, blkno: int, count: int, data: Any) -> None:
        """Cache a write of ``count`` blocks (:meth:`takes` said yes), dirty."""
        blocks = self._blocks
        if isinstance(data, list | tuple):
            data = b"".join(data)
        view = memoryview(data).cast("B")
        for i in range(count):
            b = blkno + i
            blocks[b] = bytearray(view[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
            blocks.move_to_end(b)
            self._dirty.add(b)
        if len(self._dirty) > self.dirty_limit:
            self.flush()
        self._evict()

    def discard(self, blkno: int, count: int) -> None:
        """Blocks freed (or about to be overwritten on the device): forget them."""
        blocks = self._blocks
        if not blocks:
            return
        end = blkno + count
        if count <= len(blocks):
            for b in range(blkno, end):
                if blocks.pop(b, None) is not None:
                    self._dirty.discard(b)
        else:
            for b in [b for b in blocks if blkno <= b < end]:
                del blocks[b]
                self._dirty.discard(b)

    def flush(self) -> None:
        """Write every dirty block, in block order, neighbours together (no barrier: the
        store makes them durable with its next barrier or commit)."""
        if not self._dirty:
            return
        order = sorted(self._dirty)
        if self._flush_buf is None:
            self._flush_buf = self._bdev.alloc(RUN_MAX)
        done = 0

        def written(n: int) -> None:
            # Clean from here on: a failure in a later run leaves only later blocks dirty.
            nonlocal done
            self._dirty.difference_update(order[done : done + n])
            done += n

        write_runs(self._bdev, [(b, copy_filler(self._blocks[b])) for b in order],
                   durable=False, progress=written, buf=self._flush_buf)

    def clear(self) -> None:
        """Forget everything, dirty blocks included (the store entered its error state)."""
        self._blocks.clear()
        self._dirty.clear()

    def _evict(self) -> None:
        """Drop least recently used clean blocks down to ``capacity`` (never writes: dirty
        blocks are bounded by ``dirty_limit`` and leave only through :meth:`flush`)."""
        blocks = self._blocks
        dirty = self._dirty
        while len(blocks) > self.capacity and len(blocks) > len(dirty):
            b, data = blocks.popitem(last=False)
            if b in dirty:
                blocks[b] = data
