/* ring.c - the queue thread with its own io_uring that FUSE over io_uring
 * and ublk share (include/devio/ring.h): start and stop, SQEs when the
 * queue is full, the inbox for requests finished on other threads, and the
 * CQE dispatch by the kind in user_data. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/ring.h"
#include "devio/util.h"
#include "devio/workers.h"

/* user_data: a pointer (8-byte aligned) with its kind in the low bits */
#define RING_KIND_MASK 3ull
#define RING_KIND_OWNER 0ull   /* the owner's command: owner->cqe */
#define RING_KIND_REQUEST 1ull /* a backend's I/O for a request: ops->ring_cqe */
#define RING_KIND_INBOX 2ull   /* the eventfd read: requests finished elsewhere */
#define RING_STOP_WAIT_NS (100 * 1000 * 1000)
#define RING_FLUSH_WAIT_NS (1000 * 1000) /* owner->flush's own CQEs are seen within 1 ms */
#define RING_MAX_ENTER_FAILURES 1000

struct devio_ring {
	struct io_uring ring;
	bool ring_ok;
	char name[96];
	const struct devio_ring_owner *owner;
	void *ctx;
	struct devio_workers *workers;
	cpu_set_t cpus;
	bool pin;
	unsigned entries, flags, try_flags;
	pthread_t thread;
	pthread_t self;                          /* set by the thread itself */
	int evfd;
	uint64_t evval;                          /* the armed read's target */
	_Atomic(struct devio_request *) inbox;   /* finished on other threads */
	_Atomic(struct devio_ring_msg *) posts;  /* work from other threads (owner->post) */
	atomic_bool idle;                        /* waiting, nothing to do, not claimed */
	struct devio_request *local;             /* finished on this thread */
	unsigned requests;                       /* submitted, not yet done (this thread) */
	unsigned pass_started;                   /* submitted in this pass */
	atomic_bool stopping;
	pthread_mutex_t lock;                    /* start-up handshake */
	pthread_cond_t cond;
	bool started, joined;
	int start_result;
	_Atomic uint64_t enters, ring_ios, max_batch;
	unsigned cqe_flags; /* of the CQE being handed to owner->cqe */
};

unsigned devio_ring_cqe_flags(const struct devio_ring *r)
{
	return r->cqe_flags;
}

bool devio_ring_stopping(const struct devio_ring *r)
{
	return atomic_load(&r->stopping);
}

bool devio_ring_is_current(const struct devio_ring *r)
{
	return pthread_equal(pthread_self(), r->self);
}

struct io_uring *devio_ring_uring(struct devio_ring *r)
{
	return &r->ring;
}

unsigned devio_ring_requests(const struct devio_ring *r)
{
	return r->requests;
}

void devio_ring_get_stats(const struct devio_ring *r, struct devio_ring_stats *out)
{
	out->enters = atomic_load_explicit(&r->enters, memory_order_relaxed);
	out->ring_ios = atomic_load_explicit(&r->ring_ios, memory_order_relaxed);
	out->max_batch = atomic_load_explicit(&r->max_batch, memory_order_relaxed);
}

static void ring_count(_Atomic uint64_t *c)
{
	atomic_fetch_add_explicit(c, 1, memory_order_relaxed);
}

struct io_uring_sqe *devio_ring_get_sqe(struct devio_ring *r)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);

	if (!sqe) {
		io_uring_submit(&r->ring);
		ring_count(&r->enters);
		sqe = io_uring_get_sqe(&r->ring);
	}
	return sqe;
}

static void ring_tag(struct io_uring_sqe *sqe, const void *p, uint64_t kind)
{
	io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)p | kind);
}

void devio_ring_sqe_owner(struct io_uring_sqe *sqe, void *data)
{
	ring_tag(sqe, data, RING_KIND_OWNER);
}

void devio_ring_sqe_request(struct io_uring_sqe *sqe, struct devio_request *req)
{
	ring_tag(sqe, req, RING_KIND_REQUEST);
}

