/* nbd.c - the --nbd front end: serves srv->exports over NBD (fixed
 * newstyle, structured replies, base:allocation) on TCP or Unix sockets.
 *
 * Threads: one listener per --nbd address (lib/listener.c: at most
 * NBD_MAX_CONNS clients at once); one reader thread per client
 * connection.  The reader decodes requests from a buffered socket into a
 * bounded pool of slots (request + buffer) and starts them with
 * devio_submit() (io_uring for the file backend) or on a worker pool for
 * synchronous backends.  Completions, on whatever thread, encode the reply
 * into the slot and queue it; one thread at a time sends the queue with
 * writev, so replies go out in batches, out of order, header and data in
 * one call.  While the reader still has buffered requests to process it
 * "corks" the queue, so a burst of requests is answered with few syscalls.
 *
 * Ordering: a FLUSH covers every write whose reply was sent before the
 * FLUSH arrived; replies are only sent after the backend completed the
 * write, so submitting the flush when it arrives is enough.  FUA is the
 * core's and the backend's business (DEVIO_REQ_FUA).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/frontend.h"
#include "devio/listener.h"
#include "devio/layer.h"
#include "devio/util.h"
#include "devio/workers.h"
#include "../lib/nbd_proto.h"

#define NBD_DEFAULT_DEPTH 64
#define NBD_MAX_CONNS 128                  /* clients served at once; more are closed at once */
#define NBD_STOP_GRACE_MS 2000             /* stop: time to answer what is in flight */
#define NBD_MAX_DEPTH 1024
#define NBD_RX_SIZE (64u << 10)   /* small: big payloads go straight to their slot */
#define NBD_RX_PAYLOAD (NBD_RX_SIZE / 2) /* payloads up to this come through the rx buffer */
#define NBD_KEEP_BUF (1u << 20)          /* slot buffers up to this size are kept */
#define NBD_MAX_BYTES_IN_FLIGHT (256u << 20) /* 4 requests of NBD_MAX_PAYLOAD */
#define NBD_MAX_WRITE_DISCARD (256u << 20) /* larger refused writes: close */
#define NBD_LOG_REFUSED 8                  /* refused requests logged per connection */
#define NBD_MAX_CHUNKS 16                 /* content chunks in one sparse read */
#define NBD_SPARSE_BLOCK 4096u
#define NBD_MAX_EXTENTS 1024
#define NBD_SLOT_IOV (2 * NBD_MAX_CHUNKS + 2)
#define NBD_SLOT_HDR (NBD_MAX_CHUNKS * 32 + 128)
#define NBD_TX_IOV 256
#define NBD_SPIN_NS 30000               /* look for the next request before sleeping */
#define NBD_HOLD_NS 5000                /* hold a small batch of replies ... */
#define NBD_HOLD_MAX 16                 /* ... of fewer than this many ... */
#define NBD_HOLD_SKIP 64                /* ... unless the last holds saw nothing */
#define NBD_SPLICE_PIPE (1u << 20)      /* pipe between socket and page cache */

struct nbd_conn;

struct nbd_slot {
	struct devio_request req;
	struct nbd_conn *c;
	struct devio_nbd_request nr;
	uint8_t *buf;
	size_t cap;
	size_t held;          /* bytes counted against the connection's budget */
	uint32_t error;       /* NBD error decided before running, or 0 */
	int npieces;          /* a READ sent from the store in place: pieces[] */
	struct iovec pieces[NBD_MAX_CHUNKS];
	struct nbd_slot *next;
	int niov;
	struct iovec iov[NBD_SLOT_IOV];
	uint8_t hdr[NBD_SLOT_HDR];
};

struct nbd_state;

struct nbd_conn {
	struct nbd_state *st;
	int fd;
	char peer[64];
	struct devio_nbd_session s;
	struct devio_backend *b;
	bool use_workers;
	bool in_place_writes;     /* Unix socket: receive writes into the store */
	bool splice_writes;       /* large writes spliced through pipe[] */
	bool splice_reads;        /* large reads too */
	int pipe[2];
	size_t pipe_size;

	uint8_t *rx;
	size_t rx_start, rx_end;
	bool rx_drained;          /* the last recv emptied the socket */
	unsigned corked_replies;  /* replies the reader queued since it last sent */
	unsigned hold_skip;       /* batches to send without holding */
	unsigned hold_backoff;    /* the next hold_skip after a failed hold */
	unsigned refused;         /* requests refused by the checks (reader only) */

	pthread_mutex_t lock;
	pthread_cond_t cond;      /* a slot was released */
	struct nbd_slot *slots, *free_slots;
	unsigned inflight;
	size_t bytes;
	struct nbd_slot *tx_head, *tx_tail;
	bool sending, corked, broken;
	pthread_t reader_tid;
	/* Completions on other threads (io_uring, workers) hand their replies
	 * to this thread, so that a client that stops reading can block only
	 * its own connection, never a backend's shared completion thread. */
	pthread_t sender;
	bool has_sender, closing;
	pthread_cond_t tx_cond;
};

struct nbd_state {
	struct devio_server *srv;
	struct devio_addr addr;
	char name[300];
	struct devio_listener *listener; /* lib/listener.c: accept, cap, stop grace */
	unsigned depth;
	struct devio_workers *workers;
};

/* ---- negotiation I/O on the socket ---- */

static int sock_read(void *ctx, void *buf, size_t len)
{
	return devio_read_full(*(int *)ctx, buf, len);
}

static int sock_write(void *ctx, const void *buf, size_t len)
{
	return devio_write_full(*(int *)ctx, buf, len);
}

/* ---- sending replies ---- */

static int send_iov(int fd, struct iovec *iov, int n, int flags)
{
	while (n > 0) {
		struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
		ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL | flags);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		while (n > 0 && (size_t)w >= iov->iov_len) {
			w -= (ssize_t)iov->iov_len;
			iov++;
			n--;
		}
		if (n > 0) {
			iov->iov_base = (uint8_t *)iov->iov_base + w;
			iov->iov_len -= (size_t)w;
		}
	}
	return 0;
}

/* Throw away what a failed transfer left in the pipe. */
static void pipe_empty(struct nbd_conn *c)
{
	uint8_t scratch[4096];

	while (read(c->pipe[0], scratch, sizeof(scratch)) > 0)
		;
}

