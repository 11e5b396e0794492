"""Unit tests of the directory index (nexfs.ondisk.dirindex) on the in-memory FakeStore."""

from __future__ import annotations

import errno
import random
import struct
import time
from collections.abc import Callable

import pytest
from fakestore import FakeStore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nexfs.ondisk.btree import KIND_DIR, BTree, Node
from nexfs.ondisk.dirindex import ENTRY_HEADER, MIN_COOKIE, SEQ_BITS, DirIndex, keyed_hash
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.types import CorruptionError, FsError

OWNER = 9
KEY = b"0123456789abcdef"


def new_dir(store: FakeStore | None = None,
            hash_fn: Callable[[bytes], int] | None = None) -> tuple[FakeStore, DirIndex]:
    store = store or FakeStore()
    return store, DirIndex(store, OWNER, 0, KEY, hash_fn=hash_fn)


def errno_of(exc: pytest.ExceptionInfo[FsError]) -> int:
    return exc.value.errno


def test_basic_operations() -> None:
    store, d = new_dir()
    assert d.is_empty() and d.lookup(b"a") is None and d.root == 0
    c = d.insert(b"a", 100, 8)
    assert MIN_COOKIE <= c < 1 << 63
    assert d.lookup(b"a") == (100, 8)
    with pytest.raises(FsError) as ei:
        d.insert(b"a", 101, 8)
    assert errno_of(ei) == errno.EEXIST
    assert d.replace(b"a", 200, 4) == (100, 8)
    assert d.lookup(b"a") == (200, 4)
    assert list(d.iter_from(0)) == [(c, b"a", 200, 4)]
    store.flush()
    assert d.remove(b"a") == (200, 4)
    for op in (lambda: d.remove(b"a"), lambda: d.replace(b"a", 1, 1)):
        with pytest.raises(FsError) as ei:
            op()
        assert errno_of(ei) == errno.ENOENT
    assert d.is_empty() and store.live == 0


def test_name_lengths() -> None:
    _, d = new_dir()
    d.insert(b"x" * 255, 5, 8)
    assert d.lookup(b"x" * 255) == (5, 8)
    with pytest.raises(FsError) as ei:
        d.insert(b"x" * 256, 5, 8)
    assert errno_of(ei) == errno.ENAMETOOLONG
    with pytest.raises(FsError) as ei:
        d.insert(b"", 5, 8)
    assert errno_of(ei) == errno.EINVAL
    with pytest.raises(ValueError):
        d.insert(b"zero-ino", 0, 8)


def test_cookie_is_the_hash_class() -> None:
    _, d = new_dir()
    h = keyed_hash(KEY)
    for i in range(100):
        name = b"n%d" % i
        c = d.insert(name, i + 1, 8)
        assert c >> SEQ_BITS == (h(name) or 1) and c & 0xFFFF == 0
        d.check_hash(c, name)
    # A different volume key gives different hashes: the hash is keyed.
    other = keyed_hash(b"another key....!")
    assert sum(h(b"n%d" % i) != other(b"n%d" % i) for i in range(100)) == 100


def test_iter_from_cookie_semantics() -> None:
    _, d = new_dir()
    cookies = {d.insert(b"f%d" % i, i + 1, 8): b"f%d" % i for i in range(500)}
    listing = list(d.iter_from(0))
    assert [c for c, *_ in listing] == sorted(cookies)
    assert {c: n for c, n, _, _ in listing} == cookies
    mid = sorted(cookies)[250]
    assert [c for c, *_ in d.iter_from(mid)] == sorted(cookies)[251:]
    assert list(d.iter_from(1)) == listing and list(d.iter_from(2)) == listing
    assert list(d.iter_from((1 << 63) - 1)) == []


def test_forced_collisions() -> None:
    """Every name in one hash class: lookups compare names, seqs count up."""
    store, d = new_dir(hash_fn=lambda name: 77)
    names = [b"c%d" % i for i in range(400)]
    cookies = [d.insert(n, i + 1, 8) for i, n in enumerate(names)]
    assert cookies == [(77 << 16) + i for i in range(400)]
    store.flush()
    for i, n in enumerate(names):
        assert d.lookup(n) == (i + 1, 8)
    assert d.lookup(b"absent") is None
    assert d.remove(b"c10") == (11, 8)
    assert d.lookup(b"c10") is None and d.lookup(b"c11") == (12, 8)
    # A removed seq is not reused while higher seqs exist: cookies keep moving forward.
    assert d.insert(b"c10", 99, 8) == (77 << 16) + 400
    with pytest.raises(FsError):
        d.insert(b"c399", 1, 8)


