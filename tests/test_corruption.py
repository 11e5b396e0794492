"""Damaged images: every structure broken on purpose, then the filesystem and fsck.nexfs.

Each case damages a freshly populated sample volume (tests/imagekit.py) and checks the whole
story: the in-process filesystem refuses to open with a clear FsError or serves the rest,
answering EIO on the damaged object and switching to read-only (never another exception);
``fsck.nexfs -n -f`` exits 4, names the damage and changes no byte; ``fsck.nexfs -y -f``
exits 1; a second ``-n -f`` run exits 0; the repaired volume accepts writes and stays clean.
Checksum damage garbles bytes; semantic damage is made through the project's own codecs, so
every checksum stays valid and only the cross-checks of fsck can find it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fsutil import ROOT, fsck_clean, mounted
from imagekit import (
    READ_ALL,
    Probe,
    Sample,
    Vol,
    check_probe,
    file_hash,
    fsck,
    populate,
    probe,
    sparse_copy,
    tool,
    write_at,
)

from nexfs.core.fs import LOST_FOUND_INO, ROOT_INO, FileSystem
from nexfs.ondisk.btree import Node
from nexfs.ondisk.layout import Superblock
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.types import CorruptionError, FsError
from valve import Rights, Valve

# -- the damage -----------------------------------------------------------------------------
# Each function damages the sample and returns what must become of it after the repair; the
# case table below says what fsck must call it and whether the filesystem must notice it.


@dataclass
class Expect:
    """What the repair must leave: ``lost`` sample paths are in lost+found as #INO with their
    data; ``gone`` ones may be lost; ``holes`` maps a path to the logical blocks that read
    back as zeros (everything else of the file is intact)."""

    lost: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)
    holes: dict[str, set[int]] = field(default_factory=dict)


def primary_superblock(s: Sample, vol: Vol) -> Expect:
    vol.scribble(0, offset=120, nbytes=8)
    return Expect()


def _big_leaf_names(node: Node) -> set[str]:
    return {f"/big/{v[10:].decode()}" for v in node.vals}


def dir_index_leaf(s: Sample, vol: Vol) -> Expect:
    leaves = [n for n in vol.dir_tree(s.ino["/big"]) if n.level == 0]
    assert len(leaves) >= 3, "the sample's big directory should span several leaves"
    vol.scribble(leaves[1].blkno)
    # Only the names in that leaf are lost; their files are found again in lost+found.
    return Expect(lost=_big_leaf_names(leaves[1]))


def dir_index_root(s: Sample, vol: Vol) -> Expect:
    nodes = vol.dir_tree(s.ino["/big"])
    assert nodes[0].level == 1
    vol.scribble(nodes[0].blkno)
    return Expect(lost=set().union(*(_big_leaf_names(n) for n in nodes if n.level == 0)))


def inode_table(s: Sample, vol: Vol) -> Expect:
    # One inode's bytes: part of /victim's 256-byte slot in its inode table block.
    where = vol.inode_offset(s.ino["/victim"])
    vol.scribble(where // BLOCK_SIZE, where % BLOCK_SIZE + 16, 8)
    return Expect(gone={"/victim"})


def block_bitmap(s: Sample, vol: Vol) -> Expect:
    vol.scribble(vol.geo.bbitmap_start, offset=200)
    return Expect()


def block_summary(s: Sample, vol: Vol) -> Expect:
    vol.scribble(vol.geo.bsummary_start, offset=40, nbytes=4)
    return Expect()


def state_block(s: Sample, vol: Vol) -> Expect:
    vol.scribble(1, offset=32, nbytes=8)
    return Expect()


def extent_node(s: Sample, vol: Vol) -> Expect:
    leaves = [n for n in vol.extent_tree(s.ino["/frag"]) if n.level == 0]
    assert len(leaves) >= 3, "/frag should have an extent tree of several leaves"
    vol.scribble(leaves[1].blkno, offset=48, nbytes=8)
    lost: set[int] = set()
    for lblk, value in zip(leaves[1].keys, leaves[1].vals, strict=True):
        length = int.from_bytes(value[:4], "little")
        lost.update(range(lblk, lblk + length))
    return Expect(holes={"/frag": lost})


def xattr_node(s: Sample, vol: Vol) -> Expect:
    vol.scribble(vol.xattr_tree(s.ino["/attrs"])[0].blkno, offset=60)
    return Expect()


def link_count(s: Sample, vol: Vol) -> Expect:
    inode = vol.inode(s.ino["/victim"])
    inode.nlink += 1
    vol.write_inode(inode)
    return Expect()


def entry_to_free_inode(s: Sample, vol: Vol) -> Expect:
    node, i = vol.entry_leaf(ROOT_INO, b"victim")
    free = vol.geo.ninodes - 3
    node.vals[i] = free.to_bytes(8, "little") + node.vals[i][8:]
    vol.write_node(node)
    return Expect(lost={"/victim"})


def unnamed_inode(s: Sample, vol: Vol) -> Expect:
    node, i = vol.entry_leaf(ROOT_INO, b"victim")
    assert len(node.keys) > 1
    del node.keys[i], node.vals[i]
    vol.write_node(node)
    return Expect(lost={"/victim"})


def double_use(s: Sample, vol: Vol) -> Expect:
    [(_l, a_phys, _n)] = vol.inline_extents(s.ino["/a"])
    inode = vol.inode(s.ino["/b"])
    inode.area[24:32] = a_phys.to_bytes(8, "little")  # the first inline record's phys
    vol.write_inode(inode)
    # /b loses the blocks it shared (they stay with /a): it reads as a hole.
    return Expect(holes={"/b": {0, 1, 2}})


def bitmap_bit_cleared(s: Sample, vol: Vol) -> Expect:
    [(_l, phys, _n)] = vol.inline_extents(s.ino["/a"])
    bm = vol.bitmap_block(0)
    assert bm.bits >> phys & 1
    bm.bits &= ~(1 << phys)
    vol.write_meta(bm)
    # Keep the summary and the free count in step: only the bit is wrong.
    summary = vol.summary_block(0)
    summary.entries[0] += 1
    vol.write_meta(summary)
    state = vol.state()
    state.free_blocks += 1
    vol.write_meta(state)
    return Expect()


def wrong_free_count(s: Sample, vol: Vol) -> Expect:
    state = vol.state()
    state.free_blocks -= 7
    vol.write_meta(state)
    return Expect()


@dataclass(frozen=True)
class Case:
    damage: Callable[[Sample, Vol], Expect]
    names: str  # regex fsck -n must print
    detect: bool  # the filesystem must notice it on its own (EIO, or refuse to open)


CASES = {
    "primary-superblock": Case(primary_superblock, r"primary superblock \(block 0\) is "
                               r"unusable: .*checksum mismatch", detect=False),
    "dir-index-leaf": Case(dir_index_leaf, r"directory \d+: corrupt directory index node at "
                           r"block \d+: checksum mismatch", detect=True),
    "dir-index-root": Case(dir_index_root, r"directory \d+: corrupt directory index node at "
                           r"block \d+: checksum mismatch", detect=True),
    "inode-table": Case(inode_table, r"inode \d+: checksum mismatch", detect=True),
    "block-bitmap": Case(block_bitmap, r"block bitmap at block \d+: checksum mismatch",
                         detect=True),
    "block-summary": Case(block_summary, r"block summary at block \d+: checksum mismatch",
                          detect=True),
    "state-block": Case(state_block, r"state block at block 1: checksum mismatch", detect=True),
    "extent-node": Case(extent_node, r"inode \d+: corrupt extent tree node at block \d+: "
                        r"checksum mismatch", detect=True),
    "xattr-node": Case(xattr_node, r"inode \d+: extended attributes: corrupt xattr tree node "
                       r"at block \d+: checksum mismatch", detect=True),
    "link-count": Case(link_count, r"inode \d+: link count is 2, should be 1", detect=False),
    "entry-to-free-inode": Case(entry_to_free_inode,
                                r"entry b'victim' points to a free inode", detect=True),
    "unnamed-inode": Case(unnamed_inode, r"inode \d+ is not reachable", detect=False),
    "double-use": Case(double_use, r"blocks \d+\.\.\d+ are also used by another file",
                       detect=False),
    "bitmap-bit-cleared": Case(bitmap_bit_cleared, r"1 used block\(s\) marked free",
                               detect=False),
    "wrong-free-count": Case(wrong_free_count, r"free block count is \d+, counted \d+",
                             detect=False),
}


# -- the checks -----------------------------------------------------------------------------


def _listing(fs: FileSystem, ino: int) -> dict[str, int]:
    return {n.decode(): a.ino for n, a, _c in fs.readdir(ino, 0) if n not in (b".", b"..")}


def _check_repaired_contents(image: Path, sample: Sample, expect: Expect) -> None:
    """After repair: every file the damage did not touch reads back as written, and the
    reconnected ones are in lost+found as #INO, with their data."""
    with mounted(image, read_only=True) as fs:
        lost = _listing(fs, LOST_FOUND_INO)
        assert set(lost) == {f"#{sample.ino[p]}" for p in expect.lost}, lost
        for path in expect.lost:
            if path in sample.data:
                assert fs.read(sample.ino[path], 0, READ_ALL) == sample.data[path]
        for path, data in sample.data.items():
            if path in expect.lost or path in expect.gone:
                continue
            got = fs.read(sample.ino[path], 0, READ_ALL)
            holes = expect.holes.get(path, set())
            for i in range(0, len(data), BLOCK_SIZE):
                want = data[i:i + BLOCK_SIZE]
                if i // BLOCK_SIZE in holes:
                    want = bytes(len(want))
                assert got[i:i + BLOCK_SIZE] == want, f"{path} block {i // BLOCK_SIZE}"
        big = _listing(fs, sample.ino["/big"])
        assert {f"/big/{n}" for n in big} == {
            f"/big/{n}" for n in sample.big_dir_names} - expect.lost
        if "/attrs" not in expect.gone:
            ino = sample.ino["/attrs"]
            xattrs = {n: fs.getxattr(ino, n) for n in fs.listxattr(ino)}
            assert xattrs in (sample.xattrs, {}), xattrs


