"""Why ``nexfs bench`` once measured a hot O_DIRECT random read slower than a cold one.

Runs the first fio phases of ``nexfs bench`` (bench/fsbench/workloads.py, ``FIO_FULL``) on a
fresh NexFS mount -- the sequential write that lays the file down, the hot random reads,
the sequential reads, then the cold random read with caches dropped -- and records, per
phase, the IOPS and NexFS's own data-cache hits (``nexfs stats``).  Two ways of choosing
the random offsets take turns on fresh mounts:

* ``replay``: every random phase draws the same offsets (the job files' ``randrepeat=1``,
  which is what the bench did before each phase got its own seed);
* ``seeded``: each phase its own seed (what the bench does now).

What it shows (docs/BENCHMARKS.md, "The hot-read anomaly"): with ``replay`` the first
random phase (the hot one: the sequential write bypassed the data cache, so it starts
empty) pays the device for every read, and a later phase re-reads the blocks the phases
before it left in the data cache, which ``drop_caches`` does not empty; so the "cold"
figure beats the hot one whenever a phase reads fewer blocks than the cache holds.

Usage (root): ``python bench/hot_read.py [--rounds 2] [--file-size 512M] [--runtime 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fsbench.probe import PhaseProbe, disk_of
from fsbench.runner import _size
from fsbench.systems import NexFS, drop_caches
from fsbench.workloads import FioPhase, phase_seed
from fsbench.workloads import run_fio as fio

PHASES = (
    FioPhase("seq-write-1m", False),
    FioPhase("randread-4k-qd1", True, hot=True),
    FioPhase("randread-4k-4jobs", True, hot=True),
    FioPhase("randread-4k-qd1", False, hot=True),
    FioPhase("seq-read-1m", False),
    FioPhase("seq-read-1m", True),
    FioPhase("randread-4k-qd1", True),
)


def one_round(mode: str, workdir: Path, image: int, size: int, runtime: float
              ) -> dict[str, tuple[float, float | None]]:
    """{phase: (figure, data-cache hit rate)} of one fresh mount."""
    got: dict[str, tuple[float, float | None]] = {}
    with NexFS(workdir, image).prepared() as target:
        probe = PhaseProbe(disk_of(workdir), target.path)
        for index, phase in enumerate(PHASES, 1):
            if not phase.hot:
                drop_caches()
            probe.start()
            value = fio(target, phase, size=size, runtime=runtime,
                        seed=phase_seed(index) if mode == "seeded" else None)
            seen = probe.stop()
            got[phase.name] = (value, seen.get("data_cache_hit_rate"))
            print(f"  {mode:6} {phase.name:28} {value:10,.0f}  data-cache hits "
                  f"{seen.get('data_cache_hit_rate')}", flush=True)
    return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each mode")
    parser.add_argument("--image-size", type=_size, default=_size("2G"))
    parser.add_argument("--file-size", type=_size, default=_size("512M"))
    parser.add_argument("--runtime", type=float, default=3.0)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, tuple[float, float | None]]]] = {"replay": [],
                                                                      "seeded": []}
    with tempfile.TemporaryDirectory(prefix="nexfs-hot-", dir=args.workdir) as tmp:
        for _ in range(args.rounds):
            for mode in results:
                results[mode].append(one_round(mode, Path(tmp), args.image_size,
                                               args.file_size, args.runtime))
    print("\n| phase | replay: IOPS | hits | seeded: IOPS | hits |\n|---|---:|---:|---:|---:|")
    for phase in PHASES[1:]:
        cells = []
        for mode in results:
            runs = [r[phase.name] for r in results[mode]]
            rates = [h for _, h in runs if h is not None]
            cells += [f"{statistics.median(v for v, _ in runs):,.0f}",
                      f"{statistics.median(rates):.2f}" if rates else "—"]
        print(f"| {phase.name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
