"""The request loop's poll also watches the valve ring's eventfd (nexfs/fuse/loop.py,
``watch``): a read completion wakes its handler at once, never after the poll's timeout.

A pipe stands in for /dev/fuse and an eventfd for the ring.  A "handler" task waits for the
event that ``dispatch`` sets, and its reply is what makes the pipe readable, as a FUSE reply
makes fio send its next request.  With ``SPIN_MS`` raised to 2 s, a loop that polled again
before the woken handler ran (the defect this guards against: trio may run the polling task
first in a batch) would take seconds per round; the rounds must take milliseconds.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator

import pytest
import trio

from nexfs.fuse import loop as fuseloop

ROUNDS = 40


@pytest.fixture
def fds() -> Iterator[tuple[int, int, int]]:
    r, w = os.pipe()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        yield r, w, efd
    finally:
        fuseloop.watch(-1)
        for fd in (r, w, efd):
            os.close(fd)


async def test_a_completion_is_served_without_waiting_for_the_poll_timeout(
        fds: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    r, w, efd = fds
    monkeypatch.setattr(fuseloop, "SPIN_MS", 2000)
    low = fuseloop._Trio().lowlevel
    done = trio.Event()
    dispatched = []

    def dispatch() -> None:
        dispatched.append(os.eventfd_read(efd))
        done.set()

    fuseloop.watch(efd, dispatch)

    async def handler() -> None:
        await done.wait()
        os.write(w, b"reply")  # the reply, and with it the next request

    for _ in range(ROUNDS):
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handler)
            await trio.lowlevel.checkpoint()  # the handler is waiting now
            os.eventfd_write(efd, 1)  # the device read completed
            t0 = time.monotonic()
            await low.wait_readable(r)
            took = time.monotonic() - t0
            assert took < 1.0, f"a round took {took:.2f} s: the poll held the loop"
        os.read(r, 16)
    assert len(dispatched) == ROUNDS


async def test_requests_waiting_is_a_zero_timeout_poll(fds: tuple[int, int, int]) -> None:
    r, w, _ = fds
    low = fuseloop._Trio().lowlevel
    os.write(w, b"x")
    await low.wait_readable(r)  # makes the loop's own poller of this fd
    assert fuseloop.requests_waiting()
    os.read(r, 1)
    t0 = time.monotonic()
    assert not fuseloop.requests_waiting()
    assert time.monotonic() - t0 < 0.5
    assert select.POLLIN  # the constant the loop polls for
