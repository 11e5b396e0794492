/*
 * nexfs_core.c - O_DIRECT sector I/O for the NexFS Block Valve.
 *
 * See nexfs_core.h for the contract.  This file knows sectors, never filesystem
 * structures.  It is called through cffi, which drops the GIL around every call,
 * so nothing here may touch Python objects.
 */
#define _GNU_SOURCE
#include "nexfs_core.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <limits.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* Used when the kernel cannot tell us the direct-I/O alignment of a file (statx
 * without STATX_DIOALIGN, i.e. kernels before 6.1 or filesystems that do not
 * report it).  4096 satisfies every logical block size Linux block devices use. */
#define NX_FALLBACK_ALIGN 4096u

static int fail(struct nx_dev *dev, int stage, int err)
{
    if (dev->fd >= 0) {
        close(dev->fd);
        dev->fd = -1;
    }
    dev->stage = stage;
    return -err;
}

static int is_pow2(uint64_t x)
{
    return x != 0 && (x & (x - 1)) == 0;
}

/* Direct-I/O alignment of an open file or block device, from statx. Returns 1 if the
 * kernel reported it, 0 if it could not, -errno on error. */
static int dio_align(int fd, uint32_t *mem_align, uint32_t *offset_align)
{
#ifdef STATX_DIOALIGN
    struct statx stx;
    memset(&stx, 0, sizeof(stx));
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0)
        return (errno == ENOSYS || errno == EINVAL) ? 0 : -errno;
    if (!(stx.stx_mask & STATX_DIOALIGN))
        return 0;
    *mem_align = stx.stx_dio_mem_align;
    *offset_align = stx.stx_dio_offset_align;
    return 1;
#else
    (void)fd;
    (void)mem_align;
    (void)offset_align;
    return 0;
#endif
}

int nx_open(const char *path, int read_only, struct nx_dev *dev)
{
    struct stat before, after;
    int flags = (read_only ? O_RDONLY : O_RDWR) | O_DIRECT | O_CLOEXEC;

    memset(dev, 0, sizeof(*dev));
    dev->fd = -1;
    dev->read_only = read_only ? 1 : 0;

    if (stat(path, &before) < 0)
        return fail(dev, NX_STAGE_STAT, errno);
    if (S_ISDIR(before.st_mode))
        return fail(dev, NX_STAGE_TYPE, EISDIR);
    if (!S_ISREG(before.st_mode) && !S_ISBLK(before.st_mode))
        return fail(dev, NX_STAGE_TYPE, ENOTBLK);
    dev->is_blockdev = S_ISBLK(before.st_mode) ? 1 : 0;
    /* O_EXCL without O_CREAT means "claim exclusively" only for block devices. */
    if (dev->is_blockdev)
        flags |= O_EXCL;

    dev->fd = open(path, flags);
    if (dev->fd < 0) {
        int err = errno;
        if (err == EBUSY && dev->is_blockdev)
            return fail(dev, NX_STAGE_BUSY, err);
        if (err == EINVAL) {
            /* EINVAL from open almost always means "no O_DIRECT here".  Prove it by
             * opening without O_DIRECT (then closing at once: that descriptor is
             * only evidence, never used for I/O). */
            int probe = open(path, (flags & ~(O_DIRECT | O_EXCL)));
            if (probe >= 0) {
                close(probe);
                return fail(dev, NX_STAGE_DIRECT, EINVAL);
            }
        }
        return fail(dev, NX_STAGE_OPEN, err);
    }

    /* The path could have been swapped between stat and open. */
    if (fstat(dev->fd, &after) < 0)
        return fail(dev, NX_STAGE_OPEN, errno);
    if (after.st_dev != before.st_dev || after.st_ino != before.st_ino ||
        (after.st_mode & S_IFMT) != (before.st_mode & S_IFMT))
        return fail(dev, NX_STAGE_OPEN, ESTALE);

    if (!dev->is_blockdev) {
        /* Shared for readers, exclusive for writers: a mounted image cannot be read
         * underneath its writer, nor written underneath a reader. */
        if (flock(dev->fd, (read_only ? LOCK_SH : LOCK_EX) | LOCK_NB) < 0)
            return fail(dev, NX_STAGE_LOCK, errno);
    }

    uint32_t mem = 0, off = 0;
    int got = dio_align(dev->fd, &mem, &off);
    if (got < 0)
        return fail(dev, NX_STAGE_GEOMETRY, -got);

    if (dev->is_blockdev) {
        int ssz = 0;
        uint64_t bytes = 0;
        if (ioctl(dev->fd, BLKSSZGET, &ssz) < 0)
            return fail(dev, NX_STAGE_GEOMETRY, errno);
        if (ioctl(dev->fd, BLKGETSIZE64, &bytes) < 0)
            return fail(dev, NX_STAGE_GEOMETRY, errno);
        dev->sector_size = (uint32_t)ssz;
        dev->size_bytes = bytes;
        dev->mem_align = (got == 1 && mem != 0) ? mem : (uint32_t)ssz;
    } else {
        if (got == 1 && off == 0)  /* the kernel says: no direct I/O on this file */
            return fail(dev, NX_STAGE_DIRECT, EINVAL);
        dev->sector_size = got == 1 ? off : NX_FALLBACK_ALIGN;
        dev->mem_align = got == 1 ? mem : NX_FALLBACK_ALIGN;
        dev->size_bytes = (uint64_t)after.st_size;
    }
    if (!is_pow2(dev->sector_size) || !is_pow2(dev->mem_align))
        return fail(dev, NX_STAGE_GEOMETRY, EINVAL);
    dev->total_sectors = dev->size_bytes / dev->sector_size;
    dev->stage = NX_STAGE_NONE;
    return 0;
}

