"""An image file opened the way a network export is: without any lock, by any number of
processes at once, with ``block_info().exclusive`` False.

The valve locks every image it opens (``flock``), so two daemons can never write one image
and the filesystem's multi-mount protection (nexfs/store/mmp.py) would never be exercised on a
local machine.  :func:`open_shared` stands in for ``valve.Valve.open`` through the mount's
``Seams.open_device`` (tests/faultmount.py ``--shared``): plain ``pread``/``pwrite`` on the
page cache, which every process on the host shares, so each sees the other's writes at once
as two hosts see a network export's; ``durable`` is an ``fdatasync``.  It is a test device:
nothing in the product opens an image without its lock.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any

from valve import BlockInfo, Rights
from valve.errors import CapabilityError

SECTOR = 4096


class SharedImage:
    """The unlocked "valve": ``grant(rights)`` and ``close()`` as the mount uses them."""

    def __init__(self, path: str, read_only: bool) -> None:
        self.path = path
        self.read_only = read_only
        self.fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
        self.total_sectors = os.fstat(self.fd).st_size // SECTOR

    def grant(self, rights: Rights, lba_range: tuple[int, int] | None = None) -> SharedCap:
        if Rights.WRITE in rights and self.read_only:
            raise CapabilityError("write rights on a read-only shared image")
        return SharedCap(self, Rights.WRITE in rights)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SharedCap:
    """The device interface over a :class:`SharedImage` (``exclusive`` False)."""

    def __init__(self, image: SharedImage, write: bool) -> None:
        self._image = image
        self._write = write

    def block_info(self) -> BlockInfo:
        return BlockInfo(SECTOR, self._image.total_sectors, exclusive=False)

    def _check(self, lba: int, count: int) -> None:
        if count < 1 or lba < 0 or lba + count > self._image.total_sectors:
            raise OSError(errno.EINVAL, f"sector range {lba}+{count} outside the device")

    def block_read(self, lba: int, count: int, into: Any = None) -> memoryview:
        self._check(lba, count)
        nbytes = count * SECTOR
        buf = memoryview(bytearray(nbytes) if into is None else into).cast("B")[:nbytes]
        got = os.preadv(self._image.fd, [buf], lba * SECTOR)
        if got != nbytes:
            raise OSError(errno.EIO, f"short read at sector {lba}")
        return buf

    def block_write(self, lba: int, count: int, data: Any, *, durable: bool = False) -> None:
        if not self._write:
            raise CapabilityError("block_write: capability lacks WRITE")
        self._check(lba, count)
        parts: Sequence[Any] = data if isinstance(data, list | tuple) else [data]
        views = [memoryview(p).cast("B") for p in parts]
        if sum(v.nbytes for v in views) != count * SECTOR:
            raise OSError(errno.EINVAL, f"write of {count} sectors given the wrong size")
        os.pwritev(self._image.fd, views, lba * SECTOR)
        if durable:
            os.fdatasync(self._image.fd)

    def alloc_buffer(self, nbytes: int) -> bytearray:
        return bytearray(nbytes)


def open_shared(path: str, read_only: bool) -> SharedImage:
    """``Seams.open_device``'s signature: open ``path`` with no lock."""
    return SharedImage(path, read_only)
