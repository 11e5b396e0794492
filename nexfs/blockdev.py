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
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from .metastore import BLOCK_SIZE
from .types import FsError, Lba

log = logging.getLogger(__name__)

class BlockDevice(Protocol):
    """What NexFS needs from a device (the valve grant, or an in-memory test device)."""

    def block_info(self) -> Any: ...

    def block_read(self, lba: int, count: int, into: Any = None) -> memoryview: ...

    def block_write(self, lba: int, count: int, data: Any, *, durable: bool = False) -> None: ...

    def alloc_buffer(self, nbytes: int) -> Any: ...


class BlockDev:
    """Block-unit view of a sector device."""

    def __init__(self, dev: BlockDevice) -> None:
        info = dev.block_info()
        ss = int(info.sector_size)
        if ss <= 0 or BLOCK_SIZE % ss:
            raise FsError(errno.EINVAL, f"unsupported sector size {ss}")
        self._dev = dev  # the capability: private, never handed out (docs/VALVE.md)
        self.sector_size = ss
        self.spb = BLOCK_SIZE // ss  # sectors per block
        self.nblocks = int(info.total_sectors) // self.spb

    def _lba(self, blkno: int, count: int) -> Lba:
        if count < 1 or blkno < 0 or blkno + count > self.nblocks:
            raise FsError(errno.EIO, f"block range {blkno}+{count} outside the device "
                                     f"({self.nblocks} blocks)")
        return Lba(blkno * self.spb)

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
        self._dev.block_write(lba, count * self.spb, data, durable=durable)


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
