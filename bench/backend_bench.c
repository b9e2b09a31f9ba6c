/* backend_bench.c - drives one backend directly through devio_submit()
 * (the path every front end uses) with random I/O: THREADS threads each
 * keep DEPTH requests in flight, or call the synchronous pread/pwrite in a
 * loop with "sync".  Prints "IOPS MiB/s CPU-us-per-request" (this
 * process's user + system time over the measured window) for
 * bench/bench_backends.sh and bench/bench_shm.sh.
 *
 *   backend_bench SOURCE read|write|randrw BS DEPTH THREADS SECONDS async|sync [direct]
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/request.h"
#include "devio/util.h"

struct job {
	struct devio_backend *b;
	uint64_t bs, blocks;
	int mode; /* 0 read, 1 write, 2 mixed */
	unsigned depth;
	_Atomic bool stop;
};

struct thread_ctx;

struct slot {
	struct devio_request req;
	struct job *job;
	uint64_t rng;
	struct thread_ctx *t;
	unsigned char *buf;
	bool again;
};

struct thread_ctx {
	_Atomic uint64_t done;  /* per thread: no shared counter to fight over */
	char pad[56];
	struct job *job;
	unsigned id;
	bool sync;
	_Atomic unsigned running;
	pthread_mutex_t lock;
	pthread_cond_t cond;
};

