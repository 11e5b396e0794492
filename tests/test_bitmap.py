"""Bitmap codecs and the block/inode allocators (through a Store on an in-memory device)."""

from __future__ import annotations

import errno
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memdev import MemDevice
from storekit import new_volume

from nexfs.ondisk import checksum
from nexfs.ondisk.bitmap import (
    BPB,
    FULL,
    UNINIT,
    BitmapBlock,
    SummaryBlock,
    find_run,
    trailing_ones,
    trailing_zeros,
)
from nexfs.ondisk.layout import SUMMARY_ENTRIES
from nexfs.ondisk.metablock import BLOCK_SIZE, MAGIC_BITMAP, MAGIC_SUMMARY
from nexfs.store.store import Store
from nexfs.types import BlockNo, CorruptionError, FsError, InodeNo

SEED = checksum.uuid_seed(b"u" * 16)


# -- bit tricks -----------------------------------------------------------------------------


def naive_runs(free: int, start: int, nbits: int) -> list[tuple[int, int]]:
    runs, i = [], start
    while i < nbits:
        if free >> i & 1:
            j = i
            while j < nbits and free >> j & 1:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


@settings(max_examples=300, deadline=None)
@given(st.integers(0, (1 << 300) - 1), st.integers(0, 299), st.integers(1, 40))
def test_find_run_matches_naive(free: int, start: int, want: int) -> None:
    runs = naive_runs(free, start, 300)
    full_pos, first_pos, first_len = find_run(free, start, want)
    expect_full = next((p for p, n in runs if n >= want), -1)
    assert full_pos == expect_full
    if runs:
        assert (first_pos, first_len) == runs[0]
    else:
        assert first_len == 0


def test_bit_helpers() -> None:
    assert trailing_zeros(0b1000) == 3
    assert trailing_ones(0b0111) == 3
    assert trailing_ones(0) == 0


# -- codecs ---------------------------------------------------------------------------------


def test_bitmap_block_round_trip_and_corruption() -> None:
    bits = (1 << 5) | (1 << 31000) | (FULL ^ ((1 << 32000) - 1))
    blk = BitmapBlock(BlockNo(300), MAGIC_BITMAP, 2, bits)
    out = memoryview(bytearray(BLOCK_SIZE))
    blk.encode(out, SEED, 5)
    tail = FULL ^ ((1 << 32000) - 1)
    free = BPB - bits.bit_count()
    kw = dict(magic=MAGIC_BITMAP, group=2, seed=SEED, tail=tail, structure="bitmap")
    back = BitmapBlock.decode(BlockNo(300), out, expect_free=free, **kw)  # type: ignore[arg-type]
    assert back.bits == bits
    with pytest.raises(CorruptionError, match="summary says"):
        BitmapBlock.decode(BlockNo(300), out, expect_free=free + 1, **kw)  # type: ignore[arg-type]
    with pytest.raises(CorruptionError, match="checksum"):
        BitmapBlock.decode(BlockNo(301), out, expect_free=None, **kw)  # type: ignore[arg-type]
    flipped = bytearray(out)
    flipped[1000] ^= 4
    with pytest.raises(CorruptionError, match="checksum"):
        BitmapBlock.decode(BlockNo(300), memoryview(flipped), expect_free=None, **kw)  # type: ignore[arg-type]
    with pytest.raises(CorruptionError, match="zeros"):
        BitmapBlock.decode(BlockNo(300), memoryview(bytes(BLOCK_SIZE)), expect_free=None,
                           **kw)  # type: ignore[arg-type]
    # Tail bits (beyond the volume) must stay set.
    BitmapBlock(BlockNo(300), MAGIC_BITMAP, 2, 0).encode(out, SEED, 5)
    with pytest.raises(CorruptionError, match="past the end"):
        BitmapBlock.decode(BlockNo(300), out, expect_free=None, **kw)  # type: ignore[arg-type]


def test_summary_block_round_trip_and_corruption() -> None:
    entries = [i | (UNINIT if i % 3 == 0 else 0) for i in range(10)]
    entries += [0] * (SUMMARY_ENTRIES - 10)
    blk = SummaryBlock(BlockNo(40), MAGIC_SUMMARY, 1, entries)
    out = memoryview(bytearray(BLOCK_SIZE))
    blk.encode(out, SEED, 1)
    kw = dict(magic=MAGIC_SUMMARY, index=1, seed=SEED, structure="summary")
    assert SummaryBlock.decode(BlockNo(40), out, nvalid=10, **kw).entries == entries  # type: ignore[arg-type]
    with pytest.raises(CorruptionError, match="owned by"):
        SummaryBlock.decode(BlockNo(40), out, nvalid=10, **{**kw, "index": 0})  # type: ignore[arg-type]
    with pytest.raises(CorruptionError, match="unused entry"):
        SummaryBlock.decode(BlockNo(40), out, nvalid=5, **kw)  # type: ignore[arg-type]
    blk.entries[0] = BPB + 1
    blk.encode(out, SEED, 1)
    with pytest.raises(CorruptionError, match="counts"):
        SummaryBlock.decode(BlockNo(40), out, nvalid=10, **kw)  # type: ignore[arg-type]


