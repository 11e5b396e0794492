"""The device under the valve: one open ``nx_dev`` (or NBD export) and the copies around it.

This module knows sectors, buffers and errno; it knows nothing about capabilities.
``valve.valve`` decides *whether* an operation may happen, this module does it.
Arguments that reach it have passed the capability check and the range check;
it still refuses wrong lengths and unusable buffers before any syscall.

Two backends share everything above the C call: a path opens the O_DIRECT core
(native/nexfs_core.c), an NBD URI the libnbd one (native/nbd_backend.c, see valve.nbd).
Both keep geometry and counters in a ``struct nx_dev``; only the functions called differ.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from native import ffi, lib
from valve import nbd
from valve.buffer import AlignedBuffer, is_valve_memory
from valve.errors import CapabilityError, DeviceError, RangeError, io_error, open_error
from valve.ring import Pending

if TYPE_CHECKING:
    from valve.interface import Buffer

log = logging.getLogger(__name__)

__all__ = ["Device"]

#: The smallest bounce buffer kept per thread: most unaligned writes are a few blocks.
_MIN_BOUNCE = 64 * 1024


class Device:
    """An open disk image or block device, with its geometry and per-thread bounce buffer."""

    __slots__ = (
        "_bounce",
        "_c_close",
        "_c_read",
        "_c_write",
        "_c_writev",
        "_dev",
        "_h",
        "_mask",
        "_page_aligned",
        "buffer_align",
        "exclusive",
        "is_blockdev",
        "is_nbd",
        "mem_align",
        "path",
        "read_only",
        "sector_size",
        "total_sectors",
    )

    def __init__(
        self,
        path: str,
        *,
        read_only: bool,
        sector_size: int | None,
        nbd_timeout: float | None = None,
    ) -> None:
        self.path = path
        self.is_nbd = nbd.is_nbd_uri(path)
        if self.is_nbd:
            # ``_h`` is what the transfer functions take; ``_dev`` the geometry and counters.
            self._h = nbd.open_export(path, read_only=read_only, timeout=nbd_timeout)
            self._dev = ffi.addressof(self._h, "dev")
            self._c_read, self._c_write, self._c_writev = (
                lib.nx_nbd_read, lib.nx_nbd_write, lib.nx_nbd_writev,
            )
            self._c_close = lib.nx_nbd_close
        else:
            self._dev = self._h = ffi.new("struct nx_dev *")
            rc = lib.nx_open(os.fsencode(path), int(read_only), self._dev)
            if rc < 0:
                raise open_error(rc, self._dev.stage, path, read_only=read_only)
            self._c_read, self._c_write, self._c_writev = lib.nx_read, lib.nx_write, lib.nx_writev
            self._c_close = lib.nx_close
        # No lock can keep a second host off a network export.
        self.exclusive = not self.is_nbd
        native = self._dev.sector_size
        if sector_size is not None and sector_size != native:
            # A larger logical sector than the device's is just a coarser unit of I/O,
            # as long as it is still a whole number of device sectors.
            if (
                sector_size <= 0
                or sector_size & (sector_size - 1)
                or sector_size % native
                or sector_size > mmap.PAGESIZE
            ):
                self._c_close(self._h)
                raise RangeError(
                    f"sector size {sector_size} is not a power-of-two multiple of the "
                    f"device's {native} up to {mmap.PAGESIZE}",
                    path,
                )
            self._dev.sector_size = sector_size
            self._dev.total_sectors = self._dev.size_bytes // sector_size
        self.read_only = read_only
        self.is_blockdev = bool(self._dev.is_blockdev)
        self.sector_size: int = self._dev.sector_size
        self.total_sectors: int = self._dev.total_sectors
        self.mem_align: int = self._dev.mem_align
        # Buffers must satisfy both the DMA and the offset alignment: an aligned buffer
        # sliced at sector boundaries must stay usable for O_DIRECT.
        self.buffer_align: int = max(self.sector_size, self.mem_align, 4096)
        self._mask = max(self.sector_size, self.mem_align) - 1
        # AlignedBuffer is an mmap: when a page satisfies the device, its address never
        # needs checking.
        self._page_aligned = self._mask < mmap.PAGESIZE
        self._bounce = threading.local()
        log.debug(
            "opened %s: %s, sector %d, %d sectors, mem align %d%s",
            path,
            "NBD export" if self.is_nbd else "block device" if self.is_blockdev else "image file",
            self.sector_size,
            self.total_sectors,
            self.mem_align,
            ", read-only" if read_only else "",
        )

    @property
    def fd(self) -> int:
        """The descriptor (-1 once closed); for diagnostics, never for I/O around the valve."""
        return int(self._dev.fd)

    def counters(self) -> tuple[int, int, int, int, int]:
        """(reads, writes, sectors_read, sectors_written, barriers), kept by the core."""
        d = self._dev
        return (
            int(d.reads), int(d.writes), int(d.sectors_read), int(d.sectors_written),
            int(d.barriers),
        )

    def close(self) -> None:
        rc = self._c_close(self._h)
        if rc < 0:
            raise io_error(rc, self.path, "close")

    def alloc(self, nbytes: int) -> AlignedBuffer:
        if self.buffer_align > mmap.PAGESIZE:
            raise DeviceError(
                errno.EINVAL,
                f"needs {self.buffer_align}-byte buffer alignment, above the page size",
                self.path,
            )
        return AlignedBuffer(nbytes)

    def _bounce_buffer(self, nbytes: int) -> Any:
        """This thread's aligned scratch buffer of at least ``nbytes`` (a ``char *``)."""
        local = self._bounce
        buf = getattr(local, "buf", None)
        if buf is None or local.size < nbytes:
            size = max(nbytes, _MIN_BOUNCE)
            buf = _aligned_alloc(self.buffer_align, size)
            local.buf = buf
            local.size = size
        return buf

    def _direct(self, obj: object, ptr: Any, nbytes: int) -> bool:
        """May this memory go straight to O_DIRECT? (see valve.buffer for the rule)."""
        return (
            is_valve_memory(obj)
            and nbytes % self.sector_size == 0
            and int(ffi.cast("uintptr_t", ptr)) & self._mask == 0
        )

    def _read_target(self, into: Buffer, nbytes: int) -> tuple[memoryview, Any]:
        """A caller's buffer to read ``nbytes`` into, checked (writable, large enough):
        its byte view and its C pointer (the synchronous read and a ring submit alike)."""
        view = memoryview(into)
        if view.readonly:
            raise TypeError("into= must be a writable buffer")
        if view.nbytes < nbytes:
            raise RangeError(
                f"into= holds {view.nbytes} bytes, the read needs {nbytes}", self.path
            )
        target = ffi.from_buffer(view, require_writable=True)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        return view, target

    # -- transfers; each returns the number of bounce copies it made -----------------

    def read(self, lba: int, count: int, into: Buffer | None) -> tuple[memoryview, int]:
        nbytes = count * self.sector_size
        if into is None:
            # Fresh aligned memory owned by the returned view: zero copy, no bounce.
            buf = _aligned_alloc(self.buffer_align, nbytes)
            self._check(self._c_read(self._h, lba, buf, nbytes), "read", lba, count)
            return memoryview(ffi.buffer(buf, nbytes)), 0
        if type(into) is AlignedBuffer and self._page_aligned and len(into) >= nbytes:
            # The common case, kept short: an mmap is page aligned, nothing to compute.
            target = ffi.from_buffer(into, require_writable=True)
            self._check(self._c_read(self._h, lba, target, nbytes), "read", lba, count)
            view = memoryview(into)
            return (view if len(into) == nbytes else view[:nbytes]), 0
        view, target = self._read_target(into, nbytes)
        if self._direct(into, target, nbytes):
            self._check(self._c_read(self._h, lba, target, nbytes), "read", lba, count)
            return view[:nbytes], 0
        bounce = self._bounce_buffer(nbytes)
        self._check(self._c_read(self._h, lba, bounce, nbytes), "read", lba, count)
        ffi.memmove(target, bounce, nbytes)
        return view[:nbytes], 1

    def write(
        self, lba: int, count: int, data: Buffer | Sequence[Buffer], durable: bool
    ) -> int:
        nbytes = count * self.sector_size
        if isinstance(data, list | tuple):
            return self._writev(lba, count, nbytes, data, durable)
        if type(data) is AlignedBuffer and self._page_aligned and len(data) == nbytes:
            rc = self._c_write(self._h, lba, ffi.from_buffer(data), nbytes, int(durable))
            self._check(rc, "write", lba, count)
            return 0
        src = ffi.from_buffer(data)
        if len(src) != nbytes:
            raise RangeError(
                f"data is {len(src)} bytes, {count} sectors need {nbytes}", self.path
            )
        if self._direct(data, src, nbytes):
            rc = self._c_write(self._h, lba, src, nbytes, int(durable))
            self._check(rc, "write", lba, count)
            return 0
        bounce = self._bounce_buffer(nbytes)
        ffi.memmove(bounce, src, nbytes)
        self._check(self._c_write(self._h, lba, bounce, nbytes, int(durable)), "write", lba, count)
        return 1

    def _writev(
        self, lba: int, count: int, nbytes: int, data: Sequence[Buffer], durable: bool
    ) -> int:
        srcs = [ffi.from_buffer(piece) for piece in data]
        total = sum(len(src) for src in srcs)
        if total != nbytes:
            raise RangeError(
                f"data pieces total {total} bytes, {count} sectors need {nbytes}", self.path
            )
        sector = self.sector_size
        iov = ffi.new("struct iovec[]", len(srcs) or 1)
        used = 0
        copies = 0
        bounce: Any = None
        filled = 0  # bytes of the bounce buffer in use
        run = -1  # start of the open bounce run, -1 when none
        for piece, src in zip(data, srcs, strict=True):
            size = len(src)
            if size == 0:
                continue
            # A piece may go direct only where the I/O so far ends on a sector boundary:
            # an open bounce run of a partial sector must absorb what follows.
            if (run < 0 or (filled - run) % sector == 0) and self._direct(piece, src, size):
                if run >= 0:
                    iov[used].iov_base = bounce + run
                    iov[used].iov_len = filled - run
                    used += 1
                    run = -1
                iov[used].iov_base = src
                iov[used].iov_len = size
                used += 1
                continue
            if bounce is None:
                bounce = ffi.cast("char *", self._bounce_buffer(nbytes))
            if run < 0:
                run = filled
            ffi.memmove(bounce + filled, src, size)
            filled += size
            copies += 1
        if run >= 0:
            iov[used].iov_base = bounce + run
            iov[used].iov_len = filled - run
            used += 1
        rc = self._c_writev(self._h, lba, iov, used, int(durable))
        self._check(rc, "write", lba, count)
        return copies

    # -- asynchronous transfers (valve.ring) ------------------------------------------

    @property
    def core(self) -> Any:
        """The ``struct nx_dev *`` (for the valve's rings; never for I/O around the valve)."""
        return self._dev

    def open_ring(self, mode: int, depth: int, threads: int, out: Any) -> int:
        """``nx_ring_open`` for this backend (0 or -errno; ``out[0]`` the ring).  An export's
        ring is ``nx_nbd_ring_open``'s: libnbd's asynchronous commands (``callbacks``) or the
        pool whose workers move each request with the NBD backend's vectored transfer, each
        with its deadline; io_uring is refused before this (``Valve.ring``)."""
        if self.is_nbd:
            return int(lib.nx_nbd_ring_open(self._h, mode, depth, threads, out))
        return int(lib.nx_ring_open(self._dev, mode, depth, threads, out))

    def prepare(
        self, write: bool, lba: int, count: int, data: Buffer | Sequence[Buffer] | None
    ) -> tuple[Any, int, Pending, int]:
        """The iovec of one asynchronous transfer: (iov, iovcnt, Pending, bounce copies).

        The same buffer rules as the blocking forms, except that a bounce buffer is the
        request's own (it lives until the request is reaped: the per-thread one could be
        reused by the next request while this one is in flight).
        """
        nbytes = count * self.sector_size
        iov = ffi.new("struct iovec[]", 1)
        if not write:
            if data is None:
                buf = _aligned_alloc(self.buffer_align, nbytes)
                iov[0].iov_base, iov[0].iov_len = buf, nbytes
                view = memoryview(ffi.buffer(buf, nbytes))
                return iov, 1, Pending(False, lba, count, nbytes, (buf,), view), 0
            if type(data) is AlignedBuffer and self._page_aligned and len(data) >= nbytes:
                target = ffi.from_buffer(data, require_writable=True)
                iov[0].iov_base, iov[0].iov_len = target, nbytes
                view = memoryview(data)
                view = view if len(data) == nbytes else view[:nbytes]
                return iov, 1, Pending(False, lba, count, nbytes, (data, target), view), 0
            view, target = self._read_target(data, nbytes)  # type: ignore[arg-type]
            if self._direct(data, target, nbytes):
                iov[0].iov_base, iov[0].iov_len = target, nbytes
                keep: tuple[object, ...] = (data, target)
                return iov, 1, Pending(False, lba, count, nbytes, keep, view[:nbytes]), 0
            bounce = _aligned_alloc(self.buffer_align, nbytes)
            iov[0].iov_base, iov[0].iov_len = bounce, nbytes
            keep = (data, target, bounce)
            pending = Pending(False, lba, count, nbytes, keep, view[:nbytes], bounce, target)
            return iov, 1, pending, 1
        assert data is not None
        given = list(data) if isinstance(data, list | tuple) else [data]
        pairs = [(piece, ffi.from_buffer(piece)) for piece in given]
        pieces = [piece for piece, src in pairs if len(src)]
        srcs = [src for _, src in pairs if len(src)]
        total = sum(len(src) for src in srcs)
        if total != nbytes:
            raise RangeError(f"data is {total} bytes, {count} sectors need {nbytes}", self.path)
        if all(self._direct(p, s, len(s)) for p, s in zip(pieces, srcs, strict=True)):
            iov = ffi.new("struct iovec[]", len(srcs))
            for i, src in enumerate(srcs):
                iov[i].iov_base, iov[i].iov_len = src, len(src)
            return iov, len(srcs), Pending(True, lba, count, nbytes, (*pieces, *srcs), None), 0
        # Anything not direct: the whole request goes through its own bounce buffer.
        bounce = _aligned_alloc(self.buffer_align, nbytes)
        at = ffi.cast("char *", bounce)
        for src in srcs:
            ffi.memmove(at, src, len(src))
            at += len(src)
        iov[0].iov_base, iov[0].iov_len = bounce, nbytes
        return iov, 1, Pending(True, lba, count, nbytes, (bounce,), None), len(pieces)

    def _check(self, rc: int, what: str, lba: int, count: int) -> None:
        if rc < 0:
            raise self.error(rc, what, lba, count)

    def error(self, rc: int, what: str, lba: int, count: int) -> OSError:
        """The exception for ``rc`` (-errno) of a transfer, blocking or on a ring."""
        if rc == -errno.EBADF and self._dev.closing:
            # Lost a race with Valve.close: to the caller that is a revoked capability.
            return CapabilityError(f"{what}: valve is closed", self.path)
        where = f"{what} of {count} sectors at lba {lba}"
        reason = nbd.failure_reason(self._h) if self.is_nbd else ""
        if reason:
            # Say why the connection is gone (timeout, server closed it), not just EIO.
            return DeviceError(-rc, f"{where} failed: {os.strerror(-rc)} ({reason})", self.path)
        return io_error(rc, self.path, where)


def _aligned_alloc(align: int, nbytes: int) -> Any:
    ptr = lib.nx_alloc(align, nbytes)
    if ptr == ffi.NULL:
        raise MemoryError(f"cannot allocate {nbytes} aligned bytes")
    return ffi.gc(ptr, lib.nx_free, size=nbytes)
