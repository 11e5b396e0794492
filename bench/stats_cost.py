"""What counting a request for ``nexfs stats`` costs: the adapter's wrapper with and without.

``python bench/stats_cost.py`` times a do-nothing handler wrapped by the FUSE adapter's own
wrapper (``nexfs.fuse.adapter._handler``, which counts and times every request) and by the same
wrapper without the statistics, driving the coroutines by hand (no trio, no kernel), and
prints the medians of seven rounds in ns per request.  The difference is the whole cost of
the statistics on the hot path (docs/BENCHMARKS.md, "Live statistics").
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pyfuse3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nexfs.fuse.adapter import _handler
from nexfs.fuse.stats import Stats


def _uncounted(fn: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, Any]]:
    """The wrapper as it was before the statistics (errno translation only)."""

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any) -> Any:
        if self.debug:
            pass
        try:
            result = fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            raise pyfuse3.FUSEError(5) from None
        if self.debug:
            pass
        return result

    return wrapper


class _Ops:
    debug = False

    def __init__(self) -> None:
        self.stats = Stats()

    @_uncounted
    def bare(self, ino: int) -> int:
        return ino

    @_handler
    def getattr(self, ino: int) -> int:
        return ino


def _ns_per_call(method: Callable[[int], Coroutine[Any, Any, Any]], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        coro = method(i)
        try:
            coro.send(None)
        except StopIteration:
            pass
    return (time.perf_counter() - start) / n * 1e9


def main() -> int:
    ops = _Ops()
    bare, counted = [], []
    for _ in range(7):
        bare.append(_ns_per_call(ops.bare, 200_000))
        counted.append(_ns_per_call(ops.getattr, 200_000))
    b, c = statistics.median(bare), statistics.median(counted)
    print(f"wrapper without statistics: {b:.0f} ns/request; with: {c:.0f} ns/request; "
          f"counting costs {c - b:.0f} ns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
