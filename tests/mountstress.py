"""Workloads for the real-mount stress tests, and the checks that go with them.

Each workload runs as its own process (``python tests/mountstress.py KIND ...``), as an
application would, so that killing the NexFS daemon under it, filling the disk or loading it
from eight processes at once exercises the real kernel path.  Workloads import only the
standard library (quick to start) and report what they have made durable in a *record file*
outside the mount: one line per item, written only after the ``fsync`` that made it durable
returned.  A workload never creates its directory: the test makes it on the mount, so a
workload that starts after the mount died fails (ENOENT) instead of filling the empty mount
point underneath.  After a crash, every recorded item must be back after the remount; the checkers
below say exactly what that means for each workload.

Workloads:

* ``writer``  — numbered files of varied sizes, each written in uneven chunks, fsync'd,
  closed, then recorded (``w00012``).  Content is a function of (seed, name).
* ``renamer`` — the atomic-replace idiom: write ``.tmpN``, fsync, rename over one of a few
  targets, fsync the directory, record ``target version``.  After a crash each target must
  hold a complete version at least as new as the last recorded one.
* ``tarloop`` — ``tar -xf`` an archive into ``xN``, fsync every file and directory, record
  ``xN``.  A recorded copy must match the archive's manifest exactly.
* ``filler``  — fills the volume: files of 1-4 MiB, shrinking after each ENOSPC, recorded
  (``name size``) after fsync and close succeeded; prints a JSON summary of the ENOSPC it saw.
* ``mixer``   — one of the load test's processes: creates, publishes by rename, reads and
  verifies, renames, links, unlinks, mkdir/rmdir, xattrs and private rewrites in a tree shared
  with the other mixers; races with them (ENOENT, EEXIST, ENOTEMPTY) are counted, every other
  error and every verification failure is reported; prints a JSON summary.

Exit status of a workload: 0 done; 3 stopped by an OSError (printed as ``errno NAME``: after
a kill of the daemon that is ENOTCONN); anything else is a bug in the workload.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

EXIT_OSERROR = 3


# -- deterministic content ---------------------------------------------------------------


def payload(key: str, size: int) -> bytes:
    """``size`` pseudo-random bytes determined by ``key`` (so a misplaced, stale or torn
    block of any file is caught)."""
    return random.Random(key).randbytes(size)


def writer_content(seed: int, name: str) -> bytes:
    rng = random.Random(f"size/{seed}/{name}")
    size = rng.choice((0, rng.randrange(1, 4096), rng.randrange(4096, 70000),
                       rng.randrange(70000, 300000)))
    return payload(f"{seed}/{name}", size)


def version_content(seed: int, target: str, version: int) -> bytes:
    head = f"{target} {version}\n".encode()
    return head + payload(f"{seed}/{target}/{version}", 1000 + (version * 7919) % 60000)


def parse_version(data: bytes) -> int | None:
    head, _, _ = data.partition(b"\n")
    try:
        return int(head.split()[1])
    except (IndexError, ValueError):
        return None


def sealed(key: str, size: int) -> bytes:
    """Self-checking content for files other processes read: magic, length, CRC32."""
    body = payload(key, size)
    return b"NXS1" + struct.pack("<II", len(body), zlib.crc32(body)) + body


def check_sealed(data: bytes) -> bool:
    if len(data) < 12 or data[:4] != b"NXS1":
        return False
    length, crc = struct.unpack_from("<II", data, 4)
    return len(data) == 12 + length and zlib.crc32(data[12:]) == crc


# -- records ---------------------------------------------------------------------------------


class Recorder:
    """Appends one line per durable item to a file outside the mount (O_APPEND: each line is
    one write, so a reader never sees half a line it could take for a whole one)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def add(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())


def read_records(path: Path) -> list[str]:
    """The complete lines of a record file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return [line for line in lines[:-1] if line]  # the last piece has no newline yet


def count_records(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def fsync_path(path: str | Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | Path, data: bytes, rng: random.Random, *, sync: bool = True) -> None:
    """Write ``data`` in uneven chunks (partial pages, page-straddling writes), fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos = 0
        while pos < len(data):
            n = rng.choice((1, 100, 4096, 5000, 65536, 200000))
            pos += os.write(fd, data[pos:pos + n])
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


# -- workloads ---------------------------------------------------------------------------


