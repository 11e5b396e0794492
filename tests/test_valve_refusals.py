"""Every refusal of the Block Valve: capability checks, range and length checks, and
devices it will not open.  Each refused operation must leave the device untouched."""

from __future__ import annotations

import copy
import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from valve_fixtures import (
    MiB,
    image_fixture,
    loop_device,
    make_image,
    open_fds,
    pattern,
    ramfs,
    valve_fixture,
)

import valve as valve_pkg
from valve import (
    Capability,
    CapabilityError,
    DeviceBusyError,
    DeviceError,
    DirectIONotSupported,
    RangeError,
    Rights,
    Valve,
)

RW = Rights.READ | Rights.WRITE
ROOT = Path(__file__).resolve().parent.parent


img = image_fixture("refuse.img", 1 * MiB)
valve = valve_fixture()


@pytest.fixture
def cap(valve: Valve) -> Capability:
    c = valve.grant(RW)
    ss = c.block_info().sector_size
    c.block_write(0, 4, pattern(0, 4 * ss))  # known content: refusals must not change it
    return c


def assert_untouched(valve: Valve, cap: Capability, writes: int = 1) -> None:
    ss = cap.block_info().sector_size
    assert valve.stats.writes == writes
    assert bytes(cap.block_read(0, 4)) == pattern(0, 4 * ss)


# -- capabilities ---------------------------------------------------------------------


def test_no_capability_no_io(valve: Valve) -> None:
    for op in ("block_read", "block_write", "block_info", "alloc_buffer"):
        assert not hasattr(valve, op)  # the valve itself offers no I/O
    with pytest.raises(CapabilityError):
        Capability.block_read(valve, 0, 1)  # type: ignore[call-overload]
    with pytest.raises(CapabilityError):
        Capability.block_write(None, 0, 1, b"")  # type: ignore[call-overload]


def test_wrong_right(valve: Valve, cap: Capability) -> None:
    ss = cap.block_info().sector_size
    reader = valve.grant(Rights.READ)
    writer = valve.grant(Rights.WRITE)
    with pytest.raises(CapabilityError, match=r"lacks Rights\.WRITE"):
        reader.block_write(0, 1, bytes(ss))
    with pytest.raises(CapabilityError, match=r"lacks Rights\.READ"):
        writer.block_read(0, 1)
    with pytest.raises(CapabilityError):
        writer.block_info()
    assert valve.stats.denials == 3
    assert_untouched(valve, cap)


def test_read_only_valve_grants_no_write(img: Path) -> None:
    with Valve.open(img, read_only=True) as v:
        with pytest.raises(CapabilityError, match="read-only"):
            v.grant(RW)
        assert v.stats.denials == 1
        assert v.grant(Rights.READ).rights == Rights.READ


def test_revoked(valve: Valve, cap: Capability) -> None:
    ss = cap.block_info().sector_size
    child = cap.restrict(RW)
    grandchild = child.restrict(Rights.READ, (0, 2))
    sibling = valve.grant(Rights.READ)
    child.revoke()
    for c in (child, grandchild):
        assert c.rights == Rights.NONE
        with pytest.raises(CapabilityError, match="revoked"):
            c.block_read(0, 1)
        with pytest.raises(CapabilityError):
            c.block_info()
        with pytest.raises(CapabilityError):
            c.restrict(Rights.READ)
        with pytest.raises(CapabilityError):
            c.alloc_buffer(4096)
    with pytest.raises(CapabilityError):
        child.block_write(0, 1, bytes(ss))
    child.revoke()  # idempotent
    assert bytes(sibling.block_read(0, 1)) == pattern(0, ss)  # others are unaffected
    assert bytes(cap.block_read(0, 1)) == pattern(0, ss)  # and so is the parent
    assert_untouched(valve, cap)


def test_closing_the_valve_revokes_everything(img: Path) -> None:
    v = Valve.open(img)
    caps = [v.grant(RW), v.grant(Rights.READ)]
    caps.append(caps[0].restrict(Rights.READ, (0, 8)))
    v.close()
    for c in caps:
        with pytest.raises(CapabilityError):
            c.block_read(0, 1)
    with pytest.raises(CapabilityError):
        v.grant(Rights.READ)
    v.close()  # idempotent


