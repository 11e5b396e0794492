/*
 * nbd_backend.c - the Block Valve's sectors on an NBD export, through libnbd's aio API.
 *
 * See nbd_backend.h for the contract.  Like nexfs_core.c this file knows sectors, never
 * filesystem structures, and runs without the GIL (cffi drops it around every call).
 *
 * Why our own poll loop rather than nbd_poll: nbd_poll holds the handle's lock while it
 * sleeps in poll(2), so a second thread could not even issue a command until the first
 * one's reply arrived.  Here one waiting thread at a time (the "poller") sleeps in poll(2)
 * without the lock, on the socket and on an eventfd that submitters kick when they queue
 * work; the others sleep on a condition variable and are woken each time the poller has
 * driven the state machine.  Completion callbacks (run by whichever thread drives libnbd)
 * only set flags in the request's own record.
 *
 * Why a timeout kills the connection: NBD has no way to cancel a command, and a reply that
 * arrives after we returned would be written into a buffer the caller may have reused.
 * shutdown(2) of the socket makes libnbd see end of file, abort every command in flight
 * (their callbacks run with an error) and release every buffer; only then do we return.
 */
#define _GNU_SOURCE
#include "nbd_backend.h"

#include <errno.h>
#include <libnbd.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* libnbd refuses requests above 64 MiB; servers that state no maximum get 32 MiB, the
 * NBD protocol's recommended limit. */
#define NX_NBD_DEFAULT_MAX (32u << 20)
/* The poller wakes at least this often to check deadlines of the other waiters. */
#define NX_NBD_SLICE_MS 200
/* Batches up to this many commands keep their records on the stack. */
#define NX_NBD_STACK_OPS 16

struct priv {
    pthread_mutex_t lock;
    pthread_cond_t progressed;  /* broadcast each time the poller has driven libnbd */
    int polling;                /* a thread is the poller (under lock) */
    int wakefd;                 /* eventfd: submitters kick the poller */
    int dying;                  /* claimed by the first mark_dead: its reason is kept */
};

/* One NBD command in flight and its fate. */
struct op {
    int done;      /* set (release) by the completion callback or on issue failure */
    int err;       /* -errno, 0 on success */
    int req;       /* index of the nx_nbd_req it serves, -1 for a flush */
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_msg(struct nx_nbd *n, const char *what, const char *why)
{
    snprintf(n->errmsg, sizeof(n->errmsg), "%.100s%s%.150s", what, why ? ": " : "", why ? why : "");
}

static int is_pow2(uint64_t x)
{
    return x != 0 && (x & (x - 1)) == 0;
}

static int on_complete(void *user, int *error)
{
    struct op *op = user;
    op->err = *error ? -*error : 0;
    __atomic_store_n(&op->done, 1, __ATOMIC_RELEASE);
    return 1;  /* retire the command: nobody asks libnbd about it by cookie */
}

static void mark_dead(struct nx_nbd *n, const char *why)
{
    struct priv *p = n->priv;
    /* The first reason wins: it is the one worth reporting.  It is written before `dead`
     * is published, so whoever sees `dead` also sees the whole message. */
    if (__atomic_exchange_n(&p->dying, 1, __ATOMIC_SEQ_CST) == 0) {
        set_msg(n, why, NULL);
        __atomic_store_n(&n->dead, 1, __ATOMIC_SEQ_CST);
    }
}

/* Sleep in poll(2) on the socket and the wake-up eventfd for at most `ms`, then let
 * libnbd act on what happened.  Called by the poller only, without the handle lock. */
static void poll_once(struct nx_nbd *n, int ms)
{
    struct nbd_handle *h = n->handle;
    struct priv *p = n->priv;
    int fd = nbd_aio_get_fd(h);
    if (fd < 0) {
        /* No socket any more: libnbd has already aborted every command.  Sleep out the
         * slice on the eventfd only, so that a waiter never spins. */
        mark_dead(n, "connection closed");
        struct pollfd wake = {.fd = p->wakefd, .events = POLLIN};
        if (poll(&wake, 1, ms) > 0) {
            uint64_t drain;
            if (read(p->wakefd, &drain, sizeof(drain)) < 0) {
                /* EAGAIN: nothing to drain. */
            }
        }
        return;
    }
    unsigned dir = nbd_aio_get_direction(h);
    struct pollfd fds[2] = {
        {.fd = fd, .events = 0},
        {.fd = p->wakefd, .events = POLLIN},
    };
    if (dir & LIBNBD_AIO_DIRECTION_READ)
        fds[0].events |= POLLIN;
    if (dir & LIBNBD_AIO_DIRECTION_WRITE)
        fds[0].events |= POLLOUT;
    int r = poll(fds, 2, ms);
    if (r <= 0)
        return;  /* timeout or EINTR: the caller checks its deadline and comes back */
    if (fds[1].revents & POLLIN) {
        uint64_t drain;
        if (read(p->wakefd, &drain, sizeof(drain)) < 0) {
            /* EAGAIN: another wake-up was drained already; nothing lost. */
        }
    }
    /* The direction may have changed under us (another thread issued a command). */
    dir = nbd_aio_get_direction(h);
    short ev = fds[0].revents;
    r = 0;
    if ((dir & LIBNBD_AIO_DIRECTION_READ) && (ev & (POLLIN | POLLHUP | POLLERR)))
        r = nbd_aio_notify_read(h);
    else if ((dir & LIBNBD_AIO_DIRECTION_WRITE) && (ev & (POLLOUT | POLLHUP | POLLERR)))
        r = nbd_aio_notify_write(h);
    if (r < 0 || nbd_aio_is_dead(h) > 0 || nbd_aio_is_closed(h) > 0)
        mark_dead(n, r < 0 ? nbd_get_error() : "connection closed by the server");
}

/* With p->lock held: become the poller and drive libnbd for up to `slice` ms (the lock
 * dropped meanwhile), or, if another thread is the poller, wait up to `slice` ms for it to
 * report progress.  Returns with p->lock held. */
static void drive_or_wait(struct nx_nbd *n, struct priv *p, int slice)
{
    if (!p->polling) {
        __atomic_store_n(&p->polling, 1, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&p->lock);
        poll_once(n, slice);
        pthread_mutex_lock(&p->lock);
        __atomic_store_n(&p->polling, 0, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&p->progressed);
    } else {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += (long)slice * 1000000L;
        until.tv_sec += until.tv_nsec / 1000000000L;
        until.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&p->progressed, &p->lock, &until);
    }
}

static void kick(struct nx_nbd *n)
{
    struct priv *p = n->priv;
    uint64_t one = 1;
    if (__atomic_load_n(&p->polling, __ATOMIC_ACQUIRE)) {
        if (write(p->wakefd, &one, sizeof(one)) < 0) {
            /* EAGAIN: the counter is saturated, the poller will wake anyway. */
        }
    }
}

/* Drop the connection so that libnbd aborts every command in flight. */
static void kill_connection(struct nx_nbd *n, const char *why)
{
    mark_dead(n, why);
    int fd = nbd_aio_get_fd(n->handle);
    if (fd >= 0)
        shutdown(fd, SHUT_RDWR);
    kick(n);
}

static int all_done(const struct op *ops, int nops)
{
    for (int i = 0; i < nops; i++)
        if (!__atomic_load_n(&ops[i].done, __ATOMIC_ACQUIRE))
            return 0;
    return 1;
}

/* Wait until every op is done.  Past `deadline` (ms, CLOCK_MONOTONIC) the connection is
 * killed, which aborts the ops still waiting (they fail).  Returns 1 if it timed out. */
static int wait_ops(struct nx_nbd *n, struct op *ops, int nops, int64_t deadline)
{
    struct priv *p = n->priv;
    int timed_out = 0;
    pthread_mutex_lock(&p->lock);
    while (!all_done(ops, nops)) {
        int64_t left = deadline - now_ms();
        if (left <= 0 && !timed_out) {
            timed_out = 1;
            __atomic_add_fetch(&n->timeouts, 1, __ATOMIC_RELAXED);
            char why[96];
            snprintf(why, sizeof(why), "a request got no answer within %u ms",
                     (unsigned)n->timeout_ms);
            pthread_mutex_unlock(&p->lock);
            kill_connection(n, why);
            pthread_mutex_lock(&p->lock);
            continue;
        }
        if (__atomic_load_n(&n->dead, __ATOMIC_SEQ_CST) &&
            (nbd_aio_is_dead(n->handle) > 0 || nbd_aio_is_closed(n->handle) > 0)) {
            /* libnbd aborts every command when it enters these states (callbacks run
             * first) and never touches a buffer again; an op still pending here was
             * never going to complete. */
            for (int i = 0; i < nops; i++)
                if (!__atomic_load_n(&ops[i].done, __ATOMIC_ACQUIRE)) {
                    ops[i].err = -EIO;
                    __atomic_store_n(&ops[i].done, 1, __ATOMIC_RELEASE);
                }
            break;
        }
        int slice = timed_out || left > NX_NBD_SLICE_MS ? NX_NBD_SLICE_MS : (int)left;
        drive_or_wait(n, p, slice);
    }
    pthread_mutex_unlock(&p->lock);
    return timed_out;
}

/* -- lifetime ---------------------------------------------------------------------------- */

static int open_fail(struct nx_nbd *n, int stage, int err, const char *what)
{
    if (what != NULL && n->errmsg[0] == '\0')
        set_msg(n, what, nbd_get_error());
    if (n->handle != NULL) {
        nbd_close(n->handle);
        n->handle = NULL;
    }
    if (n->priv != NULL) {
        struct priv *p = n->priv;
        close(p->wakefd);
        pthread_mutex_destroy(&p->lock);
        pthread_cond_destroy(&p->progressed);
        free(p);
        n->priv = NULL;
    }
    n->dev.stage = stage;
    return -(err ? err : EIO);
}

int nx_nbd_open(const char *uri, int read_only, uint32_t timeout_ms, struct nx_nbd *n)
{
    memset(n, 0, sizeof(*n));
    n->dev.fd = -1;
    n->dev.read_only = read_only ? 1 : 0;
    n->timeout_ms = timeout_ms ? timeout_ms : 30000;

    struct priv *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return open_fail(n, NX_NBD_STAGE_CONNECT, ENOMEM, "out of memory");
    n->priv = p;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->progressed, NULL);
    p->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->wakefd < 0)
        return open_fail(n, NX_NBD_STAGE_CONNECT, errno, "eventfd");

    struct nbd_handle *h = nbd_create();
    if (h == NULL)
        return open_fail(n, NX_NBD_STAGE_CONNECT, ENOMEM, "nbd_create");
    n->handle = h;
    if (nbd_aio_connect_uri(h, uri) < 0) {
        int err = nbd_get_errno();
        /* libnbd says EINVAL for a URI it cannot parse or does not support. */
        return open_fail(n, err == EINVAL || err == ENOTSUP || err == EPROTONOSUPPORT
                                ? NX_NBD_STAGE_URI : NX_NBD_STAGE_CONNECT,
                         err, "cannot connect");
    }
    /* The handshake, bounded by the same timeout as every request. */
    int64_t deadline = now_ms() + n->timeout_ms;
    while (nbd_aio_is_connecting(h) > 0) {
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            set_msg(n, "cannot connect", "no answer from the server within the timeout");
            return open_fail(n, NX_NBD_STAGE_CONNECT, ETIMEDOUT, NULL);
        }
        poll_once(n, left > NX_NBD_SLICE_MS ? NX_NBD_SLICE_MS : (int)left);
        if (n->dead) {
            char why[sizeof(n->errmsg)];
            snprintf(why, sizeof(why), "%s", n->errmsg);
            n->errmsg[0] = '\0';
            set_msg(n, "cannot connect", why);
            return open_fail(n, NX_NBD_STAGE_CONNECT, ECONNREFUSED, NULL);
        }
    }
    if (nbd_aio_is_ready(h) <= 0)
        return open_fail(n, NX_NBD_STAGE_CONNECT, ECONNREFUSED, "cannot connect");

    int64_t size = nbd_get_size(h);
    int64_t minb = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
    int64_t prefb = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED);
    int64_t maxb = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
    if (size < 0 || minb < 0 || prefb < 0 || maxb < 0)
        return open_fail(n, NX_NBD_STAGE_GEOMETRY, EIO, "cannot read the export's geometry");
    /* 0 means "not advertised": the protocol's defaults. */
    n->min_block = minb ? (uint32_t)minb : 1;
    n->pref_block = prefb ? (uint32_t)prefb : 4096;
    n->max_block = maxb ? (uint32_t)maxb : NX_NBD_DEFAULT_MAX;
    n->can_flush = nbd_can_flush(h) > 0;
    n->can_fua = nbd_can_fua(h) > 0;

    /* The sector: 512 bytes, or the export's minimum block if that is coarser. */
    uint32_t sector = n->min_block > 512 ? n->min_block : 512;
    if (!is_pow2(sector) || sector > 4096) {
        set_msg(n, "unusable geometry", "the export's minimum block size is above 4096");
        return open_fail(n, NX_NBD_STAGE_GEOMETRY, EINVAL, NULL);
    }
    if (n->max_block > NX_NBD_DEFAULT_MAX)
        n->max_block = NX_NBD_DEFAULT_MAX;
    n->max_block -= n->max_block % sector;
    if (n->max_block < sector) {
        set_msg(n, "unusable geometry", "the export's maximum request is below one sector");
        return open_fail(n, NX_NBD_STAGE_GEOMETRY, EINVAL, NULL);
    }
    if (!read_only && nbd_is_read_only(h) > 0) {
        set_msg(n, "the server exports it read-only", "open it read-only");
        return open_fail(n, NX_NBD_STAGE_READONLY, EROFS, NULL);
    }
    if (!read_only && !n->can_flush) {
        set_msg(n, "the server cannot flush (no NBD_CMD_FLUSH)",
                "writes could never be made durable; only read-only use is possible");
        return open_fail(n, NX_NBD_STAGE_NOFLUSH, EOPNOTSUPP, NULL);
    }
    n->dev.sector_size = sector;
    n->dev.mem_align = sector;  /* no DMA here; kept equal so the bounce rule is the same */
    n->dev.size_bytes = (uint64_t)size;
    n->dev.total_sectors = (uint64_t)size / sector;
    n->dev.stage = NX_STAGE_NONE;
    return 0;
}

int nx_nbd_close(struct nx_nbd *n)
{
    __atomic_store_n(&n->dev.closing, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&n->dev.inflight, __ATOMIC_SEQ_CST) > 0) {
        struct timespec pause = {.tv_sec = 0, .tv_nsec = 50 * 1000};
        nanosleep(&pause, NULL);
    }
    struct nbd_handle *h = n->handle;
    if (h == NULL)
        return 0;
    if (!n->dead && nbd_aio_disconnect(h, 0) == 0) {
        /* Let NBD_CMD_DISC reach the server, but never wait on it for long. */
        int64_t deadline = now_ms() + n->timeout_ms;
        while (nbd_aio_is_closed(h) <= 0 && nbd_aio_is_dead(h) <= 0 && now_ms() < deadline &&
               !n->dead)
            poll_once(n, NX_NBD_SLICE_MS);
    }
    nbd_close(h);
    n->handle = NULL;
    struct priv *p = n->priv;
    if (p != NULL) {
        close(p->wakefd);
        pthread_mutex_destroy(&p->lock);
        pthread_cond_destroy(&p->progressed);
        free(p);
        n->priv = NULL;
    }
    return 0;
}

/* -- transfers --------------------------------------------------------------------------- */

static int enter(struct nx_nbd *n)
{
    __atomic_add_fetch(&n->dev.inflight, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&n->dev.closing, __ATOMIC_SEQ_CST)) {
        __atomic_sub_fetch(&n->dev.inflight, 1, __ATOMIC_SEQ_CST);
        return -EBADF;
    }
    return 0;
}

static void leave(struct nx_nbd *n)
{
    __atomic_sub_fetch(&n->dev.inflight, 1, __ATOMIC_SEQ_CST);
}

static void count(uint64_t *counter, uint64_t v)
{
    __atomic_add_fetch(counter, v, __ATOMIC_RELAXED);
}

static int check_req(const struct nx_nbd *n, const struct nx_nbd_req *r)
{
    uint64_t sector = n->dev.sector_size;
    if (r->write && n->dev.read_only)
        return -EBADF;
    if (r->len == 0 || r->len % sector != 0 || r->buf == NULL)
        return -EINVAL;
    uint64_t sectors = r->len / sector;
    if (r->lba > n->dev.total_sectors || sectors > n->dev.total_sectors - r->lba)
        return -EINVAL;
    return 0;
}

static int64_t issue_flush(struct nx_nbd *n, struct op *op)
{
    nbd_completion_callback cb = {.callback = on_complete, .user_data = op, .free = NULL};
    return nbd_aio_flush(n->handle, cb, 0);
}

/* Issue a flush as op `op` of a batch.  If it cannot be issued, the op is complete with EIO
 * and the connection is dead; returns 0 or -EIO. */
static int issue_batch_flush(struct nx_nbd *n, struct op *op)
{
    op->req = -1;
    if (issue_flush(n, op) >= 0)
        return 0;
    op->err = -EIO;
    __atomic_store_n(&op->done, 1, __ATOMIC_RELEASE);
    mark_dead(n, nbd_get_error());
    return -EIO;
}

/* Issue ops for every request (split at max_block), plus a flush when `durable`.
 * Returns 0 or the first error; on return every issued command has completed. */
static int run_batch(struct nx_nbd *n, struct nx_nbd_req *reqs, int nreqs, int durable)
{
    struct nbd_handle *h = n->handle;
    uint64_t sector = n->dev.sector_size;
    int any_write = 0;
    int nops = 0;

    for (int i = 0; i < nreqs; i++) {
        reqs[i].err = check_req(n, &reqs[i]);
        if (reqs[i].err < 0)
            return reqs[i].err;  /* nothing issued yet */
        any_write |= reqs[i].write;
        nops += (int)((reqs[i].len + n->max_block - 1) / n->max_block);
    }
    int want_flush = durable && any_write;
    /* With FUA every write is durable by itself, so the flush (for the earlier writes)
     * can fly beside them; without it the flush must follow their completion. */
    int flush_beside = want_flush && n->can_fua;
    int total = nops + (want_flush ? 1 : 0);

    struct op stack_ops[NX_NBD_STACK_OPS];
    struct op *ops = total <= NX_NBD_STACK_OPS ? stack_ops : calloc((size_t)total, sizeof(*ops));
    if (ops == NULL)
        return -ENOMEM;
    memset(ops, 0, (size_t)total * sizeof(*ops));

    int64_t deadline = now_ms() + n->timeout_ms;
    int k = 0;
    int issue_err = 0;
    for (int i = 0; i < nreqs && !issue_err; i++) {
        struct nx_nbd_req *r = &reqs[i];
        uint64_t off = r->lba * sector;
        for (size_t done = 0; done < r->len && !issue_err; done += n->max_block) {
            size_t len = r->len - done < n->max_block ? r->len - done : n->max_block;
            struct op *op = &ops[k++];
            op->req = i;
            nbd_completion_callback cb = {.callback = on_complete, .user_data = op,
                                          .free = NULL};
            int64_t c;
            if (r->write)
                c = nbd_aio_pwrite(h, (char *)r->buf + done, len, off + done, cb,
                                   flush_beside ? LIBNBD_CMD_FLAG_FUA : 0);
            else
                c = nbd_aio_pread(h, (char *)r->buf + done, len, off + done, cb, 0);
            if (c < 0) {
                /* Not issued, so its callback never runs: finish it here. */
                issue_err = -EIO;
                op->err = -EIO;
                __atomic_store_n(&op->done, 1, __ATOMIC_RELEASE);
                mark_dead(n, nbd_get_error());
            }
        }
    }
    if (flush_beside && !issue_err)
        issue_err = issue_batch_flush(n, &ops[k++]);
    kick(n);
    int timed_out = wait_ops(n, ops, k, deadline);
    if (want_flush && !flush_beside && !issue_err && !timed_out && !n->dead) {
        int writes_ok = 1;
        for (int j = 0; j < k; j++)
            writes_ok &= ops[j].err == 0;
        if (writes_ok) {
            struct op *op = &ops[k++];
            issue_err = issue_batch_flush(n, op);
            kick(n);
            wait_ops(n, op, 1, now_ms() + n->timeout_ms);
        }
    }

    int rc = 0;
    int flushed = 0;
    for (int j = 0; j < k; j++) {
        int err = ops[j].err;
        /* Every command that did not complete by the deadline was aborted by us, not by
         * the server: say so. */
        if (err == -ENOTCONN || err == -ESHUTDOWN || err == -EPIPE || err == -ECONNRESET ||
            err == -ETIMEDOUT)
            err = -EIO;  /* timed out or connection gone: to the caller an I/O error, the
                          * reason is in errmsg */
        if (ops[j].req >= 0) {
            if (reqs[ops[j].req].err == 0)
                reqs[ops[j].req].err = err;
        } else if (err == 0) {
            flushed = 1;
        }
        if (rc == 0 && err < 0)
            rc = err;
    }
    if (rc == 0 && issue_err)
        rc = issue_err;
    if (flushed)
        count(&n->dev.barriers, 1);
    if (ops != stack_ops)
        free(ops);
    return rc;
}

static uint64_t iov_total_len(const struct iovec *iov, int iovcnt)
{
    uint64_t total = 0;
    for (int i = 0; i < iovcnt; i++)
        total += iov[i].iov_len;
    return total;
}

static int dead_rc(struct nx_nbd *n)
{
    if (n->handle == NULL)
        return -EBADF;
    return __atomic_load_n(&n->dead, __ATOMIC_SEQ_CST) ? -EIO : 0;
}

int nx_nbd_submit(struct nx_nbd *n, struct nx_nbd_req *reqs, int nreqs, int durable)
{
    if (nreqs <= 0)
        return -EINVAL;
    int rc = enter(n);
    if (rc < 0)
        return rc;
    rc = dead_rc(n);
    if (rc == 0)
        rc = run_batch(n, reqs, nreqs, durable);
    if (rc == 0) {
        uint64_t sector = n->dev.sector_size;
        for (int i = 0; i < nreqs; i++) {
            count(reqs[i].write ? &n->dev.writes : &n->dev.reads, 1);
            count(reqs[i].write ? &n->dev.sectors_written : &n->dev.sectors_read,
                  reqs[i].len / sector);
        }
    }
    leave(n);
    return rc;
}

/* The body of a vectored transfer, for a caller that holds the export (enter): one
 * request per segment, at consecutive offsets, all in flight together.  Not counted. */
static int move_iov(struct nx_nbd *n, uint64_t lba, struct iovec *iov, int iovcnt, int write,
                    int durable)
{
    if (iovcnt <= 0)
        return -EINVAL;
    int rc = dead_rc(n);
    if (rc < 0)
        return rc;
    uint64_t sector = n->dev.sector_size;
    struct nx_nbd_req stack_reqs[NX_NBD_STACK_OPS];
    struct nx_nbd_req *reqs = iovcnt <= NX_NBD_STACK_OPS
                                  ? stack_reqs
                                  : calloc((size_t)iovcnt, sizeof(*reqs));
    if (reqs == NULL)
        return -ENOMEM;
    uint64_t at = lba;
    for (int i = 0; i < iovcnt; i++) {
        reqs[i] = (struct nx_nbd_req){.lba = at, .buf = iov[i].iov_base,
                                      .len = iov[i].iov_len, .write = write, .err = 0};
        if (iov[i].iov_len % sector != 0 || iov[i].iov_len == 0) {
            rc = -EINVAL;
            break;
        }
        at += iov[i].iov_len / sector;
    }
    if (rc == 0)
        rc = run_batch(n, reqs, iovcnt, durable);
    if (reqs != stack_reqs)
        free(reqs);
    return rc;
}

/* A vectored transfer, counted as one transfer (as one preadv/pwritev is for a file). */
static int vectored(struct nx_nbd *n, uint64_t lba, struct iovec *iov, int iovcnt, int write,
                    int durable)
{
    if (iovcnt <= 0)
        return -EINVAL;
    int rc = enter(n);
    if (rc < 0)
        return rc;
    uint64_t sectors = iov_total_len(iov, iovcnt) / n->dev.sector_size;
    rc = move_iov(n, lba, iov, iovcnt, write, durable);
    if (rc == 0) {
        count(write ? &n->dev.writes : &n->dev.reads, 1);
        count(write ? &n->dev.sectors_written : &n->dev.sectors_read, sectors);
    }
    leave(n);
    return rc;
}

/* The ring's transfer hook (nx_ring_open_xfer): a pool worker moves one request with the
 * blocking vectored transfer, so each worker keeps one request's commands on the wire and
 * inherits its deadline (a timeout or a dead connection fails it with EIO, and returns
 * only once libnbd has let go of the buffers).  The ring holds the export (enter at submit,
 * leave at completion) and counts the transfer; the batch counts the barrier. */
static int ring_xfer(void *ctx, uint64_t lba, struct iovec *iov, int iovcnt, int write,
                     int durable)
{
    return move_iov(ctx, lba, iov, iovcnt, write, durable);
}

/* -- the callbacks engine (NX_RING_CALLBACKS) ------------------------------------------------
 *
 * nx_ring_submit's thread issues a request's NBD commands itself (libnbd's aio calls do not
 * block) and returns; their completion callbacks, run by whichever thread drives libnbd,
 * only set flags.  One driver thread per ring sleeps in the poller's seat (the same protocol
 * as wait_ops: poll(2) on the socket and the wake-up eventfd, without the handle lock) while
 * requests are in flight, and after each round reports the requests whose commands are all
 * done to the ring (nx_ring_done: the ring's eventfd), issues the flush that follows the
 * writes of a durable request on a server without FUA, and enforces each request's deadline
 * exactly as wait_ops does (kill the connection; libnbd then aborts every command). */

struct areq {
    struct nx_ring *ring;
    void *token;            /* the core's request */
    int64_t deadline;
    int nops;               /* commands issued so far (ops[] has room for one more flush) */
    int flush_after;        /* durable, no FUA: a flush once the writes are answered */
    int issue_err;
    int result;             /* the request's result, once settled */
    struct areq *next;
    struct op ops[];
};

struct aring {
    struct nx_nbd *n;
    pthread_mutex_t mu;     /* active, stop */
    pthread_cond_t work;    /* a request became active, or stop */
    struct areq *active;
    int stop;
    pthread_t driver;
};

static int wire_err(int err)
{
    /* Timed out or connection gone: to the caller an I/O error, the reason is in errmsg. */
    if (err == -ENOTCONN || err == -ESHUTDOWN || err == -EPIPE || err == -ECONNRESET ||
        err == -ETIMEDOUT)
        return -EIO;
    return err;
}

static int issue_op(struct nx_nbd *n, struct op *op, int write, void *buf, size_t len,
                    uint64_t off, uint32_t flags)
{
    nbd_completion_callback cb = {.callback = on_complete, .user_data = op, .free = NULL};
    int64_t c = buf == NULL ? nbd_aio_flush(n->handle, cb, 0)
                : write ? nbd_aio_pwrite(n->handle, buf, len, off, cb, flags)
                        : nbd_aio_pread(n->handle, buf, len, off, cb, 0);
    if (c >= 0)
        return 0;
    /* Not issued, so its callback never runs: finish it here. */
    op->err = -EIO;
    __atomic_store_n(&op->done, 1, __ATOMIC_RELEASE);
    mark_dead(n, nbd_get_error());
    return -EIO;
}

