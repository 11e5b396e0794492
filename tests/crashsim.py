"""Crash simulation: record every write and barrier, then rebuild the device as a power cut
could have left it at any point.

Crash model (docs/DESIGN.md): everything written before a completed barrier (a write with
``durable=True``) is durable.  Of the writes issued since the last completed barrier, each may
independently be kept or lost, and a kept multi-sector write may be torn at sector
granularity (some sectors new, others old).  Kept writes are applied in issue order.

Usage::

    base = memdev.snapshot()                 # durable state when recording starts
    rec = RecordingDevice(memdev)
    ... run the workload against rec (rec.barrier_count / rec.mark(...) to take notes) ...
    for cs in crash_states(rec.log, base, subsets_per_barrier=3, rng=random.Random(1)):
        store = Store.open(cs.device)       # cs.epoch = barriers completed before the crash
        ...

Each :class:`CrashState` says how many barriers had completed (``epoch``), which of the
following writes survived (``note``) and which marks were logged before that barrier
(``marks_durable``) and before the crash point (``marks_issued``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from memdev import MemDevice, apply_writes, split_sectors


@dataclass
class LogEntry:
    """One recorded event: op is "write" (lba, sectors), "barrier", or "mark" (label)."""

    op: str
    lba: int = 0
    sectors: list[bytes] = field(default_factory=list)
    label: Any = None


class RecordingDevice:
    """Wraps a device (same interface) and logs every write, barrier and mark."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.log: list[LogEntry] = []
        self.barrier_count = 0
        self.sector_size = inner.block_info().sector_size

    def block_info(self) -> Any:
        return self.inner.block_info()

    def block_read(self, lba: int, count: int, into: Any = None) -> memoryview:
        return self.inner.block_read(lba, count, into)

    def block_write(self, lba: int, count: int, data: Any, *, durable: bool = False) -> None:
        self.inner.block_write(lba, count, data, durable=durable)
        self.log.append(LogEntry("write", lba, split_sectors(data, self.sector_size)))
        if durable:
            self.log.append(LogEntry("barrier"))
            self.barrier_count += 1

    def alloc_buffer(self, nbytes: int) -> Any:
        return self.inner.alloc_buffer(nbytes)

    def mark(self, label: Any) -> None:
        """Note an event of the workload (e.g. "commit 7 returned") in the log."""
        self.log.append(LogEntry("mark", label=label))


@dataclass
class CrashState:
    epoch: int  # barriers completed before the crash
    note: str  # which writes of the next epoch survived ("" = none; "3t" = write 3 torn)
    device: MemDevice
    marks_durable: list[Any]  # marks logged before barrier ``epoch`` completed
    marks_issued: list[Any]  # marks logged before the crash point


def crash_states(log: list[LogEntry], base_image: MemDevice | bytes, *,
                 subsets_per_barrier: int, rng: random.Random, sector_size: int = 4096,
                 keep: float = 0.5, tear: float = 0.3) -> Iterator[CrashState]:
    """Yield devices for crash points of ``log`` replayed over ``base_image``.

    For every epoch (0 = before the first barrier, ..., N = after the last one) one state
    with nothing of the epoch's writes (crash right after its barrier), then
    ``subsets_per_barrier`` states keeping a random subset (with tears) of the epoch's
    writes.  ``base_image`` is a MemDevice (its current contents) or raw bytes (then give
    ``sector_size``).
    """
    if isinstance(base_image, MemDevice):
        total, ss = base_image.total_sectors, base_image.sector_size
        durable = dict(base_image.sectors)
    else:
        ss = sector_size
        total = len(base_image) // ss
        durable = {i: bytes(base_image[i * ss : (i + 1) * ss]) for i in range(total)}
    # Split the log into epochs: the writes issued between two barriers.
    epochs: list[list[tuple[int, list[bytes]]]] = [[]]
    marks_at: list[list[Any]] = [[]]  # marks per epoch
    for e in log:
        if e.op == "write":
            epochs[-1].append((e.lba, e.sectors))
        elif e.op == "barrier":
            epochs.append([])
            marks_at.append([])
        elif e.op == "mark":
            marks_at[-1].append(e.label)
    done_marks: list[Any] = []
    for k, writes in enumerate(epochs):
        issued = done_marks + marks_at[k]
        yield CrashState(k, "", MemDevice(total, ss, sectors=durable), list(done_marks),
                         list(issued))
        for _ in range(subsets_per_barrier if writes else 0):
            image = dict(durable)
            note = apply_writes(image, writes, rng, keep=keep, tear=tear)
            yield CrashState(k, note, MemDevice(total, ss, sectors=image), list(done_marks),
                             list(issued))
        for lba, secs in writes:
            for i, s in enumerate(secs):
                durable[lba + i] = s
        done_marks = issued


def write_prefixes(log: list[LogEntry], base_image: MemDevice, *, until: Any = None,
                   rng: random.Random | None = None) -> Iterator[CrashState]:
    """A crash after every write of ``log`` (up to the first mark equal to ``until``): the
    writes before it all kept, in issue order (a prefix is always a possible crash state),
    and that write itself lost, or kept, or torn when ``rng`` is given and it has several
    sectors.  This is "interrupted at every write", where :func:`crash_states` samples.
    """
    total, ss = base_image.total_sectors, base_image.sector_size
    image = dict(base_image.sectors)
    epoch = 0
    marks: list[Any] = []
    durable_marks: list[Any] = []
    n = 0
    for e in log:
        if e.op == "mark":
            if until is not None and e.label == until:
                return
            marks.append(e.label)
            continue
        if e.op == "barrier":
            epoch += 1
            durable_marks = list(marks)
            continue
        yield CrashState(epoch, f"prefix {n}", MemDevice(total, ss, sectors=image),
                         list(durable_marks), list(marks))
        if rng is not None and len(e.sectors) > 1:
            torn = dict(image)
            for i, s in enumerate(e.sectors):
                if rng.random() < 0.5:
                    torn[e.lba + i] = s
            yield CrashState(epoch, f"prefix {n} torn", MemDevice(total, ss, sectors=torn),
                             list(durable_marks), list(marks))
        for i, s in enumerate(e.sectors):
            image[e.lba + i] = s
        n += 1
