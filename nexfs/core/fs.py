"""The filesystem: POSIX semantics on inode numbers, over the metadata store.

``FileSystem`` owns the valve capability (through its :class:`~nexfs.store.store.Store`) and is the
only thing that interprets NexFS structures on a live volume.  Every public method is one
operation: it checks everything that can fail first, reserves the space it may need, then
changes the in-memory structures, which join the store's running transaction.  The
transaction commits on fsync, on a timer (the caller's :meth:`commit`), or when it grows
large, so each operation is atomic with respect to a crash.

Errors leave as :class:`~nexfs.types.FsError` with an errno.  A corruption or device error in
the middle of an operation turns the volume read-only and marks it as needing fsck; the
on-disk state stays at the last commit.

Concurrency invariant: all methods are synchronous and must be called from one thread (the
trio task of the mount); none of them awaits, so operations never interleave.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from nexfs.core import acl as acls
from nexfs.core import clock, perms
from nexfs.core.attr import UTIME_NOW, Attr, Ctx, SetAttr, StatFs
from nexfs.core.inode_cache import InodeCache
from nexfs.core.objects import LOST_FOUND_INO, ROOT_INO, SYMLINK_MAX, Objects
from nexfs.ondisk.inode_record import DATA_AREA_SIZE, INODE_FLAG_INLINE, INODE_FLAG_ORPHAN, Inode
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.datapath import read_error
from nexfs.store.failure import FailurePolicy
from nexfs.store.store import Store
from nexfs.types import CorruptionError, FsError, InodeNo

if TYPE_CHECKING:
    from nexfs.store.inflight import DeviceReads, ReadGroup

log = logging.getLogger(__name__)

NAME_MAX = 255
LINK_MAX = 65000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")
FMODE_EXEC = 0o40
"""The kernel's ``__FMODE_EXEC``: set in the open flags FUSE passes on when execve opens a
program.  Such an open is checked as execute, not read: a 0711 program runs for anybody."""
_DAY_NS = 86400 * 1_000_000_000
DIRTY_INODES_MAX = 1024
"""Inodes changed since the last write-back after which an operation writes them into the
running transaction (fewer on a small journal: a sixteenth of it)."""

T = TypeVar("T")


def _dtype(mode: int) -> int:
    return stat.S_IFMT(mode) >> 12


def _check_name(name: bytes) -> None:
    if not name:
        raise FsError(errno.ENOENT)
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL)


def _now() -> int:
    # The kernel's clock, not time.time_ns(): with the writeback cache the kernel stamps the
    # files it caches itself, and both kinds of stamps must be ordered (nexfs/core/clock.py).
    return clock.now_ns()


def _mutating(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap an operation that changes the volume: refuse on a read-only volume, give it its
    one reservation scope (nexfs/store/store.py, ``operation``), and turn an error in the
    middle into read-only mode.  The inodes it touched are written back at the next commit
    (nexfs/core/inode_cache.py), or sooner when many are waiting."""

    @functools.wraps(fn)
    def wrapper(self: FileSystem, *args: Any, **kwargs: Any) -> T:
        if self.read_only:
            raise FsError(errno.EROFS)
        mark = self.store.change_count()
        inodes_mark = self.inodes.changes
        try:
            # One reservation per operation: taken by its reserve() call before anything
            # changes; every allocation inside, at any layer, draws from it.
            with self.store.operation():
                result = fn(self, *args, **kwargs)
        except BaseException as exc:
            self.failures.failed(exc, changed=self.store.change_count() != mark
                                       or self.inodes.changes != inodes_mark,
                                 where=fn.__name__)
            raise
        if self.inodes.dirty_count() >= self._dirty_limit:
            self.inodes.flush()  # into the running transaction, which should_commit sees
        if self.store.should_commit():
            self.store.commit(durable=False)  # a guarded store method: the policy decides
        return result

    setattr(wrapper, FAILURE_BOUNDARY, True)
    return wrapper


def _reading(fn: Callable[..., T]) -> Callable[..., T]:
    """Wrap an operation that changes nothing by itself (or commits what others changed):
    a failure goes to the failure policy (nexfs/store/failure.py), which decides."""

    @functools.wraps(fn)
    def wrapper(self: FileSystem, *args: Any, **kwargs: Any) -> T:
        try:
            return fn(self, *args, **kwargs)
        except BaseException as exc:
            self.failures.failed(exc, where=fn.__name__)
            raise

    setattr(wrapper, FAILURE_BOUNDARY, True)
    return wrapper


FAILURE_BOUNDARY = "_nexfs_failure_boundary"
"""Set on every wrapped public method (tests/test_failure_policy.py checks that none is
missing)."""


