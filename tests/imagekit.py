"""Image files for the offline-tool tests: a populated sample volume, finding where its
structures live, damaging them on purpose, and running the console scripts.

Damage is written with plain ``os.pwrite`` into the image file while no valve has it open.
Damage that must keep valid checksums is made through the project's own codecs: decode the
block or inode, change a field, re-encode and re-seal it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from fsutil import ROOT, make_image, mounted

from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk.bitmap import BitmapBlock, SummaryBlock
from nexfs.ondisk.btree import KIND_DIR, KIND_EXTENTS, KIND_XATTR, Node, decode_node
from nexfs.ondisk.extents import AREA_HEADER, EXTENT, MODE_TREE
from nexfs.ondisk.inode_record import Inode
from nexfs.ondisk.inode_table_block import locate
from nexfs.ondisk.layout import INODE_SIZE, STATE_BLOCK, SUMMARY_ENTRIES, Geometry, StateBlock
from nexfs.ondisk.metablock import BLOCK_SIZE, MAGIC_BITMAP, MAGIC_SUMMARY, MetaBlock
from nexfs.store.store import Store
from nexfs.types import BlockNo, FsError, InodeNo
from valve import Rights, Valve

T = TypeVar("T")

BIN = Path(sys.executable).parent
"""The venv's bin directory: where the console scripts live."""

SAMPLE_SIZE = 32 << 20
BIG_DIR_ENTRIES = 300
FRAG_EXTENTS = 400
READ_ALL = 8 << 20


# -- running the console scripts -----------------------------------------------------------


