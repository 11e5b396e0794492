"""Reading a whole volume and finding everything wrong with it (the engine of fsck.nexfs).

:func:`scan` walks every structure once — the allocated inodes, their extent, directory and
attribute trees, the directory graph, the orphan list, the bitmaps and the free counts — and
returns a :class:`Scan`: what it found, and the computed truth (which blocks and inodes are
really in use, every inode's link count) that the repair step rewrites the volume from.  It
never changes the volume.
"""

from __future__ import annotations

import contextlib
import logging
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nexfs.core.objects import ROOT_INO, SYMLINK_MAX
from nexfs.ondisk.bitmap import BPB, COUNT_MASK, UNINIT, range_mask
from nexfs.ondisk.btree import KIND_DIR, KIND_EXTENTS, LeafCheck, Node, decode_node
from nexfs.ondisk.dirindex import ENTRY_HEADER, DirIndex
from nexfs.ondisk.dirindex import leaf_check as dir_leaf_check
from nexfs.ondisk.extents import AREA_HEADER, MAX_FILE_BLOCKS, TREE_VALUE, ExtentMap
from nexfs.ondisk.inode_record import (
    DATA_AREA_SIZE,
    DIR_ROOT,
    INODE_FLAG_INLINE,
    INODE_FLAG_ORPHAN,
    Inode,
)
from nexfs.ondisk.layout import SUMMARY_ENTRIES
from nexfs.ondisk.metablock import BLOCK_SIZE, HEADER, MetaBlock
from nexfs.ondisk.xattr_tree import XattrStore
from nexfs.store.blockdev import BlockDev
from nexfs.store.mmp import MmpRecord
from nexfs.store.store import Store
from nexfs.store.volume import superblock_copies
from nexfs.types import BlockNo, CorruptionError, FsError, InodeNo

log = logging.getLogger(__name__)

M = TypeVar("M", bound=MetaBlock)


