"""Creating an empty volume, and finding and writing the two superblock copies.

mkfs writes only what an empty volume cannot do without: the bitmap blocks that cover the
fixed metadata regions (all in use), the summaries, the inode bitmap's first block (inode 0
is permanently in use), the state block, one zeroed journal block and the superblocks.  Every
other bitmap block is flagged UNINIT in its summary and the inode table is not written at all
(a table block with no allocated inode is created zero-filled when first used), so formatting
1 TiB writes about a MiB.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nexfs.ondisk import checksum
from nexfs.ondisk.bitmap import BPB, UNINIT, BitmapBlock, SummaryBlock, range_mask
from nexfs.ondisk.layout import (
    FEATURE_INCOMPAT_MMP,
    INODES_PER_BLOCK,
    SB_PRIMARY,
    STATE_BLOCK,
    STATE_CLEAN,
    SUMMARY_ENTRIES,
    Geometry,
    NotNexfsError,
    StateBlock,
    Superblock,
    check_label,
)
from nexfs.ondisk.metablock import (
    BLOCK_SIZE,
    CRC_OFFSET,
    MAGIC_BITMAP,
    MAGIC_IBITMAP,
    MAGIC_ISUMMARY,
    MAGIC_SUMMARY,
    MetaBlock,
)
from nexfs.store.blockdev import BlockDev, BlockDevice, Filler, copy_filler, write_runs
from nexfs.types import BlockNo, CorruptionError, FsError

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
"""progress(message): a human-readable note on long work, e.g. "metadata: 40/146 blocks"."""


def _encoder(blk: MetaBlock, seed: int) -> Filler:
    return lambda out: blk.encode(out, seed, 0)


def _bitmap_plan(nitems: int, used: list[tuple[int, int]]) -> tuple[dict[int, int], list[int]]:
    """Bits of the groups touched by ``used`` ranges, and every group's summary entry."""
    ngroups = -(-nitems // BPB)
    groups: dict[int, int] = {}
    for start, length in used:
        for g in range(start // BPB, (start + length - 1) // BPB + 1):
            lo = max(start, g * BPB)
            hi = min(start + length, (g + 1) * BPB)
            groups[g] = groups.get(g, 0) | range_mask(lo - g * BPB, hi - lo)
    entries = []
    for g in range(ngroups):
        valid = min(BPB, nitems - g * BPB)
        tail = ((1 << BPB) - 1) & ~((1 << valid) - 1)
        if g in groups:
            groups[g] |= tail
            entries.append(BPB - groups[g].bit_count())
        else:
            entries.append(valid | UNINIT)
    return groups, entries


def format_volume(dev: BlockDevice, *, label: str = "", uuid: bytes | None = None,
                  ninodes: int | None = None, progress: Progress | None = None,
                  mmp: bool | None = None, mmp_interval_ms: int | None = None) -> Superblock:
    """Write an empty NexFS volume over the whole device; returns its superblock.

    The root directory and lost+found are not created here: the filesystem layer creates
    them through an ordinary Store afterwards.  ``mmp``: give the volume multi-mount
    protection (nexfs/store/mmp.py); None (the default) gives it to a device no lock protects
    (``block_info().exclusive`` False).  Its block is the last data block, marked in use,
    written clean; ``mmp_interval_ms`` is its update interval (default 5 s).
    """
    from nexfs.store.mmp import DEFAULT_INTERVAL_MS, MAX_INTERVAL_MS, MIN_INTERVAL_MS, clean_block

    check_label(label)
    if uuid is not None and len(uuid) != 16:
        raise FsError(errno.EINVAL, "uuid must be 16 bytes")
    bdev = BlockDev(dev)
    geo = Geometry.compute(bdev.nblocks, ninodes)
    if mmp is None:
        mmp = not getattr(dev.block_info(), "exclusive", True)
    interval = DEFAULT_INTERVAL_MS if mmp_interval_ms is None else mmp_interval_ms
    if not MIN_INTERVAL_MS <= interval <= MAX_INTERVAL_MS:
        raise FsError(errno.EINVAL, f"MMP interval of {interval} ms is outside "
                                    f"{MIN_INTERVAL_MS}..{MAX_INTERVAL_MS} ms")
    now = time.time_ns()
    sb = Superblock(geo=geo, uuid=uuid or os.urandom(16), dir_hash_key=os.urandom(16),
                    label=label, sector_size=bdev.sector_size, state=STATE_CLEAN,
                    mkfs_time=now, write_time=now, journal_tid=1)
    if mmp:
        sb.feature_incompat |= FEATURE_INCOMPAT_MMP
        sb.mmp_block, sb.mmp_interval = geo.backup_sb - 1, interval
    seed = sb.volume_seed

    # Old superblocks go first (durably), so that a crash half-way through mkfs cannot leave
    # an old superblock describing new, half-written metadata.  The first journal block is
    # zeroed so replay finds nothing, whatever the device held before.
    def zero(out: memoryview) -> None:
        out[:] = bytes(BLOCK_SIZE)

    write_runs(bdev, [(0, zero), (geo.backup_sb, zero), (geo.journal_start, zero)],
               durable=True)

    blocks: list[tuple[int, Filler]] = []
    tail = (geo.backup_sb - 1, 2) if mmp else (geo.backup_sb, 1)  # MMP block, backup
    bgroups, bentries = _bitmap_plan(geo.nblocks, [(0, geo.data_start), tail])
    igroups, ientries = _bitmap_plan(geo.ninodes + 1, [(0, 1)])
    for groups, entries, bstart, sstart, magic, smagic in (
        (bgroups, bentries, geo.bbitmap_start, geo.bsummary_start, MAGIC_BITMAP,
         MAGIC_SUMMARY),
        (igroups, ientries, geo.ibitmap_start, geo.isummary_start, MAGIC_IBITMAP,
         MAGIC_ISUMMARY),
    ):
        for g, bits in groups.items():
            blocks.append((bstart + g, _encoder(BitmapBlock(BlockNo(bstart + g), magic, g, bits),
                                                seed)))
        for s in range(-(-len(entries) // SUMMARY_ENTRIES)):
            chunk = entries[s * SUMMARY_ENTRIES : (s + 1) * SUMMARY_ENTRIES]
            chunk += [0] * (SUMMARY_ENTRIES - len(chunk))
            blk = SummaryBlock(BlockNo(sstart + s), smagic, s, chunk)
            blocks.append((sstart + s, _encoder(blk, seed)))
    free_blocks = geo.nblocks - geo.data_start - tail[1]
    state = StateBlock(free_blocks=free_blocks, free_inodes=geo.ninodes,
                       data_hint=geo.data_start, meta_hint=geo.data_start, inode_hint=1)
    blocks.append((state.blkno, _encoder(state, seed)))
    if mmp:
        blocks.append((sb.mmp_block, copy_filler(clean_block(sb))))

    total, done = len(blocks), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(f"writing metadata: {done}/{total} blocks")

    write_runs(bdev, blocks, durable=True, progress=advance)
    sb.free_blocks, sb.free_inodes = free_blocks, geo.ninodes
    if progress is not None:
        progress("writing superblocks")
    write_superblock(bdev, sb, bump=False)
    log.info("formatted %d blocks (%d inodes, journal %d blocks, %d metadata blocks written)",
             geo.nblocks, geo.ninodes, geo.journal_len, len(blocks))
    assert geo.itable_len * INODES_PER_BLOCK == geo.ninodes
    return sb


def write_superblock(bdev: BlockDev, sb: Superblock, *, bump: bool = True) -> None:
    """Primary, barrier, backup, barrier: at every instant one valid copy is durable."""
    if bump:
        sb.generation += 1
        sb.write_time = time.time_ns()
    for where in (SB_PRIMARY, sb.geo.backup_sb):
        write_runs(bdev, [(where, copy_filler(sb.encode(where)))], durable=True)


@dataclass
class SuperblockCopies:
    """The superblock copy a volume is opened with, and what is wrong with the other one."""

    best: Superblock
    damaged: list[tuple[str, int, str]] = field(default_factory=list)  # (copy, block, why)


def _verified_blocks(bdev: BlockDev, sb: Superblock) -> int:
    """How many of the metadata blocks every volume has (the state block, the first bitmap
    and summary blocks, all written by mkfs) verify under ``sb``'s UUID: their checksums are
    seeded by it, so a copy whose UUID was changed verifies none of them."""
    g = sb.geo
    n = 0
    for blkno in sorted({STATE_BLOCK, g.bbitmap_start, g.bsummary_start, g.ibitmap_start,
                         g.isummary_start}):
        if blkno >= bdev.nblocks:
            continue
        try:
            raw = bdev.read_blocks(blkno, 1)
        except OSError:
            continue
        if checksum.verify(raw, CRC_OFFSET, sb.volume_seed, blkno):
            n += 1
    return n


def superblock_copies(bdev: BlockDev) -> SuperblockCopies:
    """Read both copies, choose the one to use and say what is wrong with the other.

    The rule (docs/FORMAT.md, "Choosing a copy"): among the valid copies, the one whose UUID
    verifies more of the volume's fixed metadata blocks wins; then the higher generation (a
    crash between the two writes of :func:`write_superblock` leaves the primary newer); then
    the primary.  The UUID comparison only costs reads when the valid copies disagree on it.
    A copy that cannot be decoded, whose UUID does not verify the volume's metadata, or that
    differs from the chosen one at the same generation is reported as damaged.

    NotNexfsError when neither copy has the NexFS magic; CorruptionError when the magic is
    there but no copy is valid ("not a NexFS volume or both superblocks damaged").
    """
    found: list[tuple[int, Superblock]] = []
    damaged: list[tuple[str, int, str]] = []
    no_magic = 0
    locations = [0, bdev.nblocks - 1]
    i = 0
    while i < len(locations):
        where = locations[i]
        i += 1
        name = "primary" if where == SB_PRIMARY else "backup"
        try:
            sb = Superblock.decode(bdev.read_blocks(where, 1), where)
        except NotNexfsError as e:
            no_magic += 1
            damaged.append((name, where, str(e)))
            continue
        except CorruptionError as e:
            damaged.append((name, where, str(e)))
            continue
        found.append((where, sb))
        if where == 0 and sb.geo.backup_sb not in locations:
            # The volume may be smaller than the device: its backup is then not the last block.
            locations.append(sb.geo.backup_sb)
    if not found:
        if no_magic == len(locations):
            raise NotNexfsError("not a NexFS volume (no superblock magic in block 0 or in the "
                                "last block)")
        raise CorruptionError(0, "superblock", "not a NexFS volume or both superblocks "
                                               "damaged: " + "; ".join(w for _n, _b, w in damaged))
    primary = next((sb for where, sb in found if where == SB_PRIMARY), None)
    if primary is not None:
        # A volume smaller than the device: the device's last block is not a copy.
        damaged = [d for d in damaged if d[1] in (SB_PRIMARY, primary.geo.backup_sb)]
    if len(found) == 1:
        return SuperblockCopies(found[0][1], damaged)
    if len({sb.uuid for _w, sb in found}) > 1:
        score = {where: _verified_blocks(bdev, sb) for where, sb in found}
    else:
        score = {where: 0 for where, _sb in found}
    # Ties (same score and generation): the primary (found first) wins.
    _rank, best_at, best = max(((score[where], sb.generation, -i), where, sb)
                               for i, (where, sb) in enumerate(found))
    for where, sb in found:
        if where == best_at:
            continue
        name = "primary" if where == SB_PRIMARY else "backup"
        if score[where] < score[best_at]:
            damaged.append((name, where, f"its UUID {sb.uuid.hex()} does not verify the "
                                         f"volume's metadata (the other copy's "
                                         f"{best.uuid.hex()} does)"))
        elif sb.generation == best.generation and sb.encode(0) != best.encode(0):
            damaged.append((name, where, "differs from the other copy of the same generation"))
    return SuperblockCopies(best, damaged)


def read_superblock(bdev: BlockDev) -> Superblock:
    """The superblock copy to open the volume with (see :func:`superblock_copies`)."""
    copies = superblock_copies(bdev)
    if copies.damaged:
        log.warning("using superblock generation %d; other copy unusable: %s",
                    copies.best.generation, "; ".join(w for _n, _b, w in copies.damaged))
    return copies.best
