"""Helpers for driving the filesystem core in-process on a real image file through the valve.

Every fixture closes the filesystem and runs fsck on the image afterwards: a test that leaves
the volume inconsistent fails even if its own assertions passed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nexfs.core.attr import Ctx
from nexfs.core.fs import ROOT_INO, FileSystem
from valve import Rights, Valve

ROOT = Ctx(uid=0, gid=0)
USER = Ctx(uid=1000, gid=1000)
OTHER = Ctx(uid=1001, gid=1001)


def make_image(path: Path, size: int = 64 << 20) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    os.close(fd)
    with Valve.open(path) as v:
        FileSystem.format(v.grant(Rights.READ | Rights.WRITE), label="test")
    return path


@contextmanager
def mounted(path: Path, *, read_only: bool = False, **kwargs: object) -> Iterator[FileSystem]:
    """Open the volume in ``path``; close it (commit, checkpoint, clean) afterwards."""
    with Valve.open(path, read_only=read_only) as v:
        rights = Rights.READ if read_only else Rights.READ | Rights.WRITE
        fs = FileSystem.open(v.grant(rights), read_only=read_only, **kwargs)  # type: ignore[arg-type]
        try:
            yield fs
        finally:
            fs.close()


def fsck_clean(path: Path) -> tuple[int, str]:
    """Run fsck.nexfs -n -f on the image; returns (exit code, output)."""
    import contextlib
    import io

    from nexfs.tools.fsck import main as fsck_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = fsck_main(["-n", "-f", str(path)])
    return code, out.getvalue()


def resolve(fs: FileSystem, path: str, ctx: Ctx = ROOT) -> int:
    ino = ROOT_INO
    for part in path.strip("/").split("/"):
        if part:
            ino = fs.lookup(ino, part.encode(), ctx).ino
    return ino
