/* fuse.c - the --fuse front end: the default export as one regular file in
 * a FUSE mount (MOUNTPOINT/disk, or MOUNTPOINT/NAME for a named export),
 * optionally behind a loop device (--loop) so that the machine gets a real
 * block device.
 *
 * It speaks the FUSE protocol itself (lib/fuse_codec.c): Debian 12's
 * libfuse predates the io_uring transport.  Two transports:
 *   uring - FUSE over io_uring: one queue per possible CPU, each a thread
 *           pinned to its CPU with an io_uring of `depth` ring entries
 *           (the thread, ring and completion inbox: lib/ring.c); an
 *           entry's payload buffer is where the backend reads into and
 *           writes from, and one COMMIT_AND_FETCH both answers a request
 *           and takes the next.  /dev/fuse is still read by one thread for
 *           INIT, FORGET, INTERRUPT and whatever arrives before the ring.
 *   dev   - /dev/fuse read by several threads, each on its own clone of
 *           the device (FUSE_DEV_IOC_CLONE), each running one request at a
 *           time.
 * auto uses uring when /sys/module/fuse/parameters/enable_uring is Y;
 * uring needs it on, and only --fuse-enable-uring switches it on (for the
 * whole machine, said on stderr).
 *
 * The mount is ours by identity: a mount point that already is one is
 * refused, the mount's ID and connection number are taken from
 * /proc/self/mountinfo right after mount(), and stop unmounts the path
 * only while our mount is the topmost there. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <liburing.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include "../lib/fuse_proto.h"
#include "devio/frontend.h"
#include "devio/loop.h"
#include "devio/ring.h"
#include "devio/mountinfo.h"
#include "devio/util.h"
#include "devio/workers.h"

#define FUSE_MAX_WRITE (1u << 20)
#define DEFAULT_DEPTH 16
#define MAX_QUEUES 1024
#define HDR_ROOM 4096 /* room before the data in a /dev/fuse read buffer */
#define DEV_IOC_CLONE _IOR(229, 0, uint32_t)
#define ENABLE_URING "/sys/module/fuse/parameters/enable_uring"

struct fuse_fe;

/* One ring entry: the header and payload buffers the kernel fills.  It
 * belongs to the kernel's queue q; its command may sit on any queue
 * thread's ring (the thread that last answered it). */
struct ring_ent {
	struct fuse_uring_req_header *hdr;
	uint8_t *payload;
	struct iovec iov[2];
	struct ring_queue *q;
	struct devio_ring_msg post; /* handed to another queue's thread (devio_ring_share) */
	struct devio_fuse_msg msg;
	uint64_t commit_id;
	bool dead;
};

/* One FUSE queue: a ring thread (lib/ring.c) and the entries it
 * registered for the kernel's queue qid. */
struct ring_queue {
	struct fuse_fe *fe;
	unsigned qid;
	struct devio_ring *ring;
	struct ring_ent *ents;
	unsigned nents;
	unsigned cap;             /* entry commands its ring has room for */
	atomic_uint held;         /* entry commands on its ring now (entries drift between rings) */
	_Atomic uint64_t served;  /* requests this thread ran (stop log) */
	_Atomic uint64_t shared;  /* of them, handed over by another queue's thread */
};

struct dev_thread {
	struct fuse_fe *fe;
	pthread_t thread;
	int fd;
};

struct fuse_fe {
	struct devio_fuse_fs fs;
	struct devio_backend *backend;
	char mnt[PATH_MAX];
	char file[PATH_MAX + 256];
	int fd;
	bool mounted;
	bool allow_other;         /* --allow-other: mounted with allow_other */
	int mnt_id;              /* our mount's ID (0: unknown) */
	unsigned conn_minor;     /* its st_dev minor: the fusectl connection number */
	bool use_uring;
	uint32_t payload_sz;
	unsigned depth;
	struct ring_queue *queues;
	unsigned nqueues;
	atomic_uint live;         /* ring entries the kernel has not ended */
	struct devio_ring **peers; /* every queue's ring, for devio_ring_share */
	atomic_uint npeers;       /* set once every queue has started */
	struct dev_thread *devs;
	unsigned ndevs;
	struct devio_workers *workers;
	struct devio_loop loop;
	bool has_loop;
	atomic_bool stopping;
	atomic_ullong ring_requests, dev_requests; /* logged at stop */
	uint64_t ring_ios;       /* backend I/Os that went on the queue rings (at stop) */
};

/* ---- helpers ---- */

/* Page-aligned and not touched: a big payload buffer costs memory only
 * once the kernel or a backend writes to it. */
static void *fuse_alloc_aligned(size_t len)
{
	void *p = NULL;

	if (posix_memalign(&p, 4096, len))
		return NULL;
	return p;
}

static int fuse_read_sys_char(const char *path)
{
	char c = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	if (read(fd, &c, 1) != 1)
		c = 0;
	close(fd);
	return c;
}

/* The number of possible CPUs: the kernel keeps one FUSE queue for each. */
static unsigned fuse_possible_cpus(void)
{
	char buf[256] = "";
	unsigned max = 0;
	int fd = open("/sys/devices/system/cpu/possible", O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd >= 0) {
		n = read(fd, buf, sizeof(buf) - 1);
		close(fd);
		if (n > 0) {
			buf[n] = '\0';
			/* "0-3" or "0,2-5": the highest number + 1 */
			for (char *p = buf; *p; p++)
				if (*p >= '0' && *p <= '9') {
					unsigned v = (unsigned)strtoul(p, &p, 10);
					if (v + 1 > max)
						max = v + 1;
					p--;
				}
		}
	}
	if (max == 0 || max > MAX_QUEUES)
		max = (unsigned)sysconf(_SC_NPROCESSORS_CONF);
	return max ? max : 1;
}

