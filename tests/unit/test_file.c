/* test_file.c - the file backend on real files in a temporary directory:
 * round trips, windows and their bounds, TRIM/ZERO and the holes they
 * leave (SEEK_DATA/SEEK_HOLE), read-only opens, O_DIRECT with unaligned
 * requests, a partition of an image, a loop device (BLKGETSIZE64,
 * BLKDISCARD, zeroing), the tmpfs fallbacks, writes taken from a pipe
 * (splice_write) and read into one (splice_read), and the io_uring path with many requests in flight from
 * several threads, checked by content. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>
#include "devio/backend.h"
#include "devio/layer.h"
#include "devio/request.h"
#include "devio/util.h"

#define MiB (1ull << 20)

static char dir[64];

static int make_dir(void **state)
{
	strcpy(dir, "/var/tmp/devio-test-file-XXXXXX");
	return mkdtemp(dir) ? 0 : -1;
}

static int remove_dir(void **state)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	return system(cmd);
}

/* A new image of size bytes whose byte i is pattern(i). */
static void make_image(const char *name, uint64_t size, char *path, size_t pathlen)
{
	unsigned char buf[65536];
	int fd;

	snprintf(path, pathlen, "%s/%s", dir, name);
	fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	assert_true(fd >= 0);
	for (uint64_t off = 0; off < size; off += sizeof(buf)) {
		size_t n = size - off < sizeof(buf) ? size - off : sizeof(buf);

		for (size_t i = 0; i < n; i++)
			buf[i] = (unsigned char)((off + i) * 7 + ((off + i) >> 12));
		assert_int_equal(pwrite(fd, buf, n, off), (ssize_t)n);
	}
	close(fd);
}

static unsigned char pattern(uint64_t i)
{
	return (unsigned char)(i * 7 + (i >> 12));
}

