"""File contents: reading, writing and truncating through an inode's extent map.

Data blocks are written in place through the store's data path (data cache for small writes,
write-behind for large ones; ordered mode: the store drains both and puts a barrier between
them and the commit of the metadata that points at them).  A write into a hole allocates
contiguous runs near the file's last extent so large files stay contiguous; space is reserved
before anything changes, so a write either completes or fails with ENOSPC having changed
nothing.  Freed blocks go back to the store, which keeps them unallocatable until the freeing
transaction is checkpointed.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

from nexfs.ondisk.bitmap import BPB
from nexfs.ondisk.extents import MAX_FILE_BLOCKS, ExtentMap
from nexfs.ondisk.inode_record import Inode
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.datacache import HOT_BLOCKS, Extents
from nexfs.store.inflight import BUFFER_BLOCKS, ReadGroup
from nexfs.types import BlockNo, FsError, InodeNo

if TYPE_CHECKING:
    from nexfs.core.inode_cache import OwnedStore
    from nexfs.store.inflight import DeviceReads
    from nexfs.store.store import Store

MAX_FILE_SIZE = MAX_FILE_BLOCKS * BLOCK_SIZE
_ZERO_BLOCK = bytes(BLOCK_SIZE)

PACK_PER_NODE = 32
"""A tree-mapped file's runs are packed for the short path only after this many requests
per tree block were refused for want of a current copy: a file whose map keeps changing
(writes into holes) then pays at most about what the refused requests' lookups cost."""


