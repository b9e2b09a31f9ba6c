/* test_cow.c - the copy-on-write overlay layer over a RAM disk source:
 * the layout and header round trip, partial writes copied up, TRIM/ZERO
 * reading back zero, extents from the overlay and the source, the source
 * never written, many threads copying up the same blocks at once (no
 * write lost), and an overlay file that reopens, refuses another source
 * size and loses no flushed write. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include "devio/backend.h"
#include "devio/cow.h"
#include "devio/layer.h"
#include "devio/util.h"

#define KiB 1024ull
#define SRC_SIZE (1024 * KiB + 3 * 4096) /* the last 64 KiB block is partial */

static void fill(unsigned char *p, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (unsigned char)(seed * 131 + i * 7 + (i >> 9) + 1);
}

/* A RAM disk holding `image`, then made read-only as --cow opens it. */
static struct devio_backend *source(unsigned char *image)
{
	struct devio_backend *b;

	fill(image, SRC_SIZE, 1);
	assert_int_equal(devio_ram_open(SRC_SIZE, 0, &b), 0);
	assert_int_equal(devio_layer_write(b, image, SRC_SIZE, 0, 0), 0);
	b->caps |= DEVIO_CAP_READONLY;
	return b;
}

static void assert_reads(struct devio_backend *b, const unsigned char *want)
{
	unsigned char *got = malloc(SRC_SIZE);

	assert_non_null(got);
	assert_int_equal(devio_layer_read(b, got, SRC_SIZE, 0), 0);
	assert_memory_equal(got, want, SRC_SIZE);
	free(got);
}

static void test_layout_and_header(void **state)
{
	struct devio_cow_header h, back;
	uint8_t buf[DEVIO_COW_HEADER_SIZE];
	const char *why;
	unsigned field;

	assert_int_equal(devio_cow_layout(10 << 20, 0, &h), 0);
	assert_int_equal(h.block_size, 65536);
	assert_int_equal(h.nblocks, 160);
	assert_int_equal(h.bitmap_offset, 4096);
	assert_int_equal(h.bitmap_length, 4096);
	assert_int_equal(h.data_offset, 65536);
	assert_int_equal(devio_cow_layout(1ull << 50, 0, &h), 0); /* a huge source: larger blocks */
	assert_true(h.nblocks <= DEVIO_COW_MAX_BLOCKS);
	assert_int_equal(devio_cow_layout(1 << 20, 1000, &h), -EINVAL);
	assert_int_equal(devio_cow_layout(SRC_SIZE, 0, &h), 0);
	devio_cow_header_encode(&h, buf);
	assert_int_equal(devio_cow_header_decode(buf, sizeof(buf), &back, &why, &field), 0);
	assert_memory_equal(&h, &back, sizeof(h));
	buf[17] ^= 1; /* the size changes: the checksum no longer matches */
	assert_int_equal(devio_cow_header_decode(buf, sizeof(buf), &back, &why, &field), -EINVAL);
	assert_int_equal(field, 60);
	assert_int_equal(devio_cow_header_decode(buf, 10, &back, &why, &field), -EINVAL);
}

static void test_ram_overlay(void **state)
{
	unsigned char *image = malloc(SRC_SIZE), *want = malloc(SRC_SIZE), *orig = malloc(SRC_SIZE);
	struct devio_open_opts o = { 0 };
	struct devio_backend *lower = source(image), *b;
	unsigned char data[3000];

	memcpy(want, image, SRC_SIZE);
	memcpy(orig, image, SRC_SIZE);
	assert_int_equal(devio_cow_open(lower, "ram", &o, &b), 0);
	assert_false(b->caps & DEVIO_CAP_READONLY);
	assert_int_equal(b->size, SRC_SIZE);
	assert_reads(b, want);
	fill(data, sizeof(data), 9);
	/* inside a block, across two blocks, in the partial last block */
	uint64_t offs[] = { 100, 65536 - 1000, SRC_SIZE - sizeof(data) };
	for (int i = 0; i < 3; i++) {
		assert_int_equal(devio_layer_write(b, data, sizeof(data), offs[i], 0), 0);
		memcpy(want + offs[i], data, sizeof(data));
	}
	assert_reads(b, want);
	/* TRIM and ZERO read back zero: partial and whole blocks */
	assert_int_equal(devio_layer_trim(b, 50, 70, 0), 0);
	assert_int_equal(devio_layer_zero(b, 3 * 65536, 2 * 65536 + 5, 0), 0);
	memset(want + 50, 0, 70);
	memset(want + 3 * 65536, 0, 2 * 65536 + 5);
	assert_reads(b, want);
	assert_int_equal(devio_layer_flush(b), 0);
	assert_reads(b->lower, orig); /* the source was never written */
	devio_backend_close(b);       /* the source with it */
	free(image);
	free(want);
	free(orig);
}

