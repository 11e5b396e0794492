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

/* cdef-end */

#endif /* NEXFS_CORE_H */
