"""Helpers and fixtures for the real-mount tests.

A test gets a :class:`Mounter` (fixture ``mounter``) or a ready mount (fixture ``mounted``).
Each mount is ``python mount.py IMAGE MOUNTPOINT --foreground`` in a subprocess, exactly as a
user starts it (with injected faults: the same mount command through tests/faultmount.py);
readiness is polled in /proc/mounts (never a sleep), and teardown always unmounts
(``fusermount3 -u``; SIGKILL and ``fusermount3 -uz`` only as a last resort), checks the
daemon's log for tracebacks, errors and warnings the test did not declare, and runs fsck on
every image, which must be clean.

Import the fixtures explicitly in a test module::

    from mountutil import mounted_fixture, mounter_fixture  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).absolute().parents[1]
MOUNT_PY = REPO / "mount.py"
FAULT_MOUNT_PY = REPO / "tests" / "faultmount.py"
PYTHON = sys.executable
TEST_IMAGE_SIZE = "1G"

# Log lines that mean something went wrong in the daemon (see Mount.check_log).
_BAD_LOG = re.compile(r"Traceback|\b(ERROR|WARNING|CRITICAL)\b")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a mount.py or tool subprocess: this interpreter's venv first on
    PATH and the checkout on PYTHONPATH (so it also works without an installed package)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(PYTHON).parent), env.get("PATH", "")))
    env.update(extra or {})
    return env


def make_image(path: Path, size: str = TEST_IMAGE_SIZE) -> Path:
    """A freshly formatted sparse image (mkfs.nexfs, in-process: no interpreter start-up)."""
    from nexfs.tools.mkfs import main as mkfs_main

    code = mkfs_main(["--size", size, "--quiet", "--label", "mount-test", str(path)])
    assert code == 0, f"mkfs.nexfs exit {code}"
    return path


def fsck(image: Path | str, *args: str) -> tuple[int, str]:
    """``fsck.nexfs -n -f IMAGE`` (or with ``args`` instead of ``-n -f``), in-process;
    returns (exit code, output).  0 means clean."""
    import contextlib
    import io

    from nexfs.tools.fsck import main as fsck_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = fsck_main([*(args or ("-n", "-f")), str(image)])
    return code, out.getvalue()


def volume_is_clean(image: Path) -> bool:
    """True when the superblock says CLEAN (and nothing else): the last session closed the
    volume, which checkpoints the journal and leaves it empty."""
    from nexfs.ondisk.layout import STATE_CLEAN
    from nexfs.store.blockdev import BlockDev
    from nexfs.store.volume import read_superblock
    from valve import Rights, Valve

    with Valve.open(image, read_only=True) as v:
        return read_superblock(BlockDev(v.grant(Rights.READ))).state == STATE_CLEAN


def mounted_fs(mountpoint: Path) -> tuple[str, str, str] | None:
    """(source, type, options) of the mount on ``mountpoint`` from /proc/mounts, or None."""
    target = str(mountpoint)
    found = None
    with open("/proc/mounts") as f:
        for line in f:
            source, where, fstype, options = line.split()[:4]
            where = where.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            if where == target:
                found = (source, fstype, options)  # the last one is the top of the stack
    return found


def is_nexfs_mount(mountpoint: Path) -> bool:
    found = mounted_fs(mountpoint)
    return found is not None and found[1] == "fuse.nexfs"


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` s or when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace") if log and log.exists() else ""
            pytest.fail(f"{what}: mount.py exited with {proc.returncode} first\n{text}")
        if time.monotonic() > deadline:
            text = log.read_text(errors="replace") if log and log.exists() else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{text}")
        time.sleep(0.02)  # a polling interval, not a synchronisation


def fusermount_u(mountpoint: Path, *, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def sh(script: str, cwd: Path, *, check: bool = True, user: str | None = None,
       timeout: float = 120, env: dict[str, str] | None = None
       ) -> subprocess.CompletedProcess[str]:
    """Run a bash script as a user would (``set -euo pipefail``), optionally as ``user`` via
    setpriv; output is captured and shown when it fails."""
    cmd = ["bash", "-c", "set -euxo pipefail\n" + script]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={_group_of(user)}", "--clear-groups",
               *cmd]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            check=False, env=env or child_env())
    if check and result.returncode != 0:
        # The script runs with -x: the end of stderr shows the command that failed.
        pytest.fail(f"script failed with exit {result.returncode}\n--- stdout\n"
                    f"{result.stdout[-3000:]}\n--- stderr (trace)\n{result.stderr[-5000:]}")
    return result


def _group_of(user: str) -> str:
    import grp
    import pwd

    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


class Mount:
    """One ``mount.py IMAGE MOUNTPOINT --foreground`` process."""

    def __init__(self, image: Path, mountpoint: Path, log: Path, options: Sequence[str] = (),
                 env: dict[str, str] | None = None, args: Sequence[str] = (),
                 faults: Sequence[str] = ()) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.log = log
        self.options = list(options)
        self.env = env
        self.args = list(args)
        self.faults = list(faults)  # faultmount.py's options, e.g. ["--device-fault", SPEC]
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.expected_log: list[str] = []  # regexes of log lines the test expects

    def command(self) -> list[str]:
        launcher = [str(FAULT_MOUNT_PY), *self.faults, "--"] if self.faults else [str(MOUNT_PY)]
        cmd = [PYTHON, *launcher, str(self.image), str(self.mountpoint), "--foreground",
               *self.args]
        if self.options:
            cmd += ["-o", ",".join(self.options)]
        return cmd

    def start(self, timeout: float = 30) -> Mount:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=child_env(self.env))
        wait_until(lambda: is_nexfs_mount(self.mountpoint), timeout, "the mount", self.proc,
                   self.log)
        os.stat(self.mountpoint)  # the first request completes the FUSE handshake
        return self

    @property
    def up(self) -> bool:
        return is_nexfs_mount(self.mountpoint)

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with the mount point as the working directory."""
        return sh(script, self.mountpoint, **kwargs)  # type: ignore[arg-type]

    def unmount(self, timeout: float = 60) -> int:
        """``fusermount3 -u`` (retried while the mount point is briefly busy), then wait for
        the daemon to finish closing the volume; returns its exit status."""
        deadline = time.monotonic() + timeout
        while self.up:
            result = fusermount_u(self.mountpoint)
            if result.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"cannot unmount {self.mountpoint}: {result.stderr}")
            time.sleep(0.05)  # busy: a process of the test is still letting go
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"mount.py did not exit within {timeout} s of the unmount\n"
                        f"{self.log_text()}")
        return self.returncode

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """Last resort: SIGKILL the daemon and detach whatever is left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            self.returncode = self.proc.returncode
        if mounted_fs(self.mountpoint) is not None:
            fusermount_u(self.mountpoint, lazy=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def expect_log(self, pattern: str) -> None:
        """Declare that a warning/error line matching ``pattern`` is expected."""
        self.expected_log.append(pattern)

    def unexpected_log_lines(self) -> list[str]:
        """Warnings, errors and tracebacks in the daemon's output not declared expected."""
        return [line for line in self.log_text().splitlines()
                if _BAD_LOG.search(line) and not any(re.search(p, line)
                                                     for p in self.expected_log)]


