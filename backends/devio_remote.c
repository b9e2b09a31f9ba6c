/* devio_remote.c - a remote devio server (ImDisk's devio, or `devio serve
 * --devio`) as a backend: devio://HOST:PORT and devio+unix:///PATH, and
 * (a devio extension: `devio serve --devio tls:HOST:PORT`) devio+tls://
 * [USER@]HOST[:PORT] with the nbds:// URI's tls-certificates=DIR,
 * tls-psk-file=FILE and tls-username=NAME: every connection of the pool,
 * reconnections included, runs a TLS handshake (lib/tls.c; the server's
 * certificate checked against HOST) before its first request.
 *
 * The protocol allows one request in flight per connection, so the backend
 * keeps a small pool of connections (up to REMOTE_MAX_CONNS, opened as
 * front ends ask for parallelism) and runs each request on a free one.  A
 * server that refuses one more connection (ImDisk's devio serves one)
 * caps the pool at those it accepted: requests wait for them.
 * INFO at connect gives size, alignment and flags; transfers are split at
 * REMOTE_CHUNK, or at ?chunk=N (a server with a small buffer, as ImDisk's
 * devio given a buffersize, drops a connection on a larger WRITE);
 * unaligned requests to a server that wants alignment are widened (read)
 * or read-modify-written (write, under a lock).  A broken
 * connection is reopened once per request (not for a change that timed
 * out: it may still land).  The protocol has no flush:
 * flush is a no-op and no FLUSH or FUA capability is claimed.  CACHE (a
 * hint) is offered as a no-op; MULTI_CONN is as true as this backend
 * itself, which already spreads one client's requests over several
 * connections to the server.  The request and answer layouts and their
 * checks are lib/devio_codec.c, shared with the server.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/protocol.h"
#include "devio/range_lock.h"
#include "devio/tls.h"
#include "devio/util.h"
#include "../lib/nbd_client.h"

#define REMOTE_MAX_CONNS 4
#define REMOTE_CHUNK (1u << 20)
#define REMOTE_TIMEOUT_S 120

/* One connection: a socket, and its TLS session for devio+tls://. */
struct dr_link {
	int fd;
	struct devio_tls *tls;
};

struct remote_conn {
	struct dr_link l;
	bool busy;
	uint64_t outages; /* rm->outages when the attempt that dialled it began */
};

struct remote {
	char uri[300];
	struct devio_addr addr;
	struct devio_tls_conf tls_conf; /* devio+tls://: its parameters (below) */
	char tls_certificates[4096], tls_psk_file[4096], tls_username[256];
	struct devio_tls_creds *tls_creds; /* devio+tls://, loaded once */
	uint64_t align;         /* server's req_alignment (power of two) */
	uint64_t remote_size;
	uint64_t flags;         /* INFO flags */
	uint64_t chunk;         /* largest READ/WRITE sent (?chunk=, a multiple of align) */
	unsigned timeout_s;     /* per send/receive on a connection */
	pthread_mutex_t lock;
	pthread_cond_t freed;
	/* Read-modify-write of partial blocks takes it exclusively; every
	 * other change (aligned writes, UNMAP, ZERO) shared.  Otherwise an
	 * aligned write landing between the RMW's read and write of the same
	 * block would be undone by the RMW writing back the old bytes around
	 * its patch: an acknowledged write lost. */
	pthread_rwlock_t rmw_lock;
	struct remote_conn conns[REMOTE_MAX_CONNS];
	/* Connections the pool opens at most: REMOTE_MAX_CONNS, lowered to
	 * what is open when the server refuses one more (ImDisk's devio
	 * serves one connection): requests then wait for those. */
	unsigned max_conns;
	bool told_cap;          /* the first cap is warned about; one learnt again after a loss is not */
	/* Reconnection (reconnect_s > 0): changes hold their bytes from first
	 * send to answer; the outage's start (0: connected), said once. */
	unsigned reconnect_s;
	struct devio_range_lock ranges;
	uint64_t down_since;
	uint64_t outages;       /* losses told so far: a failure on a connection dialled before the last one belongs to it */
	uint64_t epoch;         /* losses told and ended so far: did anything change since an attempt began? */
	bool told_expired;
	bool dead;              /* the server now offers another export: every request fails */
};

/* What an attempt saw when it began (dr_dead): the losses told, and the
 * losses told and ended. */
struct dr_mark {
	uint64_t outages, epoch;
};

/* ---- connections ---- */

/* A connected socket (through TLS for devio+tls://) in *l, or -errno (the
 * caller tells why, or not; a refused handshake is logged by lib/tls.c). */
static int dr_dial(struct remote *rm, struct dr_link *l)
{
	struct timeval tv = { .tv_sec = rm->timeout_s };
	int fd = devio_connect(&rm->addr), r;

	l->fd = -1;
	l->tls = NULL;
	if (fd < 0)
		return fd;
	/* A server that stops answering fails the request instead of
	 * hanging its caller forever; the connection is then dropped. */
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	if (rm->tls_creds && (r = devio_tls_handshake(rm->tls_creds, fd, false, rm->addr.host, rm->uri,
						       rm->timeout_s * 1000u, &l->tls))) {
		close(fd);
		return r;
	}
	l->fd = fd;
	return 0;
}

