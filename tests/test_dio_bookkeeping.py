"""Which writes make the adapter drop the kernel's cached pages (docs/DESIGN.md, "O_DIRECT and
the page cache"), driven in-process: every combination of handle kinds, reads and writes is
checked against the rule "a write on an O_DIRECT handle, to a file a READ through another
handle has touched since the last drop while an O_DIRECT handle was open"."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
from fsutil import make_image, mounted

from nexfs.core.fs import ROOT_INO
from nexfs.fuse import adapter as fuse_adapter
from nexfs.fuse.adapter import FuseAdapter

CTX = pyfuse3.RequestContext()  # uid 0


@pytest.fixture
def adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FuseAdapter]:
    drops: list[int] = []

    async def record(ino: int) -> bool:
        drops.append(ino)
        return True

    monkeypatch.setattr(fuse_adapter, "drop_cached_pages", record)
    with mounted(make_image(tmp_path / "vol.img")) as fs:
        ops = FuseAdapter(fs)
        ops.drops = drops  # type: ignore[attr-defined]
        yield ops
        ops.release_all()


async def test_rule_over_every_sequence(adapter: FuseAdapter) -> None:
    drops: list[int] = adapter.drops  # type: ignore[attr-defined]
    info, entry = await adapter.create(ROOT_INO, b"f", 0o644, os.O_RDWR, CTX)
    ino = entry.st_ino
    await adapter.release(info.fh)
    # Steps: open a buffered or O_DIRECT handle, read or write through one, close one.
    steps = ["open-b", "open-d", "read-b", "read-d", "write-b", "write-d", "close-d"]
    for seq in itertools.product(steps, repeat=4):
        buffered = (await adapter.open(ino, os.O_RDWR, CTX)).fh
        direct: list[int] = []
        cached = False  # the model: a READ through a buffered handle since the last drop
        for step in seq:
            before = len(drops)
            if step == "open-b":
                await adapter.release((await adapter.open(ino, os.O_RDWR, CTX)).fh)
            elif step == "open-d":
                direct.append((await adapter.open(ino, os.O_RDWR | os.O_DIRECT, CTX)).fh)
            elif step == "read-b":
                await adapter.read(buffered, 0, 4096)
                cached = cached or bool(direct)
            elif step == "read-d" and direct:
                await adapter.read(direct[-1], 0, 4096)
            elif step == "write-b":
                await adapter.write(buffered, 0, b"x" * 4096)
            elif step == "write-d" and direct:
                await adapter.write(direct[-1], 0, b"y" * 4096)
                if cached:
                    assert drops[before:] == [ino], seq
                    cached = False
                    continue
            elif step == "close-d" and direct:
                await adapter.release(direct.pop())
                cached = cached and bool(direct)
            assert drops[before:] == [], (seq, step)
        for fh in [buffered, *direct]:
            await adapter.release(fh)
