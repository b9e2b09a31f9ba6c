/* stream.c - the --devio front end: ImDisk's devio stream protocol over
 * TCP, a Unix socket, standard input/output or a serial/character device.
 *
 * One thread per connection (at most STREAM_MAX_CONNS; extras are accepted
 * and closed at once), one request outstanding per connection as the
 * protocol defines, each request run with devio_execute() on the default
 * export.  devio_stream_session() is the whole protocol on a pair of file
 * descriptors; everything else here is listening, accounting and stopping.
 * The wire format and the choices for bad input are in docs/devio-protocol.md.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include "devio/frontend.h"
#include "devio/protocol.h"
#include "devio/stream.h"
#include "devio/util.h"

#define STREAM_MAX_CONNS 64
#define STREAM_RDBUF 65536
/* How long stop() waits for sessions to end. */
#define STREAM_STOP_SECONDS 10
/* A connection keeps a data buffer up to this size between requests. */
#define STREAM_KEEP_BUF (4u << 20)
/* CONNECT carries a connection string: more than this is not a string. */
#define STREAM_MAX_CONNECT_BYTES 65536u
/* SCSI pass-through payloads we consume (and refuse) without keeping. */
#define STREAM_MAX_SCSI_BYTES (1u << 20)
/* accept() out of descriptors: wait this long before trying again. */
#define STREAM_ACCEPT_PAUSE_MS 200

/* ---- buffered input: one read() usually brings a header and payload ---- */

struct stream_in {
	int fd;
	int stop_fd;
	size_t pos, len;
	char buf[STREAM_RDBUF];
};

static int in_wait(struct stream_in *in)
{
	struct pollfd p[2] = { { .fd = in->fd, .events = POLLIN }, { .fd = in->stop_fd, .events = POLLIN } };

	if (in->stop_fd < 0)
		return 0;
	for (;;) {
		int n = poll(p, 2, -1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (p[1].revents)
			return -ECANCELED;
		return 0;
	}
}

static ssize_t in_raw(struct stream_in *in, void *dst, size_t n)
{
	for (;;) {
		ssize_t r;
		int w = in_wait(in);

		if (w)
			return w;
		r = read(in->fd, dst, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return -errno;
		return r;
	}
}

/* Exactly n bytes; -ECONNRESET on EOF.  *got tells how many arrived
 * before an error, so a clean EOF between requests can be told apart. */
static int in_read(struct stream_in *in, void *dst, size_t n, size_t *got)
{
	char *d = dst;
	size_t done = 0;

	while (done < n) {
		ssize_t r;

		if (in->pos < in->len) {
			size_t k = in->len - in->pos < n - done ? in->len - in->pos : n - done;
			memcpy(d + done, in->buf + in->pos, k);
			in->pos += k;
			done += k;
			continue;
		}
		if (n - done >= sizeof(in->buf))
			r = in_raw(in, d + done, n - done); /* large payload: straight in */
		else
			r = in_raw(in, in->buf, sizeof(in->buf));
		if (r <= 0) {
			if (got)
				*got = done;
			return r < 0 ? (int)r : -ECONNRESET;
		}
		if (n - done >= sizeof(in->buf)) {
			done += (size_t)r;
		} else {
			in->pos = 0;
			in->len = (size_t)r;
		}
	}
	if (got)
		*got = done;
	return 0;
}

static int in_discard(struct stream_in *in, uint64_t n)
{
	char scratch[4096];

	while (n) {
		size_t k = n < sizeof(scratch) ? (size_t)n : sizeof(scratch);
		int r = in_read(in, scratch, k, NULL);
		if (r)
			return r;
		n -= k;
	}
	return 0;
}

/* ---- output: header and data in one writev() ---- */

static int out_writev(int fd, struct iovec *iov, int cnt)
{
	struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)cnt };

	while (msg.msg_iovlen) {
		ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);

		if (n < 0 && errno == ENOTSOCK)
			n = writev(fd, msg.msg_iov, (int)msg.msg_iovlen);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		while (msg.msg_iovlen && (size_t)n >= msg.msg_iov->iov_len) {
			n -= (ssize_t)msg.msg_iov->iov_len;
			msg.msg_iov++;
			msg.msg_iovlen--;
		}
		if (msg.msg_iovlen) {
			msg.msg_iov->iov_base = (char *)msg.msg_iov->iov_base + n;
			msg.msg_iov->iov_len -= (size_t)n;
		}
	}
	return 0;
}