static int dr_write(struct dr_link *l, const void *buf, size_t len)
{
	return l->tls ? devio_tls_write_full(l->tls, buf, len) : devio_write_full(l->fd, buf, len);
}

static int dr_read(struct dr_link *l, void *buf, size_t len)
{
	return l->tls ? devio_tls_read_full(l->tls, buf, len) : devio_read_full(l->fd, buf, len);
}

/* Close a connection (a TLS session says close_notify first). */
static void dr_hangup(struct dr_link *l)
{
	if (l->tls)
		devio_tls_bye(l->tls);
	l->tls = NULL;
	if (l->fd >= 0)
		close(l->fd);
	l->fd = -1;
}

/* DEVIO_REMOTE_TIMEOUT=SECONDS overrides the default of 120 s. */
static unsigned dr_timeout(void)
{
	const char *e = getenv("DEVIO_REMOTE_TIMEOUT");
	uint64_t v;

	if (e && !devio_parse_u64(e, &v) && v >= 1 && v <= 86400)
		return (unsigned)v;
	return REMOTE_TIMEOUT_S;
}

/* A free slot, marked busy: an open connection if one is idle, else an
 * unopened slot (fd -1, dialled by the caller outside the lock) while
 * fewer than max_conns are open or being dialled, else wait. */
static struct remote_conn *dr_conn_get(struct remote *rm)
{
	struct remote_conn *c;

	pthread_mutex_lock(&rm->lock);
	for (;;) {
		struct remote_conn *spare = NULL;
		unsigned used = 0;

		c = NULL;
		for (unsigned i = 0; i < REMOTE_MAX_CONNS; i++) {
			struct remote_conn *k = &rm->conns[i];

			used += k->l.fd >= 0 || k->busy;
			if (!k->busy && k->l.fd >= 0 && !c)
				c = k;
			if (!k->busy && k->l.fd < 0 && !spare)
				spare = k;
		}
		if (!c && spare && used < rm->max_conns)
			c = spare;
		if (c)
			break;
		pthread_cond_wait(&rm->freed, &rm->lock);
	}
	c->busy = true;
	pthread_mutex_unlock(&rm->lock);
	return c;
}

enum dr_refusal { DR_REFUSAL_LOSS, DR_REFUSAL_CAP, DR_REFUSAL_ERROR };

/* Dialling slot c failed (err): decided under the lock, the slot given
 * back.  With reconnection, while a loss is told or once one was told or
 * ended since the attempt began (m), it is a LOSS for the caller to judge
 * (no shrinking: the other connections are as dead).  Else, when other
 * connections are open, the server takes no more (a one-connection
 * server): the pool shrinks to them and the request waits for one (CAP);
 * when none is, it is an ERROR (with reconnection, a loss too). */
static enum dr_refusal dr_conn_refused(struct remote *rm, struct remote_conn *c, int err, const struct dr_mark *m)
{
	enum dr_refusal v = DR_REFUSAL_ERROR;
	unsigned open = 0;

	pthread_mutex_lock(&rm->lock);
	for (unsigned i = 0; i < REMOTE_MAX_CONNS; i++)
		open += rm->conns[i].l.fd >= 0;
	if (rm->reconnect_s && (rm->down_since || m->epoch != rm->epoch)) {
		v = DR_REFUSAL_LOSS;
	} else if (open) {
		v = DR_REFUSAL_CAP;
		if (open < rm->max_conns) {
			if (!rm->told_cap)
				devio_warn("%s: the server refused connection %u (%s): using the %u it accepted",
					   rm->uri, open + 1, strerror(-err), open);
			rm->told_cap = true;
			rm->max_conns = open;
		}
	}
	c->busy = false;
	pthread_cond_broadcast(&rm->freed);
	pthread_mutex_unlock(&rm->lock);
	return v;
}

static void dr_conn_put(struct remote *rm, struct remote_conn *c)
{
	pthread_mutex_lock(&rm->lock);
	c->busy = false;
	pthread_cond_signal(&rm->freed);
	pthread_mutex_unlock(&rm->lock);
}

/* Has the server come back with another export (for good)?  And what
 * an attempt beginning now sees (*m). */
static bool dr_dead(struct remote *rm, struct dr_mark *m)
{
	bool dead;

	pthread_mutex_lock(&rm->lock);
	dead = rm->dead;
	m->outages = rm->outages;
	m->epoch = rm->epoch;
	pthread_mutex_unlock(&rm->lock);
	return dead;
}

/* A connection dialled after a loss must reach the same export: INFO
 * says the same size, alignment and flags.  0, -ESTALE (another export:
 * logged, and the backend is dead from now on) or -errno (try again). */
