"""Asynchronous transfers through the valve (``Valve.ring``, ``block_read/write(ring=)``).

Both engines (io_uring and the C thread pool) on real image files.  What must hold:

* a request on a ring is checked when it is made, exactly like the blocking form
  (rights, window, liveness, arguments), and a refused request starts nothing;
* data round trips, and an explorer keeps many requests in flight at once on disjoint
  ranges, mixed with blocking transfers, and checks every read against a model and the
  valve's counters against the requests made;
* memory handed to a request stays alive until it is reaped (references dropped and
  collected meanwhile);
* errors travel as errno (a short read is EIO, never zeros); ``Valve.close`` waits for
  what is in flight; a trio task can wait for completions on the eventfd.
"""

from __future__ import annotations

import errno
import gc
import os
import random
from pathlib import Path

import pytest
import trio
from valve_fixtures import MiB, image_fixture, pattern, valve_fixture

from valve import (
    AlignedBuffer,
    Capability,
    CapabilityError,
    Completion,
    DeviceError,
    RangeError,
    Rights,
    Ring,
    Valve,
)
from valve.interface import Buffer

RW = Rights.READ | Rights.WRITE
ENGINES = ("io_uring", "pool")
EXPLORER_SEEDS = 200 if os.environ.get("NEXFS_LONG") else 24

img = image_fixture("ring.img", 8 * MiB)
valve = valve_fixture()


@pytest.fixture(params=ENGINES)
def ring(request: pytest.FixtureRequest, valve: Valve) -> Ring:
    r = valve.ring(16, engine=request.param, threads=3)
    assert r.engine == request.param
    return r


@pytest.fixture
def cap(valve: Valve) -> Capability:
    return valve.grant(RW)


def one(ring: Ring) -> Completion:
    done = ring.reap(wait=1)
    assert len(done) == 1
    return done[0]


def test_round_trip_every_buffer_kind(cap: Capability, ring: Ring, valve: Valve) -> None:
    ss = cap.block_info().sector_size
    data = pattern(1, 8 * ss)
    aligned = cap.alloc_buffer(8 * ss)
    memoryview(aligned)[:] = data
    tag = cap.block_write(8, 8, aligned, ring=ring, durable=True)
    assert ring.in_flight == 1
    c = one(ring)
    assert (c.tag, c.error, c.data) == (tag, None, None)
    assert valve.stats.barriers == 1
    # bytes and a list of pieces (bounced), written in flight together
    t1 = cap.block_write(16, 8, data, ring=ring)
    t2 = cap.block_write(24, 8, [data[:100], b"", data[100:]], ring=ring)
    assert {c.tag for c in ring.reap(wait=2)} == {t1, t2}
    # reads: fresh memory, an AlignedBuffer, a bytearray (bounced), a larger buffer
    into = cap.alloc_buffer(16 * ss)
    big = bytearray(9 * ss)
    tags = {
        cap.block_read(8, 8, ring=ring): 8,
        cap.block_read(16, 8, into, ring=ring): 16,
        cap.block_read(24, 8, big, ring=ring): 24,
    }
    got = ring.reap(wait=3)
    assert len(got) == 3 and ring.in_flight == 0
    for c in got:
        assert c.error is None and c.data is not None
        assert bytes(c.data) == data, tags[c.tag]
    assert bytes(big[: 8 * ss]) == data
    stats = valve.stats
    assert (stats.reads, stats.writes, stats.sectors_read, stats.sectors_written) == (
        3, 3, 24, 24,
    )
    assert stats.bounce_copies == 1 + 2 + 1  # bytes, two non-empty pieces, the bytearray


