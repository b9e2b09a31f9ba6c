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
 *
 * With a reconnection timeout (`attach --timeout`) a connection that
 * breaks is not the end: a manager thread dials again with backoff (the
 * same handshake, called again), checks that the export is the same, and
 * sends what was not answered again, oldest first, before new requests;
 * changes hold their byte range until answered, so overlapping changes are
 * never in flight together and a reissued write cannot land after a newer
 * acknowledged one (docs/backends.md).
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/range_lock.h"
#include "devio/util.h"
#include "../lib/nbd_client.h"
#include "../lib/nbd_proto.h"

#define REMOTE_SLOTS 128
#define REMOTE_DEFAULT_MAX (32u << 20)
#define REMOTE_MAX_RANGE (1u << 30) /* TRIM/ZERO/BLOCK_STATUS pieces (the wire length is 32 bits) */
#define REMOTE_MAX_DESC 512         /* block status descriptors kept per query */
#define REMOTE_MAX_CHUNK_SKIP (16u << 20)

/* Where a slot's request is (rm->lock). */
enum nr_slot_state {
	SLOT_FREE = 0,
	SLOT_CLAIMED,  /* a thread (its submitter, or the manager replaying it) is sending it */
	SLOT_INFLIGHT, /* on the wire of connection slot_conn, not yet answered */
	SLOT_QUEUED,   /* waits for a connection: the manager (re)sends it, oldest first */
};

struct remote {
	char name[300];
	int fd;                      /* the current connection; changed only under send_lock */
	struct devio_tls *tls;       /* nbds://: every byte goes through it (changed with fd) */
	uint16_t tflags;
	uint32_t max_payload;
	uint32_t min_block;           /* the server's minimum block size, 1 if none */
	uint64_t size;
	pthread_t reader;
	bool reader_live;            /* a reader thread runs (or exited unjoined) on fd */
	pthread_mutex_t send_lock;
	pthread_mutex_t lock;        /* slots, connection state */
	pthread_cond_t cond;         /* a slot was freed or answered; the connection came back */
	struct devio_request *slot[REMOTE_SLOTS];
	uint32_t gen[REMOTE_SLOTS];
	uint8_t state[REMOTE_SLOTS];
	uint64_t seq[REMOTE_SLOTS];  /* submission order: replayed oldest first */
	uint32_t slot_conn[REMOTE_SLOTS];
	/* A reply (or a dead connection) can come while a claimed request's
	 * payload is still going out, and completing it would free that
	 * payload: its sender completes it once done. */
	bool answered[REMOTE_SLOTS]; /* while claimed: req->result is set */
	/* With reconnection, changes (WRITE, ZERO, TRIM) hold their range exclusively from before
	 * they are sent until answered: two overlapping changes are never on
	 * the wire together, so one that must be reissued after a lost
	 * connection can never land after a newer acknowledged one. */
	struct devio_range_lock ranges;
	struct devio_range range[REMOTE_SLOTS];
	bool ranged[REMOTE_SLOTS];
	unsigned used;
	uint64_t seq_next;
	bool structured;             /* structured replies negotiated */
	bool have_meta;              /* base:allocation selected */
	uint32_t meta_id;
	/* ---- the connection's life (rm->lock) ---- */
	bool dead;                   /* for good: every request fails with EIO */
	bool conn_ok;                /* the current connection is alive */
	bool up;                     /* connected, nothing left to replay: senders send */
	bool lost;                   /* the reader saw the connection end: the manager takes over */
	bool closing;
	uint32_t conn;               /* connection number, counted from 1 */
	uint64_t down_since;         /* devio_now_ns() of the loss, until the server answers again */
	uint64_t backoff_ns;         /* pause before redialling a server that has not answered since the last */
	bool told_back;              /* this loss's first reconnection was told (the others are debug) */
	unsigned timeout_s;          /* 0: no reconnection (dead at the first loss) */
	pthread_t manager;           /* reconnects and replays (only with timeout_s) */
	bool manager_live;
	pthread_cond_t mgr_cond;     /* lost or closing; monotonic clock */
	struct devio_nbd_uri *uri;
	struct devio_nbd_client_opts co;
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

/* ---- slots ---- */

/* Free slot i (lock held): its range goes, its request is the caller's
 * to complete. */
static struct devio_request *nr_release_slot_locked(struct remote *rm, unsigned i)
{
	struct devio_request *req = rm->slot[i];

