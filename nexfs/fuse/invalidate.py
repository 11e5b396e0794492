"""Dropping the kernel's cached pages of a file after an O_DIRECT write, without deadlock.

Why it is needed (docs/DESIGN.md, "O_DIRECT and the page cache"): with the writeback cache
the kernel serves an O_DIRECT write through ``generic_file_direct_write``: it drops the cached
pages of the range, sends the WRITE, and drops them again once the write is done, so that
pages a concurrent buffered reader filled with the old data in the meantime go away.  That
second invalidation only happens for a write the caller waits for.  An asynchronous one
(io_submit, io_uring, fio's libaio engine) is completed by FUSE's ``fuse_aio_complete``,
which does not invalidate; the old data a reader brought in while the WRITE was queued then
stays in the page cache, and every later buffered read returns it.  The daemon cannot turn
the kernel's asynchronous direct I/O off (pyfuse3 never passes ``fuse_conn_info`` to Python),
so it drops the pages itself, before it answers the write: :func:`drop_cached_pages`.

Deadlock: dropping pages (``FUSE_NOTIFY_INVAL_INODE``, ``invalidate_inode_pages2_range`` in
the kernel) waits for every locked page and every page under writeback of the file, and such
a page stays locked until the daemon has answered the READ (or WRITE) for it, which may be
queued behind the write being handled.  So the notification is sent from a thread, and while
the handler waits for it a helper worker serves the other requests
(:func:`nexfs.fuse.loop.serve_while`).  The thread waits only for the kernel, the kernel only
for requests the helper answers, and the handler only for the thread: no cycle.  One wait the
helper cannot end: the kernel writing dirty pages back through an O_DIRECT handle (it uses any
writable handle), when the WRITE being handled is that writeback and the pages wait for its
answer.  That is why the handler stops waiting after :data:`WAIT_S` and answers anyway; the
thread then finishes.  Such a WRITE is not an O_DIRECT write, so nothing is promised for it.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import pyfuse3

from nexfs.fuse import loop as fuseloop

log = logging.getLogger(__name__)

WAIT_S = 1.0
"""The most a write's answer waits for its invalidation.  An unobstructed invalidation of a
few hundred pages takes well under a millisecond, one that needs the helper to serve a few
reads a few milliseconds; only the writeback case above (which never finishes while the
handler waits) costs the whole second.  Kept long so that a loaded machine does not turn a
slow invalidation into a stale read."""

_QUIET = (errno.ENOENT, errno.ENODEV, errno.ENOTCONN, errno.EBADF)
# ENOENT: the kernel no longer knows the inode, so it caches nothing of it; the others: the
# connection is gone, and the page cache with it.


def _notify(ino: int) -> None:
    """The blocking kernel call (runs on a worker thread).  Never raises: a failure to drop
    pages is logged, and the write it follows has succeeded all the same."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only=False)
    except OSError as exc:
        if exc.errno not in _QUIET:
            log.error("dropping the cached pages of inode %d failed: %s", ino, exc)
    except Exception:
        log.exception("dropping the cached pages of inode %d failed", ino)


async def drop_cached_pages(ino: int, notify: Callable[[int], None] = _notify,
                            wait: float = WAIT_S) -> bool:
    """Make the kernel forget its cached pages (and attributes) of ``ino``, serving other
    requests meanwhile; True if done within ``wait`` seconds."""
    done = await fuseloop.serve_while(lambda: notify(ino), wait)
    if not done:
        log.debug("inode %d: cached pages not dropped within %.1f s; answering the write",
                  ino, wait)
    return done
