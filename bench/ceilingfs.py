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

Two reference variants do what NexFS must do, and nothing else (``nexfs bench`` systems
``ceiling-posix`` and ``ceiling-dev``):

* ``--posix``: no FUSE direct I/O (NexFS keeps the mtime right under the writeback cache,
  docs/DESIGN.md "O_DIRECT and the page cache") and xattrs answered (``getxattr`` is
  ENODATA, ``listxattr`` empty), so the kernel asks ``getxattr("security.capability")``
  before every write: a write is two requests, as on NexFS.
* ``--device IMAGE``: ``--posix``, and the one file's data is the image at byte
  :data:`DEVICE_OFFSET`, reached through the Block Valve as NexFS reaches it: a read blocks
  the loop on an O_DIRECT ``block_read`` into one reusable aligned buffer, except while
  requests come concurrently (the policy of nexfs/fuse/adapter.py: for
  ``CONCURRENT_SPAN`` reads after one found a request queued or reads in flight), when it is
  submitted to a valve ring and awaited while other workers serve (``await_device``); a
  write is an O_DIRECT ``block_write`` in place (sectors only partly written are read
  first); ``fsync`` is one barrier.  No extents, no cache, no journal, no write-behind: the
  least Python between pyfuse3 and the device.  It holds one regular file (a second create
  is ENOSPC); a read in flight and a write of the same sectors are not ordered.

Usage: ``python bench/ceilingfs.py [--posix | --device IMAGE] MOUNTPOINT`` serves in the
foreground until the mountpoint is unmounted (``fusermount3 -u``) or the process gets
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
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

from nexfs.fuse import loop as fuseloop
from nexfs.fuse.adapter import CONCURRENT_SPAN
from valve import Capability, Rights, Ring, Valve

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

    def __init__(self, *, posix: bool = False) -> None:
        super().__init__()
        self.posix = posix
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

    def _info(self, ino: int, flags: int) -> pyfuse3.FileInfo:
        direct = bool(flags & os.O_DIRECT) and not self.posix
        return pyfuse3.FileInfo(fh=ino, keep_cache=True, direct_io=direct)

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

    # xattrs: ENOSYS (the ceiling: the kernel stops asking) or none at all (--posix: the
    # kernel asks for security.capability before every write, as it does NexFS).
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA if self.posix else errno.ENOSYS)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if not self.posix:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return []

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.ENOTSUP if self.posix else errno.ENOSYS)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.ENODATA if self.posix else errno.ENOSYS)

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


DEVICE_OFFSET = 1 << 20
"""Where the file's byte 0 lies in the image (any sector-aligned offset would do)."""
BUFFER_BYTES = 2 << 20
"""The blocking path's one reusable aligned buffer: larger than any READ or WRITE (1 MiB)
plus the sectors a misaligned request spans."""
INFLIGHT_BYTES = 128 << 10
"""Largest read sent to the ring, and each in-flight buffer's size (nexfs/store/inflight.py)."""
DEPTH = 32
"""Reads in flight at most; more wait on the blocking path."""