def test_hash_zero_is_not_a_small_cookie() -> None:
    _, d = new_dir(hash_fn=lambda name: 0)
    assert d.insert(b"a", 1, 8) >= MIN_COOKIE


def test_full_hash_class_reuses_gaps() -> None:
    _, d = new_dir(hash_fn=lambda name: 5)
    base = 5 << SEQ_BITS
    d.insert(b"first", 1, 8)  # seq 0
    # Pretend the class has been used up to the top seq.
    d._tree.insert(base + 0xFFFF, ENTRY_HEADER.pack(2, 8, 4) + b"last")
    assert d.insert(b"third", 3, 8) == base + 1
    assert d.lookup(b"last") == (2, 8) and d.lookup(b"third") == (3, 8)


def test_weak_hash_model() -> None:
    """Few hash classes, many names: against a dict."""
    store, d = new_dir(hash_fn=lambda name: sum(name) % 7)
    rnd = random.Random(4)
    model: dict[bytes, tuple[int, int]] = {}
    for i in range(5000):
        name = b"w%d" % rnd.randrange(800)
        if name in model and rnd.random() < 0.5:
            assert d.remove(name) == model.pop(name)
        elif name in model:
            model[name] = (i + 1, 4)
            d.replace(name, i + 1, 4)
        else:
            model[name] = (i + 1, 8)
            d.insert(name, i + 1, 8)
        if i % 400 == 0:
            store.flush()
    for name, v in model.items():
        assert d.lookup(name) == v
    got = {n: (ino, t) for _, n, ino, t in d.iter_from(0)}
    assert got == model


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), weak=st.booleans(), batch=st.integers(1, 40))
def test_readdir_cookies_stable_under_changes(seed: int, weak: bool, batch: int) -> None:
    """A readdir in chunks, resumed from the last cookie, with inserts and removes between
    chunks: entries untouched during the listing are returned exactly once."""
    store, d = new_dir(hash_fn=(lambda name: sum(name) % 5) if weak else None)
    rnd = random.Random(seed)
    present = set()
    for i in range(600):
        name = b"e%d" % i
        d.insert(name, i + 1, 8)
        present.add(name)
    untouched = set(present)
    seen: list[bytes] = []
    cookie = 0
    while True:
        chunk = []
        for c, name, _, _ in d.iter_from(cookie):
            chunk.append((c, name))
            if len(chunk) == batch:
                break
        if not chunk:
            break
        seen.extend(n for _, n in chunk)
        cookie = chunk[-1][0]
        for _ in range(rnd.randrange(4)):
            if rnd.random() < 0.5 and present:
                victim = rnd.choice(sorted(present))
                d.remove(victim)
                present.discard(victim)
                untouched.discard(victim)
            else:
                name = b"new%d" % rnd.randrange(10**6)
                if name not in present:
                    d.insert(name, 5, 8)
                    present.add(name)
        if rnd.random() < 0.2:
            store.flush()
    assert len(seen) == len(set(seen))
    assert untouched <= set(seen)


class DirMachine(RuleBasedStateMachine):
    """The index against a dict, with a weak hash so collisions are common."""

    def __init__(self) -> None:
        super().__init__()
        self.store = FakeStore()
        self.d = DirIndex(self.store, OWNER, 0, KEY, hash_fn=lambda n: n[0] % 4)
        self.model: dict[bytes, tuple[int, int, int]] = {}  # name -> (cookie, ino, type)

    names = st.binary(min_size=1, max_size=12).filter(lambda n: b"/" not in n and b"\0" not in n)

    @rule(name=names, ino=st.integers(1, 2**64 - 1), t=st.integers(0, 15))
    def insert(self, name: bytes, ino: int, t: int) -> None:
        if name in self.model:
            with pytest.raises(FsError):
                self.d.insert(name, ino, t)
        else:
            c = self.d.insert(name, ino, t)
            assert c not in {v[0] for v in self.model.values()}
            self.model[name] = (c, ino, t)

    @rule(name=names)
    def remove(self, name: bytes) -> None:
        if name in self.model:
            _, ino, t = self.model.pop(name)
            assert self.d.remove(name) == (ino, t)
        else:
            with pytest.raises(FsError):
                self.d.remove(name)

    @rule(name=names, ino=st.integers(1, 100))
    def replace(self, name: bytes, ino: int) -> None:
        if name in self.model:
            c, _, t = self.model[name]
            self.d.replace(name, ino, t)
            self.model[name] = (c, ino, t)

    @rule(name=names)
    def lookup(self, name: bytes) -> None:
        v = self.model.get(name)
        assert self.d.lookup(name) == (None if v is None else v[1:])

    @rule()
    def flush(self) -> None:
        self.store.flush()

    @invariant()
    def listing(self) -> None:
        got = {n: (c, ino, t) for c, n, ino, t in self.d.iter_from(0)}
        assert got == self.model
        assert self.d.is_empty() == (not self.model)

    def teardown(self) -> None:
        self.d.destroy()
        assert self.store.live == 0