static int dr_check_export(struct remote *rm, struct dr_link *l)
{
	struct devio_proto_req rq = { .code = DEVIO_REQ_INFO };
	uint8_t req[DEVIO_MAX_REQ_HDR], resp[DEVIO_INFO_SIZE];
	struct devio_info info;
	char why[160];
	int r;

	if ((r = dr_write(l, req, devio_proto_encode_req(&rq, req))) || (r = dr_read(l, resp, sizeof(resp))))
		return r;
	if (devio_proto_decode_info(resp, &info, why, sizeof(why)) || info.file_size != rm->remote_size ||
	    info.req_alignment != rm->align || info.flags != rm->flags) {
		pthread_mutex_lock(&rm->lock);
		if (!rm->dead)
			devio_err("%s: reconnecting: the server now offers %llu bytes (alignment %llu, flags 0x%llx), "
				  "not %llu (%llu, 0x%llx); giving up (detach and attach again)", rm->uri,
				  (unsigned long long)info.file_size, (unsigned long long)info.req_alignment,
				  (unsigned long long)info.flags, (unsigned long long)rm->remote_size,
				  (unsigned long long)rm->align, (unsigned long long)rm->flags);
		rm->dead = true;
		pthread_mutex_unlock(&rm->lock);
		return -ESTALE;
	}
	return 0;
}

/* An open connection, marked busy: dialled if need be (a new one belongs
 * to m->outages, the losses told before the attempt began).  A refused
 * dial: dr_conn_refused. */
static int dr_conn_open(struct remote *rm, const struct dr_mark *m, struct remote_conn **out)
{
	for (;;) {
		struct remote_conn *c = dr_conn_get(rm);
		struct dr_link l;
		int r;

		if (c->l.fd >= 0) {
			*out = c;
			return 0;
		}
		r = dr_dial(rm, &l);
		if (r == 0 && rm->reconnect_s && (r = dr_check_export(rm, &l)))
			dr_hangup(&l);
		if (r == 0) {
			pthread_mutex_lock(&rm->lock); /* the pool's fds are counted under it */
			c->l = l;
			c->outages = m->outages;
			pthread_mutex_unlock(&rm->lock);
			*out = c;
			return 0;
		}
		if (r == -ESTALE) { /* another export: said, and for good */
			dr_conn_put(rm, c);
			return r;
		}
		enum dr_refusal v = dr_conn_refused(rm, c, r, m);

		if (v == DR_REFUSAL_CAP)
			continue;
		if (v == DR_REFUSAL_ERROR && !rm->reconnect_s) /* else the caller's loss says it */
			devio_err("%s: cannot connect: %s", rm->uri, strerror(-r));
		return r;
	}
}

/* Close c (busy: the caller's); its slot is free for a dial again. */
static void dr_conn_drop(struct remote *rm, struct remote_conn *c)
{
	struct dr_link l;

	pthread_mutex_lock(&rm->lock); /* the pool's fds are counted under it */
	l = c->l;
	c->l.fd = -1;
	c->l.tls = NULL;
	pthread_mutex_unlock(&rm->lock);
	dr_hangup(&l);
}

/* SO_RCVTIMEO/SO_SNDTIMEO bound each call; a server that trickles a
 * byte now and then would still hold a request forever, so a whole
 * exchange also has a deadline, checked between calls. */
static int dr_past(uint64_t deadline_ns)
{
	return devio_now_ns() > deadline_ns ? -ETIMEDOUT : 0;
}

/* sendmsg with MSG_NOSIGNAL: a dead server must not kill a client
 * process that has not ignored SIGPIPE (devio cat, copy). */
static int dr_send_all(struct dr_link *l, struct iovec *iov, int cnt, uint64_t deadline_ns)
{
	int fd = l->fd;

	if (l->tls) /* each record's send bounded by SO_SNDTIMEO */
		return dr_past(deadline_ns) ? -ETIMEDOUT : devio_tls_writev(l->tls, iov, cnt);
	while (cnt) {
		struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)cnt };
		ssize_t n;

		if (dr_past(deadline_ns))
			return -ETIMEDOUT;
		n = sendmsg(fd, &msg, MSG_NOSIGNAL);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		while (cnt && (size_t)n >= iov->iov_len) {
			n -= (ssize_t)iov->iov_len;
			iov++;
			cnt--;
		}
		if (cnt) {
			iov->iov_base = (char *)iov->iov_base + n;
			iov->iov_len -= (size_t)n;
		}
	}
	return 0;
}

