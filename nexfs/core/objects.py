"""The object layer: handles on the structures of one open volume (the role libext2fs plays
for e2fsprogs).

:class:`Objects` gives the pieces a volume is made of, each bound to its inode so that
every change is accounted for: the inode itself (decoded, cached, written back once per
operation), a directory's index (:class:`DirHandle`: add, remove, replace and look up
entries; the handle writes its tree root and size back into the inode), a file's data
(:class:`~nexfs.core.filedata.FileData`) and its extent map, and an inode's extended
attributes (:class:`XattrHandle`, which writes the tree's root back as a directory handle
does).  Every metadata block a handle allocates or frees is counted in the inode's
``blocks`` and marks the inode dirty.

It holds no policy: POSIX rules, permissions and timestamps are
:class:`~nexfs.core.fs.FileSystem`'s, and the checker and repair use the same handles
instead of FileSystem's internals.  Nothing
here commits: changes join the store's running transaction like any other.

It also allocates and frees inodes (freeing releases everything the inode owns, in steps
that may commit) and keeps the orphan list: inodes whose deletion or truncation may span
several transactions, finished by the next mount or fsck after a crash.

When the volume enters its error state (the running transaction discarded), it forgets
every decoded inode and its orphan-list index, which may describe changes that never
reached the disk; nothing above it needs to know.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nexfs.core.filedata import FileData
from nexfs.core.inode_cache import InodeCache, OwnedStore
from nexfs.ondisk.dirindex import DirIndex, keyed_hash
from nexfs.ondisk.extents import ExtentMap
from nexfs.ondisk.inode_record import DIR_ROOT, INODE_FLAG_INLINE, INODE_FLAG_ORPHAN, Inode
from nexfs.ondisk.layout import LOST_FOUND_INODE, ROOT_INODE
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.ondisk.xattr_tree import XattrStore
from nexfs.types import CorruptionError, InodeNo

if TYPE_CHECKING:
    from nexfs.store.store import Store

ROOT_INO = InodeNo(ROOT_INODE)
LOST_FOUND_INO = InodeNo(LOST_FOUND_INODE)
SYMLINK_MAX = 4095  # longest symlink target (PATH_MAX - 1), a rule the checker enforces too


class DirHandle:
    """One directory's index bound to its inode: each change writes the root back."""

    __slots__ = ("index", "inode", "objects")

    def __init__(self, objects: Objects, inode: Inode, index: DirIndex) -> None:
        self.objects = objects
        self.inode = inode
        self.index = index

    def lookup(self, name: bytes) -> tuple[int, int] | None:
        """(inode number, dtype) of ``name``, or None."""
        return self.index.lookup(name)

    def add(self, name: bytes, ino: int, dtype: int) -> int:
        """Add an entry (FsError(EEXIST) if the name exists); returns its cookie."""
        cookie = self.index.insert(name, ino, dtype)
        self.write_back()
        return cookie

    def remove(self, name: bytes) -> tuple[int, int]:
        """Remove an entry (FsError(ENOENT) if absent); returns its (inode number, dtype)."""
        old = self.index.remove(name)
        self.write_back()
        return old

    def replace(self, name: bytes, ino: int, dtype: int) -> tuple[int, int]:
        """Point an existing entry elsewhere; returns the old (inode number, dtype)."""
        old = self.index.replace(name, ino, dtype)
        self.write_back()
        return old

    def write_back(self) -> None:
        """The index's root and the directory's size into the inode (marked dirty)."""
        self.objects.dir_changed(self.inode, self.index)


