"""A hypothesis state machine drives the filesystem core with random operations against a
simple in-memory model, remounting at random points, and compares everything after each step.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import hypothesis.strategies as st
from fsutil import ROOT, fsck_clean, make_image
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nexfs.core.attr import SetAttr
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.types import FsError
from valve import Rights, Valve

DIRS = ["", "d1", "d1/d2"]
NAMES = ["a", "b", "c", "long" * 20]
paths = st.tuples(st.sampled_from(DIRS), st.sampled_from(NAMES)).map(
    lambda t: f"{t[0]}/{t[1]}".lstrip("/")
)


class Model(RuleBasedStateMachine):
    """files: path -> inode key; data: inode key -> bytearray; dirs: set of dir paths."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.image = make_image(Path(self.tmp.name) / "m.img", 32 << 20)
        self._open()
        self.files: dict[str, int] = {}
        self.data: dict[int, bytearray] = {}
        self.dirs: set[str] = {""}
        self.next_key = 0

    def _open(self) -> None:
        self.valve = Valve.open(self.image)
        self.fs = FileSystem.open(self.valve.grant(Rights.READ | Rights.WRITE))

    def _close(self) -> None:
        self.fs.close()
        self.valve.close()

    def teardown(self) -> None:
        self._close()
        code, out = fsck_clean(self.image)
        self.tmp.cleanup()
        assert code == 0, out

    def _ino(self, path: str) -> int:
        ino = ROOT_INO
        for part in path.split("/"):
            if part:
                ino = self.fs.lookup(ino, part.encode(), ROOT).ino
        return ino

    def _parent(self, path: str) -> tuple[str, bytes]:
        head, _, tail = path.rpartition("/")
        return head, tail.encode()

    def _expect_error(self, code: int, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except FsError as exc:
            assert exc.errno == code, (exc.errno, code)
        else:
            raise AssertionError(f"expected errno {code}")

    def _taken(self, path: str) -> bool:
        return path in self.files or path in self.dirs

    @rule(path=paths)
    def create(self, path: str) -> None:
        head, name = self._parent(path)
        if head not in self.dirs:
            return
        if self._taken(path):
            self._expect_error(errno.EEXIST, self.fs.create, self._ino(head), name, 0o644, ROOT)
            return
        self.fs.create(self._ino(head), name, 0o644, ROOT)
        self.files[path] = self.next_key
        self.data[self.next_key] = bytearray()
        self.next_key += 1

    @rule(path=st.sampled_from(["d1", "d1/d2", "d1/d3", "a/x"]))
    def mkdir(self, path: str) -> None:
        head, name = self._parent(path)
        if head not in self.dirs or self._taken(path):
            return
        self.fs.mkdir(self._ino(head), name, 0o755, ROOT)
        self.dirs.add(path)

    @rule(path=paths, offset=st.integers(0, 300_000), size=st.integers(0, 70_000),
          byte=st.integers(0, 255))
    def write(self, path: str, offset: int, size: int, byte: int) -> None:
        if path not in self.files:
            return
        payload = bytes([byte]) * size
        self.fs.write(self._ino(path), offset, payload, ROOT)
        buf = self.data[self.files[path]]
        if size:
            if len(buf) < offset:
                buf.extend(bytes(offset - len(buf)))
            buf[offset : offset + size] = payload

    @rule(path=paths, size=st.integers(0, 400_000))
    def truncate(self, path: str, size: int) -> None:
        if path not in self.files:
            return
        self.fs.setattr(self._ino(path), SetAttr(size=size), ROOT)
        buf = self.data[self.files[path]]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))

    @rule(path=paths)
    def unlink(self, path: str) -> None:
        head, name = self._parent(path)
        if path not in self.files:
            if head in self.dirs and path not in self.dirs:
                self._expect_error(errno.ENOENT, self.fs.unlink, self._ino(head), name, ROOT)
            return
        self.fs.unlink(self._ino(head), name, ROOT)
        key = self.files.pop(path)
        if key not in self.files.values():
            del self.data[key]

    @rule(path=st.sampled_from(["d1", "d1/d2", "d1/d3", "a/x"]))
    def rmdir(self, path: str) -> None:
        if path not in self.dirs:
            return
        head, name = self._parent(path)
        busy = any(p.startswith(path + "/") for p in list(self.files) + list(self.dirs))
        if busy:
            self._expect_error(errno.ENOTEMPTY, self.fs.rmdir, self._ino(head), name, ROOT)
            return
        self.fs.rmdir(self._ino(head), name, ROOT)
        self.dirs.discard(path)

    @rule(src=paths, dst=paths)
    def rename(self, src: str, dst: str) -> None:
        if src not in self.files:
            return
        dhead, dname = self._parent(dst)
        if dhead not in self.dirs or dst in self.dirs:
            return
        shead, sname = self._parent(src)
        self.fs.rename(self._ino(shead), sname, self._ino(dhead), dname, 0, ROOT)
        if src == dst or self.files.get(dst) == self.files[src]:
            return
        key = self.files.pop(src)
        old = self.files.get(dst)
        self.files[dst] = key
        if old is not None and old not in self.files.values():
            del self.data[old]

    @rule(src=paths, dst=paths)
    def link(self, src: str, dst: str) -> None:
        dhead, dname = self._parent(dst)
        if src not in self.files or dhead not in self.dirs or self._taken(dst):
            return
        self.fs.link(self._ino(src), self._ino(dhead), dname, ROOT)
        self.files[dst] = self.files[src]

    @precondition(lambda self: True)
    @rule()
    def remount(self) -> None:
        self._close()
        self._open()

    @rule()
    def crash_after_commit(self) -> None:
        """Commit durably, then drop the volume without a clean close; reopening replays."""
        self.fs.commit(durable=True)
        self.fs.store.abort()
        self.valve.close()
        self._open()

    @invariant()
    def contents_match(self) -> None:
        for path, key in self.files.items():
            ino = self._ino(path)
            attr = self.fs.getattr(ino)
            assert stat.S_ISREG(attr.mode)
            want = self.data[key]
            assert attr.size == len(want), path
            assert self.fs.read(ino, 0, len(want) + 10) == want, path
            assert attr.nlink == list(self.files.values()).count(key)
        for d in self.dirs:
            ino = self._ino(d)
            listed = {n.decode() for n, _a, _c in self.fs.readdir(ino, 0)} - {".", ".."}
            if d == "":
                listed.discard("lost+found")
            expected = {p.rpartition("/")[2] for p in list(self.files) + list(self.dirs)
                    if p and p.rpartition("/")[0] == d}
            assert listed == expected, (d, listed, expected)


Model.TestCase.settings = settings(
    max_examples=int(os.environ.get("NEXFS_MODEL_EXAMPLES", "25")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestModel = Model.TestCase
