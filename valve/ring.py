"""Asynchronous transfers: a ring of requests in flight and the eventfd that says "done".

This module holds the ring's records; the ``Ring`` class itself lives in ``valve.valve``
beside the capabilities whose checks it relies on.  A ``Ring`` is a completion channel,
not a fourth operation.  Requests are still
``Capability.block_read`` and ``Capability.block_write``, called with ``ring=``: the
valve checks the capability (rights, window, liveness) and the arguments *at submit
time*, exactly as for the blocking form, then hands the transfer to the C core, which
starts it and returns at once with a tag.  ``fileno()`` is an eventfd that becomes
readable when completions are waiting (an event loop waits on it: trio's
``wait_readable``); ``reap()`` hands them out as :class:`Completion` records.

Engines (``Ring.engine``): ``"io_uring"`` (the kernel runs the O_DIRECT transfer and
posts the completion; the submitting thread never blocks and nothing hops threads) and
``"pool"`` (a few C threads blocking in ``preadv``/``pwritev``, signalling the eventfd),
used where io_uring is unavailable.  docs/VALVE.md has the measurements behind the
default.  On an NBD export: ``"callbacks"`` (what ``"any"`` picks: the submitting thread
issues the NBD commands, libnbd's completion callbacks and a driver thread report them) or
``"pool"`` (C workers each moving one request with the export's vectored transfer); each
request has the export's deadline, a timeout or a lost connection completes every request
with EIO; ``"io_uring"`` is refused there, ``"callbacks"`` for a file.

Contract:

* one thread submits and reaps (the event loop); the ring takes no lock on that side;
* the buffers of a request (``into=`` of a read, ``data`` of a write) must not be
  reused until its completion is reaped; the ring keeps them alive until then, so a
  dropped reference never frees memory the kernel is writing into;
* at most ``depth`` requests are in flight; one more is refused (``DeviceError``
  ``EAGAIN``) before it starts;
* a capability revoked after a submit does not stop that transfer (as with the
  blocking form, the check happened when the request was made);
* ``Valve.close()`` closes its rings first, waiting for what is in flight.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

from native import lib

__all__ = ["ENGINES", "ENGINE_NAMES", "Completion", "Pending"]

ENGINES: Final = {"any": lib.NX_RING_ANY, "io_uring": lib.NX_RING_URING, "pool": lib.NX_RING_POOL,
                  "callbacks": lib.NX_RING_CALLBACKS}
ENGINE_NAMES: Final = {lib.NX_RING_URING: "io_uring", lib.NX_RING_POOL: "pool",
                       lib.NX_RING_CALLBACKS: "callbacks"}


class Completion(NamedTuple):
    """One finished request: its tag, the error (``None`` on success), and for a read
    the memoryview of the bytes read (``None`` for a write)."""

    tag: int
    error: OSError | None
    data: memoryview | None


class Pending:
    """What a request in flight needs kept alive, and how to finish it.

    Built by ``Device.submit``; ``keep`` holds every object whose memory the kernel
    may touch; ``bounce``/``target`` are set when a read goes through a bounce buffer
    (copied out at reap).
    """

    __slots__ = ("bounce", "count", "keep", "lba", "nbytes", "target", "view", "write")

    def __init__(
        self,
        write: bool,
        lba: int,
        count: int,
        nbytes: int,
        keep: tuple[object, ...],
        view: memoryview | None,
        bounce: Any = None,
        target: Any = None,
    ) -> None:
        self.write = write
        self.lba = lba
        self.count = count
        self.nbytes = nbytes
        self.keep = keep
        self.view = view
        self.bounce = bounce
        self.target = target
