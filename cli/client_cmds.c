/* client_cmds.c - devio info / cat / write / copy: the client side of the
 * command line.  Every URI or image is opened with devio_backend_open(), so
 * a local image, ram:, a devio server and an NBD server are all the same
 * here.  copy sends blocks that the source's extents say read as zeroes
 * as ZERO requests instead of reading and writing them.  copy prints the last completed offset when it stops early, so
 * `--resume-from` continues where it left off. */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "cli.h"
#include "devio/backend.h"
#include "devio/request.h"
#include "devio/stream.h"
#include "devio/util.h"

#define CLIENT_CHUNK (1u << 20)

/* --size: the size of an export whose server does not tell it (ImDisk's
 * devio serving a block device on Linux says 0), as serve's --size. */
static uint64_t client_size;

static int open_export(const char *source, bool readonly, struct devio_backend **out)
{
	struct devio_open_opts o = { .readonly = readonly, .has_size = client_size != 0, .size = client_size };

	return devio_backend_open(source, &o, out); /* logs why it fails */
}

/* Run one request on this thread: these commands wait for every request
 * anyway. */
static int run(struct devio_backend *b, enum devio_op op, void *buf, uint64_t len, uint64_t off)
{
	struct devio_request req = { .op = op, .offset = off, .length = len, .buf = buf };

	return devio_run(b, &req);
}

static int size_arg(const char *cmd, const char *opt, const char *val, uint64_t *out)
{
	if (devio_parse_size(val, out)) {
		devio_err("%s: %s: bad size '%s'", cmd, opt, val);
		return -EINVAL;
	}
	return 0;
}

/* ---- info ---- */

static void print_caps(FILE *out, uint32_t caps, bool json)
{
	static const struct { uint32_t bit; const char *name; } names[] = {
		{ DEVIO_CAP_READONLY, "readonly" }, { DEVIO_CAP_FLUSH, "flush" }, { DEVIO_CAP_FUA, "fua" },
		{ DEVIO_CAP_TRIM, "trim" }, { DEVIO_CAP_ZERO, "zero" }, { DEVIO_CAP_FAST_ZERO, "fast_zero" },
		{ DEVIO_CAP_EXTENTS, "extents" }, { DEVIO_CAP_MULTI_CONN, "multi_conn" }, { DEVIO_CAP_CACHE, "cache" },
	};
	bool first = true;

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		if (!(caps & names[i].bit))
			continue;
		fprintf(out, json ? "%s\"%s\"" : "%s%s", first ? "" : json ? ", " : " ", names[i].name);
		first = false;
	}
	if (first && !json)
		fprintf(out, "-");
}

/* A JSON string: the source is a user's path or URI and may hold quotes,
 * backslashes or control characters. */
static void print_json_string(FILE *out, const char *s)
{
	fputc('"', out);
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;

		if (ch == '"' || ch == '\\')
			fprintf(out, "\\%c", ch);
		else if (ch < 0x20)
			fprintf(out, "\\u%04x", ch);
		else
			fputc(ch, out);
	}
	fputc('"', out);
}

