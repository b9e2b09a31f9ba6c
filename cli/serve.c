/* serve.c - `devio serve`: open one or more exports and serve them through
 * every front end named on the command line until SIGINT/SIGTERM (or the
 * --run command exits); the service conventions are cli/daemon.c's. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
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
		"  --remote-timeout SECONDS  devio://, nbd:// sources: requests wait this long for a lost server,\n"
		"                         reconnected and resent in order (default 0: fail at once; attach: --timeout)\n"
		"serving options (the core's run policy, every front end):\n");
	feopts_usage_serving(out);
	daemon_usage(out);
	fprintf(out, "  -v, --verbose  -q, --quiet\n");
}

static int serve_parse_size_opt(const char *opt, const char *val, uint64_t *out)
{
	int r = devio_parse_size(val, out);

	if (r) {
		cli_size_error(NULL, opt, val, r);
		return -EINVAL;
	}
	return 0;
}

static volatile sig_atomic_t stop_signal, handover_signal;

static void serve_on_signal(int sig) { stop_signal = sig; }

static void serve_on_handover(int sig) { handover_signal = sig; }

/* SIGUSR2: hand every front end over (frontend.h handover); true when
 * all of them are ready to stop for a successor, false to serve on. */
static bool serve_handover(struct serve_frontend *fe, size_t n)
{
	handover_signal = 0;
	for (size_t i = 0; i < n; i++)
		if (!fe[i].type->handover) {
			devio_err("SIGUSR2: --%s cannot hand over to another server; serving on (SIGTERM stops)",
				  fe[i].type->option);
			return false;
		}
	for (size_t i = 0; i < n; i++)
		if (fe[i].type->handover(fe[i].state))
			return false;
	devio_info("SIGUSR2: handed over; stopping");
	return n > 0;
}

static time_t serve_started;

static void serve_write_status(struct devio_server *srv, struct serve_frontend *fe, size_t n, char *path,
			       size_t pathlen)
{
	char tmp[PATH_MAX + 64];
	FILE *f = NULL;
	int fd;

	cli_status_publish(srv, fe, n, serve_started);
	snprintf(path, pathlen, "%s/%d.status", runstate_dir(), (int)getpid());
	snprintf(tmp, sizeof(tmp), "%s.tmp", path); /* readers never see half a file */
	/* 0600 whatever the umask: it names the images and where they are served */
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd >= 0 && fchmod(fd, 0600) == 0)
		f = fdopen(fd, "w");
	if (!f) {
		if (fd >= 0)
			close(fd);
		path[0] = '\0';
		return;
	}
	fprintf(f, "pid %d\nstart %llu\n", (int)getpid(), runstate_start_time(getpid()));
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

/* --run's environment: $nbd and $devio (URIs of the first --nbd and
 * --devio address; devio+tls:// for tls:, without credentials), $device
 * (the loop device, ublk device or FUSE file), $uri (the first of them). */
struct serve_env {
	char nbd[PATH_MAX + 64], devio[PATH_MAX + 64], device[PATH_MAX];
	const char *env[4][2];
	size_t n;
};

static void serve_env_uri(const struct serve_frontend *fe, struct serve_env *e)
{
	bool nbd = !strcmp(fe->type->option, "nbd");
	char *out = nbd ? e->nbd : e->devio, arg[PATH_MAX];
	struct devio_addr a;
	bool tls;

	if (out[0] || !fe->arg)
		return;
	tls = !nbd && !strncmp(fe->arg, "tls:", 4); /* --devio tls:[HOST:]PORT: a tcp: address */
	snprintf(arg, sizeof(arg), "%s%s", tls ? "tcp:" : "", fe->arg + (tls ? 4 : 0));
	arg[strcspn(arg, ",")] = '\0'; /* --devio ADDR,max-transfer=N */
	if (devio_addr_parse(arg, "10809", &a))
		return;
	if (a.kind == DEVIO_ADDR_TCP) {
		/* where devio_listen() binds: loopback by default, 127.0.0.1 reaches "*" too */
		const char *h = a.host[0] && strcmp(a.host, "*") ? a.host : "127.0.0.1";
		snprintf(out, PATH_MAX + 64, "%s://%s%s%s:%s", nbd ? "nbd" : tls ? "devio+tls" : "devio",
			 strchr(h, ':') ? "[" : "", h, strchr(h, ':') ? "]" : "", a.port);
	} else if (a.kind == DEVIO_ADDR_UNIX) {
		snprintf(out, PATH_MAX + 64, nbd ? "nbd+unix:///?socket=%s" : "devio+unix://%s", a.path);
	}
}

