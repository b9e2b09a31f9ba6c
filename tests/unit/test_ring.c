/* test_ring.c - the queue ring (lib/ring.c) and the core's rule for the
 * caller's ring (devio_submit with req->ring): with a real io_uring and a
 * fake backend whose ring_submit queues NOPs, which requests go on the
 * ring (READ, WRITE, FLUSH on the ring's thread) and which take the usual
 * way (TRIM, FUA without DEVIO_CAP_PWRITE_FUA, empty, declined, out of
 * range, or started on a worker thread); every request reaches the owner's
 * done() exactly once, on the ring's thread, including those finished on
 * the worker pool (the inbox); more SQEs queued from a CQE (a short
 * transfer) work; the thread does not end while a request is out; big
 * work goes to an idle peer ring's thread (devio_ring_share), small work
 * and work from a thread that has begun nothing in its pass does not. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <time.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include "devio/backend.h"
#include "devio/request.h"
#include "devio/ring.h"
#include "devio/workers.h"

#define FAKE_SIZE 65536u
#define DECLINE_FROM 32768u /* ring_submit declines reads from here on */
#define NREQ 8

struct fake {
	struct devio_backend b;
	unsigned char data[FAKE_SIZE];
	_Atomic int ring_submits, ring_cqes, syncs, flushes; /* syncs: also on workers */
};

static struct fake fk;

static int fake_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	fk.syncs++;
	memcpy(buf, fk.data + off, len);
	return 0;
}

static int fake_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	fk.syncs++;
	memcpy(fk.data + off, buf, len);
	return 0;
}

static int fake_flush(struct devio_backend *b)
{
	fk.flushes++;
	return 0;
}

static int fake_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	fk.syncs++;
	memset(fk.data + off, 0, len);
	return 0;
}

/* A NOP for the first 4096 bytes; ring_cqe queues the rest (a short transfer). */
static void fake_queue(struct devio_request *req, struct devio_ring *ring)
{
	struct io_uring_sqe *sqe = devio_ring_get_sqe(ring);

	assert_non_null(sqe);
	io_uring_prep_nop(sqe);
	devio_ring_sqe_request(sqe, req);
}

static int fake_ring_submit(struct devio_backend *b, struct devio_request *req, struct devio_ring *ring)
{
	assert_true(devio_ring_is_current(ring));
	if (req->op == DEVIO_OP_READ && req->offset >= DECLINE_FROM)
		return -EAGAIN;
	fk.ring_submits++;
	req->priv[0] = 0;
	fake_queue(req, ring);
	return 0;
}

static void fake_ring_cqe(struct devio_backend *b, struct devio_request *req, int res)
{
	uint64_t n = req->length - req->priv[0] > 4096 ? 4096 : req->length - req->priv[0];

	assert_int_equal(res, 0);
	assert_true(devio_ring_is_current(req->ring));
	fk.ring_cqes++;
	if (req->op == DEVIO_OP_READ)
		memcpy((char *)req->buf + req->priv[0], fk.data + req->offset + req->priv[0], n);
	else if (req->op == DEVIO_OP_WRITE)
		memcpy(fk.data + req->offset + req->priv[0], (char *)req->buf + req->priv[0], n);
	req->priv[0] += n;
	if (req->priv[0] < req->length) {
		fake_queue(req, req->ring);
		return;
	}
	req->result = 0;
	req->complete(req);
}

static const struct devio_backend_ops fake_ops = {
	.name = "fake",
	.pread = fake_pread,
	.pwrite = fake_pwrite,
	.flush = fake_flush,
	.trim = fake_trim,
	.ring_submit = fake_ring_submit,
	.ring_cqe = fake_ring_cqe,
};

static void fake_init(void)
{
	memset(&fk, 0, sizeof(fk));
	for (unsigned i = 0; i < FAKE_SIZE; i++)
		fk.data[i] = (unsigned char)(i * 7 + 3);
	fk.b.ops = &fake_ops;
	fk.b.size = FAKE_SIZE;
	fk.b.block_size = 1;
	fk.b.caps = DEVIO_CAP_FLUSH | DEVIO_CAP_FUA | DEVIO_CAP_TRIM;
	fk.b.priv = &fk;
}

/* The owner: submits reqs[] from setup, records done(). */
struct scene {
	struct devio_request reqs[NREQ];
	unsigned char bufs[NREQ][16384];
	int done[NREQ];
	int done_off_thread;
	unsigned n;
};

static int scene_setup(struct devio_ring *r, void *ctx)
{
	struct scene *sc = ctx;

	for (unsigned i = 0; i < sc->n; i++) {
		sc->reqs[i].opaque = &sc->done[i];
		sc->reqs[i].buf = sc->bufs[i];
		devio_ring_submit(r, &fk.b, &sc->reqs[i]);
	}
	return 0;
}

