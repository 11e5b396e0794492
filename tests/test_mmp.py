"""Multi-mount protection (nexfs/store/mmp.py) on the in-memory device: the on-disk block, mkfs,
the grants, fsck's view of it, every branch of the claim, and an explorer that runs two
nodes against one device on a virtual clock through every start time, death and stall on a
grid, checking that no two nodes ever write the volume as its owner at the same time.

The real two-daemon tests are in tests/test_mount_mmp.py.
"""

from __future__ import annotations

import contextlib
import heapq
import io
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from memdev import MemDevice

from nexfs.check.checker import scan
from nexfs.core.fs import FileSystem
from nexfs.ondisk.layout import FEATURE_INCOMPAT_MMP, Superblock
from nexfs.ondisk.metablock import BLOCK_SIZE
from nexfs.store.blockdev import BlockDev
from nexfs.store.mmp import (
    SEQ_CLEAN,
    SEQ_FSCK,
    Mmp,
    MmpBusy,
    MmpLost,
    MmpRecord,
    Unprotected,
    open_claim,
    wait_time,
)
from nexfs.store.store import Store
from nexfs.store.volume import read_superblock
from nexfs.tools import fsck, info, mkfs, tune
from nexfs.types import CorruptionError
from valve import Rights, Valve
from valve.errors import CapabilityError

SIZE = 64 << 20
INTERVAL_MS = 200
WAIT = wait_time(INTERVAL_MS)  # 1.4 s


def mmp_volume(*, exclusive: bool = False, mmp: bool | None = None) -> MemDevice:
    dev = MemDevice.of_size(SIZE, exclusive=exclusive)
    FileSystem.format(dev, label="mmp", mmp=mmp, mmp_interval_ms=INTERVAL_MS)
    return dev


def superblock(dev: MemDevice) -> Superblock:
    return read_superblock(BlockDev(dev))


def node(dev: MemDevice, name: str, pid: int = 100, **kwargs: object) -> Mmp:
    sb = superblock(dev)
    return Mmp(BlockDev(dev), sb.mmp_block, sb.volume_seed, sb.mmp_interval, device="memdev",
               node=name, pid=pid, **kwargs)  # type: ignore[arg-type]


def record(dev: MemDevice) -> MmpRecord:
    sb = superblock(dev)
    return MmpRecord.decode(BlockDev(dev).read_blocks(sb.mmp_block, 1), sb.volume_seed,
                            sb.mmp_block)


# -- the format ----------------------------------------------------------------------------


def test_record_round_trip_and_refusals() -> None:
    out = memoryview(bytearray(BLOCK_SIZE))
    rec = MmpRecord(12345, 5000, 99, 7, "host-a", "nbd://server/export")
    rec.encode(out, 0x1234, 500)
    assert MmpRecord.decode(out, 0x1234, 500) == rec
    with pytest.raises(CorruptionError, match="checksum"):
        MmpRecord.decode(out, 0x1235, 500)  # another volume's
    with pytest.raises(CorruptionError, match=r"misdirected|checksum"):
        MmpRecord.decode(out, 0x1234, 501)
    for seq in (SEQ_CLEAN, SEQ_FSCK):
        MmpRecord(seq, 5000).encode(out, 1, 2)
        assert MmpRecord.decode(out, 1, 2).seq == seq
    MmpRecord(0, 5000).encode(out, 1, 2)  # 0 is no sequence number at all
    with pytest.raises(CorruptionError, match="unknown sequence"):
        MmpRecord.decode(out, 1, 2)


def test_superblock_fields_and_old_images() -> None:
    dev = mmp_volume()
    sb = superblock(dev)
    assert sb.mmp and sb.feature_incompat == FEATURE_INCOMPAT_MMP
    assert sb.mmp_block == sb.geo.backup_sb - 1 and sb.mmp_interval == INTERVAL_MS
    assert Superblock.decode(sb.encode(0), 0).mmp_block == sb.mmp_block
    # An image without the feature (every image made before it) reads as "no MMP".
    old = superblock(mmp_volume(exclusive=True))
    assert not old.mmp and old.mmp_block == 0 and old.mmp_interval == 0
    raw = bytes(old.encode(0))
    assert raw[416:432] == bytes(16)  # the old reserved bytes stay zero
    # The MMP block must be a data block.
    sb.mmp_block = sb.geo.backup_sb
    with pytest.raises(CorruptionError, match="MMP block"):
        Superblock.decode(sb.encode(0), 0)