def tool(*argv: str | os.PathLike[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a console script from the venv (``tool("fsck.nexfs", "-n", img)``); the result
    never carries a traceback (a user mistake or a damaged volume is one line, not a crash).
    """
    from mountutil import child_env

    args = [str(a) for a in argv]
    # child_env: the script must import this checkout, not the one the venv was installed
    # from (tests/test_tool_checkout.py).
    result = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                            timeout=timeout, check=False, env=child_env())
    assert "Traceback" not in result.stderr + result.stdout, (args, result.stderr)
    return result


def fsck(image: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return tool("fsck.nexfs", *flags, image)


def file_hash(path: Path) -> str:
    """SHA-256 of the whole file (the image's every byte, holes included)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sparse_copy(src: Path, dst: Path) -> Path:
    """Copy an image file, keeping its holes."""
    size = src.stat().st_size
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(size)
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            hole = os.lseek(fi.fileno(), data, os.SEEK_HOLE)
            fi.seek(data)
            fo.seek(data)
            left = hole - data
            while left:
                chunk = fi.read(min(left, 1 << 20))
                fo.write(chunk)
                left -= len(chunk)
            pos = hole
    os.chmod(dst, 0o600)
    return dst


# -- the sample volume ----------------------------------------------------------------------


@dataclass
class Sample:
    """What :func:`populate` put on the volume: inode numbers and file contents by path."""

    path: Path
    ino: dict[str, int] = field(default_factory=dict)
    data: dict[str, bytes] = field(default_factory=dict)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def big_dir_names(self) -> list[str]:
        return [f"entry-with-a-fairly-long-name-{i:04d}" for i in range(BIG_DIR_ENTRIES)]


def _pattern(tag: str, size: int) -> bytes:
    seed = hashlib.sha256(tag.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def frag_block(i: int) -> bytes:
    return f"block {i} of /frag\n".encode().ljust(BLOCK_SIZE, b".")


def populate(path: Path, size: int = SAMPLE_SIZE) -> Sample:
    """Format ``path`` and fill it with one of everything the damage tests aim at.

    /big/...          a directory of BIG_DIR_ENTRIES files: a multi-node directory index
    /frag             a file of FRAG_EXTENTS extents (interleaved with /filler): an extent
                      tree of several leaves; block i holds frag_block(i)
    /attrs            a file with extended attributes, one of them several chunks long
    /victim, /a, /b   small files whose inodes and blocks get damaged
    /sub/inner/deep   nested directories; /sub/hard a hard link to /a; /sym a symlink
    """
    make_image(path, size)
    sample = Sample(path)
    with mounted(path) as fs:

        def create(parent: int, name: str, data: bytes = b"") -> int:
            ino = fs.create(parent, name.encode(), 0o644, ROOT).ino
            if data:
                fs.write(ino, 0, data, ROOT)
            return ino

        def mkdir(parent: int, name: str) -> int:
            return fs.mkdir(parent, name.encode(), 0o755, ROOT).ino

        big = mkdir(ROOT_INO, "big")
        sample.ino["/big"] = big
        for name in sample.big_dir_names:
            sample.ino[f"/big/{name}"] = create(big, name)
        frag = create(ROOT_INO, "frag")
        filler = create(ROOT_INO, "filler")
        sample.ino.update({"/frag": frag, "/filler": filler})
        for i in range(FRAG_EXTENTS):
            # Alternate the two files so no two blocks of /frag are adjacent on disk.
            fs.write(frag, i * BLOCK_SIZE, frag_block(i), ROOT)
            fs.write(filler, i * BLOCK_SIZE, b"f" * BLOCK_SIZE, ROOT)
        sample.data["/frag"] = b"".join(frag_block(i) for i in range(FRAG_EXTENTS))
        sample.data["/filler"] = b"f" * (FRAG_EXTENTS * BLOCK_SIZE)
        attrs = create(ROOT_INO, "attrs", b"has attributes\n")
        sample.ino["/attrs"] = attrs
        sample.data["/attrs"] = b"has attributes\n"
        sample.xattrs = {b"user.small": b"v" * 40, b"user.big": _pattern("xattr", 3000)}
        for xname, value in sample.xattrs.items():
            fs.setxattr(attrs, xname, value, 0, ROOT)
        for fname, nbytes in (("victim", 10_000), ("a", 3 * BLOCK_SIZE),
                              ("b", 3 * BLOCK_SIZE)):
            data = _pattern(fname, nbytes)
            sample.ino[f"/{fname}"] = create(ROOT_INO, fname, data)
            sample.data[f"/{fname}"] = data
        sub = mkdir(ROOT_INO, "sub")
        inner = mkdir(sub, "inner")
        sample.ino.update({"/sub": sub, "/sub/inner": inner})
        sample.ino["/sub/inner/deep"] = create(inner, "deep", b"deep down\n")
        sample.data["/sub/inner/deep"] = b"deep down\n"
        fs.link(sample.ino["/a"], sub, b"hard", ROOT)
        sample.ino["/sym"] = fs.symlink(ROOT_INO, b"sym", b"sub/inner/deep", ROOT).ino
    return sample


# -- finding structures ---------------------------------------------------------------------


@dataclass(frozen=True)
class Vol:
    """What it takes to find and re-seal structures in an image with plain file reads: the
    checksum seed and the geometry (read once through a read-only store)."""

    path: Path
    seed: int
    geo: Geometry
    hash_key: bytes

    @classmethod
    def of(cls, path: Path) -> Vol:
        with Valve.open(path, read_only=True) as v:
            store = Store.open(v.grant(Rights.READ), read_only=True, ignore_error=True)
            try:
                assert not store.journal.head, "the journal is not empty: home blocks are stale"
                return cls(path, store.volume_seed, store.geo, store.sb.hash_key)
            finally:
                store.close()

    def block(self, blkno: int) -> bytearray:
        return read_block(self.path, blkno)

    def inode_offset(self, ino: int) -> int:
        tblk, slot = locate(self.geo.itable_start, InodeNo(ino))
        return tblk * BLOCK_SIZE + slot * INODE_SIZE

    def inode(self, ino: int) -> Inode:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, INODE_SIZE, self.inode_offset(ino))
        finally:
            os.close(fd)
        return Inode.decode(InodeNo(ino), raw, self.seed)

    def node(self, blkno: int, owner: int, kind: int) -> Node:
        return decode_node(BlockNo(blkno), memoryview(self.block(blkno)), volume_seed=self.seed,
                           owner=owner, kind=kind, nblocks=self.geo.nblocks)

    def tree(self, owner: int, root: int, kind: int) -> list[Node]:
        """Every node of a B+tree, parents before children."""
        out: list[Node] = []
        todo = [root] if root else []
        while todo:
            node = self.node(todo.pop(0), owner, kind)
            out.append(node)
            todo.extend(node.kids)
        return out

    def dir_tree(self, ino: int) -> list[Node]:
        return self.tree(ino, int.from_bytes(self.inode(ino).area[:8], "little"), KIND_DIR)

    def extent_tree(self, ino: int) -> list[Node]:
        mode, _count, _res, _nodes, root = AREA_HEADER.unpack_from(self.inode(ino).area, 0)
        assert mode == MODE_TREE, f"inode {ino} keeps its extents inline"
        return self.tree(ino, root, KIND_EXTENTS)

    def xattr_tree(self, ino: int) -> list[Node]:
        return self.tree(ino, self.inode(ino).xattr_root, KIND_XATTR)

    def inline_extents(self, ino: int) -> list[tuple[int, int, int]]:
        """(lblk, phys, n) of a file whose extents are inline in its inode."""
        area = self.inode(ino).area
        mode, count, _res, _nodes, _root = AREA_HEADER.unpack_from(area, 0)
        assert mode != MODE_TREE
        out = []
        for i in range(count):
            lblk, n, phys = EXTENT.unpack_from(area, AREA_HEADER.size + i * EXTENT.size)
            out.append((lblk, phys, n))
        return out

    def entry_leaf(self, dir_ino: int, name: bytes) -> tuple[Node, int]:
        """The directory-index leaf holding ``name``, and the entry's index in it."""
        for node in self.dir_tree(dir_ino):
            for i, value in enumerate(node.vals):
                if value[10:] == name:
                    return node, i
        raise KeyError(name)

    # -- damaging ---------------------------------------------------------------------------

    def scribble(self, blkno: int, offset: int = 64, nbytes: int = 16) -> None:
        """Garble bytes of a block: its checksum no longer matches."""
        raw = self.block(blkno)
        for i in range(offset, offset + nbytes):
            raw[i] ^= 0x5A
        write_at(self.path, blkno * BLOCK_SIZE, raw)

    def write_node(self, node: Node) -> None:
        """Re-encode and re-seal an edited B+tree node in place (checksum valid)."""
        tid = int.from_bytes(self.block(node.blkno)[24:32], "little")
        out = bytearray(BLOCK_SIZE)
        node.encode(memoryview(out), self.seed, tid)
        write_at(self.path, node.blkno * BLOCK_SIZE, out)

    def write_inode(self, inode: Inode) -> None:
        """Re-encode an edited inode (its own checksum included) in place."""
        write_at(self.path, self.inode_offset(inode.ino), inode.encode(self.seed))

    def write_meta(self, blk: MetaBlock) -> None:
        """Re-encode and re-seal a bitmap, summary or state block in place."""
        tid = int.from_bytes(self.block(blk.blkno)[24:32], "little")
        out = bytearray(BLOCK_SIZE)
        blk.encode(memoryview(out), self.seed, tid)
        write_at(self.path, blk.blkno * BLOCK_SIZE, out)

    def state(self) -> StateBlock:
        return StateBlock.decode(self.block(STATE_BLOCK), self.seed, self.geo)

    def bitmap_block(self, g: int = 0) -> BitmapBlock:
        blkno = self.geo.bbitmap_start + g
        return BitmapBlock.decode(BlockNo(blkno), memoryview(self.block(blkno)),
                                  magic=MAGIC_BITMAP, group=g, seed=self.seed, tail=0,
                                  expect_free=None, structure="block bitmap")

    def summary_block(self, s: int = 0) -> SummaryBlock:
        blkno = self.geo.bsummary_start + s
        return SummaryBlock.decode(BlockNo(blkno), memoryview(self.block(blkno)),
                                   magic=MAGIC_SUMMARY, index=s, seed=self.seed,
                                   nvalid=SUMMARY_ENTRIES, structure="block summary")


def read_block(path: Path, blkno: int) -> bytearray:
    fd = os.open(path, os.O_RDONLY)
    try:
        return bytearray(os.pread(fd, BLOCK_SIZE, blkno * BLOCK_SIZE))
    finally:
        os.close(fd)


def write_at(path: Path, offset: int, data: bytes | bytearray) -> None:
    """Plain pwrite into the image (no valve may have it open)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- what the in-process filesystem makes of a damaged volume -------------------------------


@dataclass
class Probe:
    """Outcome of :func:`probe`: refused to open (``refused``), or the errors seen."""

    refused: FsError | None = None
    errors: list[tuple[str, FsError]] = field(default_factory=list)
    read_only: bool = False
    error_reason: str | None = None
    seen: dict[str, bytes] = field(default_factory=dict)

    @property
    def eio(self) -> list[str]:
        return [f"{what}: {exc}" for what, exc in self.errors if exc.errno == errno.EIO]


def probe(image: Path, scratch: Path) -> Probe:
    """Open a copy of ``image`` writable in-process, read everything, then try to write.

    Every failure must be an FsError (any other exception propagates and fails the test);
    the copy keeps the original untouched for fsck.
    """
    copy = sparse_copy(image, scratch)
    result = Probe()
    try:
        with Valve.open(copy) as v:
            fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
            try:
                _walk(fs, result)
                _try_write(fs, result)
                result.read_only = fs.read_only
                result.error_reason = fs.error
            finally:
                fs.close()
    except FsError as exc:
        result.refused = exc
    return result


def _attempt(result: Probe, what: str, fn: Callable[..., T], *args: object) -> T | None:
    try:
        return fn(*args)
    except FsError as exc:
        result.errors.append((what, exc))
        return None


def _listing(fs: FileSystem, ino: int) -> list[tuple[bytes, int, int]]:
    return [(n, a.ino, a.mode) for n, a, _c in fs.readdir(ino, 0)]


def _walk(fs: FileSystem, result: Probe) -> None:
    todo: list[tuple[str, int]] = [("", ROOT_INO)]
    while todo:
        path, ino = todo.pop()
        entries = _attempt(result, f"readdir {path or '/'}", _listing, fs, ino)
        for name, child, mode in entries or []:
            if name in (b".", b".."):
                continue
            cpath = f"{path}/{name.decode()}"
            _attempt(result, f"lookup {cpath}", fs.lookup, ino, name, ROOT)
            if stat.S_ISDIR(mode):
                todo.append((cpath, child))
            elif stat.S_ISREG(mode):
                data = _attempt(result, f"read {cpath}", fs.read, child, 0, READ_ALL)
                if data is not None:
                    result.seen[cpath] = data
            for xname in _attempt(result, f"listxattr {cpath}", fs.listxattr, child) or []:
                _attempt(result, f"getxattr {cpath} {xname!r}", fs.getxattr, child, xname)


def _try_write(fs: FileSystem, result: Probe) -> None:
    def write() -> None:
        ino = fs.create(ROOT_INO, b"probe-new-file", 0o644, ROOT).ino
        fs.write(ino, 0, b"x" * (256 << 10), ROOT)
        fs.mkdir(ROOT_INO, b"probe-new-dir", 0o755, ROOT)
        fs.commit()

    _attempt(result, "write", write)


def check_probe(result: Probe, *, detect: bool) -> None:
    """The rule for a damaged volume: refuse to open with a clear FsError, or serve the rest
    and answer EIO on the damaged object, having switched to read-only.  ``detect``: the
    damage is one the filesystem must notice (a checksum, a structure)."""
    if result.refused is not None:
        assert str(result.refused).strip(), "refused without saying why"
        return
    others = [f"{w}: {e!r}" for w, e in result.errors
              if e.errno not in (errno.EIO, errno.EROFS)]
    assert not others, f"unexpected errors on a damaged volume: {others}"
    if result.eio:
        assert result.read_only and result.error_reason, \
            f"EIO ({result.eio}) but the volume did not switch to read-only"
    if detect:
        assert result.eio, "the damage went unnoticed"