static void scene_cqe(struct devio_ring *r, void *ctx, void *data, int res)
{
	fail_msg("no owner SQE was queued");
}

static void scene_done(struct devio_ring *r, void *ctx, struct devio_request *req)
{
	struct scene *sc = ctx;

	if (!devio_ring_is_current(r))
		sc->done_off_thread++;
	(*(int *)req->opaque)++;
}

/* Ends as soon as nothing is out: the ring must still wait for them. */
static bool scene_finished(struct devio_ring *r, void *ctx)
{
	return true;
}

static const struct devio_ring_owner scene_owner = {
	.setup = scene_setup,
	.cqe = scene_cqe,
	.done = scene_done,
	.finished = scene_finished,
};

static void scene_run(struct scene *sc, struct devio_workers *w, struct devio_ring_stats *st)
{
	struct devio_ring_params p = { .name = "test ring", .entries = 4, .workers = w,
				       .owner = &scene_owner, .ctx = sc };
	struct devio_ring *r;

	assert_int_equal(devio_ring_start(&p, &r), 0);
	devio_ring_free(r, st); /* joins: the thread ends once every request is done */
	for (unsigned i = 0; i < sc->n; i++)
		assert_int_equal(sc->done[i], 1);
	assert_int_equal(sc->done_off_thread, 0);
}

static void req_set(struct devio_request *req, enum devio_op op, uint32_t flags, uint64_t off, uint64_t len)
{
	req->op = op;
	req->flags = flags;
	req->offset = off;
	req->length = len;
}

static void test_core_puts_io_on_the_callers_ring(void **state)
{
	static struct scene sc;
	struct devio_ring_stats st;

	fake_init();
	memset(&sc, 0, sizeof(sc));
	req_set(&sc.reqs[0], DEVIO_OP_READ, 0, 4096, 10000);        /* ring, 3 NOPs */
	req_set(&sc.reqs[1], DEVIO_OP_WRITE, 0, 0, 4096);           /* ring */
	req_set(&sc.reqs[2], DEVIO_OP_FLUSH, 0, 0, 0);              /* ring */
	req_set(&sc.reqs[3], DEVIO_OP_WRITE, DEVIO_REQ_FUA, 24576, 512); /* no PWRITE_FUA: sync + flush */
	req_set(&sc.reqs[4], DEVIO_OP_TRIM, 0, 16384, 4096);        /* sync */
	req_set(&sc.reqs[5], DEVIO_OP_READ, 0, DECLINE_FROM, 4096); /* declined: sync */
	req_set(&sc.reqs[6], DEVIO_OP_READ, 0, 0, 0);               /* empty: sync, nothing to do */
	req_set(&sc.reqs[7], DEVIO_OP_READ, 0, FAKE_SIZE, 4096);    /* out of range */
	memset(sc.bufs[1], 0xab, 4096);
	sc.n = NREQ;
	scene_run(&sc, NULL, &st);
	assert_int_equal(fk.ring_submits, 3);
	assert_int_equal(fk.ring_cqes, 3 + 1 + 1);
	assert_int_equal(st.ring_ios, 5);
	assert_int_equal(fk.syncs, 3);
	assert_int_equal(fk.flushes, 1);
	for (unsigned i = 0; i < 7; i++)
		assert_int_equal(sc.reqs[i].result, 0);
	assert_int_equal(sc.reqs[7].result, -EINVAL);
	for (unsigned i = 0; i < 10000; i++)
		assert_int_equal(sc.bufs[0][i], (unsigned char)((4096 + i) * 7 + 3));
	assert_int_equal(fk.data[100], 0xab);
	assert_int_equal(fk.data[16384], 0);
	assert_int_equal(memcmp(sc.bufs[5], fk.data + DECLINE_FROM, 4096), 0);
}

/* On the pool the requests run on worker threads: never on the ring (its
 * SQEs are its thread's), and their completions come back through the
 * inbox to done() on the ring's thread. */
static void test_pool_completions_come_back_through_the_inbox(void **state)
{
	static struct scene sc;
	struct devio_workers *w = devio_workers_new(3);
	struct devio_ring_stats st;

	assert_non_null(w);
	fake_init();
	memset(&sc, 0, sizeof(sc));
	for (unsigned i = 0; i < NREQ; i++)
		req_set(&sc.reqs[i], DEVIO_OP_READ, 0, i * 4096, 4096);
	sc.n = NREQ;
	scene_run(&sc, w, &st);
	devio_workers_free(w);
	assert_int_equal(fk.ring_submits, 0);
	assert_int_equal(st.ring_ios, 0);
	assert_int_equal(fk.syncs, NREQ);
	for (unsigned i = 0; i < NREQ; i++) {
		assert_int_equal(sc.reqs[i].result, 0);
		assert_int_equal(memcmp(sc.bufs[i], fk.data + i * 4096, 4096), 0);
	}
}

