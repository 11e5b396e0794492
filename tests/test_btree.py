"""Unit tests of the generic B+tree (nexfs.ondisk.btree) on the in-memory FakeStore."""

from __future__ import annotations

import random
import struct

import pytest
from fakestore import FakeStore
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nexfs.ondisk.btree import (
    CAPACITY,
    KIND_DIR,
    KIND_TEST,
    MAX_KEY,
    MAX_VALUE,
    NODE_HDR_END,
    BTree,
    Node,
)
from nexfs.ondisk.metablock import BLOCK_SIZE, HEADER_SIZE
from nexfs.types import BlockNo, CorruptionError

OWNER = 42


def new_tree(store: FakeStore | None = None, owner: int = OWNER) -> tuple[FakeStore, BTree]:
    store = store or FakeStore()
    return store, BTree(store, owner, 0, KIND_TEST)


def val(k: int, size: int | None = None) -> bytes:
    size = (k * 7919) % 200 if size is None else size
    return (struct.pack("<Q", k) * (size // 8 + 1))[:size]


def check_invariants(tree: BTree) -> None:
    """Walk the whole tree: levels, fences, fill and owner are consistent."""
    if tree.root == 0:
        return

    def walk(blk: int, level: int | None, lo: int, hi: int) -> int:
        node = tree._load(blk, level, lo, hi)
        assert node.used == (sum(10 + len(v) for v in node.vals) if node.level == 0
                             else 16 * len(node.kids))
        assert node.used <= CAPACITY
        if node.level == 0:
            return 1
        assert node.keys[0] == 0
        total = 1
        for i, kid in enumerate(node.kids):
            clo = node.keys[i] if i else lo
            chi = node.keys[i + 1] if i + 1 < len(node.keys) else hi
            total += walk(kid, node.level - 1, clo, chi)
        return total

    assert walk(tree.root, None, 0, 1 << 64) == tree.count_nodes()


# ------------------------------------------------------------------------------ basics


def test_empty_tree_costs_nothing() -> None:
    store, tree = new_tree()
    assert tree.get(5) is None
    assert list(tree.iter_from(0)) == []
    assert tree.seek_ge(0) is None and tree.seek_le(MAX_KEY) is None
    assert tree.levels() == 0 and tree.count_nodes() == 0
    assert store.stats["get"] == 0 and store.live == 0
    with pytest.raises(KeyError):
        tree.delete(1)
    with pytest.raises(KeyError):
        tree.replace(1, b"")


def test_insert_get_replace_delete() -> None:
    store, tree = new_tree()
    tree.insert(10, b"ten")
    tree.insert(0, b"")
    tree.insert(MAX_KEY, b"max")
    assert tree.root != 0 and store.live == 1
    assert tree.get(10) == b"ten" and tree.get(0) == b"" and tree.get(MAX_KEY) == b"max"
    with pytest.raises(ValueError):
        tree.insert(10, b"again")
    assert tree.replace(10, b"TEN") == b"ten"
    store.flush()
    assert tree.get(10) == b"TEN"
    assert tree.delete(0) == b""
    assert tree.get(0) is None
    assert list(tree.iter_from(0)) == [(10, b"TEN"), (MAX_KEY, b"max")]
    tree.delete(10)
    tree.delete(MAX_KEY)
    assert tree.root == 0 and store.live == 0


def test_value_and_key_limits() -> None:
    _, tree = new_tree()
    tree.insert(1, bytes(MAX_VALUE))
    with pytest.raises(ValueError):
        tree.insert(2, bytes(MAX_VALUE + 1))
    with pytest.raises(ValueError):
        tree.replace(1, bytes(MAX_VALUE + 1))
    with pytest.raises(ValueError):
        tree.insert(-1, b"")
    with pytest.raises(ValueError):
        tree.insert(MAX_KEY + 1, b"")


def test_max_values_split_and_fit() -> None:
    """Maximal values: every split must leave two nodes that encode into one block."""
    store, tree = new_tree()
    for k in range(200):
        tree.insert(k * 3 % 200, bytes([k % 256]) * MAX_VALUE)
    store.flush()
    check_invariants(tree)
    assert [k for k, _ in tree.iter_from(0)] == list(range(200))


def test_sequential_appends_fill_nodes() -> None:
    """Appending at the end splits off only the new entry: leaves end up nearly full."""
    store, tree = new_tree()
    n = 20000
    for k in range(n):
        tree.insert(k, b"x" * 12)
    per_leaf = CAPACITY // 22
    assert tree.count_nodes() <= n // per_leaf * 1.1 + 3
    store.flush()
    check_invariants(tree)


def test_seek_and_iter_from() -> None:
    store, tree = new_tree()
    keys = list(range(0, 30000, 3))
    for k in keys:
        tree.insert(k, val(k))
    store.flush()
    assert tree.seek_ge(1) == (3, val(3))
    assert tree.seek_ge(29997) == (29997, val(29997))
    assert tree.seek_ge(29998) is None
    assert tree.seek_le(29998) == (29997, val(29997))
    assert tree.seek_le(2) == (0, val(0))
    assert tree.last() == (29997, val(29997))
    assert [k for k, _ in tree.iter_from(14000)] == [k for k in keys if k >= 14000]
    # Stopping early leaves nothing behind.
    it = tree.iter_from(0)
    assert [next(it) for _ in range(3)] == [(0, val(0)), (3, val(3)), (6, val(6))]
    del it
    assert tree.levels() >= 2


def test_seek_le_after_deletes_leaves_stale_fences() -> None:
    """Interior keys are lower bounds: after deleting the first keys of a leaf, seek_le of a
    key between the fence and the new first key must find the previous leaf's last key."""
    store, tree = new_tree()
    for k in range(0, 5000):
        tree.insert(k, bytes(20))
    # Find a leaf boundary: the separator keys of the root.
    root = tree._load(tree.root, None, 0, 1 << 64)
    sep = root.keys[1]
    for k in range(sep, sep + 5):
        tree.delete(k)
    assert tree.seek_le(sep + 2) == (sep - 1, bytes(20))
    assert tree.seek_ge(sep - 1 + 1) == (sep + 5, bytes(20))
    store.flush()
    check_invariants(tree)


def test_iterator_survives_mutation_between_steps() -> None:
    """Untouched entries are neither skipped nor repeated when the tree changes mid-walk."""
    store, tree = new_tree()
    rnd = random.Random(7)
    model = {k: val(k) for k in rnd.sample(range(100000), 3000)}
    for k, v in model.items():
        tree.insert(k, v)
    untouched = set(model)
    seen: list[int] = []
    for i, (k, _) in enumerate(tree.iter_from(0)):
        seen.append(k)
        if i % 5 == 0:
            victim = rnd.choice(sorted(model))
            tree.delete(victim)
            del model[victim]
            untouched.discard(victim)
            new = rnd.randrange(100000)
            if new not in model:
                tree.insert(new, val(new))
                model[new] = val(new)
        if i % 97 == 0:
            store.flush()
    assert len(seen) == len(set(seen))  # no repeats
    assert untouched <= set(seen)  # no skips
    assert seen == sorted(seen)


def test_delete_everything_frees_everything() -> None:
    store, tree = new_tree()
    rnd = random.Random(3)
    keys = rnd.sample(range(1 << 40), 20000)
    for k in keys:
        tree.insert(k, val(k))
    store.flush()
    assert store.live == tree.count_nodes() > 50
    rnd.shuffle(keys)
    for i, k in enumerate(keys):
        assert tree.delete(k) == val(k)
        if i % 2000 == 0:
            store.flush()
            check_invariants(tree)
    assert tree.root == 0 and store.live == 0


def test_delete_merges_keep_tree_compact() -> None:
    """Deleting most entries merges nodes instead of leaving a tree of near-empty leaves."""
    store, tree = new_tree()
    for k in range(30000):
        tree.insert(k * 2654435761 % (1 << 32), bytes(30))
    before = tree.count_nodes()
    kept = 0
    for k, _ in list(tree.iter_from(0)):
        if k % 20:
            tree.delete(k)
        else:
            kept += 1
    after = tree.count_nodes()
    assert after < before / 5
    store.flush()
    check_invariants(tree)
    assert sum(1 for _ in tree.iter_from(0)) == kept


def test_destroy_frees_all_nodes_and_counts_them() -> None:
    store, tree = new_tree()
    for k in range(50000):
        tree.insert(k * 11, b"v" * 40)
    store.flush()
    n = tree.count_nodes()
    assert n == store.live and tree.node_delta == n
    tree.destroy()
    assert tree.root == 0 and store.live == 0 and tree.node_delta == 0


def test_destroy_visits_leaves() -> None:
    store, tree = new_tree()
    for k in range(3000):
        tree.insert(k, struct.pack("<Q", k))
    seen: list[int] = []
    tree.destroy(lambda node: seen.extend(node.keys))
    assert sorted(seen) == list(range(3000)) and store.live == 0


def test_worst_case_new_blocks_bounds_allocations() -> None:
    store, tree = new_tree()
    rnd = random.Random(11)
    assert tree.worst_case_new_blocks() == 1
    for _ in range(6000):
        k = rnd.randrange(1 << 30)
        if tree.get(k) is not None:
            continue
        bound = tree.worst_case_new_blocks()
        before = store.stats["alloc"]
        tree.insert(k, bytes(rnd.choice((0, 10, 300, MAX_VALUE))))
        assert store.stats["alloc"] - before <= bound
    assert tree.worst_case_new_blocks() == tree.levels() + 1
    bound = tree.worst_case_new_blocks(70)
    before = store.stats["alloc"]
    base = 1 << 31
    for i in range(70):
        tree.insert(base + i, bytes(MAX_VALUE))
    assert store.stats["alloc"] - before <= bound


def test_small_cache_still_correct() -> None:
    """With a tiny cache nodes are evicted and re-read between operations all the time."""
    store = FakeStore(cache_limit=12)
    _, tree = new_tree(store)
    model: dict[int, bytes] = {}
    rnd = random.Random(5)
    for i in range(8000):
        k = rnd.randrange(20000)
        if k in model:
            assert tree.delete(k) == model.pop(k)
        else:
            model[k] = val(k)
            tree.insert(k, model[k])
        if i % 500 == 0:
            store.flush()
    assert list(tree.iter_from(0)) == sorted(model.items())


# ------------------------------------------------------------------------------ model-based


class BTreeMachine(RuleBasedStateMachine):
    """The tree against a dict, with commits (encode + decode) at random points."""

    def __init__(self) -> None:
        super().__init__()
        self.store = FakeStore()
        self.tree = BTree(self.store, OWNER, 0, KIND_TEST)
        self.model: dict[int, bytes] = {}

    keys = st.one_of(st.integers(0, 600), st.integers(0, MAX_KEY))
    values = st.one_of(st.binary(max_size=40), st.binary(min_size=MAX_VALUE - 8,
                                                          max_size=MAX_VALUE))

    @rule(k=keys, v=values)
    def insert(self, k: int, v: bytes) -> None:
        if k in self.model:
            with pytest.raises(ValueError):
                self.tree.insert(k, v)
        else:
            self.tree.insert(k, v)
            self.model[k] = v

    @rule(k=keys, v=values)
    def replace(self, k: int, v: bytes) -> None:
        if k in self.model:
            assert self.tree.replace(k, v) == self.model[k]
            self.model[k] = v
        else:
            with pytest.raises(KeyError):
                self.tree.replace(k, v)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete_present(self, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from(sorted(self.model)))
        assert self.tree.delete(k) == self.model.pop(k)

    @rule(k=keys)
    def delete_any(self, k: int) -> None:
        if k in self.model:
            assert self.tree.delete(k) == self.model.pop(k)
        else:
            with pytest.raises(KeyError):
                self.tree.delete(k)

    @rule(k=keys, n=st.integers(0, 30))
    def iter_from(self, k: int, n: int) -> None:
        expect = sorted((kk, v) for kk, v in self.model.items() if kk >= k)[:n]
        it = self.tree.iter_from(k)
        got = [x for _, x in zip(range(n), it, strict=False)]
        assert got == expect

    @rule(k=keys)
    def seeks(self, k: int) -> None:
        le = [kk for kk in self.model if kk <= k]
        ge = [kk for kk in self.model if kk >= k]
        assert self.tree.seek_le(k) == ((max(le), self.model[max(le)]) if le else None)
        assert self.tree.seek_ge(k) == ((min(ge), self.model[min(ge)]) if ge else None)
        assert self.tree.get(k) == self.model.get(k)

    @rule()
    def flush(self) -> None:
        self.store.flush()

    @invariant()
    def nodes_accounted(self) -> None:
        assert self.store.live == self.tree.count_nodes()
        assert (self.tree.root == 0) == (not self.model)

    def teardown(self) -> None:
        assert list(self.tree.iter_from(0)) == sorted(self.model.items())
        check_invariants(self.tree)
        self.tree.destroy()
        assert self.store.live == 0


TestBTreeModel = BTreeMachine.TestCase
TestBTreeModel.settings = settings(max_examples=60, stateful_step_count=120, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------ corruption


def _grow(n: int = 3000) -> tuple[FakeStore, BTree]:
    store, tree = new_tree()
    for k in range(n):
        tree.insert(k * 5, val(k, 30))
    store.flush()
    assert tree.levels() >= 2
    return store, tree


def _reseal(store: FakeStore, node: Node) -> None:
    buf = bytearray(BLOCK_SIZE)
    node.encode(memoryview(buf), store.volume_seed, store.tid)
    store.write_raw(node.blkno, bytes(buf))


def _a_leaf(tree: BTree) -> Node:
    root = tree._load(tree.root, None, 0, 1 << 64)
    while root.level > 1:
        root = tree._load(root.kids[-1], root.level - 1, 0, 1 << 64)
    return tree._load(root.kids[1], 0, 0, 1 << 64)


@pytest.mark.parametrize("offset", [0, 4, 9, 20, 33, 35, NODE_HDR_END + 3, 2000, BLOCK_SIZE - 1])
def test_flipped_byte_is_detected(offset: int) -> None:
    store, tree = _grow()
    leaf = _a_leaf(tree)
    blk, key = leaf.blkno, leaf.keys[0]
    store.corrupt(blk, offset)
    with pytest.raises(CorruptionError) as ei:
        tree.get(key)
    assert ei.value.blkno == blk and "test tree node" in ei.value.structure


def test_wrong_owner_is_detected() -> None:
    store, tree = _grow()
    other = BTree(store, OWNER + 1, tree.root, KIND_TEST)
    with pytest.raises(CorruptionError, match="owned by inode"):
        other.get(5)
    store.drop_cache()
    with pytest.raises(CorruptionError, match="owned by inode"):
        other.get(5)


def test_wrong_kind_is_detected() -> None:
    store, tree = _grow()
    other = BTree(store, OWNER, tree.root, KIND_DIR)
    with pytest.raises(CorruptionError, match="tree kind"):
        other.get(5)  # cached node of the test tree
    store.drop_cache()
    with pytest.raises(CorruptionError, match="tree kind"):
        other.get(5)


@pytest.mark.parametrize("child", [0, 1 << 20, (1 << 64) - 1])
def test_child_pointer_out_of_range(child: int) -> None:
    store, tree = _grow()
    root = tree._load(tree.root, None, 0, 1 << 64)
    root.kids[0] = child
    _reseal(store, root)
    with pytest.raises(CorruptionError, match="child block number"):
        tree.get(0)


def test_level_mismatch_and_cycle() -> None:
    store, tree = _grow(30000)
    root = tree._load(tree.root, None, 0, 1 << 64)
    assert root.level >= 2
    # A child pointing back at the root: refused by level (so no walk can loop).
    child = tree._load(root.kids[0], root.level - 1, 0, 1 << 64)
    child.kids[0] = root.blkno
    _reseal(store, child)
    with pytest.raises(CorruptionError, match="level"):
        tree.get(0)


def test_shared_subtree_is_detected_by_destroy() -> None:
    store, tree = _grow()
    root = tree._load(tree.root, None, 0, 1 << 64)
    root.kids[1] = root.kids[0]
    _reseal(store, root)
    live = store.live
    with pytest.raises(CorruptionError):
        tree.destroy()
    assert store.live == live  # nothing freed before the corruption was found


def test_keys_out_of_order_and_out_of_fence() -> None:
    store, tree = _grow()
    leaf = _a_leaf(tree)
    leaf.keys[0], leaf.keys[1] = leaf.keys[1], leaf.keys[0]
    _reseal(store, leaf)
    with pytest.raises(CorruptionError, match="out of order"):
        list(tree.iter_from(0))
    store2, tree2 = _grow()
    leaf = _a_leaf(tree2)
    leaf.keys[-1] = MAX_KEY  # sorted within the leaf, but beyond the parent's fence
    _reseal(store2, leaf)
    with pytest.raises(CorruptionError, match="outside the parent's range"):
        list(tree2.iter_from(0))


def test_count_and_lengths_overrunning_the_block() -> None:
    store, tree = _grow()
    leaf = _a_leaf(tree)
    buf = bytearray(BLOCK_SIZE)
    leaf.encode(memoryview(buf), store.volume_seed, store.tid)
    struct.pack_into("<H", buf, HEADER_SIZE + 2, 500)  # count: 500 entries cannot fit
    from nexfs.ondisk.metablock import seal_block

    seal_block(memoryview(buf), store.volume_seed, leaf.blkno)
    store.write_raw(leaf.blkno, bytes(buf))
    with pytest.raises(CorruptionError, match=r"overrun|out of order|exceeds"):
        list(tree.iter_from(0))


def test_zero_block_and_empty_node() -> None:
    store, tree = new_tree()
    bogus = BTree(store, OWNER, BlockNo(500), KIND_TEST)
    with pytest.raises(CorruptionError, match="all zeros"):
        bogus.get(1)
    tree.insert(1, b"x")
    leaf = tree._load(tree.root, None, 0, 1 << 64)
    leaf.keys.clear()
    leaf.vals.clear()
    leaf.used = 0
    _reseal(store, leaf)
    with pytest.raises(CorruptionError, match="empty node"):
        tree.get(1)
