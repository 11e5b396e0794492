"""Crash-state exploration of the whole filesystem under three workloads (issue 5).

Each workload runs in-process on a :class:`~crashsim.RecordingDevice`; after every operation
the test takes the visible state (tests/fsview.py), and it notes in the device log when an
operation begins and when an fsync / fdatasync / fsync(dir) returned.  Then every crash state
of the log is rebuilt (crashsim.crash_states: every barrier, plus random subsets of the writes
after it with sector tears) and checked:

* the image opens (journal replay, orphan cleanup) and ``checker.scan`` finds nothing wrong;
* the visible state is one the workload went through, no earlier than the last state an
  fsync had returned for, and no later than the last operation begun: metadata exactly
  (names, inode numbers, types, modes, link counts, sizes, symlink targets, xattrs) and data
  byte for byte, except that an in-place overwrite issued after that state may show (ordered
  data); see tests/fsview.py.  So everything fsync'd survives exactly, every operation is
  all-or-nothing (a rename shows the old or the new file, never neither), and no name points
  at a freed inode (scan);

The workloads: (1) fsx-style random writes, overwrites, truncates up and down, holes and
appends on three files, with random fsync/fdatasync; (2) the CrashMonkey/B3 recipe: short
sequences (1-3 operations) of creat, mkdir, write, link, unlink, rename, rmdir, truncate,
symlink, setxattr, removexattr, and unlink-while-open over two directories with two files
each, each followed by a persistence point; (3) write-temp, fsync, rename-over, fsync(dir).

Scale: the CI run explores a few thousand crash states; ``NEXFS_LONG=1`` explores more than
50,000 (docs/RELIABILITY.md has the figures).  The counts are printed (``-s``).
"""

# mypy: disable-error-code="misc"
# (lambdas binding loop variables through default arguments, by design)

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from crashsim import CrashState, RecordingDevice, crash_states
from fsview import ROOT, View, explain_match, take_view
from memdev import MemDevice

from nexfs.check.checker import scan
from nexfs.core.attr import SetAttr
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.types import FsError

LONG = os.environ.get("NEXFS_LONG") == "1"
# Errors a workload operation may legitimately get (a name that does not exist yet, ...).
EXPECTED_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY,
                   errno.EINVAL, errno.EPERM, errno.ENODATA}
TOTALS: dict[str, int] = {}


@dataclass(frozen=True)
class Mark:
    """``begin`` k: operation k started (its result is state k); ``durable`` k: an fsync
    returned while the state was k, so state k is on stable storage."""

    kind: str
    index: int


class Workload:
    """Runs operations on a filesystem over a recording device and keeps every state."""

    def __init__(self, fs: FileSystem, rec: RecordingDevice) -> None:
        self.fs = fs
        self.rec = rec
        self.views: list[View] = [take_view(fs)]
        rec.mark(Mark("durable", 0))

    def op(self, fn: Callable[[], object]) -> bool:
        """Run one operation; False if it failed with an expected errno (nothing changed)."""
        self.rec.mark(Mark("begin", len(self.views)))
        ok = True
        try:
            fn()
        except FsError as exc:
            if exc.errno not in EXPECTED_ERRNOS or self.fs.error:
                raise
            ok = False
        assert self.fs.error is None, self.fs.error
        self.views.append(take_view(self.fs))
        return ok

    def sync(self, fn: Callable[[], object]) -> None:
        """A persistence point: when it returns, the current state is durable."""
        try:
            fn()
        except FsError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):  # no such file or directory
                raise
            return
        self.rec.mark(Mark("durable", len(self.views) - 1))

    def close(self) -> None:
        self.fs.close()
        self.rec.mark(Mark("durable", len(self.views) - 1))


def resolve(fs: FileSystem, path: str) -> int:
    ino = ROOT_INO
    for part in path.split("/"):
        if part:
            ino = fs.lookup(ino, part.encode(), ROOT).ino
    return ino


def split(path: str) -> tuple[str, bytes]:
    head, _, name = path.rpartition("/")
    return head, name.encode()


def check_state(cs: CrashState, views: list[View], what: str,
                extra: Callable[[FileSystem, View, int, int], None] | None = None
                ) -> str | None:
    """The oracle for one crash state: None, or what is wrong.  The state must open, be
    fsck-clean and show one of the states the workload went through between the last one
    made durable and the last one begun (``views``, indexed by the marks)."""
    marks = [m for m in cs.marks_issued if isinstance(m, Mark)]
    durable = max((m.index for m in marks if m.kind == "durable"), default=0)
    latest = max((m.index for m in marks), default=0)
    where = f"{what}: epoch {cs.epoch} writes {cs.note!r} (states {durable}..{latest})"
    try:
        fs = FileSystem.open(cs.device, atime="noatime")
    except FsError as exc:
        return f"{where}: does not open: {exc}"
    try:
        found = scan(fs.store)
        if not found.clean:
            return f"{where}: fsck: {found.problems[:5]}"
        seen = take_view(fs)
        why = explain_match(seen, views[durable : latest + 1])
        if why is not None:
            return (f"{where}: state after the crash is not one the workload went through: "
                    f"{why}\nseen:\n{seen.describe()}\nlast fsync'd:\n"
                    f"{views[durable].describe()}")
        if extra is not None:
            extra(fs, seen, durable, latest)
    finally:
        fs.close()
    return None


