/* client_cmds.c - devio info / cat / write / copy: the client side of the
 * command line.  Every URI or image is opened with devio_backend_open(), so
 * a local image, ram:, a devio server and an NBD server are all the same
 * here.  info describes a stack layer by layer (JSON through jansson).
 * The copy engine (copy, convert) sends blocks that the source's extents
 * say read as zeroes as ZERO requests instead of reading and writing them
 * (or skips them, into a new sparse image).  copy prints the last
 * completed offset when it stops early, so `--resume-from` continues
 * where it left off. */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "cli.h"
#include "devio/backend.h"
#include "devio/layer.h"
#include "devio/request.h"
#include "devio/stream.h"
#include "devio/util.h"

#define CLIENT_CHUNK (1u << 20)

/* --size: the size of an export whose server does not tell it (ImDisk's
 * devio serving a block device on Linux says 0), as serve's --size. */
static uint64_t client_size;

static int cc_open_export(const char *source, bool readonly, struct devio_backend **out)
{
	struct devio_open_opts o = { .readonly = readonly, .has_size = client_size != 0, .size = client_size };

	return devio_backend_open(source, &o, out); /* logs why it fails */
}

/* Run one request on this thread: these commands wait for every request
 * anyway. */
static int cc_run(struct devio_backend *b, enum devio_op op, void *buf, uint64_t len, uint64_t off)
{
	struct devio_request req = { .op = op, .offset = off, .length = len, .buf = buf };

	return devio_run(b, &req);
}

/* A size option's value; a bad one is a usage error (said, and exit 2). */
static void cc_size_arg(const char *cmd, const char *opt, const char *val, uint64_t *out)
{
	int r = devio_parse_size(val, out);

	if (r) {
		cli_size_error(cmd, opt, val, r);
		exit(cli_usage_hint(cmd));
	}
}

/* ---- info ---- */

static const struct { uint32_t bit; const char *name; } cc_cap_names[] = {
	{ DEVIO_CAP_READONLY, "readonly" }, { DEVIO_CAP_FLUSH, "flush" }, { DEVIO_CAP_FUA, "fua" },
	{ DEVIO_CAP_TRIM, "trim" }, { DEVIO_CAP_ZERO, "zero" }, { DEVIO_CAP_FAST_ZERO, "fast_zero" },
	{ DEVIO_CAP_EXTENTS, "extents" }, { DEVIO_CAP_MULTI_CONN, "multi_conn" }, { DEVIO_CAP_CACHE, "cache" },
};

struct info_walk {
	uint64_t pos;       /* end of the last extent seen */
	uint64_t allocated; /* bytes in extents that are no hole */
};

static int cc_info_extent(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct info_walk *w = ctx;

	if (!(flags & DEVIO_EXTENT_HOLE))
		w->allocated += len;
	w->pos = off + len;
	return 0;
}

/* Allocated bytes: the sum of the data extents through the whole stack. */
static int cc_info_allocated(struct devio_backend *b, uint64_t *out)
{
	struct info_walk w = { 0, 0 };

	while (w.pos < b->size) {
		uint64_t before = w.pos;
		int r = devio_extents(b, w.pos, b->size - w.pos, cc_info_extent, &w);

		if (r)
			return r;
		if (w.pos <= before)
			return -EIO;
	}
	*out = w.allocated;
	return 0;
}

static void cc_info_describe(struct devio_backend *b, char *out, size_t outlen)
{
	out[0] = '\0';
	if (b->ops->describe)
		b->ops->describe(b, out, outlen);
}

static int cc_info_json(const char *source, struct devio_backend *b, const char *format, int ar,
			uint64_t allocated, json_t *server)
{
	json_t *root = json_object(), *caps = json_array();
	int r;

	cli_json_set_text(root, "source", source);
	json_object_set_new(root, "format", json_string(format));
	json_object_set_new(root, "size", json_integer((json_int_t)b->size));
	json_object_set_new(root, "virtual_size", json_integer((json_int_t)b->size));
	json_object_set_new(root, "allocated", ar ? json_null() : json_integer((json_int_t)allocated));
	json_object_set_new(root, "alignment", json_integer(b->block_size ? b->block_size : 1));
	json_object_set_new(root, "read_only", json_boolean(b->caps & DEVIO_CAP_READONLY));
	for (size_t i = 0; i < sizeof(cc_cap_names) / sizeof(cc_cap_names[0]); i++)
		if (b->caps & cc_cap_names[i].bit)
			json_array_append_new(caps, json_string(cc_cap_names[i].name));
	json_object_set_new(root, "caps", caps);
	json_object_set_new(root, "stack", cli_json_stack(b));
	if (server) /* a running devio server on this machine: what `devio status` says of it */
		json_object_set_new(root, "server", json_incref(server));
	r = json_dumpf(root, stdout, JSON_INDENT(2)) || fputc('\n', stdout) == EOF ? -EIO : 0;
	json_decref(root);
	return r;
}

