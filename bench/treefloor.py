"""The floor of a metadata workload: a pyfuse3 directory tree that only answers.

``bench/ceilingfs.py`` is the ceiling for the fio jobs (one flat directory).  A small-file
``tar x`` or ``rm -rf`` needs a tree, so this is the same idea for them: directories, files
and their attributes held in memory, data dropped (only the size is kept), served by NexFS's
own request loop (nexfs/fuse/loop.py) with the options NexFS mounts with (writeback cache,
``default_permissions``).  It answers the requests NexFS gets the way NexFS does, so that the
kernel sends it the same ones: ``getxattr`` answers ENODATA (the kernel keeps asking for
``security.capability`` before every write and chown), FLUSH answers ENOSYS once, readdir
is readdirplus.  What a workload costs on it is the kernel's share, pyfuse3's and the
loop's: what any pyfuse3 filesystem pays before doing any work of its own
(``bench/meta_ab.py --floor``, docs/BENCHMARKS.md "Requests per file").

Usage: ``python bench/treefloor.py MOUNTPOINT`` serves in the foreground until the
mountpoint is unmounted (``fusermount3 -u``) or the process gets SIGTERM/SIGINT.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

if __package__ in (None, ""):
    # Run as a script from bench/: the checkout root holds the nexfs package.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexfs.fuse.loop import serve

ROOT = pyfuse3.ROOT_INODE
TIMEOUT = 60.0  # NexFS's entry and attribute timeouts (nexfs/fuse/adapter.py)


@dataclass
class _Node:
    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    nlink: int = 1
    atime_ns: int = field(default_factory=time.time_ns)
    mtime_ns: int = 0
    ctime_ns: int = 0
    parent: int = ROOT
    entries: dict[bytes, int] | None = None  # a directory's names

    def __post_init__(self) -> None:
        self.mtime_ns = self.ctime_ns = self.atime_ns


class TreeFloor(pyfuse3.Operations):
    """A directory tree in memory; see the module docstring."""

    enable_writeback_cache = True

    def __init__(self) -> None:
        super().__init__()
        root = _Node(ROOT, stat.S_IFDIR | 0o755, nlink=2, entries={})
        self.nodes: dict[int, _Node] = {ROOT: root}
        self.next_ino = ROOT + 1

    @staticmethod
    def _attr(node: _Node) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.ino
        entry.st_mode = node.mode
        entry.st_nlink = node.nlink
        entry.st_size = node.size
        entry.st_blksize = 4096
        entry.st_blocks = (node.size + 511) // 512
        entry.st_uid, entry.st_gid = node.uid, node.gid
        entry.st_atime_ns = node.atime_ns
        entry.st_mtime_ns = node.mtime_ns
        entry.st_ctime_ns = node.ctime_ns
        entry.attr_timeout = entry.entry_timeout = TIMEOUT
        return entry

    def _node(self, ino: int) -> _Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _dir(self, ino: int) -> dict[bytes, int]:
        entries = self._node(ino).entries
        if entries is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return entries

    def _new(self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> _Node:
        entries = self._dir(parent)
        if name in entries:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = _Node(self.next_ino, mode, uid=ctx.uid, gid=ctx.gid, parent=parent)
        self.next_ino += 1
        if stat.S_ISDIR(mode):
            node.entries, node.nlink, node.size = {}, 2, 4096
            self.nodes[parent].nlink += 1
        self.nodes[node.ino] = node
        entries[name] = node.ino
        self._touch(parent)
        return node

    def _touch(self, ino: int) -> None:
        node = self.nodes[ino]
        node.mtime_ns = node.ctime_ns = time.time_ns()

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        ino = self._dir(parent_inode).get(name)
        if ino is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = TIMEOUT
            return negative
        return self._attr(self.nodes[ino])

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        return self._attr(self._node(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_size:
            node.size = attr.st_size
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else time.time_ns()
        return self._attr(node)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self._new(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx))

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node = self._new(parent_inode, name, stat.S_IFREG | (mode & 0o7777), ctx)
        return pyfuse3.FileInfo(fh=node.ino, keep_cache=True), self._attr(node)

    def _remove(self, parent: int, name: bytes, want_dir: bool) -> None:
        entries = self._dir(parent)
        ino = entries.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node = self.nodes[ino]
        if want_dir != (node.entries is not None):
            raise pyfuse3.FUSEError(errno.ENOTDIR if want_dir else errno.EISDIR)
        if want_dir and node.entries:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del entries[name]
        node.nlink = 0 if want_dir else node.nlink - 1
        node.ctime_ns = time.time_ns()
        if want_dir:
            self.nodes[parent].nlink -= 1
        self._touch(parent)

    async def unlink(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, False)

    async def rmdir(self, parent_inode: int, name: bytes,
                    ctx: pyfuse3.RequestContext) -> None:
        self._remove(parent_inode, name, True)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, _ in inode_list:
            node = self.nodes.get(ino)
            if node is not None and node.nlink == 0:
                del self.nodes[ino]

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        self._node(inode)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self.nodes[fh]
        return bytes(max(0, min(size, node.size - off)))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self.nodes[fh]
        node.size = max(node.size, off + len(buf))
        return len(buf)

    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)  # as NexFS: the kernel stops sending it

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._dir(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        node = self.nodes[fh]
        assert node.entries is not None
        entries = sorted(node.entries.items())
        for i, (name, ino) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attr(self.nodes[ino]), i):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = data.f_bfree = data.f_bavail = 1 << 30
        data.f_files = data.f_ffree = data.f_favail = 1 << 20
        data.f_namemax = 255
        return data


async def _serve_until_signal() -> None:
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        await serve()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not os.path.isdir(args[0]):
        print("usage: treefloor.py MOUNTPOINT (an existing directory)", file=sys.stderr)
        return 2
    options = set(pyfuse3.default_options) | {"fsname=treefloor", "subtype=treefloor"}
    pyfuse3.init(TreeFloor(), args[0], options)
    try:
        trio.run(_serve_until_signal)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
