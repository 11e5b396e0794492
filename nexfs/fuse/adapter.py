"""The FUSE adapter: pyfuse3 requests in, :class:`~nexfs.core.fs.FileSystem` calls out.

Every handler is a thin synchronous function over the core, wrapped by :func:`_handler` into
the coroutine pyfuse3 awaits.  The wrapper is the one place where errors become errno:

* Whether a failure damages the volume is not decided here: the failure is handed to the
  failure policy (nexfs/store/failure.py), which the core's public methods have normally done
  already (it decides each failure once).
* :class:`~nexfs.types.FsError` (a :class:`~nexfs.types.CorruptionError` too) becomes
  ``FUSEError(errno)``; anything else is a bug (the policy logs it with its traceback and marks
  the volume as needing fsck, read-only from then on) and the caller gets EIO.  pyfuse3 ends
  its main loop, and with it the mount, on any exception that is not ``FUSEError``; the
  wrapper makes sure no such exception ever reaches it.

Concurrency invariant: the core is single-threaded and its methods never await, so a handler
runs from start to finish without a trio checkpoint; requests never interleave inside the
core.  Nothing hops to a thread: a thread round trip costs more than a 4 KiB read.  The one
exception is ``write`` on an O_DIRECT handle when the kernel's cached pages of the file must
be dropped before the answer (nexfs/fuse/invalidate.py): it awaits that, on a thread, only after
its core work is done, while a helper worker serves the other requests.

Lookup counts: every reply that raises the kernel's lookup count (lookup, create, mknod,
mkdir, symlink, link, each accepted readdirplus entry other than ``.`` and ``..``) takes one
core reference (``fs.ref``); ``forget`` gives them back; :meth:`FuseAdapter.release_all` drops
what the kernel still held when it went away, so unlinked-but-open inodes are freed.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from nexfs.core.attr import Attr, Ctx, SetAttr
from nexfs.core.fs import FileSystem
from nexfs.fuse import loop as fuseloop
from nexfs.fuse.invalidate import drop_cached_pages
from nexfs.fuse.stats import STATS_XATTR, Handout, Stats, hit_rate
from nexfs.store.inflight import ReadGroup
from nexfs.types import CorruptionError, FsError

log = logging.getLogger(__name__)

ENTRY_TIMEOUT = 60.0
"""Seconds the kernel may cache a name -> inode answer (positive or negative).

