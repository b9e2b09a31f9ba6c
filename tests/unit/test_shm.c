/* test_shm.c - the shared-memory transport's layout helpers, socket paths
 * and the server's slot decoder (devio_shm_serve_region) on a RAM disk;
 * a completion that ends the session on another thread. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/frontend.h"
#include "devio/protocol.h"
#include "devio/shm.h"
#include "devio/util.h"

#define NSLOTS 4u
#define DATA 4096u

static void test_geometry(void **state)
{
	assert_int_equal(devio_shm_ring_cap(1), 1);
	assert_int_equal(devio_shm_ring_cap(5), 8);
	assert_int_equal(devio_shm_ring_cap(32), 32);
	assert_int_equal(devio_shm_ctl_offset(32, 1u << 20), 32ull * (4096 + (1u << 20)));
	assert_int_equal(devio_shm_region_size(32, 1u << 20), 32ull * (4096 + (1u << 20)) + 4096);
	assert_int_equal(devio_shm_region_size(1024, 4096), 1024ull * 8192 + 12288); /* 512 + 8 KiB of rings */
	assert_true(devio_shm_geometry_ok(1, 4096));
	assert_true(devio_shm_geometry_ok(1024, 64u << 20));
	assert_false(devio_shm_geometry_ok(0, 4096));
	assert_false(devio_shm_geometry_ok(1025, 4096));
	assert_false(devio_shm_geometry_ok(1, 4095));
	assert_false(devio_shm_geometry_ok(1, 6000));
	assert_false(devio_shm_geometry_ok(1, (64u << 20) + 4096));
}

static void test_socket_path(void **state)
{
	char p[256], longname[300];

	assert_int_equal(devio_shm_socket_path("", false, p, sizeof(p)), -EINVAL);
	assert_int_equal(devio_shm_socket_path("a/b", false, p, sizeof(p)), -EINVAL);
	assert_int_equal(devio_shm_socket_path("..", false, p, sizeof(p)), -EINVAL);
	assert_int_equal(devio_shm_socket_path("/tmp/x.sock", false, p, sizeof(p)), 0);
	assert_string_equal(p, "/tmp/x.sock");
	memset(longname, 'a', sizeof(longname) - 1);
	longname[sizeof(longname) - 1] = '\0';
	assert_int_equal(devio_shm_socket_path(longname, false, p, sizeof(p)), -ENAMETOOLONG);
	if (geteuid() == 0) {
		assert_int_equal(devio_shm_socket_path("disk", false, p, sizeof(p)), 0);
		assert_string_equal(p, "/run/devio/shm/disk");
	}
}

struct region {
	uint8_t *m;
	uint64_t size, ctl;
	uint32_t tail;
};

static void region_init(struct region *r)
{
	r->size = devio_shm_region_size(NSLOTS, DATA);
	r->ctl = devio_shm_ctl_offset(NSLOTS, DATA);
	r->m = aligned_alloc(4096, r->size);
	assert_non_null(r->m);
	memset(r->m, 0, r->size);
	r->tail = 0;
}

static uint8_t *hdr(struct region *r, uint32_t tag)
{
	return r->m + tag * devio_shm_slot_size(DATA);
}

static void put_words(uint8_t *p, int n, const uint64_t *w)
{
	for (int i = 0; i < n; i++)
		devio_put_le64(p + 8 * i, w[i]);
}

static void push(struct region *r, uint32_t tag)
{
	uint32_t *sq = (uint32_t *)(void *)(r->m + r->ctl + DEVIO_SHM_CTL_RINGS);

	sq[r->tail++ % devio_shm_ring_cap(NSLOTS)] = tag;
	*(uint32_t *)(void *)(r->m + r->ctl + DEVIO_SHM_CTL_SQ_TAIL) = r->tail;
}

static uint32_t cq_tail(struct region *r)
{
	return *(uint32_t *)(void *)(r->m + r->ctl + DEVIO_SHM_CTL_CQ_TAIL);
}

