"""Write-back cache of small file-data writes, and a read cache of the blocks they touch.

O_DIRECT bypasses the host's page cache, so without this every 4 KiB write through the
mount waits for the device, and every small file a ``tar`` extracts is its own device write.
Here a small write (up to :data:`SMALL_MAX` blocks) is copied into memory and acknowledged;
the dirty blocks go to the device together, sorted by block number so that neighbours
(consecutive small files are allocated next to each other) leave as one write of up to
1 MiB.  Small reads are served from, and fill, the same cache.  Large requests bypass the
cache (a large write, which the store hands to its write-behind thread, drops any cached
copy of its blocks; a large read overlays the dirty blocks it covers).

Ordered data is kept by the store: it calls :meth:`DataCache.flush` before every journal
commit, so data reaches the device before the metadata that points at it, exactly as when
writes went straight through.  Freed blocks are dropped (:meth:`DataCache.discard`) before
they can be reused.  Memory is bounded: ``capacity`` blocks in all, at most ``dirty_limit``
of them dirty (more triggers a flush).  What the cache holds at a crash was never promised
durable (fsync commits, and commit flushes).

A flush on a volume served through the valve writes its runs on a ring of their own
(:meth:`DataCache.attach_ring`, io_uring), up to :data:`FLUSH_DEPTH` at once, instead of one
after the other: the dirty blocks of random 4 KiB writes are scattered, so a flush is
thousands of single-block writes, and the device does about three times as many of them
when they overlap (docs/BENCHMARKS.md, "The write side").  The flush still returns only when
every write it started is done, so nothing above it changes: ordered data, the barrier
after, the error of the first failed write.

The blocks live in C (native/hotpath.c): one aligned arena of ``capacity`` blocks (plus
:data:`SLACK` slots, so that a request's blocks go in before the eviction back down to the
capacity), an index from block number to slot, an LRU list and a dirty bit per slot.  The
methods here keep the order of things the Python cache had (an ``OrderedDict`` of
bytearrays: look, fill, flush if too dirty, evict the least recently used clean blocks), and
the two calls of the short path do a whole hot request in one call into C: a read whose
blocks are all mapped and cached (:meth:`DataCache.read_hot`), a small overwrite of mapped
blocks that needs no flush (:meth:`DataCache.write_hot`).  Either returns False having
changed nothing when the request is anything else, and the caller takes the general path
(docs/DESIGN.md, "The data cache"; tests/test_hotpath.py compares the two).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from native import ffi, lib
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.blockdev import RUN_MAX, copy_filler, write_runs
from nexfs.types import FsError

if TYPE_CHECKING:
    from nexfs.store.blockdev import BlockDev

FLUSH_DEPTH = 64
"""Writes a flush keeps in flight at once (the depth of its ring)."""

FLUSH_BLOCKS = 1024
"""Blocks a flush packs into its aligned buffer per batch of ring writes (4 MiB)."""

SMALL_MAX = 16
"""Requests of at most this many blocks (64 KiB) go through the cache."""

DEFAULT_BLOCKS = 16384
"""Default capacity: 64 MiB of data."""

SLACK = SMALL_MAX
"""Slots past the capacity: a request puts its blocks in, then the cache evicts back down."""

HOT_BLOCKS = SMALL_MAX
"""Largest read the short path serves: what the general path looks up in the cache (a
larger run bypasses it), so that both leave the cache in the same state."""

_DIRTY = 2  # the dirty bit of a slot's flags (native/hotpath.c)


class Extents:
    """A file's extent runs ``(lblk, phys, n)``, ascending, packed for C (``struct
    nx_extent``): what the short path maps logical blocks with.  The owner rebuilds it after
    every change of the extent map (nexfs/core/filedata.py)."""

    __slots__ = ("array", "count")

    def __init__(self, runs: list[tuple[int, int, int]]) -> None:
        self.count = len(runs)
        self.array = ffi.new("struct nx_extent[]", runs or 1)


class DataCache:
    """Physical block number -> 4 KiB of file data, least recently used first."""

    def __init__(self, bdev: BlockDev, capacity: int = DEFAULT_BLOCKS,
                 dirty_limit: int | None = None) -> None:
        if capacity < 0:
            raise ValueError("negative data cache size")
        self._bdev = bdev
        self.capacity = capacity
        self.dirty_limit = capacity // 2 if dirty_limit is None else min(dirty_limit, capacity)
        out = ffi.new("struct nx_dcache **")
        rc = lib.nx_dc_open(capacity, SLACK, out)
        if rc < 0:
            # Its address space is reserved here (filled only as it is used): a size beyond
            # what the machine can reserve is refused at mount, as a mistake, not a crash.
            raise FsError(-rc, f"a data cache of {capacity * BLOCK_SIZE >> 20} MiB cannot be "
                               f"reserved ({os.strerror(-rc)}): choose a smaller data_cache")
        self._dc = ffi.gc(out[0], lib.nx_dc_close)
        self._slots = self._dc.slots
        self._arena = memoryview(ffi.buffer(self._dc.arena, self._slots * BLOCK_SIZE))
        # The short path's reply buffer: a read hit is copied here and answered with a
        # memoryview of it, which pyfuse3 sends before any other request runs (the adapter
        # hands out nothing else in between), so one buffer serves every hit.
        self._hot = ffi.new("char[]", HOT_BLOCKS * BLOCK_SIZE)
        self._hot_view = memoryview(ffi.buffer(self._hot))
        self._flush_buf: memoryview | None = None
        self._ring_buf: memoryview | None = None
        self._ring: Any = None  # flush writes in flight (attach_ring); None: one at a time
        # Blocks read past the cache (large reads): ``nexfs stats``.  Hits and misses are
        # counted in C (the short path counts its hits there).
        self.bypassed = 0

    @property
    def hits(self) -> int:
        """Blocks read from memory."""
        return int(self._dc.hits)

    @property
    def misses(self) -> int:
        """Blocks looked up and not found (read from the device)."""
        return int(self._dc.misses)

    @property
    def short_reads(self) -> int:
        """Requests served by the short path's read (:meth:`read_hot`)."""
        return int(self._dc.short_reads)

    @property
    def short_writes(self) -> int:
        """Requests served by the short path's write (:meth:`write_hot`)."""
        return int(self._dc.short_writes)

    def __len__(self) -> int:
        return int(self._dc.used)

    @property
    def dirty_count(self) -> int:
        return int(self._dc.dirty)

    def block(self, blkno: int) -> memoryview | None:
        """The cached copy of block ``blkno`` (a view into the arena: valid until the cache
        next changes), or None; the LRU order is left alone."""
        s = lib.nx_dc_find(self._dc, blkno)
        return None if s < 0 else self._arena[s * BLOCK_SIZE : (s + 1) * BLOCK_SIZE]

    def is_dirty(self, blkno: int) -> bool:
        """Whether block ``blkno`` is cached and not yet written."""
        s = lib.nx_dc_find(self._dc, blkno)
        return s >= 0 and bool(self._dc.flags[s] & _DIRTY)

    def cached_blocks(self) -> list[int]:
        """Every cached block number, least recently used first (tests compare it)."""
        dc = self._dc
        out: list[int] = []
        s = dc.head
        while s >= 0:
            out.append(int(dc.blk[s]))
            s = dc.next[s]
        return out

    def dirty_blocks(self) -> list[int]:
        """The dirty block numbers, ascending."""
        n = self._dc.dirty
        if not n:
            return []
        arr = ffi.new("uint64_t[]", n)
        return list(arr[0 : lib.nx_dc_dirty_list(self._dc, arr, n)])

    # -- the short path ------------------------------------------------------------------------

    def read_hot(self, extents: Extents, lblk: int, count: int, lo: int,
                 length: int) -> memoryview | None:
        """Logical blocks ``lblk..+count`` of the file whose extents are ``extents``, if
        every one is mapped and cached: bytes ``lo..lo+length`` of them, as a view of the
        reply buffer (valid until the next call); None (nothing changed) otherwise."""
        if count > HOT_BLOCKS or not lib.nx_dc_read_hot(self._dc, extents.array, extents.count,
                                                        lblk, count, self._hot):
            return None
        return self._hot_view[lo : lo + length]

    def write_hot(self, extents: Extents, lblk: int, count: int, data: Any, lo: int,
                  hi: int) -> bool:
        """Overwrite logical blocks ``lblk..+count`` of the file whose extents are
        ``extents`` with ``data`` (``count`` whole blocks), if every one is mapped to a
        block in ``lo..hi-1`` and the write needs no flush: cached dirty, True.  False
        (nothing changed) otherwise."""
        return 0 < count <= SMALL_MAX and lib.nx_dc_write_hot(
            self._dc, extents.array, extents.count, lblk, count, ffi.from_buffer(data), lo, hi,
            self.dirty_limit, self.capacity) > 0

    # -- reading -----------------------------------------------------------------------------

    def read(self, blkno: int, count: int, into: memoryview) -> None:
        """Fill ``into`` (``count`` blocks) with blocks ``blkno..``: cached blocks from
        memory, the rest from the device (and, for small reads, into the cache)."""
        dc = self._dc
        if not self.takes(count):
            self.bypassed += count
            self._bdev.read_blocks(blkno, count, into)
            if dc.dirty:
                for i in range(count):
                    s = lib.nx_dc_find(dc, blkno + i)
                    if s >= 0 and dc.flags[s] & _DIRTY:
                        into[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = \
                            self._arena[s * BLOCK_SIZE : (s + 1) * BLOCK_SIZE]
            return
        for i, j in self._copy_hits(blkno, count, into):
            dc.misses += j - i
            part = into[i * BLOCK_SIZE : j * BLOCK_SIZE]
            self._bdev.read_blocks(blkno + i, j - i, part)
            src = ffi.from_buffer(part)
            for k in range(i, j):
                # No free slot only after failed flushes left more dirty blocks than the
                # capacity: the block is then read, not cached.
                lib.nx_dc_put(dc, blkno + k, src + (k - i) * BLOCK_SIZE, 0)
        self._evict()

    def read_cached(self, blkno: int, count: int, into: memoryview) -> list[tuple[int, int]]:
        """Copy the cached blocks among ``blkno..`` into ``into``; returns the runs
        ``(first index, end index)`` left to read from the device.  Nothing is read here and
        nothing is filled in (the device reads are in flight: nexfs/store/inflight.py).  The
        blocks left were looked up and not found: misses, for the hit rate of ``nexfs
        stats`` (only large reads, which never look, are ``bypassed``)."""
        dc = self._dc
        if not dc.used:
            dc.misses += count
            return [(0, count)]
        missing = self._copy_hits(blkno, count, into)
        dc.misses += sum(j - i for i, j in missing)
        return missing

    def _copy_hits(self, blkno: int, count: int, into: memoryview) -> list[tuple[int, int]]:
        """Copy the cached blocks among ``blkno..`` into ``into`` (counted as hits); returns
        the runs ``(first index, end index)`` that are not cached."""
        dc = self._dc
        arena = self._arena
        missing: list[tuple[int, int]] = []
        i = 0
        while i < count:
            s = lib.nx_dc_touch(dc, blkno + i)
            if s >= 0:
                into[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] = \
                    arena[s * BLOCK_SIZE : (s + 1) * BLOCK_SIZE]
                dc.hits += 1
                i += 1
                continue
            j = i + 1
            while j < count and lib.nx_dc_find(dc, blkno + j) < 0:
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
        dc = self._dc
        if isinstance(data, list | tuple):
            data = b"".join(data)
        if dc.used + count > self._slots:
            # Only after failed flushes (more dirty blocks than the capacity): make room by
            # writing them now; a device error fails this write too.
            self.flush()
            self._evict()
        src = ffi.from_buffer(data)
        for i in range(count):
            lib.nx_dc_put(dc, blkno + i, src + i * BLOCK_SIZE, 1)
        if dc.dirty > self.dirty_limit:
            self.flush()
        self._evict()

    def discard(self, blkno: int, count: int) -> None:
        """Blocks freed (or about to be overwritten on the device): forget them."""
        lib.nx_dc_drop_range(self._dc, blkno, count)

    def attach_ring(self, ring: Any) -> None:
        """Flush through the valve ring ``ring`` (its own: nobody else may reap it), with up
        to ``ring.depth`` writes in flight."""
        self._ring = ring

    def flush(self) -> None:
        """Write every dirty block, in block order, neighbours together (no barrier: the
        store makes them durable with its next barrier or commit)."""
        dc = self._dc
        if not dc.dirty:
            return
        order = ffi.new("uint64_t[]", dc.dirty)
        n = lib.nx_dc_dirty_list(dc, order, dc.dirty)
        if self._ring is not None:
            self._flush_ring(order, n)
            return
        if self._flush_buf is None:
            self._flush_buf = self._bdev.alloc(RUN_MAX)
        done = 0

        def written(k: int) -> None:
            # Clean from here on: a failure in a later run leaves only later blocks dirty.
            nonlocal done
            lib.nx_dc_mark_clean(dc, order + done, k)
            done += k

        arena = self._arena
        slots = [(int(b), lib.nx_dc_find(dc, b)) for b in order[0:n]]
        write_runs(self._bdev,
                   [(b, copy_filler(arena[s * BLOCK_SIZE : (s + 1) * BLOCK_SIZE]))
                    for b, s in slots],
                   durable=False, progress=written, buf=self._flush_buf)

    def _flush_ring(self, order: Any, n: int) -> None:
        """:meth:`flush` with the writes in flight together: in batches of at most
        ``ring.depth`` runs and FLUSH_BLOCKS blocks packed into one aligned buffer, each
        batch reaped whole before the buffer is refilled.  A block is clean once its own
        write completed; after a failure the failed runs stay dirty and the first error is
        raised once everything started has completed (the buffer is never refilled under a
        write, and no write is left behind)."""
        ring = self._ring
        if self._ring_buf is None:
            self._ring_buf = self._bdev.alloc(FLUSH_BLOCKS)
        buf = self._ring_buf
        dc = self._dc
        bdev = self._bdev
        i = 0
        while i < n:
            runs: list[tuple[int, int, int]] = []  # (tag, first index, end index)
            error: OSError | None = None
            try:
                used = 0
                while i < n and len(runs) < ring.depth and used < FLUSH_BLOCKS:
                    limit = min(RUN_MAX, FLUSH_BLOCKS - used)
                    j = i + 1
                    while j < n and j - i < limit and order[j] == order[j - 1] + 1:
                        j += 1
                    out = buf[used * BLOCK_SIZE : (used + j - i) * BLOCK_SIZE]
                    # Straight from the arena into the aligned buffer, in one call.
                    if lib.nx_dc_gather(dc, order + i, j - i, ffi.from_buffer(out)) != j - i:
                        raise RuntimeError("data cache: a dirty block is not held")
                    runs.append((bdev.write_async(order[i], j - i, out, ring), i, j))
                    used += j - i
                    i = j
            finally:
                done: dict[int, OSError | None] = {}
                while len(done) < len(runs):
                    for c in ring.reap(len(runs) - len(done)):
                        done[c.tag] = c.error
                for tag, a, b in runs:
                    failed = done[tag]
                    if failed is None:
                        lib.nx_dc_mark_clean(dc, order + a, b - a)
                    elif error is None:
                        error = failed
            if error is not None:
                raise error

    def clear(self) -> None:
        """Forget everything, dirty blocks included (the store entered its error state)."""
        lib.nx_dc_clear(self._dc)

    def _evict(self) -> None:
        """Drop least recently used clean blocks down to ``capacity`` (never writes: dirty
        blocks are bounded by ``dirty_limit`` and leave only through :meth:`flush`)."""
        lib.nx_dc_evict(self._dc, self.capacity)
