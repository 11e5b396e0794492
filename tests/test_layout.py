"""Geometry, superblock and state block codecs; choosing between the superblock copies."""

from __future__ import annotations

import errno

import pytest
from memdev import MemDevice
from storekit import new_volume

from nexfs.ondisk import checksum
from nexfs.ondisk.layout import (
    FORMAT_VERSION,
    JOURNAL_MAX,
    STATE_BLOCK,
    STATE_ERROR,
    Geometry,
    NotNexfsError,
    StateBlock,
    Superblock,
    check_label,
)
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.blockdev import BlockDev
from nexfs.store.volume import read_superblock, write_superblock
from nexfs.types import CorruptionError, FsError

UUID = bytes(range(16))
SEED = checksum.uuid_seed(UUID)


def make_sb(nblocks: int = 4096) -> Superblock:
    return Superblock(geo=Geometry.compute(nblocks), uuid=UUID, dir_hash_key=b"k" * 16,
                      label="vol", sector_size=512, mkfs_time=123, journal_tid=9,
                      error_reason="bad ünïcode reason")


def test_geometry_small_volume() -> None:
    g = Geometry.compute(2048)
    assert g.journal_len == 256 and g.ninodes == 512 and g.itable_len == 32
    assert g.validate() is None
    assert g.data_start == 2 + 256 + 1 + 1 + 1 + 1 + 32
    assert g.backup_sb == 2047
    assert g.is_fixed(0) and g.is_fixed(g.data_start - 1) and g.is_fixed(2047)
    assert not g.is_fixed(g.data_start)


@pytest.mark.parametrize("nblocks", [400, 10_000, 32_512, 32_513, 1 << 28, 1 << 32])
def test_geometry_regions_are_contiguous(nblocks: int) -> None:
    g = Geometry.compute(nblocks)
    assert g.validate() is None
    end = 0
    for _name, start, length in g.regions():
        assert start == end and length >= 1
        end = start + length
    assert end == g.data_start < g.backup_sb
    assert 256 <= g.journal_len <= JOURNAL_MAX
    assert g.ninodes % 16 == 0 and g.ninodes <= 2**32 - 1


