"""The directory index: name -> (inode number, file type), as a B+tree keyed by name hash.

Key = ``(h << 16) | seq``: ``h`` is a 47-bit hash of the name, keyed with a per-volume secret
(blake2b, so nobody can precompute names that collide on every volume), and ``seq``
(0..65535) tells apart names whose hashes collide.  A lookup descends to the first key of its
hash class and compares names, so lookup and insert are O(log n).

The key doubles as the readdir cookie (``off_t``): it is fixed when the entry is inserted and
never changes while the entry exists, and entries are iterated in key order, so a readdir
interrupted by inserts and removes neither skips nor repeats the entries that were not
touched.  Keys are < 2^63 (they fit a signed off_t) and >= 2^16, so the cookies 1 and 2 of the
synthesized "." and ".." entries (which are not stored) can never clash.

Byte layout of an entry: docs/FORMAT.md, "Directory entries".
"""

from __future__ import annotations

import errno
import hashlib
import logging
import struct
from collections.abc import Callable, Iterator
from typing import Final

from nexfs.ondisk.btree import KIND_DIR, BTree
from nexfs.ondisk.metablock import MetaStore
from nexfs.types import BlockNo, CorruptionError, FsError, InodeNo

log = logging.getLogger(__name__)

ENTRY_HEADER = struct.Struct("<QBB")
"""ino u64, dtype u8, name length u8; the name bytes follow."""
HASH_BITS: Final = 47
SEQ_BITS: Final = 16
_HASH_MASK: Final = (1 << HASH_BITS) - 1
_SEQ_LIMIT: Final = 1 << SEQ_BITS
MIN_COOKIE: Final = 1 << SEQ_BITS
"""Smallest key ever stored (hash 0 is mapped to 1): cookies below are free for . and .."""
MAX_NAME: Final = 255

HashFn = Callable[[bytes], int]


def keyed_hash(hash_key: bytes) -> HashFn:
    """The name hash of a volume: blake2b-64 keyed with ``hash_key``, cut to 47 bits.

    The keyed state is set up once and copied per name (0.59 against 0.83 us), and the
    last name's hash is remembered: a new file's name is hashed by the LOOKUP that finds it
    absent, by the CREATE's name check and by its insert, one after the other."""
    from_bytes = int.from_bytes
    keyed = hashlib.blake2b(digest_size=8, key=hash_key)
    last_name, last_hash = b"", 0  # (b"" is never a valid name)

    def h(name: bytes) -> int:
        nonlocal last_name, last_hash
        if name == last_name:
            return last_hash
        state = keyed.copy()
        state.update(name)
        last_hash = from_bytes(state.digest(), "little") & _HASH_MASK
        last_name = bytes(name)
        return last_hash

    return h


def leaf_check(keys: list[int], vals: list[bytes]) -> str | None:
    """Entry shape, checked once when a leaf is read; names are compared on lookup."""
    hdr = ENTRY_HEADER.size
    if keys[0] < MIN_COOKIE or keys[-1] >= 1 << 63:
        return "key out of the cookie range"
    for k, v in zip(keys, vals, strict=True):
        if (len(v) <= hdr or v[9] != len(v) - hdr or v[:8] == b"\0" * 8
                or v.find(b"/", hdr) >= 0 or v.find(b"\0", hdr) >= 0):
            return f"malformed entry at key {k:#x}"
    return None


