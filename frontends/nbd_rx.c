/* nbd_rx.c - the --nbd front end's reader: requests and payloads from
 * the connection's buffered socket, a short poll before sleeping in recv,
 * small reply batches held while more requests come, the checks' refusals,
 * and starting each request (devio_submit, the worker pool, block status,
 * splitting over max_io).
 */
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include "devio/layer.h"
#include "devio/listener.h"
#include "devio/util.h"
#include "devio/workers.h"
#include "nbd_int.h"

#define NBD_MAX_WRITE_DISCARD (256u << 20) /* larger refused writes: close */
#define NBD_MAX_EXTENTS 1024
#define NBD_SPIN_NS 30000               /* look for the next request before sleeping */
#define NBD_HOLD_NS 5000                /* hold a small batch of replies ... */
#define NBD_HOLD_MAX 16                 /* ... of fewer than this many ... */
#define NBD_HOLD_SKIP 64                /* ... unless the last holds saw nothing */

/* True as soon as the client has sent more bytes, false after ns. */
static bool nbd_rx_arrives_within(struct nbd_conn *c, uint64_t ns, bool yield)
{
	struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
	uint64_t until = devio_now_ns() + ns;

	if (c->tls && devio_tls_pending(c->tls))
		return true;
	do {
		if (poll(&pfd, 1, 0) != 0)
			return true;
		if (yield)
			sched_yield();
	} while (devio_now_ns() < until);
	return false;
}

/* Look for more bytes from the client for up to NBD_SPIN_NS; false if
 * none came.  The socket is drained and the replies are sent: the client
 * usually answers them (or sends the rest of a write) within microseconds.
 * A reader asleep in recv makes every send of the client pay for waking
 * it, and on loopback that wake-up is a good part of the client's CPU
 * time, which is what limits a loopback benchmark.  poll() looks without
 * the socket lock that recv takes, so the look does not contend with the
 * client's sends delivering to us; sched_yield() keeps it from starving a
 * client that shares this CPU. */
bool nbd_rx_ready_soon(struct nbd_conn *c)
{
	return nbd_rx_arrives_within(c, NBD_SPIN_NS, true);
}

/* Receive up to len bytes from the socket or, after STARTTLS, the TLS
 * session: > 0, 0 at the end, -EAGAIN (nonblock, nothing there) or
 * -errno. */
ssize_t nbd_rx_recv(struct nbd_conn *c, void *buf, size_t len, bool nonblock)
{
	ssize_t n;

	if (c->tls)
		return devio_tls_recv(c->tls, buf, len, nonblock);
	do
		n = recv(c->fd, buf, len, nonblock ? MSG_DONTWAIT : 0);
	while (n < 0 && errno == EINTR);
	return n < 0 ? (errno == EWOULDBLOCK ? -EAGAIN : -errno) : n;
}

/* Receive into buf, sleeping only after a short look. */
static ssize_t nbd_rx_recv_wait(struct nbd_conn *c, void *buf, size_t len)
{
	nbd_rx_ready_soon(c);
	return nbd_rx_recv(c, buf, len, false);
}

/* Hold a small batch of replies for a moment while more requests come:
 * a client that keeps many requests in flight sends the next ones while
 * we hold, and then gets the replies in fewer, larger sends (measured
 * over loopback: +6% 4K QD32 reads over TCP, +25% over a Unix socket; the
 * client is the bottleneck there, so fewer sends to take apart is what
 * helps).  A hold that sees nothing means the client may be waiting for
 * us (QD1): then skip holding for 1, 2, 4 ... up to NBD_HOLD_SKIP batches
 * while holds keep failing. */
static bool nbd_rx_hold_replies(struct nbd_conn *c)
{
	if (c->hold_skip) {
		c->hold_skip--;
		return false;
	}
	if (!c->corked_replies || c->corked_replies >= NBD_HOLD_MAX)
		return false;
	if (nbd_rx_arrives_within(c, NBD_HOLD_NS, false)) {
		c->hold_backoff = 1;
		return true;
	}
	c->hold_skip = c->hold_backoff;
	if (c->hold_backoff < NBD_HOLD_SKIP)
		c->hold_backoff *= 2;
	return false;
}

/* Make at least need bytes available in the rx buffer (need <= NBD_RX_SIZE).
 * While the last recv filled the buffer more requests may be waiting, so
 * look without blocking; once the socket is drained, send the replies the
 * batch produced and only then sleep in recv. */
