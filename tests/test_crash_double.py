"""Repeated crashes (issue 10): crash, recover, work on, crash again; and crashes inside
recovery itself.

Each run records a first workload (phase 1) on a :class:`~crashsim.RecordingDevice`.  Its
operations are committed the way the mount does it: often by the commit timer, i.e.
``commit(durable=False)``, several commits without a barrier in between, and sometimes by an
fsync.  Then crash states of phase 1 are rebuilt (crashsim.crash_states: every barrier, random
subsets and tears of the writes after it), a sample of them is opened through a second
recording device — journal replay, superblock update and orphan cleanup are recorded too —
and a second workload (phase 2) runs on the recovered volume, with fsyncs.  Every crash state
of that second log is checked with the oracle of tests/test_crash_explore.py:

* the volume opens and fsck (``checker.scan``) finds nothing wrong;
* what is visible is one of the states phase 2 went through, no earlier than the last one an
  fsync returned for (the state right after recovery counts as durable: the crash image it
  was recovered from is), no later than the last operation begun;

plus, for the recovery part of the second log (everything up to phase 2's first operation,
including the commit that finishes orphan cleanup when the run syncs first), a crash after
*every* write, kept, lost or torn (crashsim.write_prefixes).  And the first recovery itself
is checked against phase 1's states, as the single-crash explorer does.

Scale: the default run checks more than 1,000 double-crash states; ``NEXFS_LONG=1`` more than
20,000.  The counts are printed (``-s``).
"""

# mypy: disable-error-code="misc"
# (lambdas binding loop variables through default arguments, by design)

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from crashsim import CrashState, RecordingDevice, crash_states, write_prefixes
from fsview import ROOT
from memdev import MemDevice
from test_crash_explore import Mark, Workload, check_state, resolve, split

from nexfs.core.fs import ROOT_INO, FileSystem

LONG = os.environ.get("NEXFS_LONG") == "1"
NAMES = ["a", "b", "c", "d/a", "d/b"]


def _ops(w: Workload, rng: random.Random, held: list[int]) -> Callable[[], object]:
    """One random operation of a small vocabulary over a few names (the transactions it
    makes have few distinct lengths, so a lost one is often matched by a later one)."""
    fs = w.fs
    path = rng.choice(NAMES)
    kind = rng.choice(["create", "create", "write", "write", "setxattr", "unlink",
                       "rename", "open-unlink", "open-unlink", "truncate"])

    def in_parent(fn: Callable[[int, bytes], object]) -> Callable[[], object]:
        def run() -> object:
            head, name = split(path)
            return fn(resolve(fs, head), name)
        return run

    if kind == "create":
        size = rng.choice([0, 3000, 6000, 9000])
        data = bytes([rng.randrange(1, 256)]) * size

        def create() -> None:
            head, name = split(path)
            ino = fs.create(resolve(fs, head), name, 0o644, ROOT).ino
            if data:
                fs.write(ino, 0, data, ROOT)
        return create
    if kind == "write":
        off = rng.choice([0, 100, 4096, 8000])
        data = bytes([rng.randrange(1, 256)]) * rng.choice([1, 3000, 5000])
        return lambda: fs.write(resolve(fs, path), off, data, ROOT)
    if kind == "setxattr":
        value = bytes([rng.randrange(1, 256)]) * rng.choice([3, 300])
        return lambda: fs.setxattr(resolve(fs, path), b"user.k", value, 0, ROOT)
    if kind == "unlink":
        return in_parent(lambda d, n: fs.unlink(d, n, ROOT))
    if kind == "rename":
        dest = rng.choice(NAMES)
        return lambda: fs.rename(resolve(fs, split(path)[0]), split(path)[1],
                                 resolve(fs, split(dest)[0]), split(dest)[1], 0, ROOT)
    if kind == "truncate":
        from nexfs.core.attr import SetAttr

        size = rng.choice([0, 10, 5000])
        return lambda: fs.setattr(resolve(fs, path), SetAttr(size=size), ROOT)

    def open_unlink() -> None:  # an orphan when the power goes: recovery frees it
        ino = resolve(fs, path)
        head, name = split(path)
        fs.ref(ino)
        held.append(ino)
        fs.unlink(resolve(fs, head), name, ROOT)
    return open_unlink


def _run(w: Workload, rng: random.Random, steps: int, *, fsync_p: float) -> None:
    """``steps`` operations; after each, the commit timer (no barrier) or an fsync."""
    held: list[int] = []
    for _ in range(steps):
        w.op(_ops(w, rng, held))
        r = rng.random()
        if r < fsync_p:
            path = rng.choice(NAMES)
            w.sync(lambda path=path: w.fs.fsync(resolve(w.fs, path), False))
        elif r < fsync_p + 0.7:
            w.op(lambda: w.fs.commit(durable=False))


