"""nexfs tune: change a volume's features after mkfs (like tune2fs).

    nexfs tune -O mmp [--mmp-interval SECONDS] TARGET     turn multi-mount protection on
    nexfs tune -O ^mmp TARGET                              turn it off
    nexfs tune --mmp-interval SECONDS TARGET               change its update interval

The volume must be cleanly unmounted (the superblock says CLEAN): a mounted volume is DIRTY,
so a volume in use on another host is refused even where no lock can tell.  Turning MMP on
allocates one data block (near the end of the volume) in a journaled transaction, writes it
clean, and then sets the feature in the superblock; a crash in between leaves at worst an
allocated block nothing names, which fsck.nexfs -y frees.  A volume that already has MMP is
claimed first (nexfs/store/mmp.py, as fsck does), so that tune never changes it under a mount.

Exit codes: 0 changed (or nothing to change); 1 refused or usage error; 8 operational error
(cannot open the target, not a NexFS volume, in use).
"""

from __future__ import annotations

import argparse
from typing import Any

from nexfs.ondisk.layout import FEATURE_INCOMPAT_MMP, STATE_CLEAN
from nexfs.store.blockdev import BlockDev
from nexfs.store.mmp import (
    DEFAULT_INTERVAL_MS,
    clean_block,
    open_claim,
)
from nexfs.store.store import Store
from nexfs.store.volume import superblock_copies
from nexfs.tools.common import ArgumentParser, UsageError, open_device, run_tool
from nexfs.tools.mkfs import mmp_interval_ms, parse_features
from nexfs.types import BlockNo, CorruptionError

PROG = "nexfs tune"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, usage_exit=1,
        description="Change the features of a cleanly unmounted NexFS volume.",
        epilog="exit status: 0 changed, 1 refused or usage error, 8 cannot open or in use",
    )
    parser.add_argument("-O", dest="features", action="append", default=[], metavar="FEATURES",
                        help="features to turn on, or off with a leading ^: mmp")
    parser.add_argument("--mmp-interval", metavar="SECONDS", type=float,
                        help="how often a mount rewrites the multi-mount protection block")
    parser.add_argument("target", metavar="TARGET", help="image file or block device")
    return parser


def tune(args: argparse.Namespace) -> int:
    want = parse_features(args.features).get("mmp")
    interval_ms = mmp_interval_ms(args.mmp_interval)
    if want is None and interval_ms is None:
        raise UsageError("nothing to change: give -O mmp, -O ^mmp or --mmp-interval", 1)
    with open_device(args.target, read_only=False) as dev:
        mmp = open_claim(dev, device=args.target, fsck=True)  # waits if it has MMP
        freed = False
        try:
            freed = _change(dev, args.target, want, interval_ms)
        finally:
            # Refused or done: nobody writes it now (unless its block was just freed).
            if mmp is not None and not freed:
                mmp.release()
    return 0


def _change(dev: Any, target: str, want: bool | None, interval_ms: int | None) -> bool:
    """Make the change; True when it freed the MMP block."""
    before = superblock_copies(BlockDev(dev).read_only()).best
    if before.state != STATE_CLEAN:
        raise UsageError(f"{target} was not cleanly unmounted (or is mounted somewhere): "
                         "unmount it, or run fsck.nexfs -y, first", 1)
    if interval_ms is not None and not before.mmp and want is not True:
        # Refused before the store is opened: opening it writable marks the volume DIRTY.
        raise UsageError(f"{target} has no multi-mount protection (turn it on with -O mmp)",
                         1)
    if (want is None or want == before.mmp) and (interval_ms is None or not before.mmp
                                                 or interval_ms == before.mmp_interval):
        print(f"{target}: nothing to change")
        return False
    try:
        store = Store.open(dev)
    except CorruptionError as exc:
        raise UsageError(f"{target}: cannot open the volume: {exc}; run fsck.nexfs", 8) from None
    sb = store.sb
    freed = False
    try:
        if want is True and not sb.mmp:
            with store.reserve(1):
                blkno, _n = store.alloc_data(BlockNo(sb.geo.backup_sb - 1), 1)
            sb.feature_incompat |= FEATURE_INCOMPAT_MMP
            sb.mmp_block, sb.mmp_interval = int(blkno), interval_ms or DEFAULT_INTERVAL_MS
            # Written before the superblock names it (at close): never a named, unwritten one.
            block = BlockDev(dev).scoped((blkno, blkno + 1), [(blkno, blkno + 1)])
            block.write_blocks(blkno, 1, clean_block(sb), durable=True)
            print(f"{target}: multi-mount protection on (block {blkno}, every "
                  f"{sb.mmp_interval / 1000:g} s)")
        elif want is False and sb.mmp:
            store.free_blocks(BlockNo(sb.mmp_block), 1)
            sb.feature_incompat &= ~FEATURE_INCOMPAT_MMP
            sb.mmp_block = sb.mmp_interval = 0
            freed = True
            print(f"{target}: multi-mount protection off")
        elif interval_ms is not None and sb.mmp:
            sb.mmp_interval = interval_ms
            print(f"{target}: multi-mount protection every {interval_ms / 1000:g} s")
    except BaseException:
        store.abort()
        raise
    store.close()  # commits, checkpoints, writes the superblock with the change
    return freed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(PROG, lambda: tune(args))


if __name__ == "__main__":
    raise SystemExit(main())