static int nbd_rx_fill(struct nbd_conn *c, size_t need, bool header)
{
	while (c->rx_end - c->rx_start < need) {
		size_t space;
		ssize_t n;

		if (c->rx_start && c->rx_end + need > NBD_RX_SIZE) {
			memmove(c->rx, c->rx + c->rx_start, c->rx_end - c->rx_start);
			c->rx_end -= c->rx_start;
			c->rx_start = 0;
		}
		space = NBD_RX_SIZE - c->rx_end;
		if (c->rx_drained && nbd_rx_hold_replies(c)) {
			c->rx_drained = false;
			continue;
		}
		if (c->rx_drained) {
			nbd_tx_uncork(c); /* about to sleep: answer what we have */
			n = nbd_rx_recv_wait(c, c->rx + c->rx_end, space);
			nbd_tx_cork(c);
		} else {
			n = nbd_rx_recv(c, c->rx + c->rx_end, space, true);
			if (n == -EAGAIN) {
				c->rx_drained = true;
				continue;
			}
		}
		if (n == -EAGAIN || n == -ETIMEDOUT) {
			/* the socket's receive timeout (a listener's --idle/--stall-timeout) */
			/* between requests: nothing buffered here, nor TLS bytes read ahead or decrypted */
			if (devio_listener_conn_wait_more(header && c->rx_end == c->rx_start &&
							  !(c->tls && devio_tls_pending(c->tls))))
				continue;
			return -ETIMEDOUT;
		}
		if (n < 0)
			return (int)n;
		if (n == 0)
			return -ECONNRESET;
		c->rx_end += (size_t)n;
		/* A TLS receive gives one record at a time: only an empty
		 * non-blocking receive says the socket is drained. */
		c->rx_drained = !c->tls && (size_t)n < space;
	}
	return 0;
}

/* Copy len payload bytes to dst (NULL: throw them away).  Payloads that
 * fit the rx buffer come through it (one recv for header and payload);
 * larger ones go straight to dst. */
static int nbd_rx_payload(struct nbd_conn *c, uint8_t *dst, uint64_t len)
{
	size_t have = c->rx_end - c->rx_start;
	size_t n = have < len ? have : (size_t)len;
	uint8_t scratch[4096];
	int r = 0;

	if (len > have && len <= NBD_RX_PAYLOAD) {
		if ((r = nbd_rx_fill(c, (size_t)len, false)))
			return r;
		n = (size_t)len;
	}
	if (dst)
		memcpy(dst, c->rx + c->rx_start, n);
	c->rx_start += n;
	len -= n;
	if (!len)
		return 0;
	nbd_tx_uncork(c);
	while (len && !r) {
		uint8_t *p = dst ? dst + n : scratch;
		size_t want = dst || len < sizeof(scratch) ? (size_t)len : sizeof(scratch);
		ssize_t got = nbd_rx_recv_wait(c, p, want);

		if (got == -EAGAIN || got == -ETIMEDOUT) /* the socket's receive timeout */
			r = devio_listener_conn_wait_more(false) ? 0 : -ETIMEDOUT; /* logs the stall */
		else if (got < 0)
			r = (int)got;
		else if (got == 0)
			r = -ECONNRESET;
		else if (got > 0) {
			len -= (size_t)got;
			if (dst)
				n += (size_t)got;
		}
	}
	nbd_tx_cork(c);
	return r;
}

/* ---- running requests ---- */

struct nbd_rx_bs_walk {
	uint8_t *out;
	unsigned n, max;
	uint64_t pos, end;
};

static int nbd_rx_bs_extent(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct nbd_rx_bs_walk *w = ctx;
	uint32_t st = flags & (NBD_STATE_HOLE | NBD_STATE_ZERO);
	uint64_t e = off + len;

	if (e <= w->pos || len == 0)
		return 0;
	if (off > w->pos)
		return -EIO; /* a gap: the backend broke its promise */
	if (e > w->end)
		e = w->end;
	len = e - w->pos;
	if (w->n && nbd_get32(w->out + 8 * (w->n - 1) + 4) == st) {
		uint8_t *d = w->out + 8 * (w->n - 1);
		nbd_put32(d, (uint32_t)(nbd_get32(d) + len));
	} else {
		if (w->n == w->max)
			return 1;
		nbd_put32(w->out + 8 * w->n, (uint32_t)len);
		nbd_put32(w->out + 8 * w->n + 4, st);
		w->n++;
	}
	w->pos = e;
	return w->pos >= w->end ? 1 : 0;
}

