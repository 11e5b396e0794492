"""The one failure policy: which failures make the volume damaged or read-only, and what then.

Contract.  The store and the layers under it only *raise* (typed: :class:`CorruptionError`,
an ``OSError`` from the device, :class:`FsError`); the FUSE adapter only maps exceptions to
errno.  Deciding is done here, by :meth:`FailurePolicy.failed`, which every boundary calls
with the exception that crossed it: the guarded public methods of the store (for its direct
users, fsck and the tools), every public method of :class:`~nexfs.core.fs.FileSystem` (and the
lazily run rest of a readdir listing), and the FUSE adapter's handlers, which hand over
whatever reached them (normally decided already; a bug of the adapter's own code is not).
The decision table:

* ``CorruptionError``: damaged, unless fsck is inside :meth:`tolerating_damage` (it expects
  damage and reports it itself).
* ``OSError`` (a device error): damaged.  The store turns it into ``FsError(errno)``.
* ``FsError`` raised after the operation had already changed something: damaged ("operation
  failed half-way"): the running transaction holds half an operation.  Before any change it
  is an ordinary answer (ENOENT, ENOSPC, EROFS...) and changes nothing.
* Any other ``Exception``: a bug; damaged, logged with its traceback.

Damaged means :meth:`enter`: the store discards its running transaction and marks the
superblock ERROR (``Store.enter_error_state``, which only this module calls), every listener
(the filesystem's inode cache) forgets what it built on the discarded transaction, and the
volume is read-only from then on.  It happens once; the first reason is kept and logged at
ERROR.  Each failure is decided once however many boundaries it crosses on its way up (the
decision is recorded on the exception itself), so nothing needs a flag against reporting
twice.

Failures that are not this module's to decide: a failed *read* of file data is answered
with its errno without marking the volume (it changes nothing; the store logs why and raises
a plain ``FsError``); a data write that was acknowledged and then lost is a device error.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
from collections.abc import Callable, Iterator
from typing import ParamSpec, Protocol, TypeVar

from nexfs.types import CorruptionError, FsError

log = logging.getLogger(__name__)

_DECIDED = "_nexfs_failure_decided"


class ErrorState(Protocol):
    """What the policy needs from the store: its error state and the primitive to enter it."""

    error: str | None

    def enter_error_state(self, reason: str) -> None: ...


class FailurePolicy:
    """The failure decisions of one open volume (see the module docstring)."""

    def __init__(self, state: ErrorState) -> None:
        self._state = state
        self._tolerating = 0  # see tolerating_damage()
        self._listeners: list[Callable[[], None]] = []

    @property
    def error(self) -> str | None:
        return self._state.error

    def on_error(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` once the volume enters the error state (after the store has
        discarded its running transaction)."""
        self._listeners.append(listener)

    @contextlib.contextmanager
    def tolerating_damage(self) -> Iterator[None]:
        """For fsck, which expects damage and reports it: inside, a CorruptionError reaches
        the caller without putting the volume in the error state."""
        self._tolerating += 1
        try:
            yield
        finally:
            self._tolerating -= 1

    def failed(self, exc: BaseException, *, changed: bool = False, where: str = "") -> None:
        """``exc`` crossed a boundary (``where``: the operation); decide what it means for
        the volume.  ``changed``: the operation had changed something before it failed."""
        if getattr(exc, _DECIDED, False):
            return
        if isinstance(exc, CorruptionError):
            if self._tolerating:
                return
            reason = str(exc)
        elif isinstance(exc, FsError):
            if not changed or self._state.error is not None:
                return
            log.error("operation failed half-way with %s; volume is now read-only", exc)
            reason = f"operation failed half-way: {exc}"
        elif isinstance(exc, OSError):
            reason = f"device error: {exc}"
        elif isinstance(exc, Exception):
            reason = f"internal error: {exc!r}"
        else:
            return  # KeyboardInterrupt, SystemExit...: not a verdict on the volume
        with contextlib.suppress(AttributeError, TypeError):
            setattr(exc, _DECIDED, True)
        bug = not isinstance(exc, FsError | OSError)
        if self._state.error is not None:
            # Already read-only; a further failure is still worth its own line.
            log.error("%s failed (%s); the volume is read-only and needs fsck",
                      where or "an operation", reason, exc_info=exc if bug else None)
            return
        if bug:
            log.error("%s failed: internal error; the volume needs fsck and is now read-only",
                      where or "an operation", exc_info=exc)
        self.enter(reason)

    def enter(self, reason: str) -> None:
        """Enter the error state (once; the first reason is kept)."""
        if self._state.error is not None:
            return
        log.error("filesystem error, continuing read-only: %s", reason)
        try:
            self._state.enter_error_state(reason or "unspecified error")
        finally:
            for listener in self._listeners:
                listener()

    def device_error(self, exc: OSError, what: str = "device error") -> FsError:
        """Decide a device error and return the ``FsError`` to raise in its place."""
        self.failed(exc)
        err = FsError(exc.errno or errno.EIO, f"{what}: {exc}")
        setattr(err, _DECIDED, True)
        return err


P = ParamSpec("P")
R = TypeVar("R")


def boundary(fn: Callable[P, R]) -> Callable[P, R]:
    """Make a public method of a store part (an object with a ``failures`` attribute: the
    metadata store, the data path, the inode table) a failure boundary for its direct users
    (fsck, the tools): whatever it raises is handed to the volume's failure policy, which
    decides; the part itself only raises.  Device errors (OSError from the valve) leave as
    FsError with the device's errno."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        failures: FailurePolicy = getattr(args[0], "failures")  # noqa: B009
        try:
            return fn(*args, **kwargs)
        except CorruptionError as e:
            failures.failed(e)
            raise
        except OSError as e:
            raise failures.device_error(e) from e

    return wrapper

