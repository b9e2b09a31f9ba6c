/* devio_shm.c - a devio shared-memory server (`devio serve --devio
 * shm:NAME`) as a backend: devio+shm://NAME (layout in include/devio/shm.h,
 * docs/shm.md).
 *
 * Open connects to the server's Unix socket and receives the region (a
 * sealed memfd) and two eventfd doorbells.  ops->submit takes a free slot
 * (tag), writes the ImDisk header (and a write's payload) into it and
 * publishes the tag on the submission ring; requests that find every slot
 * busy wait in a private queue and take the next slot freed (a FUA write
 * goes the synchronous way, then a FLUSH: the protocol has no FUA).  A
 * completion thread takes tags from the completion ring, checks them (in
 * range, in flight), copies each answer out once, and completes them.  The
 * region is untrusted: every field is loaded once before it is checked.
 * A server that goes away (socket hang-up), breaks the ring or keeps a
 * request longer than the timeout ends the connection: every request in
 * flight fails, and so does every later one (no reconnection).
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
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/protocol.h"
#include "devio/shm.h"
#include "devio/util.h"

#define SHMC_TIMEOUT_S 120
#define SHMC_MAX_ALIGN 65536u

struct shmc_slot {
	struct devio_request *req; /* the slot's request (reserved or in flight), or NULL */
	bool live;                 /* published: its completion may come */
	uint64_t code;
	uint64_t started_ns;
};

struct shmc {
	char uri[300];
	int sock, req_efd, resp_efd, stop_efd;
	uint8_t *region, *ctl;
	uint64_t size, base;
	uint32_t nslots, data_size, cap;
	uint64_t info[3], ext;
	unsigned timeout_s;
	pthread_t thread;
	bool running;
	pthread_mutex_t lock;       /* everything below */
	uint32_t *free_tags, n_free;
	uint32_t sq_tail;
	struct devio_request *pend_head, *pend_tail;
	int dead;                   /* 0, or why every request now fails */
	uint32_t cq_head;           /* the completion thread's alone */
	struct shmc_slot slots[];
};

static uint8_t *shmc_hdr(struct shmc *c, uint32_t tag)
{
	return c->region + (uint64_t)tag * devio_shm_slot_size(c->data_size);
}

/* ---- submitting ---- */

static uint64_t shmc_code(const struct devio_request *req)
{
	switch (req->op) {
	case DEVIO_OP_READ: return DEVIO_REQ_READ;
	case DEVIO_OP_WRITE: return DEVIO_REQ_WRITE;
	case DEVIO_OP_TRIM: return DEVIO_REQ_UNMAP;
	case DEVIO_OP_ZERO: return DEVIO_REQ_ZERO;
	default: return DEVIO_SHM_REQ_FLUSH;
	}
}

/* The request into its slot: header, then a write's payload or the range. */
static void shmc_fill(struct shmc *c, uint32_t tag, struct devio_request *req)
{
	uint8_t *h = shmc_hdr(c, tag);
	uint64_t code = shmc_code(req);

	c->slots[tag].code = code;
	c->slots[tag].started_ns = devio_now_ns();
	devio_shm_put64(h, code);
	if (code == DEVIO_REQ_READ || code == DEVIO_REQ_WRITE) {
		devio_shm_put64(h + 8, c->base + req->offset);
		devio_shm_put64(h + 16, req->length);
		if (code == DEVIO_REQ_WRITE)
			memcpy(h + DEVIO_SHM_HDR, req->buf, req->length);
	} else if (code != DEVIO_SHM_REQ_FLUSH) {
		devio_shm_put64(h + 8, DEVIO_RANGE_SIZE);
		devio_shm_put64(h + DEVIO_SHM_HDR, c->base + req->offset);
		devio_shm_put64(h + DEVIO_SHM_HDR + 8, req->length);
	}
}

