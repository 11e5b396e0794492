"""`nexfs info` and the `nexfs` command, run as console scripts in a subprocess."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest
from fsutil import ROOT, mounted
from imagekit import Vol, file_hash, fsck, tool

from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk.layout import Superblock
from nexfs.ondisk.metablock import BLOCK_SIZE
from valve import Rights, Valve

MiB = 1 << 20


def info(target: Path) -> dict[str, str]:
    """``nexfs info TARGET`` as a dict of its rows (it must succeed)."""
    result = tool("nexfs", "info", target)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(":")
        rows[key] = value.strip()
    return rows


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "vol.img"
    result = tool("nexfs", "mkfs", "--size", "64M", "--label", "cli test", path)
    assert result.returncode == 0, result.stderr
    return path


def test_info_fresh_volume(image: Path) -> None:
    rows = info(image)
    with open(image, "rb") as f:
        sb = Superblock.decode(f.read(BLOCK_SIZE), 0)
    assert rows["Volume label"] == "cli test"
    assert rows["UUID"] == str(uuid.UUID(bytes=sb.uuid))
    assert rows["State"] == "clean"
    assert rows["Size"] == "64.0 MiB (16384 blocks of 4096 bytes)"
    free = int(re.fullmatch(r".*\((\d+) blocks\)", rows["Free"]).group(1))  # type: ignore[union-attr]
    used = int(re.fullmatch(r".*\((\d+) blocks\)", rows["Used"]).group(1))  # type: ignore[union-attr]
    assert free + used == 16384 and free == Vol.of(image).state().free_blocks
    assert rows["Inodes"] == "2 used of 4096"  # the root and lost+found
    assert rows["Last checked"] == "never"


def test_info_follows_the_volume(image: Path) -> None:
    before = info(image)
    with mounted(image) as fs:
        ino = fs.create(ROOT_INO, b"big", 0o644, ROOT).ino
        for i in range(8):  # 1 MiB at a time, as the kernel sends them
            fs.write(ino, i * MiB, b"x" * MiB, ROOT)
    after = info(image)
    assert after["Inodes"] == "3 used of 4096"
    assert after["Free"] != before["Free"] and after["Free"].startswith("54.")
    assert int(after["Mount count"]) == int(before["Mount count"]) + 1

    # Not cleanly closed: "not clean"; info replays the journal in memory only.
    with Valve.open(image) as v:
        fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
        fs.create(ROOT_INO, b"more", 0o644, ROOT)
        fs.commit()
        fs.store.abort()
    unchanged = file_hash(image)
    rows = info(image)
    assert rows["State"].startswith("not clean")
    assert rows["Inodes"] == "4 used of 4096"
    assert file_hash(image) == unchanged

    # An error seen while mounted: "needs fsck (why)", until fsck clears it.
    with Valve.open(image) as v:
        fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
        fs.mark_error("test reason")
        fs.close()
    assert info(image)["State"] == "needs fsck (test reason)"
    assert fsck(image, "-y").returncode == 1
    rows = info(image)
    assert rows["State"] == "clean" and rows["Last checked"] != "never"


def test_info_with_damaged_state_block(image: Path) -> None:
    Vol.of(image).scribble(1, offset=40, nbytes=4)
    rows = info(image)
    assert rows["Volume label"] == "cli test"
    assert "state block is damaged" in rows["Free"]


def test_info_no_label(tmp_path: Path) -> None:
    path = tmp_path / "nolabel.img"
    assert tool("mkfs.nexfs", "-q", "--size", "32M", path).returncode == 0
    assert info(path)["Volume label"] == "<none>"


def test_info_refusals(image: Path, tmp_path: Path) -> None:
    def one_line(result_args: tuple[str | Path, ...], code: int, pattern: str) -> None:
        result = tool("nexfs", "info", *result_args)
        assert result.returncode == code, (result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert re.search(pattern, lines[-1]), result.stderr
        if code == 8:
            assert len(lines) == 1 and lines[0].startswith("nexfs info: ")

    one_line((tmp_path / "missing.img",), 8, r"no such file")
    zeros = tmp_path / "zeros.img"
    with open(zeros, "wb") as f:
        f.truncate(4 * MiB)
    one_line((zeros,), 8, r"not a NexFS volume")
    one_line((tmp_path,), 8, r".")
    with Valve.open(image):
        one_line((image,), 8, r"in use")
    one_line((), 1, r"TARGET")


def test_nexfs_command(image: Path) -> None:
    usage = tool("nexfs", "--help")
    assert usage.returncode == 0
    for command in ("mkfs", "fsck", "info", "mount"):
        assert re.search(rf"^\s+{command}\s", usage.stdout, re.MULTILINE), command
    bare = tool("nexfs")
    assert bare.returncode == 1 and "usage: nexfs" in bare.stdout
    unknown = tool("nexfs", "-x")
    assert unknown.returncode == 1 and "unknown command '-x'" in unknown.stderr
    check = tool("nexfs", "fsck", "-n", "-f", image)
    assert check.returncode == 0 and "clean" in check.stdout
    for command in ("mkfs", "fsck", "info"):
        helped = tool("nexfs", command, "--help")
        assert helped.returncode == 0 and "exit status" in helped.stdout, command


def test_tools_print_library_warnings_as_one_line(image: Path) -> None:
    """A warning logged inside the library (here: the primary superblock is unusable, the
    backup is used) reaches stderr as one line named after the tool."""
    Vol.of(image).scribble(0, offset=130, nbytes=4)
    result = tool("nexfs", "info", image)
    assert result.returncode == 0
    assert result.stderr.startswith("nexfs info: using superblock generation")
    assert len(result.stderr.strip().splitlines()) == 1
    assert os.path.getsize(image) == 64 * MiB