static void test_serve_requests(void **state)
{
	struct devio_backend *b;
	struct region r;
	uint32_t *cq;

	assert_int_equal(devio_ram_open(1 << 20, 0, &b), 0);
	region_init(&r);
	cq = (uint32_t *)(void *)(r.m + r.ctl + DEVIO_SHM_CTL_RINGS + 4 * devio_shm_ring_cap(NSLOTS));
	/* WRITE in slot 2, READ it back in slot 0, INFO in slot 3, one batch */
	put_words(hdr(&r, 2), 3, (uint64_t[]){ DEVIO_REQ_WRITE, 1000, 5 });
	memcpy(hdr(&r, 2) + DEVIO_SHM_HDR, "hello", 5);
	put_words(hdr(&r, 0), 3, (uint64_t[]){ DEVIO_REQ_READ, 998, 9 });
	put_words(hdr(&r, 3), 1, (uint64_t[]){ DEVIO_REQ_INFO });
	push(&r, 2);
	push(&r, 0);
	push(&r, 3);
	assert_int_equal(devio_shm_serve_region(b, r.m, r.size, NSLOTS, DATA), 0);
	assert_int_equal(cq_tail(&r), 3);
	assert_int_equal(cq[0], 2);
	assert_int_equal(cq[1], 0);
	assert_int_equal(cq[2], 3);
	assert_int_equal(devio_get_le64(hdr(&r, 2)), 0);
	assert_int_equal(devio_get_le64(hdr(&r, 2) + 8), 5);
	assert_int_equal(devio_get_le64(hdr(&r, 0)), 0);
	assert_int_equal(devio_get_le64(hdr(&r, 0) + 8), 9);
	assert_memory_equal(hdr(&r, 0) + DEVIO_SHM_HDR, "\0\0hello\0\0", 9);
	assert_int_equal(devio_get_le64(hdr(&r, 3)), 1 << 20);
	/* errors in the slots, in a fresh region */
	free(r.m);
	region_init(&r);
	put_words(hdr(&r, 0), 3, (uint64_t[]){ DEVIO_REQ_READ, 0, DATA + 1 });
	put_words(hdr(&r, 1), 3, (uint64_t[]){ DEVIO_REQ_WRITE, (1 << 20) - 1, 2 });
	put_words(hdr(&r, 2), 2, (uint64_t[]){ DEVIO_REQ_ZERO, 32 });
	put_words(hdr(&r, 2) + DEVIO_SHM_HDR, 4, (uint64_t[]){ 0, 4096, 1 << 20, 1 });
	put_words(hdr(&r, 3), 1, (uint64_t[]){ 77 });
	for (uint32_t t = 0; t < 4; t++)
		push(&r, t);
	assert_int_equal(devio_shm_serve_region(b, r.m, r.size, NSLOTS, DATA), 0);
	assert_int_equal(devio_get_le64(hdr(&r, 0)), E2BIG);
	assert_int_equal(devio_get_le64(hdr(&r, 1)), ENOSPC);
	assert_int_equal(devio_get_le64(hdr(&r, 2)), EINVAL);
	assert_int_equal(devio_get_le64(hdr(&r, 3)), ENODEV);
	free(r.m);
	devio_backend_close(b);
}

static void test_broken_rings(void **state)
{
	struct devio_backend *b;
	struct region r;

	assert_int_equal(devio_ram_open(1 << 20, 0, &b), 0);
	region_init(&r);
	push(&r, NSLOTS); /* a tag out of range */
	assert_int_equal(devio_shm_serve_region(b, r.m, r.size, NSLOTS, DATA), -EPROTO);
	free(r.m);
	region_init(&r);
	*(uint32_t *)(void *)(r.m + r.ctl + DEVIO_SHM_CTL_SQ_TAIL) = NSLOTS + 1; /* ahead */
	assert_int_equal(devio_shm_serve_region(b, r.m, r.size, NSLOTS, DATA), -EPROTO);
	assert_int_equal(cq_tail(&r), 0);
	assert_int_equal(devio_shm_serve_region(b, r.m, r.size - 1, NSLOTS, DATA), -EINVAL);
	free(r.m);
	devio_backend_close(b);
}

/* A backend that completes its one request on its own thread, which runs
 * at SCHED_IDLE on the caller's CPU: the session thread it wakes runs at
 * once, before the completing thread takes another step. */
