"""File handles on a real mount: what an NFS server (the kernel's nfsd, or a user-space one
using ``open_by_handle_at``) needs to re-export NexFS.

A handle is (inode number, generation).  The kernel resolves a handle of an inode it still
caches by itself; for one it has forgotten (memory pressure, a remount) it asks the daemon
with LOOKUP(ino, ".") and, to reconnect a directory, LOOKUP(ino, ".."), and it compares the
generation.  So the tests push inodes out of the kernel's cache (``drop_caches``, then wait
for the daemon's FORGET in its debug log) and remount, and check that live files open to the
right content and that deleted files, also ones whose inode number was reused, give ESTALE.

The kernel NFS server itself cannot be tested here: this machine's kernel is built without
nfsd (CONFIG_NFSD unset) and without module support (docs/MOUNT.md, "NFS export").
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from fhandle import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    Handle,
    name_to_handle,
    open_by_handle,
    renameat2,
)
from mountutil import (  # noqa: F401
    Mount,
    Mounter,
    mounter_fixture,
    needs_root,
)

pytestmark = [pytest.mark.mount, needs_root]

LONG = os.environ.get("NEXFS_LONG") == "1"
"""``NEXFS_LONG=1``: the explorer runs more seeds and longer sequences."""
SEEDS = int(os.environ.get("NEXFS_EXPORT_SEEDS", "20" if LONG else "3"))
STEPS = int(os.environ.get("NEXFS_EXPORT_STEPS", "200" if LONG else "80"))

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def read_handle(mount_fd: int, handle: Handle) -> bytes:
    fd = open_by_handle(mount_fd, handle)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def stale(mount_fd: int, handle: Handle) -> bool:
    try:
        os.close(open_by_handle(mount_fd, handle))
    except OSError as exc:
        assert exc.errno == errno.ESTALE, exc
        return True
    return False


def forgotten(m: Mount, inos: set[int], timeout: float = 20) -> None:
    """Drop the kernel's unused dentries and inodes until the daemon has logged a FORGET
    for every inode in ``inos`` (FORGET has no reply, so this polls the debug log)."""
    pending = set(inos)
    deadline = time.monotonic() + timeout
    while True:
        DROP_CACHES.write_text("2\n")
        for batch in re.findall(r"forget\(\[([^\]]*)\]", m.log_text()):
            pending -= {int(n) for n in re.findall(r"\((\d+), \d+\)", batch)}
        if not pending:
            return
        assert time.monotonic() < deadline, f"the kernel did not forget inodes {pending}"
        time.sleep(0.05)


def asked_for_dot(m: Mount, ino: int) -> bool:
    return re.search(rf"lookup\({ino}, b'\.',", m.log_text()) is not None


def test_handles_of_cached_inodes(mounter: Mounter) -> None:
    """The easy case: the kernel still has the inode (file, directory, hard link)."""
    m = mounter.mount()
    mnt = m.mountpoint
    (mnt / "d").mkdir()
    (mnt / "d" / "f").write_bytes(b"file content")
    os.link(mnt / "d" / "f", mnt / "hard")
    mount_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for path in (mnt / "d" / "f", mnt / "hard"):
            assert read_handle(mount_fd, name_to_handle(path)) == b"file content"
        fd = open_by_handle(mount_fd, name_to_handle(mnt / "d"), os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert os.fstat(fd).st_ino == (mnt / "d").stat().st_ino
        finally:
            os.close(fd)
    finally:
        os.close(mount_fd)


def test_handles_after_the_kernel_forgot_the_inodes(mounter: Mounter) -> None:
    """Handles of files and of a nested directory open again after their inodes left the
    kernel's cache; the directory is reconnected to its path (LOOKUP "..")."""
    m = mounter.mount(args=["--debug"])
    mnt = m.mountpoint
    (mnt / "a" / "b").mkdir(parents=True)
    (mnt / "a" / "b" / "f").write_bytes(b"deep file")
    (mnt / "top").write_bytes(b"top file")
    paths = [mnt / "a" / "b" / "f", mnt / "top", mnt / "a" / "b", mnt / "a"]
    handles = [name_to_handle(p) for p in paths]
    inos = {p.stat().st_ino for p in paths}
    forgotten(m, inos)
    mount_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert read_handle(mount_fd, handles[0]) == b"deep file"
        assert read_handle(mount_fd, handles[1]) == b"top file"
        fd = open_by_handle(mount_fd, handles[2], os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert os.readlink(f"/proc/self/fd/{fd}") == str(mnt / "a" / "b")
            assert os.listdir(fd) == ["f"]
        finally:
            os.close(fd)
    finally:
        os.close(mount_fd)
    # The daemon really was asked: the kernel did not still have the inodes.
    assert asked_for_dot(m, (mnt / "top").stat().st_ino)


def test_handles_survive_a_remount_and_deleted_files_are_stale(mounter: Mounter) -> None:
    """A handle taken on one mount opens on the next one; a deleted file's handle gives
    ESTALE, also when its inode number now belongs to a new file."""
    image = mounter.image()
    m = mounter.mount(image)
    mnt = m.mountpoint
    (mnt / "keep").write_bytes(b"kept")
    (mnt / "dir").mkdir()
    (mnt / "dir" / "inner").write_bytes(b"inner")
    (mnt / "gone").write_bytes(b"gone")
    keep, inner, gone = (name_to_handle(mnt / n) for n in ("keep", "dir/inner", "gone"))
    gone_ino = (mnt / "gone").stat().st_ino
    (mnt / "gone").unlink()
    assert m.unmount() == 0

    m2 = mounter.mount(image, args=["--debug"])
    mnt = m2.mountpoint
    mount_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert read_handle(mount_fd, keep) == b"kept"
        assert read_handle(mount_fd, inner) == b"inner"
        assert stale(mount_fd, gone)
        # Reuse the inode number: the old handle must not open the new file.
        for i in range(50):
            (mnt / f"new{i}").write_bytes(b"new")
            if (mnt / f"new{i}").stat().st_ino == gone_ino:
                break
        else:
            pytest.fail(f"inode {gone_ino} was not reused")
        assert stale(mount_fd, gone)
        assert read_handle(mount_fd, name_to_handle(mnt / f"new{i}")) == b"new"
    finally:
        os.close(mount_fd)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_handle_explorer(mounter: Mounter, seed: int) -> None:
    """Random creates, hard links, renames (also across directories), unlinks, mkdir/rmdir,
    inode-number reuse, cache drops and a remount; after each step every handle ever taken
    must either open the file with its content or the directory at its current path (while
    the inode has a name), or give ESTALE (once it has none)."""
    rng = random.Random(seed)
    image = mounter.image()
    m = mounter.mount(image)
    parents = ["", "a/", "b/"]
    for p in parents[1:]:
        (m.mountpoint / p).mkdir()
    names: dict[str, int] = {}  # file path -> file id
    dirs: dict[str, int] = {}  # directory path -> directory id
    content: dict[int, bytes] = {}  # file id -> content
    handles: list[tuple[Handle, int]] = []
    next_id = 0
    mount_fd = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)

    def check() -> None:
        where = {v: k for k, v in dirs.items()}
        live = set(names.values())
        for handle, oid in handles:
            if oid in where:
                fd = open_by_handle(mount_fd, handle, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    path = os.readlink(f"/proc/self/fd/{fd}")
                finally:
                    os.close(fd)
                assert path == str(m.mountpoint / where[oid]), (seed, oid)
            elif oid in live:
                assert read_handle(mount_fd, handle) == content[oid], (seed, oid)
            else:
                assert stale(mount_fd, handle), (seed, oid)

    def new_name(prefix: str) -> str:
        return f"{rng.choice(parents)}{prefix}{rng.randrange(8)}"

    try:
        for step in range(STEPS):
            mnt = m.mountpoint
            op = rng.choice(["create", "create", "link", "rename", "unlink", "unlink",
                             "mkdir", "mvdir", "rmdir", "drop"])
            if op == "create" or (not names and op in ("link", "rename", "unlink")):
                name = new_name("f")
                if name in names:
                    continue
                next_id += 1
                data = f"file {next_id} seed {seed}".encode()
                (mnt / name).write_bytes(data)
                names[name] = next_id
                content[next_id] = data
                handles.append((name_to_handle(mnt / name), next_id))
            elif op == "link":
                src, dst = rng.choice(sorted(names)), new_name("f")
                if dst in names:
                    continue
                os.link(mnt / src, mnt / dst)
                names[dst] = names[src]
                handles.append((name_to_handle(mnt / dst), names[dst]))
            elif op == "rename":
                src, dst = rng.choice(sorted(names)), new_name("f")
                os.rename(mnt / src, mnt / dst)
                if names.get(dst) != names[src]:  # two links of one file: nothing happens
                    names[dst] = names.pop(src)
            elif op == "unlink":
                (mnt / (name := rng.choice(sorted(names)))).unlink()
                del names[name]
            elif op == "mkdir":
                name = new_name("d")
                if name in dirs:
                    continue
                next_id += 1
                (mnt / name).mkdir()
                dirs[name] = next_id
                handles.append((name_to_handle(mnt / name), next_id))
            elif op in ("mvdir", "rmdir") and dirs:
                name = rng.choice(sorted(dirs))
                if op == "rmdir":
                    (mnt / name).rmdir()
                    del dirs[name]
                else:
                    dst = new_name("d")
                    if dst in dirs and dst != name:
                        continue
                    os.rename(mnt / name, mnt / dst)
                    dirs[dst] = dirs.pop(name)
            else:
                DROP_CACHES.write_text("2\n")
            if step == STEPS // 2:
                os.close(mount_fd)
                assert m.unmount() == 0
                m = mounter.mount(image)
                mount_fd = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
            check()
        assert any(not stale(mount_fd, h) for h, _ in handles)
    finally:
        os.close(mount_fd)


def test_root_handle(mounter: Mounter) -> None:
    m = mounter.mount()
    mount_fd = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = open_by_handle(mount_fd, name_to_handle(m.mountpoint), os.O_RDONLY)
        try:
            assert stat.S_ISDIR(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    finally:
        os.close(mount_fd)


# -- whiteouts and overlayfs ------------------------------------------------------------------


def test_rename_whiteout_on_the_mount(mounter: Mounter) -> None:
    """renameat2(RENAME_WHITEOUT): the target has the old file, the source name is a 0/0
    character device; NOREPLACE and EXCHANGE keep working beside it."""
    m = mounter.mount()
    mnt = m.mountpoint
    (mnt / "f").write_bytes(b"old file")
    (mnt / "other").write_bytes(b"other")
    ino = (mnt / "f").stat().st_ino
    renameat2(mnt / "f", mnt / "g", RENAME_WHITEOUT)
    st = (mnt / "f").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and st.st_ino != ino
    assert (mnt / "g").read_bytes() == b"old file" and (mnt / "g").stat().st_ino == ino
    with pytest.raises(OSError) as ei:
        renameat2(mnt / "other", mnt / "g", RENAME_WHITEOUT | RENAME_NOREPLACE)
    assert ei.value.errno == errno.EEXIST
    with pytest.raises(OSError) as ei:
        renameat2(mnt / "other", mnt / "g", RENAME_WHITEOUT | RENAME_EXCHANGE)
    assert ei.value.errno == errno.EINVAL
    renameat2(mnt / "other", mnt / "g", RENAME_EXCHANGE)
    assert (mnt / "g").read_bytes() == b"other"
    assert sorted(os.listdir(mnt)) == ["f", "g", "lost+found", "other"]


def test_overlayfs_with_a_nexfs_upper_dir(mounter: Mounter, tmp_path: Path) -> None:
    """overlayfs on top of NexFS: deleting a lower file leaves a whiteout in the upper dir,
    renaming one copies it up (trusted.overlay.* xattrs, RENAME_WHITEOUT)."""
    m = mounter.mount()
    mnt = m.mountpoint
    lower = tmp_path / "lower"
    (lower / "dir").mkdir(parents=True)
    (lower / "doomed").write_text("lower doomed\n")
    (lower / "moved").write_text("lower moved\n")
    (lower / "dir" / "inner").write_text("inner\n")
    for sub in ("upper", "work"):
        (mnt / sub).mkdir()
    merged = mounter.mountpoint()
    result = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower},upperdir={mnt / 'upper'},workdir={mnt / 'work'}", str(merged)],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    try:
        (merged / "doomed").unlink()
        os.rename(merged / "moved", merged / "renamed")
        shutil.rmtree(merged / "dir")
        (merged / "new").write_text("new\n")
        assert sorted(os.listdir(merged)) == ["new", "renamed"]
        assert (merged / "renamed").read_text() == "lower moved\n"
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    upper = mnt / "upper"
    for name in ("doomed", "moved", "dir"):
        st = (upper / name).lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, name
    assert (upper / "renamed").read_text() == "lower moved\n"
    assert (upper / "new").read_text() == "new\n"


# -- NFS re-export ----------------------------------------------------------------------------


GANESHA_CONF = """\
NFS_CORE_PARAM {{
    NFS_Port = {port};
    Protocols = 4;
    Enable_UDP = false;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Bind_addr = 127.0.0.1;
}}
NFSV4 {{
    Graceless = true;
    RecoveryRoot = {tmp}/recovery;
}}
EXPORT {{
    Export_Id = 1;
    Path = {export};
    Pseudo = /nexfs;
    Access_Type = RW;
    Squash = No_Root_Squash;
    Protocols = 4;
    Transports = TCP;
    SecType = sys;
    FSAL {{ Name = VFS; }}
}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_nfs_reexport_through_ganesha(mounter: Mounter, tmp_path: Path) -> None:
    """NexFS re-exported over NFSv4 by nfs-ganesha, whose VFS backend identifies every file
    by its handle (name_to_handle_at) and opens it with open_by_handle_at; the client is
    libnfs's command-line tools (this kernel has neither nfsd nor an NFS client).  The server
    is restarted once after the kernel forgot the inodes.  (A smoke test of the whole path:
    it resolves names afresh after the restart, so the handle rules themselves are proved by
    the open_by_handle_at tests above.)"""
    if shutil.which("ganesha.nfsd") is None or shutil.which("nfs-cat") is None:
        missing = "needs nfs-ganesha, nfs-ganesha-vfs and libnfs-utils (Makefile DEB_PKGS)"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    m = mounter.mount(args=["--debug"])
    mnt = m.mountpoint
    (mnt / "dir").mkdir()
    (mnt / "dir" / "before").write_bytes(b"written before the export\n")
    port = free_port()
    conf = tmp_path / "ganesha.conf"
    (tmp_path / "recovery").mkdir()
    conf.write_text(GANESHA_CONF.format(port=port, tmp=tmp_path, export=mnt))
    log = tmp_path / "ganesha.log"
    url = f"nfs://127.0.0.1/nexfs/{{}}?version=4&nfsport={port}"

    def nfs(*cmd: str) -> str:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, (cmd, result.stdout, result.stderr,
                                        log.read_text(errors="replace")[-3000:])
        return result.stdout

    def serve() -> subprocess.Popen[bytes]:
        log.unlink(missing_ok=True)
        server = subprocess.Popen(
            ["ganesha.nfsd", "-F", "-f", str(conf), "-L", str(log), "-p",
             str(tmp_path / "ganesha.pid"), "-N", "NIV_EVENT"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "NFS SERVER INITIALIZED" not in (log.read_text() if log.exists() else ""):
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "ganesha did not start"
            time.sleep(0.1)
        return server

    server = serve()
    try:
        assert nfs("nfs-cat", url.format("dir/before")) == "written before the export\n"
        src = tmp_path / "src"
        src.write_text("written over NFS\n")
        nfs("nfs-cp", str(src), url.format("dir/over-nfs"))
        assert (mnt / "dir" / "over-nfs").read_text() == "written over NFS\n"
        nfs("nfs-cp", url.format("dir/before"), str(tmp_path / "fetched"))
        assert (tmp_path / "fetched").read_text() == "written before the export\n"
    finally:
        server.terminate()
        server.wait(30)
    # The server holds files open while it runs; once it is gone the kernel may forget.
    forgotten(m, {(mnt / "dir" / n).stat().st_ino for n in ("before", "over-nfs")})
    server = serve()
    try:
        assert nfs("nfs-cat", url.format("dir/over-nfs")) == "written over NFS\n"
        listing = nfs("nfs-ls", url.format("dir"))
        assert "before" in listing and "over-nfs" in listing
    finally:
        server.terminate()
        server.wait(30)
