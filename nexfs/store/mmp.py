"""Multi-mount protection (MMP): one block that says which node writes the volume, and since when.

A local image or block device is protected by the lock the valve takes (``flock``, or the
kernel's exclusive claim); a network export is not (``BlockInfo.exclusive`` is False): two
hosts mounting it read-write would both replay, allocate and checkpoint, and destroy it.  MMP
is ext4's answer, and this module follows it (e2fsprogs ``lib/ext2fs/mmp.c``, the kernel's
``fs/ext4/mmp.c``): a volume with the MMP feature names one data block (superblock
``mmp_block``) that its writer rewrites every ``mmp_interval`` with its host name and a new
sequence number; anyone about to write reads it first.  The layout is docs/FORMAT.md's "MMP
block".

Claiming (:meth:`Mmp.claim`, before anything else is written; mounts and ``fsck -y``):

1. read the block.  ``SEQ_CLEAN``: nobody writes the volume, go to 3.  ``SEQ_FSCK``:
   fsck.nexfs holds it: refuse (a mount never waits for a check; fsck itself treats a claim
   left by a dead fsck of this host, or any claim given ``--clear-mmp``, as a stale one).
   A sequence number, or a block that does not decode: someone may be writing;
2. wait ``wait_time()`` = min(2 x interval + 1 s, interval + 60 s) (interval: the larger of
   the superblock's and the one the writer put in the block), read again: if the block
   changed, its writer is alive: refuse, naming it (:class:`MmpBusy`).  Unchanged: the
   writer is gone (crashed, killed, powered off);
3. write a new random sequence with our host name and hold it for ``wait_time()`` again,
   checking every interval that the block is still ours and writing the next sequence: if
   it is not ours, another node claimed at the same time: refuse.  (ext4 writes once,
   checks once at the end and relies on its kmmpd thread writing again the moment it
   starts.  A first version of this module, whose keeper first wrote one interval after
   the claim, left the block still for longer than a waiter waits, so a node that read it
   just after the claim's write took the volume from its new owner: the explorer in
   tests/test_mmp.py found it.  Moving the block during the claim needs no such timing.)
   Both waits together are why an MMP mount takes 2 x (2 x interval + 1 s) after a crash
   and 2 x interval + 1 s after a clean unmount.

Keeping (:meth:`Mmp.update`, every interval while mounted: :meth:`Mmp.keep` in the mount's
trio loop, the I/O in a worker thread so a slow device never holds the loop, and
:meth:`Mmp.keeping` in a thread while the volume is opened, since a journal replay can take
longer than a waiter waits): read the block, check it is still the sequence we wrote last,
write the next one.  Someone else's write in between means another node claimed the volume
(we were stalled for longer than it waited): :class:`MmpLost`, and the mount puts the volume
in its error state, read-only, so that it stops writing.  The interval written in the block
grows to the longest gap seen between our updates, so a waiter waits longer than our stalls.

Releasing (:meth:`Mmp.release`, clean unmount, end of fsck): write ``SEQ_CLEAN`` if the block
is still ours.

Every write goes through a capability scoped to the MMP block alone; the store's grants
(nexfs/store/grants.py) leave that block out of every other write window.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from nexfs.ondisk.layout import Superblock
from nexfs.ondisk.metablock import (
    BLOCK_SIZE,
    HEADER_SIZE,
    MAGIC_MMP,
    check_header,
    pack_header,
    seal_block,
)
from nexfs.store.blockdev import BlockDev
from nexfs.types import CorruptionError, FsError

log = logging.getLogger(__name__)

SEQ_CLEAN = 0xFF4D4D50
"""Nobody writes the volume (clean unmount, end of fsck, mkfs)."""
SEQ_FSCK = 0xE24D4D50
"""fsck.nexfs is repairing the volume (or was interrupted doing so)."""
SEQ_MAX = 0xE24D4D4F
"""Largest sequence number of a running writer (1 .. SEQ_MAX; both sentinels are above)."""

DEFAULT_INTERVAL_MS = 5000
"""ext4's default update interval."""
MIN_INTERVAL_MS = 100
MAX_INTERVAL_MS = 300_000

