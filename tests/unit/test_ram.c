/* test_ram.c - the growable RAM disk: round trips, holes, memory that
 * really goes back to the OS (VmRSS), the resident cap, a 1 TiB disk that
 * opens without touching memory, many threads writing and reading at the
 * same time, reads and writes in place (DEVIO_BUF_MAP), ZERO with
 * NO_HOLE keeping the range provisioned, and FLUSH/FUA/CACHE offered. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "devio/backend.h"
#include "devio/util.h"

#define MiB (1ull << 20)

/* VmRSS of this process in bytes, from /proc/self/status. */
static uint64_t vm_rss(void)
{
	char line[256];
	uint64_t kb = 0;
	FILE *f = fopen("/proc/self/status", "r");

	assert_non_null(f);
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "VmRSS: %lu kB", &kb) == 1)
			break;
	fclose(f);
	return kb * 1024;
}

static void fill(unsigned char *p, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (unsigned char)(seed * 131 + i * 7 + (i >> 9));
}

static bool all_zero(const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (p[i])
			return false;
	return true;
}

static void test_roundtrip_and_zero_reads(void **state)
{
	struct devio_backend *b;
	unsigned char *w = malloc(MiB), *r = malloc(MiB);

	assert_int_equal(devio_ram_open(64 * MiB + 1000, 0, &b), 0);
	assert_int_equal(b->size, 64 * MiB + 1000);
	assert_true(b->caps & DEVIO_CAP_TRIM);
	assert_true(b->caps & DEVIO_CAP_EXTENTS);
	assert_false(b->caps & DEVIO_CAP_READONLY);
	/* never written: zeroes, no memory */
	memset(r, 0xAA, MiB);
	assert_int_equal(b->ops->pread(b, r, MiB, 3 * MiB), 0);
	assert_true(all_zero(r, MiB));
	assert_int_equal(devio_ram_resident(b), 0);
	/* unaligned write across chunk borders, and at the very end */
	fill(w, MiB, 1);
	assert_int_equal(b->ops->pwrite(b, w, MiB - 3, 5 * MiB + 12345, 0), 0);
	assert_int_equal(b->ops->pread(b, r, MiB - 3, 5 * MiB + 12345), 0);
	assert_memory_equal(w, r, MiB - 3);
	assert_int_equal(b->ops->pwrite(b, w, 1000, 64 * MiB, 0), 0);
	assert_int_equal(b->ops->pread(b, r, 1000, 64 * MiB), 0);
	assert_memory_equal(w, r, 1000);
	assert_true(devio_ram_resident(b) >= MiB);
	/* ZERO of a partial range keeps the rest */
	assert_int_equal(b->ops->zero(b, 5 * MiB + 20000, 100, 0), 0);
	assert_int_equal(b->ops->pread(b, r, MiB - 3, 5 * MiB + 12345), 0);
	assert_memory_equal(w, r, 20000 - 12345);
	assert_true(all_zero(r + 20000 - 12345, 100));
	assert_memory_equal(w + 20000 - 12345 + 100, r + 20000 - 12345 + 100, MiB - 3 - (20000 - 12345 + 100));
	/* trimming everything frees everything, the short last chunk too */
	assert_int_equal(b->ops->trim(b, 0, b->size, 0), 0);
	assert_int_equal(devio_ram_resident(b), 0);
	assert_int_equal(b->ops->pread(b, r, 1000, 64 * MiB), 0);
	assert_true(all_zero(r, 1000));
	devio_backend_close(b);
	free(w);
	free(r);
}

static void test_trim_gives_memory_back(void **state)
{
	struct devio_backend *b;
	size_t len = 256 * MiB;
	unsigned char *w = malloc(MiB), *r = malloc(MiB);
	uint64_t rss0, rss1, rss2;

	assert_int_equal(devio_ram_open(len, 0, &b), 0);
	rss0 = vm_rss();
	fill(w, MiB, 2);
	for (uint64_t off = 0; off < len; off += MiB)
		assert_int_equal(b->ops->pwrite(b, w, MiB, off, 0), 0);
	rss1 = vm_rss();
	assert_int_equal(devio_ram_resident(b), len);
	assert_true(rss1 > rss0 + len / 2);
	/* trim all but the first and last 100 bytes: partial chunks stay */
	assert_int_equal(b->ops->trim(b, 100, len - 200, 0), 0);
	rss2 = vm_rss();
	assert_true(rss2 + len / 2 < rss1);
	assert_true(devio_ram_resident(b) <= 2 * 65536);
	assert_int_equal(b->ops->pread(b, r, MiB, 0), 0);
	assert_memory_equal(r, w, 100);
	assert_true(all_zero(r + 100, MiB - 100));
	assert_int_equal(b->ops->pread(b, r, MiB, len - MiB), 0);
	assert_true(all_zero(r, MiB - 100));
	assert_memory_equal(r + MiB - 100, w + MiB - 100, 100);
	devio_backend_close(b);
	free(w);
	free(r);
}

struct ext_list {
	uint64_t off[16], len[16];
	uint32_t flags[16];
	int n;
};

static int collect(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct ext_list *l = ctx;

	if (l->n == 16)
		return 1;
	l->off[l->n] = off;
	l->len[l->n] = len;
	l->flags[l->n] = flags;
	l->n++;
	return 0;
}

static void test_extents(void **state)
{
	struct devio_backend *b;
	struct ext_list l = { 0 };
	char c = 1;

	assert_int_equal(devio_ram_open(MiB, 0, &b), 0);
	assert_int_equal(b->ops->pwrite(b, &c, 1, 200000, 0), 0); /* chunk 3 */
	assert_int_equal(b->ops->extents(b, 1000, MiB - 2000, collect, &l), 0);
	assert_int_equal(l.n, 3);
	assert_int_equal(l.off[0], 1000);
	assert_int_equal(l.len[0], 3 * 65536 - 1000);
	assert_int_equal(l.flags[0], DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO);
	assert_int_equal(l.off[1], 3 * 65536);
	assert_int_equal(l.len[1], 65536);
	assert_int_equal(l.flags[1], 0);
	assert_int_equal(l.off[2], 4 * 65536);
	assert_int_equal(l.off[2] + l.len[2], MiB - 1000);
	assert_int_equal(l.flags[2], DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO);
	devio_backend_close(b);
}

static void test_cap_enospc(void **state)
{
	struct devio_backend *b;
	unsigned char *w = calloc(1, MiB);

	w[0] = 1;
	assert_int_equal(devio_ram_open(64 * MiB, 2 * MiB, &b), 0);
	assert_int_equal(b->ops->pwrite(b, w, MiB, 0, 0), 0);
	assert_int_equal(b->ops->pwrite(b, w, MiB, 10 * MiB, 0), 0);
	assert_int_equal(b->ops->pwrite(b, w, 1, 20 * MiB, 0), -ENOSPC);
	/* rewriting what is held still works; freeing makes room again */
	assert_int_equal(b->ops->pwrite(b, w, MiB, 0, 0), 0);
	assert_int_equal(b->ops->trim(b, 0, MiB, 0), 0);
	assert_int_equal(b->ops->pwrite(b, w, 4096, 20 * MiB, 0), 0);
	assert_true(devio_ram_resident(b) <= 2 * MiB);
	devio_backend_close(b);
	free(w);
}

/* A NO_HOLE zero keeps the range provisioned: allocated, counted against
 * the cap, reading as zeroes, data in extents; a plain zero frees. */
