"""Device faults injected below the filesystem (tests/faultdev.py), in-process.

For every write the workload issues, a run in which exactly that write fails (EIO, nothing
written), is cut short (half its sectors written, then EIO), or — for durable writes — is
written but its flush fails; and for every read of a walk, a run in which that read fails.
Each run checks: the caller gets FsError(EIO); after a failed write the volume is read-only
and the log says why; reads of what was durable keep working; no later fsync reports
success; and after a "remount" of the underlying device without the fault (both its current
contents and only what was durable, as after a power cut) the volume opens, fsck's scan is
clean, and the state is one the workload went through no earlier than the last successful
fsync — so everything fsync'd before the fault is intact.
"""

from __future__ import annotations

import errno
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from faultdev import FaultDevice
from fsview import ROOT, View, explain_match, take_view
from memdev import MemDevice

from nexfs.check.checker import scan
from nexfs.core.attr import SetAttr
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.datacache import SMALL_MAX
from nexfs.types import FsError
from valve import Rights, Valve

KEEP = {"keep/k0": os.urandom(10_000), "keep/k1": os.urandom(150_000), "keep/k2": b""}


def _base() -> MemDevice:
    dev = MemDevice.of_size(16 << 20, 4096)
    FileSystem.format(dev)
    fs = FileSystem.open(dev)
    d = fs.mkdir(ROOT_INO, b"keep", 0o755, ROOT).ino
    fs.mkdir(ROOT_INO, b"work", 0o755, ROOT)
    for path, data in KEEP.items():
        ino = fs.create(d, path.split("/")[1].encode(), 0o644, ROOT).ino
        fs.write(ino, 0, data, ROOT)
    fs.symlink(d, b"link", b"k0", ROOT)
    fs.setxattr(fs.lookup(d, b"k0", ROOT).ino, b"user.tag", b"kept", 0, ROOT)
    fs.close()
    return dev


BASE = _base()


def _steps(fs: FileSystem) -> list[tuple[str, Callable[[], object], bool]]:
    """The workload: (label, operation, is it a persistence point)."""
    def work() -> int:
        return fs.lookup(ROOT_INO, b"work", ROOT).ino

    def ino(name: bytes) -> int:
        return fs.lookup(work(), name, ROOT).ino

    rng = random.Random(3)
    return [
        ("create a", lambda: fs.create(work(), b"a", 0o644, ROOT), False),
        ("write a", lambda: fs.write(ino(b"a"), 0, rng.randbytes(20_000), ROOT), False),
        ("fsync a", lambda: fs.fsync(ino(b"a"), False), True),
        ("append a", lambda: fs.write(ino(b"a"), 20_000, rng.randbytes(5000), ROOT), False),
        ("create b", lambda: fs.create(work(), b"b", 0o644, ROOT), False),
        ("write b", lambda: fs.write(ino(b"b"), 0, rng.randbytes(70_000), ROOT), False),
        ("setxattr b", lambda: fs.setxattr(ino(b"b"), b"user.x", b"y" * 3000, 0, ROOT), False),
        ("fdatasync b", lambda: fs.fsync(ino(b"b"), True), True),
        ("rename b c", lambda: fs.rename(work(), b"b", work(), b"c", 0, ROOT), False),
        ("unlink a", lambda: fs.unlink(work(), b"a", ROOT), False),
        ("mkdir d", lambda: fs.mkdir(work(), b"d", 0o755, ROOT), False),
        ("truncate c", lambda: fs.setattr(ino(b"c"), SetAttr(size=5000), ROOT), False),
        ("fsync dir", lambda: fs.fsyncdir(work()), True),
        ("write big", lambda: fs.write(fs.create(work(), b"big", 0o644, ROOT).ino, 0,
                                       rng.randbytes(600_000), ROOT), False),
        ("checkpoint", lambda: fs.store.checkpoint(), False),
        ("fsync big", lambda: fs.fsync(ino(b"big"), False), True),
    ]