def test_mkfs_turns_mmp_on_for_devices_without_a_lock() -> None:
    for exclusive, forced, expect in ((False, None, True), (True, None, False),
                                      (True, True, True), (False, False, False)):
        dev = mmp_volume(exclusive=exclusive, mmp=forced)
        sb = superblock(dev)
        assert sb.mmp is expect, (exclusive, forced)
        store = Store.open(dev, read_only=True)
        try:
            found = scan(store)
            assert found.clean, found.problems
            in_use = store.blocks.group_bits(0) >> (sb.geo.backup_sb - 1) & 1
            assert in_use == int(expect)  # mkfs marked the MMP block in use
            if expect:
                assert record(dev).seq == SEQ_CLEAN
        finally:
            store.close()


def test_the_store_cannot_write_the_mmp_block() -> None:
    dev = mmp_volume()
    sb = superblock(dev)
    fs = FileSystem.open(dev)
    try:
        grants = fs.store.grants
        block = bytearray(BLOCK_SIZE)
        for view in (grants.data, grants.meta):
            with pytest.raises(CapabilityError):
                view.write_blocks(sb.mmp_block, 1, block)
        grants.data.write_blocks(sb.mmp_block - 1, 1, block)  # its neighbour is still data
    finally:
        fs.close()


def test_fsck_reports_a_damaged_mmp_block() -> None:
    dev = mmp_volume()
    sb = superblock(dev)
    BlockDev(dev).write_blocks(sb.mmp_block, 1, bytearray(BLOCK_SIZE))
    store = Store.open(dev, read_only=True)
    try:
        found = scan(store)
        assert any("multi-mount protection block" in p for p in found.problems), found.problems
    finally:
        store.close()


# -- claiming ------------------------------------------------------------------------------


def test_clean_volume_is_claimed_after_one_wait() -> None:
    dev = mmp_volume()
    waits: list[float] = []
    a = node(dev, "a", sleep=waits.append)
    a.claim()
    # Write a new sequence and hold it for one wait, checked and moved every interval.
    assert sum(waits) == pytest.approx(WAIT) and max(waits) == pytest.approx(0.2)
    rec = record(dev)
    assert (rec.seq, rec.node, rec.pid, rec.device) == (a.seq, "a", 100, "memdev")
    a.update()
    assert record(dev).seq == rec.seq + 1
    a.release()
    assert record(dev).seq == SEQ_CLEAN


def test_live_owner_refuses_the_claim_naming_it() -> None:
    dev = mmp_volume()
    a = node(dev, "host-a", pid=4242, sleep=lambda s: None)
    a.claim()
    b = node(dev, "host-b", sleep=lambda s: a.update())  # a keeps updating while b waits
    with pytest.raises(MmpBusy, match=r"in use by host host-a \(pid 4242\): "):
        b.claim()
    a.update()  # a is unaffected


def test_dead_owner_is_taken_over_and_the_old_owner_stops() -> None:
    dev = mmp_volume()
    a = node(dev, "a", sleep=lambda s: None)
    a.claim()
    waits: list[float] = []
    b = node(dev, "b", sleep=waits.append)
    b.claim()  # a never updated: it is gone
    assert waits[0] == WAIT and sum(waits[1:]) == pytest.approx(WAIT)
    with pytest.raises(MmpLost, match="written by host b"):
        a.update()
    a.release()  # not ours: must not write
    assert record(dev).node == "b" and record(dev).seq == b.seq


def test_the_longer_interval_in_the_block_is_waited_for() -> None:
    dev = mmp_volume()
    a = node(dev, "a", sleep=lambda s: None)
    a.claim()
    a._check_ms = 3000  # as after a stall of 3 s
    a.update()
    waits: list[float] = []
    node(dev, "b", sleep=waits.append).claim()
    assert waits[0] == wait_time(3000) and sum(waits[1:]) == pytest.approx(wait_time(3000))


