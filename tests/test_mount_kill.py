"""kill -9 of the mount in the middle of real workloads: nothing fsync'd may be lost.

Each trial mounts the image, starts workloads (tests/mountstress.py) that record every item
only after the fsync that made it durable returned, waits until a given number of items is
recorded (plus a short extra delay, so the kill lands at different moments of the work),
SIGKILLs the daemon and detaches the dead mount (``fusermount3 -uz``).  Then:

1. ``fsck.nexfs -n -f`` on the image as the kill left it (not replayed: the superblock still
   says DIRTY) must exit 0.  fsck -n replays the journal into memory only and checks the
   result, so this asserts that the on-disk state is "clean once the journal is applied":
   the only thing a crash may leave to do is the replay.
2. The remount replays the journal; every item recorded by now (in this trial and all earlier
   ones on the same image) must be there with the right content.
3. A clean unmount of the remounted volume, then ``fsck.nexfs -n -f`` must exit 0.

The trials of one workload run one after another on the same image, so later trials also
recover from a volume that has been through earlier crashes.  The plan (records before the
kill, extra delay) is fixed, so a failure names its trial and can be rerun.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mountstress import (
    check_renamer,
    check_tar,
    check_writer,
    count_records,
    make_tar_source,
    read_records,
    tree_manifest,
    workload_command,
)
from mountutil import (  # noqa: F401
    Mount,
    Mounter,
    child_env,
    fsck,
    mounter_fixture,
    volume_is_clean,
    wait_until,
)

pytestmark = pytest.mark.mount

IMAGE_SIZE = "128M"

# Per workload: (seed, recorded items before the kill, extra delay in seconds).  The item
# count is of the workload's own record (fio: the writer running beside it).
PLAN: dict[str, list[tuple[int, int, float]]] = {
    "writer": [(11, 1, 0.0), (12, 4, 0.03), (13, 12, 0.0), (14, 30, 0.11), (15, 60, 0.05),
               (16, 90, 0.2)],
    "rename": [(21, 1, 0.0), (22, 5, 0.02), (23, 17, 0.07), (24, 40, 0.0), (25, 80, 0.13),
               (26, 120, 0.04)],
    "fio": [(31, 1, 0.0), (32, 3, 0.25), (33, 8, 0.05), (34, 15, 0.4), (35, 25, 0.1),
            (36, 40, 0.0)],
    "tar": [(41, 0, 0.3), (42, 0, 0.9), (43, 1, 0.0), (44, 1, 0.45), (45, 2, 0.2),
            (46, 0, 1.4)],
}

# NEXFS_KILL_EXTRA=N adds N more trials per workload (a soak run; CI runs the plan above),
# drawn from a fixed seed so they can be rerun too.
for _kind, _trials in PLAN.items():
    _rng = random.Random(_kind)
    for _i in range(int(os.environ.get("NEXFS_KILL_EXTRA", "0"))):
        _trials.append((1000 + 100 * len(_kind) + _i,
                        _rng.randrange(3) if _kind == "tar" else _rng.randrange(1, 150),
                        round(_rng.uniform(0, 1.5 if _kind == "tar" else 0.3), 2)))

TAR_FILES = 150
KEEP_TRIALS = 3


@dataclass
class Workload:
    """One workload process of a trial and how to check what it recorded."""

    kind: str
    directory: Path
    record: Path
    seed: int
    proc: subprocess.Popen[bytes] | None = None
    stderr: Path | None = None
    extra: list[str] = field(default_factory=list)

    def start(self, tmp_path: Path) -> None:
        self.stderr = tmp_path / f"{self.record.stem}.err"
        self.directory.mkdir()  # on the mount, now known to be up (see mountstress.py)
        if self.kind == "fio":
            cmd = ["fio", "--name=kill", f"--directory={self.directory}", "--rw=randwrite",
                   "--bs=4k", "--size=16M", "--fsync=32", "--ioengine=psync",
                   "--time_based", "--runtime=60", f"--randseed={self.seed}",
                   "--output-format=terse", "--output=/dev/null"]
        else:
            cmd = workload_command(self.kind, "--dir", str(self.directory), "--record",
                                   str(self.record), "--seed", str(self.seed),
                                   "--seconds", "30", *self.extra)
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         cwd=tmp_path, env=child_env())

    def wait(self) -> int | None:
        """The exit status, or None if it had to be killed (it did not stop by itself)."""
        if self.proc is None:
            return 0
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def problems(self, mnt: Path, tar_manifest: dict[str, tuple[str, int, str]]) -> list[str]:
        where = mnt / self.directory.name
        records = read_records(self.record)
        if self.kind == "writer":
            return check_writer(where, records, self.seed)
        if self.kind == "renamer":
            return check_renamer(where, records, self.seed)
        if self.kind == "tarloop":
            return check_tar(where, records, tar_manifest)
        # fio: nothing fsync'd can be named, but the whole file must read back without EIO.
        for path in where.iterdir():
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
        return []


def wait_started(w: Workload, m: Mount, what: str) -> None:
    """Poll until ``w`` has created something in its directory on the mount."""
    def started() -> bool:
        assert w.proc is not None
        if w.proc.poll() is not None:
            err = w.stderr.read_text() if w.stderr else ""
            pytest.fail(f"{what}: {w.kind} ended before it started ({w.proc.returncode}): "
                        f"{err}")
        return any(w.directory.iterdir())

    wait_until(started, 60, f"{what}: {w.kind} to start", m.proc, m.log)


def wait_for_records(clock: Workload, count: int, m: Mount, what: str) -> None:
    """Poll until ``clock`` has recorded ``count`` items (the moment to kill)."""
    def reached() -> bool:
        assert clock.proc is not None
        if clock.proc.poll() is not None:
            err = clock.stderr.read_text() if clock.stderr else ""
            pytest.fail(f"{what}: {clock.kind} ended early ({clock.proc.returncode}): {err}")
        return count_records(clock.record) >= count

    wait_until(reached, 60, f"{what}: {count} records", m.proc, m.log)


@pytest.fixture(scope="module")
def tar_archive(tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[Path, dict[str, tuple[str, int, str]]]:
    base = tmp_path_factory.mktemp("tar")
    src = make_tar_source(base / "src", TAR_FILES)
    archive = base / "src.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(src), "."], check=True)
    return archive, tree_manifest(src)


def trial_workloads(kind: str, trial: int, seed: int, mnt: Path, tmp_path: Path,
                    archive: Path) -> tuple[list[Workload], Workload]:
    """The workloads of one trial, and the one whose record count times the kill."""
    def workload(what: str, name: str, seed: int, *extra: str) -> Workload:
        return Workload(what, mnt / f"{name}{trial}", tmp_path / f"{name}{trial}.rec", seed,
                        extra=list(extra))

    writer = workload("writer", "w", seed)
    if kind == "writer":
        others = [workload("writer", "v", seed + 1000), workload("writer", "u", seed + 2000)]
        return [writer, *others], writer
    if kind == "rename":
        renamer = workload("renamer", "r", seed, "--targets", "5")
        return [renamer, writer], renamer
    if kind == "fio":
        return [workload("fio", "f", seed), writer], writer
    tar = workload("tarloop", "x", seed, "--archive", str(archive))
    return [tar, writer], tar


@pytest.mark.parametrize("kind", sorted(PLAN))
def test_kill_9_loses_nothing_fsynced(kind: str, mounter: Mounter, tmp_path: Path,
                                      tar_archive: tuple[Path, dict[str, tuple[str, int, str]]]
                                      ) -> None:
    archive, manifest = tar_archive
    image = mounter.image(size=IMAGE_SIZE)
    mnt = mounter.mountpoint()
    # The workloads of earlier trials, checked again every time; the data of all but the
    # last KEEP_TRIALS is deleted after the check (so the image does not fill up, and later
    # crashes also hit freshly freed space).
    done: list[Workload] = []
    timings = []
    for trial, (seed, kill_after, delay) in enumerate(PLAN[kind]):
        started = time.monotonic()
        m = mounter.mount(image, mnt)
        workloads, clock = trial_workloads(kind, trial, seed, mnt, tmp_path, archive)
        try:
            for w in workloads:
                w.start(tmp_path)

            # Every workload is at work on the mount before the kill can come: one that
            # started only after it would run on the empty mount point underneath (fio
            # even creates its directory there).
            for w in workloads:
                wait_started(w, m, f"trial {trial}")
            wait_for_records(clock, kill_after, m, f"trial {trial}")
            time.sleep(delay)  # where the kill lands, deliberately: not a synchronisation
        finally:
            m.kill()  # SIGKILL, then fusermount3 -uz of the dead mount
            codes = {w.directory.name: (w.kind, w.wait()) for w in workloads}
        # 3: a workload stopped by an OSError (ENOTCONN, ECONNABORTED); fio says 1.  None:
        # it did not stop within 30 s of the kill.
        bad = {name: code for name, (what, code) in codes.items()
               if code not in ((0, 1) if what == "fio" else (0, 3))}
        assert not bad, (f"trial {trial}: workloads failed: {bad}\n" + "\n".join(
            w.stderr.read_text() for w in workloads if w.stderr))
        assert not m.up
        assert not volume_is_clean(image), "the killed mount left a clean volume?"

        code, output = fsck(image, "-n", "-f")
        assert code == 0, f"trial {trial}: fsck -n of the un-replayed image: {output}"

        done += workloads
        again = mounter.mount(image, mnt)
        replay = re.search(r"journal replay: (\d+) transaction", again.log_text())
        assert "journal recovered" in again.log_text(), again.log_text()
        problems = [p for w in done for p in w.problems(mnt, manifest)]
        assert not problems, f"trial {trial} (seed {seed}):\n" + "\n".join(problems[:20])
        while len(done) > KEEP_TRIALS * len(workloads):
            shutil.rmtree(mnt / done.pop(0).directory.name)
        assert again.unmount() == 0
        code, output = fsck(image)
        assert code == 0, f"trial {trial}: fsck -n -f after the clean unmount: {output}"
        assert volume_is_clean(image)
        recorded = sum(count_records(w.record) for w in workloads)
        timings.append((trial, recorded, int(replay.group(1)) if replay else 0,
                        round(time.monotonic() - started, 2)))
    print(f"{kind}: (trial, items recorded, transactions replayed, seconds): {timings}")
