"""POSIX access control lists: the xattr codec and the rules Linux applies to them.

An ACL is stored as the extended attribute ``system.posix_acl_access`` (the access ACL) or
``system.posix_acl_default`` (a directory's default ACL), in the format the kernel and
``setfacl`` exchange: a little-endian u32 version (2), then one 8-byte entry per line of
``getfacl``: u16 tag, u16 permission bits (rwx = 4, 2, 1), u32 uid or gid (0xFFFFFFFF for the
entries that name no one).  NexFS keeps the value as given (after validating it), so
``getfacl`` reads back exactly what ``setfacl`` wrote.

The algorithms are those of the kernel's fs/posix_acl.c, which ext4 uses and which FUSE leaves
to the filesystem: the mode's group bits are the ACL's mask (or its group entry when it has
no mask); an ACL that says no more than the mode is not stored at all (it *is* the mode);
``chmod`` rewrites the owner, mask and other entries; a new inode in a directory with a
default ACL gets that ACL, cut down by the mode the creating call asked for, instead of the
umask.

Everything here is pure: values in, values out; the filesystem stores them.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from typing import Final, NamedTuple

from nexfs.types import FsError

ACCESS: Final = b"system.posix_acl_access"
DEFAULT: Final = b"system.posix_acl_default"
NAMES: Final = (ACCESS, DEFAULT)

VERSION: Final = 2
USER_OBJ: Final = 0x01
USER: Final = 0x02
GROUP_OBJ: Final = 0x04
GROUP: Final = 0x08
MASK: Final = 0x10
OTHER: Final = 0x20
UNDEFINED_ID: Final = 0xFFFF_FFFF
MAX_ENTRIES: Final = 8190  # what fits in the 64 KiB xattr value limit

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_NAMED = (USER, GROUP)
_TAG_ORDER = {USER_OBJ: 0, USER: 1, GROUP_OBJ: 2, GROUP: 3, MASK: 4, OTHER: 5}


class Entry(NamedTuple):
    """One ACL entry: tag, permission bits (0..7), uid/gid (named entries only)."""

    tag: int
    perm: int
    id: int = UNDEFINED_ID


Acl = tuple[Entry, ...]


def decode(value: bytes) -> Acl | None:
    """The ACL in an xattr value; None for a header without entries (which means "remove",
    as in the kernel).  FsError(EINVAL) for anything malformed or not a valid ACL: a
    duplicate, a missing owner/group/other entry, named entries without a mask."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise FsError(errno.EINVAL, "malformed ACL")
    (version,) = _HEADER.unpack_from(value, 0)
    if version != VERSION:
        raise FsError(errno.EOPNOTSUPP, f"ACL version {version}")
    count = (len(value) - _HEADER.size) // _ENTRY.size
    if count == 0:
        return None
    if count > MAX_ENTRIES:
        raise FsError(errno.EINVAL, "too many ACL entries")
    entries = []
    for i in range(count):
        tag, perm, ident = _ENTRY.unpack_from(value, _HEADER.size + i * _ENTRY.size)
        if tag not in _TAG_ORDER or perm & ~7:
            raise FsError(errno.EINVAL, "bad ACL entry")
        entries.append(Entry(tag, perm, ident if tag in _NAMED else UNDEFINED_ID))
    acl = tuple(sorted(entries, key=lambda e: (_TAG_ORDER[e.tag], e.id)))
    _validate(acl)
    return acl


def _validate(acl: Acl) -> None:
    seen = {(e.tag, e.id) for e in acl}
    tags = [e.tag for e in acl]
    if len(seen) != len(acl) or any(tags.count(t) != 1 for t in (USER_OBJ, GROUP_OBJ, OTHER)):
        raise FsError(errno.EINVAL, "invalid ACL")
    if tags.count(MASK) > 1 or (any(t in _NAMED for t in tags) and MASK not in tags):
        raise FsError(errno.EINVAL, "invalid ACL")


def encode(acl: Acl) -> bytes:
    """The xattr value of ``acl`` (entries in the kernel's canonical order)."""
    out = bytearray(_HEADER.pack(VERSION))
    for e in sorted(acl, key=lambda e: (_TAG_ORDER[e.tag], e.id)):
        out += _ENTRY.pack(e.tag, e.perm, e.id)
    return bytes(out)


def from_mode(mode: int) -> Acl:
    """The minimal ACL that says what ``mode`` says."""
    return (Entry(USER_OBJ, (mode >> 6) & 7), Entry(GROUP_OBJ, (mode >> 3) & 7),
            Entry(OTHER, mode & 7))


def is_minimal(acl: Acl) -> bool:
    """True when the mode alone can express ``acl`` (posix_acl_equiv_mode): it then need not
    be stored.  A mask entry counts as more than the mode, even without named entries."""
    return not any(e.tag in _NAMED or e.tag == MASK for e in acl)


def mode_bits(acl: Acl) -> int:
    """The permission bits (0o777) ``acl`` puts in the mode: owner, mask (or group), other."""
    bits = {e.tag: e.perm for e in acl}
    group = bits.get(MASK, bits[GROUP_OBJ])
    return bits[USER_OBJ] << 6 | group << 3 | bits[OTHER]


def chmod(acl: Acl, mode: int) -> Acl:
    """``acl`` after a chmod to ``mode`` (posix_acl_chmod): owner, mask (or group when there
    is no mask) and other follow the mode; named entries stay."""
    has_mask = any(e.tag == MASK for e in acl)
    out = []
    for e in acl:
        if e.tag == USER_OBJ:
            e = e._replace(perm=(mode >> 6) & 7)
        elif e.tag == MASK or (e.tag == GROUP_OBJ and not has_mask):
            e = e._replace(perm=(mode >> 3) & 7)
        elif e.tag == OTHER:
            e = e._replace(perm=mode & 7)
        out.append(e)
    return tuple(out)


def inherit(default: Acl, mode: int) -> tuple[Acl, int]:
    """(access ACL, mode) of a new inode created with ``mode`` in a directory whose default
    ACL is ``default`` (posix_acl_create_masq): each of owner, mask (or group) and other gets
    the intersection of the ACL's and the requested permissions."""
    perms = mode & 0o777
    has_mask = any(e.tag == MASK for e in default)
    out = []
    for e in default:
        if e.tag == USER_OBJ:
            e = e._replace(perm=e.perm & (perms >> 6) & 7)
        elif e.tag == MASK or (e.tag == GROUP_OBJ and not has_mask):
            e = e._replace(perm=e.perm & (perms >> 3) & 7)
        elif e.tag == OTHER:
            e = e._replace(perm=e.perm & perms & 7)
        out.append(e)
    acl = tuple(out)
    return acl, (mode & ~0o777) | mode_bits(acl)


def permits(acl: Acl, owner: int, group: int, uid: int, in_group: Callable[[int], bool],
            mask: int) -> bool:
    """posix_acl_permission for a caller who is not root: ``in_group(gid)`` tells whether
    the caller is a member of ``gid``; ``mask`` is R_OK | W_OK | X_OK."""
    acl_mask = next((e.perm for e in acl if e.tag == MASK), 7)
    for e in acl:
        if e.tag == USER_OBJ and uid == owner:
            return e.perm & mask == mask
        if e.tag == USER and e.id == uid:
            return e.perm & acl_mask & mask == mask
    found = False
    for e in acl:
        if (e.tag == GROUP_OBJ and in_group(group)) or (e.tag == GROUP and in_group(e.id)):
            found = True
            if e.perm & acl_mask & mask == mask:
                return True
    if found:
        return False
    other = next(e.perm for e in acl if e.tag == OTHER)
    return other & mask == mask

