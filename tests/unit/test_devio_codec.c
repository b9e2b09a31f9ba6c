/* test_devio_codec.c - lib/devio_codec.c, the devio protocol layouts both
 * ends share: request headers round-trip, answers and INFO are checked as
 * the client must (longer-than-asked answers, signed range offsets, bad
 * alignments), and the bytes match docs/devio-protocol.md. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include "devio/backend.h"
#include "devio/protocol.h"

static void test_request_layouts(void **state)
{
	struct devio_proto_req rq = { .code = DEVIO_REQ_WRITE, .offset = 0x1122334455667788ull, .length = 512 };
	struct devio_proto_req back;
	uint8_t b[DEVIO_MAX_REQ_HDR];

	assert_int_equal(devio_proto_encode_req(&rq, b), 24);
	assert_int_equal(b[0], 3);             /* code, little-endian */
	assert_int_equal(b[8], 0x88);          /* offset, low byte first */
	assert_int_equal(b[16], 0x00);
	assert_int_equal(b[17], 0x02);         /* 512 */
	assert_int_equal(devio_proto_req_hdr_size(DEVIO_REQ_WRITE), 16);
	devio_proto_decode_req(devio_get_le64(b), b + 8, &back);
	assert_int_equal(back.offset, rq.offset);
	assert_int_equal(back.length, 512);

	rq = (struct devio_proto_req){ .code = DEVIO_REQ_ZERO, .offset = 4096, .length = 8192 };
	assert_int_equal(devio_proto_encode_req(&rq, b), 32);
	assert_int_equal(devio_get_le64(b + 8), DEVIO_RANGE_SIZE);
	devio_proto_decode_req(DEVIO_REQ_ZERO, b + 8, &back);
	assert_int_equal(back.length, DEVIO_RANGE_SIZE);

	rq = (struct devio_proto_req){ .code = DEVIO_REQ_INFO };
	assert_int_equal(devio_proto_encode_req(&rq, b), 8);
	assert_int_equal(devio_proto_req_hdr_size(DEVIO_REQ_INFO), 0);
	assert_int_equal(devio_proto_req_hdr_size(DEVIO_REQ_SCSI), 32);
	assert_int_equal(devio_proto_req_hdr_size(DEVIO_REQ_SHARED), 48);
	assert_int_equal(devio_proto_req_hdr_size(12345), 0);
	assert_true(DEVIO_CODE_SIZE + devio_proto_req_hdr_size(DEVIO_REQ_SHARED) <= DEVIO_MAX_REQ_HDR);
}

static void test_ranges(void **state)
{
	uint8_t r[16];
	uint64_t off, len;

	devio_put_le64(r, 1024);
	devio_put_le64(r + 8, 1024);
	assert_int_equal(devio_proto_decode_range(r, 2048, &off, &len), 0);
	assert_int_equal(off + len, 2048);
	devio_put_le64(r + 8, 1025);           /* one byte past the end */
	assert_int_equal(devio_proto_decode_range(r, 2048, &off, &len), -EINVAL);
	devio_put_le64(r, (uint64_t)-512);     /* a negative start */
	devio_put_le64(r + 8, 512);
	assert_int_equal(devio_proto_decode_range(r, 2048, &off, &len), -EINVAL);
	devio_put_le64(r, 2048);               /* empty, at the end */
	devio_put_le64(r + 8, 0);
	assert_int_equal(devio_proto_decode_range(r, 2048, &off, &len), 0);
	devio_put_le64(r, 1);                  /* overflow */
	devio_put_le64(r + 8, UINT64_MAX);
	assert_int_equal(devio_proto_decode_range(r, 2048, &off, &len), -EINVAL);
}

