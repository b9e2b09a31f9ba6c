/* request.c - the request core: checks a request against its backend,
 * moves it through the layers that remap it (windows, and image formats
 * for what maps to one place of their file: try_remap) to the store, and
 * runs it there, asynchronously where the store can (io_uring),
 * synchronously otherwise, whatever kind of buffer it carries.  Also a
 * small worker pool for front ends that want several synchronous requests
 * running at once on a multi-core machine; requests an image format moves
 * to an asynchronous store start on the submitting thread instead. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "devio/backend.h"
#include "devio/request.h"
#include "devio/ring.h"
#include "devio/workers.h"

const char *devio_op_name(enum devio_op op)
{
	static const char *const names[] = { "READ", "WRITE", "FLUSH", "TRIM", "ZERO", "CACHE" };

	return (unsigned)op < DEVIO_OP__COUNT ? names[op] : "UNKNOWN";
}

/* offset + length overflows or passes the end of the backend */
static bool req_out_of_range(const struct devio_backend *b, uint64_t off, uint64_t len)
{
	return off > b->size || len > b->size - off;
}

/* The backend that holds the bytes under b: past the layers that only
 * move requests (remap). */
static struct devio_backend *req_store_of(const struct devio_backend *b)
{
	while (b->ops->remap)
		b = b->lower;
	return (struct devio_backend *)b;
}

/* The store at the bottom of b's stack, past the format layers that
 * move most requests too (try_remap). */
static const struct devio_backend *req_bottom_of(const struct devio_backend *b)
{
	while (b->ops->remap || b->ops->try_remap)
		b = b->lower;
	return b;
}

bool devio_backend_async(const struct devio_backend *b)
{
	return req_bottom_of(b)->ops->submit != NULL;
}

/* A fixed buffer is moved only by I/O on the caller's ring. */
static bool req_store_takes_fixed(const struct devio_backend *s)
{
	return (s->caps & DEVIO_CAP_FIXED) && s->ops->ring_submit && s->ops->ring_cqe;
}

bool devio_backend_takes_fixed(const struct devio_backend *b)
{
	return req_store_takes_fixed(req_store_of(b));
}

/* The buffer: memory for every op that has bytes, or a kind the store
 * takes for this op. */
static int req_check_buffer(const struct devio_backend *s, const struct devio_request *req)
{
	bool rw = req->op == DEVIO_OP_READ || req->op == DEVIO_OP_WRITE;
	uint32_t cap = req->op == DEVIO_OP_READ ? DEVIO_CAP_SPLICE_READ : DEVIO_CAP_SPLICE_WRITE;

	switch (req->kind) {
	case DEVIO_BUF_MEM:
		return rw && req->length && !req->buf ? -EFAULT : 0;
	case DEVIO_BUF_MAP:
		if (!rw)
			return -EINVAL;
		if (!(s->caps & DEVIO_CAP_MAP) || !s->ops->map || !s->ops->unmap)
			return -EOPNOTSUPP;
		return !req->iov || req->iovcnt <= 0 ? -EFAULT : 0;
	case DEVIO_BUF_PIPE:
		if (!rw)
			return -EINVAL;
		return (s->caps & cap) && s->ops->splice ? 0 : -EOPNOTSUPP;
	case DEVIO_BUF_FIXED:
		if (!rw)
			return -EINVAL;
		if (!req_store_takes_fixed(s))
			return -EOPNOTSUPP;
		/* FUA must ride on the write itself: no flush after from the ring */
		if (req->op == DEVIO_OP_WRITE && (req->flags & DEVIO_REQ_FUA) && !(s->caps & DEVIO_CAP_PWRITE_FUA))
			return -EOPNOTSUPP;
		return req->ring ? 0 : -EINVAL;
	}
	return -EINVAL;
}

/* Checks against b (the top of a stack: its size, its read-only bit),
 * then what the store under it offers. */
int devio_request_check(const struct devio_backend *b, const struct devio_request *req)
{
	const struct devio_backend *s;
	const struct devio_backend_ops *ops;
	bool writes = req->op == DEVIO_OP_WRITE || req->op == DEVIO_OP_TRIM || req->op == DEVIO_OP_ZERO;
	int r;

	if ((unsigned)req->op >= DEVIO_OP__COUNT)
		return -EINVAL;
	if (writes && (b->caps & DEVIO_CAP_READONLY))
		return -EROFS;
	if (req->op == DEVIO_OP_FLUSH)
		return 0;
	if (req_out_of_range(b, req->offset, req->length))
		return req->op == DEVIO_OP_WRITE || req->op == DEVIO_OP_ZERO ? -ENOSPC : -EINVAL;
	s = req_store_of(b);
	ops = s->ops;
	/* a READ into a pipe a format layer offers (SPLICE_READ) is the
	 * store's under it to take, or -EAGAIN where the layer keeps it */
	if ((r = req_check_buffer(req->kind == DEVIO_BUF_PIPE && req->op == DEVIO_OP_READ &&
						  (s->caps & DEVIO_CAP_SPLICE_READ) ? req_bottom_of(s) : s,
				  req)))
		return r;
	if (req->op == DEVIO_OP_WRITE && !ops->pwrite)
		return -EROFS;
	if (req->op == DEVIO_OP_TRIM && !ops->trim)
		return -EOPNOTSUPP;
	if (req->op == DEVIO_OP_ZERO && !ops->zero && (req->flags & DEVIO_REQ_FAST_ZERO))
		return -EOPNOTSUPP;
	if (req->op == DEVIO_OP_ZERO && !ops->zero && !ops->pwrite)
		return -EROFS; /* zeroes cannot be written either */
	return 0;
}

/* What a format layer's try_remap is offered: a READ or WRITE of some
 * bytes in memory, no FUA (the layer's metadata may not be durable yet),
 * and none moved by such a layer already. */
static bool req_remap_offered(const struct devio_request *req)
{
	if (req->kind == DEVIO_BUF_PIPE)
		return req->op == DEVIO_OP_READ && req->length && !req->remapper;
	return (req->op == DEVIO_OP_READ || (req->op == DEVIO_OP_WRITE && !(req->flags & DEVIO_REQ_FUA))) &&
	       req->kind == DEVIO_BUF_MEM && req->length && !req->remapper;
}

/* Move a checked request through the layers that remap it (and a format
 * layer that takes it: try_remap), into the coordinates of the backend
 * that runs it; req->backend becomes that backend. */
static struct devio_backend *req_descend(struct devio_backend *b, struct devio_request *req)
{
	for (;;) {
		if (b->ops->remap)
			b->ops->remap(b, req);
		else if (b->ops->try_remap && req_remap_offered(req) && b->ops->try_remap(b, req))
			req->remapper = b;
		else
			break;
		b = b->lower;
	}
	req->backend = b;
	return b;
}

/* The end of a request a format layer moved: its remap_done. */
static void req_remap_finish(struct devio_request *req)
{
	struct devio_backend *l = req->remapper;

	req->remapper = NULL;
	if (l->ops->remap_done)
		l->ops->remap_done(l, req);
}

static void req_remap_complete(struct devio_request *req)
{
	req->complete = req->remap_complete;
	req_remap_finish(req);
	req->complete(req);
}

/* A moved request tells its layer when it is done, whoever completes it. */
static void req_remap_hook(struct devio_request *req)
{
	if (req->remapper && req->complete != req_remap_complete) {
		req->remap_complete = req->complete;
		req->complete = req_remap_complete;
	}
}

/* FUA asks for a flush after a change, unless the store's pwrite honoured
 * it itself (memory buffers only: a pipe or a mapping has no RWF_DSYNC). */
static bool req_needs_flush_after(const struct devio_backend *b, const struct devio_request *req)
{
	return (req->flags & DEVIO_REQ_FUA) && b->ops->flush &&
	       !(req->op == DEVIO_OP_WRITE && req->kind == DEVIO_BUF_MEM && (b->caps & DEVIO_CAP_PWRITE_FUA));
}