/* Send n 64-bit little-endian values. */
static int out_words(int fd, const uint64_t *v, int n)
{
	uint8_t hdr[8 * 8];
	struct iovec iov = { hdr, (size_t)n * 8 };

	for (int i = 0; i < n; i++)
		devio_put_le64(hdr + 8 * i, v[i]);
	return out_writev(fd, &iov, 1);
}

/* ---- one session ---- */

struct session {
	struct devio_backend *b;
	struct stream_in *in;
	int wfd;
	uint32_t max_transfer;
	uint32_t alignment;
	bool enforce_alignment;
	const char *name;
	void *buf;
	size_t buflen;
};

/* Grow the data buffer to at least n bytes (n is already bounded). */
static int session_buf(struct session *s, size_t n)
{
	size_t want = 65536;
	void *p;

	if (n <= s->buflen)
		return 0;
	while (want < n)
		want <<= 1;
	p = realloc(s->buf, want);
	if (!p)
		return -ENOMEM;
	s->buf = p;
	s->buflen = want;
	return 0;
}

/* Run op on [off, off+len), split at the backend's max_io. */
static int session_exec(struct session *s, enum devio_op op, uint64_t off, uint64_t len, void *buf)
{
	uint64_t step = s->b->max_io ? s->b->max_io : len;
	int r = 0;

	if (len == 0) {
		/* nothing to move, but a WRITE of 0 bytes far beyond the end or
		 * to a read-only export is still refused as the core would */
		struct devio_request req = { .op = op, .offset = off, .buf = buf };

		return devio_request_check(s->b, &req);
	}
	while (len && !r) {
		uint64_t n = len < step ? len : step;
		struct devio_request req = { .op = op, .offset = off, .length = n, .buf = buf };

		r = devio_run(s->b, &req);
		off += n;
		len -= n;
		if (buf)
			buf = (char *)buf + n;
	}
	return r;
}

/* With align= given, offsets and lengths must be multiples of it (INFO
 * reports it).  Otherwise INFO reports the backend's block size as a
 * preference and any request the backend accepts is served. */
static int check_aligned(struct session *s, const char *what, uint64_t off, uint64_t len)
{
	if (!s->enforce_alignment || (off % s->alignment == 0 && len % s->alignment == 0))
		return 0;
	devio_warn("%s: %s at %llu of %llu bytes: not aligned to %u bytes", s->name, what,
		   (unsigned long long)off, (unsigned long long)len, s->alignment);
	return -EINVAL;
}

static uint64_t wire_errno(int r)
{
	return r < 0 ? (uint64_t)-r : 0;
}

static int do_info(struct session *s)
{
	const struct devio_backend *b = s->b;
	uint64_t flags = 0;
	uint64_t v[3];

	if (b->caps & DEVIO_CAP_READONLY)
		flags |= DEVIO_INFO_RO;
	else {
		if (b->caps & DEVIO_CAP_TRIM)
			flags |= DEVIO_INFO_SUPPORTS_UNMAP;
		/* the core writes zeroes where the backend has no zero() */
		flags |= DEVIO_INFO_SUPPORTS_ZERO;
	}
	v[0] = b->size;
	v[1] = s->alignment;
	v[2] = flags;
	return out_words(s->wfd, v, 3);
}

