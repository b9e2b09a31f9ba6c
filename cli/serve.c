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

#define MAX_EXPORTS 16

static void serve_usage(const struct feopts *f, FILE *out)
{
	fprintf(out,
		"usage: devio serve SOURCE [options] FRONTEND...\n"
		"SOURCE: IMAGE (file or block device), ram:SIZE, devio://, nbd://, rbd:POOL/[NS/]IMAGE[@SNAP]\n"
		"front ends (each repeatable, at least one) and their options:\n");
	feopts_usage_frontends(f, out);
	fprintf(out,
		"export options:\n"
		"  -r, --readonly         refuse writes\n"
		"  --offset N, --size N   a window of the image (K/M/G/T suffixes)\n"
		"  --partition N          MBR/GPT partition N of the image\n"
		"  --ram-max N            RAM disk: cap on resident memory (ENOSPC beyond)\n"
		"  --direct               file: O_DIRECT\n"
		"  --format auto|raw|vhd|qcow2  image format (auto: detect, never follow a backing file)\n"
		"  --cow FILE|ram         writes go to an overlay FILE (created if missing) or RAM; SOURCE is never written\n"
		"  --export NAME=SOURCE   a further named export (NBD), repeatable\n"
		"  --ceph-conf FILE --ceph-id NAME --ceph-keyring FILE --ceph-timeout SECONDS   rbd: the cluster\n"
		"serving options (the core's run policy, every front end):\n");
	feopts_usage_serving(out);
	fprintf(out, "  -v, --verbose  -q, --quiet\n");
}

static int parse_size_opt(const char *opt, const char *val, uint64_t *out)
{
	if (devio_parse_size(val, out)) {
		devio_err("%s: bad size '%s'", opt, val);
		return -EINVAL;
	}
	return 0;
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
		int r = fe[started].type->start(srv, fe[started].arg, fe[started].opts, &fe[started].state);

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

/* serve's own options; the front ends' and --threads come from feopts.c */
enum {
	OPT_OFFSET = 256, OPT_SIZE, OPT_PARTITION, OPT_RAM_MAX, OPT_DIRECT, OPT_EXPORT, OPT_FORMAT,
	OPT_CEPH_CONF, OPT_CEPH_ID, OPT_CEPH_KEYRING, OPT_CEPH_TIMEOUT,
	OPT_COW,
};

static const struct option serve_options[] = {
	{ "readonly", no_argument, NULL, 'r' },
	{ "offset", required_argument, NULL, OPT_OFFSET },
	{ "size", required_argument, NULL, OPT_SIZE },
	{ "partition", required_argument, NULL, OPT_PARTITION },
	{ "ram-max", required_argument, NULL, OPT_RAM_MAX },
	{ "direct", no_argument, NULL, OPT_DIRECT },
	{ "format", required_argument, NULL, OPT_FORMAT },
	{ "ceph-conf", required_argument, NULL, OPT_CEPH_CONF },
	{ "ceph-id", required_argument, NULL, OPT_CEPH_ID },
	{ "ceph-keyring", required_argument, NULL, OPT_CEPH_KEYRING },
	{ "ceph-timeout", required_argument, NULL, OPT_CEPH_TIMEOUT },
	{ "cow", required_argument, NULL, OPT_COW },
	{ "export", required_argument, NULL, OPT_EXPORT },
	{ "verbose", no_argument, NULL, 'v' },
	{ "quiet", no_argument, NULL, 'q' },
	{ "help", no_argument, NULL, 'h' },
	{ NULL, 0, NULL, 0 },
};

struct serve_args {
	struct devio_open_opts open;
	const char *sources[MAX_EXPORTS], *names[MAX_EXPORTS];
	size_t n_sources;
	struct feopts fe;
};

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

static int parse_one(struct serve_args *a, int c, char *val)
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
	case OPT_CEPH_CONF: a->open.ceph_conf = val; return 0;
	case OPT_CEPH_ID: a->open.ceph_id = val; return 0;
	case OPT_CEPH_KEYRING: a->open.ceph_keyring = val; return 0;
	case OPT_CEPH_TIMEOUT: return devio_opt_uint("ceph-timeout", val, &a->open.ceph_timeout);
	case OPT_COW: a->open.cow = val; return 0;
	case OPT_EXPORT: return parse_export_opt(a, val);
	case 'h': serve_usage(&a->fe, stdout); exit(0);
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

/* Options in any order; 0, or an exit status for a usage error. */
static int serve_parse(struct serve_args *a, int argc, char **argv)
{
	int c, r;

	optind = 1;
	while ((c = getopt_long(argc, argv, "rvqh", a->fe.table, NULL)) != -1) {
		r = c == '?' ? -EINVAL : feopts_parse(&a->fe, c, optarg);
		if (r == 1)
			r = parse_one(a, c, optarg);
		if (r)
			return 2;
	}
	if (optind != argc - 1 || a->fe.n_fe == 0) {
		char all[256];

		feopts_list(&a->fe, NULL, all, sizeof(all));
		if (optind == argc)
			devio_err("no SOURCE given");
		else if (optind < argc - 1)
			devio_err("more than one SOURCE given (use --export NAME=SOURCE)");
		else
			devio_err("no front end given (%s)", all);
		return 2;
	}
	a->sources[0] = argv[optind];
	feopts_finish(&a->fe);
	return 0;
}

int cmd_serve(int argc, char **argv)
{
	static struct serve_args a; /* large; one per process */
	struct devio_server srv = { 0 };
	int rc;

	memset(&a, 0, sizeof(a));
	if (feopts_init(&a.fe, devio_frontends, serve_options))
		return 1;
	add_export(&a, "", NULL); /* slot 0: the default export, the positional SOURCE */
	rc = serve_parse(&a, argc, argv);
	if (rc) {
		serve_usage(&a.fe, stderr);
		goto out;
	}
	srv.opts = a.fe.serve;
	rc = 1;
	if (open_exports(&a, &srv))
		goto out;
	rc = serve_run(&srv, a.fe.fe, a.fe.n_fe);
	close_exports(&srv);
out:
	feopts_free(&a.fe);
	return rc;
}
