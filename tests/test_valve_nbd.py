"""The Block Valve on NBD exports (native/nbd_backend.c through libnbd), against real servers.

nbdkit's file and memory plugins on Unix sockets and loopback TCP, qemu-nbd on a qcow2
image; nbdkit's filters for what a server may do (block-size constraints, no FUA, no flush,
read-only, error replies, stalls).  The explorer at the top runs random operation sequences
on an image file and on an export of the same size and requires the same answers: the
backends must be indistinguishable above the valve.
"""

from __future__ import annotations

import errno
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbdserver import NbdKit, PauseControl, QemuNbd, eval_file_args
from valve_fixtures import MiB, make_image, pattern

from valve import BlockInfo, CapabilityError, DeviceError, Rights, Valve

RW = Rights.READ | Rights.WRITE
SIZE = 8 * MiB


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    return make_image(tmp_path / "export.img", SIZE)


@pytest.fixture(params=["unix", "tcp"])
def server(request: pytest.FixtureRequest, tmp_path: Path, backing: Path) -> Iterator[NbdKit]:
    with NbdKit(tmp_path, "file", [str(backing)], tcp=request.param == "tcp") as srv:
        yield srv


# -- the explorer: an image file and an export answer alike --------------------------------

_OP = st.one_of(
    # (kind, lba, sectors, variant): variant picks aligned/bytes/vectored/durable
    st.tuples(st.just("w"), st.integers(0, 2047), st.integers(1, 40), st.integers(0, 3)),
    st.tuples(st.just("r"), st.integers(0, 2047), st.integers(1, 40), st.integers(0, 1)),
)


def _apply(cap: object, op: tuple[str, int, int, int], ss: int, seed: int) -> bytes:
    from valve import Capability

    assert isinstance(cap, Capability)
    kind, lba, sectors, variant = op
    if kind == "r":
        if variant:
            buf = cap.alloc_buffer(sectors * ss)
            return bytes(cap.block_read(lba, sectors, into=buf))
        return bytes(cap.block_read(lba, sectors))
    data = pattern(seed, sectors * ss)
    if variant == 0:
        buf = cap.alloc_buffer(len(data))
        memoryview(buf)[:] = data
        cap.block_write(lba, sectors, buf)
    elif variant == 1:
        cap.block_write(lba, sectors, data)
    elif variant == 2:
        cut = (sectors // 2) * ss + 7  # a bounced run that ends mid-sector
        cap.block_write(lba, sectors, [data[:cut], data[cut:]])
    else:
        cap.block_write(lba, sectors, data, durable=True)
    return b""


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Valve, Valve]]:
    """An image-file valve and an NBD valve (memory plugin) of the same size."""
    tmp = tmp_path_factory.mktemp("twins")
    img = make_image(tmp / "twin.img", 1 * MiB)
    with NbdKit(tmp, "memory", ["1M"]) as srv, Valve.open(img) as local, \
            Valve.open(srv.uri) as remote:
        yield local, remote


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_OP, min_size=1, max_size=12))
def test_explorer_export_answers_like_an_image_file(
    twins: tuple[Valve, Valve], ops: list[tuple[str, int, int, int]]
) -> None:
    local, remote = twins
    caps = [v.grant(RW) for v in (local, remote)]
    infos = [c.block_info() for c in caps]
    assert infos[0].sector_size == infos[1].sector_size == 512
    assert infos[0].total_sectors == infos[1].total_sectors == 2048
    assert (infos[0].exclusive, infos[1].exclusive) == (True, False)
    for seed, op in enumerate(ops):
        outcomes: list[tuple[str, object]] = []
        for cap in caps:
            try:
                outcomes.append(("ok", _apply(cap, op, 512, seed)))
            except OSError as exc:  # a range refusal must be the same refusal
                outcomes.append((type(exc).__name__, exc.errno))
        assert outcomes[0] == outcomes[1], op
    # Whole-device comparison at the end: nothing landed anywhere else.
    assert bytes(caps[0].block_read(0, 2048)) == bytes(caps[1].block_read(0, 2048))