int cmd_info(int argc, char **argv)
{
	static const struct option opts[] = { { "json", no_argument, NULL, 'j' }, { "size", required_argument, NULL, 's' },
					      { "help", no_argument, NULL, 'h' }, { 0 } };
	struct devio_backend *b;
	char desc[256] = "";
	bool json = false, readonly;
	int c;

	optind = 1;
	while ((c = getopt_long(argc, argv, "jh", opts, NULL)) != -1) {
		if (c == 'j')
			json = true;
		else if (c == 's' && !size_arg("info", "--size", optarg, &client_size))
			continue;
		else {
			fprintf(c == 'h' ? stdout : stderr, "usage: devio info URI|IMAGE [--json] [--size N]\n");
			return c == 'h' ? 0 : 2;
		}
	}
	if (optind != argc - 1) {
		devio_err("info: want one URI or IMAGE");
		return 2;
	}
	/* Open read-write where allowed so the flags are the export's own, not
	 * those of a read-only open; read-only an image file we may not write
	 * (a URI is no file here: access() fails with ENOENT).  One attempt,
	 * so a server that takes one connection is asked once. */
	readonly = access(argv[optind], W_OK) < 0 && (errno == EACCES || errno == EROFS || errno == EPERM);
	if (open_export(argv[optind], readonly, &b))
		return 1;
	if (b->ops->describe)
		b->ops->describe(b, desc, sizeof(desc));
	if (json) {
		printf("{\"source\": ");
		print_json_string(stdout, argv[optind]);
		printf(", \"size\": %llu, \"alignment\": %u, \"read_only\": %s, \"caps\": [",
		       (unsigned long long)b->size, b->block_size ? b->block_size : 1,
		       b->caps & DEVIO_CAP_READONLY ? "true" : "false");
		print_caps(stdout, b->caps, true);
		printf("]}\n");
	} else {
		printf("source: %s\nsize: %llu\nalignment: %u\ncaps: ", argv[optind], (unsigned long long)b->size,
		       b->block_size ? b->block_size : 1);
		print_caps(stdout, b->caps, false);
		printf("\n%s%s%s", desc[0] ? "backend: " : "", desc, desc[0] ? "\n" : "");
	}
	devio_backend_close(b);
	return 0;
}

/* ---- cat ---- */

int cmd_cat(int argc, char **argv)
{
	static const struct option opts[] = { { "offset", required_argument, NULL, 'o' },
					      { "length", required_argument, NULL, 'l' },
					      { "size", required_argument, NULL, 's' },
					      { "help", no_argument, NULL, 'h' }, { 0 } };
	uint64_t off = 0, len = 0, end;
	bool has_len = false;
	struct devio_backend *b;
	char *buf;
	int c, r = 0;

	optind = 1;
	while ((c = getopt_long(argc, argv, "o:l:h", opts, NULL)) != -1) {
		if (c == 'o' && !size_arg("cat", "--offset", optarg, &off))
			continue;
		if (c == 's' && !size_arg("cat", "--size", optarg, &client_size))
			continue;
		if (c == 'l' && !size_arg("cat", "--length", optarg, &len)) {
			has_len = true;
			continue;
		}
		fprintf(c == 'h' ? stdout : stderr, "usage: devio cat URI|IMAGE [--offset N] [--length N] [--size N]\n");
		return c == 'h' ? 0 : 2;
	}
	if (optind != argc - 1) {
		devio_err("cat: want one URI or IMAGE");
		return 2;
	}
	if (open_export(argv[optind], true, &b))
		return 1;
	if (off > b->size || (has_len && len > b->size - off)) {
		devio_err("cat: %s: range %llu+%llu is beyond the end (%llu bytes)", argv[optind],
			  (unsigned long long)off, (unsigned long long)len, (unsigned long long)b->size);
		devio_backend_close(b);
		return 1;
	}
	end = has_len ? off + len : b->size;
	buf = malloc(CLIENT_CHUNK);
	if (!buf) {
		devio_backend_close(b);
		return 1;
	}
	while (off < end && !r) {
		uint64_t n = end - off < CLIENT_CHUNK ? end - off : CLIENT_CHUNK;

		r = run(b, DEVIO_OP_READ, buf, n, off);
		if (r)
			devio_err("cat: %s: read at %llu: %s", argv[optind], (unsigned long long)off, strerror(-r));
		else if ((r = devio_write_full(STDOUT_FILENO, buf, n)))
			devio_err("cat: stdout: %s", strerror(-r));
		off += n;
	}
	free(buf);
	devio_backend_close(b);
	return r ? 1 : 0;
}

/* ---- write ---- */

/* Fill up to n bytes from fd; *got < n only at EOF. */
static int read_upto(int fd, char *buf, size_t n, size_t *got)
{
	*got = 0;
	while (*got < n) {
		ssize_t k = read(fd, buf + *got, n - *got);

		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0)
			return -errno;
		if (k == 0)
			break;
		*got += (size_t)k;
	}
	return 0;
}

