"""Asynchronous valve transfers under trio: which engine, and what one request costs.

The question behind ``Valve.ring``'s default engine (docs/VALVE.md, *Asynchronous
transfers*): a trio task wants a 4 KiB O_DIRECT read without blocking the loop.  Four
ways, each run for a fixed time on one image filled with random data, in turns that
rotate between runs (the machine is shared), medians reported:

* ``blocking``: ``cap.block_read(into=buf)`` on the loop thread (today's data path; it
  blocks the loop for the whole transfer);
* ``to_thread``: the same call through ``trio.to_thread.run_sync`` (a thread hop per
  request);
* ``ring-io_uring`` / ``ring-pool``: ``cap.block_read(..., ring=r)``, then
  ``await trio.lowlevel.wait_readable(r)`` and ``r.reap()``.

Each at queue depth 1 (one task) and 4 (four tasks, or four requests kept in flight on
the ring).  Prints IOPS per method; ``--json`` writes every sample.  A benchmark, not a
test: it exits 0 whatever the figures.

With ``--nbd`` the image is served by nbdkit's file plugin on a Unix socket (``cache=none``)
and the valve opens its URI: no io_uring there; ``ring-callbacks`` is the export's ring
driven by libnbd's completion callbacks, ``ring-pool`` the pool whose workers each keep one
request on the wire, with 4 and with 8 workers.

    python bench/ring_bench.py              # 5 runs x 2 s, 256 MiB image in /var/tmp
    python bench/ring_bench.py --quick      # 2 runs x 0.3 s, 32 MiB image
    python bench/ring_bench.py --nbd        # the same over an NBD export
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbdserve import served  # bench/, this script's directory
from valve_bench import make_image

from valve import AlignedBuffer, Capability, Rights, Ring, Valve

MiB = 1024 * 1024
BLOCK = 4096


def _blocks(cap: Capability) -> int:
    return cap.block_info().total_sectors * cap.block_info().sector_size // BLOCK


async def _jobs(cap: Capability, jobs: int, secs: float,
                read: Callable[[int, int, AlignedBuffer], Awaitable[None]]) -> float:
    """Reads per second of ``jobs`` trio tasks, each doing ``read(lba, count, buf)`` of a
    random block in a loop for ``secs``."""
    spb = BLOCK // cap.block_info().sector_size
    nblocks = _blocks(cap)
    count = 0

    async def one() -> None:
        nonlocal count
        buf = cap.alloc_buffer(BLOCK)
        rnd = random.Random()
        deadline = time.perf_counter() + secs
        while time.perf_counter() < deadline:
            await read(rnd.randrange(nblocks) * spb, spb, buf)
            count += 1

    t0 = time.perf_counter()
    async with trio.open_nursery() as n:
        for _ in range(jobs):
            n.start_soon(one)
    return count / (time.perf_counter() - t0)


async def run_blocking(cap: Capability, ring: Ring | None, jobs: int, secs: float) -> float:
    async def read(lba: int, count: int, buf: AlignedBuffer) -> None:
        cap.block_read(lba, count, buf)
        await trio.lowlevel.checkpoint()

    return await _jobs(cap, jobs, secs, read)


async def run_to_thread(cap: Capability, ring: Ring | None, jobs: int, secs: float) -> float:
    async def read(lba: int, count: int, buf: AlignedBuffer) -> None:
        await trio.to_thread.run_sync(cap.block_read, lba, count, buf)

    return await _jobs(cap, jobs, secs, read)


async def run_ring(cap: Capability, ring: Ring | None, jobs: int, secs: float) -> float:
    """Keep ``jobs`` reads in flight on the ring; one loop submits and reaps."""
    assert ring is not None
    spb = BLOCK // cap.block_info().sector_size
    nblocks = _blocks(cap)
    rnd = random.Random()
    bufs: list[AlignedBuffer] = [cap.alloc_buffer(BLOCK) for _ in range(jobs)]
    by_tag: dict[int, AlignedBuffer] = {}
    count = 0
    t0 = time.perf_counter()
    deadline = t0 + secs
    for buf in bufs:
        by_tag[cap.block_read(rnd.randrange(nblocks) * spb, spb, buf, ring=ring)] = buf
    while by_tag:
        await trio.lowlevel.wait_readable(ring.fileno())
        for c in ring.reap():
            buf = by_tag.pop(c.tag)
            assert c.error is None, c.error
            count += 1
            if time.perf_counter() < deadline:
                by_tag[cap.block_read(rnd.randrange(nblocks) * spb, spb, buf, ring=ring)] = buf
    return count / (time.perf_counter() - t0)


METHODS: dict[str, Callable[[Capability, Ring | None, int, float], Awaitable[float]]] = {
    "blocking": run_blocking,
    "to_thread": run_to_thread,
    "ring-io_uring": run_ring,
    "ring-pool": run_ring,
}
#: Over an NBD export: no io_uring; libnbd's completion callbacks, and the pool with 4 and 8
#: workers.
NBD_METHODS = {"blocking": run_blocking, "to_thread": run_to_thread,
               "ring-callbacks": run_ring, "ring-pool": run_ring, "ring-pool-8": run_ring}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 runs x 0.3 s, 32 MiB image")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--dir", default="/var/tmp", help="where the image goes (disk-backed)")
    ap.add_argument("--json", help="write every sample here")
    ap.add_argument("--nbd", action="store_true", help="through nbdkit on a Unix socket")
    args = ap.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)
    secs = args.seconds or (0.3 if args.quick else 2.0)
    size = (32 if args.quick else 256) * MiB
    tmp = Path(tempfile.mkdtemp(prefix="ring-bench-", dir=args.dir))
    samples: dict[str, list[float]] = {}
    cpu_us: dict[str, list[float]] = {}
    try:
        img = tmp / "ring.img"
        make_image(img, size)
        methods = NBD_METHODS if args.nbd else METHODS
        target_of = (served(img, img.with_suffix(".sock")) if args.nbd
                     else contextlib.nullcontext(str(img)))
        with target_of as target, Valve.open(target, read_only=True) as v:
            cap = v.grant(Rights.READ)
            rings = {"ring-pool": v.ring(8, engine="pool", threads=4)}
            if args.nbd:
                rings["ring-pool-8"] = v.ring(8, engine="pool", threads=8)
                rings["ring-callbacks"] = v.ring(8, engine="callbacks")
            else:
                rings["ring-io_uring"] = v.ring(8, engine="io_uring")
            order = list(methods)
            for run in range(runs):
                rot = order[run % len(order):] + order[: run % len(order)]
                for jobs in (1, 4):
                    for name in rot:
                        fn = methods[name]
                        cpu0, t0 = time.process_time(), time.perf_counter()
                        iops = trio.run(fn, cap, rings.get(name), jobs, secs)
                        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
                        samples.setdefault(f"{name} qd{jobs}", []).append(iops)
                        # CPU of the whole process (all threads) per request, in µs
                        cpu_us.setdefault(f"{name} qd{jobs}", []).append(
                            cpu / max(1.0, iops * wall) * 1e6
                        )
            for r in rings.values():
                r.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    where = "an NBD export (nbdkit file, Unix socket)" if args.nbd else "an image file"
    print(f"4 KiB random O_DIRECT reads of {where} under trio, {runs} runs x {secs} s, "
          "medians:")
    print(f"  {'method':20s} {'IOPS':>9s} {'CPU µs/req':>11s}   IOPS samples")
    for key, vals in samples.items():
        cpu = statistics.median(cpu_us[key])
        iops = statistics.median(vals)
        print(f"  {key:20s} {iops:9.0f} {cpu:11.1f}   {[round(x) for x in vals]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"iops": samples, "cpu_us": cpu_us}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
