"""Rings over an NBD export (``Valve.ring`` on ``nbd+unix://`` / ``nbd://``), against nbdkit.

Two engines (native/nbd_backend.c, ``nx_nbd_ring_open``): ``callbacks`` (the default: the
submitting thread issues the NBD commands, libnbd's completion callbacks and a driver thread
report them) and ``pool`` (C workers each moving one request with the backend's vectored
transfer).  What must hold, for both, is the file ring's contract (tests/test_valve_ring.py),
and these tests run its checks and its model explorer over an export:

* checked at submit, refusals start nothing; data round trips with every buffer kind;
  memory stays alive until reaped; a trio task waits on the eventfd;
* the explorer keeps many requests in flight against a model (more seeds with NEXFS_LONG);
* the requests really are on the wire together (a server taking 0.25 s per request);
* a stalled server (nbdkit ``pause``) completes every request in flight, and every queued
  one, with EIO within the timeout, and the ring and the valve close; a killed server
  completes them with EIO at once; ``Valve.close`` waits for what is in flight.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_valve_ring as file_ring
from nbdserver import NbdKit, PauseControl
from valve_fixtures import MiB, make_image, pattern

from valve import Capability, CapabilityError, DeviceError, Rights, Ring, Valve

RW = Rights.READ | Rights.WRITE
ENGINES = ("callbacks", "pool")
EXPLORER_SEEDS = 200 if os.environ.get("NEXFS_LONG") else 24


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NbdKit]:
    """One memory export for the module's contract tests (each test writes its own data)."""
    with NbdKit(tmp_path_factory.mktemp("ringnbd"), "memory", ["8M"]) as srv:
        yield srv


@pytest.fixture
def valve(export: NbdKit) -> Iterator[Valve]:
    with Valve.open(export.uri) as v:
        cap = v.grant(RW)
        cap.block_write(0, 4096, bytes(4096 * 512))  # the tests expect zeros where unwritten
        yield v


@pytest.fixture(params=ENGINES)
def ring(request: pytest.FixtureRequest, valve: Valve) -> Ring:
    r = valve.ring(16, engine=request.param, threads=3)
    assert r.engine == request.param
    return r


@pytest.fixture
def cap(valve: Valve) -> Capability:
    return valve.grant(RW)


@pytest.mark.parametrize("engine", ENGINES)
def test_round_trip_every_buffer_kind(export: NbdKit, engine: str) -> None:
    # The file ring's test counts from zero: a valve of its own.
    with Valve.open(export.uri) as v:
        file_ring.test_round_trip_every_buffer_kind(v.grant(RW), v.ring(16, engine=engine), v)


@pytest.mark.parametrize("engine", ENGINES)
def test_checked_at_submit_and_refusal_starts_nothing(tmp_path: Path, export: NbdKit,
                                                      engine: str) -> None:
    with Valve.open(export.uri) as v:
        file_ring.test_checked_at_submit_and_refusal_starts_nothing(
            v.grant(RW), v.ring(16, engine=engine), v, tmp_path)


def test_full_ring_refuses_before_starting(export: NbdKit) -> None:
    with Valve.open(export.uri) as v:
        file_ring.test_full_ring_refuses_before_starting(v.grant(RW), v)  # "any": callbacks


def test_revoked_after_submit_and_memory_alive_until_reaped(cap: Capability, ring: Ring) -> None:
    file_ring.test_revoked_after_submit_completes(cap, ring)
    file_ring.test_memory_stays_alive_until_reaped(cap, ring)


def test_trio_waits_on_the_eventfd(cap: Capability, ring: Ring) -> None:
    file_ring.test_trio_waits_on_the_eventfd(cap, ring)


def test_engines_each_backend_refuses(valve: Valve, tmp_path: Path) -> None:
    """io_uring moves bytes on a descriptor, which an export has not; the callbacks engine is
    libnbd's, which a file has not.  Said, not half-done; "any" picks the export's default."""
    with pytest.raises(DeviceError) as err:
        valve.ring(4, engine="io_uring")
    assert err.value.errno == errno.EOPNOTSUPP and "io_uring" in str(err.value)
    assert valve.ring(4, engine="any").engine == "callbacks"
    with Valve.open(make_image(tmp_path / "file.img", MiB)) as local:
        with pytest.raises(DeviceError) as err:
            local.ring(4, engine="callbacks")
        assert err.value.errno == errno.EOPNOTSUPP
        assert local.ring(4, engine="any").engine in ("io_uring", "pool")