int cmd_write(int argc, char **argv)
{
	static const struct option opts[] = { { "offset", required_argument, NULL, 'o' },
					      { "size", required_argument, NULL, 's' },
					      { "help", no_argument, NULL, 'h' }, { 0 } };
	struct devio_backend *b;
	uint64_t off = 0, total = 0;
	char *buf;
	int c, r = 0;

	optind = 1;
	while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
		if (c == 'o' && !size_arg("write", "--offset", optarg, &off))
			continue;
		if (c == 's' && !size_arg("write", "--size", optarg, &client_size))
			continue;
		fprintf(c == 'h' ? stdout : stderr, "usage: devio write URI|IMAGE [--offset N] [--size N] < DATA\n");
		return c == 'h' ? 0 : 2;
	}
	if (optind != argc - 1) {
		devio_err("write: want one URI or IMAGE");
		return 2;
	}
	if (open_export(argv[optind], false, &b))
		return 1;
	buf = malloc(CLIENT_CHUNK);
	for (;;) {
		size_t got;

		if (!buf) {
			r = -ENOMEM;
			break;
		}
		if ((r = read_upto(STDIN_FILENO, buf, CLIENT_CHUNK, &got))) {
			devio_err("write: stdin: %s", strerror(-r));
			break;
		}
		if (got == 0)
			break;
		if ((r = run(b, DEVIO_OP_WRITE, buf, got, off))) {
			devio_err("write: %s: write at %llu of %zu bytes: %s", argv[optind], (unsigned long long)off,
				  got, strerror(-r));
			break;
		}
		off += got;
		total += got;
		if (got < CLIENT_CHUNK)
			break;
	}
	if (!r && b->ops->flush && (r = b->ops->flush(b)))
		devio_err("write: %s: flush: %s", argv[optind], strerror(-r));
	free(buf);
	devio_backend_close(b);
	if (!r)
		fprintf(stderr, "devio: wrote %llu bytes\n", (unsigned long long)total);
	return r ? 1 : 0;
}

/* ---- copy ---- */

static volatile sig_atomic_t copy_interrupted;

static void on_copy_signal(int sig) { copy_interrupted = sig; }

static void progress(uint64_t done, uint64_t total, uint64_t start_ns)
{
	double secs = (double)(devio_now_ns() - start_ns) / 1e9;
	int pct = total ? (int)(done * 100 / total) : 100;
	char bar[41];

	for (int i = 0; i < 40; i++)
		bar[i] = i < pct * 40 / 100 ? '#' : '.';
	bar[40] = '\0';
	fprintf(stderr, "\r[%s] %3d%% %llu/%llu MiB %.1f MiB/s", bar, pct, (unsigned long long)(done >> 20),
		(unsigned long long)(total >> 20), secs > 0 ? (double)done / 1048576.0 / secs : 0.0);
}

/* Two threads: the reader fills one buffer while the writer drains the other. */
struct copy_job {
	struct devio_backend *src, *dst;
	const char *src_name, *dst_name;
	uint64_t pos, end, block;
	char *bufs[2];
	uint64_t lens[2], offs[2];
	bool full[2];
	bool zero[2];         /* the block reads as zeroes: sent as ZERO, not data */
	uint64_t zeroed;      /* bytes sent as ZERO */
	bool eof, failed;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	uint64_t done;        /* every byte below this is written */
	int rerr;
};

struct zero_walk {
	uint64_t pos;   /* covered so far, all zero */
	bool data;      /* met an extent that may hold data */
};

static int zero_extent(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct zero_walk *z = ctx;

	if (!(flags & DEVIO_EXTENT_ZERO) || off != z->pos) {
		z->data = true;
		return 1;
	}
	z->pos = off + len;
	return 0;
}

