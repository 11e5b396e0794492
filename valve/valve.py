"""The Block Valve: the owner of a device, and the capabilities that gate every sector.

A :class:`Valve` is the only object that holds the device; it never does I/O for
anyone directly.  I/O happens through a :class:`Capability` the valve minted
(``grant``) or one attenuated from such a capability (``restrict``).  On every
call the valve looks the capability up in its own table, so the object in the
caller's hands is only a name for an entry the valve controls:

* a capability is live only while its table entry exists and that entry points
  back at the very same object (``grant.ref() is self``) -- a forged, copied or
  unpickled object never does;
* rights and the LBA window live in the entry, not in the capability object, so
  reaching into the object's slots changes nothing;
* entries form a tree: revoking one removes it and everything restricted from it,
  and closing the valve empties the table.

Concurrency: any number of threads may call a live capability.  The checks are a
dict lookup and a few attribute reads without a lock.  Transfers are counted by
the C core with atomic increments; bounce copies and denials (slow paths) under
the valve's lock, never held across I/O.  ``close`` has the core refuse new
transfers and wait for running ones before closing the descriptor, so a
descriptor number is never reused under a running transfer.  ``revoke`` stops every call
that starts after it returns; a transfer already past its check completes.

Threat model: the checks stop bugs and confused deputies inside the process (a
path that should only read the journal cannot write the inode table).  They do
not stop hostile code in the same interpreter, which can always reach private
attributes; process isolation is the FUSE boundary's job.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import warnings
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Final, NoReturn, final, overload

from native import ffi, lib
from valve.device import Device
from valve.errors import CapabilityError, DeviceError, RangeError, io_error
from valve.interface import BlockInfo, Rights, ValveStats
from valve.ring import ENGINE_NAMES, ENGINES, Completion, Pending

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from valve.buffer import AlignedBuffer
    from valve.interface import Buffer

__all__ = ["Capability", "Ring", "Valve"]

_READ: Final = Rights.READ.value
_WRITE: Final = Rights.WRITE.value
_ALL: Final = _READ | _WRITE

#: Private minting key: ``Capability`` and ``Valve`` refuse to be constructed without
#: it, so the only constructors are ``Valve.open``, ``Valve.grant`` and ``restrict``.
_MINT: Final = object()


class _Grant:
    """The valve's record of one capability: what it may do, and its place in the tree."""

    __slots__ = ("bits", "children", "hi", "lo", "parent", "ref", "token")

    def __init__(
        self,
        token: int,
        ref: weakref.ref[Capability],
        bits: int,
        lo: int,
        hi: int,
        parent: _Grant | None,
    ) -> None:
        self.token = token
        self.ref = ref
        self.bits = bits
        self.lo = lo
        self.hi = hi
        self.parent = parent
        self.children: dict[int, _Grant] = {}


def _rights_bits(rights: Rights) -> int:
    if not isinstance(rights, Rights):
        raise TypeError(f"rights must be valve.Rights, not {type(rights).__name__}")
    return rights.value


