"""Exceptions raised by the Block Valve, and the one place that maps ``-errno`` to them.

Every exception is an :class:`OSError` carrying an ``errno`` (so the filesystem can
turn any of them into a ``FUSEError`` with a single ``except OSError``), and prints
as one line naming the path and the reason: ``disk.img: in use by another process
(locked)``.
"""

from __future__ import annotations

import errno as _errno
import os

from native import lib

__all__ = [
    "CapabilityError",
    "DeviceBusyError",
    "DeviceError",
    "DirectIONotSupported",
    "RangeError",
    "io_error",
    "open_error",
]


class _OneLine(OSError):
    """``str()`` is ``"<path>: <reason>"`` instead of ``"[Errno N] <reason>: '<path>'"``."""

    def __str__(self) -> str:
        if self.filename is None:
            return str(self.strerror)
        return f"{os.fsdecode(self.filename)}: {self.strerror}"


class CapabilityError(_OneLine, PermissionError):
    """An operation was refused by the capability check (errno ``EPERM``).

    Raised for a capability the valve did not mint, one that is revoked (or whose
    valve is closed), one that lacks the right, or one whose LBA window does not
    cover the request.  No sector is touched and the valve counts a denial.
    """

    def __init__(self, reason: str, path: str | None = None) -> None:
        super().__init__(_errno.EPERM, reason, path)


class DeviceError(_OneLine):
    """The device or image failed: opening it, or an I/O on it (errno from the kernel)."""


class DeviceBusyError(DeviceError):
    """The device is in use: an image file is locked, or a block device is claimed."""


class DirectIONotSupported(DeviceError):
    """The target opens normally but refuses ``O_DIRECT`` (errno ``EINVAL``).

    There is deliberately no buffered fallback: the valve's durability and
    zero-copy guarantees only hold for direct I/O.
    """


class RangeError(_OneLine, ValueError):
    """A request outside the device or not whole sectors (errno ``EINVAL``).

    Both a :class:`ValueError` (it is the caller's mistake) and an :class:`OSError`
    (so the filesystem's single errno translation handles it too).
    """

    def __init__(self, reason: str, path: str | None = None) -> None:
        super().__init__(_errno.EINVAL, reason, path)


def io_error(rc: int, path: str, what: str) -> DeviceError:
    """The exception for a failed transfer; ``rc`` is the core's ``-errno``."""
    err = -rc
    return DeviceError(err, f"{what} failed: {os.strerror(err)}", path)


def open_error(rc: int, stage: int, path: str, *, read_only: bool) -> DeviceError:
    """The exception for a failed ``nx_open``; ``stage`` says which step refused."""
    err = -rc
    if stage == lib.NX_STAGE_DIRECT:
        return DirectIONotSupported(
            err, "does not support O_DIRECT (direct I/O); refusing buffered I/O", path
        )
    if stage == lib.NX_STAGE_LOCK and err in (_errno.EWOULDBLOCK, _errno.EAGAIN):
        # A reader is only ever refused by a writer (shared locks coexist).
        how = "locked for writing, e.g. mounted" if read_only else "locked"
        return DeviceBusyError(err, f"in use by another process ({how})", path)
    if stage == lib.NX_STAGE_BUSY:
        return DeviceBusyError(
            err, "in use by another process (block device claimed or mounted)", path
        )
    if stage == lib.NX_STAGE_TYPE:
        return DeviceError(err, "not a regular file or block device", path)
    if stage == lib.NX_STAGE_GEOMETRY:
        return DeviceError(err, f"cannot read geometry: {os.strerror(err)}", path)
    return DeviceError(err, os.strerror(err), path)
