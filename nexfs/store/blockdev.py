"""The one place where filesystem blocks become device sectors.

The valve speaks sectors (512 or 4096 bytes); everything above this adapter speaks 4096-byte
filesystem blocks (:class:`~nexfs.types.BlockNo`).  The adapter checks range and size before
anything reaches the device, so a bad block number is refused here with a clear error rather
than by O_DIRECT.

Device interface (duck-typed; implemented by ``valve`` and by ``tests/memdev.py``)::

    dev.block_info() -> BlockInfo(sector_size, total_sectors)
    dev.block_read(lba, count, into=None) -> memoryview
    dev.block_write(lba, count, data, *, durable=False) -> None
    dev.alloc_buffer(nbytes) -> aligned buffer

``durable=True`` is the only barrier: it returns once that write and every earlier one are on
stable storage.

Scoped views (docs/VALVE.md, "Grants inside NexFS"): :meth:`BlockDev.scoped` derives from a
whole-device view one that reads only inside a block window and writes only inside a list of
windows, each through a capability restricted (``Capability.restrict``) from the device's.  A
write is routed to the capability whose window holds it; a write no window holds is handed to
the first one anyway, so that the valve itself refuses it (``CapabilityError``, counted in
``stats.denials``) -- the view never decides alone.  A view with no write windows holds only
READ.  Devices that are not valve capabilities (the in-memory test device, fault wrappers) get
the same checks from :class:`_Window`.
"""

from __future__ import annotations

import copy
import errno
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.types import FsError, Lba
from valve import Capability, CapabilityError, Rights

log = logging.getLogger(__name__)

class BlockDevice(Protocol):
    """What NexFS needs from a device (the valve grant, or an in-memory test device)."""

    def block_info(self) -> Any: ...

    def block_read(self, lba: int, count: int, into: Any = None) -> memoryview: ...

    def block_write(self, lba: int, count: int, data: Any, *, durable: bool = False) -> None: ...

    def alloc_buffer(self, nbytes: int) -> Any: ...


Window = tuple[int, int]
"""A half-open range of filesystem blocks ``(first, end)``."""


class _Window:
    """A region-restricted grant over a device that is not a valve capability (tests'
    in-memory and fault-injecting devices): the same refusals, as ``CapabilityError``."""

    __slots__ = ("_dev", "_hi", "_lo", "_write")

    def __init__(self, dev: BlockDevice, write: bool, lo: int, hi: int) -> None:
        self._dev, self._write, self._lo, self._hi = dev, write, lo, hi

    def _check(self, what: str, lba: int, count: int) -> None:
        if count <= 0 or lba < self._lo or lba + count > self._hi:
            raise CapabilityError(f"{what}: lba {lba}+{count} outside [{self._lo}, {self._hi})")

    def block_info(self) -> Any:
        return self._dev.block_info()

    def block_read(self, lba: int, count: int, into: Any = None) -> memoryview:
        self._check("block_read", lba, count)
        return self._dev.block_read(lba, count, into)

    def block_write(self, lba: int, count: int, data: Any, *, durable: bool = False) -> None:
        if not self._write:
            raise CapabilityError(f"block_write: capability lacks {Rights.WRITE!s}")
        self._check("block_write", lba, count)
        self._dev.block_write(lba, count, data, durable=durable)

    def alloc_buffer(self, nbytes: int) -> Any:
        return self._dev.alloc_buffer(nbytes)


