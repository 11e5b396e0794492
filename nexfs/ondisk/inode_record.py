"""The on-disk inode: a 256-byte record with its own CRC32C, and its decoded form.

Layout (little-endian; see docs/FORMAT.md, "Inode"):

====  ====  =============================================================
off   size  field
====  ====  =============================================================
0     4     mode (file type and permission bits, as st_mode)
4     4     uid
8     4     gid
12    4     nlink
16    8     size in bytes
24    8     blocks: filesystem blocks owned (data + tree nodes + xattr nodes)
32    8     rdev (device number for character/block nodes)
40    12    atime: s64 seconds, u32 nanoseconds
52    12    mtime
64    12    ctime
76    12    btime (birth)
88    4     generation (bumped each time the inode number is reused)
92    4     flags (INODE_FLAG_*)
96    8     xattr tree root block (0 = no extended attributes)
104   8     orphan list: next inode number (0 = end of list)
112   8     parent directory inode (directories only; 0 otherwise)
120   4     reserved, zero
124   4     crc32c of the 256 bytes with this field zero, seeded by the volume
            UUID and the inode number
128   128   data area: the extent map (regular files, long symlinks), the
            directory index root (directories), or an inline symlink target
====  ====  =============================================================

A slot whose inode is free is all zeros (fsck's cleared slots: zeros and a valid checksum).
The inode bitmap, not the slot, says whether an inode is in use (docs/FORMAT.md).
"""

from __future__ import annotations

import stat
import struct

from nexfs.ondisk import checksum
from nexfs.types import CorruptionError, InodeNo

INODE_SIZE = 256
DATA_AREA_OFFSET = 128
DATA_AREA_SIZE = 128
_CRC_OFFSET = 124

_FIXED = struct.Struct("<IIIIQQQ qI qI qI qI IIQQQI")
assert _FIXED.size == _CRC_OFFSET

DIR_ROOT = struct.Struct("<Q")
"""Directories: the directory index's root block, at the start of the data area (the rest of
the area is zero)."""

INODE_FLAG_INLINE = 0x1
"""The data area holds the symlink target itself (targets up to DATA_AREA_SIZE bytes)."""
INODE_FLAG_ORPHAN = 0x2
"""The inode is on the orphan list (unlinked while in use, or a truncate in progress)."""
KNOWN_FLAGS = INODE_FLAG_INLINE | INODE_FLAG_ORPHAN

_VALID_TYPES = frozenset(
    {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR,
     stat.S_IFBLK}
)


class Inode:
    """A decoded inode.  The filesystem changes fields and marks it dirty; the inode is
    encoded into its table slot when the transaction is prepared for commit."""

    __slots__ = (
        "area", "atime_ns", "blocks", "btime_ns", "ctime_ns", "flags", "generation",
        "gid", "ino", "mode", "mtime_ns", "nlink", "orphan_next", "parent", "rdev", "size",
        "uid", "xattr_root",
    )

    def __init__(self, ino: InodeNo) -> None:
        self.ino = ino
        self.mode = 0
        self.uid = 0
        self.gid = 0
        self.nlink = 0
        self.size = 0
        self.blocks = 0
        self.rdev = 0
        self.atime_ns = 0
        self.mtime_ns = 0
        self.ctime_ns = 0
        self.btime_ns = 0
        self.generation = 0
        self.flags = 0
        self.xattr_root = 0
        self.orphan_next = 0
        self.parent = 0
        self.area = bytearray(DATA_AREA_SIZE)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def encode(self, volume_seed: int) -> bytes:
        """The 256-byte on-disk record, checksum included."""
        out = bytearray(INODE_SIZE)
        _FIXED.pack_into(
            out, 0, self.mode, self.uid, self.gid, self.nlink, self.size, self.blocks,
            self.rdev, *_split(self.atime_ns), *_split(self.mtime_ns), *_split(self.ctime_ns),
            *_split(self.btime_ns), self.generation, self.flags, self.xattr_root,
            self.orphan_next, self.parent, 0,
        )
        out[DATA_AREA_OFFSET:] = self.area
        checksum.seal(out, _CRC_OFFSET, volume_seed, self.ino)
        return bytes(out)

    @classmethod
    def decode(cls, ino: InodeNo, raw: bytes | memoryview, volume_seed: int,
               table_block: int = 0) -> Inode:
        """Decode and validate; CorruptionError names the inode and its table block."""
        if not checksum.verify(raw, _CRC_OFFSET, volume_seed, ino):
            raise CorruptionError(table_block, f"inode {ino}", "checksum mismatch")
        (mode, uid, gid, nlink, size, blocks, rdev, a_s, a_n, m_s, m_n, c_s, c_n, b_s, b_n,
         generation, flags, xattr_root, orphan_next, parent, _res) = _FIXED.unpack_from(raw, 0)
        if stat.S_IFMT(mode) not in _VALID_TYPES:
            raise CorruptionError(table_block, f"inode {ino}", f"bad file type in mode {mode:o}")
        if flags & ~KNOWN_FLAGS:
            raise CorruptionError(table_block, f"inode {ino}", f"unknown flags {flags:#x}")
        if max(a_n, m_n, c_n, b_n) >= 1_000_000_000:
            raise CorruptionError(table_block, f"inode {ino}", "nanoseconds out of range")
        if size >= 1 << 63:
            raise CorruptionError(table_block, f"inode {ino}", "size out of range")
        if blocks >= 1 << 63:  # the next block added would not fit the field
            raise CorruptionError(table_block, f"inode {ino}", "block count out of range")
        inode = cls(ino)
        inode.mode, inode.uid, inode.gid, inode.nlink = mode, uid, gid, nlink
        inode.size, inode.blocks, inode.rdev = size, blocks, rdev
        inode.atime_ns = a_s * 1_000_000_000 + a_n
        inode.mtime_ns = m_s * 1_000_000_000 + m_n
        inode.ctime_ns = c_s * 1_000_000_000 + c_n
        inode.btime_ns = b_s * 1_000_000_000 + b_n
        inode.generation, inode.flags = generation, flags
        inode.xattr_root, inode.orphan_next, inode.parent = xattr_root, orphan_next, parent
        inode.area = bytearray(raw[DATA_AREA_OFFSET:INODE_SIZE])
        return inode


def free_slot(ino: InodeNo, volume_seed: int) -> bytes:
    """The record of a free inode slot: zeros, sealed (so fsck can verify every slot)."""
    out = bytearray(INODE_SIZE)
    checksum.seal(out, _CRC_OFFSET, volume_seed, ino)
    return bytes(out)


def _split(ns: int) -> tuple[int, int]:
    sec, nsec = divmod(ns, 1_000_000_000)
    return sec, nsec
