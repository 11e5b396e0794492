"""Extended attributes of one inode: a B+tree of (full name -> value).

Names are full names as bytes (``b"user.foo"``), 1..255 bytes; values 0..65536 bytes.  A
value larger than one B+tree value is cut into chunks stored under consecutive keys:

    key = (h << 24) | (seq << 8) | chunk

``h`` is a 40-bit hash of the name, ``seq`` (16 bits) tells apart names whose hashes
collide, ``chunk`` (8 bits) numbers the pieces.  Chunk 0 holds the value length, the name
and the first bytes of the value; chunks 1.. hold the rest, :data:`~nexfs.ondisk.btree.MAX_VALUE`
bytes each (the last one shorter).  An inode without extended attributes has root 0 and
costs nothing: no block, no I/O for a miss.

Every public operation validates its arguments before changing anything, so an error it
raises itself never leaves half-written chunks (ENOSPC from the store aborts the whole
transaction, as for every operation).  Byte layout: docs/FORMAT.md, "Extended attributes".
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import struct
from collections.abc import Callable, Iterator
from typing import Final

from nexfs.ondisk.btree import KIND_XATTR, MAX_VALUE, BTree
from nexfs.ondisk.metablock import MetaStore
from nexfs.types import BlockNo, CorruptionError, FsError, InodeNo

XATTR_CREATE: Final = 1
XATTR_REPLACE: Final = 2
MAX_NAME: Final = 255
MAX_SIZE: Final = 65536

CHUNK0_HEADER = struct.Struct("<IB")
"""Chunk 0 starts with: value length u32, name length u8; then name, then value bytes."""
HASH_BITS: Final = 40
_HASH_MASK: Final = (1 << HASH_BITS) - 1
_SEQ_SHIFT: Final = 8
_CLASS_SHIFT: Final = 24
_SEQ_LIMIT: Final = 1 << 16
_CHUNK_MASK: Final = 0xFF

HashFn = Callable[[bytes], int]


def n_chunks(name_len: int, value_len: int) -> int:
    """How many tree entries a (name, value) pair takes."""
    first = MAX_VALUE - CHUNK0_HEADER.size - name_len
    if value_len <= first:
        return 1
    return 1 + -(-(value_len - first) // MAX_VALUE)


def _leaf_check(keys: list[int], vals: list[bytes]) -> str | None:
    hsz = CHUNK0_HEADER.size
    for k, v in zip(keys, vals, strict=True):
        if k & _CHUNK_MASK == 0:
            if len(v) <= hsz:
                return f"short xattr header at key {k:#x}"
            vlen, nlen = CHUNK0_HEADER.unpack_from(v, 0)
            if nlen == 0 or vlen > MAX_SIZE or len(v) != hsz + nlen + min(
                    vlen, MAX_VALUE - hsz - nlen):
                return f"malformed xattr header at key {k:#x}"
        elif not v:
            return f"empty xattr chunk at key {k:#x}"
    return None


class XattrStore:
    """The extended attributes of one inode.  ``root`` (0 = none) changes with the tree; the
    caller persists it.  ``hash_fn`` replaces the name hash (tests force collisions)."""

    def __init__(self, store: MetaStore, owner: InodeNo | int, root: BlockNo | int,
                 hash_key: bytes = b"", *, hash_fn: HashFn | None = None,
                 goal: BlockNo | None = None) -> None:
        self._tree = BTree(store, owner, root, KIND_XATTR, leaf_check=_leaf_check, goal=goal)
        if hash_fn is None:
            blake2b = hashlib.blake2b

            def hash_fn(name: bytes) -> int:
                return int.from_bytes(blake2b(name, digest_size=8, key=hash_key).digest(),
                                      "little")
        self._hash: HashFn = hash_fn

    @property
    def root(self) -> int:
        """Root block of the attribute tree (0 when the inode has none)."""
        return self._tree.root

    @staticmethod
    def _check_name(name: bytes) -> None:
        if not 0 < len(name) <= MAX_NAME:
            raise FsError(errno.ERANGE, "bad xattr name length")

    def _find(self, name: bytes) -> tuple[int | None, bytes, int, int]:
        """(key of chunk 0 or None, its value, hash-class base key, highest seq in use)."""
        base = (self._hash(name) & _HASH_MASK) << _CLASS_SHIFT
        top = base + (1 << _CLASS_SHIFT)
        k = base
        last = -1
        while True:
            e = self._tree.seek_ge(k)
            if e is None or e[0] >= top:
                return None, b"", base, last
            key, v = e
            if key & _CHUNK_MASK:
                raise CorruptionError(self._tree.root, "xattr tree",
                                      f"chunk {key:#x} without its first chunk")
            if v[5:5 + v[4]] == name:
                return key, v, base, (key - base) >> _SEQ_SHIFT
            last = (key - base) >> _SEQ_SHIFT
            k = key + (1 << _SEQ_SHIFT)  # skip this name's chunks: the next seq

    def _locate(self, name: bytes) -> tuple[int, bytes, int, int]:
        """(key of chunk 0, its value, value length, name length) of ``name``;
        FsError(ENODATA) if absent."""
        self._check_name(name)
        if self._tree.root == 0:
            raise FsError(errno.ENODATA)
        key, v0, _, _ = self._find(name)
        if key is None:
            raise FsError(errno.ENODATA)
        vlen, nlen = CHUNK0_HEADER.unpack_from(v0, 0)
        return key, v0, vlen, nlen

    def get(self, name: bytes) -> bytes:
        """The value of ``name``; FsError(ENODATA) if absent."""
        key, v0, vlen, nlen = self._locate(name)
        parts = [v0[CHUNK0_HEADER.size + nlen:]]
        got = len(parts[0])
        if got < vlen:
            for k, v in self._tree.iter_from(key + 1):
                if k != key + len(parts):
                    break
                parts.append(v)
                got += len(v)
                if got >= vlen:
                    break
        if got != vlen or len(parts) != n_chunks(nlen, vlen):
            raise CorruptionError(self._tree.root, "xattr tree",
                                  f"value of {name!r}: {got} bytes in chunks, header says {vlen}")
        return b"".join(parts)

    def set(self, name: bytes, value: bytes, flags: int = 0) -> None:
        """Create or replace an attribute.

        flags: XATTR_CREATE fails with EEXIST if it exists, XATTR_REPLACE with ENODATA if it
        does not.  E2BIG for a value over 64 KiB, ERANGE for a bad name length.
        """
        if flags & ~(XATTR_CREATE | XATTR_REPLACE):
            raise FsError(errno.EINVAL, "unknown xattr flags")
        self._check_name(name)
        if len(value) > MAX_SIZE:
            raise FsError(errno.E2BIG)
        if self._tree.root != 0:
            key, v0, base, last = self._find(name)
        else:
            key, v0, base, last = None, b"", (self._hash(name) & _HASH_MASK) << _CLASS_SHIFT, -1
        if key is not None and flags & XATTR_CREATE:
            raise FsError(errno.EEXIST)
        if key is None and flags & XATTR_REPLACE:
            raise FsError(errno.ENODATA)
        if key is None:
            seq = last + 1 if last + 1 < _SEQ_LIMIT else self._free_seq(base)
            key = base + (seq << _SEQ_SHIFT)
            old_n = 0
        else:
            vlen, nlen = CHUNK0_HEADER.unpack_from(v0, 0)
            old_n = n_chunks(nlen, vlen)
        # All checks done: from here on only the store can fail (and abort the transaction).
        value = bytes(value)
        first = MAX_VALUE - CHUNK0_HEADER.size - len(name)
        chunks = [CHUNK0_HEADER.pack(len(value), len(name)) + name + value[:first]]
        chunks.extend(value[i:i + MAX_VALUE] for i in range(first, len(value), MAX_VALUE))
        tree = self._tree
        for i in range(max(old_n, len(chunks))):
            if i >= len(chunks):
                tree.delete(key + i)
            elif i < old_n:
                tree.replace(key + i, chunks[i])
            else:
                tree.insert(key + i, chunks[i])

    def _free_seq(self, base: int) -> int:
        used = {(k - base) >> _SEQ_SHIFT for k, _ in self._iter_class(base)}
        for seq in range(_SEQ_LIMIT):
            if seq not in used:
                return seq
        raise FsError(errno.ENOSPC, "65536 xattr names share one hash")

    def _iter_class(self, base: int) -> Iterator[tuple[int, bytes]]:
        top = base + (1 << _CLASS_SHIFT)
        for k, v in self._tree.iter_from(base):
            if k >= top:
                return
            yield k, v

    def remove(self, name: bytes) -> None:
        """Remove an attribute; FsError(ENODATA) if absent."""
        key, _v0, vlen, nlen = self._locate(name)
        for i in range(n_chunks(nlen, vlen)):
            try:
                self._tree.delete(key + i)
            except KeyError:
                raise CorruptionError(self._tree.root, "xattr tree",
                                      f"chunk {i} of {name!r} missing") from None

    def list(self) -> builtins.list[bytes]:
        """All attribute names (in hash order)."""
        names: builtins.list[bytes] = []
        k = 0
        while self._tree.root != 0:
            e = self._tree.seek_ge(k)
            if e is None:
                break
            key, v = e
            if key & _CHUNK_MASK == 0:
                names.append(v[5:5 + v[4]])
            k = (key | _CHUNK_MASK) + 1  # jump over the rest of this name's chunks
        return names

    def destroy(self) -> None:
        """Free every node (inode deletion)."""
        self._tree.destroy()

    def tree_blocks(self) -> int:
        """Number of tree nodes (reads the interior nodes)."""
        return self._tree.count_nodes()

    def worst_case_new_blocks(self, value_len: int) -> int:
        """Blocks a set of a ``value_len``-byte value may allocate (any name length)."""
        return self._tree.worst_case_new_blocks(n_chunks(MAX_NAME, value_len))