/* Publish a filled slot; the lock is held.  Returns whether to ring. */
static bool shmc_publish(struct shmc *c, uint32_t tag)
{
	devio_shm_put32(c->ctl + DEVIO_SHM_CTL_RINGS + 4u * (c->sq_tail & (c->cap - 1)), tag, __ATOMIC_RELAXED);
	c->sq_tail++;
	devio_shm_put32(c->ctl + DEVIO_SHM_CTL_SQ_TAIL, c->sq_tail, __ATOMIC_RELEASE);
	/* our tail before its flag; it sets its flag before reading our tail.
	 * Taking the flag (1 -> 0) makes this the one submission that rings. */
	atomic_thread_fence(memory_order_seq_cst);
	return devio_shm_take_wake(c->ctl + DEVIO_SHM_CTL_SQ_WAKE);
}

static void shmc_ring(struct shmc *c)
{
	uint64_t one = 1;

	if (write(c->req_efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		devio_debug("%s: doorbell: %s", c->uri, strerror(errno));
}

/* Fill and publish req in tag (owned by the caller, taken under the lock);
 * if the connection died meanwhile, fail req here (shmc_die leaves a slot
 * that is not published yet to us). */
static void shmc_send(struct shmc *c, uint32_t tag, struct devio_request *req)
{
	bool ring;

	shmc_fill(c, tag, req);
	pthread_mutex_lock(&c->lock);
	if (c->dead) {
		int r = c->dead;

		c->slots[tag].req = NULL; /* never reused */
		pthread_mutex_unlock(&c->lock);
		req->result = r;
		req->complete(req);
		return;
	}
	c->slots[tag].live = true;
	ring = shmc_publish(c, tag);
	pthread_mutex_unlock(&c->lock);
	if (ring)
		shmc_ring(c);
}

/* Start req (fits a slot): 0 started or queued, or the connection's error. */
static int shmc_queue(struct shmc *c, struct devio_request *req)
{
	uint32_t tag;

	pthread_mutex_lock(&c->lock);
	if (c->dead) {
		int r = c->dead;

		pthread_mutex_unlock(&c->lock);
		return r;
	}
	if (c->n_free == 0) {
		req->next = NULL;
		if (c->pend_tail)
			c->pend_tail->next = req;
		else
			c->pend_head = req;
		c->pend_tail = req;
		pthread_mutex_unlock(&c->lock);
		return 0;
	}
	tag = c->free_tags[--c->n_free];
	c->slots[tag].req = req; /* reserved: the completion thread may look */
	pthread_mutex_unlock(&c->lock);
	shmc_send(c, tag, req);
	return 0;
}

static int shmc_submit(struct devio_backend *b, struct devio_request *req)
{
	struct shmc *c = b->priv;

	if ((req->flags & DEVIO_REQ_FUA) && req->op != DEVIO_OP_READ)
		return -EAGAIN; /* no FUA in the protocol: the core runs it, then a FLUSH */
	switch (req->op) {
	case DEVIO_OP_READ:
	case DEVIO_OP_WRITE:
		if (req->length > c->data_size || req->length == 0)
			return -EAGAIN; /* split by the synchronous path */
		break;
	case DEVIO_OP_FLUSH:
		if (!(c->ext & DEVIO_SHM_EXT_FLUSH))
			return -EAGAIN;
		break;
	case DEVIO_OP_TRIM:
		break;
	case DEVIO_OP_ZERO:
		if (!(c->info[2] & DEVIO_INFO_SUPPORTS_ZERO) || (req->flags & DEVIO_REQ_FAST_ZERO))
			return -EAGAIN;
		break;
	default:
		return -EOPNOTSUPP; /* CACHE: the core answers it */
	}
	return shmc_queue(c, req);
}

/* ---- completing ---- */

/* The answer in tag's header, copied out once and checked. */
static int shmc_answer(struct shmc *c, uint32_t tag, struct devio_request *req)
{
	uint8_t *h = shmc_hdr(c, tag);
	uint64_t code = c->slots[tag].code;
	int r = devio_proto_peer_errno(devio_shm_get64(h));
	uint64_t n;

	if (r || (code != DEVIO_REQ_READ && code != DEVIO_REQ_WRITE))
		return r;
	n = devio_shm_get64(h + 8);
	if (n != req->length) {
		devio_err("%s: %s at %llu: the server answered %llu of %llu bytes", c->uri,
			  code == DEVIO_REQ_READ ? "read" : "write", (unsigned long long)req->offset,
			  (unsigned long long)n, (unsigned long long)req->length);
		return -EIO;
	}
	if (code == DEVIO_REQ_READ)
		memcpy(req->buf, h + DEVIO_SHM_HDR, n);
	return 0;
}

/* Tag came back: answer its request, then give the slot to a waiting
 * request or back to the free list. */
static void shmc_done(struct shmc *c, uint32_t tag)
{
	struct devio_request *req = c->slots[tag].req, *next;

	req->result = shmc_answer(c, tag, req);
	pthread_mutex_lock(&c->lock);
	c->slots[tag].live = false;
	c->slots[tag].req = next = c->dead ? NULL : c->pend_head;
	if (next) {
		c->pend_head = next->next;
		if (!c->pend_head)
			c->pend_tail = NULL;
	} else {
		c->free_tags[c->n_free++] = tag;
	}
	pthread_mutex_unlock(&c->lock);
	if (next)
		shmc_send(c, tag, next);
	req->complete(req);
}

/* The connection is over: fail everything in flight or waiting. */
static void shmc_die(struct shmc *c, int err)
{
	struct devio_request *list = NULL;

	pthread_mutex_lock(&c->lock);
	if (!c->dead && err != -ESHUTDOWN) /* ESHUTDOWN: closed by us */
		devio_err("%s: connection to the server lost: %s", c->uri, strerror(-err));
	c->dead = err;
	for (uint32_t i = 0; i < c->nslots; i++)
		if (c->slots[i].req && c->slots[i].live) { /* one not published yet: shmc_send's */
			c->slots[i].req->next = list;
			list = c->slots[i].req;
			c->slots[i].req = NULL; /* never reused: the server may still write it */
			c->slots[i].live = false;
		}
	if (c->pend_tail) {
		c->pend_tail->next = list;
		list = c->pend_head;
		c->pend_head = c->pend_tail = NULL;
	}
	pthread_mutex_unlock(&c->lock);
	while (list) {
		struct devio_request *req = list;

		list = req->next;
		req->result = err;
		req->complete(req);
	}
}

/* Take every completion published: 0, or -EPROTO for a broken ring. */
static int shmc_reap(struct shmc *c)
{
	uint32_t tail = devio_shm_get32(c->ctl + DEVIO_SHM_CTL_CQ_TAIL, __ATOMIC_ACQUIRE);

	if (tail - c->cq_head > c->nslots) {
		devio_err("%s: completion tail %u runs ahead of %u (%u slots)", c->uri, tail, c->cq_head, c->nslots);
		return -EPROTO;
	}
	while (c->cq_head != tail) {
		uint32_t tag = devio_shm_get32(c->ctl + DEVIO_SHM_CTL_RINGS +
					       4u * (c->cap + (c->cq_head & (c->cap - 1))), __ATOMIC_RELAXED);
		bool ok;

		c->cq_head++;
		pthread_mutex_lock(&c->lock);
		ok = tag < c->nslots && c->slots[tag].live && !c->dead;
		pthread_mutex_unlock(&c->lock);
		if (!ok) {
			devio_err("%s: completion for tag %u, which is not in flight", c->uri, tag);
			return -EPROTO;
		}
		shmc_done(c, tag);
	}
	return 0;
}

/* A request the server has kept longer than the timeout ends it all.
 * (Not now - timeout as a limit: within the timeout of boot, as in a
 * freshly booted guest, that wraps and every request looks overdue.) */
static int shmc_overdue(struct shmc *c)
{
	uint64_t now = devio_now_ns(), most = (uint64_t)c->timeout_s * 1000000000u;
	int r = 0;

	pthread_mutex_lock(&c->lock);
	for (uint32_t i = 0; i < c->nslots && !r; i++) {
		uint64_t t = c->slots[i].started_ns; /* published: its own; may be after now */

		if (c->slots[i].live && t < now && now - t > most)
			r = -ETIMEDOUT;
	}
	pthread_mutex_unlock(&c->lock);
	return r;
}

/* Sleep until the answer doorbell, a hang-up or stop: 1 go on, 0 stop,
 * or why the connection is over. */
static int shmc_sleep(struct shmc *c)
{
	struct pollfd p[3] = { { .fd = c->resp_efd, .events = POLLIN }, { .fd = c->sock, .events = POLLIN },
			       { .fd = c->stop_efd, .events = POLLIN } };
	uint64_t v;
	int n = poll(p, 3, 1000);

	if (n < 0)
		return errno == EINTR ? 1 : -errno;
	if (p[2].revents)
		return 0;
	if (p[1].revents)
		return -ECONNRESET; /* the server never writes to the socket after the hello */
	if (p[0].revents && read(c->resp_efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		return -errno;
	return 1;
}

static void *shmc_main(void *arg)
{
	struct shmc *c = arg;
	uint64_t checked = devio_now_ns();
	int r;

	for (;;) {
		if ((r = shmc_reap(c)))
			break;
		if (devio_now_ns() - checked > 1000000000u) { /* once a second, busy or not */
			checked = devio_now_ns();
			if ((r = shmc_overdue(c)))
				break;
		}
		devio_shm_put32(c->ctl + DEVIO_SHM_CTL_CQ_WAKE, 1, __ATOMIC_RELAXED);
		atomic_thread_fence(memory_order_seq_cst);
		r = devio_shm_get32(c->ctl + DEVIO_SHM_CTL_CQ_TAIL, __ATOMIC_ACQUIRE) == c->cq_head ? shmc_sleep(c) : 1;
		devio_shm_put32(c->ctl + DEVIO_SHM_CTL_CQ_WAKE, 0, __ATOMIC_RELAXED);
		if (r <= 0)
			break;
	}
	shmc_die(c, r ? r : -ESHUTDOWN);
	return NULL;
}

/* ---- synchronous callbacks: requests split into slots, all in flight ---- */

struct shmc_wait {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	unsigned left;
	int r;
};

static void shmc_wait_complete(struct devio_request *req)
{
	struct shmc_wait *w = req->opaque;

	pthread_mutex_lock(&w->lock);
	if (req->result && !w->r)
		w->r = req->result;
	if (--w->left == 0)
		pthread_cond_signal(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

/* Up to nslots pieces of [off, off+len) at once, until done or failed. */
static int shmc_sync(struct shmc *c, enum devio_op op, void *buf, uint64_t len, uint64_t off)
{
	struct shmc_wait w = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0 };
	uint64_t step = op == DEVIO_OP_READ || op == DEVIO_OP_WRITE ? c->data_size : UINT64_MAX;
	struct devio_request *reqs = calloc(c->nslots, sizeof(*reqs));

	if (!reqs)
		return -ENOMEM;
	do {
		unsigned n = 0;

		while ((len || n == 0) && n < c->nslots) {
			uint64_t k = len < step ? len : step;

			reqs[n] = (struct devio_request){ .op = op, .offset = off, .length = k, .buf = buf,
							  .complete = shmc_wait_complete, .opaque = &w };
			off += k;
			len -= k;
			if (buf)
				buf = (char *)buf + k;
			n++;
		}
		w.left = n;
		for (unsigned i = 0; i < n; i++) {
			int r = shmc_queue(c, &reqs[i]);

			if (r) {
				reqs[i].result = r;
				shmc_wait_complete(&reqs[i]);
			}
		}
		pthread_mutex_lock(&w.lock);
		while (w.left)
			pthread_cond_wait(&w.cond, &w.lock);
		pthread_mutex_unlock(&w.lock);
	} while (len && !w.r);
	free(reqs);
	return w.r;
}

static int shmc_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	return len ? shmc_sync(b->priv, DEVIO_OP_READ, buf, len, off) : 0;
}

static int shmc_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	return len ? shmc_sync(b->priv, DEVIO_OP_WRITE, (void *)buf, len, off) : 0;
}

static int shmc_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	return shmc_sync(b->priv, DEVIO_OP_TRIM, NULL, len, off);
}

/* ZERO as the server's ZERO, or zeroes written where it has none. */
static int shmc_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct shmc *c = b->priv;
	char *zeroes;
	int r = 0;

	if (flags & DEVIO_REQ_FAST_ZERO)
		return -EOPNOTSUPP; /* the protocol cannot tell fast from slow */
	if (c->info[2] & DEVIO_INFO_SUPPORTS_ZERO)
		return shmc_sync(c, DEVIO_OP_ZERO, NULL, len, off);
	zeroes = calloc(1, c->data_size);
	if (!zeroes)
		return -ENOMEM;
	while (len && !r) {
		uint64_t n = len < c->data_size ? len : c->data_size;

		r = shmc_sync(c, DEVIO_OP_WRITE, zeroes, n, off);
		off += n;
		len -= n;
	}
	free(zeroes);
	return r;
}

static int shmc_flush(struct devio_backend *b)
{
	struct shmc *c = b->priv;

	return c->ext & DEVIO_SHM_EXT_FLUSH ? shmc_sync(c, DEVIO_OP_FLUSH, NULL, 0, 0) : 0;
}

static void shmc_describe(struct devio_backend *b, char *out, size_t outlen)
{
	struct shmc *c = b->priv;

	snprintf(out, outlen, "devio shared memory %s (%u slots of %u bytes)", c->uri, c->nslots, c->data_size);
}

static void shmc_free(struct shmc *c)
{
	uint64_t one = 1;

	if (c->running) {
		if (write(c->stop_efd, &one, sizeof(one)) < 0)
			devio_warn("%s: cannot stop the completion thread: %s", c->uri, strerror(errno));
		pthread_join(c->thread, NULL);
	}
	if (c->region)
		munmap(c->region, c->size);
	for (int *fd = &c->sock; fd <= &c->stop_efd; fd++)
		if (*fd >= 0)
			close(*fd);
	pthread_mutex_destroy(&c->lock);
	free(c->free_tags);
	free(c);
}

static void shmc_close(struct devio_backend *b)
{
	shmc_free(b->priv);
	free(b);
}

static const struct devio_backend_ops shmc_ops = {
	.name = "devio-shm",
	.pread = shmc_pread,
	.pwrite = shmc_pwrite,
	.flush = shmc_flush,
	.trim = shmc_trim,
	.zero = shmc_zero,
	.submit = shmc_submit,
	.describe = shmc_describe,
	.close = shmc_close,
};

/* ---- opening ---- */

struct shmc_hello {
	uint64_t w[DEVIO_SHM_H__COUNT];
	int fds[3];
};

/* Keep the first three descriptors of an SCM_RIGHTS message, close the rest. */
static int shmc_take_fds(struct msghdr *msg, int fds[3])
{
	int n = 0;

	for (struct cmsghdr *cm = CMSG_FIRSTHDR(msg); cm; cm = CMSG_NXTHDR(msg, cm)) {
		size_t k;

		if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			continue;
		k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < k; i++) {
			int fd;

			memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
			if (n < 3)
				fds[n++] = fd;
			else
				close(fd);
		}
	}
	return n;
}

