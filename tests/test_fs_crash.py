"""Crash consistency of the whole filesystem: record every write and barrier of a workload
that fsyncs, rebuild the device as a power cut could have left it at every barrier (and at
random subsets and tears of the writes after it), then mount, check and compare.

Oracle for each crash state: the volume opens (journal replay, orphan cleanup); fsck finds
nothing wrong; every file whose fsync returned before the crash has exactly its fsync'd
contents, or — only for the one operation in flight at the crash — the contents that
operation was writing; no other names exist.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

import pytest
from crashsim import RecordingDevice, crash_states
from fsutil import ROOT
from memdev import MemDevice

from nexfs.check.checker import scan
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.types import FsError

STATES_CHECKED: list[int] = []


@dataclass(frozen=True)
class Mark:
    """The workload's note, logged after an operation's fsync returned (durable) or when an
    operation starts (in flight).  ``files`` is the full expected namespace afterwards:
    name -> sha256 of the contents."""

    durable: bool
    files: tuple[tuple[str, str], ...]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _workload(fs: FileSystem, rec: RecordingDevice, rng: random.Random, steps: int) -> None:
    d = fs.mkdir(ROOT_INO, b"d", 0o755, ROOT).ino
    fs.fsyncdir(ROOT_INO)
    files: dict[str, bytes] = {}

    def note(durable: bool, expect: dict[str, bytes]) -> None:
        rec.mark(Mark(durable, tuple(sorted((k, _digest(v)) for k, v in expect.items()))))

    note(True, files)
    for step in range(steps):
        op = rng.choice(["create", "create", "replace", "append", "unlink", "truncate"])
        names = sorted(files)
        if op != "create" and not names:
            op = "create"
        if op == "create":
            name = f"f{step}"
            data = rng.randbytes(rng.choice([0, 100, 4096, 5000, 70_000, 300_000]))
            after = {**files, name: data}
            note(False, after)
            ino = fs.create(d, name.encode(), 0o644, ROOT).ino
            fs.write(ino, 0, data, ROOT)
            fs.fsync(ino, False)
            fs.fsyncdir(d)
        elif op == "replace":
            name = rng.choice(names)
            data = rng.randbytes(rng.choice([10, 4096, 50_000]))
            after = {**files, name: data}
            note(False, after)
            tmp = fs.create(d, b"tmp", 0o644, ROOT).ino
            fs.write(tmp, 0, data, ROOT)
            fs.fsync(tmp, False)
            fs.rename(d, b"tmp", d, name.encode(), 0, ROOT)
            fs.fsyncdir(d)
        elif op == "append":
            name = rng.choice(names)
            extra = rng.randbytes(rng.choice([1, 3000, 20_000]))
            after = {**files, name: files[name] + extra}
            note(False, after)
            ino = fs.lookup(d, name.encode(), ROOT).ino
            fs.write(ino, len(files[name]), extra, ROOT)
            fs.fsync(ino, True)
        elif op == "truncate":
            name = rng.choice(names)
            size = rng.randrange(0, len(files[name]) + 1)
            after = {**files, name: files[name][:size]}
            note(False, after)
            ino = fs.lookup(d, name.encode(), ROOT).ino
            from nexfs.core.attr import SetAttr

            fs.setattr(ino, SetAttr(size=size), ROOT)
            fs.fsync(ino, False)
        else:
            name = rng.choice(names)
            after = {k: v for k, v in files.items() if k != name}
            note(False, after)
            fs.unlink(d, name.encode(), ROOT)
            fs.fsyncdir(d)
        files = after
        note(True, files)


def _observed(fs: FileSystem) -> dict[str, str]:
    d = fs.lookup(ROOT_INO, b"d", ROOT).ino
    out = {}
    for name, attr, _c in fs.readdir(d, 0):
        if name in (b".", b"..") or name == b"tmp":
            continue
        out[name.decode()] = _digest(fs.read(attr.ino, 0, attr.size + 1))
    return out


def _explore(sector_size: int, seed: int, steps: int, per_barrier: int) -> int:
    dev = MemDevice.of_size(32 << 20, sector_size)
    FileSystem.format(dev)
    base = dev.snapshot()
    rec = RecordingDevice(dev)
    fs = FileSystem.open(rec)
    rng = random.Random(seed)
    _workload(fs, rec, rng, steps)
    fs.close()
    checked = 0
    for cs in crash_states(rec.log, base, subsets_per_barrier=per_barrier,
                           rng=random.Random(seed + 1)):
        marks = [m for m in cs.marks_issued if isinstance(m, Mark)]
        durable = [m for m in marks if m.durable]
        allowed = []
        if durable:
            allowed.append(dict(durable[-1].files))
        if marks and not marks[-1].durable:
            allowed.append(dict(marks[-1].files))  # the operation in flight at the crash
        try:
            crashed = FileSystem.open(cs.device)
        except FsError as exc:
            raise AssertionError(f"epoch {cs.epoch} {cs.note!r}: does not open: {exc}") from exc
        try:
            found = scan(crashed.store)
            assert found.clean, f"epoch {cs.epoch} {cs.note!r}: fsck: {found.problems[:5]}"
            if allowed:
                try:
                    seen = _observed(crashed)
                except FsError as exc:
                    if exc.errno == 2 and not durable:
                        seen = {}
                    else:
                        raise
                assert seen in allowed, (
                    f"epoch {cs.epoch} {cs.note!r}: files {sorted(seen)} match neither the "
                    f"last fsync'd state nor the operation in flight")
        finally:
            crashed.close()
        checked += 1
    return checked


@pytest.mark.parametrize("sector_size", [4096, 512])
def test_crash_states_keep_everything_fsynced(sector_size: int) -> None:
    steps = int(os.environ.get("NEXFS_CRASH_STEPS", "40"))
    per_barrier = int(os.environ.get("NEXFS_CRASH_SUBSETS", "3"))
    checked = _explore(sector_size, seed=sector_size, steps=steps, per_barrier=per_barrier)
    STATES_CHECKED.append(checked)
    print(f"checked {checked} crash states ({sector_size}-byte sectors)")
    assert checked >= 150
