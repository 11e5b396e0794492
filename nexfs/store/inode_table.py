"""The inode table: the raw 256-byte inode records of a volume, by inode number.

One :class:`InodeTable` per open volume (``Store.itable``).  It finds the table block and
slot of an inode (nexfs/ondisk/inode_table_block.py), reads and writes the raw record, and
zeroes a slot when the metadata store allocates or frees the inode; decoding and verifying
a record is the inode codec's job (nexfs/ondisk/inode_record.py), and which numbers are in
use is the inode bitmap's (an allocator of the metadata store).  Table blocks are metadata
blocks like any other: cached and journaled by the metadata store.

A table block none of whose inodes is in use may never have been written (mkfs does not
write the table): it is created zero-filled instead of read.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, cast

from nexfs.ondisk.inode_table_block import InodeTableBlock, first_inode_of, locate
from nexfs.ondisk.layout import INODE_SIZE, INODES_PER_BLOCK
from nexfs.store.failure import boundary
from nexfs.types import BlockNo, CorruptionError, FsError, InodeNo

if TYPE_CHECKING:
    from nexfs.store.store import Store

_ZERO_SLOT = bytes(INODE_SIZE)  # clear_slot's zeros, built once (twice per created file)


class InodeTable:
    """Raw inode records over the metadata store's cache and transactions."""

    def __init__(self, meta: Store) -> None:
        self._meta = meta
        self.failures = meta.failures
        self._itable_start = meta.geo.itable_start
        self._ninodes = meta.geo.ninodes

    def check_ino(self, ino: int) -> None:
        """FsError(EINVAL) for an inode number outside the table."""
        if not 1 <= ino <= self._ninodes:
            raise FsError(errno.EINVAL, f"inode number {ino} out of range")

    def _table_block(self, ino: int) -> tuple[InodeTableBlock, int]:
        meta = self._meta
        tblk, slot = locate(self._itable_start, InodeNo(ino))
        blk = meta.cached(tblk)
        if blk is None:
            first = first_inode_of(self._itable_start, tblk)
            try:
                in_use = meta.inodes.count_set(first, INODES_PER_BLOCK)
            except CorruptionError:
                # The inode bitmap cannot vouch for this block (its damage is reported
                # where it was read): the table block itself is the evidence, never a
                # stand-in of zeros, which would make every inode in it look corrupt.
                in_use = INODES_PER_BLOCK
            if not in_use:
                # No inode of this block is in use: it may never have been written.
                blk = InodeTableBlock(tblk)
                meta.adopt(blk)
            else:
                blk = meta.get(tblk, InodeTableBlock.decode)
        return cast(InodeTableBlock, blk), slot

    @boundary
    def read_raw(self, ino: InodeNo) -> bytes:
        """The 256 raw bytes of inode ``ino`` (verification is the inode codec's job)."""
        self.check_ino(ino)
        blk, slot = self._table_block(ino)
        return bytes(blk.slot(slot))

    @boundary
    def write_raw(self, ino: InodeNo, raw: bytes | bytearray | memoryview) -> None:
        """Store the 256 raw bytes of inode ``ino``; its table block joins the transaction."""
        self._meta.check_writable()
        self.check_ino(ino)
        if len(raw) != INODE_SIZE:
            raise ValueError(f"inode image must be {INODE_SIZE} bytes")
        blk, slot = self._table_block(ino)
        blk.slot(slot)[:] = raw
        self._meta.dirty(blk)

    def clear_slot(self, ino: InodeNo) -> None:
        """Zero inode ``ino``'s slot in the running transaction (the metadata store's inode
        allocator calls it before it sets or clears the inode's bit: the block's state in the
        bitmap decides whether it is read or created), so that the table block is written
        once one of its inodes is in use, and no record of a free inode is left for anything
        (fsck rebuilding a damaged inode bitmap from the table) to take for a live one."""
        self.check_ino(ino)
        blk, slot = self._table_block(ino)
        blk.slot(slot)[:] = _ZERO_SLOT
        self._meta.dirty(blk)

    def block_of(self, ino: InodeNo) -> BlockNo:
        """The inode table block holding inode ``ino`` (for error messages)."""
        self.check_ino(ino)
        return locate(self._itable_start, ino)[0]
