/*
 * hotpath.h - the data cache's blocks and the short path of the hot requests, in C.
 *
 * The data cache of NexFS (nexfs/store/datacache.py) keeps file-data blocks in memory: a
 * 4 KiB read that hits it, or a small overwrite of mapped blocks, is served from memory.
 * In Python each such request cost an extent lookup, a dict lookup and an LRU move per
 * block, and a bytearray copy.  Here the blocks live in one aligned arena with an index
 * (physical block number -> slot, open addressing), an LRU list and a dirty bit per slot,
 * and one call (nx_dc_read_hot / nx_dc_write_hot) does the whole of a hot request: map the
 * logical blocks through a packed copy of the file's extent runs, check that every block
 * is there (read) or may be taken (write), copy, update LRU, dirty bits and counters.
 * Anything else (a miss, a hole, a block outside the data area, a write that would need a
 * flush or an eviction of more than it may) returns 0 having changed nothing, and the
 * caller takes its general path, which uses the same cache through the primitives below.
 *
 * Memory: `capacity` blocks, plus `slack` slots so that a request may insert its blocks
 * before the caller evicts down to the capacity (the Python cache's order of things).
 * Nothing here does I/O, allocates after nx_dc_open, or takes a lock: one thread (the
 * daemon's trio thread) uses a cache.
 *
 * The block between the cdef markers is part of the cffi ABI (native/build.py).
 */
#ifndef NEXFS_HOTPATH_H
#define NEXFS_HOTPATH_H

#include <stddef.h>
#include <stdint.h>

/* cdef-begin */

#define NX_DC_BLOCK 4096

/* One extent of a file, packed for C: logical blocks [lblk, lblk+n) are physical blocks
 * [phys, phys+n).  An array of them is sorted by lblk and does not overlap. */
struct nx_extent {
    uint64_t lblk;
    uint64_t phys;
    uint64_t n;
};

struct nx_dcache {
    unsigned slots;          /* capacity + slack: the arena's size in blocks */
    unsigned used;           /* blocks held */
    unsigned dirty;          /* of which dirty */
    unsigned mask;           /* index size - 1 (a power of two, at least 2 * slots) */
    uint64_t hits;           /* blocks served from memory (nexfs stats) */
    uint64_t misses;         /* blocks looked up and not found */
    uint64_t short_reads;    /* requests served by nx_dc_read_hot */
    uint64_t short_writes;   /* requests served by nx_dc_write_hot */
    unsigned char *arena;    /* slot i: arena + i * NX_DC_BLOCK, aligned to 4096 */
    uint64_t *key;           /* index: block number + 1 of each entry, 0 = empty */
    int32_t *val;            /* index: the entry's slot */
    uint64_t *blk;           /* per slot: its block number */
    int32_t *prev;           /* per slot: LRU list (-1 ends), head = least recently used */
    int32_t *next;
    unsigned char *flags;    /* per slot: 1 used, 2 dirty */
    int32_t head, tail;      /* the LRU list */
    int32_t free_head;       /* slots freed by a drop, chained through next (-1 ends) */
    unsigned fresh;          /* slots fresh..slots-1 were never used (taken in order) */
};

/* A cache of `capacity` + `slack` slots; 0 and *out set, or -ENOMEM / -EINVAL.  Nothing
 * is touched here beyond the struct: the arena, the index and the per-slot arrays are
 * zero pages until used, so a large cache costs memory only as it fills. */
int nx_dc_open(unsigned capacity, unsigned slack, struct nx_dcache **out);
void nx_dc_close(struct nx_dcache *dc);

/* The slot holding block `blk`, or -1.  find leaves the LRU order alone; touch makes the
 * block the most recently used. */
int nx_dc_find(const struct nx_dcache *dc, uint64_t blk);
int nx_dc_touch(struct nx_dcache *dc, uint64_t blk);

/* Put `blk` in the cache (new, or the slot it has) as the most recently used and copy
 * NX_DC_BLOCK bytes from `data` into it (data NULL: the caller fills the slot); `dirty`
 * != 0 marks it dirty (0 leaves the bit as it was).  Returns the slot, or -ENOSPC when
 * every slot is taken. */
int nx_dc_put(struct nx_dcache *dc, uint64_t blk, const void *data, int dirty);

/* Forget `blk` (dirty or not); 1 if it was there, else 0. */
int nx_dc_drop(struct nx_dcache *dc, uint64_t blk);
/* Forget every block in [first, first + count); how many were there. */
unsigned nx_dc_drop_range(struct nx_dcache *dc, uint64_t first, uint64_t count);
/* Forget everything. */
void nx_dc_clear(struct nx_dcache *dc);

/* Drop least recently used clean blocks while more than `capacity` are held and some are
 * clean.  A dirty block met on the way becomes the most recently used (as the Python
 * cache always did: it pops the oldest entry and puts a dirty one back at the end). */
void nx_dc_evict(struct nx_dcache *dc, unsigned capacity);

/* The dirty blocks' numbers, ascending, into out[0..max); returns how many (all of them
 * if max >= dc->dirty). */
unsigned nx_dc_dirty_list(const struct nx_dcache *dc, uint64_t *out, unsigned max);
/* Copy blocks blks[0..n) (each must be held) one after the other into `out`; returns n,
 * or -ENOENT (nothing useful copied) when one is not held. */
int nx_dc_gather(const struct nx_dcache *dc, const uint64_t *blks, unsigned n, void *out);
/* Clear the dirty bit of each of blks[0..n) still held. */
void nx_dc_mark_clean(struct nx_dcache *dc, const uint64_t *blks, unsigned n);

/* The short path of a read: logical blocks [lblk, lblk + count) of the file whose extents
 * are ext[0..next).  If every one is mapped and held, copy them into `out` (count blocks),
 * make them the most recently used, count them as hits and return count; otherwise return
 * 0 having changed nothing (not even the miss counter: the caller's path counts). */
int nx_dc_read_hot(struct nx_dcache *dc, const struct nx_extent *ext, unsigned next,
                   uint64_t lblk, unsigned count, void *out);

/* The short path of a small overwrite: logical blocks [lblk, lblk + count) from `data`.
 * If every one is mapped to a physical block in [lo, hi) (the data area), the blocks not
 * yet dirty keep the dirty count within `dirty_limit`, and free slots hold the blocks not
 * yet held: copy them in, dirty, most recently used, evict down to `capacity` (as
 * nx_dc_evict), return count.  Otherwise return 0 having changed nothing. */
int nx_dc_write_hot(struct nx_dcache *dc, const struct nx_extent *ext, unsigned next,
                    uint64_t lblk, unsigned count, const void *data, uint64_t lo,
                    uint64_t hi, unsigned dirty_limit, unsigned capacity);

/* cdef-end */

#endif /* NEXFS_HOTPATH_H */