static int dr_recv_all(struct dr_link *l, void *buf, size_t len, uint64_t deadline_ns)
{
	char *p = buf;

	while (len) {
		ssize_t n;

		if (dr_past(deadline_ns))
			return -ETIMEDOUT;
		if (l->tls) {
			n = devio_tls_recv(l->tls, p, len, false);
			if (n < 0)
				return (int)n;
		} else {
			n = read(l->fd, p, len);
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -ECONNRESET;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* ---- one exchange on one connection ---- */

struct xfer {
	uint64_t code, off, len;
	void *buf;        /* READ: filled; WRITE: payload */
	int result;       /* the server's answer (0 or -errno) */
};

/* Send one request and read its answer.  Returns 0 when the exchange
 * happened (the server's verdict is in x->result) or -errno when the
 * connection broke or the server broke the protocol. */
static int dr_exchange(struct remote *rm, struct dr_link *l, struct xfer *x)
{
	struct devio_proto_req rq = { .code = x->code, .offset = x->off, .length = x->len };
	uint8_t hdr[DEVIO_MAX_REQ_HDR], resp[DEVIO_ANSWER_SIZE];
	struct iovec iov[2] = { { hdr, 0 }, { x->buf, 0 } };
	uint64_t deadline = devio_now_ns() + (uint64_t)rm->timeout_s * 1000000000u;
	int cnt = 1, r;
	uint64_t n;

	iov[0].iov_len = devio_proto_encode_req(&rq, hdr);
	if (x->code == DEVIO_REQ_WRITE) {
		iov[1].iov_len = x->len;
		cnt = 2;
	}
	if ((r = dr_send_all(l, iov, cnt, deadline)))
		return r;
	if (x->code == DEVIO_REQ_UNMAP || x->code == DEVIO_REQ_ZERO) {
		if ((r = dr_recv_all(l, resp, DEVIO_ERRNO_SIZE, deadline)))
			return r;
		x->result = devio_proto_peer_errno(devio_get_le64(resp));
		return 0;
	}
	if ((r = dr_recv_all(l, resp, DEVIO_ANSWER_SIZE, deadline)))
		return r;
	if (devio_proto_decode_answer(resp, x->len, &x->result, &n)) {
		devio_err("%s: server answered %llu bytes for %llu at %llu", rm->uri,
			  (unsigned long long)devio_get_le64(resp + 8), (unsigned long long)x->len,
			  (unsigned long long)x->off);
		return -EPROTO;
	}
	if (x->code == DEVIO_REQ_READ && (r = dr_recv_all(l, x->buf, n, deadline)))
		return r;
	if (!devio_get_le64(resp) && n != x->len)
		devio_err("%s: short %s at %llu: %llu of %llu bytes", rm->uri,
			  x->code == DEVIO_REQ_READ ? "read" : "write", (unsigned long long)x->off,
			  (unsigned long long)n, (unsigned long long)x->len);
	return 0;
}

/* Run x on a pooled connection; after a broken connection, once more
 * on another (or a new) one. */
static int dr_run_once_more(struct remote *rm, struct xfer *x)
{
	struct remote_conn *c;
	int r = -ECONNRESET;

	for (int attempt = 0; attempt < 2; attempt++) {
		static const struct dr_mark none;

		if ((r = dr_conn_open(rm, &none, &c)))
			break;
		r = dr_exchange(rm, &c->l, x);
		if (r == 0) {
			dr_conn_put(rm, c);
			break;
		}
		/* A change that timed out may still be running on the server:
		 * sent again, the late first copy could land after a newer,
		 * acknowledged write to the same blocks.  Only reads retry then. */
		if ((r == -ETIMEDOUT || r == -EAGAIN) && x->code != DEVIO_REQ_READ)
			attempt = 1;
		devio_warn("%s: connection lost at offset %llu (%s)%s", rm->uri, (unsigned long long)x->off,
			   strerror(-r), attempt ? "" : "; reconnecting");
		dr_conn_drop(rm, c);
		dr_conn_put(rm, c);
	}
	return r ? r : x->result;
}

enum dr_loss { DR_LOSS_WAIT, DR_LOSS_AGAIN, DR_LOSS_EXPIRED };

/* A failure (r) of an attempt that began with m, on a connection dialled
 * when `seen` losses had been told (a failed dial: m->outages), decided
 * under one lock with the clock (read before it, another thread could
 * start the outage after our reading, and now - down_since would wrap to
 * "gone for ages"):
 * - no loss now, but one was told or ended since the attempt began, or
 *   the connection is older than the last loss: that loss's, over: AGAIN;
 * - no loss now: a new one, told once and WAITed for; the pool may open
 *   all its connections again (a refusal that capped it may have been
 *   this loss), and those waiting for a slot are woken;
 * - a loss now, and the connection is older than it: it says nothing of
 *   the server now, AGAIN (a fresh dial tells);
 * - else the loss's: WAIT, or EXPIRED once the server has been gone past
 *   the timeout (said once). */
static enum dr_loss dr_lost(struct remote *rm, int r, uint64_t seen, const struct dr_mark *m)
{
	enum dr_loss v = DR_LOSS_WAIT;
	uint64_t now;

	pthread_mutex_lock(&rm->lock);
	now = devio_now_ns();
	if (seen != rm->outages || (!rm->down_since && m->epoch != rm->epoch)) {
		v = DR_LOSS_AGAIN;
	} else if (!rm->down_since) {
		rm->down_since = now;
		rm->outages++;
		rm->epoch++;
		rm->told_expired = false;
		rm->max_conns = REMOTE_MAX_CONNS;
		pthread_cond_broadcast(&rm->freed);
		devio_warn("%s: connection lost (%s); requests wait up to %u s for the server to come back", rm->uri,
			   strerror(-r), rm->reconnect_s);
	} else if (now - rm->down_since >= (uint64_t)rm->reconnect_s * 1000000000ull) {
		if (!rm->told_expired)
			devio_err("%s: no server for %u s (%s): requests fail with EIO until it is back", rm->uri,
				  rm->reconnect_s, strerror(-r));
		rm->told_expired = true;
		v = DR_LOSS_EXPIRED;
	}
	pthread_mutex_unlock(&rm->lock);
	return v;
}

/* An exchange of an attempt that began with m went through: the end of a
 * loss, if there was one and the attempt began after it was told (an
 * answer read just before the loss, from the server that is gone, says
 * nothing of the one to come back). */
static void dr_back(struct remote *rm, const struct dr_mark *m)
{
	pthread_mutex_lock(&rm->lock);
	if (rm->down_since && m->outages == rm->outages) {
		devio_info("%s: reconnected after %.1f s", rm->uri, (double)(devio_now_ns() - rm->down_since) / 1e9);
		rm->down_since = 0;
		rm->epoch++;
	}
	pthread_mutex_unlock(&rm->lock);
}

/* With reconnection: run x until answered, reconnecting with backoff
 * while the server is away (up to reconnect_s from the loss).  A change
 * that timed out is not sent again (it may still land late).  A failure
 * that belongs to a loss already over is tried again at once (dr_lost). */
static int dr_run_reconnecting(struct remote *rm, struct xfer *x)
{
	uint64_t backoff_us = 50000;
	int r;

	for (;;) {
		struct dr_mark m;
		struct remote_conn *c;
		uint64_t seen;
		enum dr_loss v;

		if (dr_dead(rm, &m))
			return -EIO;
		seen = m.outages;
		if (!(r = dr_conn_open(rm, &m, &c))) {
			r = dr_exchange(rm, &c->l, x);
			if (r == 0) {
				dr_conn_put(rm, c);
				dr_back(rm, &m);
				return x->result;
			}
			seen = c->outages;
			dr_conn_drop(rm, c);
			dr_conn_put(rm, c);
			if ((r == -ETIMEDOUT || r == -EAGAIN) && x->code != DEVIO_REQ_READ) {
				devio_err("%s: no answer at offset %llu within %u s", rm->uri, (unsigned long long)x->off,
					  rm->timeout_s);
				return r;
			}
		}
		if (r == -ESTALE || (v = dr_lost(rm, r, seen, &m)) == DR_LOSS_EXPIRED)
			return -EIO;
		if (v == DR_LOSS_AGAIN)
			continue;
		usleep((useconds_t)backoff_us);
		backoff_us = backoff_us * 2 > 1000000 ? 1000000 : backoff_us * 2;
	}
}

static int dr_run(struct remote *rm, struct xfer *x)
{
	return rm->reconnect_s ? dr_run_reconnecting(rm, x) : dr_run_once_more(rm, x);
}

/* ---- aligned transfers, split into chunks ---- */

static int dr_run_chunks(struct remote *rm, uint64_t code, void *buf, uint64_t len, uint64_t off)
{
	int r = 0;

	while (len && !r) {
		uint64_t n = len < rm->chunk ? len : rm->chunk;
		struct xfer x = { .code = code, .off = off, .len = n, .buf = buf };

		r = dr_run(rm, &x);
		if (r)
			devio_err("%s: %s at %llu of %llu bytes: %s", rm->uri,
				  code == DEVIO_REQ_READ ? "read" : "write", (unsigned long long)off,
				  (unsigned long long)n, strerror(-r));
		buf = (char *)buf + n;
		off += n;
		len -= n;
	}
	return r;
}

/* With reconnection, a change holds its bytes from first send to answer
 * (every piece, every reissue): an overlapping change waits, so it never
 * overtakes one that is sent again. */
static void dr_range_hold(struct remote *rm, struct devio_range *rg, uint64_t off, uint64_t len)
{
	if (rm->reconnect_s)
		devio_range_acquire(&rm->ranges, rg, off, off + len, true);
}

static void dr_range_let_go(struct remote *rm, struct devio_range *rg)
{
	if (rm->reconnect_s)
		devio_range_release(&rm->ranges, rg);
}

static bool dr_aligned(const struct remote *rm, uint64_t off, uint64_t len)
{
	return ((off | len) & (rm->align - 1)) == 0;
}

static int dr_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	struct remote *rm = b->priv;
	uint64_t start, end;
	char *bounce;
	int r;

	if (dr_aligned(rm, off, len))
		return dr_run_chunks(rm, DEVIO_REQ_READ, buf, len, off);
	start = off & ~(rm->align - 1);
	end = (off + len + rm->align - 1) & ~(rm->align - 1);
	bounce = malloc(end - start);
	if (!bounce)
		return -ENOMEM;
	r = dr_run_chunks(rm, DEVIO_REQ_READ, bounce, end - start, start);
	if (!r)
		memcpy(buf, bounce + (off - start), len);
	free(bounce);
	return r;
}

/* Unaligned write: read the partial blocks at both ends, patch, write. */
static int dr_pwrite_rmw(struct remote *rm, const void *buf, uint64_t len, uint64_t off)
{
	uint64_t start = off & ~(rm->align - 1);
	uint64_t end = (off + len + rm->align - 1) & ~(rm->align - 1);
	char *bounce = malloc(end - start);
	int r = 0;

	if (!bounce)
		return -ENOMEM;
	pthread_rwlock_wrlock(&rm->rmw_lock);
	if (start < off)
		r = dr_run_chunks(rm, DEVIO_REQ_READ, bounce, rm->align, start);
	if (!r && off + len < end && end - rm->align >= start + (start < off ? rm->align : 0))
		r = dr_run_chunks(rm, DEVIO_REQ_READ, bounce + (end - rm->align - start), rm->align, end - rm->align);
	if (!r) {
		memcpy(bounce + (off - start), buf, len);
		r = dr_run_chunks(rm, DEVIO_REQ_WRITE, bounce, end - start, start);
	}
	pthread_rwlock_unlock(&rm->rmw_lock);
	free(bounce);
	return r;
}

static int dr_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	struct remote *rm = b->priv;
	int r;

	struct devio_range rg;

	if (!dr_aligned(rm, off, len))
		return dr_pwrite_rmw(rm, buf, len, off);
	pthread_rwlock_rdlock(&rm->rmw_lock);
	dr_range_hold(rm, &rg, off, len);
	r = dr_run_chunks(rm, DEVIO_REQ_WRITE, (void *)buf, len, off);
	dr_range_let_go(rm, &rg);
	pthread_rwlock_unlock(&rm->rmw_lock);
	return r;
}

static int dr_range(struct devio_backend *b, uint64_t code, uint64_t off, uint64_t len)
{
	struct remote *rm = b->priv;
	struct xfer x = { .code = code, .off = off, .len = len };
	struct devio_range rg;
	int r;

	pthread_rwlock_rdlock(&rm->rmw_lock);
	dr_range_hold(rm, &rg, off, len);
	r = dr_run(rm, &x);
	dr_range_let_go(rm, &rg);
	pthread_rwlock_unlock(&rm->rmw_lock);
	if (r)
		devio_err("%s: %s at %llu of %llu bytes: %s", rm->uri, code == DEVIO_REQ_UNMAP ? "unmap" : "zero",
			  (unsigned long long)off, (unsigned long long)len, strerror(-r));
	return r;
}

static int dr_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct remote *rm = b->priv;

	if (!(rm->flags & DEVIO_INFO_SUPPORTS_UNMAP))
		return -EOPNOTSUPP;
	return dr_range(b, DEVIO_REQ_UNMAP, off, len);
}

