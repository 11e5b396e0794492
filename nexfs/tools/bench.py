"""``nexfs bench [--quick]``: the file-system benchmark (see docs/BENCHMARKS.md).

A thin entry point: the runner lives in the checkout's ``bench/fsbench`` package, next to
the fio job files it runs (``bench/fio``), which users also run by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def main(argv: list[str] | None = None) -> int:
    if not (BENCH_DIR / "fsbench" / "runner.py").is_file():
        print(f"nexfs bench: {BENCH_DIR}/fsbench not found; run it from a NexFS checkout",
              file=sys.stderr)
        return 1
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    from fsbench.runner import main as run

    return run(argv)
