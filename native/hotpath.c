/*
 * hotpath.c - the data cache's blocks and the short path of the hot requests (hotpath.h).
 */
#include "hotpath.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define F_USED 1
#define F_DIRTY 2

static inline unsigned hash_of(uint64_t blk, unsigned mask)
{
    /* Fibonacci hashing: neighbouring blocks (the common case) spread over the table. */
    return (unsigned)((blk * 0x9E3779B97F4A7C15ull) >> 32) & mask;
}

static inline unsigned index_pos(const struct nx_dcache *dc, uint64_t blk, int *found);

int nx_dc_open(unsigned capacity, unsigned slack, struct nx_dcache **out)
{
    uint64_t slots = (uint64_t)capacity + slack;
    if (slots == 0 || slots > (1u << 30))
        return -EINVAL;
    unsigned size = 16;
    while (size < 2 * slots)
        size <<= 1;
    struct nx_dcache *dc = calloc(1, sizeof(*dc));
    if (dc == NULL)
        return -ENOMEM;
    dc->slots = (unsigned)slots;
    dc->mask = size - 1;
    /* The arena's pages are touched only when a slot is first used: an idle cache costs
     * address space, not memory. */
    if (posix_memalign((void **)&dc->arena, NX_DC_BLOCK, slots * NX_DC_BLOCK) != 0)
        dc->arena = NULL;
    dc->key = calloc(size, sizeof(*dc->key));
    dc->val = calloc(size, sizeof(*dc->val));
    dc->blk = calloc(slots, sizeof(*dc->blk));
    dc->prev = calloc(slots, sizeof(*dc->prev));
    dc->next = calloc(slots, sizeof(*dc->next));
    dc->flags = calloc(slots, sizeof(*dc->flags));
    if (!dc->arena || !dc->key || !dc->val || !dc->blk || !dc->prev || !dc->next || !dc->flags) {
        nx_dc_close(dc);
        return -ENOMEM;
    }
    /* calloc's memory reads as zeros: the index is empty, no slot is used. */
    dc->free_head = -1;
    dc->fresh = 0;
    dc->head = dc->tail = -1;
    *out = dc;
    return 0;
}

void nx_dc_close(struct nx_dcache *dc)
{
    if (dc == NULL)
        return;
    free(dc->arena);
    free(dc->key);
    free(dc->val);
    free(dc->blk);
    free(dc->prev);
    free(dc->next);
    free(dc->flags);
    free(dc);
}

void nx_dc_clear(struct nx_dcache *dc)
{
    /* Only what was ever used can be set: the index entries of the held blocks, and the
     * flags of slots below `fresh`. */
    int32_t s;
    /* Find every entry first (prev[] as scratch: the list is reset below), then empty them:
     * emptying while looking would break the probe chains of the entries not yet found. */
    for (s = dc->head; s >= 0; s = dc->next[s]) {
        int found;
        dc->prev[s] = (int32_t)index_pos(dc, dc->blk[s], &found);
        (void)found;
    }
    for (s = dc->head; s >= 0; s = dc->next[s])
        dc->key[dc->prev[s]] = 0;
    memset(dc->flags, 0, dc->fresh);
    dc->free_head = -1;
    dc->fresh = 0;
    dc->head = dc->tail = -1;
    dc->used = dc->dirty = 0;
}

/* -- the index ---------------------------------------------------------------------------- */

static inline unsigned index_pos(const struct nx_dcache *dc, uint64_t blk, int *found)
{
    unsigned i = hash_of(blk, dc->mask);
    for (;;) {
        uint64_t k = dc->key[i];
        if (k == blk + 1) {
            *found = 1;
            return i;
        }
        if (k == 0) {
            *found = 0;
            return i;
        }
        i = (i + 1) & dc->mask;
    }
}

int nx_dc_find(const struct nx_dcache *dc, uint64_t blk)
{
    int found;
    unsigned i = index_pos(dc, blk, &found);
    return found ? dc->val[i] : -1;
}

static void index_remove(struct nx_dcache *dc, unsigned i)
{
    /* Backward-shift deletion: the probe chains after i stay unbroken without tombstones. */
    unsigned mask = dc->mask;
    unsigned j = i;
    for (;;) {
        j = (j + 1) & mask;
        uint64_t k = dc->key[j];
        if (k == 0)
            break;
        unsigned home = hash_of(k - 1, mask);
        /* Move the entry at j into the hole at i unless its home lies cyclically in (i, j]. */
        if (i <= j ? (i < home && home <= j) : (i < home || home <= j))
            continue;
        dc->key[i] = k;
        dc->val[i] = dc->val[j];
        i = j;
    }
    dc->key[i] = 0;
}