class XattrHandle:
    """One inode's extended attributes bound to the inode: each change writes the tree's
    root back into the inode (marked dirty)."""

    __slots__ = ("inode", "objects", "tree")

    def __init__(self, objects: Objects, inode: Inode, tree: XattrStore) -> None:
        self.objects = objects
        self.inode = inode
        self.tree = tree

    def get(self, name: bytes) -> bytes:
        """The value of ``name``; FsError(ENODATA) if absent."""
        return self.tree.get(name)

    def list(self) -> list[bytes]:
        """Every name, in the tree's order."""
        return self.tree.list()

    def worst_case_new_blocks(self, value_len: int) -> int:
        """Blocks a set of a value of ``value_len`` bytes may allocate (for the reservation)."""
        return self.tree.worst_case_new_blocks(value_len)

    def set(self, name: bytes, value: bytes, flags: int = 0) -> None:
        """Create or replace ``name`` (``flags``: XATTR_CREATE / XATTR_REPLACE)."""
        self.tree.set(name, value, flags)
        self._write_back()

    def remove(self, name: bytes) -> None:
        """Remove ``name``; FsError(ENODATA) if absent."""
        self.tree.remove(name)
        self._write_back()

    def destroy(self) -> None:
        """Free every block of the tree (the inode is being freed)."""
        self.tree.destroy()
        self._write_back()

    def abandon(self) -> None:
        """Forget a damaged tree without freeing it (repair: the checker found its blocks'
        true owners and rewrites the bitmaps)."""
        self.inode.xattr_root = 0
        self.objects.dirty(self.inode)

    def _write_back(self) -> None:
        if self.inode.xattr_root != self.tree.root:
            self.inode.xattr_root = self.tree.root
            self.objects.dirty(self.inode)


