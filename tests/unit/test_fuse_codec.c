/* test_fuse_codec.c - the FUSE request codec (lib/fuse_codec.c) on crafted
 * requests against a real RAM disk: INIT negotiation, lookups, reads at and
 * past the end, clamped writes, fallocate mapping, SEEK_DATA/SEEK_HOLE,
 * directory listing and malformed input. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>
#include "../../lib/fuse_proto.h"

#define SIZE (1u << 20)

static uint8_t reply[1u << 17];

struct fx {
	struct devio_backend *b;
	struct devio_fuse_fs fs;
};

/* Build a /dev/fuse message in buf; returns its length. */
static size_t build(uint8_t *buf, uint32_t op, uint64_t node, const void *arg, size_t arglen,
		    const void *data, size_t datalen)
{
	struct fuse_in_header h = { .opcode = op, .unique = 42, .nodeid = node };

	h.len = (uint32_t)(sizeof(h) + arglen + datalen);
	memcpy(buf, &h, sizeof(h));
	if (arglen)
		memcpy(buf + sizeof(h), arg, arglen);
	if (datalen)
		memcpy(buf + sizeof(h) + arglen, data, datalen);
	return h.len;
}

static void handle(struct fx *f, struct devio_fuse_msg *m, const uint8_t *buf, size_t n)
{
	memset(m, 0, sizeof(*m));
	m->reply = reply;
	m->reply_cap = sizeof(reply);
	assert_int_equal(devio_fuse_split(buf, n, m), 0);
	devio_fuse_handle(&f->fs, m);
	if (m->has_io) {
		devio_execute(f->b, &m->req);
		devio_fuse_finish(&f->fs, m);
	}
}

static int setup(void **state)
{
	struct fx *f = calloc(1, sizeof(*f));
	struct fuse_init_in in = { .major = 7, .minor = 44, .max_readahead = 131072,
				   .flags = (uint32_t)(DEVIO_FUSE_ASYNC_DIO | DEVIO_FUSE_INIT_EXT | DEVIO_FUSE_MAX_PAGES),
				   .flags2 = (uint32_t)(DEVIO_FUSE_OVER_IO_URING >> 32) };
	uint8_t buf[256];
	struct devio_fuse_msg m;

	assert_int_equal(devio_ram_open(SIZE, 0, &f->b), 0);
	f->fs.backend = f->b;
	strcpy(f->fs.name, "disk");
	f->fs.size = SIZE;
	f->fs.max_write = 65536;
	f->fs.offer_uring = true;
	handle(f, &m, buf, build(buf, DEVIO_FUSE_INIT, 0, &in, sizeof(in), NULL, 0));
	assert_int_equal(m.error, 0);
	*state = f;
	return 0;
}

static int teardown(void **state)
{
	struct fx *f = *state;

	devio_backend_close(f->b);
	free(f);
	return 0;
}

static void test_init_negotiates(void **state)
{
	struct fx *f = *state;
	struct fuse_init_out out;

	memcpy(&out, reply, sizeof(out)); /* the reply of setup's INIT is still there */
	assert_int_equal(out.major, 7);
	assert_int_equal(out.minor, DEVIO_FUSE_MINOR);
	assert_true(out.flags & DEVIO_FUSE_ASYNC_DIO);
	assert_false(out.flags & DEVIO_FUSE_ASYNC_READ); /* not offered by this "kernel" */
	assert_int_equal(out.flags2, DEVIO_FUSE_OVER_IO_URING >> 32);
	assert_int_equal(out.max_write, 65536);
	assert_true(f->fs.uring_granted);
}