static int shmc_recv_hello(int sock, const char *uri, struct shmc_hello *h)
{
	uint8_t buf[DEVIO_SHM_HELLO_BYTES];
	union {
		char b[CMSG_SPACE(8 * sizeof(int))];
		struct cmsghdr align;
	} u;
	struct iovec iov = { buf, sizeof(buf) };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b, .msg_controllen = sizeof(u.b) };
	ssize_t n;
	int nfds;

	do
		n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		devio_err("%s: no answer from the server: %s", uri, strerror(errno));
		return -errno;
	}
	nfds = shmc_take_fds(&msg, h->fds);
	for (int i = 0; i < DEVIO_SHM_H__COUNT; i++)
		h->w[i] = devio_get_le64(buf + 8 * i);
	if ((size_t)n != sizeof(buf) || h->w[DEVIO_SHM_H_MAGIC] != DEVIO_SHM_MAGIC) {
		devio_err("%s: not a devio shared-memory server", uri);
		return -EPROTO;
	}
	if (h->w[DEVIO_SHM_H_VERSION] != DEVIO_SHM_VERSION) {
		devio_err("%s: server speaks version %llu, not %u", uri, (unsigned long long)h->w[DEVIO_SHM_H_VERSION],
			  DEVIO_SHM_VERSION);
		return -EPROTO;
	}
	if (h->w[DEVIO_SHM_H_STATUS]) {
		devio_err("%s: the server refuses the connection: %s", uri,
			  strerror(-devio_proto_peer_errno(h->w[DEVIO_SHM_H_STATUS])));
		return devio_proto_peer_errno(h->w[DEVIO_SHM_H_STATUS]);
	}
	if (nfds != 3 || (msg.msg_flags & MSG_CTRUNC)) {
		devio_err("%s: the server sent %d descriptors, not 3", uri, nfds);
		return -EPROTO;
	}
	return 0;
}

