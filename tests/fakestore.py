"""An in-memory :class:`nexfs.ondisk.metablock.MetaStore` for unit tests of the trees.

It is strict where the real store may be lenient, so bugs in its users surface here:

* :meth:`FakeStore.flush` encodes every dirty block, keeps only the bytes, and drops the
  decoded object from the cache, so the next :meth:`get` decodes what ``encode`` wrote: every
  change is round-tripped through the on-disk format.
* Live blocks are counted (:attr:`live`) so tests can assert that ``destroy`` leaks nothing;
  double frees, use after free and dirtying an object the cache does not hold (a stale copy
  whose changes would be lost) raise ``AssertionError``.
* ``cache_limit`` evicts clean blocks (least recently used first, never the
  :attr:`FakeStore.PINNED_RECENT` newest) to mimic a bounded cache.
* Freed blocks become reusable only after the next flush, as with the real journal.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from nexfs.ondisk import checksum
from nexfs.ondisk.metablock import BLOCK_SIZE, MetaBlock
from nexfs.types import BlockNo, FsError, InodeNo

M = TypeVar("M", bound=MetaBlock)

_ZERO_BLOCK = bytes(BLOCK_SIZE)


class FakeStore:
    """Blocks in dicts; see the module docstring for what it checks."""

    PINNED_RECENT = 40  # > 2 x the B+tree depth limit: a path plus a sibling per level

    def __init__(self, nblocks: int = 1 << 20, cache_limit: int | None = None,
                 first_block: int = 16, uuid: bytes = b"nexfs-test-uuid!") -> None:
        self.volume_seed = checksum.uuid_seed(uuid)
        self.nblocks = nblocks
        self.cache_limit = cache_limit
        self.tid = 1
        self.disk: dict[int, bytes] = {}
        self.cache: OrderedDict[int, MetaBlock] = OrderedDict()
        self.dirty_set: set[int] = set()
        self.allocated: set[int] = set()
        self._next = first_block
        self._reusable: list[int] = []
        self._pending_free: set[int] = set()
        self.stats = {"get": 0, "decode": 0, "alloc": 0, "free": 0, "encode": 0}

    # --------------------------------------------------------------- MetaStore protocol

    def get(self, blkno: BlockNo, decode: Callable[[BlockNo, memoryview], M]) -> M:
        self.stats["get"] += 1
        if blkno in self.cache:
            self.cache.move_to_end(blkno)
            return self.cache[blkno]  # type: ignore[return-value]
        if not 0 < blkno < self.nblocks:
            raise AssertionError(f"get of block {blkno} outside the volume")
        if blkno in self._pending_free:
            raise AssertionError(f"use after free of block {blkno}")
        raw = self.disk.get(blkno, _ZERO_BLOCK)
        self.stats["decode"] += 1
        block = decode(blkno, memoryview(raw).toreadonly())
        self.cache[blkno] = block
        self._evict()
        return block

    def put_new(self, block: MetaBlock) -> None:
        assert block.blkno in self.allocated, f"put_new of unallocated block {block.blkno}"
        assert block.blkno not in self.cache, f"put_new of cached block {block.blkno}"
        self.cache[block.blkno] = block
        self.dirty_set.add(block.blkno)
        self._evict()

    def dirty(self, block: MetaBlock) -> None:
        held = self.cache.get(block.blkno)
        assert held is block, f"dirty() of block {block.blkno} not held by the cache (stale copy)"
        self.dirty_set.add(block.blkno)

    def alloc_meta(self, goal: BlockNo | None, owner: InodeNo) -> BlockNo:
        if self._reusable:
            blk = self._reusable.pop()
        elif self._next < self.nblocks:
            blk = self._next
            self._next += 1
        else:
            raise FsError(28, "fake store full")  # ENOSPC
        self.allocated.add(blk)
        self.stats["alloc"] += 1
        return BlockNo(blk)

    def free_meta(self, blkno: BlockNo) -> None:
        assert blkno in self.allocated, f"free of unallocated block {blkno} (double free?)"
        self.allocated.discard(blkno)
        self.cache.pop(blkno, None)
        self.dirty_set.discard(blkno)
        self.disk.pop(blkno, None)
        self._pending_free.add(blkno)
        self.stats["free"] += 1

    # --------------------------------------------------------------- test helpers

    @property
    def live(self) -> int:
        """Blocks allocated and not freed."""
        return len(self.allocated)

    def flush(self) -> int:
        """Commit: encode dirty blocks to bytes and drop their decoded objects; returns the
        number of blocks written."""
        n = 0
        buf = bytearray(BLOCK_SIZE)
        for blkno in sorted(self.dirty_set):
            block = self.cache.pop(blkno)
            buf[:] = b"\xa5" * BLOCK_SIZE  # garbage, so encode must write every byte
            block.encode(memoryview(buf), self.volume_seed, self.tid)
            self.stats["encode"] += 1
            self.disk[blkno] = bytes(buf)
            n += 1
        self.dirty_set.clear()
        self.tid += 1
        self._reusable.extend(self._pending_free)
        self._pending_free.clear()
        return n

    def drop_cache(self) -> None:
        """Flush, then forget every decoded block (as after a remount)."""
        self.flush()
        self.cache.clear()

    def corrupt(self, blkno: int, offset: int, xor: int = 0xFF) -> None:
        """Flip bits of one on-disk byte (after a flush) and forget the cached copy."""
        self.flush()
        raw = bytearray(self.disk[blkno])
        raw[offset] ^= xor
        self.disk[blkno] = bytes(raw)
        self.cache.pop(blkno, None)

    def write_raw(self, blkno: int, raw: bytes) -> None:
        """Replace a block's on-disk bytes (the caller re-seals if it wants a valid crc)."""
        self.flush()
        assert len(raw) == BLOCK_SIZE
        self.disk[blkno] = bytes(raw)
        self.cache.pop(blkno, None)

    def _evict(self) -> None:
        if self.cache_limit is None:
            return
        excess = len(self.cache) - self.cache_limit
        if excess <= 0:
            return
        # The newest entries are the running operation's path: a real cache must not drop
        # them mid-operation either (the caller mutates the objects it was handed).
        for blkno in list(self.cache)[: -self.PINNED_RECENT]:
            if excess <= 0:
                break
            if blkno not in self.dirty_set:
                del self.cache[blkno]
                excess -= 1
