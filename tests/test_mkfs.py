"""mkfs.nexfs, run as the user runs it: the console script in a subprocess, on image files
and on a loop device.  Every refusal is one line on stderr with the documented exit code
(1), never a traceback, and leaves the target as it was."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from fsutil import ROOT, mounted
from imagekit import file_hash, fsck, tool
from valve_fixtures import loop_device

from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk.layout import Superblock
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.tools import mkfs
from valve import Rights, Valve

MiB = 1 << 20
TiB = 1 << 40


def superblock(path: Path | str) -> Superblock:
    with open(path, "rb") as f:
        return Superblock.decode(f.read(BLOCK_SIZE), 0)


def refused(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    """One clear line on stderr, exit status 1."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mkfs.nexfs: ") and re.search(pattern, lines[0]), lines[0]


def test_creates_sparse_image(tmp_path: Path) -> None:
    image = tmp_path / "new.img"
    result = tool("mkfs.nexfs", "--size", "256M", "--label", "data vol", image)
    assert result.returncode == 0, result.stderr
    assert "NexFS volume created" in result.stdout
    st = image.stat()
    assert st.st_size == 256 * MiB
    assert st.st_mode & 0o777 == 0o600
    assert st.st_blocks * 512 < 8 * MiB, "the image should be sparse"
    sb = superblock(image)
    assert sb.label == "data vol" and sb.geo.nblocks == 256 * MiB // BLOCK_SIZE
    with mounted(image) as fs:
        assert fs.lookup(ROOT_INO, b"lost+found", ROOT).ino == 2
        ino = fs.create(ROOT_INO, b"hello", 0o644, ROOT).ino
        fs.write(ino, 0, b"hello\n", ROOT)
    assert fsck(image, "-n", "-f").returncode == 0


def test_formats_existing_file_of_its_size(tmp_path: Path) -> None:
    image = tmp_path / "plain.img"
    with open(image, "wb") as f:
        f.truncate(40 * MiB)
    result = tool("mkfs.nexfs", "-q", image)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert image.stat().st_size == 40 * MiB
    assert superblock(image).geo.nblocks == 40 * MiB // BLOCK_SIZE


def test_refuses_existing_nexfs_without_force(tmp_path: Path) -> None:
    image = tmp_path / "vol.img"
    assert tool("mkfs.nexfs", "--size", "64M", "-L", "keep me", image).returncode == 0
    old = superblock(image).uuid
    before = file_hash(image)
    refused(tool("mkfs.nexfs", image), r"contains a NexFS volume labelled 'keep me'.*--force")
    refused(tool("mkfs.nexfs", "--size", "64M", image), r"NexFS volume.*--force")
    assert file_hash(image) == before
    result = tool("mkfs.nexfs", "--force", image)
    assert result.returncode == 0, result.stderr
    assert superblock(image).uuid != old


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4")
def test_refuses_ext4_without_force(tmp_path: Path) -> None:
    image = tmp_path / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    before = file_hash(image)
    refused(tool("mkfs.nexfs", image), r"contains an existing ext4 filesystem.*--force")
    assert file_hash(image) == before
    assert tool("mkfs.nexfs", "-f", image).returncode == 0
    assert fsck(image, "-n", "-f").returncode == 0


def test_refuses_image_in_use(tmp_path: Path) -> None:
    image = tmp_path / "busy.img"
    assert tool("mkfs.nexfs", "--size", "32M", image).returncode == 0
    before = file_hash(image)
    with Valve.open(image):  # as a mount holds it
        refused(tool("mkfs.nexfs", "--force", image), r"in use")
    assert file_hash(image) == before


@pytest.mark.parametrize(("args", "pattern"), [
    (["--size", "1M"], r"too small"),
    (["--size", "64K"], r"too small"),
    (["--size", "12X"], r"not a size: '12X'"),
    (["--size=-5M"], r"not a size"),
    (["--size", ""], r"not a size"),
    ([], r"does not exist; give --size"),
    (["--size", "64M", "--label", "x" * 65], r"label is longer than 64 bytes"),
])
def test_bad_arguments(tmp_path: Path, args: list[str], pattern: str) -> None:
    image = tmp_path / "never.img"
    refused(tool("mkfs.nexfs", *args, image), pattern)
    assert not image.exists(), "a refused mkfs must not leave a file behind"


def test_directory_target(tmp_path: Path) -> None:
    refused(tool("mkfs.nexfs", tmp_path), r"is a directory")
    refused(tool("mkfs.nexfs", "--size", "64M", tmp_path), r"is a directory")


