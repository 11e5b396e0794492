"""Capabilities scoped to regions (nexfs/store/grants.py, docs/VALVE.md "Grants inside NexFS").

The store splits the capability it is opened with into four views -- superblocks, journal,
metadata homes, data -- and hands each writer only its own.  These tests show every refusal:

* the matrix: each view writing one block of each region (and runs straddling two regions)
  is allowed exactly where its grant says, refused by the valve everywhere else (a
  ``CapabilityError``, one denial counted, not a byte changed); the same on a device that is
  not a valve (the in-memory test device, through ``blockdev._Window``);
* read-only holders (``fsck -n``, ``nexfs info``, read-only opens) hold READ only: every view
  refuses every write, even with the store's own EROFS check bypassed;
* a misdirected write in a live filesystem -- the data path aimed at the journal or the
  superblock, the journal writer aimed at the data area, a checkpoint home in the journal or a
  superblock, the superblock writer aimed at the state block -- is refused, leaves the target
  untouched and puts the volume in the error state (read-only) through the normal failure
  path.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fsutil import ROOT, make_image, mounted
from memdev import MemDevice
from storekit import new_volume

import nexfs.store.volume
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk.layout import SB_MAGIC, STATE_BLOCK, STATE_ERROR, Geometry
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.blockdev import BlockDev
from nexfs.store.store import Store
from nexfs.store.volume import read_superblock
from nexfs.types import BlockNo, FsError
from valve import CapabilityError, Rights, Valve

RW = Rights.READ | Rights.WRITE
VIEWS = ("superblocks", "journal", "meta", "data")


def _probes(g: Geometry) -> dict[str, tuple[int, int]]:
    """One (block, count) per region boundary, and runs straddling two regions."""
    js, je = g.journal_start, g.journal_start + g.journal_len
    return {
        "primary superblock": (0, 1),
        "state block": (STATE_BLOCK, 1),
        "journal first": (js, 1),
        "journal last": (je - 1, 1),
        "block bitmap": (g.bbitmap_start, 1),
        "block summary": (g.bsummary_start, 1),
        "inode bitmap": (g.ibitmap_start, 1),
        "inode summary": (g.isummary_start, 1),
        "inode table first": (g.itable_start, 1),
        "inode table last": (g.data_start - 1, 1),
        "data first": (g.data_start, 1),
        "data last": (g.backup_sb - 1, 1),
        "backup superblock": (g.backup_sb, 1),
        "superblock + state block": (0, 2),
        "state block + journal": (STATE_BLOCK, 2),
        "journal + bitmap": (je - 1, 2),
        "inode table + data": (g.data_start - 1, 2),
        "data + backup superblock": (g.backup_sb - 1, 2),
    }


def _allowed(view: str, g: Geometry, blkno: int, count: int) -> bool:
    """The grants as documented, written out independently of nexfs/store/grants.py."""
    blocks = set(range(blkno, blkno + count))
    journal = set(range(g.journal_start, g.journal_start + g.journal_len))
    data = set(range(g.data_start, g.backup_sb))
    if view == "superblocks":
        return blocks <= {0} or blocks <= {g.backup_sb}
    if view == "journal":
        return blocks <= journal
    if view == "meta":
        return blocks <= {STATE_BLOCK} or blocks <= set(range(g.bbitmap_start, g.backup_sb))
    return blocks <= data


def _views(store: Store) -> dict[str, BlockDev]:
    return {name: getattr(store.grants, name) for name in VIEWS}


def _probe_all(store: Store, whole: BlockDev, denials: Callable[[], int] | None,
               ) -> dict[tuple[str, str], bool]:
    """Write a pattern through every view at every probe; undo what was allowed.  Returns
    {(view, probe): written}.  Each refusal must be a CapabilityError, counted once by the
    valve (when ``denials`` reads its counter), with the target unchanged."""
    result = {}
    for name, view in _views(store).items():
        for probe, (blkno, count) in _probes(store.geo).items():
            before = bytes(whole.read_blocks(blkno, count))
            pattern = bytes([0xA5]) * (count * BLOCK_SIZE)
            counted = denials() if denials else 0
            try:
                view.write_blocks(blkno, count, pattern)
            except CapabilityError as e:
                assert e.errno == errno.EPERM
                assert bytes(whole.read_blocks(blkno, count)) == before, (name, probe)
                if denials:
                    assert denials() == counted + 1, (name, probe)
                result[name, probe] = False
            else:
                assert bytes(whole.read_blocks(blkno, count)) == pattern
                whole.write_blocks(blkno, count, before)
                result[name, probe] = True
    return result


def _expected(g: Geometry, writable: bool) -> dict[tuple[str, str], bool]:
    return {(name, probe): writable and _allowed(name, g, blkno, count)
            for name in VIEWS for probe, (blkno, count) in _probes(g).items()}


@contextlib.contextmanager
def _valve_store(tmp_path: Path, *, read_only: bool) -> Iterator[tuple[Store, BlockDev, Valve]]:
    img = make_image(tmp_path / "grants.img", 32 << 20)
    with Valve.open(img) as v:
        root = v.grant(RW)
        cap = v.grant(Rights.READ) if read_only else root
        store = Store.open(cap, read_only=read_only)
        try:
            yield store, BlockDev(root), v
        finally:
            store.close()


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_each_view_writes_only_its_regions_through_the_valve(tmp_path: Path,
                                                             read_only: bool) -> None:
    with _valve_store(tmp_path, read_only=read_only) as (store, whole, v):
        got = _probe_all(store, whole, lambda: v.stats.denials)
        assert got == _expected(store.geo, not read_only)
        # Sanity of the matrix itself: every view is refused somewhere, and (writable)
        # allowed somewhere.
        for name in VIEWS:
            row = [ok for (view, _), ok in got.items() if view == name]
            assert not all(row) and (any(row) or read_only)


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_each_view_writes_only_its_regions_on_a_plain_device(read_only: bool) -> None:
    dev = new_volume(8)
    store = Store.open(dev, read_only=read_only)
    try:
        got = _probe_all(store, BlockDev(dev), None)
        assert got == _expected(store.geo, not read_only)
    finally:
        store.close()


def test_read_only_store_refuses_even_past_its_own_check(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-only opens hold READ only: with the store's EROFS check gone (a bug), the
    valve still refuses the data write, and the volume is untouched."""
    with _valve_store(tmp_path, read_only=True) as (store, whole, v):
        monkeypatch.setattr(store.data, "_check_writable", lambda: None)
        target = store.geo.data_start + 5
        before = bytes(whole.read_blocks(target, 1))
        denials = v.stats.denials
        with pytest.raises(FsError) as ei:
            store.data.write(BlockNo(target), 32, bytes(32 * BLOCK_SIZE))
        assert ei.value.errno == errno.EPERM and "lacks Rights.WRITE" in str(ei.value)
        assert v.stats.denials == denials + 1 and v.stats.writes == 0
        assert bytes(whole.read_blocks(target, 1)) == before


