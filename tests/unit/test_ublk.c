/* test_ublk.c - the ublk front end's descriptor check on crafted
 * descriptors (ops, flags, ranges at and past the end, overflow, oversize
 * transfers), its device-name parser, the data-path and batch choices and
 * the check of the tags a batched fetch wrote. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>
#include "devio/request.h"
#include "devio/ublk.h"
#include "../../lib/ublk_abi.h"

#define SECTORS 2048u          /* a 1 MiB device */
#define MAX_IO (64u * 1024)    /* 128 sectors per read/write */

static int decode(uint32_t op_flags, uint32_t nr, uint64_t start, struct devio_request *req)
{
	return devio_ublk_decode(op_flags, nr, start, SECTORS, MAX_IO, req);
}

static void test_read_write(void **state)
{
	struct devio_request req;

	assert_int_equal(decode(DEVIO_UBLK_IO_OP_READ, 8, 16, &req), 0);
	assert_int_equal(req.op, DEVIO_OP_READ);
	assert_int_equal(req.offset, 16 * 512);
	assert_int_equal(req.length, 8 * 512);
	assert_int_equal(req.flags, 0);
	assert_int_equal(decode(DEVIO_UBLK_IO_OP_WRITE | DEVIO_UBLK_IO_F_FUA, 128, SECTORS - 128, &req), 0);
	assert_int_equal(req.op, DEVIO_OP_WRITE);
	assert_int_equal(req.flags, DEVIO_REQ_FUA);
	assert_int_equal(req.offset + req.length, (uint64_t)SECTORS * 512);
}

static void test_other_ops(void **state)
{
	struct devio_request req;

	assert_int_equal(decode(DEVIO_UBLK_IO_OP_FLUSH, 0, 0, &req), 0);
	assert_int_equal(req.op, DEVIO_OP_FLUSH);
	assert_int_equal(req.length, 0);
	/* discards are not bounded by the buffer size, only by the device */
	assert_int_equal(decode(DEVIO_UBLK_IO_OP_DISCARD, SECTORS, 0, &req), 0);
	assert_int_equal(req.op, DEVIO_OP_TRIM);
	assert_int_equal(req.length, (uint64_t)SECTORS * 512);
	assert_int_equal(decode(DEVIO_UBLK_IO_OP_WRITE_ZEROES | DEVIO_UBLK_IO_F_NOUNMAP, 1024, 8, &req), 0);
	assert_int_equal(req.op, DEVIO_OP_ZERO);
	assert_int_equal(req.flags, DEVIO_REQ_NO_HOLE);
}

static void test_unknown_ops(void **state)
{
	struct devio_request req;

	assert_int_equal(decode(DEVIO_UBLK_IO_OP_WRITE_SAME, 8, 0, &req), -EOPNOTSUPP);
	assert_int_equal(decode(10 /* ZONE_OPEN */, 8, 0, &req), -EOPNOTSUPP);
	assert_int_equal(decode(18 /* REPORT_ZONES */, 8, 0, &req), -EOPNOTSUPP);
	assert_int_equal(decode(0xff, 8, 0, &req), -EOPNOTSUPP);
}

static void test_bad_ranges(void **state)
{
	struct devio_request req;

	assert_int_equal(decode(DEVIO_UBLK_IO_OP_READ, 0, 0, &req), -EINVAL);           /* empty */
	assert_int_equal(decode(DEVIO_UBLK_IO_OP_READ, 8, SECTORS - 7, &req), -EINVAL); /* past the end */
	assert_int_equal(decode(DEVIO_UBLK_IO_OP_READ, 1, SECTORS, &req), -EINVAL);     /* at the end */
	assert_int_equal(decode(DEVIO_UBLK_IO_OP_WRITE, 8, UINT64_MAX - 3, &req), -EINVAL);  /* wraps */
	assert_int_equal(decode(DEVIO_UBLK_IO_OP_DISCARD, UINT32_MAX, 1, &req), -EINVAL);
	assert_int_equal(decode(DEVIO_UBLK_IO_OP_WRITE_ZEROES, 8, UINT64_MAX >> 9, &req), -EINVAL);
	/* a read or write larger than the tag's buffer */
	assert_int_equal(decode(DEVIO_UBLK_IO_OP_READ, 129, 0, &req), -EINVAL);
	assert_int_equal(decode(DEVIO_UBLK_IO_OP_WRITE, UINT32_MAX, 0, &req), -EINVAL);
	/* a start sector whose byte offset would overflow 64 bits */
	assert_int_equal(devio_ublk_decode(DEVIO_UBLK_IO_OP_READ, 8, 1ull << 60, UINT64_MAX, MAX_IO, &req), -EINVAL);
}

