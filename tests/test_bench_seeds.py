"""No fio phase of ``nexfs bench`` replays the random offsets of another.

The defect this guards against: every random job file says ``randrepeat=1``, so each phase
read the same offsets in the same order.  A phase then re-read what the phase before it had
left in any cache that ``drop_caches`` does not reach -- NexFS's own data cache -- and
NexFS's "cold" random reads came out faster than its hot ones (docs/BENCHMARKS.md, "The
hot-read anomaly").

The test drives the runner itself (``run_system``) over a plain directory, for the random
phases of both presets in their order, and records through fio's own ``write_iolog`` the
offsets every job of every phase issued (a think time keeps each job to a few I/Os).  Any
two phases -- and any two jobs of one phase -- must start with different offsets.  Needs
fio, nothing else (no root, no mount).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from fsbench import runner, workloads
from fsbench.systems import Mounted, System

FIRST = 6
"""Offsets compared per job: six 4 KiB offsets in a 64 MiB file agree by chance with
probability 16384**-6."""


class _Dir(System):
    """A stand-in system: fio's file in a plain directory, fio jobs only."""

    name = "dir"

    @contextlib.contextmanager
    def prepared(self) -> Iterator[Mounted]:
        yield Mounted("dir", self.workdir, None, fio_only=True)


def _offsets(log: Path) -> tuple[tuple[int, ...], ...]:
    """Per job of one fio run, its first offsets (a log has one section per job)."""
    jobs: list[list[int]] = []
    for line in log.read_text().splitlines():
        if line.startswith("fio version"):
            jobs.append([])
            continue
        fields = line.split()
        if len(fields) == 5 and fields[2] in ("read", "write"):
            jobs[-1].append(int(fields[3]))
    return tuple(tuple(j[:FIRST]) for j in jobs)


@pytest.mark.skipif(shutil.which("fio") is None and not os.environ.get("CI"),
                    reason="fio is not installed (CI has it: this never skips there)")
@pytest.mark.parametrize("preset", ["quick", "full"])
def test_no_phase_replays_another_phases_offsets(tmp_path: Path, preset: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / workloads.FIO_FILE).write_bytes(b"")
    logs: list[tuple[str, Path]] = []
    real_run = subprocess.run

    def fio_with_log(cmd: list[str], **kw: Any) -> Any:
        if cmd[0] != "fio":
            return real_run(cmd, **kw)
        log = tmp_path / f"io-{len(logs)}.log"
        logs.append((kw.get("input") or Path(cmd[-1]).read_text(), log))
        # A few I/Os per job (100 ms apart in a 1 s job), each logged with its offset.
        return real_run([cmd[0], f"--write_iolog={log}", "--thinktime=100000", *cmd[1:]],
                        **kw)

    monkeypatch.setattr(workloads.subprocess, "run", fio_with_log)
    monkeypatch.setattr(runner, "drop_caches", lambda: None)
    with open(data / workloads.FIO_FILE, "wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: fio reads it without laying it out
    phases = tuple(p for p in runner.PRESETS[preset]["phases"]
                   if p.job.startswith("rand"))
    config = {"phases": phases, "file": 64 * 1024 * 1024, "runtime": 1}
    runner.run_system(_Dir(data, 0), config, tmp_path / "unused.tar", runner.Recorder(), "[t]")

    seen: dict[tuple[int, ...], str] = {}
    assert len(logs) == len(phases)
    for phase, (job, log) in zip(phases, logs, strict=True):
        assert "rw=rand" in job
        jobs = _offsets(log)
        assert jobs and all(len(j) >= 3 for j in jobs), (phase.name, jobs)
        for offsets in jobs:
            assert offsets not in seen, (
                f"{phase.name} replays the offsets of {seen.get(offsets)}: {offsets}")
            seen[offsets] = phase.name
