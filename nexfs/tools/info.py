"""nexfs info: the superblock and free space of a volume, in human terms (like dumpe2fs -h).

Opens the target read-only; a volume whose journal needs replaying is shown as it will be
after replay (the replay happens in memory only).  Exit codes: 0 shown, 1 usage error, 8 could
not open the volume.
"""

from __future__ import annotations

import time
import uuid

from nexfs.ondisk.layout import STATE_CLEAN, STATE_DIRTY, STATE_ERROR, NotNexfsError
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.store import Store
from nexfs.tools.common import ArgumentParser, UsageError, open_device, run_tool
from nexfs.types import CorruptionError

PROG = "nexfs info"


def _when(ns: int) -> str:
    if not ns:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ns / 1e9))


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024  # type: ignore[assignment]
    return str(nbytes)


def describe_state(state: int, reason: str) -> str:
    if state & STATE_ERROR:
        return f"needs fsck ({reason or 'error'})"
    if state & STATE_DIRTY:
        return "not clean (mounted, or not cleanly unmounted)"
    if state & STATE_CLEAN:
        return "clean"
    return f"unknown ({state:#x})"


def describe_mmp(store: Store) -> str:
    """The MMP feature and who holds the block now (nexfs/store/mmp.py)."""
    from nexfs.store.mmp import SEQ_CLEAN, SEQ_FSCK, MmpRecord

    sb = store.sb
    if not sb.mmp:
        return "off"
    head = f"block {sb.mmp_block}, every {sb.mmp_interval / 1000:g} s"
    try:
        rec = MmpRecord.decode(store.bdev.read_blocks(sb.mmp_block, 1), sb.volume_seed,
                               sb.mmp_block)
    except (CorruptionError, OSError) as exc:
        return f"{head}; block unreadable ({exc})"
    if rec.seq == SEQ_CLEAN:
        return f"{head}; not in use"
    what = "fsck.nexfs on" if rec.seq == SEQ_FSCK else "in use by"
    return f"{head}; {what} {rec.who}, last written {_when(rec.time_ns)}"


def show(target: str) -> int:
    with open_device(target, read_only=True) as dev:
        try:
            store = Store.open(dev, read_only=True, ignore_error=True, salvage_state=True)
        except NotNexfsError as exc:
            raise UsageError(f"{target}: {exc}", 8) from None
        except CorruptionError as exc:
            raise UsageError(f"{target}: cannot read the volume: {exc}", 8) from None
        try:
            sb, geo, st = store.sb, store.geo, store.state
            free_blocks, free_inodes = st.free_blocks, st.free_inodes
            note = ""
            if store.state_damage:
                # The superblock keeps a copy of the counts as of its last write.
                free_blocks, free_inodes = sb.free_blocks, sb.free_inodes
                note = " (as of the last superblock write: the state block is damaged)"
            used = geo.nblocks - free_blocks
            rows = [
                ("Volume label", sb.label or "<none>"),
                ("UUID", str(uuid.UUID(bytes=sb.uuid))),
                ("Format version", str(sb.version)),
                ("State", describe_state(sb.state, sb.error_reason)),
                ("Size", f"{_size(geo.nblocks * BLOCK_SIZE)} ({geo.nblocks} blocks of "
                         f"{BLOCK_SIZE} bytes)"),
                ("Used", f"{_size(used * BLOCK_SIZE)} ({used} blocks){note}"),
                ("Free", f"{_size(free_blocks * BLOCK_SIZE)} ({free_blocks} blocks){note}"),
                ("Inodes", f"{geo.ninodes - free_inodes} used of {geo.ninodes}{note}"),
                ("Sector size at mkfs", str(sb.sector_size)),
                ("Journal", f"{geo.journal_len} blocks at {geo.journal_start}"),
                ("Created", _when(sb.mkfs_time)),
                ("Last mounted", _when(sb.mount_time)),
                ("Last written", _when(sb.write_time)),
                ("Last checked", _when(sb.check_time)),
                ("Mount count", str(sb.mount_count)),
                ("Multi-mount protection", describe_mmp(store)),
            ]
        finally:
            store.close()
    width = max(len(k) for k, _v in rows) + 1
    for key, value in rows:
        print(f"{key + ':':<{width}} {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, usage_exit=1,
                            description="Print the superblock of a NexFS volume in human terms.",
                            epilog="exit status: 0 shown, 1 usage error, 8 could not open the "
                                   "volume")
    parser.add_argument("target", metavar="TARGET", help="image file, block device or NBD URI")
    args = parser.parse_args(argv)
    return run_tool(PROG, lambda: show(args.target))


if __name__ == "__main__":
    raise SystemExit(main())
