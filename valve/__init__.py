"""The Block Valve: capability-gated, zero-copy, O_DIRECT sector I/O for NexFS.

The public surface is the seed's three operations, reached through a capability::

    from valve import Valve, Rights
    with Valve.open("disk.img") as v:
        cap = v.grant(Rights.READ | Rights.WRITE)
        info = cap.block_info()                 # BlockInfo(sector_size, total_sectors)
        data = cap.block_read(0, 8)             # memoryview of 8 sectors
        cap.block_write(0, 8, data, durable=True)

See docs/VALVE.md for the design (capability model, zero copy, durability).
"""

from valve.buffer import AlignedBuffer
from valve.errors import (
    CapabilityError,
    DeviceBusyError,
    DeviceError,
    DirectIONotSupported,
    RangeError,
)
from valve.interface import BlockDevice, BlockInfo, Buffer, Lba, Rights, ValveStats, WriteData
from valve.ring import Completion
from valve.valve import Capability, Ring, Valve

__all__ = [
    "AlignedBuffer",
    "BlockDevice",
    "BlockInfo",
    "Buffer",
    "Capability",
    "CapabilityError",
    "Completion",
    "DeviceBusyError",
    "DeviceError",
    "DirectIONotSupported",
    "Lba",
    "RangeError",
    "Rights",
    "Ring",
    "Valve",
    "ValveStats",
    "WriteData",
]