def test_restricted_range(valve: Valve, cap: Capability) -> None:
    ss = cap.block_info().sector_size
    window = cap.restrict(RW, (100, 108))
    assert window.lba_range == (100, 108)
    window.block_write(100, 8, bytes(8 * ss))  # inside: fine
    for lba, count in ((99, 1), (107, 2), (0, 1), (108, 1)):
        with pytest.raises(CapabilityError, match="outside"):
            window.block_read(lba, count)
        with pytest.raises(CapabilityError, match="outside"):
            window.block_write(lba, count, bytes(count * ss))
    # Attenuation only narrows.
    with pytest.raises(CapabilityError, match="wider"):
        window.restrict(Rights.READ, (99, 104))
    with pytest.raises(CapabilityError, match="cannot add"):
        window.restrict(Rights.READ).restrict(RW)
    assert window.restrict(Rights.READ, (102, 104)).lba_range == (102, 104)
    assert valve.stats.denials == 10
    assert_untouched(valve, cap, writes=2)


def test_forged_capabilities(valve: Valve, cap: Capability) -> None:
    token = cap._token
    with pytest.raises(CapabilityError):
        Capability(object(), valve, token)
    with pytest.raises(CapabilityError):
        copy.copy(cap)
    with pytest.raises(CapabilityError):
        copy.deepcopy(cap)
    with pytest.raises(CapabilityError):
        pickle.dumps(cap)
    with pytest.raises(CapabilityError):
        cap._token = token + 1
    with pytest.raises(TypeError):
        type("Wider", (Capability,), {})

    class Smuggler:  # a pickle stream that rebuilds a capability from its parts
        def __init__(self, state: object) -> None:
            self.state = state

        def __reduce__(self) -> tuple[object, ...]:
            return (object.__new__, (Capability,), self.state)

    # (A live valve cannot be pickled at all, so a stream can only carry the token.)
    with pytest.raises(TypeError):
        pickle.dumps(Smuggler({"_valve": valve}))
    with pytest.raises(CapabilityError):
        pickle.loads(pickle.dumps(Smuggler({"_token": token})))
    with pytest.raises(CapabilityError):
        pickle.loads(pickle.dumps(Smuggler((None, {"_token": token}))))
    hollow = pickle.loads(pickle.dumps(Smuggler(None)))
    assert type(hollow) is Capability
    with pytest.raises(CapabilityError):
        hollow.block_read(0, 1)

    # Bypassing every constructor still yields nothing the valve recognises.
    fake = object.__new__(Capability)
    object.__setattr__(fake, "_valve", valve)
    object.__setattr__(fake, "_token", token)
    denials = valve.stats.denials
    with pytest.raises(CapabilityError, match="forged"):
        fake.block_write(0, 1, bytes(512))
    assert valve.stats.denials == denials + 1
    with pytest.raises(CapabilityError):
        object.__new__(Capability).block_read(0, 1)  # not even initialised
    # Neither does widening a real capability's slots.
    reader = cap.restrict(Rights.READ)
    object.__setattr__(reader, "_token", token)
    with pytest.raises(CapabilityError):
        reader.block_write(0, 1, bytes(512))
    assert_untouched(valve, cap)


def test_valve_cannot_be_built_or_pickled(valve: Valve) -> None:
    with pytest.raises(TypeError):
        Valve(object(), None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pickle.dumps(valve)


# -- range, alignment and length ------------------------------------------------------


@pytest.mark.parametrize(
    "from_end,offset,count",
    [(False, -1, 1), (False, 0, 0), (False, 0, -2), (True, -1, 2), (True, 0, 1),
     (False, 10**12, 1)],
)
def test_out_of_range(
    valve: Valve, cap: Capability, from_end: bool, offset: int, count: int
) -> None:
    ss, total = cap.block_info()[:2]
    lba = total + offset if from_end else offset
    with pytest.raises(RangeError) as info:
        cap.block_read(lba, count)
    assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)
    assert info.value.errno == errno.EINVAL
    assert "sectors" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(RangeError):
        cap.block_write(lba, count, bytes(max(count, 0) * ss))
    assert valve.stats.denials == 0  # argument errors are not capability denials
    assert_untouched(valve, cap)