# -- the contract, one property at a time ----------------------------------------------------

def test_round_trip_lands_in_the_served_file(server: NbdKit, backing: Path) -> None:
    with Valve.open(server.uri) as v:
        cap = v.grant(RW)
        info = cap.block_info()
        assert info == BlockInfo(512, SIZE // 512, exclusive=False)
        writes = {0: 1, 9: 3, 1000: 8, info.total_sectors - 4: 4}
        for lba, count in writes.items():
            cap.block_write(lba, count, pattern(lba, count * 512))
        assert bytes(cap.block_read(100, 2)) == bytes(1024)
        for lba, count in writes.items():
            assert bytes(cap.block_read(lba, count)) == pattern(lba, count * 512)
    raw = backing.read_bytes()
    for lba, count in writes.items():
        assert raw[lba * 512:(lba + count) * 512] == pattern(lba, count * 512)


def test_zero_copy_and_bounce_accounting_match_the_file_backend(server: NbdKit) -> None:
    with Valve.open(server.uri) as v:
        cap = v.grant(RW)
        buf = cap.alloc_buffer(8 * 512)
        memoryview(buf)[:] = pattern(5, len(buf))
        cap.block_write(16, 8, buf)
        view = cap.block_read(16, 8, into=buf)
        assert view.obj is buf
        assert v.stats.bounce_copies == 0
        cap.block_write(24, 1, pattern(6, 512))  # bytes: bounced once
        assert v.stats.bounce_copies == 1
        assert bytes(cap.block_read(16, 9)) == pattern(5, 4096) + pattern(6, 512)
        s = v.stats
        assert (s.writes, s.sectors_written, s.reads, s.sectors_read) == (2, 9, 2, 17)


def test_durable_write_sends_fua_and_a_flush(tmp_path: Path, backing: Path) -> None:
    """With FUA the write carries it and the flush (for earlier writes) flies beside it;
    without FUA the flush follows the write's reply."""
    for fua in (True, False):
        log = tmp_path / f"log-{fua}.txt"
        args = [*eval_file_args(backing, flush=True, fua=fua), f"logfile={log}"]
        with NbdKit(tmp_path, "eval", args, ["log"], name=f"fua{fua}") as srv, \
                Valve.open(srv.uri) as v:
            cap = v.grant(RW)
            cap.block_write(0, 1, pattern(1, 512))
            cap.block_write(1, 2, [pattern(2, 512), pattern(3, 512)], durable=True)
            assert v.stats.barriers == 1
        lines = log.read_text().splitlines()
        # Request lines only ("connection=1 Write id=2 ... fua=1 ..."), not their replies.
        kinds = [(m[1], "fua=1" in ln) for ln in lines
                 if (m := re.search(r"connection=\d+ (Write|Flush) id=", ln))]
        if fua:
            assert kinds[0] == ("Write", False)
            assert sorted(kinds[1:]) == [("Flush", False), ("Write", True)]
        else:
            assert kinds == [("Write", False), ("Write", False), ("Flush", False)]
            flush_sent = next(i for i, ln in enumerate(lines) if "Flush id=" in ln)
            write_done = next(i for i, ln in enumerate(lines) if "...Write id=2" in ln)
            assert write_done < flush_sent  # the flush waited for the write's reply


def test_block_size_constraints_are_honoured(tmp_path: Path, backing: Path) -> None:
    """A 4096-byte minimum becomes the sector; a 64 KiB maximum splits a 1 MiB transfer."""
    args = [str(backing), "blocksize-minimum=4096", "blocksize-preferred=4096",
            "blocksize-maximum=65536", "blocksize-error-policy=error"]
    with NbdKit(tmp_path, "file", args, ["blocksize-policy"]) as srv, \
            Valve.open(srv.uri) as v:
        cap = v.grant(RW)
        assert cap.block_info() == BlockInfo(4096, SIZE // 4096, exclusive=False)
        data = pattern(9, MiB)
        cap.block_write(3, 256, data, durable=True)
        assert bytes(cap.block_read(3, 256)) == data
    assert backing.read_bytes()[3 * 4096:3 * 4096 + MiB] == data


def test_requests_are_pipelined(tmp_path: Path) -> None:
    """Eight segments of a vectored write, and eight threads' reads, are in flight together:
    with the server taking 0.25 s per request, one after another would need 2 s."""
    with NbdKit(tmp_path, "memory", ["8M", "delay-write=250ms", "delay-read=250ms"],
                ["delay"]) as srv, Valve.open(srv.uri) as v:
        cap = v.grant(RW)
        pieces = []
        for i in range(8):
            b = cap.alloc_buffer(4096)
            memoryview(b)[:] = pattern(i, 4096)
            pieces.append(b)
        t0 = time.monotonic()
        cap.block_write(0, 64, pieces)
        vectored = time.monotonic() - t0
        results: dict[int, bytes] = {}

        def read(i: int) -> None:
            results[i] = bytes(cap.block_read(i * 8, 8))

        threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        threaded = time.monotonic() - t0
    assert [results[i] for i in range(8)] == [pattern(i, 4096) for i in range(8)]
    assert vectored < 1.2, f"vectored write of 8 segments took {vectored:.2f} s"
    assert threaded < 1.2, f"8 threads' reads took {threaded:.2f} s"


def test_qemu_nbd_serves_a_qcow2_image(tmp_path: Path) -> None:
    qcow2 = QemuNbd.create(tmp_path / "vol.qcow2", "16M")
    with QemuNbd(tmp_path, qcow2) as srv:
        with Valve.open(srv.uri) as v:
            cap = v.grant(RW)
            info = cap.block_info()
            assert (info.total_sectors * info.sector_size, info.exclusive) == (16 * MiB, False)
            cap.block_write(100, 16, pattern(4, 16 * info.sector_size), durable=True)
        with Valve.open(srv.uri, read_only=True) as v:
            assert bytes(v.grant(Rights.READ).block_read(100, 16)) == pattern(4, 16 * 512)


# -- refusals ---------------------------------------------------------------------------------

def test_read_only_export_refuses_read_write_use(tmp_path: Path, backing: Path) -> None:
    with NbdKit(tmp_path, "file", [str(backing)], readonly=True) as srv:
        with pytest.raises(DeviceError) as err:
            Valve.open(srv.uri)
        assert err.value.errno == errno.EROFS
        assert str(err.value) == f"{srv.uri}: the server exports it read-only: open it read-only"
        with Valve.open(srv.uri, read_only=True) as v:
            cap = v.grant(Rights.READ)
            assert bytes(cap.block_read(0, 1)) == bytes(512)
            with pytest.raises(CapabilityError):
                v.grant(RW)


def test_server_that_cannot_flush_is_read_only_use(tmp_path: Path) -> None:
    data = tmp_path / "noflush.img"
    data.write_bytes(pattern(1, 65536))
    with NbdKit(tmp_path, "eval", eval_file_args(data, flush=False, fua=False)) as srv:
        with pytest.raises(DeviceError) as err:
            Valve.open(srv.uri)
        assert err.value.errno == errno.EOPNOTSUPP
        assert "cannot flush" in str(err.value) and "read-only" in str(err.value)
        with Valve.open(srv.uri, read_only=True) as v:
            assert bytes(v.grant(Rights.READ).block_read(2, 2)) == pattern(1, 65536)[1024:2048]


@pytest.mark.parametrize("uri,why", [
    ("nbd+unix:///?socket=/nonexistent/nexfs.sock", "cannot connect"),
    ("nbd://127.0.0.1:1/", "cannot connect"),
    ("nbd://[bad", "not a usable NBD URI"),
])
def test_unreachable_or_malformed_uri_is_one_line(uri: str, why: str) -> None:
    with pytest.raises(DeviceError) as err:
        Valve.open(uri)
    text = str(err.value)
    assert text.startswith(f"{uri}: {why}") and "\n" not in text, text


def test_request_timeout_must_be_positive(server: NbdKit, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DeviceError, match="not in"):
        Valve.open(server.uri, nbd_timeout=0)
    monkeypatch.setenv("NEXFS_NBD_TIMEOUT", "soon")
    with pytest.raises(DeviceError, match="NEXFS_NBD_TIMEOUT"):
        Valve.open(server.uri)


# -- faults on the wire -----------------------------------------------------------------------

def test_error_replies_are_eio_and_the_connection_survives(tmp_path: Path, backing: Path) -> None:
    inject = tmp_path / "inject"
    args = [str(backing), "error=EIO", "error-rate=100%", f"error-file={inject}"]
    with NbdKit(tmp_path, "file", args, ["error"]) as srv, Valve.open(srv.uri) as v:
        cap = v.grant(RW)
        cap.block_write(0, 1, pattern(1, 512))
        inject.touch()
        with pytest.raises(DeviceError) as err:
            cap.block_read(0, 1)
        assert err.value.errno == errno.EIO
        with pytest.raises(DeviceError):
            cap.block_write(1, 1, pattern(2, 512), durable=True)
        inject.unlink()
        # An error reply is an answer: the connection is fine and so is the data.
        assert bytes(cap.block_read(0, 1)) == pattern(1, 512)


def test_a_stalled_server_times_out_and_is_never_used_again(tmp_path: Path,
                                                            backing: Path) -> None:
    """A request without an answer fails with EIO after the timeout (the connection is
    dropped, so no late reply can land in a reused buffer); every later request fails at
    once, even after the server came back: the valve does not reconnect."""
    control = PauseControl(tmp_path / "pause.sock")
    args = [str(backing), f"pause-control={control.sock}"]
    with NbdKit(tmp_path, "file", args, ["pause"]) as srv, \
            Valve.open(srv.uri, nbd_timeout=1) as v:
        cap = v.grant(RW)
        cap.block_write(0, 1, pattern(1, 512), durable=True)
        control.pause()
        buf = cap.alloc_buffer(4096)
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as err:
            cap.block_read(0, 8, into=buf)
        assert 0.9 < time.monotonic() - t0 < 10
        assert err.value.errno == errno.EIO
        assert "no answer within 1000 ms" in str(err.value)
        control.resume()
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as err:
            cap.block_read(0, 1)
        assert time.monotonic() - t0 < 0.5 and err.value.errno == errno.EIO
    with NbdKit(tmp_path, "file", [str(backing)], name="again") as srv, \
            Valve.open(srv.uri) as v:  # a new connection (a remount) sees the data
        assert bytes(v.grant(Rights.READ).block_read(0, 1)) == pattern(1, 512)


def test_a_slow_server_times_out(tmp_path: Path) -> None:
    """nbdkit's delay filter: a write answered after 3 s against a 1-s timeout is EIO at
    about 1 s, and so is every request after it (the connection is gone)."""
    with NbdKit(tmp_path, "memory", ["4M", "delay-write=3"], ["delay"]) as srv, \
            Valve.open(srv.uri, nbd_timeout=1) as v:
        cap = v.grant(RW)
        assert bytes(cap.block_read(0, 1)) == bytes(512)  # reads are not delayed
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as err:
            cap.block_write(0, 1, pattern(1, 512))
        assert 0.9 < time.monotonic() - t0 < 2.5
        assert err.value.errno == errno.EIO and "no answer within 1000 ms" in str(err.value)
        with pytest.raises(DeviceError):
            cap.block_read(0, 1)


def test_a_killed_server_fails_requests_in_flight_and_later_ones(tmp_path: Path,
                                                                 backing: Path) -> None:
    srv = NbdKit(tmp_path, "file", [str(backing)], tcp=True).start()
    try:
        with Valve.open(srv.uri, nbd_timeout=20) as v:
            cap = v.grant(RW)
            cap.block_write(0, 8, pattern(1, 4096), durable=True)
            failures: list[int | None] = []
            stop = threading.Event()

            def workload() -> None:
                i = 0
                while not stop.is_set():
                    try:
                        cap.block_write(8 + i % 64, 1, pattern(i, 512), durable=i % 4 == 0)
                    except DeviceError as exc:
                        failures.append(exc.errno)
                        return
                    i += 1

            threads = [threading.Thread(target=workload) for _ in range(4)]
            for t in threads:
                t.start()
            srv.kill()
            t0 = time.monotonic()
            for t in threads:
                t.join(30)
            stop.set()
            assert not any(t.is_alive() for t in threads)
            assert time.monotonic() - t0 < 15  # failed at once, not after the timeout
            assert failures == [errno.EIO] * 4
            srv.start()  # the server is back on the same port: still no reconnection
            with pytest.raises(DeviceError) as err:
                cap.block_read(0, 1)
            assert err.value.errno == errno.EIO
        with Valve.open(srv.uri) as v:  # ... until the export is opened again
            assert bytes(v.grant(Rights.READ).block_read(0, 8)) == pattern(1, 4096)
    finally:
        srv.stop()


def test_close_with_threads_in_flight_does_not_hang(tmp_path: Path) -> None:
    with NbdKit(tmp_path, "memory", ["4M", "delay-read=100ms"], ["delay"]) as srv:
        v = Valve.open(srv.uri)
        cap = v.grant(Rights.READ)
        outcomes: list[str] = []

        def reader() -> None:
            for _ in range(5):
                try:
                    cap.block_read(0, 8)
                    outcomes.append("ok")
                except CapabilityError:
                    outcomes.append("closed")
                    return

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        v.close()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert set(outcomes) <= {"ok", "closed"} and "closed" in outcomes


def test_native_batch_submit(tmp_path: Path) -> None:
    """nx_nbd_submit: a batch of reads and writes in flight together, each with its own
    result, durable writes flushed once; a bad request fails the batch before any I/O."""
    from native import ffi, lib

    with NbdKit(tmp_path, "memory", ["4M", "delay-write=200ms", "delay-read=200ms"],
                ["delay"]) as srv:
        n = ffi.new("struct nx_nbd *")
        assert lib.nx_nbd_open(srv.uri.encode(), 0, 10000, n) == 0
        try:
            bufs = [ffi.new("char[]", 4096) for _ in range(6)]
            reqs = ffi.new("struct nx_nbd_req[]", 6)
            for i in range(6):
                ffi.memmove(bufs[i], pattern(i, 4096), 4096)
                reqs[i].lba, reqs[i].buf, reqs[i].len, reqs[i].write = i * 8, bufs[i], 4096, 1
            t0 = time.monotonic()
            assert lib.nx_nbd_submit(n, reqs, 6, 1) == 0
            assert time.monotonic() - t0 < 1.0  # six 0.2-s writes (and a flush) together
            assert [reqs[i].err for i in range(6)] == [0] * 6
            assert (n.dev.writes, n.dev.barriers) == (6, 1)
            back = [ffi.new("char[]", 4096) for _ in range(6)]
            for i in range(6):
                reqs[i].buf, reqs[i].write = back[i], 0
            assert lib.nx_nbd_submit(n, reqs, 6, 0) == 0
            assert [ffi.buffer(b)[:] for b in back] == [pattern(i, 4096) for i in range(6)]
            reqs[5].lba = 8192  # past the end: refused, nothing issued
            assert lib.nx_nbd_submit(n, reqs, 6, 0) == -errno.EINVAL
            assert n.dev.reads == 6
        finally:
            lib.nx_nbd_close(n)
