/* serve.c - `devio serve`: open one or more exports and serve them through
 * every front end named on the command line until SIGINT/SIGTERM. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "cli.h"
#include "devio/request.h"
#include "devio/util.h"

#define MAX_FRONTENDS 16
#define MAX_EXPORTS 16

static void serve_usage(FILE *out)
{
	fprintf(out,
		"usage: devio serve SOURCE [options] FRONTEND...\n"
		"SOURCE: IMAGE (file or block device) or ram:SIZE\n"
		"front ends (each repeatable, at least one):\n"
		"  --devio tcp:[HOST:]PORT|unix:PATH|stdio|DEVICE   devio stream protocol (ImDisk proxy)\n"
		"  --nbd tcp:[HOST:]PORT|unix:PATH                  NBD (default port 10809)\n"
		"  --fuse MOUNTPOINT [--loop]                       the export as one file (and a loop device)\n"
		"  --ublk                                           a /dev/ublkbN block device\n"
		"export options:\n"
		"  -r, --readonly         refuse writes\n"
		"  --offset N, --size N   a window of the image (K/M/G/T suffixes)\n"
		"  --partition N          MBR/GPT partition N of the image\n"
		"  --ram-max N            RAM disk: cap on resident memory (ENOSPC beyond)\n"
		"  --direct               file: O_DIRECT\n"
		"  --format auto|raw|vhd|qcow2  image format (auto: detect, never follow a backing file)\n"
		"  --export NAME=SOURCE   a further named export (NBD), repeatable\n"
		"serving options:\n"
		"  --queues N --depth N --threads N --block-size N --fuse-transport auto|uring|dev\n"
		"  -v, --verbose  -q, --quiet\n");
}

static int parse_size_opt(const char *opt, const char *val, uint64_t *out)
{
	if (devio_parse_size(val, out)) {
		devio_err("%s: bad size '%s'", opt, val);
		return -EINVAL;
	}
	return 0;
}

static int parse_uint_opt(const char *opt, const char *val, unsigned *out)
{
	uint64_t v;

	if (devio_parse_u64(val, &v) || v > 1u << 20) {
		devio_err("%s: bad number '%s'", opt, val);
		return -EINVAL;
	}
	*out = (unsigned)v;
	return 0;
}

static const struct devio_frontend_type *frontend_by_option(const char *name)
{
	static const struct devio_frontend_type *const all[] = {
		&devio_frontend_stream, &devio_frontend_nbd, &devio_frontend_fuse, &devio_frontend_ublk
	};

	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
		if (!strcmp(all[i]->option, name))
			return all[i];
	return NULL;
}

static volatile sig_atomic_t stop_signal;

static void on_signal(int sig) { stop_signal = sig; }

static void write_status(struct devio_server *srv, struct serve_frontend *fe, size_t n, char *path, size_t pathlen)
{
	char tmp[160];
	FILE *f;

	mkdir(DEVIO_RUN_DIR, 0755);
	snprintf(path, pathlen, DEVIO_RUN_DIR "/%d.status", (int)getpid());
	snprintf(tmp, sizeof(tmp), "%s.tmp", path); /* readers never see half a file */
	f = fopen(tmp, "w");
	if (!f) {
		path[0] = '\0';
		return;
	}
	fprintf(f, "pid %d\n", (int)getpid());
	for (size_t i = 0; i < srv->n_exports; i++) {
		struct devio_backend *b = srv->exports[i].backend;
		char desc[256] = "";

		if (b->ops->describe)
			b->ops->describe(b, desc, sizeof(desc));
		fprintf(f, "export '%s' %s size %llu%s %s\n", srv->exports[i].name, srv->exports[i].source,
			(unsigned long long)b->size, b->caps & DEVIO_CAP_READONLY ? " read-only" : "", desc);
	}
	for (size_t i = 0; i < n; i++) {
		fprintf(f, "frontend --%s %s\n", fe[i].type->option, fe[i].arg ? fe[i].arg : "");
		if (fe[i].type->status)
			fe[i].type->status(fe[i].state, f);
	}
	if (fclose(f) || rename(tmp, path)) {
		unlink(tmp);
		path[0] = '\0';
	}
}

static bool all_finished(struct serve_frontend *fe, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (!fe[i].type->finished || !fe[i].type->finished(fe[i].state))
			return false;
	return n > 0;
}

