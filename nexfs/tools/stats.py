"""``nexfs stats MOUNTPOINT [--json] [--watch [SECONDS]]``: a mounted volume's live counters.

Reads the virtual xattr ``user.nexfs.stats`` of the mount's root directory (nexfs/fuse/stats.py
says why an xattr) and prints it: per FUSE operation the request count, errors and latency
percentiles; cache hit rates; the valve's traffic; commits, checkpoints and journal fill;
requests in flight.  ``--json`` prints the daemon's document as it is.  ``--watch`` prints
again every SECONDS (default 2) what happened in that interval: requests per second and
the interval's own percentiles (from the difference of the histograms), until Ctrl-C or
``--count`` reports.

Exit status: 0 done, 1 the mountpoint is not a mounted NexFS volume (or cannot be read),
2 bad arguments.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from typing import Any

from nexfs.fuse.stats import PERCENTILES, STATS_XATTR, percentile

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class StatsError(Exception):
    """Why the statistics could not be read: one line for the user."""


def read_stats(mountpoint: str) -> dict[str, Any]:
    """The daemon's statistics document of the volume mounted on ``mountpoint``."""
    try:
        raw = os.getxattr(mountpoint, STATS_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise StatsError(f"{mountpoint}: not the root of a mounted NexFS volume (or its "
                             "daemon predates nexfs stats)") from None
        raise StatsError(f"{mountpoint}: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise StatsError(f"{mountpoint}: the statistics are not JSON") from None
    if not isinstance(doc, dict) or "ops" not in doc:
        raise StatsError(f"{mountpoint}: not a NexFS statistics document")
    return doc


def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def _hist(op: dict[str, Any]) -> dict[int, int]:
    return {int(k): int(v) for k, v in op.get("hist", {}).items()}


def _ops_table(ops: dict[str, dict[str, Any]], seconds: float | None) -> list[str]:
    """One line per operation; ``seconds`` set: an interval (rates instead of totals)."""
    head = "requests/s" if seconds else "requests"
    cols = " ".join(f"{'p' + str(p) + ' µs':>9}" for p in PERCENTILES)
    lines = [f"{'operation':<12} {head:>11} {'errors':>8} {'mean µs':>9} {cols} {'max µs':>9}"]
    for name, op in sorted(ops.items(), key=lambda kv: -kv[1]["count"]):
        count = op["count"] / seconds if seconds else op["count"]
        pcts = " ".join(f"{_us(op.get(f'p{p}_us')):>9}" for p in PERCENTILES)
        max_us = "" if seconds else _us(op.get("max_us"))
        lines.append(f"{name:<12} {count:>11,.0f} {op['errors']:>8,} "
                     f"{_us(op.get('mean_us')):>9} {pcts} {max_us:>9}")
    return lines


def _rest(doc: dict[str, Any]) -> list[str]:
    lines = []
    req = doc.get("requests", {})
    lines.append(f"requests in flight: {req.get('in_flight', '-')} "
                 f"(most at once: {req.get('in_flight_max', '-')})")
    for name, cache in doc.get("caches", {}).items():
        lines.append(f"{name} cache: hit rate {_pct(cache.get('hit_rate'))} "
                     f"({cache.get('hits', 0):,} hits, {cache.get('misses', 0):,} misses), "
                     f"{cache.get('blocks', 0):,} of {cache.get('capacity', 0):,} blocks")
        if "short_reads" in cache:  # the data cache's short path (one call into C)
            lines[-1] += (f"; short path: {cache['short_reads']:,} reads, "
                          f"{cache.get('short_writes', 0):,} writes")
    valve = doc.get("valve")
    if valve:
        lines.append(f"valve: {valve['reads']:,} reads ({valve['bytes_read'] / 2**20:,.1f} MiB), "
                     f"{valve['writes']:,} writes ({valve['bytes_written'] / 2**20:,.1f} MiB), "
                     f"{valve['bounce_copies']:,} bounce copies, {valve['barriers']:,} "
                     f"barriers, {valve['denials']:,} denials")
    journal = doc.get("journal")
    if journal:
        lines.append(f"journal: {journal['commits']:,} commits, {journal['checkpoints']:,} "
                     f"checkpoints, {_pct(journal['fill'])} full "
                     f"({journal['used_blocks']:,} of {journal['blocks']:,} blocks)")
    return lines


def render(doc: dict[str, Any]) -> str:
    """The whole document for a terminal."""
    lines = [f"NexFS statistics, {doc.get('uptime_s', 0):,.0f} s since mount", ""]
    lines += _ops_table(doc["ops"], None)
    lines += ["", *_rest(doc)]
    return "\n".join(lines) + "\n"


def interval(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per operation, what happened between two documents: counts, errors and the
    interval's own mean and percentiles."""
    out: dict[str, dict[str, Any]] = {}
    for name, op in after["ops"].items():
        old = before["ops"].get(name, {})
        count = op["count"] - old.get("count", 0)
        if count <= 0:
            continue
        old_hist = _hist(old)
        hist = {i: n - old_hist.get(i, 0) for i, n in _hist(op).items()}
        hist = {i: n for i, n in hist.items() if n > 0}
        mean = None
        if op.get("mean_us") is not None:
            total = op["mean_us"] * op["count"] - (old.get("mean_us") or 0) * old.get("count", 0)
            mean = max(0.0, total / count)
        entry: dict[str, Any] = {"count": count, "errors": op["errors"] - old.get("errors", 0),
                                 "mean_us": mean}
        for pct in PERCENTILES:
            value = percentile(hist, pct)
            entry[f"p{pct}_us"] = None if value is None else value / 1000
        out[name] = entry
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nexfs stats",
        description="Show the live statistics of a mounted NexFS volume: requests and "
                    "latency per FUSE operation, cache hit rates, device traffic, journal "
                    "activity. Any user who can read the mount's root directory may ask.")
    parser.add_argument("mountpoint", help="where the volume is mounted")
    parser.add_argument("--json", action="store_true",
                        help="print the daemon's JSON document (with --watch: one document "
                             "per line)")
    parser.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                        help="print what happened in every interval of SECONDS (default 2) "
                             "until interrupted")
    parser.add_argument("--count", type=int, metavar="N",
                        help="with --watch: stop after N intervals")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.watch is not None and not args.watch > 0:
        parser.error("--watch needs a positive number of seconds")
    if args.count is not None and (args.count < 1 or args.watch is None):
        parser.error("--count needs --watch and a positive number")
    try:
        doc = read_stats(args.mountpoint)
        if args.watch is None:
            print(json.dumps(doc, indent=2) if args.json else render(doc), end="\n"
                  if args.json else "")
            return EXIT_OK
        return _watch(args, doc)
    except StatsError as exc:
        print(f"nexfs stats: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_OK


def _watch(args: argparse.Namespace, doc: dict[str, Any]) -> int:
    done = 0
    last, last_t = doc, time.monotonic()
    while args.count is None or done < args.count:
        time.sleep(args.watch)  # the interval the user asked for, not synchronisation
        doc, now = read_stats(args.mountpoint), time.monotonic()
        seconds = now - last_t
        if args.json:
            print(json.dumps(doc), flush=True)
        else:
            lines = [f"--- {time.strftime('%H:%M:%S')}, last {seconds:.1f} s"]
            lines += _ops_table(interval(last, doc), seconds)
            lines += _rest(doc)
            print("\n".join(lines), flush=True)
        last, last_t = doc, now
        done += 1
    return EXIT_OK
