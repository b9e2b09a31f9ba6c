/* test_request.c - the request core's contract, with a fake backend that
 * records what it was asked: range, overflow and read-only checks, FUA as
 * a flush after for every op that changes bytes, ZERO written as zeroes
 * where the backend has no zero (never for FAST_ZERO), a submit that
 * declines (-EAGAIN) run synchronously, and the three ways to run a
 * request (devio_submit, devio_execute, devio_run) agreeing, and the one
 * policy of which backends a front end hands to a worker pool; the buffer
 * kinds (in place, pipe, registered pages) under the same checks and FUA rule; a layer that
 * remaps requests forwarding every kind to the store's own paths; a
 * format layer's fast path (try_remap) and its accounting. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include "devio/backend.h"
#include "devio/layer.h"
#include "devio/request.h"
#include "devio/workers.h"

#define FAKE_SIZE 65536u

struct fake {
	struct devio_backend b;
	unsigned char data[FAKE_SIZE];
	int writes, flushes, zeroes, trims, submits, maps, unmaps, splices;
	int submit_result; /* what submit returns: 0 = it ran the request */
	uint64_t last_off;  /* offset of the last request that reached it */
	struct iovec piece; /* what map hands out */
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

/* In place: one piece of data[], as a RAM disk would give. */
static int fake_map(struct devio_backend *b, struct devio_request *req)
{
	struct fake *f = to_fake(b);

	f->maps++;
	f->last_off = req->offset;
	req->iov[0].iov_base = f->data + req->offset;
	req->iov[0].iov_len = req->length;
	req->iovcnt = 1;
	return 0;
}

static void fake_unmap(struct devio_backend *b, struct devio_request *req)
{
	to_fake(b)->unmaps++;
	to_fake(b)->last_off = req->offset;
}

/* A pipe: only counted, the fd is never touched. */
static int fake_splice(struct devio_backend *b, struct devio_request *req)
{
	to_fake(b)->splices++;
	to_fake(b)->last_off = req->offset;
	return 0;
}