static void aring_start(void *ctx, struct nx_ring *ring, void *token, uint64_t lba,
                        const struct iovec *iov, int iovcnt, int write, int durable)
{
    struct aring *a = ctx;
    struct nx_nbd *n = a->n;
    int rc = dead_rc(n);
    if (rc < 0) {
        nx_ring_done(ring, token, rc);
        return;
    }
    int cmds = 0;
    for (int i = 0; i < iovcnt; i++)
        cmds += (int)((iov[i].iov_len + n->max_block - 1) / n->max_block);
    int want_flush = write && durable;
    int flush_beside = want_flush && n->can_fua;
    struct areq *r = calloc(1, sizeof(*r) + (size_t)(cmds + 1) * sizeof(struct op));
    if (r == NULL) {
        nx_ring_done(ring, token, -ENOMEM);
        return;
    }
    r->ring = ring;
    r->token = token;
    r->deadline = now_ms() + n->timeout_ms;
    r->flush_after = want_flush && !flush_beside;
    uint64_t off = lba * n->dev.sector_size;
    for (int i = 0; i < iovcnt && !r->issue_err; i++) {
        for (size_t done = 0; done < iov[i].iov_len && !r->issue_err; done += n->max_block) {
            size_t len = iov[i].iov_len - done;
            if (len > n->max_block)
                len = n->max_block;
            struct op *op = &r->ops[r->nops++];
            op->req = 0;
            r->issue_err = issue_op(n, op, write, (char *)iov[i].iov_base + done, len,
                                    off + done, flush_beside ? LIBNBD_CMD_FLAG_FUA : 0);
        }
        off += iov[i].iov_len;
    }
    if (flush_beside && !r->issue_err) {
        struct op *op = &r->ops[r->nops++];
        op->req = -1;
        r->issue_err = issue_op(n, op, 0, NULL, 0, 0, 0);
    }
    pthread_mutex_lock(&a->mu);
    r->next = a->active;
    a->active = r;
    pthread_cond_signal(&a->work);
    pthread_mutex_unlock(&a->mu);
    /* libnbd sends what it can from this thread.  Only what is left to send needs the
     * poller to watch for POLLOUT; a poller already watching for the replies (POLLIN) need
     * not be woken: that wake-up would cost as much as the whole request's. */
    if (r->issue_err || (nbd_aio_get_direction(n->handle) & LIBNBD_AIO_DIRECTION_WRITE))
        kick(n);
}

/* Every command of `r` is done: issue its flush-after if it needs one (returns 0: still
 * active), else its result (1). */
static int areq_settle(struct nx_nbd *n, struct areq *r, int *result)
{
    int rc = 0;
    int flushed = 0;
    for (int j = 0; j < r->nops; j++) {
        int err = wire_err(r->ops[j].err);
        if (r->ops[j].req < 0 && err == 0)
            flushed = 1;
        if (rc == 0 && err < 0)
            rc = err;
    }
    if (rc == 0 && r->issue_err)
        rc = r->issue_err;
    if (rc == 0 && r->flush_after) {
        r->flush_after = 0;
        if (!__atomic_load_n(&n->dead, __ATOMIC_SEQ_CST)) {
            struct op *op = &r->ops[r->nops++];
            op->req = -1;
            r->deadline = now_ms() + n->timeout_ms;
            if (issue_op(n, op, 0, NULL, 0, 0, 0) == 0) {
                kick(n);
                return 0;
            }
            rc = -EIO;
        } else {
            rc = -EIO;
        }
    }
    if (flushed)
        count(&n->dev.barriers, 1);
    *result = rc;
    return 1;
}

/* Has a request of `a` all its commands done?  (The caller holds p->lock: a poller that
 * ran their callbacks has finished its round, so what it did is visible.) */
static int any_settled(struct aring *a)
{
    int found = 0;
    pthread_mutex_lock(&a->mu);
    for (struct areq *r = a->active; r != NULL && !found; r = r->next)
        found = all_done(r->ops, r->nops);
    pthread_mutex_unlock(&a->mu);
    return found;
}

static void *aring_driver(void *arg)
{
    struct aring *a = arg;
    struct nx_nbd *n = a->n;
    struct priv *p = n->priv;
    int killed = 0;  /* this driver dropped the connection at a deadline */
    for (;;) {
        /* Report what is done (outside every lock but ours: nx_ring_done takes the ring's). */
        struct areq *finished = NULL;
        int64_t earliest = INT64_MAX;
        pthread_mutex_lock(&a->mu);
        for (struct areq **at = &a->active; *at != NULL;) {
            struct areq *r = *at;
            int result;
            if (all_done(r->ops, r->nops) && areq_settle(n, r, &result)) {
                r->result = result;
                *at = r->next;
                r->next = finished;
                finished = r;
                continue;
            }
            if (r->deadline < earliest)
                earliest = r->deadline;
            at = &r->next;
        }
        int idle = a->active == NULL;
        int stop = a->stop;
        if (idle && !stop && finished == NULL)
            pthread_cond_wait(&a->work, &a->mu);
        pthread_mutex_unlock(&a->mu);
        while (finished != NULL) {
            struct areq *r = finished;
            finished = r->next;
            nx_ring_done(r->ring, r->token, r->result);
            free(r);
        }
        if (idle) {
            if (stop)
                return NULL;
            continue;
        }
        /* One round of waiting, as wait_ops does. */
        pthread_mutex_lock(&p->lock);
        if (__atomic_load_n(&n->dead, __ATOMIC_SEQ_CST) &&
            (nbd_aio_is_dead(n->handle) > 0 || nbd_aio_is_closed(n->handle) > 0)) {
            /* libnbd has aborted every command (their callbacks ran) and holds no buffer:
             * a command still pending was never going to complete. */
            pthread_mutex_unlock(&p->lock);
            pthread_mutex_lock(&a->mu);
            for (struct areq *r = a->active; r != NULL; r = r->next)
                for (int j = 0; j < r->nops; j++)
                    if (!__atomic_load_n(&r->ops[j].done, __ATOMIC_ACQUIRE)) {
                        r->ops[j].err = -EIO;
                        __atomic_store_n(&r->ops[j].done, 1, __ATOMIC_RELEASE);
                    }
            pthread_mutex_unlock(&a->mu);
            continue;
        }
        int64_t left = earliest - now_ms();
        if (left <= 0) {
            pthread_mutex_unlock(&p->lock);
            if (!killed) {
                /* Also when another request already marked the connection dead (a command
                 * that could not be issued): the socket may still be up, and these commands
                 * must end. */
                killed = 1;
                __atomic_add_fetch(&n->timeouts, 1, __ATOMIC_RELAXED);
                char why[96];
                snprintf(why, sizeof(why), "a request got no answer within %u ms",
                         (unsigned)n->timeout_ms);
                kill_connection(n, why);
            }
            /* Then drive libnbd until it has seen the end of the connection. */
            pthread_mutex_lock(&p->lock);
            left = NX_NBD_SLICE_MS;
        }
        int slice = left > NX_NBD_SLICE_MS ? NX_NBD_SLICE_MS : (int)left;
        if (any_settled(a)) {
            /* Another poller finished our commands since the scan: report them first. */
        } else {
            drive_or_wait(n, p, slice);
        }
        pthread_mutex_unlock(&p->lock);
    }
}

