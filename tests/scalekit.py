"""Helpers for the scale tests: files whose blocks lie in many bitmap groups, built cheaply.

Writing a file that covers thousands of 127 MiB groups is out of the question in a test, and
the allocator puts a file's blocks next to each other anyway.  So these helpers allocate the
blocks where they want them (through the store's ordinary allocator, with a goal) and map
them into the file's extent map, without writing any data: on a fresh sparse image or
in-memory device the blocks read as zeros.  The result is what an aged, fragmented volume
gives a file: extents in many groups.  Everything goes through the normal transaction
machinery, committing whenever the running transaction reaches ``commit_every`` blocks.
"""

from __future__ import annotations

from collections.abc import Iterable

from fsutil import ROOT

from nexfs.core.fs import FileSystem
from nexfs.ondisk.bitmap import BPB
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.types import BlockNo


def placed_file(fs: FileSystem, parent: int, name: bytes, groups: Iterable[int], *,
                per_group: int = 1, commit_every: int = 16) -> int:
    """Create ``name`` in ``parent`` with ``per_group`` blocks at the start of each of
    ``groups`` (in that order, logically contiguous); returns the inode number.  Consecutive
    whole groups merge into one extent, scattered single blocks stay separate extents."""
    ino = fs.create(parent, name, 0o644, ROOT).ino
    store = fs.store
    inode = fs.inodes.get(ino)
    data = fs.objects.data(inode)
    lblk = 0
    for g in groups:
        goal = BlockNo(max(g * BPB, store.geo.data_start))
        left = per_group
        while left:
            with store.reserve(left + data.emap.worst_case_new_blocks(1)):
                start, n = store.alloc_data(goal, left)
                data.emap.insert(lblk, start, n)
            inode.blocks += n
            lblk += n
            left -= n
            goal = BlockNo(start + n)
            fs.objects.dirty(inode)
            if store.txn_blocks >= commit_every:
                fs.commit(durable=False)
    inode.size = lblk * BLOCK_SIZE
    fs.objects.dirty(inode)
    fs.commit(durable=True)
    return ino


def groups_of(fs: FileSystem, ino: int) -> set[int]:
    """The bitmap groups holding the data blocks of ``ino``."""
    out: set[int] = set()
    for _l, phys, n in fs.objects.data(fs.inodes.get(ino)).emap.extents():
        out.update(range(phys // BPB, (phys + n - 1) // BPB + 1))
    return out