/* The device a FUSE or ublk front end made, from its status lines. */
static void serve_env_device(const struct serve_frontend *fe, struct serve_env *e)
{
	static const char *const keys[] = { "  loop ", "ublk device ", "  fuse mount " };
	char *buf = NULL, *line;
	size_t len = 0;
	FILE *f;

	if (e->device[0] || !fe->type->status || !(f = open_memstream(&buf, &len)))
		return;
	fe->type->status(fe->state, f);
	fclose(f);
	for (size_t k = 0; k < 3 && !e->device[0]; k++) {
		line = strstr(buf, keys[k]);
		if (k == 2 && line)
			line = strstr(line, " file ") ? strstr(line, " file ") + 6 : NULL;
		else if (line)
			line += strlen(keys[k]);
		if (line)
			snprintf(e->device, sizeof(e->device), "%.*s", (int)strcspn(line, " \n"), line);
	}
	free(buf);
}

static void serve_env_build(struct serve_frontend *fe, size_t n, struct serve_env *e)
{
	memset(e, 0, sizeof(*e));
	for (size_t i = 0; i < n; i++) {
		if (!strcmp(fe[i].type->option, "nbd") || !strcmp(fe[i].type->option, "devio"))
			serve_env_uri(&fe[i], e);
		else
			serve_env_device(&fe[i], e);
	}
	const char *uri = e->nbd[0] ? e->nbd : e->devio[0] ? e->devio : e->device;
	const char *vals[4][2] = { { "uri", uri }, { "nbd", e->nbd }, { "devio", e->devio }, { "device", e->device } };
	for (size_t i = 0; i < 4; i++)
		if (vals[i][1][0]) {
			e->env[e->n][0] = vals[i][0];
			e->env[e->n++][1] = vals[i][1];
		}
}

static bool serve_all_finished(struct serve_frontend *fe, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (!fe[i].type->finished || !fe[i].type->finished(fe[i].state))
			return false;
	return n > 0;
}

int serve_run(struct devio_server *srv, struct serve_frontend *fe, size_t n)
{
	struct sigaction sa = { .sa_handler = serve_on_signal }, sh = { .sa_handler = serve_on_handover };
	static struct serve_env env;
	char status_path[PATH_MAX + 32];
	size_t started = 0;
	int rc = 0, run_status = -1, r;

	serve_started = time(NULL);
	signal(SIGPIPE, SIG_IGN);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGUSR2, &sh, NULL);
	daemon_signals(); /* SIGHUP reopens the log */
	if (daemon_check_frontends(fe, n))
		return 1;
	for (; started < n; started++) {
		unsigned long errors = devio_log_errors();
		r = fe[started].type->start(srv, fe[started].arg, fe[started].opts, &fe[started].state);

		if (r) {
			if (devio_log_errors() == errors) /* the front end did not say why */
				devio_err("--%s %s: cannot start: %s", fe[started].type->option,
					  fe[started].arg ? fe[started].arg : "", strerror(-r));
			rc = 1;
			goto stop;
		}
	}
	if ((r = runstate_lock()))
		devio_debug("%s: cannot take this server's lock file: %s", runstate_dir(), strerror(-r));
	serve_write_status(srv, fe, n, status_path, sizeof(status_path));
	serve_env_build(fe, n, &env);
	if (daemon_ready(env.env, env.n)) {
		rc = 1;
		goto stop_status;
	}
	for (unsigned tick = 1;
	     !stop_signal && !serve_all_finished(fe, n) && (run_status = daemon_tick()) < 0; tick++) {
		struct timespec ts = { 0, 50 * 1000 * 1000 };
		nanosleep(&ts, NULL);
		if (handover_signal && serve_handover(fe, n))
			break;
		if (tick % 20 == 0 && status_path[0]) /* live counters for `devio status` */
			serve_write_status(srv, fe, n, status_path, sizeof(status_path));
	}
	if (stop_signal)
		devio_info("signal %d: stopping", (int)stop_signal);
stop_status:
	if (status_path[0])
		unlink(status_path);
	snprintf(status_path, sizeof(status_path), "%s/%d.json", runstate_dir(), (int)getpid());
	unlink(status_path);
	runstate_unlock();
stop:
	run_status = daemon_stop(); /* the --run command ends before its devices */
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
	return rc == 0 && run_status >= 0 ? run_status : rc;
}

