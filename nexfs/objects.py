"""The object layer: handles on the structures of one open volume (the role libext2fs plays
for e2fsprogs).

:class:`Objects` gives the pieces a volume is made of, each bound to its inode so that
every change is accounted for: the inode itself (decoded, cached, written back once per
operation), a directory's index (:class:`DirHandle`: add, remove, replace and look up
entries; the handle writes its tree root and size back into the inode), a file's data
(:class:`~nexfs.fileio.FileData`) and its extent map, and an inode's extended attributes
(:class:`~nexfs.xattr.XattrStore`).  Every metadata block a handle allocates or frees is
counted in the inode's ``blocks`` and marks the inode dirty.

It holds no policy: POSIX rules, permissions and timestamps are :class:`~nexfs.fs.FileSystem`'s,
and the checker and repair use the same handles instead of FileSystem's internals.  Nothing
here commits: changes join the store's running transaction like any other.

Still inside FileSystem (to move here next): inode allocation and freeing and the orphan list
(FileSystem.free_inode and release_data are public meanwhile).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .dirindex import DirIndex
from .extents import ExtentMap
from .fileio import FileData
from .inode import DIR_ROOT, Inode
from .inodes import InodeCache, OwnedStore
from .layout import LOST_FOUND_INODE, ROOT_INODE
from .metastore import BLOCK_SIZE
from .types import InodeNo
from .xattr import XattrStore

if TYPE_CHECKING:
    from .store import Store

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


class Objects:
    """The object layer of one open volume: handles bound to inodes (module docstring)."""

    def __init__(self, store: Store, inodes: InodeCache) -> None:
        self.store = store
        self.inodes = inodes

    # -- inodes -----------------------------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        """The inode ``ino``; FsError(ENOENT) if it is not allocated."""
        return self.inodes.get(ino)

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
        return DirIndex(self.owned(inode), InodeNo(inode.ino), root, self.store.sb.hash_key)

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
        # Kept on the inode object: decoding the extent map was a tenth of a 4 KiB read.
        # Every change to a file's extents goes through this object, and an inode dropped
        # after a failed operation takes it along.
        data = inode.data
        if data is None:
            data = inode.data = FileData(self.store, self.owned(inode), inode, self.dirty)
        return data

    def new_extent_map(self, inode: Inode) -> ExtentMap:
        """Start ``inode``'s extent map afresh (repair's rebuild; see
        :meth:`new_directory_index`).  The cached data handle, if any, is dropped."""
        inode.area[:] = bytes(len(inode.area))
        inode.blocks = 0
        inode.data = None
        return ExtentMap(self.owned(inode), InodeNo(inode.ino), inode.area,
                         lambda: self.dirty(inode))

    # -- extended attributes ----------------------------------------------------------------

    def xattrs(self, inode: Inode) -> XattrStore:
        """``inode``'s extended attributes (the caller stores a changed root back)."""
        return XattrStore(self.owned(inode), InodeNo(inode.ino), inode.xattr_root,
                          self.store.sb.hash_key)
