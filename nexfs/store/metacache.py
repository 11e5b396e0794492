"""Bounded LRU cache of decoded metadata blocks.

The cache never decides on its own what may be dropped: :meth:`BlockCache.evict` is told which
blocks are pinned (those changed by the running transaction).  Everything else is clean or
already safe in the journal and can be read back, so memory stays bounded by the budget plus
the size of the running transaction, whatever the size of the volume.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Container

from nexfs.ondisk.metablock import MetaBlock

log = logging.getLogger(__name__)


class BlockCache:
    """blkno -> decoded MetaBlock, least recently used first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 16:
            raise ValueError(f"cache of {capacity} blocks is too small (minimum 16)")
        self.capacity = capacity
        self._d: OrderedDict[int, MetaBlock] = OrderedDict()
        self.hits = 0  # lookups answered from memory, and not (``nexfs stats``)
        self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, blkno: object) -> bool:
        return blkno in self._d

    def lookup(self, blkno: int) -> MetaBlock | None:
        """The cached block (marked most recently used), or None."""
        blk = self._d.get(blkno)
        if blk is not None:
            self.hits += 1
            self._d.move_to_end(blkno)
        else:
            self.misses += 1
        return blk

    def peek(self, blkno: int) -> MetaBlock | None:
        return self._d.get(blkno)

    def insert(self, blk: MetaBlock) -> None:
        self._d[blk.blkno] = blk
        self._d.move_to_end(blk.blkno)

    def remove(self, blkno: int) -> MetaBlock | None:
        return self._d.pop(blkno, None)

    def evict(self, pinned: Container[int]) -> None:
        """Drop least recently used unpinned blocks until within capacity (if possible)."""
        budget = len(self._d)  # visit each entry at most once
        while len(self._d) > self.capacity and budget > 0:
            budget -= 1
            blkno, blk = self._d.popitem(last=False)
            if blkno in pinned:
                self._d[blkno] = blk  # re-append: pinned blocks stay