class DeviceFS(CeilingFS):
    """``--device``: one file whose data is the image at :data:`DEVICE_OFFSET`, through the
    valve (see the module docstring)."""

    def __init__(self, image: str) -> None:
        super().__init__(posix=True)
        self.valve = Valve.open(image)
        self.cap: Capability = self.valve.grant(Rights.READ | Rights.WRITE)
        info = self.cap.block_info()
        self.ss = info.sector_size
        self.capacity = info.total_sectors * self.ss - DEVICE_OFFSET
        self.buf = memoryview(self.cap.alloc_buffer(BUFFER_BYTES)).cast("B")
        self.ring: Ring = self.valve.ring(DEPTH)
        self.spare: list[memoryview] = []
        self.lent = 0
        self.waiting: dict[int, list[object]] = {}  # tag -> [done event, error or None]
        self.reads_seen = self.concurrent_until = 0

    def close(self) -> None:
        self.ring.close()
        self.valve.close()

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if len(self.nodes) > 1:
            raise pyfuse3.FUSEError(errno.ENOSPC)  # one file: the image holds one
        return await super().create(parent_inode, name, mode, flags, ctx)

    def _span(self, off: int, n: int) -> tuple[int, int, int]:
        """(first sector, sectors, offset of byte ``off`` in them) covering [off, off+n)."""
        start = DEVICE_OFFSET + off
        lba = start // self.ss
        return lba, -(-(start + n) // self.ss) - lba, start - lba * self.ss

    async def read(self, fh: int, off: int, size: int) -> bytes:
        n = max(0, min(size, self.nodes[fh].size - off))
        if n == 0:
            return b""
        lba, count, head = self._span(off, n)
        # nexfs/fuse/adapter.py's policy: alone a read blocks (a ring wait costs more than
        # it overlaps); among concurrent requests it goes in flight.
        self.reads_seen += 1
        if self.waiting or fuseloop.requests_waiting():
            self.concurrent_until = self.reads_seen + CONCURRENT_SPAN
        try:
            if (self.reads_seen < self.concurrent_until and count * self.ss <= INFLIGHT_BYTES
                    and (self.spare or self.lent < DEPTH)):
                return await self._read_in_flight(lba, count, head, n)
            self.cap.block_read(lba, count, into=self.buf[: count * self.ss])
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return self.buf[head : head + n]  # type: ignore[return-value]

    async def _read_in_flight(self, lba: int, count: int, head: int, n: int) -> bytes:
        buf = self.spare.pop() if self.spare else memoryview(
            self.cap.alloc_buffer(INFLIGHT_BYTES)).cast("B")
        self.lent += 1
        try:
            tag = self.cap.block_read(lba, count, buf[: count * self.ss], ring=self.ring)
            state: list[object] = [trio.Event(), None]
            self.waiting[tag] = state
            event = state[0]
            assert isinstance(event, trio.Event)
            await fuseloop.await_device(event.wait)
            if isinstance(state[1], OSError):
                raise state[1]
        finally:
            # Back before the reply is sent: pyfuse3 sends it with no checkpoint in between.
            self.lent -= 1
            self.spare.append(buf)
        return buf[head : head + n]  # type: ignore[return-value]

    def dispatch(self) -> None:
        """Wake the readers whose transfers completed (the loop's poll, or the reaper)."""
        for c in self.ring.reap():
            state = self.waiting.pop(c.tag)
            state[1] = c.error
            event = state[0]
            assert isinstance(event, trio.Event)
            event.set()

    async def reaper(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.ring.fileno())
            self.dispatch()

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        n = len(buf)
        if off + n > self.capacity:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        lba, count, head = self._span(off, n)
        out = self.buf[: count * self.ss]
        try:
            if head or (head + n) % self.ss:
                # Sectors only partly written keep their other bytes.
                self.cap.block_read(lba, count, into=out)
            out[head : head + n] = buf
            self.cap.block_write(lba, count, out)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        node = self.nodes[fh]
        node.size = max(node.size, off + n)
        return n

    async def fsync(self, fh: int, datasync: bool) -> None:
        # The valve's barrier is a durable write: rewrite the file's first sector.
        lba = DEVICE_OFFSET // self.ss
        try:
            self.cap.block_read(lba, 1, into=self.buf[: self.ss])
            self.cap.block_write(lba, 1, self.buf[: self.ss], durable=True)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None


async def _serve_until_signal(device: DeviceFS | None) -> None:
    async with trio.open_nursery() as nursery:
        if device is not None:
            nursery.start_soon(device.reaper)
            fuseloop.watch(device.ring.fileno(), device.dispatch)

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        try:
            await fuseloop.serve()
        finally:
            fuseloop.watch(-1)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ceilingfs.py", description=__doc__.split("\n")[0])
    parser.add_argument("mountpoint", help="an existing directory")
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--posix", action="store_true",
                         help="no FUSE direct I/O, xattrs answered (ENODATA)")
    variant.add_argument("--device", metavar="IMAGE",
                         help="--posix, and the file's data is IMAGE through the valve")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.mountpoint):
        parser.error(f"{args.mountpoint}: not a directory")
    device = None
    if args.device is not None:
        try:
            device = DeviceFS(args.device)
        except OSError as exc:
            print(f"ceilingfs.py: {exc}", file=sys.stderr)
            return 1
    ops = device if device is not None else CeilingFS(posix=args.posix)
    options = set(pyfuse3.default_options) | {"fsname=ceilingfs", "subtype=ceilingfs"}
    try:
        pyfuse3.init(ops, args.mountpoint, options)
        try:
            trio.run(_serve_until_signal, device)
        finally:
            # Unmounted from outside or terminated by a signal: libfuse unmounts if need be.
            pyfuse3.close(unmount=True)
    finally:
        if device is not None:
            device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