def _check_writable(image: Path) -> None:
    with mounted(image) as fs:
        assert not fs.read_only, fs.error
        ino = fs.create(ROOT_INO, b"after-repair", 0o644, ROOT).ino
        assert fs.write(ino, 0, b"z" * 100_000, ROOT) == 100_000
        fs.mkdir(ROOT_INO, b"after-repair-dir", 0o755, ROOT)
    with mounted(image, read_only=True) as fs:
        ino = fs.lookup(ROOT_INO, b"after-repair", ROOT).ino
        assert fs.read(ino, 0, 200_000) == b"z" * 100_000
    code, output = fsck_clean(image)  # in-process: the exit codes were run for real above
    assert code == 0, output


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    return populate(tmp_path_factory.mktemp("pristine") / "vol.img")


@pytest.fixture
def sample(pristine: Sample, tmp_path: Path) -> Sample:
    """A private copy of the populated sample volume, for one test to damage."""
    return dataclasses.replace(pristine, path=sparse_copy(pristine.path, tmp_path / "vol.img"))


@pytest.mark.parametrize("name", list(CASES))
def test_damage(name: str, sample: Sample, tmp_path: Path,
                caplog: pytest.LogCaptureFixture) -> None:
    case = CASES[name]
    image = sample.path
    expect = case.damage(sample, Vol.of(image))

    # The filesystem in-process, on a copy.
    with caplog.at_level(logging.ERROR):
        seen: Probe = probe(image, tmp_path / "probe.img")
    check_probe(seen, detect=case.detect)
    if seen.eio:
        # Integrity failures are logged with the block and structure.
        assert any(r.levelno >= logging.ERROR and "corrupt" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]

    # fsck -n: finds it, names it, changes nothing.
    before = file_hash(image)
    check = fsck(image, "-n", "-f")
    assert check.returncode == 4, check.stdout + check.stderr
    assert re.search(case.names, check.stdout), check.stdout
    assert file_hash(image) == before, "fsck -n changed the image"

    # fsck -y repairs; a second check finds nothing.
    repair = fsck(image, "-y", "-f")
    assert repair.returncode == 1, repair.stdout + repair.stderr
    again = fsck(image, "-n", "-f")
    assert again.returncode == 0, again.stdout + again.stderr

    _check_repaired_contents(image, sample, expect)
    _check_writable(image)


