"""Hostile images: a small populated NexFS volume, and every way to damage it field by field.

:func:`populated_images` builds two 4 MiB volumes (4096-byte sectors) holding files, a
fragmented file with an extent tree, a directory of 200 entries (an interior index node),
inline and long symlinks, a hard link, small and multi-chunk xattrs, and an orphan: one
cleanly closed, one "crashed" with committed transactions still in its journal.

:func:`mutations` enumerates, from the format (docs/FORMAT.md), every field of every
structure — both superblock copies, the state block, bitmap and summary blocks, every
allocated inode slot, every tree node (header, counts, first/middle/last key, length, value and
child), journal descriptors and commit blocks — and for each field the mutations zero, all
ones, random, a bit flip, +1 and -1, each with the checksum left broken or recomputed to match
(``seal_block`` / the inode's own crc / the superblock crc / the journal's transaction crc),
plus whole blocks overwritten with garbage (raw, or with a valid header and checksum).
Each :class:`Mutation` applies itself to a copy of the image (a dict block -> bytes).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from memdev import MemDevice

from nexfs.check.checker import scan
from nexfs.core.attr import Ctx
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk import checksum
from nexfs.ondisk.layout import SB_CRC_OFFSET, Superblock
from nexfs.ondisk.metablock import (
    BLOCK_SIZE,
    MAGIC_BTREE_INNER,
    MAGIC_BTREE_LEAF,
    MAGIC_JCOMMIT,
    MAGIC_JDESC,
    seal_block,
)
from nexfs.store.journal import DESC_ENTRIES, JCOMMIT, JHEADER

ROOT = Ctx()
Image = dict[int, bytes]  # block number -> 4096 bytes (absent = zeros)
OPS = ("zero", "ones", "random", "bitflip", "plus1", "minus1")

# (name, offset, size) of the superblock fields (docs/FORMAT.md, "Superblock").
SB_FIELDS = [
    ("magic", 0, 8), ("crc", 8, 4), ("version", 12, 4), ("block_size", 16, 4),
    ("sector_size", 20, 4), ("nblocks", 24, 8), ("ninodes", 32, 8), ("compat", 40, 4),
    ("incompat", 44, 4), ("ro_compat", 48, 4), ("state", 52, 4), ("generation", 56, 8),
    ("self", 64, 8), ("uuid", 72, 16), ("dir_hash_key", 88, 16), ("label", 104, 64),
    ("state_block", 168, 8), ("journal_start", 176, 8), ("journal_len", 184, 8),
    ("bbitmap_start", 192, 8), ("bbitmap_len", 200, 8), ("bsummary_start", 208, 8),
    ("bsummary_len", 216, 8), ("ibitmap_start", 224, 8), ("ibitmap_len", 232, 8),
    ("isummary_start", 240, 8), ("isummary_len", 248, 8), ("itable_start", 256, 8),
    ("itable_len", 264, 8), ("data_start", 272, 8), ("backup_sb", 280, 8),
    ("mkfs_time", 288, 8), ("mount_time", 296, 8), ("write_time", 304, 8),
    ("check_time", 312, 8), ("mount_count", 320, 4), ("sb_reserved", 324, 4),
    ("journal_tid", 328, 8), ("sb_free_blocks", 336, 8), ("sb_free_inodes", 344, 8),
    ("error_reason", 352, 64), ("tail", 1000, 8),
]
HEADER_FIELDS = [("magic", 0, 4), ("crc", 4, 4), ("self", 8, 8), ("owner", 16, 8),
                 ("tid", 24, 8)]
STATE_FIELDS = [
    *HEADER_FIELDS, ("free_blocks", 32, 8), ("free_inodes", 40, 8), ("orphan_head", 48, 8),
    ("next_generation", 56, 8), ("data_hint", 64, 8), ("meta_hint", 72, 8),
    ("inode_hint", 80, 8), ("reserved", 88, 8)]
INODE_FIELDS = [
    ("mode", 0, 4), ("uid", 4, 4), ("gid", 8, 4), ("nlink", 12, 4), ("size", 16, 8),
    ("blocks", 24, 8), ("rdev", 32, 8), ("atime_s", 40, 8), ("atime_ns", 48, 4),
    ("mtime_s", 52, 8), ("mtime_ns", 60, 4), ("ctime_s", 64, 8), ("ctime_ns", 72, 4),
    ("btime_s", 76, 8), ("btime_ns", 84, 4), ("generation", 88, 4), ("flags", 92, 4),
    ("xattr_root", 96, 8), ("orphan_next", 104, 8), ("parent", 112, 8),
    ("reserved", 120, 4), ("crc", 124, 4),
    # data area: extent map header / directory root / inline symlink
    ("area_mode", 128, 1), ("area_count", 129, 1), ("area_reserved", 130, 2),
    ("area_tree_nodes", 132, 4), ("area_root", 136, 8),
    ("rec0_lblk", 144, 4), ("rec0_len", 148, 4), ("rec0_phys", 152, 8),
    ("rec1_lblk", 160, 4), ("rec1_len", 164, 4), ("rec1_phys", 168, 8),
    ("area_tail", 248, 8),
]
DESC_FIELDS = [("magic", 0, 4), ("crc", 4, 4), ("self", 8, 8), ("tid", 16, 8),
               ("nimages", 24, 4), ("index", 28, 2), ("ndesc", 30, 2), ("home0", 32, 8),
               ("home1", 40, 8), ("tail", 4088, 8)]
COMMIT_FIELDS = [("magic", 0, 4), ("crc", 4, 4), ("self", 8, 8), ("tid", 16, 8),
                 ("nblocks", 24, 4), ("nimages", 28, 4), ("txn_crc", 32, 4),
                 ("reserved", 36, 4), ("time", 40, 8)]


@dataclass
class Base:
    """A populated volume to damage."""

    name: str
    image: Image
    total_sectors: int
    seed: int  # volume seed (crc of the uuid)
    sb: Superblock
    inodes: list[int]
    tree_nodes: list[int]
    data_blocks: list[int]

    def device(self, image: Image | None = None) -> MemDevice:
        return MemDevice(self.total_sectors, BLOCK_SIZE, sectors=image or self.image)


@dataclass
class Mutation:
    """One damaged image: ``what`` says where and how; ``apply`` makes it from a copy."""

    what: str
    apply: Callable[[Image], None]

    def image(self, base: Base) -> Image:
        img = dict(base.image)
        self.apply(img)
        return img


def _populate(fs: FileSystem) -> int:
    """Fill a fresh volume; returns the inode of a file left open (to become an orphan)."""
    rng = random.Random(1)
    d = fs.mkdir(ROOT_INO, b"docs", 0o755, ROOT).ino
    a = fs.create(d, b"a.txt", 0o644, ROOT).ino
    fs.write(a, 0, b"hello world\n" * 300, ROOT)
    fs.setxattr(a, b"user.small", b"s" * 20, 0, ROOT)
    fs.setxattr(a, b"user.big", rng.randbytes(3000), 0, ROOT)
    fs.link(a, ROOT_INO, b"a-link", ROOT)
    fs.symlink(d, b"short", b"a.txt", ROOT)
    fs.symlink(d, b"long", b"../" * 100 + b"docs/a.txt", ROOT)
    f1 = fs.create(ROOT_INO, b"frag1", 0o600, ROOT).ino
    f2 = fs.create(ROOT_INO, b"frag2", 0o600, ROOT).ino
    for i in range(20):  # interleaved single blocks: two files of 20 extents (a tree)
        fs.write(f1, i * BLOCK_SIZE, bytes([i + 1]) * BLOCK_SIZE, ROOT)
        fs.write(f2, i * BLOCK_SIZE, bytes([i + 101]) * BLOCK_SIZE, ROOT)
    big = fs.mkdir(ROOT_INO, b"big", 0o755, ROOT).ino
    for i in range(200):  # ~65 per leaf: several leaves under an interior node
        fs.create(big, f"entry-number-{i:04d}-of-the-big-directory-here".encode(), 0o644,
                  ROOT)
    fs.mkdir(d, b"empty", 0o700, ROOT)
    fs.mknod(ROOT_INO, b"fifo", 0o010644, 0, ROOT)
    hole = fs.create(ROOT_INO, b"sparse", 0o644, ROOT).ino
    fs.write(hole, 1 << 20, b"end", ROOT)
    orphan = fs.create(ROOT_INO, b"orphan", 0o644, ROOT).ino
    fs.write(orphan, 0, b"o" * 5000, ROOT)
    fs.ref(orphan)
    fs.unlink(ROOT_INO, b"orphan", ROOT)
    return orphan


def populated_images() -> list[Base]:
    bases = []
    for name in ("clean", "journal"):
        dev = MemDevice.of_size(4 << 20, BLOCK_SIZE)
        FileSystem.format(dev)
        fs = FileSystem.open(dev)
        orphan = _populate(fs)
        if name == "clean":
            fs.unref(orphan)
            fs.close()
            image = dict(dev.sectors)
        else:
            fs.commit(durable=True)
            # More committed transactions after a checkpoint: they stay in the journal.
            fs.store.checkpoint()
            x = fs.create(ROOT_INO, b"journaled", 0o644, ROOT).ino
            fs.write(x, 0, b"j" * 9000, ROOT)
            fs.setxattr(x, b"user.j", b"v", 0, ROOT)
            fs.commit(durable=True)
            fs.rename(ROOT_INO, b"frag2", ROOT_INO, b"frag2-renamed", 0, ROOT)
            fs.commit(durable=True)
            image = dict(dev.crash().sectors)  # power cut: journal not checkpointed
        probe = FileSystem.open(MemDevice(dev.total_sectors, BLOCK_SIZE, sectors=image),
                                read_only=True)
        found = scan(probe.store)
        assert found.clean, found.problems
        sb = probe.store.sb
        inos = sorted(found.inodes)
        nodes = sorted({b for info in found.inodes.values()
                        for b in info.tree_blocks + info.xattr_blocks})
        data = sorted({p + k for info in found.inodes.values() for _l, p, n in info.runs
                       for k in range(min(n, 2))})
        probe.close()
        bases.append(Base(name, image, dev.total_sectors, sb.volume_seed, sb, inos, nodes,
                          data))
    return bases


# -- mutating one field -------------------------------------------------------------------------


def _mutate_bytes(raw: bytes, op: str, rng: random.Random) -> bytes:
    n = len(raw)
    if op == "zero":
        return bytes(n)
    if op == "ones":
        return b"\xff" * n
    if op == "random":
        return rng.randbytes(n)
    value = int.from_bytes(raw, "little")
    if op == "bitflip":
        value ^= 1 << rng.randrange(8 * n)
    elif op == "plus1":
        value = (value + 1) % (1 << 8 * n)
    else:
        value = (value - 1) % (1 << 8 * n)
    return value.to_bytes(n, "little")


Resealer = Callable[[bytearray, Image], None]


def _field_mutation(base: Base, where: str, blkno: int, offset: int, size: int, op: str,
                    reseal: Resealer | None, seed: int) -> Mutation:
    def apply(img: Image) -> None:
        buf = bytearray(img.get(blkno, bytes(BLOCK_SIZE)))
        buf[offset : offset + size] = _mutate_bytes(bytes(buf[offset : offset + size]), op,
                                                    random.Random(seed))
        if reseal is not None:
            reseal(buf, img)
        img[blkno] = bytes(buf)

    mode = "resealed" if reseal else "crc broken"
    return Mutation(f"{base.name}: {where} {op} ({mode})", apply)


def _seal_meta(seed: int, blkno: int) -> Resealer:
    return lambda buf, _img: seal_block(memoryview(buf), seed, blkno)


def _seal_sb(blkno: int) -> Resealer:
    def reseal(buf: bytearray, _img: Image) -> None:
        uuid = bytes(buf[72:88])
        checksum.seal(buf, SB_CRC_OFFSET, checksum.uuid_seed(uuid), blkno)
    return reseal


def _seal_inode(seed: int, ino: int) -> Resealer:
    slot = (ino - 1) % 16 * 256

    def reseal(buf: bytearray, _img: Image) -> None:
        view = memoryview(buf)[slot : slot + 256]
        checksum.seal(view, 124, seed, ino)
    return reseal


def _reseal_journal(base: Base) -> Resealer:
    """Recompute descriptor, commit and transaction checksums of every transaction the
    (mutated) journal still describes, so only the semantic damage remains."""
    g = base.sb.geo
    seed = base.seed

    def reseal(_buf: bytearray, img: Image) -> None:
        pos = 0
        while pos + 2 <= g.journal_len:
            head = img.get(g.journal_start + pos, bytes(BLOCK_SIZE))
            f = JHEADER.unpack_from(head, 0)
            n = f[4]
            if f[0] != MAGIC_JDESC or not 1 <= n <= g.journal_len:
                return
            ndesc = max(1, -(-n // DESC_ENTRIES))
            total = ndesc + n + 1
            if pos + total > g.journal_len:
                return
            blocks = []
            for k in range(total - 1):
                blk = bytearray(img.get(g.journal_start + pos + k, bytes(BLOCK_SIZE)))
                if k < ndesc:
                    checksum.seal(blk, 4, seed, g.journal_start + pos + k)
                    img[g.journal_start + pos + k] = bytes(blk)
                blocks.append(bytes(blk))
            cno = g.journal_start + pos + total - 1
            cblk = bytearray(img.get(cno, bytes(BLOCK_SIZE)))
            c = JCOMMIT.unpack_from(cblk, 0)
            if c[0] != MAGIC_JCOMMIT:
                return
            crc = checksum.crc32c(b"".join(blocks), checksum.block_seed(seed, c[3]))
            struct.pack_into("<I", cblk, 32, crc)
            checksum.seal(cblk, 4, seed, cno)
            img[cno] = bytes(cblk)
            pos += total

    return reseal


def _both(first: Resealer, second: Resealer) -> Resealer:
    def reseal(buf: bytearray, img: Image) -> None:
        first(buf, img)
        second(buf, img)
    return reseal


def _node_fields(raw: bytes) -> list[tuple[str, int, int]]:
    fields = [*HEADER_FIELDS, ("level", 32, 1), ("kind", 33, 1), ("count", 34, 2),
              ("node_reserved", 36, 4)]
    level, _kind, count, _r = struct.unpack_from("<BBHI", raw, 32)
    count = min(count, 253)
    for i in sorted({0, count // 2, max(0, count - 1)}):
        fields.append((f"key[{i}]", 40 + 8 * i, 8))
        if level:
            fields.append((f"child[{i}]", 40 + 8 * count + 8 * i, 8))
        else:
            fields.append((f"len[{i}]", 40 + 8 * count + 2 * i, 2))
    if not level and count:
        lens = struct.unpack_from(f"<{count}H", raw, 40 + 8 * count)
        off = 40 + 10 * count
        for i, n in enumerate(lens):
            if i in (0, count // 2, count - 1) and n:
                fields.append((f"value[{i}]", off, min(8, n)))
                if n > 9:
                    fields.append((f"value[{i}]+8", off + 8, min(4, n - 8)))
            off += n
    return fields


def _targets(base: Base) -> Iterator[tuple[str, int, int, int, Resealer | None]]:
    """(where, block, offset, size, resealer) for every field of every structure."""
    g = base.sb.geo
    seed = base.seed
    for blk, label in ((0, "primary superblock"), (g.backup_sb, "backup superblock")):
        for name, off, size in SB_FIELDS:
            yield f"{label}.{name}", blk, off, size, _seal_sb(blk)
    for name, off, size in STATE_FIELDS:
        yield f"state block.{name}", 1, off, size, _seal_meta(seed, 1)
    for start, label in ((g.bbitmap_start, "block bitmap"), (g.ibitmap_start, "inode bitmap"),
                         (g.bsummary_start, "block summary"),
                         (g.isummary_start, "inode summary")):
        fields = HEADER_FIELDS + ([("entry0", 32, 4), ("entry1", 36, 4)] if "summary" in label
                                  else [("bits0", 32, 8), ("bits-data", 32 + g.data_start // 8,
                                                           8), ("bits-end", 32 + 120, 8)])
        for name, off, size in fields:
            yield f"{label}.{name}", start, off, size, _seal_meta(seed, start)
    for ino in base.inodes:
        tblk = g.itable_start + (ino - 1) // 16
        slot = (ino - 1) % 16 * 256
        for name, off, size in INODE_FIELDS:
            yield f"inode {ino}.{name}", tblk, slot + off, size, _seal_inode(seed, ino)
    for blk in base.tree_nodes:
        raw = base.image.get(blk, bytes(BLOCK_SIZE))
        magic = struct.unpack_from("<I", raw, 0)[0]
        if magic not in (MAGIC_BTREE_LEAF, MAGIC_BTREE_INNER):
            continue  # its current image is still in the journal, not yet home
        kind = "interior" if magic == MAGIC_BTREE_INNER else "leaf"
        for name, off, size in _node_fields(raw):
            yield f"{kind} node {blk}.{name}", blk, off, size, _seal_meta(seed, blk)
    # The journal (only the crashed base has transactions in it).
    pos = 0
    while base.name == "journal" and pos + 2 <= g.journal_len:
        head = base.image.get(g.journal_start + pos, bytes(BLOCK_SIZE))
        f = JHEADER.unpack_from(head, 0)
        if f[0] != MAGIC_JDESC:
            break
        n = f[4]
        ndesc = max(1, -(-n // DESC_ENTRIES))
        desc_blk = g.journal_start + pos
        commit_blk = desc_blk + ndesc + n
        for name, off, size in DESC_FIELDS:
            yield (f"journal txn {f[3]} descriptor.{name}", desc_blk, off, size,
                   _reseal_journal(base))
        for name, off, size in COMMIT_FIELDS:
            yield (f"journal txn {f[3]} commit.{name}", commit_blk, off, size,
                   _reseal_journal(base))
        # An image inside the transaction: its own header damaged, txn crc recomputed.
        img_blk = desc_blk + ndesc
        home = struct.unpack_from("<Q", head, 32)[0]
        for name, off, size in [*HEADER_FIELDS, ("body", 64, 8)]:
            yield (f"journal txn {f[3]} image of {home}.{name}", img_blk, off, size,
                   _both(_seal_meta(seed, home), _reseal_journal(base)))
        pos += ndesc + n + 1


def mutations(base: Base, rng: random.Random) -> list[Mutation]:
    """Every field x every op x {crc broken, resealed}, then whole-block garbage."""
    out: list[Mutation] = []
    for where, blk, off, size, reseal in _targets(base):
        for op in OPS:
            seed = rng.randrange(1 << 30)
            out.append(_field_mutation(base, where, blk, off, size, op, None, seed))
            if not where.endswith(".crc"):
                out.append(_field_mutation(base, where, blk, off, size, op, reseal, seed))
    g = base.sb.geo
    meta = [0, 1, g.bbitmap_start, g.bsummary_start, g.ibitmap_start, g.isummary_start,
            g.backup_sb, *range(g.itable_start, g.itable_start + 4), *base.tree_nodes]
    for blk in meta + base.data_blocks[:20] + [g.journal_start, g.journal_start + 1]:
        out.append(_garbage(base, blk, rng.randrange(1 << 30), sealed=False))
        if blk not in (0, g.backup_sb) and not g.itable_start <= blk < g.data_start:
            out.append(_garbage(base, blk, rng.randrange(1 << 30), sealed=True))
    return out


def _garbage(base: Base, blkno: int, seed: int, *, sealed: bool) -> Mutation:
    """The block overwritten with random bytes; ``sealed`` keeps its magic and makes the
    header and checksum valid, so only the body is garbage."""
    def apply(img: Image) -> None:
        rng = random.Random(seed)
        old = img.get(blkno, bytes(BLOCK_SIZE))
        buf = bytearray(rng.randbytes(BLOCK_SIZE))
        if sealed:
            buf[0:4] = old[0:4]
            buf[8:32] = old[8:32]  # self, owner, tid
            seal_block(memoryview(buf), base.seed, blkno)
        img[blkno] = bytes(buf)

    how = "header kept, resealed" if sealed else "raw"
    return Mutation(f"{base.name}: block {blkno} garbage ({how})", apply)


def random_garbage(base: Base, rng: random.Random, count: int) -> list[Mutation]:
    """Random blocks anywhere in the volume overwritten with garbage."""
    n = base.sb.geo.nblocks
    return [_garbage(base, rng.randrange(n), rng.randrange(1 << 30), sealed=False)
            for _ in range(count)]
