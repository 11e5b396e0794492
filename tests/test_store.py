"""The metadata store: lifecycle, cache, error state, and crash exploration with crashsim."""

from __future__ import annotations

import errno
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from crashsim import RecordingDevice, crash_states
from memdev import MemDevice
from storekit import PayloadBlock, new_volume, read_payload

from nexfs.ondisk.layout import STATE_CLEAN, STATE_DIRTY, STATE_ERROR, NotNexfsError
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.blockdev import BlockDev
from nexfs.store.store import Store
from nexfs.store.volume import read_superblock, write_superblock
from nexfs.types import BlockNo, CorruptionError, FsError, InodeNo

log = logging.getLogger(__name__)


def decoder(store: Store) -> Callable[[BlockNo, memoryview], PayloadBlock]:
    return PayloadBlock.decoder(store.volume_seed)


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_open_close_reopen(sector_size: int) -> None:
    dev = new_volume(8, sector_size)
    store = Store.open(dev)
    assert store.sb.state & STATE_DIRTY and store.sb.label == "test"
    assert len(store.sb.uuid) == 16 and len(store.sb.dir_hash_key) == 16
    blocks = []
    with store.reserve(20, 2):
        for i in range(20):
            b = store.alloc_meta(None, InodeNo(1))
            store.put_new(PayloadBlock(b, i * 3))
            blocks.append(b)
        ino = store.alloc_inode()
        store.itable.write_raw(ino, bytes(range(256)))
    store.state.orphan_head = ino
    store.dirty(store.state)
    before = store.statfs()
    store.close()
    sb = read_superblock(BlockDev(dev))
    assert sb.state == STATE_CLEAN and sb.mount_count == 1
    store = Store.open(dev)
    assert store.sb.mount_count == 2
    assert [read_payload(store, b) for b in blocks] == [i * 3 for i in range(20)]
    assert store.itable.read_raw(ino) == bytes(range(256))
    assert store.inode_allocated(ino) and store.state.orphan_head == ino
    assert store.statfs() == before
    assert store.verify_allocators() == []
    store.close()


def test_statfs_and_reservation_accounting() -> None:
    store = Store.open(new_volume(8))
    s0 = store.statfs()
    assert s0.total_blocks == store.geo.nblocks and s0.free_blocks == s0.avail_blocks
    with store.reserve(100, 3):
        assert store.statfs().avail_blocks == s0.free_blocks - 100
        store.alloc_data(None, 40)
        assert store.statfs().avail_blocks == s0.free_blocks - 100  # 40 used, 60 reserved
        assert store.statfs().avail_inodes == s0.free_inodes - 3
    assert store.statfs().avail_blocks == s0.free_blocks - 40
    store.close()


def test_commit_bookkeeping_and_barriers() -> None:
    dev = new_volume(8)
    store = Store.open(dev)
    assert not store.needs_barrier
    t0 = store.committed_tid
    assert store.commit() == t0  # nothing to commit, nothing to write
    b = store.alloc_meta(None, InodeNo(1))
    store.put_new(PayloadBlock(b, 1))
    assert store.running_tid == t0 + 1
    barriers = dev.barriers
    assert store.commit(durable=False) == t0 + 1
    assert dev.barriers == barriers and store.needs_barrier
    assert store.durable_tid == t0 and store.committed_tid == t0 + 1
    store.sync()  # nothing to commit: a single barrier
    assert dev.barriers == barriers + 1 and not store.needs_barrier
    assert store.durable_tid == t0 + 1
    # Data-only change: fsync must still barrier.
    start, _ = store.alloc_data(None, 1)
    store.commit()
    store.data.write(start, 1, bytes([7]) * BLOCK_SIZE)
    assert store.needs_barrier
    writes = dev.writes
    store.sync()  # the data block (held by the data cache until now), then the barrier
    assert dev.writes == writes + 2 and not store.needs_barrier
    assert bytes(store.data.read(start, 1)) == bytes([7]) * BLOCK_SIZE
    store.close()


