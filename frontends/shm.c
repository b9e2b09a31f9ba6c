/* shm.c - the --devio shm:NAME front end: the devio protocol in shared
 * memory, with many requests in flight (layout in include/devio/shm.h,
 * docs/shm.md).
 *
 * A client connects to a Unix socket (0600) and receives, with
 * SCM_RIGHTS, a sealed memfd of its own and two eventfd doorbells.  One
 * thread per client takes tags from the submission ring, decodes each
 * slot's ImDisk header (every field loaded once into a local, then
 * checked), starts the request through the core (devio_submit, or the
 * worker pool where devio_wants_pool says so) with its buffer in the slot
 * itself, and completions write the answer and push the tag to the
 * completion ring.  A doorbell is rung only when the other side said it is
 * going to sleep, so a busy ring runs without system calls.  A client that
 * breaks the ring (a tag out of range or already in flight, a tail that
 * runs ahead) is dropped; a socket EOF or hang-up ends its session, and
 * the region is freed once the requests it had in flight have finished.
 *
 * Limits (the --devio listener options, docs/shm.md): --max-connections
 * (default 16; more get an EBUSY hello); --handshake-timeout (default
 * 10 s): a client that has not submitted a first request by then is
 * dropped (devio+shm:// submits one at once); --idle-timeout: one that
 * submits nothing that long while nothing of its is in flight.  There is
 * no stall timeout: the server never waits for a client (answers go into
 * the region), so a client that stops taking them holds only its own
 * slots.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include "devio/frontend.h"
#include "devio/listener.h"
#include "devio/protocol.h"
#include "devio/shm.h"
#include "devio/util.h"
#include "devio/workers.h"

#define SHM_MAX_CLIENTS 16
/* A completion that moved this much is announced at once, even inside a
 * batch: the client copies it out while we run the next request (a
 * doorbell costs far less than copying it). */
#define SHM_BELL_NOW_BYTES (64u << 10)
#define SHM_RUN_DIR "/run/devio"

/* ---- where the socket lives ---- */

static int shm_mkdir(const char *path, mode_t mode)
{
	if (mkdir(path, mode) && errno != EEXIST)
		return -errno;
	return 0;
}

int devio_shm_socket_path(const char *name, bool create, char *out, size_t outlen)
{
	const char *xdg = getenv("XDG_RUNTIME_DIR");
	char base[200];
	int n;

	if (!name || !name[0])
		return -EINVAL;
	if (name[0] == '/') {
		n = snprintf(out, outlen, "%s", name);
		return n < 0 || (size_t)n >= outlen || (size_t)n >= sizeof(((struct sockaddr_un *)0)->sun_path)
			       ? -ENAMETOOLONG : 0;
	}
	if (strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, ".."))
		return -EINVAL;
	if (geteuid() == 0 || !xdg || xdg[0] != '/')
		snprintf(base, sizeof(base), SHM_RUN_DIR);
	else if ((size_t)snprintf(base, sizeof(base), "%s/devio", xdg) >= sizeof(base))
		return -ENAMETOOLONG;
	n = snprintf(out, outlen, "%s/shm/%s", base, name);
	if (n < 0 || (size_t)n >= outlen || (size_t)n >= sizeof(((struct sockaddr_un *)0)->sun_path))
		return -ENAMETOOLONG;
	if (create) {
		char dir[260];
		int r;

		snprintf(dir, sizeof(dir), "%s/shm", base);
		if ((r = shm_mkdir(base, 0755)) || (r = shm_mkdir(dir, 0700)))
			return r;
	}
	return 0;
}

/* ---- one client's region ---- */

struct shm_session;

struct shm_slot {
	struct devio_request req;
	struct shm_session *s;
	uint32_t tag;
	atomic_bool busy;   /* the server has it: a second submission is a protocol error */
	uint64_t code;
	uint64_t len;       /* bytes a successful READ/WRITE answers */
};

struct shm_session {
	struct shm_state *st;          /* NULL when driven by devio_shm_serve_region() */
	struct devio_backend *b;
	struct devio_workers *workers; /* NULL: devio_submit on this thread */
	uint8_t *region, *ctl;
	uint64_t size;
	uint32_t nslots, data_size, cap;
	int sock, req_efd, resp_efd;
	char name[360];
	pthread_t thread;
	bool batching;                 /* the session thread is taking a batch */
	bool bell_owed;                /* a completion in the batch wants the doorbell */
	uint32_t sq_head;              /* private: the client cannot move it */
	pthread_mutex_t lock;          /* cq_tail, inflight */
	pthread_cond_t idle;
	uint32_t cq_tail;
	unsigned inflight;
	uint64_t n_req, n_wake;         /* requests taken, request doorbells heard (session thread) */
	uint64_t start_ns, last_req_ns; /* connected, last request taken (session thread) */
	atomic_uint_fast64_t n_bell;    /* answer doorbells rung */
	struct shm_session *next;
	struct shm_slot slots[];
};

