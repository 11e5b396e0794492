"""Inodes are written back once per commit (nexfs/core/inode_cache.py): whatever commits,
the inodes changed before it are in the commit, and nothing else about an operation changed.

* Every operation that changes an inode, in a random sequence, then a commit through the
  store itself (``Store.commit``, as the timer, fsync, a full transaction and the store's own
  commit before an ENOSPC all end up there, none through ``FileSystem.commit``), then a
  power cut (nothing more written): the volume reopens with exactly the attributes every
  name had before the cut, and fsck finds nothing.
* The dirty set stays bounded however many inodes change between commits.
* An operation that fails before changing anything is an ordinary failure even while other
  inodes wait for their write-back; one that fails after changing an inode is "half-way".
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
from fsutil import ROOT, fsck_clean, make_image, mounted

from nexfs.core.attr import Attr, SetAttr
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.types import FsError
from valve import Rights, Valve

LONG = os.environ.get("NEXFS_LONG") == "1"
SEEDS = range(40) if LONG else range(6)


def _names(fs: FileSystem, d: int = ROOT_INO, prefix: str = "") -> dict[str, Attr]:
    """Every name under ``d`` with its attributes (atime left out: reads may set it)."""
    out: dict[str, Attr] = {}
    for name, attr, _cookie in fs.readdir(d, 0):
        if name in (b".", b"..", b"lost+found"):
            continue
        path = prefix + name.decode()
        out[path] = attr
        if attr.mode & 0o170000 == 0o040000:
            out.update(_names(fs, attr.ino, path + "/"))
    return out


def _comparable(names: dict[str, Attr]) -> dict[str, tuple[object, ...]]:
    return {k: (a.ino, a.mode, a.nlink, a.uid, a.gid, a.size, a.blocks, a.mtime_ns,
                a.ctime_ns, a.generation) for k, a in names.items()}


def _workload(fs: FileSystem, rng: random.Random, steps: int) -> None:
    files: list[int] = []
    dirs = [ROOT_INO]
    for step in range(steps):
        op = rng.choice(["create", "mkdir", "write", "chmod", "chown", "utimes", "link",
                         "rename", "symlink", "setxattr", "unlink", "unlink_open",
                         "truncate"])
        if op not in ("create", "mkdir", "symlink") and not files:
            op = "create"
        parent = rng.choice(dirs)
        name = f"n{step}".encode()
        if op == "create":
            files.append(fs.create(parent, name, 0o644, ROOT).ino)
        elif op == "mkdir":
            dirs.append(fs.mkdir(parent, name, 0o755, ROOT).ino)
        elif op == "symlink":
            fs.symlink(parent, name, b"t" * rng.choice([10, 3000]), ROOT)
        elif op == "write":
            fs.write(rng.choice(files), rng.randrange(0, 20_000), b"w" * rng.randrange(1, 9000),
                     ROOT)
        elif op == "chmod":
            fs.setattr(rng.choice(files), SetAttr(mode=rng.choice([0o600, 0o4755, 0o640])),
                       ROOT)
        elif op == "chown":
            fs.setattr(rng.choice(files), SetAttr(uid=rng.randrange(5), gid=rng.randrange(5)),
                       ROOT)
        elif op == "utimes":
            fs.setattr(rng.choice(files), SetAttr(mtime_ns=rng.randrange(1 << 50),
                                                  atime_ns=rng.randrange(1 << 50)), ROOT)
        elif op == "truncate":
            fs.setattr(rng.choice(files), SetAttr(size=rng.randrange(0, 30_000)), ROOT)
        elif op == "setxattr":
            fs.setxattr(rng.choice(files), b"user.k", b"v" * rng.randrange(1, 2000), 0, ROOT)
        elif op in ("link", "rename", "unlink", "unlink_open"):
            entries = [(d, n, a.ino) for d in dirs for n, a, _ in fs.readdir(d, 0)
                       if n not in (b".", b"..", b"lost+found") and a.mode & 0o170000 == 0o100000]
            if not entries:
                continue
            d, n, ino = rng.choice(entries)
            if op == "link":
                fs.link(ino, parent, name, ROOT)
            elif op == "rename":
                fs.rename(d, n, parent, name, 0, ROOT)
            else:
                if op == "unlink_open":
                    fs.ref(ino)  # open: it goes on the orphan list, freed at the last unref
                fs.unlink(d, n, ROOT)
                if op == "unlink_open" and rng.random() < 0.5:
                    fs.unref(ino)
                if ino in files and not any(i == ino for _d, _n, i in entries
                                            if (_d, _n) != (d, n)):
                    files.remove(ino)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_store_commit_holds_every_inode_changed_before_it(tmp_path: Path, seed: int) -> None:
    image = make_image(tmp_path / "vol.img", 64 << 20)
    rng = random.Random(seed)
    with Valve.open(image) as v:
        fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
        _workload(fs, rng, 60)
        last = fs.create(ROOT_INO, b"last", 0o644, ROOT).ino
        if not fs.inodes.dirty_count():  # the create reached the limit and wrote them back
            fs.setattr(last, SetAttr(mode=0o600), ROOT)
        assert fs.inodes.dirty_count(), "nothing waiting for write-back: the test tests nothing"
        fs.store.commit(durable=True)  # the store's own commit, not FileSystem.commit
        expected = _comparable(_names(fs))
        fs.setattr(ROOT_INO, SetAttr(mode=0o700), ROOT)  # after the commit: must be lost
        fs.store.abort()  # power cut: nothing more reaches the device
    with mounted(image) as fs:
        assert _comparable(_names(fs)) == expected
        assert fs.getattr(ROOT_INO).mode & 0o777 == 0o755
    code, out = fsck_clean(image)
    assert code == 0, out


def test_dirty_inodes_stay_bounded(fs: FileSystem) -> None:
    """Changing many inodes between two commits writes them back in bounded groups: the
    dirty set never exceeds the limit and the running transaction stays far below the
    journal's limit."""
    limit = fs._dirty_limit  # (the bound under test)
    inos = [fs.create(ROOT_INO, f"f{i}".encode(), 0o644, ROOT).ino for i in range(3 * limit)]
    fs.commit()
    most = 0
    for ino in inos:
        fs.setattr(ino, SetAttr(mode=0o600), ROOT)
        most = max(most, fs.inodes.dirty_count())
        assert fs.store.txn_blocks <= fs.store.max_txn_blocks // 2
    assert 0 < most <= limit


