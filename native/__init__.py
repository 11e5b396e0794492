"""The C core of the Block Valve, compiled by cffi as ``native._core``.

``ffi`` and ``lib`` are re-exported unchanged: every ``lib.nx_*`` function returns
``0`` (or a pointer) on success and ``-errno`` on failure, and cffi releases the
GIL for the duration of each call, so I/O on one thread never stalls the others.
Turning ``-errno`` into typed exceptions is the valve's job (``valve.errors``),
not this package's: the core stays a thin, testable layer over the syscalls.
"""

from native._core import ffi, lib

__all__ = ["ffi", "lib"]
