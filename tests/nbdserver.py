"""NBD servers for the tests: nbdkit (any plugin and filters) and qemu-nbd (a qcow2 image).

Every server is the test's own: a Unix socket in the test's tmp dir, or loopback TCP on a
port the kernel just handed out.  nbdkit runs in the foreground with ``--exit-with-parent``
(it cannot outlive the test process) and is ready when its pid file exists (nbdkit writes it
once it accepts connections); qemu-nbd ``--fork`` returns once it is ready.  ``stop`` ends
the server politely, ``kill`` with SIGKILL (the "server died" fault), ``start`` again on the
same address is the "server restarted" fault.  Tests skip, saying why, where the tools are
missing — except in CI, where that is a failure (CI installs them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from mountutil import wait_until


def require(*tools: str) -> None:
    """Skip (fail in CI) when a server program is not installed."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    why = f"needs {', '.join(missing)} (Debian: nbdkit, qemu-utils)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NbdKit:
    """One nbdkit serving ``plugin`` with ``args`` through ``filters``.

    ``uri`` is libnbd's URI of the export: ``nbd+unix:///?socket=...`` or, with ``tcp``,
    ``nbd://127.0.0.1:PORT/``.
    """

    def __init__(self, workdir: Path, plugin: str, args: Sequence[str] = (),
                 filters: Sequence[str] = (), *, tcp: bool = False,
                 readonly: bool = False, name: str = "nbdkit") -> None:
        require("nbdkit")
        self.workdir = workdir
        self.plugin = plugin
        self.args = list(args)
        self.filters = list(filters)
        self.readonly = readonly
        self.pidfile = workdir / f"{name}.pid"
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if tcp:
            self.port = free_port()
            self.sock = None
            self.uri = f"nbd://127.0.0.1:{self.port}/"
        else:
            self.port = 0
            self.sock = workdir / f"{name}.sock"
            self.uri = f"nbd+unix:///?socket={self.sock}"

    def command(self) -> list[str]:
        where = (["-U", str(self.sock)] if self.sock is not None
                 else ["-i", "127.0.0.1", "-p", str(self.port)])
        return ["nbdkit", "-f", "--exit-with-parent", "-P", str(self.pidfile), *where,
                *(["-r"] if self.readonly else []),
                *(f"--filter={f}" for f in self.filters), self.plugin, *self.args]

    def start(self) -> NbdKit:
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc
        # Ready, or dead (then the check below says why, with nbdkit's own words).
        wait_until(lambda: self.pidfile.exists() or proc.poll() is not None, 30,
                   "nbdkit to accept connections")
        if proc.poll() is not None:
            pytest.fail(f"nbdkit exited with {proc.returncode}: {self.log.read_text()}")
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the server dies with requests in flight, sockets reset."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:  # SIGTERM waits for clients: a test failed
                self.proc.kill()
                self.proc.wait(30)
        if self.sock is not None:
            with contextlib.suppress(FileNotFoundError):
                self.sock.unlink()

    def __enter__(self) -> NbdKit:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class QemuNbd:
    """qemu-nbd serving a qcow2 image on a Unix socket (``--fork``: ready on return)."""

    def __init__(self, workdir: Path, qcow2: Path, name: str = "qemu-nbd") -> None:
        require("qemu-nbd", "qemu-img")
        self.qcow2 = qcow2
        self.sock = workdir / f"{name}.sock"
        self.pidfile = workdir / f"{name}.pid"
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.pid = 0

    @staticmethod
    def create(path: Path, size: str) -> Path:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size],
                       check=True, capture_output=True)
        return path

    def start(self) -> QemuNbd:
        # -t: serve one client after another (the tools connect one at a time);
        # --cache=writeback with flushes honoured is qemu's default, and what a fs expects.
        subprocess.run(["qemu-nbd", "--fork", "-t", "--pid-file", str(self.pidfile),
                        "-k", str(self.sock), "-f", "qcow2", str(self.qcow2)],
                       check=True, capture_output=True, timeout=60)
        self.pid = int(self.pidfile.read_text())
        return self

    def stop(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            # Not our child (it forked): wait for it through /proc.
            wait_until(lambda: not Path(f"/proc/{self.pid}").exists()
                       or _is_zombie(self.pid), 30, "qemu-nbd to exit")
            self.pid = 0

    def __enter__(self) -> QemuNbd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


class PauseControl:
    """nbdkit's pause filter (``pause-control=SOCKET``): stall requests and resume them."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock

    def _send(self, cmd: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)
            s.connect(str(self.sock))
            s.sendall(cmd)
            # The filter answers in upper case once it has taken effect.
            assert s.recv(1) == cmd.upper()

    def pause(self) -> None:
        self._send(b"p")

    def resume(self) -> None:
        self._send(b"r")


def eval_file_args(path: Path, *, flush: bool, fua: bool) -> list[str]:
    """Arguments of nbdkit's eval plugin serving the file ``path`` with a chosen NBD
    feature set: ``flush`` (NBD_CMD_FLUSH offered) and ``fua`` (FUA, emulated by nbdkit
    with a flush).  For what the file plugin always offers, never for speed."""
    return [
        f"get_size=stat -c %s {path}",
        f"pread=dd if={path} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        f"pwrite=dd of={path} seek=$4 oflag=seek_bytes conv=notrunc status=none",
        "can_write=exit 0",
        f"can_flush=exit {0 if flush else 3}",
        f"flush=sync {path}",
        f"can_fua=echo {'emulate' if fua else 'none'}",
    ]