struct ext_seen {
	uint64_t next;
	uint32_t flags_at_hole; /* flags of the extent holding offset 3 * 65536 */
	uint32_t flags_at_zero;
};

static int ext_cb(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct ext_seen *s = ctx;

	assert_int_equal(off, s->next); /* in order, no gap */
	s->next = off + len;
	if (off <= 3 * 65536 && 3 * 65536 < off + len)
		s->flags_at_hole = flags;
	if (off <= 5 * 65536 && 5 * 65536 < off + len)
		s->flags_at_zero = flags;
	return 0;
}

static void test_extents_through_the_layer(void **state)
{
	struct devio_open_opts o = { 0 };
	struct devio_backend *lower, *b;
	struct ext_seen s = { 0 };
	unsigned char x = 'x';

	assert_int_equal(devio_ram_open(SRC_SIZE, 0, &lower), 0); /* all holes */
	assert_int_equal(devio_layer_write(lower, &x, 1, 0, 0), 0);
	lower->caps |= DEVIO_CAP_READONLY;
	assert_int_equal(devio_cow_open(lower, "ram", &o, &b), 0);
	assert_int_equal(devio_layer_write(b, &x, 1, 3 * 65536 + 7, 0), 0);
	assert_int_equal(devio_layer_zero(b, 5 * 65536, 65536, 0), 0);
	while (s.next < SRC_SIZE)
		assert_int_equal(devio_extents(b, s.next, SRC_SIZE - s.next, ext_cb, &s), 0);
	assert_int_equal(s.next, SRC_SIZE);
	assert_int_equal(s.flags_at_hole, 0); /* copied up: data */
	assert_int_equal(s.flags_at_zero, DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO);
	devio_backend_close(b);
}

#define THREADS 8
#define SLOT 512

struct writer {
	struct devio_backend *b;
	unsigned id;
};

/* Thread id writes its own 512-byte slot of every block: every block is
 * copied up by whichever thread comes first, and the others' slots must
 * not be lost to a second copy-up. */
static void *writer_main(void *arg)
{
	struct writer *w = arg;
	unsigned char buf[SLOT];

	memset(buf, 0xa0 + w->id, sizeof(buf));
	for (uint64_t blk = 0; blk < SRC_SIZE / 65536; blk++)
		if (devio_layer_write(w->b, buf, SLOT, blk * 65536 + w->id * 1000, 0))
			return (void *)1;
	return NULL;
}

static void concurrent_round(void)
{
	unsigned char *image = malloc(SRC_SIZE);
	struct devio_open_opts o = { 0 };
	struct devio_backend *lower = source(image), *b;
	struct writer w[THREADS];
	pthread_t t[THREADS];

	assert_int_equal(devio_cow_open(lower, "ram", &o, &b), 0);
	for (unsigned i = 0; i < THREADS; i++) {
		w[i] = (struct writer){ b, i };
		assert_int_equal(pthread_create(&t[i], NULL, writer_main, &w[i]), 0);
	}
	for (unsigned i = 0; i < THREADS; i++) {
		void *ret;

		pthread_join(t[i], &ret);
		assert_null(ret);
	}
	for (uint64_t blk = 0; blk < SRC_SIZE / 65536; blk++)
		for (unsigned i = 0; i < THREADS; i++)
			memset(image + blk * 65536 + i * 1000, 0xa0 + i, SLOT);
	assert_reads(b, image);
	devio_backend_close(b);
	free(image);
}

static void test_concurrent_copy_up(void **state)
{
	for (int round = 0; round < 20; round++) /* a lost copy-up is a race: give it chances */
		concurrent_round();
}

