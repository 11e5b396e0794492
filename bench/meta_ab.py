"""Old against new through a real mount: the metadata workloads, alternating, with fuse2fs
and the pyfuse3 floor in the same invocation.

For a change to the metadata path (issue 11: ``tar x`` and ``rm -rf`` of the 10,000-file
tree against fuse2fs) the question is a ratio on a noisy shared machine, so every contender
is measured in the same invocation, taking turns in an order that rotates each round, each
on its own fresh 4 GiB sparse image: NexFS from the ``--old`` and the ``--new`` source tree
(``mkfs.nexfs``, then ``mount.py IMAGE MNT --foreground`` with that tree on PYTHONPATH),
fuse2fs (``mkfs.ext4``, ``fuse2fs``) and, with ``--floor``, bench/treefloor.py (a pyfuse3 tree
that only answers: what the kernel and pyfuse3 cost before any filesystem work).  In each
round and for each contender, with ``sync; echo 3 > drop_caches`` before every step: ``tar
-xf`` of bench/fsbench's tree (10,000 files in 1,111 directories), a ``find`` printing size,
mode and mtime of every entry, ``rm -rf`` of the tree, and ``--creates`` empty files created
in one directory (open(O_CREAT|O_EXCL) + close).  For NexFS the request counts of each step
come from ``nexfs stats``, and for every daemon the CPU time it used in each step (user +
system, from /proc: on a shared machine steadier than the elapsed time).  Prints every
sample, then the medians and the ratios (new/old, new/fuse2fs, old/fuse2fs); ``--json``
writes everything.  A benchmark, not a test: exits 0
whatever the figures.

    python bench/meta_ab.py --old /tmp/old-tree --new . --runs 3 --floor
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fsbench.systems import drop_caches, find_daemon, fuse_unmount, is_mounted  # noqa: E402
from fsbench.workloads import make_tree_tar  # noqa: E402

STEPS = ("tar", "find", "rm", "create")


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _wait_mounted(mnt: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while not is_mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mount failed: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.02)  # polling for the mount to appear, not synchronising


@contextlib.contextmanager
def nexfs(tree: Path, work: Path) -> Iterator[tuple[Path, int | None]]:
    img, mnt, log = work / "nexfs.img", work / "mnt", work / "mount.log"
    img.unlink(missing_ok=True)
    with open(img, "wb") as f:
        f.truncate(4 << 30)
    mnt.mkdir(exist_ok=True)
    py = sys.executable
    subprocess.run([py, "-m", "nexfs.tools.mkfs", "--quiet", "--force", str(img)],
                   env=_env(tree), check=True, cwd=tree)
    with open(log, "wb") as logf:
        proc = subprocess.Popen([py, str(tree / "mount.py"), str(img), str(mnt), "--foreground"],
                                env=_env(tree), stdout=logf, stderr=subprocess.STDOUT,
                                cwd=tree)
    try:
        _wait_mounted(mnt, proc, log)
        yield mnt, proc.pid
    finally:
        fuse_unmount(mnt, proc.pid)
        proc.wait(timeout=120)
        img.unlink(missing_ok=True)


@contextlib.contextmanager
def fuse2fs(work: Path) -> Iterator[tuple[Path, int | None]]:
    img, mnt = work / "ext4.img", work / "mnt"
    with open(img, "wb") as f:
        f.truncate(4 << 30)
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    subprocess.run(["fuse2fs", str(img), str(mnt)], check=True)
    try:
        yield mnt, find_daemon(img, "fuse2fs")
    finally:
        # fuse2fs writes back and exits after the unmount: wait for its daemon.
        fuse_unmount(mnt, find_daemon(img, "fuse2fs"))
        img.unlink(missing_ok=True)


@contextlib.contextmanager
def floor(work: Path) -> Iterator[tuple[Path, int | None]]:
    mnt, log = work / "mnt", work / "floor.log"
    mnt.mkdir(exist_ok=True)
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, str(HERE / "treefloor.py"), str(mnt)],
                                stdout=logf, stderr=subprocess.STDOUT)
    try:
        _wait_mounted(mnt, proc, log)
        yield mnt, proc.pid
    finally:
        fuse_unmount(mnt, proc.pid)
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=60)


def _ops(mnt: Path, tree: Path) -> dict[str, tuple[int, float]]:
    """Each request type's count and total handler time (us) so far (``nexfs stats``)."""
    proc = subprocess.run([sys.executable, "-m", "nexfs.tools.cli", "stats", "--json",
                           str(mnt)], env=_env(tree), cwd=tree, capture_output=True,
                          text=True, check=True)
    return {k: (v["count"], v["count"] * (v["mean_us"] or 0.0))
            for k, v in json.loads(proc.stdout)["ops"].items()}


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def _creates(directory: Path, count: int) -> float:
    directory.mkdir()
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    path = os.fspath(directory)
    start = time.perf_counter()
    for i in range(count):
        os.close(os.open(f"{path}/file-{i:07d}", flags, 0o644))
    return time.perf_counter() - start


