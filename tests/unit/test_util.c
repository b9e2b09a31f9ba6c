/* test_util.c - size parsing, address parsing and the request checks. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include "devio/backend.h"
#include "devio/util.h"

static void test_parse_size(void **state)
{
	uint64_t v;

	assert_int_equal(devio_parse_size("4096", &v), 0);
	assert_int_equal(v, 4096);
	assert_int_equal(devio_parse_size("64K", &v), 0);
	assert_int_equal(v, 65536);
	assert_int_equal(devio_parse_size("1T", &v), 0);
	assert_int_equal(v, 1ull << 40);
	assert_int_equal(devio_parse_size("2GiB", &v), 0);
	assert_int_equal(v, 2ull << 30);
	assert_int_equal(devio_parse_size("0x1000", &v), 0);
	assert_int_equal(v, 4096);
	assert_int_equal(devio_parse_size("", &v), -EINVAL);
	assert_int_equal(devio_parse_size("-1", &v), -EINVAL);
	assert_int_equal(devio_parse_size("12Q", &v), -EINVAL);
	assert_int_equal(devio_parse_size("1.5G", &v), 0);
	assert_int_equal(v, 3ull << 29);
	assert_int_equal(devio_parse_size("010M", &v), 0); /* decimal, not octal */
	assert_int_equal(v, 10ull << 20);
	assert_int_equal(devio_parse_size("0.5K", &v), 0);
	assert_int_equal(v, 512);
	assert_int_equal(devio_parse_size("1.5", &v), -EINVAL);
	assert_int_equal(devio_parse_size("0.0001K", &v), -EINVAL);
	assert_int_equal(devio_parse_size("1.", &v), -EINVAL);
	assert_int_equal(devio_parse_size(" 1", &v), -EINVAL);
	assert_int_equal(devio_parse_size("16E", &v), -ERANGE);
	assert_int_equal(devio_parse_u64("010", &v), 0);
	assert_int_equal(v, 10);
	assert_int_equal(devio_parse_u64("18446744073709551616", &v), -ERANGE);
	assert_int_equal(devio_parse_u64("0x", &v), -EINVAL);
	assert_int_equal(devio_parse_size("16E", &v), -ERANGE);
	assert_int_equal(devio_parse_size("99999999999999999999", &v), -ERANGE);
}

static void test_addr_parse(void **state)
{
	struct devio_addr a;

	assert_int_equal(devio_addr_parse("tcp:9000", NULL, &a), 0);
	assert_int_equal(a.kind, DEVIO_ADDR_TCP);
	assert_string_equal(a.host, "");
	assert_string_equal(a.port, "9000");
	assert_int_equal(devio_addr_parse("tcp:[::1]:77", NULL, &a), 0);
	assert_string_equal(a.host, "::1");
	assert_string_equal(a.port, "77");
	assert_int_equal(devio_addr_parse("tcp:localhost:", "10809", &a), 0);
	assert_string_equal(a.port, "10809");
	assert_int_equal(devio_addr_parse("tcp:host:port", NULL, &a), -EINVAL);
	assert_int_equal(devio_addr_parse("unix:/tmp/x.sock", NULL, &a), 0);
	assert_int_equal(a.kind, DEVIO_ADDR_UNIX);
	assert_int_equal(devio_addr_parse("stdio", NULL, &a), 0);
	assert_int_equal(a.kind, DEVIO_ADDR_STDIO);
	assert_int_equal(devio_addr_parse("/dev/ttyS0", NULL, &a), 0);
	assert_int_equal(a.kind, DEVIO_ADDR_DEVICE);
	assert_int_equal(devio_addr_parse("bogus", NULL, &a), -EINVAL);
}

static int fake_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off) { return 0; }
static const struct devio_backend_ops fake_ops = { .name = "fake", .pread = fake_pread };

static void test_request_check(void **state)
{
	struct devio_backend b = { .ops = &fake_ops, .size = 1000, .caps = DEVIO_CAP_READONLY };
	char buf[16];
	struct devio_request r = { .op = DEVIO_OP_READ, .offset = 990, .length = 10, .buf = buf };

	assert_int_equal(devio_request_check(&b, &r), 0);
	r.length = 11;
	assert_int_equal(devio_request_check(&b, &r), -EINVAL);
	r.offset = UINT64_MAX - 4; /* offset + length wraps */
	r.length = 10;
	assert_int_equal(devio_request_check(&b, &r), -EINVAL);
	r.op = DEVIO_OP_WRITE;
	r.offset = 0;
	assert_int_equal(devio_request_check(&b, &r), -EROFS);
	r.op = (enum devio_op)99;
	assert_int_equal(devio_request_check(&b, &r), -EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse_size),
		cmocka_unit_test(test_addr_parse),
		cmocka_unit_test(test_request_check),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
