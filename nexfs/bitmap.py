"""Bitmap allocators: one bit per block (or inode) plus a per-bitmap-block free-count summary.

A :class:`Bitmap` manages one bitmap region and its summary region (the block allocator and
the inode allocator are two instances).  Bitmap blocks carry the common header and
BITS_PER_BITMAP_BLOCK (32512) bits; bit ``i`` of group ``g`` is item ``g * 32512 + i``, least
significant bit first within each byte, 1 = in use.  The summary holds one u32 per bitmap
block: its free count in bits 0..30 and UNINIT in bit 31.  An UNINIT bitmap block was never
written; it reads as all free without any I/O, which is what lets mkfs skip writing the
bitmap of a huge empty volume.

Everything goes through the metadata store's cache and running transaction (``get``,
``put_new``, ``dirty``), so nothing here grows with the size of the volume: a bitmap block is
read only when the summary says it may hold what we are looking for.

Bits are decoded into one Python int per block: finding free runs, setting and clearing
ranges and counting are then a handful of big-integer operations instead of per-bit loops.

Freed blocks are "pending" (see :meth:`Bitmap.clear_range` with ``defer=True``): cleared on
disk in the freeing transaction but not handed out again until the journal has been
checkpointed past that transaction.  That is what makes revoke records unnecessary; see
docs/DESIGN.md.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from .layout import BITS_PER_BITMAP_BLOCK, SUMMARY_ENTRIES
from .metastore import (
    BLOCK_SIZE,
    HEADER_SIZE,
    MetaBlock,
    check_header,
    pack_header,
    seal_block,
)
from .types import BlockNo, CorruptionError

log = logging.getLogger(__name__)

BPB = BITS_PER_BITMAP_BLOCK
FULL = (1 << BPB) - 1
UNINIT = 0x8000_0000
COUNT_MASK = 0x7FFF_FFFF
_BITMAP_BYTES = BLOCK_SIZE - HEADER_SIZE
_SUMMARY = struct.Struct(f"<{SUMMARY_ENTRIES}I")
MAX_EXAMINE = 8
"""Bitmap blocks read looking for a fully contiguous run before settling for a shorter one."""

M = TypeVar("M", bound=MetaBlock)


class _Store(Protocol):
    volume_seed: int

    def get(self, blkno: BlockNo, decode: Callable[[BlockNo, memoryview], M]) -> M: ...

    def put_new(self, block: MetaBlock) -> None: ...

    def dirty(self, block: MetaBlock) -> None: ...


def trailing_zeros(x: int) -> int:
    """Index of the lowest set bit of ``x`` (x > 0)."""
    return (x & -x).bit_length() - 1


def trailing_ones(x: int) -> int:
    """Number of consecutive 1 bits at the bottom of ``x``."""
    return (x ^ (x + 1)).bit_length() - 1


def find_run(free: int, start: int, want: int) -> tuple[int, int, int]:
    """Scan the 1-bits (free items) of ``free`` from bit ``start``.

    Returns ``(full_pos, first_pos, first_len)`` where full_pos is the first position of a
    run of at least ``want`` ones (or -1), and first_pos/first_len describe the first run
    found at all (first_len 0 if none).  Each step is a few big-int operations per run.
    """
    x = free >> start
    pos = start
    first_pos, first_len = -1, 0
    while x:
        tz = trailing_zeros(x)
        x >>= tz
        pos += tz
        run = trailing_ones(x)
        if first_len == 0:
            first_pos, first_len = pos, run
        if run >= want:
            return pos, first_pos, first_len
        x >>= run
        pos += run
    return -1, first_pos, first_len


def range_mask(start: int, n: int) -> int:
    return ((1 << n) - 1) << start


class BitmapBlock(MetaBlock):
    """One decoded bitmap block: ``bits`` is an int, bit i set = item i of the group used."""

    __slots__ = ("bits", "group", "magic")

    def __init__(self, blkno: BlockNo, magic: int, group: int, bits: int) -> None:
        super().__init__(blkno)
        self.magic = magic
        self.group = group
        self.bits = bits

    def encode(self, out: memoryview, volume_seed: int, tid: int) -> None:
        pack_header(out, self.magic, self.blkno, self.group, tid)
        out[HEADER_SIZE:] = self.bits.to_bytes(_BITMAP_BYTES, "little")
        seal_block(out, volume_seed, self.blkno)

    @classmethod
    def decode(cls, blkno: BlockNo, raw: memoryview, *, magic: int, group: int, seed: int,
               tail: int, expect_free: int | None, structure: str) -> BitmapBlock:
        check_header(raw, blkno, magic, seed, structure, owner=group)
        bits = int.from_bytes(raw[HEADER_SIZE:BLOCK_SIZE], "little")
        if bits & tail != tail:
            raise CorruptionError(blkno, structure, "bits past the end of the volume are clear")
        if expect_free is not None:
            free = BPB - bits.bit_count()
            if free != expect_free:
                raise CorruptionError(blkno, structure,
                                      f"{free} free bits but the summary says {expect_free}")
        return cls(blkno, magic, group, bits)


class SummaryBlock(MetaBlock):
    """One decoded summary block: ``entries[i]`` = free count | UNINIT of a bitmap block."""

    __slots__ = ("entries", "index", "magic")

    def __init__(self, blkno: BlockNo, magic: int, index: int, entries: list[int]) -> None:
        super().__init__(blkno)
        self.magic = magic
        self.index = index
        self.entries = entries

    def encode(self, out: memoryview, volume_seed: int, tid: int) -> None:
        pack_header(out, self.magic, self.blkno, self.index, tid)
        _SUMMARY.pack_into(out, HEADER_SIZE, *self.entries)
        seal_block(out, volume_seed, self.blkno)

    @classmethod
    def decode(cls, blkno: BlockNo, raw: memoryview, *, magic: int, index: int, seed: int,
               nvalid: int, structure: str) -> SummaryBlock:
        check_header(raw, blkno, magic, seed, structure, owner=index)
        entries = list(_SUMMARY.unpack_from(raw, HEADER_SIZE))
        for i, e in enumerate(entries):
            if i >= nvalid:
                if e:
                    raise CorruptionError(blkno, structure, f"unused entry {i} is {e:#x}")
            elif e & COUNT_MASK > BPB:
                raise CorruptionError(blkno, structure, f"entry {i} counts {e & COUNT_MASK}")
        return cls(blkno, magic, index, entries)


class Bitmap:
    """Allocator over one bitmap region + summary region, through the metadata store."""

    def __init__(self, store: _Store, *, name: str, magic: int, summary_magic: int,
                 bitmap_start: int, summary_start: int, nitems: int,
                 first_item: int = 0) -> None:
        self.store = store
        self.name = name
        self.magic = magic
        self.summary_magic = summary_magic
        self.bitmap_start = bitmap_start
        self.summary_start = summary_start
        self.nitems = nitems
        self.first_item = first_item  # lowest index the search may return
        self.ngroups = -(-nitems // BPB)
        # Pending frees, as masks per group: of committed transactions, and of the running one.
        self.pending: dict[int, int] = {}
        self.pending_new: dict[int, int] = {}
        self.pending_count = 0
        self._last_tail: int | None = None

    # -- geometry ----------------------------------------------------------------------------

    def valid_in_group(self, g: int) -> int:
        return min(BPB, self.nitems - g * BPB)

    def tail_mask(self, g: int) -> int:
        """Bits of group g beyond the last item: permanently set.  Only the last group has
        any; it is computed once (a 32512-bit mask is not free to build on every lookup)."""
        if g != self.ngroups - 1:
            return 0
        if self._last_tail is None:
            self._last_tail = FULL & ~((1 << self.valid_in_group(g)) - 1)
        return self._last_tail

    # -- summary -----------------------------------------------------------------------------

    def _summary(self, s: int) -> SummaryBlock:
        nvalid = min(SUMMARY_ENTRIES, self.ngroups - s * SUMMARY_ENTRIES)
        seed = self.store.volume_seed
        magic, name = self.summary_magic, f"{self.name} summary"
        return self.store.get(
            BlockNo(self.summary_start + s),
            lambda b, raw: SummaryBlock.decode(b, raw, magic=magic, index=s, seed=seed,
                                               nvalid=nvalid, structure=name))

    def summary_entry(self, g: int) -> int:
        s, i = divmod(g, SUMMARY_ENTRIES)
        return self._summary(s).entries[i]

    def _set_summary(self, g: int, value: int) -> None:
        s, i = divmod(g, SUMMARY_ENTRIES)
        blk = self._summary(s)
        blk.entries[i] = value
        self.store.dirty(blk)

    def _entries_from(self, g0: int) -> Iterator[tuple[int, int]]:
        """(group, summary entry) for every group, starting at g0 and wrapping, then g0."""
        order = [*range(g0, self.ngroups), *range(0, g0 + 1)]
        cur_s, blk = -1, None
        for g in order:
            s, i = divmod(g, SUMMARY_ENTRIES)
            if s != cur_s or blk is None:
                cur_s, blk = s, self._summary(s)
            yield g, blk.entries[i]

    # -- bitmap blocks -----------------------------------------------------------------------

    def group(self, g: int, *, create: bool) -> BitmapBlock | None:
        """The bitmap block of group g; for an UNINIT group None, or a new all-free block
        (joining the transaction) when ``create``."""
        entry = self.summary_entry(g)
        blkno = BlockNo(self.bitmap_start + g)
        if entry & UNINIT:
            if not create:
                return None
            blk = BitmapBlock(blkno, self.magic, g, self.tail_mask(g))
            self.store.put_new(blk)
            self._set_summary(g, entry & COUNT_MASK)
            return blk
        seed, magic, tail = self.store.volume_seed, self.magic, self.tail_mask(g)
        name = f"{self.name} bitmap"
        expect = entry & COUNT_MASK
        return self.store.get(
            blkno,
            lambda b, raw: BitmapBlock.decode(b, raw, magic=magic, group=g, seed=seed,
                                              tail=tail, expect_free=expect, structure=name))

    def _bits(self, g: int) -> int:
        blk = self.group(g, create=False)
        return self.tail_mask(g) if blk is None else blk.bits

    def is_set(self, i: int) -> bool:
        g, off = divmod(i, BPB)
        return bool(self._bits(g) >> off & 1)

    def _pending_mask(self, g: int) -> int:
        return self.pending.get(g, 0) | self.pending_new.get(g, 0)

    def free_mask(self, g: int) -> int:
        """Allocatable items of group g as 1-bits (free on disk and not pending)."""
        return FULL & ~(self._bits(g) | self._pending_mask(g))

    def count_set(self, i: int, n: int) -> int:
        """How many of items i..i+n-1 are set (the range may cross bitmap blocks)."""
        total = 0
        while n > 0:
            g, off = divmod(i, BPB)
            take = min(n, BPB - off)
            total += (self._bits(g) & range_mask(off, take)).bit_count()
            i += take
            n -= take
        return total

    # -- mutation ----------------------------------------------------------------------------

    def set_range(self, i: int, n: int) -> None:
        """Mark items i..i+n-1 (one group) used; they must be free."""
        g, off = divmod(i, BPB)
        if n < 1 or off + n > BPB or i + n > self.nitems:
            raise ValueError(f"{self.name}: bad range {i}+{n}")
        blk = self.group(g, create=True)
        assert blk is not None
        mask = range_mask(off, n)
        if blk.bits & mask:
            raise CorruptionError(blk.blkno, f"{self.name} bitmap",
                                  f"allocating item(s) {i}+{n} already in use")
        blk.bits |= mask
        self.store.dirty(blk)
        entry = self.summary_entry(g)
        self._set_summary(g, (entry & COUNT_MASK) - n)

    def clear_range(self, i: int, n: int, *, defer: bool) -> None:
        """Mark items i..i+n-1 (one group) free; with ``defer`` they stay unallocatable until
        :meth:`release_pending` (after the freeing transaction was checkpointed)."""
        g, off = divmod(i, BPB)
        if n < 1 or off + n > BPB or i + n > self.nitems or i < self.first_item:
            raise ValueError(f"{self.name}: bad range {i}+{n}")
        blk = self.group(g, create=False)
        mask = range_mask(off, n)
        if blk is None or blk.bits & mask != mask:
            raise CorruptionError(self.bitmap_start + g, f"{self.name} bitmap",
                                  f"freeing item(s) {i}+{n} not in use")
        blk.bits &= ~mask
        self.store.dirty(blk)
        entry = self.summary_entry(g)
        self._set_summary(g, (entry & COUNT_MASK) + n)
        if defer:
            self.pending_new[g] = self.pending_new.get(g, 0) | mask
            self.pending_count += n

    def find(self, goal: int, want: int) -> tuple[int, int] | None:
        """First fit from ``goal`` (wrapping): ``(start, n)`` with 1 <= n <= want, preferring a
        run of the whole ``want`` (bounded search), else the first free run seen.  A run never
        crosses a bitmap block; ``want`` must be <= BPB.  Nothing is changed."""
        goal = min(max(goal, self.first_item), self.nitems - 1)
        g0, off0 = divmod(goal, BPB)
        fallback: tuple[int, int] | None = None
        examined = 0
        first = True
        for g, entry in self._entries_from(g0):
            off = off0 if first else 0
            first = False
            free = entry & COUNT_MASK
            if free == 0:
                continue
            pend = self._pending_mask(g)
            if pend:
                free -= pend.bit_count()
                if free <= 0:
                    continue
            if fallback is not None and free < want:
                continue
            bits = self.tail_mask(g) if entry & UNINIT else self._bits(g)
            mask = FULL & ~(bits | pend)
            full_pos, first_pos, first_len = find_run(mask, off, want)
            if full_pos >= 0:
                return g * BPB + full_pos, want
            if fallback is None and first_len:
                fallback = (g * BPB + first_pos, min(first_len, want))
            if not entry & UNINIT:
                examined += 1
            if fallback is not None and examined >= MAX_EXAMINE:
                break
        return fallback

    # -- pending frees -----------------------------------------------------------------------

    def commit_pending(self) -> None:
        """The running transaction committed: its frees now wait for a checkpoint."""
        for g, m in self.pending_new.items():
            self.pending[g] = self.pending.get(g, 0) | m
        self.pending_new.clear()

    def release_pending(self) -> None:
        """Every committed transaction was checkpointed: committed frees become allocatable."""
        released = sum(m.bit_count() for m in self.pending.values())
        self.pending.clear()
        self.pending_count -= released

    # -- checking ----------------------------------------------------------------------------

    def verify(self) -> tuple[int, list[str]]:
        """Recount every bitmap block against the summary (reads the whole bitmap).

        Returns ``(total free, problems)``; used by tests and fsck.
        """
        problems: list[str] = []
        total = 0
        for g in range(self.ngroups):
            entry = self.summary_entry(g)
            bits = self._bits(g)
            free = BPB - bits.bit_count()
            if free != entry & COUNT_MASK:
                problems.append(f"{self.name} group {g}: {free} free, summary says "
                                f"{entry & COUNT_MASK}")
            total += free
        return total, problems