/* -- the LRU list ------------------------------------------------------------------------- */

static inline void lru_unlink(struct nx_dcache *dc, int32_t s)
{
    int32_t p = dc->prev[s], n = dc->next[s];
    if (p >= 0)
        dc->next[p] = n;
    else
        dc->head = n;
    if (n >= 0)
        dc->prev[n] = p;
    else
        dc->tail = p;
}

static inline void lru_append(struct nx_dcache *dc, int32_t s)
{
    dc->prev[s] = dc->tail;
    dc->next[s] = -1;
    if (dc->tail >= 0)
        dc->next[dc->tail] = s;
    else
        dc->head = s;
    dc->tail = s;
}

static inline void lru_to_end(struct nx_dcache *dc, int32_t s)
{
    if (dc->tail != s) {
        lru_unlink(dc, s);
        lru_append(dc, s);
    }
}

int nx_dc_touch(struct nx_dcache *dc, uint64_t blk)
{
    int s = nx_dc_find(dc, blk);
    if (s >= 0)
        lru_to_end(dc, s);
    return s;
}

/* -- putting and dropping ----------------------------------------------------------------- */

int nx_dc_put(struct nx_dcache *dc, uint64_t blk, const void *data, int dirty)
{
    int found;
    unsigned i = index_pos(dc, blk, &found);
    int32_t s;
    if (found) {
        s = dc->val[i];
        lru_to_end(dc, s);
    } else {
        s = dc->free_head;
        if (s >= 0)
            dc->free_head = dc->next[s];
        else if (dc->fresh < dc->slots)
            s = (int32_t)dc->fresh++;
        else
            return -ENOSPC;
        dc->key[i] = blk + 1;
        dc->val[i] = s;
        dc->blk[s] = blk;
        dc->flags[s] = F_USED;
        dc->used++;
        lru_append(dc, s);
    }
    if (dirty && !(dc->flags[s] & F_DIRTY)) {
        dc->flags[s] |= F_DIRTY;
        dc->dirty++;
    }
    if (data != NULL)
        memcpy(dc->arena + (size_t)s * NX_DC_BLOCK, data, NX_DC_BLOCK);
    return s;
}

static void drop_slot(struct nx_dcache *dc, unsigned i, int32_t s)
{
    index_remove(dc, i);
    lru_unlink(dc, s);
    if (dc->flags[s] & F_DIRTY)
        dc->dirty--;
    dc->flags[s] = 0;
    dc->used--;
    dc->next[s] = dc->free_head;
    dc->free_head = s;
}

int nx_dc_drop(struct nx_dcache *dc, uint64_t blk)
{
    int found;
    unsigned i = index_pos(dc, blk, &found);
    if (!found)
        return 0;
    drop_slot(dc, i, dc->val[i]);
    return 1;
}

unsigned nx_dc_drop_range(struct nx_dcache *dc, uint64_t first, uint64_t count)
{
    unsigned n = 0;
    if (dc->used == 0)
        return 0;
    if (count <= dc->used) {
        for (uint64_t b = first; b < first + count; b++)
            n += (unsigned)nx_dc_drop(dc, b);
        return n;
    }
    /* A long range (a large file's truncate): walk what is held instead. */
    for (unsigned s = 0; s < dc->fresh; s++) {
        if ((dc->flags[s] & F_USED) && dc->blk[s] >= first && dc->blk[s] - first < count)
            n += (unsigned)nx_dc_drop(dc, dc->blk[s]);
    }
    return n;
}

void nx_dc_evict(struct nx_dcache *dc, unsigned capacity)
{
    while (dc->used > capacity && dc->used > dc->dirty) {
        int32_t s = dc->head;
        if (dc->flags[s] & F_DIRTY) {
            lru_to_end(dc, s);
            continue;
        }
        int found;
        unsigned i = index_pos(dc, dc->blk[s], &found);
        (void)found;  /* a held slot is always in the index */
        drop_slot(dc, i, s);
    }
}

/* -- flushing ----------------------------------------------------------------------------- */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

unsigned nx_dc_dirty_list(const struct nx_dcache *dc, uint64_t *out, unsigned max)
{
    unsigned n = 0;
    for (unsigned s = 0; s < dc->fresh && n < max; s++) {
        if (dc->flags[s] & F_DIRTY)
            out[n++] = dc->blk[s];
    }
    qsort(out, n, sizeof(*out), cmp_u64);
    return n;
}

