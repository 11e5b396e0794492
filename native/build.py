"""cffi build script for ``native._core`` (API mode, out of line).

setup.py names this file in ``cffi_modules``, so ``pip install .`` and
``pip install -e .`` (``make venv``) both compile the module.  The declarations
come from the marked block of ``nexfs_core.h``, so that the header is the only
description of the C interface.
"""

from __future__ import annotations

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "nexfs_core.h")
#: The NBD backend (libnbd) has its own header and C file, so nexfs_core.c stays local-only.
NBD_HEADER = os.path.join(HERE, "nbd_backend.h")
#: The data cache's blocks and the hot requests' short path (nexfs/store/datacache.py).
HOT_HEADER = os.path.join(HERE, "hotpath.h")


def _cdef_from_header(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"/\* cdef-begin \*/(.*)/\* cdef-end \*/", text, re.S)
    if match is None:
        raise RuntimeError(f"{path}: no cdef-begin/cdef-end block")
    return match.group(1)


def _relative(path: str) -> str:
    # setuptools wants source paths relative to the project root (setup.py's cwd);
    # fall back to the absolute path when run from elsewhere.
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


ffibuilder = FFI()
# struct iovec comes from <sys/uio.h>; "..." lets cffi take its real layout from the compiler.
ffibuilder.cdef("struct iovec { void *iov_base; size_t iov_len; ...; };")
ffibuilder.cdef(_cdef_from_header(HEADER))
ffibuilder.cdef(_cdef_from_header(NBD_HEADER))
ffibuilder.cdef(_cdef_from_header(HOT_HEADER))
ffibuilder.set_source(
    "native._core",
    '#include "nexfs_core.h"\n#include "nbd_backend.h"\n#include "hotpath.h"',
    sources=[
        _relative(os.path.join(HERE, "nexfs_core.c")),
        _relative(os.path.join(HERE, "nbd_backend.c")),
        _relative(os.path.join(HERE, "hotpath.c")),
    ],
    include_dirs=[_relative(HERE)],
    # io_uring for the asynchronous ring (Debian: liburing-dev to build, liburing2 to run);
    # pthread for its fallback pool; libnbd for the NBD backend.
    libraries=["nbd", "uring", "pthread"],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)