static int fake_submit(struct devio_backend *b, struct devio_request *req)
{
	struct fake *f = to_fake(b);

	f->submits++;
	f->last_off = req->offset;
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
	fake_ops.map = fake_map;
	fake_ops.unmap = fake_unmap;
	fake_ops.splice = fake_splice;
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
static int submit_to(struct devio_backend *b, enum devio_op op, uint64_t off, uint64_t len, uint32_t flags,
		     void *buf)
{
	struct devio_request req = { .op = op, .offset = off, .length = len, .flags = flags, .buf = buf,
				     .complete = on_complete };

	completions = 0;
	devio_submit(b, &req);
	assert_int_equal(completions, 1);
	return last_result;
}

static int submit(struct fake *f, enum devio_op op, uint64_t off, uint64_t len, uint32_t flags, void *buf)
{
	return submit_to(&f->b, op, off, len, flags, buf);
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

/* A request with another kind of buffer: run with devio_run(). */
static int run_kind(struct devio_backend *b, enum devio_op op, enum devio_buf_kind kind, uint64_t off,
		    uint64_t len, uint32_t flags, struct devio_request *req)
{
	static struct iovec v[4];

	*req = (struct devio_request){ .op = op, .offset = off, .length = len, .flags = flags, .kind = kind,
				       .iov = v, .iovcnt = 4, .pipe_fd = 99 };
	return devio_run(b, req);
}

/* In place and pipe buffers: offered by the caps, checked like memory,
 * FUA once (for an in-place write at devio_map_end), never through the
 * asynchronous path. */
static void test_buffer_kinds(void **state)
{
	struct devio_request req;
	struct fake f;

	fake_init(&f, true, true);
	assert_int_equal(run_kind(&f.b, DEVIO_OP_READ, DEVIO_BUF_MAP, 0, 16, 0, &req), -EOPNOTSUPP);
	assert_int_equal(run_kind(&f.b, DEVIO_OP_WRITE, DEVIO_BUF_PIPE, 0, 16, 0, &req), -EOPNOTSUPP);
	f.b.caps |= DEVIO_CAP_MAP | DEVIO_CAP_SPLICE_WRITE;
	assert_int_equal(run_kind(&f.b, DEVIO_OP_READ, DEVIO_BUF_PIPE, 0, 16, 0, &req), -EOPNOTSUPP);
	assert_int_equal(run_kind(&f.b, DEVIO_OP_READ, DEVIO_BUF_MAP, 100, 16, 0, &req), 0);
	assert_int_equal(req.iovcnt, 1);
	assert_ptr_equal(req.iov[0].iov_base, f.data + 100);
	/* the same range checks and error codes as for memory */
	assert_int_equal(run_kind(&f.b, DEVIO_OP_READ, DEVIO_BUF_MAP, FAKE_SIZE - 1, 2, 0, &req), -EINVAL);
	assert_int_equal(run_kind(&f.b, DEVIO_OP_WRITE, DEVIO_BUF_MAP, UINT64_MAX, 2, 0, &req), -ENOSPC);
	assert_int_equal(run_kind(&f.b, DEVIO_OP_WRITE, DEVIO_BUF_PIPE, FAKE_SIZE, 1, 0, &req), -ENOSPC);
	assert_int_equal(run_kind(&f.b, DEVIO_OP_ZERO, DEVIO_BUF_PIPE, 0, 1, 0, &req), -EINVAL);
	assert_int_equal(f.maps + f.splices, 1);
	/* an in-place FUA write: flushed once, after its bytes are in */
	assert_int_equal(run_kind(&f.b, DEVIO_OP_WRITE, DEVIO_BUF_MAP, 8, 4, DEVIO_REQ_FUA, &req), 0);
	memcpy(req.iov[0].iov_base, "abcd", 4);
	assert_int_equal(f.flushes, 0);
	assert_int_equal(devio_map_end(&req), 0);
	assert_int_equal(f.unmaps, 1);
	assert_int_equal(f.flushes, 1);
	assert_memory_equal(f.data + 8, "abcd", 4);
	/* a pipe FUA write: flushed after, even where pwrite does FUA itself */
	f.b.caps |= DEVIO_CAP_PWRITE_FUA;
	assert_int_equal(run_kind(&f.b, DEVIO_OP_WRITE, DEVIO_BUF_PIPE, 0, 16, DEVIO_REQ_FUA, &req), 0);
	assert_int_equal(f.splices, 1);
	assert_int_equal(f.flushes, 2);
	/* devio_submit runs them here, never through submit */
	req = (struct devio_request){ .op = DEVIO_OP_WRITE, .length = 16, .kind = DEVIO_BUF_PIPE, .pipe_fd = 99,
				      .complete = on_complete };
	completions = 0;
	devio_submit(&f.b, &req);
	assert_int_equal(completions, 1);
	assert_int_equal(f.splices, 2);
	assert_int_equal(f.submits, 0);
	/* read-only wins over every kind */
	f.b.caps |= DEVIO_CAP_READONLY;
	assert_int_equal(run_kind(&f.b, DEVIO_OP_WRITE, DEVIO_BUF_MAP, 0, 1, 0, &req), -EROFS);
	assert_int_equal(run_kind(&f.b, DEVIO_OP_WRITE, DEVIO_BUF_PIPE, 0, 1, 0, &req), -EROFS);
	/* no room for pieces */
	f.b.caps &= ~DEVIO_CAP_READONLY;
	req = (struct devio_request){ .op = DEVIO_OP_READ, .length = 1, .kind = DEVIO_BUF_MAP };
	assert_int_equal(devio_run(&f.b, &req), -EFAULT);
	assert_int_equal(f.maps, 2);
}

static int fake_ring_submit(struct devio_backend *b, struct devio_request *req, struct devio_ring *ring)
{
	to_fake(b)->submits++;
	return -EAGAIN;
}

static void fake_ring_cqe(struct devio_backend *b, struct devio_request *req, int res)
{
}

/* Registered pages (DEVIO_BUF_FIXED): only a store that says so takes
 * them, only on a ring, never run synchronously; a READ or WRITE only. */
static void test_fixed_buffers_refused(void **state)
{
	struct devio_request req;
	struct fake f;

	fake_init(&f, true, true);
	assert_false(devio_backend_takes_fixed(&f.b));
	assert_int_equal(run_kind(&f.b, DEVIO_OP_READ, DEVIO_BUF_FIXED, 0, 16, 0, &req), -EOPNOTSUPP);
	fake_ops.ring_submit = fake_ring_submit;
	fake_ops.ring_cqe = fake_ring_cqe;
	f.b.caps |= DEVIO_CAP_FIXED;
	assert_true(devio_backend_takes_fixed(&f.b));
	/* the pages are out of reach of every synchronous path */
	req = (struct devio_request){ .op = DEVIO_OP_READ, .length = 16, .kind = DEVIO_BUF_FIXED };
	assert_int_equal(devio_run(&f.b, &req), -EOPNOTSUPP);
	assert_int_equal(devio_execute(&f.b, &req), -EOPNOTSUPP);
	/* devio_submit: no ring to name them in, or not a READ/WRITE */
	req = (struct devio_request){ .op = DEVIO_OP_WRITE, .length = 16, .kind = DEVIO_BUF_FIXED,
				      .complete = on_complete };
	completions = 0;
	devio_submit(&f.b, &req);
	assert_int_equal(completions, 1);
	assert_int_equal(last_result, -EINVAL);
	req = (struct devio_request){ .op = DEVIO_OP_TRIM, .length = 16, .kind = DEVIO_BUF_FIXED,
				      .complete = on_complete };
	devio_submit(&f.b, &req);
	assert_int_equal(last_result, -EINVAL);
	assert_int_equal(f.submits + f.writes, 0);
	/* FUA must ride on the write: refused where pwrite cannot do it */
	req = (struct devio_request){ .op = DEVIO_OP_WRITE, .length = 16, .kind = DEVIO_BUF_FIXED,
				      .flags = DEVIO_REQ_FUA };
	assert_int_equal(devio_request_check(&f.b, &req), -EOPNOTSUPP);
	f.b.caps |= DEVIO_CAP_READONLY;
	assert_int_equal(devio_request_check(&f.b, &req), -EROFS);
	fake_ops.ring_submit = NULL;
	assert_false(devio_backend_takes_fixed(&f.b));
}

/* A layer that moves requests by 1000 bytes and shows 4096 of them. */
struct shift {
	struct devio_backend b;
	int remaps;
};

static void shift_remap(struct devio_backend *b, struct devio_request *req)
{
	((struct shift *)b)->remaps++;
	req->offset += 1000;
}

static const struct devio_backend_ops shift_ops = { .name = "shift", .remap = shift_remap };

static void shift_init(struct shift *l, struct devio_backend *lower)
{
	memset(l, 0, sizeof(*l));
	l->b.ops = &shift_ops;
	l->b.lower = lower;
	l->b.size = 4096;
	l->b.caps = lower->caps;
	l->b.run = lower->run;
}

/* Checked against the layer, run on the store's own path with the offset
 * moved, every buffer kind alike; async-ness and pool policy are the
 * store's. */
static void test_layer_forwarding(void **state)
{
	struct devio_request req;
	struct shift l, l2;
	struct fake f;
	char buf[16] = "sixteen bytes!!";

	fake_init(&f, true, true);
	shift_init(&l, &f.b);
	assert_true(devio_backend_async(&l.b));
	assert_false(devio_wants_pool(&l.b, 0));
	assert_int_equal(submit_to(&l.b, DEVIO_OP_WRITE, 10, 16, 0, buf), 0);
	assert_int_equal(f.submits, 1); /* the store's asynchronous path */
	assert_int_equal(f.last_off, 1010);
	assert_int_equal(l.remaps, 1);
	/* the layer's size bounds it, before anything moves */
	assert_int_equal(submit_to(&l.b, DEVIO_OP_WRITE, 4090, 16, 0, buf), -ENOSPC);
	assert_int_equal(submit_to(&l.b, DEVIO_OP_READ, 4096, 1, 0, buf), -EINVAL);
	assert_int_equal(l.remaps, 1);
	/* devio_run: synchronously on the store, req->backend the store */
	req = (struct devio_request){ .op = DEVIO_OP_WRITE, .offset = 20, .length = 16, .buf = buf };
	assert_int_equal(devio_run(&l.b, &req), 0);
	assert_ptr_equal(req.backend, &f.b);
	assert_int_equal(req.offset, 1020); /* moved in place: the front end keeps its own */
	assert_memory_equal(f.data + 1020, buf, 16);
	/* in place and pipes go through unchanged, with the store's checks */
	assert_int_equal(run_kind(&l.b, DEVIO_OP_READ, DEVIO_BUF_MAP, 0, 16, 0, &req), -EOPNOTSUPP);
	f.b.caps |= DEVIO_CAP_MAP | DEVIO_CAP_SPLICE_READ;
	assert_int_equal(run_kind(&l.b, DEVIO_OP_WRITE, DEVIO_BUF_MAP, 30, 4, DEVIO_REQ_FUA, &req), 0);
	assert_ptr_equal(req.iov[0].iov_base, f.data + 1030);
	assert_int_equal(devio_map_end(&req), 0);
	assert_int_equal(f.unmaps, 1);
	assert_int_equal(f.last_off, 1030);
	assert_int_equal(run_kind(&l.b, DEVIO_OP_READ, DEVIO_BUF_PIPE, 40, 8, 0, &req), 0);
	assert_int_equal(f.last_off, 1040);
	/* the layer's read-only bit is the one that counts */
	l.b.caps |= DEVIO_CAP_READONLY;
	assert_int_equal(submit_to(&l.b, DEVIO_OP_TRIM, 0, 16, 0, NULL), -EROFS);
	assert_int_equal(f.trims, 0);
	l.b.caps &= ~DEVIO_CAP_READONLY;
	/* FAST_ZERO is refused by what the store can do */
	fake_ops.zero = NULL;
	assert_int_equal(submit_to(&l.b, DEVIO_OP_ZERO, 0, 16, DEVIO_REQ_FAST_ZERO, NULL), -EOPNOTSUPP);
	/* two layers: both move it */
	shift_init(&l2, &l.b);
	l2.b.size = 2048;
	req = (struct devio_request){ .op = DEVIO_OP_READ, .offset = 5, .length = 16, .buf = buf };
	assert_int_equal(devio_run(&l2.b, &req), 0);
	assert_int_equal(req.offset, 2005);
	/* a layer with data callbacks of its own takes no other buffer kinds
	 * unless it says so: they never reach the store past it */
	{
		static const struct devio_backend_ops own_ops = { .name = "own", .pread = fake_pread };
		struct devio_backend own;

		devio_layer_init(&own, &own_ops, &f.b, ~0u, &f);
		assert_false(own.caps & (DEVIO_CAP_MAP | DEVIO_CAP_SPLICE_READ));
		assert_int_equal(run_kind(&own, DEVIO_OP_READ, DEVIO_BUF_MAP, 0, 16, 0, &req), -EOPNOTSUPP);
		assert_int_equal(run_kind(&own, DEVIO_OP_READ, DEVIO_BUF_PIPE, 0, 16, 0, &req), -EOPNOTSUPP);
		assert_false(devio_backend_async(&own)); /* its callbacks run, not the store's submit */
	}
	/* a synchronous store under a layer: pooled as the store would be */
	fake_init(&f, true, false);
	shift_init(&l, &f.b);
	assert_false(devio_backend_async(&l.b));
	assert_true(devio_wants_pool(&l.b, 0));
}

/* A format layer over the fake (qcow2's shape): data callbacks of its
 * own, and try_remap moving requests below 2048 by 100 bytes. */
struct fmt {
	struct devio_backend b;
	int offers, remaps, dones, slow;
};

static int fmt_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	((struct fmt *)b)->slow++;
	memset(buf, 0, len);
	return 0;
}

static int fmt_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	((struct fmt *)b)->slow++;
	return 0;
}

