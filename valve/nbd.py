"""Opening an NBD export for the valve: URI recognition, the request timeout, one-line errors.

The transfers themselves are the C core's (native/nbd_backend.c, through libnbd); this module
only decides whether a target names an export, opens it, and words the refusals.  A target is
an export when it is a URI of one of libnbd's NBD schemes (``nbd://host[:port]/export``,
``nbd+unix:///export?socket=PATH``, their TLS forms ``nbds``, and ``nbd+vsock``); anything
else is a path.

Guarantees of the backend (docs/VALVE.md, "NBD exports"): every request has a deadline
(``timeout`` seconds, default :data:`DEFAULT_TIMEOUT` or ``$NEXFS_NBD_TIMEOUT``); a request
the server does not answer in time, an error reply, or the connection going away is an
``EIO`` ``DeviceError``; after a timeout or a lost connection every later request is ``EIO``
at once (no reconnection: a server that came back may have lost writes it acknowledged
but never flushed, which only a remount and the journal's replay put right).  A server that
cannot flush is refused for read-write use.  No lock protects an export, so the valve reports
``BlockInfo.exclusive = False``.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from native import ffi, lib
from valve.errors import DeviceError

__all__ = [
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
    "failure_reason",
    "is_nbd_uri",
    "open_export",
    "request_timeout",
]

#: Seconds a request may wait for its reply before the connection is given up.  Long enough
#: for a loaded server flushing a large cache, short enough that a stalled one frees the
#: mount's threads within a minute.
DEFAULT_TIMEOUT = 30.0
#: The environment variable that overrides it (every tool and the mount daemon read it).
TIMEOUT_ENV = "NEXFS_NBD_TIMEOUT"

_SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://")


def is_nbd_uri(target: str) -> bool:
    """True if ``target`` is an NBD URI rather than a path."""
    return target.lower().startswith(_SCHEMES)


def request_timeout(timeout: float | None = None) -> float:
    """The request timeout in seconds: ``timeout`` if given, else ``$NEXFS_NBD_TIMEOUT``,
    else :data:`DEFAULT_TIMEOUT`.  Refuses a value that is not a positive number."""
    if timeout is None:
        text = os.environ.get(TIMEOUT_ENV, "")
        if not text:
            return DEFAULT_TIMEOUT
        try:
            timeout = float(text)
        except ValueError:
            raise DeviceError(
                errno.EINVAL, f"${TIMEOUT_ENV}={text!r} is not a number of seconds"
            ) from None
    if not 0 < timeout <= 86400:
        raise DeviceError(errno.EINVAL, f"NBD request timeout {timeout} s is not in (0, 86400]")
    return timeout


def open_export(uri: str, *, read_only: bool, timeout: float | None) -> Any:
    """Connect to ``uri`` and return the ``struct nx_nbd *`` (cdata), or raise a
    ``DeviceError`` that names the URI and says why in one line."""
    handle = ffi.new("struct nx_nbd *")
    ms = max(1, int(request_timeout(timeout) * 1000))
    rc = lib.nx_nbd_open(uri.encode(), int(read_only), ms, handle)
    if rc < 0:
        reason = ffi.string(handle.errmsg).decode(errors="replace") or os.strerror(-rc)
        if handle.dev.stage == lib.NX_NBD_STAGE_URI:
            reason = f"not a usable NBD URI: {reason}"
        raise DeviceError(-rc, reason, uri)
    return handle


def failure_reason(handle: Any) -> str:
    """Why the connection died ('' while it is alive), for the message of a failed request."""
    if not handle.dead:
        return ""
    return ffi.string(handle.errmsg).decode(errors="replace")
