/* nbd_remote.c - a remote NBD server as a backend: the client end of NBD.
 *
 * nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH; the URI
 * and the handshake (structured replies, base:allocation, NBD_OPT_GO) are
 * lib/nbd_uri.c and lib/nbd_client.c, shared with `attach --nbd-device`;
 * this file is the transmission phase.  Many requests are
 * in flight on the one connection: `submit` sends a request under a send
 * lock and returns; a reader thread matches each reply to its request by
 * the cookie (a slot index plus a generation) and completes it.  The
 * synchronous callbacks are submit-and-wait, split at the server's
 * maximum block size.  Every reply is checked: an unknown cookie or a bad
 * magic ends the connection and fails what is in flight with EIO.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/util.h"
#include "../lib/nbd_client.h"
#include "../lib/nbd_proto.h"

#define REMOTE_SLOTS 128
#define REMOTE_DEFAULT_MAX (32u << 20)
#define REMOTE_MAX_RANGE (1u << 30) /* TRIM/ZERO/BLOCK_STATUS pieces (the wire length is 32 bits) */
#define REMOTE_MAX_DESC 512         /* block status descriptors kept per query */
#define REMOTE_MAX_CHUNK_SKIP (16u << 20)

struct remote {
	char name[300];
	int fd;
	struct devio_tls *tls;       /* nbds://: every byte goes through it */
	uint16_t tflags;
	uint32_t max_payload;
	uint32_t min_block;           /* the server's minimum block size, 1 if none */
	pthread_t reader;
	pthread_mutex_t send_lock;
	pthread_mutex_t lock;        /* slots, dead */
	pthread_cond_t cond;         /* a slot was freed */
	struct devio_request *slot[REMOTE_SLOTS];
	uint32_t gen[REMOTE_SLOTS];
	/* A request is completed only once it is answered and no longer being
	 * sent: a reply (or a dead connection) can come while its payload is
	 * still going out, and completing it would free that payload. */
	bool sending[REMOTE_SLOTS];
	bool answered[REMOTE_SLOTS]; /* while sending: req->result is set */
	unsigned used;
	bool dead;
	bool structured;             /* structured replies negotiated */
	bool have_meta;              /* base:allocation selected */
	uint32_t meta_id;
};

/* A block-status query in flight: the reader fills desc. */
struct bs_query {
	struct devio_request req;    /* req.priv[1] = REQ_KIND_BS */
	uint8_t desc[8 * REMOTE_MAX_DESC];
	uint32_t ndesc;
};

/* ---- the connection: the socket or, for nbds://, its TLS session ---- */

static int nr_read_full(struct remote *rm, void *buf, size_t len)
{
	return rm->tls ? devio_tls_read_full(rm->tls, buf, len) : devio_read_full(rm->fd, buf, len);
}

static int nr_discard_full(struct remote *rm, uint64_t len)
{
	return rm->tls ? devio_tls_discard_full(rm->tls, len) : devio_discard_full(rm->fd, len);
}

/* Send iov[0..n) whole; called under send_lock. */
static int nr_sendv(struct remote *rm, struct iovec *iov, int n)
{
	int r = 0;

	if (rm->tls)
		return devio_tls_writev(rm->tls, iov, n);
	for (int k = 0; k < n && !r;) {
		struct msghdr mh = { .msg_iov = iov + k, .msg_iovlen = (size_t)(n - k) };
		ssize_t w = sendmsg(rm->fd, &mh, MSG_NOSIGNAL);

		if (w < 0) {
			if (errno != EINTR)
				r = -errno;
			continue;
		}
		while (k < n && (size_t)w >= iov[k].iov_len)
			w -= (ssize_t)iov[k++].iov_len;
		if (k < n) {
			iov[k].iov_base = (uint8_t *)iov[k].iov_base + w;
			iov[k].iov_len -= (size_t)w;
		}
	}
	return r;
}

#define REQ_KIND_BS 1

/* ---- transmission ---- */