int serve_run(struct devio_server *srv, struct serve_frontend *fe, size_t n)
{
	struct sigaction sa = { .sa_handler = on_signal };
	char status_path[128];
	size_t started = 0;
	int rc = 0;

	signal(SIGPIPE, SIG_IGN);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);
	for (; started < n; started++) {
		unsigned long errors = devio_log_errors();
		int r = fe[started].type->start(srv, fe[started].arg, &fe[started].state);

		if (r) {
			if (devio_log_errors() == errors) /* the front end did not say why */
				devio_err("--%s %s: cannot start: %s", fe[started].type->option,
					  fe[started].arg ? fe[started].arg : "", strerror(-r));
			rc = 1;
			goto stop;
		}
	}
	write_status(srv, fe, n, status_path, sizeof(status_path));
	for (unsigned tick = 1; !stop_signal && !all_finished(fe, n); tick++) {
		struct timespec ts = { 0, 50 * 1000 * 1000 };
		nanosleep(&ts, NULL);
		if (tick % 20 == 0 && status_path[0]) /* live counters for `devio status` */
			write_status(srv, fe, n, status_path, sizeof(status_path));
	}
	if (stop_signal)
		devio_info("signal %d: stopping", (int)stop_signal);
	if (status_path[0])
		unlink(status_path);
stop:
	while (started > 0) {
		started--;
		fe[started].type->stop(fe[started].state);
	}
	for (size_t i = 0; i < srv->n_exports; i++) {
		struct devio_backend *b = srv->exports[i].backend;
		struct devio_request flush = { .op = DEVIO_OP_FLUSH };

		if (!(b->caps & DEVIO_CAP_READONLY) && devio_run(b, &flush) < 0) {
			devio_err("%s: flush at exit failed", srv->exports[i].source);
			rc = 1;
		}
	}
	return rc;
}

enum {
	OPT_OFFSET = 256, OPT_SIZE, OPT_PARTITION, OPT_RAM_MAX, OPT_DIRECT, OPT_EXPORT,
	OPT_DEVIO, OPT_NBD, OPT_FUSE, OPT_UBLK, OPT_LOOP, OPT_QUEUES, OPT_DEPTH, OPT_THREADS,
	OPT_BLOCK_SIZE, OPT_FUSE_TRANSPORT, OPT_FORMAT,
};

static const struct option serve_options[] = {
	{ "readonly", no_argument, NULL, 'r' },
	{ "offset", required_argument, NULL, OPT_OFFSET },
	{ "size", required_argument, NULL, OPT_SIZE },
	{ "partition", required_argument, NULL, OPT_PARTITION },
	{ "ram-max", required_argument, NULL, OPT_RAM_MAX },
	{ "direct", no_argument, NULL, OPT_DIRECT },
	{ "format", required_argument, NULL, OPT_FORMAT },
	{ "export", required_argument, NULL, OPT_EXPORT },
	{ "devio", required_argument, NULL, OPT_DEVIO },
	{ "nbd", required_argument, NULL, OPT_NBD },
	{ "fuse", required_argument, NULL, OPT_FUSE },
	{ "ublk", optional_argument, NULL, OPT_UBLK },
	{ "loop", no_argument, NULL, OPT_LOOP },
	{ "queues", required_argument, NULL, OPT_QUEUES },
	{ "depth", required_argument, NULL, OPT_DEPTH },
	{ "threads", required_argument, NULL, OPT_THREADS },
	{ "block-size", required_argument, NULL, OPT_BLOCK_SIZE },
	{ "fuse-transport", required_argument, NULL, OPT_FUSE_TRANSPORT },
	{ "verbose", no_argument, NULL, 'v' },
	{ "quiet", no_argument, NULL, 'q' },
	{ "help", no_argument, NULL, 'h' },
	{ NULL, 0, NULL, 0 },
};

struct serve_args {
	struct devio_open_opts open;
	const char *sources[MAX_EXPORTS], *names[MAX_EXPORTS];
	size_t n_sources;
	struct serve_frontend fe[MAX_FRONTENDS];
	size_t n_fe;
};

static int add_frontend(struct serve_args *a, const char *option, const char *arg)
{
	if (a->n_fe == MAX_FRONTENDS) {
		devio_err("too many front ends (at most %d)", MAX_FRONTENDS);
		return -E2BIG;
	}
	a->fe[a->n_fe].type = frontend_by_option(option);
	a->fe[a->n_fe].arg = arg;
	a->n_fe++;
	return 0;
}

static int add_export(struct serve_args *a, const char *name, const char *source)
{
	if (a->n_sources == MAX_EXPORTS) {
		devio_err("too many exports (at most %d)", MAX_EXPORTS);
		return -E2BIG;
	}
	a->names[a->n_sources] = name;
	a->sources[a->n_sources++] = source;
	return 0;
}

