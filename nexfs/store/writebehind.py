"""Large data writes leave on a worker thread while the next request is being handled.

A 1 MiB write through the mount spent about half its time waiting for the O_DIRECT write
and the other half in Python (receiving the request, copying it, updating metadata); done
one after the other, sequential writes ran at half the device's speed.  Here the request's
data is copied into one of :data:`NBUFFERS` aligned buffers (the data path's ``buffer``),
handed to a worker thread that writes it (the valve releases the GIL for the system call),
and the request is answered.  The next request uses the next buffer; a buffer is handed
out again only when the writes from it have finished.

What keeps this safe:

* ordered data: :meth:`WriteBehind.wait_all` runs before every commit (the store calls it
  with the data cache's flush), so data is on the device before metadata pointing at it;
* reads: :meth:`wait_overlapping` waits for an in-flight write of any block being read,
  and the store's data cache is flushed only after :meth:`wait_all`, so a later small
  write of the same block cannot be overtaken;
* errors: the first failed write is kept and raised by the next :meth:`wait_all` (the
  store then enters its error state, as for a failed synchronous write), so fsync reports
  it.  Every write queued behind a failed one is not attempted and is recorded as failed
  too: its blocks were acknowledged but hold whatever they held before (for a block just
  allocated, another file's old data).  Reading (or writing) a block whose write failed is
  EIO from then on; the volume is in its error state by then, so the block is never
  rewritten while mounted;
* the request side walks what the worker changes only while holding the lock: the
  worker removes finished writes from the lists a reader checks, and an unlocked walk of
  a list that shrinks under it skips an entry (a read then went to the device before the
  write of its block had landed).  A failure is recorded in the same locked step that
  takes the write off the in-flight lists, so a reader that saw it in flight sees it
  failed.  The one unlocked look is at the count of writes in flight, which only the
  request side raises: reading 0 proves that nothing it queued is still in flight.
"""

from __future__ import annotations

import errno
import threading
from collections import deque
from typing import TYPE_CHECKING

from nexfs.ondisk.metablock import BLOCK_SIZE

if TYPE_CHECKING:
    from nexfs.store.blockdev import BlockDev

NBUFFERS = 4
"""Aligned request buffers: one being filled, the others' writes in flight."""

BUFFER_BYTES = 2 * 1024 * 1024
"""Size of each buffer: a 1 MiB FUSE request at any offset fits."""


IDLE_EXIT = 2.0
"""Seconds without work after which the worker thread ends."""


class LostWriteError(OSError):
    """A block being read was acknowledged, but its deferred write failed (EIO)."""