/* Is the hello's geometry sane, and is the memfd what it says (sealed
 * against shrinking, which would make our loads fault, and of that size)? */
static int shmc_check(struct shmc *c, const struct shmc_hello *h)
{
	const uint64_t *w = h->w;
	struct stat sb;
	int seals;

	if (!devio_shm_geometry_ok(w[DEVIO_SHM_H_NSLOTS], w[DEVIO_SHM_H_DATA_SIZE]) ||
	    w[DEVIO_SHM_H_REGION_SIZE] != devio_shm_region_size((uint32_t)w[DEVIO_SHM_H_NSLOTS],
								 (uint32_t)w[DEVIO_SHM_H_DATA_SIZE])) {
		devio_err("%s: bad region geometry: %llu slots of %llu bytes in %llu", c->uri,
			  (unsigned long long)w[DEVIO_SHM_H_NSLOTS], (unsigned long long)w[DEVIO_SHM_H_DATA_SIZE],
			  (unsigned long long)w[DEVIO_SHM_H_REGION_SIZE]);
		return -EPROTO;
	}
	/* a doorbell that is not an eventfd (a full pipe) must not hang us */
	for (int i = 1; i < 3; i++)
		if (fcntl(h->fds[i], F_SETFL, O_NONBLOCK)) {
			devio_err("%s: bad doorbell descriptor: %s", c->uri, strerror(errno));
			return -EPROTO;
		}
	seals = fcntl(h->fds[0], F_GET_SEALS);
	if (fstat(h->fds[0], &sb) || (uint64_t)sb.st_size != w[DEVIO_SHM_H_REGION_SIZE] || seals < 0 ||
	    !(seals & F_SEAL_SHRINK)) {
		devio_err("%s: the region is not a sealed memory file of %llu bytes", c->uri,
			  (unsigned long long)w[DEVIO_SHM_H_REGION_SIZE]);
		return -EPROTO;
	}
	if (w[DEVIO_SHM_H_FILE_SIZE] > INT64_MAX) {
		devio_err("%s: server claims %llu bytes: more than the protocol can address", c->uri,
			  (unsigned long long)w[DEVIO_SHM_H_FILE_SIZE]);
		return -EPROTO;
	}
	return 0;
}