def test_fsck_claim_blocks_mounts_and_other_fscks() -> None:
    dev = mmp_volume()
    f = node(dev, "a", pid=os.getpid(), sleep=lambda s: None)  # a live process
    f.claim(fsck=True)
    assert record(dev).seq == SEQ_FSCK
    with pytest.raises(MmpBusy, match=r"fsck.nexfs on host a .* is checking"):
        node(dev, "a", pid=5, sleep=lambda s: None).claim()
    with pytest.raises(MmpBusy, match="--clear-mmp"):
        node(dev, "b", sleep=lambda s: None).claim(fsck=True)
    # --clear-mmp: the user says it is not running.
    node(dev, "b", sleep=lambda s: None).claim(fsck=True, clear=True)
    f.release()  # not ours any more
    assert record(dev).node == "b"


def test_interrupted_fsck_of_this_host_is_stale_for_fsck_only() -> None:
    dev = mmp_volume()
    dead = 2**22 + 12345  # above pid_max on this machine: no such process
    node(dev, "a", pid=dead, sleep=lambda s: None).claim(fsck=True)
    with pytest.raises(MmpBusy, match="run it again"):
        node(dev, "a", sleep=lambda s: None).claim()  # a mount never takes over from fsck
    waits: list[float] = []
    node(dev, "a", sleep=waits.append).claim(fsck=True)
    assert waits[0] == WAIT and sum(waits[1:]) == pytest.approx(WAIT)  # a crashed writer
    with pytest.raises(MmpBusy, match="--clear-mmp"):  # another host cannot tell
        node(dev, "b", sleep=lambda s: None).claim(fsck=True)


def test_damaged_block_is_waited_on_then_claimed() -> None:
    dev = mmp_volume()
    sb = superblock(dev)
    BlockDev(dev).write_blocks(sb.mmp_block, 1, bytearray(b"\xff" * BLOCK_SIZE))
    waits: list[float] = []
    a = node(dev, "a", sleep=waits.append)
    a.claim()
    assert waits[0] == WAIT and record(dev).node == "a"


def test_simultaneous_claim_detected_by_the_second_read() -> None:
    dev = mmp_volume()
    b = node(dev, "b", sleep=lambda s: None)
    a = node(dev, "a", sleep=lambda s: b.claim())  # b claims in a's second wait
    with pytest.raises(MmpBusy, match=r"claimed by host b .* at the same time"):
        a.claim()


def test_open_claim_policy() -> None:
    plain = mmp_volume(exclusive=False, mmp=False)
    with pytest.raises(Unprotected, match="nexfs tune -O mmp memdev"):
        open_claim(plain, device="memdev")
    assert open_claim(plain, device="memdev", fsck=True) is None  # fsck is run on purpose
    assert open_claim(mmp_volume(exclusive=True, mmp=False), device="x") is None
    claimed = open_claim(mmp_volume(), device="memdev", node="a", pid=1,
                         sleep=lambda s: None)
    assert claimed is not None and claimed.seq is not None
    # Not a NexFS volume: left to the open that follows.
    assert open_claim(MemDevice.of_size(SIZE, exclusive=False), device="x") is None


def test_keep_stops_and_reports_once_when_another_node_writes() -> None:
    dev = mmp_volume()
    a = node(dev, "a", sleep=lambda s: None)
    a.claim()
    first = a.seq
    assert first is not None
    lost: list[str] = []
    other = node(dev, "b", sleep=lambda s: None)

    async def main() -> None:
        reported = trio.Event()

        def on_lost(reason: str) -> None:
            lost.append(reason)
            reported.set()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.keep, on_lost)
                while record(dev).seq < first + 2:  # it updates on its own
                    await trio.sleep(0.01)  # polling, not synchronisation
                assert not lost
                other.claim()  # b takes over while a is live (what a stall would allow)
                await reported.wait()
                assert "written by host b" in lost[0]
                await trio.sleep(3 * INTERVAL_MS / 1000)  # it stopped: no second report
                assert len(lost) == 1 and record(dev).node == "b"
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_keeping_thread_updates_during_a_long_open() -> None:
    dev = mmp_volume()
    a = node(dev, "a", sleep=lambda s: None)
    a.claim()
    first = a.seq
    assert first is not None
    seen: set[int] = set()
    with a.keeping():
        while len(seen) < 3:  # updated from the thread while this one "replays"
            seen.add(record(dev).seq)
    assert a.seq is not None and a.seq >= first + 2


# -- the explorer --------------------------------------------------------------------------


