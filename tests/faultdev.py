"""A device wrapper that injects I/O errors, with the valve's capability interface.

:class:`FaultDevice` wraps anything with ``block_info / block_read / block_write(durable=) /
alloc_buffer`` (a valve capability or a tests/memdev.py device) and passes every call
through, except the ones it was armed to fail:

* ``fail_read(n)``: the n-th read from now raises EIO (nothing read);
* ``fail_write(n)``: the n-th write from now raises EIO (nothing written);
* ``fail_barrier(n)``: the n-th *durable* write from now is written but its flush fails: it
  reaches the device without the durability promise, then EIO (like fdatasync failing);
* ``short_write(n)``: the first write of two or more sectors at or after the n-th from now
  writes only its first half, then raises EIO (a partial write);
* ``sticky=True``: after the first injected failure every later write fails too (a dead
  device) — otherwise the fault is transient and later I/O succeeds.

Errors are :class:`valve.DeviceError` (an ``OSError`` with errno EIO), exactly what a real
valve raises for a failed transfer.  ``reads``, ``writes`` and ``barriers`` count calls, so a
dry run tells how many faults a workload can be given.
"""

from __future__ import annotations

import errno
from typing import Any

from memdev import split_sectors

from valve import DeviceError


class FaultDevice:
    """Pass-through device with armed faults (see the module docstring)."""

    def __init__(self, inner: Any, *, sticky: bool = False) -> None:
        self.inner = inner
        self.sticky = sticky
        self.sector_size = inner.block_info().sector_size
        self.reads = self.writes = self.barriers = 0
        self.injected = 0  # faults raised so far
        self._dead = False
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
        self._dead = False

    def _fault(self, what: str, lba: int, count: int) -> DeviceError:
        self.injected += 1
        if self.sticky:
            self._dead = True
        return DeviceError(errno.EIO, f"injected fault: {what} of {count} sectors at lba "
                                      f"{lba} failed", "faultdev")

    # -- the device interface ----------------------------------------------------------------

    def block_info(self) -> Any:
        return self.inner.block_info()

    def alloc_buffer(self, nbytes: int) -> Any:
        return self.inner.alloc_buffer(nbytes)

    def block_read(self, lba: int, count: int, into: Any = None) -> memoryview:
        self.reads += 1
        if self.reads == self._read_at:
            raise self._fault("read", lba, count)
        return self.inner.block_read(lba, count, into)

    def block_write(self, lba: int, count: int, data: Any, *, durable: bool = False) -> None:
        self.writes += 1
        if durable:
            self.barriers += 1
        if self._dead or self.writes == self._write_at:
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