static void test_zero_no_hole(void **state)
{
	struct devio_backend *b;
	struct ext_list l = { 0 };
	unsigned char *w = malloc(2 * MiB), *r = malloc(2 * MiB);

	fill(w, 2 * MiB, 3);
	assert_int_equal(devio_ram_open(64 * MiB, 2 * MiB, &b), 0);
	assert_int_equal(b->ops->pwrite(b, w, 2 * MiB, 0, 0), 0); /* the cap is full */
	assert_int_equal(b->ops->zero(b, 0, MiB, DEVIO_REQ_NO_HOLE), 0);
	assert_int_equal(devio_ram_resident(b), 2 * MiB);
	assert_int_equal(b->ops->pread(b, r, 2 * MiB, 0), 0);
	assert_true(all_zero(r, MiB));
	assert_memory_equal(w + MiB, r + MiB, MiB);
	assert_int_equal(b->ops->extents(b, 0, 2 * MiB, collect, &l), 0);
	assert_int_equal(l.n, 1);
	assert_int_equal(l.len[0], 2 * MiB);
	assert_int_equal(l.flags[0], 0);
	/* the zeroed range takes a write again although the cap is full */
	assert_int_equal(b->ops->pwrite(b, w, MiB, 0, 0), 0);
	assert_int_equal(b->ops->pread(b, r, MiB, 0), 0);
	assert_memory_equal(w, r, MiB);
	/* partial chunks: only the bytes asked for change */
	assert_int_equal(b->ops->zero(b, 1000, 70000, DEVIO_REQ_NO_HOLE), 0);
	assert_int_equal(b->ops->pread(b, r, 80000, 0), 0);
	assert_memory_equal(w, r, 1000);
	assert_true(all_zero(r + 1000, 70000));
	assert_memory_equal(w + 71000, r + 71000, 80000 - 71000);
	assert_int_equal(b->ops->zero(b, 0, 0, DEVIO_REQ_NO_HOLE), 0); /* nothing to do */
	/* no room for never-written chunks: -ENOSPC, nothing allocated */
	assert_int_equal(b->ops->zero(b, 10 * MiB + 5, 100, DEVIO_REQ_NO_HOLE), -ENOSPC);
	assert_int_equal(b->ops->zero(b, 10 * MiB, MiB, DEVIO_REQ_NO_HOLE | DEVIO_REQ_FAST_ZERO), -ENOSPC);
	assert_int_equal(devio_ram_resident(b), 2 * MiB);
	/* a plain zero frees whole chunks; NO_HOLE then allocates zeroes */
	assert_int_equal(b->ops->zero(b, MiB, MiB, 0), 0);
	assert_int_equal(devio_ram_resident(b), MiB);
	assert_int_equal(b->ops->zero(b, 10 * MiB + 5, MiB - 10, DEVIO_REQ_NO_HOLE), 0);
	assert_int_equal(devio_ram_resident(b), 2 * MiB);
	memset(r, 0xAA, MiB);
	assert_int_equal(b->ops->pread(b, r, MiB, 10 * MiB), 0);
	assert_true(all_zero(r, MiB));
	l.n = 0;
	assert_int_equal(b->ops->extents(b, 10 * MiB, MiB, collect, &l), 0);
	assert_int_equal(l.n, 1);
	assert_int_equal(l.flags[0], 0);
	assert_int_equal(b->ops->pwrite(b, w, MiB, 10 * MiB, 0), 0);
	assert_int_equal(b->ops->pwrite(b, w, 1, 20 * MiB, 0), -ENOSPC);
	devio_backend_close(b);
	free(w);
	free(r);
}

/* FLUSH, FUA and CACHE are offered (all free in memory) and work through
 * the core. */
static void test_flush_fua_cache(void **state)
{
	struct devio_backend *b;
	char w[5000], r[5000];
	struct devio_request req = { .op = DEVIO_OP_WRITE, .flags = DEVIO_REQ_FUA, .offset = 65000,
				     .length = sizeof(w), .buf = w };

	memset(w, 0x5A, sizeof(w));
	assert_int_equal(devio_ram_open(MiB, 0, &b), 0);
	assert_true(b->caps & DEVIO_CAP_FLUSH);
	assert_true(b->caps & DEVIO_CAP_FUA);
	assert_true(b->caps & DEVIO_CAP_CACHE);
	assert_true(b->caps & DEVIO_CAP_MULTI_CONN);
	assert_int_equal(devio_execute(b, &req), 0);
	assert_int_equal(b->ops->pread(b, r, sizeof(r), 65000), 0);
	assert_memory_equal(w, r, sizeof(w));
	req = (struct devio_request){ .op = DEVIO_OP_FLUSH };
	assert_int_equal(devio_execute(b, &req), 0);
	req = (struct devio_request){ .op = DEVIO_OP_CACHE, .offset = 0, .length = MiB };
	assert_int_equal(devio_execute(b, &req), 0);
	req = (struct devio_request){ .op = DEVIO_OP_ZERO, .flags = DEVIO_REQ_FUA | DEVIO_REQ_NO_HOLE,
				      .offset = 65000, .length = 100 };
	assert_int_equal(devio_execute(b, &req), 0);
	assert_int_equal(b->ops->pread(b, r, 100, 65000), 0);
	assert_true(all_zero((unsigned char *)r, 100));
	devio_backend_close(b);
}

