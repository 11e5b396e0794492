"""A generic B+tree of u64 keys and variable-length byte values, stored in 4 KiB metadata blocks.

Used by the file block map (:mod:`nexfs.ondisk.extents`), the directory index
(:mod:`nexfs.ondisk.dirindex`) and the extended attributes (:mod:`nexfs.ondisk.xattr_tree`).
A tree is named by its root block number
(0 = empty, no block allocated); every node carries the owning inode number and a tree kind
tag, and both are checked on every visit, so a node can never be grafted into another tree.

Nodes are :class:`Node` objects held in the metadata store's cache: lists of keys and values
that operations change in place (bisect, list insert) before calling ``store.dirty``; they are
encoded once, when the transaction commits.  The tree itself keeps no node between operations
(the cache bounds memory), and no sibling pointers: iteration re-descends from the root at
each leaf boundary using the fence keys of the interior nodes, which keeps nodes independent
(a split or merge dirties only the nodes on one path) and makes a suspended iterator safe
against changes made between two ``next()`` calls.

On-disk layout: docs/FORMAT.md, "B+tree nodes".  Why it is built this way: docs/DESIGN.md.

Concurrency invariant (as for the whole store): synchronous, single-threaded, no ``await``.
"""

from __future__ import annotations

import errno
import logging
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from itertools import accumulate, pairwise
from typing import Final

from nexfs.ondisk.metablock import (
    BLOCK_SIZE,
    HEADER_SIZE,
    MAGIC_BTREE_INNER,
    MAGIC_BTREE_LEAF,
    MetaBlock,
    MetaStore,
    check_header,
    pack_header,
    seal_block,
)
from nexfs.types import BlockNo, CorruptionError, FsError, InodeNo

log = logging.getLogger(__name__)

# Tree kind tags (node byte 33): a node of one kind is refused where another is expected.
KIND_EXTENTS: Final = 1
KIND_DIR: Final = 2
KIND_XATTR: Final = 3
KIND_TEST: Final = 0xFE  # for unit tests only; never written by the filesystem
_KIND_NAMES = {KIND_EXTENTS: "extent tree", KIND_DIR: "directory index",
               KIND_XATTR: "xattr tree", KIND_TEST: "test tree"}

NODE_HEADER = struct.Struct("<BBHI")
"""After the common header: level u8, kind u8, count u16, reserved u32 (zero)."""
NODE_HDR_END: Final = HEADER_SIZE + NODE_HEADER.size  # 40
CAPACITY: Final = BLOCK_SIZE - NODE_HDR_END  # 4056 payload bytes per node

LEAF_ENTRY_OVERHEAD: Final = 10  # u64 key + u16 value length
INNER_ENTRY: Final = 16  # u64 key + u64 child block number
MAX_INNER: Final = CAPACITY // INNER_ENTRY  # 253 children

MAX_VALUE: Final = 1024
"""Largest value in bytes (1/4 block): a leaf holds at least 3 maximal entries, and a leaf
overflowing by one maximal entry always splits into two halves that fit."""

MAX_KEY: Final = (1 << 64) - 1
_NO_HI: Final = 1 << 64  # upper fence of the rightmost nodes: above every key
MAX_LEVELS: Final = 16
"""Depth limit: a node's level is 0..15.  Levels strictly decrease towards the leaves, so a
hostile image cannot make a walk loop or recurse deeper than this."""

# Delete rebalancing: a node below 1/4 full is merged into a sibling when both fit in 3/4 of a
# block, so the merged node has room to grow before it splits again (no split/merge ping-pong).
_MERGE_BELOW: Final = CAPACITY // 4
_MERGE_FIT: Final = CAPACITY * 3 // 4

LeafCheck = Callable[[list[int], list[bytes]], str | None]
"""Per-kind validator of a decoded leaf: returns a reason string when the entries are bad."""


