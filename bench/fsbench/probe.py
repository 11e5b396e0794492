"""What else happened during each fio phase: the evidence for reading a figure.

Two things move a figure without being the system's speed, and both are recorded per phase
in the JSON (``phases``), so that an odd figure can be explained from the run itself:

* **The disk was busy with other work.**  Cold phases start right after ``sync``; hot ones
  right after the job before them, so the host's writeback of dirty pages (the machine's
  other processes', or the host filesystem's own metadata) may still be running and compete
  with the system's O_DIRECT transfers.  Recorded: the host's dirty and writeback memory at
  the start (``/proc/meminfo``), and what the disk holding the images read and wrote during
  the phase (``/proc/diskstats``: everyone's traffic, the system's own included).
* **A cache the kernel does not drop.**  ``drop_caches`` empties the host's page cache, not
  the NexFS daemon's own data cache: on NexFS (and NexFS on NBD) the data-cache hits, the
  blocks read from the device instead (misses, reads in flight and large reads) and the
  valve's reads during the phase come from ``nexfs stats``'s document (the
  ``user.nexfs.stats`` xattr of the mount's root).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

STATS_XATTR = "user.nexfs.stats"
SECTOR = 512
"""/proc/diskstats counts 512-byte sectors whatever the device's own size."""
MiB = 1024 * 1024


def disk_of(path: Path) -> str | None:
    """The whole-disk name in /proc/diskstats holding ``path`` (``vda`` for ``vda1``)."""
    st = os.stat(path)
    try:
        real = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    except OSError:
        return None
    if not os.path.exists(real):
        return None
    if os.path.exists(os.path.join(real, "partition")):
        real = os.path.dirname(real)
    return os.path.basename(real)


def _disk(name: str | None) -> tuple[int, int] | None:
    """(sectors read, sectors written) of ``name`` so far."""
    if name is None:
        return None
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 9 and fields[2] == name:
                return int(fields[5]), int(fields[9])
    return None


def _meminfo_mib() -> dict[str, float]:
    got = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Dirty", "Writeback"):
                got[key.lower()] = round(int(rest.split()[0]) / 1024, 1)
    return got


def _nexfs_stats(mountpoint: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        doc: dict[str, Any] = json.loads(os.getxattr(mountpoint, STATS_XATTR))
        return doc
    return None


class PhaseProbe:
    """``start()`` before a phase, ``stop()`` after it: returns what happened meanwhile."""

    def __init__(self, disk: str | None, mountpoint: Path | None) -> None:
        self.disk = disk
        self.mountpoint = mountpoint
        self._disk0: tuple[int, int] | None = None
        self._stats0: dict[str, Any] | None = None
        self._mem0: dict[str, float] = {}

    def start(self) -> None:
        self._mem0 = _meminfo_mib()
        self._disk0 = _disk(self.disk)
        self._stats0 = None if self.mountpoint is None else _nexfs_stats(self.mountpoint)

    def stop(self) -> dict[str, Any]:
        got: dict[str, Any] = {f"{k}_mib_at_start": v for k, v in self._mem0.items()}
        disk1 = _disk(self.disk)
        if self._disk0 is not None and disk1 is not None:
            got["disk_read_mib"] = round((disk1[0] - self._disk0[0]) * SECTOR / MiB, 1)
            got["disk_written_mib"] = round((disk1[1] - self._disk0[1]) * SECTOR / MiB, 1)
        after = None if self.mountpoint is None else _nexfs_stats(self.mountpoint)
        if self._stats0 is not None and after is not None:
            data0, data1 = self._stats0["caches"]["data"], after["caches"]["data"]
            hits = data1["hits"] - data0["hits"]
            # Blocks of large reads are "bypassed", not "misses": they went to the device
            # too, so here a miss is any block read from the device.
            misses = (data1["misses"] - data0["misses"]
                      + data1["bypassed"] - data0["bypassed"])
            got["data_cache_hits"] = hits
            got["data_cache_misses"] = misses
            got["data_cache_hit_rate"] = round(hits / (hits + misses), 3) if hits + misses else None
            got["valve_reads"] = after["valve"]["reads"] - self._stats0["valve"]["reads"]
        return got
