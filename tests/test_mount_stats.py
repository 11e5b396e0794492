"""``nexfs stats MOUNTPOINT`` through a real mount: the counters count what was done.

Each test does a known number of operations through the mount and checks that the daemon's
figures moved by exactly that much (where the kernel sends exactly one request per call:
mkdir, rmdir, unlink, create of a new name) or at least that much (the rest), that the
latency percentiles are ordered, and that the command speaks like its peers: text, JSON,
``--watch``, exit status 1 and one line for a path that is not a NexFS mount.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mountutil import (  # noqa: F401  (fixtures)
    REPO,
    Mount,
    Mounter,
    child_env,
    mounted_fixture,
    mounter_fixture,
    needs_root,
    sh,
)

from nexfs.fuse.stats import (
    STATS_XATTR,
    Handout,
    Stats,
    bucket,
    bucket_upper,
    percentile,
)

pytestmark = pytest.mark.mount


def nexfs_stats(*args: str, user: str | None = None, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nexfs.tools.cli", "stats", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=child_env())
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def stats_of(m: Mount) -> dict[str, Any]:
    doc = json.loads(nexfs_stats(str(m.mountpoint), "--json").stdout)
    assert isinstance(doc, dict)
    return doc


def count(doc: dict[str, Any], op: str) -> int:
    return int(doc["ops"].get(op, {}).get("count", 0))


def test_histogram_buckets_bound_every_latency() -> None:
    """Every latency falls in the bucket whose upper edge is the smallest at or above it,
    and a percentile is never below the true one nor more than 25 % above it."""
    rng = random.Random(5)
    values = list(range(2000)) + [rng.randrange(1 << 45) for _ in range(20000)]
    for ns in values:
        i = bucket(ns)
        assert bucket_upper(i) >= ns and (i == 0 or bucket_upper(i - 1) < ns), ns
    stats = Stats()  # the adapter's own recording path, bucket inlined
    sample = sorted(rng.randrange(1000, 10**9) for _ in range(5001))
    for ns in sample:
        stats.in_flight += 1
        stats.record("read", ns, False)
    hist = {i: n for i, n in enumerate(stats.op("read").hist) if n}
    assert all(bucket(ns) in hist for ns in sample)
    for pct in (50, 90, 99, 100):
        true = sample[max(0, -(-len(sample) * pct // 100) - 1)]
        got = percentile(hist, pct)
        assert got is not None and true <= got <= true * 1.25, (pct, true, got)
    assert percentile({}, 50) is None


def test_counts_and_latencies_of_known_work(mounted: Mount) -> None:
    """mkdir, create, write, read, unlink and rmdir each move their counter by what was done;
    the valve, the journal and the caches report activity; percentiles are ordered."""
    before = stats_of(mounted)
    n = 25
    mnt = mounted.mountpoint
    for i in range(n):
        os.mkdir(mnt / f"d{i}")
        with open(mnt / f"d{i}" / "f", "wb") as f:
            f.write(os.urandom(8192))
    with open(mnt / "d0" / "f", "rb+", buffering=0) as f:
        os.fsync(f.fileno())  # commits everything: data cache, journal, barriers
    fd = os.open(mnt / "d1" / "f", os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, 4096)
        for _ in range(10):
            assert os.preadv(fd, [buf], 4096) == 4096
    finally:
        os.close(fd)
    for i in range(n):
        os.unlink(mnt / f"d{i}" / "f")
        os.rmdir(mnt / f"d{i}")
    after = stats_of(mounted)

    assert count(after, "mkdir") - count(before, "mkdir") == n
    assert count(after, "create") - count(before, "create") == n
    assert count(after, "unlink") - count(before, "unlink") == n
    assert count(after, "rmdir") - count(before, "rmdir") == n
    assert count(after, "write") - count(before, "write") >= n
    assert count(after, "read") - count(before, "read") >= 10
    # The getxattr that reads the statistics is counted too: this one and the first.
    assert count(after, "getxattr") > count(before, "getxattr")
    for name, op in after["ops"].items():
        assert op["count"] > 0 and 0 <= op["errors"] <= op["count"], name
        assert 0 < op["p50_us"] <= op["p90_us"] <= op["p99_us"], (name, op)
        assert op["mean_us"] <= op["max_us"] * 1.0001, (name, op)
        assert sum(op["hist"].values()) == op["count"], name
    # A request answered with an errno is counted as an error of its operation.
    (mnt / "full").mkdir()
    (mnt / "full" / "f").touch()
    with pytest.raises(OSError) as info:
        os.rmdir(mnt / "full")
    assert info.value.errno == errno.ENOTEMPTY
    assert stats_of(mounted)["ops"]["rmdir"]["errors"] - after["ops"]["rmdir"]["errors"] == 1

    valve, journal = after["valve"], after["journal"]
    assert valve["writes"] > before["valve"]["writes"] and valve["bytes_written"] >= n * 8192
    assert valve["barriers"] > before["valve"]["barriers"]
    assert valve["bounce_copies"] >= 0 and valve["denials"] == 0
    assert journal["commits"] > before["journal"]["commits"]
    assert 0 <= journal["fill"] <= 1 and journal["used_blocks"] <= journal["blocks"]
    for name in ("metadata", "data"):
        cache = after["caches"][name]
        assert cache["hits"] + cache["misses"] > 0, name
        assert cache["hit_rate"] is None or 0 <= cache["hit_rate"] <= 1
        assert 0 <= cache["blocks"] <= cache["capacity"], name
    # The O_DIRECT reads of a block just written (in the data cache) took the short path,
    # one call into C each (nexfs/store/datacache.py).
    short = after["caches"]["data"]["short_reads"] - before["caches"]["data"]["short_reads"]
    assert short >= 10
    assert after["requests"]["in_flight"] >= 1  # this very getxattr
    assert after["requests"]["in_flight_max"] >= 1


def test_text_watch_and_json(mounted: Mount) -> None:
    mounted.sh("mkdir a && touch a/b && ls -l a >/dev/null")
    text = nexfs_stats(str(mounted.mountpoint)).stdout
    assert text.startswith("NexFS statistics")
    for word in ("operation", "mkdir", "create", "p99 µs", "requests in flight",
                 "metadata cache: hit rate", "data cache: hit rate", "valve:", "journal:"):
        assert word in text, word
    watch = nexfs_stats(str(mounted.mountpoint), "--watch", "0.2", "--count", "2").stdout
    assert watch.count("--- ") == 2 and "requests/s" in watch and "getxattr" in watch
    lines = nexfs_stats(str(mounted.mountpoint), "--watch", "0.1", "--count", "2",
                        "--json").stdout.splitlines()
    assert len(lines) == 2
    docs = [json.loads(line) for line in lines]
    assert count(docs[1], "getxattr") > count(docs[0], "getxattr")


def test_the_name_is_reserved_on_the_root_only(mounted: Mount) -> None:
    mnt = mounted.mountpoint
    assert STATS_XATTR not in [n.encode() for n in os.listxattr(mnt)]
    for call in (lambda: os.setxattr(mnt, STATS_XATTR, b"x"),
                 lambda: os.removexattr(mnt, STATS_XATTR)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EPERM
    (mnt / "dir").mkdir()
    os.setxattr(mnt / "dir", STATS_XATTR, b"ordinary")
    assert os.getxattr(mnt / "dir", STATS_XATTR) == b"ordinary"


def test_not_a_nexfs_mount_is_one_line_and_exit_1(mounted: Mount, tmp_path: Path) -> None:
    (mounted.mountpoint / "sub").mkdir()
    for path in (tmp_path, tmp_path / "missing", mounted.mountpoint / "sub"):
        proc = nexfs_stats(str(path), check=False)
        assert proc.returncode == 1, (path, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("nexfs stats: ") and len(proc.stderr.splitlines()) == 1
        assert "Traceback" not in proc.stderr
    bad = nexfs_stats(str(mounted.mountpoint), "--watch", "0", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@needs_root
def test_another_user_may_read_the_statistics(mounter: Mounter) -> None:
    m = mounter.mount(options=["allow_other"])
    # The raw xattr, read with getfattr: the checkout (and its venv) need not be readable by
    # nobody (CI clones into a private directory), only the mount must be.
    raw = sh("getfattr --only-values --absolute-names -n user.nexfs.stats .", m.mountpoint,
             user="nobody").stdout
    doc = json.loads(raw)
    assert count(doc, "getxattr") >= 1
    sh("touch x 2>/dev/null || true", m.mountpoint, user="nobody")


def _getxattr(path: bytes, name: bytes, size: int) -> int | bytes:
    """getxattr(2) with a buffer of ``size`` bytes (0: the size probe); -errno on failure."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(size) if size else None
    n = libc.getxattr(path, name, buf, ctypes.c_size_t(size))
    if n < 0:
        return -ctypes.get_errno()
    return buf.raw[:n] if buf is not None else int(n)


