"""Unit tests of the extended attributes (nexfs.ondisk.xattr_tree) on the in-memory FakeStore."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest
from fakestore import FakeStore
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nexfs.ondisk.btree import MAX_VALUE
from nexfs.ondisk.xattr_tree import MAX_SIZE, XATTR_CREATE, XATTR_REPLACE, XattrStore, n_chunks
from nexfs.types import CorruptionError, FsError

OWNER = 11


def new(store: FakeStore | None = None,
        hash_fn: Callable[[bytes], int] | None = None) -> tuple[FakeStore, XattrStore]:
    store = store or FakeStore()
    return store, XattrStore(store, OWNER, 0, hash_fn=hash_fn)


def err(fn: Callable[..., object], *args: object) -> int:
    with pytest.raises(FsError) as ei:
        fn(*args)
    return ei.value.errno


def test_no_xattrs_costs_nothing() -> None:
    store, x = new()
    assert err(x.get, b"user.a") == errno.ENODATA
    assert err(x.remove, b"user.a") == errno.ENODATA
    assert x.list() == []
    assert store.stats["get"] == 0 and store.live == 0


def test_set_get_list_remove() -> None:
    store, x = new()
    x.set(b"user.a", b"1")
    x.set(b"user.empty", b"")
    x.set(b"security.selinux", b"ctx\0")
    store.flush()
    assert x.get(b"user.a") == b"1" and x.get(b"user.empty") == b""
    assert sorted(x.list()) == [b"security.selinux", b"user.a", b"user.empty"]
    x.set(b"user.a", b"22")
    assert x.get(b"user.a") == b"22"
    x.remove(b"user.a")
    assert err(x.get, b"user.a") == errno.ENODATA
    x.remove(b"user.empty")
    x.remove(b"security.selinux")
    assert x.root == 0 and store.live == 0


def test_create_and_replace_flags() -> None:
    _, x = new()
    assert err(x.set, b"user.a", b"v", XATTR_REPLACE) == errno.ENODATA
    x.set(b"user.a", b"v", XATTR_CREATE)
    assert err(x.set, b"user.a", b"w", XATTR_CREATE) == errno.EEXIST
    x.set(b"user.a", b"w", XATTR_REPLACE)
    assert x.get(b"user.a") == b"w"
    assert err(x.set, b"user.a", b"w", 4) == errno.EINVAL


def test_limits() -> None:
    store, x = new()
    assert err(x.set, b"user." + b"n" * 251, b"v") == errno.ERANGE
    assert err(x.set, b"", b"v") == errno.ERANGE
    assert err(x.get, b"n" * 256) == errno.ERANGE
    assert err(x.set, b"user.big", bytes(MAX_SIZE + 1)) == errno.E2BIG
    assert store.live == 0  # nothing written by a refused set
    name = b"user." + b"n" * 250
    big = bytes(range(256)) * (MAX_SIZE // 256)
    x.set(name, big)
    assert x.get(name) == big
    assert x.list() == [name]


@pytest.mark.parametrize("size", [0, 1, MAX_VALUE - 20, MAX_VALUE - 5, MAX_VALUE,
                                  MAX_VALUE * 3 + 7, 4096, MAX_SIZE])
def test_chunk_boundaries(size: int) -> None:
    store, x = new()
    value = bytes((i * 31) % 251 for i in range(size))
    x.set(b"user.v", value)
    x.set(b"user.w", value[::-1])
    store.flush()
    assert x.get(b"user.v") == value and x.get(b"user.w") == value[::-1]
    assert store.live == x.tree_blocks()


def test_growing_and_shrinking_values_leave_no_chunks() -> None:
    store, x = new()
    for size in (10, MAX_SIZE, 3000, MAX_SIZE, 0, 70000 - 4464, 5):
        value = bytes([size % 256]) * size
        x.set(b"user.g", value)
        store.flush()
        assert x.get(b"user.g") == value
    entries = list(x._tree.iter_from(0))
    assert len(entries) == n_chunks(len(b"user.g"), 5) == 1
    x.destroy()
    assert store.live == 0


def test_forced_collisions() -> None:
    store, x = new(hash_fn=lambda name: 1234)
    values = {b"user.%d" % i: bytes([i]) * (i * 700) for i in range(30)}
    for k, v in values.items():
        x.set(k, v)
    store.flush()
    for k, v in values.items():
        assert x.get(k) == v
    assert sorted(x.list()) == sorted(values)
    x.remove(b"user.3")
    assert err(x.get, b"user.3") == errno.ENODATA
    assert x.get(b"user.4") == values[b"user.4"]
    x.set(b"user.3", b"back")
    assert x.get(b"user.3") == b"back"


def test_worst_case_new_blocks_bounds_a_set() -> None:
    store, x = new()
    for i in range(40):
        bound = x.worst_case_new_blocks(MAX_SIZE)
        before = store.stats["alloc"]
        x.set(b"user.%d" % i, bytes([i]) * MAX_SIZE)
        assert store.stats["alloc"] - before <= bound
    x.destroy()
    assert store.live == 0


def test_corrupted_chunk_is_detected() -> None:
    _store, x = new()
    x.set(b"user.big", bytes(20000))
    tree = x._tree
    # Drop a middle chunk behind the store's back: the value no longer adds up.
    key = next(k for k, _ in tree.iter_from(0))
    tree.delete(key + 5)
    with pytest.raises(CorruptionError, match="xattr tree"):
        x.get(b"user.big")
    store2, x2 = new()
    x2.set(b"user.a", b"v")
    store2.corrupt(x2.root, 200)
    with pytest.raises(CorruptionError, match="xattr tree node"):
        x2.get(b"user.a")


class XattrMachine(RuleBasedStateMachine):
    """Against a dict, with a weak hash and values up to 64 KiB."""

    def __init__(self) -> None:
        super().__init__()
        self.store = FakeStore()
        self.x = XattrStore(self.store, OWNER, 0, hash_fn=lambda n: n[-1] % 3)
        self.model: dict[bytes, bytes] = {}

    names = st.sampled_from([b"user.%d" % i for i in range(12)] + [b"trusted." + b"x" * 247])
    values = st.one_of(st.binary(max_size=50),
                       st.integers(0, MAX_SIZE).map(lambda n: bytes([n % 256]) * n))

    @rule(name=names, value=values, flags=st.sampled_from([0, XATTR_CREATE, XATTR_REPLACE]))
    def set(self, name: bytes, value: bytes, flags: int) -> None:
        if flags == XATTR_CREATE and name in self.model:
            assert err(self.x.set, name, value, flags) == errno.EEXIST
        elif flags == XATTR_REPLACE and name not in self.model:
            assert err(self.x.set, name, value, flags) == errno.ENODATA
        else:
            self.x.set(name, value, flags)
            self.model[name] = value

    @rule(name=names)
    def remove(self, name: bytes) -> None:
        if name in self.model:
            self.x.remove(name)
            del self.model[name]
        else:
            assert err(self.x.remove, name) == errno.ENODATA

    @rule(name=names)
    def get(self, name: bytes) -> None:
        if name in self.model:
            assert self.x.get(name) == self.model[name]
        else:
            assert err(self.x.get, name) == errno.ENODATA

    @rule()
    def flush(self) -> None:
        self.store.flush()

    @invariant()
    def listing(self) -> None:
        assert sorted(self.x.list()) == sorted(self.model)
        assert (self.x.root == 0) == (not self.model)

    def teardown(self) -> None:
        self.x.destroy()
        assert self.store.live == 0


TestXattrModel = XattrMachine.TestCase
TestXattrModel.settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
