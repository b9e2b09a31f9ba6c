/* test_qcow2.c - the qcow2 layer over an in-memory image file that checks,
 * at every single write the layer makes to it, that the image is one
 * `qemu-img check` accepts (every referenced cluster counted at least as
 * often as it is referenced; leaks allowed) both as it stands after the
 * write (a copy taken at that moment, or kill -9) and as the last FLUSH of
 * the file left it plus only this write (a power cut that kept this write
 * and none of the others since that flush): the crash consistency of the
 * metadata write order and of its syncs at every possible cut.  Plus
 * data read back against a reference, a reopen after FLUSH, no leaks after
 * a clean close, writers on several threads, and the backing-file rule.
 * And the images devio_qcow2_create makes: parsed back, checked, written. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "devio/layer.h"
#include "devio/qcow2.h"
#include "devio/util.h"

#define MEM_CAP (64u << 20)

struct mem {
	struct devio_backend b;
	uint8_t *p;
	uint64_t len;
	bool check;          /* check consistency after every write */
	bool unsynced;       /* written since the last flush */
	uint8_t *durable;    /* the image as of the last flush */
	unsigned writes, bad, bad_cut;
};

static uint64_t rd64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return be64toh(v);
}

static uint32_t rd32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return be32toh(v);
}

static void wr64(uint8_t *p, uint64_t v)
{
	v = htobe64(v);
	memcpy(p, &v, 8);
}

static void wr32(uint8_t *p, uint32_t v)
{
	v = htobe32(v);
	memcpy(p, &v, 4);
}

/* ---- an image checker: references against refcounts ---- */

struct img {
	const uint8_t *p;
	uint64_t len, cs;
	unsigned cb;
	uint32_t *refs; /* references counted per cluster */
	uint64_t nclusters;
};

static uint32_t img_refcount(const struct img *im, uint64_t cl)
{
	uint64_t rt_off = rd64(im->p + 48), rt_n = (uint64_t)rd32(im->p + 56) * im->cs / 8;
	uint64_t per = im->cs / 2, i = cl / per, blk;
	uint16_t v;

	if (i >= rt_n)
		return 0;
	blk = rd64(im->p + rt_off + i * 8) & ~511ull;
	if (!blk || blk + im->cs > im->len)
		return 0;
	memcpy(&v, im->p + blk + (cl % per) * 2, 2);
	return be16toh(v);
}

static void img_ref(struct img *im, uint64_t off, uint64_t len)
{
	if (!len)
		return; /* an empty L1 table (a 0-byte disk) */
	for (uint64_t cl = off / im->cs; cl <= (off + len - 1) / im->cs && cl < im->nclusters; cl++)
		im->refs[cl]++;
}

static void img_refs_l2(struct img *im, uint64_t l2)
{
	unsigned csh = 62 - (im->cb - 8);

	for (uint64_t j = 0; j < im->cs / 8 && l2 + im->cs <= im->len; j++) {
		uint64_t e = rd64(im->p + l2 + j * 8);

		if (e & (1ull << 62)) {
			uint64_t off = e & ((1ull << csh) - 1), n = ((e >> csh) & ((1ull << (im->cb - 8)) - 1)) + 1;

			img_ref(im, off & ~511ull, n * 512);
		} else if (e & 0x00fffffffffffe00ull) {
			img_ref(im, e & 0x00fffffffffffe00ull, im->cs);
		}
	}
}

/* Clusters referenced more often than counted (what qemu-img check calls
 * corruption); *leaks: counted but not referenced. */