/* Fail everything in flight (the connection is gone). */
static void nr_fail_all(struct remote *rm)
{
	struct devio_request *done[REMOTE_SLOTS];
	unsigned n = 0;

	pthread_mutex_lock(&rm->lock);
	rm->dead = true;
	for (unsigned i = 0; i < REMOTE_SLOTS; i++) {
		if (rm->slot[i] && rm->sending[i]) {
			if (!rm->answered[i]) /* else its real answer stands */
				rm->slot[i]->result = -EIO;
			rm->answered[i] = true; /* its sender completes it */
		} else if (rm->slot[i]) {
			done[n++] = rm->slot[i];
			rm->slot[i] = NULL;
			rm->used--;
		}
	}
	pthread_cond_broadcast(&rm->cond);
	pthread_mutex_unlock(&rm->lock);
	for (unsigned i = 0; i < n; i++) {
		done[i]->result = -EIO;
		done[i]->complete(done[i]);
	}
}

/* Free slot i (lock held). */
static void nr_release_slot_locked(struct remote *rm, unsigned i)
{
	rm->slot[i] = NULL;
	rm->answered[i] = false;
	rm->used--;
	pthread_cond_signal(&rm->cond);
}

/* The answer for the request in slot i, which nr_find_slot() returned to the
 * reader: complete it now, or leave that to its sender if it is still
 * being sent.  Only the reader answers, and a sender frees only answered
 * slots, so the slot is still there. */
static void nr_answer_slot(struct remote *rm, uint64_t cookie, int result)
{
	unsigned i = (uint32_t)cookie;
	struct devio_request *req;

	pthread_mutex_lock(&rm->lock);
	req = rm->slot[i];
	if (!req) { /* cannot happen (see above); never a NULL dereference */
		pthread_mutex_unlock(&rm->lock);
		return;
	}
	req->result = result;
	if (rm->sending[i]) {
		rm->answered[i] = true;
		req = NULL;
	} else {
		nr_release_slot_locked(rm, i);
	}
	pthread_mutex_unlock(&rm->lock);
	if (req)
		req->complete(req);
}

/* The sender of slot i is done: complete the request if it was answered
 * meanwhile. */
static void nr_sent_slot(struct remote *rm, unsigned i)
{
	struct devio_request *req = NULL;

	pthread_mutex_lock(&rm->lock);
	rm->sending[i] = false;
	if (rm->answered[i]) {
		req = rm->slot[i];
		nr_release_slot_locked(rm, i);
	}
	pthread_mutex_unlock(&rm->lock);
	if (req)
		req->complete(req);
}

/* The request for a cookie, left in its slot (structured replies may
 * come in several chunks); NULL if no such request is in flight. */
static struct devio_request *nr_find_slot(struct remote *rm, uint64_t cookie)
{
	uint32_t i = (uint32_t)cookie, gen = (uint32_t)(cookie >> 32);
	struct devio_request *req = NULL;

	pthread_mutex_lock(&rm->lock);
	if (i < REMOTE_SLOTS && rm->slot[i] && rm->gen[i] == gen && !rm->answered[i])
		req = rm->slot[i]; /* an answered one is no longer in flight */
	pthread_mutex_unlock(&rm->lock);
	return req;
}

/* One simple reply (after its 4-byte magic).  0, or -errno to close. */
static int nr_simple_reply(struct remote *rm)
{
	uint8_t hdr[NBD_SIMPLE_REPLY_SIZE - 4];
	struct devio_request *req;
	uint32_t err;
	int r;

	if ((r = nr_read_full(rm, hdr, sizeof(hdr))))
		return r;
	req = nr_find_slot(rm, nbd_get64(hdr + 4));
	if (!req) {
		devio_err("%s: reply for a request never sent; closing", rm->name);
		return -EPROTO;
	}
	err = nbd_get32(hdr);
	if (!err && req->op == DEVIO_OP_READ && req->length && rm->structured) {
		/* A simple reply to a read is not allowed with structured replies. */
		devio_err("%s: simple reply with data to a read; closing", rm->name);
		r = -EPROTO;
	} else if (!err && req->op == DEVIO_OP_READ && req->length) {
		r = nr_read_full(rm, req->buf, req->length);
	}
	if (err)
		devio_debug("%s: %s at offset %llu: server error %u", rm->name, devio_op_name(req->op),
			    (unsigned long long)req->offset, err);
	nr_answer_slot(rm, nbd_get64(hdr + 4), r ? -EIO : err ? devio_nbd_to_errno(err) : 0);
	return r;
}

/* Is [off, off+len) inside the request? */
static bool nr_in_request(const struct devio_request *req, uint64_t off, uint64_t len)
{
	return off >= req->offset && len <= req->length && off - req->offset <= req->length - len;
}