def _expected_keep(fs: FileSystem) -> None:
    """What was durable before the workload reads back (on a live or remounted volume)."""
    d = fs.lookup(ROOT_INO, b"keep", ROOT).ino
    for path, data in KEEP.items():
        ino = fs.lookup(d, path.split("/")[1].encode(), ROOT).ino
        assert fs.read(ino, 0, len(data) + 1) == data, path
    assert fs.readlink(fs.lookup(d, b"link", ROOT).ino) == b"k0"
    assert fs.getxattr(fs.lookup(d, b"k0", ROOT).ino, b"user.tag") == b"kept"


RunResult = tuple[FaultDevice, MemDevice, list[View], int, int, FsError | None,
                  FileSystem | None]


def _run(fault: Callable[[FaultDevice], None], *, sticky: bool = False) -> RunResult:
    """Run the workload with one armed fault; returns the devices, the views, the index of
    the last state made durable and of the last one begun, the first error and the fs."""
    inner = BASE.snapshot()
    dev = FaultDevice(inner, sticky=sticky)
    fault(dev)
    try:
        fs = FileSystem.open(dev)
    except FsError as exc:
        return dev, inner, [], 0, 0, exc, None
    views = [take_view(fs)]
    durable = latest = 0
    first: FsError | None = None
    for _label, step, persist in [*_steps(fs), ("close", fs.close, True)]:
        if not persist:
            latest = len(views)
        try:
            step()
            if not persist:
                # Reading back can be where a failed deferred write (write-behind) is found.
                views.append(take_view(fs))
        except FsError as exc:
            first = exc
            break
        if persist:
            durable = len(views) - 1
    return dev, inner, views, durable, latest, first, fs


def _after_failure(fs: FileSystem, exc: FsError, caplog: pytest.LogCaptureFixture) -> None:
    assert exc.errno == errno.EIO, f"first error is {exc!r}, not EIO"
    assert fs.read_only and fs.error, "a failed write must make the volume read-only"
    assert any("filesystem error" in r.getMessage() and "injected fault" in r.getMessage()
               for r in caplog.records if r.levelno >= logging.ERROR), "the log must say why"
    _expected_keep(fs)  # reads of undamaged objects keep working
    take_view(fs)
    for sync in (lambda: fs.fsync(ROOT_INO, False), lambda: fs.fsyncdir(ROOT_INO)):
        with pytest.raises(FsError) as again:
            sync()
        assert again.value.errno == errno.EIO, "an fsync after a failure must not succeed"
    with pytest.raises(FsError) as refused:
        fs.create(ROOT_INO, b"new", 0o644, ROOT)
    assert refused.value.errno == errno.EROFS
    fs.close()


def _remount(dev: MemDevice, views: list[View], durable: int, latest: int, what: str) -> None:
    for image, how in ((dev.snapshot(), "as left"), (dev.crash(), "after a power cut")):
        fs = FileSystem.open(image)
        try:
            found = scan(fs.store)
            assert found.clean, f"{what}, remounted {how}: {found.problems[:5]}"
            _expected_keep(fs)
            if views:
                why = explain_match(take_view(fs), views[durable : latest + 1])
                assert why is None, f"{what}, remounted {how}: {why}"
        finally:
            fs.close()


def _count_io() -> FaultDevice:
    dev, *_ = _run(lambda d: None)
    return dev