class Objects:
    """The object layer of one open volume: handles bound to inodes (module docstring)."""

    def __init__(self, store: Store, inodes: InodeCache) -> None:
        self.store = store
        self.inodes = inodes
        # Orphan list: the predecessor of every inode on it (0 = the head), built at first
        # use by one walk of the list; see orphan_links.  None again after a failure.
        self._orphan_prev: dict[int, int] | None = None
        store.failures.on_error(self._forget_uncommitted)
        self._name_hash = keyed_hash(store.sb.hash_key)  # one per volume (it memoizes)

    def _forget_uncommitted(self) -> None:
        # The store discarded its running transaction: decoded inodes changed since the
        # last commit may point at blocks that never reached the disk.  Read them again.
        self.inodes.clear()
        self._orphan_prev = None

    # -- inodes -----------------------------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        """The inode ``ino``; FsError(ENOENT) if it is not allocated."""
        return self.inodes.get(ino)

    def new_inode(self, near: Inode | None, mode: int, uid: int, gid: int, now: int) -> Inode:
        """Allocate an inode (near ``near``'s number) with one link, all four times ``now``
        and a fresh generation; it joins the cache dirty."""
        ino = self.store.alloc_inode(InodeNo(near.ino) if near else None)
        inode = Inode(ino)
        inode.mode = mode
        inode.uid = uid
        inode.gid = gid
        inode.nlink = 1
        inode.atime_ns = inode.mtime_ns = inode.ctime_ns = inode.btime_ns = now
        inode.generation = self.store.next_generation()
        self.inodes.add(inode)
        return inode

    def dirty(self, inode: Inode) -> None:
        """``inode`` changed: it is written back at the end of the operation."""
        self.inodes.dirty(inode)

    def owned(self, inode: Inode) -> OwnedStore:
        """The store as ``inode``'s trees see it (their blocks counted in ``inode.blocks``)."""
        return OwnedStore(self.store, inode, self.dirty)

    # -- directories ------------------------------------------------------------------------

    def dir_index(self, inode: Inode) -> DirIndex:
        """The bare index of directory ``inode``; call :meth:`dir_changed` after changing it
        (or use :meth:`directory`, which does)."""
        (root,) = DIR_ROOT.unpack_from(inode.area, 0)
        # Kept while the inode is cached, like the data handle: building the index (its
        # owned view of the store, its B+tree) was ~2 us, and LOOKUP, CREATE and UNLINK each
        # build one or two.  It holds no entries, only the root, which is checked against
        # the inode's (an operation that failed after changing the tree leaves them apart).
        handles = self.inodes.dir_handles
        held = handles.get(inode.ino)
        if held is not None and held[0] is inode and held[1].root == root:
            return held[1]
        index = DirIndex(self.owned(inode), InodeNo(inode.ino), root, b"",
                         hash_fn=self._name_hash)
        handles[inode.ino] = (inode, index)
        return index

    def dir_changed(self, inode: Inode, index: DirIndex | None = None) -> None:
        """Write ``index``'s root (if given) and the directory's size back into ``inode``."""
        if index is not None:
            DIR_ROOT.pack_into(inode.area, 0, index.root)
        inode.size = max(1, inode.blocks) * BLOCK_SIZE
        self.dirty(inode)

    def directory(self, inode: Inode) -> DirHandle:
        """A handle on directory ``inode``'s entries."""
        return DirHandle(self, inode, self.dir_index(inode))

    def new_directory_index(self, inode: Inode) -> DirHandle:
        """Start directory ``inode``'s index afresh (repair's rebuild: the old tree is
        abandoned, not freed; the checker found its blocks' true owners)."""
        inode.area[:] = bytes(len(inode.area))
        inode.blocks = 0
        index = DirIndex(self.owned(inode), InodeNo(inode.ino), 0, self.store.sb.hash_key)
        return DirHandle(self, inode, index)

    # -- file data --------------------------------------------------------------------------

    def data(self, inode: Inode) -> FileData:
        """The data of regular file or long symlink ``inode``."""
        # Kept while the inode is cached: decoding the extent map was a tenth of a 4 KiB
        # read.  Every change to a file's extents goes through this object, and an inode
        # dropped after a failed operation takes it along (InodeCache drops the handle).
        handles = self.inodes.data_handles
        data = handles.get(inode.ino)
        if data is None or data.inode is not inode:
            data = handles[inode.ino] = FileData(self.store, self.owned(inode), inode,
                                                 self.dirty)
        return data

    def new_extent_map(self, inode: Inode) -> ExtentMap:
        """Start ``inode``'s extent map afresh (repair's rebuild; see
        :meth:`new_directory_index`).  The cached data handle, if any, is dropped."""
        inode.area[:] = bytes(len(inode.area))
        inode.blocks = 0
        self.inodes.data_handles.pop(inode.ino, None)
        return ExtentMap(self.owned(inode), InodeNo(inode.ino), inode.area,
                         lambda: self.dirty(inode))

    # -- extended attributes ----------------------------------------------------------------

    def xattrs(self, inode: Inode) -> XattrHandle:
        """A handle on ``inode``'s extended attributes."""
        tree = XattrStore(self.owned(inode), InodeNo(inode.ino), inode.xattr_root,
                          self.store.sb.hash_key)
        return XattrHandle(self, inode, tree)

    # -- freeing and the orphan list ------------------------------------------------------

    def free_inode(self, inode: Inode) -> None:
        """Free an inode with no name left and everything it owns; an orphan leaves the
        list last, with the inode itself (its data may take several transactions)."""
        if inode.is_reg or (inode.is_symlink and not inode.flags & INODE_FLAG_INLINE):
            data = self.data(inode)
            store = self.store
            # A small file (most deletes): release_data would take exactly one step, which
            # punches the whole map, so destroy() alone frees the same blocks in the same
            # transaction, without the step's walk and punch (~10 us of a ~45 us delete).
            if not (data.fits_one_step(store.free_step_groups()) and store.room_for_free_step()):
                self.release_data(inode, 0)
            data.destroy()  # the emptied map (and nothing else) is reset
        elif inode.is_dir:
            self.dir_index(inode).destroy()
        if inode.xattr_root:
            self.xattrs(inode).destroy()
        self.orphan_remove(inode)
        self.inodes.forget(inode.ino)
        self.store.free_inode(InodeNo(inode.ino))

    def release_data(self, inode: Inode, keep: int, *, protect: bool = True) -> None:
        """Free the data blocks of ``inode`` (a regular file or long symlink) mapped at or
        after logical block ``keep``, in steps that each fit in a transaction, committing
        between them when the running transaction is full.

        A delete or truncate of a file spanning more bitmap groups than a transaction can
        dirty takes several transactions.  Before the first intermediate commit the inode
        goes on the orphan list (unless it is on it already), and it leaves it after the
        last step, so a crash in between leaves a consistent volume whose mount (or fsck)
        finishes the job: an orphan with no links is freed, one with links is truncated to
        its size, which is already the new one.  ``protect=False`` (fsck's repair, which a
        second run finishes instead) skips the orphan list.  Changes of the operation made
        before the call are committed with the first step, so they must be complete."""
        data = self.data(inode)
        store = self.store
        added = False
        while data.mapped_from(keep):
            if not store.room_for_free_step():
                if protect and not inode.flags & INODE_FLAG_ORPHAN:
                    self.orphan_add(inode)
                    added = True
                self.dirty(inode)
                self.inodes.flush()
                store.commit(durable=False)
            data.release_step(keep, store.free_step_groups())
        if added:
            self.orphan_remove(inode)

    def orphan_links(self) -> dict[int, int]:
        """The predecessor of every inode on the orphan list (0 for the head): built by one
        walk of the on-disk list at first use, then kept up to date by orphan_add and
        orphan_remove, so that taking an inode off the singly linked list is O(1) (the
        walk for its predecessor made releasing n open-unlinked files O(n^2))."""
        prev = self._orphan_prev
        if prev is None:
            prev = {}
            before, ino = 0, self.store.state.orphan_head
            while ino:
                if ino in prev:
                    raise CorruptionError(0, "orphan list", f"loop at inode {ino}")
                prev[ino] = before
                before, ino = ino, self.inodes.get(ino).orphan_next
            self._orphan_prev = prev
        return prev

    def first_orphan(self) -> InodeNo | None:
        """The inode at the head of the orphan list, or None when it is empty."""
        head = self.store.state.orphan_head
        return InodeNo(head) if head else None

    def orphan_clear(self, flagged: list[int]) -> None:
        """Empty the orphan list at once (fsck's repair, which has dealt with every inode on
        it): the head is cleared and so are the flag and link of each inode in
        ``flagged``."""
        state = self.store.state
        if state.orphan_head:
            state.orphan_head = 0
            self.store.dirty(state)
        for ino in flagged:
            inode = self.inodes.get(ino)
            inode.flags &= ~INODE_FLAG_ORPHAN
            inode.orphan_next = 0
            self.dirty(inode)
        self._orphan_prev = None

    def orphan_add(self, inode: Inode) -> None:
        """Put ``inode`` at the head of the orphan list (flagged, state block dirty)."""
        links = self.orphan_links()
        state = self.store.state
        inode.flags |= INODE_FLAG_ORPHAN
        inode.orphan_next = state.orphan_head
        if state.orphan_head:
            links[state.orphan_head] = inode.ino
        links[inode.ino] = 0
        state.orphan_head = inode.ino
        self.store.dirty(state)
        self.dirty(inode)

    def orphan_remove(self, inode: Inode) -> None:
        """Take ``inode`` off the orphan list, if it is flagged as on it."""
        if not inode.flags & INODE_FLAG_ORPHAN:
            return
        links = self.orphan_links()
        before = links.pop(inode.ino, None)
        if before is None:
            raise CorruptionError(0, "orphan list", f"inode {inode.ino} is flagged as an "
                                  "orphan but not on the list")
        after = inode.orphan_next
        if before == 0:
            self.store.state.orphan_head = after
            self.store.dirty(self.store.state)
        else:
            prev = self.inodes.get(before)
            prev.orphan_next = after
            self.dirty(prev)
        if after:
            links[after] = before
        inode.orphan_next = 0
        inode.flags &= ~INODE_FLAG_ORPHAN
        self.dirty(inode)