static uint64_t next_rand(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

/* Requests that complete inside devio_submit() (run synchronously by the
 * backend) are restarted by this loop, not by recursion from done(). */
static __thread int submit_depth;

static void start(struct slot *s)
{
	struct job *j = s->job;

	do {
		uint64_t r = next_rand(&s->rng);
		bool write = j->mode == 1 || (j->mode == 2 && (r & 1));

		s->again = false;
		s->req.op = write ? DEVIO_OP_WRITE : DEVIO_OP_READ;
		s->req.offset = (r >> 8) % j->blocks * j->bs;
		s->req.length = j->bs;
		s->req.flags = 0;
		s->req.buf = s->buf;
		submit_depth++;
		devio_submit(j->b, &s->req);
		submit_depth--;
	} while (s->again);
}

/* Completion: count it and start the next one at once. */
static void done(struct devio_request *req)
{
	struct slot *s = req->opaque;
	struct thread_ctx *t = s->t;

	if (req->result)
		fprintf(stderr, "I/O error %d\n", req->result);
	atomic_fetch_add_explicit(&t->done, 1, memory_order_relaxed);
	if (!atomic_load(&s->job->stop)) {
		if (submit_depth)
			s->again = true; /* completed inline: start()'s loop goes on */
		else
			start(s);
		return;
	}
	pthread_mutex_lock(&t->lock);
	if (atomic_fetch_sub(&t->running, 1) == 1)
		pthread_cond_signal(&t->cond);
	pthread_mutex_unlock(&t->lock);
}

static void *run_async(struct thread_ctx *t)
{
	struct job *j = t->job;
	struct slot *slots = calloc(j->depth, sizeof(*slots));

	atomic_store(&t->running, j->depth);
	for (unsigned i = 0; i < j->depth; i++) {
		slots[i].job = j;
		slots[i].rng = 0x9E3779B97F4A7C15ull * (t->id * 1000 + i + 1);
		slots[i].t = t;
		slots[i].req.complete = done;
		slots[i].req.opaque = &slots[i];
		if (posix_memalign((void **)&slots[i].buf, 4096, j->bs))
			abort();
		memset(slots[i].buf, 0x5A, j->bs);
	}
	for (unsigned i = 0; i < j->depth; i++)
		start(&slots[i]);
	pthread_mutex_lock(&t->lock);
	while (atomic_load(&t->running))
		pthread_cond_wait(&t->cond, &t->lock);
	pthread_mutex_unlock(&t->lock);
	for (unsigned i = 0; i < j->depth; i++)
		free(slots[i].buf);
	free(slots);
	return NULL;
}

static void *run_sync(struct thread_ctx *t)
{
	struct job *j = t->job;
	uint64_t rng = 0x9E3779B97F4A7C15ull * (t->id + 1);
	unsigned char *buf;

	if (posix_memalign((void **)&buf, 4096, j->bs))
		abort();
	memset(buf, 0x5A, j->bs);
	while (!atomic_load(&j->stop)) {
		uint64_t r = next_rand(&rng), off = (r >> 8) % j->blocks * j->bs;
		bool write = j->mode == 1 || (j->mode == 2 && (r & 1));
		int e = write ? j->b->ops->pwrite(j->b, buf, j->bs, off, 0) : j->b->ops->pread(j->b, buf, j->bs, off);

		if (e)
			fprintf(stderr, "I/O error %d\n", e);
		atomic_fetch_add_explicit(&t->done, 1, memory_order_relaxed);
	}
	free(buf);
	return NULL;
}

static void prefill(struct devio_backend *b)
{
	static unsigned char buf[1 << 20];

	memset(buf, 0xA5, sizeof(buf));
	for (uint64_t off = 0; off < b->size; off += sizeof(buf))
		b->ops->pwrite(b, buf, b->size - off < sizeof(buf) ? b->size - off : sizeof(buf), off, 0);
}

static void *thread_main(void *arg)
{
	struct thread_ctx *t = arg;

	return t->sync ? run_sync(t) : run_async(t);
}

int main(int argc, char **argv)
{
	struct job j = { 0 };
	struct devio_backend *b;
	unsigned threads;
	struct thread_ctx *t;
	pthread_t *tid;
	double secs;
	uint64_t t0, t1, total = 0;
	struct rusage ru0, ru1;
	double cpu_us;

	struct devio_open_opts o = { 0 };

	if (argc != 8 && argc != 9) {
		fprintf(stderr, "usage: %s SOURCE read|write|randrw BS DEPTH THREADS SECONDS async|sync [direct]\n",
			argv[0]);
		return 2;
	}
	o.direct = argc == 9 && !strcmp(argv[8], "direct");
	if (devio_backend_open(argv[1], &o, &b))
		return 1;
	j.b = b;
	j.mode = !strcmp(argv[2], "read") ? 0 : !strcmp(argv[2], "write") ? 1 : 2;
	j.bs = strtoull(argv[3], NULL, 0);
	j.depth = (unsigned)atoi(argv[4]);
	threads = (unsigned)atoi(argv[5]);
	secs = atof(argv[6]);
	j.blocks = b->size / j.bs;
	if (!strncmp(argv[1], "ram:", 4))
		prefill(b); /* measure the disk in use, not reads of holes or first-touch faults */
	t = calloc(threads, sizeof(*t));
	tid = calloc(threads, sizeof(*tid));
	t0 = devio_now_ns();
	getrusage(RUSAGE_SELF, &ru0);
	for (unsigned i = 0; i < threads; i++) {
		t[i] = (struct thread_ctx){ .job = &j, .id = i, .sync = !strcmp(argv[7], "sync") };
		pthread_mutex_init(&t[i].lock, NULL);
		pthread_cond_init(&t[i].cond, NULL);
		pthread_create(&tid[i], NULL, thread_main, &t[i]);
	}
	usleep((useconds_t)(secs * 1e6));
	for (unsigned i = 0; i < threads; i++)
		total += atomic_load(&t[i].done);
	getrusage(RUSAGE_SELF, &ru1);
	atomic_store(&j.stop, true);
	for (unsigned i = 0; i < threads; i++)
		pthread_join(tid[i], NULL);
	t1 = t0 + (uint64_t)(secs * 1e9);
	cpu_us = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec + ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) * 1e6 +
		 (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec + ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec);
	printf("%.0f %.1f %.2f\n", total / ((t1 - t0) / 1e9), total * (double)j.bs / ((t1 - t0) / 1e9) / 1048576.0,
	       total ? cpu_us / (double)total : 0.0);
	devio_backend_close(b);
	free(t);
	free(tid);
	return 0;
}