class Valve:
    """Owns one disk image or block device and mints the capabilities to use it.

    ``Valve.open(path)`` is the only way to get one.  ``close()`` (or leaving the
    ``with`` block) revokes every capability the valve minted, waits for transfers in
    flight, and closes the device.  ``stats`` is a property returning a
    :class:`~valve.interface.ValveStats` snapshot.
    """

    __slots__ = (
        "__weakref__",
        "_bounces",
        "_caps",
        "_closed",
        "_denials",
        "_device",
        "_info",
        "_lock",
        "_rings",
        "_tokens",
    )

    def __init__(self, key: object, device: Device) -> None:
        if key is not _MINT:
            raise TypeError("use Valve.open(path) to open a device")
        self._device = device
        self._info = BlockInfo(device.sector_size, device.total_sectors, device.exclusive)
        self._caps: dict[int, _Grant] = {}
        self._tokens = itertools.count(1)
        # Re-entrant: a capability's weakref callback can run (from the garbage
        # collector) on a thread that already holds the lock.
        self._lock = threading.RLock()
        self._closed = False
        # Transfers are counted by the C core (atomically, without the GIL); only the
        # slow paths -- bounce copies and denials -- are counted here.
        self._bounces = self._denials = 0
        self._rings: weakref.WeakSet[Ring] = weakref.WeakSet()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        sector_size: int | None = None,
        nbd_timeout: float | None = None,
    ) -> Valve:
        """Open ``path`` (image file or block device) with O_DIRECT and claim it, or
        connect to the NBD export ``path`` names (``nbd://host[:port]/export``,
        ``nbd+unix:///export?socket=PATH``; see valve.nbd).

        ``sector_size`` optionally coarsens the unit of I/O to a power-of-two multiple
        of the device's own logical sector (e.g. 4096 on a 512-byte device).
        ``nbd_timeout`` is an export's per-request deadline in seconds (default
        ``$NEXFS_NBD_TIMEOUT`` or 30).
        Raises ``DeviceBusyError``, ``DirectIONotSupported`` or ``DeviceError``.
        """
        device = Device(
            os.fspath(path), read_only=read_only, sector_size=sector_size, nbd_timeout=nbd_timeout
        )
        return cls(_MINT, device)

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Revoke every capability, wait for transfers in flight, close the device."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for grant in self._caps.values():
                grant.bits = 0
            self._caps.clear()
            rings = list(self._rings)
        # A ring's requests hold the device (in flight): wait for them first.
        for ring in rings:
            ring.close()
        # The core refuses new transfers and waits for those in flight before closing.
        self._device.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Valve:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Like an unclosed file: say so (tests turn this into a failure), then clean up.
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._info.total_sectors} sectors"
        mode = ", read-only" if self._device.read_only else ""
        return f"<Valve {self._device.path!r} {state}{mode}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Valve owns an open device and cannot be pickled")

    # -- minting ----------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._device.path

    @property
    def read_only(self) -> bool:
        return self._device.read_only

    def grant(self, rights: Rights, lba_range: tuple[int, int] | None = None) -> Capability:
        """Mint a root capability with ``rights`` over the whole device (or ``lba_range``).

        ``lba_range`` is half open, ``(first, end)`` like ``range``.  A read-only valve
        refuses ``Rights.WRITE`` with ``CapabilityError``.
        """
        bits = _rights_bits(rights)
        if self._closed:
            self._deny("valve is closed")
        if bits & _WRITE and self._device.read_only:
            self._deny("read-only valve cannot grant WRITE")
        lo, hi = self._window(lba_range)
        return self._mint(bits, lo, hi, None)

    def ring(self, depth: int = 64, *, engine: str = "any", threads: int = 4) -> Ring:
        """A completion channel for asynchronous transfers (``valve.ring``).

        ``engine`` is ``"io_uring"``, ``"pool"`` (``threads`` C threads) or ``"any"``
        (io_uring where the kernel allows it).  On an NBD export: ``"callbacks"`` (what
        ``"any"`` picks: libnbd's asynchronous commands) or ``"pool"``; ``"io_uring"`` is
        refused there and ``"callbacks"`` for a file (``EOPNOTSUPP``).  Requests are made with
        ``cap.block_read(..., ring=r)`` / ``cap.block_write(..., ring=r)``, checked
        when made.  Closed with the valve at the latest.
        """
        if self._closed:
            self._deny("valve is closed")
        if not self._device.is_nbd and engine == "callbacks":
            raise DeviceError(errno.EOPNOTSUPP, "the callbacks engine is an NBD export's; "
                              "a file's ring is 'io_uring' or 'pool'", self._device.path)
        if self._device.is_nbd and engine == "io_uring":
            # io_uring moves bytes on a local descriptor; an export's transfers are
            # libnbd's, driven by the callbacks engine or the pool (native/nbd_backend.c).
            raise DeviceError(errno.EOPNOTSUPP, "no io_uring ring over an NBD export "
                              "(engine 'pool' or 'any' keeps requests on the wire)",
                              self._device.path)
        ring = Ring(_MINT, self, self._device, depth, engine, threads)
        with self._lock:
            if self._closed:
                ring.close()
                self._deny("valve is closed")
            self._rings.add(ring)
        return ring

    def _window(self, lba_range: tuple[int, int] | None) -> tuple[int, int]:
        total = self._info.total_sectors
        if lba_range is None:
            return 0, total
        lo, hi = lba_range
        if not (0 <= lo < hi <= total):
            raise RangeError(
                f"lba range [{lo}, {hi}) is empty or outside the device (0..{total})",
                self._device.path,
            )
        return lo, hi

    def _mint(self, bits: int, lo: int, hi: int, parent: _Grant | None) -> Capability:
        token = next(self._tokens)
        cap = Capability(_MINT, self, token)
        grant = _Grant(token, weakref.ref(cap, self._forget_callback(token)), bits, lo, hi, parent)
        with self._lock:
            if self._closed:
                self._deny("valve is closed")
            if parent is not None:
                if parent.token not in self._caps:  # revoked while we were minting
                    self._deny("capability revoked")
                parent.children[token] = grant
            self._caps[token] = grant
        return cap

    def _forget_callback(self, token: int) -> Callable[[object], None]:
        # Weak, so that capabilities never keep a dropped valve's table alive.
        valve_ref = weakref.ref(self)

        def forget(_: object) -> None:
            valve = valve_ref()
            if valve is not None:
                valve._forget(token)

        return forget

    def _forget(self, token: int) -> None:
        """A capability object died: drop its entry, keep its descendants revocable."""
        with self._lock:
            grant = self._caps.pop(token, None)
            if grant is None:
                return
            parent = grant.parent
            if parent is not None:
                parent.children.pop(token, None)
            for child in list(grant.children.values()):
                child.parent = parent
                if parent is not None:
                    parent.children[child.token] = child

    def _revoke(self, grant: _Grant) -> None:
        with self._lock:
            if self._caps.get(grant.token) is not grant:
                return
            if grant.parent is not None:
                grant.parent.children.pop(grant.token, None)
            stack = [grant]
            while stack:
                g = stack.pop()
                g.bits = 0
                self._caps.pop(g.token, None)
                stack.extend(g.children.values())
                g.children = {}

    # -- accounting -------------------------------------------------------------------

    def _deny(self, reason: str) -> NoReturn:
        with self._lock:
            self._denials += 1
        raise CapabilityError(reason, self._device.path)

    def _count_bounces(self, copies: int) -> None:
        with self._lock:
            self._bounces += copies

    @property
    def stats(self) -> ValveStats:
        """A snapshot of the counters.  Each is exact; while transfers are running on
        other threads the fields may be read a few transfers apart."""
        reads, writes, sectors_read, sectors_written, barriers = self._device.counters()
        with self._lock:
            return ValveStats(
                reads=reads,
                writes=writes,
                sectors_read=sectors_read,
                sectors_written=sectors_written,
                bounce_copies=self._bounces,
                denials=self._denials,
                barriers=barriers,
            )

    # -- slow paths of the checks -------------------------------------------------------

    def _refuse_range(self, grant: _Grant, what: str, lba: int, count: int) -> NoReturn:
        """Called when a request is not inside the capability's window: say why."""
        total = self._info.total_sectors
        if count <= 0 or lba < 0 or lba + count > total:
            raise RangeError(
                f"cannot access {count} sectors at lba {lba}: device has {total} sectors",
                self._device.path,
            )
        self._deny(f"{what}: lba {lba}+{count} outside [{grant.lo}, {grant.hi})")