static void test_file_overlay(void **state)
{
	unsigned char *image = malloc(SRC_SIZE), *want = malloc(SRC_SIZE), data[5000];
	char dir[] = "/tmp/devio-cow-unit-XXXXXX", path[64];
	struct devio_open_opts o = { 0 };
	struct devio_backend *lower, *b, *other, *b2;

	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/o.cow", dir);
	lower = source(image);
	memcpy(want, image, SRC_SIZE);
	assert_int_equal(devio_cow_open(lower, path, &o, &b), 0); /* created */
	fill(data, sizeof(data), 5);
	assert_int_equal(devio_layer_write(b, data, sizeof(data), 70000, 0), 0);
	memcpy(want + 70000, data, sizeof(data));
	assert_int_equal(devio_layer_flush(b), 0);
	/* a second opener is refused while this one holds it */
	other = source(image);
	assert_int_equal(devio_cow_open(other, path, &o, &b2), -EBUSY);
	devio_backend_close(b);
	/* reopened over the same source: the write is there */
	assert_int_equal(devio_cow_open(other, path, &o, &b), 0);
	assert_reads(b, want);
	devio_backend_close(b);
	/* over a source of another size: refused */
	assert_int_equal(devio_ram_open(SRC_SIZE + 4096, 0, &other), 0);
	assert_int_equal(devio_cow_open(other, path, &o, &b), -EINVAL);
	devio_backend_close(other);
	free(image);
	free(want);
	unlink(path);
	rmdir(dir);
}

/* realloc, made to fail for one size while fail_realloc_size says so
 * (this test is linked with -Wl,--wrap=realloc). */
static size_t fail_realloc_size;
void *__real_realloc(void *p, size_t n);
void *__wrap_realloc(void *p, size_t n);

void *__wrap_realloc(void *p, size_t n)
{
	return fail_realloc_size && n == fail_realloc_size ? NULL : __real_realloc(p, n);
}

/* A large read-only source of zeroes that holds no memory. */
static int zeroes_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	memset(buf, 0, len);
	return 0;
}

static const struct devio_backend_ops zeroes_ops = { .name = "zeroes", .pread = zeroes_pread };

/* A flush that runs out of memory while it collects the changed bitmap
 * pages loses none of them: the next flush writes them all. */
static void test_flush_out_of_memory(void **state)
{
	const uint64_t page_span = 4096ull * 8 * (64 * KiB); /* the blocks one bitmap page covers */
	struct devio_backend src = { .ops = &zeroes_ops, .size = 17 * page_span + 4096, .block_size = 512,
				     .caps = DEVIO_CAP_READONLY };
	char dir[] = "/tmp/devio-cow-unit-XXXXXX", path[64];
	struct devio_open_opts o = { 0 };
	struct devio_backend *b;
	unsigned char c;

	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/o.cow", dir);
	assert_int_equal(devio_cow_open(&src, path, &o, &b), 0);
	for (unsigned i = 0; i < 17; i++) { /* 17 bitmap pages changed: the list grows past 16 */
		c = (unsigned char)(i + 1);
		assert_int_equal(devio_layer_write(b, &c, 1, i * page_span + 100, 0), 0);
	}
	fail_realloc_size = 32 * 4096;
	assert_int_equal(devio_layer_flush(b), -ENOMEM);
	fail_realloc_size = 0;
	assert_int_equal(devio_layer_flush(b), 0);
	b->lower = NULL; /* src is on the stack */
	devio_backend_close(b);
	assert_int_equal(devio_cow_open(&src, path, &o, &b), 0);
	for (unsigned i = 0; i < 17; i++) {
		assert_int_equal(devio_layer_read(b, &c, 1, i * page_span + 100), 0);
		assert_int_equal(c, i + 1);
	}
	b->lower = NULL;
	devio_backend_close(b);
	unlink(path);
	rmdir(dir);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_layout_and_header),
		cmocka_unit_test(test_ram_overlay),
		cmocka_unit_test(test_extents_through_the_layer),
		cmocka_unit_test(test_concurrent_copy_up),
		cmocka_unit_test(test_file_overlay),
		cmocka_unit_test(test_flush_out_of_memory),
	};

	devio_log_set_level(DEVIO_LOG_ERROR);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
