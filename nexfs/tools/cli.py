"""The ``nexfs`` command: ``nexfs mkfs|fsck|info|mount|bench|stats ...``.

Also the helper that ``mount -t fuse.nexfs SOURCE DIR`` runs: mount.fuse3 calls
``nexfs SOURCE DIR -o OPTIONS``, which is passed on to mount.nexfs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

USAGE = """\
usage: nexfs COMMAND [ARGS...]

commands:
  mkfs   TARGET        format an image file or block device   (same as mkfs.nexfs)
  fsck   TARGET        check and repair a volume               (same as fsck.nexfs)
  info   TARGET        print the superblock in human terms
  tune   -O mmp TARGET change a volume's features (multi-mount protection)
  mount  TARGET DIR    mount a volume                          (same as mount.nexfs)
  bench  [--quick]     run the benchmark suite
  stats  MOUNTPOINT    live statistics of a mounted volume (--json, --watch)

Run 'nexfs COMMAND --help' for a command's options.
"""


COMMANDS = {"mkfs": "mkfs", "fsck": "fsck", "info": "info", "mount": "mount", "bench": "bench",
            "tune": "tune", "stats": "stats"}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 1
    command, rest = args[0], args[1:]
    if command in COMMANDS:
        module = COMMANDS[command]
    elif len(args) >= 2 and not command.startswith("-"):
        # mount.fuse3 runs "nexfs SOURCE MOUNTPOINT -o OPTIONS".
        module, rest = "mount", args
    else:
        print(f"nexfs: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 1
    run: Callable[[list[str]], int] = importlib.import_module(f"nexfs.tools.{module}").main
    return run(rest)


if __name__ == "__main__":
    raise SystemExit(main())