static int nr_chunk_data(struct remote *rm, struct devio_request *req, uint16_t type, uint32_t len)
{
	uint8_t hdr[12];
	uint64_t off;
	int r;

	if (req->op != DEVIO_OP_READ || req->priv[1] == REQ_KIND_BS)
		return -EPROTO;
	if (type == NBD_REPLY_TYPE_OFFSET_HOLE) {
		if (len != 12 || (r = nr_read_full(rm, hdr, 12)))
			return len != 12 ? -EPROTO : r;
		off = nbd_get64(hdr);
		if (!nbd_get32(hdr + 8) || !nr_in_request(req, off, nbd_get32(hdr + 8)))
			return -EPROTO;
		memset((uint8_t *)req->buf + (off - req->offset), 0, nbd_get32(hdr + 8));
		return 0;
	}
	if (len < 9 || (r = nr_read_full(rm, hdr, 8)))
		return len < 9 ? -EPROTO : r;
	off = nbd_get64(hdr);
	if (!nr_in_request(req, off, len - 8))
		return -EPROTO;
	return nr_read_full(rm, (uint8_t *)req->buf + (off - req->offset), len - 8);
}

static int nr_chunk_block_status(struct remote *rm, struct devio_request *req, uint32_t len)
{
	struct bs_query *q = (struct bs_query *)req;
	uint8_t id[4];
	uint32_t keep;
	int r;

	if (req->priv[1] != REQ_KIND_BS || len < 12 || (len - 4) % 8)
		return -EPROTO;
	if ((r = nr_read_full(rm, id, 4)))
		return r;
	len -= 4;
	keep = len < sizeof(q->desc) ? len : (uint32_t)sizeof(q->desc);
	if (nbd_get32(id) != rm->meta_id)
		keep = 0; /* a context we did not ask for */
	if ((r = nr_read_full(rm, q->desc, keep)) || (r = nr_discard_full(rm, len - keep)))
		return r;
	if (keep)
		q->ndesc = keep / 8;
	return 0;
}

static int nr_chunk_error(struct remote *rm, struct devio_request *req, uint32_t len)
{
	uint8_t e[6];
	int r;

	if (len < 6 || len > REMOTE_MAX_CHUNK_SKIP)
		return -EPROTO;
	if ((r = nr_read_full(rm, e, 6)) || (r = nr_discard_full(rm, len - 6)))
		return r;
	req->priv[0] = (uint64_t)(int64_t)devio_nbd_to_errno(nbd_get32(e) ? nbd_get32(e) : NBD_EIO);
	devio_debug("%s: %s at offset %llu: server error %u", rm->name, devio_op_name(req->op),
		    (unsigned long long)req->offset, nbd_get32(e));
	return 0;
}

/* One structured reply chunk (after its magic).  0, or -errno to close. */
static int nr_structured_chunk(struct remote *rm)
{
	uint8_t hdr[NBD_CHUNK_HEADER_SIZE - 4];
	struct devio_request *req;
	uint16_t flags, type;
	uint32_t len;
	int r;

	if ((r = nr_read_full(rm, hdr, sizeof(hdr))))
		return r;
	flags = nbd_get16(hdr);
	type = nbd_get16(hdr + 2);
	len = nbd_get32(hdr + 12);
	req = rm->structured ? nr_find_slot(rm, nbd_get64(hdr + 4)) : NULL;
	if (!req) {
		devio_err("%s: structured reply for a request never sent; closing", rm->name);
		return -EPROTO;
	}
	if (type == NBD_REPLY_TYPE_NONE)
		r = len ? -EPROTO : 0;
	else if (type == NBD_REPLY_TYPE_OFFSET_DATA || type == NBD_REPLY_TYPE_OFFSET_HOLE)
		r = nr_chunk_data(rm, req, type, len);
	else if (type == NBD_REPLY_TYPE_BLOCK_STATUS)
		r = nr_chunk_block_status(rm, req, len);
	else if (type & (1u << 15))
		r = nr_chunk_error(rm, req, len);
	else
		r = -EPROTO;
	if (r) {
		devio_err("%s: bad reply chunk (type %u, %u bytes) for %s at offset %llu; closing", rm->name, type,
			  len, devio_op_name(req->op), (unsigned long long)req->offset);
		return r;
	}
	if (flags & NBD_REPLY_FLAG_DONE)
		nr_answer_slot(rm, nbd_get64(hdr + 4), (int)(int64_t)req->priv[0]);
	return 0;
}