static void cc_info_text(const char *source, struct devio_backend *b, const char *format, int ar,
			 uint64_t allocated)
{
	static char esc[4 * 4096 + 16];
	char desc[512];

	/* escaped as devio status escapes: one line each, whatever the bytes */
	printf("source: %s\nformat: %s\nsize: %llu\n", cli_text_escape(source, esc, sizeof(esc)), format,
	       (unsigned long long)b->size);
	if (ar)
		printf("allocated: unknown (%s)\n", strerror(-ar));
	else
		printf("allocated: %llu\n", (unsigned long long)allocated);
	printf("alignment: %u\ncaps:", b->block_size ? b->block_size : 1);
	for (size_t i = 0; i < sizeof(cc_cap_names) / sizeof(cc_cap_names[0]); i++)
		if (b->caps & cc_cap_names[i].bit)
			printf(" %s", cc_cap_names[i].name);
	printf("\nstack:\n");
	for (struct devio_backend *l = b; l; l = l->lower) {
		cc_info_describe(l, desc, sizeof(desc));
		printf("  %s: %s\n", l->ops->name ? l->ops->name : "layer",
		       desc[0] ? cli_text_escape(desc, esc, sizeof(esc)) : "-");
	}
}

static void cc_info_usage(FILE *out)
{
	fprintf(out, "usage: devio info URI|IMAGE [--json] " CLI_EXPORT_USAGE "\n"
		     "  format, size, allocation, flags and layers of an export; for the URI of a running\n"
		     "  devio server also what `devio status` says of that server\n");
}

int cmd_info(int argc, char **argv)
{
	static const struct option opts[] = { { "json", no_argument, NULL, 'j' }, CLI_STD_OPTIONS,
					      CLI_EXPORT_OPTIONS, { 0 } };
	struct devio_open_opts o = { 0 };
	struct devio_backend *b;
	json_t *server;
	char format[256];
	uint64_t allocated = 0;
	bool json = false;
	int c, ar, rc = 0;

	optind = 1;
	while ((c = cli_getopt("info", argc, argv, "jhV", opts, cc_info_usage)) != -1) {
		if (c == 'j')
			json = true;
		else if (cli_export_option("info", c, optarg, &o) < 0)
			return cli_usage_hint("info");
	}
	if (optind != argc - 1)
		return cli_usage_error("info", "want one URI or IMAGE");
	/* Open read-write where allowed so the flags are the export's own, not
	 * those of a read-only open; read-only an image file we may not write
	 * (a URI is no file here: access() fails with ENOENT), and with an
	 * overlay, which info must never create.  One attempt, so a server
	 * that takes one connection is asked once. */
	o.readonly = o.cow || (access(argv[optind], W_OK) < 0 && (errno == EACCES || errno == EROFS || errno == EPERM));
	if (devio_backend_open(argv[optind], &o, &b))
		return 1;
	cli_format_name(b, format, sizeof(format));
	ar = cc_info_allocated(b, &allocated);
	server = cli_is_uri(argv[optind]) ? cli_status_find_uri(argv[optind]) : NULL;
	if (json) {
		rc = cc_info_json(argv[optind], b, format, ar, allocated, server) ? 1 : 0;
	} else {
		cc_info_text(argv[optind], b, format, ar, allocated);
		if (server) {
			printf("server (devio status):\n");
			cli_status_print(server);
		}
	}
	json_decref(server);
	devio_backend_close(b);
	return rc;
}

/* ---- cat ---- */

static void cc_cat_usage(FILE *out)
{
	fprintf(out, "usage: devio cat URI|IMAGE [--offset N] [--length N] [--size N]\n");
}