def run_writer(args: argparse.Namespace) -> None:
    rec = Recorder(args.record)
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.seconds
    for i in range(args.count):
        if time.monotonic() > deadline:
            break
        name = f"w{i:05d}"
        write_file(os.path.join(args.dir, name), writer_content(args.seed, name), rng)
        rec.add(name)


def run_renamer(args: argparse.Namespace) -> None:
    rec = Recorder(args.record)
    rng = random.Random(args.seed)
    dfd = os.open(args.dir, os.O_RDONLY | os.O_DIRECTORY)
    deadline = time.monotonic() + args.seconds
    try:
        for i in range(args.count):
            if time.monotonic() > deadline:
                break
            target = f"t{i % args.targets}"
            tmp = os.path.join(args.dir, f".tmp{i}")
            write_file(tmp, version_content(args.seed, target, i), rng)
            os.rename(tmp, os.path.join(args.dir, target))
            os.fsync(dfd)
            rec.add(f"{target} {i}")
    finally:
        os.close(dfd)


def run_tarloop(args: argparse.Namespace) -> None:
    rec = Recorder(args.record)
    deadline = time.monotonic() + args.seconds
    for n in range(args.count):
        if time.monotonic() > deadline:
            break
        dest = os.path.join(args.dir, f"x{n}")
        os.mkdir(dest)
        result = subprocess.run(["tar", "-xf", args.archive, "-C", dest], check=False,
                                capture_output=True)
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip().splitlines()
            raise OSError(errno.EIO, f"tar exit {result.returncode}: {err[-1:] or ''}")
        for dirpath, _dirnames, filenames in os.walk(dest):
            for name in filenames:
                fsync_path(os.path.join(dirpath, name))
            fsync_path(dirpath, directory=True)
        fsync_path(args.dir, directory=True)
        rec.add(f"x{n}")