def check_crash_states(log: list, base: MemDevice, views: list[View], *, per_barrier: int,
                       seed: int, what: str,
                       extra: Callable[[FileSystem, View, int, int], None] | None = None
                       ) -> int:
    """Rebuild and check every crash state of ``log``; returns how many were checked."""
    checked = 0
    for cs in crash_states(log, base, subsets_per_barrier=per_barrier,
                           rng=random.Random(seed)):
        problem = check_state(cs, views, what, extra)
        assert problem is None, problem
        checked += 1
    return checked


def _record(sector_size: int, mib: int, setup: Callable[[FileSystem], None] | None,
            run: Callable[[Workload], None]) -> tuple[list, MemDevice, list[View]]:
    dev = MemDevice.of_size(mib << 20, sector_size)
    FileSystem.format(dev)
    if setup is not None:
        fs = FileSystem.open(dev, atime="noatime")
        setup(fs)
        fs.close()
    base = dev.snapshot()
    rec = RecordingDevice(dev)
    w = Workload(FileSystem.open(rec, atime="noatime"), rec)
    run(w)
    w.close()
    return rec.log, base, w.views


def _count(name: str, n: int) -> None:
    TOTALS[name] = TOTALS.get(name, 0) + n


# -- workload 1: fsx --------------------------------------------------------------------------


def fsx_run(w: Workload, rng: random.Random, steps: int) -> None:
    fs = w.fs
    w.op(lambda: fs.mkdir(ROOT_INO, b"d", 0o755, ROOT))
    d = resolve(fs, "d")
    model: dict[int, bytearray] = {}
    for i in range(3):
        w.op(lambda i=i: model.setdefault(fs.create(d, f"f{i}".encode(), 0o644, ROOT).ino,
                                          bytearray()))
    w.sync(lambda: fs.fsyncdir(d))
    inos = sorted(model)
    for _ in range(steps):
        ino = rng.choice(inos)
        data = model[ino]
        size = len(data)
        kind = rng.choice(["overwrite", "overwrite", "append", "hole", "random",
                           "truncate_down", "truncate_up"])
        if kind in ("truncate_down", "truncate_up"):
            new = (rng.randrange(0, size + 1) if kind == "truncate_down"
                   else size + rng.choice([1, 100, 4096, 5000, 70_000]))
            w.op(lambda ino=ino, new=new: fs.setattr(ino, SetAttr(size=new), ROOT))
            if new < size:
                del data[new:]
            else:
                data.extend(bytes(new - size))
        else:
            length = rng.choice([1, 17, 512, 4096, 5000, 9000, 40_000])
            off = {"overwrite": rng.randrange(0, size + 1),
                   "append": size,
                   "hole": size + rng.choice([1, 4095, 4097, 100_000]),
                   "random": rng.randrange(0, 300_000)}[kind]
            buf = rng.randbytes(length)
            w.op(lambda ino=ino, off=off, buf=buf: fs.write(ino, off, buf, ROOT))
            if off > len(data):
                data.extend(bytes(off - len(data)))
            data[off : off + length] = buf
        got = fs.read(ino, 0, len(data) + 1)
        assert got == bytes(data), f"fsx: inode {ino} differs from the model after {kind}"
        r = rng.random()
        if r < 0.15:
            w.sync(lambda ino=ino: fs.fsync(ino, False))
        elif r < 0.25:
            w.sync(lambda ino=ino: fs.fsync(ino, True))
        elif r < 0.3:
            w.sync(lambda: fs.fsyncdir(d))


@pytest.mark.parametrize("sector_size", [4096, 512])
def test_fsx_crash_states(sector_size: int) -> None:
    runs = 40 if LONG else 2
    steps = 150 if LONG else 120
    per_barrier = 6 if LONG else 4
    total = 0
    started = time.monotonic()
    for r in range(runs):
        seed = sector_size * 1000 + r
        log, base, views = _record(sector_size, 32, None,
                                   lambda w, seed=seed: fsx_run(w, random.Random(seed), steps))
        total += check_crash_states(log, base, views, per_barrier=per_barrier, seed=seed,
                                    what=f"fsx seed {seed}")
    _count("fsx", total)
    print(f"fsx, {sector_size}-byte sectors: {total} crash states in "
          f"{time.monotonic() - started:.1f} s")
    assert total >= (400 if not LONG else 5000)