int nx_close(struct nx_dev *dev)
{
    int rc = 0;
    /* Sequentially consistent with the increment in enter(): either a transfer sees
     * `closing` and backs out, or we see its `inflight` and wait for it. */
    __atomic_store_n(&dev->closing, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&dev->inflight, __ATOMIC_SEQ_CST) > 0) {
        struct timespec pause = {.tv_sec = 0, .tv_nsec = 50 * 1000};
        nanosleep(&pause, NULL);
    }
    if (dev->fd >= 0) {
        /* Linux releases the descriptor even when close reports an error, so never retry. */
        if (close(dev->fd) < 0)
            rc = -errno;
        dev->fd = -1;
    }
    return rc;
}

void *nx_alloc(size_t align, size_t size)
{
    void *p = NULL;
    if (size == 0)
        size = align;
    if (posix_memalign(&p, align, size) != 0)
        return NULL;
    return p;
}

void nx_free(void *ptr)
{
    free(ptr);
}

static int enter(struct nx_dev *dev)
{
    __atomic_add_fetch(&dev->inflight, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&dev->closing, __ATOMIC_SEQ_CST)) {
        __atomic_sub_fetch(&dev->inflight, 1, __ATOMIC_SEQ_CST);
        return -EBADF;
    }
    return 0;
}

static void leave(struct nx_dev *dev)
{
    __atomic_sub_fetch(&dev->inflight, 1, __ATOMIC_SEQ_CST);
}

static void count(uint64_t *counter, uint64_t n)
{
    /* Relaxed: counters need to be exact, not ordered with anything. */
    __atomic_add_fetch(counter, n, __ATOMIC_RELAXED);
}

/* Range and alignment checks shared by every transfer: refuse before O_DIRECT sees it.
 * (Whether there is a descriptor is the caller's check: a ring with a transfer hook has
 * none.) */
static int check_io(const struct nx_dev *dev, uint64_t lba, const struct iovec *iov,
                    int iovcnt, int writing)
{
    uint64_t total = 0;
    uintptr_t mask = (uintptr_t)dev->mem_align - 1;

    if (writing && dev->read_only)
        return -EBADF;
    if (iovcnt <= 0)
        return -EINVAL;
    for (int i = 0; i < iovcnt; i++) {
        if (iov[i].iov_len == 0 || iov[i].iov_len % dev->sector_size != 0)
            return -EINVAL;
        if (((uintptr_t)iov[i].iov_base & mask) != 0)
            return -EINVAL;
        total += iov[i].iov_len;
    }
    uint64_t count = total / dev->sector_size;
    if (lba > dev->total_sectors || count > dev->total_sectors - lba)
        return -EINVAL;
    return 0;
}

