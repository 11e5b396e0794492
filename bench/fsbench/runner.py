"""``nexfs bench [--quick]``: run every workload on every system and write the report.

For each repetition the systems take turns (the order rotates, so drift on a shared
machine hits all of them alike); each gets a fresh sparse image of the same size, runs every
workload with caches dropped before each (except the "hot" fio phases, which read the file
right after it was written), and is torn down again.  Figures are medians over
the repetitions.  Exit status: 0 done (whatever the figures), 1 the benchmark could not
run (a missing tool, not root), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from . import report, workloads
from .probe import PhaseProbe, disk_of
from .systems import (
    SYSTEMS,
    BenchError,
    Mounted,
    System,
    drop_caches,
    memory_kib,
    time_nexfs_mount,
)

ROOT = Path(__file__).resolve().parent.parent.parent
GiB = 1024**3
MiB = 1024**2

PRESETS: dict[str, dict[str, Any]] = {
    # CI-sized: well under two minutes on a 2-CPU machine, every output produced.
    "quick": {"reps": 1, "image": 1 * GiB, "file": 64 * MiB, "runtime": 1, "files": 1000,
              "creates": 2000, "lookups": 2000, "phases": workloads.FIO_QUICK},
    "full": {"reps": 3, "image": 4 * GiB, "file": 1 * GiB, "runtime": 5, "files": 10_000,
             "creates": 100_000, "lookups": 20_000, "phases": workloads.FIO_FULL},
}


def _size(text: str) -> int:
    units = {"K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nexfs bench",
        description="Benchmark NexFS side by side with NexFS on an NBD export (nbdkit), "
                    "fuse2fs, kernel ext4 (loop device), fio --direct=1 on the raw image, a "
                    "minimal pyfuse3 filesystem (the ceiling) and its variants that do what "
                    "NexFS must (ceiling-posix: two requests per write; ceiling-dev: the same "
                    "on the image through the valve); states NexFS's efficiency as ratios "
                    "from the same run (needs root). See docs/BENCHMARKS.md.")
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized run: 1 GiB images, 64 MiB file, 1 s jobs, 1000-file "
                             "tree, 2000 creates, one repetition (under two minutes)")
    parser.add_argument("--reps", type=int, help="repetitions (full: 3)")
    parser.add_argument("--image-size", type=_size, help="image size (full: 4G)")
    parser.add_argument("--file-size", type=_size, help="fio file size (full: 1G)")
    parser.add_argument("--runtime", type=float, help="seconds per timed fio job (full: 5)")
    parser.add_argument("--files", type=int, help="files in the tar tree (full: 10000)")
    parser.add_argument("--creates", type=int,
                        help="empty files created in one directory (full: 100000)")
    parser.add_argument("--systems", default=",".join(c.name for c in SYSTEMS),
                        help="comma-separated subset of "
                             f"{','.join(c.name for c in SYSTEMS)} (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="where the images go: a disk-backed filesystem (default "
                             "/var/tmp)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="where the JSON, Markdown and PNG go (default bench/results)")
    return parser


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every mount and loop device is cleaned up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Recorder:
    """Collects every sample and prints progress."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.units: dict[str, str] = {}
        self.peak_kib: dict[str, int] = {}
        self.phases: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def add(self, system: str, workload: str, unit: str, value: float, rep: str) -> None:
        self.samples.setdefault(system, {}).setdefault(workload, []).append(value)
        self.units.setdefault(workload, unit)
        shown = f"{value:.2f} s" if unit == "s" else f"{value:,.1f} {unit}"
        print(f"  {rep} {system:8} {workload:28} {shown}", flush=True)

    def phase(self, system: str, workload: str, seen: dict[str, Any]) -> None:
        """What else happened during one fio phase (bench/fsbench/probe.py)."""
        self.phases.setdefault(system, {}).setdefault(workload, []).append(seen)

    def memory(self, system: str, target: Mounted) -> None:
        figures = memory_kib(target.pid)
        if figures is not None:
            self.peak_kib[system] = max(self.peak_kib.get(system, 0), figures[1])


