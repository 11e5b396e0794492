"""Which regions of a volume each part of the store may touch: one scoped view per writer.

The store receives a view of the whole device (the capability ``Valve.grant`` minted) and
keeps none of it: :func:`derive` turns it into four :class:`~nexfs.store.blockdev.BlockDev` views,
each backed by capabilities restricted to its regions, and hands each component only its own
(docs/VALVE.md, "Grants inside NexFS"; the regions are docs/FORMAT.md's "Volume layout")::

    view         reads            writes (writable volume)
    superblocks  whole device     block 0 and the backup superblock (geo.backup_sb)
    journal      journal region   journal region
    meta         whole device     the state block, and everything from the first bitmap
                                  block up to the backup superblock: bitmaps, summaries,
                                  inode table, and the data area (tree and directory blocks
                                  live there) -- checkpoints and journal replay write homes
    data         data area        data area (data cache, write-behind, direct data writes)

So the journal writer cannot write a home block, the data path cannot write the journal, the
superblocks or the fixed metadata, and nothing but the superblock writer can write a
superblock.  A read-only store (``fsck -n``, ``nexfs info``, read-only mounts, a volume
opened in the error state) gets the same windows with READ only: every write it attempts is
refused by the valve.  A refused write is an ``OSError`` (``CapabilityError``, EPERM) like
any device error, so it takes the store's normal failure path (error state, read-only).

A volume with multi-mount protection has its MMP block cut out of the meta and data write
windows: only the MMP keeper's own one-block grant (nexfs/store/mmp.py) writes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from nexfs.ondisk.layout import SB_PRIMARY, STATE_BLOCK, Geometry
from nexfs.store.blockdev import BlockDev


@dataclass(frozen=True)
class Grants:
    """The four scoped views of one open volume (see the module docstring)."""

    superblocks: BlockDev
    journal: BlockDev
    meta: BlockDev
    data: BlockDev


def derive(bdev: BlockDev, geo: Geometry, *, writable: bool, mmp_block: int = 0) -> Grants:
    """Restrict ``bdev`` (a whole-device view) to the grants of a volume laid out as ``geo``
    (``mmp_block``: its MMP block, or 0 for none).

    Raises ``CapabilityError`` when ``writable`` is asked of a read-only capability.
    """
    device = (0, bdev.nblocks)
    journal = (geo.journal_start, geo.journal_start + geo.journal_len)
    data = (geo.data_start, geo.backup_sb)

    def w(*windows: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        if not writable:
            return ()
        if not mmp_block:
            return windows
        out: list[tuple[int, int]] = []
        for lo, hi in windows:  # the MMP block is cut out of any window holding it
            if lo <= mmp_block < hi:
                out += [win for win in ((lo, mmp_block), (mmp_block + 1, hi)) if win[0] < win[1]]
            else:
                out.append((lo, hi))
        return tuple(out)

    return Grants(
        superblocks=bdev.scoped(device, w((SB_PRIMARY, SB_PRIMARY + 1),
                                          (geo.backup_sb, geo.backup_sb + 1))),
        journal=bdev.scoped(journal, w(journal)),
        # The big window first: checkpoints write many blocks there, the state block one.
        meta=bdev.scoped(device, w((geo.bbitmap_start, geo.backup_sb),
                                   (STATE_BLOCK, STATE_BLOCK + 1))),
        data=bdev.scoped(data, w(data)),
    )