int nx_dc_gather(const struct nx_dcache *dc, const uint64_t *blks, unsigned n, void *out)
{
    unsigned char *o = out;
    for (unsigned k = 0; k < n; k++) {
        int s = nx_dc_find(dc, blks[k]);
        if (s < 0)
            return -ENOENT;
        memcpy(o + (size_t)k * NX_DC_BLOCK, dc->arena + (size_t)s * NX_DC_BLOCK, NX_DC_BLOCK);
    }
    return (int)n;
}

void nx_dc_mark_clean(struct nx_dcache *dc, const uint64_t *blks, unsigned n)
{
    for (unsigned k = 0; k < n; k++) {
        int s = nx_dc_find(dc, blks[k]);
        if (s >= 0 && (dc->flags[s] & F_DIRTY)) {
            dc->flags[s] &= ~F_DIRTY;
            dc->dirty--;
        }
    }
}

/* -- the short path ----------------------------------------------------------------------- */

/* The physical block of logical block `l`, or 0 for a hole; *hint carries the extent found
 * last, so that the blocks of one request (almost always in one extent) cost one search. */
static inline uint64_t map_one(const struct nx_extent *ext, unsigned next, uint64_t l,
                               unsigned *hint)
{
    unsigned h = *hint;
    if (h < next && ext[h].lblk <= l && l - ext[h].lblk < ext[h].n)
        return ext[h].phys + (l - ext[h].lblk);
    unsigned lo = 0, hi = next;  /* the last extent with lblk <= l */
    while (lo < hi) {
        unsigned mid = lo + (hi - lo) / 2;
        if (ext[mid].lblk <= l)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return 0;
    const struct nx_extent *e = &ext[lo - 1];
    if (l - e->lblk >= e->n)
        return 0;
    *hint = lo - 1;
    return e->phys + (l - e->lblk);
}

#define HOT_MAX 64  /* blocks: longer requests are never short (the cache takes 16 at most) */

int nx_dc_read_hot(struct nx_dcache *dc, const struct nx_extent *ext, unsigned next,
                   uint64_t lblk, unsigned count, void *out)
{
    int32_t slot[HOT_MAX];
    unsigned hint = 0;
    if (count == 0 || count > HOT_MAX || dc->used == 0)
        return 0;
    for (unsigned k = 0; k < count; k++) {
        uint64_t p = map_one(ext, next, lblk + k, &hint);
        if (p == 0)
            return 0;
        slot[k] = nx_dc_find(dc, p);
        if (slot[k] < 0)
            return 0;
    }
    unsigned char *o = out;
    for (unsigned k = 0; k < count; k++) {
        memcpy(o + (size_t)k * NX_DC_BLOCK, dc->arena + (size_t)slot[k] * NX_DC_BLOCK,
               NX_DC_BLOCK);
        lru_to_end(dc, slot[k]);
    }
    dc->hits += count;
    dc->short_reads++;
    return (int)count;
}

int nx_dc_write_hot(struct nx_dcache *dc, const struct nx_extent *ext, unsigned next,
                    uint64_t lblk, unsigned count, const void *data, uint64_t lo,
                    uint64_t hi, unsigned dirty_limit, unsigned capacity)
{
    uint64_t phys[HOT_MAX];
    unsigned run[HOT_MAX];  /* the extent each block is in */
    unsigned hint = 0, fresh = 0, new_dirty = 0;
    if (count == 0 || count > HOT_MAX)
        return 0;
    for (unsigned k = 0; k < count; k++) {
        uint64_t p = map_one(ext, next, lblk + k, &hint);
        if (p == 0 || p < lo || p >= hi)
            return 0;
        phys[k] = p;
        run[k] = hint;
        int s = nx_dc_find(dc, p);
        if (s < 0) {
            fresh++;
            new_dirty++;
        } else if (!(dc->flags[s] & F_DIRTY)) {
            new_dirty++;
        }
    }
    if (dc->dirty + new_dirty > dirty_limit || dc->used + fresh > dc->slots)
        return 0;
    const unsigned char *d = data;
    for (unsigned k = 0; k < count; k++) {
        nx_dc_put(dc, phys[k], d + (size_t)k * NX_DC_BLOCK, 1);
        /* The general path writes each extent's part as one write, which evicts after it:
         * the same here, so that both leave the same blocks in the same order. */
        if (k + 1 == count || run[k + 1] != run[k])
            nx_dc_evict(dc, capacity);
    }
    dc->short_writes++;
    return (int)count;
}