static bool fmt_try_remap(struct devio_backend *b, struct devio_request *req)
{
	struct fmt *l = (struct fmt *)b;

	l->offers++;
	if (req->offset + req->length > 2048)
		return false;
	l->remaps++;
	req->offset += 100;
	req->remap_tag = 7;
	return true;
}

static void fmt_remap_done(struct devio_backend *b, struct devio_request *req)
{
	assert_int_equal(req->remap_tag, 7);
	((struct fmt *)b)->dones++;
}

static const struct devio_backend_ops fmt_ops = { .name = "fmt", .pread = fmt_pread, .pwrite = fmt_pwrite,
						  .try_remap = fmt_try_remap, .remap_done = fmt_remap_done };

static int pooled_done;

static void on_pooled(struct devio_request *req)
{
	__atomic_store_n(&pooled_done, 1, __ATOMIC_RELEASE);
}

/* Moved requests run on the store's asynchronous path, on the submitting
 * thread even through the pool's entry; the layer hears of each one's end
 * exactly once; the rest (declined, FUA, TRIM) run the layer's callbacks,
 * on the pool where the policy says. */
static void test_format_layer_fast_path(void **state)
{
	struct devio_request req;
	struct devio_workers *w;
	struct fmt l;
	struct fake f;
	char buf[16] = "sixteen bytes!!";

	fake_init(&f, true, true);
	memset(&l, 0, sizeof(l));
	devio_layer_init(&l.b, &fmt_ops, &f.b, ~0u, NULL);
	l.b.size = 4096;
	assert_true(devio_backend_async(&l.b));   /* completions may come from the store's thread */
	assert_true(devio_wants_pool(&l.b, 0));   /* the layer's own callbacks block */
	assert_int_equal(submit_to(&l.b, DEVIO_OP_READ, 10, 16, 0, buf), 0);
	assert_int_equal(f.submits, 1);
	assert_int_equal(f.last_off, 110);
	assert_int_equal(l.dones, 1);
	assert_int_equal(l.slow, 0);
	assert_int_equal(submit_to(&l.b, DEVIO_OP_READ, 3000, 16, 0, buf), 0); /* declined */
	assert_int_equal(l.slow, 1);
	assert_int_equal(f.submits, 1);
	assert_int_equal(l.dones, 1);
	assert_int_equal(submit_to(&l.b, DEVIO_OP_WRITE, 10, 16, DEVIO_REQ_FUA, buf), 0); /* never offered */
	assert_int_equal(submit_to(&l.b, DEVIO_OP_TRIM, 10, 16, 0, NULL), -EOPNOTSUPP);
	assert_int_equal(l.offers, 2);
	assert_int_equal(l.slow, 2);
	/* the store declines its async path: synchronously, still ended once */
	f.submit_result = -EAGAIN;
	assert_int_equal(submit_to(&l.b, DEVIO_OP_WRITE, 20, 16, 0, buf), 0);
	assert_memory_equal(f.data + 120, buf, 16);
	assert_int_equal(l.dones, 2);
	f.submit_result = 0;
	/* devio_run: on the store, ended before it returns */
	req = (struct devio_request){ .op = DEVIO_OP_READ, .offset = 30, .length = 16, .buf = buf };
	assert_int_equal(devio_run(&l.b, &req), 0);
	assert_ptr_equal(req.backend, &f.b);
	assert_null(req.remapper);
	assert_int_equal(l.dones, 3);
	/* the pool's entry: a moved request starts (here: ends) before it returns */
	w = devio_workers_new(1);
	assert_non_null(w);
	completions = 0;
	req = (struct devio_request){ .op = DEVIO_OP_READ, .offset = 40, .length = 16, .buf = buf,
				      .complete = on_complete };
	devio_workers_submit(w, &l.b, &req);
	assert_int_equal(completions, 1);
	assert_int_equal(f.submits, 3);
	assert_int_equal(l.dones, 4);
	/* a declined one goes to a worker, from where the layer stopped */
	pooled_done = 0;
	req = (struct devio_request){ .op = DEVIO_OP_READ, .offset = 3000, .length = 16, .buf = buf,
				      .complete = on_pooled };
	devio_workers_submit(w, &l.b, &req);
	devio_workers_free(w); /* runs what is queued */
	assert_int_equal(__atomic_load_n(&pooled_done, __ATOMIC_ACQUIRE), 1);
	assert_int_equal(l.slow, 3);
	/* READs into a pipe, where the layer offers them: spliced by the
	 * store when moved, else -EAGAIN (into memory instead); never WRITEs */
	f.b.caps |= DEVIO_CAP_SPLICE_READ | DEVIO_CAP_SPLICE_WRITE;
	l.b.caps |= DEVIO_CAP_SPLICE_READ;
	assert_int_equal(run_kind(&l.b, DEVIO_OP_READ, DEVIO_BUF_PIPE, 50, 16, 0, &req), 0);
	assert_int_equal(f.splices, 1);
	assert_int_equal(f.last_off, 150);
	assert_int_equal(run_kind(&l.b, DEVIO_OP_READ, DEVIO_BUF_PIPE, 3000, 16, 0, &req), -EAGAIN);
	assert_int_equal(run_kind(&l.b, DEVIO_OP_WRITE, DEVIO_BUF_PIPE, 50, 16, 0, &req), -EOPNOTSUPP);
	assert_int_equal(f.splices, 1);
	assert_int_equal(l.slow, 3);
	assert_int_equal(l.remaps, l.dones);
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
		cmocka_unit_test(test_buffer_kinds),
		cmocka_unit_test(test_fixed_buffers_refused),
		cmocka_unit_test(test_layer_forwarding),
		cmocka_unit_test(test_format_layer_fast_path),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
