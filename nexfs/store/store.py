"""The metadata store: block cache, transactions, journal policy, checkpoints, allocators.

This is what the rest of the filesystem core talks to (it implements the
:class:`~nexfs.ondisk.metablock.MetaStore` protocol and more).  One :class:`Store` per mounted
volume.  Its two other parts are reached through it: ``store.data``, the data path
(nexfs/store/datapath.py: data cache, write-behind, buffers), and ``store.itable``, the inode
table (nexfs/store/inode_table.py: raw inode records).  The store drains the data path before
every commit (ordered data) and owns the allocators both draw on.

Transactions.  Every metadata change joins the single *running transaction* (``dirty`` /
``put_new``); :meth:`Store.commit` writes it to the journal as one atomic unit (group commit:
the filesystem commits between operations, e.g. when ``should_commit()`` says so, on fsync, or
on a timer).  Committed blocks are written to their home locations later, by a *checkpoint*,
after which the journal starts over.  See docs/DESIGN.md for the crash model.

Rules for callers (the concurrency invariant of nexfs/ondisk/metablock.py applies):

* call ``dirty(block)`` right after changing a block, before any other store call;
* an operation runs in ``operation()`` and takes its one reservation with ``reserve(...)``
  for its worst case before it changes anything, so it never fails half-way with ENOSPC;
  lower layers' nested ``reserve`` calls draw from it, and an allocation beyond it raises
  ReservationError (a wrong worst case is a bug, never a silent overdraw); it does not
  commit in its middle;
* keep a transaction below ``max_txn_blocks``: check ``should_commit()`` between operations
  and split huge operations (e.g. truncating a huge file) into several.

Errors.  The store only raises; whether a failure puts the volume in the *error state* is
decided by its failure policy (``store.failures``, nexfs/store/failure.py), to which every guarded
public method hands what it raises: a CorruptionError or a device error does.  In the error
state the running transaction is discarded (the volume stays at its last commit), the
superblock is marked ERROR with the reason (best effort), and every later mutation raises
FsError(EROFS).  Reads keep working.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nexfs.ondisk import checksum
from nexfs.ondisk.bitmap import BPB, Bitmap
from nexfs.ondisk.layout import (
    FEATURE_INCOMPAT_SUPPORTED,
    FEATURE_RO_COMPAT_SUPPORTED,
    STATE_BLOCK,
    STATE_CLEAN,
    STATE_DIRTY,
    STATE_ERROR,
    SUMMARY_ENTRIES,
    Geometry,
    StateBlock,
    Superblock,
)
from nexfs.ondisk.metablock import (
    BLOCK_SIZE,
    CRC_OFFSET,
    HEADER,
    MAGIC_BITMAP,
    MAGIC_IBITMAP,
    MAGIC_ISUMMARY,
    MAGIC_SUMMARY,
    M,
    MetaBlock,
    seal_block,
)
from nexfs.store.blockdev import BlockDev, BlockDevice, Filler, copy_filler, write_runs
from nexfs.store.datacache import DEFAULT_BLOCKS as DEFAULT_DATA_CACHE_BLOCKS
from nexfs.store.datapath import DataPath
from nexfs.store.failure import FailurePolicy, boundary
from nexfs.store.grants import derive
from nexfs.store.inode_table import InodeTable
from nexfs.store.journal import Journal, max_images, restart_tid, scan
from nexfs.store.metacache import BlockCache
from nexfs.store.volume import Progress, format_volume, read_superblock, write_superblock
from nexfs.types import BlockNo, CorruptionError, FsError, InodeNo

log = logging.getLogger(__name__)

DEFAULT_CACHE_BLOCKS = 16384
"""Default cache budget in blocks (64 MiB of decoded metadata)."""

_guarded = boundary  # every guarded public method hands its failures to the policy


@dataclass(frozen=True)
class StatFs:
    """Totals for statfs(2)."""

    block_size: int
    total_blocks: int
    free_blocks: int  # includes blocks freed but not yet reusable (pending a checkpoint)
    avail_blocks: int  # free minus blocks reserved by the operation in progress
    total_inodes: int
    free_inodes: int
    avail_inodes: int


class _Restamped(MetaBlock):
    """A committed block's bytes going through the journal again, with the new tid (never
    cached: a later get() decodes the committed image, a dirty() replaces this one)."""

    __slots__ = ("raw",)

    def __init__(self, blkno: BlockNo, raw: bytes) -> None:
        super().__init__(blkno)
        self.raw = raw

    def encode(self, out: memoryview, volume_seed: int, tid: int) -> None:
        out[:] = self.raw
        _magic, _crc, self_no, owner, _tid = HEADER.unpack_from(out, 0)
        HEADER.pack_into(out, 0, _magic, 0, self_no, owner, tid)
        seal_block(out, volume_seed, self.blkno)


class ReservationError(RuntimeError):
    """An operation allocated more than it reserved: its worst case is wrong.  A bug, not a
    full disk: the filesystem treats it as an internal error (volume read-only)."""


class Reservation:
    """The space one operation may allocate: ``blocks`` and ``inodes`` still reserved and
    not yet allocated.  There is at most one per store (``Store.reservation``); the
    allocators draw from it.  As a context manager, leaving it releases what is left if
    :meth:`Store.reserve` took it outside any :meth:`Store.operation`; otherwise leaving it
    changes nothing (the operation's scope, or the outer reservation, still holds the
    space)."""

    __slots__ = ("_outer", "_store", "blocks", "inodes", "mark", "taken")

    def __init__(self, store: Store, *, outer: bool) -> None:
        self._store = store
        self._outer = outer
        self.blocks = 0
        self.inodes = 0
        self.taken = False  # the operation has made its one reservation
        self.mark = store.change_count()  # nothing changed since: reserve() may commit

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._outer:
            self._store._end_reservation(self)


class OperationScope:
    """The context manager :meth:`Store.operation` returns.  A class rather than a
    ``contextlib.contextmanager`` generator: every mutating request enters one, and the
    generator's set-up and tear-down were about 1.5 us of a 20-30 us request
    (docs/BENCHMARKS.md, round 3)."""

    __slots__ = ("_created", "_store")

    def __init__(self, store: Store) -> None:
        self._store = store
        self._created = False

    def __enter__(self) -> Reservation:
        store = self._store
        op = store._op
        if op is None:  # (else a reservation taken outside joins it)
            op = store._op = Reservation(store, outer=False)
            self._created = True
        store._op_depth += 1
        return op

    def __exit__(self, *exc: object) -> None:
        store = self._store
        store._op_depth -= 1
        if self._created:
            store._op = None


class Store:
    """Cache + journal + allocators of one open volume.  Use :meth:`open` or :meth:`format`."""

    def __init__(self, bdev: BlockDev, sb: Superblock, *, read_only: bool,
                 cache_blocks: int, data_cache_blocks: int = DEFAULT_DATA_CACHE_BLOCKS) -> None:
        self.sb = sb
        self.geo: Geometry = sb.geo
        # Each part gets only its grants (nexfs/store/grants.py); the whole-device view is dropped.
        self.grants = grants = derive(bdev, self.geo, writable=not read_only,
                                      mmp_block=sb.mmp_block if sb.mmp else 0)
        self.bdev = grants.meta
        self.volume_seed = sb.volume_seed
        self._opened_read_only = read_only
        self.error: str | None = None
        self.failures = FailurePolicy(self)  # decides; the store only raises
        # fsck: why the state block could not be read (a blank one stands in for it).
        self.state_damage: str | None = None
        self._closed = False
        self._cache = BlockCache(cache_blocks)
        self._running: dict[int, MetaBlock] = {}
        # Committed, not yet checkpointed: home block -> (journal position of its latest
        # image, tid of that commit).  The journal copy is what a checkpoint writes home when
        # the decoded block is not in the cache or has changed again since.
        self._ckpt: dict[int, tuple[int, int]] = {}
        # Read-only open of a volume needing replay: the replayed images, never written home.
        self._overlay: dict[int, bytes] = {}
        self.data = DataPath(grants.data, self.geo, self.failures, self.check_writable,
                             data_cache_blocks)
        self._changes = 0
        # Called at the start of every commit, to write changes kept outside the store (the
        # core's dirty inodes, encoded once per commit instead of once per operation) into
        # the running transaction: whatever commits, they are in it.
        self.before_commit: list[Callable[[], None]] = []
        # The running operation's reservation (see reserve()); _op_depth counts nested
        # operation() scopes.
        self._op: Reservation | None = None
        self._op_depth = 0
        g = self.geo
        self.journal = Journal(grants.journal, g.journal_start, g.journal_len, self.volume_seed,
                               sb.journal_tid)
        self.max_txn_blocks = max_images(g.journal_len)
        self.commits = self.checkpoints = 0  # since open (``nexfs stats``)
        self.committed_tid = sb.journal_tid - 1
        self.durable_tid = self.committed_tid
        self.blocks = Bitmap(self, name="block", magic=MAGIC_BITMAP, summary_magic=MAGIC_SUMMARY,
                             bitmap_start=g.bbitmap_start, summary_start=g.bsummary_start,
                             nitems=g.nblocks, first_item=g.data_start)
        self.inodes = Bitmap(self, name="inode", magic=MAGIC_IBITMAP,
                             summary_magic=MAGIC_ISUMMARY, bitmap_start=g.ibitmap_start,
                             summary_start=g.isummary_start, nitems=g.ninodes + 1, first_item=1)
        self._state: StateBlock | None = None
        self.itable = InodeTable(self)

    # -- lifecycle ---------------------------------------------------------------------------

    @staticmethod
    def format(dev: BlockDevice, *, label: str = "", uuid: bytes | None = None,
               ninodes: int | None = None, progress: Progress | None = None,
               mmp: bool | None = None, mmp_interval_ms: int | None = None) -> None:
        """Write an empty volume over the whole device (see nexfs/store/volume.py)."""
        format_volume(dev, label=label, uuid=uuid, ninodes=ninodes, progress=progress,
                      mmp=mmp, mmp_interval_ms=mmp_interval_ms)

    @classmethod
    def open(cls, dev: BlockDevice, *, read_only: bool = False,
             cache_blocks: int = DEFAULT_CACHE_BLOCKS,
             data_cache_blocks: int = DEFAULT_DATA_CACHE_BLOCKS, ignore_error: bool = False,
             salvage_state: bool = False) -> Store:
        """Open a volume: pick the superblock, replay the journal, load the state block.

        Writable: the replayed journal is written home and the superblock marked DIRTY.
        Read-only: replayed images stay in memory; nothing is written.  A volume whose
        superblock says ERROR opens read-only with ``store.error`` set, unless
        ``ignore_error`` (fsck).  ``salvage_state`` (fsck): a damaged state block is
        replaced in memory by a blank one and the reason kept in ``store.state_damage``,
        for fsck to recount and rewrite.  Raises NotNexfsError / CorruptionError /
        FsError(EINVAL) for volumes that cannot be opened.
        """
        try:
            bdev = BlockDev(dev)
            sb = read_superblock(bdev)
        except OSError as e:
            raise FsError(e.errno or errno.EIO, f"device error while opening: {e}") from e
        unknown = sb.feature_incompat & ~FEATURE_INCOMPAT_SUPPORTED
        if unknown:
            raise FsError(errno.EINVAL, f"volume uses unsupported features {unknown:#x}")
        if sb.feature_ro_compat & ~FEATURE_RO_COMPAT_SUPPORTED and not read_only:
            raise FsError(errno.EROFS, "volume uses features this version can only read: "
                                       "open it read-only")
        if sb.geo.nblocks > bdev.nblocks:
            raise CorruptionError(0, "superblock", f"volume of {sb.geo.nblocks} blocks is "
                                                   f"larger than the device ({bdev.nblocks})")
        error = None
        if sb.state & STATE_ERROR and not ignore_error:
            error = sb.error_reason or "volume marked as needing fsck"
            log.warning("volume is marked as needing fsck (%s): opening read-only", error)
        try:
            store = cls(bdev, sb, read_only=read_only or error is not None,
                        cache_blocks=cache_blocks, data_cache_blocks=data_cache_blocks)
            store._recover()
            try:
                store._state = store._load_state()
            except CorruptionError as e:
                if not salvage_state:
                    raise
                store.state_damage = str(e)
                g = store.geo
                store._state = StateBlock(free_blocks=0, free_inodes=0,
                                          data_hint=g.data_start, meta_hint=g.data_start,
                                          inode_hint=1)
            if not store.read_only:
                if not sb.state & STATE_CLEAN:
                    log.info("volume was not cleanly unmounted; journal recovered")
                sb.state = (sb.state & STATE_ERROR) | STATE_DIRTY
                sb.mount_count = min(sb.mount_count + 1, 0xFFFF_FFFF)  # u32, saturating
                sb.mount_time = time.time_ns()
                store._write_sb()
        except OSError as e:
            raise FsError(e.errno or errno.EIO, f"device error while opening: {e}") from e
        store.error = error
        return store

    def close(self) -> None:
        """Commit, checkpoint, mark the superblock CLEAN: the journal is left empty.

        In the error state nothing more is written.
        """
        if self._closed:
            return
        try:
            if not self.read_only:
                self._close_writable()
        finally:
            self._closed = True
            self.data.close()  # drained by the commit above (or dropped after an error)

    @_guarded
    def _close_writable(self) -> None:
        # Guarded like every other path that writes: a device error here leaves as FsError
        # and marks the volume ERROR (while the store is still open to write that).
        self.commit(durable=False)
        self._checkpoint(clean=True)

    def abort(self) -> None:
        """Drop the store without writing anything (as if power was cut now): the running
        transaction is lost, the journal is replayed at the next open."""
        self._running.clear()
        self.data.close()
        self._closed = True

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state -------------------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        return self._opened_read_only or self.error is not None

    @property
    def state(self) -> StateBlock:
        """The journaled state block (change fields, then ``store.dirty(store.state)``)."""
        assert self._state is not None
        return self._state

    @property
    def nblocks(self) -> int:
        """Blocks in the volume (the trees use it to refuse out-of-range pointers)."""
        return self.geo.nblocks

    @property
    def running_tid(self) -> int:
        """The tid the running transaction will commit as."""
        return self.journal.next_tid

    @property
    def needs_barrier(self) -> bool:
        """True while something written (data or a commit) is not yet known durable."""
        return self.data.pending or self.durable_tid < self.committed_tid

    @property
    def txn_blocks(self) -> int:
        """Blocks in the running transaction."""
        return len(self._running)

    def change_count(self) -> int:
        """Grows with every change to metadata (dirty, put_new, free): an operation that
        failed without changing it left nothing half-done."""
        return self._changes

    def should_commit(self) -> bool:
        """The running transaction is big enough to commit now (1/4 of the journal, or half
        of the cache budget)."""
        n = len(self._running)
        return n >= max(1, self.geo.journal_len // 4) or n >= self._cache.capacity // 2

    def _free_step_limit(self) -> int:
        # Half of what a transaction may hold, and half the cache budget (the running
        # transaction's blocks are pinned in the cache).
        return max(1, min(self.max_txn_blocks, self._cache.capacity) // 2)

    def free_step_groups(self) -> int:
        """Bitmap groups one step of a large free may touch (see
        ``FileData.release_step``): a quarter of the free-step limit."""
        return max(1, self._free_step_limit() // 4)

    def room_for_free_step(self) -> bool:
        """Whether the running transaction can take one more step of a large free.

        A step dirties at most: one bitmap block per group it touches, their summary
        blocks (one per 1016 groups, +2 at the edges), the extent-tree nodes it changes or
        frees and their bitmap blocks (nodes hold at least ~45 extents; a step punches at
        most one extent per group, plus the path), the state block and the inode's table
        block.  An empty transaction always has room (the bound is far below the hard
        limit, ``max_txn_blocks``)."""
        b = self.free_step_groups()
        worst = b + b // SUMMARY_ENTRIES + 2 + 2 * (b // 45 + 18) + 2
        return not self._running or len(self._running) + worst <= self._free_step_limit()

    def check_writable(self) -> None:
        """FsError(EROFS) unless the store may change: not read-only, not in the error
        state; FsError(EIO) once closed."""
        if self.error is not None:
            raise FsError(errno.EROFS, f"filesystem is read-only after an error: {self.error}")
        if self._opened_read_only:
            raise FsError(errno.EROFS, "filesystem is mounted read-only")
        if self._closed:
            raise FsError(errno.EIO, "store is closed")

    def enter_error_state(self, reason: str) -> None:
        """The primitive under the failure policy (nexfs/store/failure.py), which alone calls it:
        discard the running transaction, mark the superblock ERROR (best effort) and refuse
        every later mutation with EROFS."""
        if self.error is not None:
            return
        was_writable = not self._opened_read_only and not self._closed
        self.error = reason
        self.data.drop()  # unwritten data of a volume that can take no more writes
        for blkno in self._running:
            self._cache.remove(blkno)
        dropped_state = STATE_BLOCK in self._running
        self._running.clear()
        if self._op is not None:
            self._op.blocks = self._op.inodes = 0
        if dropped_state:
            try:
                self._state = self._load_state()
            except (FsError, OSError) as e:
                log.error("could not reload the state block: %s", e)
        if was_writable:
            self.sb.state |= STATE_ERROR
            self.sb.error_reason = self.error
            try:
                self._write_sb()
            except (FsError, OSError) as e:
                log.error("could not mark the superblock ERROR: %s", e)

    def tolerating_damage(self) -> contextlib.AbstractContextManager[None]:
        """For fsck, which expects damage and reports it: inside, a CorruptionError reaches
        the caller without putting the store in the error state (nexfs/store/failure.py)."""
        return self.failures.tolerating_damage()

    def clear_error(self) -> None:
        """fsck repaired the volume: clear ERROR in the superblock (written at close)."""
        self.check_writable()
        self.sb.state &= ~STATE_ERROR
        self.sb.error_reason = ""
        self.sb.check_time = time.time_ns()

    # -- metadata blocks (MetaStore protocol) -------------------------------------------------

    def _meta_ok(self, blkno: int) -> bool:
        g = self.geo
        return (STATE_BLOCK <= blkno < g.backup_sb
                and not g.journal_start <= blkno < g.journal_start + g.journal_len)

    def _check_meta(self, blkno: int, structure: str) -> None:
        if not self._meta_ok(blkno):
            raise CorruptionError(blkno, structure, "block number outside the metadata area")

    def _read_raw(self, blkno: int) -> memoryview:
        """The current committed bytes of a metadata block: replay overlay, journal copy
        (committed, not yet checkpointed) or home."""
        img = self._overlay.get(blkno)
        if img is not None:
            return memoryview(img)
        ck = self._ckpt.get(blkno)
        if ck is not None:
            return self.bdev.read_blocks(self.geo.journal_start + ck[0], 1)
        return self.bdev.read_blocks(blkno, 1)

    def block_tid(self, blkno: BlockNo) -> int | None:
        """fsck: the tid in the common header of metadata block ``blkno`` as committed
        (replay overlay, journal copy or home), or None when it holds no block of this
        volume sealed for that number (never written, or damage reported elsewhere)."""
        self._check_meta(blkno, "metadata block")
        raw = self._read_raw(blkno)
        if not checksum.verify(raw, CRC_OFFSET, self.volume_seed, blkno):
            return None
        _magic, _crc, self_no, _owner, tid = HEADER.unpack_from(raw, 0)
        return tid if self_no == blkno else None

    @_guarded
    def restamp(self, blkno: BlockNo) -> None:
        """fsck -y: rewrite committed metadata block ``blkno`` unchanged through the
        journal, so that its header carries the tid of a transaction of this volume's
        history (see checker: blocks from another timeline)."""
        self.check_writable()
        self._check_meta(blkno, "metadata block")
        obj = self._state if blkno == STATE_BLOCK else self._cache.peek(blkno)
        if obj is not None:
            self.dirty(obj)
        elif blkno not in self._running:
            self._join(_Restamped(blkno, bytes(self._read_raw(blkno))))

    def get(self, blkno: BlockNo, decode: Callable[[BlockNo, memoryview], M]) -> M:
        """Cached decoded block, or read + decode (which validates) + cache it."""
        # A hit cannot fail, so it skips the failure boundary's wrapper (~20 hits per
        # created and deleted file, ~0.3 us each); only a miss reads and decodes.
        blk = self._cache.lookup(blkno)
        if blk is not None:
            return blk  # type: ignore[return-value]
        return self._get_miss(blkno, decode)

    @_guarded
    def _get_miss(self, blkno: BlockNo, decode: Callable[[BlockNo, memoryview], M]) -> M:
        self._check_meta(blkno, "metadata block")
        new = decode(blkno, self._read_raw(blkno))
        self._cache.insert(new)
        self._cache.evict(self._running)
        return new

    def cached(self, blkno: BlockNo) -> MetaBlock | None:
        """The decoded block ``blkno`` if it is in the cache (nothing is read)."""
        return self._cache.lookup(blkno)

    def adopt(self, block: MetaBlock) -> None:
        """Cache a block built in memory that stands for its committed contents (an inode
        table block none of whose inodes is in use, which may never have been written); it
        joins a transaction only when ``dirty``."""
        self._check_meta(block.blkno, type(block).__name__)
        self._cache.insert(block)
        self._cache.evict(self._running)

    def read_ahead(self, blknos: Sequence[int],
                   decode: Callable[[BlockNo, memoryview], MetaBlock]) -> None:
        """Cache the given metadata blocks (ascending, within 256 blocks of each other)
        with one read, for a walk that is about to ``get`` them one by one (fsck's pass over
        the bitmaps, a free across thousands of groups: one 4 KiB O_DIRECT read each cost
        ~180 us on the shared test machine).  Blocks already cached, or whose current copy
        is not at home (journal, replay overlay), and blocks that do not decode are left to
        ``get``, which reads them, or reports their damage, as usual.  Best effort: a
        device error here is not one (``get`` will meet it)."""
        todo = [b for b in blknos if self._cache.peek(b) is None and b not in self._ckpt
                and b not in self._overlay and self._meta_ok(b)]
        if len(todo) < 2:
            return
        lo = todo[0]
        try:
            raw = self.bdev.read_blocks(lo, todo[-1] + 1 - lo)
        except (OSError, FsError):
            return
        for b in todo:
            try:
                blk = decode(BlockNo(b), raw[(b - lo) * BLOCK_SIZE : (b - lo + 1) * BLOCK_SIZE])
            except CorruptionError:
                continue
            self._cache.insert(blk)
        self._cache.evict(self._running)

    def _join(self, block: MetaBlock) -> None:
        if block.blkno not in self._running and len(self._running) >= self.max_txn_blocks:
            exc = FsError(errno.EIO, f"transaction exceeds the journal "
                                     f"({self.max_txn_blocks} blocks)")
            self.failures.failed(exc, changed=True)
            raise exc
        self._running[block.blkno] = block
        self._changes += 1

    def put_new(self, block: MetaBlock) -> None:
        """Add a freshly built block (just allocated, never read from disk), dirty."""
        self.check_writable()
        self._check_meta(block.blkno, type(block).__name__)
        self._cache.insert(block)
        self._join(block)

    def dirty(self, block: MetaBlock) -> None:
        """The block changed in memory: it is written with the running transaction."""
        self.check_writable()
        if self._running.get(block.blkno) is block:
            # Already in the transaction (checked, cached and pinned when it joined): the
            # common case, several times per operation (the state block, a bitmap, its
            # summary).  Leaving the transaction (commit, free_meta, failure) drops it here.
            self._changes += 1
            return
        if block.blkno == STATE_BLOCK:
            if block is not self._state:
                raise ValueError("dirty(): not the store's state block object")
        else:
            self._check_meta(block.blkno, type(block).__name__)
            if self._cache.peek(block.blkno) is not block:
                self._cache.insert(block)
        self._join(block)

    def _dirty_state(self) -> None:
        self.dirty(self.state)

    # -- transactions ------------------------------------------------------------------------

    @_guarded
    def commit(self, durable: bool = True) -> int:
        """Write the running transaction to the journal; returns the last committed tid.

        ``durable``: return only once it (and everything before) is on stable storage.  If
        file data was written since the last barrier, it is made durable before the commit
        block (ordered data).  With nothing to commit, ``durable`` still issues a barrier
        when one is needed (fsync after data-only writes).
        """
        self.check_writable()
        for write_back in self.before_commit:
            write_back()
        self.data.drain()  # ordered data: before the metadata that points at it
        if not self._running:
            if durable and self.needs_barrier:
                self._barrier()
            return self.committed_tid
        n = len(self._running)
        if not self.journal.fits(n):
            self._checkpoint()
        homes = sorted(self._running)
        txn = self.journal.prepare(homes)
        for i, h in enumerate(homes):
            self._running[h].encode(txn.image(i), self.volume_seed, txn.tid)
        data_barrier = self.data.unsynced
        pos = self.journal.write(txn, durable=durable, data_barrier=data_barrier)
        first_image = pos + txn.ndesc
        for i, h in enumerate(homes):
            self._ckpt[h] = (first_image + i, txn.tid)
        if durable:
            self.durable_tid = txn.tid
        elif data_barrier:
            self.durable_tid = self.committed_tid  # everything before this commit
        self.committed_tid = txn.tid
        self.data.mark_synced()
        self.commits += 1
        self.blocks.commit_pending()
        self._running.clear()
        self._cache.evict(self._running)
        if len(self._ckpt) > self._cache.capacity // 2:
            self._checkpoint()
        return txn.tid

    def counters(self) -> dict[str, dict[str, Any]]:
        """The store's part of ``nexfs stats`` (nexfs/fuse/stats.py): both caches' hits,
        misses and size in blocks; commits and checkpoints since open and how full the
        journal is."""
        meta = self._cache
        return {
            "caches": {
                "metadata": {"hits": meta.hits, "misses": meta.misses,
                             "blocks": len(meta), "capacity": meta.capacity},
                "data": self.data.cache_counters(),
            },
            "journal": {"commits": self.commits, "checkpoints": self.checkpoints,
                        "used_blocks": self.journal.head, "blocks": self.journal.length,
                        "fill": round(self.journal.head / self.journal.length, 4)},
        }

    def sync(self) -> None:
        """fsync/syncfs: everything done so far, data and metadata, durable."""
        self.commit(durable=True)

    def _barrier(self) -> None:
        """Make every earlier write durable without committing anything.

        The device's only barrier is a durable write, so write a zero block at the journal
        head: the next transaction will overwrite it, and zeros never look like a
        transaction to replay.  A completely full journal has no head block: rewrite its last
        block (the last commit block) with its current contents instead.
        """
        j = self.journal
        if j.head < j.length:
            where, content = j.start + j.head, bytes(BLOCK_SIZE)
        else:
            where = j.start + j.length - 1
            content = bytes(self.bdev.read_blocks(where, 1))
        write_runs(j.bdev, [(where, copy_filler(content))], durable=True)
        self.data.mark_synced()
        self.durable_tid = self.committed_tid

    @_guarded
    def checkpoint(self) -> None:
        """Write every committed block home and empty the journal (between operations)."""
        self.check_writable()
        self._checkpoint()

    def _checkpoint(self, *, clean: bool = False, from_journal: bool = False) -> None:
        """Checkpoint: committed images home, barrier, then record durably that the journal is
        empty by writing the next tid into the superblock (primary, barrier, backup, barrier).

        Crash safety: until the superblock update is durable, the old journal_tid still points
        at the intact journal, whose replay rewrites the same images (idempotent); after it,
        every image is home.  New transactions are written only after both copies are
        updated, so a torn primary falling back to the backup also finds an intact journal.
        A block in the running transaction, or not in the cache, is copied from its journal
        image; other blocks are encoded from the cache (identical to what was committed) unless
        ``from_journal`` (checkpoint in the middle of an operation, when a cached block may
        already hold changes not yet passed to dirty()).
        """
        self.data.wait_all()  # no data write may land on a block after it is reused
        if self._ckpt or self.journal.head:
            if self.durable_tid < self.committed_tid:
                # A home block may be overwritten only once the journal copy that can
                # restore it is durable: otherwise a crash could keep the home write and
                # lose the (non-durable) commit that made it legitimate.
                self._barrier()
            items = sorted(self._ckpt.items())
            fills: list[tuple[int, Filler]] = [
                (h, self._ckpt_filler(h, pos, tid, from_journal)) for h, (pos, tid) in items]
            write_runs(self.bdev, fills, durable=True)
            self.sb.journal_tid = self.journal.next_tid
            if clean:
                self.sb.state = STATE_CLEAN
            self._write_sb()
            self.journal.reset()
            self._ckpt.clear()
            self.checkpoints += 1
            log.debug("checkpoint: %d blocks home, journal restarts at tid %d",
                      len(items), self.sb.journal_tid)
        elif clean:
            self.sb.state = STATE_CLEAN
            self._write_sb()
        self.blocks.release_pending()
        self.data.mark_synced()
        self.durable_tid = self.committed_tid

    def _ckpt_filler(self, home: int, pos: int, tid: int, from_journal: bool) -> Filler:
        obj: MetaBlock | None
        obj = self._state if home == STATE_BLOCK else self._cache.peek(home)
        if obj is not None and home not in self._running and not from_journal:
            seed = self.volume_seed
            return lambda out: obj.encode(out, seed, tid)
        where = self.geo.journal_start + pos

        def copy_from_journal(out: memoryview) -> None:
            out[:] = self.bdev.read_blocks(where, 1)

        return copy_from_journal

    def _write_sb(self) -> None:
        if self._state is not None:
            self.sb.free_blocks = self._state.free_blocks
            self.sb.free_inodes = self._state.free_inodes
        write_superblock(self.grants.superblocks, self.sb)

    # -- recovery ----------------------------------------------------------------------------

    def _recover(self) -> None:
        """Replay committed transactions from the journal (see journal.scan)."""
        g = self.geo
        latest: dict[int, memoryview] = {}
        count, tid = 0, self.sb.journal_tid
        for txn in scan(self.journal.bdev, g.journal_start, g.journal_len, self.sb.journal_tid,
                        self.volume_seed, self._meta_ok):
            for i, h in enumerate(txn.homes):
                latest[h] = txn.image(i)
            count += 1
            tid = txn.tid + 1
        if count:
            log.info("journal replay: %d transaction(s), tids %d..%d, %d blocks",
                     count, self.sb.journal_tid, tid - 1, len(latest))
        self.journal.next_tid = tid
        self.committed_tid = self.durable_tid = tid - 1
        if self.read_only:
            self._overlay = {h: bytes(v) for h, v in latest.items()}
            return
        if not self.sb.state & STATE_CLEAN:
            # Stale transactions of the lost timeline may lie past the point where replay
            # stopped: never hand out a tid one of them carries (journal.restart_tid).
            tid = restart_tid(self.sb.journal_tid, tid, g.journal_len)
            if tid >= 1 << 63:  # what the superblock can record (layout.Superblock.decode)
                raise CorruptionError(0, "superblock", f"journal tid {self.sb.journal_tid} "
                                                       "leaves no room for a new timeline")
            self.journal.next_tid = tid
        if latest:
            fills = [(h, copy_filler(v)) for h, v in latest.items()]
            write_runs(self.bdev, fills, durable=True)
        # The superblock naming the new journal start is written by open() (it marks DIRTY
        # in the same write) before any transaction; until then a crash replays again.
        self.sb.journal_tid = tid

    def _load_state(self) -> StateBlock:
        return StateBlock.decode(self._read_raw(STATE_BLOCK), self.volume_seed, self.geo)

    # -- reservations ------------------------------------------------------------------------

    @property
    def reservation(self) -> Reservation | None:
        """The running operation's reservation, if any."""
        return self._op

    def _fits(self, nblocks: int, ninodes: int) -> bool:
        st = self.state
        op = self._op
        held_b, held_i = (op.blocks, op.inodes) if op is not None else (0, 0)
        return (st.free_blocks - self.blocks.pending_count - held_b >= nblocks
                and st.free_inodes - held_i >= ninodes)

    def operation(self) -> OperationScope:
        """One filesystem operation: it starts with an empty reservation, takes its one
        reservation with :meth:`reserve` before it changes anything, and every allocation
        inside draws from it (beyond it: :class:`ReservationError`).  What is left is
        released at the end.  Nested scopes belong to the outer operation.  Use as
        ``with store.operation() as reservation: ...``."""
        return OperationScope(self)

    @_guarded
    def reserve(self, nblocks: int, ninodes: int = 0) -> Reservation:
        """Reserve the worst case of the coming operation, or FsError(ENOSPC) with nothing
        changed.  Use as ``with store.reserve(n): ...``.

        The first reservation of an operation (or outside :meth:`operation`) is *the*
        reservation: if nothing has changed yet it may commit and checkpoint to release
        blocks freed by earlier transactions.  A later call in the same operation (a lower
        layer reserving for its part, e.g. the data write inside symlink) draws from it
        instead of reserving again: the outer reservation must already cover it, else
        :class:`ReservationError` (its worst case was wrong)."""
        self.check_writable()
        op = self._op
        if op is not None and op.taken:
            if nblocks > op.blocks or ninodes > op.inodes:
                raise ReservationError(
                    f"nested reservation of {nblocks} block(s), {ninodes} inode(s) exceeds "
                    f"the {op.blocks}/{op.inodes} left in the operation's reservation")
            return Reservation(self, outer=False)
        outer = op is None
        if outer:
            op = Reservation(self, outer=True)
        assert op is not None
        if (not self._fits(nblocks, ninodes) and self.blocks.pending_count
                and self._changes == op.mark):
            # Nothing of this operation is in the store yet: committing here is safe.
            self.commit(durable=False)
            self._checkpoint()
        if not self._fits(nblocks, ninodes):
            raise FsError(errno.ENOSPC, "no space left on device")
        op.blocks, op.inodes, op.taken = nblocks, ninodes, True
        if outer:
            self._op = op
        return op

    def reserve_more(self, nblocks: int) -> None:
        """Grow the current operation's reservation, mid-operation: unlike :meth:`reserve`
        it never commits (the operation's changes are not all in the store yet), so it only
        sees blocks already free.  FsError(ENOSPC) when they are not there."""
        self.check_writable()
        op = self._op
        if op is None or not op.taken:
            raise ReservationError("reserve_more() outside a reservation")
        if not self._fits(nblocks, 0):
            raise FsError(errno.ENOSPC, "no space left on device")
        op.blocks += nblocks

    def _end_reservation(self, op: Reservation) -> None:
        if self._op is op and self._op_depth == 0:
            self._op = None

    def _draw(self, nblocks: int, ninodes: int) -> None:
        """An allocation is about to take ``nblocks``/``ninodes`` from the operation's
        reservation.  Outside any operation (mkfs, fsck's repair, store tests) there is
        nothing to draw from and nothing to check."""
        op = self._op
        if op is None:
            return
        if nblocks > op.blocks or ninodes > op.inodes:
            raise ReservationError(
                f"allocating {nblocks} block(s), {ninodes} inode(s) with only "
                f"{op.blocks}/{op.inodes} left in the operation's reservation")

    # -- block allocation --------------------------------------------------------------------

    def _alloc_run(self, goal: int, want: int) -> tuple[int, int]:
        self._draw(want, 0)
        run = self.blocks.take(goal, want)
        if run is None and self.blocks.pending:
            # Mid-operation: committed frees can be released by a checkpoint.  Encoded
            # copies in the cache may hold this operation's not-yet-dirtied changes, so this
            # checkpoint copies images from the journal only.
            self._checkpoint(from_journal=True)
            run = self.blocks.take(goal, want)
        if run is None:
            raise FsError(errno.ENOSPC, "no space left on device")
        n = run[1]
        self.state.free_blocks -= n
        self._dirty_state()
        if self._op is not None:
            self._op.blocks -= n
        return run

    def _goal(self, goal: int | None, hint: int) -> int:
        g = self.geo
        if goal is None or not g.data_start <= goal < g.backup_sb:
            goal = hint if g.data_start <= hint < g.backup_sb else g.data_start
        return goal

    @_guarded
    def alloc_data(self, goal: BlockNo | None, count: int) -> tuple[BlockNo, int]:
        """Allocate a contiguous run of 1..count blocks (at most 32512) at or after ``goal``
        (first fit, wrapping), preferring the whole ``count`` in one run; ``(start, n)``."""
        self.check_writable()
        if count < 1:
            raise ValueError("alloc_data: count must be >= 1")
        start, n = self._alloc_run(self._goal(goal, self.state.data_hint), min(count, BPB))
        self.state.data_hint = start + n
        return BlockNo(start), n

    @_guarded
    def alloc_meta(self, goal: BlockNo | None, owner: InodeNo) -> BlockNo:
        """Allocate one block for metadata near ``goal``; FsError(ENOSPC) when full."""
        self.check_writable()
        start, _ = self._alloc_run(self._goal(goal, self.state.meta_hint), 1)
        self.state.meta_hint = start + 1
        return BlockNo(start)

    @_guarded
    def free_blocks(self, start: BlockNo, count: int) -> None:
        """Free blocks start..start+count-1.  They become reusable after the freeing
        transaction has been checkpointed (pending frees; see docs/DESIGN.md)."""
        self.check_writable()
        g = self.geo
        if count < 1 or start < g.data_start or start + count > g.backup_sb:
            raise CorruptionError(start, "extent", f"freeing {count} block(s) outside the data "
                                                   "area")
        self.data.discard(start, count)
        i, left = int(start), count
        if (i + count - 1) // BPB > i // BPB:  # a run over many groups (a big free's step)
            first = i // BPB
            self.blocks.read_ahead(first, min((i + count - 1) // BPB + 1,
                                              first + self._cache.capacity // 4))
        while left:
            take = min(left, BPB - i % BPB)
            self.blocks.clear_range(i, take, defer=True)
            i += take
            left -= take
        self.state.free_blocks += count
        self._dirty_state()

    @_guarded
    def free_meta(self, blkno: BlockNo) -> None:
        """Free a metadata block: it leaves the cache and the running transaction, and is
        reusable only after the freeing transaction is checkpointed."""
        self.check_writable()
        self._check_meta(blkno, "metadata block")
        self._cache.remove(blkno)
        self._running.pop(blkno, None)
        self.free_blocks(blkno, 1)

    @_guarded
    def is_block_allocated(self, blkno: BlockNo) -> bool:
        if not 0 <= blkno < self.geo.nblocks:
            raise ValueError(f"block {blkno} outside the volume")
        return self.blocks.is_set(blkno)

    # -- inode allocation --------------------------------------------------------------------

    @_guarded
    def alloc_inode(self, goal_hint: InodeNo | None = None) -> InodeNo:
        """Allocate a free inode (first free at or after the hint, wrapping).  Its table slot
        is zeroed and joins the transaction, so the table block is always written once one
        of its inodes is in use."""
        self.check_writable()
        self._draw(0, 1)
        goal = goal_hint or self.state.inode_hint or 1
        if self.state.free_inodes < 1:
            raise FsError(errno.ENOSPC, "no free inodes")
        # The slot is zeroed before the bit is set: its block may be all-free.
        run = self.inodes.take(goal, 1, before=self._clear_inode_slot)
        if run is None:
            raise FsError(errno.ENOSPC, "no free inodes")
        ino = InodeNo(run[0])
        st = self.state
        st.free_inodes -= 1
        st.inode_hint = ino + 1 if ino < self.geo.ninodes else 1
        self._dirty_state()
        if self._op is not None:
            self._op.inodes -= 1
        return ino

    def _clear_inode_slot(self, ino: int) -> None:
        self.itable.clear_slot(InodeNo(ino))

    @_guarded
    def free_inode(self, ino: InodeNo) -> None:
        """Return inode ``ino`` to the free pool (reusable at once: inode numbers carry no
        on-disk image that could be replayed over a new owner).  Its table slot is zeroed
        in the same transaction (``InodeTable.clear_slot``)."""
        self.check_writable()
        self.itable.clear_slot(ino)  # before clearing the bit: the block is in use
        self.inodes.clear_range(ino, 1, defer=False)
        self.state.free_inodes += 1
        self._dirty_state()

    def next_generation(self) -> int:
        """A fresh inode generation number (journaled in the state block)."""
        self.check_writable()
        st = self.state
        gen = st.next_generation
        if not 1 <= gen <= 0xFFFF_FFFF:  # a damaged counter: generations are 32-bit
            gen = 1
        st.next_generation = gen + 1 if gen < 0xFFFF_FFFF else 1
        self._dirty_state()
        return gen

    @_guarded
    def inode_allocated(self, ino: InodeNo) -> bool:
        self.itable.check_ino(ino)
        return self.inodes.is_set(ino)

    # -- reporting ---------------------------------------------------------------------------

    def statfs(self) -> StatFs:
        st = self.state
        g = self.geo
        op = self._op
        held_b, held_i = (op.blocks, op.inodes) if op is not None else (0, 0)
        return StatFs(
            block_size=BLOCK_SIZE, total_blocks=g.nblocks, free_blocks=st.free_blocks,
            avail_blocks=max(0, st.free_blocks - held_b),
            total_inodes=g.ninodes, free_inodes=st.free_inodes,
            avail_inodes=max(0, st.free_inodes - held_i))

    @_guarded
    def verify_allocators(self) -> list[str]:
        """Recount both bitmaps against summaries and state counts (reads whole bitmaps)."""
        bfree, problems = self.blocks.verify()
        ifree, iproblems = self.inodes.verify()
        problems += iproblems
        if bfree != self.state.free_blocks:
            problems.append(f"block bitmap has {bfree} free, state block says "
                            f"{self.state.free_blocks}")
        if ifree != self.state.free_inodes:
            problems.append(f"inode bitmap has {ifree} free, state block says "
                            f"{self.state.free_inodes}")
        return problems
