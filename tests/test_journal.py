"""Journal format (write + scan), torn/stale transaction detection, replay and checkpoint."""

from __future__ import annotations

import random
import struct

import pytest
from crashsim import RecordingDevice
from memdev import MemDevice
from storekit import PayloadBlock, new_volume, read_payload

from nexfs.ondisk import checksum
from nexfs.ondisk.metablock import BLOCK_SIZE, MAGIC_JDESC
from nexfs.store.blockdev import BlockDev
from nexfs.store.journal import (
    DESC_ENTRIES,
    JHEADER,
    Journal,
    max_images,
    restart_tid,
    scan,
    txn_blocks,
)
from nexfs.store.store import Store
from nexfs.types import BlockNo, CorruptionError, InodeNo

SEED = checksum.uuid_seed(b"j" * 16)
JSTART, JLEN = 10, 1200


def raw_journal(sector_size: int = 4096) -> tuple[MemDevice, BlockDev, Journal]:
    dev = MemDevice.of_size(8 << 20, sector_size)
    bdev = BlockDev(dev)
    return dev, bdev, Journal(bdev, JSTART, JLEN, SEED, next_tid=5)


def put_txn(j: Journal, homes: list[int], fill: int, *, durable: bool = True) -> int:
    txn = j.prepare(homes)
    for i in range(len(homes)):
        txn.image(i)[:] = bytes([(fill + i) % 256]) * BLOCK_SIZE
    return j.write(txn, durable=durable, data_barrier=False)


def scan_all(bdev: BlockDev, first_tid: int = 5) -> list[tuple[int, list[int], bytes]]:
    return [(t.tid, t.homes, t.data) for t in scan(bdev, JSTART, JLEN, first_tid, SEED,
                                                 lambda h: 0 < h < 10_000)]


def test_sizes() -> None:
    assert DESC_ENTRIES == 508
    assert txn_blocks(1) == 3 and txn_blocks(508) == 510 and txn_blocks(509) == 512
    assert max_images(256) == 254 and txn_blocks(max_images(1200)) <= 1200


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_write_and_scan_round_trip(sector_size: int) -> None:
    _dev, bdev, j = raw_journal(sector_size)
    put_txn(j, [100, 101, 7], 1)
    big = list(range(1000, 1000 + 600))  # two descriptor blocks
    put_txn(j, big, 50)
    put_txn(j, [42], 9)
    got = scan_all(bdev)
    assert [(t, h) for t, h, _ in got] == [(5, [100, 101, 7]), (6, big), (7, [42])]
    assert got[1][2][599 * BLOCK_SIZE] == (50 + 599) % 256
    assert j.head == (1 + 3 + 1) + (2 + 600 + 1) + (1 + 1 + 1) and j.next_tid == 8
    # Starting at another tid finds nothing (stale journal contents).
    assert scan_all(bdev, first_tid=6) == []


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_torn_transaction_detected_at_every_sector(sector_size: int) -> None:
    dev, _bdev, j = raw_journal(sector_size)
    put_txn(j, [100, 101], 1)
    base = dev.snapshot()
    put_txn(j, [200, 201, 202], 2, durable=False)
    (lba, secs) = dev.volatile[-1]
    for k in range(len(secs)):
        for variant in ("drop", "garbage"):
            if variant == "drop" and base.sectors.get(lba + k, base.zero) == secs[k]:
                continue  # dropping it changes nothing
            crashed = base.snapshot()
            for i, s in enumerate(secs):
                if i != k:
                    crashed.sectors[lba + i] = s
                elif variant == "garbage":
                    crashed.sectors[lba + i] = bytes([0xA5]) * sector_size
            got = scan_all(BlockDev(crashed))
            assert [t for t, _, _ in got] == [5], (k, variant)
    whole = dev.snapshot()
    assert [t for t, _, _ in scan_all(BlockDev(whole))] == [5, 6]


def test_data_barrier_orders_commit_block_after_data() -> None:
    dev, _bdev, j = raw_journal()
    rec = RecordingDevice(dev)
    j.bdev = BlockDev(rec)
    txn = j.prepare([100, 101])
    j.write(txn, durable=False, data_barrier=True)
    ops = [e.op for e in rec.log]
    assert ops == ["write", "barrier", "write"]  # D+I durable, then the commit block