class DirIndex:
    """One directory's entries.  ``root`` (0 = empty directory) changes with the tree; the
    caller persists it.  ``hash_fn`` replaces the keyed hash (tests force collisions)."""

    def __init__(self, store: MetaStore, owner: InodeNo | int, root: BlockNo | int,
                 hash_key: bytes, *, hash_fn: HashFn | None = None,
                 goal: BlockNo | None = None) -> None:
        self._tree = BTree(store, owner, root, KIND_DIR, leaf_check=leaf_check, goal=goal)
        self._hash = hash_fn if hash_fn is not None else keyed_hash(hash_key)

    @property
    def root(self) -> int:
        """Root block of the index (0 when the directory is empty)."""
        return self._tree.root

    def _h(self, name: bytes) -> int:
        n = len(name)
        if n == 0 or n > MAX_NAME:
            raise FsError(errno.ENAMETOOLONG if n else errno.EINVAL, "bad name length")
        return (self._hash(name) & _HASH_MASK) or 1

    def _find(self, name: bytes) -> tuple[int, bytes, int, int] | tuple[None, None, int, int]:
        """(key, value) of ``name`` or (None, None), then the hash-class base key and the
        highest seq in use in the class (-1 if none)."""
        base = self._h(name) << SEQ_BITS
        top = base + _SEQ_LIMIT
        first = self._tree.seek_ge(base)
        if first is None or first[0] >= top:
            return None, None, base, -1
        key, v = first
        if v[10:] == name:
            return key, v, base, key - base
        last = key - base
        for k, v in self._tree.iter_from(key + 1):  # a hash collision: rare
            if k >= top:
                break
            if v[10:] == name:
                return k, v, base, k - base
            last = k - base
        return None, None, base, last

    def lookup(self, name: bytes) -> tuple[int, int] | None:
        """(ino, dtype) of ``name``, or None."""
        if self._tree.root == 0:
            return None
        _, v, _, _ = self._find(name)
        if v is None:
            return None
        ino, dtype, _ = ENTRY_HEADER.unpack_from(v, 0)
        return ino, dtype

    def insert(self, name: bytes, ino: int, dtype: int) -> int:
        """Add an entry (FsError(EEXIST) if the name exists); returns its cookie."""
        if not 0 < ino < 1 << 64 or not 0 <= dtype < 256:
            raise ValueError("bad inode number or type")
        base = self._h(name) << SEQ_BITS
        value = ENTRY_HEADER.pack(ino, dtype, len(name)) + name
        # Nearly always the name's hash class is empty: claim seq 0 in a single descent.
        if self._tree.insert_if_none_in(base, base + _SEQ_LIMIT, base, value) is None:
            return base
        key, _, base, last = self._find(name)
        if key is not None:
            raise FsError(errno.EEXIST)
        seq = last + 1
        if seq >= _SEQ_LIMIT:
            seq = self._free_seq(base)
        self._tree.insert(base + seq, value)
        return base + seq

    def _free_seq(self, base: int) -> int:
        """Lowest unused seq of a full-to-the-top hash class (only after many removals)."""
        top = base + _SEQ_LIMIT
        expect = 0
        for expect, (key, _) in enumerate(self._tree.iter_from(base)):
            if key >= top or key - base != expect:
                return expect
        if expect + 1 < _SEQ_LIMIT:
            return expect + 1
        raise FsError(errno.ENOSPC, "65536 names share one hash")

    def remove(self, name: bytes) -> tuple[int, int]:
        """Remove an entry (FsError(ENOENT) if absent); returns its (ino, dtype)."""
        if self._tree.root == 0:
            raise FsError(errno.ENOENT)
        base = self._h(name) << SEQ_BITS
        # Nearly always the name is the first of its hash class: found and removed in one
        # descent.  Else (a collision, or absent) the search below.
        hit = self._tree.delete_first_if(base, base + _SEQ_LIMIT, ENTRY_HEADER.size, name)
        if hit is not None:
            ino, dtype, _ = ENTRY_HEADER.unpack_from(hit[1], 0)
            return ino, dtype
        key = self._find(name)[0]
        if key is None:
            raise FsError(errno.ENOENT)
        ino, dtype, _ = ENTRY_HEADER.unpack_from(self._tree.delete(key), 0)
        return ino, dtype

    def replace(self, name: bytes, ino: int, dtype: int) -> tuple[int, int]:
        """Point an existing entry at another inode, keeping its cookie (rename over an
        existing name); FsError(ENOENT) if absent.  Returns the old (ino, dtype)."""
        if not 0 < ino < 1 << 64 or not 0 <= dtype < 256:
            raise ValueError("bad inode number or type")
        key = self._find(name)[0] if self._tree.root != 0 else None
        if key is None:
            raise FsError(errno.ENOENT)
        old = self._tree.replace(key, ENTRY_HEADER.pack(ino, dtype, len(name)) + name)
        o_ino, o_dtype, _ = ENTRY_HEADER.unpack_from(old, 0)
        return o_ino, o_dtype

    def iter_from(self, cookie: int = 0) -> Iterator[tuple[int, bytes, int, int]]:
        """(cookie, name, ino, dtype) of every entry with a cookie > ``cookie``, ascending."""
        if cookie >= (1 << 63) - 1:
            return
        unpack = ENTRY_HEADER.unpack_from
        for key, v in self._tree.iter_from(max(cookie + 1, MIN_COOKIE)):
            ino, dtype, _ = unpack(v, 0)
            yield key, v[10:], ino, dtype

    def is_empty(self) -> bool:
        """True when the directory has no entries (no I/O)."""
        return self._tree.root == 0

    def count(self) -> int:
        """Number of entries (walks every leaf: O(n); keep a count in the inode instead)."""
        return sum(1 for _ in self._tree.iter_from(0))

    def tree_blocks(self) -> int:
        """Number of index nodes (reads the interior nodes)."""
        return self._tree.count_nodes()

    def worst_case_new_blocks(self) -> int:
        """Blocks one insert (or replace) may allocate."""
        return self._tree.worst_case_new_blocks(1)

    def destroy(self) -> None:
        """Free every node (for rmdir of an empty directory this frees nothing)."""
        if self._tree.root != 0:
            log.debug("destroying non-empty directory index of inode %s", self._tree.owner)
        self._tree.destroy()

    def check_hash(self, cookie: int, name: bytes) -> None:
        """fsck helper: CorruptionError unless ``cookie`` belongs to ``name``'s hash class."""
        if cookie >> SEQ_BITS != self._h(name):
            raise CorruptionError(self._tree.root, "directory index",
                                  f"entry {name!r} at cookie {cookie:#x} under a wrong hash")
