/* test_request.c - the request core's contract, with a fake backend that
 * records what it was asked: range, overflow and read-only checks, FUA as
 * a flush after for every op that changes bytes, ZERO written as zeroes
 * where the backend has no zero (never for FAST_ZERO), a submit that
 * declines (-EAGAIN) run synchronously, and the three ways to run a
 * request (devio_submit, devio_execute, devio_run) agreeing, and the one
 * policy of which backends a front end hands to a worker pool. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include "devio/backend.h"
#include "devio/request.h"
#include "devio/workers.h"

#define FAKE_SIZE 65536u

struct fake {
	struct devio_backend b;
	unsigned char data[FAKE_SIZE];
	int writes, flushes, zeroes, trims, submits;
	int submit_result; /* what submit returns: 0 = it ran the request */
};

static struct fake *to_fake(struct devio_backend *b) { return b->priv; }

static int fake_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	memcpy(buf, to_fake(b)->data + off, len);
	return 0;
}

static int fake_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	to_fake(b)->writes++;
	memcpy(to_fake(b)->data + off, buf, len);
	return 0;
}

static int fake_flush(struct devio_backend *b)
{
	to_fake(b)->flushes++;
	return 0;
}

static int fake_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	to_fake(b)->trims++;
	memset(to_fake(b)->data + off, 0, len);
	return 0;
}

static int fake_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	to_fake(b)->zeroes++;
	memset(to_fake(b)->data + off, 0, len);
	return 0;
}

static int fake_submit(struct devio_backend *b, struct devio_request *req)
{
	struct fake *f = to_fake(b);

	f->submits++;
	if (f->submit_result)
		return f->submit_result;
	req->result = 0;
	req->complete(req);
	return 0;
}

static struct devio_backend_ops fake_ops;

static void fake_init(struct fake *f, bool with_zero, bool with_submit)
{
	memset(f, 0, sizeof(*f));
	memset(&fake_ops, 0, sizeof(fake_ops));
	fake_ops.name = "fake";
	fake_ops.pread = fake_pread;
	fake_ops.pwrite = fake_pwrite;
	fake_ops.flush = fake_flush;
	fake_ops.trim = fake_trim;
	fake_ops.zero = with_zero ? fake_zero : NULL;
	fake_ops.submit = with_submit ? fake_submit : NULL;
	f->b.ops = &fake_ops;
	f->b.size = FAKE_SIZE;
	f->b.block_size = 1;
	f->b.priv = f;
	memset(f->data, 0xa5, sizeof(f->data));
}

static int completions, last_result;

static void on_complete(struct devio_request *req)
{
	completions++;
	last_result = req->result;
}

/* Submit and return the result complete() saw (exactly once). */
static int submit(struct fake *f, enum devio_op op, uint64_t off, uint64_t len, uint32_t flags, void *buf)
{
	struct devio_request req = { .op = op, .offset = off, .length = len, .flags = flags, .buf = buf,
				     .complete = on_complete };

	completions = 0;
	devio_submit(&f->b, &req);
	assert_int_equal(completions, 1);
	return last_result;
}

