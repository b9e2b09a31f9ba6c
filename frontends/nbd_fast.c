/* nbd_fast.c - the --nbd front end's zero-copy paths: READs sent from
 * the RAM disk's memory in place, WRITEs received into it (Unix sockets),
 * and large file READs and WRITEs spliced between the socket and the
 * page cache through the connection's pipe.  Each says when it does not
 * apply, and the usual path (a slot buffer) runs instead.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "devio/listener.h"
#include "devio/util.h"
#include "nbd_int.h"

#define NBD_SPLICE_PIPE (1u << 20)      /* pipe between socket and page cache */

/* Throw away what a failed transfer left in the pipe. */
void nbd_pipe_empty(struct nbd_conn *c)
{
	uint8_t scratch[4096];

	while (read(c->pipe[0], scratch, sizeof(scratch)) > 0)
		;
}

/* A READ of a store kept in memory: reply with pointers into it instead
 * of a copy (the socket copies it anyway).  False if the backend cannot,
 * or the reply would need holes the client did not allow (simple replies
 * or NBD_CMD_FLAG_DF) or more pieces than a reply takes: then the read
 * runs as usual. */
bool nbd_read_in_place(struct nbd_conn *c, const struct devio_nbd_request *nr)
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
	sl = nbd_slot_get(c, 0);
	sl->nr = *nr;
	memcpy(sl->pieces, pieces, (size_t)n * sizeof(*pieces));
	sl->npieces = n;
	nbd_encode_reply(sl, 0, NULL);
	nbd_tx_queue(c, sl);
	return true;
}

/* Splice [off, off + len) of the disk into the empty pipe: 0, or -EAGAIN
 * (declined, or the pipe could not take it) or an error, the pipe empty. */
static int nbd_splice_piece(struct nbd_conn *c, uint64_t off, uint64_t len)
{
	struct devio_request req = { .op = DEVIO_OP_READ, .offset = off, .length = len,
				     .kind = DEVIO_BUF_PIPE, .pipe_fd = c->pipe[1] };
	int r = devio_run(c->b, &req);

	if (r)
		nbd_pipe_empty(c);
	return r;
}

/* One more piece of a reply whose header is out: spliced, else read into
 * memory and sent.  A read that fails now cannot be answered any more:
 * the connection ends (the client sees it closed, not wrong data). */
static void nbd_reply_piece(struct nbd_conn *c, uint64_t off, uint64_t len, bool last)
{
	struct devio_request req = { .op = DEVIO_OP_READ, .offset = off, .length = len };
	int r = nbd_splice_piece(c, off, len);

	if (!r) {
		nbd_tx_spliced_more(c, len);
		return;
	}
	req.buf = r == -EAGAIN ? malloc(len) : NULL;
	if (req.buf && !devio_run(c->b, &req)) {
		nbd_tx_copied_more(c, req.buf, len, last);
	} else {
		devio_err("nbd %s: read of %" PRIu64 " bytes at %" PRIu64 " failed after its reply began: closing",
			  c->peer, len, off);
		pthread_mutex_lock(&c->lock);
		c->broken = true;
		pthread_mutex_unlock(&c->lock);
		shutdown(c->fd, SHUT_RDWR);
	}
	free(req.buf);
}

/* A read the pipe cannot take whole (a format layer moved it off page
 * alignment: a VHD block's data follows its 512-byte bitmap, so 1 MiB
 * spans 257 pages): in pieces that fit whatever their alignment.  False
 * if the first piece is declined (nothing sent yet). */
static bool nbd_read_spliced_pieces(struct nbd_conn *c, const struct devio_nbd_request *nr)
{
	uint64_t room = c->pipe_size - 4096, n = (nr->length + room - 1) / room;
	uint64_t piece = (nr->length / n + 4095) & ~(uint64_t)4095, done;
	struct nbd_slot *sl;

	if (nbd_splice_piece(c, nr->offset, piece))
		return false;
	sl = nbd_slot_get(c, 0);
	sl->nr = *nr;
	nbd_encode_read_header(sl);
	nbd_tx_spliced_begin(c, sl);
	nbd_tx_spliced_more(c, piece);
	for (done = piece; done < nr->length && !c->broken; done += piece) {
		if (piece > nr->length - done)
			piece = nr->length - done;
		nbd_reply_piece(c, nr->offset + done, piece, done + piece == nr->length);
	}
	nbd_tx_spliced_end(c, sl);
	return true;
}

/* A READ of a file too large for the usual batch: splice it from the page
 * cache into the pipe and from there into the socket, so that this side
 * copies nothing (pread and send copied every byte twice on the reader).
 * What the backend declines (a file with holes: the usual path sends them
 * as hole chunks) runs as usual; what the pipe cannot take whole goes in
 * pieces. */
bool nbd_read_spliced(struct nbd_conn *c, const struct devio_nbd_request *nr)
{
	uint64_t pages = (nr->offset % 4096 + nr->length + 4095) / 4096;
	struct nbd_slot *sl;
	int r;

	if (!c->splice_reads || nr->length <= NBD_RX_PAYLOAD || pages > c->pipe_size / 4096)
		return false;
	if (c->splice_in_pieces && nr->length > c->pipe_size - 4096)
		return nbd_read_spliced_pieces(c, nr);
	r = nbd_splice_piece(c, nr->offset, nr->length);
	if (r == -EAGAIN && nr->length > c->pipe_size - 4096)
		return (c->splice_in_pieces = nbd_read_spliced_pieces(c, nr));
	if (r)
		return false;
	sl = nbd_slot_get(c, 0);
	sl->nr = *nr;
	nbd_encode_read_header(sl);
	nbd_tx_spliced(c, sl, nr->length);
	return true;
}