def test_hostile_descriptor_is_bounded() -> None:
    dev, bdev, _j = raw_journal()
    blk = bytearray(BLOCK_SIZE)
    JHEADER.pack_into(blk, 0, MAGIC_JDESC, 0, JSTART, 5, 1_000_000_000, 0,
                      -(-1_000_000_000 // DESC_ENTRIES) & 0xFFFF)
    checksum.seal(blk, 4, SEED, JSTART)
    bdev.write_blocks(JSTART, 1, blk)
    reads = dev.reads
    assert scan_all(bdev) == []
    assert dev.reads - reads == 1  # refused from the descriptor alone


def test_valid_transaction_with_bad_home_is_corruption() -> None:
    _dev, bdev, j = raw_journal()
    put_txn(j, [100, 20_000], 1)
    with pytest.raises(CorruptionError, match="outside the metadata area"):
        scan_all(bdev)


def test_wrong_volume_journal_is_ignored() -> None:
    _dev, bdev, j = raw_journal()
    put_txn(j, [100], 1)
    got = list(scan(bdev, JSTART, JLEN, 5, checksum.uuid_seed(b"x" * 16), lambda h: True))
    assert got == []


# -- through the store ----------------------------------------------------------------------


def populate(store: Store, n: int, base: int = 0) -> list[int]:
    blocks: list[int] = []
    for i in range(n):
        b = store.alloc_meta(None, InodeNo(1))
        store.put_new(PayloadBlock(b, base + i))
        blocks.append(b)
    return blocks


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_commit_crash_replay(sector_size: int) -> None:
    dev = new_volume(8, sector_size)
    store = Store.open(dev)
    blocks = populate(store, 10)
    store.commit(durable=True)
    tid = store.committed_tid
    crashed = dev.crash()  # power cut: nothing after the last barrier survives
    again = Store.open(crashed)
    assert [read_payload(again, b) for b in blocks] == list(range(10))
    assert again.committed_tid == tid
    # The next tid starts above any the crashed timeline can have left in the journal.
    assert again.running_tid == restart_tid(tid, tid + 1, again.geo.journal_len) > tid + 1
    assert again.verify_allocators() == []
    again.close()
    # The replay was written home and the journal emptied: a read-only open replays nothing.
    ro = Store.open(crashed, read_only=True)
    assert not ro._overlay and [read_payload(ro, b) for b in blocks] == list(range(10))


def test_read_only_open_replays_in_memory_only() -> None:
    dev = new_volume(8)
    store = Store.open(dev)
    blocks = populate(store, 5, base=100)
    store.commit()
    crashed = dev.crash()
    writes = crashed.writes
    ro = Store.open(crashed, read_only=True)
    assert [read_payload(ro, b) for b in blocks] == list(range(100, 105))
    assert crashed.writes == writes  # nothing written
    with pytest.raises(Exception, match="read-only"):
        ro.alloc_meta(None, InodeNo(1))
    ro.close()
    assert crashed.writes == writes


def test_replay_is_idempotent_and_survives_crash_during_replay() -> None:
    dev = new_volume(8)
    store = Store.open(dev)
    blocks = populate(store, 30)
    store.commit()
    for b in blocks[:10]:
        blk = store.get(BlockNo(b), PayloadBlock.decoder(store.volume_seed))
        blk.value += 1000
        store.dirty(blk)
    store.commit()
    expect = [1000 + i for i in range(10)] + list(range(10, 30))
    crashed = dev.crash()
    rec = RecordingDevice(crashed)
    base = crashed.snapshot()
    Store.open(rec).close()
    # Cut power at every write of the replaying open and reopen: always the same result.
    from crashsim import crash_states
    n = 0
    for cs in crash_states(rec.log, base, subsets_per_barrier=4, rng=random.Random(3)):
        s = Store.open(cs.device)
        assert [read_payload(s, b) for b in blocks] == expect, cs.note
        assert s.verify_allocators() == []
        s.close()
        n += 1
    assert n > 10


def test_checkpoint_writes_home_and_empties_journal() -> None:
    dev = new_volume(8)
    store = Store.open(dev)
    blocks = populate(store, 8)
    store.commit()
    assert store.journal.head > 0
    tid = store.committed_tid
    store.checkpoint()
    assert store.journal.head == 0 and store.sb.journal_tid == tid + 1
    bdev = BlockDev(dev)
    for i, b in enumerate(blocks):
        raw = bdev.read_blocks(b, 1)
        assert struct.unpack_from("<Q", raw, 32)[0] == i  # home copy current
    # Journal is reused from its start with the next tid.
    populate(store, 1)
    store.commit()
    # One payload block + state block + bitmap block + summary block.
    assert store.journal.head == txn_blocks(4)
    store.close()