static uint8_t *shm_slot_hdr(struct shm_session *s, uint32_t tag)
{
	return s->region + (uint64_t)tag * devio_shm_slot_size(s->data_size);
}

/* The answer doorbell, if the client said it sleeps.  The fence orders our
 * ring update before reading its flag (it orders its flag before reading
 * our tail), so one of us sees the other. */
static void shm_bell(struct shm_session *s)
{
	uint64_t one = 1;

	atomic_thread_fence(memory_order_seq_cst);
	if (s->resp_efd < 0 || !devio_shm_take_wake(s->ctl + DEVIO_SHM_CTL_CQ_WAKE))
		return;
	atomic_fetch_add_explicit(&s->n_bell, 1, memory_order_relaxed);
	if (write(s->resp_efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		devio_debug("%s: doorbell: %s", s->name, strerror(errno));
}

/* Write the answer into the slot header and hand the tag back. */
static void shm_finish(struct shm_slot *sl, int r, uint64_t len)
{
	struct shm_session *s = sl->s;
	uint8_t *h = shm_slot_hdr(s, sl->tag);
	bool ring;

	if (sl->code != DEVIO_REQ_INFO) /* INFO's three words are already there */
		devio_shm_put64(h, r < 0 ? (uint64_t)-r : 0);
	if (sl->code == DEVIO_REQ_READ || sl->code == DEVIO_REQ_WRITE)
		devio_shm_put64(h + 8, r ? 0 : len);
	pthread_mutex_lock(&s->lock);
	devio_shm_put32(s->ctl + DEVIO_SHM_CTL_RINGS + 4u * (s->cap + (s->cq_tail & (s->cap - 1))), sl->tag,
			__ATOMIC_RELAXED);
	s->cq_tail++;
	atomic_store(&sl->busy, false);
	devio_shm_put32(s->ctl + DEVIO_SHM_CTL_CQ_TAIL, s->cq_tail, __ATOMIC_RELEASE);
	ring = !(s->batching && pthread_equal(pthread_self(), s->thread)) || len >= SHM_BELL_NOW_BYTES;
	if (!ring)
		s->bell_owed = true;
	else /* before the count: once it is 0 the session may be freed */
		shm_bell(s);
	if (--s->inflight == 0)
		pthread_cond_broadcast(&s->idle);
	pthread_mutex_unlock(&s->lock);
}

static void shm_complete(struct devio_request *req)
{
	struct shm_slot *sl = req->opaque;

	if (req->result)
		devio_debug("%s: %s at %llu of %llu bytes: %s", sl->s->name, devio_op_name(req->op),
			    (unsigned long long)req->offset, (unsigned long long)req->length,
			    strerror(-req->result));
	shm_finish(sl, req->result, sl->len);
}

/* UNMAP/ZERO with several ranges: copied out of the region once, all
 * checked, then run one after another on this thread. */
static int shm_ranges(struct shm_session *s, enum devio_op op, const uint8_t *data, uint64_t len)
{
	uint8_t *copy = malloc(len ? len : 1);
	int r = 0;

	if (!copy)
		return -ENOMEM;
	for (uint64_t i = 0; i < len; i += 8)
		devio_shm_put64(copy + i, devio_shm_get64(data + i));
	for (uint64_t i = 0; i < len && !r; i += DEVIO_RANGE_SIZE) {
		uint64_t off, n;

		r = devio_proto_decode_range(copy + i, s->b->size, &off, &n);
	}
	for (uint64_t i = 0; i < len && !r; i += DEVIO_RANGE_SIZE) {
		struct devio_request req = { .op = op };

		devio_proto_decode_range(copy + i, s->b->size, &req.offset, &req.length);
		if (req.length)
			r = devio_run(s->b, &req);
	}
	free(copy);
	return r;
}

/* INFO in a slot: size, alignment, flags, as the stream answers it. */
static void shm_info_words(struct devio_backend *b, uint64_t v[3])
{
	v[0] = b->size;
	v[1] = b->block_size ? b->block_size : 1;
	v[2] = devio_proto_info_flags(b);
}

/* Decode a READ/WRITE header into req; 0, or the errno to answer. */
static int shm_decode_rw(struct shm_session *s, struct shm_slot *sl, const uint8_t *h)
{
	uint64_t off = devio_shm_get64(h + 8), len = devio_shm_get64(h + 16);

	sl->req.op = sl->code == DEVIO_REQ_READ ? DEVIO_OP_READ : DEVIO_OP_WRITE;
	sl->req.offset = off;
	if (len > s->data_size) {
		devio_debug("%s: slot %u: %s of %llu bytes: over the slot's %u", s->name, sl->tag,
			    devio_op_name(sl->req.op), (unsigned long long)len, s->data_size);
		return -E2BIG;
	}
	if (sl->req.op == DEVIO_OP_READ && off <= s->b->size && len > s->b->size - off)
		len = s->b->size - off; /* a short read at the end, as the stream answers */
	sl->req.length = sl->len = len;
	sl->req.buf = (uint8_t *)h + DEVIO_SHM_HDR;
	return 0;
}

/* Decode an UNMAP/ZERO header: one range is started like any request;
 * several run here (*done).  0, or the errno to answer. */
static int shm_decode_ranges(struct shm_session *s, struct shm_slot *sl, const uint8_t *h, bool *done)
{
	enum devio_op op = sl->code == DEVIO_REQ_UNMAP ? DEVIO_OP_TRIM : DEVIO_OP_ZERO;
	uint64_t len = devio_shm_get64(h + 8);
	int64_t off;

	if (len > s->data_size || len % DEVIO_RANGE_SIZE)
		return -EINVAL;
	if (s->b->caps & DEVIO_CAP_READONLY)
		return -EROFS;
	if (len != DEVIO_RANGE_SIZE) {
		*done = true;
		return shm_ranges(s, op, h + DEVIO_SHM_HDR, len);
	}
	off = (int64_t)devio_shm_get64(h + DEVIO_SHM_HDR);
	if (off < 0)
		return -EINVAL;
	sl->req.op = op;
	sl->req.offset = (uint64_t)off;
	sl->req.length = devio_shm_get64(h + DEVIO_SHM_HDR + 8);
	return 0;
}

/* Decode the request in slot tag; returns 1 to start sl->req, 0 when it
 * was answered here, or -ECONNRESET for CLOSE. */
static int shm_decode(struct shm_session *s, struct shm_slot *sl, int *err)
{
	uint8_t *h = shm_slot_hdr(s, sl->tag);
	uint64_t v[3];
	bool done = false;

	sl->code = devio_shm_get64(h);
	sl->len = 0;
	memset(&sl->req, 0, sizeof(sl->req));
	*err = 0;
	switch (sl->code) {
	case DEVIO_REQ_READ:
	case DEVIO_REQ_WRITE:
		return (*err = shm_decode_rw(s, sl, h)) ? 0 : 1;
	case DEVIO_REQ_UNMAP:
	case DEVIO_REQ_ZERO:
		*err = shm_decode_ranges(s, sl, h, &done);
		return *err || done ? 0 : 1;
	case DEVIO_SHM_REQ_FLUSH:
		sl->req.op = DEVIO_OP_FLUSH;
		return 1;
	case DEVIO_REQ_INFO:
		shm_info_words(s->b, v);
		for (int i = 0; i < 3; i++)
			devio_shm_put64(h + 8 * i, v[i]);
		return 0;
	case DEVIO_REQ_CLOSE:
		return -ECONNRESET;
	default:
		*err = -ENODEV;
		return 0;
	}
}

/* Start (or answer) the request in slot tag. */
static int shm_start(struct shm_session *s, uint32_t tag)
{
	struct shm_slot *sl = &s->slots[tag];
	int r, err;

	if (atomic_exchange(&sl->busy, true)) {
		devio_warn("%s: tag %u submitted while in flight; dropping the client", s->name, tag);
		return -EPROTO;
	}
	pthread_mutex_lock(&s->lock);
	s->inflight++;
	pthread_mutex_unlock(&s->lock);
	r = shm_decode(s, sl, &err);
	if (r < 0) {
		atomic_store(&sl->busy, false);
		pthread_mutex_lock(&s->lock);
		s->inflight--;
		pthread_mutex_unlock(&s->lock);
		return r;
	}
	if (r == 0) {
		shm_finish(sl, err, 0);
		return 0;
	}
	sl->req.complete = shm_complete;
	sl->req.opaque = sl;
	if (s->workers)
		devio_workers_submit(s->workers, s->b, &sl->req);
	else
		devio_submit(s->b, &sl->req);
	return 0;
}

/* Take every tag the client has published.  -EPROTO when the ring is
 * broken (the client is dropped), -ECONNRESET on CLOSE. */
static int shm_take(struct shm_session *s)
{
	uint32_t tail = devio_shm_get32(s->ctl + DEVIO_SHM_CTL_SQ_TAIL, __ATOMIC_ACQUIRE);
	uint32_t n = tail - s->sq_head;

	if (n > s->nslots) {
		devio_warn("%s: submission tail %u runs %u entries ahead of %u (%u slots); dropping the client",
			   s->name, tail, n, s->sq_head, s->nslots);
		return -EPROTO;
	}
	while (s->sq_head != tail) {
		uint32_t tag = devio_shm_get32(s->ctl + DEVIO_SHM_CTL_RINGS + 4u * (s->sq_head & (s->cap - 1)),
					       __ATOMIC_RELAXED);
		int r;

		s->sq_head++;
		s->n_req++;
		s->last_req_ns = devio_now_ns();
		if (tag >= s->nslots) {
			devio_warn("%s: tag %u out of range (%u slots); dropping the client", s->name, tag,
				   s->nslots);
			return -EPROTO;
		}
		if ((r = shm_start(s, tag)))
			return r;
	}
	return 0;
}

/* One batch on the session thread: completions that happen inline ring the
 * doorbell once, at the end. */
static int shm_batch(struct shm_session *s)
{
	int r;

	pthread_mutex_lock(&s->lock);
	s->batching = true;
	pthread_mutex_unlock(&s->lock);
	r = shm_take(s);
	pthread_mutex_lock(&s->lock);
	s->batching = false;
	if (s->bell_owed) {
		s->bell_owed = false;
		pthread_mutex_unlock(&s->lock);
		shm_bell(s);
	} else {
		pthread_mutex_unlock(&s->lock);
	}
	return r;
}

static void shm_wait_idle(struct shm_session *s)
{
	pthread_mutex_lock(&s->lock);
	while (s->inflight)
		pthread_cond_wait(&s->idle, &s->lock);
	pthread_mutex_unlock(&s->lock);
}

static struct shm_session *shm_session_new(struct devio_backend *b, uint32_t nslots, uint32_t data_size)
{
	struct shm_session *s = calloc(1, sizeof(*s) + nslots * sizeof(s->slots[0]));

	if (!s)
		return NULL;
	s->b = b;
	s->nslots = nslots;
	s->data_size = data_size;
	s->cap = devio_shm_ring_cap(nslots);
	s->size = devio_shm_region_size(nslots, data_size);
	s->sock = s->req_efd = s->resp_efd = -1;
	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->idle, NULL);
	for (uint32_t i = 0; i < nslots; i++) {
		s->slots[i].s = s;
		s->slots[i].tag = i;
	}
	return s;
}

static void shm_session_free(struct shm_session *s)
{
	if (s->region && s->st)
		munmap(s->region, s->size);
	if (s->sock >= 0)
		close(s->sock);
	if (s->req_efd >= 0)
		close(s->req_efd);
	if (s->resp_efd >= 0)
		close(s->resp_efd);
	pthread_cond_destroy(&s->idle);
	pthread_mutex_destroy(&s->lock);
	free(s);
}

int devio_shm_serve_region(struct devio_backend *b, void *region, uint64_t size, uint32_t nslots,
			   uint32_t data_size)
{
	struct shm_session *s;
	int r;

	if (!devio_shm_geometry_ok(nslots, data_size) || size < devio_shm_region_size(nslots, data_size))
		return -EINVAL;
	s = shm_session_new(b, nslots, data_size);
	if (!s)
		return -ENOMEM;
	snprintf(s->name, sizeof(s->name), "shm region");
	s->region = region;
	s->ctl = s->region + devio_shm_ctl_offset(nslots, data_size);
	s->thread = pthread_self();
	r = shm_batch(s);
	shm_wait_idle(s);
	shm_session_free(s);
	return r == -ECONNRESET ? 0 : r;
}

/* ---- the front end: socket, clients, stopping ---- */

struct shm_state {
	struct devio_backend *b;
	char arg[300];
	char path[256];
	uint32_t nslots, data_size;
	int lfd, stop_efd;
	atomic_bool stopping;          /* seen by sessions too busy to sleep */
	pthread_t accept_thread;
	bool accepting;
	struct devio_workers *workers;
	pthread_mutex_t lock;
	pthread_cond_t idle;
	struct shm_session *sessions;
	unsigned active;
	uint64_t served, refused, dropped, timed_out;
	unsigned max_clients, handshake_s, idle_s; /* the listener options in effect */
};

/* How long the sleeping session may wait (ms, -1: for ever), or 0 when
 * the handshake or idle timeout has run out (said, rate-limited). */
static int shm_sleep_ms(struct shm_session *s)
{
	struct shm_state *st = s->st;
	bool first = s->n_req == 0;
	unsigned limit_s = !st ? 0 : first ? st->handshake_s : st->idle_s;
	uint64_t since = first ? s->start_ns : s->last_req_ns, now = devio_now_ns(), end, n;
	unsigned inflight;

	if (!limit_s)
		return -1;
	end = since + limit_s * 1000000000ull;
	if (now < end)
		return (int)((end - now) / 1000000 + 1);
	pthread_mutex_lock(&s->lock);
	inflight = s->inflight;
	pthread_mutex_unlock(&s->lock);
	if (inflight) /* its requests still run: not idle */
		return (int)(limit_s * 1000u);
	pthread_mutex_lock(&st->lock);
	n = ++st->timed_out;
	pthread_mutex_unlock(&st->lock);
	if ((n & (n - 1)) == 0)
		devio_warn("%s: dropping the client: %s %u s (%llu dropped by timeouts so far)", s->name,
			   first ? "no request within" : "idle for", limit_s, (unsigned long long)n);
	return 0;
}

/* Client, stop, or doorbell: wait for one of them.  Returns 1 to go on,
 * 0 when the session ends (EOF, hang-up, stop), -EPROTO on bytes sent. */
static int shm_sleep(struct shm_session *s)
{
	struct pollfd p[3] = { { .fd = s->req_efd, .events = POLLIN }, { .fd = s->sock, .events = POLLIN },
			       { .fd = s->st->stop_efd, .events = POLLIN } };
	uint64_t v;
	char c;
	int ms = shm_sleep_ms(s), ready;

	if (ms == 0)
		return -ETIMEDOUT;
	ready = poll(p, 3, ms);
	if (ready < 0)
		return errno == EINTR ? 1 : -errno;
	if (ready == 0)
		return 1; /* shm_sleep_ms() decides on the next round */
	if (p[2].revents)
		return 0;
	if (p[1].revents) {
		ssize_t n = recv(s->sock, &c, 1, MSG_DONTWAIT);

		if (n > 0) {
			devio_warn("%s: the client sent bytes on the socket; dropping it", s->name);
			return -EPROTO;
		}
		if (n == 0 || (errno != EAGAIN && errno != EINTR))
			return 0;
	}
	if (p[0].revents) {
		if (read(s->req_efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
			return -errno;
		s->n_wake++;
	}
	return 1;
}

/* Serve until the client goes: batches while it keeps the ring busy, a
 * sleep (after telling it to ring) when the ring is empty. */
static int shm_serve(struct shm_session *s)
{
	for (;;) {
		int r = shm_batch(s);

		if (r)
			return r == -ECONNRESET ? 0 : r;
		if (atomic_load_explicit(&s->st->stopping, memory_order_relaxed))
			return 0;
		devio_shm_put32(s->ctl + DEVIO_SHM_CTL_SQ_WAKE, 1, __ATOMIC_RELAXED);
		atomic_thread_fence(memory_order_seq_cst);
		if (devio_shm_get32(s->ctl + DEVIO_SHM_CTL_SQ_TAIL, __ATOMIC_ACQUIRE) == s->sq_head)
			r = shm_sleep(s);
		else
			r = 1;
		devio_shm_put32(s->ctl + DEVIO_SHM_CTL_SQ_WAKE, 0, __ATOMIC_RELAXED);
		if (r <= 0)
			return r;
	}
}

static void shm_unlink_session(struct shm_state *st, struct shm_session *s)
{
	for (struct shm_session **pp = &st->sessions; *pp; pp = &(*pp)->next)
		if (*pp == s) {
			*pp = s->next;
			break;
		}
}

static void *shm_session_main(void *arg)
{
	struct shm_session *s = arg;
	struct shm_state *st = s->st;
	int r;

	pthread_mutex_lock(&s->lock);
	s->thread = pthread_self(); /* shm_finish() tells this thread's completions apart */
	pthread_mutex_unlock(&s->lock);
	devio_info("%s: client connected (%u slots of %u bytes)", s->name, s->nslots, s->data_size);
	s->start_ns = devio_now_ns();
	r = shm_serve(s);
	/* Requests still running write into the region: it stays mapped
	 * until they are done, then goes with the client's last reference. */
	shm_wait_idle(s);
	if (r)
		devio_info("%s: client dropped: %s", s->name, strerror(-r));
	else
		devio_info("%s: session ended", s->name);
	devio_info("%s: %llu requests, %llu request doorbells heard, %llu answer doorbells rung", s->name,
		   (unsigned long long)s->n_req, (unsigned long long)s->n_wake,
		   (unsigned long long)atomic_load(&s->n_bell));
	pthread_mutex_lock(&st->lock);
	shm_unlink_session(st, s);
	st->active--;
	if (r)
		st->dropped++;
	pthread_cond_broadcast(&st->idle);
	pthread_mutex_unlock(&st->lock);
	shm_session_free(s);
	return NULL;
}

/* The region: a sealed memfd (the client can neither shrink it under us,
 * which would turn our stores into SIGBUS, nor grow it), mapped here. */
static int shm_region(struct shm_session *s, int *memfd)
{
	int fd = memfd_create("devio-shm", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	int r;

	if (fd < 0)
		return -errno;
	if (ftruncate(fd, (off_t)s->size) ||
	    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)) {
		r = -errno;
		close(fd);
		return r;
	}
	s->region = mmap(NULL, s->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (s->region == MAP_FAILED) {
		r = -errno;
		s->region = NULL;
		close(fd);
		return r;
	}
	s->ctl = s->region + devio_shm_ctl_offset(s->nslots, s->data_size);
	devio_shm_put64(s->ctl + DEVIO_SHM_CTL_MAGIC, DEVIO_SHM_MAGIC);
	devio_shm_put32(s->ctl + 8, DEVIO_SHM_VERSION, __ATOMIC_RELAXED);
	devio_shm_put32(s->ctl + 12, s->nslots, __ATOMIC_RELAXED);
	devio_shm_put32(s->ctl + 16, s->data_size, __ATOMIC_RELAXED);
	*memfd = fd;
	return 0;
}

static void shm_hello(struct shm_state *st, uint64_t status, uint8_t out[DEVIO_SHM_HELLO_BYTES])
{
	uint64_t w[DEVIO_SHM_H__COUNT] = { 0 }, info[3];

	shm_info_words(st->b, info);
	w[DEVIO_SHM_H_MAGIC] = DEVIO_SHM_MAGIC;
	w[DEVIO_SHM_H_VERSION] = DEVIO_SHM_VERSION;
	w[DEVIO_SHM_H_STATUS] = status;
	w[DEVIO_SHM_H_NSLOTS] = st->nslots;
	w[DEVIO_SHM_H_DATA_SIZE] = st->data_size;
	w[DEVIO_SHM_H_REGION_SIZE] = devio_shm_region_size(st->nslots, st->data_size);
	w[DEVIO_SHM_H_FILE_SIZE] = info[0];
	w[DEVIO_SHM_H_ALIGNMENT] = info[1];
	w[DEVIO_SHM_H_FLAGS] = info[2];
	w[DEVIO_SHM_H_EXT] = st->b->caps & DEVIO_CAP_FLUSH ? DEVIO_SHM_EXT_FLUSH : 0;
	for (int i = 0; i < DEVIO_SHM_H__COUNT; i++)
		devio_put_le64(out + 8 * i, w[i]);
}

/* The hello, with the three descriptors when status is 0. */
static int shm_send_hello(struct shm_state *st, int sock, uint64_t status, const int fds[3])
{
	uint8_t hello[DEVIO_SHM_HELLO_BYTES];
	union {
		char buf[CMSG_SPACE(3 * sizeof(int))];
		struct cmsghdr align;
	} u;
	struct iovec iov = { hello, sizeof(hello) };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	ssize_t n;

	shm_hello(st, status, hello);
	if (!status) {
		struct cmsghdr *c;

		memset(&u, 0, sizeof(u));
		msg.msg_control = u.buf;
		msg.msg_controllen = sizeof(u.buf);
		c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(3 * sizeof(int));
		memcpy(CMSG_DATA(c), fds, 3 * sizeof(int));
	}
	do
		n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	return (size_t)n == sizeof(hello) ? 0 : -EIO;
}

/* A new client: its own region and doorbells, handed over, and a thread. */
static int shm_session_start(struct shm_state *st, int sock)
{
	struct shm_session *s = shm_session_new(st->b, st->nslots, st->data_size);
	pthread_attr_t attr;
	pthread_t t;
	int memfd = -1, r;

	if (!s)
		return -ENOMEM;
	s->st = st;
	s->sock = sock;
	s->workers = st->workers;
	snprintf(s->name, sizeof(s->name), "--devio %s client %llu", st->arg, (unsigned long long)st->served + 1);
	s->req_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	s->resp_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (s->req_efd < 0 || s->resp_efd < 0)
		r = -errno;
	else
		r = shm_region(s, &memfd);
	if (!r)
		r = shm_send_hello(st, sock, 0, (int[3]){ memfd, s->req_efd, s->resp_efd });
	if (memfd >= 0)
		close(memfd); /* the mapping keeps it; the client has its own descriptor */
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (!r) {
		s->next = st->sessions;
		st->sessions = s;
		st->active++;
		st->served++;
		r = -pthread_create(&t, &attr, shm_session_main, s);
		if (r) {
			shm_unlink_session(st, s);
			st->active--;
		}
	}
	pthread_attr_destroy(&attr);
	if (r) {
		s->sock = -1; /* the caller closes it */
		shm_session_free(s);
	}
	return r;
}

static void shm_accept_one(struct shm_state *st)
{
	int fd = accept4(st->lfd, NULL, NULL, SOCK_CLOEXEC);
	int r;

	if (fd < 0) {
		if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) {
			struct pollfd p = { .fd = st->stop_efd, .events = POLLIN };

			devio_warn("--devio %s: accept: %s", st->arg, strerror(errno));
			poll(&p, 1, 200); /* out of descriptors: do not spin */
		}
		return;
	}
	pthread_mutex_lock(&st->lock);
	if (st->active >= st->max_clients) {
		uint64_t n = ++st->refused;

		pthread_mutex_unlock(&st->lock);
		if ((n & (n - 1)) == 0)
			devio_warn("--devio %s: refusing a client: %u clients already have a region (%llu refused so far)",
				   st->arg, st->max_clients, (unsigned long long)n);
		shm_send_hello(st, fd, EBUSY, NULL);
		close(fd);
		return;
	}
	r = shm_session_start(st, fd);
	if (r)
		st->refused++;
	pthread_mutex_unlock(&st->lock);
	if (r) {
		devio_warn("--devio %s: cannot set up a client's region: %s", st->arg, strerror(-r));
		shm_send_hello(st, fd, (uint64_t)-r, NULL);
		close(fd);
	}
}

static void *shm_accept_main(void *arg)
{
	struct shm_state *st = arg;
	struct pollfd p[2] = { { .fd = st->lfd, .events = POLLIN }, { .fd = st->stop_efd, .events = POLLIN } };

	for (;;) {
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			devio_err("--devio %s: poll: %s", st->arg, strerror(errno));
			return NULL;
		}
		if (p[1].revents)
			return NULL;
		if (p[0].revents)
			shm_accept_one(st);
	}
}

/* Does a live server answer on path?  (ImDisk keeps a second server off a
 * name with a mutex; here the first server's socket is that mutex.) */
static bool shm_path_live(const char *path)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	bool live;

	if (fd < 0 || strlen(path) >= sizeof(sun.sun_path)) {
		if (fd >= 0)
			close(fd);
		return false;
	}
	memcpy(sun.sun_path, path, strlen(path) + 1);
	live = connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == 0;
	close(fd);
	return live;
}

/* Bound under a temporary name, made 0600 whatever the umask, listening,
 * then renamed into place: the path appears only when it is ready, and
 * only its owner (and root) may connect. */
static int shm_listen(struct shm_state *st)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	struct stat sb;
	int fd, r;

	if (lstat(st->path, &sb) == 0 && !S_ISSOCK(sb.st_mode)) {
		devio_err("--devio %s: %s exists and is not a socket", st->arg, st->path);
		return -EEXIST;
	}
	if (shm_path_live(st->path)) {
		devio_err("--devio %s: another server already listens on %s", st->arg, st->path);
		return -EADDRINUSE;
	}
	if ((size_t)snprintf(sun.sun_path, sizeof(sun.sun_path), "%s.%d.tmp", st->path, (int)getpid()) >=
	    sizeof(sun.sun_path)) {
		devio_err("--devio %s: %s: path too long", st->arg, st->path);
		return -ENAMETOOLONG;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	unlink(sun.sun_path);
	if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) || chmod(sun.sun_path, 0600) ||
	    listen(fd, (int)st->max_clients) || rename(sun.sun_path, st->path)) {
		r = -errno;
		devio_err("--devio %s: cannot listen on %s: %s", st->arg, st->path, strerror(-r));
		unlink(sun.sun_path);
		close(fd);
		return r;
	}
	return fd;
}

