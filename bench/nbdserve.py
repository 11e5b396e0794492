"""nbdkit's file plugin serving an image on a Unix socket, for the benches that compare a
local image with the same image as an NBD export (mount_ab.py, ring_bench.py)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def served(img: Path, sock: Path) -> Iterator[str]:
    """Serve ``img`` (``cache=none``) on ``sock`` until the block exits; yields the URI."""
    sock.unlink(missing_ok=True)
    server = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "file",
                               str(img), "cache=none"], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        server.terminate()
        server.wait(timeout=60)