def _authorize(cap: Capability, need: int, what: str) -> tuple[Valve, _Grant]:
    """The check before every operation: a dict lookup, an identity test, a bit test.

    A module function rather than a method so that it also refuses cleanly when
    ``cap`` is not a Capability at all (``Capability.block_read(anything, ...)``).
    """
    try:
        valve = cap._valve
        grant = valve._caps.get(cap._token)
    except AttributeError:
        raise CapabilityError(f"{what}: not a capability minted by a valve") from None
    if grant is None or grant.ref() is not cap:
        valve._deny(f"{what}: capability revoked, forged or of a closed valve")
    if grant.bits & need != need:
        valve._deny(f"{what}: capability lacks {Rights(need & ~grant.bits)!s}")
    return valve, grant


def _submit(
    valve: Valve,
    ring: Ring,
    write: bool,
    lba: int,
    count: int,
    data: Buffer | Sequence[Buffer] | None,
    durable: bool,
) -> int:
    """Start a checked request on ``ring``, which must be one of this valve's rings."""
    if type(ring) is not Ring or ring._valve is not valve:
        valve._deny("ring= is not a ring of this capability's valve")
    iov, iovcnt, pending, copies = valve._device.prepare(write, lba, count, data)
    tag = ring._start(write, lba, iov, iovcnt, durable, pending)
    if copies:
        valve._count_bounces(copies)
    return tag


