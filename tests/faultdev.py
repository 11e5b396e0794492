"""The one device fault injector of the tests, with the valve's capability interface.

:class:`FaultDevice` wraps anything with ``block_info / block_read / block_write(durable=) /
alloc_buffer`` (a valve capability or a tests/memdev.py device) and passes every call
through, except the ones it was armed to fail.  The in-process tests arm it directly; the
real-mount tests get it into the daemon through tests/faultmount.py, which wraps the
mount's capability in it (the product's device seam, ``nexfs.tools.mount.Seams``) from a text
specification (:func:`parse_spec`, :meth:`FaultDevice.from_spec`).

* ``fail_read(n)``: the n-th read from now raises EIO (nothing read);
* ``fail_write(n)``: the n-th write from now raises EIO (nothing written);
* ``fail_barrier(n)``: the n-th *durable* write from now is written but its flush fails: it
  reaches the device without the durability promise, then EIO (like fdatasync failing);
* ``short_write(n)``: the first write of two or more sectors at or after the n-th from now
  writes only its first half, then raises EIO (a partial write);
* ``sticky=True``: after the first injected failure every later I/O of the same direction
  fails too (writes: a dead device; reads: an unreadable one) — otherwise the fault is
  transient and later I/O succeeds;
* ``arm_when(path, arm)``: the fault is armed (``arm(self)``) only while ``path`` exists,
  checked before each I/O, and counting starts when it appears; removing it disarms (ending a
  sticky fault).  A mount test prepares its data, then arms the fault by creating the file.

The specification (``--device-fault`` of tests/faultmount.py) is
``KIND:N[,sticky][,after=PATH]`` with KIND ``read``, ``write``, ``barrier`` or ``short``: the
arming call of that name with ``n=N``, ``sticky=True`` and ``arm_when(PATH, ...)``.

Errors are :class:`valve.DeviceError` (an ``OSError`` with errno EIO), exactly what a real
valve raises for a failed transfer.  ``reads``, ``writes`` and ``barriers`` count calls, so a
dry run tells how many faults a workload can be given.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from memdev import split_sectors

from valve import DeviceError

log = logging.getLogger("faultdev")

KINDS = ("read", "write", "barrier", "short")


class FaultDevice:
    """Pass-through device with armed faults (see the module docstring)."""

    def __init__(self, inner: Any, *, sticky: bool = False) -> None:
        self.inner = inner
        self.sticky = sticky
        self.sector_size = inner.block_info().sector_size
        self.reads = self.writes = self.barriers = 0
        self.injected = 0  # faults raised so far
        self._dead_reads = self._dead_writes = False
        self._arm_path: str | None = None
        self._arm: Callable[[FaultDevice], None] | None = None
        self._armed = False
        self._read_at: int | None = None
        self._write_at: int | None = None
        self._barrier_at: int | None = None
        self._short_at: int | None = None

    # -- arming ------------------------------------------------------------------------------

    def fail_read(self, n: int = 1) -> None:
        self._read_at = self.reads + n

    def fail_write(self, n: int = 1) -> None:
        self._write_at = self.writes + n

    def fail_barrier(self, n: int = 1) -> None:
        self._barrier_at = self.barriers + n

    def short_write(self, n: int = 1) -> None:
        self._short_at = self.writes + n

    def disarm(self) -> None:
        self._read_at = self._write_at = self._barrier_at = self._short_at = None
        self._dead_reads = self._dead_writes = False

    def arm_when(self, path: str, arm: Callable[[FaultDevice], None]) -> None:
        """Call ``arm(self)`` when ``path`` appears, ``disarm()`` when it goes (both seen
        at the next I/O), as often as that happens."""
        self._arm_path = path
        self._arm = arm

    @classmethod
    def from_spec(cls, inner: Any, spec: str) -> FaultDevice:
        """A device armed as the specification ``KIND:N[,sticky][,after=PATH]`` says."""
        kind, n, sticky, path = parse_spec(spec)
        dev = cls(inner, sticky=sticky)
        arm = {"read": cls.fail_read, "write": cls.fail_write, "barrier": cls.fail_barrier,
               "short": cls.short_write}[kind]
        if path is None:
            arm(dev, n)
        else:
            dev.arm_when(path, lambda d: arm(d, n))
        return dev

    def _check_arming(self) -> None:
        assert self._arm_path is not None and self._arm is not None
        exists = os.path.exists(self._arm_path)
        if exists and not self._armed:
            self._armed = True
            self._arm(self)
            log.warning("test device fault armed")
        elif not exists and self._armed:
            self._armed = False
            self.disarm()
            log.warning("test device fault disarmed")

    def _fault(self, what: str, lba: int, count: int, *, reading: bool = False
               ) -> DeviceError:
        self.injected += 1
        if self.sticky:
            if reading:
                self._dead_reads = True
            else:
                self._dead_writes = True
        return DeviceError(errno.EIO, f"injected fault: {what} of {count} sectors at lba "
                                      f"{lba} failed", "faultdev")

    # -- the device interface ----------------------------------------------------------------

    def block_info(self) -> Any:
        return self.inner.block_info()

    def alloc_buffer(self, nbytes: int) -> Any:
        return self.inner.alloc_buffer(nbytes)

    def block_read(self, lba: int, count: int, into: Any = None) -> memoryview:
        if self._arm_path is not None:
            self._check_arming()
        self.reads += 1
        if self._dead_reads:
            raise self._fault("read (device dead)", lba, count, reading=True)
        if self.reads == self._read_at:
            raise self._fault("read", lba, count, reading=True)
        return self.inner.block_read(lba, count, into)

    def block_write(self, lba: int, count: int, data: Any, *, durable: bool = False) -> None:
        if self._arm_path is not None:
            self._check_arming()
        self.writes += 1
        if durable:
            self.barriers += 1
        if self._dead_writes or self.writes == self._write_at:
            raise self._fault("write", lba, count)
        if self._short_at is not None and self.writes >= self._short_at and count >= 2:
            self._short_at = None  # the first multi-sector write at or after the n-th
            keep = count // 2
            raw = b"".join(split_sectors(data, self.sector_size)[:keep])
            self.inner.block_write(lba, keep, raw)
            raise self._fault("short write (first half written)", lba, count)
        if durable and self.barriers == self._barrier_at:
            self.inner.block_write(lba, count, data, durable=False)
            raise self._fault("flush after write", lba, count)
        self.inner.block_write(lba, count, data, durable=durable)


def parse_spec(spec: str) -> tuple[str, int, bool, str | None]:
    """``KIND:N[,sticky][,after=PATH]`` -> (kind, n, sticky, path); ValueError if malformed."""
    head, *rest = spec.split(",")
    kind, _, count = head.partition(":")
    if kind not in KINDS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"device fault {spec!r}: expected KIND:N with KIND one of "
                         f"{', '.join(KINDS)} and N >= 1")
    sticky = False
    path = None
    for item in rest:
        if item == "sticky":
            sticky = True
        elif item.startswith("after="):
            path = item[len("after="):]
        else:
            raise ValueError(f"device fault {spec!r}: unknown flag {item!r}")
    return kind, int(count), sticky, path
