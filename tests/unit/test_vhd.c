/* test_vhd.c - the VHD layer over a store in memory that grows as a file
 * does (its length is what was written, its limit what grow allowed) and
 * records every write and flush: the order of a block's allocation
 * (footer at the new end, bitmap and data, flush, BAT entry) and of a
 * partial bitmap's update (data, flush, bitmap), an image
 * that opens after a failure at each step, all-zero writes that allocate
 * nothing, TRIM freeing whole blocks, a store that cannot grow, many
 * threads allocating at once, and a few hostile header fields. */
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
#include "devio/layer.h"
#include "devio/util.h"

#define CAP (8u << 20)
#define BS 4096u            /* block size of the test images */
#define NBLK 16u
#define VSIZE (NBLK * BS)
#define FOOT_AT_START 0
#define HDR_AT 512u
#define BAT_AT 1536u
#define DATA_AT 2048u       /* the first block: after one sector of BAT */

enum { OP_WRITE, OP_FLUSH };

struct op {
	int kind;
	uint64_t off, len;
};

struct mem {
	struct devio_backend b;
	pthread_mutex_t lock;
	uint8_t *p;
	uint64_t len;           /* bytes written so far: the file's length */
	int fail_at;            /* fail the Nth write/flush from now (1-based), 0 never */
	bool fail_reads;        /* every read fails (a device with bad sectors) */
	int n_ops;
	struct op ops[64];
};

static struct mem *to_mem(struct devio_backend *b) { return b->priv; }

static int mem_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	struct mem *m = to_mem(b);

	if (off + len > m->len || m->fail_reads)
		return -EIO; /* past the end of the "file", or a bad sector */
	memcpy(buf, m->p + off, len);
	return 0;
}

/* Record an op; true if it is the one to fail. */
static bool mem_record(struct mem *m, int kind, uint64_t off, uint64_t len)
{
	bool fail;

	pthread_mutex_lock(&m->lock);
	if (m->n_ops < 64)
		m->ops[m->n_ops++] = (struct op){ kind, off, len };
	fail = m->fail_at && --m->fail_at == 0;
	pthread_mutex_unlock(&m->lock);
	return fail;
}

static int mem_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	struct mem *m = to_mem(b);

	if (mem_record(m, OP_WRITE, off, len))
		return -EIO;
	memcpy(m->p + off, buf, len);
	pthread_mutex_lock(&m->lock);
	if (off + len > m->len)
		m->len = off + len;
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static int mem_flush(struct devio_backend *b)
{
	return mem_record(to_mem(b), OP_FLUSH, 0, 0) ? -EIO : 0;
}

static int mem_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	memset(to_mem(b)->p + off, 0, len);
	return 0;
}

static int mem_grow(struct devio_backend *b, uint64_t size)
{
	if (size > CAP)
		return -ENOSPC;
	__atomic_store_n(&b->size, size, __ATOMIC_RELEASE);
	return 0;
}