# -- workload 2: CrashMonkey/B3 short metadata sequences ---------------------------------------

FILES = ["A/foo", "A/bar", "B/foo", "B/bar"]
DIRS = ["A", "B"]
NEW_DIRS = ["A/C", "B/C"]
NAMES = FILES + DIRS + NEW_DIRS + ["A/baz", "B/baz", "A/C/foo"]


def b3_setup(fs: FileSystem) -> None:
    for d in DIRS:
        fs.mkdir(ROOT_INO, d.encode(), 0o755, ROOT)
    for i, p in enumerate(FILES):
        head, name = split(p)
        ino = fs.create(resolve(fs, head), name, 0o644, ROOT).ino
        fs.write(ino, 0, bytes([65 + i]) * [5000, 100, 0, 70_000][i], ROOT)
    fs.setxattr(resolve(fs, "A/foo"), b"user.a", b"x" * 40, 0, ROOT)
    fs.fsync(ROOT_INO, False)


def b3_operations(fs: FileSystem, held: list[int]) -> list[tuple[str, Callable[[], object]]]:
    """Every operation of the vocabulary with every argument from the small name set."""
    ops: list[tuple[str, Callable[[], object]]] = []

    def add(label: str, fn: Callable[[], object]) -> None:
        ops.append((label, fn))

    def in_parent(path: str, fn: Callable[[int, bytes], object]) -> Callable[[], object]:
        def run() -> object:
            head, name = split(path)
            return fn(resolve(fs, head), name)
        return run

    for p in [*FILES, "A/baz", "B/baz", "A/C/foo"]:
        add(f"creat {p}", in_parent(p, lambda d, n: fs.create(d, n, 0o644, ROOT)))
        add(f"symlink {p}", in_parent(p, lambda d, n: fs.symlink(d, n, b"../A/foo", ROOT)))
        add(f"symlink-long {p}", in_parent(p, lambda d, n: fs.symlink(d, n, b"t" * 300, ROOT)))
    for p in NEW_DIRS + DIRS:
        add(f"mkdir {p}", in_parent(p, lambda d, n: fs.mkdir(d, n, 0o755, ROOT)))
        add(f"rmdir {p}", in_parent(p, lambda d, n: fs.rmdir(d, n, ROOT)))
    for p in FILES:
        for off, size in ((0, 4096), (4000, 200), (8192, 20_000), (100_000, 1)):
            add(f"write {p} {off}+{size}",
                lambda p=p, off=off, size=size: fs.write(resolve(fs, p), off,
                                                        bytes([off % 251 + 1]) * size, ROOT))
        for size in (0, 1, 4096, 9000, 200_000):
            add(f"truncate {p} {size}",
                lambda p=p, size=size: fs.setattr(resolve(fs, p), SetAttr(size=size), ROOT))
        add(f"unlink {p}", in_parent(p, lambda d, n: fs.unlink(d, n, ROOT)))
        add(f"setxattr {p}", lambda p=p: fs.setxattr(resolve(fs, p), b"user.k", b"v" * 3000, 0,
                                                      ROOT))
        add(f"removexattr {p}", lambda p=p: fs.removexattr(resolve(fs, p), b"user.a", ROOT))

        def hold_unlink(p: str = p) -> None:
            ino = resolve(fs, p)
            head, name = split(p)
            fs.ref(ino)
            held.append(ino)
            fs.unlink(resolve(fs, head), name, ROOT)

        add(f"open-unlink {p}", hold_unlink)
        for q in NAMES:
            if q != p:
                add(f"link {p} {q}", lambda p=p, q=q: fs.link(
                    resolve(fs, p), resolve(fs, split(q)[0]), split(q)[1], ROOT))
    for p in NAMES:
        for q in NAMES:
            if p != q:
                add(f"rename {p} {q}", lambda p=p, q=q: fs.rename(
                    resolve(fs, split(p)[0]), split(p)[1], resolve(fs, split(q)[0]),
                    split(q)[1], 0, ROOT))
    add("setxattr A", lambda: fs.setxattr(resolve(fs, "A"), b"user.d", b"dir", 0, ROOT))
    return ops


def b3_persistence(fs: FileSystem) -> list[tuple[str, Callable[[], object]]]:
    points: list[tuple[str, Callable[[], object]]] = []
    for p in [*FILES, "A/baz", "B/baz"]:
        points.append((f"fsync {p}", lambda p=p: fs.fsync(resolve(fs, p), False)))
        points.append((f"fdatasync {p}", lambda p=p: fs.fsync(resolve(fs, p), True)))
    for d in ["", *DIRS, "A/C"]:
        points.append((f"fsync dir {d or '/'}", lambda d=d: fs.fsyncdir(resolve(fs, d))))
    return points