static bool all_zero(const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

static void test_roundtrip(void **state)
{
	char path[128];
	struct devio_backend *b;
	unsigned char w[10000], r[10000];
	char desc[256];

	make_image("rt.img", 4 * MiB, path, sizeof(path));
	assert_int_equal(devio_file_open(path, NULL, &b), 0);
	assert_int_equal(b->size, 4 * MiB);
	assert_true(b->caps & DEVIO_CAP_FLUSH);
	assert_true(b->caps & DEVIO_CAP_MULTI_CONN);
	assert_false(b->caps & DEVIO_CAP_READONLY);
	assert_int_equal(devio_layer_read(b, r, sizeof(r), 12345), 0);
	for (size_t i = 0; i < sizeof(r); i++)
		assert_int_equal(r[i], pattern(12345 + i));
	for (size_t i = 0; i < sizeof(w); i++)
		w[i] = (unsigned char)(i ^ 0x5A);
	assert_int_equal(devio_layer_write(b, w, sizeof(w), 4 * MiB - sizeof(w), DEVIO_REQ_FUA), 0);
	assert_int_equal(devio_layer_flush(b), 0);
	assert_int_equal(devio_layer_read(b, r, sizeof(r), 4 * MiB - sizeof(r)), 0);
	assert_memory_equal(w, r, sizeof(w));
	b->ops->describe(b, desc, sizeof(desc));
	assert_non_null(strstr(desc, path));
	devio_backend_close(b);
}

static void test_window(void **state)
{
	char path[128];
	struct devio_backend *b;
	struct devio_open_opts o = { .has_offset = true, .offset = 100000, .has_size = true, .size = MiB };
	unsigned char r[4096], w[4096];
	int fd;

	make_image("win.img", 4 * MiB, path, sizeof(path));
	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	assert_int_equal(b->size, MiB);
	assert_int_equal(devio_layer_read(b, r, sizeof(r), 0), 0);
	for (size_t i = 0; i < sizeof(r); i++)
		assert_int_equal(r[i], pattern(100000 + i));
	memset(w, 0xEE, sizeof(w));
	assert_int_equal(devio_layer_write(b, w, sizeof(w), MiB - sizeof(w), 0), 0);
	devio_backend_close(b);
	/* the write landed at offset + size - 4096 of the file, nowhere else */
	fd = open(path, O_RDONLY);
	assert_int_equal(pread(fd, r, sizeof(r), 100000 + MiB - sizeof(r)), (ssize_t)sizeof(r));
	assert_memory_equal(r, w, sizeof(w));
	assert_int_equal(pread(fd, r, 1, 100000 + MiB), 1);
	assert_int_equal(r[0], pattern(100000 + MiB));
	close(fd);

	/* to the end */
	o.has_size = false;
	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	assert_int_equal(b->size, 4 * MiB - 100000);
	devio_backend_close(b);
	/* out of range, overflow, empty */
	o = (struct devio_open_opts){ .has_offset = true, .offset = 4 * MiB + 1 };
	assert_int_equal(devio_backend_open(path, &o, &b), -EINVAL);
	o = (struct devio_open_opts){ .has_offset = true, .offset = 4096, .has_size = true, .size = 4 * MiB };
	assert_int_equal(devio_backend_open(path, &o, &b), -EINVAL);
	o = (struct devio_open_opts){ .has_offset = true, .offset = 4096, .has_size = true, .size = UINT64_MAX };
	assert_int_equal(devio_backend_open(path, &o, &b), -EINVAL);
	o = (struct devio_open_opts){ .has_size = true, .size = 0 };
	assert_int_equal(devio_backend_open(path, &o, &b), -EINVAL);
}

struct ext_list {
	uint64_t off[32], len[32];
	uint32_t flags[32];
	int n;
};

static int collect(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct ext_list *l = ctx;

	if (l->n == 32)
		return 1;
	l->off[l->n] = off;
	l->len[l->n] = len;
	l->flags[l->n] = flags;
	l->n++;
	return 0;
}

/* Whether [off, off+len) is reported as one hole, within the extents. */
static bool is_hole(const struct ext_list *l, uint64_t off, uint64_t len)
{
	for (int i = 0; i < l->n; i++)
		if (l->off[i] <= off && off + len <= l->off[i] + l->len[i])
			return l->flags[i] == (DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO);
	return false;
}

static void test_trim_zero_extents(void **state)
{
	char path[128];
	struct devio_backend *b;
	struct devio_open_opts o = { .has_offset = true, .offset = MiB };
	unsigned char *r = malloc(MiB);
	struct ext_list l = { 0 };
	uint64_t covered = 0;

	make_image("tz.img", 8 * MiB, path, sizeof(path));
	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	assert_true(b->caps & DEVIO_CAP_TRIM); /* /var/tmp punches holes */
	assert_true(b->caps & DEVIO_CAP_FAST_ZERO);
	assert_int_equal(devio_layer_trim(b, MiB, MiB, 0), 0);
	assert_int_equal(devio_layer_zero(b, 3 * MiB + 100, 5000, 0), 0);
	assert_int_equal(devio_layer_zero(b, 5 * MiB, MiB, DEVIO_REQ_NO_HOLE), 0);
	assert_int_equal(devio_layer_zero(b, 6 * MiB, 4096, DEVIO_REQ_FAST_ZERO), 0);
	assert_int_equal(devio_layer_read(b, r, MiB, MiB), 0);
	assert_true(all_zero(r, MiB));
	assert_int_equal(devio_layer_read(b, r, 10000, 3 * MiB), 0);
	for (size_t i = 0; i < 100; i++)
		assert_int_equal(r[i], pattern(MiB + 3 * MiB + i));
	assert_true(all_zero(r + 100, 5000));
	assert_int_equal(r[5100], pattern(MiB + 3 * MiB + 5100));
	assert_int_equal(devio_layer_read(b, r, MiB, 5 * MiB), 0);
	assert_true(all_zero(r, MiB));
	/* extents are relative to the window and cover it in order */
	assert_int_equal(devio_extents(b, 0, b->size, collect, &l), 0);
	assert_true(l.n >= 2);
	for (int i = 0; i < l.n; i++) {
		assert_int_equal(l.off[i], covered);
		covered += l.len[i];
	}
	assert_int_equal(covered, b->size);
	assert_true(is_hole(&l, MiB, MiB));
	assert_false(is_hole(&l, 0, 4096));
	devio_backend_close(b);
	free(r);
}

static void test_readonly(void **state)
{
	char path[128];
	struct devio_backend *b;
	struct devio_open_opts o = { .readonly = true };
	struct devio_request req = { .op = DEVIO_OP_WRITE, .offset = 0, .length = 1 };
	char c = 1;

	make_image("ro.img", MiB, path, sizeof(path));
	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	assert_true(b->caps & DEVIO_CAP_READONLY);
	req.buf = &c;
	assert_int_equal(devio_execute(b, &req), -EROFS);
	devio_backend_close(b);
	/* asked read-write on a file that is not writable: a clear failure */
	if (geteuid() != 0) {
		chmod(path, 0444);
		assert_int_equal(devio_file_open(path, NULL, &b), -EACCES);
	}
	assert_int_equal(devio_file_open("/nonexistent/devio.img", NULL, &b), -ENOENT);
	assert_int_equal(devio_file_open(dir, NULL, &b), -EISDIR);
}

/* Fill the pipe with len bytes of value v (len fits the pipe). */
static void pipe_fill(int fd, size_t len, unsigned char v)
{
	unsigned char buf[4096];

	memset(buf, v, sizeof(buf));
	while (len) {
		size_t n = len < sizeof(buf) ? len : sizeof(buf);

		assert_int_equal(write(fd, buf, n), (ssize_t)n);
		len -= n;
	}
}

/* A READ or WRITE with a pipe for a buffer, through the core. */
static int splice_req(struct devio_backend *b, enum devio_op op, int fd, uint64_t off, uint64_t len, uint32_t flags)
{
	struct devio_request req = { .op = op, .flags = flags, .offset = off, .length = len,
				     .kind = DEVIO_BUF_PIPE, .pipe_fd = fd };

	return devio_run(b, &req);
}

/* Through a window (the layer forwards pipes as it forwards memory). */
static void test_splice_both_ways(void **state)
{
	char path[128];
	struct devio_backend *b;
	struct devio_open_opts o = { .has_offset = true, .offset = 100000, .has_size = true, .size = MiB };
	unsigned char r[4096];
	unsigned char got[8192];
	char saved[sizeof(dir)];
	int p[2], fd;

	/* on tmpfs, where reads run synchronously and splice_read is offered */
	memcpy(saved, dir, sizeof(dir));
	strcpy(dir, "/dev/shm/devio-test-splice-XXXXXX");
	assert_non_null(mkdtemp(dir));
	make_image("splice.img", 2 * MiB, path, sizeof(path));
	assert_int_equal(pipe(p), 0);
	assert_true(fcntl(p[1], F_SETPIPE_SZ, 1 << 20) > 0);
	fcntl(p[0], F_SETFL, O_NONBLOCK);
	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	assert_non_null(b->lower); /* a window over the file */
	assert_true(b->caps & DEVIO_CAP_SPLICE_WRITE);
	/* past the window: refused before the pipe is touched */
	assert_int_equal(splice_req(b, DEVIO_OP_WRITE, p[0], MiB - 10, 300000, 0), -ENOSPC);
	pipe_fill(p[1], 300000, 0xA5);
	assert_int_equal(splice_req(b, DEVIO_OP_WRITE, p[0], MiB - 300000, 300000, DEVIO_REQ_FUA), 0);
	/* a pipe holding less than promised: an error, not a hang */
	pipe_fill(p[1], 100, 0x5A);
	assert_int_equal(splice_req(b, DEVIO_OP_WRITE, p[0], 0, 200, 0), -EIO);
	devio_backend_close(b);
	fd = open(path, O_RDONLY);
	assert_int_equal(pread(fd, r, sizeof(r), 100000 + MiB - sizeof(r)), (ssize_t)sizeof(r));
	for (size_t i = 0; i < sizeof(r); i++)
		assert_int_equal(r[i], 0xA5);
	assert_int_equal(pread(fd, r, 1, 100000 + MiB), 1);
	assert_int_equal(r[0], pattern(100000 + MiB)); /* nothing past the window */
	assert_int_equal(pread(fd, r, 1, 100000 + MiB - 300001), 1);
	assert_int_equal(r[0], pattern(100000 + MiB - 300001));
	close(fd);

	o = (struct devio_open_opts){ .readonly = true };
	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	assert_int_equal(splice_req(b, DEVIO_OP_WRITE, p[0], 0, 4096, 0), -EROFS);
	assert_true(b->caps & DEVIO_CAP_SPLICE_READ);
	assert_int_equal(splice_req(b, DEVIO_OP_READ, p[1], 2 * MiB - 100, 200, 0), -EINVAL);
	assert_int_equal(splice_req(b, DEVIO_OP_READ, p[1], 4096 + 10, sizeof(got), 0), 0);
	assert_int_equal(read(p[0], got, sizeof(got)), (ssize_t)sizeof(got));
	for (size_t i = 0; i < sizeof(got); i++)
		assert_int_equal(got[i], pattern(4096 + 10 + i));
	devio_backend_close(b);
	o = (struct devio_open_opts){ .direct = true };
	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	assert_false(b->caps & DEVIO_CAP_SPLICE_WRITE); /* O_DIRECT wants aligned memory */
	assert_int_equal(splice_req(b, DEVIO_OP_WRITE, p[0], 0, 4096, 0), -EOPNOTSUPP);
	devio_backend_close(b);
	close(p[0]);
	close(p[1]);
	remove_dir(state);
	memcpy(dir, saved, sizeof(dir));
}

static void test_direct_unaligned(void **state)
{
	char path[128];
	struct devio_backend *b;
	struct devio_open_opts o = { .direct = true, .has_offset = true, .offset = 8192 };
	unsigned char *w = malloc(20000), *r = malloc(20000);

	make_image("direct.img", 4 * MiB, path, sizeof(path));
	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	assert_int_equal(b->block_size, 4096);
	assert_int_equal(devio_layer_read(b, r + 1, 5000, 333), 0);
	for (size_t i = 0; i < 5000; i++)
		assert_int_equal(r[1 + i], pattern(8192 + 333 + i));
	for (size_t i = 0; i < 20000; i++)
		w[i] = (unsigned char)(i * 13);
	assert_int_equal(devio_layer_write(b, w + 3, 9999, 4097, 0), 0);
	assert_int_equal(devio_layer_read(b, r, 12000, 4000), 0);
	for (size_t i = 0; i < 97; i++)
		assert_int_equal(r[i], pattern(8192 + 4000 + i));
	assert_memory_equal(r + 97, w + 3, 9999);
	assert_int_equal(r[97 + 9999], pattern(8192 + 4097 + 9999));
	assert_int_equal(devio_layer_zero(b, 10, 100, 0), 0);
	assert_int_equal(devio_layer_read(b, r, 200, 0), 0);
	assert_true(all_zero(r + 10, 100));
	assert_int_equal(r[110], pattern(8192 + 110));
	devio_backend_close(b);
	/* a window start that O_DIRECT cannot address is refused */
	o.offset = 1000;
	assert_int_equal(devio_backend_open(path, &o, &b), -EINVAL);
	free(w);
	free(r);
}

/* O_DIRECT on an image of 1001 2048-byte sectors: the last half block is
 * read, written and zeroed like any other bytes, and the file never grows. */
static void test_direct_odd_size(void **state)
{
	const uint64_t size = 1001 * 2048, tail = size / 4096 * 4096;
	char path[128];
	struct devio_backend *b;
	struct devio_open_opts o = { .direct = true };
	unsigned char *r = malloc(size), w[6000];
	struct stat st;

	make_image("odd.img", size, path, sizeof(path));
	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	assert_int_equal(b->size, size);
	assert_int_equal(devio_layer_read(b, r, size, 0), 0);
	for (uint64_t i = 0; i < size; i += 997)
		assert_int_equal(r[i], pattern(i));
	assert_int_equal(r[size - 1], pattern(size - 1));
	memset(w, 0x5a, sizeof(w));
	assert_int_equal(devio_layer_write(b, w, sizeof(w), size - sizeof(w), DEVIO_REQ_FUA), 0);
	assert_int_equal(devio_layer_zero(b, tail - 10, 20, 0), 0);
	assert_int_equal(devio_layer_read(b, r, 8000, size - 8000), 0);
	for (size_t i = 0; i < 2000; i++)
		assert_int_equal(r[i], pattern(size - 8000 + i));
	for (size_t i = 2000; i < 8000; i++)
		assert_int_equal(r[i], size - 8000 + i - (tail - 10) < 20 ? 0 : 0x5a);
	assert_int_equal(devio_layer_flush(b), 0);
	devio_backend_close(b);
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_size, size);
	free(r);
}

