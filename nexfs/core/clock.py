"""The clock file times are stamped with: the kernel's own.

With the writeback cache the kernel keeps the mtime and ctime of the regular files it caches
and stamps them itself with ``current_time()``; the core stamps everything else (new inodes,
directories, symbolic links, nlink and xattr changes it makes).  A change made after another
must never carry an earlier time, and relatime compares atime with mtime/ctime, so both must
come from one clock.  Neither of the user-space clocks is that clock:

* ``CLOCK_REALTIME`` (``time.time_ns()``) runs up to one tick (1-10 ms) ahead of the kernel's
  coarse clock: a file the daemon created showed a later time than the kernel's first write
  to it, its atime stayed after its mtime, and relatime never updated it (issue 10, #12).
* ``CLOCK_REALTIME_COARSE`` is the tick-granular clock, but since Linux 6.13
  ``current_time()`` returns the later of it and the *multigrain floor*, the last
  fine-grained time handed out to a filesystem that asked for one (ext4, xfs, tmpfs...).
  Measured on the development machine (Linux 6.18, HZ=250): 6 % of kernel stamps were ahead
  of CLOCK_REALTIME_COARSE, by up to 1.1 ms.

So :func:`now_ns` asks the kernel: it sets the times of a private pipe to "now"
(``futimens(fd, NULL)``, which takes ``current_time()`` exactly as for a FUSE inode: pipefs,
like FUSE, has no multigrain timestamps) and reads them back with ``fstat``.  Two system calls:
0.9 us from Python in a loop on an idle machine, against 0.08 us for ``clock_gettime``, but
about 3.5 us per call in a busy mount (a SETATTR took 28 us with it and 24-25 us with the
coarse clock in its place; docs/BENCHMARKS.md, round 3), so callers read it only when they
stamp a time of their own.  Where it fails (no file descriptor left) it falls back to the
coarse clock, which is right to within the floor's lead.

The result is what the kernel would stamp now: a time taken after a kernel stamp is not
earlier, and one taken before is not later (tests/test_fs_rights_times.py checks both
directions against the kernel, tests/test_mount_posix.py random operations through a mount).
"""

from __future__ import annotations

import os
import time

CLOCK_REALTIME_COARSE: int = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # Linux's number

_pipe: tuple[int, int] | None = None


def _probe() -> int:
    global _pipe
    if _pipe is None:
        _pipe = os.pipe()  # close-on-exec: never inherited by a program we run
    fd = _pipe[0]
    os.utime(fd)
    return os.fstat(fd).st_mtime_ns


def now_ns() -> int:
    """The kernel's current time for file timestamps, in nanoseconds since the epoch."""
    try:
        return _probe()
    except OSError:
        return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