class Tracker:
    """The store as the checker's trees see it: records every metadata block they read."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.volume_seed = store.volume_seed
        self.nblocks = store.geo.nblocks
        self.seen: list[int] = []
        self.tids: dict[int, int] = {}  # header tid of each block decoded here (pass 6)

    def get(self, blkno: BlockNo, decode: Callable[[BlockNo, memoryview], M]) -> M:
        self.seen.append(blkno)

        def decode_noting_tid(b: BlockNo, raw: memoryview) -> M:
            block = decode(b, raw)  # validates the header first
            self.tids[b] = HEADER.unpack_from(raw, 0)[4]
            return block

        return self.store.get(blkno, decode_noting_tid)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@dataclass
class InodeInfo:
    """What the scan learnt about one valid inode."""

    inode: Inode
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # (lblk, phys, n)
    tree_blocks: list[int] = field(default_factory=list)  # extent or directory tree nodes
    xattr_blocks: list[int] = field(default_factory=list)
    entries: list[tuple[int, bytes, int, int]] = field(default_factory=list)  # directories
    tree_damage: str | None = None
    xattr_damage: str | None = None
    conflicts: list[tuple[int, int, int]] = field(default_factory=list)  # runs lost to others
    past_eof: bool = False  # blocks mapped beyond the file size
    links: int = 0  # directory entries naming it
    subdirs: int = 0  # directories: entries naming a subdirectory
    parents: list[int] = field(default_factory=list)  # directories: dirs with an entry for it

    @property
    def ino(self) -> int:
        return self.inode.ino

    def expected_blocks(self) -> int:
        data = sum(n for _l, _p, n in self.runs)
        return data + len(self.tree_blocks) + len(self.xattr_blocks)


@dataclass
class Scan:
    """Everything found by :func:`scan`."""

    problems: list[str] = field(default_factory=list)
    inodes: dict[int, InodeInfo] = field(default_factory=dict)
    bad_inodes: dict[int, str] = field(default_factory=dict)  # in the bitmap, not valid
    used_blocks: dict[int, int] = field(default_factory=dict)  # group -> bits in use
    used_inodes: dict[int, int] = field(default_factory=dict)  # group -> inodes in use
    bad_entries: list[tuple[int, bytes, str]] = field(default_factory=list)  # (dir, name, why)
    wrong_dtype: list[tuple[int, bytes, int, int]] = field(default_factory=list)
    extra_parents: list[tuple[int, bytes, int]] = field(default_factory=list)
    unreachable: list[int] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)  # on the orphan list, nlink 0
    pending_truncates: list[int] = field(default_factory=list)  # orphans with blocks past EOF
    orphan_list_damage: str | None = None
    stray_orphan_flags: list[int] = field(default_factory=list)
    bitmap_damage: list[str] = field(default_factory=list)
    counts_wrong: bool = False
    root_missing: bool = False  # inode 1 is not a valid directory: the repair recreates it
    max_generation: int = 0
    wrong_timeline: list[int] = field(default_factory=list)  # blocks with a tid too new

    def problem(self, message: str) -> None:
        self.problems.append(message)

    @property
    def clean(self) -> bool:
        return not self.problems


def _salvage_tree(store: Store, owner: int, root: int, kind: int,
                  leaf_check: LeafCheck) -> list[tuple[int, bytes]]:
    """(key, value) of every leaf of a damaged B+tree that can still be read and belongs
    where it hangs, in key order.  Damaged nodes and whatever hangs below them are skipped."""
    out: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    seed, nblocks = store.volume_seed, store.geo.nblocks

    def decode(blkno: BlockNo, raw: memoryview) -> Node:
        return decode_node(blkno, raw, volume_seed=seed, owner=owner, kind=kind,
                           nblocks=nblocks, leaf_check=leaf_check)

    def walk(blkno: int, level: int | None, lo: int, hi: int) -> None:
        if blkno in seen or not 0 < blkno < nblocks:
            return
        seen.add(blkno)
        try:
            node = store.get(BlockNo(blkno), decode)
        except FsError:
            return
        if not isinstance(node, Node) or node.owner != owner or node.kind != kind or (
            level is not None and node.level != level
        ):
            return
        if node.level == 0:
            out.extend((k, v) for k, v in zip(node.keys, node.vals, strict=True)
                       if lo <= k < hi)
            return
        fences = [*node.keys[1:], hi]
        for i, child in enumerate(node.kids):
            walk(child, node.level - 1, max(lo, node.keys[i]), min(hi, fences[i]))

    if root:
        walk(root, None, 0, 1 << 64)
    return out


def _set_bits(bits: int) -> Iterator[int]:
    while bits:
        low = bits & -bits
        yield low.bit_length() - 1
        bits ^= low


class _Scanner:
    def __init__(self, store: Store, progress: Callable[[str], None] | None) -> None:
        self.store = store
        self.geo = store.geo
        self.out = Scan()
        self.progress = progress or (lambda _m: None)
        self.hash_key = store.sb.hash_key
        self._owner: dict[int, int] = {}  # first block of a claimed run -> ino (conflicts)
        self._claim_log: list[tuple[int, int]] | None = None  # see _inode (symlinks)
        self._tids: dict[int, int] = {}  # header tids seen by the trees' trackers (pass 6)

    # -- block accounting -------------------------------------------------------------------

    def _claim(self, start: int, n: int) -> bool:
        """Mark blocks used; False (and nothing marked) if any of them already was."""
        used = self.out.used_blocks
        masks = []
        i, left = start, n
        while left:
            g, off = divmod(i, BPB)
            take = min(left, BPB - off)
            mask = range_mask(off, take)
            if used.get(g, 0) & mask:
                return False
            masks.append((g, mask))
            i += take
            left -= take
        for g, mask in masks:
            used[g] = used.get(g, 0) | mask
        if self._claim_log is not None:
            self._claim_log.extend(masks)
        return True

    def _in_data_area(self, start: int, n: int) -> bool:
        return self.geo.data_start <= start and start + n <= self.geo.backup_sb and n > 0

    # -- pass 1 -----------------------------------------------------------------------------

    def _check_mmp(self) -> None:
        """The MMP block is in use (mkfs marked it) and must decode; fsck -y rewrites it when
        it releases its claim (nexfs/store/mmp.py), which is the repair."""
        sb = self.store.sb
        if not sb.mmp:
            return
        self._claim(sb.mmp_block, 1)
        try:
            MmpRecord.decode(self.store.bdev.read_blocks(sb.mmp_block, 1), sb.volume_seed,
                             sb.mmp_block)
        except (CorruptionError, OSError) as exc:
            self.out.problem(f"multi-mount protection block: {exc}")

    def pass1(self) -> None:
        geo = self.geo
        self._claim(0, geo.data_start)
        self._claim(geo.backup_sb, 1)
        self._check_mmp()
        inodes = self.store.inodes
        unvouched: list[int] = []
        for g in range(inodes.ngroups):
            try:
                bits = inodes.group_bits(g) & ~inodes.tail_mask(g)
            except CorruptionError as exc:
                # exc names the block really damaged: the bitmap block or its summary.
                self.out.problem(f"inode bitmap group {g}: {exc}")
                self.out.bitmap_damage.append(f"inode bitmap {g}")
                unvouched += [g * BPB + off for off in _set_bits(self._inodes_from_table(g))]
                bits = 0
            for off in _set_bits(bits):
                ino = g * BPB + off
                if 1 <= ino <= geo.ninodes:
                    self._inode(ino)
            if g % 64 == 63:
                self.progress(f"pass 1: inode group {g + 1}/{inodes.ngroups}")
        if unvouched:
            self._named_from_table(unvouched)

    def _named_from_table(self, candidates: list[int]) -> None:
        """Inodes known only from their table slots (their bitmap block is damaged): a slot
        may hold the stale record of a freed inode (volumes written before freed slots were
        zeroed), which must not come back to life and claim blocks that now belong to other
        files.  So such an inode is taken as live only when something live names it — an
        entry of a live directory, the orphan list, or it is the root — after every inode
        the bitmap vouches for has claimed its blocks.  The others are cleared."""
        pending = {ino for ino in candidates if 1 <= ino <= self.geo.ninodes}
        named = {ROOT_INO, self.store.state.orphan_head}
        for info in self.out.inodes.values():
            named.update(child for _c, _n, child, _d in info.entries)
            named.add(info.inode.orphan_next)
        while take := sorted(pending & named):
            for ino in take:
                pending.discard(ino)
                self._inode(ino)
                taken = self.out.inodes.get(ino)
                if taken is not None:
                    named.update(child for _c, _n, child, _d in taken.entries)
                    named.add(taken.inode.orphan_next)
        for ino in sorted(pending):
            self.out.problem(f"inode {ino}: its slot holds a record, but no bitmap vouches "
                             "for it and nothing names it: a stale record of a freed inode")
            self.out.bad_inodes[ino] = "stale record of a free inode"

    def _inodes_from_table(self, g: int) -> int:
        """The inode bitmap block is unreadable: the valid, non-free table slots of its
        group, as bits (not trusted yet: see _named_from_table)."""
        bits = 0
        first = max(1, g * BPB)
        last = min((g + 1) * BPB - 1, self.geo.ninodes)
        for ino in range(first, last + 1):
            try:
                raw = self.store.bdev.read_blocks(self.store.itable.block_of(InodeNo(ino)), 1)
                slot = (ino - 1) % 16 * 256
                inode = Inode.decode(InodeNo(ino), raw[slot : slot + 256], self.store.volume_seed)
            except (CorruptionError, OSError):
                continue
            if inode.mode:
                bits |= 1 << (ino - g * BPB)
        return bits

    def _inode(self, ino: int) -> None:
        store = self.store
        try:
            inode = Inode.decode(InodeNo(ino), store.itable.read_raw(InodeNo(ino)),
                                 store.volume_seed, store.itable.block_of(InodeNo(ino)))
        except CorruptionError as exc:
            if exc.structure == f"inode {ino}":  # the slot itself (its table block has no
                # checksum of its own: each slot carries one)
                self.out.problem(f"inode {ino}: {exc.reason} (inode table block {exc.blkno})")
            else:  # another structure, met while reading it: name that one
                self.out.problem(f"inode {ino}: cannot be read: {exc}")
            self.out.bad_inodes[ino] = exc.reason
            return
        if inode.mode == 0:
            self.out.problem(f"inode {ino} is marked in use but its slot is free")
            self.out.bad_inodes[ino] = "free slot"
            return
        if ino == ROOT_INO and not stat.S_ISDIR(inode.mode):
            # Cleared and recreated as an empty directory (its blocks are not claimed).
            self.out.problem(f"inode {ino}: the root inode is not a directory "
                             f"(mode {inode.mode:o})")
            self.out.bad_inodes[ino] = "root inode not a directory"
            return
        info = InodeInfo(inode)
        kind = stat.S_IFMT(inode.mode)
        inline = bool(inode.flags & INODE_FLAG_INLINE)
        if kind == stat.S_IFLNK and not (0 < inode.size <= DATA_AREA_SIZE if inline
                                         else DATA_AREA_SIZE < inode.size <= SYMLINK_MAX):
            # A symlink whose target cannot be trusted is cleared like an undecodable
            # inode (and the entries naming it dropped): "repairing" it only made another
            # invalid symlink that the next check found again.
            why = f"{'inline ' if inline else ''}symlink of size {inode.size}"
            self.out.problem(f"inode {ino}: {why}")
            self.out.bad_inodes[ino] = why
            return
        self.out.inodes[ino] = info
        self.out.max_generation = max(self.out.max_generation, inode.generation)
        if kind == stat.S_IFREG or (kind == stat.S_IFLNK and not inline):
            claims: list[tuple[int, int]] = []
            self._claim_log = claims
            try:
                self._extents(info)
            finally:
                self._claim_log = None
            if kind == stat.S_IFLNK and info.tree_damage:
                for g, mask in claims:  # its blocks go back: the inode is cleared
                    self.out.used_blocks[g] &= ~mask
                del self.out.inodes[ino]
                self.out.bad_inodes[ino] = info.tree_damage
                return
        elif kind == stat.S_IFDIR:
            self._directory(info)
        if inode.xattr_root:
            self._xattrs(info)
        for blk in info.tree_blocks + info.xattr_blocks:
            if not self._claim(blk, 1):
                self.out.problem(f"inode {ino}: tree block {blk} is also used elsewhere")
                info.tree_damage = info.tree_damage or f"tree block {blk} shared"
        if info.tree_damage is None and inode.blocks != info.expected_blocks():
            self.out.problem(f"inode {ino}: i_blocks is {inode.blocks}, counted "
                             f"{info.expected_blocks()}")
        if inode.flags & INODE_FLAG_ORPHAN and inode.nlink:
            pass  # checked against the orphan list in pass 4

    def _extents(self, info: InodeInfo) -> None:
        ino = info.ino
        inode = info.inode
        tracker = Tracker(self.store)
        emap: ExtentMap | None = None
        try:
            emap = ExtentMap(tracker, InodeNo(ino), bytearray(inode.area), lambda: None)
            for lblk, phys, n in emap.extents():
                if not self._in_data_area(phys, n) or lblk + n > MAX_FILE_BLOCKS:
                    raise CorruptionError(0, f"extent map of inode {ino}",
                                          f"extent {lblk}+{n} -> {phys} out of range")
                info.runs.append((lblk, phys, n))
        except CorruptionError as exc:
            self.out.problem(f"inode {ino}: {exc}")
            info.tree_damage = str(exc)
            info.runs = []
            if emap is not None and not emap.is_inline:
                info.runs = self._salvage_extents(emap, ino, inode.area)
        info.tree_blocks = [] if info.tree_damage else sorted(set(tracker.seen))
        self._tids.update(tracker.tids)
        kept = []
        for lblk, phys, n in info.runs:
            if self._claim(phys, n):
                kept.append((lblk, phys, n))
            else:
                self.out.problem(f"inode {ino}: blocks {phys}..{phys + n - 1} are also used "
                                 "by another file")
                info.conflicts.append((lblk, phys, n))
        info.runs = kept
        if info.runs and not info.tree_damage:
            lblk, _p, n = info.runs[-1]
            end_block = lblk + n
            size_blocks = -(-inode.size // BLOCK_SIZE)
            if end_block > size_blocks:
                info.past_eof = True
                if inode.flags & INODE_FLAG_ORPHAN:
                    # A truncate (or delete) under way when the volume went down: the
                    # mount finishes it (a flag without the list is reported in pass 4).
                    self.out.pending_truncates.append(ino)
                else:
                    self.out.problem(f"inode {ino}: blocks mapped past the end of file "
                                     f"(size {inode.size})")

    def _salvage_extents(self, emap: ExtentMap, ino: int,
                         area: bytes | bytearray) -> list[tuple[int, int, int]]:
        """The extents of every readable leaf of a damaged extent tree (what the repair
        rebuilds the file from; the rest of the file becomes a hole)."""
        root = AREA_HEADER.unpack_from(area, 0)[4]
        runs: list[tuple[int, int, int]] = []
        end = 0
        for lblk, value in _salvage_tree(self.store, ino, root, KIND_EXTENTS,
                                         emap.leaf_check):
            n, phys = TREE_VALUE.unpack(value)
            if lblk >= end and self._in_data_area(phys, n) and lblk + n <= MAX_FILE_BLOCKS:
                runs.append((lblk, phys, n))
                end = lblk + n
        return runs

    def _directory(self, info: InodeInfo) -> None:
        ino = info.ino
        (root,) = DIR_ROOT.unpack_from(info.inode.area, 0)
        tracker = Tracker(self.store)
        index = DirIndex(tracker, InodeNo(ino), root, self.hash_key)
        try:
            if any(info.inode.area[8:]):
                raise CorruptionError(0, f"directory {ino}", "unused part of the area is set")
            for cookie, name, child, dtype in index.iter_from(0):
                index.check_hash(cookie, name)
                info.entries.append((cookie, name, child, dtype))
        except FsError as exc:
            self.out.problem(f"directory {ino}: {exc}")
            info.tree_damage = str(exc)
            # Keep every entry of every readable leaf: the repair rebuilds the index from
            # them, and only the names in damaged leaves are lost (their inodes go to
            # lost+found).
            info.entries = []
            for cookie, value in _salvage_tree(self.store, ino, root, KIND_DIR,
                                               dir_leaf_check):
                child, dtype, _n = ENTRY_HEADER.unpack_from(value, 0)
                name = bytes(value[ENTRY_HEADER.size:])
                try:
                    index.check_hash(cookie, name)
                except FsError:
                    continue
                info.entries.append((cookie, name, child, dtype))
        info.tree_blocks = [] if info.tree_damage else sorted(set(tracker.seen))
        self._tids.update(tracker.tids)

    def _xattrs(self, info: InodeInfo) -> None:
        tracker = Tracker(self.store)
        try:
            xattrs = XattrStore(tracker, InodeNo(info.ino), info.inode.xattr_root, self.hash_key)
            for name in xattrs.list():
                xattrs.get(name)
        except (CorruptionError, FsError) as exc:
            self.out.problem(f"inode {info.ino}: extended attributes: {exc}")
            info.xattr_damage = str(exc)
        info.xattr_blocks = [] if info.xattr_damage else sorted(set(tracker.seen))
        self._tids.update(tracker.tids)

    # -- pass 2 and 3: directory structure and connectivity ---------------------------------

    def pass2(self) -> None:
        inodes = self.out.inodes
        for dino, info in inodes.items():
            if not info.inode.is_dir:
                continue
            for _cookie, name, child, dtype in info.entries:
                target = inodes.get(child)
                if target is None:
                    why = "a damaged inode" if child in self.out.bad_inodes else "a free inode"
                    self.out.problem(f"directory {dino}: entry {name!r} points to {why} "
                                     f"({child})")
                    self.out.bad_entries.append((dino, name, why))
                    continue
                want = stat.S_IFMT(target.inode.mode) >> 12
                if dtype != want:
                    self.out.problem(f"directory {dino}: entry {name!r} has type {dtype}, "
                                     f"inode {child} is type {want}")
                    self.out.wrong_dtype.append((dino, name, child, want))
                if target.inode.is_dir:
                    if child == ROOT_INO or target.parents:
                        self.out.problem(f"directory {child} has a second name {name!r} in "
                                         f"directory {dino}")
                        self.out.extra_parents.append((dino, name, child))
                        continue
                    target.parents.append(dino)
                    info.subdirs += 1
                target.links += 1

    def pass3(self) -> None:
        inodes = self.out.inodes
        reached: set[int] = set()
        todo: list[int] = []
        if ROOT_INO not in inodes:
            # The repair recreates it empty: everything else is unreachable until it is
            # reconnected (lost+found first, as /lost+found, if it is still a directory).
            self.out.problem("the root directory (inode 1) is damaged: it will be recreated "
                             "empty and everything else reconnected in lost+found")
            self.out.root_missing = True
            self.out.counts_wrong = True
        else:
            reached.add(ROOT_INO)
            todo.append(ROOT_INO)
        while todo:
            info = inodes[todo.pop()]
            for _cookie, _name, child, _dtype in info.entries:
                target = inodes.get(child)
                if target is None or child in reached:
                    continue
                if target.inode.is_dir and target.parents and target.parents[0] != info.ino:
                    continue  # the extra name of a directory (reported in pass 2)
                reached.add(child)
                if target.inode.is_dir:
                    todo.append(child)
        for ino, info in inodes.items():
            if ino in reached:
                if info.inode.is_dir and ino != ROOT_INO and info.inode.parent != (
                    info.parents[0] if info.parents else 0
                ):
                    self.out.problem(f"directory {ino}: '..' is {info.inode.parent}, should be "
                                     f"{info.parents[0] if info.parents else '?'}")
                    self.out.counts_wrong = True
                continue
            if info.inode.nlink == 0 and info.inode.flags & INODE_FLAG_ORPHAN:
                continue  # deletion pending (pass 4)
            self.out.problem(f"inode {ino} is not reachable from the root")
            self.out.unreachable.append(ino)

    # -- pass 4: link counts and the orphan list --------------------------------------------

    def pass4(self) -> None:
        inodes = self.out.inodes
        state = self.store.state
        on_list: list[int] = []
        ino = state.orphan_head
        seen: set[int] = set()
        while ino:
            info = inodes.get(ino)
            if ino in seen or info is None or not info.inode.flags & INODE_FLAG_ORPHAN:
                why = "loops" if ino in seen else f"reaches inode {ino}, which is not an orphan"
                self.out.problem(f"orphan list {why}")
                self.out.orphan_list_damage = why
                break
            seen.add(ino)
            on_list.append(ino)
            ino = info.inode.orphan_next
        for ino, info in inodes.items():
            if info.inode.flags & INODE_FLAG_ORPHAN and ino not in seen:
                self.out.problem(f"inode {ino} is flagged as an orphan but not on the list")
                self.out.stray_orphan_flags.append(ino)
                if info.inode.nlink == 0 and info.links == 0:
                    on_list.append(ino)  # a deletion that lost its list: finish it
        for ino in on_list:
            info = inodes[ino]
            if info.inode.nlink == 0 and info.links == 0:
                self.out.orphans.append(ino)
        for ino, info in inodes.items():
            if ino in self.out.unreachable:
                continue
            want = 2 + info.subdirs if info.inode.is_dir else info.links
            if info.inode.nlink != want and not (ino in self.out.orphans and want == 0):
                self.out.problem(f"inode {ino}: link count is {info.inode.nlink}, should be "
                                 f"{want}")
                self.out.counts_wrong = True

    # -- pass 5: free space accounting ------------------------------------------------------

    def pass5(self) -> None:
        store = self.store
        blocks = store.blocks
        used = self.out.used_blocks
        total_free = 0
        for g in range(blocks.ngroups):
            if g % 256 == 0:
                with contextlib.suppress(CorruptionError):  # (reported below, group by group)
                    blocks.read_ahead(g, min(g + 256, blocks.ngroups))
            want = used.get(g, 0) | blocks.tail_mask(g)
            try:
                entry = blocks.summary_entry(g)
            except CorruptionError as exc:
                self.out.problem(f"block summary entry of group {g}: {exc}")
                self.out.bitmap_damage.append(f"block summary {g}")
                entry = None
            try:
                have = blocks.group_bits(g)
            except CorruptionError as exc:
                self.out.problem(f"block bitmap group {g}: {exc}")
                self.out.bitmap_damage.append(f"block bitmap {g}")
                have = None
            free = BPB - want.bit_count()
            total_free += free
            if have is not None and have != want:
                extra = (have & ~want).bit_count()
                missing = (want & ~have).bit_count()
                self.out.problem(f"block bitmap group {g}: {missing} used block(s) marked free, "
                                 f"{extra} free block(s) marked used")
                self.out.bitmap_damage.append(f"block bitmap {g}")
            elif entry is not None and not entry & UNINIT and entry & COUNT_MASK != free:
                self.out.problem(f"block summary of group {g} says {entry & COUNT_MASK} free, "
                                 f"counted {free}")
                self.out.bitmap_damage.append(f"block summary {g}")
        if store.state.free_blocks != total_free:
            self.out.problem(f"free block count is {store.state.free_blocks}, counted "
                             f"{total_free}")
            self.out.counts_wrong = True
        inodes = store.inodes
        valid = self.out.inodes
        total_ifree = 0
        in_use: dict[int, int] = {0: 1}  # inode 0 never exists: its bit is always set
        for ino in [*valid, *([ROOT_INO] if self.out.root_missing else [])]:
            g, off = divmod(ino, BPB)  # (a missing root is recreated: its inode stays in use)
            in_use[g] = in_use.get(g, 0) | 1 << off
        self.out.used_inodes = in_use
        for g in range(inodes.ngroups):
            want = inodes.tail_mask(g) | in_use.get(g, 0)
            total_ifree += BPB - want.bit_count()
            try:
                have = inodes.group_bits(g)
            except CorruptionError:
                continue  # reported in pass 1
            if have != want:
                self.out.problem(f"inode bitmap group {g} differs from the inodes in use")
                self.out.bitmap_damage.append(f"inode bitmap {g}")
        if store.state.free_inodes != total_ifree:
            self.out.problem(f"free inode count is {store.state.free_inodes}, counted "
                             f"{total_ifree}")
            self.out.counts_wrong = True

    # -- pass 6: one timeline ---------------------------------------------------------------

    def pass6(self) -> None:
        """Every metadata block was written by a transaction of this volume's history.

        Each block's header records the tid of the transaction that wrote it.  Replay and
        checkpoints only ever bring home images of committed transactions, and a recovery
        restarts the tid sequence above every tid the journal can hold, so a tid newer than
        the last committed one can only come from a transaction that never committed, or
        from another timeline: a journal replayed past a lost commit into stale
        transactions, or a block copied from another image of the volume.  (Inode table
        blocks have no header, and a tree block whose content is damaged is reported
        where it was read.)"""
        store = self.store
        last = store.committed_tid
        blocks: list[tuple[int, str]] = [(1, "state block")]
        for bitmap in (store.blocks, store.inodes):
            nsummary = -(-bitmap.ngroups // SUMMARY_ENTRIES)
            blocks.extend((b, f"{bitmap.name} bitmap summary")
                          for b in range(bitmap.summary_start, bitmap.summary_start + nsummary))
            for g in range(bitmap.ngroups):
                try:
                    if bitmap.summary_entry(g) & UNINIT:
                        continue  # never written
                except CorruptionError:
                    pass  # reported in pass 1/5; the bitmap block itself may still tell
                blocks.append((bitmap.bitmap_start + g, f"{bitmap.name} bitmap group {g}"))
        for ino, info in self.out.inodes.items():
            blocks.extend((b, f"tree of inode {ino}") for b in info.tree_blocks)
            blocks.extend((b, f"attributes of inode {ino}") for b in info.xattr_blocks)
        for blkno, what in blocks:
            tid = self._tids.get(blkno)
            if tid is None:
                try:
                    tid = store.block_tid(BlockNo(blkno))
                except (CorruptionError, OSError):
                    continue
            if tid is not None and tid > last:
                self.out.problem(f"block {blkno} ({what}): written by tid {tid}, newer than "
                                 f"the last committed tid {last}: it belongs to another "
                                 "timeline of the volume")
                self.out.wrong_timeline.append(blkno)


def superblock_problems(bdev: BlockDev) -> list[str]:
    """The superblock copies that cannot be used, as problems: undecodable, with a UUID that
    does not verify the volume's metadata, or disagreeing with the chosen copy (the rule is
    :func:`nexfs.store.volume.superblock_copies`, the one every open uses).  Call it before opening
    the store writable: that rewrites both copies from the chosen one (which is also how
    fsck -y repairs them)."""
    try:
        copies = superblock_copies(bdev)
    except FsError:
        return []  # opening the store refuses, and says why
    return [f"{name} superblock (block {where}) is unusable: {why}"
            for name, where, why in copies.damaged]


def scan(store: Store, progress: Callable[[str], None] | None = None) -> Scan:
    """Check every structure of the volume behind ``store``; changes nothing (the damage it
    meets is reported in the result, not turned into the store's error state)."""
    scanner = _Scanner(store, progress)
    if store.state_damage:
        scanner.out.problem(f"state block: {store.state_damage}")
        scanner.out.counts_wrong = True
    with store.tolerating_damage():
        scanner.pass1()
        scanner.pass2()
        scanner.pass3()
        scanner.pass4()
        scanner.pass5()
        scanner.pass6()
    return scanner.out