static int do_read(struct session *s)
{
	uint8_t hdr[16];
	uint64_t off, len, v[2];
	struct iovec iov[2];
	int r;

	if ((r = in_read(s->in, hdr, sizeof(hdr), NULL)))
		return r;
	off = devio_get_le64(hdr);
	len = devio_get_le64(hdr + 8);
	if (len > s->max_transfer) {
		devio_warn("%s: READ at %llu of %llu bytes: over the %u-byte limit", s->name,
			   (unsigned long long)off, (unsigned long long)len, s->max_transfer);
		r = -E2BIG;
	} else if ((r = check_aligned(s, "READ", off, len))) {
		/* logged */
	} else if (off > s->b->size) {
		devio_warn("%s: READ at %llu: beyond the end (%llu)", s->name,
			   (unsigned long long)off, (unsigned long long)s->b->size);
		r = -EINVAL;
	} else {
		/* Short read at the end of the image, as the protocol allows. */
		if (len > s->b->size - off)
			len = s->b->size - off;
		r = session_buf(s, len);
		if (!r)
			r = session_exec(s, DEVIO_OP_READ, off, len, s->buf);
		if (r)
			devio_warn("%s: READ at %llu of %llu bytes: %s", s->name, (unsigned long long)off,
				   (unsigned long long)len, strerror(-r));
	}
	v[0] = wire_errno(r);
	v[1] = r ? 0 : len;
	devio_put_le64(hdr, v[0]);
	devio_put_le64(hdr + 8, v[1]);
	iov[0] = (struct iovec){ hdr, 16 };
	iov[1] = (struct iovec){ s->buf, (size_t)v[1] };
	return out_writev(s->wfd, iov, v[1] ? 2 : 1);
}

static int do_write(struct session *s)
{
	uint8_t hdr[16];
	uint64_t off, len, v[2];
	int r, err;

	if ((r = in_read(s->in, hdr, sizeof(hdr), NULL)))
		return r;
	off = devio_get_le64(hdr);
	len = devio_get_le64(hdr + 8);
	if (len > s->max_transfer) {
		/* The payload cannot be consumed without trusting the length:
		 * answer, then drop the connection (the stream is lost). */
		devio_warn("%s: WRITE at %llu of %llu bytes: over the %u-byte limit; closing",
			   s->name, (unsigned long long)off, (unsigned long long)len, s->max_transfer);
		v[0] = E2BIG;
		v[1] = 0;
		out_words(s->wfd, v, 2);
		return -EPROTO;
	}
	if ((err = check_aligned(s, "WRITE", off, len)) || (err = session_buf(s, len))) {
		/* Misaligned, or no memory: still consume, keep the stream. */
		if ((r = in_discard(s->in, len)))
			return r;
		r = err;
	} else {
		if ((r = in_read(s->in, s->buf, len, NULL)))
			return r;
		r = session_exec(s, DEVIO_OP_WRITE, off, len, s->buf);
	}
	if (r && r != -EINVAL)
		devio_warn("%s: WRITE at %llu of %llu bytes: %s", s->name, (unsigned long long)off,
			   (unsigned long long)len, strerror(-r));
	v[0] = wire_errno(r);
	v[1] = r ? 0 : len;
	return out_words(s->wfd, v, 2);
}

/* Check one UNMAP/ZERO range against the export. */
static int range_check(struct session *s, const uint8_t *p, uint64_t *off, uint64_t *len)
{
	int64_t soff = (int64_t)devio_get_le64(p);

	*off = (uint64_t)soff;
	*len = devio_get_le64(p + 8);
	if (soff < 0 || *off > s->b->size || *len > s->b->size - *off)
		return -EINVAL;
	return 0;
}

