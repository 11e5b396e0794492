"""Scale: huge volumes, huge files, many orphans (issue 10, defects 3-5).

* Freeing a file that spans more bitmap groups than one transaction can hold is split into
  steps that each fit the journal, resumable after a crash (mount and fsck finish it): tested
  on in-memory volumes with the transaction limit lowered (so that a few hundred groups
  exceed it; crash states are explored there) and on a real sparse 16 TiB image with the
  default journal, including a power cut in the middle of the delete.
* The free-space search costs O(log n) in the number of groups: its cost at 16 TiB is
  compared with its cost at 64 GiB, and its choices with the linear first-fit search it
  replaced (the reference below), on random workloads.
* Releasing an open-but-deleted file costs O(1) in the length of the orphan list.

The figures (allocation cost, orphan release time) are produced by bench/scale_bench.py and
quoted in docs/BENCHMARKS.md; nothing here is a timing assertion except a ratio with a wide
margin between two sizes measured side by side.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from crashsim import RecordingDevice, crash_states
from fsutil import ROOT, fsck_clean
from memdev import MemDevice
from mountutil import Mounter, mounter_fixture  # noqa: F401  (the fixture)
from scalekit import groups_of, placed_file

import nexfs.store.store
from nexfs.check.checker import scan
from nexfs.check.repair import Repairer, fix_counts
from nexfs.core.attr import SetAttr
from nexfs.core.fs import ROOT_INO, FileSystem
from nexfs.ondisk.bitmap import BPB, COUNT_MASK, FULL, MAX_EXAMINE, UNINIT, Bitmap, find_run
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.store import Store
from nexfs.types import BlockNo, FsError, InodeNo
from valve import Rights, Valve

LONG = os.environ.get("NEXFS_LONG") == "1"
SMALL_LIMIT = 40
"""Transaction limit (journal images) for the in-memory tests: a file spanning 100+ groups
needs several transactions to be freed."""


@pytest.fixture
def small_journal(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Every store opened in the test accepts at most SMALL_LIMIT blocks per transaction,
    as a journal of ~40 blocks would."""
    monkeypatch.setattr(nexfs.store.store, "max_images", lambda _journal_len: SMALL_LIMIT)
    yield SMALL_LIMIT


def _fresh(nbytes: int) -> MemDevice:
    dev = MemDevice.of_size(nbytes)
    FileSystem.format(dev)
    return dev