/* Send a reply on /dev/fuse; the request may have been interrupted (ENOENT). */
static void fuse_dev_reply(struct fuse_fe *fe, int fd, struct devio_fuse_msg *msg)
{
	struct fuse_out_header oh = { .error = msg->error, .unique = msg->in.unique };
	struct iovec iov[2] = { { &oh, sizeof(oh) }, { msg->reply, msg->reply_len } };
	ssize_t n;

	if (msg->no_reply)
		return;
	oh.len = (uint32_t)(sizeof(oh) + msg->reply_len);
	n = writev(fd, iov, msg->reply_len ? 2 : 1);
	if (n < 0 && errno != ENOENT && errno != ENODEV)
		devio_warn("fuse %s: reply to %s (unique %llu): %s", fe->mnt, devio_fuse_opname(msg->in.opcode),
			   (unsigned long long)msg->in.unique, strerror(errno));
}

/* ---- the /dev/fuse transport ---- */

/* A /dev/fuse thread blocks on its request anyway: call the backend's
 * synchronous callbacks directly rather than hand the request to the
 * backend's own thread and wait for it to come back. */
static void fuse_run_sync_io(struct fuse_fe *fe, struct devio_fuse_msg *msg)
{
	struct devio_request *req = &msg->req;

	if (!msg->has_io)
		return;
	devio_run(fe->backend, req);
	devio_fuse_finish(&fe->fs, msg);
}

/* Read one request from fd into buf and answer it.  Returns 0, or -ENODEV
 * when the connection is gone. */
static int fuse_dev_serve_one(struct fuse_fe *fe, int fd, uint8_t *base, uint8_t *reply)
{
	/* a WRITE's data (after 80 bytes of headers) lands page-aligned */
	uint8_t *buf = base + HDR_ROOM - sizeof(struct fuse_in_header) - sizeof(struct fuse_rw_in);
	size_t cap = fe->payload_sz + sizeof(struct fuse_in_header) + sizeof(struct fuse_rw_in);
	struct devio_fuse_msg msg;
	ssize_t n;

	n = read(fd, buf, cap);
	if (n < 0) {
		if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
			return 0;
		if (errno != ENODEV)
			devio_err("fuse %s: read /dev/fuse: %s", fe->mnt, strerror(errno));
		return -ENODEV;
	}
	memset(&msg, 0, sizeof(msg));
	msg.reply = reply;
	msg.reply_cap = fe->payload_sz;
	if (devio_fuse_split(buf, (size_t)n, &msg)) {
		devio_warn("fuse %s: malformed request of %zd bytes (opcode %u)", fe->mnt, n, msg.in.opcode);
		if (!msg.in.unique)
			return 0;
		msg.error = -EINVAL;
	} else {
		atomic_fetch_add_explicit(&fe->dev_requests, 1, memory_order_relaxed);
		devio_fuse_handle(&fe->fs, &msg);
		fuse_run_sync_io(fe, &msg);
	}
	fuse_dev_reply(fe, fd, &msg);
	return 0;
}

static void *fuse_dev_thread_main(void *arg)
{
	struct dev_thread *t = arg;
	struct fuse_fe *fe = t->fe;
	uint8_t *base = fuse_alloc_aligned(HDR_ROOM + fe->payload_sz);
	uint8_t *reply = fuse_alloc_aligned(fe->payload_sz);

	if (!base || !reply) {
		devio_err("fuse %s: out of memory for a request buffer", fe->mnt);
		goto out;
	}
	while (fuse_dev_serve_one(fe, t->fd, base, reply) == 0)
		;
out:
	free(base);
	free(reply);
	return NULL;
}

static int fuse_clone_fd(struct fuse_fe *fe)
{
	uint32_t master = (uint32_t)fe->fd;
	int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	if (ioctl(fd, DEV_IOC_CLONE, &master) < 0) {
		int r = -errno;
		close(fd);
		return r;
	}
	return fd;
}

static int fuse_start_dev_threads(struct fuse_fe *fe, unsigned n)
{
	fe->devs = calloc(n, sizeof(*fe->devs));
	if (!fe->devs)
		return -ENOMEM;
	for (unsigned i = 0; i < n; i++) {
		struct dev_thread *t = &fe->devs[i];

		t->fe = fe;
		t->fd = i == 0 ? fe->fd : fuse_clone_fd(fe);
		if (t->fd < 0) {
			devio_warn("fuse %s: FUSE_DEV_IOC_CLONE: %s; %u threads", fe->mnt, strerror(-t->fd), i);
			break;
		}
		if (pthread_create(&t->thread, NULL, fuse_dev_thread_main, t)) {
			if (i)
				close(t->fd);
			break;
		}
		fe->ndevs++;
	}
	return fe->ndevs ? 0 : -EAGAIN;
}

/* ---- the io_uring transport ----
 *
 * The queue thread, its ring and the completion inbox are lib/ring.c's;
 * here are the FUSE commands: REGISTER for each entry, then for each
 * request COMMIT_AND_FETCH with the answer. */

