"""The request loop's waits (nexfs/fuseloop.py), on a pipe standing in for /dev/fuse: a
request already waiting is taken without a trio scheduler pass, other tasks still run
under a steady stream, and an idle wait ends up in trio (so cancellation works)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import trio

from nexfs import fuseloop


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


async def test_reader_lock_is_free_and_refuses_a_second_holder() -> None:
    lock = fuseloop.FreeLock()
    async with lock:
        with pytest.raises(RuntimeError, match="more than one worker"):
            async with lock:
                pass
    async with lock:  # released again
        pass


def test_proxy_passes_everything_else_through() -> None:
    proxy = fuseloop._Trio()
    assert proxy.open_nursery is trio.open_nursery
    assert proxy.ClosedResourceError is trio.ClosedResourceError
    assert proxy.lowlevel.current_trio_token is trio.lowlevel.current_trio_token
    assert proxy.Lock is fuseloop.FreeLock
