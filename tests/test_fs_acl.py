"""POSIX ACLs in the core, driven in-process: the xattr codec, the mode they imply, chmod,
enforcement for other users, inheritance of default ACLs, and the noacl switch."""

from __future__ import annotations

import errno
import stat
from pathlib import Path

import pytest
from fsutil import OTHER, ROOT, USER, mounted

from nexfs.core import acl as acls
from nexfs.core.acl import GROUP, GROUP_OBJ, MASK, USER_OBJ, Entry
from nexfs.core.acl import OTHER as OTHER_TAG
from nexfs.core.acl import USER as USER_TAG
from nexfs.core.attr import Ctx, SetAttr
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.types import FsError


def err(fn: object, *args: object) -> int:
    with pytest.raises(FsError) as ei:
        fn(*args)  # type: ignore[operator]
    return ei.value.errno


def value(*entries: tuple[int, int, int]) -> bytes:
    """An xattr value with the entries in the order given (setfacl's order may differ)."""
    import struct

    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


U = 0xFFFF_FFFF
# user::rw- user:1000:r-- group::--- mask::r-- other::---
READER = value((USER_OBJ, 6, U), (USER_TAG, 4, 1000), (GROUP_OBJ, 0, U), (MASK, 4, U),
               (OTHER_TAG, 0, U))


def test_codec_round_trip_and_canonical_order() -> None:
    shuffled = value((OTHER_TAG, 0, U), (MASK, 4, U), (USER_TAG, 4, 1000), (USER_OBJ, 6, U),
                     (GROUP_OBJ, 0, U))
    acl = acls.decode(shuffled)
    assert acl is not None and acls.encode(acl) == READER
    assert acls.decode(value()) is None  # no entries: "remove"
    assert acls.mode_bits(acl) == 0o640


@pytest.mark.parametrize("bad", [
    b"", b"\x02\x00\x00", value((USER_OBJ, 6, U)),  # missing group and other
    value((USER_OBJ, 6, U), (GROUP_OBJ, 0, U), (OTHER_TAG, 0, U), (USER_TAG, 4, 5)),  # no mask
    value((USER_OBJ, 6, U), (USER_OBJ, 6, U), (GROUP_OBJ, 0, U), (OTHER_TAG, 0, U)),
    value((USER_OBJ, 6, U), (GROUP_OBJ, 0, U), (OTHER_TAG, 8, U)),  # perm out of range
    value((USER_OBJ, 6, U), (GROUP_OBJ, 0, U), (OTHER_TAG, 0, U), (0x40, 0, U)),  # bad tag
    READER + b"\x00",
])
def test_codec_refuses_invalid_acls(bad: bytes) -> None:
    assert err(acls.decode, bad) == errno.EINVAL


def test_codec_refuses_other_versions() -> None:
    assert err(acls.decode, b"\x01\x00\x00\x00") == errno.EOPNOTSUPP


def test_access_acl_sets_the_mode_and_is_enforced(fs: FileSystem) -> None:
    f = fs.create(ROOT_INO, b"f", 0o600, ROOT)
    assert err(fs.open_file, f.ino, 0, USER) == errno.EACCES
    fs.setxattr(f.ino, acls.ACCESS, READER, 0, ROOT)
    assert stat.S_IMODE(fs.getattr(f.ino).mode) == 0o640  # group bits = mask
    assert fs.getxattr(f.ino, acls.ACCESS) == READER
    assert acls.ACCESS in fs.listxattr(f.ino)
    fs.open_file(f.ino, 0, USER)  # user 1000 may read now ...
    assert err(fs.open_file, f.ino, 1, USER) == errno.EACCES  # ... but not write
    assert err(fs.open_file, f.ino, 0, OTHER) == errno.EACCES
    # The mask limits named entries: rw for 1000, but mask r.
    fs.setxattr(f.ino, acls.ACCESS, value((USER_OBJ, 6, U), (USER_TAG, 6, 1000),
                                          (GROUP_OBJ, 0, U), (MASK, 4, U),
                                          (OTHER_TAG, 4, U)), 0, ROOT)
    assert err(fs.open_file, f.ino, 1, USER) == errno.EACCES
    # A named entry takes precedence over "other", also to deny.
    fs.setxattr(f.ino, acls.ACCESS, value((USER_OBJ, 6, U), (USER_TAG, 0, 1000),
                                          (GROUP_OBJ, 4, U), (MASK, 4, U),
                                          (OTHER_TAG, 4, U)), 0, ROOT)
    assert err(fs.open_file, f.ino, 0, USER) == errno.EACCES
    fs.open_file(f.ino, 0, OTHER)
    # Group entries: a member of a named group gets that entry (through the mask).
    member = Ctx(uid=2000, gid=2000, groups=(77,))
    fs.setxattr(f.ino, acls.ACCESS, value((USER_OBJ, 6, U), (GROUP_OBJ, 0, U),
                                          (GROUP, 6, 77), (MASK, 6, U),
                                          (OTHER_TAG, 0, U)), 0, ROOT)
    fs.open_file(f.ino, 2, member)
    assert err(fs.open_file, f.ino, 0, Ctx(uid=2001, gid=2001)) == errno.EACCES


