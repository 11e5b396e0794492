"""The contenders and the reference systems: each one prepares a fresh image of the same
size and exposes a target.

A system is a context manager: on entry it creates a sparse image file, formats and mounts
it (or attaches a loop device), and yields a :class:`Mounted` (where to put files, and the
PID of the userspace daemon whose memory is watched, if any); on exit it unmounts, waits for
the daemon to end, detaches the loop device and deletes the image, whatever happened inside
(an exception, Ctrl-C).  Nothing is left mounted, attached or running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

VENV_BIN = Path(sys.executable).parent
"""mkfs.nexfs and mount.nexfs are the console scripts next to the running interpreter."""


class BenchError(Exception):
    """Something the benchmark needs is missing or failed: reported as one line."""


@dataclass(frozen=True)
class Mounted:
    """A prepared contender: ``path`` is a directory (a mount) or, for the raw device, the
    image file itself; ``pid`` is the daemon serving it (None for the kernel)."""

    name: str
    path: Path
    pid: int | None
    is_raw: bool = False
    fio_only: bool = False
    """A reference system that runs only the fio jobs (the raw image, the ceiling)."""


def run(cmd: list[str], *, timeout: float = 120) -> str:
    """Run a helper; its failure is a BenchError carrying the helper's own message."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise BenchError(f"{cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(cmd)} did not finish in {timeout:g} s") from None
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed (exit {proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def make_sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f if len(line.split()) > 1)


def find_daemon(image: Path, program: str) -> int | None:
    """The PID of the process running ``program`` on ``image`` (both daemonize, so the
    PID we started is gone)."""
    needle = os.fsencode(str(image))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(program.encode() in a for a in args[:2]) and any(needle in a for a in args):
            return int(entry)
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def close_own_fds(under: Path) -> None:
    """Close descriptors this process still holds on files below ``under``: a Ctrl-C right
    after an ``open`` returned leaves one, and it would keep the mount busy (and a FUSE
    daemon waiting for it) forever."""
    prefix = os.path.realpath(under) + "/"
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(prefix):
                os.close(int(fd))
        except OSError:
            pass


def fuse_unmount(mountpoint: Path, pid: int | None, *, timeout: float = 120) -> None:
    """Unmount a FUSE mount and wait until its daemon has exited (it writes back and closes
    the volume after the unmount returns)."""
    close_own_fds(mountpoint)
    if is_mounted(mountpoint):
        try:
            run(["fusermount3", "-u", str(mountpoint)], timeout=timeout)
        except BenchError as exc:
            log.warning("%s; detaching lazily", exc)
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False,
                           capture_output=True)
    deadline = time.monotonic() + timeout
    while pid is not None and _alive(pid):
        if time.monotonic() > deadline:
            log.warning("daemon %d still running %g s after unmount; killing it", pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            break
        time.sleep(0.05)


class System:
    """Base: a named contender on a fresh sparse image of ``size`` bytes in ``workdir``."""

    name = ""
    label = ""

    def __init__(self, workdir: Path, size: int) -> None:
        self.workdir = workdir
        self.size = size
        self.image = workdir / f"{self.name}.img"
        self.mountpoint = workdir / f"mnt-{self.name}"

    @staticmethod
    def available() -> str | None:
        """None if the tools are there, else why not."""
        return None

    @contextlib.contextmanager
    def prepared(self) -> Iterator[Mounted]:
        make_sparse(self.image, self.size)
        try:
            self.mountpoint.mkdir(exist_ok=True)
            try:
                with self._mounted() as mounted:
                    yield mounted
            finally:
                with contextlib.suppress(OSError):
                    self.mountpoint.rmdir()
        finally:
            self.image.unlink(missing_ok=True)

    def _mounted(self) -> contextlib.AbstractContextManager[Mounted]:
        raise NotImplementedError


class NexFS(System):
    name = "nexfs"
    label = "NexFS"

    @staticmethod
    def available() -> str | None:
        missing = [p for p in ("mkfs.nexfs", "mount.nexfs") if not (VENV_BIN / p).exists()]
        return f"{', '.join(missing)} not found next to {sys.executable}" if missing else None

    @contextlib.contextmanager
    def _mounted(self) -> Iterator[Mounted]:
        run([str(VENV_BIN / "mkfs.nexfs"), "--quiet", "--force", str(self.image)])
        run([str(VENV_BIN / "mount.nexfs"), str(self.image), str(self.mountpoint)])
        pid = find_daemon(self.image, "mount.nexfs")
        try:
            yield Mounted(self.label, self.mountpoint, pid)
        finally:
            fuse_unmount(self.mountpoint, pid)


class NbdNexFS(System):
    """NexFS on an NBD export: nbdkit's file plugin serves the same kind of image on a Unix
    socket, and the daemon reaches it through libnbd (the cost of the network path, next to
    the local one).  ``cache=none``: the server does not keep the image in its page cache,
    as the local valve's O_DIRECT does not."""

    name = "nbd"
    label = "NexFS on NBD"

    @staticmethod
    def available() -> str | None:
        why = NexFS.available()
        if why:
            return why
        return None if shutil.which("nbdkit") else "nbdkit not installed"

    @contextlib.contextmanager
    def _mounted(self) -> Iterator[Mounted]:
        sock = self.workdir / "nbd.sock"
        pidfile = self.workdir / "nbdkit.pid"
        # Without -f nbdkit returns once its socket accepts connections, then runs on.
        run(["nbdkit", "-U", str(sock), "-P", str(pidfile), "file", str(self.image),
             "cache=none"])
        uri = f"nbd+unix:///?socket={sock}"
        try:
            run([str(VENV_BIN / "mkfs.nexfs"), "--quiet", "--force", uri])
            run([str(VENV_BIN / "mount.nexfs"), uri, str(self.mountpoint)])
            pid = find_daemon(sock, "mount.nexfs")
            try:
                yield Mounted(self.label, self.mountpoint, pid)
            finally:
                fuse_unmount(self.mountpoint, pid)
        finally:
            _stop_pidfile(pidfile)
            sock.unlink(missing_ok=True)


def _stop_pidfile(pidfile: Path, timeout: float = 30) -> None:
    """SIGTERM the daemon named in ``pidfile`` (written just after nbdkit forks) and wait."""
    deadline = time.monotonic() + timeout
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        log.warning("%s: no pid; nbdkit may still be running", pidfile)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 15)
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    pidfile.unlink(missing_ok=True)


