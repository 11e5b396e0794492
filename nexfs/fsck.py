"""fsck.nexfs: check and repair a NexFS volume.

Exit codes, as e2fsck: 0 no errors; 1 errors were found and corrected; 4 errors were left
uncorrected; 8 operational error (cannot open the target, not a NexFS volume, in use).
"""

from __future__ import annotations

import argparse
import sys
import time

from .checker import Scan, scan
from .layout import STATE_CLEAN, STATE_ERROR, NotNexfsError
from .repair import Repairer, fix_counts
from .store import Store
from .tool import UsageError, open_device, run_tool
from .types import CorruptionError, FsError

PROG = "fsck.nexfs"
EXIT_OK, EXIT_FIXED, EXIT_UNCORRECTED, EXIT_ERROR = 0, 1, 4, 8
MAX_SHOWN = 50


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check a NexFS volume: both superblocks, every checksum, extents, "
        "free-space accounting, link counts, directory indexes, tree connectivity and "
        "orphaned inodes.",
        epilog="exit status: 0 clean, 1 errors corrected, 4 errors left uncorrected, "
        "8 operational error",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-n", "--no", action="store_true",
                      help="open read-only and answer 'no' to every repair (the default)")
    mode.add_argument("-y", "--yes", action="store_true", help="repair everything found")
    mode.add_argument("-p", "--preen", action="store_true", help="repair automatically (as -y)")
    parser.add_argument("-f", "--force", action="store_true",
                        help="check even if the volume is marked clean")
    parser.add_argument("-v", "--verbose", action="store_true", help="say more")
    parser.add_argument("target", metavar="TARGET", help="image file or block device")
    return parser


class Report:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.shown = 0

    def say(self, message: str) -> None:
        print(message)

    def problems(self, found: Scan) -> None:
        for line in found.problems[:MAX_SHOWN]:
            print(f"  {line}")
        if len(found.problems) > MAX_SHOWN:
            print(f"  ... and {len(found.problems) - MAX_SHOWN} more")


def _summary(store: Store) -> str:
    st = store.state
    g = store.geo
    label = store.sb.label or store.sb.uuid.hex()
    return (f"{label}: {g.ninodes - st.free_inodes}/{g.ninodes} files, "
            f"{g.nblocks - st.free_blocks}/{g.nblocks} blocks")


def _open(dev: object, *, read_only: bool) -> Store:
    try:
        return Store.open(dev, read_only=read_only, ignore_error=True)  # type: ignore[arg-type]
    except NotNexfsError as exc:
        raise UsageError(f"{exc}", EXIT_ERROR) from None
    except CorruptionError as exc:
        raise UsageError(f"cannot open the volume: {exc}", EXIT_UNCORRECTED) from None


def check(args: argparse.Namespace) -> int:
    repair = args.yes or args.preen
    report = Report(args.verbose)
    started = time.monotonic()
    with open_device(args.target, read_only=not repair) as dev:
        store = _open(dev, read_only=not repair)
        try:
            state = store.sb.state
            if state & STATE_CLEAN and not state & STATE_ERROR and not args.force:
                print(f"{_summary(store)} (clean)")
                return EXIT_OK
            if state & STATE_ERROR:
                print(f"volume was marked as needing fsck: {store.sb.error_reason}")
            found = scan(store)
            if found.clean:
                if repair and state & STATE_ERROR:
                    store.clear_error()
                print(f"{_summary(store)}: clean")
                return EXIT_OK
            print(f"{len(found.problems)} problem(s) found:")
            report.problems(found)
            if not repair:
                print(f"{_summary(store)}: errors left uncorrected (run with -y to repair)")
                return EXIT_UNCORRECTED
            Repairer(store, found, report.say).run()
            second = scan(store)
            fix_counts(store, second, report.say)
            store.clear_error()
        finally:
            store.close()
    # Verify with a fresh, read-only look.
    with open_device(args.target, read_only=True) as dev:
        store = _open(dev, read_only=True)
        try:
            final = scan(store)
            if not final.clean:
                print("problems remain after repair:")
                report.problems(final)
                return EXIT_UNCORRECTED
            print(f"{_summary(store)}: repaired in {time.monotonic() - started:.1f} s")
        finally:
            store.close()
    return EXIT_FIXED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        try:
            return check(args)
        except FsError as exc:
            print(f"{PROG}: {args.target}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except OSError as exc:
            print(f"{PROG}: {args.target}: {exc}", file=sys.stderr)
            return EXIT_ERROR

    return run_tool(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