def test_ordinary_failure_while_inodes_wait_is_quiet(fs: FileSystem) -> None:
    """ENOENT/EEXIST before any change stay ordinary answers although earlier operations'
    inodes are still waiting for their write-back."""
    a = fs.create(ROOT_INO, b"a", 0o644, ROOT)
    fs.setattr(a.ino, SetAttr(mode=0o600), ROOT)
    assert fs.inodes.dirty_count()
    for call, code in ((lambda: fs.unlink(ROOT_INO, b"missing", ROOT), errno.ENOENT),
                       (lambda: fs.create(ROOT_INO, b"a", 0o644, ROOT), errno.EEXIST),
                       (lambda: fs.rmdir(ROOT_INO, b"a", ROOT), errno.ENOTDIR)):
        with pytest.raises(FsError) as ei:
            call()
        assert ei.value.errno == code
        assert fs.error is None and not fs.read_only
    assert fs.getattr(a.ino).mode & 0o777 == 0o600


def test_failure_after_an_inode_changed_is_half_way(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """An operation that changed an inode in memory and then failed is decided "half-way"
    (the volume goes read-only), even when it changed no block of the store."""
    with mounted(make_image(tmp_path / "vol.img")) as fs:
        _fail_after_a_change(fs)
    assert "operation failed half-way" in caplog.text


def _fail_after_a_change(fs: FileSystem) -> None:
    a = fs.create(ROOT_INO, b"a", 0o644, ROOT)
    fs.commit()

    def broken(self: FileSystem) -> None:
        inode = self.inodes.get(a.ino)
        inode.mode = 0o100000
        self.objects.dirty(inode)
        raise FsError(errno.EIO, "injected after the change")

    from nexfs.core import fs as fsmod

    with pytest.raises(FsError):
        fsmod._mutating(broken)(fs)  # (the wrapper under test)
    assert fs.error is not None and fs.read_only


@pytest.mark.parametrize("atime", ["relatime", "strictatime"])
@pytest.mark.parametrize("entry", ["open", "read", "readdir"])
def test_atime_updates_of_many_inodes_stay_within_the_journal(tmp_path: Path, entry: str,
                                                              atime: str) -> None:
    """Reads change inodes too (the atime, nexfs/core/fs.py ``_note_access``), outside any
    mutating operation.  Reading more inodes than one transaction can hold table blocks for
    (16 per block), within one commit interval, must commit on the way: the first version
    wrote them all into the running transaction, which then exceeded the journal and put the
    volume in its error state (read-only) after 4,063 opens of freshly written files on a
    64 MiB volume."""
    image = make_image(tmp_path / "vol.img", 64 << 20)
    with mounted(image, atime=atime) as fs:
        store = fs.store
        n = min(store.geo.ninodes - 8, 16 * store.max_txn_blocks + 64)
        assert n > 16 * store.max_txn_blocks, "the volume has too few inodes to test this"
        if entry == "readdir":
            inos = [fs.mkdir(ROOT_INO, f"d{i}".encode(), 0o755, ROOT).ino for i in range(n)]
        else:
            inos = [fs.create(ROOT_INO, f"f{i}".encode(), 0o644, ROOT).ino for i in range(n)]
            for ino in inos:
                fs.write(ino, 0, b"x", ROOT)
        fs.commit()
        for ino in inos:
            if entry == "open":
                fs.note_read_open(ino)
            elif entry == "read":
                assert fs.read(ino, 0, 1) == b"x"
            else:
                list(fs.readdir(ino, 0))
            assert fs.error is None, fs.error
            assert store.txn_blocks <= store.max_txn_blocks // 2
    code, out = fsck_clean(image)
    assert code == 0, out