static void test_parse_dev(void **state)
{
	unsigned id;

	assert_int_equal(devio_ublk_parse_dev("/dev/ublkb3", &id), 0);
	assert_int_equal(id, 3);
	assert_int_equal(devio_ublk_parse_dev("/dev/ublkc12", &id), 0);
	assert_int_equal(id, 12);
	assert_int_equal(devio_ublk_parse_dev("7", &id), 0);
	assert_int_equal(id, 7);
	assert_int_equal(devio_ublk_parse_dev("/dev/ublkb", &id), -EINVAL);
	assert_int_equal(devio_ublk_parse_dev("/dev/sda", &id), -EINVAL);
	assert_int_equal(devio_ublk_parse_dev("ublkb-1", &id), -EINVAL);
	assert_int_equal(devio_ublk_parse_dev("4294967295", &id), -EINVAL);
}

/* The data path picked from GET_FEATURES and what the backend takes, in
 * the order auto-buf-reg, zero copy, user copy, kernel copy; a forced mode
 * only where both sides have it. */
static void test_pick_copy(void **state)
{
	enum devio_ublk_copy c;
	const uint64_t f612 = 0x1fe, f7 = 0x1fffff;
	const uint64_t f615 = f612 | DEVIO_UBLK_F_SUPPORT_ZERO_COPY; /* zero copy, no auto-buf-reg */

	assert_int_equal(devio_ublk_pick_copy(f7, DEVIO_UBLK_WANT_BEST, true, &c), 0);
	assert_int_equal(c, DEVIO_UBLK_COPY_AUTO_BUF_REG);
	assert_int_equal(devio_ublk_pick_copy(f615, DEVIO_UBLK_WANT_BEST, true, &c), 0);
	assert_int_equal(c, DEVIO_UBLK_COPY_ZERO);
	assert_int_equal(devio_ublk_pick_copy(f612, DEVIO_UBLK_WANT_BEST, true, &c), 0);
	assert_int_equal(c, DEVIO_UBLK_COPY_USER);
	/* a backend without fixed buffers (RAM, remote, formats) keeps user copy */
	assert_int_equal(devio_ublk_pick_copy(f7, DEVIO_UBLK_WANT_BEST, false, &c), 0);
	assert_int_equal(c, DEVIO_UBLK_COPY_USER);
	assert_int_equal(devio_ublk_pick_copy(0, DEVIO_UBLK_WANT_BEST, true, &c), 0); /* pre-6.5: no GET_FEATURES */
	assert_int_equal(c, DEVIO_UBLK_COPY_KERNEL);
	/* --ublk-copy zero: the best zero-copy mode, or why not */
	assert_int_equal(devio_ublk_pick_copy(f615, DEVIO_UBLK_WANT_ZERO, true, &c), 0);
	assert_int_equal(c, DEVIO_UBLK_COPY_ZERO);
	assert_int_equal(devio_ublk_pick_copy(f612, DEVIO_UBLK_WANT_ZERO, true, &c), -EOPNOTSUPP);
	assert_int_equal(devio_ublk_pick_copy(f7, DEVIO_UBLK_WANT_ZERO, false, &c), -EINVAL);
	/* one mode by name */
	assert_int_equal(devio_ublk_pick_copy(f7, DEVIO_UBLK_COPY_KERNEL, true, &c), 0);
	assert_int_equal(c, DEVIO_UBLK_COPY_KERNEL);
	assert_int_equal(devio_ublk_pick_copy(f7, DEVIO_UBLK_COPY_ZERO, true, &c), 0);
	assert_int_equal(c, DEVIO_UBLK_COPY_ZERO);
	assert_int_equal(devio_ublk_pick_copy(DEVIO_UBLK_F_CMD_IOCTL_ENCODE, DEVIO_UBLK_COPY_USER, true, &c),
			 -EOPNOTSUPP);
	assert_int_equal(devio_ublk_pick_copy(f615, DEVIO_UBLK_COPY_AUTO_BUF_REG, true, &c), -EOPNOTSUPP);
	assert_int_equal(devio_ublk_pick_copy(f7, DEVIO_UBLK_COPY_AUTO_BUF_REG, false, &c), -EINVAL);
	assert_int_equal(devio_ublk_pick_copy(f7, 9, true, &c), -EOPNOTSUPP);
	assert_string_equal(devio_ublk_copy_mode(DEVIO_UBLK_COPY_AUTO_BUF_REG), "auto-buf-reg");
	assert_string_equal(devio_ublk_copy_mode(DEVIO_UBLK_COPY_ZERO), "zero-copy");
	assert_string_equal(devio_ublk_copy_mode(DEVIO_UBLK_COPY_USER), "user-copy");
}