def test_checked_at_submit_and_refusal_starts_nothing(
    cap: Capability, ring: Ring, valve: Valve, tmp_path: Path
) -> None:
    ss = cap.block_info().sector_size
    buf = cap.alloc_buffer(8 * ss)
    ro = cap.restrict(Rights.READ, (0, 64))
    window = cap.restrict(RW, (64, 128))
    dead = cap.restrict(RW)
    dead.revoke()
    before = valve.stats.denials
    with pytest.raises(CapabilityError):
        ro.block_write(0, 8, buf, ring=ring)  # no WRITE
    with pytest.raises(CapabilityError):
        window.block_read(0, 8, buf, ring=ring)  # outside the window
    with pytest.raises(CapabilityError):
        dead.block_read(64, 8, buf, ring=ring)  # revoked
    total = cap.block_info().total_sectors
    with pytest.raises(RangeError):
        cap.block_read(total - 4, 8, buf, ring=ring)  # past the end: an argument error
    with pytest.raises(RangeError):
        cap.block_write(0, 8, b"short", ring=ring)
    with pytest.raises(TypeError):
        cap.block_read(0, 8, bytes(8 * ss), ring=ring)  # read-only into=
    make_image(tmp_path / "other.img")
    with Valve.open(tmp_path / "other.img") as other:
        foreign = other.ring(2)
        with pytest.raises(CapabilityError):
            cap.block_read(0, 8, buf, ring=foreign)  # a ring of another valve
    assert valve.stats.denials == before + 4
    assert ring.in_flight == 0
    assert ring.reap() == []
    assert valve.stats.reads == valve.stats.writes == 0


def make_image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(MiB)
    return path


def test_full_ring_refuses_before_starting(cap: Capability, valve: Valve) -> None:
    ring = valve.ring(2)
    cap.block_read(0, 8, ring=ring)
    cap.block_read(8, 8, ring=ring)
    with pytest.raises(DeviceError) as exc:
        cap.block_read(16, 8, ring=ring)
    assert exc.value.errno == errno.EAGAIN
    assert len(ring.reap(wait=2)) == 2
    assert valve.stats.reads == 2


def test_revoked_after_submit_completes(cap: Capability, ring: Ring) -> None:
    child = cap.restrict(RW)
    ss = cap.block_info().sector_size
    tag = child.block_write(0, 8, pattern(2, 8 * ss), ring=ring)
    child.revoke()
    c = one(ring)
    assert (c.tag, c.error) == (tag, None)
    assert bytes(cap.block_read(0, 8)) == pattern(2, 8 * ss)


def test_memory_stays_alive_until_reaped(cap: Capability, ring: Ring) -> None:
    """Dropping every reference to a request's buffer must not free it under the kernel."""
    ss = cap.block_info().sector_size
    for i in range(8):
        cap.block_write(i * 64, 64, pattern(10 + i, 64 * ss), ring=ring)
    ring.reap(wait=8)
    for i in range(8):
        cap.block_read(i * 64, 64, bytearray(64 * ss), ring=ring)  # bounced, dropped
        cap.block_read(i * 64, 64, cap.alloc_buffer(64 * ss), ring=ring)  # direct, dropped
    gc.collect()
    junk = [bytearray(os.urandom(64 * ss)) for _ in range(32)]  # reuse freed memory
    got = ring.reap(wait=16)
    assert len(got) == 16
    assert sorted(bytes(c.data or b"")[:16] for c in got) == sorted(
        pattern(10 + i, 64 * ss)[:16] for i in range(8) for _ in range(2)
    )
    del junk


def test_short_read_is_eio_not_zeros(cap: Capability, ring: Ring, img: Path) -> None:
    total, ss = cap.block_info().total_sectors, cap.block_info().sector_size
    os.truncate(img, (total - 4) * ss)
    tag = cap.block_read(total - 8, 8, ring=ring)
    c = one(ring)
    assert c.tag == tag and c.data is None
    assert isinstance(c.error, DeviceError) and c.error.errno == errno.EIO


def test_close_waits_for_requests_in_flight(img: Path) -> None:
    for engine in ENGINES:
        v = Valve.open(img)
        cap = v.grant(RW)
        ring = v.ring(32, engine=engine)
        ss = cap.block_info().sector_size
        for i in range(32):
            cap.block_write(i * 8, 8, pattern(i, 8 * ss), ring=ring, durable=i % 8 == 0)
        v.close()  # must wait for the 32 writes, then close the descriptor
        assert ring.closed
        with pytest.raises(CapabilityError):
            ring.reap()
        with Valve.open(img) as again:
            c = again.grant(Rights.READ)
            for i in range(32):
                assert bytes(c.block_read(i * 8, 8)) == pattern(i, 8 * ss)