struct late {
	struct devio_backend b;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct devio_request *req;
	cpu_set_t cpu;
};

static int late_submit(struct devio_backend *b, struct devio_request *req)
{
	struct late *l = b->priv;

	pthread_mutex_lock(&l->lock);
	l->req = req;
	pthread_cond_signal(&l->cond);
	pthread_mutex_unlock(&l->lock);
	return 0;
}

static const struct devio_backend_ops late_ops = { .name = "late", .submit = late_submit };

static void *late_main(void *arg)
{
	struct late *l = arg;
	struct sched_param sp = { 0 };
	struct devio_request *req;

	pthread_setaffinity_np(pthread_self(), sizeof(l->cpu), &l->cpu);
	pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);
	pthread_mutex_lock(&l->lock);
	while (!l->req)
		pthread_cond_wait(&l->cond, &l->lock);
	req = l->req;
	pthread_mutex_unlock(&l->lock);
	req->result = 0;
	req->complete(req); /* the last one in flight: the session may end now */
	return NULL;
}

/* The session is freed once its last request is done: the completion must
 * not touch it after it said so (ASan: heap-use-after-free). */
static void test_last_completion_elsewhere(void **state)
{
	struct late l = { .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };
	cpu_set_t saved;
	struct region r;
	pthread_t t;
	int cpu = 0;

	l.b.ops = &late_ops;
	l.b.priv = &l;
	l.b.size = 1 << 20;
	l.b.block_size = 512;
	l.b.caps = DEVIO_CAP_READONLY;
	assert_int_equal(pthread_getaffinity_np(pthread_self(), sizeof(saved), &saved), 0);
	while (!CPU_ISSET(cpu, &saved))
		cpu++;
	CPU_ZERO(&l.cpu);
	CPU_SET(cpu, &l.cpu);
	assert_int_equal(pthread_setaffinity_np(pthread_self(), sizeof(l.cpu), &l.cpu), 0);
	region_init(&r);
	put_words(hdr(&r, 1), 3, (uint64_t[]){ DEVIO_REQ_READ, 4096, 512 });
	push(&r, 1);
	assert_int_equal(pthread_create(&t, NULL, late_main, &l), 0);
	assert_int_equal(devio_shm_serve_region(&l.b, r.m, r.size, NSLOTS, DATA), 0);
	pthread_join(t, NULL);
	pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
	assert_int_equal(cq_tail(&r), 1);
	assert_int_equal(devio_get_le64(hdr(&r, 1)), 0);
	assert_int_equal(devio_get_le64(hdr(&r, 1) + 8), 512);
	free(r.m);
}

/* A server backend that records what reaches it: 'W' a write ('w' with
 * FUA), 'F' a flush. */
struct rec {
	struct devio_backend b;
	pthread_mutex_t lock;
	char seen[16];
	unsigned n;
};

static void rec_add(struct devio_backend *b, char what)
{
	struct rec *r = b->priv;

	pthread_mutex_lock(&r->lock);
	if (r->n + 1 < sizeof(r->seen))
		r->seen[r->n++] = what;
	pthread_mutex_unlock(&r->lock);
}

static int rec_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	rec_add(b, flags & DEVIO_REQ_FUA ? 'w' : 'W');
	return 0;
}

static int rec_flush(struct devio_backend *b)
{
	rec_add(b, 'F');
	return 0;
}

/* Reads are not recorded: devio+shm:// reads the first block at open (its
 * first request, within the server's handshake deadline). */
static int rec_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	memset(buf, 0, len);
	return 0;
}

static const struct devio_backend_ops rec_ops = { .name = "rec", .pread = rec_pread, .pwrite = rec_pwrite,
						  .flush = rec_flush };

struct done {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool done;
};

static void done_complete(struct devio_request *req)
{
	struct done *d = req->opaque;

	pthread_mutex_lock(&d->lock);
	d->done = true;
	pthread_cond_signal(&d->cond);
	pthread_mutex_unlock(&d->lock);
}

/* A FUA write through devio+shm:// is durable on the server when it is
 * answered: the server's store sees a flush after it (the protocol's
 * WRITE has no FUA flag of its own). */