class BlockDev:
    """Block-unit view of a sector device (or, from :meth:`scoped`, of some regions of it)."""

    # Slots: the data path reads these on every call (a copied instance's dict is slower).
    __slots__ = ("_dev", "_more", "_wdev", "_whi", "_wlo", "nblocks", "read_window",
                 "sector_size", "spb", "write_windows")

    def __init__(self, dev: BlockDevice) -> None:
        info = dev.block_info()
        ss = int(info.sector_size)
        if ss <= 0 or BLOCK_SIZE % ss:
            raise FsError(errno.EINVAL, f"unsupported sector size {ss}")
        self._dev = dev  # the capability: private, never handed out (docs/VALVE.md)
        self.sector_size = ss
        self.spb = BLOCK_SIZE // ss  # sectors per block
        self.nblocks = int(info.total_sectors) // self.spb
        # Where writes go: the first window inline (the only one but for the superblock and
        # home writers), then the others as (first block, end block, capability).
        self._wlo, self._whi, self._wdev = 0, self.nblocks, dev
        self._more: tuple[tuple[int, int, BlockDevice], ...] = ()
        self.read_window: Window = (0, self.nblocks)
        self.write_windows: tuple[Window, ...] = ((0, self.nblocks),)

    def _restrict(self, write: bool, window: Window) -> BlockDevice:
        lo, hi = window[0] * self.spb, window[1] * self.spb
        if isinstance(self._dev, Capability):
            rights = Rights.READ | Rights.WRITE if write else Rights.READ
            return self._dev.restrict(rights, (lo, hi))
        return _Window(self._dev, write, lo, hi)

    def scoped(self, read: Window, writes: Sequence[Window] = ()) -> BlockDev:
        """A view that reads only inside ``read`` and writes only inside ``writes``.

        Each window gets its own restricted capability (READ+WRITE; READ alone for
        ``read`` unless it is also the one write window, then one capability serves both,
        which keeps the data path's hot calls as cheap as on the whole device).  No
        ``writes``: every write is refused.  Raises ``CapabilityError`` when this view's
        capability cannot grant them (a read-only device asked for writes).
        """
        view = copy.copy(self)
        wins = [(lo, hi, self._restrict(True, (lo, hi))) for lo, hi in writes]
        if len(wins) == 1 and (wins[0][0], wins[0][1]) == tuple(read):
            rdev = wins[0][2]
        else:
            rdev = self._restrict(False, read)
        view._dev = rdev
        view._wlo, view._whi, view._wdev = wins[0] if wins else (read[0], read[1], rdev)
        view._more = tuple(wins[1:])
        view.read_window = (read[0], read[1])
        view.write_windows = tuple((lo, hi) for lo, hi in writes)
        return view

    def _lba(self, blkno: int, count: int) -> Lba:
        if count < 1 or blkno < 0 or blkno + count > self.nblocks:
            raise FsError(errno.EIO, f"block range {blkno}+{count} outside the device "
                                     f"({self.nblocks} blocks)")
        return Lba(blkno * self.spb)

    def read_only(self) -> BlockDev:
        """This view's reads, and no writes (a READ capability): for code that only looks."""
        return self.scoped(self.read_window)

    def alloc(self, nblocks: int) -> memoryview:
        """An aligned, writable buffer of ``nblocks`` blocks (for zero-copy I/O)."""
        buf = memoryview(self._dev.alloc_buffer(nblocks * BLOCK_SIZE))
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        return buf

    def alloc_buffer(self, nbytes: int) -> Any:
        """An aligned buffer of ``nbytes`` from the device (zero-copy I/O)."""
        return self._dev.alloc_buffer(nbytes)

    def read_blocks(self, blkno: int, count: int, into: Any = None) -> memoryview:
        """Read ``count`` blocks; a short read is an error, never zero-filled."""
        lba = self._lba(blkno, count)
        mv = memoryview(self._dev.block_read(lba, count * self.spb, into))
        if mv.nbytes != count * BLOCK_SIZE:
            raise FsError(errno.EIO, f"short read at block {blkno}: {mv.nbytes} bytes")
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        return mv

    def takes_ring(self) -> bool:
        """Whether :meth:`read_async` works: the view reads through a valve capability."""
        return isinstance(self._dev, Capability)

    def read_async(self, blkno: int, count: int, into: Any, ring: Any) -> int:
        """Start reading ``count`` blocks into ``into`` on the valve ring ``ring``; returns
        the request's tag (nexfs/store/inflight.py).  Checked now, by the valve, like a read."""
        lba = self._lba(blkno, count)
        return cast(Capability, self._dev).block_read(lba, count * self.spb, into, ring=ring)

    def write_async(self, blkno: int, count: int, data: Any, ring: Any) -> int:
        """Start writing ``count`` blocks from the aligned buffer ``data`` on the valve ring
        ``ring``; returns the request's tag (the data cache's flush: nexfs/store/datacache.py).
        Checked now, by the valve, like :meth:`write_blocks` (routed the same way)."""
        lba = self._lba(blkno, count)
        if memoryview(data).nbytes != count * BLOCK_SIZE:
            raise FsError(errno.EINVAL, f"write of {count} blocks at {blkno}: wrong size")
        return cast(Capability, self._writer(blkno, count)).block_write(
            lba, count * self.spb, data, ring=ring)

    def write_blocks(self, blkno: int, count: int, data: Any | Sequence[Any], *,
                     durable: bool = False) -> None:
        """Write ``count`` blocks from one buffer or a list of buffers (vectored)."""
        lba = self._lba(blkno, count)
        if isinstance(data, list | tuple):
            size = sum(memoryview(d).nbytes for d in data)
        else:
            size = memoryview(cast(Any, data)).nbytes
        if size != count * BLOCK_SIZE:
            raise FsError(errno.EINVAL, f"write of {count} blocks at {blkno} given {size} bytes")
        self._writer(blkno, count).block_write(lba, count * self.spb, data, durable=durable)

    def _writer(self, blkno: int, count: int) -> BlockDevice:
        """The capability whose write window holds blocks ``blkno..+count``: the main one,
        also when no window holds the range (its capability then refuses it)."""
        if not self._wlo <= blkno <= self._whi - count:
            for lo, hi, cap in self._more:
                if lo <= blkno <= hi - count:
                    return cap
        return self._wdev