/* "shm:NAME[,slots=N][,buffer=N]" */
static int shm_parse(struct shm_state *st, const char *arg)
{
	char buf[300], *opt, *save = NULL;
	uint64_t v;
	int r;

	if (strncmp(arg, "shm:", 4) || strlen(arg) >= sizeof(buf))
		return -EINVAL;
	snprintf(st->arg, sizeof(st->arg), "%s", arg);
	strcpy(buf, arg + 4);
	opt = strchr(buf, ',');
	if (opt)
		*opt++ = '\0';
	st->nslots = DEVIO_SHM_DEFAULT_SLOTS;
	st->data_size = DEVIO_SHM_DEFAULT_DATA;
	for (opt = opt ? strtok_r(opt, ",", &save) : NULL; opt; opt = strtok_r(NULL, ",", &save)) {
		if (!strncmp(opt, "slots=", 6) && !devio_parse_u64(opt + 6, &v) && devio_shm_geometry_ok(v, 4096))
			st->nslots = (uint32_t)v;
		else if (!strncmp(opt, "buffer=", 7) && !devio_parse_size(opt + 7, &v) &&
			 devio_shm_geometry_ok(1, v))
			st->data_size = (uint32_t)v;
		else {
			devio_err("--devio %s: bad option '%s' (slots=1..%u, buffer=4K..64M in 4K steps)", arg, opt,
				  DEVIO_SHM_MAX_SLOTS);
			return -EINVAL;
		}
	}
	/* every request must fit the backend in one piece */
	if (st->b->max_io && st->b->max_io < st->data_size)
		st->data_size = st->b->max_io >= 4096 ? st->b->max_io & ~4095u : 4096;
	r = devio_shm_socket_path(buf, true, st->path, sizeof(st->path));
	if (r)
		devio_err("--devio %s: want shm:NAME (no '/' inside) or shm:/PATH: %s", arg, strerror(-r));
	return r;
}

