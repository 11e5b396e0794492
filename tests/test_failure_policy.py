"""The one failure policy (nexfs/store/failure.py): every public FileSystem method is a boundary
that hands its failures to it, and a failure is decided (logged, the volume marked) once
however many boundaries it crosses."""

from __future__ import annotations

import errno
import logging

import pytest
from memdev import MemDevice

from nexfs.core.attr import Ctx
from nexfs.core.fs import FAILURE_BOUNDARY, ROOT_INO, FileSystem
from nexfs.ondisk.metablock import MetaBlock
from nexfs.store.failure import FailurePolicy
from nexfs.types import BlockNo

ROOT = Ctx()

# Constructors: before a FileSystem exists there is no volume state to decide about (open
# aborts the store on any failure).
NOT_BOUNDARIES = {"format", "open"}


def _public_methods() -> dict[str, object]:
    out = {}
    for name, value in vars(FileSystem).items():
        if name.startswith("_") or isinstance(value, property):
            continue
        if isinstance(value, classmethod | staticmethod):
            value = value.__func__
        if callable(value):
            out[name] = value
    return out


def test_every_public_method_passes_through_the_policy() -> None:
    methods = _public_methods()
    assert {"open_file", "fsync", "fsyncdir", "commit", "write", "lookup"} <= set(methods)
    missing = sorted(name for name, fn in methods.items()
                     if name not in NOT_BOUNDARIES and not getattr(fn, FAILURE_BOUNDARY, False))
    assert not missing, f"public FileSystem methods outside the failure policy: {missing}"
    assert set(methods) >= NOT_BOUNDARIES, "stale exemption"


def _fs() -> FileSystem:
    dev = MemDevice.of_size(16 << 20, 4096)
    FileSystem.format(dev)
    return FileSystem.open(dev)


@pytest.mark.parametrize("name", ["open_file", "fsync", "fsyncdir", "getattr", "commit"])
def test_a_bug_in_any_boundary_is_decided_once(name: str, caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An internal error inside a public method marks the volume read-only and is logged
    once, also when the method runs inside another one (open_file -> setattr) and when the
    exception then reaches the adapter's boundary too."""
    fs = _fs()
    ino = fs.create(ROOT_INO, b"f", 0o644, ROOT).ino
    fs.write(ino, 0, b"x", ROOT)

    def boom(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("injected bug")

    if name == "open_file":  # O_TRUNC: the bug is in the setattr that open_file calls
        monkeypatch.setattr(fs, "release_data", boom)
    elif name in ("fsync", "commit"):
        monkeypatch.setattr(fs.store, "commit", boom)
    else:
        monkeypatch.setattr(fs.inodes, "get", boom)
    calls = {"open_file": (ino, 0o1001, ROOT), "fsync": (ino, False), "fsyncdir": (ROOT_INO,),
             "getattr": (ino,), "commit": ()}
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError):
        getattr(fs, name)(*calls[name])
    assert fs.error is not None and "injected bug" in fs.error and fs.read_only
    fs.failures.failed(RuntimeError("other"), where="adapter")  # a later bug: logged too
    decided = [r for r in caplog.records if "injected bug" in r.getMessage()
               or (r.exc_info and "injected bug" in str(r.exc_info[1]))]
    assert len([r for r in decided if r.exc_info]) == 1, [r.getMessage() for r in decided]
    assert sum("filesystem error" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.undo()
    fs.close()


def test_policy_enters_the_error_state_once() -> None:
    entered: list[str] = []

    class State:
        error: str | None = None

        def enter_error_state(self, reason: str) -> None:
            entered.append(reason)
            self.error = reason

    state = State()
    policy = FailurePolicy(state)
    heard: list[int] = []
    policy.on_error(lambda: heard.append(1))
    exc = OSError(5, "gone")
    policy.failed(exc)
    policy.failed(exc)
    policy.failed(OSError(5, "again"))
    assert entered == ["device error: [Errno 5] gone"] and heard == [1]


def _never_decoded(blkno: BlockNo, raw: memoryview) -> MetaBlock:
    raise AssertionError("the block number is refused before it is read")


def test_adapter_only_maps_errno(caplog: pytest.LogCaptureFixture) -> None:
    """The adapter answers with the errno and leaves the verdict to the policy: a failure the
    core has decided is not logged or decided again; one that reaches the adapter undecided
    (a bug of its own) is decided there, once."""
    from nexfs.fuse.adapter import FuseAdapter
    from nexfs.types import CorruptionError, FsError

    fs = _fs()
    adapter = FuseAdapter(fs)
    with caplog.at_level(logging.ERROR):
        assert adapter.errno_of("lookup", FsError(errno.ENOENT)) == errno.ENOENT
        assert fs.error is None and not caplog.records
        with pytest.raises(CorruptionError) as decided:  # the backup superblock: not metadata
            fs.store.get(BlockNo(fs.store.geo.backup_sb), _never_decoded)
        assert fs.error is not None and "outside the metadata area" in fs.error
        logged = len(caplog.records)
        assert adapter.errno_of("read", decided.value) == errno.EIO
        assert len(caplog.records) == logged, "decided twice"
        assert adapter.errno_of("read", KeyError("bug")) == errno.EIO
        assert len(caplog.records) == logged + 1 and caplog.records[-1].exc_info
    assert not [n for n in vars(adapter) if "report" in n]
    fs.close()
