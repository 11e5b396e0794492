"""The full-disk explorer: every operation that can allocate, at every small amount of free
space, leaves a writable, fsck-clean volume and answers success or ENOSPC.

A base volume is built once on a real image file (through the valve, in-process) with no
free block and no free inode: a fresh (empty) directory; a deep one, eight levels down, with
a two-level index of 400 names and an xattr tree; files whose extent maps are inline (for
the fresh directory) and a tree (for the deep one), sparse files; a directory of empty files
holding every other inode, the first of which holds every other block.  Each case copies the
image, opens it, frees exactly ``ni`` inodes (unlinking empty files) and ``nb`` blocks
(cutting the big file), leaves those frees pending or checkpoints them, and runs one
operation in the fresh or the deep directory.  Then:

* the operation returned, or raised ENOSPC — nothing else;
* ENOSPC changed nothing (no change reached the store, no inode is left changed; in the
  long run also the whole visible namespace is compared);
* the volume is not in the error state and is still writable (freeing space, then creating
  and writing a file works);
* after closing, fsck.nexfs -n -f finds the image clean.

POSIX ACLs are in play: the deep directory has a default ACL (so creates there inherit an
access ACL, and mkdir the default ACL too), a chmod rewrites a file's access ACL, and setfacl
sets one.  Operations that only free (unlink, rmdir, removexattr, truncate) are run too:
they take no reservation, so an allocation inside them would be a ReservationError.

The default run takes a representative subset of the grid (every operation and directory,
10 amounts of free blocks from 0 to 16 with 16 free inodes, 0 and 1 free inodes: 600 cases,
about a minute on the shared CI box, mostly O_DIRECT waits); ``NEXFS_LONG=1`` runs the whole
product, 0..16 free blocks x 0..16 free inodes (14,450 cases, 26 minutes on the same box).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from fsutil import ROOT, fsck_clean, make_image, mounted
from fsview import take_view

from nexfs.core import acl as acls
from nexfs.core.attr import SetAttr
from nexfs.core.fs import RENAME_EXCHANGE, ROOT_INO, FileSystem
from nexfs.types import FsError

LONG = os.environ.get("NEXFS_LONG") == "1"
IMAGE_SIZE = 6 << 20
DEEP_NAMES = 400
BLOCK = 4096

Op = Callable[[FileSystem, int, str], object]


def _lookup(fs: FileSystem, path: str) -> int:
    ino = ROOT_INO
    for part in path.strip("/").split("/"):
        ino = fs.lookup(ino, part.encode(), ROOT).ino
    return ino


def _files(fs: FileSystem, d: int) -> int:
    """The directory of the files an operation in directory ``d`` works on: their extent
    maps are inline for the fresh directory, trees for the deep one."""
    deep = fs.lookup(d, b"..", ROOT).ino != ROOT_INO
    return _lookup(fs, "files-deep" if deep else "files-fresh")


def _file(fs: FileSystem, d: int, which: str) -> int:
    return fs.lookup(_files(fs, d), which.encode(), ROOT).ino


# A non-minimal ACL (a named user needs a mask): as the deep directory's default ACL every
# create there inherits an access ACL, and a directory the default ACL too.
ACL = acls.encode((acls.Entry(acls.USER_OBJ, 7), acls.Entry(acls.USER, 6, 1000),
                   acls.Entry(acls.GROUP_OBJ, 5), acls.Entry(acls.MASK, 7),
                   acls.Entry(acls.OTHER, 5)))


def _symlink(length: int) -> Op:
    return lambda fs, d, t: fs.symlink(d, f"s-{t}".encode(), b"t" * length, ROOT)


OPS: dict[str, Op] = {
    "create": lambda fs, d, t: fs.create(d, f"c-{t}".encode(), 0o644, ROOT),
    "mknod": lambda fs, d, t: fs.mknod(d, f"n-{t}".encode(), 0o10644, 0, ROOT),
    "mkdir": lambda fs, d, t: fs.mkdir(d, f"m-{t}".encode(), 0o755, ROOT),
    "symlink short": _symlink(40),
    "symlink 128": _symlink(128),
    "symlink long": _symlink(3000),
    "symlink max": _symlink(4095),
    "link": lambda fs, d, t: fs.link(_lookup(fs, "linksrc"), d, f"l-{t}".encode(), ROOT),
    "rename into": lambda fs, d, t: fs.rename(ROOT_INO, b"mover", d, f"r-{t}".encode(), 0,
                                              ROOT),
    "rename over": lambda fs, d, t: fs.rename(ROOT_INO, b"mover", _files(fs, d), b"victim",
                                              0, ROOT),
    "rename exchange": lambda fs, d, t: fs.rename(ROOT_INO, b"mover", _files(fs, d), b"victim",
                                                  RENAME_EXCHANGE, ROOT),
    "setxattr small": lambda fs, d, t: fs.setxattr(d, f"user.s{t}".encode(), b"v" * 20, 0,
                                                   ROOT),
    "setxattr 3k": lambda fs, d, t: fs.setxattr(d, f"user.m{t}".encode(), b"v" * 3000, 0,
                                                ROOT),
    "setxattr 9k": lambda fs, d, t: fs.setxattr(d, f"user.b{t}".encode(), b"v" * 9000, 0,
                                                ROOT),
    "setxattr replace": lambda fs, d, t: fs.setxattr(d, b"user.kept", b"w" * 5000, 0, ROOT),
    "append 1 block": lambda fs, d, t: fs.write(
        _file(fs, d, "data"), fs.getattr(_file(fs, d, "data")).size, b"a" * BLOCK, ROOT),
    "append 5 blocks": lambda fs, d, t: fs.write(
        _file(fs, d, "data"), fs.getattr(_file(fs, d, "data")).size, b"a" * 5 * BLOCK, ROOT),
    "append 100 KiB": lambda fs, d, t: fs.write(
        _file(fs, d, "data"), fs.getattr(_file(fs, d, "data")).size, b"a" * 102400, ROOT),
    "fill holes": lambda fs, d, t: fs.write(_file(fs, d, "sparse"), 0, b"h" * 8 * BLOCK,
                                            ROOT),
    "overwrite": lambda fs, d, t: fs.write(_file(fs, d, "data"), 10, b"o" * 2 * BLOCK, ROOT),
    "truncate up": lambda fs, d, t: fs.setattr(_file(fs, d, "data"), SetAttr(size=1 << 30),
                                               ROOT),
    # POSIX ACLs: the access ACL a chmod rewrites, and one set on the directory itself.
    "chmod with ACL": lambda fs, d, t: fs.setattr(_file(fs, d, "withacl"), SetAttr(mode=0o600),
                                                  ROOT),
    "setfacl": lambda fs, d, t: fs.setxattr(d, acls.ACCESS, ACL, 0, ROOT),
    # Operations that only free: they must never need the reservation they do not take.
    "unlink": lambda fs, d, t: fs.unlink(_files(fs, d), b"victim", ROOT),
    "rmdir": lambda fs, d, t: fs.rmdir(_files(fs, d), b"emptydir", ROOT),
    "removexattr": lambda fs, d, t: fs.removexattr(d if fs.listxattr(d) else _files(fs, d),
                                                   b"user.kept", ROOT),
    "truncate down": lambda fs, d, t: fs.setattr(_file(fs, d, "data"), SetAttr(size=5000),
                                                 ROOT),
}


@dataclass(frozen=True)
class Case:
    op: str
    where: str  # "fresh" or "deep"
    nb: int  # free blocks
    ni: int  # free inodes
    pending: bool  # the frees that made the room are not checkpointed yet

    @property
    def label(self) -> str:
        return f"{self.op}/{self.where}/b{self.nb}/i{self.ni}{'/pending' if self.pending else ''}"


DIRS = {"fresh": "fresh", "deep": "a/b/c/d/e/f/g/deep"}


def _cases() -> list[Case]:
    if LONG:
        grid = [(nb, ni) for nb in range(17) for ni in range(17)]
    else:
        grid = [(nb, 16) for nb in (0, 1, 2, 3, 4, 5, 6, 8, 12, 16)] + [(16, 0), (3, 1)]
    return [Case(op, where, nb, ni, pending=(nb + ni) % 2 == 1)
            for op in OPS for where in DIRS for nb, ni in grid]


@contextmanager
def _open(path: Path) -> Iterator[FileSystem]:
    with mounted(path, atime="noatime") as fs:
        yield fs


def _build(path: Path) -> None:
    """The base volume: no free block and no free inode (see the module docstring)."""
    make_image(path, IMAGE_SIZE)
    with _open(path) as fs:
        fs.mkdir(ROOT_INO, b"fresh", 0o755, ROOT)  # stays empty: no index, no xattrs
        d = ROOT_INO
        for part in DIRS["deep"].split("/"):
            d = fs.mkdir(d, part.encode(), 0o755, ROOT).ino
        deep = d
        src = fs.create(ROOT_INO, b"linksrc", 0o644, ROOT).ino
        for i in range(DEEP_NAMES):
            fs.link(src, deep, f"a-longer-name-to-fill-index-leaves-{i:04d}".encode(), ROOT)
        for i in range(6):
            fs.setxattr(deep, f"user.x{i}".encode(), b"x" * 900, 0, ROOT)
        fs.setxattr(deep, b"user.kept", b"k" * 10, 0, ROOT)
        fs.setxattr(deep, acls.DEFAULT, ACL, 0, ROOT)
        # The files operated on: an inline extent map for the fresh directory, a tree for
        # the deep one (interleaved single-block writes make one extent per block).
        fdirs = [fs.mkdir(ROOT_INO, f"files-{w}".encode(), 0o755, ROOT).ino for w in DIRS]
        for fd in fdirs:
            fs.setxattr(fd, b"user.kept", b"k" * 10, 0, ROOT)
            fs.mkdir(fd, b"emptydir", 0o755, ROOT)
            fs.create(fd, b"victim", 0o644, ROOT)
            acl_file = fs.create(fd, b"withacl", 0o644, ROOT).ino
            fs.setxattr(acl_file, acls.ACCESS, ACL, 0, ROOT)
            sparse = fs.create(fd, b"sparse", 0o644, ROOT).ino
            for i in range(0, 40, 4):
                fs.write(sparse, i * BLOCK, b"s" * BLOCK, ROOT)
        fs.create(ROOT_INO, b"mover", 0o644, ROOT)
        plain = fs.create(fdirs[0], b"data", 0o644, ROOT).ino
        fs.write(plain, 0, b"d" * 3 * BLOCK, ROOT)
        frag = fs.create(fdirs[1], b"data", 0o644, ROOT).ino
        spacer = fs.create(ROOT_INO, b"spacer", 0o644, ROOT).ino
        for i in range(20):
            fs.write(frag, i * BLOCK, b"f" * BLOCK, ROOT)
            fs.write(spacer, i * BLOCK, b"g" * BLOCK, ROOT)
        # The shapes the cases rely on: an extent tree, a two-level index, an xattr tree.
        assert fs.objects.data(fs.inodes.get(frag)).emap.worst_case_new_blocks(1) >= 2
        assert fs.objects.dir_index(fs.inodes.get(deep))._tree.levels() >= 2
        assert fs.inodes.get(deep).xattr_root
        fresh = fs.inodes.get(_lookup(fs, DIRS["fresh"]))
        assert fs.objects.dir_index(fresh).is_empty() and not fresh.xattr_root and not fresh.blocks
        inodes = fs.mkdir(ROOT_INO, b"inodes", 0o755, ROOT).ino
        i = 0
        while fs.store.state.free_inodes:
            fs.create(inodes, f"i{i}".encode(), 0o644, ROOT)
            i += 1
        filler = _lookup(fs, "inodes/i0")
        size = 0
        for chunk in (1 << 20, 1 << 16, BLOCK):
            while True:
                try:
                    fs.write(filler, size, bytes(chunk), ROOT)
                except FsError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
                size += chunk
        assert fs.store.state.free_blocks == 0 and fs.store.state.free_inodes == 0


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("full") / "base.img"
    _build(path)
    return path


def _make_room(fs: FileSystem, nb: int, ni: int, pending: bool) -> None:
    inodes = _lookup(fs, "inodes")
    for i in range(1, ni + 1):
        fs.unlink(inodes, f"i{i}".encode(), ROOT)
    filler = _lookup(fs, "inodes/i0")
    size = fs.getattr(filler).size
    have = fs.store.state.free_blocks
    assert have <= nb, f"unlinking {ni} empty files freed {have} blocks"
    fs.setattr(filler, SetAttr(size=size - (nb - have) * BLOCK), ROOT)
    fs.commit(durable=False)
    if not pending:
        fs.store.checkpoint()
    st = fs.store.state
    assert (st.free_blocks, st.free_inodes) == (nb, ni)


def _still_writable(fs: FileSystem, d: int) -> None:
    fs.unlink(_lookup(fs, "inodes"), b"i0", ROOT)  # the filler: plenty of room again
    fs.setattr(d, SetAttr(mode=0o750), ROOT)  # with an access ACL (setfacl) this needs room
    ino = fs.create(d, b"afterwards", 0o644, ROOT).ino
    assert fs.write(ino, 0, b"z" * 3 * BLOCK, ROOT) == 3 * BLOCK


def run_case(base: Path, work: Path, case: Case) -> str:
    """Run one case on a copy of ``base``; returns "ok" or "ENOSPC" (asserting the rest)."""
    shutil.copyfile(base, work)
    with _open(work) as fs:
        _make_room(fs, case.nb, case.ni, case.pending)
        d = _lookup(fs, DIRS[case.where])
        skip = frozenset({"lost+found", "inodes"})
        before = take_view(fs, skip=skip) if LONG else None  # (the default run: see below)
        mark = fs.store.change_count()
        try:
            OPS[case.op](fs, d, "new")
            outcome = "ok"
        except FsError as exc:
            assert exc.errno == errno.ENOSPC, f"{case.label}: {exc!r}"
            assert fs.error is None, f"{case.label}: ENOSPC put the volume in error: {fs.error}"
            assert fs.store.change_count() == mark, f"{case.label}: ENOSPC after changes"
            assert not fs.inodes.has_dirty(), f"{case.label}: ENOSPC left a changed inode"
            if before is not None:  # the whole namespace, in the long run only (time)
                assert take_view(fs, skip=skip) == before, f"{case.label}: ENOSPC changed it"
            outcome = "ENOSPC"
        assert fs.error is None and not fs.read_only, f"{case.label}: {fs.error}"
        _still_writable(fs, d)
        assert fs.error is None, f"{case.label}: {fs.error}"
    code, out = fsck_clean(work)
    assert code == 0, f"{case.label}: fsck exit {code}\n{out}"
    return outcome


def test_full_disk_explorer(base: Path, tmp_path: Path) -> None:
    cases = _cases()
    outcomes: dict[str, dict[str, int]] = {}
    failed: list[str] = []
    for case in cases:
        try:
            outcome = run_case(base, tmp_path / "case.img", case)
        except AssertionError as exc:
            failed.append(str(exc).splitlines()[0])
            continue
        outcomes.setdefault(case.op, {}).setdefault(outcome, 0)
        outcomes[case.op][outcome] += 1
    print(f"{len(cases)} cases:", outcomes)
    assert not failed, f"{len(failed)} of {len(cases)} cases failed: {failed[:8]}"
    # Everything fits with 16 free blocks and inodes; with none, everything that needs a
    # new block or inode is refused.
    for op in ("create", "mkdir", "symlink long", "link", "rename into", "setxattr 3k",
               "append 1 block", "fill holes"):
        assert set(outcomes[op]) == {"ok", "ENOSPC"}, (op, outcomes[op])
    for op in ("rename over", "rename exchange", "overwrite", "truncate up", "truncate down",
               "unlink", "rmdir", "removexattr"):
        assert set(outcomes[op]) == {"ok"}, (op, outcomes[op])
