/* test_window.c - the window layer (layers/window.c) over a RAM disk and a
 * file: bytes land at the window's offset and nowhere else, the window's
 * end is the end, extents come back in the window's offsets and clipped
 * to it, in-place pieces point into the store where the window lies, the
 * read-only guard, partitions in Linux's and ImDisk's numbering with a
 * window inside one, windows over windows, a file's asynchronous path
 * kept, and the errors (past the end, empty, unaligned start), after which
 * the lower backend is still open. */
#include <errno.h>
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
#include "devio/layer.h"
#include "devio/util.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)
#define CHUNK 65536ull /* the RAM disk's allocation unit */

static struct devio_backend *ram(uint64_t size)
{
	struct devio_backend *b;

	assert_int_equal(devio_ram_open(size, 0, &b), 0);
	return b;
}

static struct devio_backend *window(struct devio_backend *lower, uint64_t off, uint64_t size)
{
	struct devio_open_opts o = { .has_offset = true, .offset = off, .has_size = size != 0, .size = size };
	struct devio_backend *w;

	assert_int_equal(devio_window_open("test", lower, &o, &w), 0);
	assert_ptr_equal(w->lower, lower);
	return w;
}

static void test_bytes_land_inside(void **state)
{
	struct devio_backend *r = ram(MiB), *w = window(r, 100000, 200000);
	unsigned char buf[1000], back[1000];

	assert_int_equal(w->size, 200000);
	memset(buf, 0x3c, sizeof(buf));
	assert_int_equal(devio_layer_write(w, buf, sizeof(buf), 200000 - sizeof(buf), DEVIO_REQ_FUA), 0);
	assert_int_equal(devio_layer_read(r, back, sizeof(back), 300000 - sizeof(back)), 0);
	assert_memory_equal(back, buf, sizeof(buf));
	assert_int_equal(devio_layer_read(r, back, 1, 300000), 0);
	assert_int_equal(back[0], 0); /* nothing past the window */
	/* the window's end is the end; its own errors */
	assert_int_equal(devio_layer_write(w, buf, 2, 200000 - 1, 0), -ENOSPC);
	assert_int_equal(devio_layer_read(w, back, 1, 200000), -EINVAL);
	assert_int_equal(devio_layer_zero(w, 0, 200001, 0), -ENOSPC);
	assert_int_equal(devio_layer_trim(w, 199000, 1000, 0), 0);
	assert_int_equal(devio_layer_read(r, back, sizeof(back), 299000), 0);
	assert_int_equal(back[0], 0);
	assert_int_equal(devio_layer_flush(w), 0);
	/* the capabilities are the store's */
	assert_int_equal(w->caps, r->caps);
	assert_int_equal(w->run, r->run);
	devio_backend_close(w); /* closes the RAM disk too (ASan: no leak) */
}

struct ext_list {
	uint64_t off[16], len[16];
	uint32_t flags[16];
	int n;
};

static int collect(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct ext_list *l = ctx;

	assert_true(l->n < 16);
	l->off[l->n] = off;
	l->len[l->n] = len;
	l->flags[l->n++] = flags;
	return 0;
}

static void test_extents_in_window_offsets(void **state)
{
	struct devio_backend *r = ram(MiB), *w = window(r, CHUNK + 100, 3 * CHUNK);
	struct ext_list l = { .n = 0 };
	unsigned char one = 1;

	assert_int_equal(devio_layer_write(r, &one, 1, 2 * CHUNK + 5, 0), 0); /* chunk 2 is data */
	assert_int_equal(devio_extents(w, 0, w->size, collect, &l), 0);
	assert_int_equal(l.n, 3);
	assert_int_equal(l.off[0], 0);
	assert_int_equal(l.len[0], CHUNK - 100);
	assert_true(l.flags[0] & DEVIO_EXTENT_HOLE);
	assert_int_equal(l.off[1], CHUNK - 100);
	assert_int_equal(l.len[1], CHUNK);
	assert_int_equal(l.flags[1], 0);
	assert_int_equal(l.off[2], 2 * CHUNK - 100);
	assert_int_equal(l.len[2], CHUNK + 100); /* clipped at the window's end */
	l.n = 0;
	assert_int_equal(devio_extents(w, 10, 20, collect, &l), 0);
	assert_int_equal(l.n, 1);
	assert_int_equal(l.off[0], 10);
	assert_int_equal(l.len[0], 20);
	assert_int_equal(devio_extents(w, 3 * CHUNK, 1, collect, &l), -EINVAL);
	devio_backend_close(w);
}

/* An in-place READ and WRITE through the window: the store's own pieces,
 * where the window lies. */
