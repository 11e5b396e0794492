"""Helpers for the native and valve tests: image files, loop devices, a ramfs mount.

Plain functions and context managers, and fixture factories (``img = image_fixture(...)``
in a test module) so that each test module declares the fixtures it uses (and ruff sees no
unused imports).  Loop devices and mounts are always torn down, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MiB = 1024 * 1024


def make_image(path: Path, nbytes: int) -> Path:
    """A sparse image file of ``nbytes`` (reads as zeros)."""
    with open(path, "wb") as f:
        f.truncate(nbytes)
    return path


def image_fixture(name: str, nbytes: int) -> Any:
    """A fixture ``img``: a fresh sparse image file ``name`` of ``nbytes`` per test."""

    @pytest.fixture
    def img(tmp_path: Path) -> Path:
        return make_image(tmp_path / name, nbytes)

    return img


def core_device_fixture() -> Any:
    """A fixture ``dev``: the test's ``img`` opened by the C core (``nx_open``, read-write),
    closed after it."""
    from native import ffi, lib

    @pytest.fixture
    def dev(img: Path) -> Iterator[Any]:
        d = ffi.new("struct nx_dev *")
        assert lib.nx_open(os.fsencode(img), 0, d) == 0
        try:
            yield d
        finally:
            lib.nx_close(d)

    return dev


def valve_fixture() -> Any:
    """A fixture ``valve``: the Block Valve opened on the test's ``img``, closed after it."""
    from valve import Valve

    @pytest.fixture
    def valve(img: Path) -> Iterator[Valve]:
        with Valve.open(img) as v:
            yield v

    return valve


@contextlib.contextmanager
def loop_device(image: Path, sector_size: int = 512) -> Iterator[str]:
    """Attach ``image`` to a free loop device with ``sector_size``; detach afterwards."""
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--sector-size", str(sector_size), str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


@contextlib.contextmanager
def ramfs(mountpoint: Path) -> Iterator[Path]:
    """Mount a ramfs, a filesystem that refuses O_DIRECT, at ``mountpoint``."""
    mountpoint.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "ramfs", "nexfs-test", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def open_fds(path: str | os.PathLike[str]) -> list[int]:
    """Descriptors of this process that are open on ``path``."""
    target = os.path.realpath(path)
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == target:
                found.append(int(name))
    return found


def fd_flags(fd: int) -> int:
    """The file status flags of ``fd`` as the kernel reports them in fdinfo."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"no flags line in /proc/self/fdinfo/{fd}")


def pattern(seed: int, nbytes: int) -> bytes:
    """Deterministic, position-dependent bytes: a misplaced sector cannot match."""
    block = (seed.to_bytes(4, "little") + bytes(range(256)))[:256]
    out = bytearray(block * (nbytes // len(block) + 1))[:nbytes]
    for off in range(0, nbytes, 512):
        out[off : off + 8] = (seed * 1_000_003 + off).to_bytes(8, "little")
    return bytes(out)