def test_wrong_length_and_unaligned(valve: Valve, cap: Capability) -> None:
    ss = cap.block_info().sector_size
    for data in (bytes(ss - 1), bytes(ss + 1), bytes(2 * ss), b"", [bytes(ss), b"x"], []):
        with pytest.raises(RangeError, match="bytes"):
            cap.block_write(0, 1, data)
    with pytest.raises(RangeError, match="into="):
        cap.block_read(0, 2, into=cap.alloc_buffer(ss))
    with pytest.raises(TypeError):
        cap.block_read(0, 1, into=bytes(ss))  # read-only target
    with pytest.raises(ValueError):
        cap.alloc_buffer(0)
    assert_untouched(valve, cap)


@pytest.mark.parametrize("sector_size", [513, 768, 8192 * 1024])
def test_sector_size_must_be_a_power_of_two_multiple(tmp_path: Path, sector_size: int) -> None:
    other = make_image(tmp_path / "other.img", 1 * MiB)
    with pytest.raises(RangeError, match="sector size"):
        Valve.open(other, sector_size=sector_size)
    assert open_fds(other) == []


# -- devices it will not open ---------------------------------------------------------


def test_second_exclusive_open_of_image(img: Path) -> None:
    with Valve.open(img):
        with pytest.raises(DeviceBusyError) as info:
            Valve.open(img)
        assert str(info.value) == f"{img}: in use by another process (locked)"
        assert info.value.errno == errno.EWOULDBLOCK and info.value.filename == str(img)
        with pytest.raises(DeviceBusyError, match="locked for writing"):
            Valve.open(img, read_only=True)
    with (
        Valve.open(img, read_only=True),
        Valve.open(img, read_only=True),  # readers share
        pytest.raises(DeviceBusyError, match="in use"),
    ):
        Valve.open(img)
    assert open_fds(img) == []  # refused opens leak no descriptor


def test_second_open_from_another_process(img: Path) -> None:
    code = (
        "import sys\nfrom valve import Valve, DeviceBusyError\n"
        "try:\n    Valve.open(sys.argv[1])\nexcept DeviceBusyError as e:\n    print(e)\n"
    )
    with Valve.open(img):
        out = subprocess.run([sys.executable, "-c", code, str(img)], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{img}: in use by another process (locked)"


def test_second_exclusive_open_of_block_device(img: Path) -> None:
    with loop_device(img) as loop, Valve.open(loop):
        with pytest.raises(DeviceBusyError, match="in use") as info:
            Valve.open(loop)
        assert info.value.errno == errno.EBUSY
        with pytest.raises(DeviceBusyError):
            Valve.open(loop, read_only=True)


def test_refuses_target_without_o_direct_on_ramfs(tmp_path: Path) -> None:
    """ramfs has no direct I/O (tmpfs has had it since Linux 6.6, so it cannot serve)."""
    with ramfs(tmp_path / "ram") as mnt:
        target = make_image(mnt / "disk.img", 1 * MiB)
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(DirectIONotSupported) as info:
            Valve.open(target)
        assert info.value.errno == errno.EINVAL
        assert str(info.value).startswith(f"{target}: does not support O_DIRECT")
        assert isinstance(info.value, DeviceError)
        assert len(os.listdir("/proc/self/fd")) == before and open_fds(target) == []


def test_refuses_target_without_o_direct_on_procfs() -> None:
    with pytest.raises(DirectIONotSupported, match="/proc/sys/kernel/hostname: does not"):
        Valve.open("/proc/sys/kernel/hostname", read_only=True)


@pytest.mark.parametrize(
    "target,code",
    [("missing.img", errno.ENOENT), (".", errno.EISDIR), ("/dev/null", errno.ENOTBLK)],
)
def test_refuses_what_is_not_a_device(tmp_path: Path, target: str, code: int) -> None:
    path = tmp_path / target if not target.startswith("/") else Path(target)
    with pytest.raises(DeviceError) as info:
        Valve.open(path)
    assert info.value.errno == code
    assert str(info.value).startswith(f"{path}: ")


def test_public_names() -> None:
    for name in ("Valve", "Rights", "CapabilityError", "DeviceError", "DeviceBusyError",
                 "DirectIONotSupported", "RangeError", "BlockDevice", "BlockInfo",
                 "ValveStats", "AlignedBuffer", "Capability"):
        assert name in valve_pkg.__all__
    assert issubclass(CapabilityError, PermissionError)
    assert issubclass(DeviceBusyError, DeviceError) and issubclass(DeviceError, OSError)