static void test_range_and_overflow_checks(void **state)
{
	struct fake f;
	char buf[16];

	fake_init(&f, true, false);
	assert_int_equal(submit(&f, DEVIO_OP_READ, FAKE_SIZE - 16, 16, 0, buf), 0);
	assert_int_equal(submit(&f, DEVIO_OP_READ, FAKE_SIZE - 15, 16, 0, buf), -EINVAL);
	assert_int_equal(submit(&f, DEVIO_OP_READ, UINT64_MAX - 4, 16, 0, buf), -EINVAL); /* wraps */
	assert_int_equal(submit(&f, DEVIO_OP_WRITE, 8, UINT64_MAX, 0, buf), -ENOSPC);
	assert_int_equal(submit(&f, DEVIO_OP_ZERO, FAKE_SIZE, 1, 0, NULL), -ENOSPC);
	assert_int_equal(submit(&f, DEVIO_OP_TRIM, FAKE_SIZE + 1, 0, 0, NULL), -EINVAL);
	assert_int_equal(submit(&f, DEVIO_OP_READ, 0, 16, 0, NULL), -EFAULT);
	assert_int_equal(submit(&f, (enum devio_op)99, 0, 0, 0, NULL), -EINVAL);
	assert_int_equal(f.writes + f.zeroes + f.trims, 0);
	f.b.caps |= DEVIO_CAP_READONLY;
	assert_int_equal(submit(&f, DEVIO_OP_WRITE, 0, 16, 0, buf), -EROFS);
	assert_int_equal(submit(&f, DEVIO_OP_ZERO, 0, 16, 0, NULL), -EROFS);
	assert_int_equal(submit(&f, DEVIO_OP_TRIM, 0, 16, 0, NULL), -EROFS);
	assert_int_equal(submit(&f, DEVIO_OP_FLUSH, 0, 0, 0, NULL), 0);
	assert_int_equal(submit(&f, DEVIO_OP_READ, 0, 16, 0, buf), 0);
}

static void test_fua_is_a_flush_after_every_change(void **state)
{
	struct fake f;
	char buf[16] = "sixteen bytes!!";

	fake_init(&f, true, false);
	assert_int_equal(submit(&f, DEVIO_OP_WRITE, 0, 16, 0, buf), 0);
	assert_int_equal(f.flushes, 0);
	assert_int_equal(submit(&f, DEVIO_OP_WRITE, 0, 16, DEVIO_REQ_FUA, buf), 0);
	assert_int_equal(f.flushes, 1);
	assert_int_equal(submit(&f, DEVIO_OP_ZERO, 0, 16, DEVIO_REQ_FUA, NULL), 0);
	assert_int_equal(f.flushes, 2);
	assert_int_equal(submit(&f, DEVIO_OP_TRIM, 0, 16, DEVIO_REQ_FUA, NULL), 0);
	assert_int_equal(f.flushes, 3);
	assert_int_equal(submit(&f, DEVIO_OP_FLUSH, 0, 0, 0, NULL), 0);
	assert_int_equal(f.flushes, 4);
	/* a pwrite that honours FUA itself (RWF_DSYNC) gets no second sync */
	f.b.caps |= DEVIO_CAP_PWRITE_FUA;
	assert_int_equal(submit(&f, DEVIO_OP_WRITE, 0, 16, DEVIO_REQ_FUA, buf), 0);
	assert_int_equal(f.flushes, 4);
	assert_int_equal(submit(&f, DEVIO_OP_ZERO, 0, 16, DEVIO_REQ_FUA, NULL), 0);
	assert_int_equal(f.flushes, 5);
}

static void test_zero_without_callback_writes_zeroes(void **state)
{
	static const unsigned char zeroes[300];
	struct fake f;

	fake_init(&f, false, false);
	assert_int_equal(submit(&f, DEVIO_OP_ZERO, 100, 300, 0, NULL), 0);
	assert_memory_equal(f.data + 100, zeroes, 300);
	assert_int_equal(f.data[99], 0xa5);
	assert_int_equal(f.data[400], 0xa5);
	assert_true(f.writes > 0);
	f.writes = 0;
	memset(f.data, 0xa5, sizeof(f.data));
	assert_int_equal(submit(&f, DEVIO_OP_ZERO, 100, 300, DEVIO_REQ_FAST_ZERO, NULL), -EOPNOTSUPP);
	assert_int_equal(f.writes, 0);
	assert_int_equal(f.data[100], 0xa5);
	/* neither zero nor pwrite: refused, never a call through NULL */
	fake_ops.pwrite = NULL;
	assert_int_equal(submit(&f, DEVIO_OP_ZERO, 100, 300, 0, NULL), -EROFS);
}