class Node(MetaBlock):
    """A decoded B+tree node.

    ``keys`` are strictly ascending.  A leaf (level 0) has ``vals`` (bytes, parallel to keys);
    an interior node has ``kids`` (child block numbers) where every key of child ``i`` is
    ``>= keys[i]`` for ``i > 0`` and ``< keys[i + 1]``.  ``keys[0]`` of an interior node is
    always 0: child 0 takes everything below ``keys[1]``, so a new smallest key never has to
    update the ancestors.  ``used`` is the encoded payload size in bytes, kept up to date so
    splits never re-encode.
    """

    __slots__ = ("keys", "kids", "kind", "level", "owner", "used", "vals")

    def __init__(self, blkno: BlockNo, owner: int, kind: int, level: int, keys: list[int],
                 vals: list[bytes], kids: list[int], used: int) -> None:
        super().__init__(blkno)
        self.owner = owner
        self.kind = kind
        self.level = level
        self.keys = keys
        self.vals = vals
        self.kids = kids
        self.used = used

    def encode(self, out: memoryview, volume_seed: int, tid: int) -> None:
        n = len(self.keys)
        if self.level == 0:
            pack_header(out, MAGIC_BTREE_LEAF, self.blkno, self.owner, tid)
            NODE_HEADER.pack_into(out, HEADER_SIZE, 0, self.kind, n, 0)
            pos = NODE_HDR_END
            struct.pack_into(f"<{n}Q", out, pos, *self.keys)
            pos += 8 * n
            struct.pack_into(f"<{n}H", out, pos, *map(len, self.vals))
            pos += 2 * n
            data = b"".join(self.vals)
            end = pos + len(data)
            out[pos:end] = data
        else:
            pack_header(out, MAGIC_BTREE_INNER, self.blkno, self.owner, tid)
            NODE_HEADER.pack_into(out, HEADER_SIZE, self.level, self.kind, n, 0)
            pos = NODE_HDR_END
            struct.pack_into(f"<{n}Q", out, pos, *self.keys)
            pos += 8 * n
            struct.pack_into(f"<{n}Q", out, pos, *self.kids)
            end = pos + 8 * n
        if end > BLOCK_SIZE:  # an internal bug, never a property of the image
            raise AssertionError(f"B+tree node {self.blkno} overflows ({end} bytes)")
        out[end:BLOCK_SIZE] = bytes(BLOCK_SIZE - end)
        seal_block(out, volume_seed, self.blkno)


def decode_node(blkno: BlockNo, raw: memoryview, *, volume_seed: int, owner: int, kind: int,
                nblocks: int | None, leaf_check: LeafCheck | None = None) -> Node:
    """Verify and decode one node; raise CorruptionError naming the block on anything wrong."""
    structure = _KIND_NAMES.get(kind, "B+tree") + " node"
    magic, _, _ = check_header(raw, blkno, (MAGIC_BTREE_LEAF, MAGIC_BTREE_INNER), volume_seed,
                               structure, owner)
    buf = bytes(raw)  # one copy; slicing bytes below then yields independent values
    level, got_kind, n, reserved = NODE_HEADER.unpack_from(buf, HEADER_SIZE)

    def bad(reason: str) -> CorruptionError:
        return CorruptionError(blkno, structure, reason)

    if got_kind != kind:
        raise bad(f"tree kind {got_kind}, expected {kind}")
    if reserved:
        raise bad("reserved header field is not zero")
    if (level == 0) != (magic == MAGIC_BTREE_LEAF) or level >= MAX_LEVELS:
        raise bad(f"level {level} does not fit magic {magic:#010x}")
    if n == 0:
        raise bad("empty node")
    pos = NODE_HDR_END
    if level == 0:
        if pos + n * LEAF_ENTRY_OVERHEAD > BLOCK_SIZE:
            raise bad(f"entry count {n} overruns the block")
        keys = list(struct.unpack_from(f"<{n}Q", buf, pos))
        pos += 8 * n
        lens = struct.unpack_from(f"<{n}H", buf, pos)
        pos += 2 * n
        total = sum(lens)
        if pos + total > BLOCK_SIZE:
            raise bad("values overrun the block")
        if max(lens) > MAX_VALUE:
            raise bad(f"value of {max(lens)} bytes exceeds the maximum")
        ends = list(accumulate(lens, initial=pos))
        vals = [buf[a:b] for a, b in pairwise(ends)]
        kids: list[int] = []
        used = n * LEAF_ENTRY_OVERHEAD + total
    else:
        if n > MAX_INNER:
            raise bad(f"entry count {n} overruns the block")
        keys = list(struct.unpack_from(f"<{n}Q", buf, pos))
        kids = list(struct.unpack_from(f"<{n}Q", buf, pos + 8 * n))
        vals = []
        used = n * INNER_ENTRY
        limit = nblocks if nblocks is not None else MAX_KEY
        if keys[0] != 0:
            raise bad(f"first key of an interior node is {keys[0]}, not 0")
        for child in kids:
            if child == 0 or child >= limit or child == blkno:
                raise bad(f"child block number {child} out of range")
    if any(a >= b for a, b in pairwise(keys)):
        raise bad("keys out of order")
    if leaf_check is not None and level == 0:
        reason = leaf_check(keys, vals)
        if reason is not None:
            raise bad(reason)
    return Node(blkno, owner, kind, level, keys, vals, kids, used)