class WriteBehind:
    """A pool of aligned buffers, and a worker thread writing from them."""

    def __init__(self, bdev: BlockDev, nbuffers: int = NBUFFERS,
                 buffer_bytes: int = BUFFER_BYTES) -> None:
        self._bdev = bdev
        self._size = buffer_bytes
        self._bufs: list[memoryview | None] = [None] * nbuffers
        self._objs: list[object] = [None] * nbuffers
        # Per buffer: the (blkno, count) writes queued or in progress from it.
        self._pending: list[list[tuple[int, int]]] = [[] for _ in range(nbuffers)]
        # Writes queued or in progress.  Only the request side raises it and only the worker
        # lowers it (under the lock, after recording a failure), so a request that reads 0
        # without the lock knows every write it queued is done, failures recorded: the
        # fast path of the checks below, which otherwise take the lock.
        self._inflight = 0
        self._queue: deque[tuple[int, int, int, memoryview]] = deque()
        self._cond = threading.Condition()
        self._error: Exception | None = None
        self._failed: list[tuple[int, int, Exception]] = []  # writes that failed
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- the request side --------------------------------------------------------------------

    def buffer(self, nbytes: int) -> memoryview:
        """An aligned buffer of ``nbytes`` (<= ``buffer_bytes``) with no write from it in
        flight: the first such one (so reads keep using one buffer), a new one while fewer
        than ``nbuffers`` exist, else the first to finish.  Valid until the next call."""
        pending = self._pending
        first = self._bufs[0]
        if not self._inflight and first is not None:
            return first[:nbytes]
        with self._cond:
            while True:
                for i, buf in enumerate(self._bufs):
                    if buf is None:
                        obj = self._bdev.alloc_buffer(self._size)
                        buf = self._bufs[i] = memoryview(obj).cast("B")
                        self._objs[i] = buf.obj
                        return buf[:nbytes]
                    if not pending[i]:
                        return buf[:nbytes]
                self._cond.wait()

    def _index_of(self, data: object) -> int | None:
        # By identity: buffers of equal contents are still different buffers (list.index
        # compares with ==, and a bytearray buffer equal to another was taken for it).
        if isinstance(data, memoryview):
            obj = data.obj
            for i, o in enumerate(self._objs):
                if o is obj:
                    return i
        return None

    def submit(self, blkno: int, count: int, data: object) -> bool:
        """Queue the write of ``count`` blocks from ``data`` if it lies in one of the pool's
        buffers (returns True); otherwise return False and the caller writes it."""
        i = self._index_of(data)
        if i is None:
            return False
        assert isinstance(data, memoryview) and data.nbytes == count * BLOCK_SIZE
        with self._cond:
            if self._error is not None:
                return False  # written by the caller (after checking its blocks' failures)
            self._pending[i].append((blkno, count))
            self._inflight += 1
            self._queue.append((i, blkno, count, data))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nexfs-writer",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return True

    def quiet(self) -> bool:
        """Nothing in flight and no failed write to report: :meth:`wait_overlapping` would
        return at once (the data cache's short path checks this instead)."""
        return not self._inflight and not self._failed

    def busy(self) -> bool:
        return self._inflight > 0

    def wait_overlapping(self, blkno: int, count: int) -> None:
        """Return once no write of a block in ``blkno..+count`` is in flight.  Raises EIO
        if the write of one of them failed (or was dropped behind a failed one): the
        device holds older data than what was acknowledged, and a read must not return it
        as if nothing happened.  Checked under the lock (see the module docstring), unless
        nothing is in flight and nothing failed."""
        if not self._inflight and not self._failed:
            return
        end = blkno + count

        def overlapping() -> bool:
            return any(b < end and blkno < b + n for runs in self._pending for b, n in runs)

        with self._cond:
            while overlapping():
                self._cond.wait()
            for b, n, exc in self._failed:
                if b < end and blkno < b + n:
                    raise LostWriteError(errno.EIO, f"the write of block {b} failed: {exc}")

    def wait_all(self) -> None:
        """Return once every queued write is done; raise the first write error (once)."""
        with self._cond:
            while any(self._pending):
                self._cond.wait()
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Finish the queued writes (errors are dropped: the caller has given up) and stop
        the worker."""
        with self._cond:
            while any(self._pending):
                self._cond.wait()
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._stopping = False
        # Unmap the buffers now: a store can outlive its close() for a while.
        self._bufs = [None] * len(self._bufs)
        self._objs = [None] * len(self._objs)

    # -- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                if not self._queue and not self._stopping:
                    cond.wait(IDLE_EXIT)
                if not self._queue:
                    # Idle (or stopping): end; submit() starts a new worker when needed, so
                    # a store that is dropped without close() does not keep a thread.
                    self._thread = None
                    return
                i, blkno, count, data = self._queue.popleft()
                earlier = self._error
            error: Exception | None = None
            if earlier is not None:
                # Not attempted: the request side learns of the failure at its next wait_all
                # and stops; until then a read of these blocks must be EIO, so record it.
                error = LostWriteError(errno.EIO, f"not written after an earlier deferred "
                                                  f"write failed ({earlier})")
            else:
                try:
                    self._bdev.write_blocks(blkno, count, data)
                except Exception as exc:  # kept for wait_all(): the request side reports it
                    error = exc
            with cond:
                # One step: failed (if so) before it leaves the in-flight lists.
                if error is not None:
                    if self._error is None:
                        self._error = error
                    self._failed.append((blkno, count, error))
                self._pending[i].remove((blkno, count))
                self._inflight -= 1
                cond.notify_all()