static void test_client_fua(void **state)
{
	struct rec r = { .b = { .ops = &rec_ops, .size = 1 << 20, .block_size = 512, .run = DEVIO_RUN_CPU,
				.caps = DEVIO_CAP_FLUSH | DEVIO_CAP_FUA },
			 .lock = PTHREAD_MUTEX_INITIALIZER };
	struct devio_export e = { .name = "", .source = "rec", .backend = &r.b };
	struct devio_server srv = { .exports = &e, .n_exports = 1, .opts = { .threads = 1 } };
	struct done d = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false };
	static char data[4096];
	struct devio_request req = { .op = DEVIO_OP_WRITE, .flags = DEVIO_REQ_FUA, .length = sizeof(data),
				     .buf = data, .complete = done_complete, .opaque = &d };
	char arg[100], uri[128];
	struct devio_backend *c;
	void *fe;

	r.b.priv = &r;
	snprintf(arg, sizeof(arg), "shm:/tmp/devio-shm-unit-%d.sock", (int)getpid());
	snprintf(uri, sizeof(uri), "devio+shm://%s", arg + 4);
	assert_int_equal(devio_frontend_shm.start(&srv, arg, NULL, &fe), 0);
	assert_int_equal(devio_remote_shm_open(uri, NULL, &c), 0);
	assert_true(c->caps & DEVIO_CAP_FUA);
	devio_submit(c, &req);
	pthread_mutex_lock(&d.lock);
	while (!d.done)
		pthread_cond_wait(&d.cond, &d.lock);
	pthread_mutex_unlock(&d.lock);
	devio_backend_close(c);
	devio_frontend_shm.stop(fe);
	assert_int_equal(req.result, 0);
	pthread_mutex_lock(&r.lock);
	r.seen[r.n] = '\0';
	pthread_mutex_unlock(&r.lock);
	assert_true(!strcmp(r.seen, "WF") || !strcmp(r.seen, "w"));
}

/* ---- the client between taking a slot and publishing it ----
 * This test is linked with -Wl,--wrap=devio_now_ns,--wrap=devio_log: the
 * client reads the clock as it fills a slot, so a thread can be held
 * right there; and the client's "connection lost" line says when its
 * completion thread has failed what it had. */