static void test_in_place_through_window(void **state)
{
	struct devio_backend *r = ram(MiB), *w = window(r, 3 * CHUNK, CHUNK);
	struct iovec v[4];
	struct devio_request req = { .op = DEVIO_OP_WRITE, .offset = 16, .length = 4, .kind = DEVIO_BUF_MAP,
				     .iov = v, .iovcnt = 4 };
	unsigned char back[4];

	assert_true(w->caps & DEVIO_CAP_MAP);
	assert_int_equal(devio_run(w, &req), 0);
	assert_int_equal(req.iovcnt, 1);
	memcpy(v[0].iov_base, "wind", 4);
	assert_int_equal(devio_map_end(&req), 0);
	assert_int_equal(devio_layer_read(r, back, 4, 3 * CHUNK + 16), 0);
	assert_memory_equal(back, "wind", 4);
	req = (struct devio_request){ .op = DEVIO_OP_READ, .offset = 0, .length = 32, .kind = DEVIO_BUF_MAP,
				      .iov = v, .iovcnt = 4 };
	assert_int_equal(devio_run(w, &req), 0);
	assert_memory_equal((unsigned char *)v[0].iov_base + 16, "wind", 4);
	req = (struct devio_request){ .op = DEVIO_OP_READ, .offset = CHUNK - 1, .length = 2, .kind = DEVIO_BUF_MAP,
				      .iov = v, .iovcnt = 4 };
	assert_int_equal(devio_run(w, &req), -EINVAL);
	devio_backend_close(w);
}

static void test_readonly_guard(void **state)
{
	struct devio_backend *r = ram(MiB), *w;
	struct devio_open_opts o = { .readonly = true };
	unsigned char buf[16] = "not to be saved";

	assert_int_equal(devio_window_open("test", r, &o, &w), 0);
	assert_ptr_equal(w->lower, r);
	assert_int_equal(w->size, MiB);
	assert_true(w->caps & DEVIO_CAP_READONLY);
	assert_false(w->caps & DEVIO_CAP_TRIM);
	assert_int_equal(devio_layer_write(w, buf, sizeof(buf), 0, 0), -EROFS);
	assert_int_equal(devio_layer_zero(w, 0, 16, 0), -EROFS);
	assert_int_equal(devio_layer_read(w, buf, sizeof(buf), 0), 0);
	assert_int_equal(buf[0], 0);
	w->ops->close(w); /* the guard alone */
	/* over a store that is read-only itself, and without options: no layer */
	o = (struct devio_open_opts){ 0 };
	assert_int_equal(devio_window_open("test", r, &o, &w), 0);
	assert_ptr_equal(w, r);
	r->caps |= DEVIO_CAP_READONLY;
	o.readonly = true;
	assert_int_equal(devio_window_open("test", r, &o, &w), 0);
	assert_ptr_equal(w, r);
	devio_backend_close(r);
	/* through the source string: ram: -r is the guard over the disk */
	o = (struct devio_open_opts){ .readonly = true };
	assert_int_equal(devio_backend_open("ram:1M", &o, &w), 0);
	assert_non_null(w->lower);
	assert_false(w->lower->caps & DEVIO_CAP_READONLY);
	assert_int_equal(devio_layer_write(w, buf, 1, 0, 0), -EROFS);
	devio_backend_close(w);
}

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* One MBR table sector's entry. */
static void put_entry(uint8_t *sec, int slot, uint8_t type, uint32_t start, uint32_t sectors)
{
	uint8_t *e = sec + 446 + 16 * slot;

	e[4] = type;
	put32(e + 8, start);
	put32(e + 12, sectors);
	sec[510] = 0x55;
	sec[511] = 0xAA;
}

/* A RAM disk with slot 1 (sectors 2048+100), slot 2 empty, slot 3 (4096+200),
 * slot 4 extended at 8192 with one logical at 8192+63 (300 sectors). */
static struct devio_backend *partitioned_ram(void)
{
	struct devio_backend *r = ram(8 * MiB);
	uint8_t mbr[512] = { 0 }, ebr[512] = { 0 };

	put_entry(mbr, 0, 0x83, 2048, 100);
	put_entry(mbr, 2, 0x07, 4096, 200);
	put_entry(mbr, 3, 0x05, 8192, 4096);
	put_entry(ebr, 0, 0x83, 63, 300);
	assert_int_equal(devio_layer_write(r, mbr, 512, 0, 0), 0);
	assert_int_equal(devio_layer_write(r, ebr, 512, 8192 * 512, 0), 0);
	assert_int_equal(devio_layer_write(r, "logical", 7, (8192 + 63) * 512, 0), 0);
	assert_int_equal(devio_layer_write(r, "third", 5, 4096 * 512 + 1000, 0), 0);
	return r;
}

static int part(struct devio_backend *r, enum devio_part_numbering numbering, int n, struct devio_backend **w)
{
	struct devio_open_opts o = { .partition = n, .numbering = numbering };

	return devio_window_open("test.img", r, &o, w);
}

