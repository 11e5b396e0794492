"""Old against new through a real mount: fio 4 KiB random jobs with O_DIRECT, alternating.

For a change to the request path the question is a ratio on a noisy shared machine, so
both source trees are measured in the same invocation, taking turns (old, new, new, old,
...), each on its own freshly made image: ``mkfs.nexfs``, ``mount.py IMAGE MNT
--foreground`` with that tree on PYTHONPATH, a 256 MiB file laid down with a sequential
O_DIRECT write, then the jobs of ``bench/fio`` (psync, ``--direct=1``): randread QD1 and
4 jobs, randwrite QD1 and 4 jobs.  Prints the medians and new/old per job; ``--json``
writes every sample.  A benchmark, not a test: exits 0 whatever the figures.

With ``--nbd`` the volume is an NBD export instead: nbdkit's file plugin serves the image on
a Unix socket (``cache=none``, as bench/fsbench's ``nbd`` system), formatted and mounted
through its URI.

    python bench/mount_ab.py --old /tmp/old-tree --new . --runs 5 --runtime 5
    python bench/mount_ab.py --old /tmp/old-tree --nbd --jobs randread-4k-qd1 randread-4k-4jobs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from nbdserve import served  # bench/, this script's directory

HERE = Path(__file__).resolve().parent
JOBS = ("randread-4k-qd1", "randread-4k-4jobs", "randwrite-4k-qd1", "randwrite-4k-4jobs")
EXTRA_JOBS = ("seq-read-1m", "seq-write-1m")
"""Also runnable with ``--jobs`` (not by default)."""


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _mounted(mnt: Path) -> bool:
    with open("/proc/mounts", encoding="utf-8") as f:
        return any(line.split()[1] == str(mnt) for line in f)


def wait_mounted(proc: subprocess.Popen[bytes], mnt: Path, log: Path) -> None:
    """Wait (30 s at most) until the daemon ``proc`` has mounted ``mnt``; ``log`` is its
    output, quoted when it fails."""
    deadline = time.monotonic() + 30
    while not _mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mount failed: {log.read_text()[-2000:]}")
        time.sleep(0.05)


def lay_down(mnt: Path, size: str, warm: bool) -> Path:
    """Write the benchmark file on the mount ``mnt`` with 1 MiB O_DIRECT writes; ``warm``:
    then read it once in 4 KiB requests.  Returns its path."""
    data = mnt / "fio-bench.dat"
    subprocess.run(["fio", "--name=fill", f"--filename={data}", f"--size={size}",
                    "--rw=write", "--bs=1m", "--direct=1", "--ioengine=psync",
                    "--end_fsync=1"], check=True, capture_output=True)
    if warm:
        # The 1 MiB writes bypass the data cache: one pass of 4 KiB reads puts a file
        # smaller than the cache in it (the "hot" figures).
        subprocess.run(["fio", "--name=warm", f"--filename={data}", f"--size={size}",
                        "--rw=read", "--bs=4k", "--direct=1", "--ioengine=psync"],
                       check=True, capture_output=True)
    return data


def _fio(job: str, filename: Path, size: str, runtime: float) -> float:
    env = dict(os.environ, SIZE=size, RUNTIME=str(runtime))
    out = subprocess.run(
        ["fio", "--output-format=json", f"--filename={filename}", "--direct=1",
         str(HERE / "fio" / f"{job}.fio")],
        env=env, check=True, capture_output=True, text=True,
    ).stdout
    job_out = json.loads(out[out.index("{"):])["jobs"][0]
    return float(job_out["read"]["iops"] + job_out["write"]["iops"])


@contextlib.contextmanager
def _volume(tree: Path, work: Path, nbd: bool) -> Iterator[str]:
    """A fresh 2 GiB volume made with ``tree``'s mkfs: the image's path, or with ``nbd`` the
    URI of nbdkit serving it (stopped afterwards)."""
    img = work / "ab.img"
    img.unlink(missing_ok=True)
    py = sys.executable
    if not nbd:
        subprocess.run([py, "-m", "nexfs.tools.mkfs", "--size", "2G", "--quiet", str(img)],
                       env=_env(tree), check=True, cwd=tree)
        yield str(img)
        return
    with open(img, "wb") as f:
        f.truncate(2 << 30)
    with served(img, work / "nbd.sock") as uri:
        # A short multi-mount protection interval: each mount's claim then takes ~1.4 s.
        subprocess.run([py, "-m", "nexfs.tools.mkfs", "--quiet", "--mmp-interval", "0.2", uri],
                       env=_env(tree), check=True, cwd=tree)
        yield uri


def one_round(tree: Path, work: Path, size: str, runtime: float, nbd: bool = False,
              jobs: Sequence[str] = JOBS, warm: bool = False) -> dict[str, float]:
    mnt, log = work / "mnt", work / "mount.log"
    mnt.mkdir(exist_ok=True)
    with _volume(tree, work, nbd) as volume:
        return _measure(tree, volume, mnt, log, size, runtime, jobs, warm)


def _measure(tree: Path, volume: str, mnt: Path, log: Path, size: str, runtime: float,
             jobs: Sequence[str], warm: bool = False) -> dict[str, float]:
    py = sys.executable
    with open(log, "w") as logf:
        proc = subprocess.Popen([py, str(tree / "mount.py"), volume, str(mnt), "--foreground"],
                                env=_env(tree), stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_mounted(proc, mnt, log)
        data = lay_down(mnt, size, warm)
        return {job: _fio(job, data, size, runtime) for job in jobs}
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="source tree of the old code")
    ap.add_argument("--new", type=Path, default=HERE.parent, help="source tree of the new code")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--size", default="256m")
    ap.add_argument("--dir", default="/var/tmp", help="where the images go (disk-backed)")
    ap.add_argument("--json", help="write every sample here")
    ap.add_argument("--nbd", action="store_true",
                    help="the volume is an NBD export (nbdkit file plugin, Unix socket)")
    ap.add_argument("--jobs", nargs="+", choices=JOBS + EXTRA_JOBS, default=list(JOBS),
                    help="the fio jobs to run (default: the four random ones)")
    ap.add_argument("--warm", action="store_true",
                    help="read the file once in 4 KiB requests before the jobs (hot figures: "
                         "use a --size below the data cache's 64 MiB)")
    args = ap.parse_args(argv)
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    jobs: list[str] = args.jobs
    samples: dict[str, dict[str, list[float]]] = {k: {j: [] for j in jobs} for k in trees}
    work = Path(tempfile.mkdtemp(prefix="mount-ab-", dir=args.dir))
    try:
        for run in range(args.runs):
            order = ("old", "new") if run % 2 == 0 else ("new", "old")
            for name in order:
                got = one_round(trees[name], work, args.size, args.runtime, args.nbd, jobs,
                                args.warm)
                for job, iops in got.items():
                    samples[name][job].append(iops)
                print(f"run {run} {name}: " + ", ".join(f"{j} {v:.0f}" for j, v in got.items()),
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    where = "an NBD export" if args.nbd else "an image file"
    print(f"\nmedians of {args.runs} runs, {args.runtime} s per job, IOPS (--direct=1, psync), "
          f"NexFS on {where}:")
    for job in jobs:
        old = statistics.median(samples["old"][job])
        new = statistics.median(samples["new"][job])
        print(f"  {job:22s} old {old:8.0f}  new {new:8.0f}  new/old {new / old:5.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(samples, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