@pytest.mark.parametrize("kind", ["write", "short", "barrier", "write-sticky"])
def test_every_write_fault(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    clean = _count_io()
    n_max = clean.barriers if kind == "barrier" else clean.writes
    assert n_max > (10 if kind == "barrier" else 20)
    failures = 0
    for n in range(1, n_max + 1):
        caplog.clear()
        arm = {"write": lambda d, n=n: d.fail_write(n), "write-sticky": lambda d, n=n:
               d.fail_write(n), "short": lambda d, n=n: d.short_write(n),
               "barrier": lambda d, n=n: d.fail_barrier(n)}[kind]
        with caplog.at_level(logging.WARNING):
            dev, inner, views, durable, latest, exc, fs = _run(arm, sticky=kind.endswith(
                "sticky"))
            if dev.injected == 0:
                assert exc is None
                continue
            assert exc is not None, f"{kind} fault at {n} was not reported to the caller"
            failures += 1
            if fs is not None:
                _after_failure(fs, exc, caplog)
            else:
                assert exc.errno == errno.EIO, exc
            _remount(inner, views, durable, latest, f"{kind} fault at {n}")
    print(f"{kind}: {failures} injected faults over {n_max} I/Os")
    assert failures >= n_max // 2


def test_every_read_fault(caplog: pytest.LogCaptureFixture) -> None:
    """Walk the volume with a small cache; fail each read in turn."""
    fs = FileSystem.open(BASE.snapshot(), read_only=True, atime="noatime")
    expected = take_view(fs)
    fs.close()
    probe = FaultDevice(BASE.snapshot())
    fs = FileSystem.open(probe, cache_blocks=16, atime="noatime")
    take_view(fs)
    fs.close()
    walk_faults = meta_faults = 0
    for n in range(1, probe.reads + 1):
        caplog.clear()
        dev = FaultDevice(BASE.snapshot())
        dev.fail_read(n)
        with caplog.at_level(logging.WARNING):
            try:
                fs = FileSystem.open(dev, cache_blocks=16, atime="noatime")
            except FsError as exc:
                assert exc.errno == errno.EIO
                continue
            try:
                take_view(fs)
            except FsError as exc:
                assert exc.errno == errno.EIO, exc
                walk_faults += 1
                if fs.error:  # a metadata read: the volume stops writing, and says why
                    meta_faults += 1
                    assert fs.read_only
                    assert any("injected fault" in r.getMessage() for r in caplog.records)
            # The fault was transient: everything reads back exactly.
            assert take_view(fs) == expected
            _expected_keep(fs)
            fs.close()
    print(f"read faults: {probe.reads} reads, {walk_faults} failed a walk "
          f"({meta_faults} metadata reads)")
    assert walk_faults >= 5 and meta_faults >= 3


@pytest.mark.parametrize("datasync", [False, True])
@pytest.mark.parametrize("fault", ["barrier", "write"])
def test_second_fsync_after_failed_one_fails(datasync: bool, fault: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """fsync fails with EIO; the next fsync of the same file must fail too, not report
    success for data that was lost."""
    dev = FaultDevice(BASE.snapshot())
    fs = FileSystem.open(dev)
    ino = fs.create(ROOT_INO, b"f", 0o644, ROOT).ino
    fs.write(ino, 0, b"first" * 1000, ROOT)
    fs.fsync(ino, datasync)
    fs.write(ino, 5000, b"second" * 1000, ROOT)
    if fault == "barrier":
        dev.fail_barrier(1)
    else:
        dev.fail_write(1)
    with caplog.at_level(logging.ERROR):
        with pytest.raises(FsError) as first:
            fs.fsync(ino, datasync)
        assert first.value.errno == errno.EIO
        for _ in range(2):
            with pytest.raises(FsError) as second:
                fs.fsync(ino, datasync)
            assert second.value.errno == errno.EIO
        assert fs.read(ino, 0, 5000) == b"first" * 1000
    fs.close()
    again = FileSystem.open(dev.inner.crash())
    try:
        data = again.read(again.lookup(ROOT_INO, b"f", ROOT).ino, 0, 20_000)
        assert data[:5000] == b"first" * 1000
        assert scan(again.store).clean
    finally:
        again.close()


@pytest.mark.parametrize("nbytes", [8192, (SMALL_MAX + 1) * BLOCK_SIZE],
                         ids=["small-cached", "large-write-behind"])
def test_deferred_data_write_error_is_reported_by_fsync(
        caplog: pytest.LogCaptureFixture, nbytes: int) -> None:
    """A small write is acknowledged from the data cache, a large one once it is queued for
    the write-behind thread; the device error of writing it out reaches fsync (as with any
    write-back cache), and the volume turns read-only."""
    dev = FaultDevice(BASE.snapshot())
    fs = FileSystem.open(dev)
    ino = fs.create(ROOT_INO, b"f", 0o644, ROOT).ino
    fs.fsync(ino, False)
    dev.fail_write(1)
    assert fs.write(ino, 0, b"x" * nbytes, ROOT) == nbytes
    with caplog.at_level(logging.ERROR), pytest.raises(FsError) as exc:
        fs.fsync(ino, False)
    assert exc.value.errno == errno.EIO
    assert fs.read_only
    _after_failure(fs, exc.value, caplog)


def test_faults_on_a_real_image_through_the_valve(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The same wrapper around a real valve capability on an image file (dm-flakey/dm-error
    are tried in the next test, where the kernel has device-mapper)."""
    img = tmp_path / "vol.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    with Valve.open(img) as v:
        FileSystem.format(v.grant(Rights.READ | Rights.WRITE))
        cap = v.grant(Rights.READ | Rights.WRITE)
        fs = FileSystem.open(cap)
        ino = fs.create(ROOT_INO, b"kept", 0o644, ROOT).ino
        fs.write(ino, 0, b"k" * 50_000, ROOT)
        fs.fsync(ino, False)
        fs.close()
        dev = FaultDevice(cap)
        fs = FileSystem.open(dev)
        ino2 = fs.create(ROOT_INO, b"lost", 0o644, ROOT).ino
        fs.write(ino2, 0, b"l" * 50_000, ROOT)
        dev.fail_barrier(1)
        with caplog.at_level(logging.ERROR), pytest.raises(FsError) as exc:
            fs.fsync(ino2, False)
        assert exc.value.errno == errno.EIO and fs.read_only
        with pytest.raises(FsError):
            fs.fsync(ino2, False)
        fs.close()
    with Valve.open(img) as v:
        fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
        try:
            assert scan(fs.store).clean
            kept = fs.lookup(ROOT_INO, b"kept", ROOT).ino
            assert fs.read(kept, 0, 60_000) == b"k" * 50_000
        finally:
            fs.close()


def _crashed_with_journal() -> tuple[MemDevice, View]:
    """A volume cut by a power failure with committed transactions still in its journal,
    and an orphan to free: what the next open must replay and clean up."""
    dev = BASE.snapshot()
    fs = FileSystem.open(dev, atime="noatime")
    w = fs.lookup(ROOT_INO, b"work", ROOT).ino
    for i in range(5):
        ino = fs.create(w, f"j{i}".encode(), 0o644, ROOT).ino
        fs.write(ino, 0, bytes([i]) * 30_000, ROOT)
        fs.commit(durable=True)
    held = fs.create(w, b"held", 0o644, ROOT).ino
    fs.ref(held)
    fs.unlink(w, b"held", ROOT)
    fs.commit(durable=True)
    expected = take_view(fs)
    return dev.crash(), expected


@pytest.mark.parametrize("kind", ["read", "write", "barrier", "short"])
def test_faults_during_replay(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """Open (journal replay, orphan cleanup) fails at each of its I/Os in turn: the caller
    gets FsError(EIO), and the next open without the fault replays everything."""
    crashed, expected = _crashed_with_journal()
    probe = FaultDevice(crashed.snapshot())
    FileSystem.open(probe, atime="noatime").close()
    n_max = {"read": probe.reads, "barrier": probe.barriers}.get(kind, probe.writes)
    failed = 0
    for n in range(1, n_max + 1):
        dev = FaultDevice(crashed.snapshot())
        getattr(dev, {"read": "fail_read", "write": "fail_write", "barrier": "fail_barrier",
                      "short": "short_write"}[kind])(n)
        with caplog.at_level(logging.WARNING):
            try:
                FileSystem.open(dev, atime="noatime").close()
            except FsError as exc:
                assert exc.errno == errno.EIO, exc
                failed += 1
            for image in (dev.inner.snapshot(), dev.inner.crash()):
                fs = FileSystem.open(image, atime="noatime")
                try:
                    assert scan(fs.store).clean
                    assert take_view(fs) == expected, f"{kind} fault at {n}"
                    _expected_keep(fs)
                finally:
                    fs.close()
    print(f"replay with {kind} faults: {failed} of {n_max} I/Os failed the open")
    assert failed >= 1
