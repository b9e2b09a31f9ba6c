/* ring.h - a queue thread with its own io_uring, for the front ends whose
 * kernel interface is io_uring commands (FUSE over io_uring, ublk).
 *
 * The ring module owns what both need: the thread and its ring (pinned to
 * CPUs, signals blocked), an SQE even when the submission queue is full
 * (flush and retry), the completion inbox (requests finished on other
 * threads -- the worker pool, a remote backend -- handed back to the queue
 * thread through an eventfd whose read stays armed on the ring), the CQE
 * dispatch by the kind in user_data, and the stop.  The owner (a front
 * end's queue) keeps only its protocol: the commands it queues, what their
 * CQEs mean, what a finished request answers.
 *
 * A backend with an io_uring path may put a request's I/O on the queue's
 * own ring (the core decides: devio_submit() with req->ring set, see
 * backend.h ring_submit), so that a page-cache miss costs one ring and no
 * wake-up: its CQE comes back to this thread, which completes the request
 * and answers the kernel in the same pass.
 *
 * Peer rings (one per CPU, as FUSE's queues, where the kernel picks the
 * queue by the CPU that issued a request) share big work: a thread that
 * has already begun a request in this pass hands the next big one to a
 * peer whose thread waits idle (devio_ring_share), so that a burst issued
 * from one CPU does not wait behind one thread while another CPU idles.
 *
 * Everything but devio_ring_start/stop/join/free and the counters runs on
 * the ring's own thread. */
#ifndef DEVIO_RING_H
#define DEVIO_RING_H

#include <liburing.h>
#include <sched.h> /* cpu_set_t: needs _GNU_SOURCE, as the project builds */
#include <stdbool.h>
#include <stdint.h>
#include "request.h"