def test_ordered_data_barrier_before_commit_block() -> None:
    dev = new_volume(8)
    rec = RecordingDevice(dev)
    store = Store.open(rec)
    start, _ = store.alloc_data(None, 2)
    rec.log.clear()
    store.data.write(start, 2, [bytes(BLOCK_SIZE), bytes([1]) * BLOCK_SIZE])  # vectored
    store.commit(durable=False)
    ops = [e.op for e in rec.log]
    assert ops == ["write", "write", "barrier", "write"]  # data, D+I (durable), commit
    store.close()


def test_cache_is_bounded_and_evicted_blocks_come_back() -> None:
    dev = new_volume(8)
    store = Store.open(dev, cache_blocks=32)
    blocks = []
    for i in range(150):
        b = store.alloc_meta(None, InodeNo(1))
        store.put_new(PayloadBlock(b, i))
        blocks.append(b)
        if store.should_commit():
            store.commit(durable=False)
    store.commit()
    assert len(store._cache) <= 32
    # Some of these are evicted and now read back from the journal, some from home.
    assert [read_payload(store, b) for b in blocks] == list(range(150))
    for b in blocks[::7]:
        blk = store.get(BlockNo(b), decoder(store))
        blk.value += 1
        store.dirty(blk)
    store.close()
    store = Store.open(dev)
    expect = [i + (1 if k % 7 == 0 else 0) for k, i in enumerate(range(150))]
    assert [read_payload(store, b) for b in blocks] == expect
    store.close()


def test_transaction_larger_than_journal_is_refused() -> None:
    store = Store.open(new_volume(8))
    with pytest.raises(FsError):
        for _ in range(store.max_txn_blocks + 1):
            b = store.alloc_meta(None, InodeNo(1))
            store.put_new(PayloadBlock(b, 0))
    assert store.error and "journal" in store.error


def test_corruption_enters_error_state(caplog: pytest.LogCaptureFixture) -> None:
    dev = new_volume(8)
    store = Store.open(dev)
    good = store.alloc_meta(None, InodeNo(1))
    bad = store.alloc_meta(None, InodeNo(1))
    store.put_new(PayloadBlock(good, 11))
    store.put_new(PayloadBlock(bad, 22))
    store.close()
    bdev = BlockDev(dev)
    raw = bytearray(bdev.read_blocks(bad, 1))
    raw[40] ^= 1
    bdev.write_blocks(bad, 1, raw)
    store = Store.open(dev)
    pending = store.alloc_meta(None, InodeNo(1))
    store.put_new(PayloadBlock(pending, 33))  # running transaction: discarded by the error
    with caplog.at_level(logging.ERROR), pytest.raises(CorruptionError):
        read_payload(store, bad)
    assert store.error and "checksum" in store.error and store.read_only
    assert any("read-only" in r.getMessage() for r in caplog.records)
    assert read_payload(store, good) == 11  # undamaged objects still readable
    with pytest.raises(FsError) as ei:
        store.alloc_meta(None, InodeNo(1))
    assert ei.value.errno == errno.EROFS
    with pytest.raises(FsError):
        store.commit()
    store.close()
    sb = read_superblock(bdev)
    assert sb.state & STATE_ERROR and "checksum" in sb.error_reason
    # The discarded transaction never reached the disk.
    store = Store.open(dev, ignore_error=True)
    assert not store.is_block_allocated(pending)
    store.clear_error()
    store.close()
    assert not read_superblock(bdev).state & STATE_ERROR


def test_error_volume_opens_read_only() -> None:
    dev = new_volume(8)
    bdev = BlockDev(dev)
    sb = read_superblock(bdev)
    sb.state |= STATE_ERROR
    sb.error_reason = "bad inode 7"
    write_superblock(bdev, sb)
    store = Store.open(dev)
    assert store.read_only and store.error == "bad inode 7"
    with pytest.raises(FsError) as ei:
        store.alloc_inode()
    assert ei.value.errno == errno.EROFS