class FileData:
    """The data of one inode (regular file or long symlink)."""

    __slots__ = ("_packed", "_packed_at", "_refused", "emap", "inode", "owned", "store")

    def __init__(self, store: Store, owned: OwnedStore, inode: Inode, on_change) -> None:
        self.store = store
        self.owned = owned
        self.inode = inode
        self.emap = ExtentMap(owned, InodeNo(inode.ino), inode.area, lambda: on_change(inode))
        # The short path's copy of the extent runs (packed for C), current while
        # emap.changes == _packed_at; _refused counts requests refused for want of it.
        self._packed: Extents | None = None
        self._packed_at = -1
        self._refused = 0

    # -- the short path ---------------------------------------------------------------------

    def _extents(self) -> Extents | None:
        """The extent runs packed for the short path, rebuilt after a change of the map, or
        None while a tree-mapped file is not worth packing yet (PACK_PER_NODE)."""
        emap = self.emap
        if self._packed_at == emap.changes:
            return self._packed
        if not emap.is_inline:
            self._refused += 1
            if self._refused < emap.tree_blocks() * PACK_PER_NODE:
                return None
        self._packed = Extents(list(emap.extents()))
        self._packed_at = emap.changes
        self._refused = 0
        return self._packed

    def read_hot(self, offset: int, size: int) -> memoryview | None:
        """:meth:`read` in one call into C when every block is mapped and in the data
        cache: a view of the reply buffer (nexfs/store/datapath.py, ``read_hot``); None
        (nothing changed) for anything else: at or past end of file, holes, misses."""
        file_size = self.inode.size
        if offset >= file_size or size <= 0 or offset < 0:
            return None
        end = min(offset + size, file_size)
        first = offset // BLOCK_SIZE
        count = (end - 1) // BLOCK_SIZE - first + 1
        if count > HOT_BLOCKS:
            return None
        extents = self._packed if self._packed_at == self.emap.changes else self._extents()
        if extents is None:
            return None
        return self.store.data.read_hot(extents, first, count, offset - first * BLOCK_SIZE,
                                        end - offset)

    # -- reading ----------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (short at end of file; holes read as zeros)."""
        file_size = self.inode.size
        if offset >= file_size or size <= 0:
            return b""
        end = min(offset + size, file_size)
        first = offset // BLOCK_SIZE
        last = (end - 1) // BLOCK_SIZE
        nblocks = last - first + 1
        view = self.store.data.buffer(nblocks * BLOCK_SIZE)
        for lblk, phys, n in self.emap.map(first, nblocks):
            start = (lblk - first) * BLOCK_SIZE
            if phys == 0:
                view[start : start + n * BLOCK_SIZE] = bytes(n * BLOCK_SIZE)
            else:
                self.store.data.read(BlockNo(phys), n, into=view[start : start + n * BLOCK_SIZE])
        lo = offset - first * BLOCK_SIZE
        return bytes(view[lo : lo + (end - offset)])

    def read_start(self, offset: int, size: int,
                   reads: DeviceReads) -> bytes | tuple[memoryview, ReadGroup, int, int] | None:
        """The synchronous half of a read whose device part runs on the ring
        (nexfs/store/inflight.py): ``bytes`` when nothing is left for the device (end of file), or
        ``(buffer, group, lo, length)``: the reply is ``buffer[lo : lo + length]`` once
        ``group.done`` (and ``buffer`` goes back with ``reads.give_buffer``).  None: take the
        synchronous :meth:`read` (too large, or every buffer is in use)."""
        file_size = self.inode.size
        if offset >= file_size or size <= 0:
            return b""
        end = min(offset + size, file_size)
        first = offset // BLOCK_SIZE
        nblocks = (end - 1) // BLOCK_SIZE - first + 1
        if nblocks > BUFFER_BLOCKS:
            return None
        buf = reads.take_buffer()
        if buf is None:
            return None
        group = ReadGroup()
        try:
            for lblk, phys, n in self.emap.map(first, nblocks):
                start = (lblk - first) * BLOCK_SIZE
                part = buf[start : start + n * BLOCK_SIZE]
                if phys == 0:
                    part[:] = bytes(n * BLOCK_SIZE)
                    continue
                for blkno, count, into in self.store.data.plan_read(BlockNo(phys), n, part):
                    reads.submit(group, blkno, count, into)
        except BaseException:
            if group.left:
                reads.wait_all()  # the runs already started still write into buf
            reads.give_buffer(buf)
            raise
        if not group.left:
            group.done.set()
        return buf, group, offset - first * BLOCK_SIZE, end - offset

    # -- writing ----------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset``; returns the byte count.  Raises EFBIG past the
        maximum file size and ENOSPC (changing nothing) when the space is not there."""
        length = len(data)
        if length == 0:
            return 0
        if offset < 0:
            raise FsError(errno.EINVAL)
        if (not offset % BLOCK_SIZE and not length % BLOCK_SIZE
                and offset + length <= self.inode.size
                and self.store.data.caches(length // BLOCK_SIZE)):
            # The hot case (a 4 KiB overwrite of written blocks): no partial block to read
            # around, no hole, no size change, so the data goes to the data cache as it
            # came, without the copy into a scratch buffer: in one call into C when the
            # data path can take it so (nexfs/store/datapath.py, ``write_hot``).
            count = length // BLOCK_SIZE
            extents = self._packed if self._packed_at == self.emap.changes else self._extents()
            if extents is not None and self.store.data.write_hot(
                    extents, offset // BLOCK_SIZE, count, data):
                return length
            runs = self.emap.map(offset // BLOCK_SIZE, count)
            if len(runs) == 1 and runs[0][1]:
                self.store.data.write(BlockNo(runs[0][1]), count, data)
                return length
        if offset > self.inode.size and self.inode.size % BLOCK_SIZE and (
            offset // BLOCK_SIZE != self.inode.size // BLOCK_SIZE
        ):
            # The write leaves a gap after the old EOF: zero the rest of the old last block.
            self._zero_tail(self.inode.size)
        if offset >= MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        if offset + length > MAX_FILE_SIZE:
            length = MAX_FILE_SIZE - offset
            data = memoryview(data)[:length]
        end = offset + length
        first = offset // BLOCK_SIZE
        last = (end - 1) // BLOCK_SIZE
        nblocks = last - first + 1
        lo = offset - first * BLOCK_SIZE
        hi = lo + length
        if not lo and not hi % BLOCK_SIZE and self.store.data.caches(nblocks):
            # Whole blocks into the data cache, which copies them (a new small file's first
            # write): nothing around the write to read, so the data goes as it came, without
            # the scratch buffer's copy.  (Larger writes leave from a scratch buffer on the
            # write-behind thread.)
            view = memoryview(data).cast("B")
        else:
            view = self.store.data.buffer(nblocks * BLOCK_SIZE)
            # Partial first and last blocks keep the bytes around the write; read them
            # before any hole is filled (a hole reads as zeros, a fresh block holds stale
            # data).
            if lo:
                self._load_block(first, view[:BLOCK_SIZE])
            if hi % BLOCK_SIZE and (last != first or not lo):
                tail = (nblocks - 1) * BLOCK_SIZE
                self._load_block(last, view[tail : tail + BLOCK_SIZE])
            view[lo:hi] = data
        runs = self.emap.map(first, nblocks)
        holes = sum(n for _l, p, n in runs if p == 0)
        if holes:
            # The data blocks, and the tree nodes of one extent insert; each further run the
            # allocator hands back reserves its own insert (see _fill_holes).
            # Inside a filesystem operation this is its one reservation, or draws from it
            # (symlink reserved for its target); see Store.reserve.
            with self.store.reserve(holes + self.emap.worst_case_new_blocks(1)):
                runs = self._fill_holes(runs)
        for lblk, phys, n in runs:
            start = (lblk - first) * BLOCK_SIZE
            self.store.data.write(BlockNo(phys), n, view[start : start + n * BLOCK_SIZE])
        mapped_end = (runs[-1][0] + runs[-1][2]) * BLOCK_SIZE if runs else 0
        if mapped_end < end:
            # The volume filled up part-way: a short write of what was mapped (POSIX allows
            # it; the caller's retry of the rest gets ENOSPC).
            length = mapped_end - offset
            end = mapped_end
            if length <= 0:
                raise FsError(errno.ENOSPC)
        if end > self.inode.size:
            self.inode.size = end
        return length

    def _load_block(self, lblk: int, into: memoryview) -> None:
        """Current contents of one logical block: zeros for a hole and past end of file.

        Bytes past EOF may hold what a truncate cut off (the tail is not zeroed at
        truncate time: that would change the committed file in place before the size
        change commits), so they are zeroed here, before a write extends over them.
        """
        size = self.inode.size
        if lblk * BLOCK_SIZE >= size:
            into[:] = _ZERO_BLOCK
            return
        ((_l, phys, _n),) = self.emap.map(lblk, 1)
        if phys == 0:
            into[:] = _ZERO_BLOCK
            return
        self.store.data.read(BlockNo(phys), 1, into=into)
        tail = size - lblk * BLOCK_SIZE
        if tail < BLOCK_SIZE:
            into[tail:] = bytes(BLOCK_SIZE - tail)

    def _fill_holes(self, runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """Allocate blocks for the holes among ``runs``; returns the runs now mapped, in
        order — all of them, or a prefix when the extent tree could not grow any more.

        Newly allocated blocks may hold stale data, but every byte of them is written
        before the metadata that maps them commits (partial blocks are zero-filled by
        _load_block because a hole reads as zeros).
        """
        last = self.emap.last()
        goal = BlockNo(last[1] + last[2]) if last else None
        out: list[tuple[int, int, int]] = []
        inserts = 0
        for lblk, phys, n in runs:
            if phys:
                out.append((lblk, phys, n))
                goal = BlockNo(phys + n)
                continue
            while n:
                if inserts:
                    try:
                        self.store.reserve_more(self.emap.worst_case_new_blocks(1))
                    except FsError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        return out  # no room for more extents: the caller writes short
                inserts += 1
                start, got = self.store.alloc_data(goal, n)
                self.emap.insert(lblk, start, got)
                self.inode.blocks += got
                out.append((lblk, start, got))
                lblk += got
                n -= got
                goal = BlockNo(start + got)
        return out

    # -- truncating -------------------------------------------------------------------------

    def truncate(self, size: int, release: Callable[[int], None] | None = None) -> None:
        """Set the file size; blocks wholly past the new end are freed.  Growing zeroes the
        old last block past the old end (it may hold bytes an earlier truncate cut off).

        Shrinking sets the size first, then frees the blocks from the first logical block
        past it on: all at once, or through ``release(keep)`` (the filesystem's release in
        steps, which may commit between steps: the new size is then already there)."""
        if size < 0:
            raise FsError(errno.EINVAL)
        if size > MAX_FILE_SIZE:
            raise FsError(errno.EFBIG)
        old = self.inode.size
        if size < old:
            keep = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
            self.inode.size = size
            if release is None:
                self.free_runs(self.emap.punch(keep, None))
            else:
                release(keep)
        elif size > old and old % BLOCK_SIZE:
            # Growing: what lies past the old EOF in its block must read as zeros.
            self._zero_tail(old)
        self.inode.size = size

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate the whole blocks inside [offset, offset+length) (size unchanged)."""
        first = (offset + BLOCK_SIZE - 1) // BLOCK_SIZE
        end = (offset + length) // BLOCK_SIZE
        if end > first:
            self.free_runs(self.emap.punch(first, end - first))

    def _zero_tail(self, size: int) -> None:
        lblk = size // BLOCK_SIZE
        ((_l, phys, _n),) = self.emap.map(lblk, 1)
        if phys == 0:
            return
        # The request's scratch buffer: callers take their own only after this returns.
        view = self.store.data.buffer(BLOCK_SIZE)
        self.store.data.read(BlockNo(phys), 1, into=view)
        view[size % BLOCK_SIZE :] = bytes(BLOCK_SIZE - size % BLOCK_SIZE)
        self.store.data.write(BlockNo(phys), 1, view)

    def free_runs(self, runs: list[tuple[int, int]]) -> None:
        for phys, n in runs:
            self.store.free_blocks(BlockNo(phys), n)
            self.inode.blocks -= n

    def destroy(self) -> None:
        """Free every data block and extent-tree node of the inode."""
        self.free_runs(self.emap.destroy())

    def fits_one_step(self, groups: int) -> bool:
        """Whether one :meth:`release_step` of ``groups`` groups would free the whole map: it
        is inline (no tree nodes) and its extents touch at most ``groups`` bitmap groups,
        counted as the step counts them (a small file's delete: ``destroy`` alone)."""
        extents = self.emap.inline_extents()
        if extents is None:
            return False
        return sum((p + n - 1) // BPB - p // BPB + 1 for _lb, p, n in extents) <= groups

    def mapped_from(self, keep: int) -> bool:
        """Whether any block at or after logical block ``keep`` is mapped."""
        e = self.emap.last()
        return e is not None and e[0] + e[2] > keep

    def release_step(self, keep: int, groups: int) -> bool:
        """Free one step of the blocks mapped at or after logical block ``keep``: the last
        extents of the file (the last one possibly in part) whose blocks lie in at most
        ``groups`` bitmap groups, counting at least one per extent, so that the step
        dirties a bounded number of bitmap and tree blocks.  Returns True when nothing is
        mapped at or after ``keep`` any more.

        Steps go from the end of the file backwards, each a truncation of the map
        (``punch`` to the end): a step never splits an extent in two, so it never
        allocates, and whatever is still mapped past ``keep`` after a crash is one
        contiguous tail for the next release to finish."""
        e = self.emap.last()
        cost = 0
        cut = -1
        while e is not None and e[0] + e[2] > keep:
            lb, p, n = e
            lo = max(lb, keep)
            first_g, last_g = (p + lo - lb) // BPB, (p + n - 1) // BPB
            c = last_g - first_g + 1
            if cost + c > groups:
                room = groups - cost
                if room > 0:  # this extent's last ``room`` groups
                    cut = lb + (last_g - room + 1) * BPB - p
                self.free_runs(self.emap.punch(cut, None))
                return False
            cost += c
            cut = lo
            e = self.emap.before(lb)
        if cut >= 0:
            self.free_runs(self.emap.punch(cut, None))
        return True
