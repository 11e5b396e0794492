/*
 * dio_race: O_DIRECT writes racing buffered readers (tests/test_mount_dio.py builds and runs it).
 *
 *   dio_race FILE SIZE CHUNK READERS SECONDS MAXCYCLES MODE
 *
 * FILE must exist and be SIZE bytes long (a multiple of 4096).  READERS child processes read
 * the whole file through the page cache in a loop (pread on an ordinary descriptor) until
 * the writer is done.  The writer, on a descriptor opened with O_DIRECT, overwrites the whole
 * file once per cycle, in writes of CHUNK bytes, with a pattern unique to the cycle and, once
 * the writes have completed, reads the file back through an ordinary (buffered) descriptor
 * and compares: a read that starts after a write has returned must see it, as on ext4.  MODE
 * says how the writes are issued: "aio" (all chunks at once with io_submit, then
 * io_getevents: the Linux AIO interface of fio's libaio engine, queue depth SIZE/CHUNK) or
 * "sync" (pwrite, one chunk after the other).  "aio-setfl" is "aio" on a descriptor opened
 * without O_DIRECT that gets it afterwards with fcntl(F_SETFL), which the daemon never sees.
 * It runs until SECONDS have passed or MAXCYCLES cycles are done.
 *
 * Output, one line: "ok CYCLES" (exit 0), or "stale CYCLE OFFSET GOT WANT DIRECT" where
 * DIRECT says whether an O_DIRECT read at that moment returned the new data (exit 1).  Exit
 * 2 on any system call failure (with perror).
 *
 * Linux AIO through raw system calls, so no libaio package is needed to build it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Every 8-byte word of cycle c's image: the cycle and the word's offset, so a mismatch says
 * which cycle's data was returned and where. */
static void fill(uint64_t *buf, size_t size, uint64_t cycle)
{
	for (size_t i = 0; i < size / 8; i++)
		buf[i] = cycle << 32 | (uint64_t)(i * 8);
}

static void read_all(int fd, void *buf, size_t size)
{
	size_t done = 0;

	while (done < size) {
		ssize_t n = pread(fd, (char *)buf + done, size - done, (off_t)done);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("pread");
		}
		if (n == 0) {
			fprintf(stderr, "short file: %zu of %zu bytes\n", done, size);
			exit(2);
		}
		done += (size_t)n;
	}
}

static void reader(const char *path, size_t size)
{
	int fd = open(path, O_RDONLY);
	void *buf = malloc(size);

	if (fd < 0 || !buf)
		die("reader open");
	for (;;)
		read_all(fd, buf, size);
}

static void write_aio(aio_context_t ctx, int fd, char *buf, size_t size, size_t chunk)
{
	long n = (long)(size / chunk), done = 0;
	struct iocb *cbs[n];
	struct iocb cb[n];
	struct io_event ev[n];

	memset(cb, 0, sizeof(cb));
	for (long i = 0; i < n; i++) {
		cb[i].aio_fildes = (uint32_t)fd;
		cb[i].aio_lio_opcode = IOCB_CMD_PWRITE;
		cb[i].aio_buf = (uint64_t)(uintptr_t)(buf + i * chunk);
		cb[i].aio_nbytes = chunk;
		cb[i].aio_offset = (int64_t)(i * chunk);
		cbs[i] = &cb[i];
	}
	if (syscall(SYS_io_submit, ctx, n, cbs) != n)
		die("io_submit");
	while (done < n) {
		long got = syscall(SYS_io_getevents, ctx, 1L, n - done, ev, NULL);

		if (got < 0) {
			if (errno == EINTR)
				continue;
			die("io_getevents");
		}
		for (long i = 0; i < got; i++) {
			if (ev[i].res != (int64_t)chunk) {
				fprintf(stderr, "aio write returned %lld\n", (long long)ev[i].res);
				exit(2);
			}
		}
		done += got;
	}
}

static void write_sync(int fd, char *buf, size_t size, size_t chunk)
{
	for (size_t off = 0; off < size; off += chunk)
		if (pwrite(fd, buf + off, chunk, (off_t)off) != (ssize_t)chunk)
			die("pwrite");
}

int main(int argc, char **argv)
{
	if (argc != 8) {
		fprintf(stderr, "usage: %s FILE SIZE CHUNK READERS SECONDS MAXCYCLES aio|sync\n",
			argv[0]);
		return 2;
	}
	const char *path = argv[1];
	size_t size = strtoul(argv[2], NULL, 0);
	size_t chunk = strtoul(argv[3], NULL, 0);
	int readers = atoi(argv[4]);
	double seconds = atof(argv[5]);
	long maxcycles = atol(argv[6]);
	int setfl = strcmp(argv[7], "aio-setfl") == 0;
	int aio = setfl || strcmp(argv[7], "aio") == 0;
	pid_t *pids = calloc((size_t)readers + 1, sizeof(pid_t));
	uint64_t *wbuf, *rbuf, *dbuf;
	int result = 0;

	if (size == 0 || chunk == 0 || chunk % BLOCK || size % chunk || size / chunk > 1024 || !pids)
		return 2;
	if (posix_memalign((void **)&wbuf, BLOCK, size) || posix_memalign((void **)&rbuf, BLOCK, size)
	    || posix_memalign((void **)&dbuf, BLOCK, size))
		die("posix_memalign");

	int dfd = open(path, setfl ? O_RDWR : O_RDWR | O_DIRECT);
	int bfd = open(path, O_RDONLY);
	aio_context_t ctx = 0;

	if (dfd < 0 || bfd < 0)
		die("open");
	if (setfl && fcntl(dfd, F_SETFL, O_DIRECT) < 0)
		die("fcntl");
	if (aio && syscall(SYS_io_setup, (long)(size / chunk), &ctx) < 0)
		die("io_setup");
	for (int i = 0; i < readers; i++) {
		pids[i] = fork();
		if (pids[i] < 0)
			die("fork");
		if (pids[i] == 0) {
			/* A reader must not outlive a writer that died. */
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			if (getppid() == 1)
				_exit(2);
			reader(path, size);
		}
	}

	double end = now() + seconds;
	long cycle;

	for (cycle = 1; cycle <= maxcycles && now() < end; cycle++) {
		fill(wbuf, size, (uint64_t)cycle);
		if (aio)
			write_aio(ctx, dfd, (char *)wbuf, size, chunk);
		else
			write_sync(dfd, (char *)wbuf, size, chunk);
		read_all(bfd, rbuf, size);
		if (memcmp(rbuf, wbuf, size) != 0) {
			size_t i = 0;

			while (rbuf[i] == wbuf[i])
				i++;
			read_all(dfd, dbuf, size);
			printf("stale %ld %zu %llx %llx %s\n", cycle, i * 8,
			       (unsigned long long)rbuf[i], (unsigned long long)wbuf[i],
			       memcmp(dbuf, wbuf, size) == 0 ? "direct-ok" : "direct-bad");
			result = 1;
			break;
		}
	}
	if (!result)
		printf("ok %ld\n", cycle - 1);
	for (int i = 0; i < readers; i++)
		kill(pids[i], SIGKILL);
	for (int i = 0; i < readers; i++)
		waitpid(pids[i], NULL, 0);
	fflush(stdout);
	return result;
}