def test_device_error_during_commit() -> None:
    dev = new_volume(8)
    store = Store.open(dev)
    b = store.alloc_meta(None, InodeNo(1))
    store.put_new(PayloadBlock(b, 5))
    store.commit()
    blk = store.get(b, decoder(store))
    blk.value = 6
    store.dirty(blk)
    dev.fail_after_writes = 0
    with pytest.raises(FsError) as ei:
        store.commit()
    assert ei.value.errno == errno.EIO and store.error and "device error" in store.error
    assert read_payload(store, b) == 5  # back at the last commit
    dev.fail_after_writes = None
    store = Store.open(dev.crash())
    assert read_payload(store, b) == 5


def test_bad_block_numbers_are_refused() -> None:
    store = Store.open(new_volume(8))
    j = store.geo.journal_start
    for bad in (0, j + 3, store.geo.backup_sb, store.geo.nblocks + 5):
        with pytest.raises(CorruptionError, match="outside"):
            store.get(BlockNo(bad), decoder(store))
    with pytest.raises(CorruptionError, match="data area"):
        store.data.read(BlockNo(store.geo.data_start - 1), 1)


def test_features_and_foreign_devices() -> None:
    with pytest.raises(NotNexfsError, match="not a NexFS volume"):
        Store.open(MemDevice.of_size(8 << 20))
    dev = new_volume(8)
    bdev = BlockDev(dev)
    sb = read_superblock(bdev)
    sb.feature_ro_compat = 1
    write_superblock(bdev, sb)
    with pytest.raises(FsError) as ei:
        Store.open(dev)
    assert ei.value.errno == errno.EROFS
    Store.open(dev, read_only=True).close()
    sb.feature_incompat = 1 << 5
    write_superblock(bdev, sb)
    with pytest.raises(FsError, match="unsupported features") as ei:
        Store.open(dev, read_only=True)
    assert ei.value.errno == errno.EINVAL


# -- crash exploration ----------------------------------------------------------------------


@dataclass
class Snapshot:
    """The model after one commit."""

    tid: int
    begin_barriers: int
    end_barriers: int
    durable: bool
    meta: dict[int, tuple[int, int]]  # metadata block -> (value, data block or 0)
    data: dict[int, int]  # data block -> fill byte
    inodes: frozenset[int]
    free_blocks: int
    free_inodes: int
    problems: list[str] = field(default_factory=list)


def _run_workload(store: Store, rec: RecordingDevice, rng: random.Random,
                  ncommits: int) -> list[Snapshot]:
    meta: dict[int, tuple[int, int]] = {}
    data: dict[int, int] = {}
    inodes: set[int] = set()
    seed = store.volume_seed

    def snap(begin: int, durable: bool) -> Snapshot:
        return Snapshot(store.committed_tid, begin, rec.barrier_count, durable, dict(meta),
                        dict(data), frozenset(inodes), store.state.free_blocks,
                        store.state.free_inodes)

    snaps = [snap(0, True)]
    snaps[0].end_barriers = 0  # the formatted volume: durable before recording started
    counter = 1
    for _ in range(ncommits):
        for _ in range(rng.randint(1, 4)):
            counter += 1
            op = rng.random()
            if op < 0.3 or len(meta) < 5:
                with store.reserve(2, 0):
                    b: int = store.alloc_meta(None, InodeNo(1))
                    dblk: int = 0
                    if rng.random() < 0.3:
                        dblk, _ = store.alloc_data(None, 1)
                        store.data.write(BlockNo(dblk), 1, bytes([counter % 251 + 1]) * BLOCK_SIZE)
                        data[dblk] = counter % 251 + 1
                    store.put_new(PayloadBlock(BlockNo(b), counter, dblk))
                    meta[b] = (counter, dblk)
            elif op < 0.75:
                for b in rng.sample(sorted(meta), min(len(meta), rng.randint(1, 6))):
                    blk = store.get(BlockNo(b), PayloadBlock.decoder(seed))
                    blk.value = counter
                    store.dirty(blk)
                    meta[b] = (counter, meta[b][1])
            elif op < 0.9:
                b = rng.choice(sorted(meta))
                _, dblk = meta.pop(b)
                store.free_meta(BlockNo(b))
                if dblk:
                    store.free_blocks(BlockNo(dblk), 1)
                    del data[dblk]
            elif op < 0.96 or not inodes:
                ino: int = store.alloc_inode()
                store.itable.write_raw(InodeNo(ino), bytes([counter % 256]) * 256)
                inodes.add(ino)
            else:
                ino = rng.choice(sorted(inodes))
                store.free_inode(InodeNo(ino))
                inodes.discard(ino)
        begin = rec.barrier_count
        durable = rng.random() < 0.35
        store.commit(durable=durable)
        snaps.append(snap(begin, durable))
        r = rng.random()
        if r < 0.08:
            store.sync()
        elif r < 0.12:
            store.checkpoint()
    return snaps


