"""One reservation per operation, and freed inode slots.

The store hands every filesystem operation one reservation, taken before anything changes;
lower layers (file data, the trees) draw from it instead of reserving again, and an
allocation beyond it is an internal error, never a silent overdraw.  A freed inode's table
slot is zeroed in the freeing transaction, and a stale record left by older versions is never
taken for a live inode (docs/DESIGN.md, "Reservations instead of rollback"; docs/FORMAT.md,
"Inode").
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from fsutil import ROOT, fsck_clean, make_image, mounted
from storekit import new_volume

from nexfs.core.attr import SetAttr
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk.dirindex import DirIndex
from nexfs.ondisk.inode_table_block import locate
from nexfs.ondisk.layout import INODE_SIZE
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.store import ReservationError, Store
from nexfs.types import FsError, InodeNo


def fill_to(fs: FileSystem, filler: int, free: int) -> None:
    """Make the volume have exactly ``free`` free blocks by growing or cutting ``filler``
    (appending whole blocks, truncating whole blocks)."""
    for _ in range(64):
        have = fs.store.state.free_blocks
        if have == free:
            return
        size = fs.getattr(filler).size
        if have < free:
            fs.setattr(filler, SetAttr(size=max(0, size - (free - have) * 4096)), ROOT)
        else:
            step = min(have - free, 256)
            try:
                fs.write(filler, size, bytes(step * 4096), ROOT)
            except FsError as exc:  # the last blocks may be reserved for a tree node
                assert exc.errno == errno.ENOSPC
                fs.write(filler, size, bytes(4096), ROOT)
    raise AssertionError(f"could not leave exactly {free} free blocks")


def test_long_symlink_with_six_free_blocks(tmp_path: Path) -> None:
    """Issue 10, defect 6, as reported: a 3,000-byte symlink into an empty directory with
    six free blocks needs two (an index leaf, a data block) and must simply succeed."""
    image = make_image(tmp_path / "vol.img", 16 << 20)
    with mounted(image, atime="noatime") as fs:
        d = fs.mkdir(ROOT_INO, b"empty", 0o755, ROOT).ino
        filler = fs.create(ROOT_INO, b"filler", 0o644, ROOT).ino
        fill_to(fs, filler, 6)
        fs.commit()
        fs.store.checkpoint()
        assert fs.store.state.free_blocks == 6
        attr = fs.symlink(d, b"link", b"t" * 3000, ROOT)
        assert fs.error is None and not fs.read_only, fs.error
        assert fs.readlink(attr.ino) == b"t" * 3000
    code, out = fsck_clean(image)
    assert code == 0, out


# -- the reservation object -------------------------------------------------------------------


def test_nested_reserve_draws_from_the_operation() -> None:
    store = Store.open(new_volume(8))
    free = store.state.free_blocks
    with store.operation() as op:
        assert op.blocks == 0 and not op.taken
        with store.reserve(5, 1):
            assert store.reservation is op and (op.blocks, op.inodes) == (5, 1)
            with store.reserve(3):  # a lower layer's part: drawn, not reserved again
                assert op.blocks == 5 and store.statfs().avail_blocks == free - 5
                store.alloc_data(None, 3)
            assert op.blocks == 2  # leaving the nested one released nothing
            store.alloc_inode()
            with pytest.raises(ReservationError):
                store.reserve(3)  # more than is left: the outer worst case was wrong
            with pytest.raises(ReservationError):
                store.alloc_data(None, 3)  # an overdraw is refused, not taken silently
            with pytest.raises(ReservationError):
                store.alloc_inode()
            assert store.alloc_data(None, 2)[1] == 2
    assert store.reservation is None
    assert store.statfs().avail_blocks == free - 5
    store.close()


def test_allocation_in_an_operation_that_reserved_nothing_is_refused() -> None:
    store = Store.open(new_volume(8))
    with store.operation():
        with pytest.raises(ReservationError):
            store.alloc_meta(None, InodeNo(1))
        with pytest.raises(ReservationError):
            store.reserve_more(1)
    assert store.alloc_meta(None, InodeNo(1))  # outside any operation (mkfs, repair): free
    store.close()


def test_reserve_commits_only_before_the_operation_changed_anything() -> None:
    """Releasing pending frees needs a commit; in the middle of an operation that would
    commit half of it, so the reservation is refused instead (ENOSPC, nothing committed)."""
    store = Store.open(new_volume(8))
    free = store.state.free_blocks
    with store.reserve(free):
        start, _n = store.alloc_data(None, free)
    store.free_blocks(start, 4)
    store.commit()
    tid = store.committed_tid
    with store.operation():
        store.dirty(store.state)  # the operation changed something
        with pytest.raises(FsError) as ei:
            store.reserve(2)
        assert ei.value.errno == errno.ENOSPC and store.committed_tid == tid
    store.abort()


def test_wrong_worst_case_is_an_internal_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """What the explorer relies on: an operation whose worst case is too small fails loudly
    (volume read-only, logged as an internal error) instead of overdrawing."""
    image = make_image(tmp_path / "vol.img", 16 << 20)
    with mounted(image) as fs:
        d = fs.mkdir(ROOT_INO, b"empty", 0o755, ROOT).ino
        monkeypatch.setattr(DirIndex, "worst_case_new_blocks", lambda self: 0)
        with pytest.raises(ReservationError):
            fs.create(d, b"f", 0o644, ROOT)  # the first entry needs a leaf
        assert fs.error is not None and "internal error" in fs.error
        assert any("internal error" in r.getMessage() for r in caplog.records)


# -- freed inode slots (defect 7) ------------------------------------------------------------


def _slot_on_disk(image: Path, ino: int) -> bytes:
    with mounted(image, read_only=True) as fs:
        tblk, slot = locate(fs.store.geo.itable_start, InodeNo(ino))
    with open(image, "rb") as f:
        f.seek(tblk * BLOCK_SIZE + slot * INODE_SIZE)
        return f.read(INODE_SIZE)


def test_freed_inode_slot_is_zeroed(tmp_path: Path) -> None:
    image = make_image(tmp_path / "vol.img", 16 << 20)
    with mounted(image) as fs:
        fs.create(ROOT_INO, b"kept", 0o644, ROOT)  # keeps the table block in use
        ino = fs.create(ROOT_INO, b"gone", 0o644, ROOT).ino
        fs.write(ino, 0, b"x" * 10_000, ROOT)
        fs.setxattr(ino, b"user.a", b"v", 0, ROOT)
        fs.commit()
        old_generation = fs.getattr(ino).generation
        assert fs.store.itable.read_raw(InodeNo(ino)) != bytes(INODE_SIZE)
        fs.unlink(ROOT_INO, b"gone", ROOT)
        # Zeroed in the freeing transaction, not only on disk later.
        assert fs.store.itable.read_raw(InodeNo(ino)) == bytes(INODE_SIZE)
        # An orphan (unlinked while open) is zeroed at its last reference.
        orphan = fs.create(ROOT_INO, b"open", 0o644, ROOT).ino
        fs.ref(orphan)
        fs.unlink(ROOT_INO, b"open", ROOT)
        fs.commit(durable=False)  # inodes are written back at commit (inode_cache.py)
        assert fs.store.itable.read_raw(InodeNo(orphan)) != bytes(INODE_SIZE)
        fs.unref(orphan)
        assert fs.store.itable.read_raw(InodeNo(orphan)) == bytes(INODE_SIZE)
    assert _slot_on_disk(image, orphan) == bytes(INODE_SIZE)
    with mounted(image) as fs:
        with pytest.raises(FsError) as ei:
            fs.getattr(orphan)
        assert ei.value.errno == errno.ENOENT
        # The number is reused with a higher generation, so NFS handles of the old file
        # stay stale: the counter lives in the state block, not in the zeroed slot.
        again = fs.create(ROOT_INO, b"again", 0o644, ROOT)
        assert again.ino == orphan and again.generation > old_generation
    code, out = fsck_clean(image)
    assert code == 0, out


def _fsck(image: Path, *args: str) -> tuple[int, str]:
    import contextlib
    import io

    from nexfs.tools.fsck import main as fsck_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = fsck_main([*args, str(image)])
    return code, out.getvalue()


def test_stale_slot_of_an_old_image_never_comes_back(tmp_path: Path) -> None:
    """A volume written before freed slots were zeroed: the freed inode's slot still holds
    its record (mode, size, extents).  Lookups never see it; fsck finds the volume clean;
    and when the inode bitmap is damaged, so that fsck must learn the inodes in use from
    the table, the stale record is cleared — not reconnected in lost+found, and its old
    extents, now another file's blocks, stay that file's."""
    image = make_image(tmp_path / "vol.img", 16 << 20)
    with mounted(image) as fs:
        stale = fs.create(ROOT_INO, b"old", 0o644, ROOT).ino
        new = fs.create(ROOT_INO, b"new", 0o644, ROOT).ino
        fs.write(stale, 0, b"o" * 8 * BLOCK_SIZE, ROOT)
        fs.commit()
        record = fs.store.itable.read_raw(InodeNo(stale))
        old_runs = list(fs.objects.data(fs.inodes.get(stale)).emap.extents())
        fs.unlink(ROOT_INO, b"old", ROOT)
    with mounted(image) as fs:
        # Fill the volume, so the new file takes over the old file's blocks.
        size = 0
        for chunk in (1 << 20, BLOCK_SIZE):
            while True:
                try:
                    fs.write(new, size, bytes([size // chunk % 251 + 1]) * chunk, ROOT)
                except FsError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
                size += chunk
        content = fs.read(new, 0, size)
        new_blocks = {p + i for _l, p, n in fs.objects.data(fs.inodes.get(new)).emap.extents()
                      for i in range(n)}
        assert any(p in new_blocks for _l, p, _n in old_runs)
        geo = fs.store.geo
        tblk, slot = locate(geo.itable_start, InodeNo(stale))
    # What an older version left behind: the old record in the free slot.
    with open(image, "r+b") as f:
        f.seek(tblk * BLOCK_SIZE + slot * INODE_SIZE)
        f.write(record)
    with mounted(image) as fs:
        with pytest.raises(FsError) as ei:
            fs.getattr(stale)
        assert ei.value.errno == errno.ENOENT
        assert sorted(n for n, _a, _c in fs.readdir(ROOT_INO, 0)
                      if n not in (b".", b"..")) == [b"lost+found", b"new"]
    code, out = fsck_clean(image)
    assert code == 0, out  # a stale record in a free slot is harmless while the bitmap is
    with open(image, "r+b") as f:  # damage the inode bitmap block: its checksum fails
        f.seek(geo.ibitmap_start * BLOCK_SIZE + 2000)
        f.write(b"\xff\xee")
    code, out = _fsck(image, "-y", "-f")
    assert code == 1, out
    assert "stale record" in out, out
    code, out = fsck_clean(image)
    assert code == 0, out
    with mounted(image) as fs:
        assert fs.read(new, 0, size + 1) == content
        lf = fs.lookup(ROOT_INO, b"lost+found", ROOT).ino
        assert [n for n, _a, _c in fs.readdir(lf, 0) if n not in (b".", b"..")] == []
        with pytest.raises(FsError):
            fs.getattr(stale)
    assert _slot_on_disk(image, stale)[:124] == bytes(124)  # cleared (sealed zeros)