/* ---- the asynchronous path ---- */

#define ASYNC_THREADS 4
#define ASYNC_DEPTH 32
#define ASYNC_BLOCKS 2048 /* 4 KiB blocks: an 8 MiB image */

struct async_ctx {
	struct devio_backend *b;
	unsigned id;
	bool misalign;     /* hand the backend buffers at an odd address */
	_Atomic int pending;
	_Atomic int errors;
	pthread_mutex_t lock;
	pthread_cond_t cond;
};

struct async_io {
	unsigned char buf[4096 + 8] __attribute__((aligned(4096))); /* for O_DIRECT */
	unsigned char *data; /* buf, or buf + 8 */
	struct devio_request req;
	struct async_ctx *ctx;
};

static void async_done(struct devio_request *req)
{
	struct async_io *io = req->opaque;
	struct async_ctx *c = io->ctx;

	if (req->result)
		atomic_fetch_add(&c->errors, 1);
	pthread_mutex_lock(&c->lock);
	if (atomic_fetch_sub(&c->pending, 1) == 1)
		pthread_cond_signal(&c->cond);
	pthread_mutex_unlock(&c->lock);
}

static void async_wait(struct async_ctx *c)
{
	pthread_mutex_lock(&c->lock);
	while (atomic_load(&c->pending))
		pthread_cond_wait(&c->cond, &c->lock);
	pthread_mutex_unlock(&c->lock);
}

static void block_fill(unsigned char *p, uint64_t blk, unsigned round)
{
	for (size_t i = 0; i < 4096; i++)
		p[i] = (unsigned char)(blk * 31 + round * 17 + i);
}

/* Each thread owns the blocks blk % ASYNC_THREADS == id and keeps
 * ASYNC_DEPTH writes (then reads) in flight at once. */
static void *async_thread(void *arg)
{
	struct async_ctx *c = arg;
	struct async_io *ios = NULL;

	if (posix_memalign((void **)&ios, 4096, ASYNC_DEPTH * sizeof(*ios))) {
		atomic_fetch_add(&c->errors, 1);
		return NULL;
	}

	for (int phase = 0; phase < 2; phase++) {
		unsigned slot = 0;

		for (uint64_t blk = c->id; blk < ASYNC_BLOCKS; blk += ASYNC_THREADS) {
			struct async_io *io = &ios[slot++];

			io->ctx = c;
			io->data = io->buf + (c->misalign ? 8 : 0);
			io->req = (struct devio_request){
				.op = phase ? DEVIO_OP_READ : DEVIO_OP_WRITE, .offset = blk * 4096,
				.length = 4096, .buf = io->data, .complete = async_done, .opaque = io,
				.flags = (!phase && blk % 64 == 0) ? DEVIO_REQ_FUA : 0 };
			if (phase == 0)
				block_fill(io->data, blk, 1);
			atomic_fetch_add(&c->pending, 1);
			devio_submit(c->b, &io->req);
			if (slot == ASYNC_DEPTH || blk + ASYNC_THREADS >= ASYNC_BLOCKS) {
				async_wait(c);
				for (unsigned i = 0; phase && i < slot; i++) {
					unsigned char want[4096];

					block_fill(want, ios[i].req.offset / 4096, 1);
					if (memcmp(want, ios[i].data, 4096))
						atomic_fetch_add(&c->errors, 1);
				}
				slot = 0;
			}
		}
	}
	free(ios);
	return NULL;
}