/* Receive up to len payload bytes into the pieces: what the rx buffer
 * holds, then whatever the socket delivers without making us sleep.
 * Returns the bytes received or a negative errno. */
static int64_t nbd_fast_rx_into(struct nbd_conn *c, const struct iovec *v, int n, uint64_t len)
{
	uint64_t done = 0;
	bool uncorked = false;
	int64_t r = 0;

	if (c->rx_end - c->rx_start < len) {
		nbd_tx_uncork(c); /* the replies go out while the payload comes in */
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
			ssize_t k = nbd_rx_recv(c, p + got, want - got, true);

			if (k > 0) {
				got += (size_t)k;
				continue;
			}
			if (k == 0) {
				r = -ECONNRESET;
			} else if (k != -EAGAIN) {
				r = k;
			} else if (nbd_rx_ready_soon(c)) {
				continue;
			}
			break;
		}
		done += got;
		if (r || got < want)
			break;
	}
	if (uncorked)
		nbd_tx_cork(c);
	return r ? r : (int64_t)done;
}

/* Answer a WRITE the reader carried out itself (r: its result, FUA
 * included).  Returns 1: the reply is queued. */
static int nbd_fast_reply_written(struct nbd_conn *c, const struct devio_nbd_request *nr, int r)
{
	struct nbd_slot *sl;

	sl = nbd_slot_get(c, 0);
	sl->nr = *nr;
	nbd_encode_reply(sl, devio_nbd_errno(r), r ? strerror(-r) : NULL);
	nbd_tx_queue(c, sl);
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
int nbd_write_in_place(struct nbd_conn *c, struct devio_nbd_request *nr)
{
	struct iovec v[NBD_MAX_CHUNKS];
	struct devio_request req = { .op = DEVIO_OP_WRITE, .offset = nr->offset, .length = nr->length,
				     .flags = (nr->flags & NBD_CMD_FLAG_FUA) ? DEVIO_REQ_FUA : 0,
				     .kind = DEVIO_BUF_MAP, .iov = v, .iovcnt = NBD_MAX_CHUNKS };
	int64_t done;
	int r;

	if (!c->in_place_writes || !(c->b->caps & DEVIO_CAP_MAP) || devio_run(c->b, &req))
		return 0; /* the usual path reports ENOSPC and the like */
	done = nbd_fast_rx_into(c, v, req.iovcnt, nr->length);
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
	return nbd_fast_reply_written(c, nr, r);
}

/* Move up to want payload bytes from the socket into the (empty) pipe,
 * looking for a while before sleeping as nbd_rx_recv_wait() does.  Returns the
 * bytes moved or a negative errno. */
static ssize_t nbd_fast_splice_in(struct nbd_conn *c, uint64_t want)
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
		if (errno == EAGAIN && !(flags & SPLICE_F_NONBLOCK)) {
			/* the socket's receive timeout, mid-payload (--stall-timeout) */
			if (devio_listener_conn_wait_more(false))
				continue;
			return -ETIMEDOUT;
		}
		if (errno != EAGAIN)
			return -errno;
		if (!nbd_rx_ready_soon(c))
			flags &= ~SPLICE_F_NONBLOCK; /* nothing came: sleep in splice */
	}
}

/* The payload of a write at off: the part already in the rx buffer
 * written from there, the rest spliced socket -> pipe -> page cache; the
 * last part carries the write's flags (FUA: the core's flush after it
 * covers the parts before).  Returns 0 or the backend's negative errno
 * with the payload consumed either way; *gone is set when the connection
 * failed instead. */
static int nbd_fast_splice_payload(struct nbd_conn *c, uint64_t off, uint64_t len, uint32_t flags, int *gone)
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
		ssize_t n = nbd_fast_splice_in(c, len);

		if (n < 0) {
			*gone = (int)n;
			nbd_pipe_empty(c);
			return r;
		}
		if (!r) {
			req = (struct devio_request){ .op = DEVIO_OP_WRITE, .offset = off, .length = (uint64_t)n,
						      .flags = (uint64_t)n == len ? flags : 0,
						      .kind = DEVIO_BUF_PIPE, .pipe_fd = c->pipe[0] };
			r = devio_run(c->b, &req);
		}
		if (r)
			nbd_pipe_empty(c); /* keep reading the payload: the reply says why */
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
int nbd_write_spliced(struct nbd_conn *c, const struct devio_nbd_request *nr)
{
	int gone = 0, r;

	if (!c->splice_writes || nr->length <= NBD_RX_PAYLOAD)
		return 0;
	nbd_tx_uncork(c); /* the replies go out while the payload comes in */
	r = nbd_fast_splice_payload(c, nr->offset, nr->length, (nr->flags & NBD_CMD_FLAG_FUA) ? DEVIO_REQ_FUA : 0, &gone);
	nbd_tx_cork(c);
	if (gone)
		return gone;
	return nbd_fast_reply_written(c, nr, r);
}

/* The pipe for spliced writes and reads, where the backend takes them. */
void nbd_pipe_setup(struct nbd_conn *c)
{
	bool writes = (c->b->caps & DEVIO_CAP_SPLICE_WRITE) && !(c->b->caps & DEVIO_CAP_READONLY);
	bool reads = (c->b->caps & DEVIO_CAP_SPLICE_READ) != 0;
	int size;

	if ((!writes && !reads) || c->tls) /* splice would bypass TLS */
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
