"""POSIX permission rules, as Linux applies them (generic_permission with POSIX ACLs, the
sticky bit, set-group-ID inheritance and the set-ID clearing rules).

The mount always runs with ``default_permissions`` so the kernel checks modes before a request
reaches NexFS; the library checks them too, so that it is correct when called directly (tools,
tests) and so that the rules live in one place.
"""

from __future__ import annotations

import errno
import os
import stat

from nexfs.core import acl as acls
from nexfs.core.attr import Ctx
from nexfs.ondisk.inode_record import Inode
from nexfs.types import FsError

R_OK, W_OK, X_OK = os.R_OK, os.W_OK, os.X_OK


def may(inode: Inode, mask: int, ctx: Ctx, acl: acls.Acl | None = None) -> bool:
    """True when ``ctx`` may access ``inode`` for ``mask`` (R_OK | W_OK | X_OK); ``acl`` is
    the inode's access ACL, if it has one (its mode's group bits are then the ACL's mask)."""
    mode = inode.mode
    if ctx.uid == 0:
        # root may do anything except execute a non-directory with no execute bit at all.
        return not (mask & X_OK and not stat.S_ISDIR(mode) and not mode & 0o111)
    if acl:
        return acls.permits(acl, inode.uid, inode.gid, ctx.uid, ctx.in_group, mask)
    if ctx.uid == inode.uid:
        bits = (mode >> 6) & 7
    elif ctx.in_group(inode.gid):
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return (bits & mask) == mask


def check(inode: Inode, mask: int, ctx: Ctx, acl: acls.Acl | None = None) -> None:
    """Raise EACCES unless ``ctx`` may access ``inode`` for ``mask``."""
    if mask and not may(inode, mask, ctx, acl):
        raise FsError(errno.EACCES)


def check_sticky(directory: Inode, victim: Inode, ctx: Ctx) -> None:
    """In a sticky directory only the owner of the entry, of the directory, or root may remove
    or rename it (EPERM otherwise)."""
    if (
        directory.mode & stat.S_ISVTX
        and ctx.uid != 0
        and ctx.uid != directory.uid
        and ctx.uid != victim.uid
    ):
        raise FsError(errno.EPERM)


def is_owner(inode: Inode, ctx: Ctx) -> bool:
    """Owner or root: who may chmod, set explicit times, and change a file's group."""
    return ctx.uid == 0 or ctx.uid == inode.uid


def initial_owner(parent: Inode, mode: int, ctx: Ctx) -> tuple[int, int, int]:
    """(uid, gid, mode) of a new inode created by ``ctx`` in ``parent`` (inode_init_owner).

    A set-group-ID directory passes its group on, and its set-group-ID bit on to new
    subdirectories; a non-member creating a set-group-ID file in it loses that bit.
    """
    uid = ctx.uid
    if parent.mode & stat.S_ISGID:
        gid = parent.gid
        if stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
        elif mode & stat.S_ISGID and mode & stat.S_IXGRP and not ctx.in_group(gid) and ctx.uid:
            mode &= ~stat.S_ISGID
    else:
        gid = ctx.gid
    return uid, gid, mode


def killpriv(mode: int) -> int:
    """The mode after a write, truncate or chown: set-user-ID goes, and set-group-ID goes when
    group execute is set (otherwise it means mandatory locking and stays)."""
    if stat.S_ISDIR(mode):
        return mode
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode
