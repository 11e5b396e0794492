/*
 * nexfs_core.h - the C core of the NexFS Block Valve.
 *
 * Whole-sector I/O against a disk image or block device opened with O_DIRECT.
 * Every function that can fail returns 0 (or a count) on success and -errno on
 * failure; nothing here prints, allocates behind the caller's back or retries
 * silently with different semantics (no buffered fallback, no zero fill).
 *
 * The block between the cdef markers is also the cffi declaration (native/build.py
 * extracts it), so this header is the single description of the ABI.
 */
#ifndef NEXFS_CORE_H
#define NEXFS_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* cdef-begin */

/* Why nx_open failed; the Python side picks the exception type from this. */
enum nx_stage {
    NX_STAGE_NONE = 0,     /* no failure */
    NX_STAGE_STAT = 1,     /* the path could not be looked up */
    NX_STAGE_TYPE = 2,     /* neither a regular file nor a block device */
    NX_STAGE_OPEN = 3,     /* open(2) failed for an ordinary reason (ENOENT, EACCES...) */
    NX_STAGE_DIRECT = 4,   /* the target opens without O_DIRECT but refuses it */
    NX_STAGE_BUSY = 5,     /* block device already claimed (O_EXCL -> EBUSY) */
    NX_STAGE_LOCK = 6,     /* image file locked by another open (flock) */
    NX_STAGE_GEOMETRY = 7  /* sector size or size could not be read */
};

struct nx_dev {
    int fd;                  /* -1 once closed */
    int is_blockdev;         /* 1 for a block device, 0 for an image file */
    int read_only;           /* opened O_RDONLY */
    int stage;               /* enum nx_stage of the last nx_open failure */
    uint32_t sector_size;    /* logical sector: the unit of LBA, offset and length alignment */
    uint32_t mem_align;      /* required alignment of buffer addresses for O_DIRECT */
    uint64_t size_bytes;     /* size of the device or image file at open */
    uint64_t total_sectors;  /* size_bytes / sector_size (a partial tail sector is unusable) */
    /* Shared between threads, only ever accessed with __atomic builtins in C. */
    int closing;             /* set by nx_close: new transfers are refused with -EBADF */
    int inflight;            /* transfers running; nx_close waits for zero */
    uint64_t reads;          /* completed transfers and their sectors (the valve's stats) */
    uint64_t writes;
    uint64_t sectors_read;
    uint64_t sectors_written;
    uint64_t barriers;       /* successful fdatasync calls */
};

/* Open `path` with O_RDWR (or O_RDONLY) | O_DIRECT | O_CLOEXEC, claim it exclusively
 * (O_EXCL for block devices, flock LOCK_EX/LOCK_SH | LOCK_NB for files) and fill
 * in the geometry.  On failure returns -errno, sets dev->stage and leaves dev->fd = -1. */
int nx_open(const char *path, int read_only, struct nx_dev *dev);

/* Refuse new transfers, wait for those in flight, then close the descriptor (which
 * also drops the flock), so a descriptor number is never reused under a running
 * transfer.  Idempotent. */
int nx_close(struct nx_dev *dev);

/* posix_memalign wrapper: NULL on failure.  Free with nx_free. */
void *nx_alloc(size_t align, size_t size);
void nx_free(void *ptr);

/* Read or write `len` bytes (a whole number of sectors) at sector `lba`.
 * `buf` must be aligned to dev->mem_align.  A short transfer is continued until
 * done; end of file before that is -EIO.  Range or alignment violations are -EINVAL. */
int nx_read(struct nx_dev *dev, uint64_t lba, void *buf, size_t len);
int nx_write(struct nx_dev *dev, uint64_t lba, const void *buf, size_t len, int durable);

/* Vectored forms (one preadv/pwritev per IOV_MAX segments).  Every segment must be
 * aligned in address and a whole number of sectors long.  `iov` is used as scratch
 * space while retrying short transfers: its contents are undefined afterwards. */
int nx_readv(struct nx_dev *dev, uint64_t lba, struct iovec *iov, int iovcnt);
int nx_writev(struct nx_dev *dev, uint64_t lba, struct iovec *iov, int iovcnt,
              int durable);

/* Durability barrier: fdatasync. */
int nx_sync(struct nx_dev *dev);

/* ---- Asynchronous transfers: a ring of requests in flight and a completion eventfd ----
 *
 * A ring lets one thread (an event loop) keep several transfers in flight without a
 * thread of its own per request: nx_ring_submit checks a request exactly as nx_readv /
 * nx_writev do (range, alignment, read-only, closing) and starts it; the ring's eventfd
 * (nx_ring_fd) becomes readable when completions are waiting, and nx_ring_reap hands
 * them out.  Two engines behind one interface: io_uring (the kernel runs the O_DIRECT
 * transfer and posts the completion; no thread hop) and, where io_uring is unavailable
 * (kernel.io_uring_disabled, seccomp), a small pool of C threads doing preadv/pwritev
 * and signalling the eventfd.  An NBD export's ring (nx_nbd_ring_open, nbd_backend.h) is
 * that pool with the export's transfer in place of preadv/pwritev, or the backend's own
 * engine driven by libnbd's completion callbacks (NX_RING_CALLBACKS).
 *
 * Rules: one thread submits and reaps (the ring has no lock on that side); the iovec
 * array is copied at submit, the memory it points to must stay valid until the request
 * is reaped; every submitted request counts as a transfer in flight of the device
 * (nx_close waits for it), so a ring must be closed (nx_ring_close waits for and
 * discards what is still in flight) before its device. */

enum nx_ring_mode {
    NX_RING_ANY = 0,       /* io_uring if the kernel allows it, else the pool */
    NX_RING_URING = 1,
    NX_RING_POOL = 2,
    NX_RING_CALLBACKS = 3  /* a backend's own asynchronous engine (an NBD export's: libnbd's
                            * completion callbacks, nbd_backend.h); never for a file */
};

struct nx_ring;

struct nx_completion {
    uint64_t tag;          /* the caller's tag from nx_ring_submit */
    int32_t result;        /* 0, or -errno (a short transfer is continued, never reported) */
};

/* Open a ring of up to `depth` requests in flight over `dev`; `threads` is the pool's
 * size (ignored by io_uring).  Returns 0 and sets *out, or -errno. */
int nx_ring_open(struct nx_dev *dev, int mode, unsigned depth, unsigned threads,
                 struct nx_ring **out);
int nx_ring_fd(const struct nx_ring *ring);
int nx_ring_mode(const struct nx_ring *ring);
/* Requests submitted and not yet reaped. */
unsigned nx_ring_inflight(const struct nx_ring *ring);

/* Check and start one transfer of iov[0..iovcnt) at sector `lba` (write != 0: write,
 * durable != 0: then fdatasync, as nx_writev).  -EAGAIN when `depth` requests are
 * already in flight; -EINVAL/-EBADF as the synchronous forms, before anything starts. */
int nx_ring_submit(struct nx_ring *ring, uint64_t tag, int write, uint64_t lba,
                   const struct iovec *iov, int iovcnt, int durable);

/* Copy up to `max` finished requests into out[]; returns how many (or -errno).  Does
 * not block unless `wait` > 0: then it waits until at least min(wait, in flight) are
 * done.  Resets the eventfd first, so a completion posted afterwards signals again. */
int nx_ring_reap(struct nx_ring *ring, struct nx_completion *out, int max, int wait);

/* Wait for every request still in flight (their results are discarded), then free the
 * ring.  Idempotent only in the sense that `ring` is gone afterwards. */
void nx_ring_close(struct nx_ring *ring);

/* cdef-end */

/* ---- For the valve's other backends (C only: not part of the cffi ABI) ----
 *
 * A ring of the pool engine whose workers move each request with `xfer` instead of
 * preadv/pwritev on dev->fd (which may be -1): the NBD backend's ring (nbd_backend.h,
 * nx_nbd_ring_open).  Everything else is the pool's: the checks at submit (on `dev`'s
 * geometry; no descriptor needed), the enter/leave handshake with the backend's close,
 * the counters (reads, writes, sectors), the eventfd, the close.  `xfer` moves the whole
 * of iov[0..iovcnt) at sector `lba` or fails (-errno), blocks until the transfer has
 * finished with the memory (a late completion must never land in a reaped buffer), makes a
 * durable write durable, counts that barrier itself, and may be called by several workers
 * at once. */
typedef int (*nx_ring_xfer)(void *ctx, uint64_t lba, struct iovec *iov, int iovcnt,
                            int write, int durable);
int nx_ring_open_xfer(struct nx_dev *dev, unsigned depth, unsigned threads, nx_ring_xfer xfer,
                      void *ctx, struct nx_ring **out);

/* A ring of mode NX_RING_CALLBACKS: no threads of the core.  nx_ring_submit checks a request
 * as ever, then calls `start`, which must not block: it starts the transfer and reports its
 * end exactly once with nx_ring_done(ring, req, result), from any thread (also from within
 * `start`).  Done means the backend no longer touches the request's memory.  `stop` is called
 * once, by nx_ring_close after the last completion was reaped: it frees `ctx`.  If
 * nx_ring_open_async fails, `ctx` is the caller's to free. */
struct nx_ring_hooks {
    void (*start)(void *ctx, struct nx_ring *ring, void *req, uint64_t lba,
                  const struct iovec *iov, int iovcnt, int write, int durable);
    void (*stop)(void *ctx);
};
int nx_ring_open_async(struct nx_dev *dev, unsigned depth, const struct nx_ring_hooks *hooks,
                       void *ctx, struct nx_ring **out);
void nx_ring_done(struct nx_ring *ring, void *req, int result);

#endif /* NEXFS_CORE_H */
