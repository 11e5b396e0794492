"""Reads in flight on an NBD-backed mount: the valve's ring over the export, through FUSE.

A mount on an NBD export serves concurrent reads through the ring (nexfs/store/inflight.py)
as a mount on an image does; over an export the ring keeps those reads on the wire together
(native/nbd_backend.c, ``nx_nbd_ring_open``; its default engine, libnbd's callbacks).
Checked with the test's own nbdkit:

* the reads really overlap on the wire: eight O_DIRECT readers of uncached blocks against a
  server that takes 0.2 s per read finish in well under the 1.6 s one after another takes;
* the concurrency model of tests/test_mount_concurrency.py (readers, writers, truncates,
  unlinks, fsyncs; every read a state that existed, nothing from another file) holds on an
  NBD-backed mount, and the export is fsck-clean afterwards;
* a server that stalls while reads are in flight on the ring: every reader gets EIO within
  the timeout, the mount stays up and unmounts, a remount sees the data.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from pathlib import Path

import pytest
import test_mount_concurrency as concurrency
from mountutil import Mounter, mounter_fixture  # noqa: F401  (fixture)
from nbdserver import PauseControl
from test_mount_nbd import assert_clean, expect_wire_fault_log, export, mount, serving

pytestmark = pytest.mark.mount

BS = 4096
READERS = 8
DELAY = 0.2


def fill(path: Path, blocks: int) -> list[bytes]:
    """``blocks`` distinct 4 KiB blocks written and fsync'd; returns them."""
    data = [bytes([i + 1]) * BS for i in range(blocks)]
    with open(path, "wb") as f:
        f.write(b"".join(data))
        f.flush()
        os.fsync(f.fileno())
    return data


def read_together(path: Path, blocks: int) -> tuple[float, list[bytes | OSError]]:
    """One O_DIRECT reader per block, released at once; (seconds, what each got)."""
    fds = [os.open(path, os.O_RDONLY | os.O_DIRECT) for _ in range(blocks)]
    got: list[bytes | OSError] = [b""] * blocks
    start = threading.Barrier(blocks + 1)

    def reader(i: int) -> None:
        buf = mmap.mmap(-1, BS)  # page aligned: good for O_DIRECT
        start.wait()
        try:
            n = os.preadv(fds[i], [buf], i * BS)
            got[i] = bytes(buf[:n])
        except OSError as exc:
            got[i] = exc

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(blocks)]
    try:
        for t in threads:
            t.start()
        start.wait()
        t0 = time.monotonic()
        for t in threads:
            t.join(120)
        took = time.monotonic() - t0
        assert not any(t.is_alive() for t in threads)
    finally:
        for fd in fds:
            os.close(fd)
    return took, got


def test_reads_in_flight_reach_the_export_together(mounter: Mounter, tmp_path: Path) -> None:
    srv, _ = export(tmp_path)
    with serving(srv, mounter):
        m = mount(mounter, srv.uri)
        data = fill(m.mountpoint / "f", READERS)
        assert m.unmount() == 0
        # The same export again, now answering every read after DELAY s; a fresh mount, so
        # no block of the file is in the daemon's data cache.
        srv.stop()
        srv.filters, srv.args = ["delay"], [*srv.args, f"delay-read={int(DELAY * 1000)}ms"]
        srv.start()
        m = mount(mounter, srv.uri)
        path = m.mountpoint / "f"
        os.stat(path)  # the lookup's metadata reads, before the clock starts
        took, got = read_together(path, READERS)
        assert got == data
        serial = READERS * DELAY
        # One after another: 1.6 s.  On the ring: about 2 x 0.2 s (the first read blocks, the
        # others go on the wire together); the bound leaves room for a loaded machine.
        assert took < 0.7 * serial, f"{READERS} reads took {took:.2f} s (serial {serial} s)"
        assert m.unmount() == 0
        assert "reads block" not in m.log_text()
        assert_clean(srv.uri)


def test_concurrency_model_on_an_nbd_mount(mounter: Mounter, tmp_path: Path) -> None:
    srv, _ = export(tmp_path)
    with serving(srv, mounter):
        m = mount(mounter, srv.uri)
        concurrency.test_concurrent_requests_against_a_model(m)
        assert m.unmount() == 0
        assert "reads block" not in m.log_text()
        assert_clean(srv.uri)


def test_a_stall_under_reads_in_flight(mounter: Mounter, tmp_path: Path) -> None:
    """The server stops answering while readers have reads on the ring: each reader gets
    EIO within about the timeout, nothing hangs, the mount stays up and unmounts, and a
    remount after the server is back reads the data."""
    control = PauseControl(tmp_path / "pause.sock")
    srv, _ = export(tmp_path, filters=("pause",), args=(f"pause-control={control.sock}",))
    with serving(srv, mounter):
        m = mount(mounter, srv.uri, ["nbd_timeout=2"])
        data = fill(m.mountpoint / "f", READERS)
        assert m.unmount() == 0
        m = mount(mounter, srv.uri, ["nbd_timeout=2"])
        expect_wire_fault_log(m)
        path = m.mountpoint / "f"
        os.stat(path)
        control.pause()
        took, got = read_together(path, READERS)
        control.resume()
        assert all(isinstance(g, OSError) and g.errno == errno.EIO for g in got), got
        assert took < 15, f"the readers took {took:.1f} s to fail"
        assert "no answer within 2000 ms" in m.log_text()
        assert m.up
        t0 = time.monotonic()
        m.unmount()  # the superblock may not be writable any more: any exit code, no hang
        assert time.monotonic() - t0 < 30
        # Back, restarted: nbdkit 1.32's pause filter can abort on an assertion when several
        # paused requests are resumed on a connection the client has shut down.
        srv.stop()
        srv.start()
        again = mount(mounter, srv.uri)
        assert (again.mountpoint / "f").read_bytes() == b"".join(data)
        assert again.unmount() == 0
        assert_clean(srv.uri)
