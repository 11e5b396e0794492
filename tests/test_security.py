"""Security: every valve operation without a capability, or with one that does not allow it,
is refused and counted; and the application side of NexFS never holds the capability.

tests/test_valve_refusals.py covers the single refusals (wrong right, revoked, window,
forgeries, closed valve).  This file adds the full matrix — each of the five operations
(``block_info``, ``block_read``, ``block_write`` incl. durable and vectored writes,
``alloc_buffer``, ``restrict``) with each kind of bad capability, each refusal counted in
``stats.denials`` exactly once with no sector read or written — and the filesystem side: no
``Capability`` (or ``Valve``) is reachable through the public attributes of a mounted
``FileSystem`` or of the FUSE adapter, the store's device views hold only capabilities
restricted from the one it was opened with (which ones: tests/test_grants.py), and
``mkfs.nexfs`` creates images mode 0600 whatever the umask.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nexfs.core.fs import FileSystem
from nexfs.store.blockdev import BlockDev
from valve import Capability, CapabilityError, Rights, Valve

RW = Rights.READ | Rights.WRITE
SS_IMAGE = 1 << 20


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "sec.img"
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * (SS_IMAGE // 256))
    return path


def _ops(ss: int) -> dict[str, Callable[[Capability], object]]:
    return {
        "block_info": lambda c: c.block_info(),
        "block_read": lambda c: c.block_read(0, 1),
        "block_read_into": lambda c: c.block_read(0, 1, into=bytearray(ss)),
        "block_write": lambda c: c.block_write(0, 1, bytes(ss)),
        "block_write_durable": lambda c: c.block_write(0, 1, bytes(ss), durable=True),
        "block_write_vectored": lambda c: c.block_write(0, 2, [bytes(ss), bytes(ss)]),
        "alloc_buffer": lambda c: c.alloc_buffer(4096),
        "restrict": lambda c: c.restrict(Rights.READ),
        "lba_range": lambda c: c.lba_range,
    }


def _bad_caps(valve: Valve, other: Valve) -> Iterator[tuple[str, Capability, set[str]]]:
    """(description, capability, operations it must be refused)."""
    everything = set(_ops(512))
    writes = {"block_write", "block_write_durable", "block_write_vectored"}
    reads = {"block_read", "block_read_into", "block_info"}
    yield "read-only", valve.grant(Rights.READ), writes
    yield "write-only", valve.grant(Rights.WRITE), reads
    window = valve.grant(RW).restrict(RW, (64, 128))
    yield "range-restricted", window, writes | {"block_read", "block_read_into"}
    revoked = valve.grant(RW)
    revoked.revoke()
    yield "revoked", revoked, everything
    parent = valve.grant(RW)
    child = parent.restrict(RW)
    parent.revoke()
    yield "child of a revoked one", child, everything
    real = valve.grant(RW)
    forged = object.__new__(Capability)
    object.__setattr__(forged, "_valve", valve)
    object.__setattr__(forged, "_token", real._token)
    yield "forged with a live token", forged, everything
    # A token of another valve's capability presented to this valve.
    foreign = other.grant(RW)
    smuggled = object.__new__(Capability)
    object.__setattr__(smuggled, "_valve", valve)
    object.__setattr__(smuggled, "_token", foreign._token)
    yield "another valve's token", smuggled, everything
    kept = [real, foreign]  # keep the originals alive while their tokens are abused
    assert kept


def test_every_operation_with_every_bad_capability(img: Path, tmp_path: Path) -> None:
    other_img = tmp_path / "other.img"
    other_img.write_bytes(bytes(SS_IMAGE))
    with Valve.open(img) as valve, Valve.open(other_img) as other:
        good = valve.grant(RW)
        ss = good.block_info().sector_size
        ops = _ops(ss)
        before = bytes(good.block_read(0, 256))
        refused = 0
        for what, cap, must_refuse in _bad_caps(valve, other):
            for name in sorted(must_refuse):
                s0 = valve.stats
                with pytest.raises(CapabilityError):
                    ops[name](cap)
                s1 = valve.stats
                assert s1.denials == s0.denials + 1, f"{what} {name}: not counted once"
                assert (s1.reads, s1.writes, s1.barriers) == (s0.reads, s0.writes,
                                                              s0.barriers), (what, name)
                refused += 1
        assert bytes(good.block_read(0, 256)) == before
        assert other.stats.denials == 0  # the foreign token was refused by *this* valve
        assert refused >= 45


def test_closed_valve_refuses_everything(img: Path) -> None:
    valve = Valve.open(img)
    caps = [valve.grant(RW), valve.grant(Rights.READ).restrict(Rights.READ, (0, 8))]
    ss = caps[0].block_info().sector_size
    valve.close()
    for cap in caps:
        for name, op in _ops(ss).items():
            with pytest.raises(CapabilityError):
                op(cap)
            assert name
    assert valve.stats.denials == len(caps) * len(_ops(ss))


def test_no_capability_at_all() -> None:
    """Calling the operations on things that are not capabilities: refused, one line."""
    for fake in (None, 0, "cap", object(), object.__new__(Capability)):
        for name in ("block_info", "alloc_buffer"):
            with pytest.raises(CapabilityError) as exc:
                getattr(Capability, name)(fake, *(() if name == "block_info" else (4096,)))
            assert "\n" not in str(exc.value)
        with pytest.raises(CapabilityError):
            Capability.block_read(fake, 0, 1)  # type: ignore[call-overload]
        with pytest.raises(CapabilityError):
            Capability.block_write(fake, 0, 1, bytes(512))  # type: ignore[call-overload]
        with pytest.raises(CapabilityError):
            Capability.restrict(fake, Rights.READ)  # type: ignore[arg-type]


# -- the application side never holds the capability ----------------------------------------


def _public_reach(root: object, depth: int = 8) -> Iterator[tuple[str, object]]:
    """Every object reachable from ``root`` through public attributes (no leading
    underscore), containers included, breadth first."""
    seen: set[int] = set()
    todo: list[tuple[str, object, int]] = [("root", root, 0)]
    while todo:
        path, obj, d = todo.pop(0)
        if id(obj) in seen or d > depth:
            continue
        seen.add(id(obj))
        yield path, obj
        if isinstance(obj, str | bytes | bytearray | int | float | bool | type(None)):
            continue
        if isinstance(obj, dict):
            children = [(f"{path}[{k!r}]", v) for k, v in list(obj.items())[:50]]
        elif isinstance(obj, list | tuple | set | frozenset):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(list(obj)[:50])]
        else:
            children = []
            for name in dir(obj):
                if name.startswith("_"):
                    continue
                try:
                    value = getattr(obj, name)
                except Exception:
                    continue
                if callable(value) and not isinstance(value, Capability):
                    continue
                children.append((f"{path}.{name}", value))
        todo.extend((p, v, d + 1) for p, v in children)


@contextlib.contextmanager
def _mounted_fs(path: Path) -> Iterator[tuple[FileSystem, Capability]]:
    with Valve.open(path) as v:
        FileSystem.format(v.grant(RW))
        cap = v.grant(RW)
        fs = FileSystem.open(cap)
        try:
            yield fs, cap
        finally:
            fs.close()


def _assert_unreachable(root: object, label: str) -> int:
    count = 0
    for path, obj in _public_reach(root):
        count += 1
        assert not isinstance(obj, Capability | Valve), f"{label}: {path} is a {type(obj)}"
    return count


def test_filesystem_exposes_no_capability(tmp_path: Path) -> None:
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    with _mounted_fs(img) as (fs, cap):
        assert _assert_unreachable(fs, "FileSystem") > 20
        # The store keeps no reference to the capability it was opened with: its device
        # views hold capabilities restricted from it, in private attributes.
        def block_devs_holding(c: object) -> list[object]:
            near = gc.get_referrers(c)
            near += [o for r in near if isinstance(r, dict | tuple) for o in gc.get_referrers(r)]
            return [o for o in near if isinstance(o, BlockDev)]

        assert not block_devs_holding(cap)
        held = fs.store.bdev._dev
        assert isinstance(held, Capability) and held is not cap
        assert held.rights == Rights.READ
        assert block_devs_holding(held) == [fs.store.bdev]  # the search does find holders


def test_fuse_adapter_exposes_no_capability(tmp_path: Path) -> None:
    from nexfs.fuse.adapter import FuseAdapter as adapter_cls
    img = tmp_path / "fuse.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    with Valve.open(img) as v:
        FileSystem.format(v.grant(RW))
        fs = FileSystem.open(v.grant(RW))
        try:
            adapter = adapter_cls(fs)
            assert _assert_unreachable(adapter, adapter_cls.__name__) > 20
        finally:
            fs.close()


def test_mkfs_creates_images_0600(tmp_path: Path) -> None:
    from nexfs.tools.mkfs import main as mkfs_main

    target = tmp_path / "new.img"
    old = os.umask(0)  # even with the most permissive umask
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = mkfs_main(["--size", "32M", "--quiet", str(target)])
    finally:
        os.umask(old)
    assert code == 0, out.getvalue()
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode == 0o600, f"image created with mode {mode:o}"