static int do_ranges(struct session *s, uint64_t code)
{
	enum devio_op op = code == DEVIO_REQ_UNMAP ? DEVIO_OP_TRIM : DEVIO_OP_ZERO;
	const char *what = code == DEVIO_REQ_UNMAP ? "UNMAP" : "ZERO";
	uint8_t hdr[8];
	uint64_t len, v, off, n;
	int r;

	if ((r = in_read(s->in, hdr, sizeof(hdr), NULL)))
		return r;
	len = devio_get_le64(hdr);
	if (len > DEVIO_MAX_RANGES_BYTES) {
		devio_warn("%s: %s with %llu bytes of ranges: over the %u-byte limit; closing", s->name,
			   what, (unsigned long long)len, DEVIO_MAX_RANGES_BYTES);
		v = E2BIG;
		out_words(s->wfd, &v, 1);
		return -EPROTO;
	}
	if ((r = session_buf(s, len))) {
		/* no memory for the ranges: consume them, answer, keep the stream */
		if ((r = in_discard(s->in, len)))
			return r;
		v = ENOMEM;
		return out_words(s->wfd, &v, 1);
	}
	if ((r = in_read(s->in, s->buf, len, NULL)))
		return r;
	if (len % DEVIO_RANGE_SIZE) {
		devio_warn("%s: %s: range array of %llu bytes is not a multiple of %u", s->name, what,
			   (unsigned long long)len, DEVIO_RANGE_SIZE);
		r = -EINVAL;
	}
	if (!r && (s->b->caps & DEVIO_CAP_READONLY))
		r = -EROFS;
	/* Check every range before running any. */
	for (uint64_t i = 0; !r && i < len; i += DEVIO_RANGE_SIZE) {
		if ((r = range_check(s, (uint8_t *)s->buf + i, &off, &n)))
			devio_warn("%s: %s range at %lld of %llu bytes: outside the export (%llu bytes)",
				   s->name, what, (long long)off, (unsigned long long)n,
				   (unsigned long long)s->b->size);
	}
	for (uint64_t i = 0; !r && i < len; i += DEVIO_RANGE_SIZE) {
		range_check(s, (uint8_t *)s->buf + i, &off, &n);
		if (n && (r = session_exec(s, op, off, n, NULL)))
			devio_warn("%s: %s at %llu of %llu bytes: %s", s->name, what,
				   (unsigned long long)off, (unsigned long long)n, strerror(-r));
	}
	v = wire_errno(r);
	return out_words(s->wfd, &v, 1);
}

/* CONNECT asks a server to open a connection elsewhere: not ours to do. */
static int do_connect(struct session *s)
{
	uint8_t hdr[16];
	uint64_t len, v[2] = { EOPNOTSUPP, 0 };
	int r;

	if ((r = in_read(s->in, hdr, sizeof(hdr), NULL)))
		return r;
	len = devio_get_le64(hdr + 8);
	if (len > STREAM_MAX_CONNECT_BYTES) {
		devio_warn("%s: CONNECT with a %llu-byte string: over the limit; closing", s->name,
			   (unsigned long long)len);
		out_words(s->wfd, v, 2);
		return -EPROTO;
	}
	if ((r = in_discard(s->in, len)))
		return r;
	devio_debug("%s: CONNECT refused (this server only serves its own export)", s->name);
	return out_words(s->wfd, v, 2);
}

/* SCSI pass-through is not offered (no SUPPORTS_SCSI flag). */
static int do_scsi(struct session *s)
{
	uint8_t hdr[32];
	uint64_t len, v[2] = { ENODEV, 0 };
	int r;

	if ((r = in_read(s->in, hdr, sizeof(hdr), NULL)))
		return r;
	len = devio_get_le64(hdr + 16);
	if (len > STREAM_MAX_SCSI_BYTES) {
		devio_warn("%s: SCSI with %llu bytes of data: over the limit; closing", s->name,
			   (unsigned long long)len);
		out_words(s->wfd, v, 2);
		return -EPROTO;
	}
	if ((r = in_discard(s->in, len)))
		return r;
	return out_words(s->wfd, v, 2);
}

/* SHARED reservations are not offered: errno, no unique id, no keys. */
static int do_shared(struct session *s)
{
	uint8_t hdr[48], resp[64] = { 0 };
	struct iovec iov = { resp, sizeof(resp) };
	int r;

	if ((r = in_read(s->in, hdr, sizeof(hdr), NULL)))
		return r;
	devio_put_le64(resp, ENODEV);
	return out_writev(s->wfd, &iov, 1);
}

static int session_request(struct session *s, uint64_t code)
{
	uint64_t v = ENODEV;

	switch (code) {
	case DEVIO_REQ_INFO: return do_info(s);
	case DEVIO_REQ_READ: return do_read(s);
	case DEVIO_REQ_WRITE: return do_write(s);
	case DEVIO_REQ_CONNECT: return do_connect(s);
	case DEVIO_REQ_UNMAP:
	case DEVIO_REQ_ZERO: return do_ranges(s, code);
	case DEVIO_REQ_SCSI: return do_scsi(s);
	case DEVIO_REQ_SHARED: return do_shared(s);
	default:
		devio_debug("%s: unknown request code %llu: answered ENODEV", s->name, (unsigned long long)code);
		return out_words(s->wfd, &v, 1);
	}
}