def test_size_probe_then_read_never_gets_erange(mounted: Mount) -> None:
    """getfattr's way (and every C caller's): ask the size, then read with a buffer of that
    size.  The daemon counts the probe itself, so a document made afresh for the read could
    be longer than the size it gave; the read must still fit (no ERANGE), and be JSON."""
    path = os.fsencode(mounted.mountpoint)
    for i in range(300):
        size = _getxattr(path, STATS_XATTR, 0)
        assert isinstance(size, int) and size > 0, size
        got = _getxattr(path, STATS_XATTR, size)
        assert isinstance(got, bytes), f"round {i}: {os.strerror(-got)} after a probe of {size}"
        assert isinstance(json.loads(got), dict)


def test_handout_gives_a_document_to_the_follow_up_once_and_not_when_stale() -> None:
    made: list[bytes] = []
    now = [0.0]

    def make() -> bytes:
        made.append(b"doc%d" % len(made))
        return made[-1]

    h = Handout(make, keep=2.0, clock=lambda: now[0])
    assert h.get(10) == b"doc0"          # the probe: made and kept
    assert h.get(20) == b"doc1"          # another caller gets its own
    assert h.get(10) == b"doc0"          # the follow-up: the probe's document
    assert h.get(10) == b"doc2"          # handed out once only: a new question
    now[0] = 2.5
    assert h.get(10) == b"doc3"          # kept too long: made afresh
    assert h.get(20) == b"doc4"          # pid 20's was dropped as stale, not handed out
    assert made == [b"doc0", b"doc1", b"doc2", b"doc3", b"doc4"]