# -- block allocator ------------------------------------------------------------------------


@pytest.fixture
def store() -> Store:
    return Store.open(new_volume(16))


def test_alloc_is_contiguous_and_goal_directed(store: Store) -> None:
    g = store.geo
    a, n = store.alloc_data(None, 100)
    assert (a, n) == (g.data_start, 100)
    b, n = store.alloc_data(None, 50)  # continues after the previous allocation
    assert (b, n) == (a + 100, 50)
    goal = g.data_start + 1000
    c, n = store.alloc_data(BlockNo(goal), 10)
    assert (c, n) == (goal, 10)
    # A hole of 5 before a big free area: a request of 20 skips the hole.
    store.free_blocks(BlockNo(a + 10), 5)
    store.commit()
    store.checkpoint()
    d, n = store.alloc_data(BlockNo(a), 20)
    assert n == 20 and d >= a + 150
    e, n = store.alloc_data(BlockNo(a), 5)
    assert (e, n) == (a + 10, 5)
    assert store.verify_allocators() == []


def test_alloc_returns_shorter_run_when_fragmented(store: Store) -> None:
    g = store.geo
    total = g.backup_sb - g.data_start
    start, n = store.alloc_data(None, total)
    assert n == total
    for k in range(0, 60, 6):  # free 3-block holes
        store.free_blocks(BlockNo(start + k), 3)
    store.commit()
    store.checkpoint()
    got = store.alloc_data(BlockNo(start), 10)
    assert got == (start, 3)  # best effort: first free run, not ENOSPC
    assert store.verify_allocators() == []


def test_alloc_wraps_around(store: Store) -> None:
    g = store.geo
    near_end = g.backup_sb - 5
    a, n = store.alloc_data(BlockNo(near_end), 5)
    assert (a, n) == (near_end, 5)
    b, n = store.alloc_data(BlockNo(near_end), 5)
    assert b == g.data_start  # wrapped to the start
    with pytest.raises(CorruptionError):
        store.free_blocks(BlockNo(g.backup_sb), 1)  # the backup superblock is not data
    store.close()


def test_enospc_and_pending_frees(store: Store) -> None:
    g = store.geo
    free = store.state.free_blocks
    assert free == g.backup_sb - g.data_start
    with pytest.raises(FsError) as ei:
        store.reserve(free + 1)
    assert ei.value.errno == errno.ENOSPC
    with store.reserve(free):
        start, n = store.alloc_data(None, free)
    assert n == free and store.state.free_blocks == 0
    with pytest.raises(FsError) as ei:
        store.alloc_meta(None, InodeNo(1))
    assert ei.value.errno == errno.ENOSPC
    # Freed blocks are not reusable before the freeing transaction is checkpointed ...
    store.free_blocks(BlockNo(start + 7), 3)
    assert store.state.free_blocks == 3
    assert store.blocks.find(g.data_start, 1) is None
    store.commit()
    assert store.blocks.find(g.data_start, 1) is None
    # ... but a reservation (or allocation) checkpoints to release them instead of ENOSPC.
    with store.reserve(3):
        assert store.alloc_data(None, 3) == (start + 7, 3)
    assert store.state.free_blocks == 0
    store.free_blocks(BlockNo(start + 100), 1)
    store.commit()
    assert store.alloc_meta(None, InodeNo(1)) == start + 100  # checkpoint inside alloc
    store.commit()
    assert store.verify_allocators() == []
    store.close()