/* An entry's command on thread q's ring, for the entry's own kernel queue. */
static int fuse_prep_cmd(struct ring_queue *q, struct ring_ent *e, uint32_t cmd_op)
{
	struct io_uring_sqe *sqe = devio_ring_get_sqe(q->ring);
	struct fuse_uring_cmd_req *cmd;

	if (!sqe)
		return -EBUSY;
	memset(sqe, 0, 128);
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = q->fe->fd;
	sqe->cmd_op = cmd_op;
	sqe->addr = (uint64_t)(uintptr_t)e->iov;
	sqe->len = 2;
	devio_ring_sqe_owner(sqe, e);
	atomic_fetch_add_explicit(&q->held, 1, memory_order_relaxed);
	cmd = (struct fuse_uring_cmd_req *)sqe->cmd;
	cmd->qid = (uint16_t)e->q->qid;
	cmd->commit_id = e->commit_id;
	return 0;
}

/* Answer the entry's request and take the next one. */
static void fuse_commit(struct ring_queue *q, struct ring_ent *e)
{
	struct fuse_out_header oh = { .error = e->msg.error, .unique = e->msg.in.unique };

	oh.len = (uint32_t)(sizeof(oh) + e->msg.reply_len);
	memcpy(e->hdr->in_out, &oh, sizeof(oh));
	e->hdr->ring_ent_in_out.payload_sz = (uint32_t)e->msg.reply_len;
	if (fuse_prep_cmd(q, e, DEVIO_FUSE_URING_CMD_COMMIT_AND_FETCH))
		devio_err("fuse %s: queue %u: no submission slot to answer a request", q->fe->mnt, q->qid);
}

/* The backend finished an entry's request (owner->done). */
static void fuse_ring_io_done(struct devio_ring *r, void *ctx, struct devio_request *req)
{
	struct ring_queue *q = ctx;
	struct ring_ent *e = req->opaque;

	devio_fuse_finish(&q->fe->fs, &e->msg);
	fuse_commit(q, e);
}

/* A request has arrived in entry e. */
static void fuse_ring_request(struct ring_queue *q, struct ring_ent *e)
{
	struct fuse_fe *fe = q->fe;
	struct devio_fuse_msg *msg = &e->msg;
	uint32_t psz = e->hdr->ring_ent_in_out.payload_sz;

	memset(msg, 0, sizeof(*msg));
	memcpy(&msg->in, e->hdr->in_out, sizeof(msg->in));
	e->commit_id = e->hdr->ring_ent_in_out.commit_id;
	msg->arg = e->hdr->op_in;
	msg->arglen = sizeof(e->hdr->op_in);
	msg->data = e->payload;
	msg->datalen = psz < fe->payload_sz ? psz : fe->payload_sz;
	msg->reply = e->payload;
	msg->reply_cap = fe->payload_sz;
	atomic_fetch_add_explicit(&fe->ring_requests, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&q->served, 1, memory_order_relaxed);
	devio_fuse_handle(&fe->fs, msg);
	if (!msg->has_io) {
		fuse_commit(q, e);
		return;
	}
	msg->req.opaque = e;
	devio_ring_submit(q->ring, fe->backend, &msg->req);
}

/* Bytes a request moves: a READ's size, a WRITE's payload. */
static uint32_t fuse_ring_req_bytes(const struct ring_ent *e)
{
	const struct fuse_in_header *in = (const struct fuse_in_header *)e->hdr->in_out;
	const struct fuse_rw_in *rw = (const struct fuse_rw_in *)e->hdr->op_in;

	if (in->opcode == DEVIO_FUSE_READ)
		return rw->size;
	return in->opcode == DEVIO_FUSE_WRITE ? e->hdr->ring_ent_in_out.payload_sz : 0;
}

/* The CQE of an entry's REGISTER or COMMIT_AND_FETCH (owner->cqe). */
static void fuse_ring_ent_cqe(struct devio_ring *r, void *ctx, void *data, int res)
{
	struct ring_queue *q = ctx;
	struct ring_ent *e = data;

	atomic_fetch_sub_explicit(&q->held, 1, memory_order_relaxed);
	if (res < 0) {
		if (res != -ENOTCONN && res != -ECANCELED && res != -ECONNABORTED)
			devio_warn("fuse %s: queue %u: ring entry failed: %s", q->fe->mnt, e->q->qid, strerror(-res));
		if (!e->dead) {
			e->dead = true;
			atomic_fetch_sub(&q->fe->live, 1);
		}
		return;
	}
	/* the kernel picked the queue by the issuing CPU: a burst from one CPU
	 * may go to an idle queue's thread, which answers on its own ring (the
	 * kernel takes an entry's answer from any ring) */
	unsigned npeers = atomic_load(&q->fe->npeers); /* before peers: it is set after them */

	if (!npeers || !devio_ring_share(r, q->fe->peers, npeers, q->qid, fuse_ring_req_bytes(e), &e->post))
		fuse_ring_request(q, e);
}

/* May this queue's thread take a request from another (owner->can_take)?
 * Only while its ring has room for one more entry's command and I/O. */
static bool fuse_ring_can_take(struct devio_ring *r, void *ctx)
{
	struct ring_queue *q = ctx;

	return atomic_load_explicit(&q->held, memory_order_relaxed) < q->cap;
}