TestDirModel = DirMachine.TestCase
TestDirModel.settings = settings(max_examples=50, stateful_step_count=80, deadline=None,
                                 suppress_health_check=[HealthCheck.too_slow])


def test_destroy_frees_everything() -> None:
    store, d = new_dir()
    for i in range(20000):
        d.insert(b"file%d" % i, i + 1, 8)
    store.flush()
    assert store.live == d.tree_blocks() > 100
    assert d.worst_case_new_blocks() == d._tree.levels() + 1
    d.destroy()
    assert store.live == 0 and d.root == 0


def _first_leaf(store: FakeStore, d: DirIndex) -> Node:
    t = BTree(store, OWNER, d.root, KIND_DIR)
    node = t._load(d.root, None, 0, 1 << 64)
    while node.level:
        node = t._load(node.kids[0], node.level - 1, 0, 1 << 64)
    return node


@pytest.mark.parametrize("bad", ["namelen", "slash", "ino0"])
def test_corrupt_entries(bad: str) -> None:
    store, d = new_dir()
    for i in range(10):
        d.insert(b"name%d" % i, i + 1, 8)
    store.flush()
    leaf = _first_leaf(store, d)
    v = bytearray(leaf.vals[0])
    if bad == "namelen":
        v[9] += 1
    elif bad == "slash":
        v[11] = ord("/")
    else:
        struct.pack_into("<Q", v, 0, 0)
    leaf.vals[0] = bytes(v)
    buf = bytearray(BLOCK_SIZE)
    leaf.encode(memoryview(buf), store.volume_seed, store.tid)
    store.write_raw(leaf.blkno, bytes(buf))
    with pytest.raises(CorruptionError, match="malformed entry"):
        list(d.iter_from(0))


def test_wrong_owner_and_flipped_byte() -> None:
    store, d = new_dir()
    for i in range(1000):
        d.insert(b"name%d" % i, i + 1, 8)
    store.flush()
    other = DirIndex(store, OWNER + 1, d.root, KEY)
    with pytest.raises(CorruptionError, match="owned by inode"):
        other.lookup(b"name1")
    leaf = _first_leaf(store, d)
    store.corrupt(leaf.blkno, 1000)
    with pytest.raises(CorruptionError, match="checksum"):
        list(d.iter_from(0))


@pytest.mark.slow
def test_million_entries() -> None:
    """1,000,000 names: inserts, a sample of lookups, a full readdir; commits on the way."""
    store = FakeStore(nblocks=1 << 24)
    _, d = new_dir(store)
    n = 1_000_000
    t0 = time.perf_counter()
    for i in range(n):
        d.insert(b"file-%07d.dat" % i, i + 1, 8)
        if i % 250_000 == 249_999:
            store.flush()
    t1 = time.perf_counter()
    store.flush()
    rnd = random.Random(1)
    for i in rnd.sample(range(n), 20000):
        assert d.lookup(b"file-%07d.dat" % i) == (i + 1, 8)
    assert d.lookup(b"file-absent.dat") is None
    t2 = time.perf_counter()
    count = 0
    prev = 0
    for c, _, _, _ in d.iter_from(0):
        assert c > prev
        prev = c
        count += 1
    t3 = time.perf_counter()
    assert count == n
    levels = d._tree.levels()
    assert levels <= 4
    print(f"\n1M dir: insert {t1 - t0:.1f}s ({(t1 - t0) / n * 1e6:.1f} us/op), "
          f"20k lookups {t2 - t1:.1f}s, readdir {t3 - t2:.1f}s, {store.live} nodes, "
          f"{levels} levels")