/* ZERO where the server offers it, else zeroes written in chunks. */
static int dr_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct remote *rm = b->priv;
	char *zeroes;
	int r = 0;

	if (flags & DEVIO_REQ_FAST_ZERO)
		return -EOPNOTSUPP; /* the protocol cannot say whether ZERO is fast */
	if (rm->flags & DEVIO_INFO_SUPPORTS_ZERO)
		return dr_range(b, DEVIO_REQ_ZERO, off, len);
	zeroes = calloc(1, rm->chunk);
	if (!zeroes)
		return -ENOMEM;
	while (len && !r) {
		uint64_t n = len < rm->chunk ? len : rm->chunk;

		r = dr_pwrite(b, zeroes, n, off, 0);
		off += n;
		len -= n;
	}
	free(zeroes);
	return r;
}

/* The protocol has no flush: the server decides when data is durable. */
static int dr_flush(struct devio_backend *b)
{
	return 0;
}

static void dr_describe(struct devio_backend *b, char *out, size_t outlen)
{
	struct remote *rm = b->priv;
	unsigned n = 0;

	pthread_mutex_lock(&rm->lock); /* the pool may be growing on another thread */
	for (unsigned i = 0; i < REMOTE_MAX_CONNS; i++)
		n += rm->conns[i].l.fd >= 0;
	pthread_mutex_unlock(&rm->lock);
	snprintf(out, outlen, "devio server %s (alignment %llu, flags 0x%llx, %u connection(s)%s%s)", rm->uri,
		 (unsigned long long)rm->align, (unsigned long long)rm->flags, n, rm->tls_creds ? ", TLS " : "",
		 rm->tls_creds ? devio_tls_creds_kind(rm->tls_creds) : "");
}