/* --offset/--size: a window of the server's export. */
static int shmc_window(struct shmc *c, const struct devio_open_opts *o, uint64_t *size)
{
	uint64_t total = c->info[0];

	c->base = o->has_offset ? o->offset : 0;
	if (total == 0 || c->base > total || (o->has_size && o->size > total - c->base)) {
		devio_err("%s: window %llu+%llu does not fit the export (%llu bytes)", c->uri,
			  (unsigned long long)c->base, (unsigned long long)o->size, (unsigned long long)total);
		return -EINVAL;
	}
	*size = o->has_size && o->size ? o->size : total - c->base;
	return 0;
}

static int shmc_connect(const char *uri, int *sock)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	struct timeval tv = { .tv_sec = 10 };
	int r = devio_shm_socket_path(uri + strlen("devio+shm://"), false, sun.sun_path, sizeof(sun.sun_path));

	if (r) {
		devio_err("%s: want devio+shm://NAME or devio+shm:///PATH: %s", uri, strerror(-r));
		return r;
	}
	*sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (*sock < 0)
		return -errno;
	if (connect(*sock, (struct sockaddr *)&sun, sizeof(sun))) {
		r = -errno;
		devio_err("%s: cannot connect to %s: %s", uri, sun.sun_path, strerror(-r));
		return r;
	}
	setsockopt(*sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)); /* for the hello */
	return 0;
}

