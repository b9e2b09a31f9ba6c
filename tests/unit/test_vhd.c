/* test_vhd.c - the VHD layer over a store in memory that grows as a file
 * does (its length is what was written, its limit what grow allowed) and
 * records every write and flush: the order of a block's allocation
 * (footer at the new end, bitmap and data, flush, BAT entry) and of a
 * partial bitmap's update (data, flush, bitmap), an image
 * that opens after a failure at each step, all-zero writes that allocate
 * nothing, TRIM freeing whole blocks, a store that cannot grow, many
 * threads allocating at once, a few hostile header fields, and which
 * requests go straight to the file (try_remap).  New
 * images (devio_vhd_create, devio_format_create): the geometry against
 * the specification's algorithm worked by hand, the footer, header and BAT
 * written read back field by field and by the layer's own parser, and
 * refusals that leave no file behind. */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
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

/* ---- creating images ---- */

/* The specification's CHS algorithm, worked by hand for each size. */
static void test_chs_geometry(void **state)
{
	static const struct { uint64_t sectors; unsigned c, h, s; } cases[] = {
		{ 16384, 240, 4, 17 },         /* 8 MiB: 963 cyl*heads, heads 4 */
		{ 20480, 301, 4, 17 },         /* 10 MiB */
		{ 65536, 963, 4, 17 },         /* 32 MiB: 3855 / 4 */
		{ 65552, 964, 4, 17 },         /* qemu's 32 MiB rounded up: exact */
		{ 85000, 1000, 5, 17 },        /* heads (5000 + 1023) / 1024 = 5 */
		{ 409600, 825, 16, 31 },       /* 200 MiB: 24 heads > 16, then 13212 < 16384 */
		{ 2097152, 2080, 16, 63 },     /* 1 GiB: 67650 >= 16384 at 31 */
		{ 8388608, 8322, 16, 63 },     /* 4 GiB */
		{ 209715200, 51400, 16, 255 }, /* 100 GiB: >= 65535 * 16 * 63 */
		{ 419430400, 65535, 16, 255 }, /* 200 GiB: capped */
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint32_t chs = devio_vhd_chs(cases[i].sectors);

		assert_int_equal(chs >> 16, cases[i].c);
		assert_int_equal((chs >> 8) & 0xff, cases[i].h);
		assert_int_equal(chs & 0xff, cases[i].s);
	}
}

static char tmpdir[64];

static int tmp_setup(void **state)
{
	strcpy(tmpdir, "/var/tmp/devio-test-vhd-XXXXXX");
	return mkdtemp(tmpdir) ? 0 : -1;
}

/* The folder holds only the names given (no temporary file left over). */
static void dir_holds(int n, ...)
{
	DIR *d = opendir(tmpdir);
	struct dirent *e;
	int seen = 0;

	assert_non_null(d);
	while ((e = readdir(d))) {
		va_list ap;
		bool known = false;

		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		va_start(ap, n);
		for (int i = 0; i < n; i++)
			known |= !strcmp(e->d_name, va_arg(ap, const char *));
		va_end(ap);
		if (!known)
			fail_msg("unexpected file %s", e->d_name);
		seen++;
	}
	closedir(d);
	assert_int_equal(seen, n);
}

static int tmp_teardown(void **state)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	return system(cmd);
}

static uint8_t *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	uint8_t *p;
	long n;

	assert_non_null(f);
	assert_int_equal(fseek(f, 0, SEEK_END), 0);
	n = ftell(f);
	rewind(f);
	p = malloc((size_t)n + 1);
	assert_non_null(p);
	assert_int_equal(fread(p, 1, (size_t)n, f), (size_t)n);
	fclose(f);
	*len = (size_t)n;
	return p;
}

static uint64_t get64(const uint8_t *p)
{
	return (uint64_t)get32(p) << 32 | get32(p + 4);
}

