"""Files opened with O_DIRECT are served with FUSE direct I/O: one WRITE request per write,
with the kernel's own side effects of a write done by NexFS (docs/DESIGN.md, "O_DIRECT and
the page cache").

With FUSE direct I/O the kernel neither removes set-ID bits and ``security.capability``
before a write nor updates the times and size it caches for the file: the daemon must.  The
explorer here writes, as root, as the owner and as a stranger, buffered and with O_DIRECT,
into files with every interesting combination of set-user-ID, set-group-ID (with and
without group execute) and a file capability, and compares what ``fstat`` in the writer and
``stat`` afterwards show with what the kernel's own tmpfs shows for the same steps: mode,
capability, size, and whether the mtime moved.

One difference is FUSE's, not NexFS's, and is expected: a set-group-ID file without group
execute keeps the bit when a stranger writes it.  Linux 6.x drops it there for local
filesystems (the writer is not in the file's group), but FUSE's own kill-privileges request
(fs/fuse/dir.c, ``fuse_setattr``) still follows the older rule, set-group-ID goes only with
group execute, and NexFS follows FUSE so that buffered and O_DIRECT writes agree.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mountutil import Mounter, mounter_fixture, needs_root  # noqa: F401

pytestmark = [pytest.mark.mount, needs_root]

CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)
"""security.capability of ``setcap cap_net_raw+ep`` (VFS_CAP_REVISION_2)."""
OLD_NS = 1_000_000_000 * 10**9
"""The mtime every file starts with (2001): any write must move it."""

MODES = (0o6755, 0o4755, 0o2755, 0o2745, 0o0755)
WRITERS = ("root", "nobody", "daemon")  # the files belong to nobody:nogroup
_CASES: list[dict[str, Any]] = [
    {"name": f"f-{mode:o}-{int(cap)}-{writer}-{int(direct)}-{int(extend)}", "mode": mode,
     "cap": cap, "writer": writer, "direct": direct, "extend": extend}
    for mode, cap, writer, direct, extend in itertools.product(
        MODES, (False, True), WRITERS, (False, True), (False, True))
    if not (cap and mode & 0o6000)  # a capability on a set-ID file adds nothing new
]

_WRITER = r"""
import json, mmap, os, sys
out = {}
for case in json.loads(sys.argv[1]):
    path = os.path.join(sys.argv[2], case["name"])
    fd = os.open(path, os.O_WRONLY | (os.O_DIRECT if case["direct"] else 0))
    buf = mmap.mmap(-1, 4096)
    buf.write(b"w" * 4096)
    try:
        n = os.pwritev(fd, [buf], 8192 if case["extend"] else 0)
    except OSError as exc:
        n = -exc.errno
    st = os.fstat(fd)
    os.close(fd)
    out[case["name"]] = [n, st.st_mode, st.st_size, st.st_mtime_ns]
print(json.dumps(out))
"""


def _prepare(directory: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    for case in _CASES:
        path = directory / case["name"]
        path.write_bytes(b"x" * 8192)
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
        os.chmod(path, case["mode"] | 0o666)  # after chown, which clears the set-ID bits
        if case["cap"]:
            os.setxattr(path, "security.capability", CAP)
        os.utime(path, ns=(OLD_NS, OLD_NS))


def _write_as_each_user(directory: Path) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for writer in WRITERS:
        cases = [c for c in _CASES if c["writer"] == writer]
        cmd = [sys.executable, "-c", _WRITER, json.dumps(cases), str(directory)]
        if writer != "root":
            user = pwd.getpwnam(writer)
            cmd = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                   "--clear-groups", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        seen.update(json.loads(proc.stdout))
    return seen


def _observe(directory: Path) -> dict[str, dict[str, Any]]:
    """What each step left, in the terms the kernel defines."""
    seen = _write_as_each_user(directory)
    result = {}
    for case in _CASES:
        name = case["name"]
        written, fmode, fsize, fmtime = seen[name]
        st = os.stat(directory / name)
        try:
            cap = os.getxattr(directory / name, "security.capability") == CAP
        except OSError:
            cap = False
        result[name] = {"written": written, "fstat mode": oct(fmode), "fstat size": fsize,
                        "fstat mtime moved": fmtime != OLD_NS, "mode": oct(st.st_mode),
                        "size": st.st_size, "mtime moved": st.st_mtime_ns != OLD_NS,
                        "capability kept": cap}
    return result


@pytest.fixture(name="tmpfs")
def tmpfs_fixture() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nexfs-oracle-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "oracle", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
        path.rmdir()


def test_writes_have_the_kernels_side_effects(mounter: Mounter, tmpfs: Path) -> None:
    """The explorer of the module docstring: {5 modes, capability} x {root, owner,
    stranger} x {buffered, O_DIRECT} x {overwrite, extend}, NexFS against tmpfs."""
    m = mounter.mount(options=["allow_other"])
    _prepare(tmpfs)
    _prepare(m.mountpoint)
    expected = _observe(tmpfs)
    for case in _CASES:  # FUSE's set-group-ID rule (module docstring)
        if case["mode"] & 0o2010 == 0o2000:
            for key in ("fstat mode", "mode"):
                want = expected[case["name"]]
                want[key] = oct(int(want[key], 8) | 0o2000)
    got = _observe(m.mountpoint)
    wrong = {name: {k: (got[name][k], v) for k, v in want.items() if got[name][k] != v}
             for name, want in expected.items() if got[name] != want}
    assert not wrong, (f"{len(wrong)} of {len(_CASES)} cases differ from tmpfs "
                       f"(name: mode-cap-writer-direct-extend; (nexfs, tmpfs)):\n"
                       + "\n".join(f"{k}: {v}" for k, v in sorted(wrong.items())))
