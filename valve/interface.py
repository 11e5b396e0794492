"""The valve's vocabulary: rights, geometry, statistics and the ``BlockDevice`` protocol.

These are the types the filesystem (and its test doubles: a recording valve for
crash tests, a fault-injecting one) are written against; none of them can do I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, NewType, Protocol, TypeAlias, runtime_checkable

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from valve.buffer import AlignedBuffer
else:
    # PEP 688's Buffer is in the standard library from 3.12; typing_extensions is only
    # a development dependency, so 3.11 gets a stand-in that is never used for checks.
    try:
        from collections.abc import Buffer
    except ImportError:
        Buffer = bytes | bytearray | memoryview

__all__ = ["BlockDevice", "BlockInfo", "Buffer", "Lba", "Rights", "ValveStats", "WriteData"]

#: A sector address on the device (units of ``BlockInfo.sector_size``).  A separate
#: type so that a filesystem block number or a byte offset is not passed by accident.
Lba = NewType("Lba", int)

#: What ``block_write`` accepts: one bytes-like object, or a sequence of them that is
#: written with a single ``pwritev``.
WriteData: TypeAlias = "Buffer | Sequence[Buffer]"


class Rights(enum.Flag):
    """What a capability allows. ``READ`` covers ``block_read`` and ``block_info``."""

    NONE = 0
    READ = 1
    WRITE = 2


class BlockInfo(NamedTuple):
    """Device geometry, the answer of ``block_info()``."""

    sector_size: int
    total_sectors: int
    exclusive: bool = True
    """True when the valve holds an exclusive lock on the device (a local image or block
    device, ``flock``); False for a device no lock can protect (a network export), where the
    filesystem needs its own multi-mount protection."""


@dataclass(frozen=True, slots=True)
class ValveStats:
    """A snapshot of a valve's counters (``Valve.stats`` is a property returning one).

    ``reads``/``writes`` count calls that reached the device; ``bounce_copies``
    counts buffers copied through an aligned bounce buffer (zero on the fast path);
    ``denials`` counts capability refusals; ``barriers`` counts ``fdatasync`` calls.
    """

    reads: int = 0
    writes: int = 0
    sectors_read: int = 0
    sectors_written: int = 0
    bounce_copies: int = 0
    denials: int = 0
    barriers: int = 0


@runtime_checkable
class BlockDevice(Protocol):
    """The sector interface the filesystem uses; ``valve.Capability`` implements it."""

    def block_info(self) -> BlockInfo: ...

    def block_read(
        self, lba: int, count: int, into: Buffer | None = None
    ) -> memoryview: ...

    def block_write(
        self, lba: int, count: int, data: WriteData, *, durable: bool = False
    ) -> None: ...

    def alloc_buffer(self, nbytes: int) -> AlignedBuffer: ...