int devio_stream_session(struct devio_backend *b, int rfd, int wfd, const struct devio_stream_opts *opts)
{
	struct session s = { .b = b, .wfd = wfd, .name = opts && opts->name ? opts->name : "devio" };
	uint8_t word[8];
	int r;

	s.in = malloc(sizeof(*s.in));
	if (!s.in)
		return -ENOMEM;
	s.in->fd = rfd;
	s.in->stop_fd = opts ? opts->stop_fd : -1;
	s.in->pos = s.in->len = 0;
	s.max_transfer = opts && opts->max_transfer && opts->max_transfer < DEVIO_MAX_TRANSFER
				 ? opts->max_transfer : DEVIO_MAX_TRANSFER;
	s.alignment = opts && opts->alignment ? opts->alignment : (b->block_size ? b->block_size : 1);
	s.enforce_alignment = opts && opts->alignment > 1;
	for (;;) {
		size_t got = 0;
		uint64_t code;

		r = in_read(s.in, word, sizeof(word), &got);
		if (r == -ECONNRESET && got == 0) {
			r = 0; /* EOF between requests: the peer is done */
			break;
		}
		if (r)
			break;
		code = devio_get_le64(word);
		if (code == DEVIO_REQ_CLOSE)
			break;
		if ((r = session_request(&s, code)))
			break;
		if (s.buflen > STREAM_KEEP_BUF) {
			/* rare huge transfers: do not keep 64 MiB per idle client */
			free(s.buf);
			s.buf = NULL;
			s.buflen = 0;
		}
	}
	free(s.buf);
	free(s.in);
	return r;
}

/* ---- the front end: listening, connections, stopping ---- */

struct stream_conn {
	struct stream_state *st;
	int rfd, wfd;
	bool owns_fds;
	char name[128];
	struct stream_conn *next;
};

struct stream_state {
	struct devio_backend *b;
	struct devio_addr addr;
	char where[300];
	struct devio_stream_opts opts;
	int lfd;
	int stop_pipe[2];
	pthread_t accept_thread;
	bool accepting;
	bool single; /* stdio or a device: one session, then finished */
	pthread_mutex_t lock;
	pthread_cond_t idle;
	struct stream_conn *conns;
	unsigned active;
	bool stopping;
	atomic_bool finished;
	uint64_t served, refused, failed;
};

static void conn_unlink(struct stream_state *st, struct stream_conn *c)
{
	for (struct stream_conn **pp = &st->conns; *pp; pp = &(*pp)->next)
		if (*pp == c) {
			*pp = c->next;
			break;
		}
}

static void *conn_main(void *arg)
{
	struct stream_conn *c = arg;
	struct stream_state *st = c->st;
	struct devio_stream_opts o = st->opts;
	int r;

	o.name = c->name;
	o.stop_fd = st->single ? st->stop_pipe[0] : -1;
	devio_info("%s: client connected", c->name);
	r = devio_stream_session(st->b, c->rfd, c->wfd, &o);
	if (r && r != -ECANCELED)
		devio_info("%s: connection closed: %s", c->name, strerror(-r));
	else
		devio_info("%s: session ended", c->name);
	pthread_mutex_lock(&st->lock);
	conn_unlink(st, c);
	if (c->owns_fds) {
		close(c->rfd);
		if (c->wfd != c->rfd)
			close(c->wfd);
	}
	if (r && r != -ECANCELED)
		st->failed++;
	st->active--;
	if (st->single)
		atomic_store(&st->finished, true);
	pthread_cond_broadcast(&st->idle);
	pthread_mutex_unlock(&st->lock);
	free(c);
	return NULL;
}