static void test_lookup(void **state)
{
	struct fx *f = *state;
	struct devio_fuse_msg m;
	struct fuse_entry_out e;
	uint8_t buf[256];

	handle(f, &m, buf, build(buf, DEVIO_FUSE_LOOKUP, 1, NULL, 0, "disk", 5));
	assert_int_equal(m.error, 0);
	memcpy(&e, reply, sizeof(e));
	assert_int_equal(e.nodeid, DEVIO_FUSE_FILE_ID);
	assert_int_equal(e.attr.size, SIZE);
	handle(f, &m, buf, build(buf, DEVIO_FUSE_LOOKUP, 1, NULL, 0, "dis", 4));
	assert_int_equal(m.error, -ENOENT);
	handle(f, &m, buf, build(buf, DEVIO_FUSE_LOOKUP, 1, NULL, 0, "disk", 4)); /* no NUL */
	assert_int_equal(m.error, -ENOENT);
}

static void test_write_read_clamped(void **state)
{
	struct fx *f = *state;
	struct devio_fuse_msg m;
	struct fuse_rw_in rw = { .offset = SIZE - 100, .size = 200 };
	struct fuse_write_out wo;
	static uint8_t buf[1024];
	uint8_t data[200];

	memset(data, 0x5a, sizeof(data));
	handle(f, &m, buf, build(buf, DEVIO_FUSE_WRITE, 2, &rw, sizeof(rw), data, sizeof(data)));
	assert_int_equal(m.error, 0);
	memcpy(&wo, reply, sizeof(wo));
	assert_int_equal(wo.size, 100); /* short at the end of the disk */
	rw.offset = SIZE;
	handle(f, &m, buf, build(buf, DEVIO_FUSE_WRITE, 2, &rw, sizeof(rw), data, sizeof(data)));
	assert_int_equal(m.error, -ENOSPC);
	rw.offset = SIZE - 100;
	handle(f, &m, buf, build(buf, DEVIO_FUSE_READ, 2, &rw, sizeof(rw), NULL, 0));
	assert_int_equal(m.error, 0);
	assert_int_equal(m.reply_len, 100);
	assert_memory_equal(reply, data, 100);
	rw.offset = SIZE + 5;
	handle(f, &m, buf, build(buf, DEVIO_FUSE_READ, 2, &rw, sizeof(rw), NULL, 0));
	assert_int_equal(m.error, 0);
	assert_int_equal(m.reply_len, 0);
	/* a WRITE claiming more data than it carries */
	rw.offset = 0;
	rw.size = 300;
	handle(f, &m, buf, build(buf, DEVIO_FUSE_WRITE, 2, &rw, sizeof(rw), data, sizeof(data)));
	assert_int_equal(m.error, -EINVAL);
}

static void test_fallocate_and_seek(void **state)
{
	struct fx *f = *state;
	struct devio_fuse_msg m;
	struct fuse_fallocate_in fa = { .offset = 0, .length = 65536, .mode = 0x03 };
	struct fuse_lseek_in ls = { .offset = 0, .whence = 4 /* SEEK_HOLE */ };
	struct fuse_rw_in rw = { .offset = 8192, .size = 4096 };
	struct fuse_lseek_out lo;
	static uint8_t buf[8192];
	uint8_t data[4096];

	memset(data, 1, sizeof(data));
	handle(f, &m, buf, build(buf, DEVIO_FUSE_WRITE, 2, &rw, sizeof(rw), data, sizeof(data)));
	assert_int_equal(m.error, 0);
	ls.offset = 0;
	ls.whence = 3; /* SEEK_DATA */
	handle(f, &m, buf, build(buf, DEVIO_FUSE_LSEEK, 2, &ls, sizeof(ls), NULL, 0));
	assert_int_equal(m.error, 0);
	memcpy(&lo, reply, sizeof(lo));
	assert_true(lo.offset <= 8192);
	handle(f, &m, buf, build(buf, DEVIO_FUSE_FALLOCATE, 2, &fa, sizeof(fa), NULL, 0));
	assert_int_equal(m.error, 0); /* PUNCH_HOLE|KEEP_SIZE → TRIM */
	rw.offset = 8192;
	handle(f, &m, buf, build(buf, DEVIO_FUSE_READ, 2, &rw, sizeof(rw), NULL, 0));
	assert_int_equal(m.reply_len, 4096);
	memset(data, 0, sizeof(data));
	assert_memory_equal(reply, data, 4096);
	fa.mode = 0x02; /* PUNCH_HOLE without KEEP_SIZE */
	handle(f, &m, buf, build(buf, DEVIO_FUSE_FALLOCATE, 2, &fa, sizeof(fa), NULL, 0));
	assert_int_equal(m.error, -EOPNOTSUPP);
	fa.mode = 0;
	fa.offset = SIZE - 10;
	fa.length = 100; /* would grow the file */
	handle(f, &m, buf, build(buf, DEVIO_FUSE_FALLOCATE, 2, &fa, sizeof(fa), NULL, 0));
	assert_int_equal(m.error, -EFBIG);
	ls.offset = SIZE;
	handle(f, &m, buf, build(buf, DEVIO_FUSE_LSEEK, 2, &ls, sizeof(ls), NULL, 0));
	assert_int_equal(m.error, -ENXIO);
}