/* Does [off, off+len) of the source read as zeroes, by its extents? */
static bool block_is_zero(struct devio_backend *b, uint64_t off, uint64_t len)
{
	struct zero_walk z = { .pos = off };

	if (!(b->caps & DEVIO_CAP_EXTENTS) || !b->ops->extents)
		return false;
	while (z.pos < off + len && !z.data) {
		uint64_t before = z.pos;

		if (b->ops->extents(b, z.pos, off + len - z.pos, zero_extent, &z) < 0 || z.pos == before)
			return false;
	}
	return !z.data && z.pos >= off + len;
}

static void *copy_reader(void *arg)
{
	struct copy_job *j = arg;

	for (int slot = 0;; slot ^= 1) {
		uint64_t n, off;
		int r;

		pthread_mutex_lock(&j->lock);
		while (j->full[slot] && !j->failed)
			pthread_cond_wait(&j->cond, &j->lock);
		if (j->failed || copy_interrupted || j->pos >= j->end) {
			j->eof = true;
			pthread_cond_broadcast(&j->cond);
			pthread_mutex_unlock(&j->lock);
			return NULL;
		}
		off = j->pos;
		n = j->end - off < j->block ? j->end - off : j->block;
		j->pos += n;
		pthread_mutex_unlock(&j->lock);
		j->zero[slot] = block_is_zero(j->src, off, n);
		r = j->zero[slot] ? 0 : run(j->src, DEVIO_OP_READ, j->bufs[slot], n, off);
		pthread_mutex_lock(&j->lock);
		if (r) {
			devio_err("copy: %s: read at %llu: %s", j->src_name, (unsigned long long)off, strerror(-r));
			j->rerr = r;
			j->eof = true;
		} else {
			j->offs[slot] = off;
			j->lens[slot] = n;
			j->full[slot] = true;
		}
		pthread_cond_broadcast(&j->cond);
		pthread_mutex_unlock(&j->lock);
		if (r)
			return NULL;
	}
}

static int copy_writer(struct copy_job *j, bool show, uint64_t start_ns, uint64_t first)
{
	int r = 0;

	for (int slot = 0;; slot ^= 1) {
		pthread_mutex_lock(&j->lock);
		while (!j->full[slot] && !j->eof)
			pthread_cond_wait(&j->cond, &j->lock);
		if (!j->full[slot]) {
			pthread_mutex_unlock(&j->lock);
			return j->rerr;
		}
		pthread_mutex_unlock(&j->lock);
		if (j->zero[slot])
			r = run(j->dst, DEVIO_OP_ZERO, NULL, j->lens[slot], j->offs[slot]);
		else
			r = run(j->dst, DEVIO_OP_WRITE, j->bufs[slot], j->lens[slot], j->offs[slot]);
		pthread_mutex_lock(&j->lock);
		if (!r && j->zero[slot])
			j->zeroed += j->lens[slot];
		if (r) {
			devio_err("copy: %s: write at %llu: %s", j->dst_name, (unsigned long long)j->offs[slot],
				  strerror(-r));
			j->failed = true;
		} else {
			j->done = j->offs[slot] + j->lens[slot];
			j->full[slot] = false;
		}
		pthread_cond_broadcast(&j->cond);
		pthread_mutex_unlock(&j->lock);
		if (r)
			return r;
		if (show)
			progress(j->done - first, j->end - first, start_ns);
	}
}

static int copy_run(struct copy_job *j)
{
	struct sigaction sa = { .sa_handler = on_copy_signal }, old_int, old_term;
	bool show = isatty(STDERR_FILENO);
	uint64_t start_ns = devio_now_ns(), first = j->pos;
	pthread_t t;
	int r;

	sigaction(SIGINT, &sa, &old_int);
	sigaction(SIGTERM, &sa, &old_term);
	j->done = j->pos;
	if ((r = pthread_create(&t, NULL, copy_reader, j))) {
		sigaction(SIGINT, &old_int, NULL);
		sigaction(SIGTERM, &old_term, NULL);
		return -r;
	}
	r = copy_writer(j, show, start_ns, first);
	pthread_mutex_lock(&j->lock);
	j->failed = true; /* stop the reader if the writer gave up */
	pthread_cond_broadcast(&j->cond);
	pthread_mutex_unlock(&j->lock);
	pthread_join(t, NULL);
	if (show)
		fprintf(stderr, "\n");
	sigaction(SIGINT, &old_int, NULL);
	sigaction(SIGTERM, &old_term, NULL);
	if (!r && copy_interrupted)
		r = -EINTR;
	return r;
}

