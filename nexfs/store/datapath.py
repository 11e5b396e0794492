"""The data path: file data between the filesystem and the data area of the device.

One :class:`DataPath` per open volume (``Store.data``).  It owns the data cache
(nexfs/store/datacache.py: small writes, read hits), the write-behind thread
(nexfs/store/writebehind.py: large writes leave while the request is answered) and the
aligned scratch buffers requests use; it holds only the data-area grant
(nexfs/store/grants.py), so nothing it does can reach the journal, the superblocks or the
fixed metadata.

Its one duty towards the metadata store is ordered data: before a commit block is written,
:meth:`drain` puts every byte written so far on the device (the write-behind queue empty, the
cache's dirty blocks written), and :attr:`unsynced` says whether a barrier is still needed to
make them durable.  The metadata store calls :meth:`drain` before every commit and
:meth:`wait_all` before every checkpoint (no write may land on a block after it is reused),
and :meth:`mark_synced` after each barrier.

Errors: a device error on a read is the caller's errno (a failed read changes nothing) and is
logged; a write that was acknowledged and then lost (write-behind) is a device error for the
failure policy; a block number outside the data area is corruption.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from typing import Any

from nexfs.ondisk.layout import Geometry
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.blockdev import BlockDev
from nexfs.store.datacache import DEFAULT_BLOCKS, DataCache, Extents
from nexfs.store.failure import FailurePolicy, boundary
from nexfs.store.inflight import DeviceReads
from nexfs.store.writebehind import BUFFER_BYTES, LostWriteError, WriteBehind
from nexfs.types import BlockNo, CorruptionError, FsError

log = logging.getLogger(__name__)


def read_error(e: OSError, what: str) -> FsError:
    """The FsError for a device error reading file data, blocking or in flight: not an
    ordinary failure (nothing changed, so no error state), quiet to the caller's errno, but
    the log says why."""
    log.error("device error reading %s: %s", what, e)
    return FsError(e.errno or errno.EIO, f"reading {what}: {e}")


class DataPath:
    """Reads and writes of file data blocks: data cache, write-behind, scratch buffers."""

    def __init__(self, grant: BlockDev, geo: Geometry, failures: FailurePolicy,
                 check_writable: Callable[[], None],
                 cache_blocks: int = DEFAULT_BLOCKS) -> None:
        self.geo = geo
        self.failures = failures
        self._grant = grant
        self._check_writable = check_writable
        self._cache = DataCache(grant, cache_blocks)
        self._wb = WriteBehind(grant)  # also the pool behind buffer()
        # Data reads in flight on the valve's ring (nexfs/store/inflight.py); None: reads
        # block.
        self.reads: DeviceReads | None = None
        # Data written to the device, or handed to the cache or write-behind to write, since
        # the last barrier.
        self.unsynced = False

    @property
    def write_behind(self) -> WriteBehind:
        """The write-behind queue (tests hold its worker at a gate: tests/wbgate.py)."""
        return self._wb

    def cache_counters(self) -> dict[str, int]:
        """The data cache's part of ``nexfs stats``: blocks small reads found in memory
        (hits) and did not (misses: read from the device, by a blocking read that fills the
        cache or by a read in flight that does not), blocks of large reads that never look
        (bypassed), and its size; and the requests the short path served whole (one call
        into C: nexfs/store/datacache.py)."""
        c = self._cache
        return {"hits": c.hits, "misses": c.misses, "bypassed": c.bypassed, "blocks": len(c),
                "capacity": c.capacity, "dirty": c.dirty_count,
                "short_reads": c.short_reads, "short_writes": c.short_writes}

    @property
    def pending(self) -> bool:
        """Something written is not yet known durable (a barrier is needed)."""
        return self.unsynced or self._cache.dirty_count > 0 or self._wb.busy()

    def _check_range(self, blkno: int, count: int) -> None:
        g = self.geo
        if count < 1 or blkno < g.data_start or blkno + count > g.backup_sb:
            raise CorruptionError(blkno, "data extent",
                                  f"{count} block(s) outside the data area")

    def alloc_buffer(self, nbytes: int) -> Any:
        """An aligned buffer from the device, for zero-copy :meth:`read`/:meth:`write`."""
        return self._grant.alloc_buffer(nbytes)

    def buffer(self, nbytes: int) -> memoryview:
        """An aligned scratch buffer of ``nbytes`` for one request's data.  Data written
        from it with :meth:`write` leaves on the write-behind thread; the buffer is handed
        out again only once that is done.

        Why not a fresh buffer per request: each is a new mmap, so O_DIRECT first faults
        in and zeroes its pages and the munmap afterwards costs a TLB shootdown; that
        made a 4 KiB read take ~170 us instead of the device's ~60 us."""
        if nbytes > BUFFER_BYTES:
            return memoryview(self._grant.alloc_buffer(nbytes)).cast("B")
        return self._wb.buffer(nbytes)

    def read(self, blkno: BlockNo, count: int, into: Any = None) -> memoryview:
        """Read file data, through the data cache.

        A device error is returned as FsError(errno) without entering the error state (a
        failed read changes nothing)."""
        self._ready_to_read(blkno, count)
        view = self._grant.alloc(count) if into is None else memoryview(into).cast("B")
        try:
            self._cache.read(blkno, count, view)
            return view
        except OSError as e:
            raise read_error(e, f"data blocks {blkno}+{count}") from e

    def _ready_to_read(self, blkno: BlockNo, count: int) -> None:
        """What every data read does before it touches the cache or the device: the range
        check (a block outside the data area is corruption) and the wait for write-behind's
        writes of the same blocks."""
        try:
            self._check_range(blkno, count)
        except CorruptionError as e:
            self.failures.failed(e)
            raise
        try:
            self._wb.wait_overlapping(blkno, count)
        except LostWriteError as e:
            # Acknowledged data never reached the device: that is a write failure.
            raise self.failures.device_error(e, f"reading data block {blkno}") from e

    def attach_ring(self, ring: Any) -> DeviceReads | None:
        """Serve reads through the valve ring ``ring`` from now on (nexfs/store/inflight.py);
        returns the reads' state, or None when the grant is not a valve capability."""
        if not self._grant.takes_ring():
            return None
        self.reads = DeviceReads(self._grant, ring)
        return self.reads

    def attach_flush_ring(self, ring: Any) -> bool:
        """Flush the data cache through the valve ring ``ring`` (its own) from now on,
        writes in flight together (nexfs/store/datacache.py); False (and nothing changes)
        when the grant is not a valve capability."""
        if not self._grant.takes_ring():
            return False
        self._cache.attach_ring(ring)
        return True

    def plan_read(self, blkno: BlockNo, count: int,
                  into: memoryview) -> list[tuple[int, int, memoryview]]:
        """The synchronous half of a read in flight: the checks, the write-behind wait, the
        cached blocks copied into ``into``; returns the device runs ``(blkno, count, into
        slice)`` left to read (nexfs/store/inflight.py)."""
        self._ready_to_read(blkno, count)
        return [(blkno + i, j - i, into[i * BLOCK_SIZE : j * BLOCK_SIZE])
                for i, j in self._cache.read_cached(blkno, count, into)]

    # -- the short path (nexfs/store/datacache.py, native/hotpath.c) -------------------------

    def read_hot(self, extents: Extents, lblk: int, count: int, lo: int,
                 length: int) -> memoryview | None:
        """A read whose blocks are all mapped and in the data cache, in one call into C:
        bytes ``lo..lo+length`` of logical blocks ``lblk..+count``, as a view that stays
        valid until the next short read (the reply, sent before any other request runs);
        None when anything is not a hit (nothing changed: take :meth:`read`).  No range
        check or write-behind wait is needed: a cached block was range-checked when it
        went in, and a block under a write-behind write is never cached (a large write
        drops the cached copies first, a small one waits for it)."""
        return self._cache.read_hot(extents, lblk, count, lo, length)

    def write_hot(self, extents: Extents, lblk: int, count: int, data: Any) -> bool:
        """A small overwrite of mapped blocks into the data cache, in one call into C, when
        it needs nothing else: no write-behind write in flight or failed (else the wait
        of :meth:`write`), every block in the data area (else the corruption of
        :meth:`write`), no flush.  True: done, as :meth:`write` would have; False: nothing
        changed, take :meth:`write`."""
        if not self._wb.quiet():
            return False
        self._check_writable()
        g = self.geo
        if not self._cache.write_hot(extents, lblk, count, data, g.data_start, g.backup_sb):
            return False
        self.unsynced = True
        return True

    def caches(self, count: int) -> bool:
        """Whether a write of ``count`` blocks goes into the data cache (then ``data`` may
        be any buffer: the cache copies it; larger writes want a :meth:`buffer`)."""
        return self._cache.takes(count)

    @boundary
    def write(self, blkno: BlockNo, count: int, data: Any | Sequence[Any]) -> None:
        """Write file data (one buffer or a list: vectored): small writes into the data
        cache, large ones from a :meth:`buffer` to the write-behind thread, others straight
        to the device.  Either way it is on the device, and durable, before the next commit
        block (ordered data)."""
        self._check_writable()
        self._check_range(blkno, count)
        self.unsynced = True
        reads = self.reads
        if reads is not None and reads.in_flight:
            # No device write of a block under a read in flight (nexfs/store/inflight.py).
            if not self._cache.takes(count):
                reads.wait_overlapping(blkno, count)  # the device write below, or behind
            elif self._cache.dirty_count + count > self._cache.dirty_limit:
                reads.wait_all()  # the cache is about to flush: any dirty block may be read
        if self._cache.takes(count):
            # An older write of these blocks may still be in flight: let it land first, so
            # that no dirty cached block is ever overtaken (flushes need not wait).
            self._wb.wait_overlapping(blkno, count)
            self._cache.write(blkno, count, data)
            return
        self._cache.discard(blkno, count)
        if not self._wb.submit(blkno, count, data):
            self._wb.wait_overlapping(blkno, count)
            self._grant.write_blocks(blkno, count, data)

    def discard(self, blkno: int, count: int) -> None:
        """Blocks freed: their cached copies (dirty or not) are dropped, never written."""
        self._cache.discard(blkno, count)

    def drain(self) -> None:
        """Put everything written so far on the device (the one drain before a commit): the
        write-behind queue empty (its first error raised here), then the cache's dirty
        blocks written.  The next barrier or commit block makes them durable."""
        self._wb.wait_all()
        if self._cache.dirty_count:
            if self.reads is not None:
                self.reads.wait_all()  # the flush writes blocks a read may be reading
            self.unsynced = True
            self._cache.flush()

    def wait_all(self) -> None:
        """Wait for every queued write-behind write and every read in flight (before a
        checkpoint reuses blocks: nothing may land on, or be read from, a reused block)."""
        self._wb.wait_all()
        if self.reads is not None:
            self.reads.wait_all()

    def mark_synced(self) -> None:
        """A barrier made every earlier write durable."""
        self.unsynced = False

    def drop(self) -> None:
        """Forget unwritten cached data (the volume entered its error state and takes no
        more writes)."""
        self._cache.clear()

    def close(self) -> None:
        """Stop the write-behind thread and drop the cache (drained before, by the last
        commit, or dropped after an error or a simulated power cut)."""
        self._wb.close()
        self._cache.clear()
