"""The block map of a regular file: logical file blocks -> physical runs (extents).

An extent maps ``n`` consecutive logical blocks starting at ``lblk`` to ``n`` consecutive
physical blocks starting at ``phys``.  The map lives in a 128-byte area inside the inode:
a file with up to :data:`INLINE_MAX` extents keeps them there (no extra block, no extra
read); the eighth moves them all into a B+tree (:mod:`nexfs.ondisk.btree`, kind
:data:`~nexfs.ondisk.btree.KIND_EXTENTS`) keyed by logical block, whose root then sits in the area.
When punching leaves :data:`INLINE_BACK` extents or fewer the map moves back inline; the gap
between the two thresholds keeps a file that hovers around the limit from allocating and
freeing a tree block on every write.

Sequential appends stay one extent: an insert that continues its logical and physical
neighbour extends it in place.

Byte layout: docs/FORMAT.md, "Extent map".  Limits: files up to :data:`MAX_FILE_BLOCKS`
blocks (16 TiB at 4 KiB blocks); refusing larger sizes with EFBIG is the caller's job.
"""

from __future__ import annotations

import logging
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Final

from nexfs.ondisk.btree import KIND_EXTENTS, MAX_INNER, BTree, Node
from nexfs.ondisk.metablock import MetaStore
from nexfs.types import BlockNo, CorruptionError, InodeNo

log = logging.getLogger(__name__)

AREA_SIZE: Final = 128
AREA_HEADER = struct.Struct("<BBHIQ")
"""mode u8, inline count u8, reserved u16, tree node count u32, tree root u64."""
EXTENT = struct.Struct("<IIQ")
"""Inline extent record: logical start u32, length u32, physical start u64 (16 bytes)."""
TREE_VALUE = struct.Struct("<IQ")
"""Extent as a B+tree value (the key is the logical start): length u32, physical u64."""
INLINE_MAX: Final = (AREA_SIZE - AREA_HEADER.size) // EXTENT.size  # 7
_ZERO_AREA: Final = memoryview(bytes(AREA_SIZE))  # sliced without a copy
INLINE_BACK: Final = 5
MODE_INLINE: Final = 0
MODE_TREE: Final = 1

MAX_FILE_BLOCKS: Final = 1 << 32
"""Logical block numbers are u32: files up to 2^32 blocks (16 TiB)."""
MAX_EXTENT_LEN: Final = (1 << 31) - 1
"""Bit 31 of the length is reserved (zero) for a future 'unwritten' flag."""

_PUNCH_BATCH = 256  # extents collected before changing the tree, bounding memory on truncate

Extent = tuple[int, int, int]
"""(logical start, physical start, length)"""