/* Batched commands: where offered with ioctl-encoded opcodes (auto), by
 * force only there, never when turned off. */
static void test_pick_batch(void **state)
{
	const uint64_t f612 = 0x1fe, f7 = 0x1fffff;
	bool b = true;

	assert_int_equal(devio_ublk_pick_batch(f7, true, DEVIO_UBLK_BATCH_AUTO, &b), 0);
	assert_true(b);
	assert_int_equal(devio_ublk_pick_batch(f612, true, DEVIO_UBLK_BATCH_AUTO, &b), 0);
	assert_false(b);
	assert_int_equal(devio_ublk_pick_batch(f7, false, DEVIO_UBLK_BATCH_AUTO, &b), 0); /* legacy opcodes */
	assert_false(b);
	assert_int_equal(devio_ublk_pick_batch(f7, true, DEVIO_UBLK_BATCH_OFF, &b), 0);
	assert_false(b);
	assert_int_equal(devio_ublk_pick_batch(f7, true, DEVIO_UBLK_BATCH_ON, &b), 0);
	assert_true(b);
	assert_int_equal(devio_ublk_pick_batch(f612, true, DEVIO_UBLK_BATCH_ON, &b), -EOPNOTSUPP);
	assert_int_equal(devio_ublk_pick_batch(f7, false, DEVIO_UBLK_BATCH_ON, &b), -EOPNOTSUPP);
	assert_int_equal(devio_ublk_pick_batch(0, true, DEVIO_UBLK_BATCH_ON, &b), -EOPNOTSUPP);
}

/* A fetch buffer as the driver may write it, and as it must not: tags past
 * the depth and odd bytes are counted, the unused marker skipped. */
static void test_batch_tags(void **state)
{
	const uint16_t in[] = { 0, 63, 64, 0xffff, 5, 0xfffe, 7 };
	unsigned char raw[sizeof(in) + 1];
	uint16_t out[8];
	unsigned bad, n;

	memcpy(raw + 1, in, sizeof(in)); /* unaligned on purpose */
	n = devio_ublk_batch_tags(raw + 1, sizeof(in), 64, out, &bad);
	assert_int_equal(n, 4);
	assert_int_equal(out[0], 0);
	assert_int_equal(out[1], 63);
	assert_int_equal(out[2], 5);
	assert_int_equal(out[3], 7);
	assert_int_equal(bad, 2); /* 64 and 0xfffe */
	n = devio_ublk_batch_tags(raw + 1, 3, 64, out, &bad); /* a tag and half of one */
	assert_int_equal(n, 1);
	assert_int_equal(bad, 1);
	assert_int_equal(devio_ublk_batch_tags(raw, 0, 64, out, &bad), 0);
	assert_int_equal(bad, 0);
	/* depth 0 (nothing valid) and a marker-only buffer */
	assert_int_equal(devio_ublk_batch_tags(raw + 1, sizeof(in), 0, out, &bad), 0);
	assert_int_equal(bad, 6);
	assert_int_equal(sizeof(struct devio_ublk_batch_io), 16);
	assert_int_equal(DEVIO_UBLK_U_BATCH(DEVIO_UBLK_IO_COMMIT_IO_CMDS), 0xc0107526u);
}