The image is locked exclusively by the valve, so every change to the namespace arrives
through this kernel mount, which updates or drops the dentries it changes itself.  A long
timeout therefore costs no coherence, and saves a LOOKUP round trip (~30 us of Python) on
every path walk: ``tar``, ``git status`` and ``find`` stat the same names again and again."""

ATTR_TIMEOUT = 60.0
"""Seconds the kernel may cache attributes.  The same argument as for entries; the only
attribute the core changes on its own is atime: the kernel drops what it cached after a read
it sent, and the adapter tells it to when an open sets the atime.  With the writeback cache
the kernel owns size and mtime of open files anyway."""

CONCURRENT_SPAN = 64
"""Reads that go in flight after one found another request queued or reads in flight
(measured, docs/BENCHMARKS.md: alone, blocking is faster; among concurrent ones, a
blocking read costs the others more than its ring wait costs it)."""

COMMIT_INTERVAL = 5.0
"""Seconds between background commits: at most this much acknowledged work is lost on a
crash or power failure (the same promise as ext4's default ``commit=5``)."""

T = TypeVar("T")
_clock = time.perf_counter_ns

CAPABILITY_XATTR = b"security.capability"
KERNEL = Ctx(uid=0, gid=0, pid=0)
"""The caller of a change the kernel decided on itself (it checked the rules already)."""

# The kernel's idea of a file handle: we hand out our own numbers so that each open keeps the
# credentials it was opened with (write requests carry none, and the core clears set-ID bits
# on a write by a non-root user).
_Handle = tuple[int, Ctx]


def _handler(fn: Callable[..., T]) -> Callable[..., Coroutine[Any, Any, T]]:
    """Turn a synchronous handler into the coroutine pyfuse3 calls, translating every error.

    This is the single errno translation point of the mount (see the module docstring), and
    where every request is counted and timed for ``nexfs stats`` (nexfs/fuse/stats.py).  A
    coroutine handler (``read``, whose device part may be in flight) is awaited inside, so its
    errors and its whole time are handled alike."""
    op = fn.__name__
    counted = "write" if op == "write_data" else op  # the core's part of WRITE
    awaited = inspect.iscoroutinefunction(fn)

    @functools.wraps(fn)
    async def wrapper(self: FuseAdapter, *args: Any) -> T:
        if self.debug:
            log.debug("%s(%s)", op, ", ".join(_brief(a) for a in args))
        stats = self.stats
        stats.in_flight += 1
        if stats.in_flight > stats.in_flight_max:
            stats.in_flight_max = stats.in_flight
        failed = True
        start = _clock()
        try:
            result = fn(self, *args)
            if awaited:
                result = await cast(Any, result)
            failed = False
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            raise pyfuse3.FUSEError(self.errno_of(op, exc)) from None
        finally:
            stats.record(counted, _clock() - start, failed)
        if self.debug:
            log.debug("%s -> %s", op, _brief(result))
        return result

    return wrapper


def _awaiting_handler(
    fn: Callable[..., Coroutine[Any, Any, T]],
) -> Callable[..., Coroutine[Any, Any, T]]:
    """:func:`_handler` for a coroutine handler (awaited inside the wrapper), typed as such."""
    return cast(Any, _handler(fn))


def _brief(value: object) -> str:
    """A request argument or reply for the debug log: data buffers by their length only."""
    if isinstance(value, bytes | bytearray | memoryview) and len(value) > 64:
        return f"<{len(value)} bytes>"
    if isinstance(value, pyfuse3.EntryAttributes):
        return f"<ino {value.st_ino} mode {value.st_mode:o} size {value.st_size}>"
    if isinstance(value, pyfuse3.FileInfo):
        return f"<fh {value.fh}>"
    if isinstance(value, pyfuse3.RequestContext):
        return f"<uid {value.uid} gid {value.gid} pid {value.pid}>"
    if isinstance(value, tuple):
        return "(" + ", ".join(_brief(v) for v in value) + ")"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


class FuseAdapter(pyfuse3.Operations):
    """pyfuse3 operations on a :class:`FileSystem` (see the module docstring)."""

    # The kernel keeps written pages and writes them back in large chunks; it also keeps
    # size and mtime itself.  This is what makes small writes cheap.
    enable_writeback_cache = True
    # POSIX ACLs (the acl mount option, set per instance from fs.acl): with FUSE_CAP_POSIX_ACL
    # the kernel enforces them itself (reading system.posix_acl_access through getxattr) and
    # leaves the umask to the core, which skips it under a default ACL (nexfs/core/acl.py).
    enable_acl = False
    # File handles (NFS export, open_by_handle_at): the kernel resolves a handle of an inode
    # it no longer caches with LOOKUP(ino, ".") and reconnects directories with
    # LOOKUP(ino, ".."); the generation in every reply tells a reused inode number apart.
    supports_dot_lookup = True

    def __init__(self, fs: FileSystem, *, debug: bool = False) -> None:
        super().__init__()
        self.fs = fs
        self.enable_acl = fs.acl
        self.debug = debug
        self.stats = Stats()  # what ``nexfs stats`` reads (getxattr below)
        self._stats_handout = Handout(self.stats_document)  # a size probe, then its read
        self.stats.sources.append(self._store_counters)
        self._lookups: dict[int, int] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        # O_DIRECT and the page cache (nexfs/fuse/invalidate.py): the handles opened with
        # O_DIRECT, how many of them each inode has, and the inodes among those that a READ
        # (which fills the kernel's page cache) has touched since their pages were dropped.
        self._direct: dict[int, int] = {}
        self._direct_open: dict[int, int] = {}
        self._read_since_inval: set[int] = set()
        # Reads in flight (read_start): reads handled, and until which one they go in flight.
        self._reads_seen = self._concurrent_until = 0
        self._drop_after_write: int | None = None

    # -- the one errno translation --------------------------------------------------------

    def errno_of(self, op: str, exc: BaseException) -> int:
        """The errno to answer for ``exc`` raised while handling ``op``.

        Whether the failure damages the volume is not decided here: the adapter is one more
        boundary that hands it to the failure policy (nexfs/store/failure.py), which has normally
        decided it already in the core's public method and then does nothing more."""
        try:
            self.fs.failures.failed(exc, where=op)
        except Exception:
            # Marking writes the superblock; if even that fails the device is gone, and the
            # mount must still stay up to answer EIO.
            log.exception("could not mark the volume as needing fsck")
        if isinstance(exc, FsError):
            if self.debug:
                log.debug("%s -> %s", op, errno.errorcode.get(exc.errno, exc.errno))
            return exc.errno
        return errno.EIO

    # -- helpers --------------------------------------------------------------------------

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attr.ino
        entry.generation = attr.generation
        entry.entry_timeout = ENTRY_TIMEOUT
        entry.attr_timeout = ATTR_TIMEOUT
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blksize = attr.blksize
        entry.st_blocks = attr.blocks
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        entry.st_birthtime_ns = attr.btime_ns
        return entry

    def _ctx(self, ctx: pyfuse3.RequestContext, *, creating: bool = False) -> Ctx:
        """The core's view of the caller.

        The umask: with ACLs off the kernel has already applied it to the mode of
        create/mkdir/mknod, so it is passed as 0.  With ACLs on the mount asks for
        FUSE_CAP_DONT_MASK (nexfs/fuse/caps.py) and the core applies it, except under a
        default ACL; should that request fail, applying it a second time changes nothing.

        Supplementary groups are only read (from /proc, ~20 us) for non-root callers: the
        core checks group permissions too, and root passes every check without them."""
        umask = ctx.umask if creating and self.enable_acl else 0
        if ctx.uid == 0:
            return Ctx(uid=0, gid=ctx.gid, pid=ctx.pid, umask=umask)
        try:
            groups = tuple(sorted(pyfuse3.get_sup_groups(ctx.pid)))
        except (OSError, RuntimeError):
            groups = ()  # the process is already gone
        return Ctx(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid, umask=umask, groups=groups)

    def _remember(self, attr: Attr) -> pyfuse3.EntryAttributes:
        """Take the reference that a reply raising the kernel's lookup count stands for."""
        self.fs.ref(attr.ino)
        self._lookups[attr.ino] = self._lookups.get(attr.ino, 0) + 1
        return self._entry(attr)

    def _open_handle(self, ino: int, ctx: Ctx) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = (ino, ctx)
        return fh

    def _note_direct(self, fh: int, ino: int, flags: int) -> None:
        if flags & os.O_DIRECT:
            self._direct[fh] = ino
            self._direct_open[ino] = self._direct_open.get(ino, 0) + 1

    def _forget_direct(self, fh: int) -> None:
        ino = self._direct.pop(fh, None)
        if ino is not None:
            left = self._direct_open.pop(ino) - 1
            if left:
                self._direct_open[ino] = left
            else:
                self._read_since_inval.discard(ino)

    def _handle(self, fh: int) -> _Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    # -- namespace ------------------------------------------------------------------------

    @_handler
    def lookup(self, parent_inode: int, name: bytes,
               ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            attr = self.fs.lookup_or_none(parent_inode, name, self._ctx(ctx))
        except FsError as exc:
            # ENOENT for "." of an inode number with no name left (a stale file handle)
            if exc.errno != errno.ENOENT or isinstance(exc, CorruptionError):
                raise
            attr = None
        if attr is None:
            # A negative entry (st_ino 0) lets the kernel cache "no such name" for
            # ENTRY_TIMEOUT; creating the name through the kernel replaces it.
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = ENTRY_TIMEOUT
            return negative
        return self._remember(attr)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        # pyfuse3 does not allow forget to raise, not even FUSEError.
        start = _clock()
        try:
            self._forget(inode_list)
        finally:
            self.stats.in_flight += 1  # record() counts it out again
            self.stats.record("forget", _clock() - start, False)

    def _forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        if self.debug:
            log.debug("forget(%s)", _brief(inode_list))
        for ino, nlookup in inode_list:
            held = self._lookups.get(ino, 0)
            n = min(nlookup, held)
            if n != nlookup:
                log.debug("forget(%d, %d) but only %d lookups recorded", ino, nlookup, held)
            if not n:
                continue
            if held == n:
                del self._lookups[ino]
            else:
                self._lookups[ino] = held - n
            try:
                self.fs.unref(ino, n)
            except Exception as exc:
                self.errno_of("forget", exc)

    @_handler
    def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.getattr(inode))

    @_handler
    def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # pyfuse3 has already turned UTIME_NOW into the current time.
        update_mode = fields.update_mode
        others = fields.update_uid or fields.update_gid or fields.update_size
        kills_setid = False
        if update_mode and self._clears_only_setid(inode, attr.st_mode):
            # A write, truncate or chown by a caller without CAP_FSETID: FUSE leaves
            # clearing the set-ID bits to the filesystem, and the kernel asks for it with a
            # mode change in that caller's name, which the core's chmod rule (owner only)
            # would refuse, failing the write with EPERM.  It is the kernel's decision: with
            # a size or owner change the core clears the bits itself; alone, it is applied
            # as the kernel's own, like the times below.
            if others:
                update_mode = False
            else:
                kills_setid = True
        only_times = not (update_mode or others)
        # With default_permissions the kernel has already applied the utimensat rules
        # (explicit times: owner only; "now": owner or writer).  Two legitimate requests
        # would fail the core's own check: a "now" that pyfuse3 delivers as an explicit
        # time, and the writeback cache flushing the mtime it kept for a writer who is not
        # the owner.  So times-only changes go to the core as the kernel's own.
        caller = Ctx(uid=0, gid=0, pid=ctx.pid) if only_times or kills_setid else self._ctx(ctx)
        changes = SetAttr(
            mode=attr.st_mode if update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            # With a size change the times are the kernel's own "now" (only truncate changes
            # the size; with the writeback cache the kernel sends its mtime explicitly), and
            # the core sets them itself: checked as the caller's explicit times they would
            # refuse ftruncate to a writer who is not the owner (EPERM).
            atime_ns=attr.st_atime_ns if fields.update_atime and not fields.update_size
            else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime and not fields.update_size
            else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        # With a file handle the size change is an ftruncate: the kernel has checked that
        # the descriptor was opened for writing, which is the whole check on Linux.
        return self._entry(self.fs.setattr(inode, changes, caller,
                                           opened_for_write=fh is not None))

    def _clears_only_setid(self, inode: int, mode: int) -> bool:
        """True when ``mode`` is the inode's mode with set-user-ID and/or set-group-ID
        cleared and nothing else changed (the kernel's "kill privileges" request)."""
        old = self.fs.getattr(inode).mode
        setid = stat.S_ISUID | stat.S_ISGID
        return mode != old and mode | setid == old | setid and not mode & setid & ~old

    @_handler
    def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    @_handler
    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
              ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._remember(
            self.fs.mknod(parent_inode, name, mode, rdev, self._ctx(ctx, creating=True)))

    @_handler
    def mkdir(self, parent_inode: int, name: bytes, mode: int,
              ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._remember(
            self.fs.mkdir(parent_inode, name, mode, self._ctx(ctx, creating=True)))

    @_handler
    def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.unlink(parent_inode, name, self._ctx(ctx))

    @_handler
    def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.fs.rmdir(parent_inode, name, self._ctx(ctx))

    @_handler
    def symlink(self, parent_inode: int, name: bytes, target: bytes,
                ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._remember(self.fs.symlink(parent_inode, name, target, self._ctx(ctx)))

    @_handler
    def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
               name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        # pyfuse3 passes the kernel's renameat2 flags through; the core uses the same values.
        self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags,
                       self._ctx(ctx))

    @_handler
    def link(self, inode: int, new_parent_inode: int, new_name: bytes,
             ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._remember(self.fs.link(inode, new_parent_inode, new_name, self._ctx(ctx)))

    # -- files ----------------------------------------------------------------------------

    @_handler
    def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        caller = self._ctx(ctx)
        self.fs.open_file(inode, flags, caller)
        if flags & os.O_ACCMODE != os.O_WRONLY and not flags & os.O_NOATIME:
            self._note_read_open(inode)
        fh = self._open_handle(inode, caller)
        self._note_direct(fh, inode, flags)
        # keep_cache: nothing but this kernel changes the volume, so cached pages stay valid
        # from one open to the next.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _note_read_open(self, inode: int) -> None:
        """Reads served from the page cache never reach the core, so the atime a read would
        set is set when the file is opened for reading (docs/MOUNT.md, "Access times"), and
        the kernel drops the attributes it cached so that stat shows it.  Attributes only:
        that notification writes nothing back and cannot block."""
        if self.fs.note_read_open(inode):
            try:
                pyfuse3.invalidate_inode(inode, attr_only=True)
            except OSError as exc:  # no session (in-process use) or an old kernel
                log.debug("cannot invalidate the attributes of inode %d: %s", inode, exc)

    @_handler
    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        caller = self._ctx(ctx, creating=True)
        entry = self._remember(self.fs.create(parent_inode, name, mode, caller))
        fh = self._open_handle(entry.st_ino, caller)
        self._note_direct(fh, entry.st_ino, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), entry

    # pyfuse3 replies with any buffer (PyObject_GetBuffer); its stub says bytes.
    @_awaiting_handler
    async def read(  # type: ignore[override]
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        started = self._read_start(fh, off, size)
        if not isinstance(started, tuple):
            return started
        # The device part is in flight on the valve's ring (nexfs/store/inflight.py): other
        # workers serve the next requests until it completes.
        buf, group, lo, length = started
        if not group.done.is_set():
            await fuseloop.await_device(group.done.wait)
        reads = self.fs.store.data.reads
        assert reads is not None
        # Back to the pool before the reply is sent: no other task runs before pyfuse3 has
        # sent it (no checkpoint in between), and only then may the buffer be reused.
        reads.give_buffer(buf)
        self.fs.read_finish(group)
        return buf[lo : lo + length]

    def _read_start(self, fh: int, off: int,
                    size: int) -> bytes | memoryview | tuple[memoryview, ReadGroup, int, int]:
        """The core's part of ``read``: all of it, or all but the device reads in flight."""
        ino = self._handle(fh)[0]
        if ino in self._direct_open and fh not in self._direct:
            # This READ may fill the page cache while an O_DIRECT write is queued.  (A READ
            # on an O_DIRECT handle is the direct read itself, which caches nothing; the
            # rare page-cache fill through such a handle, docs/DESIGN.md, is not counted,
            # so that mixed O_DIRECT reads and writes cost nothing extra.)
            self._read_since_inval.add(ino)
        # The short path: every block mapped and in the data cache, one call into C; the
        # reply is a view of the data cache's reply buffer, sent before any other request
        # runs.
        hot = self.fs.read_hot(ino, off, size)
        if hot is not None:
            return hot
        reads = self.fs.store.data.reads
        if reads is not None:
            # Alone, a read blocks: waiting on the ring costs a wake-up and a pass through
            # trio (docs/BENCHMARKS.md).  Reads go in flight for the next CONCURRENT_SPAN
            # reads after one found company (a request queued, or reads in flight): a
            # blocking read among concurrent ones would stall the others' completions.
            self._reads_seen += 1
            if reads.in_flight or fuseloop.requests_waiting():
                self._concurrent_until = self._reads_seen + CONCURRENT_SPAN
            if self._reads_seen < self._concurrent_until:
                started = self.fs.read_start(ino, off, size, reads)
                if started is not None:
                    return started
        return self.fs.read(ino, off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        written = await self.write_data(fh, off, buf)
        ino, self._drop_after_write = self._drop_after_write, None
        if ino is not None:
            # The kernel does not drop what readers cached while an asynchronous O_DIRECT
            # write was queued (nexfs/fuse/invalidate.py): drop it before answering.  The only
            # await of any handler; the core's work for this request is finished.
            await drop_cached_pages(ino)
        return written

    @_handler
    def write_data(self, fh: int, off: int, buf: bytes) -> int:
        """The core's part of ``write``; notes the inode whose cached pages must go."""
        ino, caller = self._handle(fh)
        written = self.fs.write(ino, off, buf, caller)
        if fh in self._direct and ino in self._read_since_inval:
            self._read_since_inval.discard(ino)
            self._drop_after_write = ino
        return written

    @_handler
    def flush(self, fh: int) -> None:
        # close(2) promises nothing about durability, and the kernel writes the file's dirty
        # pages back and reports their errors before it sends FLUSH (fuse_flush), so there
        # is nothing to do here.  ENOSYS, once, makes it stop sending FLUSH for the rest of
        # the mount (fc->no_flush): one request less per close(2), and close(2) still
        # returns the writeback's errors (tests/test_mount_requests.py).
        del fh
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_handler
    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)
        self._forget_direct(fh)

    @_handler
    def fsync(self, fh: int, datasync: bool) -> None:
        self.fs.fsync(self._handle(fh)[0], datasync)

    # -- directories ----------------------------------------------------------------------

    @_handler
    def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        # Directory cookies are stable positions in the core's index, so a directory handle
        # needs no state: it is the inode number.
        return inode

    @_handler
    def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.fs.readdir(fh, start_id)
        try:
            for name, attr, cookie in entries:
                if not pyfuse3.readdir_reply(token, name, self._entry(attr), cookie):
                    break
                # readdirplus raises the lookup count of every entry the kernel accepted,
                # except "." and ".." (the kernel does not instantiate those).
                if name != b"." and name != b"..":
                    self.fs.ref(attr.ino)
                    self._lookups[attr.ino] = self._lookups.get(attr.ino, 0) + 1
        finally:
            close = getattr(entries, "close", None)
            if close is not None:
                close()

    @_handler
    def releasedir(self, fh: int) -> None:
        pass

    @_handler
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.fs.fsyncdir(fh)

    # -- the volume -----------------------------------------------------------------------

    @_handler
    def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        figures = self.fs.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = figures.bsize
        data.f_frsize = figures.frsize
        data.f_blocks = figures.blocks
        data.f_bfree = figures.bfree
        data.f_bavail = figures.bavail
        data.f_files = figures.files
        data.f_ffree = figures.ffree
        data.f_favail = figures.favail
        data.f_namemax = figures.namemax
        return data

    @_handler
    def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # With default_permissions (always on) the kernel does not send ACCESS; kept so the
        # adapter is complete.  A refusal arrives as FsError(EACCES) and becomes that errno.
        self.fs.access(inode, mode, self._ctx(ctx))
        return True

    # -- extended attributes --------------------------------------------------------------

    @_handler
    def setxattr(self, inode: int, name: bytes, value: bytes,
                 ctx: pyfuse3.RequestContext) -> None:
        if inode == pyfuse3.ROOT_INODE and name == STATS_XATTR:
            raise FsError(errno.EPERM, "the statistics are read-only")
        # pyfuse3 3.x does not pass XATTR_CREATE/XATTR_REPLACE on, so the flags are 0.
        self.fs.setxattr(inode, name, value, 0, self._ctx(ctx))

    @_handler
    def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # The kernel asks for security.capability before every write(2) (FUSE clears
        # SB_NOSEC).  The core answers ENODATA from the inode alone when it has no xattrs, so
        # this path must stay free of extra work: no supplementary groups, no logging.  (The
        # VFS itself keeps non-root callers away from trusted.* names.)
        if name == CAPABILITY_XATTR and not self.fs.has_xattrs(inode):
            # The common case, answered without raising through the core: one exception
            # instead of three, and no trip through the failure policy (about 1 us).
            raise pyfuse3.FUSEError(errno.ENODATA)
        if inode == pyfuse3.ROOT_INODE and name == STATS_XATTR:
            return self._stats_handout.get(ctx.pid)
        return self.fs.getxattr(inode, name, Ctx(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid))

    @_handler
    def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        # Unlike getxattr, listing is not filtered by the VFS: the core hides trusted.*
        # names from non-root callers, which needs only the uid.
        return self.fs.listxattr(inode, Ctx(uid=ctx.uid, gid=ctx.gid, pid=ctx.pid))

    @_handler
    def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if inode == pyfuse3.ROOT_INODE and name == STATS_XATTR:
            raise FsError(errno.EPERM, "the statistics are read-only")
        if name == CAPABILITY_XATTR:
            # Whatever reaches the daemon was allowed by the kernel: a caller's removal needs
            # CAP_SETFCAP (cap_inode_removexattr), and the kernel's own removal before a
            # write, truncate or chown by any writer (file_remove_privs) is checked by
            # nothing.  The core's owner rule would refuse the latter for a writer who is
            # not the owner, failing the write(2) with EPERM.
            self.fs.removexattr(inode, name, KERNEL)
            return
        self.fs.removexattr(inode, name, self._ctx(ctx))

    # -- statistics -----------------------------------------------------------------------

    def stats_document(self) -> bytes:
        """``nexfs stats``: the snapshot as compact JSON (nexfs/fuse/stats.py)."""
        return json.dumps(self.stats.snapshot(), separators=(",", ":")).encode()

    def _store_counters(self) -> dict[str, Any]:
        out = self.fs.store.counters()
        for cache in out["caches"].values():
            cache["hit_rate"] = hit_rate(cache["hits"], cache["misses"])
        return out

    # -- lifetime -------------------------------------------------------------------------

    def commit(self) -> None:
        """Commit the running transaction; failures are reported, never raised."""
        try:
            self.fs.commit(durable=True)
        except Exception as exc:
            self.errno_of("commit", exc)

    async def commit_periodically(self, interval: float = COMMIT_INTERVAL) -> None:
        """Background task: commit every ``interval`` seconds until cancelled."""
        while True:
            await trio.sleep(interval)
            if not self.fs.read_only:
                self.commit()
                if self.debug:
                    log.debug("periodic commit")

    def release_all(self) -> None:
        """Drop the references the kernel still held when the session ended (it does not
        send forget for everything at unmount), so unlinked-but-open inodes are freed."""
        self._handles.clear()
        self._direct.clear()
        self._direct_open.clear()
        self._read_since_inval.clear()
        lookups, self._lookups = self._lookups, {}
        for ino, n in lookups.items():
            try:
                self.fs.unref(ino, n)
            except Exception as exc:
                self.errno_of("release", exc)
