"""Type stub for the cffi-compiled ``native._core`` (see nexfs_core.h for the contract).

cffi's ``ffi`` object is untyped; C pointers and structs (cdata) are ``Any`` here.
The ``lib`` functions mirror the C prototypes: ``int`` results are 0 or ``-errno``.
"""

from typing import Any

ffi: Any

class _Lib:
    NX_STAGE_NONE: int
    NX_STAGE_STAT: int
    NX_STAGE_TYPE: int
    NX_STAGE_OPEN: int
    NX_STAGE_DIRECT: int
    NX_STAGE_BUSY: int
    NX_STAGE_LOCK: int
    NX_STAGE_GEOMETRY: int
    def nx_open(self, path: bytes, read_only: int, dev: Any, /) -> int: ...
    def nx_close(self, dev: Any, /) -> int: ...
    def nx_alloc(self, align: int, size: int, /) -> Any: ...
    def nx_free(self, ptr: Any, /) -> None: ...
    def nx_read(self, dev: Any, lba: int, buf: Any, len: int, /) -> int: ...
    def nx_write(self, dev: Any, lba: int, buf: Any, len: int, durable: int, /) -> int: ...
    def nx_readv(self, dev: Any, lba: int, iov: Any, iovcnt: int, /) -> int: ...
    def nx_writev(
        self, dev: Any, lba: int, iov: Any, iovcnt: int, durable: int, /
    ) -> int: ...
    def nx_sync(self, dev: Any, /) -> int: ...

lib: _Lib
