"""The request loop's waits (nexfs/fuse/loop.py), on a pipe standing in for /dev/fuse: a
request already waiting is taken without a trio scheduler pass, other tasks still run
under a steady stream, and an idle wait ends up in trio (so cancellation works)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from nexfs.fuse import loop as fuseloop


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


async def test_waiting_request_is_taken_without_a_scheduler_pass(
        pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = pipe
    low = fuseloop._Trio().lowlevel
    os.write(w, b"x")
    through_trio: list[int] = []
    real_wait = trio.lowlevel.wait_readable

    async def counting_wait(fd: int) -> None:
        through_trio.append(fd)
        await real_wait(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting_wait)
    ran: list[int] = []

    async def other() -> None:
        ran.append(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(fuseloop.YIELD_EVERY):
            await low.wait_readable(r)
        # No pass through trio's scheduler so far: the other task has not run.
        assert ran == [] and through_trio == []
        await low.wait_readable(r)  # the next wait goes through trio, which runs the others
        assert through_trio == [r]
    assert ran == [1]


async def test_idle_wait_goes_to_trio_and_can_be_cancelled(pipe: tuple[int, int]) -> None:
    r, w = pipe
    low = fuseloop._Trio().lowlevel
    with trio.move_on_after(0.2) as scope:
        await low.wait_readable(r)  # nothing arrives: must sleep in trio, not spin
    assert scope.cancelled_caught

    async def later() -> None:
        await trio.sleep(0.05)
        os.write(w, b"x")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        with trio.fail_after(5):
            await low.wait_readable(r)


async def test_reader_lock_is_taken_without_a_scheduler_pass() -> None:
    lock = fuseloop.FreeLock()
    ran: list[int] = []

    async def other() -> None:
        ran.append(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(3):
            async with lock:
                pass
        assert ran == []  # a free lock never yields


async def test_reader_lock_makes_a_second_worker_wait_its_turn() -> None:
    """Only serve_while's helper ever contends: it must wait, not fail."""
    lock = fuseloop.FreeLock()
    order: list[str] = []

    async def helper() -> None:
        async with lock:
            order.append("helper")

    async with trio.open_nursery() as nursery, lock:
        nursery.start_soon(helper)
        await trio.testing.wait_all_tasks_blocked()
        order.append("first")  # the helper is parked, not holding the lock
    assert order == ["first", "helper"]


async def test_serve_while_bounds_the_wait() -> None:
    """Outside serve() there is no helper: a call that finishes is waited for, one that
    blocks is left to its thread once the timeout has passed."""
    assert await fuseloop.serve_while(lambda: None, 5.0)
    release = threading.Event()
    try:
        start = time.monotonic()
        assert not await fuseloop.serve_while(release.wait, 0.1)
        assert time.monotonic() - start < 5
    finally:
        release.set()


def test_proxy_passes_everything_else_through() -> None:
    proxy = fuseloop._Trio()
    assert proxy.open_nursery is trio.open_nursery
    assert proxy.ClosedResourceError is trio.ClosedResourceError
    assert proxy.lowlevel.current_trio_token is trio.lowlevel.current_trio_token
    assert proxy.Lock is fuseloop.FreeLock