def run_filler(args: argparse.Namespace) -> None:
    """Write files until the volume is full; shrink after each ENOSPC; stop after a few in a
    row.  A file is recorded only when write, fsync and close all succeeded."""
    rec = Recorder(args.record)
    rng = random.Random(args.seed)
    enospc: Counter[str] = Counter()
    written = 0
    size = args.max_size
    misses = 0
    n = 0
    while misses < args.misses:
        name = f"{args.prefix}{n:04d}"
        n += 1
        data = payload(f"{args.seed}/{name}", rng.randrange(size // 2, size + 1))
        stage = "open"
        fd = -1
        try:
            fd = os.open(os.path.join(args.dir, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o644)
            stage = "write"
            pos = 0
            while pos < len(data):
                pos += os.write(fd, data[pos:pos + 256 * 1024])
            stage = "fsync"
            os.fsync(fd)
            stage = "close"
            os.close(fd)
            fd = -1
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            enospc[stage] += 1
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError as exc2:
                    if exc2.errno != errno.ENOSPC:
                        raise
            misses += 1
            size = max(4096, size // 4)
            continue
        rec.add(f"{name} {len(data)}")
        written += len(data)
        misses = 0
    print(json.dumps({"enospc": dict(enospc), "written": written, "files": n}))


class Mixer:
    """One load-test process (see the module docstring).  Shared names are ``dK/sJ`` (files
    published complete by rename, never changed in place), ``dK/hJ`` (hard links to them) and
    ``dK/eJ`` (directories that come and go); ``own/pID`` is private and checked against a
    model of its content."""

    RACES = (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY)

    def __init__(self, root: str, ident: int, seed: int, dirs: int = 8, names: int = 48) -> None:
        self.root = root
        self.ident = ident
        self.rng = random.Random(seed * 1000 + ident)
        self.dirs = dirs
        self.names = names
        self.ops: Counter[str] = Counter()
        self.races: Counter[str] = Counter()
        self.failures: list[str] = []
        self.private = os.path.join(root, "own", f"p{ident}")
        self.model = bytearray()
        self.seq = 0

    def shared(self, prefix: str) -> str:
        return os.path.join(self.root, f"d{self.rng.randrange(self.dirs)}",
                            f"{prefix}{self.rng.randrange(self.names)}")

    def publish(self) -> None:
        self.seq += 1
        tmp = os.path.join(self.root, "own", f".t{self.ident}.{self.seq}")
        data = sealed(f"{self.ident}/{self.seq}", self.rng.choice((0, 10, 3000, 9000, 70000)))
        write_file(tmp, data, self.rng, sync=self.rng.random() < 0.1)
        try:
            os.rename(tmp, self.shared("s"))
        except OSError:
            os.unlink(tmp)
            raise

    def read(self) -> None:
        path = self.shared(self.rng.choice("ssh"))
        with open(path, "rb") as f:
            data = f.read()
        if not check_sealed(data):
            self.failures.append(f"{path}: bad content ({len(data)} bytes, "
                                 f"head {data[:12]!r})")

    def rename(self) -> None:
        os.rename(self.shared("s"), self.shared("s"))

    def unlink(self) -> None:
        os.unlink(self.shared(self.rng.choice("sh")))

    def link(self) -> None:
        os.link(self.shared("s"), self.shared("h"))

    def mkdir(self) -> None:
        path = self.shared("e")
        os.mkdir(path)
        if self.rng.random() < 0.5:
            with open(os.path.join(path, "inside"), "wb") as f:
                f.write(b"x" * self.rng.randrange(5000))

    def rmdir(self) -> None:
        path = self.shared("e")
        if self.rng.random() < 0.5:
            os.unlink(os.path.join(path, "inside"))
        os.rmdir(path)

    def rename_dir(self) -> None:
        """Move a directory (with whatever is inside) to another place; over an empty one it
        replaces it, over a non-empty one ENOTEMPTY."""
        os.rename(self.shared("e"), self.shared("e"))

    def read_unlinked(self) -> None:
        """Open a shared file, unlink it, then read it through the open descriptor."""
        path = self.shared("s")
        with open(path, "rb") as f:
            try:
                os.unlink(path)
            except FileNotFoundError:
                self.races["ENOENT"] += 1
            data = f.read()
        if not check_sealed(data):
            self.failures.append(f"{path}: bad content after unlink ({len(data)} bytes)")

    def listing(self) -> None:
        d = os.path.join(self.root, f"d{self.rng.randrange(self.dirs)}")
        for name in os.listdir(d):
            try:
                os.lstat(os.path.join(d, name))
            except FileNotFoundError:
                self.races["ENOENT"] += 1

    def xattr(self) -> None:
        path = self.shared("s")
        value = str(self.rng.randrange(10**6)).encode()
        os.setxattr(path, "user.mixer", value)
        try:
            os.getxattr(path, "user.mixer")
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # another process replaced the file in between
                raise
            self.races["ENODATA"] += 1

    def rewrite_private(self) -> None:
        """pwrite / truncate / append / whole read of the private file, checked against the
        in-memory model (nothing else touches it)."""
        fd = os.open(self.private, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            action = self.rng.randrange(4)
            if action == 0:
                off = self.rng.randrange(len(self.model) + 9000)
                data = payload(f"{self.ident}/{self.seq}/{off}", self.rng.randrange(1, 20000))
                self.seq += 1
                os.pwrite(fd, data, off)
                if off > len(self.model):
                    self.model.extend(bytes(off - len(self.model)))
                self.model[off:off + len(data)] = data
            elif action == 1:
                size = self.rng.randrange(len(self.model) + 1)
                os.ftruncate(fd, size)
                del self.model[size:]
            elif action == 2 and len(self.model) > 600_000:
                os.ftruncate(fd, 0)
                self.model.clear()
            else:
                got = os.pread(fd, len(self.model) + 100, 0)
                if got != bytes(self.model):
                    self.failures.append(f"{self.private}: content differs from the model "
                                         f"({len(got)} vs {len(self.model)} bytes)")
            if self.rng.random() < 0.05:
                os.fsync(fd)
        finally:
            os.close(fd)

    def run(self, seconds: float) -> dict[str, object]:
        ops: list[tuple[Callable[[], None], int]] = [
            (self.publish, 6), (self.read, 8), (self.rename, 4), (self.unlink, 3),
            (self.link, 2), (self.mkdir, 2), (self.rmdir, 2), (self.listing, 2),
            (self.xattr, 1), (self.rewrite_private, 4), (self.rename_dir, 1),
            (self.read_unlinked, 1),
        ]
        choices = [fn for fn, weight in ops for _ in range(weight)]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(self.failures) < 20:
            fn = self.rng.choice(choices)
            self.ops[fn.__name__] += 1
            try:
                fn()
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                if exc.errno in self.RACES:
                    self.races[name] += 1
                else:
                    self.failures.append(f"{fn.__name__}: {exc!r}")
        if os.path.exists(self.private):
            with open(self.private, "rb") as f:
                if f.read() != bytes(self.model):
                    self.failures.append(f"{self.private}: final content differs from the model")
        return {"ident": self.ident, "ops": dict(self.ops), "races": dict(self.races),
                "failures": self.failures}


def run_mixer(args: argparse.Namespace) -> None:
    summary = Mixer(args.dir, args.ident, args.seed).run(args.seconds)
    print(json.dumps(summary))


# -- checks (test side) ----------------------------------------------------------------------


def check_writer(directory: Path, records: list[str], seed: int) -> list[str]:
    """Problems with recorded writer files (each must exist with exactly its content)."""
    problems = []
    for name in records:
        path = directory / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.append(f"{path}: fsync'd, but {exc.strerror} after the crash")
            continue
        want = writer_content(seed, name)
        if data != want:
            problems.append(f"{path}: fsync'd {len(want)} bytes, found {len(data)} bytes "
                            "that differ")
    return problems


def check_renamer(directory: Path, records: list[str], seed: int) -> list[str]:
    """Each recorded target holds a complete version no older than the last recorded one."""
    last: dict[str, int] = {}
    for line in records:
        target, number = line.split()
        last[target] = int(number)
    problems = []
    for target, version in last.items():
        path = directory / target
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.append(f"{path}: version {version} was made durable, but "
                            f"{exc.strerror} after the crash")
            continue
        found = parse_version(data)
        if found is None or found < version:
            problems.append(f"{path}: holds version {found}, older than the durable "
                            f"version {version}")
        elif data != version_content(seed, target, found):
            problems.append(f"{path}: version {found} is torn or wrong ({len(data)} bytes)")
    return problems


def tree_manifest(root: Path) -> dict[str, tuple[str, int, str]]:
    """Relative path -> (type, mode, sha256 or link target) of everything under ``root``."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("l", 0, os.readlink(path))
            elif path.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777, "")
            else:
                out[rel] = ("f", st.st_mode & 0o7777, hashlib.sha256(path.read_bytes())
                            .hexdigest())
    return out


def check_tar(directory: Path, records: list[str],
              expected: dict[str, tuple[str, int, str]]) -> list[str]:
    problems = []
    for name in records:
        try:
            got = tree_manifest(directory / name)
        except OSError as exc:
            problems.append(f"{directory / name}: unreadable after the crash: {exc}")
            continue
        if got != expected:
            missing = sorted(set(expected) - set(got))[:5]
            wrong = sorted(k for k in expected if k in got and got[k] != expected[k])[:5]
            problems.append(f"{directory / name}: differs from the archive (missing "
                            f"{missing}, different {wrong})")
    return problems


def make_tar_source(root: Path, nfiles: int, seed: int = 7) -> Path:
    """A small source tree for the tar workload: nested directories, files of 0-64 KiB,
    symlinks.  Deterministic."""
    rng = random.Random(seed)
    root.mkdir()
    for i in range(nfiles):
        d = root / f"d{i % 7}" / f"s{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.choice((0, rng.randrange(1, 4096), rng.randrange(4096, 65536)))
        (d / f"f{i:04d}").write_bytes(payload(f"tar/{seed}/{i}", size))
        if i % 17 == 0:
            os.symlink(f"f{i:04d}", d / f"l{i:04d}")
    return root


class RssSampler:
    """Samples a process's VmRSS (KiB) from /proc every ``interval`` s in a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = vm_rss_kib(self.pid)
            if rss is not None:
                self.samples.append(rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_kib(self) -> int:
        return max(self.samples, default=0)


def vm_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# -- command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("writer", "renamer", "tarloop", "filler", "mixer"))
    parser.add_argument("--dir", required=True)
    parser.add_argument("--record", default=os.devnull)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--archive")
    parser.add_argument("--prefix", default="f")
    parser.add_argument("--max-size", type=int, default=4 << 20)
    parser.add_argument("--misses", type=int, default=4)
    parser.add_argument("--ident", type=int, default=0)
    args = parser.parse_args(argv)
    run = {"writer": run_writer, "renamer": run_renamer, "tarloop": run_tarloop,
           "filler": run_filler, "mixer": run_mixer}[args.kind]
    try:
        run(args)
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        print(f"errno {name}: {exc}", file=sys.stderr)
        return EXIT_OSERROR
    return 0


WORKLOAD = Path(__file__).absolute()


def workload_command(kind: str, *args: str) -> list[str]:
    return [sys.executable, str(WORKLOAD), kind, *args]


if __name__ == "__main__":
    raise SystemExit(main())