static void *nr_reader_main(void *arg)
{
	struct remote *rm = arg;

	for (;;) {
		uint8_t magic[4];
		int r;

		if ((r = nr_read_full(rm, magic, sizeof(magic))))
			break;
		if (nbd_get32(magic) == NBD_SIMPLE_REPLY_MAGIC)
			r = nr_simple_reply(rm);
		else if (nbd_get32(magic) == NBD_STRUCTURED_REPLY_MAGIC)
			r = nr_structured_chunk(rm);
		else
			r = -EPROTO;
		if (r == -EPROTO && nbd_get32(magic) != NBD_SIMPLE_REPLY_MAGIC &&
		    nbd_get32(magic) != NBD_STRUCTURED_REPLY_MAGIC)
			devio_err("%s: bad reply magic 0x%08x; closing", rm->name, nbd_get32(magic));
		if (r)
			break;
	}
	nr_fail_all(rm);
	return NULL;
}

static uint16_t nr_command_of(const struct devio_request *req, uint16_t *flags)
{
	if (req->priv[1] == REQ_KIND_BS) {
		*flags = 0;
		return NBD_CMD_BLOCK_STATUS;
	}
	*flags = (req->flags & DEVIO_REQ_FUA) ? NBD_CMD_FLAG_FUA : 0;
	switch (req->op) {
	case DEVIO_OP_READ: *flags = 0; return NBD_CMD_READ;
	case DEVIO_OP_WRITE: return NBD_CMD_WRITE;
	case DEVIO_OP_FLUSH: *flags = 0; return NBD_CMD_FLUSH;
	case DEVIO_OP_TRIM: return NBD_CMD_TRIM;
	case DEVIO_OP_CACHE: *flags = 0; return NBD_CMD_CACHE;
	default:
		if (req->flags & DEVIO_REQ_NO_HOLE)
			*flags |= NBD_CMD_FLAG_NO_HOLE;
		if (req->flags & DEVIO_REQ_FAST_ZERO)
			*flags |= NBD_CMD_FLAG_FAST_ZERO;
		return NBD_CMD_WRITE_ZEROES;
	}
}

/* Put one request on the wire (it fits the server's limits and flags);
 * the reader thread completes it.  0, or -EIO when the connection is gone. */
static int nr_send_request(struct remote *rm, struct devio_request *req)
{
	uint8_t hdr[NBD_REQUEST_SIZE];
	struct devio_nbd_request nr;
	struct iovec iov[2];
	uint16_t flags, type = nr_command_of(req, &flags);
	unsigned i;
	int r;

	req->priv[0] = 0; /* error reported by a chunk */
	pthread_mutex_lock(&rm->lock);
	while (!rm->dead && rm->used == REMOTE_SLOTS)
		pthread_cond_wait(&rm->cond, &rm->lock);
	if (rm->dead) {
		pthread_mutex_unlock(&rm->lock);
		return -EIO;
	}
	for (i = 0; rm->slot[i]; i++)
		;
	rm->slot[i] = req;
	rm->sending[i] = true;
	rm->gen[i]++;
	rm->used++;
	nr.cookie = (uint64_t)rm->gen[i] << 32 | i;
	pthread_mutex_unlock(&rm->lock);
	nr.flags = flags;
	nr.type = type;
	nr.offset = req->op == DEVIO_OP_FLUSH ? 0 : req->offset;
	nr.length = req->op == DEVIO_OP_FLUSH ? 0 : (uint32_t)req->length;
	devio_nbd_encode_request(hdr, &nr);
	iov[0] = (struct iovec){ hdr, sizeof(hdr) };
	iov[1] = (struct iovec){ req->buf, req->op == DEVIO_OP_WRITE ? req->length : 0 };
	pthread_mutex_lock(&rm->send_lock);
	r = nr_sendv(rm, iov, iov[1].iov_len ? 2 : 1);
	pthread_mutex_unlock(&rm->send_lock);
	if (r) {
		/* The reader sees the broken connection and fails the slot. */
		devio_err("%s: sending a request: %s", rm->name, strerror(-r));
		shutdown(rm->fd, SHUT_RDWR);
	}
	nr_sent_slot(rm, i);
	return 0;
}