class Mounter:
    """Makes images and mounts for one test, and cleans all of them up afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.mounts: list[Mount] = []
        self.images: list[Path] = []
        self.needs_fsck: set[Path] = set()  # images a test deliberately marked
        self._dirs: list[Path] = []

    def image(self, name: str = "vol.img", size: str = TEST_IMAGE_SIZE) -> Path:
        path = make_image(self.tmp_path / name, size)
        self.images.append(path)
        return path

    def mountpoint(self) -> Path:
        """An empty directory that every user can reach (pytest's tmp_path is 0700, which
        would hide the mount from the non-root tests)."""
        path = Path(tempfile.mkdtemp(prefix="nexfs-mnt-"))
        path.chmod(0o755)
        self._dirs.append(path)
        return path

    def mount(self, image: Path | None = None, mountpoint: Path | None = None,
              options: Sequence[str] = (), env: dict[str, str] | None = None,
              args: Sequence[str] = (), start: bool = True, device_fault: str | None = None,
              handler_fault: str | None = None) -> Mount:
        """A mount of ``image`` (a new one if None); ``device_fault`` and ``handler_fault``
        are tests/faultmount.py's specifications (the mount then runs through it)."""
        image = image if image is not None else self.image()
        if image not in self.images:
            self.images.append(image)
        mnt = mountpoint if mountpoint is not None else self.mountpoint()
        log = self.tmp_path / f"mount-{len(self.mounts)}.log"
        faults = [*(["--device-fault", device_fault] if device_fault else []),
                  *(["--handler-fault", handler_fault] if handler_fault else [])]
        m = Mount(image, mnt, log, options, env, args, faults)
        self.mounts.append(m)
        if start:
            m.start()
        return m

    def cleanup(self) -> list[str]:
        """Unmount everything; returns the problems found (fsck, logs, exit codes)."""
        problems: list[str] = []
        for m in reversed(self.mounts):
            if m.proc is None:
                continue
            if m.proc.poll() is None or m.up:
                try:
                    m.unmount()
                except BaseException as exc:  # pytest.fail inside: keep cleaning up
                    problems.append(f"{m.mountpoint}: unmount failed: {exc}")
                    m.kill()
            bad = m.unexpected_log_lines()
            if bad:
                problems.append(f"{m.log.name}: unexpected log lines:\n  " + "\n  ".join(bad))
        for path in self._dirs:
            with contextlib.suppress(OSError):
                path.rmdir()
        for image in self.images:
            if image in self.needs_fsck or not image.exists():
                continue
            code, output = fsck(image)
            if code != 0:
                problems.append(f"fsck {image.name}: exit {code}\n{output}")
        return problems


@pytest.fixture(name="mounter")
def mounter_fixture(tmp_path: Path) -> Iterator[Mounter]:
    """A :class:`Mounter`; after the test every mount is unmounted and every image must pass
    fsck, and no daemon may have logged a warning, error or traceback the test did not
    declare with :meth:`Mount.expect_log`."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs /dev/fuse and fusermount3")
    m = Mounter(tmp_path)
    try:
        yield m
    finally:
        problems = m.cleanup()
    if problems:
        pytest.fail("\n".join(problems))


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, other users)")


@pytest.fixture(name="mounted")
def mounted_fixture(mounter: Mounter) -> Mount:
    """A fresh 1 GiB volume mounted read-write."""
    return mounter.mount()
