/* attach.c - `devio attach URI --fuse DIR [--loop]` gives this machine a
 * file (and a block device) for a remote devio or NBD server: the URI is
 * opened as a backend and served by the FUSE front end in this process,
 * the Linux counterpart of `imdisk -a -t proxy`.  `devio detach DIR|DEV`
 * finds the attach (or serve) process through its status file in
 * DEVIO_RUN_DIR, signals it and waits until the mount and device are gone.
 * --nbd-device and /dev/nbdN go to the kernel nbd client (attach_nbd.c). */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "cli.h"
#include "devio/ublk.h"
#include "devio/util.h"

/* The front ends attach offers: a local file or device for the export. */
static const struct devio_frontend_type *const attach_frontends[] = { &devio_frontend_fuse, NULL };

static void attach_usage(FILE *out)
{
	struct feopts f;

	fprintf(out,
		"usage: devio attach URI --fuse MOUNTPOINT [--loop] [-r] [-d]\n"
		"       devio attach URI --nbd-device [...]\n"
		"URI: devio://HOST:PORT, devio+unix:///PATH, nbd://HOST[:PORT][/EXPORT], nbd+unix:///EXPORT?socket=PATH\n"
		"front end and its options:\n");
	if (!feopts_init(&f, attach_frontends, NULL)) {
		feopts_usage_frontends(&f, out);
		feopts_free(&f);
	}
	fprintf(out,
		"options:\n"
		"  -r, --readonly         refuse writes\n"
		"  -d, --daemon           return once the device is ready; the server runs on\n"
		"  -v, --verbose\n"
		"serving options (the core's run policy):\n");
	feopts_usage_serving(out);
	fprintf(out, "usage: devio detach MOUNTPOINT|/dev/loopN|/dev/nbdN|[--force] /dev/ublkbN\n");
}

enum { OPT_NBD_DEVICE = 256 };

/* attach's own options; the front end's and --threads come from feopts.c */
static const struct option attach_options[] = {
	{ "nbd-device", optional_argument, NULL, OPT_NBD_DEVICE },
	{ "readonly", no_argument, NULL, 'r' },
	{ "daemon", no_argument, NULL, 'd' },
	{ "verbose", no_argument, NULL, 'v' },
	{ "help", no_argument, NULL, 'h' },
	{ NULL, 0, NULL, 0 },
};

struct attach_args {
	const char *uri;
	bool daemon;
	struct devio_open_opts open;
	struct feopts fe;
};

static bool wants_nbd_device(int argc, char **argv)
{
	for (int i = 1; i < argc; i++)
		if (!strncmp(argv[i], "--nbd-device", 12))
			return true;
	return false;
}

static int parse_one(struct attach_args *a, int c)
{
	switch (c) {
	case 'r': a->open.readonly = true; return 0;
	case 'd': a->daemon = true; return 0;
	case 'v': devio_log_set_level(DEVIO_LOG_DEBUG); return 0;
	case 'h': attach_usage(stdout); exit(0);
	default: return -EINVAL;
	}
}

static int parse_attach(int argc, char **argv, struct attach_args *a)
{
	int c, r;

	optind = 1;
	while ((c = getopt_long(argc, argv, "rdvh", a->fe.table, NULL)) != -1) {
		r = c == '?' ? -EINVAL : feopts_parse(&a->fe, c, optarg);
		if (r == 1)
			r = parse_one(a, c);
		if (r)
			return -EINVAL;
	}
	if (optind != argc - 1 || !a->fe.n_fe) {
		devio_err(optind != argc - 1 ? "want exactly one URI" : "want --fuse MOUNTPOINT (or --nbd-device)");
		return -EINVAL;
	}
	a->uri = argv[optind];
	feopts_finish(&a->fe);
	return 0;
}

/* Open the URI and serve it through the FUSE front end until signalled. */
static int run_attach(struct attach_args *a)
{
	struct devio_export ex = { .name = "", .source = a->uri };
	struct devio_server srv = { .exports = &ex, .n_exports = 1, .opts = a->fe.serve };
	int r, rc;

	r = devio_backend_open(a->uri, &a->open, &ex.backend);
	if (r)
		return 1; /* the backend said why */
	rc = serve_run(&srv, a->fe.fe, a->fe.n_fe);
	devio_backend_close(ex.backend);
	return rc;
}

/* A daemon keeps stderr only when it is a log file: a pipe would keep
 * whoever started it waiting for end of file. */
static void quiet_stdio(void)
{
	struct stat st;
	int null = open("/dev/null", O_RDWR | O_CLOEXEC);

	if (null < 0)
		return;
	dup2(null, STDIN_FILENO);
	if (fstat(STDERR_FILENO, &st) || !S_ISREG(st.st_mode))
		dup2(null, STDERR_FILENO);
	close(null);
}

/* --daemon: the child serves; the parent returns once the child has
 * printed its device (or failed). */