static unsigned shmc_timeout(void)
{
	const char *e = getenv("DEVIO_REMOTE_TIMEOUT");
	uint64_t v;

	if (e && !devio_parse_u64(e, &v) && v >= 1 && v <= 86400)
		return (unsigned)v;
	return SHMC_TIMEOUT_S;
}

/* The client state for a checked hello: mapping, free tags, thread. */
static int shmc_setup(struct shmc *c, struct shmc_hello *h)
{
	c->nslots = (uint32_t)h->w[DEVIO_SHM_H_NSLOTS];
	c->data_size = (uint32_t)h->w[DEVIO_SHM_H_DATA_SIZE];
	c->cap = devio_shm_ring_cap(c->nslots);
	c->size = h->w[DEVIO_SHM_H_REGION_SIZE];
	for (int i = 0; i < 3; i++)
		c->info[i] = h->w[DEVIO_SHM_H_FILE_SIZE + i];
	c->ext = h->w[DEVIO_SHM_H_EXT];
	c->region = mmap(NULL, c->size, PROT_READ | PROT_WRITE, MAP_SHARED, h->fds[0], 0);
	if (c->region == MAP_FAILED) {
		c->region = NULL;
		return -errno;
	}
	c->ctl = c->region + devio_shm_ctl_offset(c->nslots, c->data_size);
	c->free_tags = calloc(c->nslots, sizeof(uint32_t));
	if (!c->free_tags)
		return -ENOMEM;
	for (uint32_t i = 0; i < c->nslots; i++)
		c->free_tags[c->n_free++] = c->nslots - 1 - i;
	c->stop_efd = eventfd(0, EFD_CLOEXEC);
	if (c->stop_efd < 0)
		return -errno;
	if (pthread_create(&c->thread, NULL, shmc_main, c))
		return -EAGAIN;
	c->running = true;
	return 0;
}