def _tool_stores(monkeypatch: pytest.MonkeyPatch) -> list[dict[tuple[str, str], bool]]:
    """Probe every Store a tool opens, while it is open: returns one matrix per store."""
    seen: list[dict[tuple[str, str], bool]] = []
    init = Store.__init__

    def probing_init(self: Store, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        seen.append(_probe_all(self, self.grants.superblocks, None))

    monkeypatch.setattr(Store, "__init__", probing_init)
    return seen


@pytest.mark.parametrize("tool", ["fsck -n", "nexfs info"])
def test_read_only_tools_hold_read_only_grants(tmp_path: Path, tool: str,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from nexfs.tools.fsck import main as fsck_main
    from nexfs.tools.info import main as info_main

    img = make_image(tmp_path / "tool.img", 32 << 20)
    before = img.read_bytes()
    seen = _tool_stores(monkeypatch)
    code = fsck_main(["-n", "-f", str(img)]) if tool == "fsck -n" else info_main([str(img)])
    capsys.readouterr()
    assert code == 0 and seen
    for matrix in seen:
        assert not any(matrix.values()), [k for k, ok in matrix.items() if ok]
    assert img.read_bytes() == before


def test_read_only_mount_holds_read_only_grants(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only mount opens the filesystem as mount.py does (a READ grant of a valve
    opened read-only): every view of its store refuses every write."""
    img = make_image(tmp_path / "ro.img", 32 << 20)
    before = img.read_bytes()
    seen = _tool_stores(monkeypatch)
    with mounted(img, read_only=True) as fs:
        assert fs.lookup(ROOT_INO, b"lost+found", ROOT).ino
    assert len(seen) == 1 and not any(seen[0].values())
    assert img.read_bytes() == before


# -- misdirected writes in a live filesystem ---------------------------------------------------

@contextlib.contextmanager
def _live(tmp_path: Path, caplog: pytest.LogCaptureFixture,
          ) -> Iterator[tuple[FileSystem, BlockDev, Valve]]:
    """A mounted filesystem with some committed content, on a real image."""
    img = make_image(tmp_path / "live.img", 32 << 20)
    with Valve.open(img) as v:
        root = v.grant(RW)
        fs = FileSystem.open(v.grant(RW))
        try:
            d = fs.mkdir(ROOT_INO, b"dir", 0o755, ROOT)
            f = fs.create(d.ino, b"file", 0o644, ROOT)
            fs.write(f.ino, 0, b"x" * 100_000, ROOT)
            fs.commit()
            with caplog.at_level(logging.ERROR):
                yield fs, BlockDev(root), v
        finally:
            fs.close()


def _assert_went_read_only(fs: FileSystem, whole: BlockDev, v: Valve, denials: int,
                           caplog: pytest.LogCaptureFixture) -> None:
    assert v.stats.denials == denials + 1
    assert fs.store.error is not None and "outside" in fs.store.error
    with pytest.raises(FsError) as ei:
        fs.mkdir(ROOT_INO, b"later", 0o755, ROOT)
    assert ei.value.errno == errno.EROFS
    assert read_superblock(whole).state & STATE_ERROR  # the superblock writer still can
    assert any("read-only" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("target", ["journal", "primary superblock", "backup superblock",
                                    "block bitmap", "inode table"])
@pytest.mark.parametrize("count", [1, 32], ids=["cached", "direct"])
def test_data_path_misdirected_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch, target: str,
                                          count: int) -> None:
    """The data path's own range check gone (a bug): a data write aimed at the journal, a
    superblock or fixed metadata is refused by the valve, directly (large write) or when the
    data cache flushes it at the next commit (small write)."""
    with _live(tmp_path, caplog) as (fs, whole, v):
        g = fs.store.geo
        blkno = {"journal": g.journal_start, "primary superblock": 0,
                 "backup superblock": g.backup_sb, "block bitmap": g.bbitmap_start,
                 "inode table": g.itable_start}[target]
        if target == "backup superblock":
            blkno = g.backup_sb - count + 1  # the run ends on it
        before = bytes(whole.read_blocks(blkno, count))
        monkeypatch.setattr(fs.store.data, "_check_range", lambda blkno, count: None)
        denials = v.stats.denials
        with pytest.raises(FsError) as ei:
            fs.store.data.write(BlockNo(blkno), count, bytes([0xEE]) * (count * BLOCK_SIZE))
            fs.commit()  # a cached write reaches the device here
        assert ei.value.errno == errno.EPERM
        after = bytes(whole.read_blocks(blkno, count))
        for i in range(count):
            # The superblocks are rewritten since (marked ERROR), never with the data.
            if blkno + i not in (0, g.backup_sb):
                assert after[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] == \
                    before[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE], blkno + i
        assert bytes([0xEE]) * 64 not in after
        _assert_went_read_only(fs, whole, v, denials, caplog)


def test_journal_writer_misdirected_is_refused(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """The journal's position wrong (a bug): the commit aimed at the data area is refused."""
    with _live(tmp_path, caplog) as (fs, whole, v):
        g = fs.store.geo
        fs.store.journal.start = g.data_start
        before = bytes(whole.read_blocks(g.data_start, 64))
        denials = v.stats.denials
        fs.mkdir(ROOT_INO, b"new", 0o755, ROOT)
        with pytest.raises(FsError) as ei:
            fs.commit()
        assert ei.value.errno == errno.EPERM
        assert bytes(whole.read_blocks(g.data_start, 64)) == before
        _assert_went_read_only(fs, whole, v, denials, caplog)


@pytest.mark.parametrize("home", ["journal", "primary superblock", "backup superblock"])
def test_checkpoint_home_misdirected_is_refused(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture,
                                                home: str) -> None:
    """A checkpoint told to write a home block into the journal or a superblock (a bug in
    the bookkeeping) is refused; the target keeps its bytes."""
    with _live(tmp_path, caplog) as (fs, whole, v):
        g = fs.store.geo
        blkno = {"journal": g.journal_start + g.journal_len - 1, "primary superblock": 0,
                 "backup superblock": g.backup_sb}[home]
        fs.mkdir(ROOT_INO, b"new", 0o755, ROOT)
        fs.store.commit()
        pos, tid = next(iter(fs.store._ckpt.values()))
        fs.store._ckpt[blkno] = (pos, tid)
        before = bytes(whole.read_blocks(blkno, 1))
        denials = v.stats.denials
        with pytest.raises(FsError) as ei:
            fs.store.checkpoint()
        assert ei.value.errno == errno.EPERM
        if home == "journal":
            assert bytes(whole.read_blocks(blkno, 1)) == before
        else:  # the error marking rewrote it as a superblock, not as a metadata block
            assert read_superblock(whole).state & STATE_ERROR
        _assert_went_read_only(fs, whole, v, denials, caplog)


def test_superblock_writer_misdirected_is_refused(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The superblock writer aimed at the state block (a bug) is refused there: the
    checkpoint's legitimate home write of the state block stands, no superblock image lands
    on it, and the volume goes read-only."""
    with _live(tmp_path, caplog) as (fs, whole, v):
        fs.mkdir(ROOT_INO, b"new", 0o755, ROOT)
        fs.commit()
        monkeypatch.setattr(nexfs.store.volume, "SB_PRIMARY", STATE_BLOCK)
        denials = v.stats.denials
        with pytest.raises(FsError) as ei:
            fs.store.checkpoint()
        assert ei.value.errno == errno.EPERM
        state = bytes(whole.read_blocks(STATE_BLOCK, 1))
        assert SB_MAGIC not in state and state[:4] == b"FXST"
        # Refused twice: the checkpoint's write, then the error marking's.
        assert v.stats.denials == denials + 2
        assert fs.store.error is not None
        with pytest.raises(FsError) as ei:
            fs.mkdir(ROOT_INO, b"later", 0o755, ROOT)
        assert ei.value.errno == errno.EROFS


def test_plain_device_refusal_is_typed() -> None:
    """The in-memory device's windows refuse with the valve's own exception type."""
    dev = MemDevice.of_size(8 << 20, 4096)
    view = BlockDev(dev).scoped((10, 20), [(10, 20)])
    view.write_blocks(10, 10, bytes(10 * BLOCK_SIZE))
    with pytest.raises(CapabilityError, match="outside"):
        view.write_blocks(19, 2, bytes(2 * BLOCK_SIZE))
    with pytest.raises(CapabilityError, match="outside"):
        view.read_blocks(9, 1)
    ro = BlockDev(dev).scoped((10, 20))
    with pytest.raises(CapabilityError, match=r"lacks Rights\.WRITE"):
        ro.write_blocks(10, 1, bytes(BLOCK_SIZE))
    with pytest.raises(CapabilityError, match=r"lacks Rights\.WRITE"):
        BlockDev(dev).read_only().write_blocks(0, 1, bytes(BLOCK_SIZE))


def test_fsck_superblock_look_is_read_only(tmp_path: Path) -> None:
    """What fsck uses to judge the superblock copies before it opens the store (also when
    it repairs) cannot write: a READ capability, refused and counted by the valve."""
    img = make_image(tmp_path / "ro.img", 32 << 20)
    with Valve.open(img) as v:
        view = BlockDev(v.grant(RW)).read_only()
        assert read_superblock(view).geo.nblocks == 32 << 20 >> 12
        with pytest.raises(CapabilityError, match=r"lacks Rights\.WRITE"):
            view.write_blocks(0, 1, bytes(BLOCK_SIZE))
        assert v.stats.denials == 1 and v.stats.writes == 0
