"""The core's side of issue 10, defects 9-13, in-process: rights checked at open (ftruncate
through a descriptor opened for writing, opens for execve checked as execute), set-ID
clearing on every chown, the atime rules of relatime/strictatime/noatime, and the clock the
core stamps times with (the kernel's).  tests/test_mount_posix.py checks the same through a
real mount."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest
from fsutil import OTHER, ROOT, USER

from nexfs.core import fs as fs_module
from nexfs.core.attr import Ctx, SetAttr
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.types import FsError

FMODE_EXEC = 0o40  # the kernel's __FMODE_EXEC, in the open flags FUSE passes for an execve
GROUP = Ctx(uid=1002, gid=USER.gid)  # in the group of USER's files, not their owner
DAY_NS = 86400 * 10**9


def _errno(fn: object, *args: object, **kwargs: object) -> int:
    try:
        fn(*args, **kwargs)  # type: ignore[operator]
    except FsError as exc:
        return exc.errno
    return 0


def test_truncate_through_a_write_descriptor(fs: FileSystem) -> None:
    """Defect 9: a size change through a descriptor opened for writing is not checked
    against the mode again; by name it is."""
    d = fs.mkdir(ROOT_INO, b"d", 0o777, ROOT)
    for mode in (0o000, 0o400, 0o444, 0o200):
        f = fs.create(d.ino, f"f{mode:o}".encode(), mode, USER)
        fs.write(f.ino, 0, b"hello world", USER)
        by_name = _errno(fs.setattr, f.ino, SetAttr(size=5), USER)
        assert by_name == (0 if mode & 0o200 else errno.EACCES), oct(mode)
        assert fs.setattr(f.ino, SetAttr(size=3), USER, opened_for_write=True).size == 3
        assert fs.read(f.ino, 0, 100) == b"hel"
        # The descriptor's right does not lift the other checks.
        assert _errno(fs.setattr, d.ino, SetAttr(size=0), USER, opened_for_write=True) \
            == errno.EISDIR
    # Another user who opened it for writing before the owner took the right away.
    g = fs.create(d.ino, b"g", 0o600, USER)
    fs.write(g.ino, 0, b"data", USER)
    assert _errno(fs.setattr, g.ino, SetAttr(size=1), OTHER) == errno.EACCES
    assert fs.setattr(g.ino, SetAttr(size=1), OTHER, opened_for_write=True).size == 1
    # ...and a non-root truncate still clears set-user-ID.
    fs.setattr(g.ino, SetAttr(mode=0o4777), USER)
    fs.setattr(g.ino, SetAttr(size=0), OTHER, opened_for_write=True)
    assert fs.getattr(g.ino).mode & 0o7777 == 0o777


def _may_exec(mode: int, ctx: Ctx) -> bool:
    if ctx.uid == 0:
        return bool(mode & 0o111)
    if ctx.uid == USER.uid:
        return bool(mode & 0o100)
    if ctx.gid == USER.gid:
        return bool(mode & 0o010)
    return bool(mode & 0o001)


def test_open_for_exec_is_checked_as_execute(fs: FileSystem) -> None:
    """Defect 10: an open carrying FMODE_EXEC needs execute permission, not read; every
    mode x every class of caller against the rule."""
    assert fs_module.FMODE_EXEC == FMODE_EXEC
    d = fs.mkdir(ROOT_INO, b"bin", 0o777, ROOT)
    wrong = []
    for mode in (0o711, 0o701, 0o710, 0o100, 0o010, 0o001, 0o755, 0o644, 0o000, 0o311):
        f = fs.create(d.ino, f"p{mode:o}".encode(), mode, USER)
        for ctx in (USER, GROUP, OTHER, ROOT):
            want = 0 if _may_exec(mode, ctx) else errno.EACCES
            got = _errno(fs.open_file, f.ino, os.O_RDONLY | os.O_LARGEFILE | FMODE_EXEC, ctx)
            if got != want:
                wrong.append(f"exec {mode:03o} as {ctx.uid}: {got}, want {want}")
        # A plain read-only open is still checked as a read.
        assert _errno(fs.open_file, f.ino, os.O_RDONLY, OTHER) == (
            0 if mode & 0o004 else errno.EACCES)
    assert not wrong, wrong


def _killpriv(mode: int) -> int:
    mode &= ~stat.S_ISUID
    return mode & ~stat.S_ISGID if mode & stat.S_IXGRP else mode


def test_every_chown_clears_setid(fs: FileSystem) -> None:
    """Defect 11: every successful chown of a non-directory clears set-user-ID, and
    set-group-ID when group execute is set, also to the same owner and by root."""
    forms = {"same owner": SetAttr(uid=USER.uid), "same group": SetAttr(gid=USER.gid),
             "same both": SetAttr(uid=USER.uid, gid=USER.gid),
             "new owner": SetAttr(uid=OTHER.uid), "new group": SetAttr(gid=OTHER.gid)}
    wrong = []
    n = 0
    top = fs.mkdir(ROOT_INO, b"top", 0o777, ROOT)
    for form, change in forms.items():
        callers = (ROOT, USER) if form.startswith("same") else (ROOT,)
        for ctx in callers:
            for mode in (0o6755, 0o4755, 0o2755, 0o6745, 0o4644, 0o2644):
                n += 1
                f = fs.create(top.ino, f"f{n}".encode(), 0o644, USER)
                fs.setattr(f.ino, SetAttr(mode=mode), ROOT)
                got = fs.setattr(f.ino, change, ctx).mode & 0o7777
                if got != _killpriv(mode):
                    wrong.append(f"{form} by {ctx.uid} of {mode:04o}: {got:04o}")
            d = fs.mkdir(top.ino, f"d{n}".encode(), 0o755, USER)
            fs.setattr(d.ino, SetAttr(mode=0o6755), ROOT)
            assert fs.setattr(d.ino, change, ctx).mode & 0o7777 == 0o6755
    assert not wrong, wrong


@pytest.mark.parametrize("mode", ["relatime", "strictatime", "noatime"])
def test_atime_rules(fs: FileSystem, mode: str) -> None:
    """Defect 12: which reads update atime, and the predicate the mount uses to decide
    whether a read must reach the core (``atime_due``) agrees with what a read does."""
    fs.atime = mode
    f = fs.create(ROOT_INO, b"f", 0o644, ROOT)
    fs.write(f.ino, 0, b"data", ROOT)
    now = fs_module._now()
    cases = {
        # (atime, mtime, ctime) relative to now -> relatime updates?
        "atime before mtime": ((-10, -5, -20), True),
        "atime == mtime": ((-5, -5, -20), True),
        "atime before ctime": ((-10, -20, -5), True),
        "recent, after both": ((-5, -10, -10), False),
        "more than a day old, after both": ((-DAY_NS - 5, -DAY_NS - 10, -DAY_NS - 10),
                                            True),
    }
    for name, ((a, m, c), relatime) in cases.items():
        times = SetAttr(atime_ns=now + a, mtime_ns=now + m, ctime_ns=now + c)
        fs.setattr(f.ino, times, ROOT)
        want = {"relatime": relatime, "strictatime": True, "noatime": False}[mode]
        assert fs.atime_due(f.ino) is want, name
        fs.read(f.ino, 0, 10)
        updated = fs.getattr(f.ino).atime_ns != now + a
        assert updated is want, name
        if updated:
            assert fs.getattr(f.ino).atime_ns >= now
        assert fs.atime_due(f.ino) is (mode == "strictatime"), name
        # An open for reading sets the atime the reads would (the mount's reads may all be
        # served from the page cache), and says whether it changed it.
        fs.setattr(f.ino, times, ROOT)
        assert fs.note_read_open(f.ino) is want, name
        assert (fs.getattr(f.ino).atime_ns != now + a) is want, name
        assert fs.note_read_open(f.ino) is (mode == "strictatime"), name


def test_atime_is_not_due_on_a_read_only_volume(image: object) -> None:
    from fsutil import mounted

    with mounted(image, read_only=True) as fs:  # type: ignore[arg-type]
        assert not fs.atime_due(ROOT_INO)


def _kernel_time(fd: int) -> int:
    """What the kernel's current_time() gives an inode of a filesystem without multigrain
    timestamps (a pipe, as FUSE): stamp it with "now" and read it back."""
    os.utime(fd)
    return os.fstat(fd).st_mtime_ns


def test_core_clock_is_the_kernels() -> None:
    """Defect 13: the core's times must interleave with the kernel's: a time taken after
    a kernel stamp is not earlier, one taken before is not later.  (time.time_ns() is up
    to a tick ahead of the kernel's coarse clock; CLOCK_REALTIME_COARSE up to a tick behind
    the multigrain floor the kernel also uses.)"""
    r, w = os.pipe()
    try:
        rounds = 20000
        wrong = 0
        deadline = time.monotonic() + 5
        for _ in range(rounds):
            before = _kernel_time(r)
            ours = fs_module._now()
            after = _kernel_time(r)
            if not before <= ours <= after:
                wrong += 1
            if time.monotonic() > deadline:
                break
        assert wrong == 0, f"{wrong} of {rounds} times out of order with the kernel's"
    finally:
        os.close(r)
        os.close(w)


def test_which_opens_set_the_atime(fs: FileSystem) -> None:
    """Through the adapter's open (no FUSE session: the attribute notification is skipped):
    opens that can read (execve's too) set a due atime, write-only and O_NOATIME opens do
    not."""
    import trio

    from nexfs.fuse.adapter import FuseAdapter

    class Caller:  # what the adapter reads of pyfuse3's RequestContext
        uid, gid, pid, umask = 0, 0, 1, 0

    adapter = FuseAdapter(fs)
    f = fs.create(ROOT_INO, b"f", 0o755, ROOT)
    fs.write(f.ino, 0, b"data", ROOT)
    opens = {"O_RDONLY": (os.O_RDONLY, True), "O_RDWR": (os.O_RDWR, True),
             "exec": (os.O_RDONLY | FMODE_EXEC, True), "O_WRONLY": (os.O_WRONLY, False),
             "O_NOATIME": (os.O_RDONLY | os.O_NOATIME, False)}
    for name, (flags, sets) in opens.items():
        old = fs.getattr(f.ino).mtime_ns - 1
        fs.setattr(f.ino, SetAttr(atime_ns=old), ROOT)
        info = trio.run(adapter.open, f.ino, flags, Caller())
        assert (fs.getattr(f.ino).atime_ns != old) is sets, name
        trio.run(adapter.release, info.fh)