Filler = Callable[[memoryview], None]
"""Fills one BLOCK_SIZE slot of an aligned write buffer."""

RUN_MAX = 256
"""Largest single vectored write issued by :func:`write_runs` (1 MiB)."""


def copy_filler(src: bytes | bytearray | memoryview) -> Filler:
    """A filler that copies ``src`` (exactly one block) into the slot."""

    def fill(out: memoryview) -> None:
        out[:] = src

    return fill


def write_runs(bdev: BlockDev, blocks: list[tuple[int, Filler]], *, durable: bool,
               progress: Callable[[int], None] | None = None,
               buf: memoryview | None = None) -> None:
    """Write many blocks: sorted, contiguous ones in one aligned write of up to RUN_MAX.

    Each entry is ``(blkno, fill)``; ``fill(slot)`` writes the block's 4096 bytes into the
    aligned slot, so encoders serialise straight into the I/O buffer.  With ``durable`` the
    last write carries the barrier (it covers every earlier write).  ``progress(n)`` is
    called after each write with the number of blocks it carried (the first ``n`` of the
    sorted remainder).  ``buf``: an aligned buffer of RUN_MAX blocks to reuse for every
    write (callers that flush often); otherwise each write gets a fresh one.
    """
    blocks = sorted(blocks, key=lambda e: e[0])
    i, n = 0, len(blocks)
    while i < n:
        j = i + 1
        while j < n and j - i < RUN_MAX and blocks[j][0] == blocks[j - 1][0] + 1:
            j += 1
        if j < n and blocks[j][0] == blocks[j - 1][0]:
            raise ValueError(f"block {blocks[j][0]} written twice in one batch")
        out = bdev.alloc(j - i) if buf is None else buf[: (j - i) * BLOCK_SIZE]
        for k in range(i, j):
            blocks[k][1](out[(k - i) * BLOCK_SIZE : (k - i + 1) * BLOCK_SIZE])
        bdev.write_blocks(blocks[i][0], j - i, out, durable=durable and j == n)
        if progress is not None:
            progress(j - i)
        i = j
