"""The workloads: the fio jobs of ``bench/fio/`` and the metadata workloads.

Every workload returns one figure with a unit: ``MiB/s`` or ``IOPS`` (higher is better) or
``s`` (elapsed time, lower is better).  Caches are dropped before each one (the caller's
job), so reads start cold, except before the "hot" fio phases.  The metadata workloads run
on NexFS, fuse2fs and ext4 only; fio also runs on the raw image file, always with
``--direct=1``, and on the ceiling.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .systems import BenchError, Mounted

FIO_DIR = Path(__file__).resolve().parent.parent / "fio"
FIO_FILE = "fio-bench.dat"
MiB = 1024 * 1024


@dataclass(frozen=True)
class FioPhase:
    """One fio job file run buffered or with --direct=1, cold (caches dropped first) or
    hot (right after the file was written, nothing dropped: what a user sees)."""

    job: str  # file name in bench/fio/, without .fio
    direct: bool
    hot: bool = False

    @property
    def name(self) -> str:
        return f"{self.job}{'-direct' if self.direct else ''}{'-hot' if self.hot else ''}"

    @property
    def unit(self) -> str:
        return "MiB/s" if self.job.startswith("seq-") else "IOPS"


# The order matters: the sequential write lays down the file every later job reads, and
# the hot reads follow it with nothing dropped in between.
FIO_FULL = (
    FioPhase("seq-write-1m", False),
    FioPhase("seq-read-1m", False, hot=True),
    FioPhase("randread-4k-qd1", True, hot=True),
    FioPhase("randread-4k-4jobs", True, hot=True),
    FioPhase("randread-4k-qd1", False, hot=True),
    FioPhase("seq-read-1m", False),
    FioPhase("seq-read-1m", True),
    FioPhase("randread-4k-qd1", True),
    FioPhase("randread-4k-qd1", False),
    FioPhase("randread-4k-4jobs", True),
    FioPhase("randread-4k-4jobs", False),
    FioPhase("randwrite-4k-qd1", True),
    FioPhase("randwrite-4k-qd1", False),
    FioPhase("randwrite-4k-4jobs", True),
    FioPhase("randwrite-4k-4jobs", False),
    FioPhase("randrw-70-30", True),
    FioPhase("randrw-70-30", False),
    FioPhase("seq-write-1m", True),
)
FIO_QUICK = (
    FioPhase("seq-write-1m", False),
    FioPhase("randread-4k-qd1", True, hot=True),
    FioPhase("seq-read-1m", False),
    FioPhase("seq-read-1m", True),
    FioPhase("randread-4k-qd1", True),
    FioPhase("randread-4k-4jobs", True),
    FioPhase("randwrite-4k-qd1", True),
    FioPhase("randwrite-4k-4jobs", True),
    FioPhase("randrw-70-30", True),
)


def fio_version() -> str:
    fio = shutil.which("fio")
    if fio is None:
        raise BenchError("fio not found (apt-get install fio)")
    return subprocess.run([fio, "--version"], capture_output=True, text=True,
                          check=True).stdout.strip()


def phase_seed(index: int) -> int:
    """The random seed of the ``index``-th phase: the first prime from ``1000 * index``.

    fio derives each job's seed from ``randseed`` and the job's number, and small seeds
    collide: with consecutive ones phase 8 replayed job 2 of phase 4, and by hand job 3 of
    seed 3 drew what job 1 of seed 6 did.  Primes a thousand apart did not, for every job of
    both presets (tests/test_bench_fio_phases.py checks it through fio itself)."""
    n = max(2, 1000 * index)
    while any(n % d == 0 for d in range(2, int(n**0.5) + 1)):
        n += 1
    return n


def job_text(job: str, seed: int | None) -> str:
    """The job file ``job`` with its random offsets drawn from ``seed`` (None: as it is).

    The job files say ``randrepeat=1`` (repeatable by hand), and with it fio 3.33 ignores
    ``randseed`` (on the command line or in the file): every random job would replay the
    same offsets.  A phase that replays the offsets of the phase before it finds them in
    every cache nobody dropped, NexFS's own data cache above all, which ``drop_caches`` does
    not reach (docs/BENCHMARKS.md, "The hot-read anomaly").  So each phase gets its own
    seed: still repeatable, never the previous phase's offsets."""
    text = (FIO_DIR / f"{job}.fio").read_text()
    if seed is not None and "rw=rand" in text:
        if "\nrandrepeat=1\n" not in text:
            raise BenchError(f"bench/fio/{job}.fio: random job without randrepeat=1")
        text = text.replace("\nrandrepeat=1\n", f"\nrandrepeat=0\nrandseed={seed}\n")
    return text