static void test_setattr_and_readdir(void **state)
{
	struct fx *f = *state;
	struct devio_fuse_msg m;
	struct fuse_setattr_in sa = { .valid = DEVIO_FATTR_SIZE, .size = 4096 };
	struct fuse_rw_in rw = { .offset = 0, .size = 4096 };
	struct fuse_dirent d;
	uint8_t buf[512];
	size_t off = 0;
	int n = 0;

	handle(f, &m, buf, build(buf, DEVIO_FUSE_SETATTR, 2, &sa, sizeof(sa), NULL, 0));
	assert_int_equal(m.error, -EPERM);
	sa.size = SIZE;
	handle(f, &m, buf, build(buf, DEVIO_FUSE_SETATTR, 2, &sa, sizeof(sa), NULL, 0));
	assert_int_equal(m.error, 0);
	handle(f, &m, buf, build(buf, DEVIO_FUSE_READDIR, 1, &rw, sizeof(rw), NULL, 0));
	assert_int_equal(m.error, 0);
	while (off + sizeof(d) <= m.reply_len) {
		memcpy(&d, reply + off, sizeof(d));
		off += (sizeof(d) + d.namelen + 7) & ~7u;
		n++;
	}
	assert_int_equal(n, 3);
	assert_memory_equal(reply + off - 8, "disk", 4);
	/* a short op header is refused, not read past: by the splitter, and by
	 * the handler when the op header comes apart from the message */
	assert_int_equal(devio_fuse_split(buf, build(buf, DEVIO_FUSE_READDIR, 1, &rw, 8, NULL, 0), &m), -EINVAL);
	memset(&m, 0, sizeof(m));
	m.in.opcode = DEVIO_FUSE_READDIR;
	m.in.nodeid = 1;
	m.arg = (const uint8_t *)&rw;
	m.arglen = 8;
	m.reply = reply;
	m.reply_cap = sizeof(reply);
	devio_fuse_handle(&f->fs, &m);
	assert_int_equal(m.error, -EINVAL);
}

static void test_malformed(void **state)
{
	struct devio_fuse_msg m;
	uint8_t buf[64] = { 0 };
	size_t n = build(buf, DEVIO_FUSE_READ, 2, NULL, 0, NULL, 0);

	(void)state;
	assert_int_equal(devio_fuse_split(buf, 20, &m), -EINVAL);     /* short header */
	buf[0] = 99;                                                     /* len != bytes */
	assert_int_equal(devio_fuse_split(buf, n, &m), -EINVAL);
	buf[0] = (uint8_t)n;
	assert_int_equal(devio_fuse_split(buf, n, &m), -EINVAL);     /* READ without read_in */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_init_negotiates, setup, teardown),
		cmocka_unit_test_setup_teardown(test_lookup, setup, teardown),
		cmocka_unit_test_setup_teardown(test_write_read_clamped, setup, teardown),
		cmocka_unit_test_setup_teardown(test_fallocate_and_seek, setup, teardown),
		cmocka_unit_test_setup_teardown(test_setattr_and_readdir, setup, teardown),
		cmocka_unit_test(test_malformed),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