/* Start a detached session thread for a connection; the lock is held. */
static int conn_start(struct stream_state *st, int rfd, int wfd, bool owns, const char *name)
{
	struct stream_conn *c = calloc(1, sizeof(*c));
	pthread_attr_t attr;
	pthread_t t;
	int r;

	if (!c)
		return -ENOMEM;
	c->st = st;
	c->rfd = rfd;
	c->wfd = wfd;
	c->owns_fds = owns;
	snprintf(c->name, sizeof(c->name), "%s", name);
	c->next = st->conns;
	st->conns = c;
	st->active++;
	st->served++;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	r = pthread_create(&t, &attr, conn_main, c);
	pthread_attr_destroy(&attr);
	if (r) {
		conn_unlink(st, c);
		st->active--;
		st->served--;
		free(c);
		return -r;
	}
	return 0;
}

/* A TCP peer that vanishes without a FIN (its host crashed, the link went
 * down) would hold its slot and thread forever, since an idle client is
 * legitimate: keepalive probes find it within about two minutes and the
 * blocked read then fails.  A live idle client answers them. */
static void tcp_keepalive(int fd)
{
	int one = 1, idle = 60, intvl = 10, cnt = 6;

	setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
}

static void accept_one(struct stream_state *st)
{
	char name[400];
	int fd = accept4(st->lfd, NULL, NULL, SOCK_CLOEXEC);

	if (fd < 0) {
		int e = errno;

		if (e == EINTR || e == EAGAIN || e == ECONNABORTED)
			return;
		devio_warn("--devio %s: accept: %s", st->where, strerror(e));
		/* Out of descriptors or memory: the pending connection stays
		 * readable, so pause (stop still wakes us) instead of spinning
		 * and logging this line at full speed. */
		if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM) {
			struct pollfd p = { .fd = st->stop_pipe[0], .events = POLLIN };

			poll(&p, 1, STREAM_ACCEPT_PAUSE_MS);
		}
		return;
	}
	devio_socket_tune(fd);
	if (st->addr.kind == DEVIO_ADDR_TCP)
		tcp_keepalive(fd);
	pthread_mutex_lock(&st->lock);
	snprintf(name, sizeof(name), "--devio %s client %llu", st->where, (unsigned long long)st->served + 1);
	if (st->stopping || st->active >= STREAM_MAX_CONNS) {
		uint64_t n = ++st->refused;

		pthread_mutex_unlock(&st->lock);
		/* a client reconnecting in a loop must not flood the log:
		 * the 1st, 2nd, 4th, 8th, ... refusal is told */
		if ((n & (n - 1)) == 0)
			devio_warn("--devio %s: refusing a client: %u connections already served at once (%llu refused so far)",
				   st->where, (unsigned)STREAM_MAX_CONNS, (unsigned long long)n);
		close(fd);
		return;
	}
	if (conn_start(st, fd, fd, true, name)) {
		st->refused++;
		close(fd);
	}
	pthread_mutex_unlock(&st->lock);
}

static void *accept_main(void *arg)
{
	struct stream_state *st = arg;
	struct pollfd p[2] = { { .fd = st->lfd, .events = POLLIN }, { .fd = st->stop_pipe[0], .events = POLLIN } };

	for (;;) {
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			devio_err("--devio %s: poll: %s", st->where, strerror(errno));
			return NULL;
		}
		if (p[1].revents)
			return NULL;
		if (p[0].revents)
			accept_one(st);
	}
}

/* Raw mode for a serial line: bytes pass unchanged. */
static int device_raw(int fd, const char *path)
{
	struct termios t;

	if (!isatty(fd))
		return 0;
	if (tcgetattr(fd, &t)) {
		devio_err("--devio %s: tcgetattr: %s", path, strerror(errno));
		return -errno;
	}
	cfmakeraw(&t);
	t.c_cc[VMIN] = 1;
	t.c_cc[VTIME] = 0;
	if (tcsetattr(fd, TCSANOW, &t)) {
		devio_err("--devio %s: tcsetattr: %s", path, strerror(errno));
		return -errno;
	}
	return 0;
}