def run_fio(target: Mounted, phase: FioPhase, *, size: int, runtime: float,
            seed: int | None = None) -> float:
    """Run one job on ``target``; MiB/s for sequential jobs, IOPS (read + write) otherwise.
    Random offsets come from ``seed`` (:func:`job_text`; None: the job file's own)."""
    filename = target.path if target.is_raw else target.path / FIO_FILE
    # The raw image stands for the device limit: never through the host's page cache.
    direct = phase.direct or target.is_raw
    env = dict(os.environ, SIZE=str(size), RUNTIME=f"{max(1, round(runtime))}")
    # The job file on stdin ("-"): fio reads it like a file.  A hot phase must find the
    # file's pages where the write left them: fio's default (invalidate=1) drops them with
    # posix_fadvise(DONTNEED) before the job starts.
    cmd = ["fio", f"--filename={filename}", f"--direct={int(direct)}", "--output-format=json",
           *(["--invalidate=0"] if phase.hot else []), "-"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600,
                          input=job_text(phase.job, seed))
    if proc.returncode != 0:
        raise BenchError(f"fio {phase.name} on {target.name} failed: "
                         f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    # fio may print warnings before the JSON document.
    doc = json.loads(proc.stdout[proc.stdout.index("{"):])
    jobs = doc["jobs"]
    if phase.unit == "MiB/s":
        return sum(j["read"]["bw_bytes"] + j["write"]["bw_bytes"] for j in jobs) / MiB
    return float(sum(j["read"]["iops"] + j["write"]["iops"] for j in jobs))


# -- metadata ---------------------------------------------------------------------------


def make_tree_tar(path: Path, nfiles: int, *, seed: int = 7) -> int:
    """Write a tar of ``nfiles`` files with mixed sizes in nested directories (the same
    tree for a given seed); returns the bytes of file data in it.

    Sizes: 75% up to 4 KiB, 23% 4-32 KiB, 2% 32-512 KiB (mean about 11 KiB), like a
    source tree.  Directories: three levels of ten, about ten files per leaf."""
    rng = random.Random(seed)
    pool = rng.randbytes(512 * 1024 + 4096)
    total = 0
    now = int(time.time())
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        made: set[str] = set()
        for i in range(nfiles):
            leaf = i // 10
            parts = [f"d{leaf // 100 % 10}", f"d{leaf // 10 % 10}", f"d{leaf % 10}"]
            if leaf >= 1000:
                parts.insert(0, f"top{leaf // 1000}")
            for depth in range(1, len(parts) + 1):
                d = "tree/" + "/".join(parts[:depth])
                if d not in made:
                    made.add(d)
                    info = tarfile.TarInfo(d)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    info.mtime = now
                    tar.addfile(info)
            r = rng.random()
            size = (rng.randrange(0, 4097) if r < 0.75 else rng.randrange(4096, 32769)
                    if r < 0.98 else rng.randrange(32768, 512 * 1024 + 1))
            info = tarfile.TarInfo("tree/" + "/".join(parts) + f"/f{i}.dat")
            info.size = size
            info.mode = 0o644
            info.mtime = now
            start = rng.randrange(0, 4096)
            tar.addfile(info, io.BytesIO(pool[start : start + size]))
            total += size
    return total


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _check(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")


def tar_extract(target: Mounted, tarball: Path) -> float:
    """Seconds for ``tar -xf`` of the tree into the mount (not counting the sync after)."""
    return _timed(lambda: _check(["tar", "-xf", str(tarball), "-C", str(target.path)]))


def find_stat(target: Mounted) -> float:
    """Seconds for a cold ``find`` that stats every entry of the tree."""
    return _timed(lambda: _check(["find", str(target.path / "tree"), "-printf",
                                  "%s %m %T@\\n"]))


def rm_tree(target: Mounted) -> float:
    return _timed(lambda: _check(["rm", "-rf", str(target.path / "tree")]))


def create_files(target: Mounted, count: int) -> float:
    """Seconds to create ``count`` empty files in one new directory."""
    directory = target.path / "many"
    directory.mkdir()
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    path = os.fspath(directory)

    def create() -> None:
        for i in range(count):
            os.close(os.open(f"{path}/file-{i:07d}", flags, 0o644))

    return _timed(create)


def lookup_files(target: Mounted, count: int, lookups: int, *, seed: int = 11) -> float:
    """Lookups per second: ``stat`` of random names among the ``count`` files (cold)."""
    path = os.fspath(target.path / "many")
    rng = random.Random(seed)
    names = [f"{path}/file-{rng.randrange(count):07d}" for _ in range(lookups)]

    def look() -> None:
        for name in names:
            os.stat(name)

    return lookups / _timed(look)