static unsigned img_check(const uint8_t *p, uint64_t len, unsigned *leaks)
{
	struct img im = { .p = p, .len = len, .cb = rd32(p + 20) };
	uint64_t l1_off = rd64(p + 40), l1_n = rd32(p + 36), rt_off = rd64(p + 48), rtc = rd32(p + 56);
	unsigned bad = 0;

	im.cs = 1ull << im.cb;
	im.nclusters = (len + im.cs - 1) / im.cs + 1;
	im.refs = calloc(im.nclusters, sizeof(*im.refs));
	img_ref(&im, 0, im.cs);
	img_ref(&im, l1_off, l1_n * 8);
	img_ref(&im, rt_off, rtc * im.cs);
	for (uint64_t i = 0; i < rtc * im.cs / 8; i++) {
		uint64_t b = rd64(p + rt_off + i * 8) & ~511ull;

		if (b)
			img_ref(&im, b, im.cs);
	}
	for (uint64_t i = 0; i < l1_n; i++) {
		uint64_t l2 = rd64(p + l1_off + i * 8) & 0x00fffffffffffe00ull;

		if (l2) {
			img_ref(&im, l2, im.cs);
			img_refs_l2(&im, l2);
		}
	}
	*leaks = 0;
	for (uint64_t cl = 0; cl < im.nclusters; cl++) {
		uint32_t rc = img_refcount(&im, cl);

		bad += im.refs[cl] > rc;
		*leaks += rc > im.refs[cl];
	}
	free(im.refs);
	return bad;
}

/* ---- the in-memory image file ---- */

static int mem_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	struct mem *m = b->priv;

	if (off + len > m->len)
		return -EIO; /* past the end of what was written, as a file would */
	memcpy(buf, m->p + off, len);
	return 0;
}

static int mem_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	struct mem *m = b->priv;
	unsigned leaks;

	if (off + len > MEM_CAP)
		return -ENOSPC;
	memcpy(m->p + off, buf, len);
	if (off + len > m->len)
		m->len = off + len;
	m->writes++;
	m->unsynced = true;
	if (m->check) {
		uint8_t *saved = malloc(len);

		m->bad += img_check(m->p, m->len, &leaks);
		memcpy(saved, m->durable + off, len); /* the last flush's image plus this write alone */
		memcpy(m->durable + off, buf, len);
		m->bad_cut += img_check(m->durable, m->len, &leaks);
		memcpy(m->durable + off, saved, len);
		free(saved);
	}
	return 0;
}

static int mem_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct mem *m = b->priv;

	memset(m->p + off, 0, len);
	return 0;
}

static int mem_flush(struct devio_backend *b)
{
	struct mem *m = b->priv;

	m->unsynced = false;
	memcpy(m->durable, m->p, m->len);
	return 0;
}

/* The image file grows as a whole regular file does (file.c's grow). */
static int mem_grow(struct devio_backend *b, uint64_t size)
{
	if (size > MEM_CAP)
		return -ENOSPC;
	b->size = size;
	return 0;
}

static const struct devio_backend_ops mem_ops = {
	.name = "test-mem",
	.pread = mem_pread,
	.pwrite = mem_pwrite,
	.flush = mem_flush,
	.trim = mem_trim,
	.grow = mem_grow,
};

static struct mem *mem_new(void)
{
	struct mem *m = calloc(1, sizeof(*m));

	m->p = calloc(1, MEM_CAP);
	m->durable = calloc(1, MEM_CAP);
	m->b.ops = &mem_ops;
	m->b.block_size = 1;
	m->b.priv = m;
	m->b.caps = DEVIO_CAP_FLUSH | DEVIO_CAP_TRIM;
	return m;
}

static void mem_free(struct mem *m)
{
	free(m->p);
	free(m->durable);
	free(m);
}

/* A new, empty image as qemu-img lays it out: header, refcount table,
 * one refcount block, L1 table. */
static void mk_image(struct mem *m, unsigned cb, uint64_t vsize, uint32_t version, const char *backing)
{
	uint64_t cs = 1ull << cb, l1_n = (vsize + (cs * cs / 8) - 1) / (cs * cs / 8);
	uint64_t n = 3 + (l1_n * 8 + cs - 1) / cs; /* clusters: header, table, block, L1 */
	uint8_t *h = m->p;

	memset(m->p, 0, n * cs);
	wr32(h, 0x514649fb);
	wr32(h + 4, version);
	wr32(h + 20, cb);
	wr64(h + 24, vsize);
	wr32(h + 36, (uint32_t)l1_n);
	wr64(h + 40, 3 * cs);
	wr64(h + 48, cs);
	wr32(h + 56, 1);
	if (version == 3) {
		wr32(h + 96, 4);
		wr32(h + 100, 104);
	}
	if (backing) {
		wr64(h + 8, 256);
		wr32(h + 16, (uint32_t)strlen(backing));
		memcpy(h + 256, backing, strlen(backing));
	}
	wr64(m->p + cs, 2 * cs);
	for (uint64_t i = 0; i < n; i++)
		m->p[2 * cs + i * 2 + 1] = 1;
	m->len = n * cs;
	m->b.size = m->len;
	memcpy(m->durable, m->p, m->len);
}

static int req(struct devio_backend *b, enum devio_op op, void *buf, uint64_t off, uint64_t len, uint32_t flags)
{
	struct devio_request r = { .op = op, .buf = buf, .offset = off, .length = len, .flags = flags };

	return devio_run(b, &r);
}

/* Random writes, zeroes, trims and flushes; the image checked after every
 * write of the layer; data against a reference. */
static void run_random(unsigned cb, uint32_t version, unsigned ops, unsigned seed)
{
	uint64_t vsize = 16u << 20, cs = 1ull << cb;
	struct mem *m = mem_new();
	struct devio_backend *q;
	uint8_t *ref = calloc(1, vsize), *buf = malloc(3 * cs + 8192), *got = malloc(vsize);
	unsigned leaks;

	srandom(seed);
	mk_image(m, cb, vsize, version, NULL);
	assert_int_equal(devio_qcow2_open("mem.qcow2", &m->b, false, NULL, &q), 0);
	m->check = true;
	for (unsigned i = 0; i < ops; i++) {
		uint64_t off = (uint64_t)random() % (vsize / 512) * 512, len = 512 * (1 + random() % ((3 * cs + 8192) / 512));
		int kind = (int)(random() % 10);

		if (len > vsize - off)
			len = vsize - off;
		if (kind < 6) {
			for (uint64_t k = 0; k < len; k++)
				buf[k] = (uint8_t)(i * 7 + k);
			assert_int_equal(req(q, DEVIO_OP_WRITE, buf, off, len, 0), 0);
			memcpy(ref + off, buf, len);
		} else if (kind < 8) {
			assert_int_equal(req(q, DEVIO_OP_ZERO, NULL, off, len, kind == 7 ? DEVIO_REQ_NO_HOLE : 0), 0);
			memset(ref + off, 0, len);
		} else if (kind == 8) {
			off = off / cs * cs;
			len = (len + cs - 1) / cs * cs;
			if (len > vsize - off)
				len = vsize - off;
			assert_int_equal(req(q, DEVIO_OP_TRIM, NULL, off, len, 0), 0);
			memset(ref + off, 0, len); /* whole clusters, no backing file: zeroes */
		} else {
			assert_int_equal(req(q, DEVIO_OP_FLUSH, NULL, 0, 0, 0), 0);
			assert_false(m->unsynced); /* nothing written is left unsynced */
		}
	}
	assert_int_equal(req(q, DEVIO_OP_READ, got, 0, vsize, 0), 0);
	assert_memory_equal(got, ref, vsize);
	assert_int_equal(m->bad, 0);
	assert_int_equal(m->bad_cut, 0);
	assert_true(m->writes > ops / 10);
	m->check = false;
	devio_backend_close(q); /* flushes: every queued free given back */
	assert_int_equal(img_check(m->p, m->len, &leaks), 0);
	assert_int_equal(leaks, 0);
	/* what was flushed is what a new opening reads */
	m->b.size = m->len;
	assert_int_equal(devio_qcow2_open("mem.qcow2", &m->b, false, NULL, &q), 0);
	memset(got, 0xaa, vsize);
	assert_int_equal(req(q, DEVIO_OP_READ, got, 0, vsize, 0), 0);
	assert_memory_equal(got, ref, vsize);
	devio_backend_close(q);
	free(ref);
	free(buf);
	free(got);
	mem_free(m);
}

static void test_random_v3_4k(void **state)
{
	run_random(12, 3, 600, 1);
}

static void test_random_v2_64k(void **state)
{
	run_random(16, 2, 300, 2);
}

static void test_random_v3_512(void **state)
{
	/* 512-byte clusters: 16 MiB needs new refcount blocks and a larger
	 * refcount table (one cluster of it covers 8 MiB) */
	run_random(9, 3, 400, 3);
}

