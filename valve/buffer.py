"""Aligned buffers for zero-copy I/O, and the rule that decides which memory goes direct.

``AlignedBuffer`` is an anonymous private ``mmap``: page aligned, zero filled, freed
(``munmap``) when the last reference goes, and a real buffer-protocol object, so
``memoryview(buf)`` is writable and slicing it costs nothing.  It is a subclass of
``mmap.mmap`` because Python 3.11 gives a pure-Python class no other way to export a
buffer (``__buffer__`` is 3.12), and cffi's buffer type cannot be subclassed; the
kernel's page alignment (4096) covers every sector size and DMA alignment the valve
accepts.  The C core's ``posix_memalign`` serves the valve's own buffers (bounce
buffers and the result of ``block_read`` without ``into=``).

Zero copy is decided by provenance *and* arithmetic: memory goes straight to the
kernel only if it was handed out by the valve (an ``AlignedBuffer``, a buffer the
valve returned, or a memoryview of either) and its address and length are sector
aligned.  Everything else (``bytes``, ``bytearray``, foreign memoryviews) is copied
once through a bounce buffer and counted.  Provenance keeps that deterministic: a
``bytes`` object that happens to land on an aligned address is still bounced, so a
test can prove the fast path copies nothing and the slow path copies exactly once.
"""

from __future__ import annotations

import mmap

from native import ffi

__all__ = ["AlignedBuffer", "is_valve_memory"]

#: Type of the objects ``ffi.buffer`` returns: what ``block_read`` without ``into=``
#: hands back (inside a memoryview), so reading, editing and rewriting a block stays
#: zero copy.
_CffiBuffer = type(ffi.buffer(ffi.new("char[]", 1)))


class AlignedBuffer(mmap.mmap):
    """A page-aligned, writable byte buffer for zero-copy ``block_read``/``block_write``.

    Get one from ``Capability.alloc_buffer(nbytes)``, which also checks that page
    alignment satisfies the device.  ``len(buf)`` is ``nbytes``.
    """

    def __new__(cls, nbytes: int) -> AlignedBuffer:
        if nbytes <= 0:
            raise ValueError(f"buffer size must be positive, not {nbytes}")
        # MAP_PRIVATE: a forked child (e.g. a test helper) must not share our I/O memory.
        return super().__new__(cls, -1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self)} bytes"
        return f"<AlignedBuffer {state}>"

    def __reduce__(self) -> tuple[object, ...]:
        # mmap cannot be pickled; say so in our own words rather than mmap's.
        raise TypeError("AlignedBuffer cannot be pickled")


def is_valve_memory(obj: object) -> bool:
    """True if ``obj`` (or the object a memoryview ``obj`` views) came from the valve."""
    if type(obj) is memoryview:
        obj = obj.obj
    return type(obj) is AlignedBuffer or type(obj) is _CffiBuffer
