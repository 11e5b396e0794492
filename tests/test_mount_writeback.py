"""What ``tar x`` set through the mount is what ``stat`` shows, at once, after a remount, and
after a ``sync`` followed by ``kill -9`` (journal replay): inodes are written back once per
commit (nexfs/core/inode_cache.py), so the attributes live in the daemon's memory between
two commits and must reach the volume with the commit, whoever triggers it.

The archive has files, directories, symlinks and hard links with varied modes (set-ID bits
and sticky included), owners, sizes and times, so that every SETATTR tar sends (utimensat,
fchown, fchmod) and the kernel's own (the mtime flush of the writeback cache) is covered.
"""

from __future__ import annotations

import io
import os
import random
import signal
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from mountutil import Mount, Mounter, mounter_fixture  # noqa: F401

pytestmark = pytest.mark.mount

Expected = dict[str, tuple[int, int, int, int, int]]


def _archive(path: Path, rng: random.Random, nfiles: int) -> Expected:
    """Write the tar; returns name -> (type and mode, uid, gid, size, mtime) tar must set.
    Members are in depth-first order, as tar itself writes them: tar sets a directory's
    times when it leaves it, so a directory whose members came later would show the time of
    the last of them (on ext4 too)."""
    base = 1_600_000_000
    dirs = ["t"]
    members: list[tuple[str, str]] = [("t", "dir")]
    for i in range(nfiles):
        kind = rng.choice(["file", "file", "file", "dir", "symlink", "link"])
        name = f"{rng.choice(dirs)}/e{i}"
        if kind == "dir":
            dirs.append(name)
        members.append((name, kind))
    members.sort(key=lambda m: m[0].split("/"))
    expected: Expected = {}
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind in members:
            info = tarfile.TarInfo(name)
            info.uid, info.gid = rng.choice([(0, 0), (1234, 5678), (65534, 100)])
            info.mtime = base + rng.randrange(10**7)
            data = b""
            files = [k for k, v in expected.items() if stat.S_ISREG(v[0])]
            if kind == "link" and not files:
                kind = "file"
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755 if name == "t" else rng.choice([0o755, 0o1777, 0o2750])
            elif kind == "symlink":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, "target" * 3, 0o777
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, rng.choice(files)
                expected[name] = expected[info.linkname]
                tar.addfile(info)
                continue
            else:
                info.mode = rng.choice([0o644, 0o600, 0o4755, 0o2755, 0o755, 0o444])
                data = rng.randbytes(rng.choice([0, 10, 4096, 5000, 40_000]))
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            mode = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}.get(kind, stat.S_IFREG)
            size = len(data) if kind == "file" else len(info.linkname) if kind == "symlink" \
                else -1
            expected[name] = (mode | info.mode, info.uid, info.gid, size, info.mtime)
    return expected


def _seen(root: Path, expected: Expected) -> Expected:
    out: Expected = {}
    for name, want in expected.items():
        st = os.lstat(root / name)
        out[name] = (st.st_mode, st.st_uid, st.st_gid, st.st_size if want[3] >= 0 else -1,
                     int(st.st_mtime))
    return out


def _nlinks(root: Path, expected: Expected) -> dict[str, int]:
    return {name: os.lstat(root / name).st_nlink for name in expected}


def test_tar_attributes_reach_the_volume(mounter: Mounter, tmp_path: Path) -> None:
    rng = random.Random(11)
    tarball = tmp_path / "t.tar"
    expected = _archive(tarball, rng, 400)
    image = mounter.image()
    m = mounter.mount(image)
    subprocess.run(["tar", "-xpf", str(tarball), "-C", str(m.mountpoint)], check=True)
    assert _seen(m.mountpoint, expected) == expected
    links = _nlinks(m.mountpoint, expected)
    assert m.unmount() == 0
    m = mounter.mount(image)
    assert _seen(m.mountpoint, expected) == expected, "after a remount"
    assert _nlinks(m.mountpoint, expected) == links
    # Changed again, synced, then the daemon killed: the replayed journal must hold the
    # write-back of every inode the second extract changed.
    subprocess.run(["rm", "-rf", str(m.mountpoint / "t")], check=True)
    subprocess.run(["tar", "-xpf", str(tarball), "-C", str(m.mountpoint)], check=True)
    os.sync()
    m.signal(signal.SIGKILL)
    m.wait()
    m.kill()  # detach the dead mount
    mounter.needs_fsck.discard(image)
    m = mounter.mount(image)
    assert _seen(m.mountpoint, expected) == expected, "after sync and kill -9"
    assert _nlinks(m.mountpoint, expected) == links