static void dr_close(struct devio_backend *b)
{
	struct remote *rm = b->priv;
	uint8_t bye[8];

	devio_put_le64(bye, DEVIO_REQ_CLOSE);
	for (unsigned i = 0; i < REMOTE_MAX_CONNS; i++)
		if (rm->conns[i].l.fd >= 0) {
			if (dr_write(&rm->conns[i].l, bye, sizeof(bye)))
				devio_debug("%s: CLOSE not delivered", rm->uri);
			dr_conn_drop(rm, &rm->conns[i]);
		}
	devio_tls_creds_free(rm->tls_creds);
	pthread_cond_destroy(&rm->freed);
	pthread_mutex_destroy(&rm->lock);
	pthread_rwlock_destroy(&rm->rmw_lock);
	devio_range_lock_destroy(&rm->ranges);
	free(rm);
	free(b);
}

static const struct devio_backend_ops remote_ops = {
	.name = "devio-remote",
	.pread = dr_pread,
	.pwrite = dr_pwrite,
	.flush = dr_flush,
	.trim = dr_trim,
	.zero = dr_zero,
	.describe = dr_describe,
	.close = dr_close,
};

/* ---- opening ---- */

/* One tls-* parameter of a devio+tls:// URI (percent-decoded), once each. */
static int dr_tls_param(struct remote *rm, const char *key, const char *val)
{
	static const char *const keys[] = { "tls-certificates=", "tls-psk-file=", "tls-username=" };
	char *const fields[] = { rm->tls_certificates, rm->tls_psk_file, rm->tls_username };
	const size_t lens[] = { sizeof(rm->tls_certificates), sizeof(rm->tls_psk_file), sizeof(rm->tls_username) };
	char why[200];

	for (size_t i = 0; i < 3; i++) {
		if (strncmp(key, keys[i], strlen(keys[i])))
			continue;
		if (strncmp(rm->uri, "devio+tls://", 12)) {
			devio_err("%s: %.*s belongs to devio+tls:// URIs", rm->uri, (int)strlen(keys[i]) - 1, keys[i]);
			return -EINVAL;
		}
		if (fields[i][0] || !val[0]) {
			devio_err("%s: %s given twice, or without a value", rm->uri, keys[i]);
			return -EINVAL;
		}
		if (devio_uri_decode(keys[i], val, strlen(val), fields[i], lens[i], why, sizeof(why))) {
			devio_err("%s: %s", rm->uri, why);
			return -EINVAL;
		}
		return 0;
	}
	devio_err("%s: unknown query parameter '%s' (chunk=N; devio+tls://: tls-certificates=DIR, "
		  "tls-psk-file=FILE, tls-username=NAME)", rm->uri, key);
	return -EINVAL;
}