/* Move the whole of iov[0..iovcnt) at byte offset `off`, continuing after short
 * transfers.  A transfer that makes no progress is an error (-EIO): a read past
 * the end of the file must never look like a sector of zeros. */
static int transfer(int fd, struct iovec *iov, int iovcnt, off_t off, int writing)
{
    while (iovcnt > 0) {
        int n = iovcnt < IOV_MAX ? iovcnt : IOV_MAX;
        ssize_t r = writing ? pwritev(fd, iov, n, off) : preadv(fd, iov, n, off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        off += r;
        while (r > 0) {
            if ((size_t)r >= iov->iov_len) {
                r -= (ssize_t)iov->iov_len;
                iov++;
                iovcnt--;
            } else {
                iov->iov_base = (char *)iov->iov_base + r;
                iov->iov_len -= (size_t)r;
                r = 0;
            }
        }
    }
    return 0;
}

static int sync_fd(struct nx_dev *dev)
{
    if (fdatasync(dev->fd) < 0)
        return -errno;
    count(&dev->barriers, 1);
    return 0;
}

int nx_sync(struct nx_dev *dev)
{
    int rc = enter(dev);
    if (rc < 0)
        return rc;
    rc = dev->fd < 0 ? -EBADF : sync_fd(dev);
    leave(dev);
    return rc;
}

/* One vectored transfer at ``lba``: checked, moved, counted.  The caller holds the device
 * (enter/leave).  ``write`` selects the direction and the counters. */
static int io_one(struct nx_dev *dev, uint64_t lba, struct iovec *iov, int iovcnt, int write)
{
    int rc = dev->fd < 0 ? -EBADF : check_io(dev, lba, iov, iovcnt, write);
    if (rc < 0)
        return rc;
    uint64_t sectors = 0;
    for (int i = 0; i < iovcnt; i++)
        sectors += iov[i].iov_len / dev->sector_size;
    rc = transfer(dev->fd, iov, iovcnt, (off_t)(lba * dev->sector_size), write);
    if (rc == 0) {
        count(write ? &dev->writes : &dev->reads, 1);
        count(write ? &dev->sectors_written : &dev->sectors_read, sectors);
    }
    return rc;
}

int nx_readv(struct nx_dev *dev, uint64_t lba, struct iovec *iov, int iovcnt)
{
    int rc = enter(dev);
    if (rc < 0)
        return rc;
    rc = io_one(dev, lba, iov, iovcnt, 0);
    leave(dev);
    return rc;
}

int nx_writev(struct nx_dev *dev, uint64_t lba, struct iovec *iov, int iovcnt, int durable)
{
    int rc = enter(dev);
    if (rc < 0)
        return rc;
    rc = io_one(dev, lba, iov, iovcnt, 1);
    /* O_DIRECT only bypasses the page cache; the device's volatile cache still needs a
     * flush, and it must cover earlier writes too, hence fdatasync and not RWF_DSYNC
     * (which would make only this write durable). */
    if (rc == 0 && durable)
        rc = sync_fd(dev);
    leave(dev);
    return rc;
}

int nx_read(struct nx_dev *dev, uint64_t lba, void *buf, size_t len)
{
    struct iovec one = {.iov_base = buf, .iov_len = len};
    return nx_readv(dev, lba, &one, 1);
}

int nx_write(struct nx_dev *dev, uint64_t lba, const void *buf, size_t len, int durable)
{
    /* pwritev's iovec is not const-qualified, but the buffer is only read. */
    struct iovec one = {.iov_base = (void *)buf, .iov_len = len};
    return nx_writev(dev, lba, &one, 1, durable);
}


/* ---- Asynchronous transfers ------------------------------------------------------- */

#define NX_RING_MAX_DEPTH 1024u
#define NX_POOL_MAX 16u

struct nx_req {
    uint64_t tag;
    uint64_t lba;
    struct iovec *iov;      /* our copy of the caller's array (the memory stays theirs) */
    int iovcnt;
    int write;
    int durable;
    size_t total;           /* bytes */
    int io_res;             /* io_uring: the transfer's CQE result */
    int sync_res;           /* io_uring: the linked fsync's CQE result */
    int waiting;            /* io_uring: CQEs still to come for this request */
    int result;             /* final: 0 or -errno */
    struct nx_req *next;    /* free list, pool queue, done list */
};

struct nx_ring {
    struct nx_dev *dev;
    int mode;
    nx_ring_xfer xfer;      /* pool only: moves a request instead of preadv/pwritev on dev->fd */
    void *xfer_ctx;
    const struct nx_ring_hooks *hooks;  /* NX_RING_CALLBACKS: the backend's engine */
    void *hooks_ctx;
    int efd;
    unsigned depth;
    unsigned inflight;      /* submitted, not reaped: touched only by the submitting thread */
    struct nx_req *slots;
    struct nx_req *free;
    /* Finished, not yet handed out.  io_uring: touched only by the reaping thread;
     * pool: under `mu`. */
    struct nx_req *done, *done_tail;
    struct io_uring uring;
    /* pool */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct nx_req *queue, *queue_tail;
    int stop;
    unsigned nthreads;
    pthread_t threads[NX_POOL_MAX];
};

static void push(struct nx_req **head, struct nx_req **tail, struct nx_req *req)
{
    req->next = NULL;
    if (*tail)
        (*tail)->next = req;
    else
        *head = req;
    *tail = req;
}

static uint64_t iov_total(const struct iovec *iov, int iovcnt)
{
    uint64_t n = 0;
    for (int i = 0; i < iovcnt; i++)
        n += iov[i].iov_len;
    return n;
}

static void signal_efd(int efd)
{
    uint64_t one = 1;
    /* Can only fail by overflowing a counter that the reaper keeps resetting. */
    ssize_t r = write(efd, &one, sizeof(one));
    (void)r;
}

/* Count a finished transfer the way io_one does, and release the device. */
static void finish(struct nx_ring *ring, struct nx_req *req)
{
    struct nx_dev *dev = ring->dev;
    if (req->result == 0) {
        count(req->write ? &dev->writes : &dev->reads, 1);
        count(req->write ? &dev->sectors_written : &dev->sectors_read,
              req->total / dev->sector_size);
    }
    leave(dev);
}

/* io_uring: both CQEs of a request are in.  A failed link, a short transfer or EINTR /
 * EAGAIN (which io_uring may pass up for O_DIRECT) is completed synchronously here: rare,
 * and it keeps "a short read is an error, never zero fill" in one place (transfer). */
static void uring_settle(struct nx_ring *ring, struct nx_req *req)
{
    struct nx_dev *dev = ring->dev;
    int rc = 0;
    size_t done = 0;
    if (req->io_res >= 0)
        done = (size_t)req->io_res;
    else if (req->io_res != -EINTR && req->io_res != -EAGAIN)
        rc = req->io_res;
    if (rc == 0 && done < req->total) {
        /* Skip what was moved, then move the rest. */
        struct iovec *iov = req->iov;
        int n = req->iovcnt;
        size_t skip = done;
        while (n > 0 && skip >= iov->iov_len) {
            skip -= iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + skip;
            iov->iov_len -= skip;
        }
        rc = transfer(dev->fd, iov, n, (off_t)(req->lba * dev->sector_size + done),
                      req->write);
    }
    if (rc == 0 && req->durable) {
        if (done == req->total && req->sync_res == 0)
            count(&dev->barriers, 1);
        else
            rc = sync_fd(dev);
    }
    req->result = rc;
    finish(ring, req);
    push(&ring->done, &ring->done_tail, req);
}

static int uring_collect(struct nx_ring *ring, int wait)
{
    struct io_uring_cqe *cqe;
    int got = 0;
    for (;;) {
        int rc = (wait && got == 0) ? io_uring_wait_cqe(&ring->uring, &cqe)
                                    : io_uring_peek_cqe(&ring->uring, &cqe);
        if (rc == -EINTR)
            continue;
        if (rc == -EAGAIN)
            return got;
        if (rc < 0)
            return rc;
        uint64_t data = cqe->user_data;
        struct nx_req *req = &ring->slots[data >> 1];
        if (data & 1)
            req->sync_res = cqe->res;
        else
            req->io_res = cqe->res;
        io_uring_cqe_seen(&ring->uring, cqe);
        if (--req->waiting == 0) {
            uring_settle(ring, req);
            got++;
        }
    }
}

static int uring_start(struct nx_ring *ring, struct nx_req *req)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring->uring);
    uint64_t slot = (uint64_t)(req - ring->slots);
    /* The ring has 2 * depth entries and at most depth requests of at most 2 SQEs. */
    if (sqe == NULL)
        return -EBUSY;
    off_t off = (off_t)(req->lba * ring->dev->sector_size);
    if (req->write)
        io_uring_prep_writev(sqe, ring->dev->fd, req->iov, (unsigned)req->iovcnt, off);
    else
        io_uring_prep_readv(sqe, ring->dev->fd, req->iov, (unsigned)req->iovcnt, off);
    io_uring_sqe_set_data64(sqe, slot << 1);
    req->waiting = 1;
    req->sync_res = 0;
    if (req->durable) {
        /* Linked: the fsync starts after the write completed in full (a short or failed
         * write cancels it, and uring_settle then does both synchronously). */
        sqe->flags |= IOSQE_IO_LINK;
        struct io_uring_sqe *fs = io_uring_get_sqe(&ring->uring);
        if (fs == NULL)
            return -EBUSY;
        io_uring_prep_fsync(fs, ring->dev->fd, IORING_FSYNC_DATASYNC);
        io_uring_sqe_set_data64(fs, (slot << 1) | 1);
        req->waiting = 2;
    }
    int rc;
    do {
        rc = io_uring_submit(&ring->uring);
    } while (rc == -EINTR);
    return rc < 0 ? rc : 0;
}