class Fuse2fs(System):
    name = "fuse2fs"
    label = "fuse2fs"

    @staticmethod
    def available() -> str | None:
        missing = [p for p in ("fuse2fs", "mkfs.ext4", "fusermount3") if not shutil.which(p)]
        return f"{', '.join(missing)} not installed" if missing else None

    @contextlib.contextmanager
    def _mounted(self) -> Iterator[Mounted]:
        run(["mkfs.ext4", "-q", "-F", str(self.image)])
        # As root fuse2fs needs no options; it forks and serves from the background.
        run(["fuse2fs", str(self.image), str(self.mountpoint)])
        pid = find_daemon(self.image, "fuse2fs")
        try:
            if not is_mounted(self.mountpoint):
                raise BenchError(f"fuse2fs did not mount {self.mountpoint}")
            yield Mounted(self.label, self.mountpoint, pid)
        finally:
            fuse_unmount(self.mountpoint, pid)


class KernelExt4(System):
    name = "ext4"
    label = "kernel ext4"

    @staticmethod
    def available() -> str | None:
        if os.geteuid() != 0:
            return "needs root (loop device, mount)"
        missing = [p for p in ("losetup", "mkfs.ext4", "mount", "umount") if not shutil.which(p)]
        return f"{', '.join(missing)} not installed" if missing else None

    @contextlib.contextmanager
    def _mounted(self) -> Iterator[Mounted]:
        run(["mkfs.ext4", "-q", "-F", str(self.image)])
        loop = run(["losetup", "--find", "--show", str(self.image)]).strip()
        try:
            run(["mount", "-t", "ext4", loop, str(self.mountpoint)])
            try:
                yield Mounted(self.label, self.mountpoint, None)
            finally:
                close_own_fds(self.mountpoint)
                run(["umount", str(self.mountpoint)], timeout=300)
        finally:
            run(["losetup", "-d", loop])