/* The query after '?': chunk=N (512..64M), and the tls-* parameters. */
static int dr_parse_query(const char *q, struct remote *rm)
{
	char buf[8192], *save = NULL;
	int r;

	if (strlen(q) >= sizeof(buf))
		return -EINVAL;
	strcpy(buf, q);
	for (char *kv = strtok_r(buf, "&", &save); kv; kv = strtok_r(NULL, "&", &save)) {
		if (!strncmp(kv, "tls-", 4)) {
			if ((r = dr_tls_param(rm, kv, strchr(kv, '=') ? strchr(kv, '=') + 1 : "")))
				return r;
			continue;
		}
		if (strncmp(kv, "chunk=", 6) || devio_parse_size(kv + 6, &rm->chunk) || rm->chunk < 512 ||
		    rm->chunk > DEVIO_MAX_TRANSFER) {
			devio_err("%s: '%s': want chunk=N (512..64M)", rm->uri, kv);
			return -EINVAL;
		}
	}
	return 0;
}

/* USER@ before a devio+tls:// host: the PSK user name (as nbds://). */
static int dr_parse_user(struct remote *rm, const char **hp, size_t *h)
{
	const char *at = memchr(*hp, '@', *h);
	char why[200];

	if (!at)
		return 0;
	if (strncmp(rm->uri, "devio+tls://", 12)) {
		devio_err("%s: a user name (USER@HOST) is for TLS: use devio+tls://", rm->uri);
		return -EINVAL;
	}
	if (devio_uri_decode("user name", *hp, (size_t)(at - *hp), rm->tls_username, sizeof(rm->tls_username), why,
			     sizeof(why))) {
		devio_err("%s: %s", rm->uri, why);
		return -EINVAL;
	}
	*h -= (size_t)(at + 1 - *hp);
	*hp = at + 1;
	return 0;
}

/* devio[+tls]://[USER@]HOST[:PORT][/] (IPv6 in brackets): the tcp: address. */
static int dr_parse_tcp(struct remote *rm, const char *hp, size_t n)
{
	size_t h = strcspn(hp, "/?");
	char spec[300];
	int r;

	if (h > n || (h < n && (hp[h] != '/' || h + 1 != n)))
		return -EINVAL;
	if ((r = dr_parse_user(rm, &hp, &h)))
		return r;
	if (h == 0 || h + 5 >= sizeof(spec))
		return -EINVAL;
	snprintf(spec, sizeof(spec), "tcp:%.*s", (int)h, hp);
	return devio_addr_parse(spec, "9000", &rm->addr);
}

/* devio://HOST:PORT, devio://[V6]:PORT, devio+tls://[USER@]HOST:PORT,
 * devio+unix:///PATH, each with an optional ?chunk=N (devio+tls://: and
 * the tls-* parameters) */
static int dr_parse_uri(const char *uri, struct remote *rm)
{
	struct devio_addr *a = &rm->addr;
	const char *q = strchr(uri, '?');
	char spec[300];
	size_t n;

	if (q && dr_parse_query(q + 1, rm))
		return -EINVAL;
	n = q ? (size_t)(q - uri) : strlen(uri);
	if (!strncmp(uri, "devio://", 8))
		return dr_parse_tcp(rm, uri + 8, n - 8);
	if (!strncmp(uri, "devio+tls://", 12))
		return dr_parse_tcp(rm, uri + 12, n - 12);
	if (!strncmp(uri, "devio+unix://", 13) && uri[13] == '/' && n > 14) {
		if (n - 13 + 6 >= sizeof(spec))
			return -ENAMETOOLONG;
		snprintf(spec, sizeof(spec), "unix:%.*s", (int)(n - 13), uri + 13);
		return devio_addr_parse(spec, NULL, a);
	}
	return -EINVAL;
}

int devio_remote_devio_check_uri(const char *uri)
{
	struct remote *rm = calloc(1, sizeof(*rm));
	int r;

	if (!rm)
		return -ENOMEM;
	snprintf(rm->uri, sizeof(rm->uri), "%s", uri);
	r = dr_parse_uri(uri, rm);
	if (r)
		devio_err("%s: want devio://HOST:PORT, devio+tls://[USER@]HOST:PORT or devio+unix:///PATH (?chunk=N; "
			  "devio+tls://: ?tls-certificates=DIR or ?tls-psk-file=FILE[&tls-username=NAME])", uri);
	else if (rm->tls_certificates[0] && rm->tls_psk_file[0] && (r = -EINVAL))
		devio_err("%s: tls-certificates= and tls-psk-file= exclude each other", uri);
	free(rm);
	return r;
}

