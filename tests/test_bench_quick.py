"""``nexfs bench --quick`` still runs end to end and writes every output.

No performance assertion: figures from a shared CI machine say nothing.  This keeps the
benchmark (bench/fsbench, bench/fio) from rotting.  It needs what the benchmark needs
(root, /dev/fuse, fuse2fs, fio, loop devices; CI has them) and matplotlib, which
``make test`` installs (the ``bench`` extra): without it this test fails, it never skips.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib  # noqa: F401  (a missing chart library must fail the run, not skip it)
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.mount]


def _mounts() -> str:
    return Path("/proc/self/mounts").read_text()


def test_quick_bench_writes_json_markdown_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "results"
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "nexfs.tools.cli", "bench", "--quick", "--out", str(out),
         "--workdir", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((out / "fsbench-quick.json").read_text())
    assert {"config", "environment", "units", "samples", "summary", "peak_rss_mib",
            "nexfs_peak_rss_mib", "mount_1tib_s"} <= set(result)
    assert result["config"]["mode"] == "quick"
    assert set(result["samples"]) == {"nexfs", "fuse2fs", "ext4", "raw"}
    for workload in ("seq-write-1m", "seq-read-1m", "seq-read-1m-direct",
                     "randread-4k-qd1-direct", "randwrite-4k-qd1-direct", "tar-extract",
                     "find-stat", "rm-rf", "create", "lookup-random"):
        for system in ("nexfs", "fuse2fs", "ext4"):
            assert result["samples"][system][workload][0] > 0, (system, workload)
        assert {"fuse2fs", "ext4"} <= set(result["summary"]["ratios"][workload]), workload
    assert result["samples"]["raw"]["randread-4k-qd1-direct"][0] > 0
    assert result["nexfs_peak_rss_mib"] > 0 and result["mount_1tib_s"] > 0
    assert len(result["summary"]["targets"]) == 10

    table = (out / "fsbench-quick.md").read_text()
    assert "| seq-write-1m | MiB/s |" in table and "NexFS/fuse2fs" in table
    assert (out / "fsbench-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| randread-4k-qd1-direct |" in proc.stdout

    # Everything was torn down: no image, no mount, no loop device left behind.
    assert list(work.iterdir()) == []
    assert str(work) not in _mounts()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(work) not in loops