@dataclass
class Actor:
    """One node's life on the virtual clock: start its claim at ``start``; once it owns the
    volume, update every interval, except that it dies (stops for ever) at ``die`` or stalls
    (no update) during ``stall`` = (from, length)."""

    name: str
    start: float
    die: float | None = None
    stall: tuple[float, float] | None = None
    claimed_at: float | None = None
    refused: str | None = None
    lost_at: float | None = None
    updates: list[float] = field(default_factory=list)


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0


def _life(dev: MemDevice, actor: Actor, clock: VirtualClock, pid: int) -> Iterator[float]:
    yield actor.start
    mmp = node(dev, actor.name, pid=pid, monotonic=lambda: clock.now)
    try:
        yield from mmp.claim_steps()
    except MmpBusy as exc:
        actor.refused = str(exc)
        return
    actor.claimed_at = clock.now
    while True:
        gap = INTERVAL_MS / 1000
        if actor.stall is not None and actor.stall[0] <= clock.now + gap < sum(actor.stall):
            gap = sum(actor.stall) - clock.now
        if actor.die is not None and clock.now + gap >= actor.die:
            return
        yield gap
        try:
            mmp.update()
        except MmpLost:
            actor.lost_at = clock.now
            return
        actor.updates.append(clock.now)


def run_nodes(actors: list[Actor], order: tuple[int, ...], horizon: float) -> None:
    """Run the actors' lives on one device and one virtual clock; ``order`` breaks ties
    between events at the same instant."""
    dev = mmp_volume()
    clock = VirtualClock()
    lives = [_life(dev, a, clock, 100 + i) for i, a in enumerate(actors)]
    queue = [(0.0, order[i], i) for i in range(len(actors))]
    heapq.heapify(queue)
    while queue:
        when, _rank, i = heapq.heappop(queue)
        if when > horizon:
            break
        clock.now = when
        try:
            wait = next(lives[i])
        except StopIteration:
            continue
        heapq.heappush(queue, (when + wait, order[i], i))


def check_safety(actors: list[Actor]) -> None:
    """No node updates the block as its owner after another node claimed it later: the first
    update after someone else's claim must find the block taken."""
    owners = sorted((a for a in actors if a.claimed_at is not None),
                    key=lambda a: a.claimed_at or 0)
    for earlier, later in itertools.pairwise(owners):
        assert later.claimed_at is not None
        after = [t for t in earlier.updates if t > later.claimed_at]
        assert not after, (f"{earlier.name} updated at {after} after {later.name} claimed at "
                           f"{later.claimed_at}: {actors}")
        # Displaced (it was dead or stalled for longer than a waiter waits), the earlier
        # owner notices at its next update, unless it never updates again.
        assert earlier.lost_at is not None or earlier.die is not None, actors


def scenarios(long: bool) -> Iterator[tuple[list[Actor], float]]:
    step = 0.05 if long else 0.2
    starts = [round(i * step, 3) for i in range(int(4 * WAIT / step) + 1)]
    fates: list[dict[str, object]] = [{}]
    for d in (0.3, 1.0, WAIT + 0.2, 2 * WAIT + 0.3, 4.0):
        fates.append({"die": d})
    for s0 in (2 * WAIT + 0.1, 3.5):
        for length in ((0.5, WAIT - 0.3, WAIT + 0.5, 3 * WAIT) if long else (0.5, 3 * WAIT)):
            fates.append({"stall": (s0, length)})
    for start, fate in itertools.product(starts, fates):
        yield [Actor("a", 0.0, **fate), Actor("b", start)], 6 * WAIT + 8  # type: ignore[arg-type]
    # Three nodes starting together on a clean volume.
    yield [Actor("a", 0.0), Actor("b", 0.0), Actor("c", 0.0)], 3 * WAIT


