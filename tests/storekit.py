"""Helpers shared by the storage-layer tests: a payload metadata block and fresh volumes."""

from __future__ import annotations

import struct
from collections.abc import Callable

from memdev import MemDevice

from nexfs.ondisk.metablock import HEADER_SIZE, MetaBlock, check_header, pack_header, seal_block
from nexfs.store.store import Store
from nexfs.types import BlockNo

MAGIC_PAYLOAD = 0x59415058  # "XPAY": test-only block kind
_VALUE = struct.Struct("<QQ")


class PayloadBlock(MetaBlock):
    """A metadata block carrying a (value, owner-ish tag) pair: what the tests mutate."""

    __slots__ = ("tag", "value")

    def __init__(self, blkno: BlockNo, value: int, tag: int = 0) -> None:
        super().__init__(blkno)
        self.value = value
        self.tag = tag

    def encode(self, out: memoryview, volume_seed: int, tid: int) -> None:
        out[:] = bytes(len(out))
        pack_header(out, MAGIC_PAYLOAD, self.blkno, 7, tid)
        _VALUE.pack_into(out, HEADER_SIZE, self.value, self.tag)
        seal_block(out, volume_seed, self.blkno)

    @classmethod
    def decoder(cls, seed: int) -> Callable[[BlockNo, memoryview], PayloadBlock]:
        def decode(blkno: BlockNo, raw: memoryview) -> PayloadBlock:
            check_header(raw, blkno, MAGIC_PAYLOAD, seed, "payload block", owner=7)
            value, tag = _VALUE.unpack_from(raw, HEADER_SIZE)
            return cls(blkno, value, tag)

        return decode


def read_payload(store: Store, blkno: int) -> int:
    return store.get(BlockNo(blkno), PayloadBlock.decoder(store.volume_seed)).value


def new_volume(mib: int = 8, sector_size: int = 4096, **kw: object) -> MemDevice:
    dev = MemDevice.of_size(mib << 20, sector_size)
    Store.format(dev, label="test", **kw)  # type: ignore[arg-type]
    return dev