def test_minimal_acl_is_the_mode(fs: FileSystem) -> None:
    f = fs.create(ROOT_INO, b"f", 0o600, ROOT)
    fs.setxattr(f.ino, acls.ACCESS, READER, 0, ROOT)
    fs.setxattr(f.ino, acls.ACCESS, value((USER_OBJ, 7, U), (GROUP_OBJ, 5, U),
                                          (OTHER_TAG, 1, U)), 0, ROOT)
    assert stat.S_IMODE(fs.getattr(f.ino).mode) == 0o751
    assert err(fs.getxattr, f.ino, acls.ACCESS) == errno.ENODATA
    assert acls.ACCESS not in fs.listxattr(f.ino)


def test_who_may_set_acls(fs: FileSystem) -> None:
    public = fs.mkdir(ROOT_INO, b"pub", 0o777, ROOT)
    f = fs.create(public.ino, b"f", 0o666, USER)
    assert err(fs.setxattr, f.ino, acls.ACCESS, READER, 0, OTHER) == errno.EPERM
    fs.setxattr(f.ino, acls.ACCESS, READER, 0, USER)  # the owner may
    assert err(fs.setxattr, f.ino, acls.DEFAULT, READER, 0, ROOT) == errno.EACCES  # not a dir
    s = fs.symlink(ROOT_INO, b"s", b"f", ROOT)
    assert err(fs.setxattr, s.ino, acls.ACCESS, READER, 0, ROOT) == errno.EOPNOTSUPP
    assert err(fs.setxattr, f.ino, acls.ACCESS, b"junk!", 0, USER) == errno.EINVAL
    assert err(fs.removexattr, f.ino, acls.ACCESS, OTHER) == errno.EPERM
    fs.removexattr(f.ino, acls.ACCESS, USER)
    assert stat.S_IMODE(fs.getattr(f.ino).mode) == 0o640  # removing keeps the mode
    assert err(fs.setxattr, f.ino, b"system.other", b"", 0, ROOT) == errno.EOPNOTSUPP


def test_setgid_cleared_when_a_non_member_sets_an_acl(fs: FileSystem) -> None:
    f = fs.create(ROOT_INO, b"f", 0o2770, ROOT)
    fs.setattr(f.ino, SetAttr(uid=1000), ROOT)
    fs.setattr(f.ino, SetAttr(mode=0o2770), ROOT)
    fs.setxattr(f.ino, acls.ACCESS, READER, 0, USER)  # 1000 is not in group 0
    assert not fs.getattr(f.ino).mode & stat.S_ISGID


def test_chmod_rewrites_owner_mask_and_other(fs: FileSystem) -> None:
    f = fs.create(ROOT_INO, b"f", 0o600, ROOT)
    fs.setxattr(f.ino, acls.ACCESS, READER, 0, ROOT)
    fs.setattr(f.ino, SetAttr(mode=0o754), ROOT)
    acl = acls.decode(fs.getxattr(f.ino, acls.ACCESS))
    assert acl == (Entry(USER_OBJ, 7), Entry(USER_TAG, 4, 1000), Entry(GROUP_OBJ, 0),
                   Entry(MASK, 5), Entry(OTHER_TAG, 4))
    fs.setattr(f.ino, SetAttr(mode=0o700), ROOT)  # mask --- now cuts user 1000 off
    assert err(fs.open_file, f.ino, 0, USER) == errno.EACCES