static void slot_release_locked(struct nbd_conn *c, struct nbd_slot *sl)
{
	if (sl->cap > NBD_KEEP_BUF) {
		free(sl->buf);
		sl->buf = NULL;
		sl->cap = 0;
	}
	c->bytes -= sl->held;
	sl->held = 0;
	sl->next = c->free_slots;
	c->free_slots = sl;
	c->inflight--;
	pthread_cond_broadcast(&c->cond);
}

/* Send everything queued; called with c->lock held, by one thread at a
 * time (c->sending).  Drops the lock while writing.  The reader stops
 * while it is corked; the sender thread does not. */
static void tx_flush_locked(struct nbd_conn *c, bool by_reader)
{
	struct iovec iov[NBD_TX_IOV];

	if (c->sending)
		return;
	c->sending = true;
	while (c->tx_head && !(by_reader && c->corked)) {
		struct nbd_slot *batch = c->tx_head, *sl, *last = NULL;
		int n = 0, r = 0;

		/* Take as many whole replies as fit the iovec array. */
		for (sl = batch; sl && n + sl->niov <= NBD_TX_IOV; sl = sl->next) {
			memcpy(iov + n, sl->iov, (size_t)sl->niov * sizeof(*iov));
			n += sl->niov;
			last = sl;
		}
		c->tx_head = last->next;
		if (!c->tx_head)
			c->tx_tail = NULL;
		last->next = NULL;
		pthread_mutex_unlock(&c->lock);
		if (!c->broken)
			r = send_iov(c->fd, iov, n, 0);
		pthread_mutex_lock(&c->lock);
		if (r) {
			if (!c->broken)
				devio_debug("nbd %s: sending replies: %s", c->peer, strerror(-r));
			c->broken = true;
		}
		while (batch) {
			sl = batch->next;
			slot_release_locked(c, batch);
			batch = sl;
		}
	}
	c->sending = false;
	pthread_cond_broadcast(&c->cond); /* a reader may wait to send alone */
	/* A corked reader leaves its replies for its own uncork (waking the
	 * sender for them would cost a wake-up per reply). */
	if (c->tx_head && c->has_sender && !(by_reader && c->corked))
		pthread_cond_signal(&c->tx_cond);
}

static void tx_queue(struct nbd_conn *c, struct nbd_slot *sl)
{
	pthread_mutex_lock(&c->lock);
	sl->next = NULL;
	if (c->tx_tail)
		c->tx_tail->next = sl;
	else
		c->tx_head = sl;
	c->tx_tail = sl;
	if (pthread_equal(pthread_self(), c->reader_tid)) {
		c->corked_replies++;
		tx_flush_locked(c, true);
	}
	else if (c->has_sender)
		pthread_cond_signal(&c->tx_cond);
	else
		tx_flush_locked(c, false);
	pthread_mutex_unlock(&c->lock);
}

static void *sender_main(void *arg)
{
	struct nbd_conn *c = arg;

	pthread_mutex_lock(&c->lock);
	for (;;) {
		if (c->tx_head && !c->sending) {
			tx_flush_locked(c, false);
			continue;
		}
		if (c->closing)
			break;
		pthread_cond_wait(&c->tx_cond, &c->lock);
	}
	pthread_mutex_unlock(&c->lock);
	return NULL;
}

/* The reader is about to block: send what its batch produced. */
static void tx_uncork(struct nbd_conn *c)
{
	pthread_mutex_lock(&c->lock);
	c->corked_replies = 0;
	c->corked = false;
	tx_flush_locked(c, true);
	pthread_mutex_unlock(&c->lock);
}

static void tx_cork(struct nbd_conn *c)
{
	pthread_mutex_lock(&c->lock);
	c->corked = true;
	pthread_mutex_unlock(&c->lock);
}

/* Send sl's header, then len bytes from the connection's pipe, alone on
 * the socket: what is queued goes first, nobody sends while we do.  The
 * reader calls this (corked) and is corked again after it. */
static void tx_spliced(struct nbd_conn *c, struct nbd_slot *sl, size_t len)
{
	int r = 0;

	tx_uncork(c); /* what is queued goes first */
	pthread_mutex_lock(&c->lock);
	while (c->sending)
		pthread_cond_wait(&c->cond, &c->lock);
	c->sending = true;
	pthread_mutex_unlock(&c->lock);
	if (!c->broken)
		r = send_iov(c->fd, sl->iov, sl->niov, MSG_MORE);
	while (!r && !c->broken && len) {
		ssize_t w = splice(c->pipe[0], NULL, c->fd, NULL, len, SPLICE_F_MOVE);

		if (w > 0)
			len -= (size_t)w;
		else if (w < 0 && errno != EINTR)
			r = -errno;
		else if (w == 0)
			r = -EIO;
	}
	if (len)
		pipe_empty(c);
	pthread_mutex_lock(&c->lock);
	if (r && !c->broken) {
		devio_debug("nbd %s: sending a read reply: %s", c->peer, strerror(-r));
		c->broken = true;
	}
	c->sending = false;
	slot_release_locked(c, sl);
	tx_flush_locked(c, true); /* what came in meanwhile */
	pthread_mutex_unlock(&c->lock);
	tx_cork(c);
}

/* ---- encoding replies ---- */

static void iov_add(struct nbd_slot *sl, void *base, size_t len)
{
	sl->iov[sl->niov].iov_base = base;
	sl->iov[sl->niov].iov_len = len;
	sl->niov++;
}

static void encode_simple(struct nbd_slot *sl, uint32_t error, bool with_data)
{
	nbd_put32(sl->hdr, NBD_SIMPLE_REPLY_MAGIC);
	nbd_put32(sl->hdr + 4, error);
	nbd_put64(sl->hdr + 8, sl->nr.cookie);
	sl->niov = 0;
	iov_add(sl, sl->hdr, NBD_SIMPLE_REPLY_SIZE);
	if (with_data && sl->nr.length)
		iov_add(sl, sl->buf, sl->nr.length);
}

/* Write a chunk header at p; returns p advanced. */
static uint8_t *chunk_header(uint8_t *p, struct nbd_slot *sl, uint16_t flags, uint16_t type, uint32_t len)
{
	nbd_put32(p, NBD_STRUCTURED_REPLY_MAGIC);
	nbd_put16(p + 4, flags);
	nbd_put16(p + 6, type);
	nbd_put64(p + 8, sl->nr.cookie);
	nbd_put32(p + 16, len);
	return p + NBD_CHUNK_HEADER_SIZE;
}

