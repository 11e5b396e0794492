"""The shortcuts of the metadata requests (docs/BENCHMARKS.md, "Per-request cost of tar x and
rm -rf", round 3) answer exactly what the long way did.

* Directory index handles kept with their inode (``Objects.dir_index``) and the volume's
  memoizing name hash: a random explorer of creates, links, unlinks, renames, mkdirs and
  rmdirs over a few directories (some grown past one index block and emptied again), with
  failing operations and dropped inode caches in between, checks after every step that each
  directory lists and looks up exactly what a model says, through the kept handle and
  through one built afresh; fsck is clean at the end.
* ``setattr`` reads the clock only when a time is the daemon's to stamp; the kernel's own
  ctime (sent with every change to a regular file under the writeback cache) is kept as is.
* ``lookup_or_none``: None for a missing name, every other error as ``lookup`` raises it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
from pathlib import Path

import pytest
from fsutil import OTHER, ROOT, fsck_clean, make_image, mounted

from nexfs.core import clock
from nexfs.core.attr import UTIME_NOW, SetAttr
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk.dirindex import DirIndex, keyed_hash
from nexfs.ondisk.inode_record import DIR_ROOT
from nexfs.types import FsError

LONG = os.environ.get("NEXFS_LONG") == "1"
SEEDS = range(24) if LONG else range(3)
STEPS = 1500 if LONG else 500


def _listing(fs: FileSystem, d: int) -> dict[bytes, int]:
    return {name: attr.ino for name, attr, _c in fs.readdir(d, 0)
            if name not in (b".", b"..")}


def _fresh_lookup(fs: FileSystem, d: int, name: bytes) -> int | None:
    """``name`` in directory ``d`` through an index handle built afresh (the long way)."""
    inode = fs.inodes.get(d)
    (root,) = DIR_ROOT.unpack_from(inode.area, 0)
    index = DirIndex(fs.objects.owned(inode), d, root, fs.store.sb.hash_key)
    hit = index.lookup(name)
    return None if hit is None else hit[0]


def _check(fs: FileSystem, model: dict[int, dict[bytes, int]], rng: random.Random) -> None:
    for d, entries in model.items():
        assert _listing(fs, d) == entries, f"directory {d}"
        probes = [*rng.sample(sorted(entries), min(4, len(entries))), b"absent-name"]
        for name in probes:
            want = entries.get(name)
            got = fs.lookup_or_none(d, name, ROOT)
            assert (got.ino if got is not None else None) == want, (d, name)
            assert _fresh_lookup(fs, d, name) == want, (d, name)


@pytest.mark.parametrize("seed", SEEDS)
def test_kept_directory_index_handles_answer_as_fresh_ones(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    img = make_image(tmp_path / "v.img", 64 << 20)
    with mounted(img) as fs:
        if seed % 2:
            fs.inodes.limit = 3  # inodes (and their handles) evicted all the time
        model: dict[int, dict[bytes, int]] = {ROOT_INO: _listing(fs, ROOT_INO)}
        files: list[int] = []
        for step in range(STEPS):
            dirs = list(model)
            d = ROOT_INO if rng.random() < 0.4 else rng.choice(dirs)  # one big directory
            op = rng.choice(["create"] * 8 + ["unlink"] * 3 + ["mkdir", "rmdir", "rename",
                                                                "link", "exists", "drop"])
            # Short names collide in the model on purpose (EEXIST, ENOENT); long ones make
            # a directory outgrow one index block.
            name = (b"n%d" % rng.randrange(40)) if rng.random() < 0.5 else (
                b"long-%d-" % rng.randrange(10**6) + b"x" * rng.randrange(100, 200))
            try:
                if op == "create":
                    a = fs.create(d, name, 0o644, ROOT)
                    model[d][name] = a.ino
                    files.append(a.ino)
                elif op == "mkdir":
                    a = fs.mkdir(d, name, 0o755, ROOT)
                    model[d][name] = a.ino
                    model[a.ino] = {}
                elif op == "unlink" and any(i not in model for i in model[d].values()):
                    victim = rng.choice(sorted(n for n, i in model[d].items() if i not in model))
                    fs.unlink(d, victim, ROOT)
                    del model[d][victim]
                elif op == "rmdir":
                    empty = [(p, n) for p, es in model.items() for n, i in es.items()
                             if i in model and not model[i]]
                    if empty:
                        p, n = rng.choice(empty)
                        fs.rmdir(p, n, ROOT)
                        del model[model[p].pop(n)]
                elif op == "rename" and model[d]:
                    old = rng.choice(sorted(model[d]))
                    to = rng.choice(dirs)
                    ino = model[d][old]
                    if ino in model or model[to].get(name) == ino:
                        continue  # directories stay put (no cycles to model); no self-rename
                    fs.rename(d, old, to, name, 0, ROOT)
                    del model[d][old]
                    model[to][name] = ino
                elif op == "link" and files:
                    ino = rng.choice(files)
                    fs.link(ino, d, name, ROOT)
                    model[d][name] = ino
                elif op == "exists" and model[d]:
                    # Fails before changing anything: the kept handle stays right.
                    fs.create(d, rng.choice(sorted(model[d])), 0o644, ROOT)
                    raise AssertionError("create of an existing name succeeded")
                elif op == "drop":
                    fs.commit(durable=False)
                    fs.inodes.clear()  # every kept handle goes with its inode
                    assert not fs.inodes.dir_handles
            except FsError as exc:
                # (EISDIR: a file renamed over a directory; EPERM: a link to an inode number
                # a directory took over)
                assert exc.errno in (errno.EEXIST, errno.ENOENT, errno.EISDIR, errno.EPERM), exc
            if step % 25 == 0 or op == "drop":
                _check(fs, model, rng)
        _check(fs, model, rng)
        big = max(model, key=lambda i: len(model[i]))
        assert fs.inodes.get(big).blocks >= 3, "no directory outgrew one index block"
    code, out = fsck_clean(img)
    assert code == 0, out


def test_name_hash_is_the_keyed_blake2b_with_repeats() -> None:
    key = bytes(range(16))
    h = keyed_hash(key)
    rng = random.Random(7)
    names = [b"a", b"a", b"b", b"a", bytes(255 * [120]), b"b", b"b"] + [
        bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 40))) for _ in range(200)]
    for name in names + names[::-1]:
        want = int.from_bytes(hashlib.blake2b(name, digest_size=8, key=key).digest(),
                              "little") & ((1 << 47) - 1)
        assert h(name) == want, name


def test_setattr_takes_the_kernels_ctime_without_the_clock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_image(tmp_path / "v.img")
    with mounted(img) as fs:
        ino = fs.create(ROOT_INO, b"f", 0o644, ROOT).ino
        reads: list[int] = []
        real = clock.now_ns

        def counted() -> int:
            reads.append(1)
            return real()

        monkeypatch.setattr(clock, "now_ns", counted)
        kernel_ctime = 1_700_000_000_123_456_789
        # tar's three SETATTRs of a file under the writeback cache: each carries the ctime.
        for changes in (SetAttr(atime_ns=5, mtime_ns=6, ctime_ns=kernel_ctime),
                        SetAttr(uid=0, gid=0, ctime_ns=kernel_ctime),
                        SetAttr(mode=0o600, ctime_ns=kernel_ctime)):
            attr = fs.setattr(ino, changes, ROOT)
            assert attr.ctime_ns == kernel_ctime
        assert (attr.atime_ns, attr.mtime_ns, attr.mode & 0o777) == (5, 6, 0o600)
        assert not reads
        # The daemon's own stamps still come from the clock: no ctime given, "now", a size.
        for changes in (SetAttr(mode=0o644), SetAttr(mtime_ns=UTIME_NOW, ctime_ns=kernel_ctime),
                        SetAttr(size=0, ctime_ns=kernel_ctime)):
            before = len(reads)
            attr = fs.setattr(ino, changes, ROOT)
            assert len(reads) == before + 1, changes
        assert attr.mtime_ns > 6


def test_lookup_or_none_answers_none_only_for_a_missing_name(tmp_path: Path) -> None:
    img = make_image(tmp_path / "v.img")
    with mounted(img) as fs:
        d = fs.mkdir(ROOT_INO, b"d", 0o700, ROOT).ino
        f = fs.create(d, b"f", 0o644, ROOT).ino
        assert fs.lookup_or_none(d, b"missing", ROOT) is None
        with pytest.raises(FsError) as info:
            fs.lookup(d, b"missing", ROOT)
        assert info.value.errno == errno.ENOENT
        found = fs.lookup_or_none(d, b"f", ROOT)
        assert found is not None and found.ino == f
        for parent, name, ctx, want in ((d, b"x" * 256, ROOT, errno.ENAMETOOLONG),
                                        (d, b"missing", OTHER, errno.EACCES),
                                        (f, b"missing", ROOT, errno.ENOTDIR)):
            with pytest.raises(FsError) as info:
                fs.lookup_or_none(parent, name, ctx)
            assert info.value.errno == want