static void test_partitions(void **state)
{
	struct devio_backend *r = partitioned_ram(), *w, *inner;
	struct devio_open_opts o = { .has_offset = true, .offset = 1000, .has_size = true, .size = 5 };
	char got[8] = "", desc[300];

	/* Linux's numbers: slot 2 is a gap, 4 the container, 5 the logical */
	assert_int_equal(part(r, DEVIO_PART_LINUX, 2, &w), -ENOENT);
	assert_int_equal(part(r, DEVIO_PART_LINUX, 4, &w), -EINVAL);
	assert_int_equal(part(r, DEVIO_PART_LINUX, 6, &w), -ENOENT);
	assert_int_equal(part(r, DEVIO_PART_LINUX, 5, &w), 0);
	assert_int_equal(w->size, 300 * 512);
	assert_int_equal(devio_layer_read(w, got, 7, 0), 0);
	assert_memory_equal(got, "logical", 7);
	assert_int_equal(devio_layer_read(w, got, 1, 300 * 512), -EINVAL);
	w->ops->describe(w, desc, sizeof(desc));
	assert_non_null(strstr(desc, "partition 5"));
	w->ops->close(w); /* the window alone */
	/* ImDisk's numbers: used slots count, so its 2 is Linux's 3 */
	assert_int_equal(part(r, DEVIO_PART_IMDISK, 2, &w), 0);
	assert_int_equal(w->size, 200 * 512);
	w->ops->close(w);
	/* a window inside partition 3, and a window over that window */
	o.partition = 3;
	assert_int_equal(devio_window_open("test.img", r, &o, &w), 0);
	assert_int_equal(w->size, 5);
	assert_int_equal(devio_layer_read(w, got, 5, 0), 0);
	assert_memory_equal(got, "third", 5);
	inner = window(w, 2, 3);
	assert_int_equal(devio_layer_read(inner, got, 3, 0), 0);
	assert_memory_equal(got, "ird", 3);
	assert_int_equal(devio_layer_read(inner, got, 1, 3), -EINVAL);
	devio_backend_close(inner); /* all three */
}

static void test_errors_leave_lower_open(void **state)
{
	struct devio_backend *r = ram(MiB), *w;
	struct devio_open_opts o = { .has_offset = true, .offset = MiB + 1 };
	unsigned char byte = 7;

	assert_int_equal(devio_window_open("test", r, &o, &w), -EINVAL);
	o = (struct devio_open_opts){ .has_offset = true, .offset = 4096, .has_size = true, .size = MiB };
	assert_int_equal(devio_window_open("test", r, &o, &w), -EINVAL);
	o = (struct devio_open_opts){ .has_offset = true, .offset = 4096, .has_size = true, .size = UINT64_MAX };
	assert_int_equal(devio_window_open("test", r, &o, &w), -EINVAL);
	o = (struct devio_open_opts){ .has_size = true, .size = 0 };
	assert_int_equal(devio_window_open("test", r, &o, &w), -EINVAL);
	o = (struct devio_open_opts){ .partition = 1 };
	assert_int_equal(devio_window_open("test", r, &o, &w), -EINVAL); /* no table */
	r->block_size = 4096; /* as under O_DIRECT: the start must be aligned */
	o = (struct devio_open_opts){ .has_offset = true, .offset = 1000 };
	assert_int_equal(devio_window_open("test", r, &o, &w), -EINVAL);
	o.offset = 8192;
	assert_int_equal(devio_window_open("test", r, &o, &w), 0);
	assert_int_equal(w->block_size, 4096);
	w->ops->close(w);
	assert_int_equal(devio_layer_write(r, &byte, 1, 0, 0), 0); /* still open */
	devio_backend_close(r);
}

/* A window over a file keeps the file's asynchronous path. */
static void test_file_stays_async(void **state)
{
	char path[] = "/var/tmp/devio-test-window-XXXXXX";
	struct devio_open_opts o = { .has_offset = true, .offset = 4096, .has_size = true, .size = 8192 };
	struct devio_backend *w;
	struct devio_request req;
	char buf[4096], back[4096];
	int fd = mkstemp(path);

	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, 64 * KiB), 0);
	assert_int_equal(devio_backend_open(path, &o, &w), 0);
	assert_non_null(w->lower);
	assert_true(devio_backend_async(w));
	memset(buf, 0x61, sizeof(buf));
	req = (struct devio_request){ .op = DEVIO_OP_WRITE, .offset = 4096, .length = 4096, .buf = buf,
				      .flags = DEVIO_REQ_FUA };
	assert_int_equal(devio_execute(w, &req), 0);
	assert_int_equal(pread(fd, back, sizeof(back), 8192), (ssize_t)sizeof(back));
	assert_memory_equal(back, buf, sizeof(buf));
	devio_backend_close(w);
	close(fd);
	unlink(path);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_bytes_land_inside),
		cmocka_unit_test(test_extents_in_window_offsets),
		cmocka_unit_test(test_in_place_through_window),
		cmocka_unit_test(test_readonly_guard),
		cmocka_unit_test(test_partitions),
		cmocka_unit_test(test_errors_leave_lower_open),
		cmocka_unit_test(test_file_stays_async),
	};

	devio_log_set_level(getenv("DEVIO_TEST_VERBOSE") ? DEVIO_LOG_DEBUG : DEVIO_LOG_ERROR);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
