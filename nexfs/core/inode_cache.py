"""The inode cache: decoded inodes by number, written back to the inode table once per
commit, and the per-inode view of the store that keeps ``inode.blocks`` exact.

Write-back: a changed inode stays dirty here and is encoded into its table slot by the
store's ``before_commit`` hook, at the start of every commit, whoever commits (the timer,
fsync, a full transaction, the store itself before an ENOSPC).  A small file extracted by
``tar`` changes its inode five times (create, write, three SETATTRs) and its directory's
once per entry; encoding and sealing a record cost ~8 us, a fifth of a SETATTR
(docs/BENCHMARKS.md, "Requests per file").  The dirty set is bounded by the caller
(``FileSystem`` commits when :meth:`dirty_count` reaches its limit), which also bounds the
table blocks a commit adds to the running transaction.

Memory is bounded: inodes that are referenced (open, or known to the kernel) or dirty stay;
the rest live in an LRU of ``limit`` entries.
"""

from __future__ import annotations

import errno
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from nexfs.ondisk.inode_record import Inode
from nexfs.ondisk.metablock import MetaBlock
from nexfs.types import BlockNo, FsError, InodeNo

if TYPE_CHECKING:
    from nexfs.core.acl import Acl
    from nexfs.core.filedata import FileData
    from nexfs.ondisk.dirindex import DirIndex
    from nexfs.store.store import Store

log = logging.getLogger(__name__)

M = TypeVar("M", bound=MetaBlock)


class InodeCache:
    """Decoded inodes, with write-back of the dirty ones into the store's inode table."""

    def __init__(self, store: Store, limit: int = 8192) -> None:
        self.store = store
        self.limit = limit
        self._lru: OrderedDict[int, Inode] = OrderedDict()
        self._dirty: dict[int, Inode] = {}
        self.changes = 0
        """Grows with every :meth:`add` and :meth:`dirty`: an operation that failed without
        changing it changed no inode (the failure policy's "changed" question)."""
        store.before_commit.append(self.flush)
        # The object layer's data handle of each cached inode (nexfs/core/objects.py, data):
        # dropped with the inode, so a handle never outlives the decoded inode it is over.
        self.data_handles: dict[int, FileData] = {}
        # The decoded access ACL of each cached inode, read on its first permission check
        # (absent: not read yet; an empty tuple: none).  Kept up to date by the filesystem
        # and dropped with the inode like the data handle.
        self.acls: dict[int, Acl] = {}
        # The directory index handle of each cached directory (Objects.dir_index), with the
        # decoded inode it was made for; dropped with the inode like the data handle.
        self.dir_handles: dict[int, tuple[Inode, DirIndex]] = {}

    def get(self, ino: int) -> Inode:
        """The inode ``ino``; FsError(ENOENT) if it is not allocated (a stale number)."""
        inode = self._lru.get(ino)
        if inode is not None:
            self._lru.move_to_end(ino)
            return inode
        inode = self._dirty.get(ino)
        if inode is not None:
            return inode
        if not 1 <= ino <= self.store.geo.ninodes or not self.store.inode_allocated(InodeNo(ino)):
            raise FsError(errno.ENOENT, f"inode {ino} is not allocated")
        inode = Inode.decode(
            InodeNo(ino), self.store.itable.read_raw(InodeNo(ino)), self.store.volume_seed,
            self.store.itable.block_of(InodeNo(ino)),
        )
        if inode.mode == 0:
            raise FsError(errno.ENOENT, f"inode {ino} is free")
        self._insert(inode)
        return inode

    def add(self, inode: Inode) -> None:
        """A newly allocated inode; dirty."""
        self._insert(inode)
        self._dirty[inode.ino] = inode
        self.changes += 1

    def dirty(self, inode: Inode) -> None:
        self._dirty[inode.ino] = inode
        self.changes += 1

    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def dirty_count(self) -> int:
        """Inodes changed since the last write-back."""
        return len(self._dirty)

    def forget(self, ino: int) -> None:
        """The inode was freed: drop it without writing it back."""
        self._lru.pop(ino, None)
        self._dirty.pop(ino, None)
        self.data_handles.pop(ino, None)
        self.acls.pop(ino, None)
        self.dir_handles.pop(ino, None)

    def flush(self) -> None:
        """Encode every dirty inode into its table slot (joins the running transaction)."""
        if not self._dirty:
            return
        seed = self.store.volume_seed
        for ino, inode in self._dirty.items():
            self.store.itable.write_raw(InodeNo(ino), inode.encode(seed))
        self._dirty.clear()

    def discard_dirty(self) -> None:
        """After a failed operation: forget in-memory changes that never reached the store."""
        for ino in list(self._dirty):
            self._lru.pop(ino, None)
            self.data_handles.pop(ino, None)
            self.acls.pop(ino, None)
            self.dir_handles.pop(ino, None)
        self._dirty.clear()

    def clear(self) -> None:
        self._lru.clear()
        self._dirty.clear()
        self.data_handles.clear()
        self.acls.clear()
        self.dir_handles.clear()

    def _insert(self, inode: Inode) -> None:
        self._lru[inode.ino] = inode
        self._lru.move_to_end(inode.ino)
        while len(self._lru) > self.limit:
            ino, old = next(iter(self._lru.items()))
            if ino in self._dirty:
                # Dirty inodes are written back at the next commit; never evict them before.
                self._lru.move_to_end(ino)
                if all(i in self._dirty for i in self._lru):
                    break
                continue
            del self._lru[ino]
            self.data_handles.pop(ino, None)
            self.acls.pop(ino, None)
            self.dir_handles.pop(ino, None)
            del old


class OwnedStore:
    """The store as seen by one inode's trees: every metadata block allocated or freed for the
    inode is counted in ``inode.blocks`` (what stat reports as st_blocks)."""

    __slots__ = ("_on_change", "dirty", "get", "inode", "store", "volume_seed")

    def __init__(self, store: Store, inode: Inode, on_change: Callable[[Inode], None]) -> None:
        self.store = store
        self.inode = inode
        self.volume_seed = store.volume_seed
        self._on_change = on_change
        # Passed through unchanged, and on every tree node visit (~10 per file created and
        # deleted): the store's own bound methods, without a forwarding call in between.
        self.get = store.get
        self.dirty = store.dirty

    def put_new(self, block: MetaBlock) -> None:
        self.store.put_new(block)

    def alloc_meta(self, goal: BlockNo | None, owner: InodeNo) -> BlockNo:
        blkno = self.store.alloc_meta(goal, owner)
        self.inode.blocks += 1
        self._on_change(self.inode)
        return blkno

    def free_meta(self, blkno: BlockNo) -> None:
        self.store.free_meta(blkno)
        self.inode.blocks -= 1
        self._on_change(self.inode)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)