/* "ADDR[,max-transfer=N][,align=N]" */
static int parse_arg(struct stream_state *st, const char *arg)
{
	char buf[512], *opt, *save = NULL;
	uint64_t v;

	if (!arg || strlen(arg) >= sizeof(buf))
		return -EINVAL;
	strcpy(buf, arg);
	opt = strchr(buf, ',');
	if (opt)
		*opt++ = '\0';
	if (devio_addr_parse(buf, NULL, &st->addr)) {
		devio_err("--devio %s: want tcp:[HOST:]PORT, unix:PATH, stdio or a device path", arg);
		return -EINVAL;
	}
	for (opt = opt ? strtok_r(opt, ",", &save) : NULL; opt; opt = strtok_r(NULL, ",", &save)) {
		if (!strncmp(opt, "max-transfer=", 13) && !devio_parse_size(opt + 13, &v) && v >= 512 &&
		    v <= DEVIO_MAX_TRANSFER)
			st->opts.max_transfer = (uint32_t)v;
		else if (!strncmp(opt, "align=", 6) && !devio_parse_size(opt + 6, &v) && v >= 1 && v <= 65536)
			st->opts.alignment = (uint32_t)v;
		else {
			devio_err("--devio %s: bad option '%s' (max-transfer=512..64M, align=1..64K)", arg, opt);
			return -EINVAL;
		}
	}
	return 0;
}