static void *pool_worker(void *arg)
{
    struct nx_ring *ring = arg;
    struct nx_dev *dev = ring->dev;
    for (;;) {
        pthread_mutex_lock(&ring->mu);
        while (ring->queue == NULL && !ring->stop)
            pthread_cond_wait(&ring->cv, &ring->mu);
        struct nx_req *req = ring->queue;
        if (req == NULL) {
            pthread_mutex_unlock(&ring->mu);
            return NULL;
        }
        ring->queue = req->next;
        if (ring->queue == NULL)
            ring->queue_tail = NULL;
        pthread_mutex_unlock(&ring->mu);

        int rc;
        if (ring->xfer != NULL) {
            /* Another backend's transfer (the NBD export's): it makes a durable write
             * durable and counts the barrier itself. */
            rc = ring->xfer(ring->xfer_ctx, req->lba, req->iov, req->iovcnt, req->write,
                            req->durable);
        } else {
            rc = transfer(dev->fd, req->iov, req->iovcnt,
                          (off_t)(req->lba * dev->sector_size), req->write);
            if (rc == 0 && req->durable)
                rc = sync_fd(dev);
        }
        nx_ring_done(ring, req, rc);  /* the same hand-back as another backend's engine */
    }
}

static void pool_stop(struct nx_ring *ring)
{
    pthread_mutex_lock(&ring->mu);
    ring->stop = 1;
    pthread_cond_broadcast(&ring->cv);
    pthread_mutex_unlock(&ring->mu);
    for (unsigned i = 0; i < ring->nthreads; i++)
        pthread_join(ring->threads[i], NULL);
    ring->nthreads = 0;
}

