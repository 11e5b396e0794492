"""Inode table blocks: 16 raw 256-byte inode slots, no common header.

Each inode seals itself (its CRC32C is computed by the inode codec in
nexfs/ondisk/inode_record.py), so the table block is only a container.  A table block none
of whose 16 inodes is allocated may never
have been written (mkfs does not write the table); the store then creates it zero-filled
instead of reading it.
"""

from __future__ import annotations

from nexfs.ondisk.layout import INODE_SIZE, INODES_PER_BLOCK
from nexfs.ondisk.metablock import BLOCK_SIZE, MetaBlock
from nexfs.types import BlockNo, InodeNo


class InodeTableBlock(MetaBlock):
    """4096 raw bytes; ``slot(i)`` is a writable view of inode slot i."""

    __slots__ = ("raw",)

    def __init__(self, blkno: BlockNo, raw: bytes | memoryview | None = None) -> None:
        super().__init__(blkno)
        self.raw = bytearray(raw) if raw is not None else bytearray(BLOCK_SIZE)

    def encode(self, out: memoryview, volume_seed: int, tid: int) -> None:
        out[:] = self.raw

    def slot(self, i: int) -> memoryview:
        return memoryview(self.raw)[i * INODE_SIZE : (i + 1) * INODE_SIZE]

    @classmethod
    def decode(cls, blkno: BlockNo, raw: memoryview) -> InodeTableBlock:
        return cls(blkno, raw)


def locate(itable_start: int, ino: InodeNo) -> tuple[BlockNo, int]:
    """(table block, slot) of inode ``ino`` (1-based: inode N is table index N-1)."""
    blk, slot = divmod(ino - 1, INODES_PER_BLOCK)
    return BlockNo(itable_start + blk), slot


def first_inode_of(itable_start: int, blkno: int) -> int:
    return (blkno - itable_start) * INODES_PER_BLOCK + 1