static void async_many_in_flight(bool direct, bool misalign)
{
	char path[128];
	struct devio_open_opts o = { .direct = direct };
	struct devio_backend *b;
	pthread_t t[ASYNC_THREADS];
	struct async_ctx c[ASYNC_THREADS];
	struct devio_request flush = { .op = DEVIO_OP_FLUSH };
	unsigned char r[4096], want[4096];
	char desc[256];

	make_image("async.img", ASYNC_BLOCKS * 4096ull, path, sizeof(path));
	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	assert_non_null(b->ops->submit);
	b->ops->describe(b, desc, sizeof(desc));
	/* this kernel has io_uring; ext4 reads the page cache without a worker */
	assert_non_null(strstr(desc, direct ? "io_uring for all I/O" : "io_uring for reads"));
	for (unsigned i = 0; i < ASYNC_THREADS; i++) {
		c[i] = (struct async_ctx){ .b = b, .id = i, .misalign = misalign };
		pthread_mutex_init(&c[i].lock, NULL);
		pthread_cond_init(&c[i].cond, NULL);
		assert_int_equal(pthread_create(&t[i], NULL, async_thread, &c[i]), 0);
	}
	for (unsigned i = 0; i < ASYNC_THREADS; i++) {
		pthread_join(t[i], NULL);
		assert_int_equal(atomic_load(&c[i].errors), 0);
	}
	assert_int_equal(devio_execute(b, &flush), 0);
	/* the synchronous path sees what the asynchronous one wrote */
	for (uint64_t blk = 0; blk < ASYNC_BLOCKS; blk += 97) {
		assert_int_equal(devio_layer_read(b, r, 4096, blk * 4096), 0);
		block_fill(want, blk, 1);
		assert_memory_equal(r, want, 4096);
	}
	devio_backend_close(b);
}