/* ---- synchronous callbacks: submit and wait, in pieces ---- */

struct waiter {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool done;
};

static void nr_wake(struct devio_request *req)
{
	struct waiter *w = req->opaque;

	pthread_mutex_lock(&w->lock);
	w->done = true;
	pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

static int nr_run_piece(struct devio_backend *b, enum devio_op op, void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	struct waiter w = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false };
	struct devio_request req = { .op = op, .flags = flags, .offset = off, .length = len, .buf = buf,
				     .complete = nr_wake, .opaque = &w, .backend = b };
	int r;

	r = nr_send_request(b->priv, &req);
	if (r)
		return r;
	pthread_mutex_lock(&w.lock);
	while (!w.done)
		pthread_cond_wait(&w.cond, &w.lock);
	pthread_mutex_unlock(&w.lock);
	return req.result;
}

static int nr_run_split(struct devio_backend *b, enum devio_op op, void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	struct remote *rm = b->priv;
	uint64_t piece = op == DEVIO_OP_READ || op == DEVIO_OP_WRITE ? rm->max_payload : REMOTE_MAX_RANGE;
	int r = 0;

	if (!(rm->tflags & NBD_FLAG_SEND_FUA))
		flags &= ~DEVIO_REQ_FUA; /* the core flushes afterwards */
	while (len && !r) {
		uint64_t n = len < piece ? len : piece;

		r = nr_run_piece(b, op, buf, n, off, flags);
		if (buf)
			buf = (uint8_t *)buf + n;
		off += n;
		len -= n;
	}
	return r;
}

static int nr_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	return nr_run_split(b, DEVIO_OP_READ, buf, len, off, 0);
}

static int nr_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	return nr_run_split(b, DEVIO_OP_WRITE, (void *)buf, len, off, flags);
}

static int nr_flush(struct devio_backend *b)
{
	struct remote *rm = b->priv;

	if (!(rm->tflags & NBD_FLAG_SEND_FLUSH))
		return 0;
	return nr_run_piece(b, DEVIO_OP_FLUSH, NULL, 0, 0, 0);
}

static int nr_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct remote *rm = b->priv;

	if (!(rm->tflags & NBD_FLAG_SEND_TRIM))
		return 0; /* a hint the server does not take */
	return nr_run_split(b, DEVIO_OP_TRIM, NULL, len, off, flags & DEVIO_REQ_FUA);
}

static int nr_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	static const uint8_t zeroes[1 << 20];
	struct remote *rm = b->priv;
	int r = 0;

	if (rm->tflags & NBD_FLAG_SEND_WRITE_ZEROES) {
		if ((flags & DEVIO_REQ_FAST_ZERO) && !(rm->tflags & NBD_FLAG_SEND_FAST_ZERO))
			return -EOPNOTSUPP;
		return nr_run_split(b, DEVIO_OP_ZERO, NULL, len, off, flags);
	}
	if (flags & DEVIO_REQ_FAST_ZERO)
		return -EOPNOTSUPP;
	while (len && !r) {
		uint64_t n = len < sizeof(zeroes) ? len : sizeof(zeroes);

		r = nr_run_split(b, DEVIO_OP_WRITE, (void *)zeroes, n, off, flags & DEVIO_REQ_FUA);
		off += n;
		len -= n;
	}
	return r;
}

/* Requests the wire cannot carry as they are (longer than the server's
 * maximum, FUA the server lacks, CACHE it does not offer) go back to the
 * core, which runs them on the calling thread with the synchronous
 * callbacks (in pieces; FUA as a flush after). */
static bool nr_needs_sync(const struct remote *rm, const struct devio_request *req)
{
	if ((req->op == DEVIO_OP_READ || req->op == DEVIO_OP_WRITE) && req->length > rm->max_payload)
		return true;
	if (req->length > REMOTE_MAX_RANGE)
		return true;
	if (req->op == DEVIO_OP_CACHE && !(rm->tflags & NBD_FLAG_SEND_CACHE))
		return true;
	if (req->op == DEVIO_OP_FLUSH && !(rm->tflags & NBD_FLAG_SEND_FLUSH))
		return true;
	if (req->op == DEVIO_OP_TRIM && !(rm->tflags & NBD_FLAG_SEND_TRIM))
		return true;
	if (req->op == DEVIO_OP_ZERO && (!(rm->tflags & NBD_FLAG_SEND_WRITE_ZEROES) ||
	    ((req->flags & DEVIO_REQ_FAST_ZERO) && !(rm->tflags & NBD_FLAG_SEND_FAST_ZERO))))
		return true;
	return (req->flags & DEVIO_REQ_FUA) && !(rm->tflags & NBD_FLAG_SEND_FUA) && req->op != DEVIO_OP_READ;
}

