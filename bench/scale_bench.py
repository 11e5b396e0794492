"""Scale benchmark: what allocation and orphan release cost as the volume and the orphan list
grow (issue 10; figures in docs/BENCHMARKS.md, "Scale").

In process, on sparse image files through the real valve (the core, no FUSE):

* allocation: single-block data and metadata allocations (``alloc_data``/``alloc_meta``)
  and inode allocations on a fresh 64 GiB and a fresh 16 TiB volume (16 TiB - 4 KiB, the
  largest file ext4 allows), best of several rounds; plus the first search after the
  mount, which builds the allocator's index from the summary blocks;
* orphan release: N files created, held open (a reference) and unlinked, so that all N are
  on the orphan list; then released oldest first (each one at the far end of the list,
  the worst case for a singly linked list) and timed, for N = 1,000 and 100,000.

This is a benchmark, not a test: it exits 0 whatever the figures (2 on a usage error).

    python bench/scale_bench.py             # full: both sizes, 1,000 and 100,000 orphans
    python bench/scale_bench.py --quick     # 64 GiB and 1 TiB, 1,000 and 5,000 orphans
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Run as a script from anywhere: nexfs and the valve live at the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexfs.core.attr import Ctx
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.types import InodeNo
from valve import Rights, Valve

GiB = 1 << 30
TiB_16 = (1 << 44) - 4096
ROOT = Ctx(uid=0, gid=0)


@contextmanager
def sparse_volume(directory: Path, size: int) -> Iterator[Path]:
    """A freshly formatted sparse image of ``size`` bytes, removed afterwards."""
    fd, name = tempfile.mkstemp(prefix="scale-", suffix=".img", dir=directory)
    path = Path(name)
    try:
        os.ftruncate(fd, size)
        os.close(fd)
        with Valve.open(path) as v:
            FileSystem.format(v.grant(Rights.READ | Rights.WRITE), label="scale")
        yield path
    finally:
        path.unlink(missing_ok=True)


def allocation(directory: Path, size: int, rounds: int, per_round: int) -> dict[str, float]:
    """Microseconds per allocation on a fresh volume of ``size`` bytes."""
    with sparse_volume(directory, size) as image, Valve.open(image) as v:
        fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
        store = fs.store
        t0 = time.perf_counter()
        store.alloc_data(None, 1)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        store.alloc_inode()
        first_inode = time.perf_counter() - t0
        data = meta = inode = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(per_round):
                store.alloc_data(None, 1)
            data = min(data, (time.perf_counter() - t0) / per_round)
            t0 = time.perf_counter()
            for _ in range(per_round):
                store.alloc_meta(None, InodeNo(1))
            meta = min(meta, (time.perf_counter() - t0) / per_round)
            t0 = time.perf_counter()
            for _ in range(per_round):
                store.alloc_inode()
            inode = min(inode, (time.perf_counter() - t0) / per_round)
            store.commit(durable=False)
        result = {"groups": store.blocks.ngroups, "inode_groups": store.inodes.ngroups,
                  "first_data_us": first * 1e6, "first_inode_us": first_inode * 1e6,
                  "data_us": data * 1e6, "meta_us": meta * 1e6, "inode_us": inode * 1e6}
        fs.close()
    return result


def orphan_release(directory: Path, n: int) -> dict[str, float]:
    """Seconds to release ``n`` open-unlinked files, oldest first."""
    size = max(4 * GiB, n * 4 * 16384)  # the default inode ratio: one per 16 KiB
    with sparse_volume(directory, size) as image, Valve.open(image) as v:
        fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
        inos = []
        t0 = time.perf_counter()
        for i in range(n):
            name = f"f{i}".encode()
            ino = fs.create(ROOT_INO, name, 0o644, ROOT).ino
            fs.ref(ino)
            fs.unlink(ROOT_INO, name, ROOT)
            inos.append(ino)
        fs.commit()
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        for ino in inos:
            fs.unref(ino)
        release = time.perf_counter() - t0
        fs.commit()
        assert fs.store.state.orphan_head == 0 and fs.error is None
        fs.close()
    return {"files": n, "setup_s": setup, "release_s": release,
            "per_release_us": release / n * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="64 GiB and 1 TiB, 1,000 and 5,000 orphans (a few seconds)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the sparse images go (default /var/tmp)")
    parser.add_argument("--json", type=Path, help="write every figure here as JSON")
    args = parser.parse_args(argv)
    sizes = [("64 GiB", 64 * GiB), ("1 TiB" if args.quick else "16 TiB",
                                     (1 << 40) if args.quick else TiB_16)]
    counts = [1000, 5000] if args.quick else [1000, 100_000]
    rounds, per_round = (3, 200) if args.quick else (7, 1000)
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "environment": {"python": platform.python_version(), "machine": platform.machine(),
                        "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime())},
        "allocation": {}, "orphans": {}}
    print("| volume | groups | data alloc | meta alloc | inode alloc | first alloc after mount |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, size in sizes:
        fig = allocation(args.dir, size, rounds, per_round)
        result["allocation"][label] = fig
        print(f"| {label} | {fig['groups']:,} | {fig['data_us']:.1f} us | {fig['meta_us']:.1f} us"
              f" | {fig['inode_us']:.1f} us | {fig['first_data_us'] / 1000:.1f} ms |", flush=True)
    print()
    print("| open-unlinked files | release all (oldest first) | per release |")
    print("|---:|---:|---:|")
    for n in counts:
        fig = orphan_release(args.dir, n)
        result["orphans"][str(n)] = fig
        print(f"| {n:,} | {fig['release_s']:.2f} s | {fig['per_release_us']:.0f} us |",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