static void test_async_many_in_flight(void **state)
{
	async_many_in_flight(false, false);
}

/* O_DIRECT: reads and writes all go through the ring. */
static void test_async_direct_many_in_flight(void **state)
{
	async_many_in_flight(true, false);
}

/* O_DIRECT with buffers the device cannot take: bounced, still the ring. */
static void test_async_direct_misaligned_buffers(void **state)
{
	async_many_in_flight(true, true);
}

/* A large read through io_uring and a read crossing the end of a file that
 * shrank under us: an error, not a hang and not garbage. */
static void test_async_large_and_shrunk(void **state)
{
	char path[128];
	struct devio_backend *b;
	unsigned char *r = malloc(6 * MiB);
	struct devio_request req = { .op = DEVIO_OP_READ, .offset = 1000, .length = 6 * MiB, .buf = r };

	make_image("big.img", 8 * MiB, path, sizeof(path));
	assert_int_equal(devio_file_open(path, NULL, &b), 0);
	assert_int_equal(devio_execute(b, &req), 0);
	for (size_t i = 0; i < 6 * MiB; i += 4099)
		assert_int_equal(r[i], pattern(1000 + i));
	assert_int_equal(truncate(path, 4 * MiB), 0);
	assert_int_equal(devio_execute(b, &req), -EIO);
	devio_backend_close(b);
	free(r);
}

static void test_partition_window(void **state)
{
	char path[128];
	struct devio_backend *b;
	struct devio_open_opts o = { .partition = 1 };
	unsigned char mbr[512] = { 0 }, r[16];
	int fd;

	make_image("part.img", 4 * MiB, path, sizeof(path));
	mbr[446 + 4] = 0x83;
	mbr[446 + 8] = 0x00; mbr[446 + 9] = 0x08; /* start LBA 2048 */
	mbr[446 + 12] = 0x00; mbr[446 + 13] = 0x10; /* 4096 sectors */
	mbr[510] = 0x55;
	mbr[511] = 0xAA;
	fd = open(path, O_WRONLY);
	assert_int_equal(pwrite(fd, mbr, 512, 0), 512);
	close(fd);
	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	assert_int_equal(b->size, 2 * MiB);
	assert_int_equal(devio_layer_read(b, r, sizeof(r), 0), 0);
	for (size_t i = 0; i < sizeof(r); i++)
		assert_int_equal(r[i], pattern(MiB + i));
	devio_backend_close(b);
	/* a window inside the partition */
	o.has_offset = true;
	o.offset = 4096;
	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	assert_int_equal(b->size, 2 * MiB - 4096);
	devio_backend_close(b);
	o = (struct devio_open_opts){ .partition = 2 };
	assert_int_equal(devio_backend_open(path, &o, &b), -ENOENT);
}

/* ---- a real block device: a loop device over an image ---- */

static char loopdev[64];

static int loop_setup(void **state)
{
	char path[128], cmd[400];
	FILE *f;

	loopdev[0] = 0;
	if (geteuid() != 0)
		return 0; /* the test skips itself */
	snprintf(path, sizeof(path), "%s/loop.img", dir);
	snprintf(cmd, sizeof(cmd), "truncate -s 16M '%s' && losetup -f --show '%s' 2>/dev/null", path, path);
	f = popen(cmd, "r");
	if (!f)
		return 0;
	if (!fgets(loopdev, sizeof(loopdev), f))
		loopdev[0] = 0;
	pclose(f);
	loopdev[strcspn(loopdev, "\n")] = 0;
	return 0;
}