static void test_random_small_cache(void **state)
{
	/* 16 tables per cache: dirty tables leave it all the time */
	devio_qcow2_set_cache_size(1);
	run_random(9, 3, 500, 4);
	run_random(12, 2, 300, 5);
	devio_qcow2_set_cache_size(0);
}

struct thr {
	struct devio_backend *q;
	uint8_t *ref; /* what each thread wrote, at the same offsets */
	unsigned k;
	int r;
};

static void *writer(void *arg)
{
	struct thr *t = arg;
	uint8_t buf[12288];

	for (unsigned i = 0; i < 200 && !t->r; i++) {
		/* thread k owns every 4th 64 KiB stripe; clusters (4 KiB) are shared
		 * only by its own requests, L2 tables and refcount blocks by all */
		uint64_t stripe = (uint64_t)(i * 4 + t->k) % 256, off = stripe * 65536 + (i * 4096) % 53248;

		memset(buf, (int)(1 + i % 200), sizeof(buf));
		t->r = req(t->q, DEVIO_OP_WRITE, buf, off, sizeof(buf), 0);
		memcpy(t->ref + off, buf, sizeof(buf));
		if (!t->r && i % 16 == 5)
			t->r = req(t->q, DEVIO_OP_FLUSH, NULL, 0, 0, 0);
	}
	return NULL;
}

static void test_threads(void **state)
{
	struct mem *m = mem_new();
	struct devio_backend *q;
	struct thr t[4];
	pthread_t th[4];
	uint8_t *got = malloc(16u << 20), *ref = calloc(1, 16u << 20);
	unsigned leaks;

	mk_image(m, 12, 16u << 20, 3, NULL);
	assert_int_equal(devio_qcow2_open("mem.qcow2", &m->b, false, NULL, &q), 0);
	for (unsigned k = 0; k < 4; k++) {
		t[k] = (struct thr){ q, ref, k, 0 };
		pthread_create(&th[k], NULL, writer, &t[k]);
	}
	for (unsigned k = 0; k < 4; k++) {
		pthread_join(th[k], NULL);
		assert_int_equal(t[k].r, 0);
	}
	assert_int_equal(req(q, DEVIO_OP_READ, got, 0, 16u << 20, 0), 0);
	assert_memory_equal(got, ref, 16u << 20);
	devio_backend_close(q);
	assert_int_equal(img_check(m->p, m->len, &leaks), 0);
	assert_int_equal(leaks, 0);
	free(got);
	free(ref);
	mem_free(m);
}

/* Tables written back because the cache was full (here by reads) are
 * made durable by the next FLUSH even when nothing is dirty any more. */
static void test_flush_syncs_evicted_tables(void **state)
{
	struct mem *m = mem_new();
	struct devio_backend *q;
	uint8_t buf[512] = { 1 }, *all = malloc(16u << 20);

	devio_qcow2_set_cache_size(1); /* the minimum: 16 tables */
	mk_image(m, 9, 16u << 20, 3, NULL);
	assert_int_equal(devio_qcow2_open("mem.qcow2", &m->b, false, NULL, &q), 0);
	for (uint64_t off = 0; off < (16u << 20); off += 32768) /* one cluster in every L2 table */
		assert_int_equal(req(q, DEVIO_OP_WRITE, buf, off, sizeof(buf), 0), 0);
	assert_int_equal(req(q, DEVIO_OP_FLUSH, NULL, 0, 0, 0), 0);
	assert_false(m->unsynced);
	for (uint64_t off = 0; off < (16u << 20); off += 32768)
		assert_int_equal(req(q, DEVIO_OP_WRITE, buf, off + 512, sizeof(buf), 0), 0);
	assert_int_equal(req(q, DEVIO_OP_READ, all, 0, 16u << 20, 0), 0); /* evicts the dirty tables */
	assert_int_equal(req(q, DEVIO_OP_FLUSH, NULL, 0, 0, 0), 0);
	assert_false(m->unsynced);
	devio_backend_close(q);
	devio_qcow2_set_cache_size(0);
	free(all);
	mem_free(m);
}