static void ring_free(struct nx_ring *ring)
{
    if (ring->mode == NX_RING_URING)
        io_uring_queue_exit(&ring->uring);
    if (ring->mode == NX_RING_POOL) {
        pool_stop(ring);
        pthread_cond_destroy(&ring->cv);
        pthread_mutex_destroy(&ring->mu);
    }
    if (ring->mode == NX_RING_CALLBACKS) {
        if (ring->hooks_ctx != NULL)
            ring->hooks->stop(ring->hooks_ctx);
        pthread_cond_destroy(&ring->cv);
        pthread_mutex_destroy(&ring->mu);
    }
    if (ring->slots) {
        for (unsigned i = 0; i < ring->depth; i++)
            free(ring->slots[i].iov);
        free(ring->slots);
    }
    if (ring->efd >= 0)
        close(ring->efd);
    free(ring);
}

/* A ring of `depth` free slots and its eventfd, in no mode yet (ring_free undoes it). */
static int ring_alloc(struct nx_dev *dev, unsigned depth, struct nx_ring **out)
{
    *out = NULL;
    if (depth == 0 || depth > NX_RING_MAX_DEPTH)
        return -EINVAL;
    struct nx_ring *ring = calloc(1, sizeof(*ring));
    if (ring == NULL)
        return -ENOMEM;
    ring->dev = dev;
    ring->depth = depth;
    ring->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    ring->slots = calloc(depth, sizeof(*ring->slots));
    if (ring->efd < 0 || ring->slots == NULL) {
        int err = ring->efd < 0 ? errno : ENOMEM;
        ring_free(ring);
        return -err;
    }
    for (unsigned i = depth; i-- > 0;) {
        ring->slots[i].next = ring->free;
        ring->free = &ring->slots[i];
    }
    *out = ring;
    return 0;
}