def b3_sequence(w: Workload, rng: random.Random, length: int, labels: list[str]) -> None:
    held: list[int] = []
    ops = b3_operations(w.fs, held)
    points = b3_persistence(w.fs)
    for i in range(length):
        label, fn = rng.choice(ops)
        w.op(fn)
        labels.append(label)
        if i == length - 1 or rng.random() < 0.5:
            plabel, pfn = rng.choice(points)
            w.sync(pfn)
            labels.append(plabel)
    for ino in held:  # the last close of an unlinked file frees it
        w.op(lambda ino=ino: w.fs.unref(ino))


def test_b3_short_sequences() -> None:
    sequences = 3000 if LONG else 300
    per_barrier = 2 if LONG else 1
    started = time.monotonic()
    dev = MemDevice.of_size(16 << 20, 4096)
    FileSystem.format(dev)
    fs = FileSystem.open(dev, atime="noatime")
    b3_setup(fs)
    fs.close()
    bases = {4096: dev.snapshot(), 512: MemDevice(dev.total_sectors * 8, 512)}
    for lba, sec in dev.sectors.items():  # the same image seen through 512-byte sectors
        for i in range(8):
            bases[512].sectors[lba * 8 + i] = sec[i * 512 : (i + 1) * 512]
    bases[512].durable = dict(bases[512].sectors)
    total = 0
    rng = random.Random(5)
    for n in range(sequences):
        ss = 4096 if n % 2 else 512
        base = bases[ss]
        work = base.snapshot()
        rec = RecordingDevice(work)
        w = Workload(FileSystem.open(rec, atime="noatime"), rec)
        labels: list[str] = []
        b3_sequence(w, rng, rng.choice([1, 2, 3]), labels)
        w.close()
        total += check_crash_states(rec.log, base, w.views, per_barrier=per_barrier,
                                    seed=n, what=f"sequence {n} ({ss}): {'; '.join(labels)}")
    _count("b3", total)
    print(f"B3: {sequences} sequences, {total} crash states in "
          f"{time.monotonic() - started:.1f} s")
    assert total >= (50_000 // 2 if LONG else 1000)


# -- workload 3: write temp, fsync, rename over, fsync(dir) ------------------------------------


def replace_run(w: Workload, rng: random.Random, rounds: int) -> None:
    fs = w.fs
    w.op(lambda: fs.mkdir(ROOT_INO, b"app", 0o755, ROOT))
    d = resolve(fs, "app")
    for _ in range(rounds):
        name = rng.choice([b"config", b"state"])
        data = rng.randbytes(rng.choice([0, 10, 4096, 5000, 60_000]))
        tmp = name + b".tmp"
        holder: list[int] = []
        w.op(lambda tmp=tmp, h=holder: h.append(fs.create(d, tmp, 0o600, ROOT).ino))
        w.op(lambda data=data, h=holder: fs.write(h[0], 0, data, ROOT))
        w.sync(lambda h=holder: fs.fsync(h[0], False))
        w.op(lambda tmp=tmp, name=name: fs.rename(d, tmp, d, name, 0, ROOT))
        w.sync(lambda: fs.fsyncdir(d))


def test_write_fsync_rename_pattern() -> None:
    runs = 12 if LONG else 1
    per_barrier = 4 if LONG else 2
    started = time.monotonic()
    total = 0
    for r in range(runs):
        for ss in (4096, 512):
            seed = 77 + r * 2 + (ss == 512)
            rng = random.Random(seed)
            log, base, views = _record(ss, 32, None,
                                       lambda w, rng=rng: replace_run(w, rng, 25))

            def whole_versions(fs: FileSystem, seen: View, durable: int, latest: int,
                               views: list[View] = views) -> None:
                # Once a rename-over was made durable, the name always holds one complete
                # version: never missing, never empty-by-accident, never a mix.
                for name in ("app/config", "app/state"):
                    if name in views[durable].entries:
                        assert name in seen.entries, f"{name} vanished after the crash"
                        node = seen.entries[name].node
                        allowed = {v.contents[v.entries[name].node]
                                   for v in views[durable : latest + 1] if name in v.entries}
                        assert seen.contents[node] in allowed, f"{name}: not a whole version"

            total += check_crash_states(log, base, views, per_barrier=per_barrier, seed=seed,
                                        what=f"rename pattern seed {seed}",
                                        extra=whole_versions)
    _count("replace", total)
    print(f"write/fsync/rename: {total} crash states in {time.monotonic() - started:.1f} s")
    assert total >= (5000 if LONG else 300)
