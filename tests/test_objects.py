"""The object layer (nexfs/core/objects.py) through its public API only: directory handles write
their root back, inodes allocated and freed through it leave a volume fsck finds clean, and
a file's data handle never outlives the decoded inode it is over.

Every test runs on the ``fs`` fixture, which runs fsck on the image afterwards.
"""

from __future__ import annotations

import stat

from fsutil import ROOT

from nexfs.core.fs import FileSystem
from nexfs.core.objects import ROOT_INO
from nexfs.ondisk.inode_record import DIR_ROOT


def _commit(fs: FileSystem) -> None:
    fs.inodes.flush()
    fs.store.commit(durable=True)


def test_directory_handle_writes_its_root_back(fs: FileSystem) -> None:
    """Enough entries to split the index's root leaf: the new root reaches the inode, and
    the ordinary lookup (which reads the root from the inode) sees every entry."""
    objects = fs.objects
    d = fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    inode = objects.inode(d.ino)
    first_root = DIR_ROOT.unpack_from(inode.area, 0)[0]
    names = [b"entry-%04d" % i for i in range(400)]
    for name in names:
        f = objects.new_inode(inode, stat.S_IFREG | 0o644, 0, 0, inode.mtime_ns)
        objects.directory(inode).add(name, f.ino, stat.S_IFREG >> 12)
    _commit(fs)
    assert DIR_ROOT.unpack_from(inode.area, 0)[0] != first_root
    assert inode.size == max(1, inode.blocks) * 4096
    for name in names[::37]:
        found = objects.directory(inode).lookup(name)
        assert found is not None and fs.lookup(d.ino, name, ROOT).ino == found[0]
    # Remove them all again through handles, freeing the inodes: the tree shrinks back.
    for name in names:
        ino, _dtype = objects.directory(inode).remove(name)
        child = objects.inode(ino)
        child.nlink = 0
        objects.free_inode(child)
    _commit(fs)
    assert objects.directory(inode).index.is_empty()
    assert [n for n, _a, _c in fs.readdir(d.ino, 0) if n not in (b".", b"..")] == []


def test_data_handle_is_dropped_with_its_inode(fs: FileSystem) -> None:
    """The handle cache follows the inode cache: a handle is reused while its inode is
    cached, and gone once the inode is forgotten, discarded or the cache cleared (a handle
    over a stale decoded inode would write a stale extent map back).  The decoded access
    ACL, kept beside the inode the same way, goes with it."""
    objects, cache = fs.objects, fs.inodes
    a = fs.create(ROOT_INO, b"a", 0o644, ROOT)
    fs.write(a.ino, 0, b"x" * 10000, ROOT)
    _commit(fs)
    inode = objects.inode(a.ino)
    handle = objects.data(inode)
    assert objects.data(inode) is handle and handle.inode is inode
    cache.acls[a.ino] = ()
    cache.clear()
    assert a.ino not in cache.data_handles and a.ino not in cache.acls
    fresh = objects.inode(a.ino)
    assert fresh is not inode and objects.data(fresh) is not handle
    assert objects.data(fresh).read(0, 10000) == b"x" * 10000
    objects.dirty(fresh)
    cache.acls[a.ino] = ()
    cache.discard_dirty()
    assert a.ino not in cache.data_handles and a.ino not in cache.acls
    fs.unlink(ROOT_INO, b"a", ROOT)
    assert a.ino not in cache.data_handles


def test_orphan_list_through_the_object_layer(fs: FileSystem) -> None:
    """orphan_add/orphan_remove keep the on-disk list and the in-memory links in step, in
    any order of removal."""
    objects = fs.objects
    inodes = [objects.inode(fs.create(ROOT_INO, b"o%d" % i, 0o644, ROOT).ino)
              for i in range(5)]
    for inode in inodes:
        objects.orphan_add(inode)
    assert fs.store.state.orphan_head == inodes[-1].ino
    for inode in (inodes[2], inodes[4], inodes[0], inodes[3], inodes[1]):
        objects.orphan_remove(inode)
        objects._orphan_prev = None  # the next removal walks the on-disk list again
    assert fs.store.state.orphan_head == 0
    assert all(i.orphan_next == 0 for i in inodes)
    _commit(fs)