/* A request another queue's thread handed over (owner->post). */
static void fuse_ring_post(struct devio_ring *r, void *ctx, struct devio_ring_msg *m)
{
	struct ring_queue *q = ctx;
	struct ring_ent *e = (struct ring_ent *)((char *)m - offsetof(struct ring_ent, post));

	atomic_fetch_add_explicit(&q->shared, 1, memory_order_relaxed);
	fuse_ring_request(q, e);
}

/* Done when stopping or when the kernel has ended every entry; the ring
 * module waits for the requests still with the backend (they use our
 * buffers). */
static bool fuse_ring_finished(struct devio_ring *r, void *ctx)
{
	struct ring_queue *q = ctx;

	return atomic_load(&q->fe->live) == 0 || atomic_load(&q->fe->stopping);
}

/* On the queue thread: the entries' buffers, one REGISTER each. */
static int fuse_ring_setup(struct devio_ring *r, void *ctx)
{
	struct ring_queue *q = ctx;
	struct fuse_fe *fe = q->fe;
	struct io_uring_cqe *cqe;
	int res;

	q->ring = r;
	for (unsigned i = 0; i < q->nents; i++) {
		struct ring_ent *e = &q->ents[i];

		e->q = q;
		e->hdr = fuse_alloc_aligned(sizeof(*e->hdr));
		e->payload = fuse_alloc_aligned(fe->payload_sz);
		if (!e->hdr || !e->payload)
			return -ENOMEM;
		memset(e->hdr, 0, sizeof(*e->hdr));
		e->iov[0] = (struct iovec){ e->hdr, sizeof(*e->hdr) };
		e->iov[1] = (struct iovec){ e->payload, fe->payload_sz };
		res = fuse_prep_cmd(q, e, DEVIO_FUSE_URING_CMD_REGISTER);
		if (res)
			return res;
		atomic_fetch_add(&fe->live, 1);
	}
	res = io_uring_submit(devio_ring_uring(r));
	if (res < 0)
		return res;
	/* a refused REGISTER completes at once */
	if (io_uring_peek_cqe(devio_ring_uring(r), &cqe) == 0 && cqe->res < 0)
		return cqe->res;
	return 0;
}

static const struct devio_ring_owner ring_owner = {
	.setup = fuse_ring_setup,
	.cqe = fuse_ring_ent_cqe,
	.done = fuse_ring_io_done,
	.finished = fuse_ring_finished,
	.post = fuse_ring_post,
	.can_take = fuse_ring_can_take,
};

/* Is cpu online?  Requests come from the CPU of the issuing task, so only
 * online CPUs' queues need more than one entry.  Parses "0-3,8". */