uint64_t __real_devio_now_ns(void);
uint64_t __wrap_devio_now_ns(void);
void __real_devio_log(enum devio_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void __wrap_devio_log(enum devio_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static struct {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	pthread_t thread;  /* the thread to hold at its next clock read */
	bool armed, holding, released, lost;
} hold = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER };

uint64_t __wrap_devio_now_ns(void)
{
	pthread_mutex_lock(&hold.lock);
	if (hold.armed && pthread_equal(pthread_self(), hold.thread)) {
		hold.armed = false;
		hold.holding = true;
		pthread_cond_broadcast(&hold.cond);
		while (!hold.released)
			pthread_cond_wait(&hold.cond, &hold.lock);
	}
	pthread_mutex_unlock(&hold.lock);
	return __real_devio_now_ns();
}

void __wrap_devio_log(enum devio_log_level level, const char *fmt, ...)
{
	char line[512];
	va_list ap;

	if (!fmt)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (strstr(fmt, "connection to the server lost")) {
		pthread_mutex_lock(&hold.lock);
		hold.lost = true;
		pthread_cond_broadcast(&hold.cond);
		pthread_mutex_unlock(&hold.lock);
	}
	__real_devio_log(level, "%s", line);
}

static void hold_wait(bool *what)
{
	pthread_mutex_lock(&hold.lock);
	while (!*what)
		pthread_cond_wait(&hold.cond, &hold.lock);
	pthread_mutex_unlock(&hold.lock);
}

/* Run fn(arg) on a new thread *t, held at its next clock read: returns
 * once it is held there. */
static void hold_start(pthread_t *t, void *(*fn)(void *), void *arg)
{
	pthread_mutex_lock(&hold.lock);
	assert_int_equal(pthread_create(t, NULL, fn, arg), 0);
	hold.thread = *t;
	hold.armed = true;
	pthread_mutex_unlock(&hold.lock);
	hold_wait(&hold.holding);
}

static void hold_release(void)
{
	pthread_mutex_lock(&hold.lock);
	hold.released = true;
	pthread_cond_broadcast(&hold.cond);
	pthread_mutex_unlock(&hold.lock);
}

/* A --devio shm: server over a RAM disk in this process, and a client. */
struct pair {
	struct devio_backend *disk, *client;
	struct devio_export e;
	struct devio_server srv;
	void *fe;
};

static void pair_start(struct pair *p)
{
	char arg[100], uri[128];

	memset(&hold, 0, sizeof(hold));
	pthread_mutex_init(&hold.lock, NULL);
	pthread_cond_init(&hold.cond, NULL);
	assert_int_equal(devio_ram_open(1 << 20, 0, &p->disk), 0);
	p->e = (struct devio_export){ .name = "", .source = "ram", .backend = p->disk };
	p->srv = (struct devio_server){ .exports = &p->e, .n_exports = 1, .opts = { .threads = 1 } };
	snprintf(arg, sizeof(arg), "shm:/tmp/devio-shm-unit-%d.sock", (int)getpid());
	snprintf(uri, sizeof(uri), "devio+shm://%s", arg + 4);
	assert_int_equal(devio_frontend_shm.start(&p->srv, arg, NULL, &p->fe), 0);
	assert_int_equal(devio_remote_shm_open(uri, NULL, &p->client), 0);
}

static void pair_stop(struct pair *p)
{
	devio_backend_close(p->client);
	if (p->fe)
		devio_frontend_shm.stop(p->fe);
	devio_backend_close(p->disk);
}

/* A request whose memory goes with its completion, as a front end's does. */
static int heap_result = 1;

static void heap_complete(struct devio_request *req)
{
	heap_result = req->result;
	free(req->buf);
	free(req);
}

static void *submit_heap_write(void *arg)
{
	struct devio_backend *c = arg;
	struct devio_request *req = calloc(1, sizeof(*req));

	req->op = DEVIO_OP_WRITE;
	req->length = 4096;
	req->buf = calloc(1, 4096);
	req->complete = heap_complete;
	devio_submit(c, req);
	return NULL;
}

/* The connection ends while a request sits in a slot its submitter took
 * but has not filled yet: the request is failed once, by whoever holds
 * it, and its memory is not read after its completion (ASan). */
static void test_client_lost_while_filling(void **state)
{
	struct pair p;
	pthread_t t;

	pair_start(&p);
	heap_result = 1;
	hold_start(&t, submit_heap_write, p.client);
	devio_frontend_shm.stop(p.fe); /* the server goes: the client's thread fails what it has */
	p.fe = NULL;
	hold_wait(&hold.lost);
	hold_release();
	pthread_join(t, NULL);
	assert_true(heap_result < 0);
	pair_stop(&p);
}

static void *write_one(void *arg)
{
	static char data[4096];
	struct devio_request req = { .op = DEVIO_OP_WRITE, .length = sizeof(data), .buf = data };

	return (void *)(intptr_t)devio_run(arg, &req);
}

/* A slot's last request started longer ago than the timeout: taking the
 * slot for a new one does not make the client call that one overdue. */
static void test_client_no_false_timeout(void **state)
{
	struct pair p;
	pthread_t t;
	void *r;

	setenv("DEVIO_REMOTE_TIMEOUT", "1", 1);
	pair_start(&p);
	unsetenv("DEVIO_REMOTE_TIMEOUT");
	assert_null(write_one(p.client)); /* the slot's first request */
	usleep(1500 * 1000);              /* ... now older than the timeout */
	hold_start(&t, write_one, p.client);
	usleep(2500 * 1000);              /* the client checks for overdue requests each second */
	hold_release();
	pthread_join(t, &r);
	assert_int_equal((intptr_t)r, 0);
	pair_stop(&p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_geometry),
		cmocka_unit_test(test_socket_path),
		cmocka_unit_test(test_serve_requests),
		cmocka_unit_test(test_broken_rings),
		cmocka_unit_test(test_last_completion_elsewhere),
		cmocka_unit_test(test_client_fua),
		cmocka_unit_test(test_client_lost_while_filling),
		cmocka_unit_test(test_client_no_false_timeout),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
