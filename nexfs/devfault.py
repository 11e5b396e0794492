"""Test-only device fault injection for real mounts (``NEXFS_TEST_DEVICE_FAULT``).

The real-mount tests need a device that fails on cue, seen through the kernel mount.  Where
device-mapper is available a ``dm-error``/``dm-flakey`` table would do; in containers it is
not, so ``mount.nexfs`` wraps the valve capability in :class:`FaultyDevice` when the variable
is set in its environment.  Nothing else reads it, and the daemon logs a warning at start-up
when it is active.

Syntax: ``KIND:N[,sticky][,after=PATH]``

* ``read:N`` — the N-th read fails with EIO (nothing read);
* ``write:N`` — the N-th write fails with EIO (nothing written);
* ``barrier:N`` — the N-th durable write reaches the device without its flush, then EIO (as
  fdatasync failing after the data went out);
* ``short:N`` — the first write of two or more sectors at or after the N-th writes only its
  first half, then EIO (a partial write);
* ``sticky`` — after the first injected fault every later I/O of the same direction fails
  too (writes for a dead disk; reads for an unreadable one);
* ``after=PATH`` — the fault is armed only while PATH exists (checked before each I/O), and
  counting starts when it appears: a test prepares its data, then arms the fault by
  creating the file, and may disarm it (ending a sticky fault) by removing it.

The same faults as ``tests/faultdev.py`` (which the in-process tests use), raised as the
valve's own :class:`valve.DeviceError`.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

from valve import DeviceError

log = logging.getLogger(__name__)

DEVICE_FAULT_ENV = "NEXFS_TEST_DEVICE_FAULT"
KINDS = ("read", "write", "barrier", "short")


class FaultyDevice:
    """A capability wrapper that fails one I/O as ``spec`` says (see the module docstring).

    It holds the capability privately and passes every other call through unchanged."""

    def __init__(self, inner: Any, spec: str) -> None:
        kind, n, self.sticky, self.arm_path = parse_spec(spec)
        self.kind = kind
        self.n = n
        self._inner = inner
        self._ss = int(inner.block_info().sector_size)
        self._armed = False  # (only consulted with after=PATH)
        self._count = 0  # reads, writes or barriers (by kind) since arming
        self._fired = False
        self._dead = False

    def _active(self) -> bool:
        """Whether the fault is armed; without ``after=`` always.  Removing the file again
        disarms it and resets the count (a test can end a sticky fault)."""
        if self.arm_path is None:
            return True
        exists = os.path.exists(self.arm_path)
        if exists and not self._armed:
            self._armed = True
            log.warning("test device fault armed: %s %d from now", self.kind, self.n)
        elif not exists and self._armed:
            self._armed = self._fired = self._dead = False
            self._count = 0
            log.warning("test device fault disarmed")
        return self._armed

    def _fault(self, what: str, lba: int, count: int) -> DeviceError:
        self._fired = True
        if self.sticky:
            self._dead = True
        return DeviceError(errno.EIO, f"injected device fault ({DEVICE_FAULT_ENV}): {what} "
                                      f"of {count} sectors at lba {lba} failed", "devfault")

    def block_info(self) -> Any:
        return self._inner.block_info()

    def alloc_buffer(self, nbytes: int) -> Any:
        return self._inner.alloc_buffer(nbytes)

    def block_read(self, lba: int, count: int, into: Any = None) -> memoryview:
        if self.kind == "read" and self._active():
            if self._dead:
                raise self._fault("read (device dead)", lba, count)
            if not self._fired:
                self._count += 1
                if self._count == self.n:
                    raise self._fault("read", lba, count)
        return memoryview(self._inner.block_read(lba, count, into))

    def block_write(self, lba: int, count: int, data: Any, *, durable: bool = False) -> None:
        if self.kind == "read" or not self._active():
            self._inner.block_write(lba, count, data, durable=durable)
            return
        if self._dead:
            raise self._fault("write (device dead)", lba, count)
        if self._fired:
            self._inner.block_write(lba, count, data, durable=durable)
            return
        if self.kind != "barrier" or durable:
            self._count += 1
        if self.kind == "write" and self._count == self.n:
            raise self._fault("write", lba, count)
        if self.kind == "short" and self._count >= self.n and count >= 2:
            keep = count // 2
            self._inner.block_write(lba, keep, _flatten(data)[: keep * self._ss])
            raise self._fault("short write (first half written)", lba, count)
        if self.kind == "barrier" and durable and self._count == self.n:
            self._inner.block_write(lba, count, data, durable=False)
            raise self._fault("flush after write", lba, count)
        self._inner.block_write(lba, count, data, durable=durable)


def _flatten(data: Any) -> bytes:
    if isinstance(data, list | tuple):
        return b"".join(bytes(memoryview(d).cast("B")) for d in data)
    return bytes(memoryview(data).cast("B"))


def parse_spec(spec: str) -> tuple[str, int, bool, str | None]:
    """``KIND:N[,sticky][,after=PATH]`` -> (kind, n, sticky, path); ValueError if malformed."""
    head, *rest = spec.split(",")
    kind, _, count = head.partition(":")
    if kind not in KINDS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{DEVICE_FAULT_ENV}={spec!r}: expected KIND:N with KIND one of "
                         f"{', '.join(KINDS)} and N >= 1")
    sticky = False
    path = None
    for item in rest:
        if item == "sticky":
            sticky = True
        elif item.startswith("after="):
            path = item[len("after="):]
        else:
            raise ValueError(f"{DEVICE_FAULT_ENV}={spec!r}: unknown flag {item!r}")
    return kind, int(count), sticky, path


def wrap(cap: Any, spec: str | None, read_only: bool = False) -> Any:
    """``cap`` wrapped as ``spec`` says, or ``cap`` itself when no fault is asked for."""
    if not spec:
        return cap
    if read_only and parse_spec(spec)[0] != "read":
        return cap  # nothing is written through a read-only capability
    log.warning("test device fault injection active: %s=%s", DEVICE_FAULT_ENV, spec)
    return FaultyDevice(cap, spec)