class ExtentMap:
    """The extent map of one inode, over the inode's 128-byte ``area``.

    ``area`` is mutated in place and ``on_change()`` is called after every change so the
    inode gets dirtied.  The object decodes the inline records once; do not change ``area``
    behind its back while it is in use.  ``goal`` is an allocation hint for tree nodes
    (e.g. the inode's own block).
    """

    def __init__(self, store: MetaStore, owner: InodeNo | int, area: bytearray,
                 on_change: Callable[[], None], *, goal: BlockNo | None = None) -> None:
        if len(area) != AREA_SIZE:
            raise ValueError(f"extent area must be {AREA_SIZE} bytes")
        self.store = store
        self.owner = owner
        self.area = area
        self.on_change = on_change
        self.goal = goal
        self._nblocks: int | None = getattr(store, "nblocks", None)
        # Bumped by every change (in _save, which every change ends with): copies of the
        # map kept elsewhere (the short path's packed runs, nexfs/core/filedata.py) are
        # current while it has not moved.
        self.changes = 0
        mode, count, reserved, nodes, root = AREA_HEADER.unpack_from(area, 0)
        self._tree: BTree | None = None
        self._nodes = nodes
        # Inline mode: parallel lists, logical starts sorted (bisect on _lk).
        self._lk: list[int] = []
        self._rec: list[Extent] = []
        if reserved:
            raise self._bad("reserved field is not zero")
        if mode == MODE_INLINE:
            if count > INLINE_MAX or root or nodes:
                raise self._bad(f"inline header count={count} root={root} nodes={nodes}")
            prev_end = 0
            for i in range(count):
                lb, n, p = EXTENT.unpack_from(area, AREA_HEADER.size + i * EXTENT.size)
                reason = self._check(lb, p, n)
                if reason is None and lb < prev_end:
                    reason = "extents overlap or are out of order"
                if reason is not None:
                    raise self._bad(f"extent {i}: {reason}")
                prev_end = lb + n
                self._lk.append(lb)
                self._rec.append((lb, p, n))
        elif mode == MODE_TREE:
            if count or root == 0 or (self._nblocks is not None and root >= self._nblocks):
                raise self._bad(f"tree header count={count} root={root}")
            self._tree = self._make_tree(root)
        else:
            raise self._bad(f"unknown mode {mode}")

    # ----------------------------------------------------------------------------- helpers

    def _bad(self, reason: str) -> CorruptionError:
        # The inode's own block is the caller's knowledge; 0 marks "inside inode <owner>".
        return CorruptionError(0, f"extent map of inode {self.owner}", reason)

    def _check(self, lb: int, p: int, n: int) -> str | None:
        if n == 0 or n > MAX_EXTENT_LEN:
            return f"length {n} invalid"
        if lb + n > MAX_FILE_BLOCKS:
            return f"extent [{lb}, +{n}) beyond the maximum file size"
        if p == 0 or (self._nblocks is not None and p + n > self._nblocks):
            return f"physical run [{p}, +{n}) outside the volume"
        return None

    def leaf_check(self, keys: list[int], vals: list[bytes]) -> str | None:
        """Validate extent records when a tree leaf is read (once per read, then cached)."""
        prev_end = 0
        for k, v in zip(keys, vals, strict=True):
            if len(v) != TREE_VALUE.size:
                return f"extent value of {len(v)} bytes"
            n, p = TREE_VALUE.unpack(v)
            reason = self._check(k, p, n)
            if reason is None and k < prev_end:
                reason = "extents overlap"
            if reason is not None:
                return f"extent at {k}: {reason}"
            prev_end = k + n
        return None

    def _make_tree(self, root: int) -> BTree:
        return BTree(self.store, self.owner, root, KIND_EXTENTS, leaf_check=self.leaf_check,
                     goal=self.goal)

    def _save(self) -> None:
        """Write the header and the inline records back into the area, then notify."""
        area = self.area
        # (The zeros after the records come from one constant: no new bytes per change.)
        if self._tree is not None:
            self._nodes += self._tree.take_node_delta()
            AREA_HEADER.pack_into(area, 0, MODE_TREE, 0, 0, self._nodes, self._tree.root)
            area[AREA_HEADER.size:] = _ZERO_AREA[AREA_HEADER.size:]
        else:
            AREA_HEADER.pack_into(area, 0, MODE_INLINE, len(self._rec), 0, 0, 0)
            pos = AREA_HEADER.size
            for lb, p, n in self._rec:
                EXTENT.pack_into(area, pos, lb, n, p)
                pos += EXTENT.size
            area[pos:] = _ZERO_AREA[pos:]
        self.changes += 1
        self.on_change()

    # Primitive record operations, for both representations.

    def _seek_le(self, lblk: int) -> Extent | None:
        if self._tree is None:
            i = bisect_right(self._lk, lblk) - 1
            return self._rec[i] if i >= 0 else None
        e = self._tree.seek_le(lblk)
        if e is None:
            return None
        n, p = TREE_VALUE.unpack(e[1])
        return e[0], p, n

    def _get(self, lblk: int) -> Extent | None:
        """The extent starting exactly at ``lblk``."""
        if self._tree is None:
            i = bisect_left(self._lk, lblk)
            return self._rec[i] if i < len(self._lk) and self._lk[i] == lblk else None
        v = self._tree.get(lblk)
        if v is None:
            return None
        n, p = TREE_VALUE.unpack(v)
        return lblk, p, n

    def _scan(self, lblk: int) -> Iterator[Extent]:
        """Extents ending after ``lblk``, ascending (the one containing it first)."""
        if self._tree is None:
            i = bisect_right(self._lk, lblk) - 1
            if i < 0 or self._rec[i][0] + self._rec[i][2] <= lblk:
                i += 1
            yield from self._rec[i:]
            return
        first = self._seek_le(lblk)
        prev_end = 0
        if first is not None and first[0] + first[2] > lblk:
            prev_end = first[0] + first[2]
            yield first
        unpack = TREE_VALUE.unpack
        for k, v in self._tree.iter_from(lblk + 1):
            n, p = unpack(v)
            if k < prev_end:  # leaves are checked one by one; this catches overlap across
                raise CorruptionError(self._tree.root, "extent tree", f"extent at {k} overlaps")
            prev_end = k + n
            yield k, p, n

    def _put(self, lb: int, p: int, n: int) -> None:
        if self._tree is None:
            i = bisect_left(self._lk, lb)
            self._lk.insert(i, lb)
            self._rec.insert(i, (lb, p, n))
        else:
            self._tree.insert(lb, TREE_VALUE.pack(n, p))

    def _set(self, lb: int, p: int, n: int) -> None:
        """Change the extent starting at ``lb`` (same start)."""
        if self._tree is None:
            self._rec[bisect_left(self._lk, lb)] = (lb, p, n)
        else:
            self._tree.replace(lb, TREE_VALUE.pack(n, p))

    def _del(self, lb: int) -> None:
        if self._tree is None:
            i = bisect_left(self._lk, lb)
            del self._lk[i]
            del self._rec[i]
        else:
            self._tree.delete(lb)

    def _to_tree_if_full(self) -> None:
        if self._tree is None and len(self._rec) > INLINE_MAX:
            tree = self._make_tree(0)
            for lb, p, n in self._rec:
                tree.insert(lb, TREE_VALUE.pack(n, p))
            self._tree = tree
            self._nodes = 0
            self._lk, self._rec = [], []

    def _to_inline_if_small(self) -> None:
        tree = self._tree
        if tree is None:
            return
        if tree.root != 0:
            recs = list(islice(self.extents(), INLINE_BACK + 1))
            if len(recs) > INLINE_BACK:
                return
            tree.destroy()
        else:
            recs = []
        self._nodes += tree.take_node_delta()
        if self._nodes != 0:
            log.warning("extent tree of inode %s: node count off by %d", self.owner,
                        self._nodes)
        self._tree = None
        self._nodes = 0
        self._rec = recs
        self._lk = [r[0] for r in recs]

    # ----------------------------------------------------------------------------- queries

    @property
    def is_inline(self) -> bool:
        """True while the extents live in the inode itself (no tree block)."""
        return self._tree is None

    def tree_blocks(self) -> int:
        """Number of B+tree nodes (kept in the area: O(1))."""
        return 0 if self._tree is None else self._nodes + self._tree.node_delta

    def map(self, lblk: int, count: int) -> list[tuple[int, int, int]]:
        """Runs covering [lblk, lblk+count) in order, as (lblk, phys, n); phys 0 is a hole."""
        if lblk < 0 or count < 0:
            raise ValueError("negative block range")
        if count == 0:
            return []
        end = lblk + count
        out: list[tuple[int, int, int]] = []
        pos = lblk
        for lb, p, n in self._scan(lblk):
            if lb >= end:
                break
            if lb > pos:
                out.append((pos, 0, lb - pos))
                pos = lb
            e = min(lb + n, end)
            out.append((pos, p + (pos - lb), e - pos))
            pos = e
            if pos >= end:
                break
        if pos < end:
            out.append((pos, 0, end - pos))
        return out

    def last(self) -> tuple[int, int, int] | None:
        """The extent with the highest logical start, as (lblk, phys, n), or None."""
        return self._seek_le(MAX_FILE_BLOCKS)

    def inline_extents(self) -> list[tuple[int, int, int]] | None:
        """The extents as (lblk, phys, n) when the map is inline (no tree nodes), else None."""
        return None if self._tree is not None else list(self._rec)

    def before(self, lblk: int) -> tuple[int, int, int] | None:
        """The extent with the highest logical start below ``lblk``, or None (walking a
        map backwards: each call is one descent)."""
        return self._seek_le(lblk - 1) if lblk > 0 else None

    def extents(self, lblk: int = 0) -> Iterator[tuple[int, int, int]]:
        """All extents ending after ``lblk``, ascending, as (lblk, phys, n)."""
        return self._scan(lblk)

    def worst_case_new_blocks(self, n_inserts: int = 1) -> int:
        """Tree nodes ``n_inserts`` calls of insert/punch may allocate (reserve them first)."""
        if n_inserts <= 0:
            return 0
        if self._tree is not None:
            return self._tree.worst_case_new_blocks(n_inserts)
        if len(self._rec) + n_inserts <= INLINE_MAX:
            return 0
        # Moving inline records to a tree takes one leaf; then inserts into a 1-level tree.
        growth = 1 + n_inserts // (MAX_INNER // 2)
        return 1 + n_inserts * (1 + growth) + growth

    # ----------------------------------------------------------------------------- changes

    def insert(self, lblk: int, phys: int, n: int) -> None:
        """Map [lblk, lblk+n) to [phys, phys+n); the range must be a hole (ValueError if not).

        Extends a neighbour that continues both logically and physically instead of adding
        a record, so sequential appends stay one extent.
        """
        reason = self._check(lblk, phys, n) if lblk >= 0 else "negative logical block"
        if reason is not None:
            raise ValueError(reason)
        end = lblk + n
        prev = self._seek_le(end - 1)
        if prev is not None and prev[0] + prev[2] > lblk:
            raise ValueError(f"[{lblk}, {end}) overlaps the extent at {prev[0]}")
        nxt = self._get(end)
        if prev is not None and not (prev[0] + prev[2] == lblk and prev[1] + prev[2] == phys):
            prev = None  # not a continuation: nothing to join on the left
        if nxt is not None and nxt[1] != phys + n:
            nxt = None
        left = prev[2] if prev is not None else 0
        if nxt is not None and left + n + nxt[2] > MAX_EXTENT_LEN:
            nxt = None
        if prev is not None and prev[2] + n > MAX_EXTENT_LEN:
            prev = None
        if prev is not None:
            if nxt is not None:
                self._del(nxt[0])
            self._set(prev[0], prev[1], prev[2] + n + (nxt[2] if nxt is not None else 0))
        elif nxt is not None:
            self._del(nxt[0])
            self._put(lblk, phys, n + nxt[2])
        else:
            self._put(lblk, phys, n)
        self._to_tree_if_full()
        self._save()

    def punch(self, lblk: int, n: int | None = None) -> list[tuple[int, int]]:
        """Unmap [lblk, lblk+n) (n None: to the end, i.e. truncate).

        Extents straddling an edge are split.  Returns the freed physical runs as
        (phys, n), adjacent runs joined, for the caller to free.  Tree nodes that empty are
        freed here; the map returns inline when few extents are left.
        """
        if lblk < 0 or (n is not None and n < 0):
            raise ValueError("negative block range")
        end = MAX_FILE_BLOCKS if n is None else min(lblk + n, MAX_FILE_BLOCKS)
        freed: list[tuple[int, int]] = []

        def free(p: int, c: int) -> None:
            if freed and freed[-1][0] + freed[-1][1] == p:
                freed[-1] = (freed[-1][0], freed[-1][1] + c)
            else:
                freed.append((p, c))

        changed = False
        while lblk < end:
            batch = [e for e in islice(self._scan(lblk), _PUNCH_BATCH) if e[0] < end]
            for lb, p, c in batch:
                e = lb + c
                changed = True
                if lb < lblk:  # keep the head
                    self._set(lb, p, lblk - lb)
                    free(p + (lblk - lb), min(e, end) - lblk)
                else:
                    self._del(lb)
                    free(p, min(e, end) - lb)
                if e > end:  # keep the tail
                    self._put(end, p + (end - lb), e - end)
            if len(batch) < _PUNCH_BATCH:
                break
        if changed:
            self._to_tree_if_full()  # a split in the middle can add the eighth record
            self._to_inline_if_small()
            self._save()
        return freed

    def destroy(self) -> list[tuple[int, int]]:
        """Free the tree (if any) and empty the map; returns every physical run (phys, n)."""
        freed: list[tuple[int, int]] = []
        if self._tree is None:
            freed = [(p, n) for _, p, n in self._rec]
        else:
            unpack = TREE_VALUE.unpack

            def on_leaf(node: Node) -> None:
                for v in node.vals:
                    n, p = unpack(v)
                    freed.append((p, n))

            self._tree.destroy(on_leaf)
            self._tree.take_node_delta()
            self._tree = None
        self._nodes = 0
        self._lk, self._rec = [], []
        self._save()
        return freed
