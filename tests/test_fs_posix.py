"""POSIX semantics of the filesystem core, driven in-process on a real image file."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import pytest
from fsutil import OTHER, ROOT, USER, mounted, resolve

from nexfs.core.attr import UTIME_NOW, Ctx, SetAttr
from nexfs.core.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INO, FileSystem
from nexfs.types import FsError


def err(exc_info: pytest.ExceptionInfo[FsError]) -> int:
    return exc_info.value.errno


def names(fs: FileSystem, ino: int) -> list[bytes]:
    return [n for n, _a, _c in fs.readdir(ino, 0)]


def test_fresh_volume_has_root_and_lost_found(fs: FileSystem) -> None:
    root = fs.getattr(ROOT_INO)
    assert stat.S_ISDIR(root.mode)
    assert root.nlink == 3
    assert names(fs, ROOT_INO) == [b".", b"..", b"lost+found"]
    assert stat.S_ISDIR(fs.lookup(ROOT_INO, b"lost+found", ROOT).mode)


def test_create_write_read_and_persist(image: Path) -> None:
    with mounted(image) as fs:
        a = fs.create(ROOT_INO, b"hello", 0o644, ROOT)
        assert fs.write(a.ino, 0, b"hello world", ROOT) == 11
        assert fs.read(a.ino, 0, 100) == b"hello world"
        assert fs.read(a.ino, 6, 3) == b"wor"
        assert fs.read(a.ino, 100, 10) == b""
    with mounted(image) as fs:
        ino = fs.lookup(ROOT_INO, b"hello", ROOT).ino
        assert fs.getattr(ino).size == 11
        assert fs.read(ino, 0, 100) == b"hello world"


def test_large_and_sparse_files(fs: FileSystem) -> None:
    a = fs.create(ROOT_INO, b"big", 0o644, ROOT)
    block = bytes(range(256)) * 16
    data = block * 300  # 1.2 MB, crosses many blocks
    fs.write(a.ino, 0, data, ROOT)
    assert fs.read(a.ino, 0, len(data)) == data
    # unaligned overwrite in the middle
    fs.write(a.ino, 5000, b"X" * 10000, ROOT)
    expect = data[:5000] + b"X" * 10000 + data[15000:]
    assert fs.read(a.ino, 0, len(data)) == expect
    # sparse: a write far away leaves a hole that reads as zeros and takes no space
    s = fs.create(ROOT_INO, b"sparse", 0o644, ROOT)
    fs.write(s.ino, 1 << 30, b"end", ROOT)
    attr = fs.getattr(s.ino)
    assert attr.size == (1 << 30) + 3
    assert attr.blocks <= 16
    assert fs.read(s.ino, 4096 * 1000, 8192) == bytes(8192)
    assert fs.read(s.ino, (1 << 30) - 2, 10) == b"\0\0end"


def test_truncate_down_and_up_reads_zeros(fs: FileSystem) -> None:
    a = fs.create(ROOT_INO, b"t", 0o644, ROOT)
    fs.write(a.ino, 0, b"A" * 10000, ROOT)
    fs.setattr(a.ino, SetAttr(size=5000), ROOT)
    assert fs.getattr(a.ino).size == 5000
    fs.setattr(a.ino, SetAttr(size=12000), ROOT)
    got = fs.read(a.ino, 0, 12000)
    assert got == b"A" * 5000 + bytes(7000)
    fs.setattr(a.ino, SetAttr(size=0), ROOT)
    assert fs.getattr(a.ino).blocks == 0


def test_name_errors(fs: FileSystem) -> None:
    fs.create(ROOT_INO, b"f", 0o644, ROOT)
    with pytest.raises(FsError) as e:
        fs.create(ROOT_INO, b"f", 0o644, ROOT)
    assert err(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        fs.lookup(ROOT_INO, b"nope", ROOT)
    assert err(e) == errno.ENOENT
    with pytest.raises(FsError) as e:
        fs.create(ROOT_INO, b"x" * 256, 0o644, ROOT)
    assert err(e) == errno.ENAMETOOLONG
    fs.create(ROOT_INO, b"y" * 255, 0o644, ROOT)
    f = fs.lookup(ROOT_INO, b"f", ROOT)
    with pytest.raises(FsError) as e:
        fs.create(f.ino, b"child", 0o644, ROOT)
    assert err(e) == errno.ENOTDIR
    with pytest.raises(FsError) as e:
        fs.rmdir(ROOT_INO, b"f", ROOT)
    assert err(e) == errno.ENOTDIR
    d = fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    with pytest.raises(FsError) as e:
        fs.unlink(ROOT_INO, b"d", ROOT)
    assert err(e) == errno.EISDIR
    fs.create(d.ino, b"inner", 0o644, ROOT)
    with pytest.raises(FsError) as e:
        fs.rmdir(ROOT_INO, b"d", ROOT)
    assert err(e) == errno.ENOTEMPTY


def test_any_byte_but_slash_and_nul_in_names(fs: FileSystem) -> None:
    weird = bytes(b for b in range(1, 256) if b != ord("/"))
    fs.create(ROOT_INO, weird, 0o644, ROOT)
    assert weird in names(fs, ROOT_INO)
    with pytest.raises(FsError) as e:
        fs.create(ROOT_INO, b"a/b", 0o644, ROOT)
    assert err(e) == errno.EINVAL


def test_mkdir_rmdir_link_counts(fs: FileSystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    assert d.nlink == 2
    assert fs.getattr(ROOT_INO).nlink == 4
    sub = fs.mkdir(d.ino, b"sub", 0o755, ROOT)
    assert fs.getattr(d.ino).nlink == 3
    assert fs.lookup(sub.ino, b"..", ROOT).ino == d.ino
    fs.rmdir(d.ino, b"sub", ROOT)
    assert fs.getattr(d.ino).nlink == 2
    fs.rmdir(ROOT_INO, b"d", ROOT)
    assert fs.getattr(ROOT_INO).nlink == 3


def test_hard_links_and_unlink_while_open(fs: FileSystem) -> None:
    a = fs.create(ROOT_INO, b"a", 0o644, ROOT)
    fs.write(a.ino, 0, b"data", ROOT)
    fs.link(a.ino, ROOT_INO, b"b", ROOT)
    assert fs.getattr(a.ino).nlink == 2
    fs.unlink(ROOT_INO, b"a", ROOT)
    assert fs.getattr(a.ino).nlink == 1
    assert fs.read(fs.lookup(ROOT_INO, b"b", ROOT).ino, 0, 10) == b"data"
    fs.ref(a.ino)  # an open file
    fs.unlink(ROOT_INO, b"b", ROOT)
    assert fs.read(a.ino, 0, 10) == b"data"
    free_before = fs.statfs().ffree
    fs.unref(a.ino)
    assert fs.statfs().ffree == free_before + 1
    with pytest.raises(FsError) as e:
        fs.getattr(a.ino)
    assert err(e) == errno.ENOENT
    d = fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    with pytest.raises(FsError) as e:
        fs.link(d.ino, ROOT_INO, b"d2", ROOT)
    assert err(e) == errno.EPERM


def test_orphan_freed_after_crash(image: Path) -> None:
    with mounted(image) as fs:
        before = fs.statfs()
        a = fs.create(ROOT_INO, b"a", 0o644, ROOT)
        fs.write(a.ino, 0, b"x" * 100000, ROOT)
        fs.ref(a.ino)
        fs.unlink(ROOT_INO, b"a", ROOT)
        fs.commit(durable=True)
        # Simulate a crash: the store goes away without a clean close.
        fs.store.abort()
        fs._refs.clear()
        fs.store = _Closed()  # type: ignore[assignment]
    with mounted(image) as fs:
        after = fs.statfs()
        assert after.ffree == before.ffree
        assert after.bfree == before.bfree


class _Closed:
    read_only = True
    error = None

    def close(self) -> None:
        pass


def test_symlinks_short_and_long(fs: FileSystem) -> None:
    s = fs.symlink(ROOT_INO, b"s", b"target", ROOT)
    assert stat.S_ISLNK(s.mode)
    assert fs.readlink(s.ino) == b"target"
    assert s.size == 6
    long_target = b"x/" * 1000
    t = fs.symlink(ROOT_INO, b"t", long_target, ROOT)
    assert fs.readlink(t.ino) == long_target
    with pytest.raises(FsError) as e:
        fs.symlink(ROOT_INO, b"u", b"a" * 4096, ROOT)
    assert err(e) == errno.ENAMETOOLONG
    fs.unlink(ROOT_INO, b"t", ROOT)


def test_special_files(fs: FileSystem) -> None:
    fifo = fs.mknod(ROOT_INO, b"fifo", stat.S_IFIFO | 0o644, 0, ROOT)
    assert stat.S_ISFIFO(fifo.mode)
    sock = fs.mknod(ROOT_INO, b"sock", stat.S_IFSOCK | 0o644, 0, ROOT)
    assert stat.S_ISSOCK(sock.mode)
    chr_ = fs.mknod(ROOT_INO, b"null", stat.S_IFCHR | 0o666, (1 << 8) | 3, ROOT)
    assert fs.getattr(chr_.ino).rdev == (1 << 8) | 3
    blk = fs.mknod(ROOT_INO, b"blk", stat.S_IFBLK | 0o600, 7 << 8, ROOT)
    assert stat.S_ISBLK(blk.mode)
    with pytest.raises(FsError) as e:
        fs.mknod(ROOT_INO, b"c2", stat.S_IFCHR | 0o666, 5, USER)
    assert err(e) in (errno.EPERM, errno.EACCES)


def test_rename_cases(fs: FileSystem) -> None:
    a = fs.create(ROOT_INO, b"a", 0o644, ROOT)
    b = fs.create(ROOT_INO, b"b", 0o644, ROOT)
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0, ROOT)  # replace
    assert fs.lookup(ROOT_INO, b"b", ROOT).ino == a.ino
    with pytest.raises(FsError):
        fs.getattr(b.ino)
    c = fs.create(ROOT_INO, b"c", 0o644, ROOT)
    with pytest.raises(FsError) as e:
        fs.rename(ROOT_INO, b"b", ROOT_INO, b"c", RENAME_NOREPLACE, ROOT)
    assert err(e) == errno.EEXIST
    fs.rename(ROOT_INO, b"b", ROOT_INO, b"c", RENAME_EXCHANGE, ROOT)
    assert fs.lookup(ROOT_INO, b"b", ROOT).ino == c.ino
    assert fs.lookup(ROOT_INO, b"c", ROOT).ino == a.ino
    with pytest.raises(FsError) as e:
        fs.rename(ROOT_INO, b"b", ROOT_INO, b"zz", RENAME_EXCHANGE, ROOT)
    assert err(e) == errno.ENOENT
    d1 = fs.mkdir(ROOT_INO, b"d1", 0o755, ROOT)
    d2 = fs.mkdir(d1.ino, b"d2", 0o755, ROOT)
    with pytest.raises(FsError) as e:
        fs.rename(ROOT_INO, b"d1", d2.ino, b"x", 0, ROOT)
    assert err(e) == errno.EINVAL
    with pytest.raises(FsError) as e:
        fs.rename(ROOT_INO, b"d1", ROOT_INO, b"c", 0, ROOT)
    assert err(e) == errno.ENOTDIR
    with pytest.raises(FsError) as e:
        fs.rename(ROOT_INO, b"c", ROOT_INO, b"d1", 0, ROOT)
    assert err(e) == errno.EISDIR
    # move a directory across parents: link counts follow
    e3 = fs.mkdir(ROOT_INO, b"e", 0o755, ROOT)
    fs.rename(d1.ino, b"d2", e3.ino, b"d2", 0, ROOT)
    assert fs.getattr(d1.ino).nlink == 2
    assert fs.getattr(e3.ino).nlink == 3
    assert fs.lookup(d2.ino, b"..", ROOT).ino == e3.ino
    # replace an empty directory
    fs.rename(e3.ino, b"d2", ROOT_INO, b"d1", 0, ROOT)
    assert fs.lookup(ROOT_INO, b"d1", ROOT).ino == d2.ino
    assert fs.getattr(e3.ino).nlink == 2
    # same inode under two names: nothing happens
    fs.link(a.ino, ROOT_INO, b"a2", ROOT)
    fs.rename(ROOT_INO, b"a2", ROOT_INO, b"c", 0, ROOT)
    assert b"a2" in names(fs, ROOT_INO)


def test_permissions_and_sticky(fs: FileSystem) -> None:
    tmp = fs.mkdir(ROOT_INO, b"tmp", 0o777, ROOT)
    fs.setattr(tmp.ino, SetAttr(mode=0o1777), ROOT)
    mine = fs.create(tmp.ino, b"mine", 0o644, USER)
    assert mine.uid == USER.uid
    with pytest.raises(FsError) as e:
        fs.unlink(tmp.ino, b"mine", OTHER)
    assert err(e) == errno.EPERM
    with pytest.raises(FsError) as e:
        fs.rename(tmp.ino, b"mine", tmp.ino, b"stolen", 0, OTHER)
    assert err(e) == errno.EPERM
    secret = fs.create(ROOT_INO, b"secret", 0o600, ROOT)
    with pytest.raises(FsError) as e:
        fs.open_file(secret.ino, 0, USER)
    assert err(e) == errno.EACCES
    with pytest.raises(FsError) as e:
        fs.setattr(secret.ino, SetAttr(mode=0o777), USER)
    assert err(e) == errno.EPERM
    with pytest.raises(FsError) as e:
        fs.setattr(mine.ino, SetAttr(uid=0), USER)
    assert err(e) == errno.EPERM
    with pytest.raises(FsError) as e:
        fs.create(ROOT_INO, b"nope", 0o644, USER)
    assert err(e) == errno.EACCES
    fs.unlink(tmp.ino, b"mine", USER)


def test_setgid_inheritance_and_killpriv(fs: FileSystem) -> None:
    d = fs.mkdir(ROOT_INO, b"g", 0o777, ROOT)
    fs.setattr(d.ino, SetAttr(mode=0o2777, gid=50), ROOT)
    f = fs.create(d.ino, b"f", 0o755, USER)
    assert f.gid == 50
    sub = fs.mkdir(d.ino, b"sub", 0o755, USER)
    assert sub.gid == 50 and sub.mode & stat.S_ISGID
    x = fs.create(ROOT_INO, b"x", 0o777, ROOT)
    fs.setattr(x.ino, SetAttr(mode=0o6777), ROOT)
    fs.write(x.ino, 0, b"data", USER)
    assert fs.getattr(x.ino).mode & 0o7777 == 0o777
    fs.setattr(x.ino, SetAttr(mode=0o6755), ROOT)
    fs.setattr(x.ino, SetAttr(uid=5), ROOT)
    assert not fs.getattr(x.ino).mode & stat.S_ISUID


def test_timestamps(fs: FileSystem) -> None:
    f = fs.create(ROOT_INO, b"f", 0o644, ROOT)
    root1 = fs.getattr(ROOT_INO)
    assert root1.mtime_ns >= f.ctime_ns
    fs.setattr(f.ino, SetAttr(atime_ns=1_000_000_123, mtime_ns=2_000_000_456), ROOT)
    a = fs.getattr(f.ino)
    assert (a.atime_ns, a.mtime_ns) == (1_000_000_123, 2_000_000_456)
    before = a.ctime_ns
    fs.write(f.ino, 0, b"x", ROOT)
    b = fs.getattr(f.ino)
    assert b.mtime_ns > 2_000_000_456 and b.ctime_ns >= before
    fs.setattr(f.ino, SetAttr(mtime_ns=UTIME_NOW), ROOT)
    assert fs.getattr(f.ino).mtime_ns >= b.mtime_ns
    # UTIME_OMIT is "None": atime untouched
    fs.setattr(f.ino, SetAttr(mtime_ns=5), ROOT)
    assert fs.getattr(f.ino).atime_ns == 1_000_000_123
    with pytest.raises(FsError) as e:
        fs.setattr(f.ino, SetAttr(mtime_ns=5), USER)
    assert err(e) == errno.EPERM


def test_xattrs(fs: FileSystem) -> None:
    f = fs.create(ROOT_INO, b"f", 0o644, ROOT)
    with pytest.raises(FsError) as e:
        fs.getxattr(f.ino, b"security.capability")
    assert err(e) == errno.ENODATA
    fs.setxattr(f.ino, b"user.a", b"1", 0, ROOT)
    big = bytes(range(256)) * 256  # 64 KiB
    fs.setxattr(f.ino, b"user.big", big, 0, ROOT)
    assert fs.getxattr(f.ino, b"user.big") == big
    assert sorted(fs.listxattr(f.ino)) == [b"user.a", b"user.big"]
    with pytest.raises(FsError) as e:
        fs.setxattr(f.ino, b"user.a", b"2", 1, ROOT)  # XATTR_CREATE
    assert err(e) == errno.EEXIST
    with pytest.raises(FsError) as e:
        fs.setxattr(f.ino, b"user.none", b"2", 2, ROOT)  # XATTR_REPLACE
    assert err(e) == errno.ENODATA
    with pytest.raises(FsError) as e:
        fs.setxattr(f.ino, b"user.toolarge", bytes(65537), 0, ROOT)
    assert err(e) == errno.E2BIG
    with pytest.raises(FsError) as e:
        fs.setxattr(f.ino, b"bogus.ns", b"", 0, ROOT)
    assert err(e) == errno.EOPNOTSUPP
    fs.removexattr(f.ino, b"user.a", ROOT)
    with pytest.raises(FsError) as e:
        fs.getxattr(f.ino, b"user.a")
    assert err(e) == errno.ENODATA
    fs.unlink(ROOT_INO, b"f", ROOT)


def test_readdir_cookies_stable_under_changes(fs: FileSystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    for i in range(500):
        fs.create(d.ino, f"f{i:04}".encode(), 0o644, ROOT)
    seen: list[bytes] = []
    cookie = 0
    removed: set[bytes] = set()
    it = 0
    while True:
        batch = []
        for name, _attr, c in fs.readdir(d.ino, cookie):
            batch.append(name)
            cookie = c
            if len(batch) == 50:
                break
        if not batch:
            break
        seen.extend(batch)
        # change the directory between batches
        fs.create(d.ino, f"new{it}".encode(), 0o644, ROOT)
        victim = f"f{(it * 37) % 500:04}".encode()
        if victim not in seen and victim not in removed:
            fs.unlink(d.ino, victim, ROOT)
            removed.add(victim)
        it += 1
    untouched = {f"f{i:04}".encode() for i in range(500)} - removed
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    assert untouched <= set(seen), "an untouched entry was skipped"


def test_statfs_tracks_usage(fs: FileSystem) -> None:
    s0 = fs.statfs()
    f = fs.create(ROOT_INO, b"f", 0o644, ROOT)
    fs.write(f.ino, 0, bytes(1 << 20), ROOT)
    s1 = fs.statfs()
    assert s0.bfree - s1.bfree >= 256
    assert s1.ffree == s0.ffree - 1
    fs.unlink(ROOT_INO, b"f", ROOT)


def test_enospc_changes_nothing(tmp_path: Path) -> None:
    from fsutil import fsck_clean, make_image

    image = make_image(tmp_path / "small.img", 16 << 20)
    with mounted(image) as fs:
        f = fs.create(ROOT_INO, b"fill", 0o644, ROOT)
        chunk = bytes(1 << 20)
        offset = 0
        with pytest.raises(FsError) as e:
            for _ in range(64):
                fs.write(f.ino, offset, chunk, ROOT)
                offset += len(chunk)
        assert err(e) == errno.ENOSPC
        assert not fs.read_only
        assert fs.getattr(f.ino).size == offset
        fs.unlink(ROOT_INO, b"fill", ROOT)
        g = fs.create(ROOT_INO, b"again", 0o644, ROOT)
        fs.write(g.ino, 0, chunk, ROOT)
    code, out = fsck_clean(image)
    assert code == 0, out


def test_read_only_refuses_writes(image: Path) -> None:
    with mounted(image) as fs:
        fs.create(ROOT_INO, b"f", 0o644, ROOT)
    with mounted(image, read_only=True) as fs:
        ino = resolve(fs, "f")
        with pytest.raises(FsError) as e:
            fs.write(ino, 0, b"x", ROOT)
        assert err(e) == errno.EROFS
        with pytest.raises(FsError) as e:
            fs.create(ROOT_INO, b"g", 0o644, ROOT)
        assert err(e) == errno.EROFS


def test_many_files_in_one_directory(fs: FileSystem) -> None:
    d = fs.mkdir(ROOT_INO, b"many", 0o755, ROOT)
    n = 3000  # the 64 MiB test volume has 4096 inodes
    for i in range(n):
        fs.create(d.ino, f"file-{i}".encode(), 0o644, Ctx())
    assert len(names(fs, d.ino)) == n + 2
    for i in range(0, n, 97):
        assert fs.lookup(d.ino, f"file-{i}".encode(), ROOT)
    for i in range(n):
        fs.unlink(d.ino, f"file-{i}".encode(), ROOT)
    fs.rmdir(ROOT_INO, b"many", ROOT)


def test_large_writes_use_nearly_all_space(tmp_path: Path) -> None:
    """Reservations are sized to what a write can use: an 8 MiB write fits a 64 MiB volume,
    and 1 MiB writes fill it to within one write of full."""
    from fsutil import fsck_clean, make_image

    image = make_image(tmp_path / "fill.img", 64 << 20)
    with mounted(image) as fs:
        f = fs.create(ROOT_INO, b"f", 0o644, ROOT)
        assert fs.write(f.ino, 0, bytes(8 << 20), ROOT) == 8 << 20
        offset = 8 << 20
        with pytest.raises(FsError) as e:
            while True:
                offset += fs.write(f.ino, offset, bytes(1 << 20), ROOT)
        assert err(e) == errno.ENOSPC
        assert fs.statfs().bfree < 256 + 16  # less than one more 1 MiB write
        assert fs.getattr(f.ino).size == offset
    code, out = fsck_clean(image)
    assert code == 0, out