static bool fuse_cpu_usable(unsigned cpu)
{
	char buf[512] = "";
	int fd = open("/sys/devices/system/cpu/online", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;
	char *p = buf;

	if (fd >= 0)
		close(fd);
	if (n <= 0)
		return true;
	buf[n] = '\0';
	while (*p >= '0' && *p <= '9') {
		unsigned long lo = strtoul(p, &p, 10), hi = lo;

		if (*p == '-')
			hi = strtoul(p + 1, &p, 10);
		if (cpu >= lo && cpu <= hi)
			return true;
		if (*p != ',')
			break;
		p++;
	}
	return false;
}

static int fuse_start_queue(struct fuse_fe *fe, struct ring_queue *q, unsigned qid)
{
	char name[PATH_MAX + 32];
	cpu_set_t cpu;
	struct devio_ring_params p = {
		.name = name,
		.flags = IORING_SETUP_SQE128,
		.try_flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
		.cpus = &cpu,
		.workers = fe->workers,
		.owner = &ring_owner,
		.ctx = q,
	};

	q->fe = fe;
	q->qid = qid;
	q->nents = fuse_cpu_usable(qid) ? fe->depth : 1; /* the kernel wants an entry on every queue */
	q->ents = calloc(q->nents, sizeof(*q->ents));
	if (!q->ents)
		return -ENOMEM;
	snprintf(name, sizeof(name), "fuse %s: queue %u", fe->mnt, qid);
	CPU_ZERO(&cpu);
	CPU_SET(qid, &cpu);
	p.entries = q->nents * 2 + 8; /* commands, the backend's I/O, the inbox */
	/* the completion queue (twice the submission queue, so at least
	 * 2 * p.entries) holds a CQE for every command and one for its I/O */
	q->cap = p.entries;
	return devio_ring_start(&p, &q->ring);
}

static int fuse_start_rings(struct fuse_fe *fe)
{
	int r;

	fe->nqueues = fuse_possible_cpus();
	fe->queues = calloc(fe->nqueues, sizeof(*fe->queues));
	if (!fe->queues)
		return -ENOMEM;
	for (unsigned i = 0; i < fe->nqueues; i++) {
		r = fuse_start_queue(fe, &fe->queues[i], i);
		if (r) {
			devio_err("fuse %s: queue %u: cannot register ring entries: %s", fe->mnt, i, strerror(-r));
			return r;
		}
	}
	fe->peers = calloc(fe->nqueues, sizeof(*fe->peers));
	for (unsigned i = 0; fe->peers && i < fe->nqueues; i++)
		fe->peers[i] = fe->queues[i].ring;
	if (fe->peers) /* else no sharing */
		atomic_store(&fe->npeers, fe->nqueues);
	return 0;
}

/* Stop every queue first (they end together) and wait for every thread
 * (one may still hand a request to another's ring), then release them; the
 * entries' buffers last: an entry's command may sit on any queue's ring. */
static void fuse_stop_rings(struct fuse_fe *fe)
{
	atomic_store(&fe->npeers, 0);
	for (unsigned i = 0; fe->queues && i < fe->nqueues; i++)
		devio_ring_stop(fe->queues[i].ring);
	for (unsigned i = 0; fe->queues && i < fe->nqueues; i++)
		devio_ring_join(fe->queues[i].ring);
	for (unsigned i = 0; fe->queues && i < fe->nqueues; i++) {
		struct ring_queue *q = &fe->queues[i];
		struct devio_ring_stats st = { 0 };

		devio_ring_free(q->ring, &st); /* cancels entries still registered */
		fe->ring_ios += st.ring_ios;
		if (atomic_load(&q->served)) /* which CPUs' queues the kernel used */
			devio_info("fuse %s: queue %u served %llu requests (%llu handed over by another queue), "
				   "%llu io_uring_enter", fe->mnt, i, (unsigned long long)atomic_load(&q->served),
				   (unsigned long long)atomic_load(&q->shared), (unsigned long long)st.enters);
	}
	for (unsigned i = 0; fe->queues && i < fe->nqueues; i++) {
		struct ring_queue *q = &fe->queues[i];

		for (unsigned j = 0; q->ents && j < q->nents; j++) {
			free(q->ents[j].hdr);
			free(q->ents[j].payload);
		}
		free(q->ents);
	}
	free(fe->queues);
	fe->queues = NULL;
	free(fe->peers);
	fe->peers = NULL;
}

/* ---- mount, INIT, unmount ---- */

/* A mount point that already is one would get our mount stacked on it. */
static int fuse_refuse_mounted(struct fuse_fe *fe)
{
	struct devio_mount m;

	if (devio_mount_top(fe->mnt, &m) != 1)
		return 0;
	devio_err("fuse %s: already a mount point (%s from %s); refusing to mount on top of it", fe->mnt, m.fstype,
		  m.source);
	return -EBUSY;
}

/* Our mount's identity, right after mount(): the topmost at the path. */
static void fuse_remember_mount(struct fuse_fe *fe)
{
	struct devio_mount m;

	if (devio_mount_top(fe->mnt, &m) == 1 && !strcmp(m.fstype, "fuse.devio")) {
		fe->mnt_id = m.id;
		fe->conn_minor = m.minor;
	} else {
		devio_warn("fuse %s: our mount is not in /proc/self/mountinfo; stop unmounts by path", fe->mnt);
	}
}

static int fuse_do_mount(struct fuse_fe *fe)
{
	char opts[256];
	int r;

	if ((r = fuse_refuse_mounted(fe)))
		return r;
	fe->fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
	if (fe->fd < 0) {
		devio_err("fuse %s: /dev/fuse: %s", fe->mnt, strerror(errno));
		return -errno;
	}
	/* default_permissions: the kernel checks the file's owner and mode;
	 * without allow_other only this user (root) passes the mount at all */
	snprintf(opts, sizeof(opts),
		 "fd=%d,rootmode=40000,user_id=%u,group_id=%u,%sdefault_permissions,max_read=%u",
		 fe->fd, (unsigned)getuid(), (unsigned)getgid(), fe->allow_other ? "allow_other," : "",
		 fe->fs.max_write);
	if (mount("devio", fe->mnt, "fuse.devio", MS_NOSUID | MS_NODEV, opts) < 0) {
		r = -errno;
		devio_err("fuse %s: mount: %s", fe->mnt, strerror(-r));
		return r;
	}
	fe->mounted = true;
	fuse_remember_mount(fe);
	return 0;
}

/* The kernel sends INIT first; answer it here, before any thread runs. */
static int fuse_do_init_handshake(struct fuse_fe *fe)
{
	uint8_t *base = fuse_alloc_aligned(HDR_ROOM + fe->payload_sz);
	uint8_t *reply = fuse_alloc_aligned(fe->payload_sz);
	int r = 0;

	if (!base || !reply) {
		r = -ENOMEM;
		goto out;
	}
	while (!fe->fs.initialized && r == 0)
		r = fuse_dev_serve_one(fe, fe->fd, base, reply);
	if (r)
		devio_err("fuse %s: the kernel closed the connection during INIT", fe->mnt);
out:
	free(base);
	free(reply);
	return r;
}

/* Abort the connection through fusectl (for a lazily unmounted file system). */
static void fuse_abort_connection(struct fuse_fe *fe, unsigned conn)
{
	char path[96];

	snprintf(path, sizeof(path), "/sys/fs/fuse/connections/%u/abort", conn);
	int r = devio_write_ctl(path, "1");

	/* fusectl is not always mounted; as root we can mount it */
	if (r == -ENOENT && mount("fusectl", "/sys/fs/fuse/connections", "fusectl", 0, NULL) == 0) {
		devio_info("fuse %s: mounted fusectl on /sys/fs/fuse/connections", fe->mnt);
		r = devio_write_ctl(path, "1");
	}
	if (r < 0)
		devio_warn("fuse %s: cannot abort the connection via %s: %s", fe->mnt, path, strerror(-r));
}

/* Is our mount still the topmost where it is?  (No identity: assume so.)
 * If it was moved, fe->mnt follows it. */
static bool fuse_ours_on_top(struct fuse_fe *fe)
{
	char point[PATH_MAX];
	struct devio_mount m;
	bool top = false;
	int r;

	if (!fe->mnt_id)
		return true;
	r = devio_mount_by_id(fe->mnt_id, &m, point, sizeof(point), &top);
	if (r == 1 && strcmp(point, fe->mnt)) {
		devio_warn("fuse %s: our mount is at %s now; unmounting it there", fe->mnt, point);
		memcpy(fe->mnt, point, sizeof(fe->mnt));
	}
	if (r == 0) {
		devio_warn("fuse %s: our mount is gone already (unmounted by someone else)", fe->mnt);
		fe->mounted = false;
		return false;
	}
	if (r == 1 && !top) {
		devio_warn("fuse %s: another mount covers ours; not unmounting by path, aborting our connection "
			   "(the dead mount stays under it)", fe->mnt);
		fuse_abort_connection(fe, fe->conn_minor);
		fe->mounted = false;
		return false;
	}
	return true;
}

static void fuse_do_unmount(struct fuse_fe *fe)
{
	struct stat st;
	bool have_dev;

	if (!fe->mounted || !fuse_ours_on_top(fe))
		return;
	have_dev = fe->mnt_id ? true : stat(fe->mnt, &st) == 0;
	if (!fe->mnt_id && have_dev)
		fe->conn_minor = minor(st.st_dev);
	for (int i = 0; i < 50; i++) {
		if (umount2(fe->mnt, 0) == 0) {
			fe->mounted = false;
			return;
		}
		if (errno != EBUSY)
			break;
		struct timespec ts = { 0, 20 * 1000 * 1000 };
		nanosleep(&ts, NULL);
	}
	devio_warn("fuse %s: unmount: %s; detaching lazily and aborting the connection", fe->mnt, strerror(errno));
	if (umount2(fe->mnt, MNT_DETACH) < 0)
		devio_err("fuse %s: lazy unmount: %s", fe->mnt, strerror(errno));
	if (have_dev)
		fuse_abort_connection(fe, fe->conn_minor);
	fe->mounted = false;
}

/* ---- the front end ---- */

/* --fuse-enable-uring: the one place that changes the kernel's setting. */
static int fuse_enable_uring(struct fuse_fe *fe)
{
	int r = devio_write_ctl(ENABLE_URING, "Y");

	if (r < 0) {
		devio_err("fuse %s: --fuse-enable-uring: cannot write Y to %s: %s", fe->mnt, ENABLE_URING, strerror(-r));
		return -EOPNOTSUPP;
	}
	devio_warn("fuse %s: --fuse-enable-uring: set %s to Y for the whole machine; it stays on (write N to "
		   "turn it off)", fe->mnt, ENABLE_URING);
	return 0;
}

static int fuse_choose_transport(struct fuse_fe *fe, const char *t, bool may_enable)
{
	int c = fuse_read_sys_char(ENABLE_URING);

	if (may_enable && c != 'Y' && (!t || strcmp(t, "dev"))) {
		int r = fuse_enable_uring(fe);
		if (r)
			return r;
		c = 'Y';
	}
	if (!t || !strcmp(t, "auto")) {
		fe->use_uring = c == 'Y';
		return 0;
	}
	if (!strcmp(t, "dev")) {
		fe->use_uring = false;
		return 0;
	}
	/* uring, asked for: never switched on behind the user's back */
	if (c != 'Y') {
		devio_err("fuse %s: --fuse-transport uring: the kernel has FUSE over io_uring off (%s is %s); "
			  "--fuse-enable-uring switches it on for the whole machine", fe->mnt, ENABLE_URING,
			  c < 0 ? "missing" : "N");
		return -EOPNOTSUPP;
	}
	fe->use_uring = true;
	return 0;
}

static void fuse_fe_free(struct fuse_fe *fe)
{
	if (fe->has_loop)
		devio_loop_detach(&fe->loop);
	fe->has_loop = false;
	fuse_do_unmount(fe);
	atomic_store(&fe->stopping, true);
	fuse_stop_rings(fe);
	for (unsigned i = 0; i < fe->ndevs; i++) {
		pthread_join(fe->devs[i].thread, NULL);
		if (i)
			close(fe->devs[i].fd);
	}
	free(fe->devs);
	devio_workers_free(fe->workers);
	if (fe->fs.initialized)
		devio_info("fuse %s: %llu requests over the io_uring, %llu over /dev/fuse, %llu backend I/Os on the queue rings",
			   fe->mnt, (unsigned long long)atomic_load(&fe->ring_requests),
			   (unsigned long long)atomic_load(&fe->dev_requests), (unsigned long long)fe->ring_ios);
	if (fe->fd >= 0)
		close(fe->fd);
	free(fe);
}

static int fuse_start_transport(struct fuse_fe *fe, const struct devio_serve_opts *o, bool forced)
{
	unsigned ncpu = (unsigned)sysconf(_SC_NPROCESSORS_ONLN);
	int r;

	if (fe->use_uring && !fe->fs.uring_granted) {
		if (forced) {
			devio_err("fuse %s: the kernel did not grant FUSE_OVER_IO_URING", fe->mnt);
			return -EOPNOTSUPP;
		}
		devio_warn("fuse %s: the kernel did not grant FUSE_OVER_IO_URING; using /dev/fuse", fe->mnt);
		fe->use_uring = false;
	}
	if (!fe->use_uring)
		return fuse_start_dev_threads(fe, o->threads ? o->threads : (ncpu * 4 > 16 ? 16 : ncpu * 4));
	/* The core's policy: backends that wait (remote servers) get a pool so
	 * that many requests are in flight; the RAM disk only copies memory,
	 * which the ring thread of each CPU does faster itself. */
	if (devio_wants_pool(fe->backend, o->threads)) {
		fe->workers = devio_workers_new(devio_pool_size(o->threads));
		if (!fe->workers)
			return -ENOMEM;
	}
	r = fuse_start_dev_threads(fe, 1);
	if (r)
		return r;
	return fuse_start_rings(fe);
}

/* The --fuse front end's options (fuse_options below). */
struct fuse_opts {
	bool loop;             /* --loop: attach a loop device to the file */
	const char *transport; /* --fuse-transport auto|uring|dev; NULL = auto */
	unsigned depth;        /* --depth: ring entries per queue, 0 = DEFAULT_DEPTH */
	uint32_t block_size;   /* --block-size: the loop device's, 0 = 512 */
	bool enable_uring;     /* --fuse-enable-uring: write Y to fuse_enable_uring (machine-wide) */
	unsigned timeout;      /* --fuse-timeout: the kernel's request timeout in seconds, 0 = none */
	unsigned mode;         /* --fuse-mode: the file's mode, 0 = the image's own (0600 if none) */
	bool allow_other;      /* --allow-other: users other than the server's may pass the mount */
};

/* Who may open the file: the image's own owner and mode when the source
 * is a file or device (a 0600 image stays 0600), else the server's own user and 0600;
 * --fuse-mode sets the mode. */
static void fuse_owner(struct fuse_fe *fe, const char *source, const struct fuse_opts *o)
{
	struct stat st;

	fe->fs.uid = (uint32_t)getuid();
	fe->fs.gid = (uint32_t)getgid();
	fe->fs.mode = 0600;
	if (source && stat(source, &st) == 0 && (S_ISREG(st.st_mode) || S_ISBLK(st.st_mode))) {
		fe->fs.uid = st.st_uid;
		fe->fs.gid = st.st_gid;
		fe->fs.mode = st.st_mode & 0777;
	}
	if (o->mode)
		fe->fs.mode = o->mode;
	fe->allow_other = o->allow_other;
}

static int fuse_parse_mode(const char *name, const char *val, void *field)
{
	char *end;
	unsigned long m = val ? strtoul(val, &end, 8) : 0;

	if (!val || !*val || *end || m == 0 || m > 0777) {
		devio_err("--%s: want an octal mode from 1 to 0777 (e.g. 0640), got '%s'", name, val ? val : "");
		return -EINVAL;
	}
	*(unsigned *)field = (unsigned)m;
	return 0;
}

static int fuse_attach_loop(struct fuse_fe *fe, const struct fuse_opts *o)
{
	int r = devio_loop_attach(fe->file, fe->fs.readonly, o->block_size ? o->block_size : 512, &fe->loop);

	if (r)
		return r;
	fe->has_loop = true;
	devio_info("fuse %s: %s attached to %s%s", fe->mnt, fe->loop.path, fe->file,
		   fe->loop.direct_io ? " (direct I/O)" : "");
	return 0;
}

static int fuse_start(struct devio_server *srv, const char *arg, const void *opts, void **state)
{
	static const struct fuse_opts defaults;
	const struct fuse_opts *o = opts ? opts : &defaults;
	struct devio_export *ex = &srv->exports[0]; /* the default export */
	const char *t = o->transport;
	struct fuse_fe *fe;
	int r;

	if (!arg || !*arg || strlen(arg) >= sizeof(fe->mnt) - 260) {
		devio_err("--fuse: want a mount point directory");
		return -EINVAL;
	}
	fe = calloc(1, sizeof(*fe));
	if (!fe)
		return -ENOMEM;
	fe->fd = -1;
	fe->backend = ex->backend;
	if (!realpath(arg, fe->mnt)) {
		r = -errno;
		devio_err("fuse %s: %s%s", arg, strerror(-r),
			  r == -ENOTCONN ? " (a dead FUSE mount: `devio detach` removes it)" : "");
		free(fe);
		return r;
	}
	snprintf(fe->fs.name, sizeof(fe->fs.name), "%s", ex->name[0] && !strchr(ex->name, '/') ? ex->name : "disk");
	if ((size_t)snprintf(fe->file, sizeof(fe->file), "%s/%.255s", fe->mnt, fe->fs.name) >= sizeof(fe->file)) {
		free(fe);
		return -ENAMETOOLONG;
	}
	fe->fs.backend = ex->backend;
	fe->fs.size = ex->backend->size;
	fe->fs.readonly = (ex->backend->caps & DEVIO_CAP_READONLY) != 0;
	fuse_owner(fe, ex->source, o);
	fe->fs.mtime = (uint64_t)time(NULL);
	fe->fs.max_write = FUSE_MAX_WRITE;
	/* the kernel never sends more than max_write (and max_read = max_write) */
	if (ex->backend->max_io && ex->backend->max_io < FUSE_MAX_WRITE)
		fe->fs.max_write = ex->backend->max_io >= 4096 ? ex->backend->max_io & ~4095u : 4096;
	fe->payload_sz = fe->fs.max_write > 8192 ? fe->fs.max_write : 8192; /* the kernel's minimum buffer */
	fe->depth = o->depth ? o->depth : DEFAULT_DEPTH;
	if (o->timeout > 65535) {
		devio_err("--fuse-timeout: at most 65535 seconds, got %u", o->timeout);
		r = -EINVAL;
		goto out_free;
	}
	r = fuse_choose_transport(fe, t, o->enable_uring);
	if (r)
		goto out_free;
	fe->fs.offer_uring = fe->use_uring;
	fe->fs.request_timeout = (uint16_t)o->timeout;
	r = fuse_do_mount(fe);
	if (r)
		goto out_free;
	r = fuse_do_init_handshake(fe);
	if (r)
		goto out_free;
	r = fuse_start_transport(fe, &srv->opts, t && !strcmp(t, "uring"));
	if (r)
		goto out_free;
	if (o->timeout && !fe->fs.timeout_granted)
		devio_warn("fuse %s: --fuse-timeout: this kernel has no FUSE request timeout (Linux 6.14+); "
			   "`devio detach --force` aborts a hung connection", fe->mnt);
	if (o->loop && (r = fuse_attach_loop(fe, o)))
		goto out_free;
	devio_info("fuse %s: serving %s (%llu bytes) over %s", fe->mnt, fe->file,
		   (unsigned long long)fe->fs.size, fe->use_uring ? "io_uring" : "/dev/fuse");
	printf("%s\n", fe->has_loop ? fe->loop.path : fe->file);
	fflush(stdout);
	*state = fe;
	return 0;
out_free:
	fuse_fe_free(fe);
	return r;
}

static void fuse_stop(void *state)
{
	if (state)
		fuse_fe_free(state);
}

static void fuse_status(void *state, FILE *out)
{
	struct fuse_fe *fe = state;

	if (!fe)
		return;
	fprintf(out, "  fuse mount %s file %s\n", fe->mnt, fe->file);
	if (fe->conn_minor)
		fprintf(out, "  fuse connection %u%s\n", fe->conn_minor,
			fe->fs.timeout_granted ? " request-timeout" : "");
	if (fe->use_uring)
		fprintf(out, "  fuse transport io_uring: %u queues x %u entries, %u KiB payload\n", fe->nqueues,
			fe->depth, fe->payload_sz >> 10);
	else
		fprintf(out, "  fuse transport /dev/fuse: %u threads\n", fe->ndevs);
	if (fe->has_loop)
		fprintf(out, "  loop %s%s\n", fe->loop.path, fe->loop.direct_io ? " direct-io" : "");
}

static void fuse_info(void *state, struct devio_frontend_info *info)
{
	struct fuse_fe *fe = state;

	if (!fe)
		return;
	snprintf(info->mount, sizeof(info->mount), "%s", fe->mnt);
	snprintf(info->device, sizeof(info->device), "%s", fe->has_loop ? fe->loop.path : fe->file);
}

static int fuse_parse_transport(const char *name, const char *val, void *field)
{
	if (!val || (strcmp(val, "auto") && strcmp(val, "uring") && strcmp(val, "dev"))) {
		devio_err("--%s: want auto, uring or dev, got '%s'", name, val ? val : "");
		return -EINVAL;
	}
	*(const char **)field = val;
	return 0;
}

static const struct devio_frontend_option fuse_options[] = {
	{ "loop", NULL, "and a loop device on it (its path is printed instead of the file's)",
	  devio_opt_flag, offsetof(struct fuse_opts, loop) },
	{ "fuse-transport", "auto|uring|dev", "io_uring, /dev/fuse, or (auto) io_uring when the kernel has it on",
	  fuse_parse_transport, offsetof(struct fuse_opts, transport) },
	{ "depth", "N", "io_uring entries per queue (default 16)", devio_opt_uint, offsetof(struct fuse_opts, depth) },
	{ "block-size", "N", "the loop device's logical block size (default 512)", devio_opt_block_size,
	  offsetof(struct fuse_opts, block_size) },
	{ "fuse-enable-uring", NULL, "write Y to /sys/module/fuse/parameters/fuse_enable_uring (whole machine; said on stderr)",
	  devio_opt_flag, offsetof(struct fuse_opts, enable_uring) },
	{ "fuse-timeout", "SECONDS", "the kernel aborts the connection when a request takes longer (Linux 6.14+)",
	  devio_opt_uint, offsetof(struct fuse_opts, timeout) },
	{ "fuse-mode", "MODE", "the file's mode, octal (default: the image's own; 0600 for other sources)",
	  fuse_parse_mode, offsetof(struct fuse_opts, mode) },
	{ "allow-other", NULL, "let users other than the server's pass the mount (the file's mode still applies)",
	  devio_opt_flag, offsetof(struct fuse_opts, allow_other) },
	{ NULL },
};

const struct devio_frontend_type devio_frontend_fuse = {
	.option = "fuse",
	.arg_help = "MOUNTPOINT",
	.help = "the export as one file, MOUNTPOINT/disk",
	.options = fuse_options,
	.opts_size = sizeof(struct fuse_opts),
	.start = fuse_start,
	.stop = fuse_stop,
	.status = fuse_status,
	.info = fuse_info,
};