/* Keep a read of the eventfd queued: other threads write it when they put
 * the first request into an empty inbox. */
static void ring_arm_inbox(struct devio_ring *r)
{
	struct io_uring_sqe *sqe = devio_ring_get_sqe(r);

	if (!sqe) {
		devio_err("%s: no submission slot for the completion inbox", r->name);
		return;
	}
	io_uring_prep_read(sqe, r->evfd, &r->evval, sizeof(r->evval), 0);
	ring_tag(sqe, r, RING_KIND_INBOX);
}

void devio_ring_wake(struct devio_ring *r)
{
	uint64_t one = 1;

	if (write(r->evfd, &one, sizeof(one)) < 0)
		devio_warn("%s: eventfd: %s", r->name, strerror(errno));
}

/* Push node onto the lock-free stack *head (an _Atomic pointer to node's
 * own type, linked by node->next) and wake r's thread if the stack was
 * empty (else a wake-up is already on its way).  A macro so that the inbox
 * of requests and the posts keep their own types. */
#define RING_PUSH(r, head, node) \
	do { \
		typeof(node) ring_old_ = atomic_load_explicit(head, memory_order_relaxed); \
		do \
			(node)->next = ring_old_; \
		while (!atomic_compare_exchange_weak_explicit(head, &ring_old_, node, memory_order_release, \
							      memory_order_relaxed)); \
		if (!ring_old_) \
			devio_ring_wake(r); \
	} while (0)

/* req->complete for requests started with devio_ring_submit(). */
static void ring_req_complete(struct devio_request *req)
{
	struct devio_ring *r = req->ring;

	if (devio_ring_is_current(r)) {
		req->next = r->local;
		r->local = req;
		return;
	}
	RING_PUSH(r, &r->inbox, req);
}

void devio_ring_submit(struct devio_ring *r, struct devio_backend *b, struct devio_request *req)
{
	req->ring = r;
	req->complete = ring_req_complete;
	r->requests++;
	r->pass_started++;
	if (r->workers)
		devio_workers_submit(r->workers, b, req);
	else
		devio_submit(b, req);
}

/* Reserve r's thread if it waits with nothing to do (until it has waited
 * again, no other claim succeeds). */
static bool ring_claim_idle(struct devio_ring *r)
{
	bool idle = true;

	return atomic_load_explicit(&r->idle, memory_order_relaxed) && !atomic_load(&r->stopping) &&
	       atomic_compare_exchange_strong(&r->idle, &idle, false);
}

/* owner->post(m) on r's thread in its next pass; woken if it waits. */
static void ring_post(struct devio_ring *r, struct devio_ring_msg *m)
{
	RING_PUSH(r, &r->posts, m);
}

bool devio_ring_share(struct devio_ring *r, struct devio_ring *const *peers, unsigned n, unsigned from,
		      uint64_t bytes, struct devio_ring_msg *m)
{
	if (!r->pass_started || bytes < DEVIO_RING_SHARE_MIN)
		return false;
	for (unsigned i = 1; i <= n; i++) {
		struct devio_ring *p = peers[(from + i) % n];

		if (p && p != r && p->owner->post && (!p->owner->can_take || p->owner->can_take(p, p->ctx)) &&
		    ring_claim_idle(p)) {
			ring_post(p, m);
			return true;
		}
	}
	return false;
}

/* The posted work, oldest first. */
static void ring_run_posts(struct devio_ring *r)
{
	struct devio_ring_msg *m = atomic_exchange_explicit(&r->posts, NULL, memory_order_acquire), *fifo = NULL;

	while (m) {
		struct devio_ring_msg *next = m->next;

		m->next = fifo;
		fifo = m;
		m = next;
	}
	for (struct devio_ring_msg *next; fifo; fifo = next) {
		next = fifo->next;
		r->owner->post(r, r->ctx, fifo);
	}
}