static void test_one_tebibyte_instantly(void **state)
{
	struct devio_backend *b;
	uint64_t rss0 = vm_rss();
	char buf[4096] = "end of the disk";
	char back[4096];

	assert_int_equal(devio_ram_open(1ull << 40, 0, &b), 0);
	assert_int_equal(b->size, 1ull << 40);
	assert_int_equal(b->ops->pwrite(b, buf, sizeof(buf), (1ull << 40) - 4096, 0), 0);
	assert_int_equal(b->ops->pread(b, back, sizeof(back), (1ull << 40) - 4096), 0);
	assert_memory_equal(buf, back, sizeof(buf));
	/* instant because nothing proportional to the size is touched: the
	 * process grew by far less than even the chunk table's address space.
	 * (Not measurable under glibc's MALLOC_PERTURB_, which meson sets in
	 * builds without ASan: calloc then memsets the whole table.) */
	if (!getenv("MALLOC_PERTURB_") || !atoi(getenv("MALLOC_PERTURB_")))
		assert_true(vm_rss() < rss0 + 32 * MiB);
	devio_backend_close(b);
}

#define THREADS 4
#define PER_THREAD (8 * MiB)

struct worker {
	struct devio_backend *b;
	unsigned id;
	int errors;
};

/* Each thread owns interleaved 4 KiB blocks; writes, trims, reads back. */
static void *hammer(void *arg)
{
	struct worker *w = arg;
	unsigned char buf[4096], back[4096];

	for (int round = 0; round < 3; round++) {
		for (uint64_t blk = w->id; blk < THREADS * PER_THREAD / 4096; blk += THREADS) {
			fill(buf, sizeof(buf), (unsigned)(blk * 3 + round));
			if (w->b->ops->pwrite(w->b, buf, sizeof(buf), blk * 4096, 0))
				w->errors++;
		}
		for (uint64_t blk = w->id; blk < THREADS * PER_THREAD / 4096; blk += THREADS) {
			fill(buf, sizeof(buf), (unsigned)(blk * 3 + round));
			if (w->b->ops->pread(w->b, back, sizeof(back), blk * 4096) || memcmp(buf, back, 4096))
				w->errors++;
		}
	}
	return NULL;
}

static void test_concurrent(void **state)
{
	struct devio_backend *b;
	pthread_t t[THREADS];
	struct worker w[THREADS];

	assert_int_equal(devio_ram_open(THREADS * PER_THREAD, 0, &b), 0);
	for (unsigned i = 0; i < THREADS; i++) {
		w[i] = (struct worker){ b, i, 0 };
		assert_int_equal(pthread_create(&t[i], NULL, hammer, &w[i]), 0);
	}
	for (unsigned i = 0; i < THREADS; i++) {
		pthread_join(t[i], NULL);
		assert_int_equal(w[i].errors, 0);
	}
	assert_int_equal(devio_ram_resident(b), THREADS * PER_THREAD);
	assert_int_equal(b->ops->trim(b, 0, b->size, 0), 0);
	assert_int_equal(devio_ram_resident(b), 0);
	devio_backend_close(b);
}

static void test_open_through_source(void **state)
{
	struct devio_backend *b;
	struct devio_open_opts o = { .readonly = true };

	assert_int_equal(devio_backend_open("ram:16M", &o, &b), 0);
	assert_int_equal(b->size, 16 * MiB);
	assert_true(b->caps & DEVIO_CAP_READONLY);
	devio_backend_close(b);
	assert_int_equal(devio_ram_open(0, 0, &b), -EINVAL);
}