static int shmc_open(const char *uri, struct shmc **out)
{
	struct shmc_hello h = { .fds = { -1, -1, -1 } };
	struct shmc *c;
	int sock = -1, r;

	if ((r = shmc_connect(uri, &sock)) || (r = shmc_recv_hello(sock, uri, &h)))
		goto fail;
	if (!devio_shm_geometry_ok(h.w[DEVIO_SHM_H_NSLOTS], h.w[DEVIO_SHM_H_DATA_SIZE])) {
		devio_err("%s: bad region geometry: %llu slots of %llu bytes", uri,
			  (unsigned long long)h.w[DEVIO_SHM_H_NSLOTS], (unsigned long long)h.w[DEVIO_SHM_H_DATA_SIZE]);
		r = -EPROTO;
		goto fail;
	}
	c = calloc(1, sizeof(*c) + h.w[DEVIO_SHM_H_NSLOTS] * sizeof(c->slots[0]));
	if (!c) {
		r = -ENOMEM;
		goto fail;
	}
	snprintf(c->uri, sizeof(c->uri), "%s", uri);
	pthread_mutex_init(&c->lock, NULL);
	c->sock = sock;
	c->req_efd = h.fds[1];
	c->resp_efd = h.fds[2];
	c->stop_efd = -1;
	c->timeout_s = shmc_timeout();
	r = shmc_check(c, &h);
	if (!r && (r = shmc_setup(c, &h)))
		devio_err("%s: cannot set up the region: %s", uri, strerror(-r));
	close(h.fds[0]); /* mapped, or refused */
	if (r) {
		shmc_free(c);
		return r;
	}
	*out = c;
	return 0;
fail:
	for (int i = 0; i < 3; i++)
		if (h.fds[i] >= 0)
			close(h.fds[i]);
	if (sock >= 0)
		close(sock);
	return r;
}