def test_uninit_groups_are_never_read() -> None:
    # 300 MiB: 76800 blocks = 3 block bitmap groups; the middle one is UNINIT after mkfs
    # (the last holds the backup superblock, so mkfs writes it).
    dev = new_volume(300)
    store = Store.open(dev)
    g = store.geo
    assert g.bbitmap_len == 3 and not store.blocks.summary_entry(2) & UNINIT
    assert store.blocks.summary_entry(1) & UNINIT
    # Any read of the second bitmap block would fail: allocating there must not read it.
    ss = dev.sector_size
    dev.fail_reads = set(range((g.bbitmap_start + 1) * 4096 // ss,
                               (g.bbitmap_start + 2) * 4096 // ss))
    start, n = store.alloc_data(BlockNo(BPB + 10), 20)
    assert (start, n) == (BPB + 10, 20)
    assert not store.blocks.summary_entry(1) & UNINIT
    store.commit()
    store.close()
    dev.fail_reads = set()
    store = Store.open(dev)
    assert store.is_block_allocated(BlockNo(BPB + 10))
    assert not store.is_block_allocated(BlockNo(BPB + 30))
    assert store.verify_allocators() == []
    # A run never crosses a bitmap block: the whole run is preferred, found in the next one.
    start, n = store.alloc_data(BlockNo(BPB - 5), 20)
    assert n == 20 and start // BPB == (start + n - 1) // BPB == 1
    # With a cap that cannot be satisfied contiguously, the first run found is returned.
    start, n = store.alloc_data(BlockNo(BPB - 5), BPB)
    assert (start, n) == (BPB - 5, 5)
    store.close()


def test_random_alloc_free_keeps_summaries_consistent() -> None:
    dev = new_volume(160, 512)
    store = Store.open(dev, cache_blocks=64)
    rng = random.Random(7)
    owned: list[tuple[int, int]] = []
    for step in range(400):
        if owned and rng.random() < 0.4:
            s, n = owned.pop(rng.randrange(len(owned)))
            store.free_blocks(BlockNo(s), n)
        else:
            goal = rng.randrange(store.geo.data_start, store.geo.backup_sb)
            s, n = store.alloc_data(BlockNo(goal), rng.randint(1, 300))
            owned.append((s, n))
        if step % 10 == 0:
            store.commit(durable=rng.random() < 0.5)
    store.commit()
    assert store.verify_allocators() == []
    used = sum(n for _, n in owned)
    assert store.state.free_blocks == store.geo.backup_sb - store.geo.data_start - used
    store.close()
    store = Store.open(dev)
    assert store.verify_allocators() == []
    for s, n in owned:
        assert store.is_block_allocated(BlockNo(s)) and store.is_block_allocated(
            BlockNo(s + n - 1))
    store.close()


# -- inode allocator ------------------------------------------------------------------------


def test_inode_alloc_free_reuse(store: Store) -> None:
    ninodes = store.geo.ninodes
    assert not store.inode_allocated(InodeNo(1))
    inos = [store.alloc_inode() for _ in range(20)]
    assert inos == list(range(1, 21))
    store.free_inode(InodeNo(5))
    assert not store.inode_allocated(InodeNo(5))
    assert store.alloc_inode(InodeNo(1)) == 5  # inodes are reusable at once
    with pytest.raises(FsError):
        store.inode_allocated(InodeNo(0))
    with pytest.raises(FsError):
        store.itable.read_raw(InodeNo(ninodes + 1))
    with pytest.raises(CorruptionError):
        store.free_inode(InodeNo(30))  # double free / never allocated
    assert store.error is not None and store.read_only


def test_inode_enospc() -> None:
    dev = new_volume(8, ninodes=32)
    store = Store.open(dev)
    for _ in range(32):
        store.alloc_inode()
    assert store.state.free_inodes == 0
    with pytest.raises(FsError) as ei:
        store.alloc_inode()
    assert ei.value.errno == errno.ENOSPC
    with pytest.raises(FsError) as ei:
        store.reserve(0, 1)
    assert ei.value.errno == errno.ENOSPC
    assert store.verify_allocators() == []
    store.close()


def test_unused_inode_table_blocks_are_never_read() -> None:
    dev = new_volume(8)
    store = Store.open(dev)
    g = store.geo
    ss = dev.sector_size
    # Garbage in the (never written) inode table, and reads of it fail.
    dev.fail_reads = set(range(g.itable_start * 4096 // ss,
                               (g.itable_start + g.itable_len) * 4096 // ss))
    assert store.itable.read_raw(InodeNo(40)) == bytes(256)
    ino = store.alloc_inode(InodeNo(40))
    store.itable.write_raw(ino, b"\x5a" * 256)
    store.commit()
    store.close()
    dev.fail_reads = set()
    store = Store.open(dev)
    assert store.itable.read_raw(ino) == b"\x5a" * 256
    assert store.itable.read_raw(InodeNo(ino + 1)) == bytes(256)  # slot zeroed by the table
    store.close()


def test_huge_volume_format_is_cheap() -> None:
    dev = MemDevice.of_size(1 << 40)  # 1 TiB, sparse
    Store.format(dev, label="big")
    assert dev.bytes_written < 2 << 20
    store = Store.open(dev)
    start, n = store.alloc_data(None, 1000)
    assert n == 1000 and start == store.geo.data_start
    ino = store.alloc_inode()
    store.itable.write_raw(ino, b"\1" * 256)
    store.close()
    assert dev.bytes_written < 4 << 20