/* Extended L2 entries: subclusters read as their bitmap says; a bitmap
 * that is both allocated and zero for one is an I/O error. */
static void test_extended_l2(void **state)
{
	struct mem *m = mem_new();
	struct devio_backend *q;
	uint64_t cs = 16384, l2, host;
	uint8_t got[1536];

	mk_image(m, 14, 1u << 20, 3, NULL);
	wr64(m->p + 72, 1u << 4);
	l2 = m->len;
	host = l2 + cs;
	wr64(m->p + 3 * cs, l2 | (1ull << 63));               /* L1[0] */
	wr64(m->p + l2, host | (1ull << 63));                 /* L2[0]: the cluster */
	wr64(m->p + l2 + 8, (1ull << 1) | (1ull << (32 + 2))); /* subcluster 1 data, 2 zero */
	memset(m->p + host, 0x5a, cs);
	m->p[2 * cs + (l2 / cs) * 2 + 1] = 1;
	m->p[2 * cs + (host / cs) * 2 + 1] = 1;
	m->len = host + cs;
	m->b.size = m->len;
	assert_int_equal(devio_qcow2_open("mem.qcow2", &m->b, false, NULL, &q), 0);
	assert_true(q->caps & DEVIO_CAP_READONLY);
	assert_int_equal(req(q, DEVIO_OP_READ, got, 0, sizeof(got), 0), 0);
	for (size_t i = 0; i < sizeof(got); i++)
		assert_int_equal(got[i], i >= 512 && i < 1024 ? 0x5a : 0);
	devio_backend_close(q);
	wr64(m->p + l2 + 8, (1ull << 1) | (1ull << (32 + 1)));
	assert_int_equal(devio_qcow2_open("mem.qcow2", &m->b, false, NULL, &q), 0);
	assert_int_equal(req(q, DEVIO_OP_READ, got, 0, sizeof(got), 0), -EIO);
	devio_backend_close(q);
	mem_free(m);
}

static void test_backing_refused_on_detection(void **state)
{
	struct mem *m = mem_new();
	struct devio_backend *q = NULL;

	mk_image(m, 16, 1u << 20, 3, "../../etc/passwd");
	assert_int_equal(devio_qcow2_open("mem.qcow2", &m->b, false, NULL, &q), -EPERM);
	assert_null(q);
	mem_free(m);
}

static void test_bad_header_fields(void **state)
{
	static const struct { unsigned off, width; uint64_t v; } cases[] = {
		{ 20, 4, 8 },          /* cluster_bits below 9 */
		{ 20, 4, 22 },         /* above 21 */
		{ 36, 4, 0x7fffffff }, /* l1_size: 16 GiB of L1 */
		{ 56, 4, 0x10000000 }, /* refcount_table_clusters */
		{ 40, 8, 12345 },      /* misaligned L1 */
		{ 48, 8, 1ull << 60 }, /* refcount table past the end */
		{ 72, 8, 1ull << 9 },  /* unknown incompatible feature */
		{ 100, 4, 100 },       /* header_length below 104 */
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct mem *m = mem_new();
		struct devio_backend *q = NULL;

		mk_image(m, 16, 1u << 20, 3, NULL);
		if (cases[i].width == 4)
			wr32(m->p + cases[i].off, (uint32_t)cases[i].v);
		else
			wr64(m->p + cases[i].off, cases[i].v);
		assert_int_not_equal(devio_qcow2_open("mem.qcow2", &m->b, false, NULL, &q), 0);
		assert_null(q);
		mem_free(m);
	}
}

/* A new image from devio_qcow2_create, read into m; its path in dir. */
static void load_new(struct mem *m, char *dir, const char *name, uint64_t size, const struct devio_qcow2_new *o)
{
	char path[512];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	assert_int_equal(devio_qcow2_create(path, size, o, NULL), 0);
	f = fopen(path, "rb");
	assert_non_null(f);
	m->len = fread(m->p, 1, MEM_CAP, f);
	assert_true(feof(f) && m->len > 0);
	fclose(f);
	unlink(path);
	m->b.size = m->len;
	memcpy(m->durable, m->p, m->len);
}