static int parse_export_opt(struct serve_args *a, char *val)
{
	char *eq = strchr(val, '=');

	if (!eq || eq == val || !eq[1]) {
		devio_err("--export: want NAME=SOURCE, got '%s'", val);
		return -EINVAL;
	}
	*eq = '\0';
	return add_export(a, val, eq + 1);
}

static int parse_one(struct serve_args *a, struct devio_serve_opts *so, int c, char *val)
{
	uint64_t v;

	switch (c) {
	case 'r': a->open.readonly = true; return 0;
	case 'v': devio_log_set_level(DEVIO_LOG_DEBUG); return 0;
	case 'q': devio_log_set_level(DEVIO_LOG_WARN); return 0;
	case OPT_OFFSET: a->open.has_offset = true; return parse_size_opt("--offset", val, &a->open.offset);
	case OPT_SIZE: a->open.has_size = true; return parse_size_opt("--size", val, &a->open.size);
	case OPT_PARTITION:
		if (devio_parse_u64(val, &v) || v < 1 || v > 128) {
			devio_err("--partition: want 1..128, got '%s'", val);
			return -EINVAL;
		}
		a->open.partition = (int)v;
		return 0;
	case OPT_RAM_MAX: return parse_size_opt("--ram-max", val, &a->open.ram_max);
	case OPT_DIRECT: a->open.direct = true; return 0;
	case OPT_FORMAT: a->open.format = val; return 0;
	case OPT_EXPORT: return parse_export_opt(a, val);
	case OPT_DEVIO: return add_frontend(a, "devio", val);
	case OPT_NBD: return add_frontend(a, "nbd", val);
	case OPT_FUSE: return add_frontend(a, "fuse", val);
	case OPT_UBLK: return add_frontend(a, "ublk", val);
	case OPT_LOOP: so->loop = true; return 0;
	case OPT_QUEUES: return parse_uint_opt("--queues", val, &so->queues);
	case OPT_DEPTH: return parse_uint_opt("--depth", val, &so->depth);
	case OPT_THREADS: return parse_uint_opt("--threads", val, &so->threads);
	case OPT_BLOCK_SIZE:
		if (parse_size_opt("--block-size", val, &v))
			return -EINVAL;
		if (v < 512 || v > 65536 || (v & (v - 1))) {
			devio_err("--block-size: want a power of two from 512 to 64K, got '%s'", val);
			return -EINVAL;
		}
		so->block_size = (uint32_t)v;
		return 0;
	case OPT_FUSE_TRANSPORT:
		if (strcmp(val, "auto") && strcmp(val, "uring") && strcmp(val, "dev")) {
			devio_err("--fuse-transport: want auto, uring or dev, got '%s'", val);
			return -EINVAL;
		}
		so->fuse_transport = val;
		return 0;
	case 'h': serve_usage(stdout); exit(0);
	default: return -EINVAL;
	}
}

static void close_exports(struct devio_server *srv)
{
	for (size_t i = 0; i < srv->n_exports; i++)
		devio_backend_close(srv->exports[i].backend);
	free(srv->exports);
}

static int open_exports(struct serve_args *a, struct devio_server *srv)
{
	srv->exports = calloc(a->n_sources, sizeof(*srv->exports));
	if (!srv->exports)
		return -ENOMEM;
	for (size_t i = 0; i < a->n_sources; i++) {
		struct devio_export *e = &srv->exports[i];
		int r;

		e->name = a->names[i];
		e->source = a->sources[i];
		r = devio_backend_open(e->source, &a->open, &e->backend);
		if (r) { /* the backend said why */
			close_exports(srv);
			return r;
		}
		srv->n_exports++;
	}
	return 0;
}

int cmd_serve(int argc, char **argv)
{
	static struct serve_args a; /* large; one per process */
	struct devio_server srv = { 0 };
	int c, rc;

	memset(&a, 0, sizeof(a));
	add_export(&a, "", NULL); /* slot 0: the default export, the positional SOURCE */
	optind = 1;
	while ((c = getopt_long(argc, argv, "rvqh", serve_options, NULL)) != -1) {
		if (c == '?' || parse_one(&a, &srv.opts, c, optarg)) {
			serve_usage(stderr);
			return 2;
		}
	}
	if (optind != argc - 1 || a.n_fe == 0) {
		devio_err(optind == argc ? "no SOURCE given"
		       : optind < argc - 1 ? "more than one SOURCE given (use --export NAME=SOURCE)"
					   : "no front end given (--devio, --nbd, --fuse, --ublk)");
		serve_usage(stderr);
		return 2;
	}
	a.sources[0] = argv[optind];
	if (open_exports(&a, &srv))
		return 1;
	rc = serve_run(&srv, a.fe, a.n_fe);
	close_exports(&srv);
	return rc;
}