def _matches(store: Store, s: Snapshot, every_block: set[int], every_ino: set[int]) -> str:
    """'' when the reopened store shows exactly snapshot ``s``, else the first difference."""
    if (store.state.free_blocks, store.state.free_inodes) != (s.free_blocks, s.free_inodes):
        return f"free counts {store.state.free_blocks}/{store.state.free_inodes}"
    for b in every_block:
        if store.is_block_allocated(BlockNo(b)) != (b in s.meta or b in s.data):
            return f"block {b} allocation"
    for ino in every_ino:
        if store.inode_allocated(InodeNo(ino)) != (ino in s.inodes):
            return f"inode {ino} allocation"
    for b, (value, dblk) in s.meta.items():
        blk = store.get(BlockNo(b), PayloadBlock.decoder(store.volume_seed))
        if (blk.value, blk.tag) != (value, dblk):
            return f"block {b} holds {blk.value}"
        if dblk and bytes(store.data.read(BlockNo(dblk), 1)[:1]) != bytes([s.data[dblk]]):
            return f"data block {dblk} (ordered data) not written"
    return ""


@pytest.mark.parametrize(("sector_size", "ncommits", "subsets", "seed"),
                         [(512, 90, 3, 1), (4096, 60, 2, 2)])
def test_crash_exploration(sector_size: int, ncommits: int, subsets: int, seed: int) -> None:
    dev = new_volume(8, sector_size)
    base = dev.snapshot()
    rec = RecordingDevice(dev)
    rng = random.Random(seed)
    store = Store.open(rec, cache_blocks=48)
    snaps = _run_workload(store, rec, rng, ncommits)
    store.close()
    every_block = {b for s in snaps for b in (*s.meta, *s.data)}
    every_ino = {i for s in snaps for i in s.inodes}
    checked = 0
    replayed = 0
    for cs in crash_states(rec.log, base, subsets_per_barrier=subsets, rng=rng):
        k = cs.epoch
        lower = max(i for i, s in enumerate(snaps)
                    if s.end_barriers + (0 if s.durable else 1) <= k)
        upper = max(i for i, s in enumerate(snaps) if s.begin_barriers <= k)
        reopened = Store.open(cs.device)
        replayed += reopened.committed_tid > reopened.sb.journal_tid - 1
        assert reopened.verify_allocators() == [], (k, cs.note)
        why = {i: _matches(reopened, snaps[i], every_block, every_ino)
               for i in range(lower, upper + 1)}
        assert "" in why.values(), (k, cs.note, why)
        if checked % 10 == 0:  # and the recovered volume closes and reopens cleanly
            reopened.close()
            again = Store.open(cs.device)
            assert again.verify_allocators() == []
            again.close()
        checked += 1
    log.info("crash exploration: %d crash states checked", checked)
    print(f"\ncrash exploration ({sector_size}-byte sectors): {checked} crash states, "
          f"{len(snaps) - 1} commits, {rec.barrier_count} barriers")
    assert checked >= 150