static void test_declined_submit_runs_synchronously(void **state)
{
	struct fake f;
	char buf[16] = "sixteen bytes!!", back[16];

	fake_init(&f, true, true);
	assert_int_equal(submit(&f, DEVIO_OP_WRITE, 32, 16, 0, buf), 0);
	assert_int_equal(f.submits, 1);
	assert_int_equal(f.writes, 0); /* submit ran it */
	f.submit_result = -EAGAIN;
	assert_int_equal(submit(&f, DEVIO_OP_WRITE, 32, 16, DEVIO_REQ_FUA, buf), 0);
	assert_int_equal(f.writes, 1);
	assert_int_equal(f.flushes, 1);
	assert_int_equal(submit(&f, DEVIO_OP_READ, 32, 16, 0, back), 0);
	assert_memory_equal(back, buf, 16);
	f.submit_result = -EIO; /* a real failure is the answer, not a reason to retry */
	f.writes = 0;
	assert_int_equal(submit(&f, DEVIO_OP_WRITE, 32, 16, 0, buf), -EIO);
	assert_int_equal(f.writes, 0);
	/* a request that fails the checks never reaches submit */
	f.submits = 0;
	assert_int_equal(submit(&f, DEVIO_OP_WRITE, FAKE_SIZE, 16, 0, buf), -ENOSPC);
	assert_int_equal(f.submits, 0);
}

static void test_execute_and_run_agree(void **state)
{
	struct fake f;
	char buf[16] = "sixteen bytes!!";
	struct devio_request req;

	fake_init(&f, false, true);
	req = (struct devio_request){ .op = DEVIO_OP_WRITE, .offset = 0, .length = 16, .buf = buf,
				      .flags = DEVIO_REQ_FUA };
	assert_int_equal(devio_execute(&f.b, &req), 0);
	assert_int_equal(f.submits, 1);
	req = (struct devio_request){ .op = DEVIO_OP_WRITE, .offset = 0, .length = 16, .buf = buf,
				      .flags = DEVIO_REQ_FUA };
	assert_int_equal(devio_run(&f.b, &req), 0);
	assert_int_equal(f.submits, 1); /* devio_run never submits */
	assert_int_equal(f.writes, 1);
	assert_int_equal(f.flushes, 1);
	req = (struct devio_request){ .op = DEVIO_OP_ZERO, .offset = 0, .length = 16 };
	assert_int_equal(devio_run(&f.b, &req), 0);
	assert_int_equal(f.data[0], 0);
	req = (struct devio_request){ .op = DEVIO_OP_READ, .offset = FAKE_SIZE, .length = 1, .buf = buf };
	assert_int_equal(devio_run(&f.b, &req), -EINVAL);
	assert_int_equal(req.result, -EINVAL);
	req = (struct devio_request){ .op = DEVIO_OP_READ, .offset = FAKE_SIZE, .length = 1, .buf = buf };
	assert_int_equal(devio_execute(&f.b, &req), -EINVAL);
}

static void test_pool_policy(void **state)
{
	struct fake f;

	fake_init(&f, true, true); /* asynchronous: never pooled */
	assert_false(devio_wants_pool(&f.b, 0));
	assert_false(devio_wants_pool(&f.b, 4));
	fake_init(&f, true, false); /* blocking by default: pooled unless --threads 1 */
	assert_true(devio_wants_pool(&f.b, 0));
	assert_false(devio_wants_pool(&f.b, 1));
	assert_true(devio_wants_pool(&f.b, 4));
	f.b.run = DEVIO_RUN_CPU; /* in memory: inline unless --threads N > 1 */
	assert_false(devio_wants_pool(&f.b, 0));
	assert_false(devio_wants_pool(&f.b, 1));
	assert_true(devio_wants_pool(&f.b, 4));
	assert_int_equal(devio_pool_size(4), 4);
	assert_true(devio_pool_size(0) > 1);
	assert_int_equal(devio_pool_size(1), devio_pool_size(0));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_range_and_overflow_checks),
		cmocka_unit_test(test_fua_is_a_flush_after_every_change),
		cmocka_unit_test(test_zero_without_callback_writes_zeroes),
		cmocka_unit_test(test_declined_submit_runs_synchronously),
		cmocka_unit_test(test_execute_and_run_agree),
		cmocka_unit_test(test_pool_policy),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