static bool sum_ok(const uint8_t *p, size_t len, size_t field)
{
	uint32_t s = 0;

	for (size_t i = 0; i < len; i++)
		if (i < field || i >= field + 4)
			s += p[i];
	return get32(p + field) == ~s;
}

static void check_footer(const uint8_t *f, uint64_t size, uint32_t type, uint32_t chs)
{
	assert_memory_equal(f, "conectix", 8);
	assert_true(sum_ok(f, 512, 64));
	assert_int_equal(get32(f + 8), 2);
	assert_int_equal(get32(f + 12), 0x10000);
	assert_int_equal(get64(f + 16), type == 2 ? UINT64_MAX : 512);
	assert_memory_equal(f + 28, "dvio", 4);
	assert_int_equal(get64(f + 40), size);
	assert_int_equal(get64(f + 48), size);
	assert_int_equal(get32(f + 56), chs);
	assert_int_equal(get32(f + 60), type);
	assert_int_equal(f[68 + 6] >> 4, 4); /* a random UUID */
}

/* Open path as an image, through the file backend and format detection. */
static struct devio_backend *open_image(const char *path)
{
	struct devio_open_opts o = { 0 };
	struct devio_backend *b = NULL;

	assert_int_equal(devio_backend_open(path, &o, &b), 0);
	assert_string_equal(b->ops->name, "vhd");
	return b;
}

static void test_create_dynamic(void **state)
{
	char path[128], path2[128];
	uint64_t size = 85000 * 512ull; /* a whole geometry: 1000/5/17 */
	uint8_t *p, *p2, *h;
	size_t len, len2, bat = (21 * 4 + 511) / 512 * 512;

	snprintf(path, sizeof(path), "%s/new.vhd", tmpdir);
	snprintf(path2, sizeof(path2), "%s/other.vhd", tmpdir);
	assert_int_equal(devio_vhd_create(path, size, 0), 0);
	assert_int_equal(devio_vhd_create(path2, size, 0), 0);
	p = slurp(path, &len);
	p2 = slurp(path2, &len2);
	assert_int_equal(len, 512 + 1024 + bat + 512);
	check_footer(p, size, 3, 1000u << 16 | 5u << 8 | 17u);
	assert_memory_equal(p + len - 512, p, 512);       /* the footer and its copy */
	assert_memory_not_equal(p + 68, p2 + 68, 16);     /* a fresh unique id each time */
	h = p + 512;
	assert_memory_equal(h, "cxsparse", 8);
	assert_true(sum_ok(h, 1024, 36));
	assert_int_equal(get64(h + 8), UINT64_MAX);
	assert_int_equal(get64(h + 16), 1536);
	assert_int_equal(get32(h + 24), 0x10000);
	assert_int_equal(get32(h + 28), 21);              /* 43520000 bytes in 2 MiB blocks */
	assert_int_equal(get32(h + 32), 2u << 20);
	for (size_t i = 0; i < bat; i++)
		assert_int_equal(p[1536 + i], 0xff);
	free(p);
	free(p2);
	dir_holds(2, "new.vhd", "other.vhd");
	/* the parser takes it: every byte reads as zero, a write lands */
	{
		struct devio_backend *b = open_image(path);
		uint8_t buf[4096], back[4096], zero[4096] = { 0 };

		assert_int_equal(b->size, size);
		assert_int_equal(devio_layer_read(b, back, sizeof(back), size - sizeof(back)), 0);
		assert_memory_equal(back, zero, sizeof(back));
		memset(buf, 0x6b, sizeof(buf));
		assert_int_equal(devio_layer_write(b, buf, sizeof(buf), size - sizeof(buf), 0), 0);
		devio_backend_close(b);
		b = open_image(path);
		assert_int_equal(devio_layer_read(b, back, sizeof(back), size - sizeof(back)), 0);
		assert_memory_equal(back, buf, sizeof(back));
		devio_backend_close(b);
	}
	unlink(path);
	unlink(path2);
}

