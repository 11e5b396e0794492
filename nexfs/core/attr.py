"""Plain data passed between the filesystem core and its callers (the FUSE adapter, tools)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nexfs.types import InodeNo

UTIME_NOW = -1
"""setattr time value meaning "set to the current time" (utimensat's UTIME_NOW)."""


@dataclass(frozen=True, slots=True)
class Ctx:
    """Who is asking: the credentials of the calling process."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0
    groups: tuple[int, ...] = ()

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


ROOT_CTX = Ctx()


@dataclass(slots=True)
class Attr:
    """An inode's attributes as stat(2) reports them (times in nanoseconds since the epoch)."""

    ino: InodeNo
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # in 512-byte units, as st_blocks
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    btime_ns: int
    generation: int
    blksize: int = 4096


@dataclass(slots=True)
class StatFs:
    """statvfs(3) figures for the volume."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    namemax: int = 255


@dataclass(slots=True)
class SetAttr:
    """Which attributes setattr should change; None leaves a field alone.

    ``atime_ns``/``mtime_ns`` take a time in nanoseconds or :data:`UTIME_NOW`.
    """

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    extra: dict[str, int] = field(default_factory=dict)
