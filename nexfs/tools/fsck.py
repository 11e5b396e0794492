"""fsck.nexfs: check and repair a NexFS volume.

Exit codes, as e2fsck: 0 no errors; 1 errors were found and corrected; 4 errors were left
uncorrected (or the volume cannot be read: both superblocks damaged); 8 operational error
(cannot open the target, not a NexFS volume, in use); 16 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator

from nexfs.check.checker import Scan, scan, superblock_problems
from nexfs.check.repair import Repairer, fix_counts
from nexfs.ondisk.layout import STATE_CLEAN, STATE_ERROR, NotNexfsError
from nexfs.store.blockdev import BlockDev
from nexfs.store.store import Store
from nexfs.tools.common import ArgumentParser, UsageError, open_device, run_tool
from nexfs.types import CorruptionError, FsError

PROG = "fsck.nexfs"
EXIT_OK, EXIT_FIXED, EXIT_UNCORRECTED, EXIT_ERROR, EXIT_USAGE = 0, 1, 4, 8, 16
MAX_SHOWN = 50


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, usage_exit=EXIT_USAGE,
        description="Check a NexFS volume: both superblocks, every checksum, extents, "
        "free-space accounting, link counts, directory indexes, tree connectivity and "
        "orphaned inodes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status (as e2fsck):\n"
        "  0   clean\n"
        "  1   errors corrected\n"
        "  4   errors left uncorrected (also: the volume cannot be read at all)\n"
        "  8   operational error (cannot open the target, not NexFS, in use)\n"
        "  16  usage error",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-n", "--no", action="store_true",
                      help="open read-only and answer 'no' to every repair (the default)")
    mode.add_argument("-y", "--yes", action="store_true", help="repair everything found")
    mode.add_argument("-p", "--preen", action="store_true", help="repair automatically (as -y)")
    parser.add_argument("-f", "--force", action="store_true",
                        help="check even if the volume is marked clean")
    parser.add_argument("--clear-mmp", action="store_true",
                        help="repair even though the multi-mount protection block says "
                        "fsck.nexfs is running elsewhere (say so only when it is not)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help=f"list every problem found (not only the first {MAX_SHOWN})")
    parser.add_argument("target", metavar="TARGET", help="image file, block device or NBD URI")
    return parser


class Report:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def say(self, message: str) -> None:
        print(message)

    def problems(self, found: Scan) -> None:
        shown = len(found.problems) if self.verbose else MAX_SHOWN
        for line in found.problems[:shown]:
            print(f"  {line}")
        if len(found.problems) > shown:
            print(f"  ... and {len(found.problems) - shown} more (-v shows them all)")


def _summary(store: Store) -> str:
    st = store.state
    g = store.geo
    label = store.sb.label or store.sb.uuid.hex()
    return (f"{label}: {g.ninodes - st.free_inodes}/{g.ninodes} files, "
            f"{g.nblocks - st.free_blocks}/{g.nblocks} blocks")


def _open(dev: object, *, read_only: bool) -> Store:
    try:
        return Store.open(dev, read_only=read_only, ignore_error=True,  # type: ignore[arg-type]
                          salvage_state=True)
    except NotNexfsError as exc:
        raise UsageError(f"{exc}", EXIT_ERROR) from None
    except CorruptionError as exc:
        raise UsageError(f"cannot open the volume: {exc}", EXIT_UNCORRECTED) from None


@contextlib.contextmanager
def _claimed(dev: object, args: argparse.Namespace) -> Iterator[None]:
    """A repairing run holds the volume's multi-mount protection block (nexfs/store/mmp.py) with
    the fsck sequence, so no node mounts it meanwhile, and marks it clean when done; a run
    that fails half-way leaves it claimed (the volume needs another fsck first)."""
    from nexfs.store.mmp import open_claim

    mmp = open_claim(dev, device=args.target, fsck=True, clear=args.clear_mmp)
    yield
    if mmp is not None:
        mmp.release()


@contextlib.contextmanager
def _opened(dev: object, *, read_only: bool) -> Iterator[Store]:
    """The store, closed (committed, marked clean) after success; dropped without writing
    anything more if the check or the repair fails half-way."""
    store = _open(dev, read_only=read_only)
    try:
        yield store
    except BaseException:
        store.abort()
        raise
    store.close()


def check(args: argparse.Namespace) -> int:
    repair = args.yes or args.preen
    report = Report(args.verbose)
    started = time.monotonic()
    with open_device(args.target, read_only=not repair) as dev, \
            _claimed(dev, args) if repair else contextlib.nullcontext():
        # Before the store: opening it writable rewrites both superblock copies.  It only
        # looks, so it gets a read-only view even when fsck repairs.
        sb_problems = superblock_problems(BlockDev(dev).read_only())
        with _opened(dev, read_only=not repair) as store:
            state = store.sb.state
            damaged = bool(sb_problems or store.state_damage)
            if (state & STATE_CLEAN and not state & STATE_ERROR and not args.force
                    and not damaged):
                print(f"{_summary(store)} (clean)")
                return EXIT_OK
            if state & STATE_ERROR:
                print(f"volume was marked as needing fsck: {store.sb.error_reason}")
            found = scan(store)
            found.problems[:0] = sb_problems
            if found.clean and state & STATE_ERROR:
                # Nothing wrong on disk, but the mark that keeps mounts read-only is itself
                # an error until cleared (as e2fsck treats its error flag).
                if not repair:
                    print(f"{_summary(store)}: no damage found, but the volume stays marked "
                          "as needing fsck (run with -y to clear the mark)")
                    return EXIT_UNCORRECTED
                store.clear_error()
                print(f"{_summary(store)}: no damage found; cleared the needs-fsck mark")
                return EXIT_FIXED
            if found.clean:
                print(f"{_summary(store)}: clean")
                return EXIT_OK
            print(f"{len(found.problems)} problem(s) found:")
            report.problems(found)
            if not repair:
                print(f"{_summary(store)}: errors left uncorrected (run with -y to repair)")
                return EXIT_UNCORRECTED
            if sb_problems:
                report.say("rewrote both superblock copies from the good one")
            Repairer(store, found, report.say).run()
            second = scan(store)
            fix_counts(store, second, report.say)
            store.clear_error()
    # Verify with a fresh, read-only look.
    with open_device(args.target, read_only=True) as dev:
        sb_problems = superblock_problems(BlockDev(dev))
        with _opened(dev, read_only=True) as store:
            final = scan(store)
            final.problems[:0] = sb_problems
            if not final.clean:
                print("problems remain after repair:")
                report.problems(final)
                return EXIT_UNCORRECTED
            print(f"{_summary(store)}: repaired in {time.monotonic() - started:.1f} s")
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