class RawDevice(System):
    """fio straight on the image file with O_DIRECT: what the disk itself allows."""

    name = "raw"
    label = "raw image (fio --direct=1)"

    @contextlib.contextmanager
    def _mounted(self) -> Iterator[Mounted]:
        yield Mounted(self.label, self.image, None, is_raw=True, fio_only=True)


CEILING_FS = Path(__file__).resolve().parent.parent / "ceilingfs.py"


class Ceiling(System):
    """bench/ceilingfs.py: a pyfuse3 filesystem that does nothing but answer (writes are
    dropped, reads return zeros), served by NexFS's own request loop.  Its figures are the
    most any pyfuse3 filesystem gets on this machine; it runs the fio jobs only."""

    name = "ceiling"
    label = "minimal pyfuse3 (ceiling)"
    options: tuple[str, ...] = ()

    @staticmethod
    def available() -> str | None:
        if not CEILING_FS.is_file():
            return f"{CEILING_FS} not found"
        return None if shutil.which("fusermount3") else "fusermount3 not installed"

    @contextlib.contextmanager
    def _mounted(self) -> Iterator[Mounted]:
        log_path = self.workdir / f"{self.name}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([sys.executable, str(CEILING_FS), *self._options(),
                                     str(self.mountpoint)],
                                    stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not is_mounted(self.mountpoint):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"ceilingfs did not mount {self.mountpoint}: "
                                     f"{log_path.read_text(errors='replace').strip()[-500:]}")
                time.sleep(0.02)  # polling for the mount to appear, not synchronising
            yield Mounted(self.label, self.mountpoint, proc.pid, fio_only=True)
        finally:
            fuse_unmount(self.mountpoint, proc.pid)
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=60)
            log_path.unlink(missing_ok=True)

    def _options(self) -> list[str]:
        return []


class CeilingPosix(Ceiling):
    """``ceilingfs.py --posix``: the ceiling without what NexFS cannot do (FUSE direct I/O,
    no xattrs), so an O_DIRECT write is two requests, as on NexFS."""

    name = "ceiling-posix"
    label = "ceiling, NexFS's requests (--posix)"

    def _options(self) -> list[str]:
        return ["--posix"]


class CeilingDev(Ceiling):
    """``ceilingfs.py --device IMAGE``: ``--posix``, and the file is this system's image
    read and written through the valve as NexFS does (blocking at QD1, a ring for reads in
    flight): the least any device-backed pyfuse3 filesystem of this design pays."""

    name = "ceiling-dev"
    label = "ceiling on the device (--device)"

    def _options(self) -> list[str]:
        return ["--device", str(self.image)]


SYSTEMS: tuple[type[System], ...] = (NexFS, NbdNexFS, Fuse2fs, KernelExt4, RawDevice, Ceiling,
                                     CeilingPosix, CeilingDev)


def drop_caches() -> None:
    """Write back and drop the kernel's page, dentry and inode caches (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        raise BenchError(f"cannot drop caches ({exc.strerror}); run as root") from None


def memory_kib(pid: int | None) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of ``pid`` in KiB, or None."""
    if pid is None:
        return None
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        return None
    return rss, hwm


def time_nexfs_mount(workdir: Path, size: int) -> float:
    """Seconds from running mount.nexfs on a fresh ``size`` image to a ready mount."""
    system = NexFS(workdir, size)
    make_sparse(system.image, size)
    try:
        system.mountpoint.mkdir(exist_ok=True)
        run([str(VENV_BIN / "mkfs.nexfs"), "--quiet", "--force", str(system.image)],
            timeout=600)
        start = time.perf_counter()
        run([str(VENV_BIN / "mount.nexfs"), str(system.image), str(system.mountpoint)])
        elapsed = time.perf_counter() - start
        fuse_unmount(system.mountpoint, find_daemon(system.image, "mount.nexfs"))
        return elapsed
    finally:
        if is_mounted(system.mountpoint):
            fuse_unmount(system.mountpoint, find_daemon(system.image, "mount.nexfs"))
        with contextlib.suppress(OSError):
            system.mountpoint.rmdir()
        system.image.unlink(missing_ok=True)
