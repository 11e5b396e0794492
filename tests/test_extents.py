"""Unit tests of the file block map (nexfs.ondisk.extents) on the in-memory FakeStore."""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Callable

import pytest
from fakestore import FakeStore
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nexfs.ondisk.extents import (
    AREA_SIZE,
    EXTENT,
    INLINE_BACK,
    INLINE_MAX,
    MAX_EXTENT_LEN,
    MAX_FILE_BLOCKS,
    ExtentMap,
)
from nexfs.types import CorruptionError

OWNER = 7


class Inode:
    """Just enough of an inode: the area and a change counter."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.area = bytearray(AREA_SIZE)
        self.changes = 0

    def emap(self) -> ExtentMap:
        def changed() -> None:
            self.changes += 1

        return ExtentMap(self.store, OWNER, self.area, changed)


def fresh() -> tuple[FakeStore, Inode, ExtentMap]:
    store = FakeStore()
    ino = Inode(store)
    return store, ino, ino.emap()


def test_empty_map() -> None:
    store, ino, em = fresh()
    assert em.is_inline and em.last() is None and list(em.extents()) == []
    assert em.map(0, 10) == [(0, 0, 10)]
    assert em.map(5, 0) == []
    assert em.punch(0) == []
    assert ino.changes == 0 and store.live == 0 and em.tree_blocks() == 0


def test_sequential_appends_stay_one_extent() -> None:
    _, ino, em = fresh()
    for i in range(100):
        em.insert(i, 1000 + i, 1)
    assert list(em.extents()) == [(0, 1000, 100)]
    assert em.last() == (0, 1000, 100)
    assert em.map(10, 5) == [(10, 1010, 5)]
    assert ino.changes == 100


def test_join_both_neighbours() -> None:
    _, _, em = fresh()
    em.insert(0, 500, 10)
    em.insert(20, 520, 10)
    em.insert(10, 510, 10)
    assert list(em.extents()) == [(0, 500, 30)]
    em.insert(40, 530, 5)  # physically adjacent but a logical gap: no join
    em.insert(30, 900, 10)  # logically adjacent both sides, physically neither
    assert list(em.extents()) == [(0, 500, 30), (30, 900, 10), (40, 530, 5)]


def test_map_holes_and_edges() -> None:
    _, _, em = fresh()
    em.insert(10, 100, 5)
    em.insert(20, 200, 5)
    assert em.map(0, 30) == [(0, 0, 10), (10, 100, 5), (15, 0, 5), (20, 200, 5), (25, 0, 5)]
    assert em.map(12, 10) == [(12, 102, 3), (15, 0, 5), (20, 200, 2)]
    assert em.map(14, 1) == [(14, 104, 1)]
    assert em.map(15, 1) == [(15, 0, 1)]


def test_insert_refuses_overlap_and_bad_ranges() -> None:
    _, _, em = fresh()
    em.insert(10, 100, 5)
    for lblk, n in ((10, 1), (14, 3), (5, 6), (0, 100)):
        with pytest.raises(ValueError):
            em.insert(lblk, 5000, n)
    with pytest.raises(ValueError):
        em.insert(0, 0, 1)  # physical block 0
    with pytest.raises(ValueError):
        em.insert(0, 5, 0)
    with pytest.raises(ValueError):
        em.insert(MAX_FILE_BLOCKS - 1, 5, 2)
    with pytest.raises(ValueError):
        em.insert(0, 5, MAX_EXTENT_LEN + 1)
    em.insert(MAX_FILE_BLOCKS - 1, 7, 1)  # the very last block of the largest file
    assert em.last() == (MAX_FILE_BLOCKS - 1, 7, 1)


def test_punch_splits_and_returns_runs() -> None:
    _, _, em = fresh()
    em.insert(0, 1000, 100)
    assert em.punch(10, 5) == [(1010, 5)]
    assert list(em.extents()) == [(0, 1000, 10), (15, 1015, 85)]
    assert em.punch(5, 20) == [(1005, 5), (1015, 10)]
    assert list(em.extents()) == [(0, 1000, 5), (25, 1025, 75)]
    assert em.punch(50) == [(1050, 50)]  # truncate
    assert em.last() == (25, 1025, 25)
    assert em.punch(0) == [(1000, 5), (1025, 25)]
    assert list(em.extents()) == []


def test_inline_to_tree_and_back() -> None:
    store, ino, em = fresh()
    for i in range(INLINE_MAX):
        em.insert(i * 2, 100 + i * 10, 1)
    assert em.is_inline and store.live == 0
    em.insert(100, 5000, 1)
    assert not em.is_inline and store.live == 1 and em.tree_blocks() == 1
    # The area now holds only the header: mode, root and node count.
    mode, count, _, nodes, root = struct.unpack_from("<BBHIQ", ino.area)
    assert (mode, count, nodes) == (1, 0, 1) and root != 0
    assert ino.area[16:] == bytes(AREA_SIZE - 16)
    store.flush()
    em2 = ino.emap()  # re-read from the area and the encoded tree
    assert list(em2.extents()) == list(em.extents())
    em2.punch(2 * (INLINE_BACK - 1) + 1)  # leaves INLINE_BACK extents
    assert em2.is_inline and store.live == 0 and em2.tree_blocks() == 0
    assert [e[0] for e in em2.extents()] == [0, 2, 4, 6, 8][:INLINE_BACK]


def test_punch_in_middle_can_move_to_tree() -> None:
    store, _, em = fresh()
    for i in range(INLINE_MAX - 1):
        em.insert(i * 10, 100 + i * 100, 5)
    em.insert(100, 9000, 50)
    assert em.is_inline
    em.punch(120, 2)  # splits the last extent: 8 records
    assert not em.is_inline and len(list(em.extents())) == INLINE_MAX + 1
    assert store.live == em.tree_blocks() == 1


def test_many_fragmented_extents_and_truncate() -> None:
    store, ino, em = fresh()
    n = 30000
    for i in range(n):
        em.insert(i, 10 + 2 * i, 1)  # physically every other block: nothing joins
    assert sum(1 for _ in em.extents()) == n
    assert em.tree_blocks() == store.live > 100
    store.flush()
    em = ino.emap()
    assert em.map(12345, 3) == [(12345, 10 + 2 * 12345, 1), (12346, 10 + 2 * 12346, 1),
                                (12347, 10 + 2 * 12347, 1)]
    freed = em.punch(1000)
    assert len(freed) == n - 1000 and freed[0] == (10 + 2000, 1)
    assert em.tree_blocks() == store.live
    store.flush()
    freed = em.punch(0)
    assert len(freed) == 1000 and store.live == 0 and em.is_inline


def test_destroy_returns_every_run_and_frees_the_tree() -> None:
    store, ino, em = fresh()
    runs = [(i * 3, 100 + i * 7, 2) for i in range(3000)]
    for lblk, p, n in runs:
        em.insert(lblk, p, n)
    store.flush()
    freed = ino.emap().destroy()
    assert sorted(freed) == sorted((p, n) for _, p, n in runs)
    assert store.live == 0 and ino.area == bytearray(AREA_SIZE)
    _, _, em = fresh()
    em.insert(0, 50, 3)
    assert em.destroy() == [(50, 3)]


def test_worst_case_new_blocks() -> None:
    store, _, em = fresh()
    assert em.worst_case_new_blocks(INLINE_MAX) == 0
    assert em.worst_case_new_blocks(INLINE_MAX + 1) >= 1
    rnd = random.Random(2)
    used: set[int] = set()
    for _ in range(4000):
        lblk = rnd.randrange(1 << 18)
        if em.map(lblk, 1)[0][1] or lblk in used:
            continue
        bound = em.worst_case_new_blocks(2)
        before = store.stats["alloc"]
        em.insert(lblk, 10 + lblk * 2, 1)
        em.punch(lblk, 0)
        assert store.stats["alloc"] - before <= bound
        used.add(lblk)


@pytest.mark.parametrize("mutate, reason", [
    (lambda a: a.__setitem__(0, 9), "unknown mode"),
    (lambda a: a.__setitem__(1, INLINE_MAX + 1), "inline header"),
    (lambda a: EXTENT.pack_into(a, 32, 5, 1, 900), "overlap"),  # second extent before first
    (lambda a: EXTENT.pack_into(a, 16, 10, 0, 100), "length"),
    (lambda a: EXTENT.pack_into(a, 16, 10, 5, 0), "physical"),
    (lambda a: EXTENT.pack_into(a, 16, 10, 5, (1 << 20) - 2), "outside the volume"),
    (lambda a: struct.pack_into("<BBHIQ", a, 0, 1, 0, 0, 1, 0), "tree header"),
])
def test_corrupt_inline_area(mutate: Callable[[bytearray], None], reason: str) -> None:
    _store, ino, em = fresh()
    em.insert(10, 100, 5)
    em.insert(20, 200, 5)
    mutate(ino.area)
    with pytest.raises(CorruptionError, match=reason):
        ino.emap()


def test_corrupt_tree_records() -> None:
    store, ino, em = fresh()
    for i in range(20):
        em.insert(i * 4, 100 + i * 10, 2)
    from nexfs.ondisk.extents import AREA_HEADER

    root = AREA_HEADER.unpack_from(ino.area)[4]
    store.corrupt(root, 100)
    with pytest.raises(CorruptionError, match="extent tree node"):
        list(ino.emap().extents())


def test_tree_leaf_record_validation() -> None:
    _, _, em = fresh()
    check = em.leaf_check
    assert check([0, 10], [struct.pack("<IQ", 10, 5), struct.pack("<IQ", 1, 50)]) is None
    assert "overlap" in (check([0, 5], [struct.pack("<IQ", 10, 5),
                                        struct.pack("<IQ", 1, 50)]) or "")
    assert "bytes" in (check([0], [b"short"]) or "")
    assert "length" in (check([0], [struct.pack("<IQ", 0, 5)]) or "")
    assert "maximum" in (check([MAX_FILE_BLOCKS - 1], [struct.pack("<IQ", 2, 5)]) or "")


# ------------------------------------------------------------------------------ model-based


class ExtentMachine(RuleBasedStateMachine):
    """The map against a per-block dict (lblk -> phys), with commits and re-reads."""

    def __init__(self) -> None:
        super().__init__()
        self.store = FakeStore()
        self.ino = Inode(self.store)
        self.em = self.ino.emap()
        self.model: dict[int, int] = {}
        self.next_phys = 10
        self.freed: set[int] = set()

    span = st.integers(0, 400)

    @rule(lblk=span, n=st.integers(1, 20), contiguous=st.booleans())
    def insert(self, lblk: int, n: int, contiguous: bool) -> None:
        if any(b in self.model for b in range(lblk, lblk + n)):
            with pytest.raises(ValueError):
                self.em.insert(lblk, 1 << 19, n)
            return
        prev = self.model.get(lblk - 1)
        if contiguous and prev is not None and prev + 1 == self.next_phys:
            phys = prev + 1  # continues the previous extent physically: must join
        else:
            phys = self.next_phys + 1  # a gap, so it cannot join by accident
        self.next_phys = phys + n
        self.em.insert(lblk, phys, n)
        for i in range(n):
            self.model[lblk + i] = phys + i

    @rule(data=st.data(), k=st.integers(1, 8))
    def fill_before(self, data: st.DataObject, k: int) -> None:
        """Insert right before an extent, physically continuous with it: joins the next."""
        starts = [b for b in self.model if b - 1 not in self.model and b >= k]
        if not starts:
            return
        s = data.draw(st.sampled_from(sorted(starts)))
        if any(s - i in self.model for i in range(1, k + 1)):
            return
        phys = self.model[s] - k
        used = set(self.model.values())
        if phys <= 0 or any(phys + i in used for i in range(k)):
            return
        self.em.insert(s - k, phys, k)
        for i in range(k):
            self.model[s - k + i] = phys + i

    @rule(lblk=span, n=st.one_of(st.none(), st.integers(0, 60)))
    def punch(self, lblk: int, n: int | None) -> None:
        end = MAX_FILE_BLOCKS if n is None else lblk + n
        expect = {self.model.pop(b) for b in list(self.model) if lblk <= b < end}
        got = self.em.punch(lblk, n)
        blocks = [p + i for p, c in got for i in range(c)]
        assert len(blocks) == len(set(blocks)) and set(blocks) == expect
        assert all(a[0] + a[1] != b[0] for a, b in itertools.pairwise(got))  # joined

    @rule(lblk=span, n=st.integers(0, 80))
    def map(self, lblk: int, n: int) -> None:
        runs = self.em.map(lblk, n)
        pos = lblk
        for rl, rp, rn in runs:
            assert rl == pos and rn > 0
            for i in range(rn):
                assert self.model.get(rl + i, 0) == (rp + i if rp else 0)
            pos += rn
        assert pos == lblk + n

    @rule()
    def commit_and_reread(self) -> None:
        self.store.flush()
        self.em = self.ino.emap()

    @invariant()
    def consistent(self) -> None:
        ext = list(self.em.extents())
        flat = {lb + i: p + i for lb, p, n in ext for i in range(n)}
        assert flat == self.model
        for a, b in itertools.pairwise(ext):
            assert a[0] + a[2] <= b[0]
            # Maximal: no two neighbours that continue each other both ways.
            assert not (a[0] + a[2] == b[0] and a[1] + a[2] == b[1])
        last = ext[-1] if ext else None
        assert self.em.last() == last
        assert self.em.tree_blocks() == self.store.live
        if self.em.is_inline:
            assert len(ext) <= INLINE_MAX

    def teardown(self) -> None:
        freed = self.em.destroy()
        assert {p + i for p, n in freed for i in range(n)} == set(self.model.values())
        assert self.store.live == 0


TestExtentModel = ExtentMachine.TestCase
TestExtentModel.settings = settings(max_examples=80, stateful_step_count=60, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
