"""The visible state of a filesystem, as a value: what the crash oracle compares.

:func:`take_view` walks the namespace of an open :class:`~nexfs.core.fs.FileSystem` in-process and
returns a :class:`View`: for every path its inode number, generation, type, permission bits,
link count, size, symlink target and extended attributes, and the contents of every regular
file.  Two views of the same committed state are equal, inode numbers included (a replayed
journal restores the exact blocks).

:func:`explain_match` decides whether a view observed after a crash is one of the states the
workload went through (see tests/test_crash_explore.py and docs/RELIABILITY.md for the
contract): metadata exactly equal to some candidate state ``S_j``, and every byte of every file
either its value in ``S_j`` or a value a later candidate ``S_i`` (i > j) gave it — an
overwrite in place of already allocated blocks may reach the disk before the transaction
that follows it (ordered data, as ext4's data=ordered).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from nexfs.core.attr import Ctx
from nexfs.core.fs import ROOT_INO, FileSystem

ROOT = Ctx(uid=0, gid=0)
NodeId = tuple[int, int]  # (inode number, generation)


@dataclass(frozen=True)
class Entry:
    """One name: what stat, readlink and listxattr say about it (no timestamps)."""

    ino: int
    generation: int
    kind: str  # "f", "d", "l", "o" (other)
    mode: int  # permission bits
    nlink: int
    size: int  # regular files and symlinks; 0 for directories
    target: bytes = b""
    xattrs: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def node(self) -> NodeId:
        return (self.ino, self.generation)


@dataclass
class View:
    entries: dict[str, Entry] = field(default_factory=dict)
    contents: dict[NodeId, bytes] = field(default_factory=dict)

    def describe(self) -> str:
        lines = []
        for path, e in sorted(self.entries.items()):
            extra = f" -> {e.target!r}" if e.kind == "l" else ""
            lines.append(f"  {path}: ino {e.ino} {e.kind} {e.mode:o} nlink {e.nlink} "
                         f"size {e.size}{extra} xattrs {[n for n, _ in e.xattrs]}")
        return "\n".join(lines)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    return "o"


def take_view(fs: FileSystem, *, skip: frozenset[str] = frozenset({"lost+found"})) -> View:
    """Walk everything reachable from the root (depth first, directories via readdir)."""
    view = View()
    todo: list[tuple[str, int]] = [("", ROOT_INO)]
    while todo:
        prefix, dino = todo.pop()
        for name, attr, _cookie in fs.readdir(dino, 0):
            if name in (b".", b"..") or (not prefix and name.decode() in skip):
                continue
            path = prefix + name.decode("utf-8", "surrogateescape")
            kind = _kind(attr.mode)
            names = fs.listxattr(attr.ino) if kind in "fd" else []
            xattrs = tuple(sorted((n, fs.getxattr(attr.ino, n, ROOT)) for n in names))
            target = fs.readlink(attr.ino) if kind == "l" else b""
            entry = Entry(attr.ino, attr.generation, kind, attr.mode & 0o7777, attr.nlink,
                          0 if kind == "d" else attr.size, target, xattrs)
            view.entries[path] = entry
            if kind == "d":
                todo.append((path + "/", attr.ino))
            elif kind == "f" and entry.node not in view.contents:
                data = fs.read(attr.ino, 0, attr.size + 1)
                assert len(data) == attr.size, f"{path}: read {len(data)} of {attr.size} bytes"
                view.contents[entry.node] = data
    return view


def _bytes_allowed(seen: bytes, options: list[bytes]) -> str | None:
    """None if every byte of ``seen`` equals that byte in one of ``options`` (missing bytes
    count as zero); else where it does not."""
    if seen in options:
        return None
    step = 4096
    for off in range(0, len(seen), step):
        chunk = seen[off : off + step]
        cands = [o[off : off + len(chunk)].ljust(len(chunk), b"\0") for o in options]
        if chunk in cands:
            continue
        for i, b in enumerate(chunk):
            if all(c[i] != b for c in cands):
                return f"byte {off + i} is {b:#x}, which no candidate state had"
    return None


def explain_match(seen: View, candidates: list[View]) -> str | None:
    """None if ``seen`` is candidate j's metadata with data from candidates j.. (see the
    module docstring); otherwise a description of the closest mismatch."""
    why = "no candidate states"
    for j, cand in enumerate(candidates):
        if seen.entries != cand.entries:
            diff = sorted(set(seen.entries.items()) ^ set(cand.entries.items()), key=str)
            why = f"metadata differs from candidate {j}: {diff[:4]}"
            continue
        bad = None
        for node, data in seen.contents.items():
            options = [c.contents[node] for c in candidates[j:] if node in c.contents]
            problem = _bytes_allowed(data, options)
            if problem:
                bad = f"candidate {j}: inode {node[0]}: {problem}"
                break
        if bad is None:
            return None
        why = bad
    return why