/* "NBD_CMD_READ", or "NBD_CMD 9" for a command we do not know. */
static const char *cmd_label(uint16_t type, char *buf, size_t len)
{
	const char *name = devio_nbd_cmd_name(type);

	if (name)
		return name;
	snprintf(buf, len, "NBD_CMD %u", type);
	return buf;
}

/* An error chunk whose message says what failed and why (NULL: the NBD
 * error's name). */
static void encode_error_chunk(struct nbd_slot *sl, uint32_t error, const char *why)
{
	char msg[256], cmd[24];
	uint8_t *p = sl->hdr, *start = sl->hdr;
	int mlen;

	mlen = snprintf(msg, sizeof(msg), "devio: %s offset %llu length %u: %s",
			cmd_label(sl->nr.type, cmd, sizeof(cmd)), (unsigned long long)sl->nr.offset, sl->nr.length,
			why ? why : devio_nbd_error_name(error));
	if (mlen < 0)
		mlen = 0;
	if (mlen >= (int)sizeof(msg))
		mlen = (int)sizeof(msg) - 1; /* cut short */
	p = chunk_header(p, sl, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6u + (uint32_t)mlen);
	nbd_put32(p, error);
	nbd_put16(p + 4, (uint16_t)mlen);
	memcpy(p + 6, msg, (size_t)mlen);
	p += 6 + mlen;
	sl->niov = 0;
	iov_add(sl, start, (size_t)(p - start));
}

static bool all_zero(const uint8_t *p, size_t len)
{
	static const uint8_t zeroes[NBD_SPARSE_BLOCK];

	return len <= sizeof(zeroes) && !memcmp(p, zeroes, len);
}

/* Split [0, length) of a read into data and hole runs at 4 KiB blocks
 * (absolute offsets); at most NBD_MAX_CHUNKS runs, the last one data. */
static int sparse_runs(struct nbd_slot *sl, uint32_t *start, uint32_t *len, bool *hole)
{
	uint64_t off = sl->nr.offset;
	uint32_t total = sl->nr.length, pos = 0;
	int n = 0;

	while (pos < total) {
		uint32_t skew = (uint32_t)((off + pos) % NBD_SPARSE_BLOCK);
		uint32_t step = NBD_SPARSE_BLOCK - skew;
		bool z;

		if (step > total - pos)
			step = total - pos;
		z = step == NBD_SPARSE_BLOCK && all_zero(sl->buf + pos, step);
		if (n && hole[n - 1] == z) {
			len[n - 1] += step;
		} else if (n == NBD_MAX_CHUNKS) {
			/* Out of chunks: the rest is sent as data. */
			if (hole[n - 1]) {
				n--; /* turn the last hole back into data */
				hole[n] = false;
				n++;
			}
			len[n - 1] = total - start[n - 1];
			break;
		} else {
			start[n] = pos;
			len[n] = step;
			hole[n] = z;
			n++;
		}
		pos += step;
	}
	return n;
}