static unsigned ring_done_list(struct devio_ring *r, struct devio_request *req)
{
	unsigned n = 0;

	for (struct devio_request *next; req; req = next, n++) {
		next = req->next;
		r->requests--;
		r->owner->done(r, r->ctx, req);
	}
	return n;
}

/* Hand every finished request to the owner. */
static void ring_drain(struct devio_ring *r)
{
	unsigned n;

	if (r->owner->post)
		ring_run_posts(r);
	n = ring_done_list(r, atomic_exchange_explicit(&r->inbox, NULL, memory_order_acquire));

	while (r->local) {
		struct devio_request *list = r->local;

		r->local = NULL;
		n += ring_done_list(r, list);
	}
	if (n > atomic_load_explicit(&r->max_batch, memory_order_relaxed))
		atomic_store_explicit(&r->max_batch, n, memory_order_relaxed);
}

static void ring_cqe(struct devio_ring *r, const struct io_uring_cqe *cqe)
{
	uint64_t ud = io_uring_cqe_get_data64(cqe);
	void *p = (void *)(uintptr_t)(ud & ~RING_KIND_MASK);

	switch (ud & RING_KIND_MASK) {
	case RING_KIND_INBOX:
		if (cqe->res != -ECANCELED)
			ring_arm_inbox(r);
		break;
	case RING_KIND_REQUEST: {
		struct devio_request *req = p;

		ring_count(&r->ring_ios);
		req->backend->ops->ring_cqe(req->backend, req, cqe->res);
		break;
	}
	default:
		r->cqe_flags = cqe->flags;
		r->owner->cqe(r, r->ctx, p, cqe->res);
	}
}

/* Submit what is queued and wait for a completion, in one io_uring_enter;
 * while stopping, with a timeout so that the owner's deadline is seen;
 * with `inline` CQEs expected at submission, for one more than those. */
static int ring_wait(struct devio_ring *r, unsigned inline_cqes)
{
	struct __kernel_timespec ts = { 0, RING_STOP_WAIT_NS };
	struct io_uring_cqe *cqe;

	ring_count(&r->enters);
	if (atomic_load(&r->stopping))
		return io_uring_submit_and_wait_timeout(&r->ring, &cqe, 1, &ts, NULL);
	if (inline_cqes) {
		ts.tv_nsec = RING_FLUSH_WAIT_NS;
		return io_uring_submit_and_wait_timeout(&r->ring, &cqe, 1 + inline_cqes, &ts, NULL);
	}
	return io_uring_submit_and_wait(&r->ring, 1);
}

static void ring_loop(struct devio_ring *r)
{
	unsigned failures = 0;

	while (r->requests || !r->owner->finished(r, r->ctx)) {
		struct io_uring_cqe *cqe;
		unsigned head, n = 0;
		unsigned inline_cqes = r->owner->flush ? r->owner->flush(r, r->ctx) : 0;
		int res;

		r->pass_started = 0;
		/* claimable only while nothing is queued for this thread */
		atomic_store(&r->idle, !atomic_load(&r->posts) && !atomic_load(&r->inbox) && !r->local);
		res = ring_wait(r, inline_cqes);
		atomic_store(&r->idle, false);

		if (res < 0 && res != -EINTR && res != -ETIME && res != -EAGAIN && res != -EBUSY) {
			if (failures++ == 0)
				devio_err("%s: io_uring_enter: %s", r->name, strerror(-res));
			if (failures >= RING_MAX_ENTER_FAILURES && !r->requests)
				break;
			struct timespec pause = { 0, 1000 * 1000 };
			nanosleep(&pause, NULL);
		} else {
			failures = 0;
		}
		io_uring_for_each_cqe(&r->ring, head, cqe) {
			ring_cqe(r, cqe);
			n++;
		}
		io_uring_cq_advance(&r->ring, n);
		ring_drain(r);
	}
}