int devio_map_end(struct devio_request *req)
{
	struct devio_backend *b = req->backend;

	if (req->op != DEVIO_OP_WRITE || req->kind != DEVIO_BUF_MAP || req->length == 0)
		return 0;
	b->ops->unmap(b, req);
	return req_needs_flush_after(b, req) ? b->ops->flush(b) : 0;
}

/* ZERO for a backend without a zero callback: write zeroes. */
static int req_zero_by_writing(struct devio_backend *b, uint64_t off, uint64_t len)
{
	static const char zeroes[65536];
	int r = 0;

	while (len && !r) {
		uint64_t n = len < sizeof(zeroes) ? len : sizeof(zeroes);
		r = b->ops->pwrite(b, zeroes, n, off, 0);
		off += n;
		len -= n;
	}
	return r;
}

static int req_run_sync(struct devio_backend *b, struct devio_request *req)
{
	const struct devio_backend_ops *ops = b->ops;
	int r = 0;

	if (req->length == 0 && req->op != DEVIO_OP_FLUSH) {
		req->iovcnt = 0;
		return 0;
	}
	if (req->kind == DEVIO_BUF_MAP)
		return ops->map(b, req); /* a WRITE's FUA: devio_map_end() */
	switch (req->op) {
	case DEVIO_OP_READ:
		if (req->kind == DEVIO_BUF_PIPE) /* a format layer that did not move it: into memory instead */
			return ops->splice ? ops->splice(b, req) : -EAGAIN;
		return ops->pread(b, req->buf, req->length, req->offset);
	case DEVIO_OP_WRITE:
		r = req->kind == DEVIO_BUF_PIPE ? ops->splice(b, req)
						: ops->pwrite(b, req->buf, req->length, req->offset, req->flags);
		break;
	case DEVIO_OP_FLUSH:
		return ops->flush ? ops->flush(b) : 0;
	case DEVIO_OP_TRIM:
		r = ops->trim(b, req->offset, req->length, req->flags);
		break;
	case DEVIO_OP_ZERO:
		r = ops->zero ? ops->zero(b, req->offset, req->length, req->flags)
			      : req_zero_by_writing(b, req->offset, req->length);
		break;
	case DEVIO_OP_CACHE:
		return 0;
	default:
		return -EINVAL;
	}
	if (!r && req_needs_flush_after(b, req))
		r = ops->flush(b);
	return r;
}

/* May req's I/O go on the caller's ring (req->ring)?  Only on the ring's
 * own thread (its SQEs are that thread's; a worker of the pool has no
 * ring), only for what the backend finishes alone: a READ or WRITE of some
 * bytes (FUA only where pwrite honours it: the core's FUA is a flush
 * after) or a FLUSH.  TRIM, ZERO and CACHE take the usual way. */
static bool req_ring_eligible(const struct devio_backend *b, const struct devio_request *req)
{
	if (!req->ring || !b->ops->ring_submit || !b->ops->ring_cqe || !devio_ring_is_current(req->ring))
		return false;
	if (req->op == DEVIO_OP_FLUSH)
		return true;
	if (req->op != DEVIO_OP_READ && req->op != DEVIO_OP_WRITE)
		return false;
	if (req->length == 0)
		return false;
	return !(req->op == DEVIO_OP_WRITE && (req->flags & DEVIO_REQ_FUA) && !(b->caps & DEVIO_CAP_PWRITE_FUA));
}

/* The backend's asynchronous paths: the caller's ring, then its own.  0 if
 * one took req, -EAGAIN if both declined, or the error to complete it with. */
static int req_submit_async(struct devio_backend *b, struct devio_request *req)
{
	int r = -EAGAIN;

	if (req_ring_eligible(b, req))
		r = b->ops->ring_submit(b, req, req->ring);
	if ((r == -EAGAIN || r == -EOPNOTSUPP) && b->ops->submit)
		r = b->ops->submit(b, req);
	return r == -EOPNOTSUPP ? -EAGAIN : r;
}

/* A fixed buffer's only way: the store's I/O on the caller's ring, from
 * that ring's thread.  0 if queued, else the error to complete it with. */
