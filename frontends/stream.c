/* stream.c - the --devio front end: ImDisk's devio stream protocol over
 * TCP, a Unix socket, standard input/output or a serial/character device,
 * and (a devio extension, never offered to ImDisk clients, which cannot
 * speak it) over TLS: --devio tls:HOST:PORT runs a TLS handshake with the
 * NBD front end's credentials (--tls-certificates, --tls-psk, lib/tls.c)
 * before the first request, and every byte after it goes through TLS.
 *
 * One thread per connection (at most STREAM_MAX_CONNS; extras are accepted
 * and closed at once), one request outstanding per connection as the
 * protocol defines, each request run with devio_execute() on the default
 * export.  devio_stream_session() is the whole server side of the
 * protocol on a pair of file descriptors; the layouts, encoders and checks
 * both ends share are lib/devio_codec.c (include/devio/protocol.h), the
 * accept loop lib/listener.c.  The wire format and the choices for bad
 * input are in docs/devio-protocol.md.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include "devio/frontend.h"
#include "devio/listener.h"
#include "devio/protocol.h"
#include "devio/stream.h"
#include "devio/tls.h"
#include "devio/util.h"

#define STREAM_MAX_CONNS 64
#define STREAM_RDBUF 65536
/* How long stream_stop() waits for a stdio/device session to end. */
#define STREAM_STOP_SECONDS 10
/* How long stream_stop() lets socket sessions finish the request they are in. */
#define STREAM_STOP_GRACE_MS 2000
/* A connection keeps a data buffer up to this size between requests. */
#define STREAM_KEEP_BUF (4u << 20)

/* ---- buffered input: one read() usually brings a header and payload ---- */

struct stream_in {
	int fd;
	int stop_fd;
	struct devio_tls *tls; /* tls: every byte comes through it */
	bool between;     /* reading the next request's code: an idle client may wait */
	size_t pos, len;
	char buf[STREAM_RDBUF];
};

static int stream_in_wait(struct stream_in *in)
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

static ssize_t stream_in_raw(struct stream_in *in, void *dst, size_t n)
{
	for (;;) {
		ssize_t r;
		int w = stream_in_wait(in);

		if (w)
			return w;
		if (in->tls) {
			r = devio_tls_recv(in->tls, dst, n, false);
			/* -ETIMEDOUT: SO_RCVTIMEO, as EAGAIN below */
			if (r == -ETIMEDOUT && devio_listener_conn_wait_more(in->between))
				continue;
			return r == -ECONNRESET ? 0 : r; /* no close_notify: EOF all the same */
		}
		r = read(in->fd, dst, n);
		if (r < 0 && errno == EINTR)
			continue;
		/* the socket's receive timeout (a listener's --idle/--stall-timeout) */
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && devio_listener_conn_wait_more(in->between))
			continue;
		if (r < 0)
			return -errno;
		return r;
	}
}

/* Exactly n bytes; -ECONNRESET on EOF.  *got tells how many arrived
 * before an error, so a clean EOF between requests can be told apart. */