static int ring_open(struct nx_dev *dev, int mode, unsigned depth, unsigned threads,
                     nx_ring_xfer xfer, void *xfer_ctx, struct nx_ring **out)
{
    *out = NULL;
    if (mode < NX_RING_ANY || mode > NX_RING_POOL)
        return -EINVAL;
    if (xfer == NULL && dev->fd < 0)
        return -EBADF;
    struct nx_ring *ring;
    int rc = ring_alloc(dev, depth, &ring);
    if (rc < 0)
        return rc;
    ring->xfer = xfer;
    ring->xfer_ctx = xfer_ctx;
    rc = -ENOSYS;
    if (mode != NX_RING_POOL) {
        rc = io_uring_queue_init(2 * depth, &ring->uring, 0);
        if (rc == 0) {
            ring->mode = NX_RING_URING;
            rc = io_uring_register_eventfd(&ring->uring, ring->efd);
            if (rc < 0) {
                ring_free(ring);
                return rc;
            }
        } else if (mode == NX_RING_URING) {
            ring_free(ring);
            return rc;
        }
    }
    if (rc != 0) {
        /* The pool: a handful of threads, each blocking in preadv/pwritev. */
        ring->mode = NX_RING_POOL;
        pthread_mutex_init(&ring->mu, NULL);
        pthread_cond_init(&ring->cv, NULL);
        if (threads == 0)
            threads = 1;
        if (threads > NX_POOL_MAX)
            threads = NX_POOL_MAX;
        for (unsigned i = 0; i < threads; i++) {
            int err = pthread_create(&ring->threads[i], NULL, pool_worker, ring);
            if (err != 0) {
                ring_free(ring);
                return -err;
            }
            ring->nthreads++;
        }
    }
    *out = ring;
    return 0;
}

int nx_ring_open(struct nx_dev *dev, int mode, unsigned depth, unsigned threads,
                 struct nx_ring **out)
{
    return ring_open(dev, mode, depth, threads, NULL, NULL, out);
}

int nx_ring_open_xfer(struct nx_dev *dev, unsigned depth, unsigned threads, nx_ring_xfer xfer,
                      void *ctx, struct nx_ring **out)
{
    /* Only the pool can call a hook: io_uring moves bytes on a descriptor itself. */
    return ring_open(dev, NX_RING_POOL, depth, threads, xfer, ctx, out);
}

int nx_ring_open_async(struct nx_dev *dev, unsigned depth, const struct nx_ring_hooks *hooks,
                       void *ctx, struct nx_ring **out)
{
    struct nx_ring *ring;
    int rc = ring_alloc(dev, depth, &ring);  /* on failure ctx stays the caller's */
    if (rc < 0)
        return rc;
    ring->mode = NX_RING_CALLBACKS;
    pthread_mutex_init(&ring->mu, NULL);
    pthread_cond_init(&ring->cv, NULL);
    ring->hooks = hooks;
    ring->hooks_ctx = ctx;
    *out = ring;
    return 0;
}

void nx_ring_done(struct nx_ring *ring, void *token, int result)
{
    struct nx_req *req = token;
    req->result = result;
    finish(ring, req);
    pthread_mutex_lock(&ring->mu);
    push(&ring->done, &ring->done_tail, req);
    pthread_cond_broadcast(&ring->cv);
    pthread_mutex_unlock(&ring->mu);
    signal_efd(ring->efd);
}

