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

/* Range and alignment checks shared by every transfer: refuse before O_DIRECT sees it. */
static int check_io(const struct nx_dev *dev, uint64_t lba, const struct iovec *iov,
                    int iovcnt, int writing)
{
    uint64_t total = 0;
    uintptr_t mask = (uintptr_t)dev->mem_align - 1;

    if (dev->fd < 0)
        return -EBADF;
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
    int rc = check_io(dev, lba, iov, iovcnt, write);
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