def test_primary_superblock_is_rewritten(sample: Sample) -> None:
    """The mount uses the backup; fsck -y writes a good primary again."""
    image = sample.path
    primary_superblock(sample, Vol.of(image))
    with pytest.raises(CorruptionError):
        Superblock.decode(Vol.of(image).block(0), 0)
    with mounted(image, read_only=True) as fs:
        assert fs.lookup(ROOT_INO, b"victim", ROOT).ino == sample.ino["/victim"]
    assert fsck(image, "-y", "-f").returncode == 1
    sb = Superblock.decode(Vol.of(image).block(0), 0)
    assert sb.geo.nblocks * BLOCK_SIZE == image.stat().st_size


def test_both_superblocks(sample: Sample, tmp_path: Path) -> None:
    """Neither copy is usable: everything refuses with one clear line."""
    image = sample.path
    vol = Vol.of(image)
    vol.scribble(0, offset=120, nbytes=8)
    vol.scribble(vol.geo.backup_sb, offset=120, nbytes=8)
    seen = probe(image, tmp_path / "probe.img")
    assert isinstance(seen.refused, CorruptionError), seen
    assert "both superblocks damaged" in str(seen.refused)
    before = file_hash(image)
    for flags, code in ((("-n", "-f"), 4), (("-y", "-f"), 4), ((), 4)):
        result = fsck(image, *flags)
        assert result.returncode == code, (flags, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "both superblocks damaged" in lines[0], result.stderr
    assert file_hash(image) == before
    info = tool("nexfs", "info", image)
    assert info.returncode == 8
    assert "both superblocks damaged" in info.stderr


def test_lost_inode_named_by_number(sample: Sample) -> None:
    """The unnamed inode lands in lost+found as #INO with its data, and the volume stays
    usable from there (the file can be renamed back)."""
    image = sample.path
    unnamed_inode(sample, Vol.of(image))
    assert fsck(image, "-y", "-f").returncode == 1
    ino = sample.ino["/victim"]
    with mounted(image) as fs:
        attr = fs.lookup(LOST_FOUND_INO, f"#{ino}".encode(), ROOT)
        assert attr.ino == ino and attr.nlink == 1 and stat.S_ISREG(attr.mode)
        fs.rename(LOST_FOUND_INO, f"#{ino}".encode(), ROOT_INO, b"victim", 0, ROOT)
    assert fsck(image, "-n", "-f").returncode == 0


def test_damaged_object_eio_rest_served(sample: Sample, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """A damaged inode: EIO for that file only, every other file still reads, and the
    volume turns read-only (new files refused with EROFS) and is marked as needing fsck."""
    image = sample.path
    inode_table(sample, Vol.of(image))
    with caplog.at_level(logging.ERROR), Valve.open(image) as v:
        fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
        try:
            with pytest.raises(FsError) as info:
                fs.lookup(ROOT_INO, b"victim", ROOT)
            assert info.value.errno == errno.EIO
            assert fs.read_only
            deep = fs.lookup(sample.ino["/sub/inner"], b"deep", ROOT).ino
            assert fs.read(deep, 0, 100) == sample.data["/sub/inner/deep"]
            with pytest.raises(FsError) as info:
                fs.create(ROOT_INO, b"new", 0o644, ROOT)
            assert info.value.errno == errno.EROFS
        finally:
            fs.close()
    assert any(f"inode {sample.ino['/victim']}" in r.getMessage() for r in caplog.records)
    result = tool("nexfs", "info", image)
    assert result.returncode == 0 and "needs fsck" in result.stdout
    # Without -f, fsck checks a volume marked as needing it.
    result = fsck(image, "-n")
    assert result.returncode == 4 and "needing fsck" in result.stdout


# -- the root inode and the superblock copies (once known gaps, docs/RELIABILITY.md) --------


def _root_garbled(s: Sample, vol: Vol) -> None:
    where = vol.inode_offset(ROOT_INO)
    vol.scribble(where // BLOCK_SIZE, where % BLOCK_SIZE + 16, 8)


def _root_not_a_directory(s: Sample, vol: Vol) -> None:
    root = vol.inode(ROOT_INO)
    root.mode = stat.S_IFREG | 0o644  # checksum recomputed: only the type is wrong
    vol.write_inode(root)


def _root_and_lost_found_garbled(s: Sample, vol: Vol) -> None:
    for ino in (ROOT_INO, LOST_FOUND_INO):
        where = vol.inode_offset(ino)
        vol.scribble(where // BLOCK_SIZE, where % BLOCK_SIZE + 16, 8)


@pytest.mark.parametrize("damage", [_root_garbled, _root_not_a_directory,
                                    _root_and_lost_found_garbled],
                         ids=["garbled", "not-a-directory", "with-lost+found"])
def test_damaged_root_inode_is_recreated(damage: Callable[[Sample, Vol], None],
                                         sample: Sample) -> None:
    """fsck -y recreates inode 1 as an empty 0755 directory, links lost+found into it (inode
    2 if it is still a directory, else a new one) and reconnects everything that was only
    reachable through the old root there as #INO, subtrees and data intact."""
    image = sample.path
    damage(sample, Vol.of(image))
    check = fsck(image, "-n", "-f")
    assert check.returncode == 4, check.stdout + check.stderr
    assert "root directory (inode 1) is damaged" in check.stdout, check.stdout
    repair = fsck(image, "-y", "-f")
    assert repair.returncode == 1, repair.stdout + repair.stderr
    assert "recreating the root directory" in repair.stdout, repair.stdout
    again = fsck(image, "-n", "-f")
    assert again.returncode == 0, again.stdout + again.stderr
    top = {"/big", "/frag", "/filler", "/attrs", "/victim", "/b", "/sub", "/sym"}
    with mounted(image, read_only=True) as fs:
        root = fs.getattr(ROOT_INO)
        assert root.mode == stat.S_IFDIR | 0o755 and root.nlink == 3
        assert list(_listing(fs, ROOT_INO)) == ["lost+found"]
        lf = fs.lookup(ROOT_INO, b"lost+found", ROOT)
        assert stat.S_ISDIR(lf.mode)
        if damage is not _root_and_lost_found_garbled:
            assert lf.ino == LOST_FOUND_INO
        assert set(_listing(fs, lf.ino)) == {f"#{sample.ino[p]}" for p in top}
        # Subtrees came along: /a is still reachable through /sub/hard, /sub/inner/deep too.
        sub = sample.ino["/sub"]
        assert fs.read(fs.lookup(sub, b"hard", ROOT).ino, 0, READ_ALL) == sample.data["/a"]
        inner = fs.lookup(sub, b"inner", ROOT).ino
        deep = fs.lookup(inner, b"deep", ROOT).ino
        assert fs.read(deep, 0, READ_ALL) == sample.data["/sub/inner/deep"]
        for path in ("/frag", "/victim", "/b"):
            assert fs.read(sample.ino[path], 0, READ_ALL) == sample.data[path]
        assert len(_listing(fs, sample.ino["/big"])) == len(sample.big_dir_names)
    _check_writable(image)


@pytest.mark.parametrize("copy", ["primary", "backup"])
def test_superblock_copy_with_another_uuid(copy: str, sample: Sample) -> None:
    """A copy whose UUID was changed and whose checksum was recomputed is valid and of the
    same generation as the other: the copy whose UUID verifies the volume's metadata wins
    (mount and fsck alike), the other is reported and rewritten by fsck -y."""
    image = sample.path
    vol = Vol.of(image)
    where = 0 if copy == "primary" else vol.geo.backup_sb
    sb = Superblock.decode(vol.block(where), where)
    good_uuid = sb.uuid
    sb.uuid = bytes(b ^ 0xA5 for b in good_uuid)
    sb.__post_init__()  # the checksum seed follows the UUID
    write_at(image, where * BLOCK_SIZE, sb.encode(where))
    assert Superblock.decode(Vol.of(image).block(where), where).uuid != good_uuid
    with mounted(image, read_only=True) as fs:
        assert fs.store.sb.uuid == good_uuid
        victim = fs.lookup(ROOT_INO, b"victim", ROOT).ino
        assert fs.read(victim, 0, READ_ALL) == sample.data["/victim"]
    before = file_hash(image)
    check = fsck(image, "-n", "-f")
    assert check.returncode == 4, check.stdout + check.stderr
    assert re.search(rf"{copy} superblock \(block {where}\) is unusable: its UUID",
                     check.stdout), check.stdout
    assert "checksum mismatch" not in check.stdout, check.stdout  # nothing else is damaged
    assert file_hash(image) == before
    repair = fsck(image, "-y", "-f")
    assert repair.returncode == 1, repair.stdout + repair.stderr
    assert Superblock.decode(Vol.of(image).block(where), where).uuid == good_uuid
    again = fsck(image, "-n", "-f")
    assert again.returncode == 0, again.stdout + again.stderr
    _check_writable(image)