def _data_groups(fs: FileSystem) -> range:
    g = fs.store.geo
    return range(g.data_start // BPB + 1, (g.backup_sb - 1) // BPB)


# -- defect 3: huge frees ---------------------------------------------------------------------


def test_huge_truncate_and_unlink_stay_within_the_journal(small_journal: int) -> None:
    dev = _fresh(16 << 30)  # 129 groups
    fs = FileSystem.open(dev)
    free0 = fs.store.state.free_blocks
    groups = list(_data_groups(fs))
    rng = random.Random(3)
    rng.shuffle(groups)
    spread = placed_file(fs, ROOT_INO, b"spread", groups[:110])
    whole = placed_file(fs, ROOT_INO, b"whole", sorted(groups[110:]), per_group=BPB)
    assert len(groups_of(fs, spread)) == 110 > small_journal
    used = free0 - fs.store.state.free_blocks
    assert used >= 110 + 3 * BPB
    fs.close()

    fs = FileSystem.open(dev)
    keep = 17
    fs.setattr(spread, SetAttr(size=keep * BLOCK_SIZE + 5), ROOT)
    assert fs.error is None, fs.error
    attr = fs.getattr(spread)
    tree = fs.objects.data(fs.inodes.get(spread)).emap.tree_blocks()
    assert attr.size == keep * BLOCK_SIZE + 5 and attr.blocks // 8 == keep + 1 + tree
    # The whole-group file: one extent over several groups, cut in the middle of one.
    fs.setattr(whole, SetAttr(size=BPB * BLOCK_SIZE + 7 * BLOCK_SIZE), ROOT)
    assert fs.error is None, fs.error
    fs.unlink(ROOT_INO, b"whole", ROOT)
    fs.unlink(ROOT_INO, b"spread", ROOT)
    assert fs.error is None, fs.error
    assert fs.store.state.orphan_head == 0
    assert not fs.store.verify_allocators()
    fs.close()
    with Store.open(dev, read_only=True) as store:
        found = scan(store)
        assert found.clean, found.problems[:5]
        assert store.state.free_blocks == free0


def test_huge_unlink_of_an_open_file_is_released_in_steps(small_journal: int) -> None:
    dev = _fresh(16 << 30)
    fs = FileSystem.open(dev)
    free0 = fs.store.state.free_blocks
    ino = placed_file(fs, ROOT_INO, b"f", _data_groups(fs)[:100])
    fs.ref(ino)
    fs.unlink(ROOT_INO, b"f", ROOT)
    assert fs.store.state.orphan_head == ino
    fs.setattr(ino, SetAttr(size=BLOCK_SIZE), ROOT)  # truncating an orphan keeps it one
    assert fs.error is None and fs.store.state.orphan_head == ino
    fs.unref(ino)
    assert fs.error is None, fs.error
    assert fs.store.state.orphan_head == 0
    assert fs.store.state.free_blocks == free0
    fs.close()


def _mid_delete(dev: MemDevice, ino: int, free_before: int, free_after: int) -> bool:
    """Whether the crashed volume on ``dev`` holds a delete in progress: the inode still on
    the orphan list with some, not all, of its blocks freed (looked at read-only)."""
    fs = FileSystem.open(dev, read_only=True)
    try:
        st = fs.store.state
        return st.orphan_head == ino and free_before < st.free_blocks < free_after
    finally:
        fs.close()


def _check_recovered(dev: MemDevice, where: str, names: set[bytes]) -> None:
    """fsck (read-only, before any mount) is clean, the mount finishes every pending free
    without an error, and afterwards the volume is clean, with no orphan left."""
    with Store.open(dev, read_only=True) as store:
        found = scan(store)
        assert found.clean, f"{where}: fsck before mount: {found.problems[:5]}"
    fs = FileSystem.open(dev)
    try:
        assert fs.error is None, f"{where}: {fs.error}"
        assert fs.store.state.orphan_head == 0, where
        seen = {n for n, _a, _c in fs.readdir(ROOT_INO, 0)} - {b".", b"..", b"lost+found"}
        assert seen <= names, where
        assert not fs.store.verify_allocators(), where
    finally:
        fs.close()
    with Store.open(dev, read_only=True) as store:
        found = scan(store)
        assert found.clean, f"{where}: fsck after mount: {found.problems[:5]}"


def test_crash_during_huge_delete_and_during_its_recovery(small_journal: int) -> None:
    """Crash states of a huge unlink and a huge truncate (every barrier, random subsets and
    tears of the writes after it, and a power cut after every single write), then crash
    states of the mounts that finish some of them: every state opens, fsck is clean before
    and after, nothing is left half-freed."""
    dev = _fresh(16 << 30)
    fs = FileSystem.open(dev)
    groups = list(_data_groups(fs))
    a = placed_file(fs, ROOT_INO, b"a", groups[:90])
    b = placed_file(fs, ROOT_INO, b"b", groups[90:])
    free_before = fs.store.state.free_blocks
    fs.close()
    base = dev.snapshot()
    rec = RecordingDevice(dev)
    fs = FileSystem.open(rec)
    fs.setattr(b, SetAttr(size=3 * BLOCK_SIZE), ROOT)
    fs.fsync(b, False)
    free_mid = fs.store.state.free_blocks
    fs.unlink(ROOT_INO, b"a", ROOT)
    fs.fsyncdir(ROOT_INO)
    free_after = fs.store.state.free_blocks
    fs.close()
    assert free_before < free_mid < free_after
    per_barrier = 12 if LONG else 4
    checked = in_progress = 0
    resumed: list[MemDevice] = []
    for cs in crash_states(rec.log, base, subsets_per_barrier=per_barrier,
                           rng=random.Random(7)):
        where = f"epoch {cs.epoch} {cs.note!r}"
        if _mid_delete(cs.device, a, free_mid, free_after) or _mid_delete(
                cs.device, b, free_before, free_mid):
            in_progress += 1
            if len(resumed) < (4 if LONG else 1):
                resumed.append(cs.device.snapshot())
        _check_recovered(cs.device, where, {b"a", b"b"})
        checked += 1
    # Power cut after each write (everything before it on the device, nothing after).
    image = dict(base.sectors)
    for i, e in enumerate(rec.log):
        if e.op != "write":
            continue
        for k, sector in enumerate(e.sectors):
            image[e.lba + k] = sector
        dev_i = MemDevice(base.total_sectors, base.sector_size, sectors=image)
        if _mid_delete(dev_i, a, free_mid, free_after) or _mid_delete(
                dev_i, b, free_before, free_mid):
            in_progress += 1
            if len(resumed) < (4 if LONG else 2):
                resumed.append(dev_i.snapshot())
        _check_recovered(dev_i, f"cut after write {i}", {b"a", b"b"})
        checked += 1
    assert in_progress >= 6, f"only {in_progress} crash states caught a delete half-way"
    # Power cut while the mount is finishing the delete.
    for k, crashed in enumerate(resumed):
        base2 = crashed.snapshot()
        rec2 = RecordingDevice(crashed)
        FileSystem.open(rec2).close()
        for cs in crash_states(rec2.log, base2, subsets_per_barrier=per_barrier,
                               rng=random.Random(k)):
            _check_recovered(cs.device, f"recovery {k} epoch {cs.epoch} {cs.note!r}",
                             {b"a", b"b"})
            checked += 1
    print(f"checked {checked} crash states, {in_progress} with a delete half-way")


def test_fsck_repair_finishes_a_huge_pending_delete(small_journal: int, tmp_path: Path
                                                    ) -> None:
    """A volume left with a huge delete half-done and something else to repair: fsck -y
    frees the rest in steps (not one transaction beyond the journal) and the volume is
    clean."""
    dev = _fresh(16 << 30)
    fs = FileSystem.open(dev)
    ino = placed_file(fs, ROOT_INO, b"f", _data_groups(fs)[:100])
    fs.ref(ino)
    fs.unlink(ROOT_INO, b"f", ROOT)
    fs.commit()
    fs.store.abort()  # power cut with the file still open: the mount would free it
    image = tmp_path / "vol.img"
    with open(image, "wb") as f:
        f.truncate(dev.total_sectors * dev.sector_size)
        for lba, data in sorted(dev.durable.items()):
            f.seek(lba * dev.sector_size)
            f.write(data)
    with Valve.open(image) as v:  # damage to repair: a wrong free inode count
        store = Store.open(v.grant(Rights.READ | Rights.WRITE))
        assert store.state.orphan_head == ino
        store.state.free_inodes -= 3
        store.dirty(store.state)
        store.commit()
        store.abort()
    code, out = fsck_clean(image)
    assert code == 4, out  # the count is wrong; the pending delete itself is no problem
    assert "orphan" not in out, out
    from nexfs.tools.fsck import main as fsck_main

    assert fsck_main(["-y", str(image)]) == 1
    code, out = fsck_clean(image)
    assert code == 0, out
    with Valve.open(image, read_only=True) as v:
        store = Store.open(v.grant(Rights.READ), read_only=True)
        assert store.state.orphan_head == 0
        assert store.inodes.is_set(ino) is False
        store.close()


def test_repair_frees_huge_orphans_in_steps(small_journal: int) -> None:
    """The repair's own frees (orphans, blocks past the end of a file) are split too."""
    dev = _fresh(16 << 30)
    fs = FileSystem.open(dev)
    groups = _data_groups(fs)
    ino = placed_file(fs, ROOT_INO, b"f", groups[:60])
    other = placed_file(fs, ROOT_INO, b"g", groups[60:120])
    fs.ref(ino)
    fs.unlink(ROOT_INO, b"f", ROOT)
    inode = fs.inodes.get(other)
    inode.size = BLOCK_SIZE  # damage: 59 blocks mapped past the end of the file
    fs.objects.dirty(inode)
    fs.commit()
    fs.store.abort()
    store = Store.open(dev, ignore_error=True, salvage_state=True)
    found = scan(store)
    assert not found.clean and found.orphans == [ino]
    Repairer(store, found, lambda _m: None).run()
    assert store.error is None, store.error
    fix_counts(store, scan(store), lambda _m: None)
    store.close()
    with Store.open(dev, read_only=True) as store:
        found = scan(store)
        assert found.clean, found.problems[:5]
        assert store.state.orphan_head == 0


@pytest.mark.parametrize("seed", range(10 if LONG else 3))
def test_random_operations_on_files_over_many_groups(seed: int, monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    """Every operation that may free a file's blocks (truncate, O_TRUNC, unlink, unlink of an
    open file and its release, rename over a file, the release of open files at unmount),
    mixed at random with writes and commits, on files over up to 300 groups, with
    transactions limited to 128 blocks (a 256-block journal holds 253): whatever an
    operation's size, the volume must never go read-only, and fsck must stay clean."""
    limit = 128
    monkeypatch.setattr(nexfs.store.store, "max_images", lambda _journal_len: limit)
    monkeypatch.setattr(Store, "should_commit", lambda self: self.txn_blocks >= limit // 4)
    rng = random.Random(seed)
    dev = _fresh(64 << 30)  # 516 groups
    fs = FileSystem.open(dev)
    groups = list(_data_groups(fs))
    names: dict[bytes, int] = {}
    held: list[int] = []
    kinds = ["place", "place", "truncate", "otrunc", "unlink", "unlink_open", "release",
             "rename", "write", "commit"]
    # Every kind at least once, then at random.
    plan = [*rng.sample(kinds, len(kinds)), *rng.choices(kinds, k=40 if LONG else 10)]
    done: set[str] = set()

    def place(name: bytes) -> None:
        names[name] = placed_file(fs, ROOT_INO, name, rng.sample(groups, rng.randrange(1, 300)),
                                  per_group=rng.choice([1, 1, 3]))

    for step, op in enumerate(plan):
        while op != "place" and len(names) < 3:
            place(f"g{step}-{len(names)}".encode())
        if op == "release" and not held:
            ino = names.pop(name := sorted(names)[0])
            fs.ref(ino)
            held.append(ino)
            fs.unlink(ROOT_INO, name, ROOT)
        if op == "place":
            place(f"f{step}".encode())
        elif op == "truncate":
            ino = names[rng.choice(sorted(names))]
            size = fs.getattr(ino).size
            fs.setattr(ino, SetAttr(size=rng.randrange(0, size + 1)), ROOT)
        elif op == "otrunc":
            fs.open_file(names[rng.choice(sorted(names))], os.O_WRONLY | os.O_TRUNC, ROOT)
        elif op in ("unlink", "unlink_open"):
            name = rng.choice(sorted(names))
            ino = names.pop(name)
            if op == "unlink_open":
                fs.ref(ino)
                held.append(ino)
            fs.unlink(ROOT_INO, name, ROOT)
        elif op == "release":
            fs.unref(held.pop(rng.randrange(len(held))))
        elif op == "rename":
            src, dst = rng.sample(sorted(names), 2)
            fs.rename(ROOT_INO, src, ROOT_INO, dst, 0, ROOT)
            names[dst] = names.pop(src)
        elif op == "write":
            ino = names[rng.choice(sorted(names))]
            fs.write(ino, rng.randrange(0, 1 << 30), b"w" * rng.choice([1, 5000, 70_000]), ROOT)
        else:
            fs.commit()
        done.add(op)
        assert fs.error is None, f"step {step} ({op}): {fs.error}"
    assert done == set(kinds), set(kinds) - done
    fs.ref(names[sorted(names)[0]])  # still open at unmount, and unlinked
    fs.unlink(ROOT_INO, sorted(names)[0], ROOT)
    fs.close()
    assert fs.error is None, fs.error
    with Store.open(dev, read_only=True) as store:
        found = scan(store)
        assert found.clean, found.problems[:5]
        assert store.state.orphan_head == 0


# -- defect 4: allocation cost -----------------------------------------------------------------


def _alloc_cost(store: Store, rounds: int = 5, n: int = 150) -> float:
    """Best time per single-block allocation over ``rounds`` rounds of ``n``."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            store.alloc_data(None, 1)
            store.alloc_meta(None, InodeNo(1))
        best = min(best, (time.perf_counter() - t0) / (2 * n))
        store.commit(durable=False)
    return best


def test_allocation_cost_does_not_grow_with_the_volume() -> None:
    """First fit on 16 TiB (132,105 groups) against 64 GiB (516 groups), side by side: the
    old search built a list of every group on every call (~30x slower at 16 TiB)."""
    stores = []
    for size in (64 << 30, (1 << 44) - BLOCK_SIZE):
        dev = MemDevice.of_size(size)
        Store.format(dev)
        stores.append(Store.open(dev))
    small, big = stores
    _alloc_cost(small, 1, 20), _alloc_cost(big, 1, 20)  # build what is built once
    cost_small = _alloc_cost(small)
    cost_big = _alloc_cost(big)
    print(f"allocation: {cost_small * 1e6:.1f} us at 64 GiB, {cost_big * 1e6:.1f} us at "
          "16 TiB")
    assert cost_big < 4 * cost_small, (cost_small, cost_big)
    inode_costs = []
    for store in stores:  # the inode bitmap: 33,027 groups at 16 TiB, 129 at 64 GiB
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(100):
                store.free_inode(store.alloc_inode())
            best = min(best, (time.perf_counter() - t0) / 100)
        inode_costs.append(best)
    assert inode_costs[1] < 4 * inode_costs[0], inode_costs
    for store in stores:
        store.close()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 1000])
def test_max_index_finds_what_a_scan_finds(n: int) -> None:
    from nexfs.ondisk.bitmap import MaxIndex

    rng = random.Random(n)
    values = [rng.randrange(0, 50) for _ in range(n)]
    index = MaxIndex(values)

    def scan_for(lo: int, need: int) -> int:
        return next((g for g in range(lo, n) if values[g] >= need), -1)

    for lo in range(n + 1):
        for need in (1, 10, 30, 49, 50):
            assert index.first_at_least(lo, need) == scan_for(lo, need)
    for _ in range(500):
        g = rng.randrange(n)
        values[g] = rng.randrange(0, 50)
        index.set(g, values[g])
        lo, need = rng.randrange(n + 1), rng.randrange(1, 51)
        assert index.first_at_least(lo, need) == scan_for(lo, need)
        assert index.value(g) == values[g]


def reference_find(bm: Bitmap, goal: int, want: int) -> tuple[int, int] | None:
    """The linear first-fit search the allocator had before it had an index (the oracle):
    every group from the goal's, wrapping, back to the goal's own group from its start."""
    goal = min(max(goal, bm.first_item), bm.nitems - 1)
    g0, off0 = divmod(goal, BPB)
    fallback: tuple[int, int] | None = None
    examined = 0
    for k, g in enumerate([*range(g0, bm.ngroups), *range(0, g0 + 1)]):
        off = off0 if k == 0 else 0
        entry = bm.summary_entry(g)
        free = entry & COUNT_MASK
        if free == 0:
            continue
        pend = bm._pending_mask(g)
        if pend:
            free -= pend.bit_count()
            if free <= 0:
                continue
        if fallback is not None and free < want:
            continue
        bits = bm.tail_mask(g) if entry & UNINIT else bm.group_bits(g)
        mask = FULL & ~(bits | pend)
        full_pos, first_pos, first_len = find_run(mask, off, want)
        if full_pos >= 0:
            return g * BPB + full_pos, want
        if fallback is None and first_len:
            fallback = (g * BPB + first_pos, min(first_len, want))
        if not entry & UNINIT:
            examined += 1
        if fallback is not None and examined >= MAX_EXAMINE:
            break
    return fallback


@pytest.mark.parametrize("seed", range(6 if LONG else 2))
def test_allocator_choices_match_the_linear_search(seed: int) -> None:
    """Random workloads (runs of every size, frees, pending frees, commits, checkpoints,
    nearly full groups, goals anywhere) on a 64-group volume: before every allocation the
    indexed search must choose exactly what the linear one chooses."""
    rng = random.Random(seed)
    dev = MemDevice.of_size(64 * BPB * BLOCK_SIZE)
    Store.format(dev)
    store = Store.open(dev, cache_blocks=4096)
    compared = compared_inodes = 0

    # Every search of both allocators, find and take (Bitmap.take's short path does not
    # call find): what it chooses must be what the linear search chooses.
    def checked(bitmap: Bitmap, what: str, real: Callable[..., tuple[int, int] | None]
                ) -> Callable[..., tuple[int, int] | None]:
        def search(goal: int, want: int, **kw: Any) -> tuple[int, int] | None:
            nonlocal compared, compared_inodes
            expect = reference_find(bitmap, goal, want)
            got = real(goal, want, **kw)
            assert got == expect, (bitmap.name, what, goal, want, got, expect)
            if bitmap is store.inodes:
                compared_inodes += 1
            else:
                compared += 1
            return got
        return search

    for bitmap in (store.blocks, store.inodes):
        bitmap.find = checked(bitmap, "find", bitmap.find)  # type: ignore[method-assign]
        bitmap.take = checked(bitmap, "take", bitmap.take)  # type: ignore[method-assign]
    inodes: list[int] = []
    owned: list[tuple[int, int]] = []
    g = store.geo
    for _step in range(1500 if LONG else 400):
        r = rng.random()
        if r < 0.55:
            want = rng.choice([1, 1, 2, 7, 100, 4000, BPB // 2, BPB])
            goal = rng.choice([None, rng.randrange(g.data_start, g.backup_sb)])
            try:
                with store.reserve(want):
                    owned.append(store.alloc_data(None if goal is None else BlockNo(goal),
                                                  want))
            except FsError as exc:
                assert exc.errno == errno.ENOSPC
        elif r < 0.85 and owned:
            start, n = owned.pop(rng.randrange(len(owned)))
            cut = rng.randrange(n)  # free a part, keep the rest
            if cut:
                store.free_blocks(BlockNo(start), cut)
                owned.append((start + cut, n - cut))
            else:
                store.free_blocks(BlockNo(start), n)
        elif r < 0.93:
            store.commit(durable=False)
        else:
            store.checkpoint()
        if rng.random() < 0.05:
            ino = store.alloc_inode(InodeNo(rng.randrange(1, g.ninodes)))
            store.free_inode(ino)
        # Inodes as a create allocates them (the goal is the parent's number, usually
        # taken: the first free one after it), and some freed again (holes before the hint).
        for _ in range(rng.randrange(4)):
            near = rng.choice(inodes) if inodes and rng.random() < 0.8 else None
            with store.reserve(0, ninodes=1):
                inodes.append(store.alloc_inode(None if near is None else InodeNo(near)))
        if inodes and rng.random() < 0.3:
            store.free_inode(InodeNo(inodes.pop(rng.randrange(len(inodes)))))
    assert not store.verify_allocators()
    assert compared > 150 and compared_inodes > 400
    store.close()


# -- defect 5: orphan release --------------------------------------------------------------------


def test_orphan_release_cost_does_not_grow_with_the_list() -> None:
    """Release N open-unlinked files oldest first (each at the far end of the list): the
    inode look-ups per release must not grow with N (the old code walked the list)."""
    n = 1500
    dev = _fresh(256 << 20)
    fs = FileSystem.open(dev)
    inos = []
    for i in range(n):
        ino = fs.create(ROOT_INO, f"f{i}".encode(), 0o644, ROOT).ino
        fs.ref(ino)
        fs.unlink(ROOT_INO, f"f{i}".encode(), ROOT)
        inos.append(ino)
    fs.commit()
    gets = 0
    real_get = fs.inodes.get

    def counting_get(ino: int) -> Any:
        nonlocal gets
        gets += 1
        return real_get(ino)

    fs.inodes.get = counting_get  # type: ignore[method-assign]
    for ino in inos[: n // 2]:
        fs.unref(ino)
    for ino in reversed(inos[n // 2 :]):
        fs.unref(ino)
    assert fs.error is None
    assert gets <= 8 * n, f"{gets} inode look-ups for {n} releases"
    assert fs.store.state.orphan_head == 0
    fs.close()
    with Store.open(dev, read_only=True) as store:
        assert scan(store).clean


def test_orphan_list_stays_consistent_under_random_releases() -> None:
    """Random interleaving of unlink-while-open, release, truncate of orphans and commits;
    fsck after each commit checks the list (no loops, no stray flags, every orphan on it)."""
    rng = random.Random(11)
    dev = _fresh(64 << 20)
    fs = FileSystem.open(dev)
    open_files: list[int] = []
    for step in range(300):
        r = rng.random()
        if r < 0.45:
            ino = fs.create(ROOT_INO, f"f{step}".encode(), 0o644, ROOT).ino
            fs.write(ino, 0, b"x" * rng.choice([1, 5000]), ROOT)
            fs.ref(ino)
            fs.unlink(ROOT_INO, f"f{step}".encode(), ROOT)
            open_files.append(ino)
        elif r < 0.85 and open_files:
            fs.unref(open_files.pop(rng.randrange(len(open_files))))
        elif r < 0.9 and open_files:
            fs.setattr(rng.choice(open_files), SetAttr(size=0), ROOT)
        else:
            fs.commit()
            with Store.open(dev.snapshot(), read_only=True) as store:
                found = scan(store)
                assert found.clean, found.problems[:5]
                assert sorted(found.orphans) == sorted(open_files)
    assert fs.error is None
    fs.close()
    with Store.open(dev, read_only=True) as store:
        assert scan(store).clean


# -- the whole thing on a real sparse 16 TiB image -------------------------------------------


class PowerCut(BaseException):
    """The machine lost power: nothing more reaches the device."""


class CutDevice:
    """A valve capability that loses power at the n-th durable write after :meth:`arm`
    (that write and everything after it never happen)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.left: int | None = None

    def arm(self, durable_writes: int) -> None:
        self.left = durable_writes

    def block_info(self) -> Any:
        return self.inner.block_info()

    def block_read(self, lba: int, count: int, into: Any = None) -> Any:
        return self.inner.block_read(lba, count, into)

    def alloc_buffer(self, nbytes: int) -> Any:
        return self.inner.alloc_buffer(nbytes)

    def block_write(self, lba: int, count: int, data: Any, *, durable: bool = False) -> None:
        if self.left is not None:
            if self.left <= 0 or (durable and self.left == 1):
                self.left = 0
                raise PowerCut
            if durable:
                self.left -= 1
        self.inner.block_write(lba, count, data, durable=durable)


@pytest.mark.mount
def test_16tib_sparse_image_huge_truncate_and_delete_with_power_cut(tmp_path: Path,
                                                                    mounter: Mounter) -> None:
    """A sparse 16 TiB image (the largest file ext4 allows: 16 TiB - 4 KiB) with the default
    journal (32,768 blocks: 32,702 block images per transaction): three files over 1,000
    groups each, and two 4.1 TiB files over more groups than one transaction holds: one
    truncated to 50 groups, the other deleted with a power cut half-way through the delete.
    fsck is clean before the mount, the mount (mount.py, through FUSE) finishes the delete
    before it serves, fsck is clean again."""
    image = tmp_path / "16t.img"
    with open(image, "wb") as f:
        f.truncate((1 << 44) - BLOCK_SIZE)
    try:
        _huge_truncate_and_delete(image, mounter)
    finally:
        image.unlink()  # ~0.5 GB really allocated: not left for pytest's kept tmp dirs


def _huge_truncate_and_delete(image: Path, mounter: Mounter) -> None:
    with Valve.open(image) as v:
        FileSystem.format(v.grant(Rights.READ | Rights.WRITE), label="16t")
    with Valve.open(image) as v:
        fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
        limit = fs.store.max_txn_blocks
        span = limit + 100
        first = fs.store.geo.data_start // BPB + 1
        ngroups = fs.store.blocks.ngroups
        rng = random.Random(16)
        spread_groups = rng.sample(range(first + 2 * span + 10, ngroups - 1), 3000)
        d = fs.mkdir(ROOT_INO, b"d", 0o755, ROOT).ino
        for k in range(3):
            placed_file(fs, d, f"s{k}".encode(), spread_groups[k::3], commit_every=4096)
        big_a = placed_file(fs, ROOT_INO, b"a", range(first, first + span), per_group=BPB,
                            commit_every=4096)
        big_b = placed_file(fs, ROOT_INO, b"b", range(first + span, first + 2 * span),
                            per_group=BPB, commit_every=4096)
        assert len(groups_of(fs, big_a)) == len(groups_of(fs, big_b)) == span > limit
        free_full = fs.store.state.free_blocks
        fs.setattr(big_a, SetAttr(size=50 * BPB * BLOCK_SIZE), ROOT)
        assert fs.error is None, fs.error
        fs.commit()
        free_before = fs.store.state.free_blocks
        assert free_before - free_full == (span - 50) * BPB
        fs.close()
    # The delete, with a power cut once its first checkpoint made some steps durable.
    with Valve.open(image) as v:
        dev = CutDevice(v.grant(Rights.READ | Rights.WRITE))
        fs = FileSystem.open(dev)
        dev.arm(3)
        with pytest.raises(PowerCut):
            fs.unlink(ROOT_INO, b"b", ROOT)
            fs.fsyncdir(ROOT_INO)
        fs.store.abort()
    free_after = free_before + span * BPB
    with Valve.open(image, read_only=True) as v:
        fs = FileSystem.open(v.grant(Rights.READ), read_only=True)
        st = fs.store.state
        assert st.orphan_head == big_b and free_before < st.free_blocks < free_after, (
            "the power cut did not catch the delete half-way")
        fs.close()
    code, out = fsck_clean(image)  # the pending delete is not damage
    assert code == 0, out
    m = mounter.mount(image)
    assert sorted(os.listdir(m.mountpoint)) == ["a", "d", "lost+found"]
    assert sorted(os.listdir(m.mountpoint / "d")) == ["s0", "s1", "s2"]
    assert os.stat(m.mountpoint / "a").st_blocks // 8 == 50 * BPB
    assert os.statvfs(m.mountpoint).f_bfree == free_after
    assert m.unmount() == 0
    assert "finished 1 interrupted" in m.log_text()
    with Valve.open(image, read_only=True) as v:
        store = Store.open(v.grant(Rights.READ), read_only=True)
        assert store.state.orphan_head == 0 and store.state.free_blocks == free_after
        store.close()
    code, out = fsck_clean(image)
    assert code == 0, out