static int start_single(struct stream_state *st)
{
	int rfd = 0, wfd = 1, r;

	st->single = true;
	if (st->addr.kind == DEVIO_ADDR_DEVICE) {
		rfd = open(st->addr.path, O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (rfd < 0) {
			r = -errno;
			devio_err("--devio %s: cannot open: %s", st->addr.path, strerror(-r));
			return r;
		}
		if ((r = device_raw(rfd, st->addr.path))) {
			close(rfd);
			return r;
		}
		wfd = rfd;
	}
	pthread_mutex_lock(&st->lock);
	r = conn_start(st, rfd, wfd, st->addr.kind == DEVIO_ADDR_DEVICE, st->where);
	pthread_mutex_unlock(&st->lock);
	if (r && st->addr.kind == DEVIO_ADDR_DEVICE)
		close(rfd);
	return r;
}

/* A Unix socket is bound and listening under a temporary name, then
 * renamed into place: whoever sees the path can connect at once. */
static int listen_unix_atomic(struct stream_state *st)
{
	struct devio_addr tmp = st->addr;
	struct stat sb;
	int fd, n;

	if (lstat(st->addr.path, &sb) == 0 && !S_ISSOCK(sb.st_mode)) {
		devio_err("--devio %s: %s exists and is not a socket", st->where, st->addr.path);
		return -EEXIST;
	}
	n = snprintf(tmp.path, sizeof(tmp.path), "%s.%d.tmp", st->addr.path, (int)getpid());
	if (n < 0 || (size_t)n >= 108) /* sizeof(sockaddr_un.sun_path) */
		return devio_listen(&st->addr, STREAM_MAX_CONNS);
	fd = devio_listen(&tmp, STREAM_MAX_CONNS);
	if (fd < 0)
		return fd;
	if (rename(tmp.path, st->addr.path)) {
		int r = -errno;

		devio_err("--devio %s: cannot move the socket into place: %s", st->where, strerror(-r));
		unlink(tmp.path);
		close(fd);
		return r;
	}
	return fd;
}

static int start_listener(struct stream_state *st, bool all_interfaces)
{
	int r;

	if (st->addr.kind == DEVIO_ADDR_TCP && !st->addr.host[0] && all_interfaces)
		strcpy(st->addr.host, "*");
	if (st->addr.kind == DEVIO_ADDR_UNIX)
		st->lfd = listen_unix_atomic(st);
	else
		st->lfd = devio_listen(&st->addr, STREAM_MAX_CONNS);
	if (st->lfd < 0)
		return st->lfd;
	if (st->addr.kind == DEVIO_ADDR_TCP && !strcmp(st->addr.host, "*"))
		devio_info("--devio %s: listening on every interface", st->where);
	r = pthread_create(&st->accept_thread, NULL, accept_main, st);
	if (r) {
		close(st->lfd);
		st->lfd = -1;
		return -r;
	}
	st->accepting = true;
	return 0;
}

static void state_free(struct stream_state *st)
{
	if (st->lfd >= 0) {
		close(st->lfd);
		if (st->addr.kind == DEVIO_ADDR_UNIX)
			unlink(st->addr.path); /* ours: created by devio_listen() */
	}
	if (st->stop_pipe[0] >= 0) {
		close(st->stop_pipe[0]);
		close(st->stop_pipe[1]);
	}
	pthread_cond_destroy(&st->idle);
	pthread_mutex_destroy(&st->lock);
	free(st);
}

static int start(struct devio_server *srv, const char *arg, void **state)
{
	/* exports[0] is the default export (frontend.h); looked up directly so
	 * the library does not need the command line's devio_server_export(). */
	struct devio_export *e = srv->n_exports ? &srv->exports[0] : NULL;
	struct stream_state *st;
	int r;

	if (!e)
		return -ENOENT;
	st = calloc(1, sizeof(*st));
	if (!st)
		return -ENOMEM;
	st->b = e->backend;
	st->lfd = -1;
	st->stop_pipe[0] = st->stop_pipe[1] = -1;
	pthread_mutex_init(&st->lock, NULL);
	pthread_cond_init(&st->idle, NULL);
	if ((r = parse_arg(st, arg)))
		goto out_free;
	devio_addr_format(&st->addr, st->where, sizeof(st->where));
	if (pipe2(st->stop_pipe, O_CLOEXEC)) {
		r = -errno;
		goto out_free;
	}
	if (st->b->block_size > 512 && !st->opts.alignment)
		devio_warn("--devio %s: %s needs %u-byte alignment; ImDisk clients refuse more than 512",
			   st->where, e->source, st->b->block_size);
	if (st->addr.kind == DEVIO_ADDR_STDIO || st->addr.kind == DEVIO_ADDR_DEVICE)
		r = start_single(st);
	else
		r = start_listener(st, srv->opts.all_interfaces);
	if (r)
		goto out_free;
	*state = st;
	return 0;
out_free:
	state_free(st);
	return r;
}

static void stop(void *state)
{
	struct stream_state *st = state;
	struct timespec deadline;

	if (!st)
		return;
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += STREAM_STOP_SECONDS;
	pthread_mutex_lock(&st->lock);
	st->stopping = true;
	pthread_mutex_unlock(&st->lock);
	if (write(st->stop_pipe[1], "x", 1) < 0)
		devio_warn("--devio %s: cannot signal stop: %s", st->where, strerror(errno));
	if (st->accepting)
		pthread_join(st->accept_thread, NULL);
	pthread_mutex_lock(&st->lock);
	for (struct stream_conn *c = st->conns; c; c = c->next)
		if (!st->single)
			shutdown(c->rfd, SHUT_RDWR); /* wakes its blocked read */
	while (st->active) {
		/* A stdio/device session blocked writing to a peer that does not
		 * read cannot be woken: give up on it after a while rather than
		 * hang the exit (its thread keeps the state, so it is not freed). */
		if (pthread_cond_timedwait(&st->idle, &st->lock, &deadline) == ETIMEDOUT) {
			devio_warn("--devio %s: %u session(s) did not end; exiting without them", st->where,
				   st->active);
			pthread_mutex_unlock(&st->lock);
			return;
		}
	}
	pthread_mutex_unlock(&st->lock);
	state_free(st);
}

static void status(void *state, FILE *out)
{
	struct stream_state *st = state;

	pthread_mutex_lock(&st->lock);
	fprintf(out, "  devio stream on %s: %u client(s) connected, %llu served, %llu refused, %llu dropped on error\n",
		st->where, st->active, (unsigned long long)st->served, (unsigned long long)st->refused,
		(unsigned long long)st->failed);
	pthread_mutex_unlock(&st->lock);
}

static bool finished(void *state)
{
	struct stream_state *st = state;

	return st->single && atomic_load(&st->finished);
}

const struct devio_frontend_type devio_frontend_stream = {
	.option = "devio",
	.arg_help = "tcp:[HOST:]PORT|unix:PATH|stdio|DEVICE[,max-transfer=N][,align=N]",
	.start = start,
	.stop = stop,
	.status = status,
	.finished = finished,
};