static int stream_in_read(struct stream_in *in, void *dst, size_t n, size_t *got)
{
	char *d = dst;
	size_t done = 0;

	while (done < n) {
		ssize_t r;

		if (done)
			in->between = false;
		if (in->pos < in->len) {
			size_t k = in->len - in->pos < n - done ? in->len - in->pos : n - done;
			memcpy(d + done, in->buf + in->pos, k);
			in->pos += k;
			done += k;
			continue;
		}
		if (n - done >= sizeof(in->buf))
			r = stream_in_raw(in, d + done, n - done); /* large payload: straight in */
		else
			r = stream_in_raw(in, in->buf, sizeof(in->buf));
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

static int stream_in_discard(struct stream_in *in, uint64_t n)
{
	char scratch[4096];

	while (n) {
		size_t k = n < sizeof(scratch) ? (size_t)n : sizeof(scratch);
		int r = stream_in_read(in, scratch, k, NULL);
		if (r)
			return r;
		n -= k;
	}
	return 0;
}

/* ---- output: header and data in one writev() ---- */

struct stream_out {
	int fd;
	struct devio_tls *tls; /* tls: every byte goes through it */
};

static int stream_out_writev(const struct stream_out *out, struct iovec *iov, int cnt)
{
	int fd = out->fd;
	struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)cnt };

	if (out->tls)
		return devio_tls_writev(out->tls, iov, cnt);

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
static int stream_out_words(const struct stream_out *out, const uint64_t *v, int n)
{
	uint8_t hdr[8 * 8];
	struct iovec iov = { hdr, (size_t)n * 8 };

	for (int i = 0; i < n; i++)
		devio_put_le64(hdr + 8 * i, v[i]);
	return stream_out_writev(out, &iov, 1);
}

/* ---- one session ---- */

struct session {
	struct devio_backend *b;
	struct stream_in *in;
	struct stream_out out;
	uint32_t max_transfer;
	uint32_t alignment;
	bool enforce_alignment;
	const char *name;
	void *buf;
	size_t buflen;
};

/* Grow the data buffer to at least n bytes (n is already bounded). */
static int stream_session_buf(struct session *s, size_t n)
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
static int stream_session_exec(struct session *s, enum devio_op op, uint64_t off, uint64_t len, void *buf)
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
static int stream_check_aligned(struct session *s, const char *what, uint64_t off, uint64_t len)
{
	if (!s->enforce_alignment || (off % s->alignment == 0 && len % s->alignment == 0))
		return 0;
	devio_warn("%s: %s at %llu of %llu bytes: not aligned to %u bytes", s->name, what,
		   (unsigned long long)off, (unsigned long long)len, s->alignment);
	return -EINVAL;
}

/* An answer of error + length (READ data, if any, in the same call). */
static int stream_out_answer(struct session *s, int result, uint64_t length, const void *data)
{
	uint8_t hdr[DEVIO_ANSWER_SIZE];
	struct iovec iov[2] = { { hdr, sizeof(hdr) }, { (void *)data, (size_t)length } };

	devio_proto_encode_answer(hdr, result, length);
	return stream_out_writev(&s->out, iov, data && length ? 2 : 1);
}

static int stream_out_errno(struct session *s, int result)
{
	uint64_t v = devio_proto_wire_errno(result);

	return stream_out_words(&s->out, &v, 1);
}

static int stream_do_info(struct session *s)
{
	struct devio_info i = { .file_size = s->b->size, .req_alignment = s->alignment,
				.flags = devio_proto_info_flags(s->b) };
	uint8_t out[DEVIO_INFO_SIZE];
	struct iovec iov = { out, sizeof(out) };

	devio_proto_encode_info(out, &i);
	return stream_out_writev(&s->out, &iov, 1);
}

/* A READ longer than max_transfer, as ImDisk's devio serves it (its
 * driver sets no maximum transfer): the answer says the whole length, the
 * data follows in pieces through the one bounded buffer.  An error after
 * the first piece cannot be told any more: the connection is dropped. */
static int stream_read_pieces(struct session *s, uint64_t off, uint64_t len)
{
	uint64_t done = 0;
	int r = stream_session_buf(s, s->max_transfer);

	while (!r && done < len) {
		uint64_t n = len - done < s->max_transfer ? len - done : s->max_transfer;
		struct iovec iov = { s->buf, (size_t)n };

		r = stream_session_exec(s, DEVIO_OP_READ, off + done, n, s->buf);
		if (r && done == 0)
			return stream_out_answer(s, r, 0, NULL);
		if (r) {
			devio_warn("%s: READ at %llu of %llu bytes: %s after %llu bytes; closing", s->name,
				   (unsigned long long)off, (unsigned long long)len, strerror(-r),
				   (unsigned long long)done);
			return -EIO;
		}
		if (done == 0 && (r = stream_out_answer(s, 0, len, NULL)))
			return r;
		r = stream_out_writev(&s->out, &iov, 1);
		done += n;
	}
	return r;
}

static int stream_do_read(struct session *s, const struct devio_proto_req *rq)
{
	uint64_t off = rq->offset, len = rq->length;
	int r;

	if ((r = stream_check_aligned(s, "READ", off, len))) {
		/* logged */
	} else if (off > s->b->size) {
		devio_warn("%s: READ at %llu: beyond the end (%llu)", s->name,
			   (unsigned long long)off, (unsigned long long)s->b->size);
		r = -EINVAL;
	} else {
		/* Short read at the end of the image, as the protocol allows. */
		if (len > s->b->size - off)
			len = s->b->size - off;
		if (len > s->max_transfer)
			return stream_read_pieces(s, off, len);
		r = stream_session_buf(s, len);
		if (!r)
			r = stream_session_exec(s, DEVIO_OP_READ, off, len, s->buf);
		if (r)
			devio_warn("%s: READ at %llu of %llu bytes: %s", s->name, (unsigned long long)off,
				   (unsigned long long)len, strerror(-r));
	}
	return stream_out_answer(s, r, r ? 0 : len, s->buf);
}

static int stream_do_write(struct session *s, const struct devio_proto_req *rq)
{
	uint64_t off = rq->offset, len = rq->length;
	int r, err;

	if (len > s->max_transfer) {
		/* The payload cannot be consumed without trusting the length:
		 * answer, then drop the connection (the stream is lost). */
		devio_warn("%s: WRITE at %llu of %llu bytes: over the %u-byte limit; closing",
			   s->name, (unsigned long long)off, (unsigned long long)len, s->max_transfer);
		stream_out_answer(s, -E2BIG, 0, NULL);
		return -EPROTO;
	}
	if ((err = stream_check_aligned(s, "WRITE", off, len)) || (err = stream_session_buf(s, len))) {
		/* Misaligned, or no memory: still consume, keep the stream. */
		if ((r = stream_in_discard(s->in, len)))
			return r;
		r = err;
	} else {
		if ((r = stream_in_read(s->in, s->buf, len, NULL)))
			return r;
		r = stream_session_exec(s, DEVIO_OP_WRITE, off, len, s->buf);
	}
	if (r && r != -EINVAL)
		devio_warn("%s: WRITE at %llu of %llu bytes: %s", s->name, (unsigned long long)off,
			   (unsigned long long)len, strerror(-r));
	return stream_out_answer(s, r, r ? 0 : len, NULL);
}

/* Check every range before running any; 0 or -errno (logged). */
static int stream_ranges_check(struct session *s, const char *what, uint64_t len)
{
	uint64_t off, n;

	if (len % DEVIO_RANGE_SIZE) {
		devio_warn("%s: %s: range array of %llu bytes is not a multiple of %u", s->name, what,
			   (unsigned long long)len, DEVIO_RANGE_SIZE);
		return -EINVAL;
	}
	if (s->b->caps & DEVIO_CAP_READONLY)
		return -EROFS;
	for (uint64_t i = 0; i < len; i += DEVIO_RANGE_SIZE) {
		if (devio_proto_decode_range((uint8_t *)s->buf + i, s->b->size, &off, &n)) {
			devio_warn("%s: %s range at %lld of %llu bytes: outside the export (%llu bytes)",
				   s->name, what, (long long)off, (unsigned long long)n,
				   (unsigned long long)s->b->size);
			return -EINVAL;
		}
	}
	return 0;
}

static int stream_do_ranges(struct session *s, const struct devio_proto_req *rq)
{
	enum devio_op op = rq->code == DEVIO_REQ_UNMAP ? DEVIO_OP_TRIM : DEVIO_OP_ZERO;
	const char *what = rq->code == DEVIO_REQ_UNMAP ? "UNMAP" : "ZERO";
	uint64_t len = rq->length, off, n;
	int r;

	if (len > DEVIO_MAX_RANGES_BYTES) {
		devio_warn("%s: %s with %llu bytes of ranges: over the %u-byte limit; closing", s->name,
			   what, (unsigned long long)len, DEVIO_MAX_RANGES_BYTES);
		stream_out_errno(s, -E2BIG);
		return -EPROTO;
	}
	if ((r = stream_session_buf(s, len))) {
		/* no memory for the ranges: consume them, answer, keep the stream */
		if ((r = stream_in_discard(s->in, len)))
			return r;
		return stream_out_errno(s, -ENOMEM);
	}
	if ((r = stream_in_read(s->in, s->buf, len, NULL)))
		return r;
	r = stream_ranges_check(s, what, len);
	for (uint64_t i = 0; !r && i < len; i += DEVIO_RANGE_SIZE) {
		devio_proto_decode_range((uint8_t *)s->buf + i, s->b->size, &off, &n);
		if (n && (r = stream_session_exec(s, op, off, n, NULL)))
			devio_warn("%s: %s at %llu of %llu bytes: %s", s->name, what,
				   (unsigned long long)off, (unsigned long long)n, strerror(-r));
	}
	return stream_out_errno(s, r);
}

/* CONNECT and SCSI carry data this server consumes and refuses (a
 * connection elsewhere is not ours to open; SCSI is not offered: no
 * SUPPORTS_SCSI flag); more than limit bytes of it close the connection. */
static int stream_do_refuse_data(struct session *s, const struct devio_proto_req *rq, uint64_t limit, int err)
{
	const char *what = rq->code == DEVIO_REQ_CONNECT ? "CONNECT" : "SCSI";
	int r;

	if (rq->length > limit) {
		devio_warn("%s: %s with %llu bytes of data: over the limit; closing", s->name, what,
			   (unsigned long long)rq->length);
		stream_out_answer(s, err, 0, NULL);
		return -EPROTO;
	}
	if ((r = stream_in_discard(s->in, rq->length)))
		return r;
	devio_debug("%s: %s refused (this server only serves its own export)", s->name, what);
	return stream_out_answer(s, err, 0, NULL);
}

/* SHARED reservations are not offered: errno, no unique id, no keys. */
static int stream_do_shared(struct session *s)
{
	uint8_t resp[DEVIO_SHARED_ANSWER_SIZE] = { 0 };
	struct iovec iov = { resp, sizeof(resp) };

	devio_put_le64(resp, ENODEV);
	return stream_out_writev(&s->out, &iov, 1);
}

static int stream_session_request(struct session *s, uint64_t code)
{
	uint8_t hdr[DEVIO_MAX_REQ_HDR];
	struct devio_proto_req rq;
	int r;

	if ((r = stream_in_read(s->in, hdr, devio_proto_req_hdr_size(code), NULL)))
		return r;
	devio_proto_decode_req(code, hdr, &rq);
	switch (code) {
	case DEVIO_REQ_INFO: return stream_do_info(s);
	case DEVIO_REQ_READ: return stream_do_read(s, &rq);
	case DEVIO_REQ_WRITE: return stream_do_write(s, &rq);
	case DEVIO_REQ_CONNECT: return stream_do_refuse_data(s, &rq, DEVIO_MAX_CONNECT_BYTES, -EOPNOTSUPP);
	case DEVIO_REQ_UNMAP:
	case DEVIO_REQ_ZERO: return stream_do_ranges(s, &rq);
	case DEVIO_REQ_SCSI: return stream_do_refuse_data(s, &rq, DEVIO_MAX_SCSI_BYTES, -ENODEV);
	case DEVIO_REQ_SHARED: return stream_do_shared(s);
	default:
		devio_debug("%s: unknown request code %llu: answered ENODEV", s->name, (unsigned long long)code);
		return stream_out_errno(s, -ENODEV);
	}
}

int devio_stream_session(struct devio_backend *b, int rfd, int wfd, const struct devio_stream_opts *opts)
{
	struct session s = { .b = b, .out = { wfd, opts ? opts->tls : NULL },
			     .name = opts && opts->name ? opts->name : "devio" };
	uint8_t word[8];
	int r;

	s.in = malloc(sizeof(*s.in));
	if (!s.in)
		return -ENOMEM;
	s.in->fd = rfd;
	s.in->stop_fd = opts ? opts->stop_fd : -1;
	s.in->tls = opts ? opts->tls : NULL;
	s.in->pos = s.in->len = 0;
	s.max_transfer = opts && opts->max_transfer && opts->max_transfer < DEVIO_MAX_TRANSFER
				 ? opts->max_transfer : DEVIO_MAX_TRANSFER;
	s.alignment = opts && opts->alignment ? opts->alignment : (b->block_size ? b->block_size : 1);
	s.enforce_alignment = opts && opts->alignment > 1;
	for (bool first = true;; first = false) {
		size_t got = 0;
		uint64_t code;

		s.in->between = true;
		r = stream_in_read(s.in, word, sizeof(word), &got);
		s.in->between = false;
		if (r == -ECONNRESET && got == 0) {
			r = 0; /* EOF between requests: the peer is done */
			break;
		}
		if (r)
			break;
		code = devio_get_le64(word);
		if (code == DEVIO_REQ_CLOSE)
			break;
		if ((r = stream_session_request(&s, code)))
			break;
		if (first) /* a listener's connection: the handshake deadline ends */
			devio_listener_conn_ready();
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

/* ---- the front end: connections, stopping ---- */

struct stream_state {
	struct devio_backend *b;
	struct devio_addr addr;
	char where[300];
	char name[320];             /* "--devio WHERE" */
	struct devio_stream_opts opts;
	struct devio_listener *listener; /* TCP, Unix: lib/listener.c */
	bool tls;                        /* tls:HOST:PORT (addr is its tcp:) */
	struct devio_tls_creds *tls_creds;
	atomic_uint_fast64_t failed;     /* sessions dropped on an error */
	/* stdio or a device: one session on its own (detached) thread */
	bool single;
	int single_rfd, single_wfd;
	int stop_pipe[2];
	pthread_mutex_t lock;
	pthread_cond_t idle;
	bool single_active;
	atomic_bool finished;
};

/* One session, logged at its start and end. */
static void stream_run(struct stream_state *st, int rfd, int wfd, const char *name, int stop_fd,
		       struct devio_tls *tls)
{
	struct devio_stream_opts o = st->opts;
	int r;

	o.name = name;
	o.stop_fd = stop_fd;
	o.tls = tls;
	devio_info("%s: client connected", name);
	r = devio_stream_session(st->b, rfd, wfd, &o);
	if (r && r != -ECANCELED) {
		devio_info("%s: connection closed: %s", name, strerror(-r));
		atomic_fetch_add(&st->failed, 1);
	} else {
		devio_info("%s: session ended", name);
	}
}

/* tls:: the handshake first (within the listener's handshake deadline,
 * which also covers the first request), then the session through it.  A
 * refused handshake (a plaintext client, a wrong key or certificate) is
 * logged by lib/tls.c and counted as a session dropped on an error. */
static void stream_serve_tls(struct stream_state *st, int fd, const char *name)
{
	struct devio_tls *t;
	int r = devio_tls_handshake(st->tls_creds, fd, true, NULL, name, 0, &t);

	if (r) {
		atomic_fetch_add(&st->failed, 1); /* lib/tls.c said why */
		return;
	}
	stream_run(st, fd, fd, name, -1, t);
	devio_tls_bye(t);
}

/* A socket connection, on the listener's thread for it. */
static void stream_serve(void *ctx, int fd, uint64_t id)
{
	struct stream_state *st = ctx;
	char name[400];

	snprintf(name, sizeof(name), "%s client %llu", st->name, (unsigned long long)id);
	if (st->tls) {
		stream_serve_tls(st, fd, name);
		return;
	}
	stream_run(st, fd, fd, name, -1, NULL);
}

static void *stream_single_main(void *arg)
{
	struct stream_state *st = arg;

	stream_run(st, st->single_rfd, st->single_wfd, st->where, st->stop_pipe[0], NULL);
	pthread_mutex_lock(&st->lock);
	if (st->addr.kind == DEVIO_ADDR_DEVICE)
		close(st->single_rfd);
	st->single_active = false;
	atomic_store(&st->finished, true);
	pthread_cond_broadcast(&st->idle);
	pthread_mutex_unlock(&st->lock);
	return NULL;
}

/* Raw mode for a serial line: bytes pass unchanged. */
static int stream_device_raw(int fd, const char *path)
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

/* "ADDR[,max-transfer=N][,align=N]"; tls:[HOST:]PORT is parsed as its tcp: */
static int stream_parse_arg(struct stream_state *st, const char *arg)
{
	char buf[512], *opt, *save = NULL;
	uint64_t v;
	int r;

	if (!arg || strlen(arg) >= sizeof(buf))
		return -EINVAL;
	strcpy(buf, arg);
	opt = strchr(buf, ',');
	if (opt)
		*opt++ = '\0';
	st->tls = !strncmp(buf, "tls:", 4);
	if (st->tls)
		memcpy(buf, "tcp:", 4);
	if ((r = devio_addr_parse(buf, NULL, &st->addr))) {
		if (r == -ERANGE)
			devio_err("--devio %s: port out of range (want 0..65535; 0: any free port)", arg);
		else
			devio_err("--devio %s: want tcp:[HOST:]PORT, tls:[HOST:]PORT, unix:PATH, systemd[:NAME], stdio "
				  "or a device path", arg);
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

static int stream_check(const char *arg)
{
	struct stream_state *st = calloc(1, sizeof(*st));
	int r = st ? stream_parse_arg(st, arg) : 0;

	free(st);
	return r;
}

static int stream_start_single(struct stream_state *st)
{
	pthread_attr_t attr;
	pthread_t t;
	int rfd = 0, wfd = 1, r;

	st->single = true;
	if (st->addr.kind == DEVIO_ADDR_DEVICE) {
		rfd = open(st->addr.path, O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (rfd < 0) {
			r = -errno;
			devio_err("--devio %s: cannot open: %s", st->addr.path, strerror(-r));
			return r;
		}
		if ((r = stream_device_raw(rfd, st->addr.path))) {
			close(rfd);
			return r;
		}
		wfd = rfd;
	} else if ((fcntl(0, F_GETFL) & O_ACCMODE) == O_RDWR) {
		/* stdin open both ways (an inetd-style socket, a tty):
		 * answers go back on it, as ImDisk's devio sends them */
		wfd = 0;
	}
	if (pipe2(st->stop_pipe, O_CLOEXEC)) {
		r = -errno;
		goto out_close;
	}
	st->single_rfd = rfd;
	st->single_wfd = wfd;
	st->single_active = true;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	r = -pthread_create(&t, &attr, stream_single_main, st);
	pthread_attr_destroy(&attr);
	if (!r)
		return 0;
	st->single_active = false;
out_close:
	if (st->addr.kind == DEVIO_ADDR_DEVICE)
		close(rfd);
	return r;
}

/* A TCP host that only this machine reaches ("" binds loopback). */
static bool stream_loopback(const char *host)
{
	struct in_addr a4;
	struct in6_addr a6;

	if (!host[0] || !strcmp(host, "localhost"))
		return true;
	if (inet_pton(AF_INET, host, &a4) == 1)
		return (ntohl(a4.s_addr) >> 24) == 127;
	return inet_pton(AF_INET6, host, &a6) == 1 && IN6_IS_ADDR_LOOPBACK(&a6);
}

/* The --devio front end's options (stream_options below).  listen comes
 * first: the shm: variant reads it (frontends/shm.c). */
struct stream_fe_opts {
	struct devio_listen_opts listen; /* --allow, --socket-mode, timeouts: lib/listener.c */
	struct devio_tls_conf tls_conf;  /* tls:: --tls-certificates, --tls-psk, ... (the NBD front end's too) */
};

_Static_assert(offsetof(struct stream_fe_opts, listen) == 0, "frontends/shm.c reads the listen options at offset 0");

/* tls:: the credentials, loaded before the port opens.  0 or -errno (logged). */
static int stream_tls_setup(struct stream_state *st, const struct stream_fe_opts *o)
{
	static const struct devio_tls_conf none;
	int r;

	if (!st->tls)
		return 0;
	if ((r = devio_tls_creds_new(o ? &o->tls_conf : &none, true, &st->tls_creds))) {
		devio_err("--devio %s: TLS needs --tls-certificates DIR or --tls-psk FILE (docs/security.md)",
			  st->where);
		return r;
	}
	devio_info("--devio %s: TLS required before the first request (%s, %s): a devio extension for devio's own "
		   "client (devio+tls://); ImDisk clients cannot connect", st->where,
		   devio_tls_creds_kind(st->tls_creds), devio_tls_ktls_state());
	return 0;
}

static int stream_start_listener(struct stream_state *st, const struct stream_fe_opts *o)
{
	struct devio_listener_conf conf = { .name = st->name, .max_conns = STREAM_MAX_CONNS,
					    .grace_ms = STREAM_STOP_GRACE_MS, .opts = o ? &o->listen : NULL,
					    .serve = stream_serve, .ctx = st };
	int r;

	if ((r = stream_tls_setup(st, o)))
		return r;
	if (st->addr.kind == DEVIO_ADDR_TCP && !strcmp(st->addr.host, "*"))
		devio_info("--devio %s: listening on every interface", st->where);
	if (st->addr.kind == DEVIO_ADDR_TCP && !st->tls && !stream_loopback(st->addr.host))
		devio_warn("--devio %s: the devio protocol has no encryption and no authentication, and ImDisk "
			   "clients cannot speak TLS: the disk is reachable unencrypted and whoever reaches this "
			   "address reads and writes it%s (--devio tls: serves devio+tls:// clients encrypted; "
			   "docs/security.md)", st->where, o && o->listen.n_allow ? "" : "; --allow narrows who");
	return devio_listener_start(&st->addr, &conf, &st->listener);
}

/* The address as given: tls: for a TLS listener's tcp: address. */
static void stream_format_addr(const struct stream_state *st, const struct devio_addr *a, char *out, size_t outlen)
{
	devio_addr_format(a, out, outlen);
	if (st->tls && outlen > 4 && !strncmp(out, "tcp:", 4))
		memcpy(out, "tls:", 4);
}

static void stream_state_free(struct stream_state *st)
{
	devio_tls_creds_free(st->tls_creds);
	if (st->stop_pipe[0] >= 0) {
		close(st->stop_pipe[0]);
		close(st->stop_pipe[1]);
	}
	pthread_cond_destroy(&st->idle);
	pthread_mutex_destroy(&st->lock);
	free(st);
}

static int stream_start(struct devio_server *srv, const char *arg, const void *opts, void **state)
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
	st->stop_pipe[0] = st->stop_pipe[1] = -1;
	pthread_mutex_init(&st->lock, NULL);
	pthread_cond_init(&st->idle, NULL);
	if ((r = stream_parse_arg(st, arg)))
		goto out_free;
	stream_format_addr(st, &st->addr, st->where, sizeof(st->where));
	snprintf(st->name, sizeof(st->name), "--devio %s", st->where);
	if (st->b->block_size > 512 && !st->opts.alignment)
		devio_warn("--devio %s: %s needs %u-byte alignment; ImDisk clients refuse more than 512",
			   st->where, e->source, st->b->block_size);
	if (st->addr.kind == DEVIO_ADDR_STDIO || st->addr.kind == DEVIO_ADDR_DEVICE)
		r = stream_start_single(st);
	else
		r = stream_start_listener(st, opts);
	if (r)
		goto out_free;
	*state = st;
	return 0;
out_free:
	stream_state_free(st);
	return r;
}

/* A stdio/device session blocked writing to a peer that does not read
 * cannot be woken: give up on it after a while rather than hang the exit
 * (its thread keeps the state, so it is not freed). */
static void stream_stop_single(struct stream_state *st)
{
	struct timespec deadline;

	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += STREAM_STOP_SECONDS;
	if (write(st->stop_pipe[1], "x", 1) < 0)
		devio_warn("%s: cannot signal stop: %s", st->name, strerror(errno));
	pthread_mutex_lock(&st->lock);
	while (st->single_active) {
		if (pthread_cond_timedwait(&st->idle, &st->lock, &deadline) == ETIMEDOUT) {
			devio_warn("%s: the session did not end; exiting without it", st->name);
			pthread_mutex_unlock(&st->lock);
			return;
		}
	}
	pthread_mutex_unlock(&st->lock);
	stream_state_free(st);
}

static void stream_stop(void *state)
{
	struct stream_state *st = state;

	if (!st)
		return;
	if (st->single) {
		stream_stop_single(st);
		return;
	}
	devio_listener_stop(st->listener);
	stream_state_free(st);
}

/* The listener's counters; a single connection (stdio, a device) has no
 * listener: one client, served or being served. */
static void stream_listener_stats(struct stream_state *st, struct devio_listener_stats *ls)
{
	if (st->listener) {
		devio_listener_stats(st->listener, ls);
		return;
	}
	pthread_mutex_lock(&st->lock);
	ls->active = st->single_active;
	ls->served = 1;
	pthread_mutex_unlock(&st->lock);
}

static void stream_status(void *state, FILE *out)
{
	struct stream_state *st = state;
	struct devio_listener_stats ls = { 0 };

	stream_listener_stats(st, &ls);
	fprintf(out, "  devio stream on %s: %u client(s) connected, %llu served, %llu refused, %llu dropped on error, "
		"%llu by timeouts\n", st->where, ls.active, (unsigned long long)ls.served, (unsigned long long)ls.refused,
		(unsigned long long)atomic_load(&st->failed), (unsigned long long)ls.timed_out);
}

static void stream_info(void *state, struct devio_frontend_info *info)
{
	struct stream_state *st = state;
	struct devio_listener_stats ls = { 0 };
	struct devio_addr a = st->addr;

	stream_listener_stats(st, &ls);
	if (a.kind == DEVIO_ADDR_TCP && ls.port) /* tcp:0: the port picked */
		snprintf(a.port, sizeof(a.port), "%u", ls.port);
	stream_format_addr(st, &a, info->address, sizeof(info->address));
	info->connections = ls.active;
	info->served = ls.served;
}

static bool stream_finished(void *state)
{
	struct stream_state *st = state;

	return st->single && atomic_load(&st->finished);
}

/* --devio shm:NAME is the same protocol in shared memory (frontends/shm.c). */
static const struct devio_frontend_type *stream_variant(const char *arg)
{
	return arg && !strncmp(arg, "shm:", 4) ? &devio_frontend_shm : NULL;
}

/* The TLS credential options serve tls: addresses only. */
static bool stream_uses(const char *arg, const char *name)
{
	return strncmp(name, "tls-", 4) || (arg && !strncmp(arg, "tls:", 4));
}

static const struct devio_frontend_option stream_options[] = {
	DEVIO_LISTEN_OPTIONS(offsetof(struct stream_fe_opts, listen)),
	DEVIO_TLS_OPTIONS(offsetof(struct stream_fe_opts, tls_conf), "tls:: "),
	{ NULL },
};

const struct devio_frontend_type devio_frontend_stream = {
	.option = "devio",
	.arg_help = "tcp:[HOST:]PORT|tls:[HOST:]PORT|unix:PATH|systemd[:NAME]|stdio|DEVICE[,max-transfer=N][,align=N]|shm:NAME[,slots=N][,buffer=N]",
	.help = "devio stream protocol (ImDisk proxy)",
	.options = stream_options,
	.opts_size = sizeof(struct stream_fe_opts),
	.start = stream_start,
	.stop = stream_stop,
	.status = stream_status,
	.info = stream_info,
	.check = stream_check,
	.finished = stream_finished,
	.variant = stream_variant,
	.uses = stream_uses,
};
