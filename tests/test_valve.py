"""The Block Valve on real image files and loop devices: round trips, geometry, zero copy,
durability, statistics and concurrency.  Refusals are in test_valve_refusals.py."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from valve_fixtures import (
    MiB,
    fd_flags,
    image_fixture,
    loop_device,
    open_fds,
    pattern,
    valve_fixture,
)

from valve import (
    AlignedBuffer,
    BlockDevice,
    BlockInfo,
    Capability,
    CapabilityError,
    Rights,
    Valve,
    ValveStats,
)

RW = Rights.READ | Rights.WRITE


img = image_fixture("valve.img", 8 * MiB)
valve = valve_fixture()


@pytest.fixture
def cap(valve: Valve) -> Capability:
    return valve.grant(RW)


def test_round_trip_on_sparse_image_survives_reopen(img: Path) -> None:
    assert os.stat(img).st_blocks == 0  # really sparse
    with Valve.open(img) as v:
        cap = v.grant(RW)
        ss = cap.block_info().sector_size
        writes = {0: 1, 9: 3, 1000: 8, cap.block_info().total_sectors - 4: 4}
        for lba, count in writes.items():
            cap.block_write(lba, count, pattern(lba, count * ss))
        assert bytes(cap.block_read(100, 2)) == bytes(2 * ss)  # a hole reads as zeros
    with Valve.open(img, read_only=True) as v:
        cap = v.grant(Rights.READ)
        for lba, count in writes.items():
            assert bytes(cap.block_read(lba, count)) == pattern(lba, count * ss)
    # And the bytes are where the LBA says, seen without the valve.
    with open(img, "rb") as f:
        f.seek(1000 * ss)
        assert f.read(8 * ss) == pattern(1000, 8 * ss)


def test_block_info_and_protocol(img: Path, cap: Capability) -> None:
    info = cap.block_info()
    assert isinstance(info, BlockInfo)
    assert info.sector_size in (512, 1024, 2048, 4096)
    assert info.total_sectors * info.sector_size == 8 * MiB
    assert isinstance(cap, BlockDevice)  # what the filesystem is typed against


def test_sector_size_4096_on_image(img: Path) -> None:
    with Valve.open(img, sector_size=4096) as v:
        cap = v.grant(RW)
        assert cap.block_info() == BlockInfo(4096, 8 * MiB // 4096)
        cap.block_write(5, 2, pattern(5, 8192))
    with Valve.open(img) as v:  # the same bytes in the device's own sectors
        cap = v.grant(Rights.READ)
        ss = cap.block_info().sector_size
        assert bytes(cap.block_read(5 * 4096 // ss, 8192 // ss)) == pattern(5, 8192)


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_loop_device_round_trip(img: Path, sector_size: int) -> None:
    with loop_device(img, sector_size) as loop:
        with Valve.open(loop) as v:
            cap = v.grant(RW)
            assert cap.block_info() == BlockInfo(sector_size, 8 * MiB // sector_size)
            fd, = open_fds(loop)
            assert fd_flags(fd) & os.O_DIRECT
            buf = cap.alloc_buffer(4 * sector_size)
            memoryview(buf)[:] = pattern(sector_size, 4 * sector_size)
            cap.block_write(10, 4, buf, durable=True)
            cap.block_write(20, 1, pattern(2, sector_size))
        with Valve.open(loop, read_only=True) as v:
            cap = v.grant(Rights.READ)
            assert bytes(cap.block_read(10, 4)) == pattern(sector_size, 4 * sector_size)
            assert bytes(cap.block_read(20, 1)) == pattern(2, sector_size)
    with open(img, "rb") as f:  # through the loop device into the backing file
        f.seek(10 * sector_size)
        assert f.read(4 * sector_size) == pattern(sector_size, 4 * sector_size)


def test_descriptor_is_o_direct(img: Path) -> None:
    with Valve.open(img) as v:
        fd, = open_fds(img)
        flags = fd_flags(fd)
        assert flags & os.O_DIRECT and flags & os.O_CLOEXEC
        assert flags & os.O_ACCMODE == os.O_RDWR
        assert v.grant(Rights.READ)
    assert open_fds(img) == []  # closed with the valve
    with Valve.open(img, read_only=True):
        fd, = open_fds(img)
        assert fd_flags(fd) & (os.O_DIRECT | os.O_ACCMODE) == os.O_DIRECT | os.O_RDONLY


def test_zero_copy_fast_path(valve: Valve, cap: Capability) -> None:
    ss = cap.block_info().sector_size
    buf = cap.alloc_buffer(64 * 1024)
    assert isinstance(buf, AlignedBuffer) and len(buf) == 64 * 1024
    view = memoryview(buf)
    assert not view.readonly
    view[:] = pattern(3, len(buf))
    cap.block_write(0, len(buf) // ss, buf)
    cap.block_write(200, 2, view[4096 : 4096 + 2 * ss])  # aligned slice
    cap.block_write(300, 8192 // ss, [view[:4096], view[8192:12288]])  # vectored
    out = cap.alloc_buffer(64 * 1024)
    got = cap.block_read(0, len(buf) // ss, into=out)
    assert got.obj is out and got == view
    got = cap.block_read(0, 1, into=memoryview(out)[8192:])  # aligned slice as target
    assert bytes(got) == bytes(view[:ss])
    block = cap.block_read(200, 2)  # fresh aligned memory: edit it and write it back
    block[0] ^= 0xFF
    cap.block_write(200, 2, block)
    assert bytes(cap.block_read(200, 2))[1:] == bytes(view[4097 : 4096 + 2 * ss])
    assert valve.stats.bounce_copies == 0
    assert valve.stats.reads == 4 and valve.stats.writes == 4


def test_unaligned_data_is_bounced_exactly_once(valve: Valve, cap: Capability) -> None:
    ss = cap.block_info().sector_size
    data = pattern(4, 4 * ss)
    cap.block_write(0, 4, data)
    assert valve.stats.bounce_copies == 1
    cap.block_write(4, 4, bytearray(data))
    assert valve.stats.bounce_copies == 2
    target = bytearray(4 * ss)
    got = cap.block_read(0, 4, into=target)
    assert got.obj is target and bytes(target) == data
    assert valve.stats.bounce_copies == 3
    # A valve buffer viewed at an unaligned offset cannot go direct either.
    buf = cap.alloc_buffer(8 * ss)
    memoryview(buf)[8 : 8 + 4 * ss] = data
    cap.block_write(8, 4, memoryview(buf)[8 : 8 + 4 * ss])
    assert valve.stats.bounce_copies == 4
    assert bytes(cap.block_read(8, 4, into=memoryview(buf)[8:])) == data
    assert valve.stats.bounce_copies == 5
    assert bytes(cap.block_read(4, 4)) == data and bytes(cap.block_read(8, 4)) == data


def test_vectored_write_mixes_direct_and_bounced_pieces(valve: Valve, cap: Capability) -> None:
    ss = cap.block_info().sector_size
    buf = cap.alloc_buffer(4 * ss)
    memoryview(buf)[:] = pattern(9, 4 * ss)
    pieces: list[bytes | memoryview | AlignedBuffer] = [
        b"a" * 100, b"b" * (ss - 100), buf, memoryview(buf)[:ss], bytes(ss)
    ]
    cap.block_write(40, 7, pieces)
    assert valve.stats.bounce_copies == 3  # the two halves of sector 0, and the bytes
    assert valve.stats.writes == 1
    assert bytes(cap.block_read(40, 7)) == b"".join(bytes(p) for p in pieces)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 3), st.integers(1, 1200)), min_size=1, max_size=8
    )
)
def test_any_split_writes_what_one_buffer_would(
    img: Path, spec: list[tuple[bool, int, int]]
) -> None:
    """Vectored writes of any mix of pieces equal the concatenation, and copy only the
    pieces that cannot go direct."""
    with Valve.open(img) as v:
        cap = v.grant(RW)
        ss = cap.block_info().sector_size
        pieces: list[bytes | memoryview] = []
        for aligned, sectors, odd in spec:
            if aligned and sectors:
                b = cap.alloc_buffer(sectors * ss)
                memoryview(b)[:] = pattern(len(pieces), sectors * ss)
                pieces.append(memoryview(b))
            else:
                pieces.append(pattern(len(pieces), odd))
        total = sum(len(p) for p in pieces)
        pieces.append(bytes(-total % ss))  # pad to whole sectors
        count = (total + ss - 1) // ss
        cap.block_write(3, count, pieces)
        assert bytes(cap.block_read(3, count)) == b"".join(bytes(p) for p in pieces)
        # The rule: a valve buffer goes direct unless it would start mid-sector after
        # bounced bytes; every other non-empty piece is copied once.
        expected, run = 0, 0
        for p in pieces:
            if isinstance(p, memoryview) and run % ss == 0:
                run = 0
            elif len(p):
                expected += 1
                run += len(p)
        assert v.stats.bounce_copies == expected


def test_durable_write_is_a_barrier(img: Path) -> None:
    with Valve.open(img) as v:
        cap = v.grant(RW)
        ss = cap.block_info().sector_size
        cap.block_write(0, 1, pattern(1, ss))
        assert v.stats.barriers == 0
        cap.block_write(1, 1, pattern(2, ss), durable=True)
        cap.block_write(2, 2, [pattern(3, ss), pattern(4, ss)], durable=True)
        assert v.stats.barriers == 2
    with Valve.open(img, read_only=True) as v:
        got = bytes(v.grant(Rights.READ).block_read(0, 4))
        assert got == pattern(1, ss) + pattern(2, ss) + pattern(3, ss) + pattern(4, ss)


def test_stats_are_a_snapshot(valve: Valve, cap: Capability) -> None:
    ss = cap.block_info().sector_size
    before = valve.stats
    assert before == ValveStats()
    cap.block_write(0, 3, bytes(3 * ss))
    cap.block_read(0, 2)
    with pytest.raises(CapabilityError):
        cap.restrict(Rights.READ).block_write(0, 1, bytes(ss))
    assert before == ValveStats()  # snapshots do not move
    assert valve.stats == ValveStats(
        reads=1, writes=1, sectors_read=2, sectors_written=3, bounce_copies=1, denials=1,
        barriers=0,
    )


def test_threads_read_and_write_concurrently(valve: Valve, cap: Capability) -> None:
    ss = cap.block_info().sector_size
    threads, rounds, span = 6, 60, 16  # each thread owns its own 16-sector region
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            mine = cap.restrict(RW, (t * span, (t + 1) * span))
            buf = mine.alloc_buffer(4 * ss)
            barrier.wait()
            for r in range(rounds):
                lba = t * span + (r % 4) * 4
                data = pattern(t * 1000 + r, 4 * ss)
                if r % 2:
                    memoryview(buf)[:] = data
                    mine.block_write(lba, 4, buf)
                else:
                    mine.block_write(lba, 4, data)
                assert bytes(mine.block_read(lba, 4, into=buf)) == data
                assert bytes(mine.block_read(lba, 4)) == data
        except BaseException as e:  # collected: an assertion on a thread is otherwise lost
            errors.append(e)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors, errors
    stats = valve.stats
    assert stats.writes == threads * rounds
    assert stats.reads == 2 * threads * rounds
    assert stats.sectors_read == 8 * threads * rounds
    assert stats.bounce_copies == threads * rounds // 2


def test_close_waits_for_transfers_and_then_refuses(img: Path) -> None:
    v = Valve.open(img)
    cap = v.grant(Rights.READ)
    stop = threading.Event()
    outcomes: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                cap.block_read(0, 128)
            except CapabilityError:
                outcomes.append("refused")
                return
            except BaseException as e:
                outcomes.append(f"unexpected {e!r}")
                return

    pool = [threading.Thread(target=reader) for _ in range(3)]
    for th in pool:
        th.start()
    v.close()
    stop.set()
    for th in pool:
        th.join()
    assert all(o == "refused" for o in outcomes), outcomes
    assert v.closed and open_fds(img) == []


def test_dropped_capabilities_leave_the_table(valve: Valve) -> None:
    root = valve.grant(RW)
    middle = root.restrict(Rights.READ, (0, 100))
    leaf = middle.restrict(Rights.READ, (10, 20))
    for _ in range(100):
        root.restrict(Rights.READ)  # temporaries must not pile up
    del middle
    gc.collect()
    assert len(valve._caps) == 2
    root.revoke()  # still reaches the leaf through the dropped middle
    with pytest.raises(CapabilityError):
        leaf.block_read(10, 1)


def test_unclosed_valve_warns(img: Path) -> None:
    v = Valve.open(img)
    with pytest.warns(ResourceWarning, match="unclosed"):
        del v
        gc.collect()
    assert open_fds(img) == []