/* Every cluster of a new image is metadata, counted once; the header as
 * asked; our parser opens it; written through the layer it stays clean. */
static void check_created(unsigned cb, uint32_t version, uint64_t vsize)
{
	char dir[] = "/tmp/test_qcow2.XXXXXX";
	struct devio_qcow2_new o = { .version = version, .cluster_size = 1u << cb };
	struct mem *m = mem_new();
	struct devio_backend *q;
	uint64_t cs = 1ull << cb, n;
	uint8_t buf[4096], got[4096];
	unsigned leaks = 1;

	assert_non_null(mkdtemp(dir));
	load_new(m, dir, "new.qcow2", vsize, &o);
	assert_int_equal(rmdir(dir), 0);
	assert_int_equal(rd32(m->p), 0x514649fb);
	assert_int_equal(rd32(m->p + 4), version);
	assert_int_equal(rd32(m->p + 20), cb);
	assert_true(rd64(m->p + 24) == vsize);
	assert_int_equal(rd64(m->p + 8), 0);            /* no backing file */
	if (version == 3) {
		assert_int_equal(rd64(m->p + 72), 0);   /* no feature bits */
		assert_int_equal(rd32(m->p + 96), 4);   /* 16-bit refcounts */
		assert_int_equal(rd32(m->p + 100), 104);
	}
	assert_int_equal(rd64(m->p + (version == 3 ? 104 : 72)), 0); /* the extensions' end */
	assert_int_equal(m->len % cs, 0);
	n = m->len / cs;
	assert_int_equal(img_check(m->p, m->len, &leaks), 0);
	assert_int_equal(leaks, 0);
	for (uint64_t cl = 0; cl < n; cl++) {
		struct img im = { .p = m->p, .len = m->len, .cs = cs, .cb = cb };

		assert_int_equal(img_refcount(&im, cl), 1);
	}
	assert_int_equal(devio_qcow2_open("mem.qcow2", &m->b, false, NULL, &q), 0);
	assert_true(q->size == vsize);
	if (vsize >= sizeof(buf)) {
		m->check = true;
		memset(buf, 0x5c, sizeof(buf));
		assert_int_equal(req(q, DEVIO_OP_WRITE, buf, vsize - sizeof(buf), sizeof(buf), 0), 0);
		assert_int_equal(req(q, DEVIO_OP_FLUSH, NULL, 0, 0, 0), 0);
		assert_int_equal(req(q, DEVIO_OP_READ, got, vsize - sizeof(buf), sizeof(got), 0), 0);
		assert_memory_equal(got, buf, sizeof(buf));
		assert_int_equal(m->bad + m->bad_cut, 0);
		m->check = false;
	}
	devio_backend_close(q);
	assert_int_equal(img_check(m->p, m->len, &leaks), 0);
	assert_int_equal(leaks, 0);
	mem_free(m);
}

static void test_create_v3_64k(void **state)
{
	check_created(16, 3, 32u << 20);
}

static void test_create_v2_512_many_blocks(void **state)
{
	check_created(9, 2, 1u << 30); /* a 256 KiB L1: refcount blocks of 128 KiB each */
}

static void test_create_v3_2m_and_empty(void **state)
{
	check_created(21, 3, 0);
	check_created(12, 3, 5u << 20);
}

static void test_create_refusals(void **state)
{
	char dir[] = "/tmp/test_qcow2.XXXXXX", path[512];
	static const struct devio_qcow2_new bad[] = {
		{ .version = 1 }, { .version = 4 }, { .cluster_size = 256 }, { .cluster_size = 1000 },
		{ .cluster_size = 4u << 20 },
	};
	struct devio_backend *q = NULL;

	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/x.qcow2", dir);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		assert_int_equal(devio_qcow2_create(path, 1u << 20, &bad[i], &q), -EINVAL);
	{
		struct devio_qcow2_new o = { .cluster_size = 512 };

		assert_int_equal(devio_qcow2_create(path, 1ull << 40, &o, &q), -EFBIG);
	}
	assert_null(q);
	assert_int_equal(rmdir(dir), 0); /* nothing left in it */
}

/* ---- the fast path: requests moved to the image file (try_remap) ---- */