def test_default_acl_inheritance(fs: FileSystem) -> None:
    d = fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
    default = value((USER_OBJ, 7, U), (USER_TAG, 6, 1000), (GROUP_OBJ, 5, U), (MASK, 7, U),
                    (OTHER_TAG, 0, U))
    fs.setxattr(d.ino, acls.DEFAULT, default, 0, ROOT)
    assert stat.S_IMODE(fs.getattr(d.ino).mode) == 0o755  # a default ACL leaves the mode
    strict = Ctx(uid=0, gid=0, umask=0o077)  # ignored under a default ACL
    f = fs.create(d.ino, b"f", 0o666, strict)
    assert stat.S_IMODE(f.mode) == 0o660  # user rw, mask rw (rwx & rw-), other ---
    assert acls.decode(fs.getxattr(f.ino, acls.ACCESS)) == (
        Entry(USER_OBJ, 6), Entry(USER_TAG, 6, 1000), Entry(GROUP_OBJ, 5), Entry(MASK, 6),
        Entry(OTHER_TAG, 0))
    assert err(fs.getxattr, f.ino, acls.DEFAULT) == errno.ENODATA
    fs.open_file(f.ino, 2, USER)  # 1000 may read and write
    sub = fs.mkdir(d.ino, b"sub", 0o777, strict)
    assert stat.S_IMODE(sub.mode) == 0o770
    assert fs.getxattr(sub.ino, acls.DEFAULT) == default  # passed on to subdirectories
    deeper = fs.create(sub.ino, b"g", 0o640, strict)
    assert stat.S_IMODE(deeper.mode) == 0o640  # the requested mode still limits
    n = fs.mknod(d.ino, b"fifo", stat.S_IFIFO | 0o666, 0, strict)
    assert stat.S_IMODE(n.mode) == 0o660
    s = fs.symlink(d.ino, b"link", b"f", strict)
    assert fs.listxattr(s.ino) == [] and stat.S_IMODE(s.mode) == 0o777
    # A minimal default ACL gives a minimal access ACL: nothing stored, just the mode.
    fs.setxattr(d.ino, acls.DEFAULT, value((USER_OBJ, 7, U), (GROUP_OBJ, 5, U),
                                           (OTHER_TAG, 5, U)), 0, ROOT)
    plain = fs.create(d.ino, b"plain", 0o666, strict)
    assert stat.S_IMODE(plain.mode) == 0o644 and fs.listxattr(plain.ino) == []
    # Without a default ACL the umask applies.
    fs.removexattr(d.ino, acls.DEFAULT, ROOT)
    masked = fs.create(d.ino, b"masked", 0o666, strict)
    assert stat.S_IMODE(masked.mode) == 0o600


def test_acls_persist_and_noacl_turns_them_off(image: Path) -> None:
    with mounted(image) as fs:
        f = fs.create(ROOT_INO, b"f", 0o600, ROOT)
        fs.setxattr(f.ino, acls.ACCESS, READER, 0, ROOT)
        fs.setxattr(f.ino, b"user.x", b"1", 0, ROOT)
    with mounted(image) as fs:
        fs.open_file(f.ino, 0, USER)
        assert fs.getxattr(f.ino, acls.ACCESS) == READER
    with mounted(image, acl=False) as fs:
        assert err(fs.open_file, f.ino, 0, USER) == errno.EACCES  # the mode alone: 0640
        assert fs.listxattr(f.ino) == [b"user.x"]
        assert err(fs.getxattr, f.ino, acls.ACCESS) == errno.EOPNOTSUPP
        assert err(fs.setxattr, f.ino, acls.ACCESS, READER, 0, ROOT) == errno.EOPNOTSUPP
        d = fs.mkdir(ROOT_INO, b"d", 0o755, ROOT)
        fs.create(d.ino, b"g", 0o666, Ctx(umask=0o022))
    with mounted(image) as fs:
        fs.open_file(f.ino, 0, USER)  # still there for the next acl mount