static int nr_submit(struct devio_backend *b, struct devio_request *req)
{
	struct remote *rm = b->priv;

	req->priv[1] = 0; /* an ordinary request */
	if (nr_needs_sync(rm, req))
		return -EAGAIN; /* the core runs it with the synchronous callbacks */
	return nr_send_request(rm, req);
}

/* base:allocation of [off, off+len), one BLOCK_STATUS query per 1 GiB. */
static int nr_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	struct remote *rm = b->priv;
	struct bs_query *q;
	int r = 0;

	if (!rm->have_meta)
		return fn(ctx, off, len, 0);
	q = malloc(sizeof(*q));
	if (!q)
		return -ENOMEM;
	while (len && !r) {
		struct waiter w = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false };
		uint64_t piece = len < REMOTE_MAX_RANGE ? len : REMOTE_MAX_RANGE, got = 0;

		memset(&q->req, 0, sizeof(q->req));
		q->req.op = DEVIO_OP_CACHE;
		q->req.offset = off;
		q->req.length = piece;
		q->req.complete = nr_wake;
		q->req.opaque = &w;
		q->req.backend = b;
		q->req.priv[1] = REQ_KIND_BS;
		q->ndesc = 0;
		if ((r = nr_send_request(rm, &q->req)))
			break;
		pthread_mutex_lock(&w.lock);
		while (!w.done)
			pthread_cond_wait(&w.cond, &w.lock);
		pthread_mutex_unlock(&w.lock);
		if ((r = q->req.result))
			break;
		for (uint32_t i = 0; i < q->ndesc && got < piece && !r; i++) {
			uint64_t n = nbd_get32(q->desc + 8 * i);
			uint32_t f = nbd_get32(q->desc + 8 * i + 4) & (DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO);

			if (n == 0) {
				r = -EIO;
				break;
			}
			if (n > piece - got)
				n = piece - got;
			r = fn(ctx, off + got, n, f);
			got += n;
		}
		if (!r && got == 0)
			r = -EIO; /* no descriptors: the server broke the protocol */
		off += got;
		len -= got;
	}
	free(q);
	return r;
}

static void nr_describe(struct devio_backend *b, char *out, size_t outlen)
{
	struct remote *rm = b->priv;

	snprintf(out, outlen, "nbd client of %s, %u requests in flight at most", rm->name, REMOTE_SLOTS);
}

static void nr_close(struct devio_backend *b)
{
	struct remote *rm = b->priv;
	struct devio_nbd_request nr = { .type = NBD_CMD_DISC };
	uint8_t disc[NBD_REQUEST_SIZE];

	pthread_mutex_lock(&rm->lock);
	while (rm->used && !rm->dead)
		pthread_cond_wait(&rm->cond, &rm->lock);
	pthread_mutex_unlock(&rm->lock);
	devio_nbd_encode_request(disc, &nr);
	pthread_mutex_lock(&rm->send_lock);
	nr_sendv(rm, &(struct iovec){ disc, sizeof(disc) }, 1);
	pthread_mutex_unlock(&rm->send_lock);
	shutdown(rm->fd, SHUT_RDWR);
	pthread_join(rm->reader, NULL);
	devio_tls_free(rm->tls);
	close(rm->fd);
	pthread_cond_destroy(&rm->cond);
	pthread_mutex_destroy(&rm->lock);
	pthread_mutex_destroy(&rm->send_lock);
	free(rm);
	free(b);
}

static const struct devio_backend_ops remote_ops = {
	.name = "nbd",
	.pread = nr_pread,
	.pwrite = nr_pwrite,
	.flush = nr_flush,
	.trim = nr_trim,
	.zero = nr_zero,
	.extents = nr_extents,
	.submit = nr_submit,
	.describe = nr_describe,
	.close = nr_close,
};