/* Offer one request to the layer's try_remap as the core would; on true
 * *host is where it went (and the request is ended again at once). */
static bool remap(struct devio_backend *q, enum devio_op op, uint64_t off, uint64_t len, uint64_t *host)
{
	struct devio_request r = { .op = op, .offset = off, .length = len };
	bool moved = q->ops->try_remap(q, &r);

	if (moved) {
		*host = r.offset;
		q->ops->remap_done(q, &r);
	} else {
		assert_int_equal(r.offset, off); /* left as it was */
	}
	return moved;
}

/* Image with 64 KiB clusters whose one L2 table maps guest clusters:
 * 0, 1 -> host clusters 5, 6 (ours, contiguous); 2 unallocated; 3 the
 * zero flag; 4 -> 8 shared (no COPIED flag); 5 -> 9 ours; 6 compressed. */
static void mk_mapped(struct mem *m)
{
	const uint64_t cs = 65536;
	uint8_t *l2 = m->p + 4 * cs;

	mk_image(m, 16, 16u << 20, 3, NULL);
	wr64(m->p + 3 * cs, 4 * cs | (1ull << 63));
	wr64(l2 + 0, 5 * cs | (1ull << 63));
	wr64(l2 + 8, 6 * cs | (1ull << 63));
	wr64(l2 + 24, 1);
	wr64(l2 + 32, 8 * cs);
	wr64(l2 + 40, 9 * cs | (1ull << 63));
	wr64(l2 + 48, (1ull << 62) | 7 * cs); /* one sector of deflate data */
	for (unsigned cl = 4; cl < 10; cl++) {
		m->p[2 * cs + cl * 2 + 1] = cl == 8 ? 2 : 1;
		if (cl > 4) /* the L2 table stays */
			memset(m->p + cl * cs, 0x40 + cl, cs);
	}
	m->len = 10 * cs;
	m->b.size = m->len;
	memcpy(m->durable, m->p, m->len);
}

static void test_remap_decisions(void **state)
{
	const uint64_t cs = 65536;
	struct mem *m = mem_new();
	struct devio_backend *q;
	uint64_t host = 0;
	uint8_t buf[8192];

	mk_mapped(m);
	assert_int_equal(devio_qcow2_open("mem.qcow2", &m->b, false, NULL, &q), 0);
	assert_non_null(q->ops->try_remap);
	/* the L2 table is not cached yet: loading it is the pool's work */
	assert_false(remap(q, DEVIO_OP_READ, 100, 4096, &host));
	assert_int_equal(req(q, DEVIO_OP_READ, buf, 0, 512, 0), 0);
	/* inside one allocated cluster, and across two contiguous ones */
	assert_true(remap(q, DEVIO_OP_READ, 100, 4096, &host));
	assert_int_equal(host, 5 * cs + 100);
	assert_true(remap(q, DEVIO_OP_WRITE, cs - 512, 4096, &host));
	assert_int_equal(host, 6 * cs - 512);
	assert_true(remap(q, DEVIO_OP_READ, 0, 2 * cs, &host));
	assert_int_equal(host, 5 * cs);
	/* into an unallocated cluster, a zero cluster, a compressed one */
	assert_false(remap(q, DEVIO_OP_READ, 2 * cs - 512, 1024, &host));
	assert_false(remap(q, DEVIO_OP_READ, 2 * cs, 512, &host));
	assert_false(remap(q, DEVIO_OP_WRITE, 2 * cs, 512, &host));
	assert_false(remap(q, DEVIO_OP_READ, 3 * cs + 4096, 512, &host));
	assert_false(remap(q, DEVIO_OP_READ, 6 * cs, 512, &host));
	/* a shared cluster: read in place, written only by copying it */
	assert_true(remap(q, DEVIO_OP_READ, 4 * cs + 512, 512, &host));
	assert_int_equal(host, 8 * cs + 512);
	assert_false(remap(q, DEVIO_OP_WRITE, 4 * cs + 512, 512, &host));
	assert_true(remap(q, DEVIO_OP_WRITE, 5 * cs, cs, &host));
	assert_int_equal(host, 9 * cs);
	/* adjacent in the file but not both ours: two runs, not one */
	assert_false(remap(q, DEVIO_OP_READ, 5 * cs - 512, 1024, &host));
	/* through the core: moved requests read the clusters' bytes */
	assert_int_equal(req(q, DEVIO_OP_READ, buf, cs - 4096, sizeof(buf), 0), 0);
	assert_int_equal(buf[0], 0x45);
	assert_int_equal(buf[sizeof(buf) - 1], 0x46);
	devio_backend_close(q);
	mem_free(m);
}