static int req_submit_fixed(struct devio_backend *b, struct devio_request *req)
{
	int r;

	if (req->length == 0)
		return -EAGAIN; /* nothing to move: done */
	if (!devio_ring_is_current(req->ring))
		return -EINVAL;
	r = b->ops->ring_submit(b, req, req->ring);
	return r == -EAGAIN ? -EBUSY : r;
}

/* Run a checked (r == 0) request on b, the backend req_descend() reached:
 * its asynchronous paths, else synchronously; or complete it with r. */
static void req_run_at(struct devio_backend *b, struct devio_request *req, int r)
{
	if (!r && req->kind == DEVIO_BUF_FIXED) {
		r = req_submit_fixed(b, req);
		if (r == 0)
			return;
		r = r == -EAGAIN ? 0 : r;
		goto done;
	}
	if (!r && req->kind == DEVIO_BUF_MEM) {
		r = req_submit_async(b, req);
		if (r == 0)
			return; /* complete() will be called by the backend */
		if (r != -EAGAIN)
			goto done;
		r = 0; /* the backend declined: run it synchronously */
	}
	if (!r)
		r = req_run_sync(b, req);
done:
	req->result = r;
	req->complete(req);
}

/* devio_submit() of a request that may have been moved by a format layer
 * already (a worker of the pool runs it where req_descend() stopped). */
static void req_submit_from(struct devio_backend *b, struct devio_request *req)
{
	int r;

	req->backend = b;
	r = devio_request_check(b, req);
	if (!r)
		b = req_descend(b, req); /* through the layers that remap, to the store */
	req_remap_hook(req);
	req_run_at(b, req, r);
}

void devio_submit(struct devio_backend *b, struct devio_request *req)
{
	req->remapper = NULL;
	req_submit_from(b, req);
}

int devio_run(struct devio_backend *b, struct devio_request *req)
{
	req->backend = b;
	if (req->kind == DEVIO_BUF_FIXED)
		return req->result = -EOPNOTSUPP; /* only the ring's I/O reaches those pages */
	req->remapper = NULL;
	req->result = devio_request_check(b, req);
	if (req->result == 0) {
		req->result = req_run_sync(req_descend(b, req), req);
		if (req->remapper)
			req_remap_finish(req);
	}
	return req->result;
}

struct sync_wait {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool done;
	void (*complete)(struct devio_request *req);
	void *opaque;
};

static void req_sync_complete(struct devio_request *req)
{
	struct sync_wait *w = req->opaque;

	pthread_mutex_lock(&w->lock);
	w->done = true;
	pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

int devio_execute(struct devio_backend *b, struct devio_request *req)
{
	struct sync_wait w = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false,
			       req->complete, req->opaque };
	int r;

	if (!devio_backend_async(b) || req->kind != DEVIO_BUF_MEM)
		return devio_run(b, req); /* no need to go through a completion at all */
	req->backend = b;
	r = devio_request_check(b, req);
	if (r)
		return req->result = r;
	req->complete = req_sync_complete;
	req->opaque = &w;
	devio_submit(b, req);
	pthread_mutex_lock(&w.lock);
	while (!w.done)
		pthread_cond_wait(&w.cond, &w.lock);
	pthread_mutex_unlock(&w.lock);
	req->complete = w.complete;
	req->opaque = w.opaque;
	pthread_cond_destroy(&w.cond);
	pthread_mutex_destroy(&w.lock);
	return req->result;
}

/* ---- worker pool ---- */

#define DEVIO_POOL_DEFAULT 8u /* enough to overlap a remote server's round trips */

/* A format layer that moves most requests (try_remap) over an
 * asynchronous store still wants the pool for the rest: the pool is
 * decided by the first backend with data callbacks. */
bool devio_wants_pool(const struct devio_backend *b, unsigned threads)
{
	if (req_store_of(b)->ops->submit || threads == 1)
		return false;
	return threads > 1 || b->run != DEVIO_RUN_CPU;
}

