"""Test machinery stays out of the product, and the one fault injector does what the mount
tests ask of it.

The product (nexfs/, mount.py, valve/, native/) reads no ``NEXFS_TEST_*`` variable and imports
nothing from tests/: the tests reach the mount through its seams (``nexfs.tools.mount.Seams``, used
by tests/faultmount.py).  The in-process checks of :class:`faultdev.FaultDevice` cover what
the real-mount tests rely on (specifications, arming by a file, sticky faults of either
direction) in milliseconds; tests/test_mount_faults.py sees the same through the kernel.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
from faultdev import FaultDevice, parse_spec
from memdev import MemDevice

from valve import DeviceError

REPO = Path(__file__).absolute().parents[1]
PRODUCT = ["nexfs", "valve", "native", "mount.py"]
TEST_MODULES = sorted(p.stem for p in (REPO / "tests").glob("*.py"))
_IMPORT = re.compile(r"^\s*(?:from|import)\s+([\w.]+)", re.MULTILINE)


def product_files() -> list[Path]:
    files: list[Path] = []
    for name in PRODUCT:
        path = REPO / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_product_reads_no_test_variables_and_imports_no_test_code() -> None:
    files = product_files()
    assert len(files) > 20 and REPO / "nexfs" / "tools" / "mount.py" in files
    assert not (REPO / "nexfs" / "devfault.py").exists()
    found = []
    for path in files:
        text = path.read_text()
        if "NEXFS_TEST" in text:
            found.append(f"{path.relative_to(REPO)}: mentions NEXFS_TEST")
        for module in _IMPORT.findall(text):
            top = module.split(".")[0]
            if top == "tests" or top in TEST_MODULES:
                found.append(f"{path.relative_to(REPO)}: imports {module}")
    assert not found, found


def _dev(spec: str) -> tuple[FaultDevice, MemDevice]:
    inner = MemDevice.of_size(1 << 20)
    return FaultDevice.from_spec(inner, spec), inner


def _eio(call: object, *args: object, **kwargs: object) -> bool:
    try:
        call(*args, **kwargs)  # type: ignore[operator]
    except DeviceError as exc:
        assert exc.errno == errno.EIO and "injected fault" in str(exc)
        return True
    return False


BLOCK = b"x" * 4096


def test_spec_write_short_barrier() -> None:
    dev, _ = _dev("write:3")
    assert [_eio(dev.block_write, i, 1, BLOCK) for i in range(5)] == [
        False, False, True, False, False]
    dev, inner = _dev("short:2")
    assert not _eio(dev.block_write, 0, 2, BLOCK * 2)
    assert not _eio(dev.block_write, 10, 1, BLOCK)  # one sector: cannot be cut in half
    assert _eio(dev.block_write, 20, 4, BLOCK * 4)
    assert inner.sectors.get(21) == BLOCK and 22 not in inner.sectors
    assert not _eio(dev.block_write, 30, 4, BLOCK * 4)
    dev, inner = _dev("barrier:2")
    assert not _eio(dev.block_write, 0, 1, BLOCK)
    assert not _eio(dev.block_write, 1, 1, BLOCK, durable=True)
    assert not _eio(dev.block_write, 2, 1, BLOCK)
    assert _eio(dev.block_write, 3, 1, BLOCK, durable=True)
    assert inner.sectors.get(3) == BLOCK and 3 not in inner.durable  # written, not flushed


def test_spec_sticky_is_per_direction() -> None:
    dev, _ = _dev("write:2,sticky")
    assert [_eio(dev.block_write, i, 1, BLOCK) for i in range(4)] == [False, True, True, True]
    assert not _eio(dev.block_read, 0, 1)  # reads still work on a device whose writes died
    dev, _ = _dev("read:1,sticky")
    assert _eio(dev.block_read, 0, 1) and _eio(dev.block_read, 1, 1)
    assert not _eio(dev.block_write, 0, 1, BLOCK)


def test_spec_armed_by_a_file(tmp_path: Path) -> None:
    arm = tmp_path / "arm"
    dev, _ = _dev(f"read:2,sticky,after={arm}")
    assert not any(_eio(dev.block_read, i, 1) for i in range(5))  # not armed yet
    arm.touch()
    assert [_eio(dev.block_read, i, 1) for i in range(4)] == [False, True, True, True]
    arm.unlink()  # disarmed: the device recovers
    assert not any(_eio(dev.block_read, i, 1) for i in range(5))
    arm.touch()  # armed again, counting from now
    assert [_eio(dev.block_read, i, 1) for i in range(3)] == [False, True, True]


@pytest.mark.parametrize("spec", ["", "read", "read:0", "nope:1", "write:1,often",
                                  "write:x"])
def test_malformed_spec(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_spec(spec)