/* A TRIM frees a cluster while a request moved to it is still running:
 * the cluster is not given back (so not reused by an allocation) until
 * that request has ended; then the next FLUSH gives it back. */
static void test_remap_holds_freed_cluster(void **state)
{
	struct mem *m = mem_new();
	struct devio_backend *q;
	uint8_t buf[4096];
	uint64_t host_a, host_b, host_c;
	struct devio_request inflight = { .op = DEVIO_OP_READ, .offset = 0, .length = 4096 };
	unsigned leaks;

	mk_image(m, 12, 16u << 20, 3, NULL);
	assert_int_equal(devio_qcow2_open("mem.qcow2", &m->b, false, NULL, &q), 0);
	memset(buf, 1, sizeof(buf));
	assert_int_equal(req(q, DEVIO_OP_WRITE, buf, 0, 4096, 0), 0);
	assert_int_equal(req(q, DEVIO_OP_FLUSH, NULL, 0, 0, 0), 0);
	assert_true(q->ops->try_remap(q, &inflight)); /* a read of guest cluster 0, still running */
	host_a = inflight.offset;
	assert_int_equal(req(q, DEVIO_OP_TRIM, NULL, 0, 4096, 0), 0);
	assert_false(remap(q, DEVIO_OP_READ, 0, 4096, &host_b)); /* unallocated now */
	assert_int_equal(req(q, DEVIO_OP_FLUSH, NULL, 0, 0, 0), 0);
	assert_int_equal(req(q, DEVIO_OP_WRITE, buf, 8192, 4096, 0), 0); /* allocates */
	assert_true(remap(q, DEVIO_OP_READ, 8192, 4096, &host_b));
	assert_int_not_equal(host_b, host_a);
	assert_int_equal(req(q, DEVIO_OP_FLUSH, NULL, 0, 0, 0), 0);
	assert_int_equal(req(q, DEVIO_OP_WRITE, buf, 16384, 4096, 0), 0);
	assert_true(remap(q, DEVIO_OP_READ, 16384, 4096, &host_c));
	assert_int_not_equal(host_c, host_a); /* two flushes later: still held */
	q->ops->remap_done(q, &inflight);
	assert_int_equal(req(q, DEVIO_OP_FLUSH, NULL, 0, 0, 0), 0); /* given back now */
	assert_int_equal(req(q, DEVIO_OP_WRITE, buf, 32768, 4096, 0), 0);
	assert_true(remap(q, DEVIO_OP_READ, 32768, 4096, &host_c));
	assert_int_equal(host_c, host_a); /* reused: the first free cluster */
	devio_backend_close(q);
	assert_int_equal(img_check(m->p, m->len, &leaks), 0);
	assert_int_equal(leaks, 0);
	mem_free(m);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_random_v3_4k),
		cmocka_unit_test(test_random_v2_64k),
		cmocka_unit_test(test_random_v3_512),
		cmocka_unit_test(test_random_small_cache),
		cmocka_unit_test(test_threads),
		cmocka_unit_test(test_flush_syncs_evicted_tables),
		cmocka_unit_test(test_extended_l2),
		cmocka_unit_test(test_backing_refused_on_detection),
		cmocka_unit_test(test_bad_header_fields),
		cmocka_unit_test(test_create_v3_64k),
		cmocka_unit_test(test_create_v2_512_many_blocks),
		cmocka_unit_test(test_create_v3_2m_and_empty),
		cmocka_unit_test(test_create_refusals),
		cmocka_unit_test(test_remap_decisions),
		cmocka_unit_test(test_remap_holds_freed_cluster),
	};

	devio_log_set_level(DEVIO_LOG_ERROR);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
