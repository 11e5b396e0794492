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

Reads in flight (nexfs/store/inflight.py): :func:`watch` adds the valve ring's eventfd to
that poll, so a completion is dispatched at once rather than after ``SPIN_MS``;
:func:`await_device` is how a read handler waits for its device transfer while other
workers serve (started like :func:`serve_while`'s helpers); :func:`requests_waiting` tells a
read whether there is anything to serve meanwhile.

A handler that must wait for the kernel to do something the kernel can only finish once the
daemon has answered other requests (dropping cached pages after an O_DIRECT write waits for
pages locked by reads queued behind it: nexfs/fuse/invalidate.py) calls :func:`serve_while`.  The
first time every worker is inside such a wait, it starts one more worker (pyfuse3's own
worker loop) that serves the other requests meanwhile.  Helpers stay until the session ends,
parked on the reader lock: the first worker never yields while it holds the lock or handles a
request, so a helper only gets the lock while the worker that held it waits in
:func:`serve_while`.  With no helper started, the lock never yields.
"""

from __future__ import annotations

import select
import types
from collections.abc import Awaitable, Callable
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
    """pyfuse3's reader lock: taking it when it is free never yields to the scheduler
    (trio's Lock does, once, even then).  It is only ever contended while a helper worker
    of :func:`serve_while` runs; the second taker then waits its turn."""

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            await self._waiters.park()
        self._held = True

    async def __aexit__(self, *exc: object) -> None:
        self._held = False
        self._waiters.unpark()


class _LowLevel(types.ModuleType):
    """``trio.lowlevel`` as pyfuse3 sees it: everything is trio's, except wait_readable."""

    def __init__(self) -> None:
        super().__init__("trio.lowlevel")
        # fd -> (the extra watch it was made with, a poller of fd and that watch's fd)
        self._polls: dict[int, tuple[object, select.poll]] = {}
        self._budget = YIELD_EVERY

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int) -> None:
        global _fuse_poller
        extra = _watched
        if self._budget > 0:
            made = self._polls.get(fd)
            if made is None or made[0] is not extra:
                alone = select.poll()
                alone.register(fd, _READY)
                _fuse_poller = alone
                poller = select.poll()
                poller.register(fd, _READY)
                if extra is not None:
                    poller.register(extra[0], _READY)
                made = self._polls[fd] = (extra, poller)
            fuse = bad = False
            for efd, ev in made[1].poll(SPIN_MS):
                if efd == fd:
                    fuse, bad = True, bool(ev & _BAD)
                elif extra is not None:
                    extra[1]()  # reads in flight completed: wake their handlers
            if fuse and not bad:
                self._budget -= 1
                return
            # Idle, or only completions: wait in trio.  After completions a checkpoint and
            # another poll would not do: trio may run this task again before the woken
            # handlers, and the poll would then hold the loop for SPIN_MS, replies unsent.
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


_watched: tuple[int, Callable[[], object]] | None = None
"""(eventfd, dispatch) that the loop's poll watches next to /dev/fuse (:func:`watch`)."""
_fuse_poller: select.poll | None = None
"""A poller of /dev/fuse alone, for :func:`requests_waiting`."""

_helpers: trio.Nursery | None = None
"""Where :func:`serve_while` starts its helper workers; set while :func:`serve` runs."""
_workers = 1
"""pyfuse3 workers of this session: the first one and the helpers started."""
_waiting = 0
"""Handlers inside :func:`serve_while`, each holding its worker."""
MAX_HELPERS = 16
"""At most this many helper workers per session (each keeps a receive buffer of up to
max_write, 1 MiB).  More are never needed: the kernel has at most 12 background requests
(asynchronous O_DIRECT writes among them) with the daemon at once.  With 4, five writes in
flight already found every worker waiting and timed out by the dozen.  A handler that finds
every worker waiting and no helper left to start waits out its timeout."""
_FOREVER = 1 << 30
"""Every worker's ``min_tasks``: pyfuse3 ends a worker when more than that many others wait
for requests, which never happens.  A helper that ended by itself would make pyfuse3 count one
worker too few and start new ones without bound (it never counts them back)."""


async def serve() -> None:
    """``pyfuse3.main()`` with one worker task and the fast waits described above."""
    global _helpers, _workers
    import pyfuse3

    namespace = vars(pyfuse3)
    real = namespace["trio"]
    namespace["trio"] = _Trio()
    try:
        async with trio.open_nursery() as helpers:
            _helpers, _workers = helpers, 1
            try:
                # max_tasks=0: pyfuse3 never starts workers of its own (the first one is
                # started regardless); the only others are serve_while's helpers.
                # min_tasks=_FOREVER: pyfuse3 would end the first worker, and with it
                # main() and the session, whenever two helpers wait for requests.
                await pyfuse3.main(min_tasks=_FOREVER, max_tasks=0)
            finally:
                _helpers = None
                # The session is over: the helpers, parked on the reader lock or waiting
                # for /dev/fuse, have nothing left to serve.
                helpers.cancel_scope.cancel()
    finally:
        namespace["trio"] = real


def watch(fd: int, dispatch: Callable[[], object] | None = None) -> None:
    """Also watch ``fd`` (the ring's eventfd, nexfs/store/inflight.py) while polling /dev/fuse:
    when it is readable, ``dispatch()`` completes the reads in flight and the wait goes on
    in trio, so that their handlers reply first.  Without this a ring completion would wait for the
    poll's timeout.  ``watch(-1)`` stops."""
    global _watched
    _watched = (fd, dispatch) if fd >= 0 and dispatch is not None else None


def requests_waiting() -> bool:
    """Whether the kernel has a request queued that no worker is reading (a zero-timeout
    poll of /dev/fuse: about a microsecond).  False outside :func:`serve`."""
    fuse = _fuse_poller
    return fuse is not None and bool(fuse.poll(0))


def _start_helper_if_needed() -> None:
    """Every worker is inside a wait that needs others to serve: start one more."""
    global _workers
    if _helpers is not None and _waiting >= _workers and _workers <= MAX_HELPERS:
        import pyfuse3

        # pyfuse3's worker loop is not in its typed interface; every 3.x release has it.
        worker = getattr(pyfuse3, "_session_loop", None)
        if worker is not None:
            _workers += 1
            _helpers.start_soon(worker, _helpers, _FOREVER, 0,
                                name=f"nexfs-helper-{_workers - 1}")


async def await_device(wait: Callable[[], Awaitable[object]]) -> None:
    """Await ``wait()`` (a device transfer in flight) from a request handler while other
    workers serve the next requests (started as :func:`serve_while` starts them)."""
    global _waiting
    _waiting += 1
    try:
        _start_helper_if_needed()
        await wait()
    finally:
        _waiting -= 1


async def serve_while(fn: Callable[[], object], timeout: float) -> bool:
    """Run the blocking ``fn`` on a thread while another worker serves requests; True if
    it finished within ``timeout`` seconds (else it is left to finish on its own).

    Called from a request handler: the handler's own worker is busy with it, so if ``fn``
    needs the daemon to answer other requests, some other worker must be free to.  When
    every worker is already waiting here, a new helper is started (pyfuse3's worker loop,
    never to end before the session, never to start workers itself), up to
    :data:`MAX_HELPERS`.  Outside
    :func:`serve` (unit tests) there are no helpers and only the timeout bounds the wait."""
    global _waiting
    _waiting += 1
    try:
        _start_helper_if_needed()
        with trio.move_on_after(timeout):
            await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
            return True
        return False
    finally:
        _waiting -= 1
