"""What the command-line tools share: opening a target through the valve with one-line errors,
size parsing, and the rule that a user mistake never prints a traceback."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from nexfs.types import FsError


class UsageError(Exception):
    """A mistake by the user: printed as one line, never with a traceback."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ArgumentParser(argparse.ArgumentParser):
    """argparse, exiting with the tool's documented code for a usage error (argparse's own
    is 2, which means something else to fsck's callers)."""

    def __init__(self, *args: Any, usage_exit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usage_exit = usage_exit

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.usage_exit, f"{self.prog}: error: {message}\n")


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """'4G', '512M', '1T', '65536' (binary units; an optional trailing 'B' or 'iB')."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (try e.g. 512M, 4G, 1T)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def die(prog: str, message: str, code: int) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(code)


def describe_os_error(path: str, exc: OSError) -> str:
    """One line for an OSError from opening or using ``path``."""
    text = str(exc)
    if path in text:
        return text
    reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
    return f"{path}: {reason}"


@contextlib.contextmanager
def open_device(path: str, *, read_only: bool) -> Iterator[Any]:
    """Open ``path`` (an image file, a block device or an NBD URI) through the valve and
    yield a capability (READ, plus WRITE unless read-only).  The valve is closed — every
    capability revoked — on the way out."""
    from valve import Rights, Valve
    from valve.nbd import is_nbd_uri

    # An NBD URI is not a path: whether the export exists is the server's answer.
    if not is_nbd_uri(path) and not os.path.exists(path):
        raise UsageError(f"{path}: no such file or device", 8)
    try:
        valve = Valve.open(path, read_only=read_only)
    except OSError as exc:
        raise UsageError(describe_os_error(path, exc), 8) from None
    try:
        rights = Rights.READ if read_only else Rights.READ | Rights.WRITE
        yield valve.grant(rights)
    finally:
        valve.close()


def setup_logging(prog: str) -> None:
    """Warnings and errors logged by the library (a superblock copy unusable, a damaged
    block met during a repair) reach stderr as one line each, named after the tool.  Left
    alone when the caller already configured logging (an embedding program, pytest)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def run_tool(prog: str, body: Callable[[], int]) -> int:
    """Run a tool's body, turning user errors and filesystem errors into one line."""
    setup_logging(prog)
    try:
        return body()
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.code
    except FsError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 8
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 8
