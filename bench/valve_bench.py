"""Block Valve throughput against fio on the same image file, in the same run.

Four workloads at queue depth 1 with O_DIRECT: 1 MiB sequential read and write
(MiB/s) and 4 KiB random read and write (IOPS).  For each, the valve (through a
capability, on the zero-copy path: ``block_read(into=AlignedBuffer)`` and
``block_write(AlignedBuffer)``) and ``fio --direct=1 --ioengine=psync --iodepth=1``
take turns on one pre-filled image for a fixed time; the order alternates between
runs so drift (host caches, thermal) hits both alike.  Reported: the median of the
runs for each side and their ratio.  fio is the physical limit: it issues the same
pread/pwrite calls with no interpreter in the way.

Targets (see docs/BENCHMARKS.md): valve/fio >= 0.9 at 1 MiB, >= 0.7 at 4 KiB.
This is a benchmark, not a test: it exits 0 whatever the ratios (2 on a usage error).

    python bench/valve_bench.py             # 5 runs x 3 s per workload, 256 MiB image
    python bench/valve_bench.py --quick     # 2 runs x 0.5 s, 64 MiB image (~10 s)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Run as a script from anywhere: the valve lives at the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from valve import Capability, Rights, Valve

MiB = 1024 * 1024


@dataclass(frozen=True)
class Workload:
    name: str
    fio_rw: str
    block: int
    write: bool
    random: bool
    target: float  # minimum valve/fio ratio

    @property
    def unit(self) -> str:
        return "IOPS" if self.random else "MiB/s"


WORKLOADS = (
    Workload("seq_read_1m", "read", MiB, write=False, random=False, target=0.9),
    Workload("seq_write_1m", "write", MiB, write=True, random=False, target=0.9),
    Workload("rand_read_4k", "randread", 4096, write=False, random=True, target=0.7),
    Workload("rand_write_4k", "randwrite", 4096, write=True, random=True, target=0.7),
)


def make_image(path: Path, nbytes: int) -> None:
    """Fill the image with real data: reading a sparse hole never reaches the disk."""
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        for _ in range(nbytes // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _score(w: Workload, ops: int, elapsed: float) -> float:
    return ops / elapsed if w.random else ops * w.block / MiB / elapsed


def run_valve(cap: Capability, w: Workload, seconds: float, seed: int) -> float:
    """One timed pass through the valve; returns MiB/s or IOPS."""
    ss, total = cap.block_info()[:2]
    count = w.block // ss
    slots = total // count
    buf = cap.alloc_buffer(w.block)
    if w.write:
        memoryview(buf)[:] = os.urandom(w.block)
    if w.random:
        rng = random.Random(seed)
        lbas = [rng.randrange(slots) * count for _ in range(65536)]
    else:
        lbas = [i * count for i in range(slots)]
    op: Callable[[int], object]
    if w.write:
        def op(lba: int) -> object:
            cap.block_write(lba, count, buf)
            return None
    else:
        def op(lba: int) -> object:
            return cap.block_read(lba, count, into=buf)
    n = len(lbas)
    ops = 0
    clock = time.perf_counter
    # Look at the clock every few operations: the loop should cost what a caller's
    # loop would, not what a timer does.
    batch = 8 if w.random else 1
    start = clock()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            op(lbas[ops % n])
            ops += 1
        if clock() >= deadline:
            break
    return _score(w, ops, clock() - start)


def run_fio(fio: str, image: Path, size: int, w: Workload, seconds: float, seed: int) -> float:
    """One timed fio pass with the same pattern; returns MiB/s or IOPS."""
    cmd = [
        fio, f"--name={w.name}", f"--filename={image}", "--direct=1", "--ioengine=psync",
        "--iodepth=1", "--numjobs=1", f"--rw={w.fio_rw}", f"--bs={w.block}", f"--size={size}",
        "--time_based", f"--runtime={int(seconds * 1000)}ms", f"--randseed={seed}",
        "--norandommap", "--output-format=json",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out)["jobs"][0]["write" if w.write else "read"]
    return float(job["iops"]) if w.random else float(job["bw_bytes"]) / MiB


def _fstype(path: Path) -> str:
    try:
        out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True,
                             text=True, check=True).stdout
        return out.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench(*, runs: int, seconds: float, size_mib: int, directory: Path) -> dict[str, object]:
    """Run every workload ``runs`` times on each side; return the result document."""
    fio = shutil.which("fio")
    if fio is None:
        raise SystemExit("valve_bench: fio not found (apt-get install fio)")
    fio_version = subprocess.run([fio, "--version"], capture_output=True, text=True,
                                 check=True).stdout.strip()
    size = size_mib * MiB
    samples: dict[str, dict[str, list[float]]] = {
        w.name: {"valve": [], "fio": []} for w in WORKLOADS
    }
    with tempfile.TemporaryDirectory(prefix="valve-bench-", dir=directory) as tmp:
        image = Path(tmp) / "bench.img"
        make_image(image, size)
        with Valve.open(image) as v:
            sector_size = v.grant(Rights.READ).block_info().sector_size
        for run in range(runs):
            for w in WORKLOADS:
                seed = 1000 + run
                # The valve holds the image's lock only for its own turn; fio takes no lock.
                def valve_turn(w: Workload = w, seed: int = seed) -> None:
                    with Valve.open(image) as v:
                        result = run_valve(v.grant(Rights.READ | Rights.WRITE), w, seconds, seed)
                    samples[w.name]["valve"].append(result)

                def fio_turn(w: Workload = w, seed: int = seed) -> None:
                    samples[w.name]["fio"].append(run_fio(fio, image, size, w, seconds, seed))

                turns = (valve_turn, fio_turn) if run % 2 == 0 else (fio_turn, valve_turn)
                for turn in turns:
                    turn()
    workloads: dict[str, object] = {}
    for w in WORKLOADS:
        valve_med = statistics.median(samples[w.name]["valve"])
        fio_med = statistics.median(samples[w.name]["fio"])
        ratio = valve_med / fio_med if fio_med else 0.0
        workloads[w.name] = {
            "unit": w.unit,
            "block_size": w.block,
            "valve": round(valve_med, 1),
            "fio": round(fio_med, 1),
            "ratio": round(ratio, 3),
            "target": w.target,
            "meets_target": ratio >= w.target,
            "valve_runs": [round(x, 1) for x in samples[w.name]["valve"]],
            "fio_runs": [round(x, 1) for x in samples[w.name]["fio"]],
        }
    return {
        "config": {
            "runs": runs,
            "seconds_per_run": seconds,
            "image_mib": size_mib,
            "queue_depth": 1,
            "sector_size": sector_size,
            "directory": str(directory),
            "filesystem": _fstype(directory),
        },
        "environment": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "fio": fio_version,
            "cpus": os.cpu_count(),
        },
        "workloads": workloads,
    }


def markdown(result: dict[str, object]) -> str:
    """The result as the table in docs/BENCHMARKS.md."""
    lines = [
        "| workload | unit | valve (median) | fio --direct=1 (median) | valve/fio | target |",
        "|---|---|---:|---:|---:|---:|",
    ]
    workloads = result["workloads"]
    assert isinstance(workloads, dict)
    for name, r in workloads.items():
        mark = "" if r["meets_target"] else " (below)"
        lines.append(
            f"| {name} | {r['unit']} | {r['valve']:.0f} | {r['fio']:.0f} | "
            f"{r['ratio']:.2f}{mark} | {r['target']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="valve_bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true",
                        help="2 runs of 0.5 s on a 64 MiB image (about 10 s)")
    parser.add_argument("--runs", type=int, help="runs per workload and side (default 5)")
    parser.add_argument("--seconds", type=float, help="seconds per run (default 3)")
    parser.add_argument("--size-mib", type=int, help="image size in MiB (default 256)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where to create the image (a disk-backed filesystem with O_DIRECT)")
    parser.add_argument("--json", type=Path, help="also write the result document here")
    args = parser.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)
    seconds = args.seconds or (0.5 if args.quick else 3.0)
    size_mib = args.size_mib or (64 if args.quick else 256)
    if runs < 1 or seconds <= 0 or size_mib < 2:
        parser.error("--runs, --seconds and --size-mib must be positive (size >= 2 MiB)")
    result = bench(runs=runs, seconds=seconds, size_mib=size_mib, directory=args.dir)
    result["command"] = " ".join(["python", "bench/valve_bench.py", *(argv or sys.argv[1:])])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    cfg = result["config"]
    assert isinstance(cfg, dict)
    print(f"valve vs fio: {runs} runs x {seconds:g} s, {size_mib} MiB image on "
          f"{cfg['filesystem']}, sector {cfg['sector_size']}, queue depth 1")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