/* A first request at once (a read of the first block): the server drops a
 * client that submits none within its handshake timeout (frontends/shm.c).
 * Its answer does not matter, only that the ring works. */
static int shmc_first_request(struct shmc *c, uint64_t size)
{
	uint64_t len = c->info[1] > 1 ? c->info[1] : 512;
	void *buf;
	int r;

	if (len > size)
		len = size;
	if (!(buf = malloc(len)))
		return -ENOMEM;
	r = shmc_sync(c, DEVIO_OP_READ, buf, len, 0);
	free(buf);
	pthread_mutex_lock(&c->lock);
	if (c->dead)
		devio_err("%s: the first request failed: %s", c->uri, strerror(-(r ? r : c->dead)));
	r = c->dead;
	pthread_mutex_unlock(&c->lock);
	return r;
}

int devio_remote_shm_open(const char *uri, const struct devio_open_opts *opts, struct devio_backend **out)
{
	static const struct devio_open_opts none;
	struct devio_backend *b;
	struct shmc *c;
	uint64_t size;
	int r;

	if (!opts)
		opts = &none;
	if (opts->partition) {
		devio_err("%s: --partition does not apply to a devio server (serve the partition there)", uri);
		return -EINVAL;
	}
	if ((r = shmc_open(uri, &c)))
		return r;
	if (c->info[1] > SHMC_MAX_ALIGN || (c->info[1] & (c->info[1] - 1))) {
		devio_err("%s: server wants %llu-byte alignment: not a power of two up to %u", uri,
			  (unsigned long long)c->info[1], SHMC_MAX_ALIGN);
		r = -EINVAL;
	} else {
		r = shmc_window(c, opts, &size);
	}
	if (!r)
		r = shmc_first_request(c, size);
	b = r ? NULL : calloc(1, sizeof(*b));
	if (!b) {
		shmc_free(c);
		return r ? r : -ENOMEM;
	}
	b->ops = &shmc_ops;
	b->size = size;
	b->block_size = c->info[1] ? (uint32_t)c->info[1] : 1;
	b->priv = c;
	b->caps = DEVIO_CAP_CACHE | DEVIO_CAP_MULTI_CONN;
	if (c->ext & DEVIO_SHM_EXT_FLUSH)
		b->caps |= DEVIO_CAP_FLUSH | DEVIO_CAP_FUA;
	if (opts->readonly)
		b->caps |= DEVIO_CAP_READONLY;
	b->caps |= devio_proto_caps(c->info[2]);
	*out = b;
	return 0;
}