class FileSystem:
    """A mounted NexFS volume (see the module docstring for the rules every method keeps)."""

    def __init__(self, store: Store, *, atime: str = "relatime", acl: bool = True) -> None:
        if atime not in ("relatime", "noatime", "strictatime"):
            raise ValueError(f"unknown atime mode {atime!r}")
        self.store = store
        self.atime = atime
        # POSIX ACLs (nexfs/core/acl.py), the mount's acl/noacl option: off, the system.posix_acl_*
        # names are refused and stored ones are neither listed nor enforced (as ext4 noacl).
        self.acl = acl
        self.inodes = InodeCache(store)
        # Dirty inodes are written back at commit, or when this many wait: at most one
        # table block each, so a commit adds at most this many blocks to a running
        # transaction that should_commit keeps at a quarter of the journal.
        self._dirty_limit = max(16, min(DIRTY_INODES_MAX, store.geo.journal_len // 16))
        self.objects = Objects(store, self.inodes)  # the handles repair and fsck use too
        self._refs: dict[int, int] = {}
        self._error_at_open = store.error  # a volume opened read-only because marked ERROR

    # -- lifecycle --------------------------------------------------------------------------

    @classmethod
    def format(cls, dev: Any, *, label: str = "", progress: Callable[[str], None] | None = None,
               **options: Any) -> None:
        """Write an empty NexFS volume on ``dev``: the store's structures, the root directory
        and lost+found."""
        Store.format(dev, label=label, progress=progress, **options)
        store = Store.open(dev)
        fs = cls(store)
        try:
            fs._make_root()
        finally:
            fs.close()

    @classmethod
    def open(cls, dev: Any, *, read_only: bool = False, cache_blocks: int | None = None,
             data_cache_blocks: int | None = None, atime: str = "relatime",
             acl: bool = True) -> FileSystem:
        """Open the volume on ``dev`` (replaying its journal if it was not unmounted
        cleanly) and finish any deletions a crash interrupted.  ``cache_blocks`` bounds the
        metadata cache, ``data_cache_blocks`` the data cache (0: none, small writes go
        straight to the device)."""
        kwargs: dict[str, Any] = {"read_only": read_only}
        if cache_blocks is not None:
            kwargs["cache_blocks"] = cache_blocks
        if data_cache_blocks is not None:
            kwargs["data_cache_blocks"] = data_cache_blocks
        store = Store.open(dev, **kwargs)
        fs = cls(store, atime=atime, acl=acl)
        try:
            fs.inodes.get(ROOT_INO)
            if not fs.read_only:  # (a volume marked ERROR opens read-only)
                fs._process_orphans()
        except BaseException:
            store.abort()
            raise
        return fs

    @_reading
    def close(self) -> None:
        """Drop every in-memory reference, commit, checkpoint and mark the volume clean."""
        if not self.read_only:
            try:
                for ino in list(self._refs):
                    self._refs.pop(ino, None)
                    self._maybe_free(ino)
                self.inodes.flush()
            except FsError as exc:
                log.error("while closing: %s", exc)
        self.inodes.clear()
        self.store.close()

    @property
    def read_only(self) -> bool:
        return self.store.read_only

    @property
    def error(self) -> str | None:
        return self.store.error

    @property
    def failures(self) -> FailurePolicy:
        """The volume's failure policy (nexfs/store/failure.py)."""
        return self.store.failures

    @_reading
    def mark_error(self, reason: str) -> None:
        """Something went wrong that the volume can't be trusted after: stop writing and
        record that it needs fsck."""
        self.failures.enter(reason)

    @_reading
    def commit(self, durable: bool = True) -> None:
        """Commit the running transaction (called on a timer by the mount)."""
        if self.read_only:
            return
        try:
            self.inodes.flush()
            self.store.commit(durable=durable)
        except BaseException as exc:
            self.failures.failed(exc, changed=True, where="commit")
            raise

    def _make_root(self) -> None:
        now = _now()
        root = self._new_inode(None, stat.S_IFDIR | 0o755, 0, 0, now)
        if root.ino != ROOT_INO:
            raise FsError(errno.EIO, f"mkfs: root got inode {root.ino}")
        root.nlink = 2
        root.parent = ROOT_INO
        lf = self._new_inode(root, stat.S_IFDIR | 0o700, 0, 0, now)
        if lf.ino != LOST_FOUND_INO:
            raise FsError(errno.EIO, f"mkfs: lost+found got inode {lf.ino}")
        lf.nlink = 2
        lf.parent = ROOT_INO
        lf.size = BLOCK_SIZE
        index = self.objects.dir_index(root)
        index.insert(b"lost+found", lf.ino, _dtype(lf.mode))
        self.objects.dir_changed(root, index)
        root.nlink += 1
        self.inodes.flush()
        self.store.commit(durable=True)

    # -- helpers ----------------------------------------------------------------------------

    def _access_acl(self, inode: Inode) -> acls.Acl | None:
        """The inode's access ACL for a permission check (cached with the inode)."""
        if not self.acl or not inode.xattr_root:
            return None
        acl = self.inodes.acls.get(inode.ino)
        if acl is None:
            acl = self.inodes.acls[inode.ino] = self._stored_acl(inode, acls.ACCESS) or ()
        return acl or None

    def _stored_acl(self, inode: Inode, name: bytes) -> acls.Acl | None:
        if not inode.xattr_root:
            return None
        try:
            value = self.objects.xattrs(inode).get(name)
        except FsError as exc:
            if exc.errno == errno.ENODATA and not isinstance(exc, CorruptionError):
                return None
            raise
        try:
            return acls.decode(value)
        except FsError as exc:
            raise CorruptionError(0, f"inode {inode.ino}",
                                  f"invalid {name.decode()}: {exc}") from None

    def _default_acl(self, directory: Inode, mode: int) -> acls.Acl | None:
        """The default ACL a new inode of ``mode`` in ``directory`` inherits (symlinks
        inherit nothing)."""
        if not self.acl or stat.S_ISLNK(mode):
            return None
        return self._stored_acl(directory, acls.DEFAULT)

    def _umask(self, parent_ino: int, mode: int, ctx: Ctx) -> int:
        """The umask for a new inode: none when a default ACL decides its permissions."""
        if ctx.umask and self._default_acl(self._get_dir(parent_ino), mode) is not None:
            return 0
        return ctx.umask

    def _get_dir(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        return inode

    def _attr(self, inode: Inode) -> Attr:
        return Attr(
            ino=InodeNo(inode.ino), mode=inode.mode, nlink=inode.nlink, uid=inode.uid,
            gid=inode.gid, rdev=inode.rdev, size=inode.size, blocks=inode.blocks * 8,
            atime_ns=inode.atime_ns, mtime_ns=inode.mtime_ns, ctime_ns=inode.ctime_ns,
            btime_ns=inode.btime_ns, generation=inode.generation,
        )

    def _find(self, parent: Inode, name: bytes) -> Inode | None:
        if name == b".":
            return parent
        if name == b"..":
            return self.inodes.get(parent.parent or ROOT_INO)
        hit = self.objects.dir_index(parent).lookup(name)
        if hit is None:
            return None
        return self._entry_inode(parent, name, hit[0])

    def _entry_inode(self, directory: Inode, name: bytes, ino: int) -> Inode:
        """The inode a directory entry names.  A name is removed before its inode is freed,
        so an entry naming a free inode is a damaged directory (EIO, read-only), not a
        missing file (ENOENT)."""
        try:
            return self.inodes.get(ino)
        except CorruptionError:
            raise
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            raise CorruptionError(0, f"directory {directory.ino}",
                                  f"entry {name!r} names inode {ino}, which is not in use"
                                  ) from None

    def _new_inode(self, parent: Inode | None, mode: int, uid: int, gid: int,
                   now: int) -> Inode:
        return self.objects.new_inode(parent, mode, uid, gid, now)

    def _touch_dir(self, inode: Inode, now: int) -> None:
        inode.mtime_ns = inode.ctime_ns = now
        self.objects.dirty(inode)

    def _prepare_create(self, parent_ino: int, name: bytes, ctx: Ctx, extra_blocks: int = 0
                        ) -> Inode:
        """Checks shared by every operation that adds a name: returns the parent."""
        _check_name(name)
        parent = self._get_dir(parent_ino)
        perms.check(parent, perms.W_OK | perms.X_OK, ctx, self._access_acl(parent))
        if parent.nlink == 0:
            raise FsError(errno.ENOENT)
        index = self.objects.dir_index(parent)
        if name in (b".", b"..") or index.lookup(name) is not None:
            raise FsError(errno.EEXIST)
        self.store.reserve(index.worst_case_new_blocks() + extra_blocks, ninodes=1)
        return parent

    def _add_entry(self, parent: Inode, name: bytes, inode: Inode, now: int) -> None:
        index = self.objects.dir_index(parent)
        index.insert(name, inode.ino, _dtype(inode.mode))
        self.objects.dir_changed(parent, index)
        self._touch_dir(parent, now)

    def _create_node(self, parent_ino: int, name: bytes, mode: int, ctx: Ctx,
                     rdev: int = 0, extra_blocks: int = 0) -> Inode:
        directory = self._get_dir(parent_ino)
        if stat.S_ISDIR(mode) and directory.nlink >= LINK_MAX:
            raise FsError(errno.EMLINK)
        # What a default ACL gives the new inode is known before anything changes, so its
        # xattrs are part of the operation's one reservation (a full disk is ENOSPC here,
        # never half a create).
        default = self._default_acl(directory, mode)
        access: acls.Acl | None = None
        values: list[tuple[bytes, bytes]] = []
        if default is not None:
            access, mode = acls.inherit(default, mode)
            values = self._inherited_acl_values(default, access, mode)
        # The parent's tree holds the same values, so its worst case bounds the new one's.
        acl_blocks = sum(self.objects.xattrs(directory).worst_case_new_blocks(len(v))
                         for _n, v in values)
        parent = self._prepare_create(parent_ino, name, ctx, extra_blocks + acl_blocks)
        uid, gid, mode = perms.initial_owner(parent, mode, ctx)
        now = _now()
        inode = self._new_inode(parent, mode, uid, gid, now)
        inode.rdev = rdev
        if access is not None and values:
            self._set_inherited_acls(inode, values, access)
        if inode.is_dir:
            inode.nlink = 2
            inode.parent = parent.ino
            inode.size = BLOCK_SIZE
            parent.nlink += 1
        self._add_entry(parent, name, inode, now)
        return inode

    @staticmethod
    def _inherited_acl_values(default: acls.Acl, access: acls.Acl, mode: int
                              ) -> list[tuple[bytes, bytes]]:
        """The xattrs a new inode of ``mode`` gets from its parent's default ACL: the access
        ACL (unless the mode says it all) and, for a directory, the default ACL itself."""
        values = []
        if not acls.is_minimal(access):
            values.append((acls.ACCESS, acls.encode(access)))
        if stat.S_ISDIR(mode):
            values.append((acls.DEFAULT, acls.encode(default)))
        return values

    def _set_inherited_acls(self, inode: Inode, values: list[tuple[bytes, bytes]],
                            access: acls.Acl) -> None:
        """Store the inherited ACL xattrs (reserved by the create that calls this)."""
        xattrs = self.objects.xattrs(inode)
        for name, value in values:
            xattrs.set(name, value)
        self.inodes.acls[inode.ino] = access if not acls.is_minimal(access) else ()

    # -- namespace operations ---------------------------------------------------------------

    @_reading
    def lookup(self, parent: int, name: bytes, ctx: Ctx) -> Attr:
        attr = self.lookup_or_none(parent, name, ctx)
        if attr is None:
            raise FsError(errno.ENOENT)
        return attr

    @_reading
    def lookup_or_none(self, parent: int, name: bytes, ctx: Ctx) -> Attr | None:
        """:meth:`lookup`, with None for a name that does not exist: the LOOKUP of every file
        ``tar`` extracts finds nothing, and an exception raised through the failure
        boundary and caught again cost ~3 us of its ~12 (docs/BENCHMARKS.md, round 3)."""
        if name == b".":
            return self._attr(self._handle_inode(parent))
        directory = self._get_dir(parent)
        perms.check(directory, perms.X_OK, ctx, self._access_acl(directory))
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        inode = self._find(directory, name)
        return self._attr(inode) if inode is not None else None

    def _handle_inode(self, ino: int) -> Inode:
        """The inode a file handle names (docs/DESIGN.md, "File handles"): the kernel asks for
        "." of an inode number it no longer caches, of any type, with no name to check
        permissions on.  ENOENT (the kernel answers ESTALE) once the inode has no name left:
        a free number, or one a new file got, is told apart by the generation."""
        inode = self.inodes.get(ino)
        if inode.nlink == 0:
            raise FsError(errno.ENOENT)
        return inode

    @_reading
    def getattr(self, ino: int) -> Attr:
        return self._attr(self.inodes.get(ino))

    @_reading
    def readlink(self, ino: int) -> bytes:
        inode = self.inodes.get(ino)
        if not inode.is_symlink:
            raise FsError(errno.EINVAL)
        inline = bool(inode.flags & INODE_FLAG_INLINE)
        if not (0 < inode.size <= DATA_AREA_SIZE if inline
                else DATA_AREA_SIZE < inode.size <= SYMLINK_MAX):
            # Checked before reading: a damaged size must not become a huge allocation.
            raise CorruptionError(self.store.itable.block_of(InodeNo(inode.ino)),
                                  f"inode {inode.ino}", f"symlink of size {inode.size}")
        if inline:
            return bytes(inode.area[: inode.size])
        return self.objects.data(inode).read(0, inode.size)

    @_mutating
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, ctx: Ctx) -> Attr:
        kind = stat.S_IFMT(mode)
        if kind == 0:
            mode |= stat.S_IFREG
            kind = stat.S_IFREG
        if kind == stat.S_IFDIR:
            raise FsError(errno.EPERM)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL)
        if kind in (stat.S_IFCHR, stat.S_IFBLK) and ctx.uid != 0:
            raise FsError(errno.EPERM)
        if kind not in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = 0
        umask = self._umask(parent, kind, ctx)
        return self._attr(self._create_node(parent, name, mode & ~umask | kind, ctx, rdev))

    @_mutating
    def mkdir(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        mode = stat.S_IFDIR | (mode & 0o7777 & ~self._umask(parent, stat.S_IFDIR, ctx))
        return self._attr(self._create_node(parent, name, mode, ctx))

    @_mutating
    def create(self, parent: int, name: bytes, mode: int, ctx: Ctx) -> Attr:
        mode = stat.S_IFREG | (mode & 0o7777 & ~self._umask(parent, stat.S_IFREG, ctx))
        return self._attr(self._create_node(parent, name, mode, ctx))

    @_mutating
    def symlink(self, parent: int, name: bytes, target: bytes, ctx: Ctx) -> Attr:
        if not target:
            raise FsError(errno.ENOENT)
        if len(target) > SYMLINK_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if b"\0" in target:
            raise FsError(errno.EINVAL)
        inline = len(target) <= DATA_AREA_SIZE
        # A long target is written like file data into a new inode: its data block (the
        # empty extent map holds the one extent inline).  Reserved with the directory entry
        # in the operation's one reservation, which the data write draws from.
        extra = 0 if inline else -(-len(target) // BLOCK_SIZE)
        inode = self._create_node(parent, name, stat.S_IFLNK | 0o777, ctx,
                                  extra_blocks=extra)
        if inline:
            inode.flags |= INODE_FLAG_INLINE
            inode.area[: len(target)] = target
            inode.size = len(target)
        else:
            self.objects.data(inode).write(0, target)
        self.objects.dirty(inode)
        return self._attr(inode)

    @_mutating
    def link(self, ino: int, new_parent: int, new_name: bytes, ctx: Ctx) -> Attr:
        inode = self.inodes.get(ino)
        if inode.is_dir:
            raise FsError(errno.EPERM)
        if inode.nlink >= LINK_MAX:
            raise FsError(errno.EMLINK)
        if inode.nlink == 0:
            raise FsError(errno.ENOENT)
        parent = self._prepare_create(new_parent, new_name, ctx)
        now = _now()
        inode.nlink += 1
        inode.ctime_ns = now
        self.objects.dirty(inode)
        self._add_entry(parent, new_name, inode, now)
        return self._attr(inode)

    @_mutating
    def unlink(self, parent: int, name: bytes, ctx: Ctx) -> None:
        directory, inode = self._prepare_remove(parent, name, ctx)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        now = _now()
        self._remove_entry(directory, name, now)
        self._drop_link(inode, now)

    @_mutating
    def rmdir(self, parent: int, name: bytes, ctx: Ctx) -> None:
        if name == b".":
            raise FsError(errno.EINVAL)
        if name == b"..":
            raise FsError(errno.ENOTEMPTY)
        directory, inode = self._prepare_remove(parent, name, ctx)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        if inode.ino == ROOT_INO:
            raise FsError(errno.EBUSY)
        if not self.objects.dir_index(inode).is_empty():
            raise FsError(errno.ENOTEMPTY)
        now = _now()
        self._remove_entry(directory, name, now)
        directory.nlink -= 1
        inode.nlink = 0
        inode.ctime_ns = now
        self.objects.dirty(inode)
        self._unlinked(inode)

    def _prepare_remove(self, parent: int, name: bytes, ctx: Ctx) -> tuple[Inode, Inode]:
        _check_name(name)
        directory = self._get_dir(parent)
        perms.check(directory, perms.W_OK | perms.X_OK, ctx, self._access_acl(directory))
        if name in (b".", b".."):
            raise FsError(errno.EINVAL if name == b"." else errno.ENOTEMPTY)
        inode = self._find(directory, name)
        if inode is None:
            raise FsError(errno.ENOENT)
        perms.check_sticky(directory, inode, ctx)
        return directory, inode

    def _remove_entry(self, directory: Inode, name: bytes, now: int) -> None:
        index = self.objects.dir_index(directory)
        index.remove(name)
        self.objects.dir_changed(directory, index)
        self._touch_dir(directory, now)

    def _drop_link(self, inode: Inode, now: int) -> None:
        inode.nlink -= 1
        inode.ctime_ns = now
        self.objects.dirty(inode)
        if inode.nlink == 0:
            self._unlinked(inode)

    def _unlinked(self, inode: Inode) -> None:
        """The last name is gone: free the inode now, or at its last reference."""
        if self._refs.get(inode.ino, 0) > 0:
            self.objects.orphan_add(inode)
        else:
            self.objects.free_inode(inode)

    @_mutating
    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int, ctx: Ctx) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
            flags & RENAME_EXCHANGE and flags != RENAME_EXCHANGE
        ):
            raise FsError(errno.EINVAL)
        if flags & RENAME_WHITEOUT and ctx.uid != 0:
            raise FsError(errno.EPERM)  # a whiteout is a device node: CAP_MKNOD, as in the VFS
        _check_name(old_name)
        _check_name(new_name)
        src_dir = self._get_dir(old_parent)
        dst_dir = self._get_dir(new_parent)
        if old_name in (b".", b"..") or new_name in (b".", b".."):
            raise FsError(errno.EBUSY if flags != RENAME_EXCHANGE else errno.EINVAL)
        perms.check(src_dir, perms.W_OK | perms.X_OK, ctx, self._access_acl(src_dir))
        perms.check(dst_dir, perms.W_OK | perms.X_OK, ctx, self._access_acl(dst_dir))
        src = self._find(src_dir, old_name)
        if src is None:
            raise FsError(errno.ENOENT)
        dst = self._find(dst_dir, new_name)
        perms.check_sticky(src_dir, src, ctx)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FsError(errno.ENOENT)
            perms.check_sticky(dst_dir, dst, ctx)
            self._rename_exchange(src_dir, old_name, src, dst_dir, new_name, dst, ctx)
            return
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if dst.ino == src.ino:
                return  # two names of one inode: POSIX says do nothing
            perms.check_sticky(dst_dir, dst, ctx)
            if src.is_dir:
                if not dst.is_dir:
                    raise FsError(errno.ENOTDIR)
                if not self.objects.dir_index(dst).is_empty():
                    raise FsError(errno.ENOTEMPTY)
            elif dst.is_dir:
                raise FsError(errno.EISDIR)
        moving_dir = src.is_dir and src_dir.ino != dst_dir.ino
        if src.is_dir:
            if src.ino == ROOT_INO:
                raise FsError(errno.EBUSY)
            self._check_not_ancestor(src, dst_dir)
            if moving_dir:
                perms.check(src, perms.W_OK, ctx, self._access_acl(src))  # its ".." changes
                if dst is None and dst_dir.nlink >= LINK_MAX:
                    raise FsError(errno.EMLINK)
        index_dst = self.objects.dir_index(dst_dir)
        whiteout = bool(flags & RENAME_WHITEOUT)
        self.store.reserve(0 if dst is not None else index_dst.worst_case_new_blocks(),
                           ninodes=int(whiteout))
        now = _now()
        index_src = self.objects.dir_index(src_dir)
        if dst is not None:
            index_dst.replace(new_name, src.ino, _dtype(src.mode))
        else:
            index_dst.insert(new_name, src.ino, _dtype(src.mode))
        self.objects.dir_changed(dst_dir, index_dst)
        if src_dir.ino == dst_dir.ino:
            index_src = index_dst
        if whiteout:
            # overlayfs: the old name becomes a whiteout (a 0/0 character device) in the
            # same operation, so no one ever sees the lower file through the gap.
            uid, gid, mode = perms.initial_owner(src_dir, stat.S_IFCHR, ctx)
            wh = self._new_inode(src_dir, mode, uid, gid, now)
            index_src.replace(old_name, wh.ino, _dtype(wh.mode))
        else:
            index_src.remove(old_name)
        self.objects.dir_changed(src_dir, index_src)
        self._touch_dir(src_dir, now)
        self._touch_dir(dst_dir, now)
        src.ctime_ns = now
        if src.is_dir:
            src.parent = dst_dir.ino
        self.objects.dirty(src)
        if moving_dir:
            src_dir.nlink -= 1
            dst_dir.nlink += 1
        if dst is not None:
            if dst.is_dir:
                dst_dir.nlink -= 1
                dst.nlink = 0
                dst.ctime_ns = now
                self.objects.dirty(dst)
                self._unlinked(dst)
            else:
                self._drop_link(dst, now)

    def _rename_exchange(self, src_dir: Inode, old_name: bytes, src: Inode, dst_dir: Inode,
                         new_name: bytes, dst: Inode, ctx: Ctx) -> None:
        if src.ino == dst.ino:
            return
        if src_dir.ino != dst_dir.ino:
            if src.is_dir:
                self._check_not_ancestor(src, dst_dir)
                perms.check(src, perms.W_OK, ctx, self._access_acl(src))
            if dst.is_dir:
                self._check_not_ancestor(dst, src_dir)
                perms.check(dst, perms.W_OK, ctx, self._access_acl(dst))
            if src.is_dir != dst.is_dir:
                gaining = dst_dir if src.is_dir else src_dir
                if gaining.nlink >= LINK_MAX:
                    raise FsError(errno.EMLINK)
        now = _now()
        index_src = self.objects.dir_index(src_dir)
        index_src.replace(old_name, dst.ino, _dtype(dst.mode))
        self.objects.dir_changed(src_dir, index_src)
        index_dst = index_src if src_dir.ino == dst_dir.ino else self.objects.dir_index(dst_dir)
        index_dst.replace(new_name, src.ino, _dtype(src.mode))
        self.objects.dir_changed(dst_dir, index_dst)
        for directory in (src_dir, dst_dir):
            self._touch_dir(directory, now)
        for inode in (src, dst):
            inode.ctime_ns = now
            self.objects.dirty(inode)
        if src_dir.ino != dst_dir.ino:
            if src.is_dir:
                src.parent = dst_dir.ino
                src_dir.nlink -= 1
                dst_dir.nlink += 1
            if dst.is_dir:
                dst.parent = src_dir.ino
                dst_dir.nlink -= 1
                src_dir.nlink += 1

    def _check_not_ancestor(self, directory: Inode, target_dir: Inode) -> None:
        """EINVAL when ``target_dir`` is ``directory`` or lies below it."""
        seen = 0
        ino: int = target_dir.ino
        while True:
            if ino == directory.ino:
                raise FsError(errno.EINVAL)
            if ino == ROOT_INO:
                return
            ino = self.inodes.get(ino).parent
            seen += 1
            if seen > 1_000_000 or not ino:
                raise CorruptionError(0, f"directory {target_dir.ino}", "parent chain broken")

    # -- inode lifetime ---------------------------------------------------------------------

    @_reading
    def ref(self, ino: int, n: int = 1) -> None:
        """Take ``n`` in-memory references (kernel lookups, open files) on ``ino``."""
        if n:
            self._refs[ino] = self._refs.get(ino, 0) + n

    @_reading
    def unref(self, ino: int, n: int = 1) -> None:
        """Drop references; an inode with no names left is freed at its last reference."""
        left = self._refs.get(ino, 0) - n
        if left > 0:
            self._refs[ino] = left
            return
        self._refs.pop(ino, None)
        if not self.read_only:
            self._release_if_unlinked(ino)

    @_mutating
    def _release_if_unlinked(self, ino: int) -> None:
        self._maybe_free(ino)

    def _maybe_free(self, ino: int) -> None:
        try:
            inode = self.inodes.get(ino)
        except FsError:
            return
        if inode.nlink == 0:
            self.objects.free_inode(inode)

    @_reading
    def release_data(self, inode: Inode, keep: int, *, protect: bool = True) -> None:
        """Free the data blocks of ``inode`` from logical block ``keep`` on, committing
        between steps when needed (see Objects.release_data)."""
        self.objects.release_data(inode, keep, protect=protect)

    @_mutating
    def _process_orphans(self) -> None:
        """Finish what a crash interrupted: free the inodes that were unlinked while in use
        (or whose delete was under way), and truncate those whose truncate was under way to
        their size.  Each stays at the head of the list until its blocks are gone, so a
        crash here is finished by the next mount."""
        count = 0
        while (head := self.objects.first_orphan()) is not None:
            inode = self.inodes.get(head)
            inode.flags |= INODE_FLAG_ORPHAN  # it is on the list, whatever its flag says
            if inode.nlink == 0:
                self.objects.free_inode(inode)
            else:
                if inode.is_reg:
                    self.release_data(inode, -(-inode.size // BLOCK_SIZE))
                self.objects.orphan_remove(inode)
            count += 1
            if count > self.store.geo.ninodes:
                raise CorruptionError(0, "orphan list", "loop")
        if count:
            log.info("finished %d interrupted deletion(s) or truncation(s)", count)

    # -- attributes -------------------------------------------------------------------------

    @_mutating
    def setattr(self, ino: int, changes: SetAttr, ctx: Ctx, *,
                opened_for_write: bool = False) -> Attr:
        """Change attributes.  ``opened_for_write``: the size change comes through a
        descriptor the caller opened for writing (ftruncate); the right to write was checked
        at that open, and on Linux survives a later chmod (even to mode 0)."""
        inode = self.inodes.get(ino)
        # The clock only when a time is the daemon's to stamp: with the writeback cache the
        # kernel sends its own ctime with every change to a regular file (and explicit
        # times), so tar's three SETATTRs per file need no clock read (a pipe probe, ~3.5
        # us of a ~28 us SETATTR under load: docs/BENCHMARKS.md, round 3).
        now = (_now() if changes.size is not None or changes.ctime_ns is None
               or changes.atime_ns == UTIME_NOW or changes.mtime_ns == UTIME_NOW else 0)
        if changes.mode is not None and not perms.is_owner(inode, ctx):
            raise FsError(errno.EPERM)
        if changes.uid is not None and changes.uid != inode.uid and ctx.uid != 0:
            raise FsError(errno.EPERM)
        if changes.gid is not None and changes.gid != inode.gid and ctx.uid != 0 and (
            ctx.uid != inode.uid or not ctx.in_group(changes.gid)
        ):
            raise FsError(errno.EPERM)
        if changes.uid is not None and changes.uid == inode.uid and ctx.uid not in (0, inode.uid):
            raise FsError(errno.EPERM)
        if changes.gid is not None and changes.gid == inode.gid and ctx.uid not in (0, inode.uid):
            raise FsError(errno.EPERM)
        for value in (changes.atime_ns, changes.mtime_ns):
            if value is None:
                continue
            if value == UTIME_NOW:
                if not perms.is_owner(inode, ctx) and not perms.may(
                        inode, perms.W_OK, ctx, self._access_acl(inode)):
                    raise FsError(errno.EACCES)
            elif not perms.is_owner(inode, ctx):
                raise FsError(errno.EPERM)
        if changes.size is not None:
            if inode.is_dir:
                raise FsError(errno.EISDIR)
            if not inode.is_reg:
                raise FsError(errno.EINVAL)
            if not opened_for_write:
                perms.check(inode, perms.W_OK, ctx, self._access_acl(inode))
        # The one reservation of a setattr: a size change never allocates (growing leaves a
        # hole, cutting to the end only shortens or drops extents), so only the access ACL
        # that a chmod rewrites can need blocks.
        new_acl = (self._chmod_acl(inode, self._new_mode(inode, changes.mode, ctx))
                   if changes.mode is not None else None)
        self.store.reserve(self.objects.xattrs(inode).worst_case_new_blocks(len(new_acl[1]))
                           if new_acl is not None else 0)
        if changes.size is not None:
            self.objects.data(inode).truncate(
                changes.size, lambda keep: self.release_data(inode, keep))
            inode.mtime_ns = now
            if ctx.uid != 0:
                inode.mode = perms.killpriv(inode.mode)
        if changes.mode is not None:
            mode = self._new_mode(inode, changes.mode, ctx)
            if new_acl is not None:
                self._set_chmod_acl(inode, new_acl)
            inode.mode = stat.S_IFMT(inode.mode) | mode
        if changes.uid is not None or changes.gid is not None:
            # Every chown, by anybody, to new or the same ids (Linux's chown_common).
            inode.mode = perms.killpriv(inode.mode)
            if changes.uid is not None:
                inode.uid = changes.uid
            if changes.gid is not None:
                inode.gid = changes.gid
        if changes.atime_ns is not None:
            inode.atime_ns = now if changes.atime_ns == UTIME_NOW else changes.atime_ns
        if changes.mtime_ns is not None:
            inode.mtime_ns = now if changes.mtime_ns == UTIME_NOW else changes.mtime_ns
        inode.ctime_ns = changes.ctime_ns if changes.ctime_ns is not None else now
        self.objects.dirty(inode)
        return self._attr(inode)

    @_reading
    def access(self, ino: int, mask: int, ctx: Ctx) -> None:
        inode = self.inodes.get(ino)
        if mask & perms.W_OK and self.read_only and (inode.is_reg or inode.is_dir):
            raise FsError(errno.EROFS)
        perms.check(inode, mask & 7, ctx, self._access_acl(inode))

    # -- file contents ----------------------------------------------------------------------

    @_reading
    def open_file(self, ino: int, flags: int, ctx: Ctx) -> None:
        """Check that ``ino`` may be opened with ``flags``; O_TRUNC truncates."""
        inode = self.inodes.get(ino)
        accmode = flags & os.O_ACCMODE
        if inode.is_dir and (accmode != os.O_RDONLY or flags & os.O_TRUNC):
            raise FsError(errno.EISDIR)
        if (accmode != os.O_RDONLY or flags & os.O_TRUNC) and self.read_only:
            raise FsError(errno.EROFS)
        mask = {os.O_RDONLY: perms.R_OK, os.O_WRONLY: perms.W_OK}.get(
            accmode, perms.R_OK | perms.W_OK)
        if flags & FMODE_EXEC:
            mask = perms.X_OK  # execve's open: MAY_EXEC, not MAY_READ
        perms.check(inode, mask, ctx, self._access_acl(inode))
        if flags & os.O_TRUNC and inode.is_reg and inode.size:
            self.setattr(ino, SetAttr(size=0), ctx)

    def _regular_file(self, ino: int) -> Inode:
        """The inode behind a read or write: EISDIR for a directory, EINVAL for the rest."""
        inode = self.inodes.get(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        if not inode.is_reg:
            raise FsError(errno.EINVAL)
        return inode

    @_reading
    def read(self, ino: int, offset: int, size: int) -> bytes:
        inode = self._regular_file(ino)
        data = self.objects.data(inode).read(offset, size)
        self._note_access(inode)
        return data

    @_reading
    def read_hot(self, ino: int, offset: int, size: int) -> memoryview | None:
        """:meth:`read` when every block is mapped and in the data cache (one call into
        C: ``FileData.read_hot``): a view that is valid until the next read; None (nothing
        changed) for anything else, which :meth:`read` then serves with its errors."""
        inode = self.inodes.get(ino)
        if not inode.is_reg:
            return None
        data = self.objects.data(inode).read_hot(offset, size)
        if data is not None:
            self._note_access(inode)
        return data

    @_reading
    def read_start(self, ino: int, offset: int, size: int,
                   reads: DeviceReads) -> bytes | tuple[memoryview, ReadGroup, int, int] | None:
        """:meth:`read` with its device part left in flight (``FileData.read_start``)."""
        inode = self._regular_file(ino)
        started = self.objects.data(inode).read_start(offset, size, reads)
        if started is not None:
            self._note_access(inode)
        return started

    @_reading
    def read_finish(self, group: ReadGroup) -> None:
        """After ``group.done``: raise its device error as the read's FsError (quiet to
        the caller's errno, like ``DataPath.read``; the log says why)."""
        e = group.error
        if e is not None:
            raise read_error(e, "file data") from e

    @_reading
    def atime_due(self, ino: int) -> bool:
        """True when a read of ``ino`` now would update its atime."""
        return self._atime_due(self.inodes.get(ino))

    @_reading
    def note_read_open(self, ino: int) -> bool:
        """``ino`` was opened for reading: set the atime the reads will want now, because
        reads served from the kernel's page cache never get here (docs/MOUNT.md, "Access
        times").  True when the atime changed."""
        return self._note_access(self.inodes.get(ino))

    def _atime_due(self, inode: Inode) -> bool:
        if self.atime == "noatime" or self.read_only:
            return False
        if self.atime == "strictatime":
            return True
        # relatime (Linux's relatime_need_update): the first read after a change, and
        # then once a day, judged with the clock the times come from (the coarse clock can
        # be behind it by a tick, and a day-old atime would then look a tick too young).
        if inode.atime_ns <= inode.mtime_ns or inode.atime_ns <= inode.ctime_ns:
            return True
        # The kernel's clock is never ahead of CLOCK_REALTIME (nexfs/core/clock.py), so a
        # day not yet passed by that one (a vDSO read) has not passed by the kernel's
        # either: the common case of every read costs no system call.
        if time.time_ns() - inode.atime_ns < _DAY_NS:
            return False
        return _now() - inode.atime_ns >= _DAY_NS

    def _note_access(self, inode: Inode) -> bool:
        if not self._atime_due(inode):
            return False
        inode.atime_ns = _now()
        self.objects.dirty(inode)
        if self.inodes.dirty_count() >= self._dirty_limit:
            # As after every mutating operation (_mutating): reads of many files would
            # otherwise fill the running transaction with table blocks past the journal's
            # limit (the error state; tests/test_inode_writeback.py).
            self.inodes.flush()
            if self.store.should_commit():
                self.store.commit(durable=False)
        return True

    @_mutating
    def write(self, ino: int, offset: int, data: bytes | memoryview, ctx: Ctx) -> int:
        inode = self._regular_file(ino)
        written = self.objects.data(inode).write(offset, data)
        if written:
            now = _now()
            inode.mtime_ns = inode.ctime_ns = now
            if ctx.uid != 0 and inode.mode & (stat.S_ISUID | stat.S_ISGID):
                inode.mode = perms.killpriv(inode.mode)
            # Marked only: the record is encoded once, just before the next commit
            # (nexfs/core/inode_cache.py), however many writes change its times meanwhile.
            self.objects.dirty(inode)
        return written

    @_reading
    def fsync(self, ino: int, datasync: bool) -> None:
        """Make the file's data and metadata durable (and everything committed before)."""
        self._refuse_after_error()  # first: the inode may have gone with the failed txn
        self.inodes.get(ino)
        self._sync()

    @_reading
    def fsyncdir(self, ino: int) -> None:
        self._refuse_after_error()
        self._get_dir(ino)
        self._sync()

    def _refuse_after_error(self) -> None:
        # After an error the running transaction was discarded: changes made before the
        # failure may be lost, so no later fsync may report success (commit() on a
        # read-only volume returns quietly, which is right for the timer, not for fsync).
        # EIO before anything else: an inode created in the discarded transaction no longer
        # exists, and ENOENT from fsync would hide the failure (tests/test_fsync_after_error).
        if self.store.error is not None and self.store.error is not self._error_at_open:
            raise FsError(errno.EIO, f"filesystem is read-only after an error: "
                                     f"{self.store.error}")

    def _sync(self) -> None:
        self._refuse_after_error()
        self.commit(durable=True)

    # -- directories ------------------------------------------------------------------------

    @_reading
    def readdir(self, ino: int, cookie: int) -> Iterator[tuple[bytes, Attr, int]]:
        """Entries after ``cookie`` as (name, attributes, cookie of this entry)."""
        directory = self._get_dir(ino)
        out: list[tuple[bytes, Attr, int]] = []
        if cookie < 1:
            out.append((b".", self._attr(directory), 1))
        if cookie < 2:
            out.append((b"..", self._attr(self.inodes.get(directory.parent or ROOT_INO)), 2))
        self._note_access(directory)
        return self._readdir_entries(directory, max(cookie, 2), out)

    def _readdir_entries(self, directory: Inode, cookie: int,
                         head: list[tuple[bytes, Attr, int]]
                         ) -> Iterator[tuple[bytes, Attr, int]]:
        yield from head
        try:
            # Runs after readdir's wrapper has returned: the rest of the listing is a
            # boundary of its own.
            index = self.objects.dir_index(directory)
            for entry_cookie, name, child, _kind in index.iter_from(cookie):
                attr = self._attr(self._entry_inode(directory, name, child))
                yield name, attr, entry_cookie
        except Exception as exc:
            self.failures.failed(exc, where="readdir")
            raise

    @_reading
    def statfs(self) -> StatFs:
        figures = self.store.statfs()
        return StatFs(
            bsize=BLOCK_SIZE, frsize=BLOCK_SIZE, blocks=figures.total_blocks,
            bfree=figures.free_blocks, bavail=figures.free_blocks,
            files=figures.total_inodes, ffree=figures.free_inodes,
            favail=figures.free_inodes, namemax=NAME_MAX,
        )

    # -- extended attributes ----------------------------------------------------------------

    def _check_xattr_name(self, name: bytes) -> None:
        if not name:
            raise FsError(errno.EINVAL)
        if len(name) > NAME_MAX:
            raise FsError(errno.ERANGE)
        if not name.startswith(XATTR_NAMESPACES) and not (self.acl and name in acls.NAMES):
            raise FsError(errno.EOPNOTSUPP)

    def _check_xattr_write(self, inode: Inode, name: bytes, ctx: Ctx) -> None:
        if name in acls.NAMES:
            self._check_acl_write(inode, name, ctx)
        elif name.startswith(b"trusted.") and ctx.uid != 0:
            raise FsError(errno.EPERM)
        if name.startswith(b"user."):
            if not (inode.is_reg or inode.is_dir):
                raise FsError(errno.EPERM)
            if inode.is_dir and inode.mode & stat.S_ISVTX and not perms.is_owner(inode, ctx):
                raise FsError(errno.EPERM)
            perms.check(inode, perms.W_OK, ctx, self._access_acl(inode))
        elif not perms.is_owner(inode, ctx) and name.startswith(b"security."):
            raise FsError(errno.EPERM)

    @_reading
    def has_xattrs(self, ino: int) -> bool:
        """Whether ``ino`` has any extended attribute (ACLs included): one look at the
        inode, for the kernel's ``security.capability`` question before every write."""
        return self.inodes.get(ino).xattr_root != 0

    @_reading
    def getxattr(self, ino: int, name: bytes, ctx: Ctx | None = None) -> bytes:
        inode = self.inodes.get(ino)
        if not inode.xattr_root:
            self._check_xattr_name(name)
            raise FsError(errno.ENODATA)
        self._check_xattr_name(name)
        if name.startswith(b"trusted.") and ctx is not None and ctx.uid != 0:
            raise FsError(errno.ENODATA)
        return self.objects.xattrs(inode).get(name)

    @_reading
    def listxattr(self, ino: int, ctx: Ctx | None = None) -> list[bytes]:
        inode = self.inodes.get(ino)
        if not inode.xattr_root:
            return []
        names = self.objects.xattrs(inode).list()
        if ctx is not None and ctx.uid != 0:
            names = [n for n in names if not n.startswith(b"trusted.")]
        if not self.acl:
            names = [n for n in names if n not in acls.NAMES]
        return names

    @_mutating
    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int, ctx: Ctx) -> None:
        inode = self.inodes.get(ino)
        self._check_xattr_name(name)
        self._check_xattr_write(inode, name, ctx)
        if name in acls.NAMES:
            self._set_acl(inode, name, value, flags, ctx)
            return
        xattrs = self.objects.xattrs(inode)
        self.store.reserve(xattrs.worst_case_new_blocks(len(value)))
        xattrs.set(name, value, flags)
        inode.ctime_ns = _now()
        self.objects.dirty(inode)

    @_mutating
    def removexattr(self, ino: int, name: bytes, ctx: Ctx) -> None:
        inode = self.inodes.get(ino)
        self._check_xattr_name(name)
        self._check_xattr_write(inode, name, ctx)
        if not inode.xattr_root:
            raise FsError(errno.ENODATA)
        xattrs = self.objects.xattrs(inode)
        xattrs.remove(name)
        inode.ctime_ns = _now()
        if name == acls.ACCESS:
            self.inodes.acls[inode.ino] = ()  # the mode stays as it is, as on ext4
        self.objects.dirty(inode)

    # -- POSIX ACLs (nexfs/core/acl.py) -----------------------------------------------------------

    def _check_acl_write(self, inode: Inode, name: bytes, ctx: Ctx) -> None:
        if stat.S_ISLNK(inode.mode):
            raise FsError(errno.EOPNOTSUPP)
        if not perms.is_owner(inode, ctx):
            raise FsError(errno.EPERM)
        if name == acls.DEFAULT and not inode.is_dir:
            raise FsError(errno.EACCES)

    def _set_acl(self, inode: Inode, name: bytes, value: bytes, flags: int, ctx: Ctx) -> None:
        """setxattr of an ACL.  An access ACL also sets the mode (posix_acl_update_mode,
        which FUSE leaves to the filesystem); one the mode can express is not stored; a
        value without entries removes the ACL."""
        acl = acls.decode(value)
        exists = self._stored_acl(inode, name) is not None
        if flags & 1 and exists:  # XATTR_CREATE
            raise FsError(errno.EEXIST)
        if flags & 2 and not exists:  # XATTR_REPLACE
            raise FsError(errno.ENODATA)
        store = acl is not None and (name == acls.DEFAULT or not acls.is_minimal(acl))
        xattrs = self.objects.xattrs(inode)
        if store:
            assert acl is not None
            value = acls.encode(acl)
            self.store.reserve(xattrs.worst_case_new_blocks(len(value)))
            xattrs.set(name, value)
        elif exists:
            xattrs.remove(name)
        if name == acls.ACCESS and acl is not None:
            mode = (inode.mode & ~0o777) | acls.mode_bits(acl)
            if ctx.uid != 0 and not ctx.in_group(inode.gid):
                mode &= ~stat.S_ISGID
            inode.mode = mode
        if name == acls.ACCESS:
            self.inodes.acls[inode.ino] = acl if store and acl is not None else ()
        inode.ctime_ns = _now()
        self.objects.dirty(inode)

    @staticmethod
    def _new_mode(inode: Inode, requested: int, ctx: Ctx) -> int:
        """The permission bits a chmod to ``requested`` sets: set-group-ID goes for a caller
        outside the file's group (not on directories), as in Linux's setattr_prepare."""
        mode = requested & 0o7777
        if ctx.uid != 0 and not ctx.in_group(inode.gid) and not inode.is_dir:
            mode &= ~stat.S_ISGID
        return mode

    def _chmod_acl(self, inode: Inode, mode: int) -> tuple[acls.Acl, bytes] | None:
        """On chmod: the access ACL whose owner, mask and other entries follow the new mode,
        and its encoding; None when the inode has no access ACL."""
        acl = self._access_acl(inode)
        if not acl:
            return None
        acl = acls.chmod(acl, mode)
        return acl, acls.encode(acl)

    def _set_chmod_acl(self, inode: Inode, new: tuple[acls.Acl, bytes]) -> None:
        """Store the rewritten access ACL (reserved by setattr before anything changed)."""
        xattrs = self.objects.xattrs(inode)
        xattrs.set(acls.ACCESS, new[1])
        self.inodes.acls[inode.ino] = new[0]