def test_uncreatable_target(tmp_path: Path) -> None:
    refused(tool("mkfs.nexfs", "--size", "64M", tmp_path / "no" / "such" / "dir.img"),
            r"cannot create")


def test_existing_file_too_small(tmp_path: Path) -> None:
    image = tmp_path / "tiny.img"
    image.write_bytes(b"\0" * 4096)
    refused(tool("mkfs.nexfs", image), r"smaller than 16M")
    assert image.stat().st_size == 4096


def test_usage_errors_and_help(tmp_path: Path) -> None:
    result = tool("mkfs.nexfs")
    assert result.returncode == 1 and "TARGET" in result.stderr
    result = tool("mkfs.nexfs", "--bogus", tmp_path / "x.img")
    assert result.returncode == 1 and "unrecognized arguments" in result.stderr
    result = tool("mkfs.nexfs", "--help")
    assert result.returncode == 0
    for word in ("--size", "--label", "--force", "exit status"):
        assert word in result.stdout


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[str]:
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(48 * MiB)
    with loop_device(backing) as dev:
        yield dev


def test_block_device(loop: str) -> None:
    result = tool("mkfs.nexfs", "-L", "on loop", loop)
    assert result.returncode == 0, result.stderr
    assert superblock(loop).geo.nblocks == 48 * MiB // BLOCK_SIZE
    refused(tool("mkfs.nexfs", loop), r"contains a NexFS volume")
    refused(tool("mkfs.nexfs", "--force", "--size", "64M", loop), r"--size applies to image")
    with Valve.open(loop) as v:
        fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
        try:
            ino = fs.create(ROOT_INO, b"on-the-device", 0o644, ROOT).ino
            fs.write(ino, 0, b"x" * 10_000, ROOT)
        finally:
            fs.close()
    assert fsck(Path(loop), "-n", "-f").returncode == 0
    info = tool("nexfs", "info", loop)
    assert info.returncode == 0 and "on loop" in info.stdout


def test_one_tebibyte_sparse(tmp_path: Path) -> None:
    """Formatting 1 TiB writes about a megabyte: seconds, not minutes."""
    image = tmp_path / "huge.img"
    started = time.monotonic()
    result = tool("mkfs.nexfs", "--size", "1T", image)
    mkfs_s = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert image.stat().st_size == TiB
    assert image.stat().st_blocks * 512 < 64 * MiB
    started = time.monotonic()
    with Valve.open(image) as v:
        fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
        try:
            ino = fs.create(ROOT_INO, b"f", 0o644, ROOT).ino
            fs.write(ino, 0, b"data" * 1000, ROOT)
            statfs = fs.statfs()
        finally:
            fs.close()
    open_s = time.monotonic() - started
    assert statfs.blocks == TiB // BLOCK_SIZE
    started = time.monotonic()
    check = fsck(image, "-n", "-f")
    fsck_s = time.monotonic() - started
    assert check.returncode == 0, check.stdout
    print(f"1 TiB: mkfs {mkfs_s:.2f} s, open+write+close {open_s:.2f} s, "
          f"fsck -n -f {fsck_s:.2f} s")
    assert mkfs_s < 60 and open_s < 60 and fsck_s < 60


def test_progress_when_slow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress lines appear once formatting takes longer than a moment (a clock that
    advances a second per look stands in for a slow device), and not on a quick run."""
    image = tmp_path / "p.img"
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert mkfs.main(["--size", "64M", str(image)]) == 0
    assert err.getvalue() == "", err.getvalue()

    clock = iter(range(10**6))
    monkeypatch.setattr(mkfs.time, "monotonic", lambda: float(next(clock)))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert mkfs.main(["--force", str(image)]) == 0
    lines = err.getvalue().splitlines()
    assert any(re.fullmatch(r"mkfs.nexfs: writing metadata: \d+/\d+ blocks", x) for x in lines)
    assert "mkfs.nexfs: writing superblocks" in lines


def test_label_and_uuid_reported(tmp_path: Path) -> None:
    image = tmp_path / "l.img"
    assert tool("mkfs.nexfs", "--size", "32M", "--label", "ünïcode", image).returncode == 0
    sb = superblock(image)
    info = tool("nexfs", "info", image)
    assert info.returncode == 0
    assert "ünïcode" in info.stdout and str(uuid.UUID(bytes=sb.uuid)) in info.stdout
    assert os.stat(image).st_mode & 0o777 == 0o600
