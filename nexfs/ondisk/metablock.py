"""The contract between the metadata store (cache + journal + allocator) and its users.

Every metadata block except the superblock and the journal's own blocks starts with the
common 32-byte header below and is sealed with a CRC32C bound to the volume UUID and the
block's own number (see docs/FORMAT.md, "Common block header").  Users (the B+trees, the
inode table, the bitmaps) subclass :class:`MetaBlock`, decode it from raw bytes, change the
decoded object in memory, and call :meth:`MetaStore.dirty` so it joins the running
transaction; the store encodes it once, when the transaction commits.

Concurrency invariant: the store and everything built on it are single-threaded and
synchronous.  They are called from one trio task; no ``await`` happens inside an operation,
so an operation is never interleaved with another.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol, TypeVar

from nexfs.ondisk import checksum
from nexfs.types import BlockNo, CorruptionError, InodeNo

BLOCK_SIZE = 4096
"""Filesystem block size in bytes (fixed; independent of the device's sector size)."""

HEADER = struct.Struct("<IIQQQ")
"""Common header: magic u32, crc32c u32, self block number u64, owner u64, tid u64."""
HEADER_SIZE = HEADER.size  # 32
CRC_OFFSET = 4

# Magic numbers of the metadata block kinds (little-endian u32 at offset 0).
MAGIC_BITMAP = 0x4D425846  # "FXBM": block bitmap
MAGIC_IBITMAP = 0x4D495846  # "FXIM": inode bitmap
MAGIC_SUMMARY = 0x4D535846  # "FXSM": free-count summary of bitmap blocks
MAGIC_STATE = 0x54535846  # "FXST": journaled state block
MAGIC_BTREE_LEAF = 0x4C425846  # "FXBL": B+tree leaf node
MAGIC_BTREE_INNER = 0x49425846  # "FXBI": B+tree interior node
MAGIC_ISUMMARY = 0x53495846  # "FXIS": free-count summary of inode bitmap blocks
# Journal blocks have their own header (see nexfs/store/journal.py) but share the magic registry so
# that no two structures can ever be confused.
MAGIC_JDESC = 0x444A5846  # "FXJD": journal descriptor block
MAGIC_JCOMMIT = 0x434A5846  # "FXJC": journal commit block
MAGIC_MMP = 0x504D5846  # "FXMP": multi-mount protection block (nexfs/store/mmp.py)

M = TypeVar("M", bound="MetaBlock")


class MetaBlock(ABC):
    """A decoded metadata block held by the store's cache."""

    __slots__ = ("blkno",)

    def __init__(self, blkno: BlockNo) -> None:
        self.blkno = blkno

    @abstractmethod
    def encode(self, out: memoryview, volume_seed: int, tid: int) -> None:
        """Serialise into ``out`` (exactly BLOCK_SIZE bytes), header and checksum included."""


def pack_header(out: memoryview, magic: int, blkno: int, owner: int, tid: int) -> None:
    """Write the common header (crc left zero; call :func:`seal_block` last)."""
    HEADER.pack_into(out, 0, magic, 0, blkno, owner, tid)


def seal_block(out: memoryview, volume_seed: int, blkno: int) -> None:
    """Store the block's CRC32C (bound to the volume and ``blkno``) in its header."""
    checksum.seal(out, CRC_OFFSET, volume_seed, blkno)


def check_header(
    raw: memoryview | bytes, blkno: int, magic: int | tuple[int, ...], volume_seed: int,
    structure: str, owner: int | None = None,
) -> tuple[int, int, int]:
    """Validate magic, checksum, self-number and (optionally) owner of a raw block.

    Returns ``(magic, owner, tid)``.  Raises :class:`CorruptionError` naming ``structure`` and
    ``blkno`` on any mismatch, so no caller ever trusts an unverified block.
    """
    got_magic, _crc, self_no, got_owner, tid = HEADER.unpack_from(raw, 0)
    magics = magic if isinstance(magic, tuple) else (magic,)
    if got_magic not in magics:
        if not any(raw):
            raise CorruptionError(blkno, structure, "block is all zeros")
        raise CorruptionError(blkno, structure, f"bad magic {got_magic:#010x}")
    if not checksum.verify(raw, CRC_OFFSET, volume_seed, blkno):
        raise CorruptionError(blkno, structure, "checksum mismatch")
    if self_no != blkno:
        raise CorruptionError(blkno, structure, f"misdirected write (says block {self_no})")
    if owner is not None and got_owner != owner:
        raise CorruptionError(blkno, structure, f"owned by inode {got_owner}, expected {owner}")
    return got_magic, got_owner, tid


class MetaStore(Protocol):
    """What the trees, the inode table and the filesystem need from the metadata store."""

    volume_seed: int

    def get(self, blkno: BlockNo, decode: Callable[[BlockNo, memoryview], M]) -> M:
        """Return the cached decoded block, or read, verify (decode raises
        CorruptionError) and cache it.  ``decode`` receives a read-only view of BLOCK_SIZE
        bytes that is only valid during the call."""
        ...

    def put_new(self, block: MetaBlock) -> None:
        """Add a freshly built block (just allocated; never read from disk), dirty."""
        ...

    def dirty(self, block: MetaBlock) -> None:
        """The block changed in memory: write it with the running transaction."""
        ...

    def alloc_meta(self, goal: BlockNo | None, owner: InodeNo) -> BlockNo:
        """Allocate one block for metadata near ``goal``; FsError(ENOSPC) when full."""
        ...

    def free_meta(self, blkno: BlockNo) -> None:
        """Free a metadata block: it leaves the cache and the running transaction, and is
        reusable only after the freeing transaction is checkpointed."""
        ...
