"""CRC32C for metadata, bound to the volume UUID and the block's own number.

The C implementation comes from the ``crc32c`` package (hardware accelerated where the CPU
allows).  Every metadata block stores ``crc32c(seed, block-with-crc-field-zeroed)`` where the
seed mixes the volume UUID and the block number, so a block written to the wrong place, or a
block from another volume, fails verification even when its bytes are intact.
"""

from __future__ import annotations

import struct

import crc32c as _crc32c

_ZERO4 = b"\0\0\0\0"


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """Plain CRC32C (Castagnoli) of ``data``, continuing from ``value``."""
    return _crc32c.crc32c(data, value)


def uuid_seed(uuid: bytes) -> int:
    """The per-volume seed: CRC32C of the 16-byte UUID."""
    return _crc32c.crc32c(uuid)


def block_seed(volume_seed: int, number: int) -> int:
    """Seed for one object (block number or inode number) on one volume."""
    return _crc32c.crc32c(struct.pack("<Q", number), volume_seed)


def seal(buf: memoryview | bytearray, crc_offset: int, volume_seed: int, number: int) -> int:
    """Compute the checksum of ``buf`` (crc field taken as zero) and store it at crc_offset."""
    mv = memoryview(buf)
    mv[crc_offset : crc_offset + 4] = _ZERO4
    value = _crc32c.crc32c(mv, block_seed(volume_seed, number))
    struct.pack_into("<I", mv, crc_offset, value)
    return value


def verify(
    buf: memoryview | bytes | bytearray, crc_offset: int, volume_seed: int, number: int
) -> bool:
    """True when the checksum stored at crc_offset matches the contents of ``buf``."""
    mv = memoryview(buf)
    (stored,) = struct.unpack_from("<I", mv, crc_offset)
    seed = block_seed(volume_seed, number)
    value = _crc32c.crc32c(mv[:crc_offset], seed)
    value = _crc32c.crc32c(_ZERO4, value)
    value = _crc32c.crc32c(mv[crc_offset + 4 :], value)
    return value == stored