/* A COMMIT_IO_CMDS completion: what was taken is done; a refused first
 * element goes again as -EIO once, is dropped when it cannot be answered
 * (-EBUSY) or was -EIO already, and -ENODEV ends them all. */
static void test_commit_outcome(void **state)
{
	bool eio = true;

	assert_int_equal(devio_ublk_commit_outcome(5 * 16, 5, 16, 4096, &eio), 5); /* all taken */
	assert_false(eio);
	assert_int_equal(devio_ublk_commit_outcome(2 * 8, 5, 8, 4096, &eio), 2); /* partial: the rest again */
	assert_false(eio);
	assert_int_equal(devio_ublk_commit_outcome(9 * 8, 5, 8, 0, &eio), 5); /* more than sent: capped */
	assert_int_equal(devio_ublk_commit_outcome(-EINVAL, 5, 8, 4096, &eio), 0); /* refused: again as -EIO */
	assert_true(eio);
	assert_int_equal(devio_ublk_commit_outcome(-EINVAL, 5, 8, -EIO, &eio), 1); /* refused as -EIO: dropped */
	assert_false(eio);
	assert_int_equal(devio_ublk_commit_outcome(-EFAULT, 1, 16, -ENOSPC, &eio), 0);
	assert_true(eio);
	assert_int_equal(devio_ublk_commit_outcome(-EBUSY, 5, 8, 4096, &eio), 1); /* not ours: dropped */
	assert_false(eio);
	assert_int_equal(devio_ublk_commit_outcome(-ENODEV, 5, 8, 4096, &eio), 5); /* device gone */
	assert_false(eio);
	assert_int_equal(devio_ublk_commit_outcome(4, 5, 8, 4096, &eio), 0); /* less than one element */
	assert_true(eio);
	assert_int_equal(devio_ublk_commit_outcome(0, 5, 8, -EIO, &eio), 1);
	assert_int_equal(devio_ublk_commit_outcome(-EINVAL, 0, 8, 0, &eio), 0); /* nothing was sent */
	assert_false(eio);
}

static void test_feature_names(void **state)
{
	char buf[512], tiny[12];

	assert_string_equal(devio_ublk_feature_names(DEVIO_UBLK_F_USER_COPY | DEVIO_UBLK_F_USER_RECOVERY,
						     buf, sizeof(buf)), "user-recovery user-copy");
	assert_string_equal(devio_ublk_feature_names(DEVIO_UBLK_F_AUTO_BUF_REG | (1ull << 40), buf,
						     sizeof(buf)), "auto-buf-reg bit-40");
	assert_string_equal(devio_ublk_feature_names(0, buf, sizeof(buf)), "");
	/* a short buffer is cut, never overrun */
	devio_ublk_feature_names(~0ull, tiny, sizeof(tiny));
	assert_true(strlen(tiny) < sizeof(tiny));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_read_write),
		cmocka_unit_test(test_other_ops),
		cmocka_unit_test(test_unknown_ops),
		cmocka_unit_test(test_bad_ranges),
		cmocka_unit_test(test_parse_dev),
		cmocka_unit_test(test_pick_copy),
		cmocka_unit_test(test_feature_names),
		cmocka_unit_test(test_pick_batch),
		cmocka_unit_test(test_batch_tags),
		cmocka_unit_test(test_commit_outcome),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
