"""In-process cost of the per-file operations of a small-file ``tar x`` and ``rm -rf``.

A loop over ``FileSystem`` on an image file (no mount, no kernel): in one directory, N times
create + one write of SIZE bytes + setattr(atime, mtime), each file keeping a reference as
the kernel's lookup does; then N unlinks, each followed by the unref that frees the inode
(the FORGET). Prints the wall time per operation in microseconds, the best of REPS passes
after a warm-up pass, for the source tree given (run it once per tree, old and new taking
turns: docs/BENCHMARKS.md, "Per-request cost of tar x and rm -rf", round 4)::

    python bench/meta_inproc.py --tree /path/to/old; python bench/meta_inproc.py --tree .

``--profile tottime`` (or ``cumulative``) prints a cProfile of one pass instead.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _run(fs: Any, tag: bytes, n: int, data: bytes, root: Any, setattr_cls: Any,
         root_ino: int) -> dict[str, float]:
    d = fs.mkdir(root_ino, tag, 0o755, root).ino
    fs.ref(d)
    t = {"create": 0.0, "write": 0.0, "setattr": 0.0, "unlink": 0.0, "forget": 0.0}
    made: list[tuple[bytes, int]] = []
    c = time.perf_counter
    stamp = 1_600_000_000_000_000_000
    for i in range(n):
        name = b"f%05d" % i
        a = c()
        at = fs.create(d, name, 0o644, root)
        fs.ref(at.ino)
        b = c()
        t["create"] += b - a
        fs.write(at.ino, 0, data, root)
        a = c()
        t["write"] += a - b
        fs.setattr(at.ino, setattr_cls(atime_ns=stamp, mtime_ns=stamp), root)
        t["setattr"] += c() - a
        made.append((name, at.ino))
    fs.commit(durable=False)
    for name, ino in made:
        a = c()
        fs.unlink(d, name, root)
        b = c()
        fs.unref(ino)
        t["unlink"] += b - a
        t["forget"] += c() - b
    fs.commit(durable=False)
    return {k: v / n * 1e6 for k, v in t.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", default=".", help="source tree whose nexfs is measured")
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1500, help="bytes written per file")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", choices=["tottime", "cumulative"], default=None)
    args = ap.parse_args(argv)
    tree = os.path.abspath(args.tree)
    sys.path[:0] = [tree, os.path.join(tree, "tests")]
    from fsutil import ROOT, make_image, mounted  # the measured tree's own helpers

    from nexfs.core.attr import SetAttr
    from nexfs.core.fs import ROOT_INO

    data = b"x" * args.size
    with tempfile.TemporaryDirectory() as td:
        img = make_image(Path(td) / "v.img", 256 << 20)
        with mounted(img) as fs:
            _run(fs, b"warm", args.files, data, ROOT, SetAttr, ROOT_INO)
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                _run(fs, b"prof", args.files, data, ROOT, SetAttr, ROOT_INO)
                prof.disable()
                pstats.Stats(prof).sort_stats(args.profile).print_stats(45)
                return 0
            best: dict[str, float] = {}
            for k in range(args.reps):
                r = _run(fs, b"r%d" % k, args.files, data, ROOT, SetAttr, ROOT_INO)
                best = r if not best else {x: min(best[x], r[x]) for x in r}
    print(tree, " ".join(f"{k}={v:.1f}" for k, v in best.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
