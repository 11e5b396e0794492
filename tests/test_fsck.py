"""fsck.nexfs as scripts use it: the console script in a subprocess, its exit codes (as
e2fsck: 0 clean, 1 corrected, 4 left uncorrected, 8 operational error, 16 usage), -n never
changing a byte, -y repairing, and one line on stderr for anything it cannot do.

Damage of every structure is in test_corruption.py; this file is about the tool itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fsutil import ROOT, make_image, mounted
from imagekit import Vol, file_hash, fsck, tool

from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk.layout import STATE_CLEAN, STATE_ERROR, Superblock
from nexfs.ondisk.metablock import BLOCK_SIZE
from valve import Rights, Valve

MiB = 1 << 20


def superblock(path: Path) -> Superblock:
    with open(path, "rb") as f:
        return Superblock.decode(f.read(BLOCK_SIZE), 0)


def operational_error(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert result.returncode == 8, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsck.nexfs: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = make_image(tmp_path / "vol.img", 32 * MiB)
    with mounted(path) as fs:
        d = fs.mkdir(ROOT_INO, b"dir", 0o755, ROOT).ino
        for i in range(20):
            ino = fs.create(d, f"f{i}".encode(), 0o644, ROOT).ino
            fs.write(ino, 0, bytes([i]) * (i * 1000), ROOT)
    return path


def test_clean_volume(image: Path) -> None:
    quick = fsck(image)
    assert quick.returncode == 0 and "(clean)" in quick.stdout, quick.stdout
    for flags in (("-f",), ("-n", "-f"), ("-y", "-f"), ("-p", "-f")):
        before = file_hash(image) if "-n" in flags else None
        result = fsck(image, *flags)
        assert result.returncode == 0, (flags, result.stdout, result.stderr)
        assert re.search(r"test: \d+/\d+ files, \d+/\d+ blocks: clean", result.stdout)
        assert result.stderr == ""
        if before is not None:
            assert file_hash(image) == before


def test_no_changes_with_n_even_when_journal_needs_replay(image: Path) -> None:
    """A volume left with committed transactions in its journal (a crash): -n replays them
    in memory only and sees the files; -y writes them home and leaves the volume clean."""
    with Valve.open(image) as v:
        fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
        ino = fs.create(ROOT_INO, b"journaled", 0o644, ROOT).ino
        fs.write(ino, 0, b"j" * 5000, ROOT)
        fs.commit(durable=True)
        fs.store.abort()  # power cut: no checkpoint, no clean mark
    assert not superblock(image).state & STATE_CLEAN
    before = file_hash(image)
    result = fsck(image, "-n")  # not clean: checked without -f
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\d+/\d+ files.*: clean", result.stdout)
    assert file_hash(image) == before
    result = fsck(image, "-y")
    assert result.returncode == 0, result.stdout + result.stderr
    assert superblock(image).state == STATE_CLEAN
    with mounted(image, read_only=True) as fs:
        ino = fs.lookup(ROOT_INO, b"journaled", ROOT).ino
        assert fs.read(ino, 0, 10_000) == b"j" * 5000


def test_repair_then_clean(image: Path) -> None:
    vol = Vol.of(image)
    state = vol.state()
    state.free_inodes += 3
    vol.write_meta(state)
    before = file_hash(image)
    check = fsck(image, "-n")  # marked clean: without -f nothing is looked at
    assert check.returncode == 0 and "(clean)" in check.stdout
    check = fsck(image, "-n", "-f")
    assert check.returncode == 4
    assert "free inode count is" in check.stdout and "run with -y" in check.stdout
    assert file_hash(image) == before
    repair = fsck(image, "-y", "-f")
    assert repair.returncode == 1, repair.stdout
    assert "repaired" in repair.stdout
    again = fsck(image, "-n", "-f")
    assert again.returncode == 0, again.stdout


def test_preen_repairs_like_yes(image: Path) -> None:
    inode = Vol.of(image).inode(3)
    inode.nlink = 7
    Vol.of(image).write_inode(inode)
    assert fsck(image, "-p", "-f").returncode == 1
    assert fsck(image, "-n", "-f").returncode == 0


def test_marked_volume_is_checked_and_mark_cleared(image: Path) -> None:
    """A volume marked as needing fsck (an error seen while mounted, nothing damaged on
    disk) is checked even without -f; -n leaves the mark and says so (4), -y clears it (1)."""
    with Valve.open(image) as v:
        fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
        fs.mark_error("test: something looked wrong")
        fs.close()
    sb = superblock(image)
    assert sb.state & STATE_ERROR and sb.error_reason == "test: something looked wrong"
    before = file_hash(image)
    check = fsck(image, "-n")
    assert check.returncode == 4, check.stdout
    assert "needing fsck: test: something looked wrong" in check.stdout
    assert file_hash(image) == before
    assert fsck(image, "-y").returncode == 1
    sb = superblock(image)
    assert sb.state == STATE_CLEAN and sb.error_reason == "" and sb.check_time
    assert fsck(image).returncode == 0
    with mounted(image) as fs:
        assert not fs.read_only


def test_missing_target(tmp_path: Path) -> None:
    operational_error(fsck(tmp_path / "nope.img", "-n"), r"nope.img: no such file")


@pytest.mark.parametrize("content", ["zeros", "random"])
def test_not_nexfs(tmp_path: Path, content: str) -> None:
    path = tmp_path / "other.img"
    with open(path, "wb") as f:
        if content == "zeros":
            f.truncate(8 * MiB)
        else:
            f.write(os.urandom(8 * MiB))
    before = file_hash(path)
    for flags in (("-n",), ("-y", "-f")):
        operational_error(fsck(path, *flags), r"not a NexFS volume")
    assert file_hash(path) == before


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4")
def test_ext4_is_not_nexfs(tmp_path: Path) -> None:
    path = tmp_path / "ext4.img"
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)
    before = file_hash(path)
    operational_error(fsck(path, "-y", "-f"), r"not a NexFS volume")
    assert file_hash(path) == before


def test_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.img"
    path.write_bytes(b"NEXFS\0SB" + bytes(100))
    result = fsck(path, "-n")
    assert result.returncode == 8, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_directory_target(tmp_path: Path) -> None:
    result = fsck(tmp_path, "-n")
    assert result.returncode == 8
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("flags", [("-n",), ("-n", "-f"), ("-y", "-f")])
def test_in_use(image: Path, flags: tuple[str, ...]) -> None:
    """A mounted volume (the valve holds it) is refused, whatever the mode."""
    before = file_hash(image)
    with Valve.open(image):
        operational_error(fsck(image, *flags), r"in use")
    assert file_hash(image) == before


def test_usage(image: Path) -> None:
    both = fsck(image, "-n", "-y")
    assert both.returncode == 16 and "not allowed with" in both.stderr
    assert tool("fsck.nexfs").returncode == 16
    help_ = tool("fsck.nexfs", "--help")
    assert help_.returncode == 0
    text = " ".join(help_.stdout.split())
    for word in ("-n", "-y", "-f", "0 clean", "1 errors corrected", "4 errors left",
                 "8 operational error", "16 usage error"):
        assert word in text, word


@pytest.mark.slow
def test_directory_of_20000_entries(tmp_path: Path) -> None:
    """20,000 names in one directory: every one found by lookup, readdir (in one go and
    resumed page by page from its cookies, as the kernel reads it) returns each exactly
    once, and fsck finds the volume clean."""
    path = make_image(tmp_path / "wide.img", 512 * MiB)
    names = [f"entry-{i:05d}-{'x' * (i % 40)}".encode() for i in range(20_000)]
    with mounted(path) as fs:
        d = fs.mkdir(ROOT_INO, b"wide", 0o755, ROOT).ino
        inos = {name: fs.create(d, name, 0o644, ROOT).ino for name in names}
    assert len(set(inos.values())) == len(names)
    with mounted(path, read_only=True) as fs:
        for name in names:
            assert fs.lookup(d, name, ROOT).ino == inos[name]
        listed = [(n, a.ino) for n, a, _c in fs.readdir(d, 0)]
        assert listed[:2] == [(b".", d), (b"..", ROOT_INO)]
        assert sorted(listed[2:]) == sorted(inos.items())
        paged: list[bytes] = []
        cookie = 0
        while True:
            page = []
            for n, _a, c in fs.readdir(d, cookie):
                page.append(n)
                cookie = c
                if len(page) == 700:
                    break
            if not page:
                break
            paged.extend(page)
        assert sorted(paged) == sorted([b".", b"..", *names])
        assert fs.getattr(d).nlink == 2
    result = fsck(path, "-n", "-f")
    assert result.returncode == 0, result.stdout
    assert "20003/" in result.stdout  # root, lost+found, the directory and its files