unsigned devio_pool_size(unsigned threads)
{
	return threads > 1 ? threads : DEVIO_POOL_DEFAULT;
}

struct devio_workers {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct devio_request *head, *tail;
	bool stopping;
	unsigned n;
	pthread_t threads[];
};

static void *req_worker_main(void *arg)
{
	struct devio_workers *w = arg;

	for (;;) {
		struct devio_request *req;

		pthread_mutex_lock(&w->lock);
		while (!w->head && !w->stopping)
			pthread_cond_wait(&w->cond, &w->lock);
		req = w->head;
		if (!req) {
			pthread_mutex_unlock(&w->lock);
			return NULL;
		}
		w->head = req->next;
		if (!w->head)
			w->tail = NULL;
		pthread_mutex_unlock(&w->lock);
		req->next = NULL;
		req_submit_from(req->backend, req);
	}
}

struct devio_workers *devio_workers_new(unsigned nthreads)
{
	struct devio_workers *w;

	if (nthreads == 0)
		nthreads = 1;
	w = calloc(1, sizeof(*w) + nthreads * sizeof(pthread_t));
	if (!w)
		return NULL;
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	for (w->n = 0; w->n < nthreads; w->n++)
		if (pthread_create(&w->threads[w->n], NULL, req_worker_main, w))
			break;
	if (w->n == 0) {
		free(w);
		return NULL;
	}
	return w;
}

/* Does a format layer in b's stack move requests (try_remap)? */
static bool req_has_try_remap(const struct devio_backend *b)
{
	for (; b->ops->remap || b->ops->try_remap; b = b->lower)
		if (b->ops->try_remap)
			return true;
	return false;
}

/* Largest moved request the pool's entry runs on the front end's thread
 * when the store's asynchronous path declines it (the file on tmpfs
 * writes synchronously): a 1 MiB copy into the page cache there held up
 * the next requests (1 MiB writes at QD8 ran at a third of the pool's
 * rate, bench/bench_formats.sh); a small one costs less than the hop. */
#define POOL_INLINE_MAX 65536u

/* Start a moved request on b's asynchronous paths from the pool's entry,
 * or run it here if it is small: true if it started or ran. */
static bool req_pool_entry_async(struct devio_backend *b, struct devio_request *req)
{
	int r;

	if (req->kind != DEVIO_BUF_MEM || (!b->ops->submit && !req_ring_eligible(b, req)))
		return false;
	r = req_submit_async(b, req);
	if (r == 0)
		return true;
	if (r == -EAGAIN && req->length > POOL_INLINE_MAX)
		return false; /* to the pool, which runs it synchronously */
	if (r == -EAGAIN)
		r = req_run_sync(b, req);
	req->result = r;
	req->complete(req);
	return true;
}

/* The pool's entry: a request that a format layer moves onto an
 * asynchronous store (an allocated qcow2 cluster in an image file) starts
 * right here, on the front end's thread, as a raw file's would; the rest
 * of that layer's requests go to the pool from where req_descend() stopped. */
void devio_workers_submit(struct devio_workers *w, struct devio_backend *b, struct devio_request *req)
{
	req->backend = b;
	req->remapper = NULL;
	if (req_has_try_remap(b) && devio_request_check(b, req) == 0) {
		b = req_descend(b, req);
		req_remap_hook(req);
		if (req->remapper && req_pool_entry_async(b, req))
			return;
	}
	req->next = NULL;
	pthread_mutex_lock(&w->lock);
	if (w->tail)
		w->tail->next = req;
	else
		w->head = req;
	w->tail = req;
	pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

void devio_workers_free(struct devio_workers *w)
{
	if (!w)
		return;
	pthread_mutex_lock(&w->lock);
	w->stopping = true;
	pthread_cond_broadcast(&w->cond);
	pthread_mutex_unlock(&w->lock);
	for (unsigned i = 0; i < w->n; i++)
		pthread_join(w->threads[i], NULL);
	pthread_cond_destroy(&w->cond);
	pthread_mutex_destroy(&w->lock);
	free(w);
}
