"""What ``nexfs bench``'s fio phases really do: no phase replays the random offsets of
another, and a hot phase reads the file from where the write left it.

The first defect: every random job file says ``randrepeat=1``, so each phase read the same
offsets in the same order.  A phase then re-read what the phase before it had
left in any cache that ``drop_caches`` does not reach -- NexFS's own data cache -- and
NexFS's "cold" random reads came out faster than its hot ones (docs/BENCHMARKS.md, "The
hot-read anomaly").  The second: fio drops the file's cached pages before every job
(``invalidate=1``, its default), so a "hot" buffered read was never hot on a FUSE mount.

The first test drives the runner itself (``run_system``) over a plain directory, for the random
phases of both presets in their order, and records through fio's own ``write_iolog`` the
offsets every job of every phase issued (a think time keeps each job to a few I/Os).  Any
two phases -- and any two jobs of one phase -- must start with different offsets.  The
second runs the hot phases after the sequential write on a plain directory and counts what
fio read from the disk (``read_bytes`` of ``/proc/self/io``, where the kernel adds the I/O
of reaped children): pages the write left in the cache cost none.  Needs fio, nothing else
(no root, no mount).
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


def _read_bytes() -> int:
    """Bytes this process and its reaped children fetched from storage (page-cache hits
    are not counted)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no read_bytes in /proc/self/io")


@pytest.mark.skipif(shutil.which("fio") is None and not os.environ.get("CI"),
                    reason="fio is not installed (CI has it: this never skips there)")
def test_hot_phases_read_what_the_write_left_in_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = 32 * 1024 * 1024
    read: dict[str, int] = {}
    real_run = subprocess.run

    def measured(cmd: list[str], **kw: Any) -> Any:
        before = _read_bytes()
        proc = real_run(cmd, **kw)
        if cmd[0] == "fio":
            read[f"phase {len(read)}"] = _read_bytes() - before
        return proc

    monkeypatch.setattr(workloads.subprocess, "run", measured)
    monkeypatch.setattr(runner, "drop_caches", lambda: None)
    # The full preset's first two phases: the write that lays the file down (buffered,
    # end_fsync: its pages stay cached, clean) and the hot sequential read.  (Not the hot
    # buffered random read: there fio loses cached pages even with invalidate=0 -- one run
    # by hand kept 3,035 of a 32 MiB file's 8,192 -- which is not the bench's doing.)
    phases = runner.PRESETS["full"]["phases"][:2]
    assert [(p.job, p.hot, p.direct) for p in phases] == [("seq-write-1m", False, False),
                                                           ("seq-read-1m", True, False)]
    config = {"phases": phases, "file": size, "runtime": 1}
    runner.run_system(_Dir(tmp_path, 0), config, tmp_path / "unused.tar", runner.Recorder(),
                      "[t]")
    assert len(read) == len(phases)
    for phase, got in zip(phases[1:], list(read.values())[1:], strict=True):
        assert got < size // 8, f"hot phase {phase.name} read {got} bytes from the disk"