def run_system(system: System, preset: dict[str, Any], tarball: Path, rec: Recorder,
               rep: str) -> None:
    """Every workload on one freshly prepared system."""
    with system.prepared() as target:
        done: set[str] = set()
        probe = PhaseProbe(disk_of(system.workdir), None if target.is_raw else target.path)
        for index, phase in enumerate(preset["phases"], 1):
            # The raw image is always read and written with O_DIRECT: its figure belongs
            # in the --direct=1 row, and one run per job is enough (hot or cold is the
            # same to it: nothing is cached).
            name = f"{phase.job}-direct" if target.is_raw else phase.name
            if name in done:
                continue
            done.add(name)
            if not phase.hot:
                drop_caches()
            probe.start()
            # Each phase its own random offsets, the same on every system.
            value = workloads.run_fio(target, phase, size=preset["file"],
                                      runtime=preset["runtime"],
                                      seed=workloads.phase_seed(index))
            rec.phase(system.name, name, probe.stop())
            rec.add(system.name, name, phase.unit, value, rep)
            rec.memory(system.name, target)
        if target.fio_only:
            return
        os.unlink(target.path / workloads.FIO_FILE)
        drop_caches()
        rec.add(system.name, "tar-extract", "s", workloads.tar_extract(target, tarball), rep)
        rec.memory(system.name, target)
        drop_caches()
        rec.add(system.name, "find-stat", "s", workloads.find_stat(target), rep)
        drop_caches()
        rec.add(system.name, "rm-rf", "s", workloads.rm_tree(target), rep)
        rec.memory(system.name, target)
        drop_caches()
        rec.add(system.name, "create", "s", workloads.create_files(target, preset["creates"]),
                rep)
        rec.memory(system.name, target)
        drop_caches()
        rec.add(system.name, "lookup-random", "lookups/s",
                workloads.lookup_files(target, preset["creates"], preset["lookups"]), rep)
        rec.memory(system.name, target)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode = "quick" if args.quick else "full"
    preset = dict(PRESETS[mode])
    for key, value in (("reps", args.reps), ("image", args.image_size),
                       ("file", args.file_size), ("runtime", args.runtime),
                       ("files", args.files), ("creates", args.creates)):
        if value is not None:
            preset[key] = value
    preset["lookups"] = min(preset["lookups"], max(1, preset["creates"]))
    wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    classes = [c for c in SYSTEMS if c.name in wanted]
    if len(classes) != len(wanted) or preset["reps"] < 1 or preset["file"] > preset["image"] // 2:
        print(f"nexfs bench: --systems names some of {','.join(c.name for c in SYSTEMS)}; "
              "--reps >= 1; the file must fit in half the image", file=sys.stderr)
        return 2
    try:
        with _sigterm_as_interrupt():
            result = run(args, mode, preset, classes)
    except BenchError as exc:
        print(f"nexfs bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nexfs bench: interrupted (everything was unmounted)", file=sys.stderr)
        return 1
    paths = report.write_outputs(result, args.out, f"fsbench-{mode}")
    print()
    print(report.markdown(result))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def run(args: argparse.Namespace, mode: str, preset: dict[str, Any],
        classes: list[type[System]]) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise BenchError("needs root (drop_caches, loop devices, mounts)")
    for cls in classes:
        why = cls.available()
        if why:
            raise BenchError(f"{cls.label}: {why}")
    fio = workloads.fio_version()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rec = Recorder()
    workdir = Path(tempfile.mkdtemp(prefix="nexfs-bench-", dir=args.workdir))
    try:
        tarball = workdir / "tree.tar"
        tree_bytes = workloads.make_tree_tar(tarball, preset["files"])
        print(f"nexfs bench ({mode}): {preset['reps']} repetition(s), "
              f"{preset['image'] // MiB} MiB images in {args.workdir}, "
              f"{preset['file'] // MiB} MiB fio file, {preset['files']}-file tree "
              f"({tree_bytes // MiB} MiB), {preset['creates']} creates", flush=True)
        for r in range(preset["reps"]):
            order = classes[r % len(classes):] + classes[: r % len(classes)]
            for cls in order:
                run_system(cls(workdir, preset["image"]), preset, tarball, rec,
                           f"[{r + 1}/{preset['reps']}]")
        mount_s = None
        if any(c.name == report.NEXFS for c in classes):
            mount_s = statistics.median(time_nexfs_mount(workdir, 1024 * GiB)
                                        for _ in range(3))
            print(f"  mount of a 1 TiB NexFS image: {mount_s:.3f} s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    peak = rec.peak_kib.get(report.NEXFS)
    return {
        "config": {
            "mode": mode, "repetitions": preset["reps"], "image_bytes": preset["image"],
            "fio_file_bytes": preset["file"], "fio_runtime_s": preset["runtime"],
            "tree_files": preset["files"], "tree_bytes": tree_bytes,
            "creates": preset["creates"], "lookups": preset["lookups"],
            "systems": [c.name for c in classes], "workdir": str(args.workdir),
            "duration_s": round(time.time() - started, 1),
        },
        "environment": {
            "kernel": platform.release(), "python": platform.python_version(),
            "fio": fio, "cpus": os.cpu_count(), "machine": platform.machine(),
        },
        "units": rec.units,
        "samples": rec.samples,
        "phases": rec.phases,
        "summary": report.summarise(rec.samples, rec.units),
        "peak_rss_mib": {s: round(k / 1024, 1) for s, k in rec.peak_kib.items()},
        "nexfs_peak_rss_mib": None if peak is None else round(peak / 1024, 1),
        "mount_1tib_s": None if mount_s is None else round(mount_s, 3),
    }