/* serve's own options; the front ends' and --threads come from feopts.c */
enum {
	OPT_OFFSET = 256, OPT_SIZE, OPT_PARTITION, OPT_RAM_MAX, OPT_DIRECT, OPT_EXPORT, OPT_FORMAT,
	OPT_CEPH_CONF, OPT_CEPH_ID, OPT_CEPH_KEYRING, OPT_CEPH_TIMEOUT, OPT_REMOTE_TIMEOUT,
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
	{ "remote-timeout", required_argument, NULL, OPT_REMOTE_TIMEOUT },
	{ "cow", required_argument, NULL, OPT_COW },
	{ "export", required_argument, NULL, OPT_EXPORT },
	{ "verbose", no_argument, NULL, 'v' },
	{ "quiet", no_argument, NULL, 'q' },
	CLI_STD_OPTIONS,
	{ NULL, 0, NULL, 0 },
};

struct serve_args {
	struct devio_open_opts open;
	const char *sources[MAX_EXPORTS], *names[MAX_EXPORTS];
	char *absolute[MAX_EXPORTS + 1]; /* sources and the overlay made absolute (freed at exit) */
	size_t n_sources;
	struct feopts fe;
	struct daemon_opts daemon;
};

static int serve_add_export(struct serve_args *a, const char *name, const char *source)
{
	if (a->n_sources == MAX_EXPORTS) {
		devio_err("too many exports (at most %d)", MAX_EXPORTS);
		return -E2BIG;
	}
	a->names[a->n_sources] = name;
	a->sources[a->n_sources++] = source;
	return 0;
}

static int serve_parse_export_opt(struct serve_args *a, char *val)
{
	char *eq = strchr(val, '=');

	if (!eq || eq == val || !eq[1]) {
		devio_err("--export: want NAME=SOURCE, got '%s'", val);
		return -EINVAL;
	}
	*eq = '\0';
	return serve_add_export(a, val, eq + 1);
}

static int serve_parse_one(struct serve_args *a, int c, char *val)
{
	uint64_t v;

	switch (c) {
	case 'r': a->open.readonly = true; return 0;
	case 'v': devio_log_set_level(DEVIO_LOG_DEBUG); return 0;
	case 'q': devio_log_set_level(DEVIO_LOG_WARN); return 0;
	case OPT_OFFSET:
		a->open.has_offset = true;
		return serve_parse_size_opt("--offset", val, &a->open.offset);
	case OPT_SIZE: a->open.has_size = true; return serve_parse_size_opt("--size", val, &a->open.size);
	case OPT_PARTITION:
		if (devio_parse_u64(val, &v) || v < 1 || v > 128) {
			devio_err("--partition: want 1..128, got '%s'", val);
			return -EINVAL;
		}
		a->open.partition = (int)v;
		return 0;
	case OPT_RAM_MAX: return serve_parse_size_opt("--ram-max", val, &a->open.ram_max);
	case OPT_DIRECT: a->open.direct = true; return 0;
	case OPT_FORMAT: a->open.format = val; return 0;
	case OPT_CEPH_CONF: a->open.ceph_conf = val; return 0;
	case OPT_CEPH_ID: a->open.ceph_id = val; return 0;
	case OPT_CEPH_KEYRING: a->open.ceph_keyring = val; return 0;
	case OPT_CEPH_TIMEOUT: return devio_opt_uint("ceph-timeout", val, &a->open.ceph_timeout);
	case OPT_REMOTE_TIMEOUT: return devio_opt_uint("remote-timeout", val, &a->open.remote_timeout);
	case OPT_COW: a->open.cow = val; return 0;
	case OPT_EXPORT: return serve_parse_export_opt(a, val);
	default: return -EINVAL;
	}
}

static void serve_close_exports(struct devio_server *srv)
{
	for (size_t i = 0; i < srv->n_exports; i++)
		devio_backend_close(srv->exports[i].backend);
	free(srv->exports);
}

static int serve_open_exports(struct serve_args *a, struct devio_server *srv)
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
			serve_close_exports(srv);
			return r;
		}
		srv->n_exports++;
	}
	return 0;
}

static const struct feopts *serve_help_fe; /* for serve_help() */

static void serve_help(FILE *out)
{
	serve_usage(serve_help_fe, out);
}

/* A relative file name as an absolute one (what `devio status` shows
 * stays true whatever the reader's directory); URIs, ram: and the rest
 * as they are.  *keep: the new string, freed by the caller. */
static const char *serve_absolute(const char *path, char **keep)
{
	char cwd[PATH_MAX];

	if (!path || path[0] == '/' || cli_is_uri(path) || !strcmp(path, "ram") || strchr(path, ':') ||
	    !getcwd(cwd, sizeof(cwd)) || asprintf(keep, "%s/%s", cwd, path) < 0)
		return path;
	return *keep;
}

