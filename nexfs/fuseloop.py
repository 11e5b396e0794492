"""Running pyfuse3's request loop with fewer trips through trio's scheduler.

pyfuse3's session loop, per request: takes a ``trio.Lock`` (whose uncontended acquire still
yields to the scheduler once), waits in ``trio.lowlevel.wait_readable`` for ``/dev/fuse``
(an epoll registration, a scheduler pass and an ``epoll_wait``), reads the request and runs
the handler.  Profiling a 4 KiB random read through the mount put a third of the daemon's
time there (docs/BENCHMARKS.md).  NexFS's handlers never await anything, so one worker task
serves every request and concurrency buys nothing.

:func:`serve` runs ``pyfuse3.main`` with one worker, and gives pyfuse3 (and only pyfuse3: it
swaps the module's own ``trio`` name for a proxy) a reader lock that never yields and a
``wait_readable`` that first asks ``poll(2)`` whether a request is already waiting, or arrives
within :data:`SPIN_MS`.  When a request is there it returns without a scheduler pass.  So
that the commit timer and the signal watcher still run under a steady stream of requests,
every :data:`YIELD_EVERY`-th wait goes through trio's own ``wait_readable``; an idle mount
also waits in trio (after at most ``SPIN_MS`` in ``poll``), so it sleeps in ``epoll_wait``
like any trio program.
"""

from __future__ import annotations

import select
import types
from typing import Any

import trio

SPIN_MS = 1
"""How long (ms) the loop waits in poll(2) for the next request before handing the wait to
trio.  At queue depth 1 the next request follows the reply within microseconds."""

YIELD_EVERY = 32
"""Requests served back to back before the loop lets trio's other tasks run."""

_READY = select.POLLIN
_BAD = select.POLLERR | select.POLLHUP | select.POLLNVAL


class FreeLock:
    """pyfuse3's reader lock, for a loop with exactly one worker task: taking it never
    yields to the scheduler (trio's Lock does, once, even when it is free).  A second
    holder would mean pyfuse3 started another worker, which :func:`serve` rules out."""

    def __init__(self) -> None:
        self._held = False

    async def __aenter__(self) -> None:
        if self._held:
            raise RuntimeError("pyfuse3 reader lock taken twice: more than one worker task")
        self._held = True

    async def __aexit__(self, *exc: object) -> None:
        self._held = False


class _LowLevel(types.ModuleType):
    """``trio.lowlevel`` as pyfuse3 sees it: everything is trio's, except wait_readable."""

    def __init__(self) -> None:
        super().__init__("trio.lowlevel")
        self._polls: dict[int, select.poll] = {}
        self._budget = YIELD_EVERY

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int) -> None:
        if self._budget > 0:
            poller = self._polls.get(fd)
            if poller is None:
                poller = self._polls[fd] = select.poll()
                poller.register(fd, _READY)
            events = poller.poll(SPIN_MS)
            if events and not events[0][1] & _BAD:
                self._budget -= 1
                return
        self._budget = YIELD_EVERY
        await trio.lowlevel.wait_readable(fd)


class _Trio(types.ModuleType):
    """The ``trio`` module as pyfuse3 sees it."""

    def __init__(self) -> None:
        super().__init__("trio")
        self.lowlevel = _LowLevel()
        self.Lock = FreeLock

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


async def serve() -> None:
    """``pyfuse3.main()`` with one worker task and the fast waits described above."""
    import pyfuse3

    namespace = vars(pyfuse3)
    real = namespace["trio"]
    namespace["trio"] = _Trio()
    try:
        await pyfuse3.main(min_tasks=1, max_tasks=1)
    finally:
        namespace["trio"] = real