static void encode_read_structured(struct nbd_slot *sl)
{
	uint32_t start[NBD_MAX_CHUNKS], len[NBD_MAX_CHUNKS];
	bool hole[NBD_MAX_CHUNKS];
	uint8_t *p = sl->hdr;
	int n;

	sl->niov = 0;
	if (sl->nr.length == 0) {
		p = chunk_header(p, sl, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
		iov_add(sl, sl->hdr, NBD_CHUNK_HEADER_SIZE);
		return;
	}
	if (sl->nr.flags & NBD_CMD_FLAG_DF) {
		start[0] = 0;
		len[0] = sl->nr.length;
		hole[0] = false;
		n = 1;
	} else {
		n = sparse_runs(sl, start, len, hole);
	}
	for (int i = 0; i < n; i++) {
		uint8_t *h = p;
		uint16_t flags = i == n - 1 ? NBD_REPLY_FLAG_DONE : 0;

		if (hole[i]) {
			p = chunk_header(p, sl, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
			nbd_put64(p, sl->nr.offset + start[i]);
			nbd_put32(p + 8, len[i]);
			p += 12;
			iov_add(sl, h, (size_t)(p - h));
		} else {
			p = chunk_header(p, sl, flags, NBD_REPLY_TYPE_OFFSET_DATA, 8 + len[i]);
			nbd_put64(p, sl->nr.offset + start[i]);
			p += 8;
			iov_add(sl, h, (size_t)(p - h));
			iov_add(sl, sl->buf + start[i], len[i]);
		}
	}
}

/* A READ sent straight from the store's memory (sl->pieces; NULL pieces
 * are holes, only present when structured replies allow sending them). */
static void encode_read_mapped(struct nbd_slot *sl)
{
	uint64_t off = sl->nr.offset;
	uint8_t *p = sl->hdr;
	int n = sl->npieces;

	sl->niov = 0;
	if (!sl->c->s.structured) {
		encode_simple(sl, 0, false);
	} else if (sl->nr.flags & NBD_CMD_FLAG_DF) {
		p = chunk_header(p, sl, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 8 + sl->nr.length);
		nbd_put64(p, off);
		iov_add(sl, sl->hdr, (size_t)(p + 8 - sl->hdr));
	} else {
		for (int i = 0; i < n; i++) {
			uint8_t *h = p;
			uint16_t flags = i == n - 1 ? NBD_REPLY_FLAG_DONE : 0;
			uint32_t len = (uint32_t)sl->pieces[i].iov_len;

			if (sl->pieces[i].iov_base) {
				p = chunk_header(p, sl, flags, NBD_REPLY_TYPE_OFFSET_DATA, 8 + len);
				nbd_put64(p, off);
				p += 8;
				iov_add(sl, h, (size_t)(p - h));
				iov_add(sl, sl->pieces[i].iov_base, len);
			} else {
				p = chunk_header(p, sl, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
				nbd_put64(p, off);
				nbd_put32(p + 8, len);
				p += 12;
				iov_add(sl, h, (size_t)(p - h));
			}
			off += len;
		}
		return;
	}
	for (int i = 0; i < n; i++)
		iov_add(sl, sl->pieces[i].iov_base, sl->pieces[i].iov_len);
}

/* Encode the reply for a finished slot (error already mapped; why, if
 * not NULL, says why for the client's human). */
static void encode_reply(struct nbd_slot *sl, uint32_t error, const char *why)
{
	bool structured = sl->c->s.structured;

	if (error) {
		if (structured)
			encode_error_chunk(sl, error, why);
		else
			encode_simple(sl, error, false);
		return;
	}
	if (sl->nr.type == NBD_CMD_READ) {
		if (sl->npieces)
			encode_read_mapped(sl);
		else if (structured)
			encode_read_structured(sl);
		else
			encode_simple(sl, 0, true);
		return;
	}
	if (sl->nr.type == NBD_CMD_BLOCK_STATUS) {
		/* sl->buf holds context id + descriptors; sl->held is unused here. */
		uint8_t *p = chunk_header(sl->hdr, sl, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
					  (uint32_t)sl->req.length);
		sl->niov = 0;
		iov_add(sl, sl->hdr, (size_t)(p - sl->hdr));
		iov_add(sl, sl->buf, sl->req.length);
		return;
	}
	encode_simple(sl, 0, false);
}

static void slot_complete(struct devio_request *req)
{
	struct nbd_slot *sl = req->opaque;

	if (req->result)
		devio_debug("nbd %s: %s offset %llu length %llu: %s", sl->c->peer, devio_op_name(req->op),
			    (unsigned long long)sl->nr.offset, (unsigned long long)req->length,
			    strerror(-req->result));
	encode_reply(sl, devio_nbd_errno(req->result), req->result ? strerror(-req->result) : NULL);
	tx_queue(sl->c, sl);
}

/* ---- slots ---- */

static struct nbd_slot *slot_get(struct nbd_conn *c, size_t bytes)
{
	struct nbd_slot *sl;

	pthread_mutex_lock(&c->lock);
	while (!c->free_slots || (c->inflight && c->bytes + bytes > NBD_MAX_BYTES_IN_FLIGHT)) {
		c->corked = false;
		tx_flush_locked(c, true);
		if (c->free_slots && !(c->inflight && c->bytes + bytes > NBD_MAX_BYTES_IN_FLIGHT))
			break;
		pthread_cond_wait(&c->cond, &c->lock);
	}
	sl = c->free_slots;
	c->free_slots = sl->next;
	c->inflight++;
	c->bytes += bytes;
	sl->held = bytes;
	pthread_mutex_unlock(&c->lock);
	sl->next = NULL;
	sl->error = 0;
	sl->npieces = 0;
	return sl;
}

static int slot_reserve(struct nbd_slot *sl, size_t len)
{
	uint8_t *p;

	if (sl->cap >= len)
		return 0;
	p = malloc(len);
	if (!p)
		return -ENOMEM;
	free(sl->buf);
	sl->buf = p;
	sl->cap = len;
	return 0;
}

/* ---- receiving ---- */

/* True as soon as the client has sent more bytes, false after ns. */
static bool rx_arrives_within(struct nbd_conn *c, uint64_t ns, bool yield)
{
	struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
	uint64_t until = devio_now_ns() + ns;

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
static bool rx_ready_soon(struct nbd_conn *c)
{
	return rx_arrives_within(c, NBD_SPIN_NS, true);
}

/* Receive into buf, sleeping only after a short look. */
static ssize_t recv_wait(struct nbd_conn *c, void *buf, size_t len)
{
	rx_ready_soon(c);
	return recv(c->fd, buf, len, 0);
}

/* Hold a small batch of replies for a moment while more requests come:
 * a client that keeps many requests in flight sends the next ones while
 * we hold, and then gets the replies in fewer, larger sends (measured
 * over loopback: +6% 4K QD32 reads over TCP, +25% over a Unix socket; the
 * client is the bottleneck there, so fewer sends to take apart is what
 * helps).  A hold that sees nothing means the client may be waiting for
 * us (QD1): then skip holding for 1, 2, 4 ... up to NBD_HOLD_SKIP batches
 * while holds keep failing. */
static bool hold_replies(struct nbd_conn *c)
{
	if (c->hold_skip) {
		c->hold_skip--;
		return false;
	}
	if (!c->corked_replies || c->corked_replies >= NBD_HOLD_MAX)
		return false;
	if (rx_arrives_within(c, NBD_HOLD_NS, false)) {
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
static int rx_fill(struct nbd_conn *c, size_t need)
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
		if (c->rx_drained && hold_replies(c)) {
			c->rx_drained = false;
			continue;
		}
		if (c->rx_drained) {
			tx_uncork(c); /* about to sleep: answer what we have */
			n = recv_wait(c, c->rx + c->rx_end, space);
			tx_cork(c);
		} else {
			n = recv(c->fd, c->rx + c->rx_end, space, MSG_DONTWAIT);
			if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
				c->rx_drained = true;
				continue;
			}
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -ECONNRESET;
		c->rx_end += (size_t)n;
		c->rx_drained = (size_t)n < space;
	}
	return 0;
}

/* Copy len payload bytes to dst (NULL: throw them away).  Payloads that
 * fit the rx buffer come through it (one recv for header and payload);
 * larger ones go straight to dst. */
static int rx_payload(struct nbd_conn *c, uint8_t *dst, uint64_t len)
{
	size_t have = c->rx_end - c->rx_start;
	size_t n = have < len ? have : (size_t)len;
	uint8_t scratch[4096];
	int r = 0;

	if (len > have && len <= NBD_RX_PAYLOAD) {
		if ((r = rx_fill(c, (size_t)len)))
			return r;
		n = (size_t)len;
	}
	if (dst)
		memcpy(dst, c->rx + c->rx_start, n);
	c->rx_start += n;
	len -= n;
	if (!len)
		return 0;
	tx_uncork(c);
	while (len && !r) {
		uint8_t *p = dst ? dst + n : scratch;
		size_t want = dst || len < sizeof(scratch) ? (size_t)len : sizeof(scratch);
		ssize_t got = recv_wait(c, p, want);

		if (got < 0 && errno != EINTR)
			r = -errno;
		else if (got == 0)
			r = -ECONNRESET;
		else if (got > 0) {
			len -= (size_t)got;
			if (dst)
				n += (size_t)got;
		}
	}
	tx_cork(c);
	return r;
}

/* ---- running requests ---- */

struct bs_walk {
	uint8_t *out;
	unsigned n, max;
	uint64_t pos, end;
};

static int bs_extent(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct bs_walk *w = ctx;
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
static void run_block_status(struct nbd_conn *c, struct nbd_slot *sl)
{
	struct devio_backend *b = c->b;
	unsigned max = (sl->nr.flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : NBD_MAX_EXTENTS;
	struct bs_walk w;
	int r = 0;

	if (slot_reserve(sl, 4 + 8 * NBD_MAX_EXTENTS)) {
		sl->req.result = -ENOMEM;
		goto out;
	}
	nbd_put32(sl->buf, NBD_META_ID_BASE_ALLOCATION);
	w = (struct bs_walk){ sl->buf + 4, 0, max, sl->nr.offset, sl->nr.offset + sl->nr.length };
	if (b->caps & DEVIO_CAP_EXTENTS)
		r = devio_extents(b, sl->nr.offset, sl->nr.length, bs_extent, &w);
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
	slot_complete(&sl->req);
}

static void backend_start(struct nbd_conn *c, struct devio_request *req)
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
static void run_split(struct nbd_conn *c, struct nbd_slot *sl)
{
	struct devio_request *req = &sl->req;
	uint64_t done = 0;
	int r = 0;

	tx_uncork(c);
	while (!r && done < req->length) {
		struct devio_request piece = { .op = req->op, .flags = req->flags, .offset = req->offset + done,
					       .buf = (uint8_t *)req->buf + done };

		piece.length = req->length - done < c->b->max_io ? req->length - done : c->b->max_io;
		r = devio_execute(c->b, &piece);
		done += piece.length;
	}
	tx_cork(c);
	req->result = r;
	slot_complete(req);
}

static void run_request(struct nbd_conn *c, struct nbd_slot *sl)
{
	struct devio_request *req = &sl->req;
	uint16_t f = sl->nr.flags;

	memset(req, 0, sizeof(*req));
	req->offset = sl->nr.offset;
	req->length = sl->nr.length;
	req->complete = slot_complete;
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
		run_block_status(c, sl);
		return;
	}
	if ((req->op == DEVIO_OP_READ || req->op == DEVIO_OP_WRITE) && c->b->max_io && req->length > c->b->max_io) {
		run_split(c, sl);
		return;
	}
	backend_start(c, req);
}

/* Answer a request that failed before it ran (why: for the client). */
static void reply_error(struct nbd_conn *c, struct nbd_slot *sl, uint32_t error, const char *why)
{
	sl->req.op = DEVIO_OP_READ;
	encode_reply(sl, error, why);
	tx_queue(c, sl);
}

/* A READ of a store kept in memory: reply with pointers into it instead
 * of a copy (the socket copies it anyway).  False if the backend cannot,
 * or the reply would need holes the client did not allow (simple replies
 * or NBD_CMD_FLAG_DF) or more pieces than a reply takes: then the read
 * runs as usual. */
static bool read_in_place(struct nbd_conn *c, const struct devio_nbd_request *nr)
{
	struct iovec pieces[NBD_MAX_CHUNKS];
	struct devio_request req = { .op = DEVIO_OP_READ, .offset = nr->offset, .length = nr->length,
				     .kind = DEVIO_BUF_MAP, .iov = pieces, .iovcnt = NBD_MAX_CHUNKS };
	struct nbd_slot *sl;
	int n;

	if (!(c->b->caps & DEVIO_CAP_MAP) || nr->length == 0 || devio_run(c->b, &req))
		return false;
	n = req.iovcnt;
	if (!c->s.structured || (nr->flags & NBD_CMD_FLAG_DF))
		for (int i = 0; i < n; i++)
			if (!pieces[i].iov_base)
				return false;
	sl = slot_get(c, 0);
	sl->nr = *nr;
	memcpy(sl->pieces, pieces, (size_t)n * sizeof(*pieces));
	sl->npieces = n;
	encode_reply(sl, 0, NULL);
	tx_queue(c, sl);
	return true;
}

/* A READ of a file too large for the usual batch: splice it from the page
 * cache into the pipe and from there into the socket, so that this side
 * copies nothing (pread and send copied every byte twice on the reader).
 * What the backend declines (a file with holes: the usual path sends them
 * as hole chunks) and reads the pipe cannot take whole run as usual. */
static bool read_spliced(struct nbd_conn *c, const struct devio_nbd_request *nr)
{
	uint64_t pages = (nr->offset % 4096 + nr->length + 4095) / 4096;
	struct devio_request req = { .op = DEVIO_OP_READ, .offset = nr->offset, .length = nr->length,
				     .kind = DEVIO_BUF_PIPE, .pipe_fd = c->pipe[1] };
	struct nbd_slot *sl;
	uint8_t *p;

	if (!c->splice_reads || nr->length <= NBD_RX_PAYLOAD || pages > c->pipe_size / 4096)
		return false;
	if (devio_run(c->b, &req)) {
		pipe_empty(c);
		return false;
	}
	sl = slot_get(c, 0);
	sl->nr = *nr;
	if (c->s.structured) {
		p = chunk_header(sl->hdr, sl, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 8 + nr->length);
		nbd_put64(p, nr->offset);
		sl->niov = 0;
		iov_add(sl, sl->hdr, (size_t)(p + 8 - sl->hdr));
	} else {
		encode_simple(sl, 0, false);
	}
	tx_spliced(c, sl, nr->length);
	return true;
}

/* Receive up to len payload bytes into the pieces: what the rx buffer
 * holds, then whatever the socket delivers without making us sleep.
 * Returns the bytes received or a negative errno. */
static int64_t rx_into(struct nbd_conn *c, const struct iovec *v, int n, uint64_t len)
{
	uint64_t done = 0;
	bool uncorked = false;
	int64_t r = 0;

	if (c->rx_end - c->rx_start < len) {
		tx_uncork(c); /* the replies go out while the payload comes in */
		uncorked = true;
	}
	for (int i = 0; i < n && done < len; i++) {
		uint8_t *p = v[i].iov_base;
		size_t want = v[i].iov_len, got = c->rx_end - c->rx_start;

		if (got > want)
			got = want;
		memcpy(p, c->rx + c->rx_start, got);
		c->rx_start += got;
		while (got < want) {
			ssize_t k = recv(c->fd, p + got, want - got, MSG_DONTWAIT);

			if (k > 0) {
				got += (size_t)k;
				continue;
			}
			if (k == 0) {
				r = -ECONNRESET;
			} else if (errno == EINTR) {
				continue;
			} else if (errno != EAGAIN && errno != EWOULDBLOCK) {
				r = -errno;
			} else if (rx_ready_soon(c)) {
				continue;
			}
			break;
		}
		done += got;
		if (r || got < want)
			break;
	}
	if (uncorked)
		tx_cork(c);
	return r ? r : (int64_t)done;
}

/* Answer a WRITE the reader carried out itself (r: its result, FUA
 * included).  Returns 1: the reply is queued. */
static int reply_written(struct nbd_conn *c, const struct devio_nbd_request *nr, int r)
{
	struct nbd_slot *sl;

	sl = slot_get(c, 0);
	sl->nr = *nr;
	encode_reply(sl, devio_nbd_errno(r), r ? strerror(-r) : NULL);
	tx_queue(c, sl);
	return 1;
}

/* A WRITE to a store kept in memory: receive the payload straight into it
 * (one copy instead of two).  Only on Unix sockets: over TCP loopback the
 * payload trickles in segment by segment and the client, which does the
 * receive processing for us while we are not in recv, became the
 * bottleneck (1 MiB writes: 7.2k/s copying, 5.5k/s in place; over a Unix
 * socket 3.7k/s copying, 5.4k/s in place).  The range is held open only
 * while bytes keep coming; if the client pauses mid-payload, what came stays written, *nr
 * shrinks to the rest and the usual path (slot buffer, blocking reads)
 * takes over.  Returns 1 when the reply is queued, 0 to go on with *nr,
 * negative to drop the connection. */
static int write_in_place(struct nbd_conn *c, struct devio_nbd_request *nr)
{
	struct iovec v[NBD_MAX_CHUNKS];
	struct devio_request req = { .op = DEVIO_OP_WRITE, .offset = nr->offset, .length = nr->length,
				     .flags = (nr->flags & NBD_CMD_FLAG_FUA) ? DEVIO_REQ_FUA : 0,
				     .kind = DEVIO_BUF_MAP, .iov = v, .iovcnt = NBD_MAX_CHUNKS };
	int64_t done;
	int r;

	if (!c->in_place_writes || !(c->b->caps & DEVIO_CAP_MAP) || devio_run(c->b, &req))
		return 0; /* the usual path reports ENOSPC and the like */
	done = rx_into(c, v, req.iovcnt, nr->length);
	if (done < 0 || (uint64_t)done < nr->length)
		req.flags &= ~DEVIO_REQ_FUA; /* the rest goes the usual way, FUA with it */
	r = devio_map_end(&req);
	if (done < 0)
		return (int)done;
	if ((uint64_t)done < nr->length) {
		nr->offset += (uint64_t)done;
		nr->length -= (uint32_t)done;
		return 0;
	}
	return reply_written(c, nr, r);
}

/* Move up to want payload bytes from the socket into the (empty) pipe,
 * looking for a while before sleeping as recv_wait() does.  Returns the
 * bytes moved or a negative errno. */
static ssize_t splice_in(struct nbd_conn *c, uint64_t want)
{
	size_t n = want < c->pipe_size ? (size_t)want : c->pipe_size;
	unsigned flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK;

	for (;;) {
		ssize_t k = splice(c->fd, NULL, c->pipe[1], NULL, n, flags);

		if (k > 0)
			return k;
		if (k == 0)
			return -ECONNRESET;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN || !(flags & SPLICE_F_NONBLOCK))
			return -errno;
		if (!rx_ready_soon(c))
			flags &= ~SPLICE_F_NONBLOCK; /* nothing came: sleep in splice */
	}
}

/* The payload of a write at off: the part already in the rx buffer
 * written from there, the rest spliced socket -> pipe -> page cache; the
 * last part carries the write's flags (FUA: the core's flush after it
 * covers the parts before).  Returns 0 or the backend's negative errno
 * with the payload consumed either way; *gone is set when the connection
 * failed instead. */
static int splice_payload(struct nbd_conn *c, uint64_t off, uint64_t len, uint32_t flags, int *gone)
{
	size_t have = c->rx_end - c->rx_start;
	struct devio_request req = { .op = DEVIO_OP_WRITE, .offset = off, .buf = c->rx + c->rx_start };
	int r = 0;

	req.length = have < len ? have : len;
	req.flags = req.length == len ? flags : 0;
	if (req.length)
		r = devio_execute(c->b, &req);
	c->rx_start += (size_t)req.length;
	off += req.length;
	len -= req.length;
	while (len) {
		ssize_t n = splice_in(c, len);

		if (n < 0) {
			*gone = (int)n;
			pipe_empty(c);
			return r;
		}
		if (!r) {
			req = (struct devio_request){ .op = DEVIO_OP_WRITE, .offset = off, .length = (uint64_t)n,
						      .flags = (uint64_t)n == len ? flags : 0,
						      .kind = DEVIO_BUF_PIPE, .pipe_fd = c->pipe[0] };
			r = devio_run(c->b, &req);
		}
		if (r)
			pipe_empty(c); /* keep reading the payload: the reply says why */
		off += (uint64_t)n;
		len -= (uint64_t)n;
	}
	return r;
}

/* A WRITE too large for the rx buffer, to a store in the page cache (a
 * file): splice the payload from the socket into a pipe and from there
 * into the file, so that the page cache copies straight from the socket's
 * buffers: one copy instead of recv's and pwrite's two.  Runs on the
 * reader, as the file's page-cache writes do anyway.  Returns 1 when the
 * reply is queued, 0 if the usual path should run, negative to drop the
 * connection. */
static int write_spliced(struct nbd_conn *c, const struct devio_nbd_request *nr)
{
	int gone = 0, r;

	if (!c->splice_writes || nr->length <= NBD_RX_PAYLOAD)
		return 0;
	tx_uncork(c); /* the replies go out while the payload comes in */
	r = splice_payload(c, nr->offset, nr->length, (nr->flags & NBD_CMD_FLAG_FUA) ? DEVIO_REQ_FUA : 0, &gone);
	tx_cork(c);
	if (gone)
		return gone;
	return reply_written(c, nr, r);
}

/* Say once, here where the rule is known, why a request was refused: the
 * command, its range, the export and the rule (the client gets the rule
 * too).  outcome: " with EINVAL" and the like, or "" when the connection
 * is closed instead of answering. */
static void log_refusal(struct nbd_conn *c, const struct devio_nbd_request *nr, const char *outcome, const char *why)
{
	char cmd[24];

	devio_warn("nbd %s: export '%s' (%llu bytes): %s offset %llu length %u refused%s: %s", c->peer,
		   c->s.export->name, (unsigned long long)c->b->size, cmd_label(nr->type, cmd, sizeof(cmd)),
		   (unsigned long long)nr->offset, nr->length, outcome, why);
}

/* Answer a request that failed its checks.  The payload of a refused
 * write is read and thrown away so that the next request is understood;
 * one too large for that ends the connection.  A client that keeps
 * sending bad requests gets NBD_LOG_REFUSED lines in the log; the rest
 * are counted and summed up when it leaves.  Returns 0 or -errno. */
static int refuse_request(struct nbd_conn *c, const struct devio_nbd_request *nr, uint32_t err, const char *why)
{
	struct nbd_slot *sl;
	char text[256];
	int r;

	c->refused++;
	if (nr->type == NBD_CMD_WRITE && nr->length > NBD_MAX_WRITE_DISCARD) {
		snprintf(text, sizeof(text), "%s, and more than the %u MiB of payload we read and drop; closing",
			 why, NBD_MAX_WRITE_DISCARD >> 20);
		log_refusal(c, nr, "", text);
		return -EMSGSIZE;
	}
	if (c->refused <= NBD_LOG_REFUSED) {
		snprintf(text, sizeof(text), " with %s%s", devio_nbd_error_name(err),
			 c->refused == NBD_LOG_REFUSED ? " (later refusals on this connection are only counted)" : "");
		log_refusal(c, nr, text, why);
	}
	if (nr->type == NBD_CMD_WRITE && (r = rx_payload(c, NULL, nr->length)))
		return r;
	sl = slot_get(c, 0);
	sl->nr = *nr;
	reply_error(c, sl, err, why);
	return 0;
}

/* Read, check and start one request.  Returns 1 on NBD_CMD_DISC, 0 to
 * go on, negative to drop the connection. */
static int handle_one(struct nbd_conn *c)
{
	struct devio_nbd_request nr;
	struct nbd_slot *sl;
	char why[160];
	uint32_t err;
	bool payload;
	size_t bytes;
	int r;

	if ((r = rx_fill(c, NBD_REQUEST_SIZE)))
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
		return refuse_request(c, &nr, err, why);
	payload = nr.type == NBD_CMD_WRITE;
	if (nr.type == NBD_CMD_READ && (read_in_place(c, &nr) || read_spliced(c, &nr)))
		return 0;
	if (payload && nr.length && (r = write_in_place(c, &nr)))
		return r < 0 ? r : 0;
	if (payload && (r = write_spliced(c, &nr)))
		return r < 0 ? r : 0;
	bytes = nr.type == NBD_CMD_READ || payload ? nr.length : 0;
	sl = slot_get(c, bytes);
	sl->nr = nr;
	if (bytes && slot_reserve(sl, bytes)) {
		devio_err("nbd %s: no memory for %zu bytes at offset %llu", c->peer, bytes,
			  (unsigned long long)nr.offset);
		if (payload && (r = rx_payload(c, NULL, nr.length)))
			return r;
		reply_error(c, sl, NBD_ENOMEM, "out of memory");
		return 0;
	}
	if (payload && (r = rx_payload(c, sl->buf, nr.length))) {
		reply_error(c, sl, NBD_EIO, NULL); /* never sent: the peer is gone */
		return r;
	}
	run_request(c, sl);
	return 0;
}

/* ---- connections ---- */

static void conn_wait_idle(struct nbd_conn *c)
{
	pthread_mutex_lock(&c->lock);
	c->corked = false;
	tx_flush_locked(c, true);
	while (c->inflight)
		pthread_cond_wait(&c->cond, &c->lock);
	c->closing = true;
	pthread_cond_signal(&c->tx_cond);
	pthread_mutex_unlock(&c->lock);
	if (c->has_sender)
		pthread_join(c->sender, NULL);
	c->has_sender = false;
}

static int socket_family(int fd)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);

	return getsockname(fd, (struct sockaddr *)&ss, &len) ? -1 : ss.ss_family;
}

/* The pipe for spliced writes and reads, where the backend takes them. */
static void pipe_setup(struct nbd_conn *c)
{
	bool writes = (c->b->caps & DEVIO_CAP_SPLICE_WRITE) && !(c->b->caps & DEVIO_CAP_READONLY);
	bool reads = (c->b->caps & DEVIO_CAP_SPLICE_READ) != 0;
	int size;

	if (!writes && !reads)
		return;
	/* Only the read end is non-blocking (emptying it after a failure):
	 * splice() would take a non-blocking write end as SPLICE_F_NONBLOCK
	 * for the socket too. */
	if (pipe2(c->pipe, O_CLOEXEC))
		return;
	fcntl(c->pipe[0], F_SETFL, O_NONBLOCK);
	fcntl(c->pipe[1], F_SETPIPE_SZ, (int)NBD_SPLICE_PIPE); /* a smaller one still works */
	size = fcntl(c->pipe[1], F_GETPIPE_SZ);
	c->pipe_size = size > 0 ? (size_t)size : 65536;
	c->splice_writes = writes;
	c->splice_reads = reads;
}

static int conn_setup(struct nbd_conn *c)
{
	unsigned depth = c->st->depth;

	c->rx = malloc(NBD_RX_SIZE);
	c->slots = calloc(depth, sizeof(*c->slots));
	if (!c->rx || !c->slots)
		return -ENOMEM;
	for (unsigned i = 0; i < depth; i++) {
		c->slots[i].c = c;
		c->slots[i].next = c->free_slots;
		c->free_slots = &c->slots[i];
	}
	c->b = c->s.export->backend;
	c->in_place_writes = socket_family(c->fd) == AF_UNIX;
	pipe_setup(c);
	c->hold_backoff = 1;
	c->use_workers = c->st->workers && devio_wants_pool(c->b, c->st->srv->opts.threads);
	/* Without a sender thread (it could not start) completions send
	 * themselves, as inline ones do. */
	if (devio_backend_async(c->b) || c->use_workers)
		c->has_sender = pthread_create(&c->sender, NULL, sender_main, c) == 0;
	return 0;
}

static void conn_serve(struct nbd_conn *c)
{
	struct devio_nbd_io io = { sock_read, sock_write, &c->fd, c->peer };
	struct timeval tv = { 30, 0 }, none = { 0, 0 };
	int r;

	c->reader_tid = pthread_self();
	/* A client gets 30 s per read during the handshake. */
	setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	r = devio_nbd_negotiate(&io, c->st->srv, &c->s);
	setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof(none));
	if (r) {
		devio_debug("nbd %s: negotiation ended: %s", c->peer, strerror(-r));
		return;
	}
	if ((r = conn_setup(c))) {
		devio_err("nbd %s: export '%s': %s", c->peer, c->s.export->name, strerror(-r));
		return;
	}
	devio_debug("nbd %s: export '%s' structured=%d", c->peer, c->s.export->name, c->s.structured);
	tx_cork(c);
	do
		r = handle_one(c);
	while (r == 0);
	if (r < 0 && r != -ECONNRESET)
		devio_debug("nbd %s: connection ends: %s", c->peer, strerror(-r));
	if (c->refused > NBD_LOG_REFUSED)
		devio_warn("nbd %s: %u requests refused on this connection, %u of them not logged", c->peer,
			   c->refused, c->refused - NBD_LOG_REFUSED);
	/* NBD_CMD_DISC or a vanished client: finish what is in flight. */
	conn_wait_idle(c);
	if (c->splice_writes || c->splice_reads) {
		close(c->pipe[0]);
		close(c->pipe[1]);
	}
}

static void conn_free(struct nbd_conn *c)
{
	if (c->slots)
		for (unsigned i = 0; i < c->st->depth; i++)
			free(c->slots[i].buf);
	free(c->slots);
	free(c->rx);
	pthread_cond_destroy(&c->cond);
	pthread_cond_destroy(&c->tx_cond);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

/* Serve one connection on fd to its end on this thread (fd stays open). */
static void conn_run(struct nbd_state *st, int fd, const char *peer)
{
	struct nbd_conn *c = calloc(1, sizeof(*c));

	if (!c)
		return;
	c->st = st;
	c->fd = fd;
	snprintf(c->peer, sizeof(c->peer), "%s", peer);
	pthread_mutex_init(&c->lock, NULL);
	pthread_cond_init(&c->cond, NULL);
	pthread_cond_init(&c->tx_cond, NULL);
	conn_serve(c);
	conn_free(c);
}

void devio_nbd_serve_fd(struct devio_server *srv, int fd)
{
	struct nbd_state st = { .srv = srv, .depth = NBD_DEFAULT_DEPTH };
	char peer[32];

	snprintf(peer, sizeof(peer), "fd%d", fd);
	conn_run(&st, fd, peer);
}

/* One connection, on the listener's thread for it (which closes fd). */
static void nbd_serve_conn(void *ctx, int fd, uint64_t id)
{
	struct nbd_state *st = ctx;
	char peer[64];

	snprintf(peer, sizeof(peer), "%s#%llu", st->addr.kind == DEVIO_ADDR_UNIX ? "unix" : "tcp",
		 (unsigned long long)id);
	conn_run(st, fd, peer);
}

/* One pool for the server when the core's policy (devio_wants_pool) puts
 * any export's requests on one: a remote devio server's callbacks wait
 * for round trips; the RAM disk runs on the connection's reader thread,
 * which measured faster than a pool (fewer wake-ups; docs/nbd.md). */
static unsigned worker_count(const struct devio_server *srv)
{
	for (size_t i = 0; i < srv->n_exports; i++)
		if (devio_wants_pool(srv->exports[i].backend, srv->opts.threads))
			return devio_pool_size(srv->opts.threads);
	return 0;
}

static void state_free(struct nbd_state *st)
{
	devio_workers_free(st->workers);
	free(st);
}

/* The --nbd front end's options (nbd_options below). */
struct nbd_opts {
	unsigned depth; /* --depth: requests in flight per connection, 0 = NBD_DEFAULT_DEPTH */
};

static int nbd_listen(struct nbd_state *st)
{
	char name[320];
	struct devio_listener_conf conf = { .name = name, .max_conns = NBD_MAX_CONNS, .grace_ms = NBD_STOP_GRACE_MS,
					    .serve = nbd_serve_conn, .ctx = st };

	snprintf(name, sizeof(name), "nbd %s", st->name);
	return devio_listener_start(&st->addr, &conf, &st->listener);
}

static int start(struct devio_server *srv, const char *arg, const void *opts, void **state)
{
	const struct nbd_opts *o = opts;
	struct nbd_state *st;
	int r;

	st = calloc(1, sizeof(*st));
	if (!st)
		return -ENOMEM;
	st->srv = srv;
	st->depth = o && o->depth ? o->depth : NBD_DEFAULT_DEPTH;
	if (st->depth > NBD_MAX_DEPTH)
		st->depth = NBD_MAX_DEPTH;
	r = devio_addr_parse(arg, NBD_DEFAULT_PORT, &st->addr);
	if (r || (st->addr.kind != DEVIO_ADDR_TCP && st->addr.kind != DEVIO_ADDR_UNIX &&
		  st->addr.kind != DEVIO_ADDR_SYSTEMD)) {
		devio_err("--nbd %s: want tcp:[HOST:]PORT, unix:PATH or systemd[:NAME]", arg);
		r = -EINVAL;
		goto out_free;
	}
	devio_addr_format(&st->addr, st->name, sizeof(st->name));
	if (worker_count(srv)) {
		st->workers = devio_workers_new(worker_count(srv));
		if (!st->workers) {
			r = -ENOMEM;
			goto out_free;
		}
	}
	if ((r = nbd_listen(st)))
		goto out_free;
	devio_info("nbd: serving %zu export%s on %s", srv->n_exports, srv->n_exports == 1 ? "" : "s", st->name);
	*state = st;
	return 0;
out_free:
	state_free(st);
	return r;
}

static void stop(void *state)
{
	struct nbd_state *st = state;

	if (!st)
		return;
	/* No new requests; what is in flight is answered (the spec's SHOULD)
	 * for up to NBD_STOP_GRACE_MS, then every connection is cut. */
	devio_listener_stop(st->listener);
	state_free(st);
}

static void status(void *state, FILE *out)
{
	struct nbd_state *st = state;
	struct devio_listener_stats ls;

	devio_listener_stats(st->listener, &ls);
	fprintf(out, "  nbd %s: %u connection%s, %llu served, %llu refused\n", st->name, ls.active,
		ls.active == 1 ? "" : "s", (unsigned long long)ls.served, (unsigned long long)ls.refused);
}

static const struct devio_frontend_option nbd_options[] = {
	{ "depth", "N", "requests in flight per connection (default 64, at most 1024)", devio_opt_uint,
	  offsetof(struct nbd_opts, depth) },
	{ NULL },
};

const struct devio_frontend_type devio_frontend_nbd = {
	.option = "nbd",
	.arg_help = "tcp:[HOST:]PORT|unix:PATH|systemd[:NAME]",
	.help = "NBD, newstyle fixed (default port 10809)",
	.options = nbd_options,
	.opts_size = sizeof(struct nbd_opts),
	.start = start,
	.stop = stop,
	.status = status,
};