/* A setup that fails: devio_ring_start returns its error, nothing leaks. */
static int failing_setup(struct devio_ring *r, void *ctx)
{
	return -EPROTO;
}

static void test_failed_setup(void **state)
{
	static const struct devio_ring_owner owner = {
		.setup = failing_setup, .cqe = scene_cqe, .done = scene_done, .finished = scene_finished,
	};
	struct devio_ring_params p = { .name = "test ring", .entries = 4, .owner = &owner };
	struct devio_ring *r = (struct devio_ring *)&p;

	assert_int_equal(devio_ring_start(&p, &r), -EPROTO);
	assert_null(r);
}

/* Two peer rings: A begins a request, then offers work to B. */
struct peers {
	struct devio_ring *rings[2];
	struct devio_request req;
	unsigned char buf[4096];
	struct devio_ring_msg msg;
	atomic_bool stop;
	atomic_int posted, posted_on_b, shared, small_shared, idle_shared;
};

static struct peers pe;

static int peer_setup(struct devio_ring *r, void *ctx)
{
	if (ctx == &pe.rings[0]) { /* A: nothing begun yet in this pass, so nothing to share */
		pe.rings[0] = r;
		pe.idle_shared = devio_ring_share(r, pe.rings, 2, 0, 1u << 20, &pe.msg);
		req_set(&pe.req, DEVIO_OP_READ, 0, 0, 4096);
		pe.req.buf = pe.buf;
		devio_ring_submit(r, &fk.b, &pe.req);
	}
	return 0;
}

/* A's request is done: begin it again, then offer B a small and a big piece. */
static void peer_done(struct devio_ring *r, void *ctx, struct devio_request *req)
{
	struct timespec pause = { 0, 10 * 1000 * 1000 };

	if (ctx != &pe.rings[0] || pe.shared)
		return;
	devio_ring_submit(r, &fk.b, req);
	pe.small_shared = devio_ring_share(r, pe.rings, 2, 0, DEVIO_RING_SHARE_MIN - 1, &pe.msg);
	for (int i = 0; i < 500 && !pe.shared; i++) { /* until B waits */
		pe.shared = devio_ring_share(r, pe.rings, 2, 0, DEVIO_RING_SHARE_MIN, &pe.msg);
		if (!pe.shared)
			nanosleep(&pause, NULL);
	}
}

static void peer_post(struct devio_ring *r, void *ctx, struct devio_ring_msg *m)
{
	assert_ptr_equal(m, &pe.msg);
	pe.posted++;
	if (ctx == &pe.rings[1] && devio_ring_is_current(pe.rings[1]))
		pe.posted_on_b++;
}

static bool peer_finished(struct devio_ring *r, void *ctx)
{
	return atomic_load(&pe.stop);
}

static void test_big_work_goes_to_an_idle_peer(void **state)
{
	static const struct devio_ring_owner owner = {
		.setup = peer_setup, .cqe = scene_cqe, .done = peer_done, .finished = peer_finished, .post = peer_post,
	};
	struct devio_ring_params p = { .name = "peer", .entries = 8, .owner = &owner };
	struct timespec pause = { 0, 10 * 1000 * 1000 };

	fake_init();
	memset(&pe, 0, sizeof(pe));
	p.ctx = &pe.rings[1]; /* B first: A offers work as soon as it runs */
	assert_int_equal(devio_ring_start(&p, &pe.rings[1]), 0);
	p.ctx = &pe.rings[0];
	assert_int_equal(devio_ring_start(&p, &pe.rings[0]), 0);
	for (int i = 0; i < 500 && !pe.posted; i++)
		nanosleep(&pause, NULL);
	atomic_store(&pe.stop, true);
	devio_ring_stop(pe.rings[0]);
	devio_ring_stop(pe.rings[1]);
	devio_ring_join(pe.rings[0]);
	devio_ring_join(pe.rings[1]);
	devio_ring_free(pe.rings[0], NULL);
	devio_ring_free(pe.rings[1], NULL);
	assert_false(pe.idle_shared);
	assert_false(pe.small_shared);
	assert_true(pe.shared);
	assert_int_equal(pe.posted, 1);
	assert_int_equal(pe.posted_on_b, 1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_core_puts_io_on_the_callers_ring),
		cmocka_unit_test(test_pool_completions_come_back_through_the_inbox),
		cmocka_unit_test(test_failed_setup),
		cmocka_unit_test(test_big_work_goes_to_an_idle_peer),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