#ifdef __cplusplus
extern "C" {
#endif

struct devio_ring;
struct devio_backend;
struct devio_workers;

/* Work a peer hands to a ring's thread (devio_ring_share); embedded in
 * the owner's own structure. */
struct devio_ring_msg {
	struct devio_ring_msg *next;
};

/* The owner's protocol.  Every callback runs on the ring's thread. */
struct devio_ring_owner {
	/* The ring exists: register files, queue the first commands.  0, or
	 * a negative errno that devio_ring_start() returns. */
	int (*setup)(struct devio_ring *r, void *ctx);
	/* The CQE of an SQE tagged with devio_ring_sqe_owner(sqe, data). */
	void (*cqe)(struct devio_ring *r, void *ctx, void *data, int res);
	/* A request started with devio_ring_submit() has finished
	 * (req->result), on whatever thread: answer the kernel. */
	void (*done)(struct devio_ring *r, void *ctx, struct devio_request *req);
	/* Asked before every wait: true when the owner has nothing left to
	 * wait for.  The thread ends once this is true and no request it
	 * submitted is still out. */
	bool (*finished)(struct devio_ring *r, void *ctx);
	/* Optional, before every wait: queue what was gathered in the pass
	 * (e.g. one command answering many requests).  Returns how many of
	 * the SQEs queued complete at submission (their CQEs are no reason
	 * to wake): the wait is then for that many more CQEs, at most
	 * RING_FLUSH_WAIT_NS, so that one io_uring_enter submits them and
	 * still waits for the next work. */
	unsigned (*flush)(struct devio_ring *r, void *ctx);
	/* Optional: work a peer handed over with devio_ring_share(), run on
	 * this thread before the pass's finished requests go to done(). */
	void (*post)(struct devio_ring *r, void *ctx, struct devio_ring_msg *m);
	/* Optional, called from other threads: may this ring take more work
	 * from peers (e.g. room left in its completion queue)? */
	bool (*can_take)(struct devio_ring *r, void *ctx);
};

struct devio_ring_params {
	const char *name;      /* for messages, e.g. "fuse /mnt queue 0" */
	unsigned entries;      /* submission queue entries */
	unsigned flags;        /* IORING_SETUP_* the owner needs (SQE128) */
	unsigned try_flags;    /* IORING_SETUP_* used if the kernel has them */
	const cpu_set_t *cpus; /* pin the thread to these, or NULL */
	/* where devio_ring_submit() sends requests the core wants run on a
	 * pool (devio_wants_pool), or NULL */
	struct devio_workers *workers;
	const struct devio_ring_owner *owner;
	void *ctx;
};

/* Counters: io_uring_enter calls made by the thread;
 * backend I/Os that went on this ring; the most requests finished in
 * one pass. */
struct devio_ring_stats {
	uint64_t enters, ring_ios, max_batch;
};

/* Start the thread, create its ring, run owner->setup there; returns its
 * result (on error *out is NULL and everything is released). */
int devio_ring_start(const struct devio_ring_params *p, struct devio_ring **out);
/* Ask the thread to end once owner->finished() says so (it then waits
 * with a 100 ms timeout, so a deadline in finished() is seen), and wake it. */
void devio_ring_stop(struct devio_ring *r);
/* Wake the thread for another pass (e.g. after changing a deadline). */
void devio_ring_wake(struct devio_ring *r);
/* Wait for the thread to end (after devio_ring_stop); NULL is fine. */
void devio_ring_join(struct devio_ring *r);
/* Join the thread, close the ring (cancelling commands still queued in
 * the kernel) and free; the final counters go to *last if not NULL.
 * NULL is fine. */
void devio_ring_free(struct devio_ring *r, struct devio_ring_stats *last);

bool devio_ring_stopping(const struct devio_ring *r);
/* True on the ring's own thread: only there may SQEs be queued. */
bool devio_ring_is_current(const struct devio_ring *r);
struct io_uring *devio_ring_uring(struct devio_ring *r);

/* A free SQE; when the queue is full, what is queued is submitted first.
 * NULL only if the kernel takes nothing. */
struct io_uring_sqe *devio_ring_get_sqe(struct devio_ring *r);
/* Tag an SQE: its CQE goes to owner->cqe(data), or to the backend that
 * queued it for req (backend.h ring_cqe). */
void devio_ring_sqe_owner(struct io_uring_sqe *sqe, void *data);
void devio_ring_sqe_request(struct io_uring_sqe *sqe, struct devio_request *req);

/* Start req on b for the owner (req->complete and req->ring are set
 * here; req->opaque stays the owner's): on the worker pool if one was
 * given, else with devio_submit(), which may put the I/O on this ring.
 * owner->done() follows, exactly once. */
void devio_ring_submit(struct devio_ring *r, struct devio_backend *b, struct devio_request *req);
/* Work that moves at least this many bytes may go to an idle peer; less
 * costs less than the peer's wake-up. */
#define DEVIO_RING_SHARE_MIN (64u << 10)
/* On r's thread, for work m moving `bytes`: if this thread has already
 * begun a request in this pass (devio_ring_submit) and the work is big,
 * hand m to the first peer (of n, r itself skipped, starting after
 * `from`) whose thread waits with nothing to do; its owner->post(m) then
 * runs there, woken at once.  True if handed over.  m stays valid until
 * then (work still queued when a peer's thread ends is dropped: stop all
 * peers, then devio_ring_join them all before freeing any). */
bool devio_ring_share(struct devio_ring *r, struct devio_ring *const *peers, unsigned n, unsigned from,
		      uint64_t bytes, struct devio_ring_msg *m);

/* Requests submitted and not yet given to owner->done(). */
unsigned devio_ring_requests(const struct devio_ring *r);

/* Inside owner->cqe: the flags of that CQE (IORING_CQE_F_MORE,
 * IORING_CQE_F_BUFFER and its buffer id). */
unsigned devio_ring_cqe_flags(const struct devio_ring *r);

/* The counters, from any thread. */
void devio_ring_get_stats(const struct devio_ring *r, struct devio_ring_stats *out);

#ifdef __cplusplus
}
#endif
#endif