@final
class Ring:
    """A completion channel for asynchronous ``block_read``/``block_write`` (``valve.ring``).

    Made by ``Valve.ring(depth)``; closed by ``close()`` or with its valve at the latest.
    Used by one thread (an event loop): submit with ``cap.block_read(..., ring=r)``, wait
    for ``r.fileno()`` to be readable, then ``r.reap()``.
    """

    __slots__ = ("__weakref__", "_device", "_out", "_pending", "_ring", "_tags", "_valve", "depth")

    def __init__(
        self, key: object, valve: Valve, device: Device, depth: int, engine: str, threads: int
    ) -> None:
        if key is not _MINT:
            raise TypeError("use Valve.ring(depth) to open a ring")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {sorted(ENGINES)}, not {engine!r}")
        self._valve = valve
        self._device = device
        self.depth = depth
        out = ffi.new("struct nx_ring **")
        rc = device.open_ring(ENGINES[engine], depth, threads, out)
        if rc < 0:
            raise io_error(rc, device.path, f"open a {engine} ring of depth {depth}")
        self._ring: object | None = out[0]
        self._out = ffi.new("struct nx_completion[]", depth)
        self._pending: dict[int, Pending] = {}
        self._tags = itertools.count(1)

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Ring holds transfers in flight and cannot be pickled")

    @property
    def engine(self) -> str:
        """``"io_uring"`` or ``"pool"``."""
        return ENGINE_NAMES[lib.nx_ring_mode(self._live())]

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet reaped."""
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._ring is None

    def fileno(self) -> int:
        """The eventfd: readable while completions wait to be reaped."""
        return int(lib.nx_ring_fd(self._live()))

    def _live(self) -> object:
        ring = self._ring
        if ring is None:
            raise CapabilityError("ring is closed", self._device.path)
        return ring

    def _start(
        self, write: bool, lba: int, iov: object, iovcnt: int, durable: bool, pending: Pending
    ) -> int:
        """Hand one checked request to the core; returns its tag."""
        ring = self._live()
        tag = next(self._tags)
        rc = lib.nx_ring_submit(ring, tag, int(write), lba, iov, iovcnt, int(durable))
        if rc < 0:
            what = "write" if write else "read"
            if rc == -errno.EAGAIN:
                raise DeviceError(
                    errno.EAGAIN, f"ring full: {self.depth} requests in flight", self._device.path
                )
            raise self._error(rc, what, pending)
        self._pending[tag] = pending
        return tag

    def reap(self, wait: int = 0) -> list[Completion]:
        """The requests finished so far, in no particular order.

        Never blocks with ``wait=0`` (the default: call it when ``fileno()`` is
        readable); with ``wait=n`` it blocks (GIL released) until at least ``n`` (or
        every request in flight, if fewer) are done.
        """
        ring = self._live()
        out = self._out
        n = lib.nx_ring_reap(ring, out, self.depth, wait)
        if n < 0:
            raise io_error(n, self._device.path, "reap")
        done: list[Completion] = []
        pending = self._pending
        for i in range(n):
            tag = out[i].tag
            rc = out[i].result
            p = pending.pop(tag)
            if rc < 0:
                error = self._error(rc, "write" if p.write else "read", p)
                done.append(Completion(tag, error, None))
            else:
                if p.bounce is not None:
                    ffi.memmove(p.target, p.bounce, p.nbytes)
                done.append(Completion(tag, None, p.view))
        return done

    def _error(self, rc: int, what: str, p: Pending) -> OSError:
        return self._device.error(rc, what, p.lba, p.count)

    def close(self) -> None:
        """Wait for every request in flight (results discarded), then free the ring."""
        ring = self._ring
        if ring is None:
            return
        self._ring = None
        lib.nx_ring_close(ring)
        self._pending.clear()

    def __repr__(self) -> str:
        if self._ring is None:
            return "<Ring closed>"
        return f"<Ring {self.engine} depth {self.depth}, {len(self._pending)} in flight>"


@final
class Capability:
    """The right to use part of a valve's device: ``block_info``, ``block_read``, ``block_write``.

    Obtained only from ``Valve.grant`` or ``Capability.restrict``; cannot be built,
    copied, pickled or subclassed.  Every method raises ``CapabilityError`` once the
    capability (or one it was restricted from) is revoked or its valve is closed.
    """

    __slots__ = ("__weakref__", "_token", "_valve")

    _valve: Valve
    _token: int

    def __new__(cls, key: object, valve: Valve, token: int) -> Capability:
        if key is not _MINT:
            raise CapabilityError("capabilities are minted only by Valve.grant and restrict")
        self = object.__new__(cls)
        object.__setattr__(self, "_valve", valve)
        object.__setattr__(self, "_token", token)
        return self

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("Capability cannot be subclassed")

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise CapabilityError("capabilities are immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise CapabilityError("capabilities are immutable")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise CapabilityError("capabilities cannot be pickled")

    def __reduce__(self) -> NoReturn:
        raise CapabilityError("capabilities cannot be pickled")

    def __setstate__(self, state: object) -> NoReturn:
        raise CapabilityError("capabilities cannot be unpickled")

    def __copy__(self) -> NoReturn:
        raise CapabilityError("capabilities cannot be copied; use restrict()")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise CapabilityError("capabilities cannot be copied; use restrict()")

    def __repr__(self) -> str:
        grant = self._live_grant()
        if grant is None:
            return "<Capability revoked>"
        return f"<Capability {Rights(grant.bits)!s} lba [{grant.lo}, {grant.hi})>"

    def _live_grant(self) -> _Grant | None:
        try:
            grant = self._valve._caps.get(self._token)
        except AttributeError:  # not a minted capability (e.g. object.__new__)
            return None
        if grant is None or grant.ref() is not self:
            return None
        return grant

    @property
    def rights(self) -> Rights:
        """The rights this capability holds now (``Rights.NONE`` once revoked)."""
        grant = self._live_grant()
        return Rights(grant.bits) if grant is not None else Rights.NONE

    @property
    def lba_range(self) -> tuple[int, int]:
        """The half-open window ``(first, end)`` this capability covers."""
        _, grant = _authorize(self, 0, "lba_range")
        return grant.lo, grant.hi

    def block_info(self) -> BlockInfo:
        """Device geometry: ``BlockInfo(sector_size, total_sectors)``.  Needs READ."""
        valve, _ = _authorize(self, _READ, "block_info")
        return valve._info

    @overload
    def block_read(self, lba: int, count: int, into: Buffer | None = None) -> memoryview: ...

    @overload
    def block_read(
        self, lba: int, count: int, into: Buffer | None = None, *, ring: Ring
    ) -> int: ...

    def block_read(
        self, lba: int, count: int, into: Buffer | None = None, *, ring: Ring | None = None
    ) -> memoryview | int:
        """Read ``count`` sectors at ``lba``.  Needs READ and a window covering them.

        Without ``into`` the data lands in fresh aligned memory (no copy).  With an
        ``AlignedBuffer`` (or an aligned slice of one) of at least
        ``count * sector_size`` bytes it is read straight into it; any other writable
        buffer is filled through one counted bounce copy.  Returns a memoryview of
        exactly the bytes read.

        With ``ring=`` the same checks run now, the transfer starts, and the call
        returns its tag at once; the memoryview comes with its ``Completion`` from
        ``ring.reap()`` (see ``valve.ring``).
        """
        valve, grant = _authorize(self, _READ, "block_read")
        # The window lies inside the device, so one comparison covers both ranges.
        if count <= 0 or lba < grant.lo or lba + count > grant.hi:
            valve._refuse_range(grant, "block_read", lba, count)
        if ring is not None:
            return _submit(valve, ring, False, lba, count, into, False)
        view, copies = valve._device.read(lba, count, into)
        if copies:
            valve._count_bounces(copies)
        return view

    @overload
    def block_write(
        self, lba: int, count: int, data: Buffer | Sequence[Buffer], *, durable: bool = False
    ) -> None: ...

    @overload
    def block_write(
        self,
        lba: int,
        count: int,
        data: Buffer | Sequence[Buffer],
        *,
        durable: bool = False,
        ring: Ring,
    ) -> int: ...

    def block_write(
        self,
        lba: int,
        count: int,
        data: Buffer | Sequence[Buffer],
        *,
        durable: bool = False,
        ring: Ring | None = None,
    ) -> int | None:
        """Write ``count`` sectors at ``lba``.  Needs WRITE and a window covering them.

        ``data`` is one bytes-like object of exactly ``count * sector_size`` bytes or a
        list/tuple of them totalling that (written with one ``pwritev``; aligned valve
        buffers go without copy, the rest is bounced).  With ``durable=True`` it returns
        only once this write and every earlier one are on stable storage.

        With ``ring=`` the checks run now and the call returns the request's tag at
        once; the completion (with the barrier, when durable) comes from ``ring.reap()``.
        """
        valve, grant = _authorize(self, _WRITE, "block_write")
        if count <= 0 or lba < grant.lo or lba + count > grant.hi:
            valve._refuse_range(grant, "block_write", lba, count)
        if ring is not None:
            return _submit(valve, ring, True, lba, count, data, durable)
        copies = valve._device.write(lba, count, data, durable)
        if copies:
            valve._count_bounces(copies)
        return None

    def alloc_buffer(self, nbytes: int) -> AlignedBuffer:
        """An ``AlignedBuffer`` of ``nbytes`` for zero-copy I/O (any live capability)."""
        valve, _ = _authorize(self, 0, "alloc_buffer")
        return valve._device.alloc(nbytes)

    def restrict(self, rights: Rights, lba_range: tuple[int, int] | None = None) -> Capability:
        """A new capability with a subset of these rights, optionally a narrower window.

        Asking for a right this capability lacks, or a window beyond its own, raises
        ``CapabilityError``.  Revoking this capability later revokes the new one too.
        """
        valve, grant = _authorize(self, 0, "restrict")
        bits = _rights_bits(rights)
        if bits & ~grant.bits:
            valve._deny(f"restrict: cannot add {Rights(bits & ~grant.bits)!s}")
        lo, hi = valve._window(lba_range)
        if lba_range is None:
            lo, hi = grant.lo, grant.hi
        elif lo < grant.lo or hi > grant.hi:
            valve._deny(f"restrict: [{lo}, {hi}) is wider than [{grant.lo}, {grant.hi})")
        return valve._mint(bits, lo, hi, grant)

    def revoke(self) -> None:
        """Revoke this capability and every capability restricted from it.  Idempotent."""
        grant = self._live_grant()
        if grant is not None:
            self._valve._revoke(grant)