static const struct devio_backend_ops mem_ops = {
	.name = "mem", .pread = mem_pread, .pwrite = mem_pwrite, .flush = mem_flush, .trim = mem_trim,
	.grow = mem_grow,
};
static const struct devio_backend_ops mem_fixed_ops = {
	.name = "mem", .pread = mem_pread, .pwrite = mem_pwrite, .flush = mem_flush, .trim = mem_trim,
};

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (24 - 8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
	put32(p, (uint32_t)(v >> 32));
	put32(p + 4, (uint32_t)v);
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void sum_into(uint8_t *p, size_t len, size_t field)
{
	uint32_t s = 0;

	put32(p + field, 0);
	for (size_t i = 0; i < len; i++)
		s += p[i];
	put32(p + field, ~s);
}

/* An empty dynamic image (NBLK blocks of BS bytes) in a new store. */
static struct mem *mem_image(bool can_grow)
{
	struct mem *m = calloc(1, sizeof(*m));
	uint8_t *f, *h;

	assert_non_null(m);
	m->p = calloc(1, CAP);
	assert_non_null(m->p);
	pthread_mutex_init(&m->lock, NULL);
	f = m->p;
	memcpy(f, "conectix", 8);
	put32(f + 8, 2);
	put32(f + 12, 0x10000);
	put64(f + 16, HDR_AT);
	put64(f + 40, VSIZE);
	put64(f + 48, VSIZE);
	put32(f + 60, 3);
	memset(f + 68, 0x5a, 16);
	sum_into(f, 512, 64);
	h = m->p + HDR_AT;
	memcpy(h, "cxsparse", 8);
	put64(h + 8, UINT64_MAX);
	put64(h + 16, BAT_AT);
	put32(h + 24, 0x10000);
	put32(h + 28, NBLK);
	put32(h + 32, BS);
	sum_into(h, 1024, 36);
	memset(m->p + BAT_AT, 0xff, 512);
	memcpy(m->p + DATA_AT, f, 512);
	m->len = DATA_AT + 512;
	m->b.ops = can_grow ? &mem_ops : &mem_fixed_ops;
	m->b.size = m->len;
	m->b.block_size = 1;
	m->b.caps = DEVIO_CAP_FLUSH | DEVIO_CAP_TRIM;
	m->b.priv = m;
	return m;
}

static struct devio_backend *vhd_over(struct mem *m)
{
	struct devio_backend *v = NULL;

	m->b.size = m->len; /* reopened: the store is as long as what was written */
	assert_int_equal(devio_format_open("mem.vhd", &m->b, "auto", NULL, &v), 0);
	assert_ptr_not_equal(v, &m->b);
	assert_int_equal(v->size, VSIZE);
	return v;
}

static void vhd_done(struct devio_backend *v)
{
	v->lower = NULL; /* the store is the test's */
	devio_backend_close(v);
}

static void mem_free(struct mem *m)
{
	pthread_mutex_destroy(&m->lock);
	free(m->p);
	free(m);
}

static uint32_t bat_entry(struct mem *m, unsigned blk)
{
	return get32(m->p + BAT_AT + 4 * blk);
}

static void test_allocation_order(void **state)
{
	struct mem *m = mem_image(true);
	struct devio_backend *v = vhd_over(m);
	uint8_t buf[1000], back[1000];
	uint64_t end = DATA_AT + 512 + BS;  /* the new block, then the footer */

	memset(buf, 0x77, sizeof(buf));
	m->n_ops = 0;
	assert_int_equal(devio_layer_write(v, buf, sizeof(buf), 3 * BS + 100, 0), 0);
	assert_int_equal(m->n_ops, 5);
	assert_true(m->ops[0].kind == OP_WRITE && m->ops[0].off == end && m->ops[0].len == 512);      /* footer */
	assert_true(m->ops[1].kind == OP_WRITE && m->ops[1].off == DATA_AT && m->ops[1].len == 512);  /* bitmap */
	assert_true(m->ops[2].kind == OP_WRITE && m->ops[2].off == DATA_AT + 512 + 100);             /* data */
	assert_true(m->ops[3].kind == OP_FLUSH);                                                     /* barrier */
	assert_true(m->ops[4].kind == OP_WRITE && m->ops[4].off == BAT_AT + 12 && m->ops[4].len == 4); /* BAT */
	assert_int_equal(m->len, end + 512);
	assert_memory_equal(m->p + end, m->p, 512); /* the footer: the same bytes as the copy at 0 */
	assert_int_equal(bat_entry(m, 3), DATA_AT / 512);
	assert_int_equal(m->p[DATA_AT], 0xff);
	/* the same block again: straight to its data */
	m->n_ops = 0;
	assert_int_equal(devio_layer_write(v, buf, 10, 3 * BS, 0), 0);
	assert_int_equal(m->n_ops, 1);
	vhd_done(v);
	v = vhd_over(m);
	assert_int_equal(devio_layer_read(v, back, sizeof(back), 3 * BS + 100), 0);
	assert_memory_equal(back, buf, sizeof(buf));
	vhd_done(v);
	mem_free(m);
}

/* A block another tool wrote with a partial bitmap (sector 0 only): a
 * write to another sector lands, is flushed, then its bit is set; the
 * sectors never written read as zeroes whatever the file holds there. */
static void test_partial_bitmap_order(void **state)
{
	struct mem *m = mem_image(true);
	struct devio_backend *v;
	uint8_t buf[600], back[1536];

	put32(m->p + BAT_AT + 4, DATA_AT / 512);  /* block 1 at the old footer's place */
	memset(m->p + DATA_AT, 0, 512);
	m->p[DATA_AT] = 0x80;                      /* sector 0 present */
	memset(m->p + DATA_AT + 512, 0xEE, BS);    /* stale bytes everywhere */
	memcpy(m->p + DATA_AT + 512 + BS, m->p, 512);
	m->len = DATA_AT + 512 + BS + 512;
	v = vhd_over(m);
	assert_int_equal(devio_layer_read(v, back, 1024, BS), 0);
	assert_int_equal(back[0], 0xEE);
	assert_int_equal(back[512], 0);            /* not present: zero, not the stale 0xEE */
	memset(buf, 0x19, sizeof(buf));
	m->n_ops = 0;
	assert_int_equal(devio_layer_write(v, buf, sizeof(buf), BS + 700, 0), 0);  /* sectors 1-2, partial */
	assert_true(m->n_ops >= 3);
	assert_true(m->ops[m->n_ops - 2].kind == OP_FLUSH);
	assert_true(m->ops[m->n_ops - 1].kind == OP_WRITE && m->ops[m->n_ops - 1].off == DATA_AT);
	for (int i = 0; i < m->n_ops - 2; i++)
		assert_true(m->ops[i].kind == OP_WRITE && m->ops[i].off >= DATA_AT + 512);
	assert_int_equal(m->p[DATA_AT], 0xE0);     /* sectors 0, 1, 2 */
	vhd_done(v);
	v = vhd_over(m);
	assert_int_equal(devio_layer_read(v, back, 1024 + 512, BS), 0);
	assert_int_equal(back[511], 0xEE);
	assert_int_equal(back[512], 0);            /* the rest of sector 1 from below: zeroes */
	assert_int_equal(back[699], 0);
	assert_int_equal(back[700], 0x19);
	assert_int_equal(back[1299], 0x19);
	assert_int_equal(back[1300], 0);           /* the rest of sector 2 */
	vhd_done(v);
	mem_free(m);
}

/* A failure at step k of an allocation: the image still opens, the BAT
 * does not point at the block, the next allocation works. */
static void test_failure_at_each_step(void **state)
{
	for (int k = 1; k <= 5; k++) {
		struct mem *m = mem_image(true);
		struct devio_backend *v = vhd_over(m);
		uint8_t buf[512], back[512], zero[512] = { 0 };

		struct devio_backend *crashed;
		uint64_t grown;

		memset(buf, 0x31, sizeof(buf));
		m->fail_at = k;
		assert_int_equal(devio_layer_write(v, buf, sizeof(buf), 5 * BS, 0), -EIO);
		m->fail_at = 0;
		assert_int_equal(bat_entry(m, 5), 0xFFFFFFFFu);
		grown = m->b.size;
		crashed = vhd_over(m); /* the image as a crash now would leave it */
		assert_int_equal(devio_layer_read(crashed, back, sizeof(back), 5 * BS), 0);
		assert_memory_equal(back, zero, sizeof(back));
		vhd_done(crashed);
		m->b.size = grown;
		assert_int_equal(devio_layer_write(v, buf, sizeof(buf), 5 * BS, 0), 0); /* the same session goes on */
		vhd_done(v);
		v = vhd_over(m);
		assert_int_equal(devio_layer_read(v, back, sizeof(back), 5 * BS), 0);
		assert_memory_equal(back, buf, sizeof(back));
		assert_memory_equal(m->p + m->len - 512, m->p, 512);
		vhd_done(v);
		mem_free(m);
	}
}

static void test_zeroes_and_trim(void **state)
{
	struct mem *m = mem_image(true);
	struct devio_backend *v = vhd_over(m);
	uint8_t zero[BS] = { 0 }, buf[BS], back[BS];
	uint64_t len = m->len;

	assert_int_equal(devio_layer_write(v, zero, BS, 0, 0), 0);
	assert_int_equal(devio_layer_zero(v, BS, 2 * BS, 0), 0);
	assert_int_equal(m->len, len); /* nothing allocated */
	memset(buf, 0x42, sizeof(buf));
	assert_int_equal(devio_layer_write(v, buf, BS, 2 * BS, 0), 0);
	assert_int_equal(devio_layer_write(v, buf, BS, 4 * BS, 0), 0);
	assert_int_not_equal(bat_entry(m, 2), 0xFFFFFFFFu);
	/* a whole block is freed; half of one is zeroed */
	assert_int_equal(devio_layer_trim(v, 2 * BS, BS, 0), 0);
	assert_int_equal(devio_layer_trim(v, 4 * BS, BS / 2, 0), 0);
	assert_int_equal(bat_entry(m, 2), 0xFFFFFFFFu);
	assert_int_not_equal(bat_entry(m, 4), 0xFFFFFFFFu);
	assert_int_equal(devio_layer_read(v, back, BS, 2 * BS), 0);
	assert_memory_equal(back, zero, BS);
	assert_int_equal(devio_layer_read(v, back, BS, 4 * BS), 0);
	assert_memory_equal(back, zero, BS / 2);
	assert_memory_equal(back + BS / 2, buf, BS / 2);
	/* NO_HOLE keeps the block */
	assert_int_equal(devio_layer_zero(v, 4 * BS, BS, DEVIO_REQ_NO_HOLE), 0);
	assert_int_not_equal(bat_entry(m, 4), 0xFFFFFFFFu);
	vhd_done(v);
	mem_free(m);
}

static int count_holes(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	uint64_t *holes = ctx;

	if (flags & DEVIO_EXTENT_HOLE)
		*holes += len;
	return 0;
}

static void test_extents_and_no_grow(void **state)
{
	struct mem *m = mem_image(false);
	struct devio_backend *v = vhd_over(m);
	uint8_t buf[512];
	uint64_t holes = 0;

	memset(buf, 1, sizeof(buf));
	assert_int_equal(devio_layer_write(v, buf, sizeof(buf), 0, 0), -ENOSPC);
	assert_int_equal(devio_extents(v, 0, VSIZE, count_holes, &holes), 0);
	assert_int_equal(holes, VSIZE);
	vhd_done(v);
	m->b.ops = &mem_ops;
	v = vhd_over(m);
	assert_int_equal(devio_layer_write(v, buf, sizeof(buf), BS, 0), 0);
	holes = 0;
	assert_int_equal(devio_extents(v, 0, VSIZE, count_holes, &holes), 0);
	assert_int_equal(holes, VSIZE - BS);
	vhd_done(v);
	mem_free(m);
}

struct writer {
	struct devio_backend *v;
	unsigned id;
};

/* Thread id writes sector id of every block, in its own order. */
static void *writer_main(void *arg)
{
	struct writer *w = arg;
	uint8_t buf[512];

	memset(buf, (int)(w->id + 1), sizeof(buf));
	for (unsigned i = 0; i < NBLK; i++) {
		unsigned blk = (i * 7 + w->id) % NBLK;

		if (devio_layer_write(w->v, buf, sizeof(buf), (uint64_t)blk * BS + w->id * 512, 0))
			return (void *)1;
	}
	return NULL;
}

static void test_threads_allocate_at_once(void **state)
{
	struct mem *m = mem_image(true);
	struct devio_backend *v = vhd_over(m);
	struct writer w[8];
	pthread_t t[8];
	uint8_t back[512];

	for (unsigned i = 0; i < 8; i++) {
		w[i] = (struct writer){ v, i };
		assert_int_equal(pthread_create(&t[i], NULL, writer_main, &w[i]), 0);
	}
	for (unsigned i = 0; i < 8; i++) {
		void *res;

		pthread_join(t[i], &res);
		assert_null(res);
	}
	vhd_done(v);
	v = vhd_over(m);
	assert_int_equal(m->len, DATA_AT + NBLK * (512 + BS) + 512);
	for (unsigned blk = 0; blk < NBLK; blk++)
		for (unsigned i = 0; i < 8; i++) {
			assert_int_equal(devio_layer_read(v, back, 512, (uint64_t)blk * BS + i * 512), 0);
			assert_int_equal(back[0], i + 1);
			assert_int_equal(back[511], i + 1);
		}
	vhd_done(v);
	mem_free(m);
}

/* Hostile fields: refused at open, never a crash or a big allocation. */
static void test_hostile_fields(void **state)
{
	static const struct { uint32_t at, field_len; uint64_t val; bool header; } cases[] = {
		{ 32, 4, 3000, true },           /* block size not a power of two */
		{ 32, 4, 1u << 29, true },       /* block size absurd */
		{ 28, 4, 1u << 25, true },       /* BAT entries past the bound */
		{ 28, 4, 2, true },              /* fewer entries than the disk needs */
		{ 16, 8, 1ull << 62, true },     /* BAT far outside the file */
		{ 16, 8, 1ull << 62, false },    /* header far outside the file */
		{ 48, 8, UINT64_MAX, false },    /* a current size no table covers */
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct mem *m = mem_image(true);
		struct devio_backend *v = NULL;
		uint8_t *p = cases[i].header ? m->p + HDR_AT : m->p;

		if (cases[i].field_len == 4)
			put32(p + cases[i].at, (uint32_t)cases[i].val);
		else
			put64(p + cases[i].at, cases[i].val);
		if (cases[i].header)
			sum_into(p, 1024, 36);
		else
			sum_into(p, 512, 64);
		memcpy(m->p + DATA_AT, m->p, 512);
		assert_int_equal(devio_format_open("mem.vhd", &m->b, "auto", NULL, &v), -EINVAL);
		mem_free(m);
	}
	/* a BAT entry pointing into the header */
	{
		struct mem *m = mem_image(true);
		struct devio_backend *v = NULL;

		put32(m->p + BAT_AT, HDR_AT / 512);
		assert_int_equal(devio_format_open("mem.vhd", &m->b, "auto", NULL, &v), -EINVAL);
		/* raw still serves the container */
		assert_int_equal(devio_format_open("mem.vhd", &m->b, "raw", NULL, &v), 0);
		assert_ptr_equal(v, &m->b);
		mem_free(m);
	}
}

/* Detection that cannot read the footer's place serves the bytes raw
 * (a device with a bad last sector is still a device); naming the format
 * makes it an error. */
static void test_unreadable_footer_place(void **state)
{
	struct mem *m = mem_image(true);
	struct devio_backend *v = NULL;

	m->fail_reads = true;
	assert_int_equal(devio_format_open("mem.vhd", &m->b, "auto", NULL, &v), 0);
	assert_ptr_equal(v, &m->b);
	assert_int_equal(devio_format_open("mem.vhd", &m->b, "vhd", NULL, &v), -EIO);
	mem_free(m);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_allocation_order),
		cmocka_unit_test(test_failure_at_each_step),
		cmocka_unit_test(test_partial_bitmap_order),
		cmocka_unit_test(test_zeroes_and_trim),
		cmocka_unit_test(test_extents_and_no_grow),
		cmocka_unit_test(test_threads_allocate_at_once),
		cmocka_unit_test(test_hostile_fields),
		cmocka_unit_test(test_unreadable_footer_place),
	};

	devio_log_set_level(DEVIO_LOG_ERROR);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