def test_trio_waits_on_the_eventfd(cap: Capability, ring: Ring) -> None:
    """The loop keeps running while reads are in flight and wakes on their completion."""
    ss = cap.block_info().sector_size
    for i in range(4):
        cap.block_write(i * 8, 8, pattern(20 + i, 8 * ss))
    ticks = 0

    async def main() -> list[bytes]:
        nonlocal ticks
        tags = [cap.block_read(i * 8, 8, ring=ring) for i in range(4)]
        got: dict[int, bytes] = {}
        while len(got) < 4:
            await trio.lowlevel.wait_readable(ring.fileno())
            ticks += 1
            for c in ring.reap():
                assert c.error is None and c.data is not None
                got[c.tag] = bytes(c.data)
        return [got[t] for t in tags]

    assert trio.run(main) == [pattern(20 + i, 8 * ss) for i in range(4)]
    assert 1 <= ticks <= 4


@pytest.mark.parametrize("seed", range(EXPLORER_SEEDS))
def test_explorer_many_in_flight_against_a_model(seed: int, img: Path) -> None:
    """Random mixes of ring and blocking transfers over disjoint ranges, checked by a model."""
    with Valve.open(img) as v:
        explore(v, seed, ENGINES[seed % 2])


def explore(v: Valve, seed: int, engine: str) -> None:
    """The explorer's body, on an open valve of at least 512 sectors (also run over an NBD
    export: tests/test_valve_ring_nbd.py).

    Up to ``depth`` requests are in flight at once; a range is never touched by two
    transfers in flight together (the valve does not order overlapping ones: that is
    the caller's job), and every completed read must equal the model at submit time.
    The valve's counters must count exactly the requests made.
    """
    rnd = random.Random(seed)
    sectors = 512
    reads = writes = sread = swritten = 0
    before = v.stats
    cap = v.grant(RW)
    ss = cap.block_info().sector_size
    model = bytearray(sectors * ss)
    ring = v.ring(rnd.choice((1, 4, 16)), engine=engine, threads=rnd.randint(1, 4))
    busy: dict[int, tuple[int, int, bytes | None]] = {}  # tag -> (lba, n, expect)

    def overlaps(lba: int, n: int) -> bool:
        return any(lba < b + m and b < lba + n for b, m, _ in busy.values())

    def settle(done: list[Completion]) -> None:
        for c in done:
            lba, n, expect = busy.pop(c.tag)
            assert c.error is None, c.error
            if expect is not None:
                assert c.data is not None and bytes(c.data) == expect, (seed, lba, n)

    for _ in range(120):
        lba = rnd.randrange(sectors - 8)
        n = rnd.randint(1, min(64, sectors - lba))
        if overlaps(lba, n) or ring.in_flight == ring.depth:
            settle(ring.reap(wait=rnd.randint(1, max(1, ring.in_flight))))
            continue
        op = rnd.random()
        if op < 0.4:
            data = rnd.randbytes(n * ss)
            buf: Buffer = data
            if rnd.random() < 0.5:
                abuf = cap.alloc_buffer(n * ss)
                memoryview(abuf)[:] = data
                buf = abuf
            tag = cap.block_write(lba, n, buf, ring=ring, durable=rnd.random() < 0.1)
            model[lba * ss : (lba + n) * ss] = data
            busy[tag] = (lba, n, None)
            writes += 1
            swritten += n
        elif op < 0.8:
            into = rnd.choice([None, "aligned", "bytearray"])
            target: AlignedBuffer | bytearray | None = (
                cap.alloc_buffer(n * ss) if into == "aligned"
                else bytearray(n * ss) if into == "bytearray" else None
            )
            tag = cap.block_read(lba, n, target, ring=ring)
            busy[tag] = (lba, n, bytes(model[lba * ss : (lba + n) * ss]))
            reads += 1
            sread += n
        else:
            # a blocking transfer between them, on a range nothing in flight touches
            assert bytes(cap.block_read(lba, n)) == model[lba * ss : (lba + n) * ss]
            reads += 1
            sread += n
        settle(ring.reap())
    settle(ring.reap(wait=ring.in_flight))
    assert not busy
    s = v.stats
    assert (s.reads - before.reads, s.writes - before.writes,
            s.sectors_read - before.sectors_read,
            s.sectors_written - before.sectors_written) == (reads, writes, sread, swritten)
    assert bytes(cap.block_read(0, sectors)) == model
    ring.close()