static void serve_absolutize(struct serve_args *a)
{
	for (size_t i = 0; i < a->n_sources; i++)
		a->sources[i] = serve_absolute(a->sources[i], &a->absolute[i]);
	a->open.cow = serve_absolute(a->open.cow, &a->absolute[MAX_EXPORTS]);
}

/* Export options that would change nothing are said, not silently
 * ignored. */
static void serve_warn_unused(const struct serve_args *a, bool ram_max)
{
	bool nbd = false, ram = false, rbd = false, file = false;
	const struct devio_open_opts *o = &a->open;

	for (size_t i = 0; i < a->fe.n_fe; i++)
		nbd |= !strcmp(a->fe.fe[i].type->option, "nbd");
	for (size_t i = 0; i < a->n_sources; i++) {
		ram |= !strncmp(a->sources[i], "ram:", 4);
		rbd |= !strncmp(a->sources[i], "rbd:", 4);
		file |= !cli_is_uri(a->sources[i]) && strncmp(a->sources[i], "rbd:", 4) &&
			strncmp(a->sources[i], "plugin:", 7); /* an image file or block device */
	}
	if (o->direct && !file)
		devio_warn("--direct has no effect: no source is an image file or block device");
	if ((o->ceph_conf || o->ceph_id || o->ceph_keyring || o->ceph_timeout) && !rbd)
		devio_warn("--ceph-* options have no effect: no source is an rbd: image");
	for (size_t i = 1; i < a->n_sources; i++) {
		for (size_t k = 1; k < i; k++)
			if (!strcmp(a->names[i], a->names[k]))
				devio_warn("--export %s: the name is given twice; clients reach only the first (%s)",
					   a->names[i], a->sources[k]);
		if (!nbd)
			devio_warn("--export %s has no effect without --nbd (the other front ends serve the default "
				   "export, SOURCE)", a->names[i]);
	}
	if (ram_max && !ram)
		devio_warn("--ram-max has no effect: no source is a RAM disk (ram:SIZE)");
}

/* Options in any order; 0, or an exit status for a usage error. */
static int serve_parse(struct serve_args *a, int argc, char **argv)
{
	int c, r;

	optind = 1;
	serve_help_fe = &a->fe;
	while ((c = cli_getopt("serve", argc, argv, "rvqhV", a->fe.table, serve_help)) != -1) {
		r = feopts_parse(&a->fe, c, optarg);
		if (r == 1)
			r = daemon_parse(&a->daemon, c, optarg);
		if (r == 1)
			r = serve_parse_one(a, c, optarg);
		if (r) /* the option said what is wrong */
			return cli_usage_hint("serve");
	}
	if (optind != argc - 1 || a->fe.n_fe == 0) {
		char all[256];

		feopts_list(&a->fe, NULL, all, sizeof(all));
		if (optind == argc)
			return cli_usage_error("serve", "no SOURCE given");
		if (optind < argc - 1)
			return cli_usage_error("serve", "more than one SOURCE given: '%s' and '%s' (use --export NAME=SOURCE)",
					       argv[optind], argv[optind + 1]);
		return cli_usage_error("serve", "no front end given (%s)", all);
	}
	a->sources[0] = argv[optind];
	if (daemon_check(&a->daemon))
		return cli_usage_hint("serve");
	feopts_finish(&a->fe);
	serve_warn_unused(a, a->open.ram_max != 0);
	return 0;
}

int cmd_serve(int argc, char **argv)
{
	static struct serve_args a; /* large; one per process */
	struct devio_server srv = { 0 };
	struct option *own = daemon_merge_options(serve_options);
	int rc;

	memset(&a, 0, sizeof(a));
	if (!own || feopts_init(&a.fe, devio_frontends, own)) {
		free(own);
		return 1;
	}
	serve_add_export(&a, "", NULL); /* slot 0: the default export, the positional SOURCE */
	rc = serve_parse(&a, argc, argv);
	if (rc)
		goto out;
	srv.opts = a.fe.serve;
	serve_absolutize(&a);
	if (daemon_start(&a.daemon, &rc))
		goto out; /* the --fork parent: the child is ready, or failed */
	rc = 1;
	if (serve_open_exports(&a, &srv))
		goto out;
	rc = serve_run(&srv, a.fe.fe, a.fe.n_fe);
	serve_close_exports(&srv);
out:
	for (size_t i = 0; i <= MAX_EXPORTS; i++)
		free(a.absolute[i]);
	feopts_free(&a.fe);
	free(own);
	return rc;
}