@pytest.mark.parametrize("seed", range(EXPLORER_SEEDS))
def test_explorer_many_in_flight_against_a_model(seed: int, valve: Valve) -> None:
    file_ring.explore(valve, seed, ENGINES[seed % 2])


@pytest.mark.parametrize("engine", ENGINES)
def test_ring_and_blocking_threads_share_one_connection(valve: Valve, engine: str) -> None:
    """The ring's requests and blocking transfers from other threads at once (as in the
    mount: the loop's ring beside the write-behind and MMP threads), each on ranges of its
    own: every read sees what its writer wrote last, and the counters add up."""
    cap = valve.grant(RW)
    ring = valve.ring(16, engine=engine, threads=4)
    before = valve.stats
    errors: list[BaseException] = []
    rounds = 2000 if os.environ.get("NEXFS_LONG") else 200

    def blocking(k: int) -> None:
        try:
            base = 2048 + k * 256
            for i in range(rounds):
                lba = base + (i % 16) * 16
                data = pattern(1000 * k + i, 16 * 512)
                cap.block_write(lba, 16, data, durable=i % 10 == 0)
                assert bytes(cap.block_read(lba, 16)) == data
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=blocking, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    want: dict[int, bytes] = {}
    ring_reads = 0
    for i in range(rounds):
        lba = (i % 32) * 16
        data = pattern(i, 16 * 512)
        tags = [cap.block_write(lba, 16, data, ring=ring, durable=i % 7 == 0)]
        old = (i * 5) % max(1, len(want)) * 16
        if old in want and old != lba:  # never a read beside a write of the same range
            tags.append(cap.block_read(old, 16, ring=ring))
        done = {c.tag: c for c in ring.reap(wait=len(tags))}
        assert all(c.error is None for c in done.values()), done
        if len(tags) == 2:
            assert bytes(done[tags[1]].data or b"") == want[old]
            ring_reads += 1
        want[lba] = data
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    s = valve.stats
    assert (s.writes - before.writes, s.reads - before.reads) == (
        rounds + 3 * rounds, ring_reads + 3 * rounds)


@pytest.mark.parametrize("engine", ENGINES)
def test_requests_are_on_the_wire_together(tmp_path: Path, engine: str) -> None:
    """Eight reads and eight durable writes on a ring (of 8 workers, for the pool), with the
    server taking 0.25 s per request: together about 0.25 s each batch, one after another
    2 s."""
    with NbdKit(tmp_path, "memory", ["8M", "delay-write=250ms", "delay-read=250ms"],
                ["delay"]) as srv, Valve.open(srv.uri) as v:
        cap = v.grant(RW)
        ring = v.ring(16, engine=engine, threads=8)
        t0 = time.monotonic()
        tags = {cap.block_write(i * 8, 8, pattern(i, 4096), ring=ring, durable=True): i
                for i in range(8)}
        done = ring.reap(wait=8)
        writes = time.monotonic() - t0
        assert sorted(tags[c.tag] for c in done if c.error is None) == list(range(8))
        t0 = time.monotonic()
        tags = {cap.block_read(i * 8, 8, ring=ring): i for i in range(8)}
        done = ring.reap(wait=8)
        reads = time.monotonic() - t0
        assert {tags[c.tag]: bytes(c.data or b"") for c in done} == {
            i: pattern(i, 4096) for i in range(8)}
        s = v.stats
        assert (s.reads, s.writes, s.sectors_read, s.sectors_written) == (8, 8, 64, 64)
        assert s.barriers >= 1
    assert writes < 1.2, f"8 durable writes on the ring took {writes:.2f} s"
    assert reads < 1.2, f"8 reads on the ring took {reads:.2f} s"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_stalled_server_fails_every_request_with_eio_within_the_timeout(
    tmp_path: Path, engine: str,
) -> None:
    """Requests on the wire (and, for the pool, queued behind its workers): all complete with
    EIO about one timeout after the stall (never a hang), the ring and the valve close, and
    no late reply lands in a buffer (libnbd let go of them before the completions)."""
    backing = make_image(tmp_path / "stall.img", 8 * MiB)
    control = PauseControl(tmp_path / "pause.sock")
    with NbdKit(tmp_path, "file", [str(backing), f"pause-control={control.sock}"],
                ["pause"]) as srv:
        v = Valve.open(srv.uri, nbd_timeout=1)
        try:
            cap = v.grant(RW)
            cap.block_write(0, 8, pattern(1, 4096), durable=True)
            ring = v.ring(16, engine=engine, threads=4)
            control.pause()
            t0 = time.monotonic()
            for i in range(12):  # pool: 4 on the wire, 8 queued behind them
                if i % 3 == 0:
                    cap.block_write(64 + i * 8, 8, pattern(i, 4096), ring=ring)
                else:
                    cap.block_read(i * 8, 8, cap.alloc_buffer(4096), ring=ring)
            done = ring.reap(wait=12)
            took = time.monotonic() - t0
            assert len(done) == 12 and ring.in_flight == 0
            for c in done:
                assert isinstance(c.error, DeviceError) and c.error.errno == errno.EIO, c
                assert c.data is None
            assert any("no answer within 1000 ms" in str(c.error) for c in done)
            assert 0.9 < took < 5, f"took {took:.2f} s"
            # Later requests fail at once: the connection is gone (no reconnection).
            t0 = time.monotonic()
            cap.block_read(0, 8, ring=ring)
            (late,) = ring.reap(wait=1)
            assert isinstance(late.error, DeviceError) and late.error.errno == errno.EIO
            assert time.monotonic() - t0 < 0.5
            control.resume()
        finally:
            t0 = time.monotonic()
            v.close()
            assert time.monotonic() - t0 < 5
    assert backing.read_bytes()[:4096] == pattern(1, 4096)


