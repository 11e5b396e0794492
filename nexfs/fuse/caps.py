"""Asking the kernel for FUSE_CAP_DONT_MASK, which pyfuse3 cannot ask for.

Why: without DONT_MASK the kernel applies the caller's umask to the mode of every
create/mkdir/mknod before the request reaches NexFS, and the bits it clears are lost.  POSIX
says the umask does not apply under a directory's default ACL (the ACL decides instead), so
with the mode already cut, inheritance comes out wrong: ``umask 077; touch shared/f`` in a
directory whose default ACL grants a group rw gives that group nothing, where ext4 gives it
rw.  With DONT_MASK the kernel sends the mode uncut plus the umask, and the core applies the
umask itself unless a default ACL decides (nexfs/core/fs.py, ``_umask``).

How: pyfuse3 3.x builds its ``fuse_lowlevel_ops`` table and creates the libfuse session in
``pyfuse3.init()``, and its INIT handler sets only the three capabilities it knows
(writeback cache, export support, POSIX ACL).  The INIT request is answered later, in the
main loop.  In between, :func:`request_dont_mask` finds the session's copy of the ``init``
callback and puts a wrapper in its place that calls pyfuse3's handler and then adds
DONT_MASK to ``conn->want`` (``struct fuse_conn_info`` is libfuse's public, stable layout).

This reads two private symbols of the pyfuse3 extension from its ELF symbol table (the
session pointer and the address of its INIT handler), so it checks everything before it
writes anything: a 64-bit little-endian ELF, both symbols present, the session pointer set,
and exactly one word in the first bytes of the session equal to the handler's address.
Anything else and it changes nothing and returns False: the mount then works as before, with
the kernel applying the umask (and default ACLs limited by it).
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

FUSE_CAP_DONT_MASK = 1 << 6
"""fuse_common.h: "don't apply umask to file mode on create operations"."""

SESSION_SYMBOL = b"__pyx_v_7pyfuse3_session"
INIT_SYMBOL = b"__pyx_f_7pyfuse3_fuse_init"
SCAN_BYTES = 256
"""How far into ``struct fuse_session`` to look for ``op.init`` (it is the first member of
``op``, which follows five small fields: offset 48 in libfuse 3.10-3.16)."""


class ConnInfo(ctypes.Structure):
    """The leading fields of libfuse's ``struct fuse_conn_info`` (fuse_common.h)."""

    _fields_ = [("proto_major", ctypes.c_uint), ("proto_minor", ctypes.c_uint),
                ("max_write", ctypes.c_uint), ("max_read", ctypes.c_uint),
                ("max_readahead", ctypes.c_uint), ("capable", ctypes.c_uint),
                ("want", ctypes.c_uint)]


_InitFn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ConnInfo))
# pyfuse3's handler runs Python code: it must be called with the GIL held, which a
# PYFUNCTYPE call keeps (a CFUNCTYPE call releases it, and the handler then crashes).
_PyInitFn = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ConnInfo))
_installed: list[object] = []  # the wrapper must live as long as the session


def elf_symbols(path: Path, names: set[bytes]) -> dict[bytes, int]:
    """Values (addresses relative to the load base) of ``names`` in the ELF symbol table
    (.symtab) of a 64-bit little-endian shared object.  ValueError if it is not one."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    found: dict[bytes, int] = {}
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != 2 or not entsize:  # SHT_SYMTAB
            continue
        str_offset = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            st_name, _st_info, _other, _shndx, st_value, _size = struct.unpack_from(
                "<IBBHQQ", data, pos)
            end = data.index(b"\0", str_offset + st_name)
            symbol = data[str_offset + st_name:end]
            if symbol in names:
                found[symbol] = st_value
    return found


def load_base(path: Path) -> int:
    """Where ``path`` is mapped in this process (its mapping at file offset 0)."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    raise ValueError(f"{real} is not mapped")


def request_dont_mask() -> bool:
    """Make the coming INIT reply ask for FUSE_CAP_DONT_MASK (see the module docstring).
    Call after ``pyfuse3.init()`` and before the main loop; True if it was arranged."""
    import pyfuse3

    try:
        module = Path(pyfuse3.__file__)
        symbols = elf_symbols(module, {SESSION_SYMBOL, INIT_SYMBOL})
        if set(symbols) != {SESSION_SYMBOL, INIT_SYMBOL}:
            raise ValueError(f"{module.name}: symbols not found (a stripped build?)")
        base = load_base(module)
        session = ctypes.c_void_p.from_address(base + symbols[SESSION_SYMBOL]).value
        if not session:
            raise ValueError("no FUSE session yet")
        handler = base + symbols[INIT_SYMBOL]
        slots = [off for off in range(0, SCAN_BYTES, 8)
                 if ctypes.c_void_p.from_address(session + off).value == handler]
        if len(slots) != 1:
            raise ValueError(f"init callback found {len(slots)} times in the session")
    except (OSError, ValueError, struct.error, IndexError) as exc:
        log.warning("cannot ask the kernel for FUSE_CAP_DONT_MASK (%s): the umask also "
                    "applies under default ACLs", exc)
        return False
    original = _PyInitFn(handler)

    def init(userdata: int | None, conn: ctypes._Pointer[ConnInfo]) -> None:
        original(userdata, conn)
        info = conn.contents
        if info.capable & FUSE_CAP_DONT_MASK:
            info.want |= FUSE_CAP_DONT_MASK

    wrapper = _InitFn(init)
    _installed.append(wrapper)
    ctypes.c_void_p.from_address(session + slots[0]).value = ctypes.cast(
        wrapper, ctypes.c_void_p).value
    return True