static int daemonize_and_run(struct attach_args *a)
{
	int pfd[2], status;
	char line[PATH_MAX + 16];
	size_t len = 0;
	pid_t pid;

	if (pipe(pfd) < 0)
		return 1;
	fflush(stdout);
	pid = fork();
	if (pid < 0)
		return 1;
	if (pid == 0) {
		close(pfd[0]);
		setsid();
		dup2(pfd[1], STDOUT_FILENO);
		close(pfd[1]);
		quiet_stdio();
		exit(run_attach(a));
	}
	close(pfd[1]);
	for (;;) {
		struct pollfd p = { .fd = pfd[0], .events = POLLIN };
		ssize_t n;

		if (poll(&p, 1, 60000) <= 0)
			break;
		n = read(pfd[0], line + len, sizeof(line) - 1 - len);
		if (n <= 0)
			break;
		len += (size_t)n;
		if (memchr(line, '\n', len) || len == sizeof(line) - 1)
			break;
	}
	close(pfd[0]);
	line[len] = '\0';
	if (!strchr(line, '\n')) {
		devio_err("attach %s: the server did not become ready", a->uri);
		if (waitpid(pid, &status, WNOHANG) == 0)
			kill(pid, SIGTERM);
		return 1;
	}
	fputs(line, stdout);
	return 0;
}

int cmd_attach(int argc, char **argv)
{
	struct attach_args a = { 0 };
	int rc;

	if (wants_nbd_device(argc, argv))
		return attach_nbd_device(argc, argv);
	if (feopts_init(&a.fe, attach_frontends, attach_options))
		return 1;
	if (parse_attach(argc, argv, &a)) {
		attach_usage(stderr);
		rc = 2;
	} else {
		rc = a.daemon ? daemonize_and_run(&a) : run_attach(&a);
	}
	feopts_free(&a.fe);
	return rc;
}

/* ---- detach ---- */

/* Does the status file describe target (a mount point or a loop device)? */
static bool status_matches(const char *path, const char *target)
{
	char line[1024], want[PATH_MAX + 16];
	FILE *f = fopen(path, "r");
	bool hit = false;

	if (!f)
		return false;
	while (!hit && fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\n")] = '\0';
		snprintf(want, sizeof(want), "frontend --fuse %s", target);
		if (!strcmp(line, want))
			hit = true;
		snprintf(want, sizeof(want), "  fuse mount %s ", target);
		if (!strncmp(line, want, strlen(want)))
			hit = true;
		snprintf(want, sizeof(want), "ublk device %s ", target);
		if (!strncmp(line, want, strlen(want)))
			hit = true;
		snprintf(want, sizeof(want), "  loop %s", target);
		if (!strncmp(line, want, strlen(want)) && (line[strlen(want)] == '\0' || line[strlen(want)] == ' '))
			hit = true;
	}
	fclose(f);
	return hit;
}

static pid_t find_server(const char *target)
{
	DIR *d = opendir(DEVIO_RUN_DIR);
	struct dirent *de;
	pid_t found = 0;

	while (d && !found && (de = readdir(d))) {
		char path[512];
		int pid = atoi(de->d_name);

		const char *dot = strchr(de->d_name, '.');

		if (pid <= 0 || !dot || strcmp(dot, ".status"))
			continue;
		snprintf(path, sizeof(path), DEVIO_RUN_DIR "/%s", de->d_name);
		if (kill(pid, 0) && errno == ESRCH)
			continue;
		if (status_matches(path, target))
			found = pid;
	}
	if (d)
		closedir(d);
	return found;
}

/* SIGTERM the server and wait (bounded) until it has unmounted, detached
 * and exited. */
static int stop_server(const char *target, pid_t pid)
{
	if (kill(pid, SIGTERM) < 0) {
		devio_err("detach %s: signal pid %d: %s", target, (int)pid, strerror(errno));
		return 1;
	}
	/* bounded wait: the server unmounts and detaches before it exits */
	for (int i = 0; i < 600; i++) {
		struct timespec ts = { 0, 50 * 1000 * 1000 };

		if (kill(pid, 0) && errno == ESRCH)
			return 0;
		nanosleep(&ts, NULL);
	}
	devio_err("detach %s: server pid %d still running after 30 s", target, (int)pid);
	return 1;
}

/* Ask the server to stop (it deletes its device); when no server serves it
 * any more (killed), delete the device left behind ourselves.  Refused
 * while the device is open (mounted, held, open in a process) unless
 * forced: its users would see I/O errors. */
static int detach_ublk(const char *dev, bool force)
{
	unsigned id;
	pid_t pid;
	char why[128];
	int r;

	if (devio_ublk_parse_dev(dev, &id)) {
		devio_err("detach %s: not a ublk device name", dev);
		return 1;
	}
	if (!force && devio_ublk_in_use(id, why, sizeof(why)) > 0) {
		devio_err("detach %s: in use (%s); unmount or close it first, or --force", dev, why);
		return 1;
	}
	pid = find_server(dev);
	if (pid)
		return stop_server(dev, pid);
	r = devio_ublk_delete(id);
	if (r) {
		devio_err("detach %s: %s", dev, strerror(-r));
		return 1;
	}
	return 0;
}

int cmd_detach(int argc, char **argv)
{
	char target[PATH_MAX];
	pid_t pid;

	if (argc == 3 && !strcmp(argv[1], "--force") && !strncmp(argv[2], "/dev/ublkb", 10))
		return detach_ublk(argv[2], true);
	if (argc != 2 || argv[1][0] == '-') {
		attach_usage(stderr);
		return 2;
	}
	if (!strncmp(argv[1], "/dev/nbd", 8))
		return detach_nbd_device(argv[1]);
	if (!strncmp(argv[1], "/dev/ublkb", 10))
		return detach_ublk(argv[1], false);
	if (!realpath(argv[1], target)) {
		devio_err("detach %s: %s", argv[1], strerror(errno));
		return 1;
	}
	pid = find_server(target);
	if (!pid) {
		devio_err("detach %s: no devio server serves it (see devio status)", target);
		return 1;
	}
	return stop_server(target, pid);
}