@pytest.mark.parametrize("engine", ENGINES)
def test_close_during_a_stall_returns_within_the_timeout(tmp_path: Path, engine: str) -> None:
    """Valve.close while the ring's requests hang on a stalled server: the close waits for
    them, and they end at the deadline, so the close returns about one timeout later."""
    backing = make_image(tmp_path / "stall.img", 8 * MiB)
    control = PauseControl(tmp_path / "pause.sock")
    with NbdKit(tmp_path, "file", [str(backing), f"pause-control={control.sock}"],
                ["pause"]) as srv:
        v = Valve.open(srv.uri, nbd_timeout=1)
        cap = v.grant(RW)
        ring = v.ring(8, engine=engine, threads=2)
        control.pause()
        for i in range(6):
            cap.block_read(i * 8, 8, ring=ring)
        t0 = time.monotonic()
        v.close()
        took = time.monotonic() - t0
        assert ring.closed and v.closed
        assert took < 5, f"close took {took:.2f} s"
        control.resume()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_killed_server_fails_the_ring_at_once(tmp_path: Path, engine: str) -> None:
    backing = make_image(tmp_path / "killed.img", 8 * MiB)
    srv = NbdKit(tmp_path, "file", [str(backing)], tcp=True).start()
    try:
        with Valve.open(srv.uri, nbd_timeout=20) as v:
            cap = v.grant(RW)
            ring = v.ring(32, engine=engine, threads=4)
            outcomes: list[int] = []
            killed_at = 0.0
            i = 0
            while killed_at == 0.0 or ring.in_flight:
                if killed_at == 0.0 and i == 64:
                    srv.kill()
                    killed_at = time.monotonic()
                if killed_at == 0.0 and ring.in_flight < ring.depth:
                    cap.block_write((i % 256) * 8, 8, pattern(i, 4096), ring=ring,
                                    durable=i % 8 == 0)
                    i += 1
                    continue
                for c in ring.reap(wait=1):
                    outcomes.append(0 if c.error is None else c.error.errno or -1)
            took = time.monotonic() - killed_at
            assert took < 10, f"the ring took {took:.1f} s to fail after the kill"
            assert set(outcomes) <= {0, errno.EIO}
            cap.block_read(0, 8, ring=ring)
            (late,) = ring.reap(wait=1)
            assert isinstance(late.error, DeviceError) and late.error.errno == errno.EIO
    finally:
        srv.stop()


@pytest.mark.parametrize("engine", ENGINES)
def test_close_waits_for_requests_in_flight(tmp_path: Path, engine: str) -> None:
    """Valve.close with durable writes on the ring of a slow server: it waits for them (the
    export then holds every one), and the ring is closed with the valve."""
    backing = make_image(tmp_path / "close.img", 8 * MiB)
    with NbdKit(tmp_path, "file", [str(backing), "delay-write=50ms"], ["delay"]) as srv:
        v = Valve.open(srv.uri)
        cap = v.grant(RW)
        ring = v.ring(32, engine=engine, threads=4)
        for i in range(32):
            cap.block_write(i * 8, 8, pattern(i, 4096), ring=ring, durable=i % 8 == 7)
        v.close()
        assert ring.closed
        with pytest.raises(CapabilityError):
            ring.reap()
    raw = backing.read_bytes()
    assert [raw[i * 4096:(i + 1) * 4096] for i in range(32)] == [
        pattern(i, 4096) for i in range(32)]