int cmd_copy(int argc, char **argv)
{
	static const struct option opts[] = { { "resume-from", required_argument, NULL, 'r' },
					      { "block-size", required_argument, NULL, 'b' },
					      { "size", required_argument, NULL, 's' },
					      { "help", no_argument, NULL, 'h' }, { 0 } };
	struct copy_job j = { .block = CLIENT_CHUNK, .lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER };
	uint64_t resume = 0;
	int c, r, rc = 1;

	optind = 1;
	while ((c = getopt_long(argc, argv, "r:b:h", opts, NULL)) != -1) {
		if (c == 'r' && !size_arg("copy", "--resume-from", optarg, &resume))
			continue;
		if (c == 's' && !size_arg("copy", "--size", optarg, &client_size))
			continue;
		if (c == 'b' && !size_arg("copy", "--block-size", optarg, &j.block) && j.block >= 512 &&
		    j.block <= (64u << 20))
			continue;
		fprintf(c == 'h' ? stdout : stderr, "usage: devio copy SRC DST [--resume-from N] [--block-size N (512..64M)] [--size N]\n");
		return c == 'h' ? 0 : 2;
	}
	if (optind != argc - 2) {
		devio_err("copy: want SRC and DST");
		return 2;
	}
	j.src_name = argv[optind];
	j.dst_name = argv[optind + 1];
	if (open_export(j.src_name, true, &j.src))
		return 1;
	if (open_export(j.dst_name, false, &j.dst))
		goto out_src;
	if (j.dst->caps & DEVIO_CAP_READONLY) {
		devio_err("copy: %s is read-only", j.dst_name);
		goto out_dst;
	}
	if (j.dst->size < j.src->size) {
		devio_err("copy: %s (%llu bytes) is smaller than %s (%llu bytes)", j.dst_name,
			  (unsigned long long)j.dst->size, j.src_name, (unsigned long long)j.src->size);
		goto out_dst;
	}
	if (resume > j.src->size) {
		devio_err("copy: --resume-from %llu is beyond the end of %s (%llu bytes)", (unsigned long long)resume,
			  j.src_name, (unsigned long long)j.src->size);
		goto out_dst;
	}
	j.pos = resume;
	j.end = j.src->size;
	j.bufs[0] = malloc(j.block);
	j.bufs[1] = malloc(j.block);
	if (!j.bufs[0] || !j.bufs[1])
		goto out_bufs;
	r = copy_run(&j);
	if (!r && j.dst->ops->flush && (r = j.dst->ops->flush(j.dst)))
		devio_err("copy: %s: flush: %s", j.dst_name, strerror(-r));
	if (r) {
		fprintf(stderr, "devio: copy stopped (%s); %llu bytes done; continue with --resume-from %llu\n",
			r == -EINTR ? "interrupted" : strerror(-r), (unsigned long long)j.done,
			(unsigned long long)j.done);
		rc = r == -EINTR ? 130 : 1;
	} else {
		fprintf(stderr, "devio: copied %llu bytes from %s to %s (%llu of them as zero ranges, not read)\n",
			(unsigned long long)(j.end - resume), j.src_name, j.dst_name, (unsigned long long)j.zeroed);
		rc = 0;
	}
out_bufs:
	free(j.bufs[0]);
	free(j.bufs[1]);
out_dst:
	devio_backend_close(j.dst);
out_src:
	devio_backend_close(j.src);
	return rc;
}
