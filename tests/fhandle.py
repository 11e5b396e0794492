"""File handles from Python: ``name_to_handle_at(2)`` and ``open_by_handle_at(2)`` via ctypes,
and ``renameat2(2)`` (Python's os module has none of them).

A handle is kept as ``(handle_type, bytes)``, exactly what a user-space NFS server stores; it
can be opened again through any file descriptor on the same filesystem, including one opened
on a later mount of the same volume.
"""

from __future__ import annotations

import ctypes
import os

MAX_HANDLE_SZ = 128
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_libc = ctypes.CDLL(None, use_errno=True)


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


Handle = tuple[int, bytes]


def _raise(what: str, path: object = None) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}", *([str(path)] if path else []))


def name_to_handle(path: os.PathLike[str] | str) -> Handle:
    """The handle of ``path`` (not following a final symlink)."""
    fh = _FileHandle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), ctypes.byref(fh),
                               ctypes.byref(mount_id), 0) != 0:
        _raise("name_to_handle_at", path)
    return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes])


def open_by_handle(mount_fd: int, handle: Handle, flags: int = os.O_RDONLY) -> int:
    """A new file descriptor for ``handle`` on the filesystem of ``mount_fd`` (needs
    CAP_DAC_READ_SEARCH)."""
    kind, data = handle
    fh = _FileHandle(handle_bytes=len(data), handle_type=kind)
    ctypes.memmove(fh.f_handle, data, len(data))
    fd: int = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags)
    if fd < 0:
        _raise("open_by_handle_at")
    return fd


def renameat2(old: os.PathLike[str] | str, new: os.PathLike[str] | str, flags: int) -> None:
    """``renameat2(AT_FDCWD, old, AT_FDCWD, new, flags)``."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new),
                       ctypes.c_uint(flags)) != 0:
        _raise("renameat2", old)
