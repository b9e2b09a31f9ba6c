/* nbd_tx.c - the --nbd front end's slot pool and sender.  The reader
 * takes a slot per request (waiting, after sending what is queued, while
 * all are in use).  Replies are queued on the connection and sent in
 * batches with one sendmsg, which gives their slots back; the reader
 * "corks" the queue while it has more requests to process and uncorks it
 * before it sleeps; completions on other threads hand their replies to the
 * connection's sender thread.  Also a spliced read's reply (header, then
 * the pipe) sent alone on the socket, and a request's completion.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include "devio/util.h"
#include "nbd_int.h"

#define NBD_TX_IOV 256
#define NBD_KEEP_BUF (1u << 20)          /* slot buffers up to this size are kept */
/* Payload bytes held per connection (requests read, replies not yet sent):
 * one NBD_MAX_PAYLOAD request at a time when they are that large, so that
 * a client that never reads its replies pins at most this much. */
#define NBD_MAX_BYTES_IN_FLIGHT (64u << 20)

/* ---- the slot pool: the reader takes, the sender gives back ---- */

static void nbd_tx_slot_release_locked(struct nbd_conn *c, struct nbd_slot *sl)
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

struct nbd_slot *nbd_slot_get(struct nbd_conn *c, size_t bytes)
{
	struct nbd_slot *sl;

	pthread_mutex_lock(&c->lock);
	while (!c->free_slots || (c->inflight && c->bytes + bytes > NBD_MAX_BYTES_IN_FLIGHT)) {
		c->corked = false;
		nbd_tx_flush_locked(c, true);
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

int nbd_slot_reserve(struct nbd_slot *sl, size_t len)
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

/* ---- sending replies ---- */

static int nbd_tx_send_iov(struct nbd_conn *c, struct iovec *iov, int n, int flags)
{
	int fd = c->fd;

	if (c->tls)
		return devio_tls_writev(c->tls, iov, n);
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

/* Send everything queued; called with c->lock held, by one thread at a
 * time (c->sending).  Drops the lock while writing.  The reader stops
 * while it is corked; the sender thread does not. */
void nbd_tx_flush_locked(struct nbd_conn *c, bool by_reader)
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
			r = nbd_tx_send_iov(c, iov, n, 0);
		pthread_mutex_lock(&c->lock);
		if (r) {
			if (!c->broken)
				devio_debug("nbd %s: sending replies: %s", c->peer, strerror(-r));
			c->broken = true;
		}
		while (batch) {
			sl = batch->next;
			nbd_tx_slot_release_locked(c, batch);
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

void nbd_tx_queue(struct nbd_conn *c, struct nbd_slot *sl)
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
		nbd_tx_flush_locked(c, true);
	}
	else if (c->has_sender)
		pthread_cond_signal(&c->tx_cond);
	else
		nbd_tx_flush_locked(c, false);
	pthread_mutex_unlock(&c->lock);
}

void *nbd_sender_main(void *arg)
{
	struct nbd_conn *c = arg;

	pthread_mutex_lock(&c->lock);
	for (;;) {
		if (c->tx_head && !c->sending) {
			nbd_tx_flush_locked(c, false);
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
void nbd_tx_uncork(struct nbd_conn *c)
{
	pthread_mutex_lock(&c->lock);
	c->corked_replies = 0;
	c->corked = false;
	nbd_tx_flush_locked(c, true);
	pthread_mutex_unlock(&c->lock);
}

void nbd_tx_cork(struct nbd_conn *c)
{
	pthread_mutex_lock(&c->lock);
	c->corked = true;
	pthread_mutex_unlock(&c->lock);
}

/* Move len bytes from the pipe to the socket (the sender's turn held). */
static int nbd_tx_from_pipe(struct nbd_conn *c, size_t len)
{
	int r = 0;

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
		nbd_pipe_empty(c);
	return r;
}

/* A failed send ends the connection (said once, at debug level). */
static void nbd_tx_fail(struct nbd_conn *c, int r)
{
	pthread_mutex_lock(&c->lock);
	if (r && !c->broken) {
		devio_debug("nbd %s: sending a read reply: %s", c->peer, strerror(-r));
		c->broken = true;
	}
	pthread_mutex_unlock(&c->lock);
}

void nbd_tx_spliced_begin(struct nbd_conn *c, struct nbd_slot *sl)
{
	int r = 0;

	nbd_tx_uncork(c); /* what is queued goes first */
	pthread_mutex_lock(&c->lock);
	while (c->sending)
		pthread_cond_wait(&c->cond, &c->lock);
	c->sending = true;
	pthread_mutex_unlock(&c->lock);
	if (!c->broken)
		r = nbd_tx_send_iov(c, sl->iov, sl->niov, MSG_MORE);
	nbd_tx_fail(c, r);
}

void nbd_tx_spliced_more(struct nbd_conn *c, size_t len)
{
	if (c->broken)
		nbd_pipe_empty(c);
	else
		nbd_tx_fail(c, nbd_tx_from_pipe(c, len));
}

void nbd_tx_copied_more(struct nbd_conn *c, void *buf, size_t len, bool last)
{
	struct iovec iov = { buf, len };

	/* the reply's last bytes go without MSG_MORE: nothing may follow soon */
	nbd_tx_fail(c, c->broken ? 0 : nbd_tx_send_iov(c, &iov, 1, last ? 0 : MSG_MORE));
}

void nbd_tx_spliced_end(struct nbd_conn *c, struct nbd_slot *sl)
{
	pthread_mutex_lock(&c->lock);
	c->sending = false;
	nbd_tx_slot_release_locked(c, sl);
	nbd_tx_flush_locked(c, true); /* what came in meanwhile */
	pthread_mutex_unlock(&c->lock);
	nbd_tx_cork(c);
}

/* Send sl's header, then len bytes from the connection's pipe, alone on
 * the socket: what is queued goes first, nobody sends while we do.  The
 * reader calls this (corked) and is corked again after it. */
void nbd_tx_spliced(struct nbd_conn *c, struct nbd_slot *sl, size_t len)
{
	nbd_tx_spliced_begin(c, sl);
	nbd_tx_spliced_more(c, len);
	nbd_tx_spliced_end(c, sl);
}

void nbd_slot_complete(struct devio_request *req)
{
	struct nbd_slot *sl = req->opaque;

	if (req->result)
		devio_debug("nbd %s: %s offset %llu length %llu: %s", sl->c->peer, devio_op_name(req->op),
			    (unsigned long long)sl->nr.offset, (unsigned long long)req->length,
			    strerror(-req->result));
	nbd_encode_reply(sl, devio_nbd_errno(req->result), req->result ? strerror(-req->result) : NULL);
	nbd_tx_queue(sl->c, sl);
}