static void shm_state_free(struct shm_state *st)
{
	if (st->lfd >= 0) {
		close(st->lfd);
		unlink(st->path);
	}
	if (st->stop_efd >= 0)
		close(st->stop_efd);
	devio_workers_free(st->workers);
	pthread_cond_destroy(&st->idle);
	pthread_mutex_destroy(&st->lock);
	free(st);
}

/* The --devio listener options that apply (opts: the --devio front end's
 * options struct, which starts with them; NULL: the defaults).  --allow
 * and --socket-mode/--socket-group do not: the socket is a Unix one,
 * always 0600 in a 0700 directory. */
static void shm_limits(struct shm_state *st, const struct devio_listen_opts *lo)
{
	st->max_clients = lo && lo->max_conns ? lo->max_conns : SHM_MAX_CLIENTS;
	st->handshake_s = lo && lo->handshake_set ? lo->handshake_timeout : DEVIO_LISTEN_HANDSHAKE_S;
	st->idle_s = lo ? lo->idle_timeout : 0;
	if (lo && (lo->n_allow || lo->socket_mode || lo->has_group))
		devio_warn("--devio %s: --allow, --socket-mode and --socket-group do not apply (a 0600 Unix socket)",
			   st->arg);
}

static int shm_fe_start(struct devio_server *srv, const char *arg, const void *opts, void **state)
{
	struct shm_state *st;
	int r;

	if (!srv->n_exports)
		return -ENOENT;
	st = calloc(1, sizeof(*st));
	if (!st)
		return -ENOMEM;
	st->b = srv->exports[0].backend;
	st->lfd = st->stop_efd = -1;
	pthread_mutex_init(&st->lock, NULL);
	pthread_cond_init(&st->idle, NULL);
	if ((r = shm_parse(st, arg)))
		goto out;
	shm_limits(st, opts);
	if (devio_wants_pool(st->b, srv->opts.threads) &&
	    !(st->workers = devio_workers_new(devio_pool_size(srv->opts.threads)))) {
		r = -ENOMEM;
		goto out;
	}
	st->stop_efd = eventfd(0, EFD_CLOEXEC);
	if (st->stop_efd < 0) {
		r = -errno;
		goto out;
	}
	if ((st->lfd = shm_listen(st)) < 0) {
		r = st->lfd;
		goto out;
	}
	if ((r = -pthread_create(&st->accept_thread, NULL, shm_accept_main, st)))
		goto out;
	st->accepting = true;
	devio_info("--devio %s: listening on %s (%u slots of %u bytes per client, up to %u clients)", st->arg, st->path,
		   st->nslots, st->data_size, st->max_clients);
	*state = st;
	return 0;
out:
	shm_state_free(st);
	return r;
}

