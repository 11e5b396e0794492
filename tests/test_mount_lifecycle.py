"""Mounting and unmounting as a user or an administrator does it: the daemon form, signals,
``mount -t fuse.nexfs``, read-only mounts, a busy image, crash recovery, a failing handler,
and the one-line errors for the usual mistakes."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountutil import (  # noqa: F401
    MOUNT_PY,
    PYTHON,
    Mount,
    Mounter,
    child_env,
    fsck,
    fusermount_u,
    is_nexfs_mount,
    make_image,
    mounted_fixture,
    mounted_fs,
    mounter_fixture,
    volume_is_clean,
    wait_until,
)

pytestmark = pytest.mark.mount


def run_mount(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python mount.py ARGS`` to completion (the daemon form returns once mounted)."""
    return subprocess.run([PYTHON, str(MOUNT_PY), *args], capture_output=True, text=True,
                          cwd=cwd, env=child_env(env), timeout=timeout, check=False)


def daemon_pid(mountpoint: Path) -> int:
    """The pid of the mount.py process serving ``mountpoint`` (from /proc/*/cmdline)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith((b"mount.py", b"nexfs", b"nexfs.tools.cli")) for a in argv) and \
                os.fsencode(mountpoint) in argv:
            return int(entry)
    raise AssertionError(f"no mount.py process serves {mountpoint}")


def wait_gone(pid: int, timeout: float = 60) -> None:
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
               Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z",
               timeout, f"process {pid} to exit")


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failure message, which must be exactly one line starting with mount.nexfs:."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mount.nexfs: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


def test_proc_mounts_entry(mounted: Mount) -> None:
    source, fstype, options = mounted_fs(mounted.mountpoint) or ("", "", "")
    assert fstype == "fuse.nexfs"
    assert source == str(mounted.image)
    assert "default_permissions" in options.split(",")
    assert "rw" in options.split(",") and "allow_other" not in options


def test_read_only(mounter: Mounter) -> None:
    m = mounter.mount()
    m.sh("mkdir d && echo kept > d/f && ln -s d/f link")
    assert m.unmount() == 0
    ro = mounter.mount(m.image, options=["ro", "noatime"])
    options = (mounted_fs(ro.mountpoint) or ("", "", ""))[2].split(",")
    assert "ro" in options and "noatime" in options
    mnt = ro.mountpoint
    assert (mnt / "d" / "f").read_text() == "kept\n"
    assert os.readlink(mnt / "link") == "d/f"
    for attempt in (lambda: (mnt / "new").write_text("x"),
                    lambda: (mnt / "d" / "f").write_text("x"),
                    lambda: os.mkdir(mnt / "e"),
                    lambda: os.unlink(mnt / "d" / "f"),
                    lambda: os.chmod(mnt / "d", 0o777),
                    lambda: os.setxattr(mnt / "d", "user.x", b"1")):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    out = ro.sh("touch x", check=False)
    assert out.returncode != 0 and "Read-only file system" in out.stderr


def test_second_mount_is_refused(mounted: Mount, mounter: Mounter) -> None:
    other = mounter.mountpoint()
    result = run_mount(str(mounted.image), str(other))
    assert result.returncode == 1
    line = one_line_error(result)
    assert str(mounted.image) in line and "in use" in line
    assert not is_nexfs_mount(other)
    # The foreground form says the same, and the first mount is unharmed.
    result = run_mount(str(mounted.image), str(other), "--foreground")
    assert result.returncode == 1 and "in use" in one_line_error(result)
    mounted.sh("echo still > here && cat here")


def test_daemon_returns_when_ready_and_sigterm_unmounts(mounter: Mounter,
                                                        tmp_path: Path) -> None:
    image = mounter.image()
    mnt = mounter.mountpoint()
    log = tmp_path / "daemon.log"
    result = run_mount(str(image), str(mnt), "--log-file", str(log))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    # Mounted by the time the command returns: no polling needed.
    assert is_nexfs_mount(mnt)
    pid = daemon_pid(mnt)
    (mnt / "file").write_bytes(b"data" * 100_000)
    os.kill(pid, signal.SIGHUP)  # ignored by the daemon: it has no terminal to lose
    assert os.statvfs(mnt).f_bsize == 4096  # statfs is never cached: a round trip
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert not is_nexfs_mount(mnt)
    text = log.read_text()
    assert "unmounted" in text and "cleanly" in text, text
    assert "Traceback" not in text and " ERROR " not in text and " WARNING " not in text, text
    assert volume_is_clean(image)
    again = mounter.mount(image, mnt)
    assert (again.mountpoint / "file").read_bytes() == b"data" * 100_000


def test_sigint_in_foreground_unmounts(mounter: Mounter) -> None:
    m = mounter.mount()
    (m.mountpoint / "f").write_text("x" * 10000)
    m.signal(signal.SIGINT)
    assert m.wait() == 0
    assert not m.up
    assert "unmounted" in m.log_text()


def test_busy_mountpoint_is_detached_on_sigterm(mounter: Mounter) -> None:
    """A shell sitting in the mount point must not keep SIGTERM from unmounting."""
    m = mounter.mount()
    (m.mountpoint / "f").write_text("x")
    sitter = subprocess.Popen(["sleep", "30"], cwd=m.mountpoint)
    try:
        m.expect_log(r"could not unmount .* detaching it lazily")
        m.signal(signal.SIGTERM)
        wait_until(lambda: not m.up, 30, "the lazy unmount")
    finally:
        sitter.kill()
        sitter.wait()
    assert m.wait() == 0


def test_default_no_arguments(tmp_path: Path, mounter: Mounter) -> None:
    """``python mount.py`` in an empty directory: creates ./nexfs.img (0600, 4 GiB, sparse)
    and ./mnt, mounts, and unmounts cleanly on Ctrl-C."""
    log = tmp_path / "default.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PYTHON, str(MOUNT_PY)], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, env=child_env())
    mnt = tmp_path / "mnt"
    try:
        wait_until(lambda: mnt.is_dir() and is_nexfs_mount(mnt), 60, "the default mount",
                   proc, log)
        image = tmp_path / "nexfs.img"
        st = image.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == 4 << 30
        assert st.st_blocks * 512 < 256 << 20, "the image is not sparse"
        (mnt / "hello").write_text("world")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounted_fs(mnt) is not None:
            fusermount_u(mnt, lazy=True)
    text = log.read_text()
    assert f"mounted on {mnt}" in text and "Ctrl-C" in text, text
    assert "Traceback" not in text and "ERROR" not in text, text
    assert not is_nexfs_mount(mnt)
    code, output = fsck(image)
    assert code == 0, output
    # Run again: the existing image is mounted, not re-created.
    m = mounter.mount(image, mnt)
    assert (m.mountpoint / "hello").read_text() == "world"


HELPER_DIR = Path("/usr/local/sbin")


@pytest.fixture
def fuse_helper() -> Iterator[Path]:
    """mount(8) runs helpers with a fixed PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:
    /usr/bin:/sbin:/bin) whatever the caller's PATH, so mount.fuse3 finds ``nexfs`` only
    there.  Install this checkout's command for the test, and remove it after.  A wrapper
    with this checkout on PYTHONPATH, not a link to the venv's script: that one imports the
    checkout the venv was installed from, which in a git worktree is another one."""
    if os.geteuid() != 0:
        pytest.skip("mount -t needs root")
    helper = HELPER_DIR / "nexfs"
    if helper.exists() or helper.is_symlink():
        yield helper  # an installed nexfs: use it as it is
        return
    HELPER_DIR.mkdir(parents=True, exist_ok=True)
    env = child_env()["PYTHONPATH"]
    helper.write_text(f'#!/bin/sh\nPYTHONPATH="{env}" exec {PYTHON} -m nexfs.tools.cli "$@"\n')
    helper.chmod(0o755)
    try:
        yield helper
    finally:
        helper.unlink()


def test_mount_t_fuse_nexfs(mounter: Mounter, fuse_helper: Path, tmp_path: Path) -> None:
    image = mounter.image()
    mnt = mounter.mountpoint()
    # What an fstab line passes: generic options that must be accepted and ignored.
    options = ("rw,noatime,nofail,_netdev,x-systemd.automount,defaults,cache_size=64M,"
               "data_cache=16M")
    result = subprocess.run(["mount", "-t", "fuse.nexfs", "-o", options, str(image), str(mnt)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    try:
        source, fstype, opts = mounted_fs(mnt) or ("", "", "")
        assert (source, fstype) == (str(image), "fuse.nexfs")
        assert "noatime" in opts.split(",")
        pid = daemon_pid(mnt)
        (mnt / "via-mount-t").write_text("ok")
        result = subprocess.run(["umount", str(mnt)], capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        wait_gone(pid)
    finally:
        if mounted_fs(mnt) is not None:
            fusermount_u(mnt, lazy=True)
    code, output = fsck(image)
    assert code == 0, output
    # The same through an fstab line.
    mount_by_fstab(str(image), mnt, tmp_path)
    assert volume_is_clean(image)


def mount_by_fstab(source: str, mnt: Path, tmp_path: Path) -> None:
    """Mount ``source`` on ``mnt`` through an fstab line with ``_netdev`` (``mount --fstab``
    reads another file than /etc/fstab), find the file ``via-mount-t`` an earlier ``mount -t``
    left, unmount and wait for the daemon to exit."""
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{source} {mnt} fuse.nexfs noauto,nofail,_netdev,noatime 0 0\n")
    result = subprocess.run(["mount", "--fstab", str(fstab), str(mnt)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    try:
        assert (mnt / "via-mount-t").read_text() == "ok"
        pid = daemon_pid(mnt)
        assert subprocess.run(["umount", str(mnt)], check=False).returncode == 0
        wait_gone(pid)
    finally:
        if mounted_fs(mnt) is not None:
            fusermount_u(mnt, lazy=True)


def test_recovers_after_crash(mounter: Mounter) -> None:
    """SIGKILL the daemon (no unmount, no close): the next mount replays the journal."""
    m = mounter.mount()
    m.sh("mkdir -p a/b && seq 1 50000 > a/b/numbers && sync a/b/numbers && sync -f .")
    m.expect_log(r".")  # anything the killed process printed is fine
    m.kill()
    assert not m.up
    assert not volume_is_clean(m.image)
    again = mounter.mount(m.image)
    again.sh("seq 1 50000 | cmp - a/b/numbers && echo more > a/more")
    assert again.unmount() == 0


def test_periodic_commit_makes_work_durable(mounter: Mounter) -> None:
    """Without any fsync, the background commit (here every 0.5 s) makes written files
    survive a crash of the daemon."""
    m = mounter.mount(options=["commit=0.5"], args=["--debug"])
    m.sh("mkdir d && seq 1 20000 > d/numbers")
    os.stat(m.mountpoint / "d" / "numbers")  # the kernel has written its pages back on close
    written = len(m.log_text())
    wait_until(lambda: "periodic commit" in m.log_text()[written:], 30, "a periodic commit")
    m.expect_log(r".")
    m.kill()
    again = mounter.mount(m.image)
    again.sh("seq 1 20000 | cmp - d/numbers")


def test_failing_handler_answers_eio_and_mount_stays_up(mounter: Mounter,
                                                        tmp_path: Path) -> None:
    image = mounter.image()
    m = mounter.mount(image)
    m.sh("echo before > kept && mkdir dir")
    assert m.unmount() == 0
    mounter.needs_fsck.add(image)  # the test marks it on purpose
    # (LOOKUP calls the core's lookup_or_none: a missing name is not an exception there)
    m = mounter.mount(image, handler_fault="lookup_or_none:boom")
    m.expect_log(r"injected fault|test fault injection|needs fsck|Traceback|RuntimeError|"
                 r"^\s|marked|failed")
    mnt = m.mountpoint
    with pytest.raises(OSError) as info:
        os.stat(mnt / "boom")
    assert info.value.errno == errno.EIO
    # Still mounted and readable...
    assert m.up
    assert (mnt / "kept").read_text() == "before\n"
    assert sorted(os.listdir(mnt)) == ["dir", "kept", "lost+found"]
    # ...but read-only now: the volume is marked as needing fsck.
    with pytest.raises(OSError) as info:
        (mnt / "new").write_text("x")
    assert info.value.errno == errno.EROFS
    assert m.unmount() == 3  # EXIT_NEEDS_FSCK
    assert "Traceback" in m.log_text() and "injected fault" in m.log_text()
    # Mounting it again says so, and mounts read-only until fsck has run.
    mnt2 = mounter.mountpoint()
    result = run_mount(str(image), str(mnt2), "--log-file", str(tmp_path / "again.log"))
    assert result.returncode == 0, result.stderr
    assert "needs fsck" in result.stderr and "read-only" in result.stderr
    assert "ro" in (mounted_fs(mnt2) or ("", "", ""))[2].split(",")
    pid = daemon_pid(mnt2)
    assert (mnt2 / "kept").read_text() == "before\n"
    assert fusermount_u(mnt2).returncode == 0
    wait_gone(pid)
    # fsck repairs it (clears the mark), and then it mounts read-write again.
    code, output = fsck(image)
    assert code in (0, 4) and "needing fsck" in output, output
    code, output = fsck(image, "-y")
    assert code in (0, 1), output
    mounter.needs_fsck.discard(image)
    m = mounter.mount(image)
    m.sh("echo after > new && cat kept")


@pytest.mark.parametrize(("args", "fragment"), [
    (["{tmp}/missing.img", "{mnt}"], "no such file"),
    (["{img}", "{tmp}/nowhere"], "does not exist"),
    (["{img}", "{img}"], "not a directory"),
    (["{zero}", "{mnt}"], "{zero} is not a NexFS volume"),
    (["{img}"], "give both"),
    (["{img}", "{mnt}", "-o", "frobnicate"], "unknown mount option"),
    (["{img}", "{mnt}", "-o", "cache_size=lots"], "cache_size"),
    (["{img}", "{mnt}", "-o", "data_cache=-1"], "data_cache"),
    # More than this machine can reserve (the data cache's arena is reserved at mount).
    (["{img}", "{mnt}", "-o", "data_cache=1T"], "choose a smaller data_cache"),
    (["{img}", "{mnt}", "-o", "commit=soon"], "commit=soon"),
])
def test_user_mistakes_are_one_line(tmp_path: Path, mounter: Mounter, args: list[str],
                                    fragment: str) -> None:
    img = make_image(tmp_path / "ok.img", "64M")
    zero = tmp_path / "zero.img"
    zero.write_bytes(bytes(64 << 20))
    names = {"tmp": str(tmp_path), "mnt": str(mounter.mountpoint()), "img": str(img),
             "zero": str(zero)}
    argv = [a.format(**names) for a in args]
    for extra in ([], ["--foreground"]):
        result = run_mount(*argv, *extra)
        assert result.returncode in (1, 2), result
        assert fragment.format(**names) in one_line_error(result)
        assert not is_nexfs_mount(Path(names["mnt"]))


def test_help() -> None:
    result = run_mount("--help")
    assert result.returncode == 0
    for word in ("allow_other", "cache_size", "data_cache", "noatime", "exit status", "ro"):
        assert word in result.stdout


def test_unmount_leaves_a_clean_volume(mounted: Mount) -> None:
    """While mounted the superblock says DIRTY; after umount it says CLEAN (everything
    committed, the journal checkpointed and empty)."""
    mounted.sh("for i in $(seq 1 300); do echo $i > f$i; done; rm f1*")
    assert mounted.unmount() == 0
    assert volume_is_clean(mounted.image)