static int ring_init(struct devio_ring *r)
{
	struct io_uring_params p = { .flags = r->flags | r->try_flags };
	int res = io_uring_queue_init_params(r->entries, &r->ring, &p);

	if (res == -EINVAL && r->try_flags) {
		memset(&p, 0, sizeof(p));
		p.flags = r->flags;
		res = io_uring_queue_init_params(r->entries, &r->ring, &p);
	}
	if (res < 0) {
		devio_err("%s: io_uring of %u entries: %s", r->name, r->entries, strerror(-res));
		return res;
	}
	r->ring_ok = true;
	ring_arm_inbox(r);
	return 0;
}

static void *ring_main(void *arg)
{
	struct devio_ring *r = arg;
	sigset_t block;
	int res;

	/* signals are for the main thread, which stops the front end */
	sigemptyset(&block);
	sigaddset(&block, SIGINT);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGHUP);
	sigaddset(&block, SIGUSR2); /* serve's hand-over */
	pthread_sigmask(SIG_BLOCK, &block, NULL);
	r->self = pthread_self();
	if (r->pin) /* best effort: a CPU may be offline */
		pthread_setaffinity_np(r->self, sizeof(r->cpus), &r->cpus);
	res = ring_init(r);
	if (!res)
		res = r->owner->setup(r, r->ctx);
	pthread_mutex_lock(&r->lock);
	r->start_result = res;
	r->started = true;
	pthread_cond_signal(&r->cond);
	pthread_mutex_unlock(&r->lock);
	if (!res)
		ring_loop(r);
	return NULL;
}

static struct devio_ring *ring_new(const struct devio_ring_params *p)
{
	struct devio_ring *r = calloc(1, sizeof(*r));

	if (!r)
		return NULL;
	snprintf(r->name, sizeof(r->name), "%s", p->name ? p->name : "ring");
	r->owner = p->owner;
	r->ctx = p->ctx;
	r->workers = p->workers;
	r->entries = p->entries ? p->entries : 64;
	r->flags = p->flags;
	r->try_flags = p->try_flags;
	if (p->cpus) {
		r->cpus = *p->cpus;
		r->pin = true;
	}
	r->evfd = eventfd(0, EFD_CLOEXEC);
	if (r->evfd < 0) {
		devio_err("%s: eventfd: %s", r->name, strerror(errno));
		free(r);
		return NULL;
	}
	pthread_mutex_init(&r->lock, NULL);
	pthread_cond_init(&r->cond, NULL);
	return r;
}

static void ring_release(struct devio_ring *r)
{
	if (r->ring_ok)
		io_uring_queue_exit(&r->ring); /* cancels commands the kernel still holds */
	close(r->evfd);
	pthread_cond_destroy(&r->cond);
	pthread_mutex_destroy(&r->lock);
	free(r);
}

int devio_ring_start(const struct devio_ring_params *p, struct devio_ring **out)
{
	struct devio_ring *r = ring_new(p);
	int res;

	*out = NULL;
	if (!r)
		return -ENOMEM;
	res = pthread_create(&r->thread, NULL, ring_main, r);
	if (res) {
		devio_err("%s: cannot start the queue thread: %s", r->name, strerror(res));
		ring_release(r);
		return -res;
	}
	pthread_mutex_lock(&r->lock);
	while (!r->started)
		pthread_cond_wait(&r->cond, &r->lock);
	res = r->start_result;
	pthread_mutex_unlock(&r->lock);
	if (res) {
		pthread_join(r->thread, NULL);
		ring_release(r);
		return res;
	}
	*out = r;
	return 0;
}

void devio_ring_stop(struct devio_ring *r)
{
	if (!r)
		return;
	atomic_store(&r->stopping, true);
	devio_ring_wake(r);
}

void devio_ring_join(struct devio_ring *r)
{
	if (r && !r->joined) {
		pthread_join(r->thread, NULL);
		r->joined = true;
	}
}

void devio_ring_free(struct devio_ring *r, struct devio_ring_stats *last)
{
	if (!r)
		return;
	devio_ring_join(r);
	if (last)
		devio_ring_get_stats(r, last);
	ring_release(r);
}