int nx_ring_fd(const struct nx_ring *ring)
{
    return ring->efd;
}

int nx_ring_mode(const struct nx_ring *ring)
{
    return ring->mode;
}

unsigned nx_ring_inflight(const struct nx_ring *ring)
{
    return ring->inflight;
}

int nx_ring_submit(struct nx_ring *ring, uint64_t tag, int write, uint64_t lba,
                   const struct iovec *iov, int iovcnt, int durable)
{
    struct nx_dev *dev = ring->dev;
    struct nx_req *req = ring->free;
    if (req == NULL)
        return -EAGAIN;
    int rc = enter(dev);
    if (rc < 0)
        return rc;
    int no_fd_needed = ring->xfer != NULL || ring->hooks != NULL;
    rc = (!no_fd_needed && dev->fd < 0) ? -EBADF : check_io(dev, lba, iov, iovcnt, write);
    if (rc < 0) {
        leave(dev);
        return rc;
    }
    struct iovec *copy = realloc(req->iov, sizeof(*copy) * (size_t)iovcnt);
    if (copy == NULL) {
        leave(dev);
        return -ENOMEM;
    }
    memcpy(copy, iov, sizeof(*copy) * (size_t)iovcnt);
    ring->free = req->next;
    req->iov = copy;
    req->iovcnt = iovcnt;
    req->tag = tag;
    req->lba = lba;
    req->write = write ? 1 : 0;
    req->durable = (write && durable) ? 1 : 0;
    req->total = (size_t)iov_total(iov, iovcnt);
    req->io_res = req->result = 0;
    ring->inflight++;
    if (ring->mode == NX_RING_URING) {
        rc = uring_start(ring, req);
        if (rc < 0) {
            /* Nothing was queued (io_uring_submit failed as a whole). */
            ring->inflight--;
            req->next = ring->free;
            ring->free = req;
            leave(dev);
            return rc;
        }
        return 0;
    }
    if (ring->mode == NX_RING_CALLBACKS) {
        /* Reports through nx_ring_done, maybe before returning (a dead connection). */
        ring->hooks->start(ring->hooks_ctx, ring, req, lba, req->iov, req->iovcnt, req->write,
                           req->durable);
        return 0;
    }
    pthread_mutex_lock(&ring->mu);
    push(&ring->queue, &ring->queue_tail, req);
    pthread_cond_signal(&ring->cv);
    pthread_mutex_unlock(&ring->mu);
    return 0;
}

int nx_ring_reap(struct nx_ring *ring, struct nx_completion *out, int max, int wait)
{
    uint64_t drained;
    /* Reset the eventfd before looking: a completion posted after this read signals it
     * again, so a waiter never sleeps on a completion it has not reaped. */
    ssize_t r = read(ring->efd, &drained, sizeof(drained));
    (void)r;
    if ((unsigned)wait > ring->inflight)
        wait = (int)ring->inflight;
    int n = 0;
    for (;;) {
        if (ring->mode == NX_RING_URING) {
            int rc = uring_collect(ring, 0);
            if (rc < 0)
                return rc;
        } else {
            pthread_mutex_lock(&ring->mu);
        }
        while (n < max && ring->done != NULL) {
            struct nx_req *req = ring->done;
            ring->done = req->next;
            if (ring->done == NULL)
                ring->done_tail = NULL;
            out[n].tag = req->tag;
            out[n].result = req->result;
            n++;
            ring->inflight--;
            req->next = ring->free;
            ring->free = req;
        }
        if (n >= wait || n >= max) {
            if (ring->mode != NX_RING_URING)
                pthread_mutex_unlock(&ring->mu);
            return n;
        }
        /* Block for more (only when asked to wait). */
        if (ring->mode == NX_RING_URING) {
            int rc = uring_collect(ring, 1);
            if (rc < 0)
                return rc;
        } else {
            pthread_cond_wait(&ring->cv, &ring->mu);
            pthread_mutex_unlock(&ring->mu);
        }
    }
}

void nx_ring_close(struct nx_ring *ring)
{
    struct nx_completion sink[64];
    while (ring->inflight > 0) {
        if (nx_ring_reap(ring, sink, 64, 1) < 0)
            break;
    }
    ring_free(ring);
}
