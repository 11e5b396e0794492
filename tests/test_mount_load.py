"""Load through the mount: eight processes mixing every namespace and data operation in one
shared tree, with fio verify jobs alongside, for a bounded time.

The mixers (tests/mountstress.py) publish files only complete (private temp file, then
rename), so every shared file carries its own length and CRC and any reader can check it;
each also rewrites a private file and checks it against a model of its content.  Races
between them (ENOENT, EEXIST, ENOTEMPTY, ENODATA) are expected and counted; any other error
or a failed check fails the test.  Meanwhile the daemon's resident memory is sampled.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from mountstress import RssSampler, check_sealed, vm_rss_kib, workload_command
from mountutil import (  # noqa: F401
    Mount,
    Mounter,
    child_env,
    fsck,
    mounter_fixture,
)

pytestmark = pytest.mark.mount

LOAD_SECONDS = float(os.environ.get("NEXFS_LOAD_SECONDS", "20"))
MIXERS = 8
RSS_LIMIT_KIB = 256 * 1024

FIO_LOOP = """
set -eu
end=$(( $(date +%s) + {seconds} ))
runs=0
while [ "$(date +%s)" -lt "$end" ]; do
    fio --directory={directory} --ioengine=psync --verify=crc32c --do_verify=1 \\
        --verify_fatal=1 --verify_state_save=0 --output-format=terse --output=/dev/null \\
        --name=rand --rw=randwrite --bs=4k --size=8M --fsync=64 \\
        --name=seq --rw=write --bs=1M --size=16M --direct=1
    runs=$((runs + 1))
done
echo "fio runs: $runs"
"""


def scan_shared(root: Path) -> tuple[int, list[str]]:
    """(number of shared files, the ones whose content fails its own check)."""
    count, bad = 0, []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if name.startswith(("s", "h")):
                count += 1
                path = Path(dirpath, name)
                if not check_sealed(path.read_bytes()):
                    bad.append(str(path))
    return count, bad


def test_eight_mixers_and_fio(mounter: Mounter, tmp_path: Path) -> None:
    m = mounter.mount()
    mnt = m.mountpoint
    shared = mnt / "shared"
    for sub in ["own", *(f"d{i}" for i in range(8))]:
        (shared / sub).mkdir(parents=True)
    (mnt / "fio").mkdir()
    assert m.proc is not None
    rss_start = vm_rss_kib(m.proc.pid) or 0

    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(name: str, cmd: list[str]) -> None:
        out = tmp_path / f"{name}.out"
        with open(out, "wb") as f:
            procs.append((name, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                                 cwd=tmp_path, env=child_env()), out))

    started = time.monotonic()
    with RssSampler(m.proc.pid, interval=0.1) as rss:
        try:
            for i in range(MIXERS):
                start(f"mixer{i}", workload_command(
                    "mixer", "--dir", str(shared), "--ident", str(i), "--seed", "42",
                    "--seconds", str(LOAD_SECONDS)))
            start("fio", ["bash", "-c", FIO_LOOP.format(seconds=int(LOAD_SECONDS),
                                                        directory=mnt / "fio")])
            codes = {name: proc.wait(LOAD_SECONDS + 240) for name, proc, _ in procs}
        finally:
            for _, proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    elapsed = time.monotonic() - started
    outputs = {name: out.read_text(errors="replace") for name, _, out in procs}
    assert codes == dict.fromkeys(codes, 0), {n: outputs[n][-2000:] for n, c in codes.items()
                                             if c}

    ops: Counter[str] = Counter()
    races: Counter[str] = Counter()
    failures = []
    for i in range(MIXERS):
        summary = json.loads(outputs[f"mixer{i}"].strip().splitlines()[-1])
        ops.update(summary["ops"])
        races.update(summary["races"])
        failures += [f"mixer{i}: {f}" for f in summary["failures"]]
    assert not failures, "\n".join(failures[:30])
    total = sum(ops.values())
    assert total > MIXERS * 100, ops
    assert all(ops[op] > 0 for op in ("publish", "read", "rename", "unlink", "link", "mkdir",
                                      "rmdir", "listing", "xattr", "rewrite_private", "rename_dir",
                                      "read_unlinked")), ops
    fio_runs = int(outputs["fio"].split("fio runs:")[1])
    assert fio_runs >= 1

    assert rss.peak_kib < RSS_LIMIT_KIB, f"daemon VmRSS peaked at {rss.peak_kib} KiB"

    count, bad = scan_shared(shared)
    assert not bad, bad[:10]
    assert m.unmount() == 0
    code, output = fsck(m.image)
    assert code == 0, output
    again = mounter.mount(m.image)
    assert scan_shared(again.mountpoint / "shared") == (count, [])
    print(f"load: {elapsed:.1f} s, {total} mixer ops ({dict(ops)}), races {dict(races)}, "
          f"fio runs {fio_runs}, {count} shared files at the end, daemon VmRSS "
          f"{rss_start} KiB at start, peak {rss.peak_kib} KiB ({len(rss.samples)} samples)")