/* Writers and trimmers racing on the same chunks: whatever interleaving,
 * the accounting must come back to exactly 0 and to exactly the size. */
struct racer {
	struct devio_backend *b;
	unsigned id;
	int errors;
};

static void *race(void *arg)
{
	struct racer *r = arg;
	unsigned char buf[8192];
	uint64_t rng = r->id * 0x9E3779B97F4A7C15ull + 1;

	memset(buf, (int)(r->id + 1), sizeof(buf));
	for (int i = 0; i < 20000; i++) {
		uint64_t off;

		rng ^= rng << 13;
		rng ^= rng >> 7;
		rng ^= rng << 17;
		off = (rng >> 16) % (4 * MiB - sizeof(buf));
		if (r->id % 2 == 0) {
			if (r->b->ops->pwrite(r->b, buf, sizeof(buf), off, 0))
				r->errors++;
		} else {
			uint64_t start = off & ~65535ull, len = 65536 * (1 + (rng & 3));

			if (len > 4 * MiB - start)
				len = 4 * MiB - start;
			/* thread 3 zeroes keeping the chunks (NO_HOLE) */
			if (r->id == 3 ? r->b->ops->zero(r->b, start, len, DEVIO_REQ_NO_HOLE)
				       : r->b->ops->trim(r->b, start, len, 0))
				r->errors++;
		}
	}
	return NULL;
}

static void test_write_trim_race(void **state)
{
	struct devio_backend *b;
	pthread_t t[4];
	struct racer r[4];
	unsigned char *buf = malloc(4 * MiB);

	assert_int_equal(devio_ram_open(4 * MiB, 0, &b), 0);
	for (unsigned i = 0; i < 4; i++) {
		r[i] = (struct racer){ b, i, 0 };
		assert_int_equal(pthread_create(&t[i], NULL, race, &r[i]), 0);
	}
	for (unsigned i = 0; i < 4; i++) {
		pthread_join(t[i], NULL);
		assert_int_equal(r[i].errors, 0);
	}
	assert_true(devio_ram_resident(b) <= 4 * MiB);
	assert_int_equal(b->ops->trim(b, 0, 4 * MiB, 0), 0);
	assert_int_equal(devio_ram_resident(b), 0);
	assert_int_equal(b->ops->pread(b, buf, 4 * MiB, 0), 0);
	assert_true(all_zero(buf, 4 * MiB));
	memset(buf, 9, 4 * MiB);
	assert_int_equal(b->ops->pwrite(b, buf, 4 * MiB, 0, 0), 0);
	assert_int_equal(devio_ram_resident(b), 4 * MiB);
	devio_backend_close(b);
	free(buf);
}

/* A READ in place (DEVIO_BUF_MAP) through the core: the number of pieces
 * or a negative errno. */
static int map_read(struct devio_backend *b, uint64_t off, uint64_t len, struct iovec *v, int max)
{
	struct devio_request req = { .op = DEVIO_OP_READ, .offset = off, .length = len, .kind = DEVIO_BUF_MAP,
				     .iov = v, .iovcnt = max };
	int r = devio_run(b, &req);

	return r ? r : req.iovcnt;
}

/* A WRITE in place, opened: req is kept for devio_map_end(). */
static int map_write(struct devio_backend *b, struct devio_request *req, uint64_t off, uint64_t len,
		     struct iovec *v, int max)
{
	*req = (struct devio_request){ .op = DEVIO_OP_WRITE, .offset = off, .length = len, .kind = DEVIO_BUF_MAP,
				       .iov = v, .iovcnt = max };
	return devio_run(b, req) ? req->result : req->iovcnt;
}

/* Reads and writes in place (what the NBD front end sends from and
 * receives into): pieces that follow the written chunks, range checks, the
 * cap, and a mapped range that holds a whole-chunk TRIM only until unmap. */