/* devio+tls://: the client credentials, once for every connection. */
static int dr_tls_setup(struct remote *rm)
{
	if (strncmp(rm->uri, "devio+tls://", 12))
		return 0;
	rm->tls_conf.certificates = rm->tls_certificates[0] ? rm->tls_certificates : NULL;
	rm->tls_conf.psk_file = rm->tls_psk_file[0] ? rm->tls_psk_file : NULL;
	rm->tls_conf.username = rm->tls_username[0] ? rm->tls_username : NULL;
	return devio_tls_creds_new(&rm->tls_conf, false, &rm->tls_creds);
}

static int dr_info(struct remote *rm)
{
	struct remote_conn *c = &rm->conns[0];
	struct devio_proto_req rq = { .code = DEVIO_REQ_INFO };
	uint8_t req[DEVIO_MAX_REQ_HDR], resp[DEVIO_INFO_SIZE];
	struct devio_info info;
	char why[160];
	int r;

	if ((r = dr_dial(rm, &c->l))) {
		devio_err("%s: cannot connect: %s", rm->uri, strerror(-r));
		return r;
	}
	if ((r = dr_write(&c->l, req, devio_proto_encode_req(&rq, req))) || (r = dr_read(&c->l, resp, sizeof(resp)))) {
		devio_err("%s: INFO failed: %s", rm->uri, strerror(-r));
		return r;
	}
	if ((r = devio_proto_decode_info(resp, &info, why, sizeof(why)))) {
		devio_err("%s: %s", rm->uri, why);
		return r;
	}
	rm->remote_size = info.file_size;
	rm->align = info.req_alignment;
	rm->flags = info.flags;
	/* whole blocks per chunk, so aligned transfers stay aligned */
	rm->chunk = rm->chunk < rm->align ? rm->align : rm->chunk & ~(rm->align - 1);
	return 0;
}

/* The export's size: the server's, or --offset + --size when it says 0
 * (an ImDisk server of a device it cannot size); the window layer then
 * cuts --offset/--size out of it, as out of any source. */
static int dr_export_size(struct remote *rm, const struct devio_open_opts *o, uint64_t *size)
{
	if (rm->remote_size) {
		*size = rm->remote_size;
		return 0;
	}
	if (!o->has_size || o->size == 0) {
		devio_err("%s: the server does not tell its size; give it with --size", rm->uri);
		return -EINVAL;
	}
	if (__builtin_add_overflow(o->has_offset ? o->offset : 0, o->size, size)) {
		devio_err("%s: --offset %llu plus --size %llu overflows", rm->uri,
			  (unsigned long long)o->offset, (unsigned long long)o->size);
		return -EINVAL;
	}
	return 0;
}

/* Writers first: a steady stream of aligned writes must not starve an
 * unaligned one waiting for the exclusive lock. */
static void dr_rmw_lock_init(pthread_rwlock_t *l)
{
	pthread_rwlockattr_t a;

	pthread_rwlockattr_init(&a);
	pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(l, &a);
	pthread_rwlockattr_destroy(&a);
}

int devio_remote_devio_open(const char *uri, const struct devio_open_opts *opts, struct devio_backend **out)
{
	static const struct devio_open_opts none;
	struct devio_backend *b = NULL;
	struct remote *rm;
	uint64_t size;
	int r;

	if (!opts)
		opts = &none;
	rm = calloc(1, sizeof(*rm));
	if (!rm)
		return -ENOMEM;
	for (unsigned i = 0; i < REMOTE_MAX_CONNS; i++)
		rm->conns[i].l.fd = -1;
	pthread_mutex_init(&rm->lock, NULL);
	pthread_cond_init(&rm->freed, NULL);
	dr_rmw_lock_init(&rm->rmw_lock);
	devio_range_lock_init(&rm->ranges);
	rm->reconnect_s = opts->remote_timeout;
	snprintf(rm->uri, sizeof(rm->uri), "%s", uri);
	rm->timeout_s = dr_timeout();
	rm->max_conns = REMOTE_MAX_CONNS;
	rm->chunk = REMOTE_CHUNK;
	if ((r = devio_remote_devio_check_uri(uri)) || (r = dr_parse_uri(uri, rm)) || (r = dr_tls_setup(rm)) ||
	    (r = dr_info(rm)) || (r = dr_export_size(rm, opts, &size)))
		goto out_free;
	b = calloc(1, sizeof(*b));
	if (!b) {
		r = -ENOMEM;
		goto out_free;
	}
	b->ops = &remote_ops;
	b->size = size;
	b->block_size = (uint32_t)rm->align;
	b->priv = rm;
	b->caps = DEVIO_CAP_CACHE | DEVIO_CAP_MULTI_CONN | devio_proto_caps(rm->flags); /* -r: the window layer */
	*out = b;
	return 0;
out_free:
	b = calloc(1, sizeof(*b));
	if (b) {
		b->priv = rm;
		dr_close(b);
	} else {
		free(rm);
	}
	return r;
}
