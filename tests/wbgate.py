"""Holding the write-behind thread between its writes, to explore how it interleaves.

:class:`WorkerGate` wraps a device (a tests/memdev.py device or a valve capability) and the
``WriteBehind`` of a store.  Device writes issued by the write-behind thread wait at the gate
for a credit; every other I/O passes straight through.  Credits come from two places:

* :meth:`WorkerGate.step` — the explorer's choice: let the worker finish exactly one more
  write (and its bookkeeping), then return with the worker parked again;
* the request side blocking on the write-behind's condition (a read waiting for an in-flight
  write, a buffer waiting to be free, a commit draining the queue): each such wait hands out
  one credit, so nothing deadlocks and the worker advances only as far as it must.

So the worker's progress relative to the request side is decided by the test, not by the
scheduler, and a seed replays the same interleaving.  :meth:`preempt` goes further: a
``sys.settrace`` hook on the request thread that, at chosen lines of the write-behind's
request-side code (and only where the request side does not hold the lock), lets the worker
finish a write — the points where an unlocked check could see the worker's lists change.

Faults: ``fail_at`` holds the 1-based indexes of the write-behind writes that fail with EIO
(nothing written), ``short_at`` those that write their first half and then fail; with
``sticky`` every later write-behind write fails too.  ``fail_any_at`` counts every device
write instead (metadata, journal, data cache flushes, from either thread).
``worker_writes`` and ``writes`` count what was seen, so a fault-free dry run tells how many
indexes a workload has.
"""

from __future__ import annotations

import errno
import os
import random
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import FrameType
from typing import Any

from memdev import split_sectors

import nexfs.store.writebehind as writebehind_module
from nexfs.store.writebehind import WriteBehind
from valve import DeviceError

_WB_FILE = os.path.normcase(writebehind_module.__file__)


class _HookedCondition(threading.Condition):
    """The write-behind's condition, telling the gate who waits on it."""

    def __init__(self, gate: WorkerGate) -> None:
        super().__init__()
        self._gate = gate

    def wait(self, timeout: float | None = None) -> bool:
        gate = self._gate
        if threading.current_thread() is gate.worker_thread():
            gate._parked("idle")
            try:
                return super().wait(timeout)
            finally:
                gate._parked(None)
        gate._credit()  # the request side blocks: the worker must make progress
        return super().wait(timeout)

    def notify_all(self) -> None:
        gate = self._gate
        if threading.current_thread() is not gate.worker_thread():
            gate._woken()  # new work queued: an idle worker is about to run
        super().notify_all()

    def held_here(self) -> bool:
        return self._is_owned()  # type: ignore[attr-defined]