static void test_map_in_place(void **state)
{
	struct devio_backend *b;
	struct devio_request req;
	struct iovec v[4];
	unsigned char w[100];

	memset(w, 0x5a, sizeof(w));
	assert_int_equal(devio_ram_open(MiB, 128 * 1024, &b), 0);
	assert_int_equal(b->ops->pwrite(b, w, sizeof(w), 65536 + 10, 0), 0);
	/* chunk 0 hole, chunk 1 data, chunks 2-3 hole */
	assert_int_equal(map_read(b, 100, 3 * 65536, v, 4), 3);
	assert_null(v[0].iov_base);
	assert_int_equal(v[0].iov_len, 65536 - 100);
	assert_non_null(v[1].iov_base);
	assert_int_equal(v[1].iov_len, 65536);
	assert_memory_equal((unsigned char *)v[1].iov_base + 10, w, sizeof(w));
	assert_null(v[2].iov_base);
	assert_int_equal(v[2].iov_len, 65536 + 100); /* chunks 2 and 3 merge */
	assert_int_equal(map_read(b, 100, 3 * 65536, v, 2), -E2BIG);
	assert_int_equal(map_read(b, MiB - 10, 11, v, 4), -EINVAL);
	assert_int_equal(map_read(b, UINT64_MAX, 2, v, 4), -EINVAL);
	assert_int_equal(map_read(b, MiB, 0, v, 4), 0);

	/* write in place across two chunks: both count, the data lands */
	assert_int_equal(map_write(b, &req, 65536 - 4, 8, v, 4), 1);
	memset(v[0].iov_base, 0x77, 8);
	assert_int_equal(devio_map_end(&req), 0);
	assert_int_equal(devio_ram_resident(b), 2 * 65536);
	assert_int_equal(b->ops->pread(b, w, 8, 65536 - 4), 0);
	assert_memory_equal(w, "\x77\x77\x77\x77\x77\x77\x77\x77", 8);
	/* the cap: a third chunk does not fit, and nothing stays entered */
	assert_int_equal(map_write(b, &req, 65536, 2 * 65536, v, 4), -ENOSPC);
	assert_int_equal(map_write(b, &req, MiB - 1, 2, v, 4), -ENOSPC);
	assert_int_equal(b->ops->trim(b, 0, 2 * 65536, 0), 0);
	assert_int_equal(devio_ram_resident(b), 0);
	devio_backend_close(b);

	assert_int_equal(devio_ram_open(MiB, 0, &b), 0);
	b->caps |= DEVIO_CAP_READONLY;
	assert_int_equal(map_write(b, &req, 0, 1, v, 4), -EROFS);
	assert_int_equal(map_write(b, &req, 0, 1, v, 0), -EROFS); /* read-only is told first */
	b->caps &= ~DEVIO_CAP_READONLY;
	assert_int_equal(map_write(b, &req, 0, 1, v, 0), -EFAULT); /* no room for a piece */
	req = (struct devio_request){ .op = DEVIO_OP_TRIM, .length = 1, .kind = DEVIO_BUF_MAP, .iov = v, .iovcnt = 4 };
	assert_int_equal(devio_run(b, &req), -EINVAL); /* only READ and WRITE have bytes */
	req = (struct devio_request){ .op = DEVIO_OP_READ, .length = 1, .kind = DEVIO_BUF_PIPE, .pipe_fd = -1 };
	assert_int_equal(devio_run(b, &req), -EOPNOTSUPP); /* no pipes here */
	devio_backend_close(b);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_roundtrip_and_zero_reads),
		cmocka_unit_test(test_trim_gives_memory_back),
		cmocka_unit_test(test_extents),
		cmocka_unit_test(test_cap_enospc),
		cmocka_unit_test(test_zero_no_hole),
		cmocka_unit_test(test_flush_fua_cache),
		cmocka_unit_test(test_one_tebibyte_instantly),
		cmocka_unit_test(test_concurrent),
		cmocka_unit_test(test_write_trim_race),
		cmocka_unit_test(test_map_in_place),
		cmocka_unit_test(test_open_through_source),
	};

	devio_log_set_level(DEVIO_LOG_WARN);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