static void test_create_fixed(void **state)
{
	char path[128];
	uint64_t size = 32u << 20; /* no whole geometry: the largest one, the size exact */
	struct devio_backend *b;
	uint8_t *p;
	size_t len;
	struct stat st;

	snprintf(path, sizeof(path), "%s/fixed.vhd", tmpdir);
	assert_int_equal(devio_vhd_create(path, size, DEVIO_VHD_FIXED), 0);
	p = slurp(path, &len);
	assert_int_equal(len, size + 512);
	check_footer(p + size, size, 2, 65535u << 16 | 16u << 8 | 255u);
	free(p);
	assert_int_equal(stat(path, &st), 0);
	assert_true(st.st_blocks * 512 < 1u << 20);       /* a sparse file */
	b = open_image(path);
	assert_int_equal(b->size, size);
	devio_backend_close(b);
	/* odd sizes become whole sectors */
	assert_int_equal(devio_vhd_create(path, 1000, DEVIO_VHD_FIXED), 0);
	b = open_image(path);
	assert_int_equal(b->size, 1024);
	devio_backend_close(b);
	unlink(path);
}

/* Through devio_format_create, with qemu-img's options; errors leave
 * nothing, not even over a file that was there. */
static void test_format_create(void **state)
{
	char path[128], dir[128];
	struct devio_backend *b = NULL;
	uint8_t buf[512], back[512];
	FILE *f;

	snprintf(path, sizeof(path), "%s/c.vhd", tmpdir);
	assert_int_equal(devio_format_create("vhd", path, 4u << 20, "subformat=fixed", &b), 0);
	assert_string_equal(b->ops->name, "vhd");
	memset(buf, 0x3e, sizeof(buf));
	assert_int_equal(devio_layer_write(b, buf, sizeof(buf), 3u << 20, 0), 0);
	devio_backend_close(b);
	b = open_image(path);
	assert_int_equal(devio_layer_read(b, back, sizeof(back), 3u << 20), 0);
	assert_memory_equal(back, buf, sizeof(back));
	devio_backend_close(b);
	assert_int_equal(devio_format_create("vhd", path, 4u << 20, "subformat=dynamic", &b), 0);
	assert_int_equal(devio_layer_read(b, back, sizeof(back), 3u << 20), 0);
	assert_int_equal(back[0], 0);                      /* replaced, not merged */
	devio_backend_close(b);
	unlink(path);
	/* force_size=off: rounded up to a whole geometry, as qemu-img's default */
	assert_int_equal(devio_format_create("vhd", path, 32u << 20, "force_size=off,subformat=fixed", &b), 0);
	assert_int_equal(b->size, 964 * 4 * 17 * 512);
	devio_backend_close(b);
	unlink(path);
	/* refusals */
	f = fopen(path, "w");
	assert_non_null(f);
	fputs("keep me", f);
	fclose(f);
	assert_int_equal(devio_format_create("vhd", path, 1u << 20, "subformat=sparse", &b), -EINVAL);
	assert_int_equal(devio_format_create("vhd", path, 1u << 20, "cluster_size=65536", &b), -EINVAL);
	assert_int_equal(devio_format_create("vhd", path, 1u << 20, "fixed", &b), -EINVAL);
	assert_int_equal(devio_format_create("vhd", path, 1u << 20, "force_size=yes", &b), -EINVAL);
	assert_int_equal(devio_format_create("vhd", path, 0, NULL, &b), -EFBIG);
	assert_int_equal(devio_format_create("vhd", path, 2041ull << 30, NULL, &b), -EFBIG);
	assert_int_equal(devio_format_create("vmdk", path, 1u << 20, NULL, &b), -EINVAL);
	dir_holds(1, "c.vhd");
	{
		size_t len;
		uint8_t *p = slurp(path, &len);

		assert_int_equal(len, 7);
		assert_memory_equal(p, "keep me", 7);
		free(p);
	}
	unlink(path);
	assert_int_equal(devio_format_create("vhd", tmpdir, 1u << 20, NULL, &b), -EINVAL); /* a folder */
	snprintf(dir, sizeof(dir), "%s/missing/c.vhd", tmpdir);
	assert_int_equal(devio_format_create("vhd", dir, 1u << 20, NULL, &b), -ENOENT);
	dir_holds(0);
}