/* NBD_CMD_BLOCK_STATUS for base:allocation, run on the reader thread. */
static void nbd_rx_run_block_status(struct nbd_conn *c, struct nbd_slot *sl)
{
	struct devio_backend *b = c->b;
	unsigned max = (sl->nr.flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : NBD_MAX_EXTENTS;
	struct nbd_rx_bs_walk w;
	int r = 0;

	if (nbd_slot_reserve(sl, 4 + 8 * NBD_MAX_EXTENTS)) {
		sl->req.result = -ENOMEM;
		goto out;
	}
	nbd_put32(sl->buf, NBD_META_ID_BASE_ALLOCATION);
	w = (struct nbd_rx_bs_walk){ sl->buf + 4, 0, max, sl->nr.offset, sl->nr.offset + sl->nr.length };
	if (b->caps & DEVIO_CAP_EXTENTS)
		r = devio_extents(b, sl->nr.offset, sl->nr.length, nbd_rx_bs_extent, &w);
	if (r < 0)
		devio_warn("nbd %s: extents at offset %llu: %s; reporting allocated data", c->peer,
			   (unsigned long long)sl->nr.offset, strerror(-r));
	if (w.n == 0) {
		/* No information: one allocated extent is always a true answer. */
		nbd_put32(w.out, sl->nr.length);
		nbd_put32(w.out + 4, 0);
		w.n = 1;
	}
	sl->req.length = 4 + 8 * w.n;
	sl->req.result = 0;
out:
	nbd_slot_complete(&sl->req);
}

static void nbd_rx_backend_start(struct nbd_conn *c, struct devio_request *req)
{
	if (c->use_workers)
		devio_workers_submit(c->st->workers, c->b, req);
	else
		devio_submit(c->b, req);
}

/* A READ/WRITE longer than the backend takes at once (max_io): pieces
 * one after the other, each with the request's flags, on the reader,
 * which waits for each; the first failing piece fails the request.  Never
 * from a completion: a backend's completion thread must not be made to
 * submit (the NBD client backend's would wait for a slot or a send that
 * only it can free).  Rare (over 32 MiB for a remote NBD server), so the
 * reader may wait; what is queued goes out meanwhile. */
static void nbd_rx_run_split(struct nbd_conn *c, struct nbd_slot *sl)
{
	struct devio_request *req = &sl->req;
	uint64_t done = 0;
	int r = 0;

	nbd_tx_uncork(c);
	while (!r && done < req->length) {
		struct devio_request piece = { .op = req->op, .flags = req->flags, .offset = req->offset + done,
					       .buf = (uint8_t *)req->buf + done };

		piece.length = req->length - done < c->b->max_io ? req->length - done : c->b->max_io;
		r = devio_execute(c->b, &piece);
		done += piece.length;
	}
	nbd_tx_cork(c);
	req->result = r;
	nbd_slot_complete(req);
}

static void nbd_rx_run_request(struct nbd_conn *c, struct nbd_slot *sl)
{
	struct devio_request *req = &sl->req;
	uint16_t f = sl->nr.flags;

	memset(req, 0, sizeof(*req));
	req->offset = sl->nr.offset;
	req->length = sl->nr.length;
	req->complete = nbd_slot_complete;
	req->opaque = sl;
	req->flags = (f & NBD_CMD_FLAG_FUA) ? DEVIO_REQ_FUA : 0;
	switch (sl->nr.type) {
	case NBD_CMD_READ:
		req->op = DEVIO_OP_READ;
		req->buf = sl->buf;
		break;
	case NBD_CMD_WRITE:
		req->op = DEVIO_OP_WRITE;
		req->buf = sl->buf;
		break;
	case NBD_CMD_FLUSH:
		req->op = DEVIO_OP_FLUSH;
		req->offset = req->length = 0;
		break;
	case NBD_CMD_TRIM:
		req->op = DEVIO_OP_TRIM;
		break;
	case NBD_CMD_WRITE_ZEROES:
		req->op = DEVIO_OP_ZERO;
		if (f & NBD_CMD_FLAG_NO_HOLE)
			req->flags |= DEVIO_REQ_NO_HOLE;
		if (f & NBD_CMD_FLAG_FAST_ZERO)
			req->flags |= DEVIO_REQ_FAST_ZERO;
		break;
	case NBD_CMD_CACHE:
		req->op = DEVIO_OP_CACHE;
		break;
	case NBD_CMD_BLOCK_STATUS:
		nbd_rx_run_block_status(c, sl);
		return;
	}
	if ((req->op == DEVIO_OP_READ || req->op == DEVIO_OP_WRITE) && c->b->max_io && req->length > c->b->max_io) {
		nbd_rx_run_split(c, sl);
		return;
	}
	nbd_rx_backend_start(c, req);
}

/* Answer a request that failed before it ran (why: for the client). */
static void nbd_rx_reply_error(struct nbd_conn *c, struct nbd_slot *sl, uint32_t error, const char *why)
{
	sl->req.op = DEVIO_OP_READ;
	nbd_encode_reply(sl, error, why);
	nbd_tx_queue(c, sl);
}

/* Say once, here where the rule is known, why a request was refused: the
 * command, its range, the export and the rule (the client gets the rule
 * too).  outcome: " with EINVAL" and the like, or "" when the connection
 * is closed instead of answering. */
static void nbd_rx_log_refusal(struct nbd_conn *c, const struct devio_nbd_request *nr, const char *outcome, const char *why)
{
	char cmd[24];

	devio_warn("nbd %s: export '%s' (%llu bytes): %s offset %llu length %u refused%s: %s", c->peer,
		   c->s.export->name, (unsigned long long)c->b->size, nbd_cmd_label(nr->type, cmd, sizeof(cmd)),
		   (unsigned long long)nr->offset, nr->length, outcome, why);
}

/* Answer a request that failed its checks.  The payload of a refused
 * write is read and thrown away so that the next request is understood;
 * one too large for that ends the connection.  A client that keeps
 * sending bad requests gets NBD_LOG_REFUSED lines in the log; the rest
 * are counted and summed up when it leaves.  Returns 0 or -errno. */
static int nbd_rx_refuse_request(struct nbd_conn *c, const struct devio_nbd_request *nr, uint32_t err, const char *why)
{
	struct nbd_slot *sl;
	char text[256];
	int r;

	c->refused++;
	if (nr->type == NBD_CMD_WRITE && nr->length > NBD_MAX_WRITE_DISCARD) {
		snprintf(text, sizeof(text), "%s, and more than the %u MiB of payload we read and drop; closing",
			 why, NBD_MAX_WRITE_DISCARD >> 20);
		nbd_rx_log_refusal(c, nr, "", text);
		return -EMSGSIZE;
	}
	if (c->refused <= NBD_LOG_REFUSED) {
		snprintf(text, sizeof(text), " with %s%s", devio_nbd_error_name(err),
			 c->refused == NBD_LOG_REFUSED ? " (later refusals on this connection are only counted)" : "");
		nbd_rx_log_refusal(c, nr, text, why);
	}
	if (nr->type == NBD_CMD_WRITE && (r = nbd_rx_payload(c, NULL, nr->length)))
		return r;
	sl = nbd_slot_get(c, 0);
	sl->nr = *nr;
	nbd_rx_reply_error(c, sl, err, why);
	return 0;
}

/* Read, check and start one request.  Returns 1 on NBD_CMD_DISC, 0 to
 * go on, negative to drop the connection. */
int nbd_handle_one(struct nbd_conn *c)
{
	struct devio_nbd_request nr;
	struct nbd_slot *sl;
	char why[160];
	uint32_t err;
	bool payload;
	size_t bytes;
	int r;

	if ((r = nbd_rx_fill(c, NBD_REQUEST_SIZE, true)))
		return r;
	if (devio_nbd_decode_request(c->rx + c->rx_start, &nr)) {
		devio_warn("nbd %s: bad request magic; closing", c->peer);
		return -EPROTO;
	}
	c->rx_start += NBD_REQUEST_SIZE;
	if (nr.type == NBD_CMD_DISC)
		return 1;
	err = devio_nbd_check_request(&c->s, &nr, why, sizeof(why));
	if (err)
		return nbd_rx_refuse_request(c, &nr, err, why);
	payload = nr.type == NBD_CMD_WRITE;
	if (nr.type == NBD_CMD_READ && (nbd_read_in_place(c, &nr) || nbd_read_spliced(c, &nr)))
		return 0;
	if (payload && nr.length && (r = nbd_write_in_place(c, &nr)))
		return r < 0 ? r : 0;
	if (payload && (r = nbd_write_spliced(c, &nr)))
		return r < 0 ? r : 0;
	bytes = nr.type == NBD_CMD_READ || payload ? nr.length : 0;
	sl = nbd_slot_get(c, bytes);
	sl->nr = nr;
	if (bytes && nbd_slot_reserve(sl, bytes)) {
		devio_err("nbd %s: no memory for %zu bytes at offset %llu", c->peer, bytes,
			  (unsigned long long)nr.offset);
		if (payload && (r = nbd_rx_payload(c, NULL, nr.length)))
			return r;
		nbd_rx_reply_error(c, sl, NBD_ENOMEM, "out of memory");
		return 0;
	}
	if (payload && (r = nbd_rx_payload(c, sl->buf, nr.length))) {
		nbd_rx_reply_error(c, sl, NBD_EIO, NULL); /* never sent: the peer is gone */
		return r;
	}
	nbd_rx_run_request(c, sl);
	return 0;
}