# -- on a real image file through the valve -------------------------------------------------

try:
    import valve as _valve

    VALVE_SKIP = ""
except ImportError as exc:  # only when the valve (or its native core) cannot be imported
    _valve = None  # type: ignore[assignment]
    VALVE_SKIP = f"valve cannot be imported: {exc}"


@pytest.mark.skipif(_valve is None, reason=VALVE_SKIP or "valve cannot be imported")
@pytest.mark.parametrize("sector_size", [None, 4096])
def test_store_on_valve_image(tmp_path: Path, sector_size: int | None) -> None:
    assert _valve is not None
    path = tmp_path / "vol.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    rights = _valve.Rights.READ | _valve.Rights.WRITE
    with _valve.Valve.open(path, sector_size=sector_size) as v:
        cap = v.grant(rights)
        Store.format(cap, label="valve")
        store = Store.open(cap)
        blocks = []
        with store.reserve(70, 1):
            for i in range(64):
                b = store.alloc_meta(None, InodeNo(1))
                store.put_new(PayloadBlock(b, i))
                blocks.append(b)
            start, n = store.alloc_data(None, 4)
            data = store.bdev.alloc(4)
            data[:] = bytes([9]) * (4 * BLOCK_SIZE)
            store.data.write(start, n, data)
            ino = store.alloc_inode()
            store.itable.write_raw(ino, b"\x11" * 256)
        store.commit()
        store.close()
        assert v.stats.bounce_copies == 0  # every write went zero-copy
    with _valve.Valve.open(path, sector_size=sector_size) as v:
        store = Store.open(v.grant(rights))
        assert store.sb.label == "valve"
        assert [read_payload(store, b) for b in blocks] == list(range(64))
        assert bytes(store.data.read(start, 4)) == bytes([9]) * (4 * BLOCK_SIZE)
        assert store.itable.read_raw(ino) == b"\x11" * 256
        assert store.verify_allocators() == []
        store.close()
    # A read-only capability opens the volume read-only and writes nothing.
    with _valve.Valve.open(path, read_only=True, sector_size=sector_size) as v:
        store = Store.open(v.grant(_valve.Rights.READ), read_only=True)
        assert read_payload(store, blocks[5]) == 5
        store.close()
        assert v.stats.writes == 0


@pytest.mark.skipif(_valve is None, reason=VALVE_SKIP or "valve cannot be imported")
def test_valve_image_not_nexfs(tmp_path: Path) -> None:
    assert _valve is not None
    path = tmp_path / "blank.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    rights = _valve.Rights.READ | _valve.Rights.WRITE
    with _valve.Valve.open(path) as v, pytest.raises(NotNexfsError, match="not a NexFS"):
        Store.open(v.grant(rights))


def test_small_helpers_for_the_filesystem(tmp_path: Path) -> None:
    dev = new_volume(8)
    store = Store.open(dev)
    c = store.change_count()
    assert store.next_generation() == 1 and store.next_generation() == 2
    assert store.change_count() > c
    assert store.itable.block_of(InodeNo(17)) == store.geo.itable_start + 1
    assert len(store.data.alloc_buffer(BLOCK_SIZE)) == BLOCK_SIZE
    b = store.alloc_meta(None, InodeNo(1))
    store.put_new(PayloadBlock(b, 1))
    store.commit()
    store.abort()  # like a power cut after a durable commit
    again = Store.open(dev)
    assert read_payload(again, b) == 1 and again.state.next_generation == 3
    again.close()
    from nexfs.ondisk.layout import probe_superblock
    img = tmp_path / "img"
    img.write_bytes(dev.image_bytes())
    desc = probe_superblock(str(img))
    assert desc is not None and "NexFS volume labelled 'test'" in desc
    blank = tmp_path / "blank"
    blank.write_bytes(bytes(1 << 16))
    assert probe_superblock(str(blank)) is None