/* Offer a request to the layer's try_remap as the core would: true and
 * *host where it went, or false and the request left as it was. */
static bool remap(struct devio_backend *v, enum devio_op op, uint64_t off, uint64_t len, uint64_t *host)
{
	struct devio_request r = { .op = op, .offset = off, .length = len };
	bool moved = v->ops->try_remap(v, &r);

	if (moved)
		*host = r.offset;
	else
		assert_int_equal(r.offset, off);
	return moved;
}

/* The fast path: a request inside one allocated block whose loaded
 * bitmap has every sector it touches goes straight to the block's bytes;
 * a freed block's bytes are never handed out again (requests moved there
 * before the TRIM can only touch a hole). */
static void test_remap_decisions(void **state)
{
	struct mem *m = mem_image(true);
	struct devio_backend *v;
	uint8_t buf[BS], back[512];
	uint64_t host = 0, blk3;

	put32(m->p + BAT_AT + 4, DATA_AT / 512);  /* block 1 at the old footer's place, sector 0 only */
	memset(m->p + DATA_AT, 0, 512);
	m->p[DATA_AT] = 0x80;
	memcpy(m->p + DATA_AT + 512 + BS, m->p, 512);
	m->len = DATA_AT + 512 + BS + 512;
	v = vhd_over(m);
	assert_non_null(v->ops->try_remap);
	assert_false(remap(v, DEVIO_OP_READ, BS, 512, &host)); /* its bitmap is not loaded yet */
	assert_int_equal(devio_layer_read(v, back, 512, BS), 0);
	assert_true(remap(v, DEVIO_OP_READ, BS + 10, 500, &host));
	assert_int_equal(host, DATA_AT + 512 + 10);
	assert_false(remap(v, DEVIO_OP_READ, BS + 10, 600, &host));  /* sector 1 is not there */
	assert_false(remap(v, DEVIO_OP_WRITE, BS + 512, 512, &host));
	memset(buf, 0x33, sizeof(buf));
	assert_int_equal(devio_layer_write(v, buf, BS, 3 * BS, 0), 0); /* allocates: every bit set */
	blk3 = (uint64_t)bat_entry(m, 3) * 512 + 512;
	assert_true(remap(v, DEVIO_OP_WRITE, 3 * BS + 1, BS - 1, &host));
	assert_int_equal(host, blk3 + 1);
	assert_false(remap(v, DEVIO_OP_READ, 3 * BS + 512, BS, &host)); /* into block 4 */
	assert_false(remap(v, DEVIO_OP_READ, 5 * BS, 512, &host));      /* unallocated */
	assert_int_equal(devio_layer_trim(v, 3 * BS, BS, 0), 0);
	assert_false(remap(v, DEVIO_OP_READ, 3 * BS, 512, &host));
	assert_int_equal(devio_layer_write(v, buf, BS, 3 * BS, 0), 0);
	assert_true(remap(v, DEVIO_OP_READ, 3 * BS, 512, &host));
	assert_true(host > blk3); /* at the end, not in the freed block's place */
	vhd_done(v);
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
		cmocka_unit_test(test_chs_geometry),
		cmocka_unit_test_setup_teardown(test_create_dynamic, tmp_setup, tmp_teardown),
		cmocka_unit_test_setup_teardown(test_create_fixed, tmp_setup, tmp_teardown),
		cmocka_unit_test_setup_teardown(test_format_create, tmp_setup, tmp_teardown),
		cmocka_unit_test(test_remap_decisions),
	};

	devio_log_set_level(DEVIO_LOG_ERROR);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
