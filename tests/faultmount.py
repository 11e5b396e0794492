"""mount.nexfs with injected faults, for the real-mount tests: the product's own mount
command (``nexfs.tools.mount.main``, every option and the daemonizing unchanged) given fault
injectors through its seams (``nexfs.tools.mount.Seams``)::

    python tests/faultmount.py [--device-fault SPEC] [--handler-fault SPEC] -- MOUNT-ARGS...

* ``--device-fault KIND:N[,sticky][,after=PATH]``: the daemon's valve capability is wrapped
  in tests/faultdev.py's :class:`FaultDevice` (the same injector the in-process tests use),
  armed by that specification (see faultdev).  Device-mapper (dm-error, dm-flakey) would do
  this below the daemon, but the CI containers have none.  On a read-only mount only read
  faults apply (nothing is written).
* ``--handler-fault METHOD[:NAME]``: the FUSE adapter is given the filesystem with its method
  METHOD raising RuntimeError (for every call, or only for calls with NAME, a file or xattr
  name, among their arguments): a bug in the filesystem seen from the kernel, to prove that a
  failing request answers EIO and leaves the mount up.

* ``--shared``: the target is opened without the valve's lock, as tests/shareddev.py's
  unlocked image that stands for a network export (``block_info().exclusive`` False), so that
  two daemons can mount one image and the multi-mount protection is what stops them.

The daemon logs a warning saying which fault is active.  A malformed specification exits with
status 2 before anything is mounted.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from faultdev import FaultDevice, parse_spec
from shareddev import open_shared

from nexfs.fuse.adapter import FuseAdapter
from nexfs.tools.mount import EXIT_USAGE, Seams, main

log = logging.getLogger("faultmount")


class FaultyFileSystem:
    """A FileSystem whose method ``method`` raises RuntimeError when called (with ``name``
    among its arguments, if given); everything else is the FileSystem's own."""

    def __init__(self, fs: Any, method: str, name: bytes | None) -> None:
        self._fs = fs
        self._method = method
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._fs, attr)
        if attr != self._method:
            return value

        def faulty(*args: Any, **kwargs: Any) -> Any:
            if self._name is None or self._name in args:
                raise RuntimeError(f"injected fault in {attr} (--handler-fault)")
            return value(*args, **kwargs)

        return faulty


def device_seam(spec: str) -> Callable[[Any, bool], Any]:
    kind = parse_spec(spec)[0]  # ValueError now, before anything is mounted

    def wrap(cap: Any, read_only: bool) -> Any:
        if read_only and kind != "read":
            return cap  # nothing is written through a read-only capability
        log.warning("test device fault injection active: %s", spec)
        return FaultDevice.from_spec(cap, spec)

    return wrap


def adapter_seam(spec: str) -> Callable[[Any, bool], Any]:
    method, _, name = spec.partition(":")
    if not method:
        raise ValueError(f"handler fault {spec!r}: expected METHOD[:NAME]")

    def make(fs: Any, debug: bool) -> Any:
        log.warning("test fault injection active: %s", spec)
        faulty: Any = FaultyFileSystem(fs, method, os.fsencode(name) if name else None)
        return FuseAdapter(faulty, debug=debug)

    return make


def run(argv: list[str]) -> int:
    device = adapter = None
    opener = None
    try:
        while argv and argv[0] in ("--device-fault", "--handler-fault", "--shared"):
            if argv[0] == "--shared":
                opener = open_shared
                argv = argv[1:]
                continue
            if len(argv) < 2:
                raise ValueError(f"{argv[0]} needs a specification")
            if argv[0] == "--device-fault":
                device = device_seam(argv[1])
            else:
                adapter = adapter_seam(argv[1])
            argv = argv[2:]
    except ValueError as exc:
        print(f"faultmount: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if argv[:1] == ["--"]:
        argv = argv[1:]
    return main(argv, Seams(device=device, adapter=adapter, open_device=opener))


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]))
