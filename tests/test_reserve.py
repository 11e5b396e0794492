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

from fsutil import ROOT, fsck_clean, make_image, mounted

from nexfs.attr import SetAttr
from nexfs.fs import ROOT_INO, FileSystem
from nexfs.types import FsError


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