def _cpu(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) the daemon ``pid`` has used so far."""
    if pid is None:
        return float("nan")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(mnt: Path, pid: int | None, tarball: Path, creates: int, tree: Path | None
              ) -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, int]],
                         dict[str, dict[str, float]]]:
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    counts: dict[str, dict[str, int]] = {}
    op_us: dict[str, dict[str, float]] = {}  # mean handler time of each request type
    commands = {
        "tar": ["tar", "-xf", str(tarball), "-C", str(mnt)],
        "find": ["find", str(mnt / "tree"), "-printf", "%s %m %T@\\n"],
        "rm": ["rm", "-rf", str(mnt / "tree")],
    }
    for step in STEPS:
        drop_caches()
        before = _ops(mnt, tree) if tree is not None else {}
        cpu_before = _cpu(pid)
        if step == "create":
            times[step] = _creates(mnt / "many", creates)
        else:
            with open(os.devnull, "w") as devnull:
                start = time.perf_counter()
                subprocess.run(commands[step], check=True, stdout=devnull)
                times[step] = time.perf_counter() - start
        cpu[step] = _cpu(pid) - cpu_before
        if tree is not None:
            after = _ops(mnt, tree)
            counts[step], op_us[step] = {}, {}
            for k, (n, total) in after.items():
                n0, total0 = before.get(k, (0, 0.0))
                if n - n0:
                    counts[step][k] = n - n0
                    op_us[step][k] = round((total - total0) / (n - n0), 2)
    return times, cpu, counts, op_us


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="source tree of the old code")
    parser.add_argument("--new", type=Path, default=Path("."), help="source tree of the new code")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--files", type=int, default=10_000, help="files in the tar tree")
    parser.add_argument("--creates", type=int, default=10_000,
                        help="empty files created in one directory")
    parser.add_argument("--no-fuse2fs", action="store_true", help="leave fuse2fs out")
    parser.add_argument("--floor", action="store_true",
                        help="add bench/treefloor.py (the pyfuse3 floor)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the images go (disk-backed)")
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("meta_ab.py needs root (mounts, drop_caches)", file=sys.stderr)
        return 2
    contenders = ["old", "new"] + ([] if args.no_fuse2fs else ["fuse2fs"]) + (
        ["floor"] if args.floor else [])
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    samples: dict[str, dict[str, list[float]]] = {c: {s: [] for s in STEPS} for c in contenders}
    cpu_samples: dict[str, dict[str, list[float]]] = {c: {s: [] for s in STEPS}
                                                      for c in contenders}
    requests: dict[str, list[dict[str, dict[str, int]]]] = {"old": [], "new": []}
    per_op: dict[str, list[dict[str, dict[str, float]]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="meta-ab-") as tmp:
        work = Path(tmp)
        tarball = work / "tree.tar"
        make_tree_tar(tarball, args.files)
        for r in range(args.runs):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for who in order:
                if who in trees:
                    ctx: contextlib.AbstractContextManager[tuple[Path, int | None]] = nexfs(
                        trees[who], work)
                elif who == "fuse2fs":
                    ctx = fuse2fs(work)
                else:
                    ctx = floor(work)
                with ctx as (mnt, pid):
                    times, cpu, counts, op_us = one_round(mnt, pid, tarball, args.creates,
                                                          trees.get(who))
                for step, value in times.items():
                    samples[who][step].append(value)
                    cpu_samples[who][step].append(cpu[step])
                if who in trees:
                    requests[who].append(counts)
                    per_op[who].append(op_us)
                print(f"round {r + 1} {who:8}",
                      "  ".join(f"{s} {times[s]:6.2f} s (daemon cpu {cpu[s]:5.2f})"
                                for s in STEPS), flush=True)
    med = {c: {s: statistics.median(v) for s, v in steps.items()} for c, steps in samples.items()}
    cpu_med = {c: {s: statistics.median(v) for s, v in steps.items()}
               for c, steps in cpu_samples.items()}
    print("\nmedians (s)      " + "".join(f"{s:>9}" for s in STEPS)
          + "   daemon cpu " + "".join(f"{s:>9}" for s in STEPS))
    for c in contenders:
        print(f"{c:16} " + "".join(f"{med[c][s]:9.2f}" for s in STEPS) + " " * 13
              + "".join(f"{cpu_med[c][s]:9.2f}" for s in STEPS))
    pairs = [("new", "old")] + ([("new", "fuse2fs"), ("old", "fuse2fs")]
                                if "fuse2fs" in contenders else [])
    pairs += [("floor", "fuse2fs")] if "floor" in contenders and "fuse2fs" in contenders else []
    for a, b in pairs:
        print(f"{a + '/' + b:16} " + "".join(f"{med[a][s] / med[b][s]:9.2f}" for s in STEPS))
    for who in trees:
        if requests[who]:
            last = requests[who][-1]
            print(f"requests ({who}): " + "; ".join(
                f"{s} {sum(last[s].values())}" for s in STEPS if s in last))
    for step in ("tar", "rm"):
        for who in trees:
            if not per_op[who] or step not in per_op[who][-1]:
                continue
            last_n, rounds = requests[who][-1][step], [r[step] for r in per_op[who]]
            top = sorted(last_n, key=lambda k: -last_n[k] * rounds[-1][k])[:6]
            print(f"{step} per request ({who}, median of rounds): " + "; ".join(
                f"{k} {last_n[k]} x {statistics.median(r.get(k, 0.0) for r in rounds):.1f} us"
                for k in top))
    if args.json:
        doc: dict[str, Any] = {"samples": samples, "medians": med, "requests": requests,
                               "per_op_us": per_op,
                               "daemon_cpu": cpu_samples, "daemon_cpu_medians": cpu_med,
                               "runs": args.runs, "files": args.files, "creates": args.creates}
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
