"""After the volume failed, every fsync and fsyncdir answers EIO: the errno that says
"your data may not be durable", whatever became of the inode.

The error state discards the running transaction (nexfs/store/failure.py), so a file or
directory created in it no longer exists once the volume has failed.  An application still
holding it open and calling fsync must hear EIO, not ENOENT (which the lookup of the vanished
inode would give): ENOENT from fsync means nothing to an application and hides the failure.
Found by tests/test_mount_nbd.py's wire-fault explorer (a renamer's fsync of its temporary
file answered ENOENT after the server refused a write).  Checked here for each kind of object,
created before the last commit or in the discarded transaction.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest
from fsutil import ROOT
from memdev import MemDevice

from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.types import FsError

KINDS: dict[str, Callable[[FileSystem, bytes], int]] = {
    "file": lambda fs, name: fs.create(ROOT_INO, name, 0o644, ROOT).ino,
    "dir": lambda fs, name: fs.mkdir(ROOT_INO, name, 0o755, ROOT).ino,
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("committed", [True, False], ids=["committed", "discarded"])
def test_fsync_after_an_error_is_eio(kind: str, committed: bool) -> None:
    dev = MemDevice.of_size(16 << 20, 4096)
    FileSystem.format(dev)
    fs = FileSystem.open(dev)
    ino = KINDS[kind](fs, b"obj")
    if kind == "file":
        fs.write(ino, 0, b"data", ROOT)
    if committed:
        fs.commit(durable=True)
    fs.failures.failed(OSError(errno.EIO, "the device went away"))
    sync = (lambda: fs.fsync(ino, False)) if kind == "file" else (lambda: fs.fsyncdir(ino))
    with pytest.raises(FsError) as err:
        sync()
    assert err.value.errno == errno.EIO, err.value
    with pytest.raises(FsError) as err:
        fs.fsyncdir(ROOT_INO)
    assert err.value.errno == errno.EIO, err.value
    fs.close()