	if (rm->ranged[i])
		devio_range_release(&rm->ranges, &rm->range[i]);
	rm->ranged[i] = false;
	rm->slot[i] = NULL;
	rm->state[i] = SLOT_FREE;
	rm->answered[i] = false;
	rm->used--;
	pthread_cond_broadcast(&rm->cond);
	return req;
}

/* Settle slot i with result (lock held): a claimed one is completed by
 * its sender, any other is released and returned for the caller to
 * complete after unlocking. */
static struct devio_request *nr_settle_locked(struct remote *rm, unsigned i, int result)
{
	rm->slot[i]->result = result;
	if (rm->state[i] == SLOT_CLAIMED) {
		rm->answered[i] = true;
		return NULL;
	}
	return nr_release_slot_locked(rm, i);
}

/* Fail (with EIO) every request not being sent, or only the queued ones;
 * lock held, the failed requests are completed after unlocking. */
static unsigned nr_fail_locked(struct remote *rm, bool queued_only, struct devio_request **done)
{
	unsigned n = 0;

	for (unsigned i = 0; i < REMOTE_SLOTS; i++) {
		struct devio_request *req;

		if (!rm->slot[i] || rm->state[i] == SLOT_FREE || (queued_only && rm->state[i] != SLOT_QUEUED))
			continue;
		if (rm->state[i] == SLOT_CLAIMED && rm->answered[i])
			continue; /* its real answer stands */
		if ((req = nr_settle_locked(rm, i, -EIO)))
			done[n++] = req;
	}
	return n;
}

static void nr_complete_all(struct devio_request **done, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		done[i]->complete(done[i]);
}

/* The connection is gone for good: fail everything in flight. */
static void nr_fail_all(struct remote *rm)
{
	struct devio_request *done[REMOTE_SLOTS];
	unsigned n;

	pthread_mutex_lock(&rm->lock);
	rm->dead = true;
	rm->up = false;
	rm->conn_ok = false;
	n = nr_fail_locked(rm, false, done);
	pthread_cond_broadcast(&rm->cond);
	pthread_mutex_unlock(&rm->lock);
	nr_complete_all(done, n);
}

/* The server answers (on the current connection): a loss is over, and
 * the next one is redialled at once (lock held). */
static void nr_answered_locked(struct remote *rm)
{
	rm->down_since = 0;
	rm->backoff_ns = 0;
}

/* The answer for the request in slot i, which nr_find_slot() returned to the
 * reader: complete it now, or leave that to its sender if it is still
 * being sent.  Only the reader answers, and a sender frees only answered
 * slots, so the slot is still there. */
static void nr_answer_slot(struct remote *rm, uint64_t cookie, int result)
{
	unsigned i = (uint32_t)cookie;
	struct devio_request *req = NULL;

	pthread_mutex_lock(&rm->lock);
	nr_answered_locked(rm); /* read by this connection's reader: the current one */
	if (rm->slot[i]) /* cannot be NULL (see above); never a NULL dereference */
		req = nr_settle_locked(rm, i, result);
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
	if (i < REMOTE_SLOTS && rm->slot[i] && rm->gen[i] == gen && !rm->answered[i] &&
	    rm->state[i] != SLOT_QUEUED)
		req = rm->slot[i]; /* an answered or queued one is not in flight here */
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

/* The reader saw its connection end with r.  Without reconnection, after
 * a broken protocol or at close, everything in flight fails; else what was
 * on the wire waits for the manager to reconnect and send it again. */
static void nr_conn_lost(struct remote *rm, int r)
{
	unsigned n = 0;

	pthread_mutex_lock(&rm->lock);
	if (!rm->timeout_s || rm->closing || r == -EPROTO || rm->dead) {
		pthread_mutex_unlock(&rm->lock);
		nr_fail_all(rm);
		pthread_mutex_lock(&rm->lock);
	} else {
		/* a connection lost again before the server answered anything (a
		 * server that crashes on what is sent again) is the same loss:
		 * the wait is counted from the first, and told once */
		bool again = rm->down_since != 0;

		rm->up = false;
		rm->conn_ok = false;
		if (!again) {
			rm->down_since = devio_now_ns();
			rm->told_back = false;
		}
		for (unsigned i = 0; i < REMOTE_SLOTS; i++) {
			if (rm->state[i] == SLOT_INFLIGHT && rm->slot_conn[i] == rm->conn)
				rm->state[i] = SLOT_QUEUED;
			n += rm->state[i] != SLOT_FREE;
		}
		devio_log(again ? DEVIO_LOG_DEBUG : DEVIO_LOG_WARN,
			  "%s: connection lost (%s) with %u request(s) in flight; they wait up to %u s for the server",
			  rm->name, r == -ECONNRESET ? "closed by the server" : strerror(-r), n, rm->timeout_s);
	}
	rm->lost = true;
	pthread_cond_broadcast(&rm->mgr_cond);
	pthread_cond_broadcast(&rm->cond); /* a replay waiting for answers */
	pthread_mutex_unlock(&rm->lock);
}

static void *nr_reader_main(void *arg)
{
	struct remote *rm = arg;
	int r;

	for (;;) {
		uint8_t magic[4];

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
	nr_conn_lost(rm, r);
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

/* A change of bytes: holds its range while in flight. */
static bool nr_is_change(const struct devio_request *req)
{
	return req->priv[1] != REQ_KIND_BS &&
	       (req->op == DEVIO_OP_WRITE || req->op == DEVIO_OP_ZERO || req->op == DEVIO_OP_TRIM);
}

/* Has the server been gone longer than the timeout (lock held)? */
static bool nr_expired_locked(const struct remote *rm)
{
	/* not while connected again: a replay under way is the server back */
	return !rm->conn_ok && rm->down_since &&
	       devio_now_ns() - rm->down_since >= (uint64_t)rm->timeout_s * 1000000000ull;
}

/* Write the request of claimed slot i on rm->fd (send_lock held).  A
 * broken connection is shut down: its reader sees it and reports the
 * loss.  0 or -errno. */
static int nr_write_request(struct remote *rm, unsigned i)
{
	struct devio_request *req = rm->slot[i]; /* stable: the slot is ours */
	uint8_t hdr[NBD_REQUEST_SIZE];
	struct devio_nbd_request nr;
	struct iovec iov[2];
	uint16_t flags, type = nr_command_of(req, &flags);
	int r;

	nr.cookie = (uint64_t)rm->gen[i] << 32 | i;
	nr.flags = flags;
	nr.type = type;
	nr.offset = req->op == DEVIO_OP_FLUSH ? 0 : req->offset;
	nr.length = req->op == DEVIO_OP_FLUSH ? 0 : (uint32_t)req->length;
	devio_nbd_encode_request(hdr, &nr);
	iov[0] = (struct iovec){ hdr, sizeof(hdr) };
	iov[1] = (struct iovec){ req->buf, req->op == DEVIO_OP_WRITE ? req->length : 0 };
	r = nr_sendv(rm, iov, iov[1].iov_len ? 2 : 1);
	if (r) {
		/* The reader sees the broken connection and says so. */
		devio_log(rm->timeout_s ? DEVIO_LOG_DEBUG : DEVIO_LOG_ERROR, "%s: sending a request: %s", rm->name,
			  strerror(-r));
		shutdown(rm->fd, SHUT_RDWR);
	}
	return r;
}

/* Send claimed slot i: by its submitter while the connection is up, by
 * the manager (replay) while a new connection is being caught up.  Sent
 * again when the connection it went out on was lost and a new one is up
 * already; queued for the manager while there is none; failed with EIO
 * once the server has been gone past the timeout.  Completes the request
 * if it was answered meanwhile. */
static void nr_transmit(struct remote *rm, unsigned i, bool replay)
{
	struct devio_request *req = NULL;

	for (;;) {
		pthread_mutex_lock(&rm->send_lock);
		pthread_mutex_lock(&rm->lock);
		if (rm->answered[i] || rm->dead || !(replay ? rm->conn_ok : rm->up)) {
			pthread_mutex_unlock(&rm->send_lock);
			break;
		}
		rm->slot_conn[i] = rm->conn;
		pthread_mutex_unlock(&rm->lock);
		nr_write_request(rm, i);
		pthread_mutex_unlock(&rm->send_lock);
		pthread_mutex_lock(&rm->lock);
		if (rm->answered[i] || rm->dead || !rm->up || (rm->slot_conn[i] == rm->conn && rm->conn_ok))
			break;
		pthread_mutex_unlock(&rm->lock); /* lost, and a new connection is up: again */
	}
	if (rm->answered[i]) {
		req = nr_release_slot_locked(rm, i);
	} else if (rm->dead || (!rm->conn_ok && nr_expired_locked(rm))) {
		rm->slot[i]->result = -EIO;
		req = nr_release_slot_locked(rm, i);
	} else if (rm->conn_ok && rm->slot_conn[i] == rm->conn && (rm->up || replay)) {
		rm->state[i] = SLOT_INFLIGHT;
	} else {
		rm->state[i] = SLOT_QUEUED; /* the manager sends it on the next connection */
	}
	pthread_mutex_unlock(&rm->lock);
	if (req)
		req->complete(req);
}

/* A free slot for req, claimed: -EIO when the server is gone for good or
 * past the timeout. */
static int nr_claim(struct remote *rm, struct devio_request *req, unsigned *slot)
{
	unsigned i;

	pthread_mutex_lock(&rm->lock);
	while (!rm->dead && !nr_expired_locked(rm) && rm->used == REMOTE_SLOTS)
		pthread_cond_wait(&rm->cond, &rm->lock);
	if (rm->dead || nr_expired_locked(rm)) {
		pthread_mutex_unlock(&rm->lock);
		return -EIO;
	}
	for (i = 0; rm->slot[i]; i++)
		;
	rm->slot[i] = req;
	rm->state[i] = SLOT_CLAIMED;
	rm->answered[i] = false;
	rm->slot_conn[i] = 0; /* not sent yet */
	rm->gen[i]++;
	rm->seq[i] = rm->seq_next++;
	rm->used++;
	pthread_mutex_unlock(&rm->lock);
	*slot = i;
	return 0;
}

/* Put one request on the wire (it fits the server's limits and flags);
 * the reader thread completes it.  0, or -EIO when the connection is gone
 * (for good, or past the timeout). */
static int nr_send_request(struct remote *rm, struct devio_request *req)
{
	unsigned i;
	int r;

	req->priv[0] = 0; /* error reported by a chunk */
	if ((r = nr_claim(rm, req, &i)))
		return r;
	if (rm->timeout_s && nr_is_change(req)) {
		/* after every older overlapping change is answered */
		devio_range_acquire(&rm->ranges, &rm->range[i], req->offset, req->offset + req->length, true);
		pthread_mutex_lock(&rm->lock);
		rm->ranged[i] = true;
		pthread_mutex_unlock(&rm->lock);
	}
	nr_transmit(rm, i, false);
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

/* Free rm, its locks and the URI it reconnects to. */
static void nr_free(struct remote *rm)
{
	devio_range_lock_destroy(&rm->ranges);
	pthread_cond_destroy(&rm->mgr_cond);
	pthread_cond_destroy(&rm->cond);
	pthread_mutex_destroy(&rm->lock);
	pthread_mutex_destroy(&rm->send_lock);
	free(rm->uri);
	free(rm);
}

/* After every request is answered (or failed: the server gone past the
 * timeout), stop the manager, say goodbye and stop the reader. */
static void nr_close(struct devio_backend *b)
{
	struct remote *rm = b->priv;
	struct devio_nbd_request nr = { .type = NBD_CMD_DISC };
	uint8_t disc[NBD_REQUEST_SIZE];

	pthread_mutex_lock(&rm->lock);
	while (rm->used && !rm->dead)
		pthread_cond_wait(&rm->cond, &rm->lock);
	rm->closing = true;
	pthread_cond_broadcast(&rm->mgr_cond);
	pthread_cond_broadcast(&rm->cond);
	pthread_mutex_unlock(&rm->lock);
	if (rm->manager_live)
		pthread_join(rm->manager, NULL);
	devio_nbd_encode_request(disc, &nr);
	pthread_mutex_lock(&rm->send_lock);
	if (rm->fd >= 0) {
		if (rm->up)
			nr_sendv(rm, &(struct iovec){ disc, sizeof(disc) }, 1);
		shutdown(rm->fd, SHUT_RDWR);
	}
	pthread_mutex_unlock(&rm->send_lock);
	if (rm->reader_live)
		pthread_join(rm->reader, NULL);
	devio_tls_free(rm->tls);
	if (rm->fd >= 0)
		close(rm->fd);
	nr_free(rm);
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

/* ---- reconnection: the manager thread ---- */

/* Sleep ns or until closing (lock held). */
static void nr_nap_locked(struct remote *rm, uint64_t ns)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	ns += (uint64_t)ts.tv_nsec;
	ts.tv_sec += (time_t)(ns / 1000000000u);
	ts.tv_nsec = (long)(ns % 1000000000u);
	if (!rm->closing)
		pthread_cond_timedwait(&rm->mgr_cond, &rm->lock, &ts);
}

/* Is a new connection's export the one the front ends were told about?
 * The same size, and every flag and limit they rely on. */
static int nr_same_export(const struct remote *rm, const struct devio_nbd_client_info *info, char *why, size_t len)
{
	uint32_t max = info->max_block >= 512 && info->max_block < REMOTE_DEFAULT_MAX ? info->max_block
										       : REMOTE_DEFAULT_MAX;

	if (info->size != rm->size)
		snprintf(why, len, "the server now offers %llu bytes, not %llu", (unsigned long long)info->size,
			 (unsigned long long)rm->size);
	else if (nr_caps_of(rm->tflags) & ~nr_caps_of(info->tflags) ||
		 ((info->tflags & NBD_FLAG_READ_ONLY) && !(rm->tflags & NBD_FLAG_READ_ONLY)))
		snprintf(why, len, "the server now offers flags 0x%x, not 0x%x", info->tflags, rm->tflags);
	else if (max < rm->max_payload || info->min_block > rm->min_block)
		snprintf(why, len, "the server now takes blocks of %u..%u bytes, not %u..%u", info->min_block, max,
			 rm->min_block, rm->max_payload);
	else
		return 0;
	return -ESTALE;
}

/* One attempt: a connection to the same export (by name: the server
 * refuses another), checked.  The socket, -EAGAIN to try again (why says
 * what failed), or -ESTALE: the export is not the same now, give up. */
static int nr_dial(struct remote *rm, struct devio_nbd_client_info *info, struct devio_tls **tls, char *why,
		   size_t len)
{
	struct devio_nbd_client_opts co = rm->co;
	int fd;

	*tls = NULL;
	co.tls_out = tls;
	devio_log_quiet(true); /* the loop says once what failed, not every attempt */
	fd = devio_nbd_client_connect(rm->uri, &co, info);
	devio_log_quiet(false);
	if (fd < 0) {
		/* -ENOENT may be no export of that name, or no socket file yet
		 * (a server starting): tried again until the timeout either way. */
		snprintf(why, len, "%s", strerror(-fd));
		return -EAGAIN;
	}
	if (nr_same_export(rm, info, why, len)) {
		devio_tls_free(*tls);
		*tls = NULL;
		close(fd);
		return -ESTALE;
	}
	return fd;
}

/* Join the lost connection's reader and close it. */
static void nr_drop_connection(struct remote *rm)
{
	if (rm->reader_live)
		pthread_join(rm->reader, NULL);
	rm->reader_live = false;
	pthread_mutex_lock(&rm->send_lock);
	devio_tls_free(rm->tls);
	rm->tls = NULL;
	if (rm->fd >= 0)
		close(rm->fd);
	rm->fd = -1;
	pthread_mutex_unlock(&rm->send_lock);
}

/* Fail what waits once the server has been gone past the timeout (lock
 * held; dropped while completing).  Told once per loss. */
static void nr_expire_locked(struct remote *rm, const char *why, bool *told)
{
	struct devio_request *done[REMOTE_SLOTS];
	unsigned n;

	if (!nr_expired_locked(rm))
		return;
	n = nr_fail_locked(rm, true, done);
	if (!*told)
		devio_err("%s: no server for %u s (%s): waiting requests fail with EIO, and new ones at once, "
			  "until it is back; still trying", rm->name, rm->timeout_s, why);
	*told = true;
	pthread_mutex_unlock(&rm->lock);
	nr_complete_all(done, n);
	pthread_mutex_lock(&rm->lock);
}

static bool nr_in_flight_locked(const struct remote *rm)
{
	for (unsigned i = 0; i < REMOTE_SLOTS; i++)
		if (rm->state[i] == SLOT_INFLIGHT)
			return true;
	return false;
}

/* Send what waits, oldest first (lock held).  A FLUSH goes out only once
 * every older request sent again on this connection is answered.  Up
 * when nothing is left; stops early if this connection is lost too. */
static unsigned nr_replay_locked(struct remote *rm)
{
	unsigned sent = 0;

	while (rm->conn_ok && !rm->closing) {
		int best = -1;
		bool older = false;

		for (unsigned i = 0; i < REMOTE_SLOTS; i++)
			if (rm->state[i] == SLOT_QUEUED && (best < 0 || rm->seq[i] < rm->seq[best]))
				best = (int)i;
		if (best < 0) {
			rm->up = true;
			/* nothing to wait for: the loss is over (its redial pause
			 * stays until the server answers something) */
			if (!nr_in_flight_locked(rm))
				rm->down_since = 0;
			pthread_cond_broadcast(&rm->cond);
			break;
		}
		for (unsigned i = 0; i < REMOTE_SLOTS && rm->slot[best]->op == DEVIO_OP_FLUSH; i++)
			older |= rm->state[i] == SLOT_INFLIGHT && rm->seq[i] < rm->seq[best];
		if (older) {
			pthread_cond_wait(&rm->cond, &rm->lock);
			continue;
		}
		rm->state[best] = SLOT_CLAIMED;
		pthread_mutex_unlock(&rm->lock);
		nr_transmit(rm, (unsigned)best, true);
		pthread_mutex_lock(&rm->lock);
		sent++;
	}
	return sent;
}

/* Take a new connection (lock held): its reader, then the replay. */
static void nr_take_connection_locked(struct remote *rm, int fd, struct devio_tls *tls,
				      const struct devio_nbd_client_info *info)
{
	uint64_t t0 = rm->down_since;
	unsigned n;

	pthread_mutex_unlock(&rm->lock);
	pthread_mutex_lock(&rm->send_lock);
	rm->fd = fd;
	rm->tls = tls;
	pthread_mutex_unlock(&rm->send_lock);
	pthread_mutex_lock(&rm->lock);
	rm->structured = info->structured;
	rm->have_meta = info->base_allocation;
	rm->meta_id = info->meta_id;
	rm->conn++;
	rm->conn_ok = true;
	rm->lost = false;
	if (pthread_create(&rm->reader, NULL, nr_reader_main, rm)) {
		devio_err("%s: no thread for the new connection", rm->name);
		rm->conn_ok = false;
		rm->lost = true; /* the manager closes it and tries again */
		return;
	}
	rm->reader_live = true;
	n = nr_replay_locked(rm);
	devio_log(rm->told_back ? DEVIO_LOG_DEBUG : DEVIO_LOG_INFO,
		  "%s: reconnected after %.1f s; %u request(s) sent again (in flight at the loss or held since)", rm->name,
		  (double)(devio_now_ns() - t0) / 1e9, n);
	rm->told_back = true;
}

/* The pause after one of ns: doubled, up to 2 s. */
static uint64_t nr_next_backoff(uint64_t ns)
{
	return ns * 2 > 2000000000u ? 2000000000u : ns * 2;
}

/* Reconnect with backoff (lock held, as on return): up again, dead
 * (another export, said why), or closing. */
static void nr_reconnect_locked(struct remote *rm)
{
	uint64_t backoff = 50000000u; /* 50 ms, doubling up to 2 s */
	char why[256] = "not tried yet";
	bool told = false;

	if (rm->backoff_ns) { /* lost again before it answered: not at once */
		snprintf(why, sizeof(why), "it closes the connection before answering");
		nr_nap_locked(rm, rm->backoff_ns);
		backoff = nr_next_backoff(rm->backoff_ns);
	}
	while (!rm->closing) {
		struct devio_nbd_client_info info;
		struct devio_tls *tls;
		int fd;

		nr_expire_locked(rm, why, &told);
		pthread_mutex_unlock(&rm->lock);
		fd = nr_dial(rm, &info, &tls, why, sizeof(why));
		pthread_mutex_lock(&rm->lock);
		if (fd >= 0 && rm->closing) {
			devio_tls_free(tls);
			close(fd);
		} else if (fd >= 0) {
			rm->backoff_ns = backoff; /* until it answers */
			nr_take_connection_locked(rm, fd, tls, &info);
			return;
		} else if (fd == -ESTALE) {
			devio_err("%s: reconnecting: %s; giving up (detach and attach again)", rm->name, why);
			pthread_mutex_unlock(&rm->lock);
			nr_fail_all(rm);
			pthread_mutex_lock(&rm->lock);
			return;
		} else {
			nr_nap_locked(rm, backoff);
			backoff = nr_next_backoff(backoff);
		}
	}
}

/* Waits for a lost connection, reconnects and replays, until close. */
static void *nr_manager_main(void *arg)
{
	struct remote *rm = arg;

	pthread_mutex_lock(&rm->lock);
	for (;;) {
		while (!rm->lost && !rm->closing)
			pthread_cond_wait(&rm->mgr_cond, &rm->lock);
		if (rm->closing)
			break;
		pthread_mutex_unlock(&rm->lock);
		nr_drop_connection(rm);
		pthread_mutex_lock(&rm->lock);
		rm->lost = false;
		if (!rm->dead)
			nr_reconnect_locked(rm);
	}
	pthread_mutex_unlock(&rm->lock);
	return NULL;
}

static void nr_cond_init_monotonic(pthread_cond_t *c)
{
	pthread_condattr_t a;

	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
	pthread_cond_init(c, &a);
	pthread_condattr_destroy(&a);
}

/* The reader, and the manager where the connection is to be kept. */
static int nr_start_threads(struct remote *rm)
{
	if (pthread_create(&rm->reader, NULL, nr_reader_main, rm))
		return -EAGAIN;
	rm->reader_live = true;
	if (rm->timeout_s && pthread_create(&rm->manager, NULL, nr_manager_main, rm)) {
		pthread_mutex_lock(&rm->lock);
		rm->closing = true;
		pthread_mutex_unlock(&rm->lock);
		shutdown(rm->fd, SHUT_RDWR);
		pthread_join(rm->reader, NULL);
		rm->reader_live = false;
		return -EAGAIN;
	}
	rm->manager_live = rm->timeout_s != 0;
	return 0;
}

int devio_remote_nbd_open(const char *uri, const struct devio_open_opts *opts, struct devio_backend **out)
{
	struct devio_nbd_client_opts co;
	struct devio_nbd_client_info info;
	struct devio_backend *b;
	struct remote *rm;
	char why[256];
	int r;

	rm = calloc(1, sizeof(*rm));
	b = calloc(1, sizeof(*b));
	if (!rm || !b || !(rm->uri = malloc(sizeof(*rm->uri)))) {
		free(rm);
		free(b);
		return -ENOMEM;
	}
	pthread_mutex_init(&rm->lock, NULL);
	pthread_mutex_init(&rm->send_lock, NULL);
	pthread_cond_init(&rm->cond, NULL);
	nr_cond_init_monotonic(&rm->mgr_cond);
	devio_range_lock_init(&rm->ranges);
	snprintf(rm->name, sizeof(rm->name), "%s", uri);
	rm->co = (struct devio_nbd_client_opts){ .name = rm->name, .structured = true, .base_allocation = true,
						 .timeout_s = nr_handshake_timeout() };
	rm->timeout_s = opts ? opts->remote_timeout : 0;
	if ((r = devio_nbd_uri_parse(uri, rm->uri, why, sizeof(why)))) {
		devio_err("%s: %s", uri, why);
		goto out_free;
	}
	co = rm->co;
	co.tls_out = &rm->tls;
	rm->fd = devio_nbd_client_connect(rm->uri, &co, &info);
	if (rm->fd < 0) {
		r = rm->fd;
		goto out_free;
	}
	nr_agreed(rm, &info);
	rm->size = info.size;
	rm->conn = 1;
	rm->conn_ok = rm->up = true;
	if ((r = nr_start_threads(rm)))
		goto out_free;
	b->ops = &remote_ops;
	b->size = info.size;
	b->block_size = rm->min_block;
	b->caps = nr_caps_of(rm->tflags) | (rm->have_meta ? DEVIO_CAP_EXTENTS : 0);
	b->max_io = rm->max_payload;
	b->priv = rm;
	*out = b;
	return 0;
out_free:
	devio_tls_free(rm->tls);
	if (rm->fd >= 0)
		close(rm->fd);
	nr_free(rm);
	free(b);
	return r;
}
