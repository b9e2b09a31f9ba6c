/* request.h - the one request type every front end hands to every backend.
 *
 * A front end decodes its wire format into a struct devio_request, points
 * `buf` at memory it owns (a write's payload is already there; a read is
 * filled there), and calls devio_submit().  The completion callback runs
 * exactly once, possibly on another thread and possibly before
 * devio_submit() returns.  Many requests may be in flight at once: nothing
 * in the core serialises them; ordering (FLUSH after completed writes, FUA)
 * is the front end's business, as the protocols define it.
 *
 * Zero copy is a kind of buffer on the same request (enum devio_buf_kind):
 * the bytes of a READ or WRITE may also be pieces of the store's own
 * memory (in place) or a pipe.  The checks (range, read-only, op offered),
 * FUA and the error codes are the core's, whatever the buffer.
 *
 * Once submitted, the request belongs to the core and the backends until
 * complete() (or devio_run() returning): a layer moves it in place, as the
 * kernel remaps a bio's sector for a partition, so `offset` and `backend`
 * then name the place in the store below, not the front end's.  A front
 * end keeps what it needs afterwards (the client's offset, for a reply or
 * a log line) in its own state; op, flags, length, the buffer and opaque
 * are left as they were.
 */
#ifndef DEVIO_REQUEST_H
#define DEVIO_REQUEST_H

#include <stdint.h>
#include <stddef.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

struct devio_backend;
struct devio_ring;

enum devio_op {
	DEVIO_OP_READ = 0,
	DEVIO_OP_WRITE,
	DEVIO_OP_FLUSH,   /* make every completed write durable */
	DEVIO_OP_TRIM,    /* the range's contents become undefined (zero in practice) */
	DEVIO_OP_ZERO,    /* the range reads back as zeroes */
	DEVIO_OP_CACHE,   /* prefetch hint; may be a no-op */
	DEVIO_OP__COUNT
};

/* Request flags. */
#define DEVIO_REQ_FUA       (1u << 0) /* WRITE/ZERO/TRIM: durable before completion */
#define DEVIO_REQ_NO_HOLE   (1u << 1) /* ZERO: keep the range allocated */
#define DEVIO_REQ_FAST_ZERO (1u << 2) /* ZERO: fail with -ENOTSUP rather than write zeroes slowly */

/* What the bytes of a READ or WRITE are (every other op: DEVIO_BUF_MEM). */
enum devio_buf_kind {
	DEVIO_BUF_MEM = 0, /* buf: memory the front end owns */
	/* The store's own memory, in place (DEVIO_CAP_MAP): the caller sets
	 * iov to room for iovcnt pieces; on success the backend has filled
	 * iovcnt pieces covering the range in order.  READ: a piece whose
	 * iov_base is NULL reads as zeroes; the memory stays mapped until the
	 * backend closes, and a racing WRITE or TRIM may change it.  WRITE:
	 * the caller copies the payload into the pieces, then calls
	 * devio_map_end(); until then the range counts as being written (a
	 * TRIM of it waits), so hold it only while the bytes are at hand.
	 * -E2BIG: more than iovcnt pieces would be needed. */
	DEVIO_BUF_MAP,
	/* A pipe (DEVIO_CAP_SPLICE_READ/_WRITE): READ puts the bytes into
	 * pipe_fd (its write end) by reference to the page cache where it can,
	 * never waiting for room (-EAGAIN: read into memory instead); WRITE
	 * takes them from pipe_fd (its read end), which holds at least length
	 * bytes.  On error the pipe may hold a part: the caller empties it. */
	DEVIO_BUF_PIPE,
	/* Pages the caller registered at index buf_index of the fixed-buffer
	 * table of its queue ring req->ring (a ublk request's own pages:
	 * zero copy).  Nobody can address them but the kernel: only a store
	 * with DEVIO_CAP_FIXED moves them, by I/O on that ring (backend.h
	 * ring_submit), started on the ring's thread with devio_submit();
	 * devio_run() and devio_execute() refuse it (-EOPNOTSUPP).  Offsets
	 * into the buffer count from 0. */
	DEVIO_BUF_FIXED,
};

struct devio_request {
	enum devio_op op;
	uint32_t flags;
	uint64_t offset;
	uint64_t length;
	enum devio_buf_kind kind; /* READ/WRITE: what the bytes are; DEVIO_BUF_MEM for the rest */
	void *buf;              /* DEVIO_BUF_MEM: READ filled, WRITE source; else unused */
	struct iovec *iov;      /* DEVIO_BUF_MAP: the pieces */
	int iovcnt;             /* DEVIO_BUF_MAP: room in iov before, pieces filled after */
	int pipe_fd;            /* DEVIO_BUF_PIPE */
	unsigned buf_index;     /* DEVIO_BUF_FIXED: the index in req->ring's buffer table */
	int result;             /* 0 or a negative errno, set before complete() */
	void (*complete)(struct devio_request *req);
	void *opaque;           /* the front end's own pointer */
	struct devio_backend *backend; /* set by devio_submit() */
	struct devio_request *next;    /* free for queues: the core and backends use it while the request is theirs */
	uint64_t priv[2];       /* for the backend while the request is in flight */
	/* The caller's queue ring (ring.h; set by devio_ring_submit), or
	 * NULL: devio_submit() may put the I/O there (backend.h ring_submit).
	 * A layer forwards it by copying it into its request to the lower
	 * backend, or declines by leaving that NULL. */
	struct devio_ring *ring;
	/* The core's, while a format layer's try_remap has moved the request
	 * to its lower backend (backend.h): that layer, a word the layer
	 * keeps with the request until its remap_done, and complete()
	 * meanwhile. */
	struct devio_backend *remapper;
	uint64_t remap_tag;
	void (*remap_complete)(struct devio_request *req);
};

/* Check the request against the backend (op supported, read-only,
 * offset + length overflow and range) and start it.  Errors are reported
 * through complete() like any other result, never by the return value. */
void devio_submit(struct devio_backend *b, struct devio_request *req);

/* Run one request and wait for it; returns req->result.  Through the
 * backend's asynchronous path where it has one.  Requests whose buffer is
 * not DEVIO_BUF_MEM always run on the calling thread (their bytes are at
 * hand: in memory or in the page cache), in all three functions. */
int devio_execute(struct devio_backend *b, struct devio_request *req);

/* Run one request on this thread with the backend's synchronous callbacks,
 * after the same checks and with the same rules as devio_submit() (FUA as
 * a flush after, ZERO by writing zeroes where the backend cannot); returns
 * req->result, complete() is not called.  For callers that wait for every
 * request anyway (one request per stream connection, the client commands,
 * a FUSE thread): no thread hop, which costs more than a cached copy
 * (measured: 85 us instead of 21 us per 4 KiB stream read on tmpfs). */
int devio_run(struct devio_backend *b, struct devio_request *req);

/* End a DEVIO_BUF_MAP WRITE that ran successfully, once its pieces hold
 * the payload (or as much of it as the caller got: that much stays
 * written; clear DEVIO_REQ_FUA first if the caller will write the rest
 * another way).  Lets the range go, then flushes for DEVIO_REQ_FUA:
 * returns 0 or the flush's negative errno. */
int devio_map_end(struct devio_request *req);

/* Validate a request without running it: 0 or the negative errno that
 * devio_submit() would complete it with. */
int devio_request_check(const struct devio_backend *b, const struct devio_request *req);

const char *devio_op_name(enum devio_op op);

#ifdef __cplusplus
}
#endif
#endif