class WorkerGate:
    """Device wrapper and scheduler for the write-behind thread (see the module docstring)."""

    def __init__(self, inner: Any, *, fail_at: set[int] | frozenset[int] = frozenset(),
                 short_at: set[int] | frozenset[int] = frozenset(),
                 fail_any_at: set[int] | frozenset[int] = frozenset(),
                 sticky: bool = False, free: bool = False) -> None:
        self.inner = inner
        self.sector_size = int(inner.block_info().sector_size)
        self.fail_at = set(fail_at)
        self.short_at = set(short_at)
        self.sticky = sticky
        self.free = free  # never hold the worker: plain concurrency
        self.fail_any_at = set(fail_any_at)
        self.worker_writes = 0
        self.writes = 0
        self.injected = 0
        self.steps = 0
        self._dead = False
        self._gc = threading.Condition()
        self._credits = 0
        self._where: str | None = "idle"  # "gate", "idle" or None (running)
        self._cond: _HookedCondition | None = None
        self._wb: WriteBehind | None = None

    def install(self, wb: WriteBehind) -> None:
        """Take over ``wb``'s condition (before its first write is queued)."""
        assert not wb.busy()
        self._wb = wb
        self.writes = 0  # counted from here: the volume is open
        self._cond = _HookedCondition(self)
        wb._cond = self._cond

    def worker_thread(self) -> threading.Thread | None:
        return None if self._wb is None else self._wb._thread

    # -- scheduling --------------------------------------------------------------------------

    def _parked(self, where: str | None) -> None:
        with self._gc:
            self._where = where
            if where == "idle":
                self._credits = 0  # nothing queued: a credit left over would be stale
            self._gc.notify_all()

    def _woken(self) -> None:
        with self._gc:
            if self._where == "idle":
                self._where = None

    def _credit(self) -> None:
        with self._gc:
            self._credits += 1
            self._gc.notify_all()

    def step(self) -> bool:
        """Let the worker finish one write, if one is waiting at the gate; returns whether
        one did."""
        with self._gc:
            while self._where is None:  # running: wait until it parks at the gate or idles
                self._gc.wait()
            if self._where != "gate":
                return False
            self._credits += 1
            self.steps += 1
            self._gc.notify_all()
            # Done when it parks again: at the gate with every credit used (a waiting
            # request on another thread may have added one), or idle.
            while self._where is None or (self._where == "gate" and self._credits):
                self._gc.wait()
        return True

    def steps_until_idle(self) -> None:
        while self.step():
            pass

    @contextmanager
    def preempt(self, when: Callable[[FrameType], bool]) -> Iterator[None]:
        """While inside, each line the request thread runs in the write-behind's code for
        which ``when(frame)`` is true is a point where the worker finishes one write (only
        where the request side does not hold the write-behind's lock: there the worker
        could not finish)."""
        cond = self._cond
        assert cond is not None

        def local(frame: FrameType, event: str, arg: object) -> Any:
            if event == "line" and not cond.held_here() and when(frame):
                self.step()
            return local

        def tracer(frame: FrameType, event: str, arg: object) -> Callable[..., Any] | None:
            if event == "call" and os.path.normcase(frame.f_code.co_filename) == _WB_FILE:
                return local
            return None

        old = sys.gettrace()
        sys.settrace(tracer)
        try:
            yield
        finally:
            sys.settrace(old)

    def at_random(self, rng: random.Random, chance: float) -> AbstractContextManager[None]:
        """:meth:`preempt` at each line with probability ``chance``."""
        return self.preempt(lambda frame: rng.random() < chance)

    # -- the device interface ----------------------------------------------------------------

    def block_info(self) -> Any:
        return self.inner.block_info()

    def alloc_buffer(self, nbytes: int) -> Any:
        return self.inner.alloc_buffer(nbytes)

    def block_read(self, lba: int, count: int, into: Any = None) -> memoryview:
        return memoryview(self.inner.block_read(lba, count, into))

    def block_write(self, lba: int, count: int, data: Any, *, durable: bool = False) -> None:
        self.writes += 1  # every write, on either thread
        if self.writes in self.fail_any_at and self._wb is not None:
            raise self._fault("device write", lba, count)
        if threading.current_thread() is not self.worker_thread():
            self.inner.block_write(lba, count, data, durable=durable)
            return
        if not self.free:
            with self._gc:
                self._where = "gate"
                self._gc.notify_all()
                while not self._credits:
                    self._gc.wait()
                self._credits -= 1
                self._where = None
                self._gc.notify_all()
        self.worker_writes += 1
        n = self.worker_writes
        if self._dead or n in self.fail_at:
            raise self._fault("write-behind write", lba, count)
        if n in self.short_at and count >= 2:
            keep = count // 2
            raw = b"".join(split_sectors(data, self.sector_size)[:keep])
            buf = self.inner.alloc_buffer(len(raw))
            memoryview(buf).cast("B")[:] = raw
            self.inner.block_write(lba, keep, buf)
            raise self._fault("write-behind short write (first half written)", lba, count)
        self.inner.block_write(lba, count, data, durable=durable)

    def _fault(self, what: str, lba: int, count: int) -> DeviceError:
        self.injected += 1
        if self.sticky:
            self._dead = True
        return DeviceError(errno.EIO, f"injected fault: {what} of {count} sectors at lba "
                                      f"{lba} failed", "wbgate")