def _setup(fs: FileSystem) -> None:
    fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    for p in ("a", "d/a"):
        head, name = split(p)
        ino = fs.create(resolve(fs, head), name, 0o644, ROOT).ino
        fs.write(ino, 0, b"s" * 5000, ROOT)


def _phase1(ss: int, seed: int, steps: int) -> tuple[list, MemDevice, list]:
    dev = MemDevice.of_size(16 << 20, ss)
    FileSystem.format(dev)
    fs = FileSystem.open(dev, atime="noatime")
    _setup(fs)
    fs.close()
    base = dev.snapshot()
    rec = RecordingDevice(dev)
    w = Workload(FileSystem.open(rec, atime="noatime"), rec)
    _run(w, random.Random(seed), steps, fsync_p=0.1)
    w.fs.store.abort()  # the power goes: no close
    return rec.log, base, w.views


def _gap(note: str) -> bool:
    """A crash state's note ("0t,2": write 0 torn, 1 lost, 2 kept) keeps a write after one
    it lost or tore."""
    kept = [(int(x.rstrip("t")), x.endswith("t")) for x in note.split(",") if x]
    return any(t or i != n for n, (i, t) in enumerate(kept)) and len(kept) > 1


@dataclass
class Outcome:
    states: int = 0
    inside_recovery: int = 0
    failures: list[str] = field(default_factory=list)


def explore(runs: int, picks: int, per_barrier: int, *, seed0: int = 0) -> Outcome:
    """Check ``runs`` double-crash runs; every failing state is collected, not raised."""
    out = Outcome()
    for r in range(runs):
        ss = 4096 if r % 2 else 512
        seed = seed0 + r
        log1, base1, views1 = _phase1(ss, seed, steps=6)
        rng = random.Random(seed * 7 + 1)
        first = list(crash_states(log1, base1, subsets_per_barrier=3, rng=rng))
        # The interesting states keep a write issued after one they lost or tore (a later
        # commit on the disk, an earlier one not): take those first.
        rng.shuffle(first)
        first.sort(key=lambda cs: (not _gap(cs.note), cs.note == ""))
        for k, cs in enumerate(first[:picks]):
            where = f"run {seed} ({ss}), first crash epoch {cs.epoch} writes {cs.note!r}"
            base2 = cs.device.snapshot()  # phase 2 writes to cs.device
            problem = check_state(CrashState(cs.epoch, cs.note, base2.snapshot(),
                                             cs.marks_durable, cs.marks_issued), views1, where)
            out.states += 1
            if problem is not None:  # the first recovery (the single-crash oracle)
                out.failures.append(problem)
                continue
            rec = RecordingDevice(cs.device)
            w = Workload(FileSystem.open(rec, atime="noatime"), rec)
            prng = random.Random(seed * 1000 + k)
            if prng.random() < 0.5:
                w.sync(lambda w=w: w.fs.commit(durable=True))  # orphan cleanup made durable
            recovered = Mark("begin", 1)
            _run(w, prng, steps=5, fsync_p=0.25)
            w.fs.store.abort()  # the second power cut (crash states cover every point)
            second = crash_states(rec.log, base2, subsets_per_barrier=per_barrier,
                                  rng=random.Random(seed * 1000 + k))
            inside = write_prefixes(rec.log, base2, until=recovered,
                                    rng=random.Random(seed + k))
            for label, states in (("second crash", second), ("crash inside recovery", inside)):
                for cs2 in states:
                    problem = check_state(cs2, w.views, f"{where}, {label}")
                    out.states += 1
                    out.inside_recovery += label != "second crash"
                    if problem is not None:
                        out.failures.append(problem)
    return out


def test_double_crash_states() -> None:
    runs = 200 if LONG else 60
    picks = 8 if LONG else 6
    per_barrier = 4 if LONG else 3
    started = time.monotonic()
    out = explore(runs, picks, per_barrier)
    print(f"double crash: {runs} runs, {out.states} crash states ({out.inside_recovery} "
          f"inside recovery), {len(out.failures)} failed, in "
          f"{time.monotonic() - started:.1f} s")
    assert not out.failures, "\n\n".join(out.failures[:3])
    assert out.states >= (20_000 if LONG else 1000)
    assert out.inside_recovery >= (2000 if LONG else 100)
