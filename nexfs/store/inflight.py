"""Data reads in flight on the valve's ring, while the event loop serves other requests.

A FUSE read whose blocks are not in the data cache used to block the trio loop for the
whole device transfer, so one request waited for the device at a time.  Here the read is
split in two: the synchronous part (extent lookup, cache hits, the write-behind wait, the
range checks) runs as before, inside one handler, without a checkpoint; the device part is
submitted to a ring (``valve.Ring``: io_uring, checked by the valve at submit) and the
handler awaits its completion, during which other workers read and serve the next requests.
Nothing else awaits: metadata changes, writes, truncates and commits stay serial.

**The invariant.**  *No device write of a block, and no reuse of a freed block, while a read
of it is in flight.*  Every data write that reaches the device (a data-cache flush, a large
write, the write-behind submit) first waits for the reads in flight that overlap it
(:meth:`DeviceReads.wait_overlapping`), and every checkpoint -- the only point where freed
blocks become allocatable again -- first waits for all of them (:meth:`DeviceReads.wait_all`).
Those waits are synchronous (``Ring.reap(wait=...)``): the transfers are already running, so
the wait is their remaining device time, never a request's.  Small writes going into the data
cache do not wait: a read in flight then returns the data as of its submission, a state that
existed.  So a read never returns a torn block, another file's data (a truncate or unlink
frees its blocks only into the pending frees), or data written after it was answered.

A completion is dispatched by whoever sees the ring's eventfd first: the reaper task
(:meth:`DeviceReads.reaper`, when the loop is idle in trio) or the FUSE loop's own poll
(nexfs/fuse/loop.py, which watches the eventfd next to /dev/fuse).  Either way the waiting
handler's event is set and it runs at the next checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from nexfs.store.blockdev import BlockDev
    from valve import Ring

log = logging.getLogger(__name__)

BUFFER_BLOCKS = 32
"""Largest read served through the ring (128 KiB: the kernel's usual READ size); larger ones
take the synchronous path.  Each read in flight holds one buffer of this size."""

DEPTH = 32
"""Reads in flight at most (more wait for a buffer); the ring's depth."""


class Pending:
    """One device run of a read: set ``error`` or nothing, then ``event``."""

    __slots__ = ("blkno", "count", "error", "event", "group")

    def __init__(self, blkno: int, count: int, group: ReadGroup) -> None:
        self.blkno = blkno
        self.count = count
        self.error: OSError | None = None
        self.group = group


class ReadGroup:
    """The device runs of one request; ``done`` is set when the last one completes."""

    __slots__ = ("done", "error", "left")

    def __init__(self) -> None:
        self.left = 0
        self.error: OSError | None = None
        self.done = trio.Event()


class DeviceReads:
    """The ring, the reads in flight and their buffers (see the module docstring)."""

    def __init__(self, bdev: BlockDev, ring: Ring) -> None:
        self._bdev = bdev
        self._ring = ring
        self._pending: dict[int, Pending] = {}
        self._buffers: list[memoryview] = []
        self._lent = 0
        self._buffer_free = trio.Event()
        self.lo = self.hi = 0  # the block range covered by reads in flight (quick test)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def fileno(self) -> int:
        return self._ring.fileno()

    # -- buffers ---------------------------------------------------------------------------

    def take_buffer(self) -> memoryview | None:
        """A BUFFER_BLOCKS buffer for one read, or None when DEPTH reads hold one."""
        if self._buffers:
            self._lent += 1
            return self._buffers.pop()
        if self._lent >= DEPTH:
            return None
        self._lent += 1
        return self._bdev.alloc(BUFFER_BLOCKS)

    def give_buffer(self, buf: memoryview) -> None:
        """Back to the pool.  Called just before a handler returns its reply (a memoryview
        of this buffer): pyfuse3 sends the reply before any other task runs, so the next
        taker, which can only run after a checkpoint, never overwrites it unsent."""
        self._lent -= 1
        self._buffers.append(buf)

    # -- submitting and completing -----------------------------------------------------------

    def submit(self, group: ReadGroup, blkno: int, count: int, into: memoryview) -> None:
        """Start one device run of ``group``; raises what the valve refuses (nothing
        started)."""
        tag = self._bdev.read_async(blkno, count, into, self._ring)
        self._pending[tag] = Pending(blkno, count, group)
        group.left += 1
        if len(self._pending) == 1:
            self.lo, self.hi = blkno, blkno + count
        else:
            self.lo, self.hi = min(self.lo, blkno), max(self.hi, blkno + count)

    def dispatch(self, wait: int = 0) -> int:
        """Complete what the ring has finished (blocking for ``wait`` of them); returns how
        many completed."""
        done = self._ring.reap(wait)
        pending = self._pending
        for c in done:
            p = pending.pop(c.tag)
            group = p.group
            if c.error is not None and group.error is None:
                group.error = c.error
            group.left -= 1
            if group.left == 0:
                group.done.set()
        return len(done)

    async def reaper(self) -> None:
        """Run for the session: dispatch completions when the loop is idle in trio."""
        while True:
            await trio.lowlevel.wait_readable(self._ring.fileno())
            self.dispatch()

    # -- the invariant ----------------------------------------------------------------------

    def wait_overlapping(self, blkno: int, count: int) -> None:
        """Return once no read in flight touches blocks ``blkno..blkno+count-1``."""
        while self._pending and blkno < self.hi and self.lo < blkno + count:
            if not any(blkno < p.blkno + p.count and p.blkno < blkno + count
                       for p in self._pending.values()):
                return
            self.dispatch(wait=1)
            self._recompute()

    def wait_all(self) -> None:
        """Return once no read is in flight."""
        while self._pending:
            self.dispatch(wait=len(self._pending))

    def _recompute(self) -> None:
        if self._pending:
            self.lo = min(p.blkno for p in self._pending.values())
            self.hi = max(p.blkno + p.count for p in self._pending.values())


def watch(reads: DeviceReads | None) -> tuple[int, Callable[[], Any]] | None:
    """What the FUSE loop's poll watches next to /dev/fuse: (eventfd, dispatch)."""
    if reads is None:
        return None
    return reads.fileno(), reads.dispatch
