"""mkfs.nexfs, fsck.nexfs and ``nexfs info`` on NBD exports, exactly as on image files.

The tools run as commands (``python -m nexfs.tools.cli``, with this checkout first on the
path) against the test's own servers: nbdkit's memory and file plugins, qemu-nbd on a qcow2
image.  What only applies to files is refused in one line (``--size``), what a path check
would wrongly refuse is not (the export "does not exist" as a path).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mountutil import child_env
from nbdserver import NbdKit, QemuNbd


def tool(*argv: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "nexfs.tools.cli", *argv],
                            capture_output=True, text=True, timeout=120, env=child_env(),
                            check=False)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result


def info_rows(uri: str) -> dict[str, str]:
    result = tool("info", uri)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in result.stdout.splitlines())}


def test_mkfs_fsck_info_on_a_memory_export(tmp_path: Path) -> None:
    with NbdKit(tmp_path, "memory", ["64M"]) as srv:
        made = tool("mkfs", "--label", "over nbd", srv.uri)
        assert made.returncode == 0, made.stderr
        assert f"Creating NexFS volume on {srv.uri}: 0.06 GiB, 512-byte sectors" in made.stdout
        checked = tool("fsck", "-n", "-f", srv.uri)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        rows = info_rows(srv.uri)
        assert rows["Volume label"] == "over nbd"
        assert rows["Size"] == "64.0 MiB (16384 blocks of 4096 bytes)"
        assert rows["State"] == "clean"
        # No lock protects an export (BlockInfo.exclusive is False): MMP is on by default.
        assert rows["Multi-mount protection"].startswith("block "), rows
        # A second mkfs sees the volume through the wire and wants --force.
        again = tool("mkfs", srv.uri)
        assert again.returncode == 1
        assert "contains a NexFS volume labelled 'over nbd'" in again.stderr
        assert tool("mkfs", "--force", "--quiet", srv.uri).returncode == 0


def test_mkfs_refusals_on_exports(tmp_path: Path) -> None:
    with NbdKit(tmp_path, "memory", ["8M"], name="small") as small:
        result = tool("mkfs", small.uri)
        assert result.returncode == 1 and "smaller than 16M" in result.stderr, result.stderr
    with NbdKit(tmp_path, "memory", ["64M"]) as srv:
        result = tool("mkfs", "--size", "1G", srv.uri)
        assert result.returncode == 1
        assert result.stderr.strip() == (
            "mkfs.nexfs: --size applies to image files; an NBD export has the size its "
            "server gives it")
    data = tmp_path / "data.img"
    data.write_bytes(b"\x5a" * (32 << 20))
    with NbdKit(tmp_path, "file", [str(data)], name="data") as srv:
        result = tool("mkfs", srv.uri)
        assert result.returncode == 1 and "use --force" in result.stderr, result.stderr
    with NbdKit(tmp_path, "file", [str(data)], readonly=True, name="ro") as srv:
        result = tool("mkfs", "--force", srv.uri)
        assert result.returncode == 1 and "read-only" in result.stderr, result.stderr


@pytest.mark.parametrize("cmd", [["mkfs"], ["fsck", "-n"], ["info"]])
def test_unreachable_export_is_one_line(tmp_path: Path, cmd: list[str]) -> None:
    uri = f"nbd+unix:///?socket={tmp_path}/nobody.sock"
    result = tool(*cmd, uri)
    assert result.returncode in (1, 8), result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0] and "cannot connect" in lines[0], lines


def test_tools_on_qemu_nbd_qcow2(tmp_path: Path) -> None:
    qcow2 = QemuNbd.create(tmp_path / "vol.qcow2", "128M")
    with QemuNbd(tmp_path, qcow2) as srv:
        assert tool("mkfs", "--quiet", srv.uri).returncode == 0
        assert tool("fsck", "-n", "-f", srv.uri).returncode == 0
        assert info_rows(srv.uri)["Size"] == "128.0 MiB (32768 blocks of 4096 bytes)"
    # qcow2 allocates on write: a fresh volume is small on the host.
    assert qcow2.stat().st_size < 16 << 20
