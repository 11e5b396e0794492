"""Unit tests of the C core's asynchronous ring (``nx_ring_*``) on real image files.

These call ``lib`` directly, bypassing the valve, so the core's own refusals at submit
time are what is tested: the same range, alignment, read-only and closing checks as the
blocking transfers, for both engines; the depth limit; counting; and that a ring's
requests hold the device, so ``nx_close`` cannot close the descriptor under them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from valve_fixtures import MiB, core_device_fixture, image_fixture, pattern

from native import ffi, lib

img = image_fixture("ring-core.img", 4 * MiB)
MODES = {"io_uring": lib.NX_RING_URING, "pool": lib.NX_RING_POOL}


dev = core_device_fixture()


@pytest.fixture(params=sorted(MODES))
def ring(request: pytest.FixtureRequest, dev: Any) -> Iterator[Any]:
    out = ffi.new("struct nx_ring **")
    assert lib.nx_ring_open(dev, MODES[request.param], 4, 2, out) == 0
    assert lib.nx_ring_mode(out[0]) == MODES[request.param]
    try:
        yield out[0]
    finally:
        lib.nx_ring_close(out[0])


def iov_of(*bufs: tuple[Any, int]) -> Any:
    iov = ffi.new("struct iovec[]", len(bufs))
    for i, (base, n) in enumerate(bufs):
        iov[i].iov_base, iov[i].iov_len = base, n
    return iov


def aligned(nbytes: int) -> Any:
    ptr = lib.nx_alloc(4096, nbytes)
    assert ptr != ffi.NULL
    return ffi.gc(ptr, lib.nx_free)


def reap(ring: Any, wait: int) -> list[tuple[int, int]]:
    out = ffi.new("struct nx_completion[]", 16)
    n = lib.nx_ring_reap(ring, out, 16, wait)
    assert n >= 0
    return sorted((out[i].tag, out[i].result) for i in range(n))


def test_open_refuses_bad_arguments(dev: Any) -> None:
    out = ffi.new("struct nx_ring **")
    assert lib.nx_ring_open(dev, lib.NX_RING_ANY, 0, 1, out) == -errno.EINVAL
    assert lib.nx_ring_open(dev, 7, 4, 1, out) == -errno.EINVAL
    assert out[0] == ffi.NULL


def test_round_trip_vectored_durable_and_counted(dev: Any, ring: Any) -> None:
    ss = dev.sector_size
    a, b = aligned(4 * ss), aligned(4 * ss)
    ffi.memmove(a, pattern(1, 4 * ss), 4 * ss)
    ffi.memmove(b, pattern(2, 4 * ss), 4 * ss)
    assert lib.nx_ring_submit(ring, 11, 1, 8, iov_of((a, 4 * ss), (b, 4 * ss)), 2, 1) == 0
    assert lib.nx_ring_inflight(ring) == 1
    assert reap(ring, 1) == [(11, 0)]
    assert (dev.writes, dev.sectors_written, dev.barriers) == (1, 8, 1)
    c = aligned(8 * ss)
    assert lib.nx_ring_submit(ring, 12, 0, 8, iov_of((c, 8 * ss)), 1, 0) == 0
    assert reap(ring, 1) == [(12, 0)]
    assert ffi.buffer(c, 8 * ss)[:] == pattern(1, 4 * ss) + pattern(2, 4 * ss)
    assert (dev.reads, dev.sectors_read, dev.inflight) == (1, 8, 0)


def test_submit_refuses_like_the_blocking_forms(dev: Any, ring: Any, img: Path) -> None:
    ss = dev.sector_size
    owner = aligned(2 * ss)
    buf = ffi.cast("char *", owner)
    total = dev.total_sectors
    assert lib.nx_ring_submit(ring, 1, 0, 0, iov_of((buf + 1, ss)), 1, 0) == -errno.EINVAL
    assert lib.nx_ring_submit(ring, 1, 0, 0, iov_of((buf, ss + 1)), 1, 0) == -errno.EINVAL
    assert lib.nx_ring_submit(ring, 1, 0, 0, iov_of((buf, 0)), 1, 0) == -errno.EINVAL
    assert lib.nx_ring_submit(ring, 1, 0, total, iov_of((buf, ss)), 1, 0) == -errno.EINVAL
    assert lib.nx_ring_submit(ring, 1, 1, total - 1, iov_of((buf, 2 * ss)), 1, 0) == -errno.EINVAL
    assert lib.nx_ring_submit(ring, 1, 0, 0, iov_of((buf, ss)), 0, 0) == -errno.EINVAL
    # nothing started, nothing held
    assert (lib.nx_ring_inflight(ring), dev.inflight, dev.reads) == (0, 0, 0)
    assert reap(ring, 0) == []
    del owner


def test_read_only_device_refuses_writes(img: Path) -> None:
    d = ffi.new("struct nx_dev *")
    assert lib.nx_open(os.fsencode(img), 1, d) == 0
    out = ffi.new("struct nx_ring **")
    for mode in MODES.values():
        assert lib.nx_ring_open(d, mode, 2, 1, out) == 0
        buf = aligned(4096)
        assert lib.nx_ring_submit(out[0], 1, 1, 0, iov_of((buf, 4096)), 1, 0) == -errno.EBADF
        assert lib.nx_ring_submit(out[0], 2, 0, 0, iov_of((buf, 4096)), 1, 0) == 0
        assert reap(out[0], 1) == [(2, 0)]
        lib.nx_ring_close(out[0])
    assert lib.nx_close(d) == 0


def test_depth_is_a_hard_limit(dev: Any, ring: Any) -> None:
    bufs = [aligned(4096) for _ in range(5)]
    for i in range(4):
        assert lib.nx_ring_submit(ring, i, 0, i * 8, iov_of((bufs[i], 4096)), 1, 0) == 0
    assert lib.nx_ring_submit(ring, 9, 0, 64, iov_of((bufs[4], 4096)), 1, 0) == -errno.EAGAIN
    assert reap(ring, 4) == [(0, 0), (1, 0), (2, 0), (3, 0)]


def test_requests_hold_the_device_and_closing_refuses(dev: Any, ring: Any) -> None:
    buf = aligned(4096)
    assert lib.nx_ring_submit(ring, 1, 1, 0, iov_of((buf, 4096)), 1, 1) == 0
    assert dev.inflight == 1  # nx_close would wait for it
    assert reap(ring, 1) == [(1, 0)]
    assert dev.inflight == 0
    dev.closing = 1  # what nx_close sets first
    assert lib.nx_ring_submit(ring, 2, 0, 0, iov_of((buf, 4096)), 1, 0) == -errno.EBADF
    dev.closing = 0


def test_short_read_is_eio(dev: Any, ring: Any, img: Path) -> None:
    ss = dev.sector_size
    buf = aligned(2 * ss)
    os.truncate(img, dev.size_bytes - ss)
    assert lib.nx_ring_submit(ring, 5, 0, dev.total_sectors - 2, iov_of((buf, 2 * ss)), 1, 0) == 0
    assert reap(ring, 1) == [(5, -errno.EIO)]
    assert dev.reads == 0