static void test_answers(void **state)
{
	uint8_t a[DEVIO_ANSWER_SIZE];
	uint64_t n;
	int res;

	devio_proto_encode_answer(a, -ENOSPC, 0);
	assert_int_equal(devio_get_le64(a), ENOSPC);
	assert_int_equal(devio_proto_decode_answer(a, 4096, &res, &n), 0);
	assert_int_equal(res, -ENOSPC);
	assert_int_equal(n, 0);
	devio_proto_encode_answer(a, 0, 4096);
	assert_int_equal(devio_proto_decode_answer(a, 4096, &res, &n), 0);
	assert_int_equal(res, 0);
	assert_int_equal(n, 4096);
	assert_int_equal(devio_proto_decode_answer(a, 8192, &res, &n), 0);
	assert_int_equal(res, -EIO);           /* short */
	assert_int_equal(n, 4096);             /* but its bytes still follow */
	assert_int_equal(devio_proto_decode_answer(a, 4095, &res, &n), -EPROTO);
	devio_put_le64(a, 1ull << 40);         /* an error number no errno has */
	assert_int_equal(devio_proto_decode_answer(a, 1, &res, &n), 0);
	assert_int_equal(res, -EIO);
	assert_int_equal(devio_proto_peer_errno(0), 0);
	assert_int_equal(devio_proto_peer_errno(4095), -4095);
	assert_int_equal(devio_proto_peer_errno(4096), -EIO);
	assert_int_equal(devio_proto_wire_errno(-EROFS), EROFS);
	assert_int_equal(devio_proto_wire_errno(0), 0);
}

static void test_info(void **state)
{
	struct devio_info i = { .file_size = 1 << 20, .req_alignment = 512, .flags = DEVIO_INFO_SUPPORTS_UNMAP };
	uint8_t b[DEVIO_INFO_SIZE];
	char why[160];

	devio_proto_encode_info(b, &i);
	memset(&i, 0, sizeof(i));
	assert_int_equal(devio_proto_decode_info(b, &i, why, sizeof(why)), 0);
	assert_int_equal(i.file_size, 1 << 20);
	assert_int_equal(i.req_alignment, 512);
	assert_int_equal(devio_proto_caps(i.flags), DEVIO_CAP_TRIM);
	devio_put_le64(b + 8, 0);              /* no alignment: 1 */
	assert_int_equal(devio_proto_decode_info(b, &i, why, sizeof(why)), 0);
	assert_int_equal(i.req_alignment, 1);
	devio_put_le64(b + 8, 1000);           /* not a power of two */
	assert_int_equal(devio_proto_decode_info(b, &i, why, sizeof(why)), -EINVAL);
	assert_non_null(strstr(why, "power of two"));
	devio_put_le64(b + 8, DEVIO_MAX_ALIGN * 2ull);
	assert_int_equal(devio_proto_decode_info(b, &i, why, sizeof(why)), -EINVAL);
	devio_put_le64(b + 8, 512);
	devio_put_le64(b, 1ull << 63);         /* past signed offsets */
	assert_int_equal(devio_proto_decode_info(b, &i, why, sizeof(why)), -EINVAL);
	assert_non_null(strstr(why, "more than the protocol can address"));
}

static int noop_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	return 0;
}

static void test_info_flags(void **state)
{
	static const struct devio_backend_ops ro_ops = { .name = "ro" };
	static const struct devio_backend_ops rw_ops = { .name = "rw", .pwrite = noop_pwrite };
	struct devio_backend b = { .ops = &rw_ops, .caps = DEVIO_CAP_TRIM };

	/* writable: ZERO is always offered (the core writes zeroes) */
	assert_int_equal(devio_proto_info_flags(&b), DEVIO_INFO_SUPPORTS_UNMAP | DEVIO_INFO_SUPPORTS_ZERO);
	b.caps |= DEVIO_CAP_READONLY;
	assert_int_equal(devio_proto_info_flags(&b), DEVIO_INFO_RO);
	/* what a front end may offer is what the caps say (a window layer has
	 * no data callbacks to look at): a store without pwrite says READONLY */
	b = (struct devio_backend){ .ops = &ro_ops, .caps = DEVIO_CAP_READONLY };
	assert_int_equal(devio_proto_info_flags(&b), DEVIO_INFO_RO);
	assert_int_equal(devio_proto_caps(DEVIO_INFO_RO | DEVIO_INFO_SUPPORTS_ZERO),
			 DEVIO_CAP_READONLY | DEVIO_CAP_ZERO);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_request_layouts),
		cmocka_unit_test(test_ranges),
		cmocka_unit_test(test_answers),
		cmocka_unit_test(test_info),
		cmocka_unit_test(test_info_flags),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