int cmd_cat(int argc, char **argv)
{
	static const struct option opts[] = { { "offset", required_argument, NULL, 'o' },
					      { "length", required_argument, NULL, 'l' },
					      { "size", required_argument, NULL, 's' },
					      CLI_STD_OPTIONS, { 0 } };
	uint64_t off = 0, len = 0, end;
	bool has_len = false;
	struct devio_backend *b;
	char *buf;
	int c, r = 0;

	optind = 1;
	while ((c = cli_getopt("cat", argc, argv, "o:l:hV", opts, cc_cat_usage)) != -1) {
		if (c == 'o')
			cc_size_arg("cat", "--offset", optarg, &off);
		else if (c == 's')
			cc_size_arg("cat", "--size", optarg, &client_size);
		else if (c == 'l') {
			cc_size_arg("cat", "--length", optarg, &len);
			has_len = true;
		}
	}
	if (optind != argc - 1)
		return cli_usage_error("cat", "want one URI or IMAGE");
	if (cc_open_export(argv[optind], true, &b))
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

		r = cc_run(b, DEVIO_OP_READ, buf, n, off);
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
static int cc_read_upto(int fd, char *buf, size_t n, size_t *got)
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

static void cc_write_usage(FILE *out)
{
	fprintf(out, "usage: devio write URI|IMAGE [--offset N] [--size N] < DATA\n");
}

int cmd_write(int argc, char **argv)
{
	static const struct option opts[] = { { "offset", required_argument, NULL, 'o' },
					      { "size", required_argument, NULL, 's' },
					      CLI_STD_OPTIONS, { 0 } };
	struct devio_backend *b;
	uint64_t off = 0, total = 0;
	char *buf;
	int c, r = 0;

	optind = 1;
	while ((c = cli_getopt("write", argc, argv, "o:hV", opts, cc_write_usage)) != -1) {
		if (c == 'o')
			cc_size_arg("write", "--offset", optarg, &off);
		else if (c == 's')
			cc_size_arg("write", "--size", optarg, &client_size);
	}
	if (optind != argc - 1)
		return cli_usage_error("write", "want one URI or IMAGE");
	if (cc_open_export(argv[optind], false, &b))
		return 1;
	buf = malloc(CLIENT_CHUNK);
	for (;;) {
		size_t got;

		if (!buf) {
			r = -ENOMEM;
			break;
		}
		if ((r = cc_read_upto(STDIN_FILENO, buf, CLIENT_CHUNK, &got))) {
			devio_err("write: stdin: %s", strerror(-r));
			break;
		}
		if (got == 0)
			break;
		if ((r = cc_run(b, DEVIO_OP_WRITE, buf, got, off))) {
			devio_err("write: %s: write at %llu of %zu bytes: %s", argv[optind], (unsigned long long)off,
				  got, strerror(-r));
			break;
		}
		off += got;
		total += got;
		if (got < CLIENT_CHUNK)
			break;
	}
	if (!r && (r = cc_run(b, DEVIO_OP_FLUSH, NULL, 0, 0)))
		devio_err("write: %s: flush: %s", argv[optind], strerror(-r));
	free(buf);
	devio_backend_close(b);
	if (!r)
		fprintf(stderr, "devio: wrote %llu bytes\n", (unsigned long long)total);
	return r ? 1 : 0;
}

/* ---- the copy engine: copy and convert ---- */

#define COPY_SPARSE 4096u /* convert leaves all-zero pieces of this size unwritten */

static volatile sig_atomic_t copy_interrupted;

static void cc_on_copy_signal(int sig) { copy_interrupted = sig; }

static void cc_format_eta(double secs, char *out, size_t outlen)
{
	unsigned long s = secs < 0 ? 0 : secs > 359999 ? 359999 : (unsigned long)secs;

	if (s >= 3600)
		snprintf(out, outlen, "%luh%02lum", s / 3600, s / 60 % 60);
	else if (s >= 60)
		snprintf(out, outlen, "%lum%02lus", s / 60, s % 60);
	else
		snprintf(out, outlen, "%lus", s);
}

/* One line, redrawn in place: bar, percent, MiB, rate, time left. */
static void cc_progress(uint64_t done, uint64_t total, uint64_t start_ns)
{
	double secs = (double)(devio_now_ns() - start_ns) / 1e9;
	double rate = secs > 0 ? (double)done / secs : 0.0;
	int pct = total ? (int)(done * 100 / total) : 100;
	char bar[41], eta[32] = "--";

	for (int i = 0; i < 40; i++)
		bar[i] = i < pct * 40 / 100 ? '#' : '.';
	bar[40] = '\0';
	if (rate > 0)
		cc_format_eta((double)(total - done) / rate, eta, sizeof(eta));
	fprintf(stderr, "\r[%s] %3d%% %llu/%llu MiB %.1f MiB/s ETA %s\033[K", bar, pct,
		(unsigned long long)(done >> 20), (unsigned long long)(total >> 20), rate / 1048576.0, eta);
}

/* Two threads: the reader fills one buffer while the writer drains the other. */
struct copy_job {
	struct cli_copy *c;
	uint64_t pos;         /* next offset the reader takes */
	char *bufs[2];
	uint64_t lens[2], offs[2];
	bool full[2];
	bool zero[2];         /* the block reads as zeroes: sent as ZERO (or skipped), not data */
	bool eof, failed;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int rerr;
};

struct zero_walk {
	uint64_t pos;   /* covered so far, all zero */
	bool data;      /* met an extent that may hold data */
};

static int cc_zero_extent(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
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
static bool cc_block_is_zero(struct devio_backend *b, uint64_t off, uint64_t len)
{
	struct zero_walk z = { .pos = off };

	if (!(b->caps & DEVIO_CAP_EXTENTS))
		return false;
	while (z.pos < off + len && !z.data) {
		uint64_t before = z.pos;

		if (devio_extents(b, z.pos, off + len - z.pos, cc_zero_extent, &z) < 0 || z.pos == before)
			return false;
	}
	return !z.data && z.pos >= off + len;
}

static void *cc_copy_reader(void *arg)
{
	struct copy_job *j = arg;
	struct cli_copy *c = j->c;

	for (int slot = 0;; slot ^= 1) {
		uint64_t n, off;
		int r;

		pthread_mutex_lock(&j->lock);
		while (j->full[slot] && !j->failed)
			pthread_cond_wait(&j->cond, &j->lock);
		if (j->failed || copy_interrupted || j->pos >= c->end) {
			j->eof = true;
			pthread_cond_broadcast(&j->cond);
			pthread_mutex_unlock(&j->lock);
			return NULL;
		}
		off = j->pos;
		n = c->end - off < c->block ? c->end - off : c->block;
		j->pos += n;
		pthread_mutex_unlock(&j->lock);
		j->zero[slot] = cc_block_is_zero(c->src, off, n);
		r = j->zero[slot] ? 0 : cc_run(c->src, DEVIO_OP_READ, j->bufs[slot], n, off);
		pthread_mutex_lock(&j->lock);
		if (r) {
			devio_err("%s: %s: read at %llu: %s", c->cmd, c->src_name, (unsigned long long)off, strerror(-r));
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

static bool cc_all_zero(const char *p, uint64_t n)
{
	return n == 0 || (p[0] == 0 && !memcmp(p, p + 1, n - 1));
}

/* Into a destination that reads as zeroes: only the pieces that are not
 * all zero are written. */
static int cc_copy_write_sparse(struct cli_copy *c, const char *buf, uint64_t len, uint64_t off)
{
	uint64_t pos = 0;

	while (pos < len) {
		bool zero = cc_all_zero(buf + pos, len - pos < COPY_SPARSE ? len - pos : COPY_SPARSE);
		uint64_t end = pos;
		int r = 0;

		do
			end = len - end < COPY_SPARSE ? len : end + COPY_SPARSE;
		while (end < len &&
		       cc_all_zero(buf + end, len - end < COPY_SPARSE ? len - end : COPY_SPARSE) == zero);
		if (zero)
			c->skipped += end - pos;
		else
			r = cc_run(c->dst, DEVIO_OP_WRITE, (char *)buf + pos, end - pos, off + pos);
		if (r)
			return r;
		pos = end;
	}
	return 0;
}

static int cc_copy_write(struct copy_job *j, int slot)
{
	struct cli_copy *c = j->c;

	if (j->zero[slot] && c->dst_zero) {
		c->skipped += j->lens[slot];
		return 0;
	}
	if (j->zero[slot])
		return cc_run(c->dst, DEVIO_OP_ZERO, NULL, j->lens[slot], j->offs[slot]);
	if (c->dst_zero)
		return cc_copy_write_sparse(c, j->bufs[slot], j->lens[slot], j->offs[slot]);
	return cc_run(c->dst, DEVIO_OP_WRITE, j->bufs[slot], j->lens[slot], j->offs[slot]);
}

static int cc_copy_writer(struct copy_job *j, uint64_t start_ns)
{
	struct cli_copy *c = j->c;
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
		r = cc_copy_write(j, slot);
		pthread_mutex_lock(&j->lock);
		if (!r && j->zero[slot])
			c->zeroed += j->lens[slot];
		if (r) {
			devio_err("%s: %s: write at %llu: %s", c->cmd, c->dst_name, (unsigned long long)j->offs[slot],
				  strerror(-r));
			j->failed = true;
		} else {
			c->done = j->offs[slot] + j->lens[slot];
			j->full[slot] = false;
		}
		pthread_cond_broadcast(&j->cond);
		pthread_mutex_unlock(&j->lock);
		if (r)
			return r;
		if (c->progress)
			cc_progress(c->done - c->start, c->end - c->start, start_ns);
	}
}

static int cc_copy_threads(struct copy_job *j)
{
	uint64_t start_ns = devio_now_ns();
	pthread_t t;
	int r;

	if ((r = pthread_create(&t, NULL, cc_copy_reader, j)))
		return -r;
	r = cc_copy_writer(j, start_ns);
	pthread_mutex_lock(&j->lock);
	j->failed = true; /* stop the reader if the writer gave up */
	pthread_cond_broadcast(&j->cond);
	pthread_mutex_unlock(&j->lock);
	pthread_join(t, NULL);
	if (j->c->progress)
		fprintf(stderr, "\r\033[K"); /* the line clears itself */
	return r;
}

int cli_copy_run(struct cli_copy *c)
{
	struct sigaction sa = { .sa_handler = cc_on_copy_signal }, old_int, old_term;
	struct copy_job j = { .c = c, .pos = c->start, .lock = PTHREAD_MUTEX_INITIALIZER,
			      .cond = PTHREAD_COND_INITIALIZER };
	int r = -ENOMEM;

	c->done = c->start;
	c->zeroed = c->skipped = 0;
	j.bufs[0] = malloc(c->block);
	j.bufs[1] = malloc(c->block);
	if (j.bufs[0] && j.bufs[1]) {
		sigaction(SIGINT, &sa, &old_int);
		sigaction(SIGTERM, &sa, &old_term);
		r = cc_copy_threads(&j);
		sigaction(SIGINT, &old_int, NULL);
		sigaction(SIGTERM, &old_term, NULL);
		if (!r && copy_interrupted)
			r = -EINTR;
	}
	free(j.bufs[0]);
	free(j.bufs[1]);
	if (!r && (r = devio_layer_flush(c->dst)))
		devio_err("%s: %s: flush: %s", c->cmd, c->dst_name, strerror(-r));
	return r;
}

/* ---- copy ---- */

static void cc_copy_usage(FILE *out)
{
	fprintf(out, "usage: devio copy SRC DST [--resume-from N] [--block-size N (512..64M)] [--size N]\n"
		     "  DST is created (sparse) when it is a file that does not exist; SRC and DST must\n"
		     "  not be the same file; a progress line with the time left on a terminal\n");
}

int cmd_copy(int argc, char **argv)
{
	static const struct option opts[] = { { "resume-from", required_argument, NULL, 'r' },
					      { "block-size", required_argument, NULL, 'b' },
					      { "size", required_argument, NULL, 's' },
					      CLI_STD_OPTIONS, { 0 } };
	struct cli_copy j = { .cmd = "copy", .block = CLIENT_CHUNK, .progress = isatty(STDERR_FILENO) };
	uint64_t resume = 0;
	int c, r, rc = 1;

	optind = 1;
	while ((c = cli_getopt("copy", argc, argv, "r:b:hV", opts, cc_copy_usage)) != -1) {
		if (c == 'r')
			cc_size_arg("copy", "--resume-from", optarg, &resume);
		else if (c == 's')
			cc_size_arg("copy", "--size", optarg, &client_size);
		else if (c == 'b')
			cc_size_arg("copy", "--block-size", optarg, &j.block);
		if (c == 'b' && (j.block < 512 || j.block > (64u << 20)))
			return cli_usage_error("copy", "--block-size: want 512..64M, got '%s'", optarg);
	}
	if (optind != argc - 2)
		return cli_usage_error("copy", "want SRC and DST");
	j.src_name = argv[optind];
	j.dst_name = argv[optind + 1];
	if (cli_same_file(j.src_name, j.dst_name)) {
		devio_err("copy: %s and %s are the same file: refusing to copy an image onto itself", j.src_name,
			  j.dst_name);
		return 1;
	}
	if (cc_open_export(j.src_name, true, &j.src))
		return 1;
	/* a missing DST file is made, sparse, as convert makes it */
	if (!cli_is_uri(j.dst_name) && access(j.dst_name, F_OK) && errno == ENOENT) {
		if (cli_create_sparse("copy", j.dst_name, j.src->size))
			goto out_src;
		j.dst_zero = true;
	}
	if (cc_open_export(j.dst_name, false, &j.dst))
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
	j.start = resume;
	j.end = j.src->size;
	r = cli_copy_run(&j);
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
out_dst:
	devio_backend_close(j.dst);
out_src:
	devio_backend_close(j.src);
	return rc;
}