/* What the server offers, plus what this end gives for free: CACHE (a
 * hint, a no-op where the server has none) and MULTI_CONN (every front-end
 * connection shares the one connection to the server, so a flush on it
 * covers every write completed before, whichever client sent it). */
static uint32_t nr_caps_of(uint16_t f)
{
	uint32_t caps = DEVIO_CAP_CACHE | DEVIO_CAP_MULTI_CONN;

	if (f & NBD_FLAG_READ_ONLY)
		caps |= DEVIO_CAP_READONLY;
	if (f & NBD_FLAG_SEND_FLUSH)
		caps |= DEVIO_CAP_FLUSH;
	if (f & (NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_FLUSH))
		caps |= DEVIO_CAP_FUA; /* natively, or by flushing */
	if (f & NBD_FLAG_SEND_TRIM)
		caps |= DEVIO_CAP_TRIM;
	if (f & NBD_FLAG_SEND_WRITE_ZEROES)
		caps |= DEVIO_CAP_ZERO;
	if ((f & NBD_FLAG_SEND_WRITE_ZEROES) && (f & NBD_FLAG_SEND_FAST_ZERO))
		caps |= DEVIO_CAP_FAST_ZERO;
	return caps;
}

/* DEVIO_REMOTE_TIMEOUT=SECONDS bounds the handshake, as it bounds each
 * exchange of a devio:// client; NBD_CLIENT_TIMEOUT_S otherwise. */
static unsigned nr_handshake_timeout(void)
{
	const char *e = getenv("DEVIO_REMOTE_TIMEOUT");
	uint64_t v;

	if (e && !devio_parse_u64(e, &v) && v >= 1 && v <= 86400)
		return (unsigned)v;
	return NBD_CLIENT_TIMEOUT_S;
}

/* Take what the handshake agreed. */
static void nr_agreed(struct remote *rm, const struct devio_nbd_client_info *info)
{
	rm->tflags = info->tflags;
	rm->structured = info->structured;
	rm->have_meta = info->base_allocation;
	rm->meta_id = info->meta_id;
	rm->min_block = info->min_block;
	rm->max_payload = REMOTE_DEFAULT_MAX;
	if (info->max_block >= 512 && info->max_block < rm->max_payload)
		rm->max_payload = info->max_block;
}

int devio_remote_nbd_open(const char *uri, const struct devio_open_opts *opts, struct devio_backend **out)
{
	struct devio_nbd_client_opts co = { .name = uri, .structured = true, .base_allocation = true,
					    .timeout_s = nr_handshake_timeout() };
	struct devio_nbd_client_info info;
	struct devio_backend *b = NULL;
	struct devio_nbd_uri *u;
	struct remote *rm;
	char why[256];
	int r;

	u = malloc(sizeof(*u));
	rm = calloc(1, sizeof(*rm));
	b = calloc(1, sizeof(*b));
	if (!u || !rm || !b) {
		r = -ENOMEM;
		goto out_free;
	}
	if ((r = devio_nbd_uri_parse(uri, u, why, sizeof(why)))) {
		devio_err("%s: %s", uri, why);
		goto out_free;
	}
	snprintf(rm->name, sizeof(rm->name), "%s", uri);
	co.tls_out = &rm->tls;
	rm->fd = devio_nbd_client_connect(u, &co, &info);
	if (rm->fd < 0) {
		r = rm->fd;
		goto out_free;
	}
	nr_agreed(rm, &info);
	pthread_mutex_init(&rm->lock, NULL);
	pthread_mutex_init(&rm->send_lock, NULL);
	pthread_cond_init(&rm->cond, NULL);
	if (pthread_create(&rm->reader, NULL, nr_reader_main, rm)) {
		r = -EAGAIN;
		goto out_close;
	}
	b->ops = &remote_ops;
	b->size = info.size;
	b->block_size = rm->min_block;
	b->caps = nr_caps_of(rm->tflags) | (rm->have_meta ? DEVIO_CAP_EXTENTS : 0);
	b->max_io = rm->max_payload;
	b->priv = rm;
	free(u);
	*out = b;
	return 0;
out_close:
	devio_tls_free(rm->tls);
	close(rm->fd);
out_free:
	free(u);
	free(rm);
	free(b);
	return r;
}