static int loop_teardown(void **state)
{
	char cmd[128];

	if (loopdev[0]) {
		snprintf(cmd, sizeof(cmd), "losetup -d '%s'", loopdev);
		if (system(cmd))
			return -1;
	}
	return 0;
}

static void test_block_device(void **state)
{
	struct devio_backend *b;
	struct devio_open_opts o = { .has_offset = true, .offset = MiB };
	unsigned char *w = malloc(MiB), *r = malloc(MiB);
	struct ext_list l = { 0 };
	int z;

	if (!loopdev[0]) {
		free(w);
		free(r);
		skip();
	}
	assert_int_equal(devio_backend_open(loopdev, &o, &b), 0);
	assert_int_equal(b->size, 15 * MiB); /* BLKGETSIZE64 minus the window offset */
	assert_true(b->caps & DEVIO_CAP_TRIM);
	for (size_t i = 0; i < MiB; i++)
		w[i] = (unsigned char)(i * 3 + 1);
	assert_int_equal(devio_layer_write(b, w, MiB, 2 * MiB, 0), 0);
	assert_int_equal(devio_layer_flush(b), 0);
	assert_int_equal(devio_layer_read(b, r, MiB, 2 * MiB), 0);
	assert_memory_equal(w, r, MiB);
	/* discard with unaligned edges: the edges are written as zeroes */
	assert_int_equal(devio_layer_trim(b, 2 * MiB + 100, 300000, 0), 0);
	assert_int_equal(devio_layer_read(b, r, MiB, 2 * MiB), 0);
	assert_memory_equal(w, r, 100);
	assert_true(all_zero(r + 100, 300000));
	assert_memory_equal(w + 300100, r + 300100, MiB - 300100);
	/* zero, the ordinary and the fast kind (fast may be refused) */
	assert_int_equal(devio_layer_zero(b, 2 * MiB + 500000, 7000, DEVIO_REQ_NO_HOLE), 0);
	z = devio_layer_zero(b, 2 * MiB + 600000, 65536, DEVIO_REQ_FAST_ZERO);
	assert_true(z == 0 || z == -ENOTSUP);
	assert_int_equal(devio_layer_read(b, r, MiB, 2 * MiB), 0);
	assert_true(all_zero(r + 500000, 7000));
	if (z == 0)
		assert_true(all_zero(r + 600000, 65536));
	else
		assert_memory_equal(w + 600000, r + 600000, 65536);
	assert_int_equal(r[507000], w[507000]);
	/* a block device has no holes to report: one data extent */
	assert_int_equal(devio_extents(b, 0, b->size, collect, &l), 0);
	assert_int_equal(l.n, 1);
	assert_int_equal(l.len[0], b->size);
	devio_backend_close(b);
	free(w);
	free(r);
}

/* tmpfs has holes but no ZERO_RANGE: the fallbacks must still zero, and a
 * fast zero that would need writing is refused. */
static void test_zero_fallbacks_tmpfs(void **state)
{
	char path[] = "/dev/shm/devio-test-zero-XXXXXX";
	int fd = mkstemp(path);
	struct devio_backend *b;
	unsigned char w[65536], r[65536];
	int z;

	assert_true(fd >= 0);
	memset(w, 0x77, sizeof(w));
	for (int i = 0; i < 16; i++)
		assert_int_equal(pwrite(fd, w, sizeof(w), i * (off_t)sizeof(w)), (ssize_t)sizeof(w));
	close(fd);
	assert_int_equal(devio_file_open(path, NULL, &b), 0);
	unlink(path);
	assert_int_equal(devio_layer_zero(b, 65536, 65536, 0), 0);
	z = devio_layer_zero(b, 3 * 65536, 65536, DEVIO_REQ_NO_HOLE | DEVIO_REQ_FAST_ZERO);
	assert_int_equal(devio_layer_read(b, r, sizeof(r), 3 * 65536), 0);
	if (z == 0)
		assert_true(all_zero(r, sizeof(r)));
	else
		assert_int_equal(z, -ENOTSUP);
	assert_int_equal(devio_layer_zero(b, 5 * 65536 + 1, 65535, DEVIO_REQ_NO_HOLE), 0);
	assert_int_equal(devio_layer_read(b, r, sizeof(r), 65536), 0);
	assert_true(all_zero(r, sizeof(r)));
	assert_int_equal(devio_layer_read(b, r, sizeof(r), 5 * 65536), 0);
	assert_int_equal(r[0], 0x77);
	assert_true(all_zero(r + 1, sizeof(r) - 1));
	devio_backend_close(b);
}

