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
from mountutil import child_env

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
        # child_env: the venv's mkfs.nexfs and mount.nexfs the bench runs must import this
        # checkout, not the one the venv was installed from.
        cwd=ROOT, capture_output=True, text=True, timeout=420, env=child_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((out / "fsbench-quick.json").read_text())
    assert {"config", "environment", "units", "samples", "phases", "summary", "peak_rss_mib",
            "nexfs_peak_rss_mib", "mount_1tib_s"} <= set(result)
    assert result["config"]["mode"] == "quick"
    assert set(result["samples"]) == {"nexfs", "nbd", "fuse2fs", "ext4", "raw", "ceiling",
                                      "ceiling-posix", "ceiling-dev"}
    for workload in ("seq-write-1m", "seq-read-1m", "seq-read-1m-direct",
                     "randread-4k-qd1-direct", "randwrite-4k-qd1-direct", "tar-extract",
                     "find-stat", "rm-rf", "create", "lookup-random"):
        for system in ("nexfs", "nbd", "fuse2fs", "ext4"):
            assert result["samples"][system][workload][0] > 0, (system, workload)
        assert {"fuse2fs", "ext4"} <= set(result["summary"]["ratios"][workload]), workload
    # The reference systems run every fio job the efficiency targets need, in the same run.
    for job in ("randread-4k-qd1-direct", "randread-4k-4jobs-direct",
                "randwrite-4k-qd1-direct", "randwrite-4k-4jobs-direct"):
        for system in ("nexfs", "raw", "ceiling", "ceiling-posix", "ceiling-dev"):
            assert result["samples"][system][job][0] > 0, (system, job)
        assert {"raw", "ceiling", "ceiling-posix", "ceiling-dev"} <= set(
            result["summary"]["ratios"][job]), job
    # The hot variant: read right after the write, on every system but the raw image.
    for system in ("nexfs", "fuse2fs", "ext4", "ceiling", "ceiling-posix", "ceiling-dev"):
        assert result["samples"][system]["randread-4k-qd1-direct-hot"][0] > 0, system
    for system in ("ceiling", "ceiling-posix", "ceiling-dev"):
        assert "tar-extract" not in result["samples"][system]
    # What else happened in each phase: the disk's traffic, NexFS's own data-cache hits.
    seen = result["phases"]["nexfs"]["randread-4k-qd1-direct"][0]
    assert {"disk_read_mib", "disk_written_mib", "dirty_mib_at_start",
            "data_cache_hit_rate", "valve_reads"} <= set(seen), seen
    assert "data_cache_hit_rate" not in result["phases"]["raw"]["randread-4k-qd1-direct"][0]
    assert result["nexfs_peak_rss_mib"] > 0 and result["mount_1tib_s"] > 0
    assert len(result["summary"]["targets"]) == 11
    efficiency = {(e["workload"], e["versus"]): e for e in result["summary"]["efficiency"]}
    assert set(efficiency) == {
        ("randread-4k-qd1-direct", "serial ideal 1/(1/ceiling+1/raw)"),
        ("randread-4k-qd1-direct-hot", "serial ideal 1/(1/ceiling+1/raw)"),
        ("randread-4k-4jobs-direct", "min(ceiling, raw), 4 jobs"),
        ("randread-4k-4jobs-direct", "NexFS's own QD1"),
        ("randwrite-4k-qd1-direct", "ceiling"),
        ("randwrite-4k-4jobs-direct", "NexFS's own QD1"),
    }
    for e in efficiency.values():
        assert e["ideal"] > 0 and e["ratio"] > 0 and e["met"] in (True, False), e
    # NexFS against the reference variants, and their own efficiency against the targets.
    references = {r["workload"]: r for r in result["summary"]["references"]}
    assert set(references) == {"randread-4k-qd1-direct", "randread-4k-qd1-direct-hot",
                               "randread-4k-4jobs-direct", "randwrite-4k-qd1-direct",
                               "randwrite-4k-4jobs-direct"}
    for r in references.values():
        for system in ("ceiling", "ceiling-posix", "ceiling-dev", "raw"):
            assert r["references"][system] > 0 and r["nexfs_over"][system] > 0, (r, system)
    own = {(e["system"], e["workload"], e["versus"])
           for e in result["summary"]["reference_efficiency"]}
    assert ("ceiling-dev", "randread-4k-4jobs-direct", "min(ceiling, raw), 4 jobs") in own
    assert ("ceiling-dev", "randread-4k-qd1-direct", "serial ideal 1/(1/ceiling+1/raw)") in own
    assert ("ceiling-posix", "randwrite-4k-qd1-direct", "ceiling") in own
    # ceiling-posix reads no device: no row of it against a device-bound ideal.
    assert ("ceiling-posix", "randread-4k-qd1-direct",
            "serial ideal 1/(1/ceiling+1/raw)") not in own
    for e in result["summary"]["reference_efficiency"]:
        assert e["ideal"] > 0 and e["ratio"] > 0 and e["met"] in (True, False), e
    serial = efficiency[("randread-4k-qd1-direct", "serial ideal 1/(1/ceiling+1/raw)")]
    medians = result["summary"]["medians"]
    ceiling = medians["ceiling"]["randread-4k-qd1-direct"]
    raw = medians["raw"]["randread-4k-qd1-direct"]
    assert serial["ideal"] == pytest.approx(1 / (1 / ceiling + 1 / raw), rel=1e-3)

    table = (out / "fsbench-quick.md").read_text()
    assert "| seq-write-1m | MiB/s |" in table and "NexFS/fuse2fs" in table
    assert (out / "fsbench-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| randread-4k-qd1-direct |" in proc.stdout
    assert "| randread-4k-qd1-direct vs serial ideal 1/(1/ceiling+1/raw) |" in table
    assert "| NexFS vs the references (same run) |" in table
    assert "| ceiling-dev: randread-4k-4jobs-direct vs min(ceiling, raw), 4 jobs |" in table

    # Everything was torn down: no image, no mount, no loop device left behind.
    assert list(work.iterdir()) == []
    assert str(work) not in _mounts()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(work) not in loops
