"""mkfs.nexfs: format an image file or a block device as a NexFS volume.

Exit codes: 0 formatted; 1 refused or failed (bad arguments, target busy, an existing
filesystem without --force, too small, I/O error).  Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
import time
from typing import Any

from nexfs.tools.common import ArgumentParser, UsageError, open_device, parse_size, run_tool

PROG = "mkfs.nexfs"
MIN_SIZE = 16 << 20


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, usage_exit=1,
        description="Create a NexFS volume on an image file, a block device or an NBD export "
        "(nbd://host[:port]/export, nbd+unix:///export?socket=PATH). An image file "
        "that does not exist is created sparse, mode 0600.",
        epilog="exit status: 0 success, 1 failure. Example: mkfs.nexfs --size 4G disk.img",
    )
    parser.add_argument("target", metavar="TARGET",
                        help="image file, block device or NBD URI")
    parser.add_argument("--size", "-s", metavar="SIZE",
                        help="size of the image file to create or resize (e.g. 512M, 4G, 1T)")
    parser.add_argument("--label", "-L", default="", metavar="LABEL",
                        help="volume label (up to 64 bytes)")
    parser.add_argument("--force", "-f", action="store_true",
                        help="overwrite an existing filesystem")
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    parser.add_argument("-O", dest="features", action="append", default=[], metavar="FEATURES",
                        help="comma-separated features to turn on, or off with a leading ^: "
                        "mmp (multi-mount protection; on by default for a device no lock "
                        "protects, such as a network export)")
    parser.add_argument("--mmp-interval", metavar="SECONDS", type=float,
                        help="how often a mount rewrites the multi-mount protection block "
                        "(default 5; a mount waits 2 x this + 1 s before claiming the volume)")
    return parser


def parse_features(texts: list[str]) -> dict[str, bool]:
    """``-O mmp,^foo`` -> {"mmp": True, "foo": False}; UsageError for an unknown feature."""
    out: dict[str, bool] = {}
    for text in texts:
        for item in filter(None, (t.strip() for t in text.split(","))):
            name = item.lstrip("^")
            if name != "mmp":
                raise UsageError(f"unknown feature {name!r} (known: mmp)", 1)
            out[name] = not item.startswith("^")
    return out


def mmp_interval_ms(seconds: float | None) -> int | None:
    """``--mmp-interval S`` in milliseconds (None when not given); UsageError out of range."""
    from nexfs.store.mmp import MAX_INTERVAL_MS, MIN_INTERVAL_MS

    if seconds is None:
        return None
    interval_ms = round(seconds * 1000)
    if not MIN_INTERVAL_MS <= interval_ms <= MAX_INTERVAL_MS:
        raise UsageError(f"--mmp-interval must be between {MIN_INTERVAL_MS / 1000} and "
                         f"{MAX_INTERVAL_MS // 1000} seconds", 1)
    return interval_ms


def existing_filesystem(path: str) -> str | None:
    """A description of a filesystem already on ``path``, or None."""
    from nexfs.ondisk.layout import probe_superblock

    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        found = probe_superblock(path)
    except OSError:
        return None
    if found:
        return found
    if not any(head):
        return None
    try:
        out = subprocess.run(
            ["blkid", "-p", "-o", "value", "-s", "TYPE", path], capture_output=True,
            text=True, timeout=30, check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return f"an existing {out} filesystem" if out else None


def existing_on_export(dev: Any) -> str | None:
    """``existing_filesystem`` for an NBD export, read through the valve capability ``dev``:
    a NexFS superblock, or any data in the first 64 KiB (blkid cannot look at an export)."""
    from nexfs.ondisk.layout import describe_superblocks
    from nexfs.ondisk.metablock import BLOCK_SIZE

    info = dev.block_info()
    per_block = BLOCK_SIZE // info.sector_size
    nblocks = info.total_sectors // per_block
    found = describe_superblocks(
        lambda block: bytes(dev.block_read(block * per_block, per_block)), nblocks)
    if found:
        return found
    head = dev.block_read(0, min(info.total_sectors, (64 << 10) // info.sector_size))
    return "data (its first 64 KiB are not zero)" if any(head) else None


def format_export(args: argparse.Namespace, uri: str, mmp: bool | None,
                  interval_ms: int | None) -> int:
    """mkfs on an NBD export: nothing to create or resize; the checks a path gets from the
    file system (size, what it already holds) are made through the valve."""
    started = time.monotonic()
    try:
        with open_device(uri, read_only=False) as dev:
            info = dev.block_info()
            if info.sector_size * info.total_sectors < MIN_SIZE:
                raise UsageError(f"{uri} is smaller than 16M", 1)
            if not args.force:
                found = existing_on_export(dev)
                if found:
                    raise UsageError(f"{uri} contains {found}; use --force to overwrite it", 1)
            _format(dev, uri, args, started, mmp, interval_ms)
    except UsageError as exc:
        exc.code = 1
        raise
    if not args.quiet:
        print(f"{uri}: NexFS volume created in {time.monotonic() - started:.1f} s")
    return 0


def _format(dev: Any, path: str, args: argparse.Namespace, started: float, mmp: bool | None,
            interval_ms: int | None) -> None:
    from nexfs.core.fs import FileSystem

    def progress(message: str) -> None:
        if not args.quiet and time.monotonic() - started > 0.5:
            print(f"{PROG}: {message}", file=sys.stderr)

    if not args.quiet:
        info = dev.block_info()
        total = info.sector_size * info.total_sectors
        print(f"Creating NexFS volume on {path}: {total / (1 << 30):.2f} GiB, "
              f"{info.sector_size}-byte sectors")
    FileSystem.format(dev, label=args.label, progress=progress, mmp=mmp,
                      mmp_interval_ms=interval_ms)


def format_target(args: argparse.Namespace) -> int:
    from valve.nbd import is_nbd_uri

    path = args.target
    size = None
    if args.size is not None:
        try:
            size = parse_size(args.size)
        except ValueError as exc:
            raise UsageError(str(exc), 1) from None
        if size < MIN_SIZE:
            raise UsageError(f"size {args.size} is too small (the minimum is 16M)", 1)
    if len(args.label.encode()) > 64:
        raise UsageError("label is longer than 64 bytes", 1)
    mmp = parse_features(args.features).get("mmp")
    interval_ms = mmp_interval_ms(args.mmp_interval)
    if is_nbd_uri(path):
        if size is not None:
            raise UsageError("--size applies to image files; an NBD export has the size its "
                             "server gives it", 1)
        return format_export(args, path, mmp, interval_ms)

    created = False
    if not os.path.exists(path):
        if size is None:
            raise UsageError(f"{path} does not exist; give --size to create an image", 1)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise UsageError(f"{path}: cannot create: {exc.strerror}", 1) from None
        os.close(fd)
        created = True
    else:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{path} is a directory", 1)
        if not args.force:
            found = existing_filesystem(path)
            if found:
                raise UsageError(f"{path} contains {found}; use --force to overwrite it", 1)
        if size is not None and not stat.S_ISREG(st.st_mode):
            raise UsageError("--size applies to image files, not devices", 1)
    try:
        if size is not None:
            try:
                os.truncate(path, size)
            except OSError as exc:
                raise UsageError(f"{path}: cannot make it {args.size}: {exc.strerror} (the "
                                 "filesystem holding the image limits file sizes)", 1) from None
        elif os.path.getsize(path) < MIN_SIZE and stat.S_ISREG(os.stat(path).st_mode):
            raise UsageError(f"{path} is smaller than 16M; give --size", 1)
        started = time.monotonic()
        try:
            with open_device(path, read_only=False) as dev:
                _format(dev, path, args, started, mmp, interval_ms)
        except UsageError as exc:
            exc.code = 1
            raise
    except BaseException:
        if created:
            os.unlink(path)
        raise
    if not args.quiet:
        print(f"{path}: NexFS volume created in {time.monotonic() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(PROG, lambda: format_target(args))


if __name__ == "__main__":
    raise SystemExit(main())
