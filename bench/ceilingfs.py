"""The ceiling: the least work a pyfuse3 filesystem can do per request (``nexfs bench``).

A flat directory of sparse files held in memory: writes are accepted and dropped (only the
size is kept), reads return zeros.  No device, no cache, no metadata store: what is left of
a request is the kernel's FUSE round trip and pyfuse3's Python, which every pyfuse3
filesystem pays.  ``nexfs bench`` mounts it as the "ceiling" system next to NexFS and
states NexFS's figures as fractions of it (docs/BENCHMARKS.md).

It is served the way NexFS serves (the same request loop, nexfs/fuse/loop.py, the same
writeback cache and ``default_permissions``) and with the cheapest answers pyfuse3 allows:
a file opened with O_DIRECT gets FUSE direct I/O (one WRITE per write(2), no page cache),
reads answer with a memoryview of a zero buffer, and xattrs are not implemented, so the
kernel stops asking for ``security.capability`` after the first ENOSYS.

Usage: ``python bench/ceilingfs.py MOUNTPOINT`` serves in the foreground until the
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
ZEROS = memoryview(bytes(1 << 20))
"""Reads are at most max_read (1 MiB with libfuse 3's defaults); larger ones get a new
buffer."""


@dataclass
class _Node:
    ino: int
    mode: int
    size: int = 0
    times_ns: int = field(default_factory=time.time_ns)
    uid: int = 0
    gid: int = 0


class CeilingFS(pyfuse3.Operations):
    """Sparse in-memory files in one directory; see the module docstring."""

    enable_writeback_cache = True

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[int, _Node] = {ROOT: _Node(ROOT, stat.S_IFDIR | 0o755)}
        self.names: dict[bytes, int] = {}
        self.next_ino = ROOT + 1

    def _attr(self, node: _Node) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.ino
        entry.st_mode = node.mode
        entry.st_nlink = 2 if stat.S_ISDIR(node.mode) else 1
        entry.st_size = node.size
        entry.st_blksize = 4096
        entry.st_blocks = 0
        entry.st_uid, entry.st_gid = node.uid, node.gid
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = node.times_ns
        entry.attr_timeout = entry.entry_timeout = 60.0
        return entry

    def _node(self, ino: int) -> _Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT or name not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self.nodes[self.names[name]])

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
        if fields.update_mtime:
            node.times_ns = attr.st_mtime_ns
        return self._attr(node)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in self.names:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)
        node = _Node(self.next_ino, mode, uid=ctx.uid, gid=ctx.gid)
        self.next_ino += 1
        self.nodes[node.ino] = node
        self.names[name] = node.ino
        return self._info(node.ino, flags), self._attr(node)

    async def unlink(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> None:
        if parent_inode != ROOT or name not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        # The node stays until forget: an open file may still be read.
        del self.names[name]

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, _ in inode_list:
            if ino != ROOT and ino not in self.names.values():
                self.nodes.pop(ino, None)

    @staticmethod
    def _info(ino: int, flags: int) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=ino, keep_cache=True, direct_io=bool(flags & os.O_DIRECT))

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        self._node(inode)
        return self._info(inode, flags)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self.nodes[fh]
        n = max(0, min(size, node.size - off))
        # pyfuse3 replies from any buffer; its stub says bytes.
        return ZEROS[:n] if n <= len(ZEROS) else bytes(n)  # type: ignore[return-value]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self.nodes[fh]
        node.size = max(node.size, off + len(buf))
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._node(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(self.names.items())
        for i, (name, ino) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attr(self.nodes[ino]), i):
                break

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
        print("usage: ceilingfs.py MOUNTPOINT (an existing directory)", file=sys.stderr)
        return 2
    options = set(pyfuse3.default_options) | {"fsname=ceilingfs", "subtype=ceilingfs"}
    pyfuse3.init(CeilingFS(), args[0], options)
    try:
        trio.run(_serve_until_signal)
    finally:
        # Unmounted from outside or terminated by a signal: libfuse unmounts if need be.
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
