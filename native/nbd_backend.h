/*
 * nbd_backend.h - the NBD (network block device) backend of the NexFS Block Valve.
 *
 * The same whole-sector contract as nexfs_core.h, against an NBD export reached with
 * libnbd: `nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH` (libnbd's URI
 * syntax).  Geometry, counters and the closing/in-flight handshake live in an embedded
 * `struct nx_dev` (its fd stays -1), so the valve reads them the same way for both
 * backends.  Every function returns 0 on success and -errno on failure.
 *
 * Requests are pipelined: a vectored transfer or a batch (nx_nbd_submit) issues all of
 * its NBD commands before waiting for any, and any number of threads may submit at once.
 * Every wait has a deadline (timeout_ms): a request the server has not answered by then
 * makes the backend drop the connection, which fails every request in flight with -EIO
 * (errmsg says why); a dead connection is never reconnected, every later request is
 * -EIO at once.
 */
#ifndef NEXFS_NBD_BACKEND_H
#define NEXFS_NBD_BACKEND_H

#include "nexfs_core.h"

/* cdef-begin */

/* Why nx_nbd_open failed (in nx_nbd.dev.stage); errmsg says it in libnbd's words. */
enum nx_nbd_stage {
    NX_NBD_STAGE_URI = 32,      /* not a URI libnbd accepts */
    NX_NBD_STAGE_CONNECT = 33,  /* connecting or the handshake failed or timed out */
    NX_NBD_STAGE_READONLY = 34, /* read-write open of an export the server serves read-only */
    NX_NBD_STAGE_NOFLUSH = 35,  /* read-write open of an export that cannot flush */
    NX_NBD_STAGE_GEOMETRY = 36  /* size or block-size constraints unusable */
};

struct nx_nbd {
    struct nx_dev dev;       /* geometry, counters, closing/inflight; dev.fd is always -1 */
    void *handle;            /* struct nbd_handle * (NULL once closed) */
    void *priv;              /* the waiting machinery (mutex, condition, wake-up eventfd) */
    int can_flush;           /* the server offers NBD_CMD_FLUSH */
    int can_fua;             /* the server honours NBD_CMD_FLAG_FUA */
    int dead;                /* the connection is gone: every request is -EIO */
    uint32_t timeout_ms;     /* deadline of every request (and of the connection) */
    uint32_t min_block;      /* the export's block-size constraints (1/4096/32M defaults) */
    uint32_t pref_block;
    uint32_t max_block;
    uint64_t timeouts;       /* requests that missed their deadline */
    char errmsg[256];        /* why the open failed, or why the connection died */
};

/* One request of a batch: `len` bytes (whole sectors) at sector `lba`, read into or
 * written from `buf`.  `err` is filled in: 0 or -errno. */
struct nx_nbd_req {
    uint64_t lba;
    void *buf;
    size_t len;
    int write;
    int err;
};

/* Connect to `uri`, read the export's size and constraints, refuse read-write use of
 * an export that is read-only or cannot flush.  On failure returns -errno, sets
 * n->dev.stage and n->errmsg, and leaves nothing open. */
int nx_nbd_open(const char *uri, int read_only, uint32_t timeout_ms, struct nx_nbd *n);

/* Refuse new requests, wait for those in flight, disconnect (NBD_CMD_DISC, bounded by
 * the timeout) and free the handle.  Idempotent. */
int nx_nbd_close(struct nx_nbd *n);

/* Issue every request of `reqs` (split at the export's maximum request size), then wait
 * for all of them.  With `durable`, a flush is issued after the writes complete (and
 * the writes carry FUA when the server has it, the flush in flight beside them), so on
 * success every write of the batch and every earlier completed write is on stable
 * storage.  Returns the first error, 0 if none. */
int nx_nbd_submit(struct nx_nbd *n, struct nx_nbd_req *reqs, int nreqs, int durable);

/* The nexfs_core.h transfers, for an export.  A vectored transfer is one request per
 * segment at consecutive offsets, all in flight together. */
int nx_nbd_read(struct nx_nbd *n, uint64_t lba, void *buf, size_t len);
int nx_nbd_write(struct nx_nbd *n, uint64_t lba, const void *buf, size_t len, int durable);
int nx_nbd_readv(struct nx_nbd *n, uint64_t lba, struct iovec *iov, int iovcnt);
int nx_nbd_writev(struct nx_nbd *n, uint64_t lba, struct iovec *iov, int iovcnt,
                  int durable);

/* Durability barrier: NBD_CMD_FLUSH. */
int nx_nbd_sync(struct nx_nbd *n);

/* A ring (nexfs_core.h, nx_ring_*) over the export.  `mode`: NX_RING_CALLBACKS (or
 * NX_RING_ANY): the submitting thread issues the commands, libnbd's completion callbacks and
 * one driver thread report them, up to `depth` requests on the wire; NX_RING_POOL: `threads`
 * workers each move one request with the vectored transfer above; NX_RING_URING is
 * -EOPNOTSUPP.  The same contract as a file's ring: checked at submit, completions on the
 * eventfd, nx_ring_close before nx_nbd_close; every request has the export's deadline, and
 * a timeout or a dead connection completes every request in flight with -EIO, only once
 * libnbd has let go of its memory.  -EBADF once the export is closed or closing. */
int nx_nbd_ring_open(struct nx_nbd *n, int mode, unsigned depth, unsigned threads,
                     struct nx_ring **out);

/* cdef-end */

#endif /* NEXFS_NBD_BACKEND_H */
