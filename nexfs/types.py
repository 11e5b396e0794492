"""Unit types and the filesystem's error classes.

Separate ``NewType``s keep a sector address, a filesystem block number, a byte offset and an
inode number from being mixed up by accident.  Errors travel upwards as :class:`FsError`
carrying an errno; the FUSE adapter turns them into ``FUSEError`` in exactly one place.
"""

from __future__ import annotations

import errno as _errno
from typing import NewType

Lba = NewType("Lba", int)
"""A sector address on the valve (units of the device's sector size)."""

BlockNo = NewType("BlockNo", int)
"""A filesystem block number (units of BLOCK_SIZE bytes from the start of the volume)."""

LBlock = NewType("LBlock", int)
"""A logical block number inside a file (byte offset // BLOCK_SIZE)."""

InodeNo = NewType("InodeNo", int)
"""An inode number (1 is the root directory; 0 is never a valid inode)."""

ByteOffset = NewType("ByteOffset", int)
"""A byte offset inside a file."""


class FsError(Exception):
    """A filesystem operation failed with a POSIX errno (ENOENT, ENOSPC, ...)."""

    errno: int = _errno.EIO

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(err, str(err)))
        self.errno = err


class CorruptionError(FsError):
    """A metadata structure failed validation (bad checksum, magic, range or shape).

    Carries where it was found so the log line names the block and the structure.  Raising one
    marks the volume as needing fsck and turns the mount read-only; the caller sees EIO.
    """

    def __init__(self, blkno: int, structure: str, reason: str) -> None:
        super().__init__(_errno.EIO, f"corrupt {structure} at block {blkno}: {reason}")
        self.blkno = blkno
        self.structure = structure
        self.reason = reason


def fs_error(err: int, message: str = "") -> FsError:
    """Shorthand used throughout the core: ``raise fs_error(errno.ENOENT)``."""
    return FsError(err, message)
