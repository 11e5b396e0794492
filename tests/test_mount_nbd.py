"""NexFS mounted from an NBD export, and the faults a network puts under a mounted volume.

The daemon is the real ``mount.py URI MOUNTPOINT --foreground`` against the test's own
nbdkit (file plugin, loopback TCP or a Unix socket), driven by shell tools and by the stress
workloads of tests/mountstress.py (which record what ``fsync`` acknowledged).  Faults come
from the server side, with nbdkit's own filters: ``error`` (EIO replies to writes),
``pause`` (a server that stops answering: the request timeout), and a server
killed with SIGKILL in the middle of a workload, then restarted.  In every case: the process
that made the failing request gets EIO (or EROFS once the volume is read-only), the mount
stays up and goes read-only, nothing that fsync acknowledged is lost, no request hangs past
the timeout, the old mount never reconnects, and after a remount the export is fsck-clean.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from mountstress import (
    check_renamer,
    check_writer,
    count_records,
    fsync_path,
    read_records,
    workload_command,
    writer_content,
)
from mountutil import (  # noqa: F401  (fixtures)
    Mount,
    Mounter,
    child_env,
    fsck,
    mounted_fs,
    mounter_fixture,
    wait_until,
)
from nbdserver import NbdKit, PauseControl
from test_mount_faults import EARLY, SEED, run_writer, write_durable
from test_mount_lifecycle import (  # noqa: F401  (fixture)
    daemon_pid,
    fuse_helper,
    mount_by_fstab,
    wait_gone,
)

pytestmark = pytest.mark.mount

SIZE = "256M"


def export(tmp_path: Path, *, filters: tuple[str, ...] = (), args: tuple[str, ...] = (),
           tcp: bool = False, name: str = "nbdkit") -> tuple[NbdKit, Path]:
    """An nbdkit file export of a fresh NexFS image (formatted over the wire)."""
    backing = tmp_path / f"{name}.img"
    with open(backing, "wb") as f:
        f.truncate(256 << 20)
    srv = NbdKit(tmp_path, "file", [str(backing), *args], list(filters), tcp=tcp, name=name)
    srv.start()
    # Multi-mount protection is on by default for an export (no lock protects it); a short
    # interval keeps each mount's claim at 2 x 0.2 + 1 s.
    code, out = mkfs(srv.uri, "--mmp-interval", "0.2")
    assert code == 0, out
    return srv, backing


@contextlib.contextmanager
def serving(srv: NbdKit, mounter: Mounter) -> Iterator[NbdKit]:
    """Stop ``srv`` at the end, but only after every mount of the test is gone: a failing
    test must not leave a daemon talking to a server that is shutting down (nbdkit waits
    for its clients, and answers their requests with ESHUTDOWN meanwhile)."""
    try:
        yield srv
    finally:
        for m in mounter.mounts:
            if m.proc is not None and (m.proc.poll() is None or m.up):
                try:
                    m.unmount()
                except BaseException:  # pytest.fail inside: the daemon must still go
                    m.kill()
        srv.stop()


def mkfs(uri: str, *args: str) -> tuple[int, str]:
    result = subprocess.run(
        [*_cli(), "mkfs", "--quiet", "--label", "nbd-test", *args, uri],
        capture_output=True, text=True, timeout=120, env=child_env(), check=False)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout + result.stderr


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "nexfs.tools.cli"]


def mount(mounter: Mounter, uri: str, options: list[str] | None = None) -> Mount:
    """A mount of ``uri`` that the mounter unmounts and log-checks after the test (fsck of
    the export is the test's own business: the mounter only knows image files)."""
    mnt = mounter.mountpoint()
    log = mounter.tmp_path / f"mount-{len(mounter.mounts)}.log"
    # Mount only ever formats its image with str(): a URI goes through as it is.
    m = Mount(cast(Path, uri), mnt, log, options or [])
    mounter.mounts.append(m)
    return m.start()


def expect_wire_fault_log(m: Mount) -> None:
    m.expect_log(r"filesystem error, continuing read-only|could not mark the superblock|"
                 r"needs fsck|device error|answered EIO|failed: Input/output error|"
                 r"no answer within|connection|server")


def assert_clean(uri: str) -> None:
    code, out = fsck(uri)
    assert code == 0, out


# -- a real mount, real tools -------------------------------------------------------------

@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_shell_tools_on_an_nbd_mount(mounter: Mounter, tmp_path: Path, tcp: bool) -> None:
    srv, backing = export(tmp_path, tcp=tcp)
    with serving(srv, mounter):
        m = mount(mounter, srv.uri)
        source, fstype, _ = mounted_fs(m.mountpoint) or ("", "", "")
        assert (source, fstype) == (srv.uri, "fuse.nexfs")
        m.sh("""
            mkdir -p src/a/b && seq 1 200000 > src/a/b/numbers && echo hi > src/a/hello
            ln -s hello src/a/link && ln src/a/hello src/a/hard
            tar -cf archive.tar src && mkdir x && tar -xf archive.tar -C x
            diff -r src x/src
            cp -a src copy && mv copy moved && sha256sum src/a/b/numbers moved/a/b/numbers \
                | awk '{print $1}' | uniq | wc -l | grep -qx 1
            dd if=/dev/urandom of=big bs=1M count=24 status=none && sync big
            cmp big <(cat big) && test "$(stat -c %s big)" = 25165824
            find . -type f | wc -l | grep -qx 11
            rm -rf x moved && test ! -e x && df -h . >/dev/null
            sync -f .
        """)
        digest = m.sh("sha256sum big | cut -c1-64").stdout.strip()
        assert m.unmount() == 0
        assert_clean(srv.uri)
        # The bytes are in the served file: the same volume opens as an image file.
        srv.stop()
        assert_clean(str(backing))
        srv.start()
        again = mount(mounter, srv.uri, ["ro"])
        assert again.sh("sha256sum big | cut -c1-64").stdout.strip() == digest
        assert again.unmount() == 0


def test_mount_t_and_fstab_with_netdev(mounter: Mounter, fuse_helper: Path,  # noqa: F811
                                       tmp_path: Path) -> None:
    srv, _ = export(tmp_path)
    mnt = mounter.mountpoint()
    with serving(srv, mounter):
        result = subprocess.run(["mount", "-t", "fuse.nexfs", "-o",
                                 "_netdev,noatime,nbd_timeout=20", srv.uri, str(mnt)],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        try:
            assert (mounted_fs(mnt) or ("", ""))[:2] == (srv.uri, "fuse.nexfs")
            pid = daemon_pid(mnt)
            (mnt / "via-mount-t").write_text("ok")
            assert subprocess.run(["umount", str(mnt)], check=False).returncode == 0
            wait_gone(pid)
        finally:
            if mounted_fs(mnt) is not None:
                subprocess.run(["fusermount3", "-uz", str(mnt)], check=False)
        mount_by_fstab(srv.uri, mnt, tmp_path)
        assert_clean(srv.uri)


def test_mount_refusals_are_one_line(mounter: Mounter, tmp_path: Path) -> None:
    mnt = mounter.mountpoint()
    for uri, why in ((f"nbd+unix:///?socket={tmp_path}/none.sock", "cannot connect"),
                     ("nbd://[bad", "not a usable NBD URI")):
        result = subprocess.run([*_mount_py(), uri, str(mnt), "--foreground"],
                                capture_output=True, text=True, timeout=60, env=child_env(),
                                check=False)
        assert result.returncode == 1, result
        assert why in result.stderr and "Traceback" not in result.stderr, result.stderr
    result = subprocess.run([*_mount_py(), "nbd://127.0.0.1:1/", str(mnt), "-o",
                             "nbd_timeout=never"], capture_output=True, text=True,
                            timeout=60, env=child_env(), check=False)
    assert result.returncode == 2 and "nbd_timeout" in result.stderr, result


def _mount_py() -> list[str]:
    import sys

    from mountutil import MOUNT_PY

    return [sys.executable, str(MOUNT_PY)]


# -- faults on the wire ----------------------------------------------------------------------

def test_error_replies_from_the_server(mounter: Mounter, tmp_path: Path) -> None:
    """nbdkit's error filter answers every write with EIO while the arm file exists."""
    arm = tmp_path / "arm"
    srv, _ = export(tmp_path, filters=("error",), args=(
        "error-pwrite=EIO", "error-pwrite-rate=100%", f"error-pwrite-file={arm}"))
    with serving(srv, mounter):
        m = mount(mounter, srv.uri, ["commit=3600"])
        expect_wire_fault_log(m)
        mnt = m.mountpoint
        (mnt / "early").mkdir()
        write_durable(mnt / "early", EARLY, SEED)
        (mnt / "w").mkdir()
        arm.touch()
        result = run_writer(mnt / "w", tmp_path / "w.rec", SEED + 1)
        assert result.returncode == 3, result
        assert re.match(r"errno (EIO|EROFS):", result.stderr), result.stderr
        assert m.up
        for name in EARLY:  # reads still work: the server only refuses writes
            assert (mnt / "early" / name).read_bytes() == writer_content(SEED, name)
        with pytest.raises(OSError) as info:
            (mnt / "after").write_bytes(b"x")
        assert info.value.errno == errno.EROFS
        assert "continuing read-only" in m.log_text()
        assert m.unmount() == 3  # EXIT_NEEDS_FSCK
        arm.unlink()
        code, out = fsck(srv.uri, "-y", "-f")
        assert code in (0, 1), out
        assert_clean(srv.uri)
        again = mount(mounter, srv.uri)
        problems = check_writer(again.mountpoint / "early", EARLY, SEED)
        problems += check_writer(again.mountpoint / "w", read_records(tmp_path / "w.rec"),
                                 SEED + 1)
        assert not problems, problems
        assert again.unmount() == 0
        assert_clean(srv.uri)


def test_a_stalled_server_times_out(mounter: Mounter, tmp_path: Path) -> None:
    """The server stops answering (pause filter): the request fails after nbd_timeout,
    the volume goes read-only, nothing hangs (not even the unmount), and a remount after
    the server is back sees every fsync'd file."""
    control = PauseControl(tmp_path / "pause.sock")
    srv, _ = export(tmp_path, filters=("pause",), args=(f"pause-control={control.sock}",))
    with serving(srv, mounter):
        m = mount(mounter, srv.uri, ["commit=3600", "nbd_timeout=2"])
        expect_wire_fault_log(m)
        mnt = m.mountpoint
        (mnt / "early").mkdir()
        write_durable(mnt / "early", EARLY, SEED)
        control.pause()
        t0 = time.monotonic()
        result = subprocess.run(["dd", "if=/dev/zero", f"of={mnt}/stalled", "bs=64k",
                                 "count=4", "conv=fsync", "status=none"],
                                capture_output=True, text=True, timeout=60, check=False)
        elapsed = time.monotonic() - t0
        assert result.returncode != 0, result
        assert re.search(r"Input/output error|Read-only file system", result.stderr), result
        assert 1.5 < elapsed < 20, elapsed
        assert "no answer within 2000 ms" in m.log_text()
        control.resume()
        assert m.up
        assert "continuing read-only" in m.log_text()
        # Refused: EROFS, or EIO when what the create needs is not cached (the connection
        # is gone for reads too).
        with pytest.raises(OSError) as info:
            (mnt / "after").write_bytes(b"x")
        assert info.value.errno in (errno.EROFS, errno.EIO)
        t0 = time.monotonic()
        m.unmount()  # the superblock cannot be written any more: any exit code, no hang
        assert time.monotonic() - t0 < 30
        again = mount(mounter, srv.uri)
        assert not check_writer(again.mountpoint / "early", EARLY, SEED)
        assert again.unmount() == 0
        assert_clean(srv.uri)


def test_server_killed_mid_workload_then_restarted(mounter: Mounter, tmp_path: Path) -> None:
    """SIGKILL the server under a writer: the writer stops with EIO/EROFS, the mount stays
    up read-only; the server comes back on the same port, and the old mount still does not
    use it (no reconnection: an O_DIRECT read fails); a remount sees every fsync'd file."""
    srv, _ = export(tmp_path, tcp=True)
    with serving(srv, mounter):
        m = mount(mounter, srv.uri)
        expect_wire_fault_log(m)
        mnt = m.mountpoint
        (mnt / "early").mkdir()
        write_durable(mnt / "early", EARLY, SEED)
        (mnt / "w").mkdir()
        record = tmp_path / "w.rec"
        writer = subprocess.Popen(
            workload_command("writer", "--dir", str(mnt / "w"), "--record", str(record),
                             "--seed", str(SEED + 1), "--count", "100000", "--seconds", "120"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        try:
            wait_until(lambda: count_records(record) >= 10, 60, "the writer's first files")
            srv.kill()
            _, stderr = writer.communicate(timeout=60)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        assert writer.returncode == 3, stderr
        assert re.match(r"errno (EIO|EROFS):", stderr), stderr
        assert m.up
        srv.start()  # the same address again
        direct = subprocess.run(["dd", f"if={mnt}/early/{EARLY[-1]}", "iflag=direct",
                                 "bs=64k", "status=none"], capture_output=True, check=False)
        assert direct.returncode != 0  # the old connection is gone for good
        with pytest.raises(OSError) as info:
            (mnt / "after").write_bytes(b"x")
        assert info.value.errno in (errno.EROFS, errno.EIO)
        m.unmount()
        again = mount(mounter, srv.uri)
        records = read_records(record)
        assert len(records) >= 10
        problems = check_writer(again.mountpoint / "early", EARLY, SEED)
        problems += check_writer(again.mountpoint / "w", records, SEED + 1)
        assert not problems, problems
        again.sh("echo fine > after && cat after")
        assert again.unmount() == 0
        assert_clean(srv.uri)



# -- the explorer: any wire fault at any moment of a workload -----------------------------

LONG = os.environ.get("NEXFS_LONG") == "1"
FAULTS = ("kill", "stall", "errors")


@pytest.mark.parametrize("seed", range(15 if LONG else 3))
def test_explorer_wire_fault_at_a_random_moment(mounter: Mounter, tmp_path: Path,
                                                seed: int) -> None:
    """A writer and a renamer run on an NBD mount; at a random moment one of the faults
    strikes (server killed, server stalled past the timeout, every write answered EIO).
    Whatever was in flight: the workloads stop with an errno (never hang), the mount stays
    up, and after the server is healthy again a remount sees every fsync'd item and the
    export is fsck-clean."""
    rng = random.Random(seed)
    fault = FAULTS[seed % len(FAULTS)]
    delay = rng.uniform(0.05, 1.5)
    arm = tmp_path / "arm"
    control = PauseControl(tmp_path / "pause.sock")
    filters: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    if fault == "stall":
        filters, args = ("pause",), (f"pause-control={control.sock}",)
    elif fault == "errors":
        filters, args = ("error",), ("error-pwrite=EIO", "error-pwrite-rate=100%",
                                     f"error-pwrite-file={arm}")
    srv, _ = export(tmp_path, filters=filters, args=args, tcp=rng.random() < 0.5)
    with serving(srv, mounter):
        m = mount(mounter, srv.uri, ["nbd_timeout=2"])
        expect_wire_fault_log(m)
        mnt = m.mountpoint
        for d in ("w", "r"):
            (mnt / d).mkdir()
        # Durable before the fault: an un-fsync'd mkdir is discarded with the running
        # transaction when the volume fails, and the workloads would see ENOENT.
        fsync_path(mnt, directory=True)
        procs = {
            kind: subprocess.Popen(
                workload_command(kind, "--dir", str(mnt / kind[0]), "--record",
                                 str(tmp_path / f"{kind}.rec"), "--seed", str(seed),
                                 "--count", "100000", "--seconds", "60"),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
            for kind in ("writer", "renamer")}
        try:
            wait_until(lambda: count_records(tmp_path / "writer.rec") >= 1, 60,
                       "the writer's first file")
            time.sleep(delay)  # the random moment of the fault, not a synchronisation
            if fault == "kill":
                srv.kill()
            elif fault == "stall":
                control.pause()
            else:
                arm.touch()
            outcomes = {kind: p.communicate(timeout=90) for kind, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for kind, p in procs.items():
            # 3: stopped by an OSError (EIO, or EROFS once the volume is read-only).
            assert p.returncode == 3, (fault, kind, outcomes[kind])
            assert re.match(r"errno (EIO|EROFS)", outcomes[kind][1]), \
                (fault, kind, outcomes[kind], m.log_text()[-3000:])
        assert m.up
        m.unmount()
        if fault == "kill":
            srv.start()
        elif fault == "stall":
            control.resume()
        else:
            arm.unlink()
        again = mount(mounter, srv.uri)
        writes = read_records(tmp_path / "writer.rec")
        problems = check_writer(again.mountpoint / "w", writes, seed)
        problems += check_renamer(again.mountpoint / "r", read_records(tmp_path / "renamer.rec"),
                                  seed)
        assert not problems, (fault, delay, problems)
        assert again.unmount() == 0
        code, out = fsck(srv.uri, "-y", "-f")  # the error mark, if it reached the disk
        assert code in (0, 1), out
        assert_clean(srv.uri)
        print(f"seed {seed}: {fault} after {delay:.2f} s, {len(writes)} files fsync'd")


# -- two daemons against one export (multi-mount protection, nexfs/store/mmp.py) ----------


def test_two_daemons_on_one_export(mounter: Mounter, tmp_path: Path) -> None:
    """No lock protects an export, so mkfs turned multi-mount protection on: a second daemon
    (over TCP, while the first came in over the same TCP export) is refused while the first
    serves, naming it; after the first is killed with SIGKILL a third waits for the block to
    stand still and takes the volume over with every fsync'd byte; the export is fsck-clean."""
    from test_mount_mmp import WAIT, refused

    srv, _ = export(tmp_path, tcp=True)
    with serving(srv, mounter):
        first = mount(mounter, srv.uri)
        with open(first.mountpoint / "kept", "wb") as f:
            f.write(b"k" * 10000)
            os.fsync(f.fileno())
        second = Mount(cast(Path, srv.uri), mounter.mountpoint(),
                       mounter.tmp_path / f"mount-{len(mounter.mounts)}.log", [])
        mounter.mounts.append(second)
        assert first.proc is not None
        line = refused(second)
        assert f"the volume is in use by host {os.uname().nodename} (pid {first.proc.pid})" \
               in line, line
        assert (first.mountpoint / "kept").read_bytes() == b"k" * 10000  # undisturbed
        first.kill()  # the block stays claimed; nobody updates it any more
        started = time.monotonic()
        third = mount(mounter, srv.uri)
        assert time.monotonic() - started >= WAIT
        assert (third.mountpoint / "kept").read_bytes() == b"k" * 10000
        assert third.unmount() == 0
        assert_clean(srv.uri)