/* Stop: no new clients; every session sees the stop doorbell, waits for
 * its requests and ends. */
static void shm_fe_stop(void *state)
{
	struct shm_state *st = state;
	uint64_t one = 1;

	if (!st)
		return;
	atomic_store(&st->stopping, true);
	if (write(st->stop_efd, &one, sizeof(one)) < 0)
		devio_warn("--devio %s: cannot signal stop: %s", st->arg, strerror(errno));
	if (st->accepting)
		pthread_join(st->accept_thread, NULL);
	pthread_mutex_lock(&st->lock);
	while (st->active)
		pthread_cond_wait(&st->idle, &st->lock);
	pthread_mutex_unlock(&st->lock);
	shm_state_free(st);
}

static void shm_fe_status(void *state, FILE *out)
{
	struct shm_state *st = state;

	pthread_mutex_lock(&st->lock);
	fprintf(out, "  devio shared memory on %s: %u slots of %u bytes per client, %u client(s), %llu served, %llu refused, %llu dropped, %llu by timeouts\n",
		st->path, st->nslots, st->data_size, st->active, (unsigned long long)st->served,
		(unsigned long long)st->refused, (unsigned long long)st->dropped, (unsigned long long)st->timed_out);
	pthread_mutex_unlock(&st->lock);
}

static void shm_fe_info(void *state, struct devio_frontend_info *info)
{
	struct shm_state *st = state;

	pthread_mutex_lock(&st->lock);
	snprintf(info->address, sizeof(info->address), "shm:%s", st->path);
	info->connections = st->active;
	info->served = st->served;
	pthread_mutex_unlock(&st->lock);
}

const struct devio_frontend_type devio_frontend_shm = {
	.option = "devio",
	.arg_help = "shm:NAME[,slots=N][,buffer=N]",
	.start = shm_fe_start,
	.stop = shm_fe_stop,
	.status = shm_fe_status,
	.info = shm_fe_info,
};