def test_geometry_large_volumes() -> None:
    tib = Geometry.compute(1 << 28)  # 1 TiB
    assert tib.journal_len == JOURNAL_MAX
    assert tib.bbitmap_len == -(-(1 << 28) // 32512)
    assert tib.ninodes == (1 << 28) // 4
    huge = Geometry.compute(1 << 36)  # 256 TiB: inode count capped
    assert huge.ninodes == 2**32 - 16


def test_geometry_too_small_and_inode_override() -> None:
    with pytest.raises(FsError) as ei:
        Geometry.compute(300)
    assert ei.value.errno == errno.EINVAL and "too small" in str(ei.value)
    assert Geometry.compute(4096, ninodes=1000).ninodes == 1008  # rounded up to 16


def test_superblock_round_trip_both_copies() -> None:
    sb = make_sb()
    for where in (0, sb.geo.backup_sb):
        raw = sb.encode(where)
        assert len(raw) == BLOCK_SIZE
        back = Superblock.decode(raw, where)
        assert back == sb
        assert back.label == "vol" and back.error_reason == "bad ünïcode reason"
        assert back.version == FORMAT_VERSION


@pytest.mark.parametrize("offset", [8, 12, 30, 100, 200, 400, 4095])
def test_superblock_flipped_bit_detected(offset: int) -> None:
    raw = make_sb().encode(0)
    raw[offset] ^= 0x10
    with pytest.raises(CorruptionError):
        Superblock.decode(raw, 0)


def test_superblock_wrong_place_zero_and_magic() -> None:
    sb = make_sb()
    with pytest.raises(CorruptionError, match="checksum"):
        Superblock.decode(sb.encode(0), sb.geo.backup_sb)
    with pytest.raises(NotNexfsError):
        Superblock.decode(bytes(BLOCK_SIZE), 0)
    raw = sb.encode(0)
    raw[72:88] = bytes(16)  # another volume's uuid: the checksum is bound to it
    with pytest.raises(CorruptionError):
        Superblock.decode(raw, 0)


def test_superblock_future_version_refused() -> None:
    sb = make_sb()
    sb.version = FORMAT_VERSION + 1
    with pytest.raises(FsError, match="format version") as ei:
        Superblock.decode(sb.encode(0), 0)
    assert ei.value.errno == errno.EINVAL


def test_superblock_bad_geometry_refused() -> None:
    sb = make_sb()
    sb.geo = Geometry(**{**sb.geo.__dict__, "itable_len": sb.geo.itable_len + 1})
    with pytest.raises(CorruptionError, match="geometry"):
        Superblock.decode(sb.encode(0), 0)


def test_label_rules() -> None:
    check_label("x" * 64)
    check_label("é" * 32)
    for bad in ("x" * 65, "é" * 33, "a\0b"):
        with pytest.raises(FsError):
            check_label(bad)


def test_state_block_round_trip_and_corruption() -> None:
    geo = Geometry.compute(4096)
    st = StateBlock(free_blocks=100, free_inodes=50, orphan_head=3, next_generation=77,
                    data_hint=500, meta_hint=600, inode_hint=4)
    out = memoryview(bytearray(BLOCK_SIZE))
    st.encode(out, SEED, 42)
    back = StateBlock.decode(out, SEED, geo)
    assert (back.free_blocks, back.free_inodes, back.orphan_head, back.next_generation,
            back.data_hint, back.meta_hint, back.inode_hint) == (100, 50, 3, 77, 500, 600, 4)
    with pytest.raises(CorruptionError, match="checksum"):
        StateBlock.decode(out, checksum.uuid_seed(bytes(16)), geo)  # another volume
    flipped = bytearray(out)
    flipped[40] ^= 1
    with pytest.raises(CorruptionError, match="checksum"):
        StateBlock.decode(flipped, SEED, geo)
    with pytest.raises(CorruptionError, match="zeros"):
        StateBlock.decode(bytes(BLOCK_SIZE), SEED, geo)
    # A block sealed for another place (misdirected write) fails too.
    from nexfs.ondisk.metablock import seal_block
    moved = memoryview(bytearray(out))
    seal_block(moved, SEED, STATE_BLOCK + 1)
    with pytest.raises(CorruptionError):
        StateBlock.decode(moved, SEED, geo)
    bad = StateBlock(free_blocks=geo.nblocks + 1, free_inodes=0)
    bad.encode(out, SEED, 1)
    with pytest.raises(CorruptionError, match="out of range"):
        StateBlock.decode(out, SEED, geo)


# -- choosing between the two copies --------------------------------------------------------


def _bdev(dev: MemDevice) -> BlockDev:
    return BlockDev(dev)


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_read_superblock_prefers_higher_generation(sector_size: int) -> None:
    dev = new_volume(8, sector_size)
    bdev = _bdev(dev)
    sb = read_superblock(bdev)
    sb.label = "newer"
    sb.generation += 1
    # Only the primary got the new generation (crash between the two writes).
    bdev.write_blocks(0, 1, sb.encode(0), durable=True)
    assert read_superblock(bdev).label == "newer"
    # Torn primary (first sector new, rest old garbage): the backup describes the volume.
    raw = bytearray(sb.encode(0))
    raw[sector_size:] = bytes(BLOCK_SIZE - sector_size) if sector_size < BLOCK_SIZE else b""
    raw[100] ^= 0xFF
    bdev.write_blocks(0, 1, raw, durable=True)
    got = read_superblock(bdev)
    assert got.label == "test" and got.generation == sb.generation - 1


def test_read_superblock_both_damaged_or_foreign() -> None:
    dev = new_volume(8)
    bdev = _bdev(dev)
    sb = read_superblock(bdev)
    for where in (0, sb.geo.backup_sb):
        raw = bytearray(bdev.read_blocks(where, 1))
        raw[300] ^= 1
        bdev.write_blocks(where, 1, raw)
    with pytest.raises(CorruptionError, match="both superblocks damaged"):
        read_superblock(bdev)
    blank = MemDevice.of_size(8 << 20)
    with pytest.raises(NotNexfsError, match="not a NexFS volume") as ei:
        read_superblock(_bdev(blank))
    assert ei.value.errno == errno.EINVAL


def test_write_superblock_bumps_generation_and_updates_both() -> None:
    dev = new_volume(8)
    bdev = _bdev(dev)
    sb = read_superblock(bdev)
    gen = sb.generation
    sb.state |= STATE_ERROR
    sb.error_reason = "x"
    before = dev.barriers
    write_superblock(bdev, sb)
    assert dev.barriers - before == 2  # primary, barrier, backup, barrier
    for where in (0, sb.geo.backup_sb):
        got = Superblock.decode(bdev.read_blocks(where, 1), where)
        assert got.generation == gen + 1 and got.state & STATE_ERROR


def test_format_reports_progress() -> None:
    from nexfs.store.store import Store
    notes: list[str] = []
    Store.format(MemDevice.of_size(8 << 20), label="p", progress=notes.append)
    assert notes[-1] == "writing superblocks" and "metadata" in notes[0]
