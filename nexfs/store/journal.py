"""The metadata journal: physical block images, written linearly, replayed at mount.

A transaction occupies consecutive journal blocks::

    D_0 .. D_(ndesc-1)   descriptor blocks: the home block number of every image
    I_0 .. I_(n-1)       full 4096-byte images of the metadata blocks, in descriptor order
    C                    commit block: tid, sizes, and a CRC32C over all D and I blocks

Descriptor and commit blocks carry their own CRC32C bound to the volume and to their absolute
block number, and the tid.  The journal is linear: the first transaction after a checkpoint
starts at the first journal block and carries the tid recorded in the superblock
(``journal_tid``); each following one starts right after its predecessor with the next tid.
Replay stops at the first position that does not hold a complete, valid transaction with the
expected tid, so a torn or partial transaction, or a stale one from before the last
checkpoint, is never applied.  After an unclean stop the tid sequence restarts above every
tid the journal can still hold (:func:`restart_tid`), so a transaction of a lost timeline,
left behind the point where replay stopped, can never be taken for a new one.  No escaping
is needed: only positions reached by following the size fields are ever interpreted.

This module knows the format and does the I/O; *when* to commit and checkpoint is the
store's business (nexfs/store/store.py).
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from nexfs.ondisk import checksum
from nexfs.ondisk.metablock import BLOCK_SIZE, MAGIC_JCOMMIT, MAGIC_JDESC
from nexfs.store.blockdev import BlockDev
from nexfs.types import CorruptionError

log = logging.getLogger(__name__)

JHEADER = struct.Struct("<IIQQIHH")
"""Descriptor header: magic, crc, self block, tid, nimages (whole txn), index, ndesc."""
JCOMMIT = struct.Struct("<IIQQIIIIQ")
"""Commit: magic, crc, self block, tid, nblocks (whole txn), nimages, txn crc, 0, time ns."""
J_CRC_OFFSET = 4
DESC_ENTRIES = (BLOCK_SIZE - JHEADER.size) // 8  # 508 home block numbers per descriptor
_ENTRY = struct.Struct("<Q")


def ndesc_for(nimages: int) -> int:
    return max(1, -(-nimages // DESC_ENTRIES))


def txn_blocks(nimages: int) -> int:
    """Journal blocks a transaction of ``nimages`` images occupies."""
    return ndesc_for(nimages) + nimages + 1


def max_txns(journal_len: int) -> int:
    """The most transactions a journal of ``journal_len`` blocks can hold at once: each takes
    at least 3 blocks (a descriptor, an image, a commit block) and none is ever overwritten
    before the next checkpoint."""
    return journal_len // txn_blocks(1)


def restart_tid(first_tid: int, replay_end: int, journal_len: int) -> int:
    """The first tid to hand out after recovering from an unclean stop.

    The journal may still hold readable transactions of the lost timeline *after* the point
    where replay stopped: commits are written without a barrier between them, so a later
    one can reach the disk while an earlier one does not.  A new transaction reusing one of
    their tids could end exactly where such a stale one begins, and the next replay would
    apply it.  Every tid any readable journal block can carry is below ``first_tid +
    max_txns(journal_len)`` (tids of earlier timelines are below ``first_tid``, by
    induction: each recovery and each checkpoint restarts above them), so starting there
    means no tid is reused while a block carrying it can still be read.  jbd2 skips one
    tid (``++info.end_transaction``) because its commits are ordered by a flush; ours are
    not, so we skip the journal's whole capacity.
    """
    return max(replay_end, first_tid + max_txns(journal_len))


def max_images(journal_len: int) -> int:
    """The largest transaction an empty journal of ``journal_len`` blocks can take."""
    n = journal_len - 2
    while n > 0 and txn_blocks(n) > journal_len:
        n -= 1
    return n


@dataclass
class PreparedTxn:
    """A transaction being built: the store encodes each image straight into its slot."""

    tid: int
    homes: list[int]
    buf: memoryview  # ndesc + n + 1 blocks, aligned

    @property
    def ndesc(self) -> int:
        return ndesc_for(len(self.homes))

    def image(self, i: int) -> memoryview:
        off = (self.ndesc + i) * BLOCK_SIZE
        return self.buf[off : off + BLOCK_SIZE]


@dataclass
class ReplayTxn:
    """A valid transaction found by :func:`scan`; ``data`` holds the images back to back."""

    tid: int
    pos: int  # journal-relative position of its first block
    homes: list[int]
    data: bytes

    @property
    def nblocks(self) -> int:
        return txn_blocks(len(self.homes))

    def image(self, i: int) -> memoryview:
        off = i * BLOCK_SIZE
        return memoryview(self.data)[off : off + BLOCK_SIZE]

    def image_pos(self, i: int) -> int:
        return self.pos + ndesc_for(len(self.homes)) + i


class Journal:
    """Writer side of the journal region: where the next transaction goes, and its tid."""

    def __init__(self, bdev: BlockDev, start: int, length: int, volume_seed: int,
                 next_tid: int, head: int = 0) -> None:
        self.bdev = bdev
        self.start = start
        self.length = length
        self.seed = volume_seed
        self.next_tid = next_tid
        self.head = head  # journal-relative position of the next transaction

    @property
    def max_images(self) -> int:
        return max_images(self.length)

    def fits(self, nimages: int) -> bool:
        return self.head + txn_blocks(nimages) <= self.length

    def prepare(self, homes: list[int]) -> PreparedTxn:
        """Buffer for a transaction of ``homes`` with the next tid (not yet consumed)."""
        buf = self.bdev.alloc(txn_blocks(len(homes)))
        return PreparedTxn(self.next_tid, homes, buf)

    def write(self, txn: PreparedTxn, *, durable: bool, data_barrier: bool) -> int:
        """Fill in descriptors and commit and write the transaction at the head.

        ``data_barrier``: file data was written since the last barrier; it must be durable
        before the commit block can be (ordered data), so descriptors and images are written
        with durable=True and the commit block separately.  Returns the position of the
        transaction's first block; advances head and next_tid.
        """
        n = len(txn.homes)
        ndesc = txn.ndesc
        total = ndesc + n + 1
        if not self.fits(n):
            raise ValueError(f"transaction of {n} images does not fit the journal")
        pos = self.head
        base = self.start + pos
        buf = txn.buf
        crc = checksum.block_seed(self.seed, txn.tid)
        for d in range(ndesc):
            blk = buf[d * BLOCK_SIZE : (d + 1) * BLOCK_SIZE]
            blk[:] = bytes(BLOCK_SIZE)
            JHEADER.pack_into(blk, 0, MAGIC_JDESC, 0, base + d, txn.tid, n, d, ndesc)
            chunk = txn.homes[d * DESC_ENTRIES : (d + 1) * DESC_ENTRIES]
            struct.pack_into(f"<{len(chunk)}Q", blk, JHEADER.size, *chunk)
            checksum.seal(blk, J_CRC_OFFSET, self.seed, base + d)
        crc = checksum.crc32c(buf[: (ndesc + n) * BLOCK_SIZE], crc)
        cblk = buf[(total - 1) * BLOCK_SIZE :]
        cblk[:] = bytes(BLOCK_SIZE)
        JCOMMIT.pack_into(cblk, 0, MAGIC_JCOMMIT, 0, base + total - 1, txn.tid, total, n, crc,
                          0, time.time_ns())
        checksum.seal(cblk, J_CRC_OFFSET, self.seed, base + total - 1)
        if data_barrier:
            self.bdev.write_blocks(base, total - 1, buf[: (total - 1) * BLOCK_SIZE],
                                   durable=True)
            self.bdev.write_blocks(base + total - 1, 1, cblk, durable=durable)
        else:
            self.bdev.write_blocks(base, total, buf, durable=durable)
        self.head += total
        self.next_tid = txn.tid + 1
        return pos

    def reset(self) -> None:
        """The journal was checkpointed and the superblock now names next_tid: start over."""
        self.head = 0


def scan(bdev: BlockDev, start: int, length: int, first_tid: int, volume_seed: int,
         home_ok: Callable[[int], bool]) -> Iterator[ReplayTxn]:
    """Yield the valid transactions of a journal region in order, from its first block.

    Stops quietly at the first incomplete/invalid/stale transaction (that is the normal end of
    the journal).  A transaction that is intact but names a home block outside the metadata
    area is corruption, not a crash artefact: CorruptionError.  Every size read from disk is
    bounded by the region before it is used, so hostile input cannot cause huge reads.
    """
    pos, tid = 0, first_tid
    while pos + 2 <= length:
        base = start + pos
        head = bdev.read_blocks(base, 1)
        magic, _crc, self_no, got_tid, n, index, ndesc = JHEADER.unpack_from(head, 0)
        if (magic != MAGIC_JDESC or got_tid != tid or self_no != base or index != 0
                or n < 1 or ndesc != ndesc_for(n) or pos + txn_blocks(n) > length
                or not checksum.verify(head, J_CRC_OFFSET, volume_seed, base)):
            return
        total = txn_blocks(n)
        rest = bytes(bdev.read_blocks(base + 1, total - 1))
        blocks = bytes(head) + rest
        mv = memoryview(blocks)
        homes: list[int] = []
        for d in range(ndesc):
            blk = mv[d * BLOCK_SIZE : (d + 1) * BLOCK_SIZE]
            f = JHEADER.unpack_from(blk, 0)
            if (f[0] != MAGIC_JDESC or f[2] != base + d or f[3] != tid or f[4] != n
                    or f[5] != d or f[6] != ndesc
                    or not checksum.verify(blk, J_CRC_OFFSET, volume_seed, base + d)):
                return
            cnt = min(DESC_ENTRIES, n - d * DESC_ENTRIES)
            homes.extend(struct.unpack_from(f"<{cnt}Q", blk, JHEADER.size))
        cblk = mv[(total - 1) * BLOCK_SIZE :]
        c = JCOMMIT.unpack_from(cblk, 0)
        if (c[0] != MAGIC_JCOMMIT or c[2] != base + total - 1 or c[3] != tid or c[4] != total
                or c[5] != n or not checksum.verify(cblk, J_CRC_OFFSET, volume_seed,
                                                    base + total - 1)):
            return
        crc = checksum.crc32c(mv[: (total - 1) * BLOCK_SIZE],
                              checksum.block_seed(volume_seed, tid))
        if crc != c[6]:
            return
        for h in homes:
            if not home_ok(h):
                raise CorruptionError(base, "journal descriptor",
                                      f"transaction {tid} names home block {h} outside the "
                                      "metadata area")
        yield ReplayTxn(tid, pos, homes, blocks[ndesc * BLOCK_SIZE : (total - 1) * BLOCK_SIZE])
        pos += total
        tid += 1