static void aring_stop(void *ctx)
{
    struct aring *a = ctx;
    pthread_mutex_lock(&a->mu);
    a->stop = 1;
    pthread_cond_signal(&a->work);
    pthread_mutex_unlock(&a->mu);
    pthread_join(a->driver, NULL);
    pthread_cond_destroy(&a->work);
    pthread_mutex_destroy(&a->mu);
    free(a);
}

static const struct nx_ring_hooks aring_hooks = {.start = aring_start, .stop = aring_stop};

int nx_nbd_ring_open(struct nx_nbd *n, int mode, unsigned depth, unsigned threads,
                     struct nx_ring **out)
{
    *out = NULL;
    if (n->handle == NULL || __atomic_load_n(&n->dev.closing, __ATOMIC_SEQ_CST))
        return -EBADF;
    if (mode == NX_RING_URING)
        return -EOPNOTSUPP;
    if (mode == NX_RING_POOL)
        return nx_ring_open_xfer(&n->dev, depth, threads, ring_xfer, n, out);
    if (mode != NX_RING_ANY && mode != NX_RING_CALLBACKS)
        return -EINVAL;
    struct aring *a = calloc(1, sizeof(*a));
    if (a == NULL)
        return -ENOMEM;
    a->n = n;
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->work, NULL);
    int err = pthread_create(&a->driver, NULL, aring_driver, a);
    if (err != 0) {
        pthread_cond_destroy(&a->work);
        pthread_mutex_destroy(&a->mu);
        free(a);
        return -err;
    }
    int rc = nx_ring_open_async(&n->dev, depth, &aring_hooks, a, out);
    if (rc < 0)
        aring_stop(a);
    return rc;
}

int nx_nbd_readv(struct nx_nbd *n, uint64_t lba, struct iovec *iov, int iovcnt)
{
    return vectored(n, lba, iov, iovcnt, 0, 0);
}

int nx_nbd_writev(struct nx_nbd *n, uint64_t lba, struct iovec *iov, int iovcnt, int durable)
{
    return vectored(n, lba, iov, iovcnt, 1, durable);
}

int nx_nbd_read(struct nx_nbd *n, uint64_t lba, void *buf, size_t len)
{
    struct iovec one = {.iov_base = buf, .iov_len = len};
    return vectored(n, lba, &one, 1, 0, 0);
}

int nx_nbd_write(struct nx_nbd *n, uint64_t lba, const void *buf, size_t len, int durable)
{
    struct iovec one = {.iov_base = (void *)buf, .iov_len = len};
    return vectored(n, lba, &one, 1, 1, durable);
}

int nx_nbd_sync(struct nx_nbd *n)
{
    int rc = enter(n);
    if (rc < 0)
        return rc;
    rc = dead_rc(n);
    if (rc == 0 && n->dev.read_only)
        rc = -EBADF;
    if (rc == 0) {
        struct op op = {.done = 0, .err = 0, .req = -1};
        if (issue_flush(n, &op) < 0) {
            mark_dead(n, nbd_get_error());
            rc = -EIO;
        } else {
            kick(n);
            wait_ops(n, &op, 1, now_ms() + n->timeout_ms);
            rc = op.err < 0 ? -EIO : 0;
            if (rc == 0)
                count(&n->dev.barriers, 1);
        }
    }
    leave(n);
    return rc;
}