class BTree:
    """One B+tree: ``root`` names it (0 = empty) and changes as the tree grows and shrinks;
    the caller persists ``root`` (in an inode or inline area) after every mutation.

    ``node_delta`` accumulates +1 per node allocated and -1 per node freed, for callers that
    keep a node count (the extent map does; see :meth:`take_node_delta`).
    """

    __slots__ = ("_name", "goal", "kind", "leaf_check", "node_delta", "owner",
                 "root", "store")

    def __init__(self, store: MetaStore, owner: InodeNo | int, root: BlockNo | int, kind: int,
                 *, leaf_check: LeafCheck | None = None, goal: BlockNo | None = None) -> None:
        self.store = store
        self.owner = owner
        self.root = root
        self.kind = kind
        self.leaf_check = leaf_check
        self.goal = goal  # allocation hint for the first node of an empty tree
        self.node_delta = 0
        self._name = _KIND_NAMES.get(kind, "B+tree") + " node"

    # ----------------------------------------------------------------------------- loading

    def _decode(self, blkno: BlockNo, raw: memoryview) -> Node:
        return decode_node(blkno, raw, volume_seed=self.store.volume_seed, owner=self.owner,
                           kind=self.kind, nblocks=getattr(self.store, "nblocks", None),
                           leaf_check=self.leaf_check)

    def _load(self, blkno: int, level: int | None, lo: int, hi: int) -> Node:
        """Fetch a node and check what the cache cannot: that it belongs here.

        The cache may hold the block decoded by someone else (a hostile image can point two
        structures at one block), so type, owner, kind, level and key range (``lo`` <= keys
        < ``hi``; ``_NO_HI`` for none) are checked on every visit: a handful of comparisons
        in one expression, the precise complaint is worked out only on failure.
        """
        node = self.store.get(blkno, self._decode)  # type: ignore[arg-type]  # int, hot path
        if node.__class__ is Node and node.owner == self.owner and node.kind == self.kind:
            keys = node.keys
            lvl = node.level
            if ((level is None or lvl == level) and keys and keys[-1] < hi
                    and (keys[0] >= lo if lvl == 0 else len(keys) == 1 or keys[1] >= lo)):
                return node
        raise self._reject(blkno, node, level, lo, hi)

    def _reject(self, blkno: int, node: object, level: int | None, lo: int,
                hi: int) -> CorruptionError:
        def bad(reason: str) -> CorruptionError:
            return CorruptionError(blkno, self._name, reason)

        if not isinstance(node, Node):
            return bad("block belongs to another structure")
        if node.owner != self.owner:
            return bad(f"owned by inode {node.owner}, expected {self.owner}")
        if node.kind != self.kind:
            return bad(f"tree kind {node.kind}, expected {self.kind}")
        if level is not None and node.level != level:
            return bad(f"level {node.level} where the parent expects {level}")
        if not node.keys:  # only a node emptied in this operation, never one read from disk
            return bad("empty node")
        return bad(f"keys [{node.keys[0]}, {node.keys[-1]}] outside the parent's range "
                   f"[{lo}, {hi})")

    def _descend(self, key: int) -> tuple[list[Node], list[int], int, int]:
        """Path from the root to the leaf that should hold ``key``.

        Returns (nodes root..leaf, child index taken in each interior node, the leaf's lower
        fence, its upper fence or ``_NO_HI`` when it is the rightmost leaf).
        """
        nodes: list[Node] = []
        idxs: list[int] = []
        lo, hi = 0, _NO_HI
        node = self._load(self.root, None, lo, hi)
        load = self._load
        while True:
            nodes.append(node)
            if node.level == 0:
                return nodes, idxs, lo, hi
            keys = node.keys
            i = bisect_right(keys, key) - 1  # >= 0: keys[0] is 0
            if i > 0:
                lo = keys[i]
            if i + 1 < len(keys):
                hi = keys[i + 1]
            idxs.append(i)
            node = load(node.kids[i], node.level - 1, lo, hi)

    def _alloc(self, goal: int | None) -> BlockNo:
        blk = self.store.alloc_meta(BlockNo(goal) if goal else self.goal, InodeNo(self.owner))
        self.node_delta += 1
        return blk

    def _free(self, blkno: int) -> None:
        self.store.free_meta(BlockNo(blkno))
        self.node_delta -= 1

    def take_node_delta(self) -> int:
        """Return and reset the count of nodes allocated minus nodes freed."""
        d, self.node_delta = self.node_delta, 0
        return d

    # ----------------------------------------------------------------------------- lookups

    def get(self, key: int) -> bytes | None:
        """The value stored under ``key``, or None."""
        if self.root == 0:
            return None
        leaf = self._descend(key)[0][-1]
        keys = leaf.keys
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            return leaf.vals[i]
        return None

    def seek_ge(self, key: int) -> tuple[int, bytes] | None:
        """The first entry with a key >= ``key``, or None."""
        while self.root != 0:
            nodes, _, _, hi = self._descend(key)
            leaf = nodes[-1]
            i = bisect_left(leaf.keys, key)
            if i < len(leaf.keys):
                return leaf.keys[i], leaf.vals[i]
            if hi == _NO_HI:
                return None
            # Everything >= the fence lives in later subtrees; the fence strictly grows, and
            # in a well-formed tree one retry always finds an entry.
            key = hi
        return None

    def seek_le(self, key: int) -> tuple[int, bytes] | None:
        """The last entry with a key <= ``key``, or None."""
        while self.root != 0:
            nodes, _, lo, _ = self._descend(key)
            leaf = nodes[-1]
            i = bisect_right(leaf.keys, key) - 1
            if i >= 0:
                return leaf.keys[i], leaf.vals[i]
            if lo == 0:
                return None
            key = lo - 1  # interior keys are lower bounds: the predecessor is left of the fence
        return None

    def last(self) -> tuple[int, bytes] | None:
        """The entry with the largest key, or None for an empty tree."""
        return self.seek_le(MAX_KEY)

    def iter_from(self, key: int = 0) -> Iterator[tuple[int, bytes]]:
        """Entries with keys >= ``key`` in ascending order.

        Works a leaf at a time: the rest of the current leaf is copied, then the next leaf is
        found by descending again from the upper fence.  The caller may stop at any point, and
        may even change the tree between two ``next()`` calls: entries it did not touch are
        then neither skipped nor repeated (entries it touched may be seen in either state).
        """
        while self.root != 0:
            nodes, _, _, hi = self._descend(key)
            leaf = nodes[-1]
            i = bisect_left(leaf.keys, key)
            keys = leaf.keys[i:]
            vals = leaf.vals[i:]
            yield from zip(keys, vals, strict=True)
            if hi == _NO_HI:
                return
            key = hi

    # ----------------------------------------------------------------------------- mutation

    def insert(self, key: int, value: bytes) -> None:
        """Add a new entry; ValueError if ``key`` is already present."""
        if not 0 <= key <= MAX_KEY:
            raise ValueError(f"key {key} out of range")
        if len(value) > MAX_VALUE:
            raise ValueError(f"value of {len(value)} bytes exceeds MAX_VALUE")
        value = bytes(value)
        if self.root == 0:
            blk = self._alloc(None)
            leaf = Node(blk, self.owner, self.kind, 0, [key], [value], [],
                        LEAF_ENTRY_OVERHEAD + len(value))
            self.store.put_new(leaf)
            self.root = blk
            return
        nodes, idxs, _, _ = self._descend(key)
        keys = nodes[-1].keys
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            raise ValueError(f"key {key} already present")
        self._insert_at(nodes, idxs, i, key, value)

    def insert_if_none_in(self, lo: int, hi: int, key: int,
                          value: bytes) -> tuple[int, bytes] | None:
        """Insert ``key`` (lo <= key < hi) if no key in [lo, hi) exists, in one descent, and
        return None; otherwise change nothing and return the first entry of the range.

        The directory index and the xattrs use it to claim a fresh hash class.
        """
        if not lo <= key < hi or key > MAX_KEY:
            raise ValueError("key outside the range")
        if self.root == 0:
            self.insert(key, value)
            return None
        nodes, idxs, _, fence = self._descend(lo)
        keys = nodes[-1].keys
        i = bisect_left(keys, lo)
        if i < len(keys):
            if keys[i] < hi:
                return keys[i], nodes[-1].vals[i]
        elif fence < hi:  # the range goes on in the next leaf: rare, take the long way
            first = self.seek_ge(lo)
            if first is not None and first[0] < hi:
                return first
            self.insert(key, value)
            return None
        if len(value) > MAX_VALUE:
            raise ValueError(f"value of {len(value)} bytes exceeds MAX_VALUE")
        # Nothing in [lo, hi) here, and key < keys[i] (or < fence): it belongs at i.
        self._insert_at(nodes, idxs, i, key, bytes(value))
        return None

    def _insert_at(self, nodes: list[Node], idxs: list[int], i: int, key: int,
                   value: bytes) -> None:
        leaf = nodes[-1]
        leaf.keys.insert(i, key)
        leaf.vals.insert(i, value)
        leaf.used += LEAF_ENTRY_OVERHEAD + len(value)
        self.store.dirty(leaf)
        if leaf.used > CAPACITY:
            self._split_path(nodes, idxs, i)

    def replace(self, key: int, value: bytes) -> bytes:
        """Change the value of an existing entry (KeyError if absent); returns the old value."""
        if len(value) > MAX_VALUE:
            raise ValueError(f"value of {len(value)} bytes exceeds MAX_VALUE")
        if self.root == 0:
            raise KeyError(key)
        nodes, idxs, _, _ = self._descend(key)
        leaf = nodes[-1]
        i = bisect_left(leaf.keys, key)
        if i == len(leaf.keys) or leaf.keys[i] != key:
            raise KeyError(key)
        old = leaf.vals[i]
        leaf.vals[i] = bytes(value)
        leaf.used += len(value) - len(old)
        self.store.dirty(leaf)
        if leaf.used > CAPACITY:
            self._split_path(nodes, idxs, i)
        elif leaf.used < _MERGE_BELOW:
            self._rebalance(nodes, idxs)
        return old

    def delete(self, key: int) -> bytes:
        """Remove an entry and return its value; KeyError if absent."""
        if self.root == 0:
            raise KeyError(key)
        nodes, idxs, _, _ = self._descend(key)
        leaf = nodes[-1]
        keys = leaf.keys
        i = bisect_left(keys, key)
        if i == len(keys) or keys[i] != key:
            raise KeyError(key)
        return self._remove_at(nodes, idxs, i)

    def delete_first_if(self, lo: int, hi: int, at: int, tail: bytes) -> tuple[int, bytes] | None:
        """Remove the first entry of [lo, hi) if its value from byte ``at`` on is ``tail``,
        in one descent, and return it as (key, value); otherwise (no entry in the range
        here, or the first one is another) change nothing and return None.

        The directory index removes a name with it: nearly always the first (only) entry
        of its hash class, found and removed where a search and a delete took two descents.
        """
        if self.root == 0:
            return None
        nodes, idxs, _, _ = self._descend(lo)
        leaf = nodes[-1]
        keys = leaf.keys
        i = bisect_left(keys, lo)
        if i == len(keys) or keys[i] >= hi or leaf.vals[i][at:] != tail:
            return None  # (a range that starts in the next leaf: the caller's long way)
        key = keys[i]
        return key, self._remove_at(nodes, idxs, i)

    def _remove_at(self, nodes: list[Node], idxs: list[int], i: int) -> bytes:
        """Remove entry ``i`` of the leaf at the end of the descent ``nodes``/``idxs``,
        rebalancing when the leaf falls below the merge threshold; returns its value."""
        leaf = nodes[-1]
        del leaf.keys[i]
        old = leaf.vals.pop(i)
        leaf.used -= LEAF_ENTRY_OVERHEAD + len(old)
        self.store.dirty(leaf)
        if leaf.used < _MERGE_BELOW:
            self._rebalance(nodes, idxs)
        return old

    def _split_path(self, nodes: list[Node], idxs: list[int], pos: int) -> None:
        """Split the overflowing leaf, then every ancestor that overflows in turn.

        ``pos`` is where the entry went in the overflowing node: an entry appended at the end
        (sequential appends: file extents, xattr chunks) splits off just the last entry, so
        such trees fill their nodes instead of leaving them half empty.
        """
        depth = len(nodes) - 1
        while True:
            node = nodes[depth]
            at_end = pos == len(node.keys) - 1
            right, sep = self._split_node(node, at_end)
            if depth == 0:
                if node.level + 1 >= MAX_LEVELS:
                    raise FsError(errno.ENOSPC, "B+tree depth limit reached")
                blk = self._alloc(node.blkno)
                root = Node(blk, self.owner, self.kind, node.level + 1,
                            [0, sep], [], [node.blkno, right.blkno], 2 * INNER_ENTRY)
                self.store.put_new(root)
                self.root = blk
                return
            depth -= 1
            parent = nodes[depth]
            pos = idxs[depth] + 1
            parent.keys.insert(pos, sep)
            parent.kids.insert(pos, right.blkno)
            parent.used += INNER_ENTRY
            self.store.dirty(parent)
            if parent.used <= CAPACITY:
                return

    def _split_node(self, node: Node, at_end: bool) -> tuple[Node, int]:
        """Move the upper part of ``node`` into a new right sibling, split by encoded size.

        Returns the sibling and its separator key (its smallest key for a leaf; for an
        interior node the key that moves up, replaced by the implicit 0 in the sibling).
        """
        n = len(node.keys)
        if node.level == 0:
            if at_end:
                s = n - 1
            else:
                # Split near half the bytes, putting the straddling entry on the side that
                # balances better; each side keeps >= 1 entry (n >= 4 on overflow).
                half = node.used // 2
                acc = 0
                s = n - 1
                for j, v in enumerate(node.vals):
                    w = LEAF_ENTRY_OVERHEAD + len(v)
                    if acc + w > half:
                        s = j + 1 if acc + w - half < half - acc else j
                        break
                    acc += w
                s = min(max(s, 1), n - 1)
            rvals = node.vals[s:]
            del node.vals[s:]
            rused = sum(map(len, rvals)) + LEAF_ENTRY_OVERHEAD * len(rvals)
            rkids: list[int] = []
        else:
            s = n - 1 if at_end else n // 2
            rkids = node.kids[s:]
            del node.kids[s:]
            rvals = []
            rused = INNER_ENTRY * len(rkids)
        rkeys = node.keys[s:]
        del node.keys[s:]
        sep = rkeys[0]
        if node.level > 0:
            rkeys[0] = 0
        node.used -= rused
        blk = self._alloc(node.blkno)
        right = Node(blk, self.owner, self.kind, node.level, rkeys, rvals, rkids, rused)
        self.store.put_new(right)
        self.store.dirty(node)
        return right, sep

    def _rebalance(self, nodes: list[Node], idxs: list[int]) -> None:
        """After a removal: free empty nodes, merge small ones, collapse a one-child root."""
        depth = len(nodes) - 1
        while depth > 0:
            node = nodes[depth]
            parent = nodes[depth - 1]
            pi = idxs[depth - 1]
            if not node.keys:
                self._drop_child(parent, pi)
                self._free(node.blkno)
            elif node.used < _MERGE_BELOW and len(parent.keys) > 1:
                if not self._merge(parent, pi, node):
                    break
            else:
                break
            if parent.used >= _MERGE_BELOW:
                break
            depth -= 1
        self._shrink_root(nodes[0])

    def _drop_child(self, parent: Node, i: int) -> None:
        del parent.keys[i]
        del parent.kids[i]
        if i == 0 and parent.keys:
            parent.keys[0] = 0  # the new child 0 now takes everything below keys[1]
        parent.used -= INNER_ENTRY
        self.store.dirty(parent)

    def _merge(self, parent: Node, pi: int, node: Node) -> bool:
        """Merge ``node`` (child ``pi`` of ``parent``) with a sibling if both fit comfortably."""
        if pi + 1 < len(parent.keys):
            left, li = node, pi
            hi = parent.keys[pi + 2] if pi + 2 < len(parent.keys) else _NO_HI
            right = self._load(parent.kids[pi + 1], node.level, parent.keys[pi + 1], hi)
        else:
            right, li = node, pi - 1
            left = self._load(parent.kids[li], node.level, 0, parent.keys[pi])
        if left.used + right.used > _MERGE_FIT:
            return False
        if left.level == 0:
            left.keys.extend(right.keys)
        else:  # right's implicit 0 becomes the separator it had in the parent
            left.keys.append(parent.keys[li + 1])
            left.keys.extend(right.keys[1:])
        left.vals.extend(right.vals)
        left.kids.extend(right.kids)
        left.used += right.used
        self.store.dirty(left)
        self._drop_child(parent, li + 1)
        self._free(right.blkno)
        return True

    def _shrink_root(self, root: Node) -> None:
        while True:
            if not root.keys:
                self._free(root.blkno)
                self.root = 0
                return
            if root.level == 0 or len(root.keys) > 1:
                return
            child = self._load(root.kids[0], root.level - 1, 0, _NO_HI)
            self._free(root.blkno)
            self.root = child.blkno
            root = child

    # ----------------------------------------------------------------------------- whole tree

    def levels(self) -> int:
        """Number of levels (0 for an empty tree, 1 for a lone leaf)."""
        if self.root == 0:
            return 0
        return self._load(self.root, None, 0, _NO_HI).level + 1

    def worst_case_new_blocks(self, n_inserts: int = 1) -> int:
        """Upper bound on the nodes ``n_inserts`` inserts (or growing replaces) may allocate.

        One insert splits at most one node per level plus a new root: levels + 1.  Over many
        inserts the height can grow; a new root needs >= 126 further splits below it before it
        can split again, hence the ``growth`` term.
        """
        if n_inserts <= 0:
            return 0
        levels = self.levels()
        extra = 0
        if levels == 0:  # the first insert allocates a lone leaf
            extra, levels, n_inserts = 1, 1, n_inserts - 1
            if n_inserts == 0:
                return extra
        if n_inserts == 1:
            return extra + levels + 1
        growth = 1 + n_inserts // (MAX_INNER // 2)
        return extra + n_inserts * (levels + growth) + growth

    def _walk(self, visit_leaf: bool) -> Iterator[tuple[int, Node | None, int]]:
        """Post-order walk yielding (block, node or None, level); leaves are loaded only when
        ``visit_leaf``.  A block reached twice means a corrupt (shared) subtree."""
        if self.root == 0:
            return
        seen: set[int] = set()
        root = self._load(self.root, None, 0, _NO_HI)
        # Stack of (node, next child index, lo, hi); memory is depth x fanout integers.
        stack: list[tuple[Node, int, int, int]] = [(root, 0, 0, _NO_HI)]
        seen.add(root.blkno)
        while stack:
            node, i, lo, hi = stack.pop()
            if node.level == 0 or i == len(node.kids):
                yield node.blkno, node, node.level
                continue
            stack.append((node, i + 1, lo, hi))
            child = node.kids[i]
            if child in seen:
                raise CorruptionError(child, self._name, "block reached twice in one tree")
            seen.add(child)
            clo = node.keys[i] if i > 0 else lo
            chi = node.keys[i + 1] if i + 1 < len(node.keys) else hi
            if node.level == 1 and not visit_leaf:
                yield child, None, 0
            else:
                stack.append((self._load(child, node.level - 1, clo, chi), 0, clo, chi))

    def count_nodes(self) -> int:
        """Number of nodes (reads every interior node, no leaf)."""
        return sum(1 for _ in self._walk(False))

    def destroy(self, on_leaf: Callable[[Node], None] | None = None) -> None:
        """Free every node (leaves are read only if ``on_leaf`` wants to see them)."""
        # Visit first, free after, so a corruption found halfway frees nothing; only block
        # numbers are kept, never the nodes.
        blocks: list[int] = []
        for blk, node, level in self._walk(on_leaf is not None):
            if on_leaf is not None and node is not None and level == 0:
                on_leaf(node)
            blocks.append(blk)
        for blk in blocks:
            self._free(blk)
        self.root = 0