def test_explore_two_nodes_on_one_device() -> None:
    long = bool(os.environ.get("NEXFS_LONG"))
    runs = outcomes = 0
    seen: set[tuple[str, ...]] = set()
    for actors, horizon in scenarios(long):
        for order in itertools.permutations(range(len(actors))):
            fresh = [Actor(a.name, a.start, a.die, a.stall) for a in actors]
            run_nodes(fresh, order, horizon)
            check_safety(fresh)
            a, b = fresh[0], fresh[1]
            if len(fresh) == 2:
                if a.die is None and a.stall is None and b.start > 0:
                    # A live owner is never displaced.
                    assert b.claimed_at is None and a.lost_at is None, fresh
                    assert b.refused is not None and "host a" in b.refused, fresh
                if a.die is not None and b.start > a.die + 0.01 and b.start >= (
                        a.claimed_at or 0) + 0.01:
                    # A dead owner is taken over.
                    assert b.claimed_at is not None, fresh
            else:
                assert sum(x.claimed_at is not None for x in fresh) <= 1, fresh
            seen.add(tuple(f"{x.name}:{'claimed' if x.claimed_at is not None else 'refused'}"
                           f"{':lost' if x.lost_at is not None else ''}" for x in fresh))
            runs += 1
    outcomes = len(seen)
    # The grid reaches every kind of outcome: refused, taken over, displaced and noticed.
    assert {("a:claimed", "b:refused"), ("a:claimed", "b:claimed"),
            ("a:claimed:lost", "b:claimed")} <= seen, seen
    assert runs >= (2000 if long else 300) and outcomes >= 3


# -- the tools -----------------------------------------------------------------------------


def run_tool(main: Callable[[list[str]], int], *args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    return code, out.getvalue()


def image_mmp(path: Path) -> tuple[Superblock, MmpRecord | None]:
    with Valve.open(path, read_only=True) as v:
        bdev = BlockDev(v.grant(Rights.READ))
        sb = read_superblock(bdev)
        if not sb.mmp:
            return sb, None
        return sb, MmpRecord.decode(bdev.read_blocks(sb.mmp_block, 1), sb.volume_seed,
                                    sb.mmp_block)


def test_mkfs_tune_info_and_fsck_on_an_image(tmp_path: Path) -> None:
    img = tmp_path / "t.img"
    assert run_tool(mkfs.main, "-q", "-s", "64M", "-O", "mmp", "--mmp-interval", "0.1",
                    str(img))[0] == 0
    sb, rec = image_mmp(img)
    assert sb.mmp and sb.mmp_interval == 100 and rec is not None and rec.seq == SEQ_CLEAN
    code, out = run_tool(info.main, str(img))
    assert code == 0 and "block 16382, every 0.1 s; not in use" in out, out
    code, out = run_tool(fsck.main, "-fy", str(img))  # claims with SEQ_FSCK, releases
    assert code == 0, out
    rec = image_mmp(img)[1]
    assert rec is not None and rec.seq == SEQ_CLEAN and rec.pid == os.getpid()  # fsck's
    assert run_tool(tune.main, "-O", "^mmp", str(img)) == (0, f"{img}: multi-mount "
                                                             "protection off\n")
    sb, rec = image_mmp(img)
    assert not sb.mmp and sb.mmp_block == 0 and rec is None
    assert run_tool(fsck.main, "-fn", str(img))[0] == 0  # the block was freed, not leaked
    code, out = run_tool(tune.main, "--mmp-interval", "1", str(img))
    assert code == 1 and "has no multi-mount protection" in out
    code, out = run_tool(tune.main, "-O", "mmp", "--mmp-interval", "0.2", str(img))
    assert code == 0 and "multi-mount protection on (block 16382, every 0.2 s)" in out, out
    assert run_tool(fsck.main, "-fn", str(img))[0] == 0
    assert run_tool(tune.main, "--mmp-interval", "0.3", str(img))[0] == 0
    assert image_mmp(img)[0].mmp_interval == 300
    for bad in (["-O", "nope"], ["--mmp-interval", "0.01", "-O", "mmp"], []):
        code, out = run_tool(tune.main, *bad, str(img))
        assert code == 1 and "Traceback" not in out, (bad, out)
    code, out = run_tool(mkfs.main, "-f", "-O", "mmp", "--mmp-interval", "1000", str(img))
    assert code == 1 and "--mmp-interval must be between" in out


def test_tune_refuses_a_volume_not_cleanly_unmounted(tmp_path: Path) -> None:
    img = tmp_path / "t.img"
    assert run_tool(mkfs.main, "-q", "-s", "64M", str(img))[0] == 0
    with Valve.open(img) as v:
        fs = FileSystem.open(v.grant(Rights.READ | Rights.WRITE))
        fs.store.abort()  # as if the daemon was killed: DIRTY on disk
    code, out = run_tool(tune.main, "-O", "mmp", str(img))
    assert code == 1 and "was not cleanly unmounted" in out, out
    assert not image_mmp(img)[0].mmp
