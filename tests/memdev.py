"""An in-memory block device with the valve's interface and its durability model.

:class:`MemDevice` implements ``block_info / block_read / block_write / alloc_buffer`` exactly
like a valve grant (sector size 512 or 4096), stores sectors sparsely (a 1 TiB device costs
only what has been written), and tracks durability: a write is *volatile* until a write with
``durable=True`` completes, which makes it and every earlier write durable.  :meth:`crash`
returns the device as it could look after a power cut (see tests/crashsim.py for the full
crash model), and ``fail_after_writes`` injects device errors.  ``exclusive=False`` makes
``block_info`` say what a network export says: no lock protects the device (the filesystem's
multi-mount protection must).
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple


class BlockInfo(NamedTuple):
    sector_size: int
    total_sectors: int
    exclusive: bool = True


class MemDeviceError(OSError):
    """Stands in for valve.DeviceError: an OSError carrying errno."""


def split_sectors(data: Any, sector_size: int) -> list[bytes]:
    """One bytes-like or a list of them -> list of sector images."""
    if isinstance(data, list | tuple):
        raw = b"".join(bytes(memoryview(d).cast("B")) for d in data)
    else:
        raw = bytes(memoryview(data).cast("B"))
    return [raw[i : i + sector_size] for i in range(0, len(raw), sector_size)]


class MemDevice:
    """Sparse in-memory disk.  ``sectors`` is the current view, ``durable`` what survives."""

    def __init__(self, total_sectors: int, sector_size: int = 4096, *,
                 sectors: dict[int, bytes] | None = None, exclusive: bool = True) -> None:
        if sector_size not in (512, 4096):
            raise ValueError("sector size must be 512 or 4096")
        self.sector_size = sector_size
        self.total_sectors = total_sectors
        self.exclusive = exclusive
        self.sectors: dict[int, bytes] = dict(sectors) if sectors else {}
        self.durable: dict[int, bytes] = dict(self.sectors)
        self.volatile: list[tuple[int, list[bytes]]] = []  # writes since the last barrier
        self.zero = bytes(sector_size)
        self.reads = self.writes = self.barriers = 0
        self.bytes_written = 0
        self.fail_after_writes: int | None = None  # raise EIO once this many more writes ran
        self.fail_reads: set[int] = set()  # sector numbers whose read fails with EIO

    @classmethod
    def of_size(cls, nbytes: int, sector_size: int = 4096, *,
                exclusive: bool = True) -> MemDevice:
        return cls(nbytes // sector_size, sector_size, exclusive=exclusive)

    # -- the valve interface -----------------------------------------------------------------

    def block_info(self) -> BlockInfo:
        return BlockInfo(self.sector_size, self.total_sectors, self.exclusive)

    def _check(self, lba: int, count: int) -> None:
        if count < 1 or lba < 0 or lba + count > self.total_sectors:
            raise MemDeviceError(errno.EINVAL, f"sector range {lba}+{count} outside the device")

    def block_read(self, lba: int, count: int, into: Any = None) -> memoryview:
        self._check(lba, count)
        self.reads += 1
        if self.fail_reads.intersection(range(lba, lba + count)):
            raise MemDeviceError(errno.EIO, f"injected read error at sector {lba}")
        get = self.sectors.get
        raw = b"".join(get(s, self.zero) for s in range(lba, lba + count))
        if into is None:
            return memoryview(bytearray(raw))
        mv = memoryview(into).cast("B")
        if mv.nbytes < len(raw):
            raise MemDeviceError(errno.EINVAL, "read buffer too small")
        mv[: len(raw)] = raw
        return mv[: len(raw)]

    def block_write(self, lba: int, count: int, data: Any, *, durable: bool = False) -> None:
        self._check(lba, count)
        secs = split_sectors(data, self.sector_size)
        if len(secs) != count or len(secs[-1]) != self.sector_size:
            raise MemDeviceError(errno.EINVAL, f"write of {count} sectors given wrong size")
        if self.fail_after_writes is not None:
            if self.fail_after_writes <= 0:
                raise MemDeviceError(errno.EIO, f"injected write error at sector {lba}")
            self.fail_after_writes -= 1
        self.writes += 1
        self.bytes_written += count * self.sector_size
        for i, s in enumerate(secs):
            self.sectors[lba + i] = s
        self.volatile.append((lba, secs))
        if durable:
            self.barrier()

    def alloc_buffer(self, nbytes: int) -> bytearray:
        return bytearray(nbytes)

    # -- durability model --------------------------------------------------------------------

    def barrier(self) -> None:
        """Everything written so far is now durable."""
        self.barriers += 1
        for lba, secs in self.volatile:
            for i, s in enumerate(secs):
                self.durable[lba + i] = s
        self.volatile.clear()

    def snapshot(self) -> MemDevice:
        """A fully durable copy of the current contents."""
        return MemDevice(self.total_sectors, self.sector_size, sectors=self.sectors,
                         exclusive=self.exclusive)

    def crash(self, rng: random.Random | None = None, *, keep: float = 0.5,
              tear: float = 0.3) -> MemDevice:
        """The device after a power cut now: durable contents plus, for each volatile write,
        kept (probability ``keep``) or dropped, and a kept multi-sector write torn
        (probability ``tear``: each of its sectors independently new or old).  Without
        ``rng`` nothing volatile survives."""
        image = dict(self.durable)
        if rng is not None:
            apply_writes(image, self.volatile, rng, keep=keep, tear=tear)
        return MemDevice(self.total_sectors, self.sector_size, sectors=image,
                         exclusive=self.exclusive)

    def image_bytes(self) -> bytes:
        """The whole current contents (only sensible for small devices)."""
        get = self.sectors.get
        return b"".join(get(s, self.zero) for s in range(self.total_sectors))


def apply_writes(image: dict[int, bytes], writes: Sequence[tuple[int, list[bytes]]] | Iterable[
        tuple[int, list[bytes]]], rng: random.Random, *, keep: float, tear: float) -> str:
    """Apply a random subset of ``writes`` (in order) to ``image``; returns a description."""
    notes = []
    for n, (lba, secs) in enumerate(writes):
        if rng.random() >= keep:
            continue
        if len(secs) > 1 and rng.random() < tear:
            chosen = [rng.random() < 0.5 for _ in secs]
            for i, s in enumerate(secs):
                if chosen[i]:
                    image[lba + i] = s
            notes.append(f"{n}t")
        else:
            for i, s in enumerate(secs):
                image[lba + i] = s
            notes.append(str(n))
    return ",".join(notes)
