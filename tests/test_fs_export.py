"""The core's side of file handles and of overlayfs's whiteouts, driven in-process.

File handles: LOOKUP(ino, ".") must answer for any live inode of any type, and ENOENT (the
kernel's ESTALE) for a deleted one; the generation must survive a remount and change when an
inode number is reused.  Whiteouts: renameat2(RENAME_WHITEOUT) leaves a 0/0 character device
behind in the same operation.
"""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import pytest
from fsutil import ROOT, USER, mounted

from nexfs.core.attr import Ctx
from nexfs.core.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, ROOT_INO, FileSystem
from nexfs.types import FsError


def err(fn: object, *args: object) -> int:
    with pytest.raises(FsError) as ei:
        fn(*args)  # type: ignore[operator]
    return ei.value.errno


def test_dot_lookup_answers_every_live_inode(fs: FileSystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", 0o700, ROOT)
    f = fs.create(d.ino, b"f", 0o600, ROOT)
    s = fs.symlink(d.ino, b"s", b"target", ROOT)
    n = fs.mknod(d.ino, b"n", stat.S_IFIFO | 0o600, 0, ROOT)
    for attr in (d, f, s, n):
        # No permission is checked: the kernel only asks after CAP_DAC_READ_SEARCH was.
        got = fs.lookup(attr.ino, b".", USER)
        assert (got.ino, got.generation, got.mode) == (attr.ino, attr.generation, attr.mode)
    assert fs.lookup(d.ino, b"..", ROOT).ino == ROOT_INO


def test_dot_lookup_of_deleted_and_reused_inodes(fs: FileSystem) -> None:
    f = fs.create(ROOT_INO, b"f", 0o644, ROOT)
    fs.unlink(ROOT_INO, b"f", ROOT)
    assert err(fs.lookup, f.ino, b".", ROOT) == errno.ENOENT
    g = fs.create(ROOT_INO, b"g", 0o644, ROOT)
    assert g.ino == f.ino and g.generation != f.generation
    assert fs.lookup(g.ino, b".", ROOT).generation == g.generation
    # Unlinked but still open: no name left, so no handle resolves to it.
    fs.ref(g.ino)
    fs.unlink(ROOT_INO, b"g", ROOT)
    assert err(fs.lookup, g.ino, b".", ROOT) == errno.ENOENT
    fs.unref(g.ino)
    for bad in (0, 10**9):
        assert err(fs.lookup, bad, b".", ROOT) == errno.ENOENT


def test_generations_survive_a_remount(image: Path) -> None:
    with mounted(image) as fs:
        made = [fs.create(ROOT_INO, f"f{i}".encode(), 0o644, ROOT) for i in range(5)]
        fs.unlink(ROOT_INO, b"f2", ROOT)
    with mounted(image) as fs:
        for attr in made:
            if attr.ino == made[2].ino:
                assert err(fs.lookup, attr.ino, b".", ROOT) == errno.ENOENT
            else:
                assert fs.lookup(attr.ino, b".", ROOT).generation == attr.generation
        again = fs.create(ROOT_INO, b"again", 0o644, ROOT)
        assert again.generation not in {a.generation for a in made}


# -- RENAME_WHITEOUT -----------------------------------------------------------------------


def test_rename_whiteout(fs: FileSystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    f = fs.create(ROOT_INO, b"f", 0o644, ROOT)
    fs.write(f.ino, 0, b"data", ROOT)
    fs.rename(ROOT_INO, b"f", d.ino, b"moved", RENAME_WHITEOUT, ROOT)
    assert fs.lookup(d.ino, b"moved", ROOT).ino == f.ino
    wh = fs.lookup(ROOT_INO, b"f", ROOT)
    assert wh.mode == stat.S_IFCHR and wh.rdev == 0 and wh.nlink == 1
    assert wh.ino != f.ino
    # Over an existing target (the target goes, as in a plain rename) and with NOREPLACE.
    g = fs.create(ROOT_INO, b"g", 0o644, ROOT)
    fs.rename(ROOT_INO, b"g", d.ino, b"moved", RENAME_WHITEOUT, ROOT)
    assert fs.lookup(d.ino, b"moved", ROOT).ino == g.ino
    assert fs.lookup(ROOT_INO, b"g", ROOT).mode == stat.S_IFCHR
    fs.create(ROOT_INO, b"h", 0o644, ROOT)
    assert err(fs.rename, ROOT_INO, b"h", d.ino, b"moved",
               RENAME_WHITEOUT | RENAME_NOREPLACE, ROOT) == errno.EEXIST
    fs.rename(ROOT_INO, b"h", d.ino, b"new", RENAME_WHITEOUT | RENAME_NOREPLACE, ROOT)
    assert stat.S_ISCHR(fs.lookup(ROOT_INO, b"h", ROOT).mode)
    # A directory can be renamed with a whiteout too (overlayfs does it on rmdir/rename).
    sub = fs.mkdir(ROOT_INO, b"sub", 0o755, ROOT)
    fs.rename(ROOT_INO, b"sub", d.ino, b"sub", RENAME_WHITEOUT, ROOT)
    assert fs.lookup(d.ino, b"sub", ROOT).ino == sub.ino
    assert stat.S_ISCHR(fs.lookup(ROOT_INO, b"sub", ROOT).mode)
    assert fs.getattr(d.ino).nlink == 3


def test_rename_whiteout_refusals(fs: FileSystem) -> None:
    fs.create(ROOT_INO, b"f", 0o644, ROOT)
    fs.create(ROOT_INO, b"g", 0o644, ROOT)
    assert err(fs.rename, ROOT_INO, b"f", ROOT_INO, b"g",
               RENAME_WHITEOUT | RENAME_EXCHANGE, ROOT) == errno.EINVAL
    assert err(fs.rename, ROOT_INO, b"f", ROOT_INO, b"g", 8, ROOT) == errno.EINVAL
    # Creating the whiteout is creating a device node: CAP_MKNOD (root) only.
    public = fs.mkdir(ROOT_INO, b"pub", 0o777, ROOT)
    fs.create(public.ino, b"mine", 0o644, USER)
    assert err(fs.rename, public.ino, b"mine", public.ino, b"other", RENAME_WHITEOUT,
               USER) == errno.EPERM
    assert err(fs.rename, ROOT_INO, b"nope", ROOT_INO, b"x", RENAME_WHITEOUT,
               ROOT) == errno.ENOENT
    # Same name: nothing to move, so nothing is left behind either.
    fs.rename(ROOT_INO, b"f", ROOT_INO, b"f", RENAME_WHITEOUT, ROOT)
    assert stat.S_ISREG(fs.lookup(ROOT_INO, b"f", ROOT).mode)


def test_rename_whiteout_owner_is_the_caller(fs: FileSystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", 0o777, ROOT)
    fs.create(d.ino, b"f", 0o644, ROOT)
    caller = Ctx(uid=0, gid=55)
    fs.rename(d.ino, b"f", d.ino, b"g", RENAME_WHITEOUT, caller)
    wh = fs.lookup(d.ino, b"f", ROOT)
    assert (wh.uid, wh.gid) == (0, 55)
