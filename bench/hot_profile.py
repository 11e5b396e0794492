"""Where a hot 4 KiB request's time goes in the daemon: py-spy shares, CPU per request.

For one or more source trees (taking turns), on a fresh image each: mount with that tree,
lay a file down (1 MiB O_DIRECT writes), then per fio job (``--direct=1``, psync, QD1) record
the daemon with ``py-spy record -r RATE -f raw`` and read, over the job, the daemon's CPU time
(``utime + stime`` of ``/proc/PID/stat``) per request and ``nexfs stats``' per-op mean.  The
samples are put in buckets by the innermost NexFS frame of each stack:

* ``adapter`` (nexfs/fuse/ but the loop), ``fs+filedata`` (nexfs/core/), ``extents``
  (nexfs/ondisk/), ``datacache`` (datacache.py), ``datapath`` (the rest of nexfs/store/),
  ``valve+cffi`` (valve/, native/), ``fuse loop`` (nexfs/fuse/loop.py: the poll of /dev/fuse), and
  ``pyfuse3+trio`` for stacks with no NexFS frame at all (pyfuse3's receive and reply,
  trio's scheduling).

A benchmark, not a test.  Usage (root)::

    python bench/hot_profile.py --tree /work/main --tree . --file-size 32m --jobs randread-4k-qd1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mount_ab import lay_down, wait_mounted  # bench/, this script's directory

HERE = Path(__file__).resolve().parent
BUCKETS = ("adapter", "fs+filedata", "extents", "datacache", "datapath", "valve+cffi",
           "fuse loop", "pyfuse3+trio")


def _bucket(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        # py-spy names files relative to sys.path: "(nexfs/store/datacache.py:81)".
        if "nexfs/fuse/loop.py" in frame:
            return "fuse loop"
        if "valve/" in frame or "native/" in frame or "_cffi" in frame:
            return "valve+cffi"
        if "nexfs/store/datacache.py" in frame:
            return "datacache"
        if "nexfs/store/" in frame:
            return "datapath"
        if "nexfs/ondisk/" in frame:
            return "extents"
        if "nexfs/core/" in frame:
            return "fs+filedata"
        if "nexfs/fuse/" in frame:
            return "adapter"
    return "pyfuse3+trio"


def shares(raw: str) -> dict[str, float]:
    """Share of the samples per bucket, from py-spy's raw (collapsed stacks) output."""
    count: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            count[_bucket(stack)] += int(n)
    total = sum(count.values()) or 1
    return {b: round(100.0 * count[b] / total, 1) for b in BUCKETS}


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stats(mnt: Path) -> dict:
    return json.loads(os.getxattr(mnt, "user.nexfs.stats"))


def one(tree: Path, work: Path, size: str, runtime: float, jobs: list[str], rate: int,
        native: bool, warm: bool, keep: Path | None = None) -> dict[str, dict]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    img, mnt = work / "p.img", work / "mnt"
    mnt.mkdir(exist_ok=True)
    img.unlink(missing_ok=True)
    py = sys.executable
    subprocess.run([py, "-m", "nexfs.tools.mkfs", "--size", "2G", "--quiet", str(img)],
                   env=env, check=True, cwd=tree)
    with open(work / "mount.log", "w") as logf:
        proc = subprocess.Popen([py, str(tree / "mount.py"), str(img), str(mnt), "--foreground"],
                                env=env, stdout=logf, stderr=subprocess.STDOUT)
    out: dict[str, dict] = {}
    try:
        wait_mounted(proc, mnt, work / "mount.log")
        data = lay_down(mnt, size, warm)
        for job in jobs:
            op = "read" if "read" in job else "write"
            before_s = _stats(mnt)["ops"].get(op, {"count": 0, "mean_us": 0})
            cpu0 = _cpu(proc.pid)
            raw = work / f"{job}.raw"
            spy = subprocess.Popen(
                [str(Path(py).parent / "py-spy"), "record", "-r", str(rate), "-f", "raw",
                 "-o", str(raw), "-p", str(proc.pid), "--nonblocking"]
                + (["--native"] if native else []),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            fio = subprocess.run(
                ["fio", "--output-format=json", f"--filename={data}", "--direct=1",
                 str(HERE / "fio" / f"{job}.fio")],
                env=dict(os.environ, SIZE=size, RUNTIME=str(runtime)),
                check=True, capture_output=True, text=True).stdout
            cpu1 = _cpu(proc.pid)
            spy.send_signal(2)
            spy.wait(timeout=60)
            after = _stats(mnt)
            j = json.loads(fio[fio.index("{"):])["jobs"][0]
            ios = j["read"]["total_ios"] + j["write"]["total_ios"]
            iops = j["read"]["iops"] + j["write"]["iops"]
            a = after["ops"].get(op, {"count": 0})
            n = a["count"] - before_s["count"]
            mean = ((a["mean_us"] * a["count"] - (before_s["mean_us"] or 0) * before_s["count"])
                    / n if n else None)
            out[job] = {"iops": round(iops), "cpu_us_per_req": round(1e6 * (cpu1 - cpu0) / ios, 1),
                        f"{op}_mean_us": None if mean is None else round(mean, 1),
                        "data_cache": after.get("caches", {}).get("data"),
                        "shares": shares(raw.read_text()) if raw.exists() else {}}
            if keep is not None and raw.exists():
                shutil.copy(raw, keep / f"{tree.name}-{job}.raw")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(timeout=60)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, action="append", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--file-size", default="32m")
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--native", action="store_true")
    ap.add_argument("--keep", type=Path, help="copy py-spy's raw stacks into this directory")
    ap.add_argument("--warm", action="store_true",
                    help="read the file once in 4 KiB requests before the jobs")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--jobs", nargs="+", default=["randread-4k-qd1", "randwrite-4k-qd1"])
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="hot-profile-", dir=args.dir))
    try:
        for r in range(args.rounds):
            trees = args.tree if r % 2 == 0 else list(reversed(args.tree))
            for tree in trees:
                got = one(tree.resolve(), work, args.file_size, args.runtime, args.jobs,
                          args.rate, args.native, args.warm, args.keep)
                print(json.dumps({"round": r, "tree": str(tree), **got}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