/* Every op through the core (devio_execute -> submit), not only the
 * callbacks: TRIM, ZERO, CACHE and unaligned O_DIRECT writes do not go
 * through io_uring and must still complete with the right result. */
static void test_all_ops_through_core(void **state)
{
	char path[128];
	struct devio_backend *b;
	struct devio_open_opts o = { .direct = true };
	unsigned char w[5000], r[5000];
	struct devio_request req;

	make_image("core.img", 4 * MiB, path, sizeof(path));
	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	memset(w, 0x3C, sizeof(w));
	req = (struct devio_request){ .op = DEVIO_OP_WRITE, .offset = 777, .length = sizeof(w), .buf = w,
				      .flags = DEVIO_REQ_FUA };
	assert_int_equal(devio_execute(b, &req), 0);
	req = (struct devio_request){ .op = DEVIO_OP_READ, .offset = 777, .length = sizeof(r), .buf = r };
	assert_int_equal(devio_execute(b, &req), 0);
	assert_memory_equal(w, r, sizeof(w));
	req = (struct devio_request){ .op = DEVIO_OP_TRIM, .offset = MiB, .length = MiB, .flags = DEVIO_REQ_FUA };
	assert_int_equal(devio_execute(b, &req), 0);
	req = (struct devio_request){ .op = DEVIO_OP_ZERO, .offset = 1000, .length = 2000 };
	assert_int_equal(devio_execute(b, &req), 0);
	req = (struct devio_request){ .op = DEVIO_OP_CACHE, .offset = 0, .length = MiB };
	assert_int_equal(devio_execute(b, &req), 0);
	req = (struct devio_request){ .op = DEVIO_OP_FLUSH };
	assert_int_equal(devio_execute(b, &req), 0);
	req = (struct devio_request){ .op = DEVIO_OP_READ, .offset = 777, .length = sizeof(r), .buf = r };
	assert_int_equal(devio_execute(b, &req), 0);
	assert_memory_equal(w, r, 1000 - 777);
	assert_true(all_zero(r + 1000 - 777, 2000));
	assert_memory_equal(w + 3000 - 777, r + 3000 - 777, sizeof(r) - (3000 - 777));
	req = (struct devio_request){ .op = DEVIO_OP_READ, .offset = MiB + 5, .length = 4000, .buf = r };
	assert_int_equal(devio_execute(b, &req), 0);
	assert_true(all_zero(r, 4000));
	/* out of range: refused by the core before the backend */
	req = (struct devio_request){ .op = DEVIO_OP_WRITE, .offset = 4 * MiB - 10, .length = 20, .buf = w };
	assert_int_equal(devio_execute(b, &req), -ENOSPC);
	devio_backend_close(b);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_roundtrip),
		cmocka_unit_test(test_window),
		cmocka_unit_test(test_trim_zero_extents),
		cmocka_unit_test(test_readonly),
		cmocka_unit_test(test_splice_both_ways),
		cmocka_unit_test(test_direct_unaligned),
		cmocka_unit_test(test_direct_odd_size),
		cmocka_unit_test(test_async_many_in_flight),
		cmocka_unit_test(test_async_direct_many_in_flight),
		cmocka_unit_test(test_async_direct_misaligned_buffers),
		cmocka_unit_test(test_async_large_and_shrunk),
		cmocka_unit_test(test_partition_window),
		cmocka_unit_test_setup_teardown(test_block_device, loop_setup, loop_teardown),
		cmocka_unit_test(test_zero_fallbacks_tmpfs),
		cmocka_unit_test(test_all_ops_through_core),
	};

	devio_log_set_level(DEVIO_LOG_ERROR + (getenv("DEVIO_TEST_VERBOSE") ? 3 : 0));
	return cmocka_run_group_tests(tests, make_dir, remove_dir);
}