_BODY = struct.Struct("<IIQII64s256s")
"""After the common header: seq, check interval (ms), time (ns), pid, reserved, node, device."""
NODE_MAX = 64
DEVICE_MAX = 256


def wait_time(interval_ms: int) -> float:
    """Seconds a claimer waits before re-reading (ext4's min(2i + 1, i + 60))."""
    i = interval_ms / 1000
    return min(2 * i + 1, i + 60)


def _pad(text: str, width: int) -> bytes:
    raw = text.encode("utf-8")[:width]
    return raw.decode("utf-8", "ignore").encode("utf-8").ljust(width, b"\0")


def _unpad(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


@dataclass(frozen=True)
class MmpRecord:
    """The decoded MMP block."""

    seq: int
    interval_ms: int
    time_ns: int = 0
    pid: int = 0
    node: str = ""
    device: str = ""

    def encode(self, out: memoryview, volume_seed: int, blkno: int) -> None:
        """Serialise into ``out`` (one block), header and checksum included."""
        out[:] = bytes(BLOCK_SIZE)
        pack_header(out, MAGIC_MMP, blkno, 0, 0)
        _BODY.pack_into(out, HEADER_SIZE, self.seq, self.interval_ms, self.time_ns, self.pid,
                        0, _pad(self.node, NODE_MAX), _pad(self.device, DEVICE_MAX))
        seal_block(out, volume_seed, blkno)

    @classmethod
    def decode(cls, raw: memoryview | bytes, volume_seed: int, blkno: int) -> MmpRecord:
        """CorruptionError for a block that is not a valid MMP block of this volume."""
        check_header(memoryview(raw), blkno, MAGIC_MMP, volume_seed, "MMP block", owner=0)
        seq, interval, when, pid, _r, node, device = _BODY.unpack_from(raw, HEADER_SIZE)
        if not (1 <= seq <= SEQ_MAX or seq in (SEQ_CLEAN, SEQ_FSCK)):
            raise CorruptionError(blkno, "MMP block", f"unknown sequence {seq:#x}")
        return cls(seq, interval, when, pid, _unpad(node), _unpad(device))

    @property
    def who(self) -> str:
        """The writer, for messages: "host NODE (pid N)"."""
        return f"host {self.node or '?'} (pid {self.pid})"


class MmpBusy(FsError):
    """The volume is in use by another node (or fsck): not claimed.  EBUSY."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBUSY, message)


class MmpLost(FsError):
    """Another node wrote the MMP block while we held it: we must stop writing.  EBUSY."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBUSY, message)


def new_seq() -> int:
    return random.SystemRandom().randint(1, SEQ_MAX)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Mmp:
    """The MMP block of one volume, seen by one would-be writer.

    ``dev`` is a whole-device view (a writable capability); this object keeps only a view
    scoped to ``blkno`` (reads and writes), so nothing else can be written through it.
    ``device`` is how this node names the volume (in the block, for the other node's
    message); ``node`` and ``pid`` default to this host's name and process.
    """

    def __init__(self, dev: BlockDev, blkno: int, volume_seed: int, interval_ms: int, *,
                 device: str = "", node: str | None = None, pid: int | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.blkno = blkno
        self._view = dev.scoped((blkno, blkno + 1), [(blkno, blkno + 1)])
        self._seed = volume_seed
        self.interval_ms = min(max(interval_ms, MIN_INTERVAL_MS), MAX_INTERVAL_MS)
        self.device = device
        self.node = node if node is not None else socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self._sleep = sleep
        self._monotonic = monotonic
        self._buf = self._view.alloc(1)
        self._lock = threading.Lock()  # update() runs in worker threads
        self.seq: int | None = None  # what we wrote last; None: not ours
        self._check_ms = self.interval_ms
        self._last_update = 0.0

    # -- raw access --------------------------------------------------------------------------

    def read_raw(self) -> bytes:
        return bytes(self._view.read_blocks(self.blkno, 1))

    def decode(self, raw: bytes) -> MmpRecord | None:
        """The record, or None (logged) when the block does not decode."""
        try:
            return MmpRecord.decode(raw, self._seed, self.blkno)
        except CorruptionError as exc:
            log.warning("%s", exc)
            return None

    def read(self) -> MmpRecord | None:
        return self.decode(self.read_raw())

    def _write(self, seq: int) -> None:
        rec = MmpRecord(seq, self._check_ms, time.time_ns(), self.pid, self.node, self.device)
        rec.encode(self._buf, self._seed, self.blkno)
        self._view.write_blocks(self.blkno, 1, self._buf, durable=True)

    # -- claiming ----------------------------------------------------------------------------

    def claim(self, *, fsck: bool = False, clear: bool = False) -> None:
        """Make the volume ours (module docstring, steps 1-3); MmpBusy if it is not free.

        ``fsck``: fsck.nexfs's claim, which ends by writing SEQ_FSCK.  ``clear``: the user
        says no fsck runs any more: a SEQ_FSCK block is treated like a writer's.
        """
        for seconds in self.claim_steps(fsck=fsck, clear=clear):
            self._sleep(seconds)

    def claim_steps(self, *, fsck: bool = False, clear: bool = False) -> Iterator[float]:
        """:meth:`claim` as a generator that yields each wait instead of sleeping (so that
        tests can run several claimers on one virtual clock)."""
        raw = self.read_raw()
        rec = self.decode(raw)
        interval = self.interval_ms
        if rec is None or rec.seq != SEQ_CLEAN:
            if rec is not None and rec.seq == SEQ_FSCK and not clear and not (
                    fsck and rec.node == self.node and not _pid_alive(rec.pid)):
                raise MmpBusy(self._fsck_message(rec, fsck))
            if rec is not None:
                interval = max(interval, min(rec.interval_ms, MAX_INTERVAL_MS))
            wait = wait_time(interval)
            log.info("MMP block %d: %s; waiting %.1f s to see whether it is alive",
                     self.blkno, "damaged" if rec is None else f"last written by {rec.who}",
                     wait)
            yield wait
            again = self.read_raw()
            if again != raw:
                now = self.decode(again)
                who = now.who if now is not None else "another node"
                raise MmpBusy(f"the volume is in use by {who}{self._device_of(now)}: its "
                              f"multi-mount protection block changed while we waited "
                              f"{wait:.1f} s")
        # Our claim, verified for a whole wait: a node that claims at the same time finds
        # our sequence over its own (or we find its over ours) at one of the checks.  We keep
        # the block moving meanwhile, as an owner does: a waiter that read it just after our
        # first write must see it change before its own wait ends (else it would take the
        # volume from us the moment we have it).
        seq = new_seq()
        self._write(seq)
        step = self.interval_ms / 1000
        left = wait_time(interval)
        log.info("multi-mount protection: claiming the volume (%.1f s, to be sure no other "
                 "node claims it too)", left)
        while left > 0:
            yield min(step, left)
            left -= step
            now = self.decode(self.read_raw())
            if now is None or now.seq != seq or now.node != self.node or now.pid != self.pid:
                who = now.who if now is not None else "another node"
                raise MmpBusy(f"the volume was claimed by {who}{self._device_of(now)} at the "
                              "same time as by us")
            if left > 0:
                seq = seq + 1 if seq < SEQ_MAX else 1
                self._write(seq)
        if fsck:
            self._write(SEQ_FSCK)
            self.seq = SEQ_FSCK
        else:
            self.seq = seq
        self._last_update = self._monotonic()

    def _device_of(self, rec: MmpRecord | None) -> str:
        """How the other node names the volume, when that differs from our name."""
        if rec is None or not rec.device or rec.device == self.device[:DEVICE_MAX]:
            return ""
        return f" as {rec.device}"

    def _fsck_message(self, rec: MmpRecord, fsck: bool) -> str:
        text = f"fsck.nexfs on {rec.who} is checking the volume{self._device_of(rec)}"
        if fsck:
            return (text + " (if it is not running any more, run fsck.nexfs with "
                    "--clear-mmp)")
        return text + " (mount it when fsck has finished; if fsck was interrupted, run it " \
                      "again)"

    # -- keeping -----------------------------------------------------------------------------

    def update(self) -> None:
        """Check the block is still ours and write the next sequence; MmpLost if not."""
        with self._lock:
            if self.seq is None:
                raise MmpLost("the multi-mount protection block is not ours")
            rec = self.read()
            if rec is None or rec.seq != self.seq or rec.pid != self.pid \
                    or rec.node != self.node:
                self.seq = None
                who = rec.who if rec is not None else "another node (or damage)"
                raise MmpLost(f"the multi-mount protection block was written by {who}: "
                              "the volume seems to be mounted on another node too")
            now = self._monotonic()
            gap_ms = int((now - self._last_update) * 1000)
            # Waiters must wait out our longest stall: report it as the check interval.
            self._check_ms = min(max(self.interval_ms, gap_ms, self._check_ms), MAX_INTERVAL_MS)
            seq = self.seq + 1 if self.seq < SEQ_MAX else 1
            self._write(seq)
            self.seq = seq
            self._last_update = now

    def release(self) -> None:
        """Write SEQ_CLEAN if the block is still ours (nothing otherwise)."""
        with self._lock:
            if self.seq is None:
                return
            rec = self.read()
            if rec is None or rec.seq != self.seq or rec.pid != self.pid \
                    or rec.node != self.node:
                log.error("not marking the multi-mount protection block clean: it was "
                          "written by %s", rec.who if rec is not None else "someone else")
                self.seq = None
                return
            self._write(SEQ_CLEAN)
            self.seq = None

    @contextlib.contextmanager
    def keeping(self) -> Iterator[None]:
        """Update from a thread for the duration (while the volume is opened: the journal
        replay runs before the mount's trio loop exists)."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(self.interval_ms / 1000):
                try:
                    self.update()
                except (OSError, FsError) as exc:
                    log.error("multi-mount protection: %s", exc)
                    return

        thread = threading.Thread(target=run, name="nexfs-mmp", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    async def keep(self, on_lost: Callable[[str], None]) -> None:
        """Update every interval until cancelled; on a lost block or an I/O error call
        ``on_lost(reason)`` once and stop (the mount makes the volume read-only)."""
        import trio

        while True:
            await trio.sleep(self.interval_ms / 1000)
            try:
                await trio.to_thread.run_sync(self.update)
            except (OSError, FsError) as exc:
                reason = f"multi-mount protection: {exc}"
                log.error("%s", reason)
                on_lost(reason)
                return


def clean_block(sb: Superblock) -> bytes:
    """The MMP block of a volume nobody writes (mkfs)."""
    out = memoryview(bytearray(BLOCK_SIZE))
    MmpRecord(SEQ_CLEAN, sb.mmp_interval).encode(out, sb.volume_seed, sb.mmp_block)
    return bytes(out)


class Unprotected(FsError):
    """A writable open of a device no lock protects, of a volume without MMP.  EROFS."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EROFS, message)


def open_claim(dev: Any, *, device: str, fsck: bool = False, clear: bool = False,
               **options: Any) -> Mmp | None:
    """Before opening the volume on ``dev`` (a whole-device capability) for writing: claim
    its MMP block (:meth:`Mmp.claim`), or refuse.  Returns the claimed :class:`Mmp`, or None
    for a volume without MMP on a device the valve holds exclusively.

    Raises :class:`MmpBusy` when another node or fsck has the volume, and :class:`Unprotected`
    when no lock protects the device and the volume has no MMP (fsck, which the user runs
    on purpose, is let through).  A superblock that cannot be read is left to the open that
    follows to report.  ``options`` go to :class:`Mmp` (tests: node, pid, sleep).
    """
    from nexfs.store.volume import superblock_copies

    bdev = BlockDev(dev)
    try:
        sb = superblock_copies(bdev.read_only()).best
    except (FsError, OSError):
        return None
    if not sb.mmp:
        if not getattr(dev.block_info(), "exclusive", True) and not fsck:
            raise Unprotected("no lock can protect this device from a second writer, and the "
                              "volume has no multi-mount protection: mount it read-only, or "
                              "enable protection (on no other host mounted) with: "
                              f"nexfs tune -O mmp {device}")
        return None
    mmp = Mmp(bdev, sb.mmp_block, sb.volume_seed, sb.mmp_interval, device=device, **options)
    mmp.claim(fsck=fsck, clear=clear)
    return mmp
