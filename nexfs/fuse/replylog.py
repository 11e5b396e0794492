"""pyfuse3's log line for a reply the kernel no longer waits for, at its true weight.

pyfuse3 logs every failed ``fuse_reply_*`` at ERROR.  One failure is not an error of the
daemon: ``ENOENT`` ("No such file or directory"), which the kernel returns when the request
the reply answers is gone: the calling process was interrupted, or the connection was
aborted by an unmount while a request was being served (an asynchronous RELEASE sent on the
last close just before ``umount`` is the common case; seen in the test suite's remount test).
The answer is not needed any more and nothing is lost, so :class:`VanishedReplyFilter`
lowers that line to DEBUG; every other reply failure stays an ERROR.
"""

from __future__ import annotations

import logging
import os

_VANISHED = "failed with " + os.strerror(2)  # ENOENT, as pyfuse3 formats it


class VanishedReplyFilter(logging.Filter):
    """Lower pyfuse3's "fuse_reply_* failed with No such file or directory" to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.levelno >= logging.ERROR and "fuse_reply_" in str(record.msg)
                and record.getMessage().endswith(_VANISHED)):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def install() -> None:
    """Attach the filter to pyfuse3's logger (idempotent)."""
    logger = logging.getLogger("pyfuse3")
    if not any(isinstance(f, VanishedReplyFilter) for f in logger.filters):
        logger.addFilter(VanishedReplyFilter())
