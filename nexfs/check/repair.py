"""Repairing a volume from what :func:`nexfs.check.checker.scan` found (fsck.nexfs -y).

The order matters.  First the allocation bitmaps, summaries and free counts are rewritten
from the scan's computed truth, so that every later fix can allocate and free through the
ordinary store.  Then damaged inodes are cleared, damaged trees are rebuilt from what could
be read, bad directory entries are dropped, unreachable inodes are linked into lost+found and
pending orphans are freed.  Every change goes through the journal, so an interrupted repair
is itself crash-safe.  fsck then scans again and fixes the counts that the structural repairs
changed (link counts, '..', i_blocks).
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from collections.abc import Callable

from nexfs.check.checker import InodeInfo, Scan
from nexfs.core.attr import ROOT_CTX
from nexfs.core.fs import FileSystem
from nexfs.core.objects import LOST_FOUND_INO, ROOT_INO
from nexfs.ondisk.bitmap import BPB, UNINIT, Bitmap, BitmapBlock, SummaryBlock
from nexfs.ondisk.inode_record import INODE_FLAG_INLINE, INODE_FLAG_ORPHAN, Inode, free_slot
from nexfs.ondisk.layout import SUMMARY_ENTRIES
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.store import Store
from nexfs.types import BlockNo, CorruptionError, FsError, InodeNo

log = logging.getLogger(__name__)

Say = Callable[[str], None]


def rewrite_bitmap(store: Store, bitmap: Bitmap, used: dict[int, int]) -> int:
    """Make ``bitmap`` and its summary say exactly ``used``; returns the free count.

    The old blocks are read only to skip rewriting the ones that are already right; damaged
    ones are expected here and simply replaced.  A group with nothing in use becomes UNINIT
    (it is never read again), so a big, mostly empty volume stays cheap.
    """
    total_free = 0
    for s in range(-(-bitmap.ngroups // SUMMARY_ENTRIES)):
        nvalid = min(SUMMARY_ENTRIES, bitmap.ngroups - s * SUMMARY_ENTRIES)
        entries = [0] * SUMMARY_ENTRIES
        for i in range(nvalid):
            g = s * SUMMARY_ENTRIES + i
            tail = bitmap.tail_mask(g)
            want = used.get(g, 0) | tail
            free = BPB - want.bit_count()
            total_free += free
            if want == tail:
                entries[i] = UNINIT | free
                continue
            blk: BitmapBlock | None
            try:
                with store.tolerating_damage():
                    blk = bitmap.group(g, create=False)
            except CorruptionError:
                blk = None
            if blk is None:
                store.put_new(BitmapBlock(BlockNo(bitmap.bitmap_start + g), bitmap.magic, g,
                                          want))
            elif blk.bits != want:
                blk.bits = want
                store.dirty(blk)
            entries[i] = free
        sblk = BlockNo(bitmap.summary_start + s)
        store.put_new(SummaryBlock(sblk, bitmap.summary_magic, s, entries))
    bitmap.reset()
    return total_free


class Repairer:
    """Applies the fixes for one :class:`Scan` to a writable store."""

    def __init__(self, store: Store, found: Scan, say: Say) -> None:
        self.store = store
        self.found = found
        self.say = say
        self.fs = FileSystem(store)
        self.objects = self.fs.objects

    def run(self) -> None:
        self.timeline()
        self.allocation()
        self.bad_inodes()
        self.damaged_trees()
        self.entries()
        self.orphans()
        self.rebuild_root()
        self.reconnect()
        self.fs.inodes.flush()
        self.store.commit(durable=True)

    def timeline(self) -> None:
        """Blocks stamped with a tid newer than the last commit: their content passed every
        other check, so they are kept and written again under a tid of this history (a
        later step that rewrites or frees one of them simply takes over)."""
        for blkno in self.found.wrong_timeline:
            self.say(f"block {blkno}: rewriting it under the current transaction")
            self.store.restamp(BlockNo(blkno))

    def allocation(self) -> None:
        found, store = self.found, self.store
        if not (found.bitmap_damage or found.counts_wrong or found.bad_inodes
                or any(i.tree_damage or i.xattr_damage for i in found.inodes.values())):
            return
        self.say("rewriting the allocation bitmaps from the blocks and inodes in use")
        bfree = rewrite_bitmap(store, store.blocks, found.used_blocks)
        ifree = rewrite_bitmap(store, store.inodes, found.used_inodes)
        state = store.state
        state.free_blocks = bfree
        state.free_inodes = ifree
        if store.state_damage:
            self.say("rewriting the state block")
            state.next_generation = found.max_generation % 0xFFFF_FFFF + 1
        store.dirty(state)

    def bad_inodes(self) -> None:
        seed = self.store.volume_seed
        for ino in self.found.bad_inodes:
            self.say(f"clearing inode {ino}")
            self.store.itable.write_raw(InodeNo(ino), free_slot(InodeNo(ino), seed))

    def damaged_trees(self) -> None:
        fs, objects = self.fs, self.objects
        for ino, info in self.found.inodes.items():
            if not (info.tree_damage or info.xattr_damage or info.conflicts or info.past_eof):
                continue
            inode = fs.inodes.get(ino)
            if info.xattr_damage:
                self.say(f"inode {ino}: dropping its damaged extended attributes")
                objects.xattrs(inode).abandon()
            if inode.is_dir and info.tree_damage:
                self._rebuild_directory(info)
            elif info.tree_damage and not inode.is_dir and not (
                inode.is_symlink and inode.flags & INODE_FLAG_INLINE
            ):
                self._rebuild_extents(info)
            elif info.conflicts or info.past_eof:
                data = objects.data(inode)
                for lblk, _phys, n in info.conflicts:
                    self.say(f"inode {ino}: unmapping blocks shared with another file")
                    data.emap.punch(lblk, n)  # the blocks stay with their other owner
                    inode.blocks -= n
                if info.past_eof:
                    self.say(f"inode {ino}: freeing blocks past the end of the file")
                    self.objects.release_data(inode, -(-inode.size // BLOCK_SIZE), protect=False)
            elif info.tree_damage:
                self.say(f"inode {ino}: bad symlink; clearing it")
                inode.size = 0
                inode.nlink = 0
            objects.dirty(inode)

    def _rebuild_extents(self, info: InodeInfo) -> None:
        inode = self.objects.inode(info.ino)
        self.say(f"inode {info.ino}: rebuilding its extent map from {len(info.runs)} "
                 "readable extent(s)")
        emap = self.objects.new_extent_map(inode)
        for lblk, phys, n in info.runs:
            emap.insert(lblk, phys, n)
            inode.blocks += n
        end = max((lblk + n for lblk, _p, n in info.runs), default=0) * BLOCK_SIZE
        inode.size = min(inode.size, end) if info.runs else 0

    def _rebuild_directory(self, info: InodeInfo) -> None:
        inode = self.objects.inode(info.ino)
        self.say(f"directory {info.ino}: rebuilding its index from {len(info.entries)} "
                 "readable entries")
        directory = self.objects.new_directory_index(inode)
        for _cookie, name, child, dtype in info.entries:
            if child in self.found.inodes:
                try:
                    directory.index.insert(name, child, dtype)
                except FsError:
                    continue
        directory.write_back()

    def entries(self) -> None:
        objects = self.objects
        drops = [(d, n) for d, n, _w in self.found.bad_entries]
        drops += [(d, n) for d, n, _c in self.found.extra_parents]
        for dino, name in drops:
            if self.found.inodes[dino].tree_damage:
                continue  # rebuilt without it
            self.say(f"directory {dino}: removing entry {name!r}")
            directory = objects.directory(objects.inode(dino))
            try:
                directory.remove(name)
            except FsError:
                continue
        for dino, name, child, want in self.found.wrong_dtype:
            directory = objects.directory(objects.inode(dino))
            self.say(f"directory {dino}: fixing the type of entry {name!r}")
            try:
                directory.replace(name, child, want)
            except FsError:
                continue

    def orphans(self) -> None:
        fs = self.fs
        # Unfinished deletions first, in steps that may commit (a file can span more groups
        # than a transaction holds): the inodes keep their flag meanwhile, so a crash here
        # leaves them for the next run.  Then the list is emptied and the inodes freed.
        for ino in self.found.orphans:
            inode = fs.inodes.get(ino)
            if inode.is_reg or (inode.is_symlink and not inode.flags & INODE_FLAG_INLINE):
                self.objects.release_data(inode, 0, protect=False)
        self.objects.orphan_clear([ino for ino, info in self.found.inodes.items()
                                   if info.inode.flags & INODE_FLAG_ORPHAN])
        for ino in self.found.orphans:
            self.say(f"freeing deleted inode {ino}")
            self.objects.free_inode(fs.inodes.get(ino))

    def rebuild_root(self) -> None:
        """The root inode was damaged: recreate it as an empty directory (as e2fsck does).
        A valid directory inode 2 becomes /lost+found again, with everything below it;
        everything else is reconnected into lost+found by :meth:`reconnect`."""
        found, fs = self.found, self.fs
        if not found.root_missing:
            return
        self.say("recreating the root directory (inode 1) empty")
        now = time.time_ns()
        root = Inode(InodeNo(ROOT_INO))
        root.mode = stat.S_IFDIR | 0o755
        root.nlink = 2
        root.parent = ROOT_INO
        root.atime_ns = root.mtime_ns = root.ctime_ns = root.btime_ns = now
        root.generation = self.store.next_generation()
        fs.inodes.forget(ROOT_INO)
        fs.inodes.add(root)
        lf = found.inodes.get(LOST_FOUND_INO)
        if lf is None or not lf.inode.is_dir or LOST_FOUND_INO in found.orphans:
            return
        self.say(f"linking directory {LOST_FOUND_INO} into the new root as lost+found")
        self.objects.directory(root).add(b"lost+found", LOST_FOUND_INO, stat.S_IFDIR >> 12)
        lf_inode = fs.inodes.get(LOST_FOUND_INO)
        lf_inode.parent = ROOT_INO
        self.objects.dirty(lf_inode)
        # Everything below it is reachable again (the walk of the checker's pass 3).
        reached: set[int] = {LOST_FOUND_INO}
        todo: list[int] = [LOST_FOUND_INO]
        while todo:
            dino = todo.pop()
            for _c, _n, child, _t in found.inodes[dino].entries:
                target = found.inodes.get(child)
                if target is None or child in reached:
                    continue
                if target.inode.is_dir and target.parents and target.parents[0] != dino:
                    continue
                reached.add(child)
                if target.inode.is_dir:
                    todo.append(child)
        found.unreachable = [i for i in found.unreachable if i not in reached]

    def _lost_found(self) -> int:
        fs = self.fs
        try:
            attr = fs.lookup(ROOT_INO, b"lost+found", ROOT_CTX)
            if stat.S_ISDIR(attr.mode):
                return attr.ino
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
        self.say("creating /lost+found")
        try:
            return fs.mkdir(ROOT_INO, b"lost+found", 0o700, ROOT_CTX).ino
        except FsError:
            return fs.mkdir(ROOT_INO, b"lost+found.fsck", 0o700, ROOT_CTX).ino

    def reconnect(self) -> None:
        found = self.found
        lost = [i for i in found.unreachable if i in found.inodes and i not in found.orphans]
        if not lost:
            return
        named: dict[int, list[tuple[int, bytes]]] = {}
        for dino, info in found.inodes.items():
            for _c, name, child, _t in info.entries:
                named.setdefault(child, []).append((dino, name))
        unreachable = set(lost)
        fs = self.fs
        lf_ino = self._lost_found()
        lf = fs.inodes.get(lf_ino)
        done: set[int] = set()
        pending = set(unreachable)
        while pending:
            # Roots: not named by any unreachable directory that is still pending.
            roots = [i for i in pending
                     if not any(d in pending for d, _n in named.get(i, []))]
            if not roots:
                roots = [min(pending)]  # a cycle: cut it at one directory
            for ino in roots:
                inode = fs.inodes.get(ino)
                for dino, name in named.get(ino, []):
                    if dino in unreachable:
                        directory = self.objects.directory(fs.inodes.get(dino))
                        try:
                            directory.remove(name)
                        except FsError:
                            pass
                name = f"#{ino}".encode()
                self.say(f"linking inode {ino} into lost+found as {name.decode()}")
                self.objects.directory(lf).add(name, ino, stat.S_IFMT(inode.mode) >> 12)
                if inode.is_dir:
                    inode.parent = lf_ino
                if inode.nlink == 0:
                    inode.nlink = 1
                self.objects.dirty(inode)
                done.add(ino)
            # Everything below a reconnected directory is reachable again.
            frontier = [i for i in roots if fs.inodes.get(i).is_dir]
            while frontier:
                d = frontier.pop()
                for _c, _n, child, _t in found.inodes[d].entries if d in found.inodes else []:
                    if child in pending and child not in done:
                        done.add(child)
                        if child in found.inodes and found.inodes[child].inode.is_dir:
                            frontier.append(child)
            pending -= done


def fix_counts(store: Store, found: Scan, say: Say) -> None:
    """Second round: link counts, '..' and i_blocks from a fresh scan of the repaired tree."""
    fs = FileSystem(store)
    for ino, info in found.inodes.items():
        inode = fs.inodes.get(ino)
        changed = False
        if inode.is_dir:
            want = 2 + info.subdirs
            parent = info.parents[0] if info.parents else (ROOT_INO if ino == ROOT_INO else 0)
            if ino == ROOT_INO:
                parent = ROOT_INO
            if parent and inode.parent != parent:
                say(f"directory {ino}: setting '..' to {parent}")
                inode.parent = parent
                changed = True
        else:
            want = info.links
        if inode.nlink != want and ino not in found.unreachable:
            say(f"inode {ino}: link count {inode.nlink} -> {want}")
            inode.nlink = want
            changed = True
        if not info.tree_damage and not info.xattr_damage:
            expect = info.expected_blocks()
            if inode.blocks != expect:
                say(f"inode {ino}: i_blocks {inode.blocks} -> {expect}")
                inode.blocks = expect
                changed = True
        if changed:
            fs.objects.dirty(inode)
    if found.bitmap_damage or found.counts_wrong:
        bfree = rewrite_bitmap(store, store.blocks, found.used_blocks)
        ifree = rewrite_bitmap(store, store.inodes, found.used_inodes)
        state = store.state
        if (state.free_blocks, state.free_inodes) != (bfree, ifree):
            say("fixing the free block and inode counts")
            state.free_blocks, state.free_inodes = bfree, ifree
            store.dirty(state)
    fs.inodes.flush()
    store.commit(durable=True)
