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

static void attach_usage(FILE *out)
{
	fprintf(out,
		"usage: devio attach URI --fuse MOUNTPOINT [--loop] [-r] [-d]\n"
		"       devio attach URI --nbd-device [...]\n"
		"URI: devio://HOST:PORT, devio+unix:///PATH, nbd://HOST[:PORT][/EXPORT], nbd+unix:///EXPORT?socket=PATH\n"
		"  --fuse DIR           show the export as DIR/disk\n"
		"  --loop               and attach a loop device to it (printed on stdout)\n"
		"  -r, --readonly       refuse writes\n"
		"  -d, --daemon         return once the device is ready; the server runs on\n"
		"  --fuse-transport auto|uring|dev  --threads N  --depth N\n"
		"usage: devio detach MOUNTPOINT|/dev/loopN|/dev/nbdN\n");
}

enum { OPT_FUSE = 256, OPT_LOOP, OPT_NBD_DEVICE, OPT_TRANSPORT, OPT_THREADS, OPT_DEPTH };

static const struct option attach_options[] = {
	{ "fuse", required_argument, NULL, OPT_FUSE },
	{ "loop", no_argument, NULL, OPT_LOOP },
	{ "nbd-device", optional_argument, NULL, OPT_NBD_DEVICE },
	{ "fuse-transport", required_argument, NULL, OPT_TRANSPORT },
	{ "threads", required_argument, NULL, OPT_THREADS },
	{ "depth", required_argument, NULL, OPT_DEPTH },
	{ "readonly", no_argument, NULL, 'r' },
	{ "daemon", no_argument, NULL, 'd' },
	{ "verbose", no_argument, NULL, 'v' },
	{ "help", no_argument, NULL, 'h' },
	{ NULL, 0, NULL, 0 },
};

struct attach_args {
	const char *uri, *mnt;
	bool daemon;
	struct devio_open_opts open;
	struct devio_serve_opts serve;
};

static bool wants_nbd_device(int argc, char **argv)
{
	for (int i = 1; i < argc; i++)
		if (!strncmp(argv[i], "--nbd-device", 12))
			return true;
	return false;
}

static int parse_count(const char *opt, const char *val, unsigned *out)
{
	uint64_t v;

	if (devio_parse_u64(val, &v) || v == 0 || v > 4096) {
		devio_err("%s: bad number '%s'", opt, val);
		return -EINVAL;
	}
	*out = (unsigned)v;
	return 0;
}

static int parse_attach(int argc, char **argv, struct attach_args *a)
{
	int c;

	optind = 1;
	while ((c = getopt_long(argc, argv, "rdvh", attach_options, NULL)) != -1) {
		switch (c) {
		case OPT_FUSE: a->mnt = optarg; break;
		case OPT_LOOP: a->serve.loop = true; break;
		case OPT_TRANSPORT:
			if (strcmp(optarg, "auto") && strcmp(optarg, "uring") && strcmp(optarg, "dev")) {
				devio_err("--fuse-transport: want auto, uring or dev");
				return -EINVAL;
			}
			a->serve.fuse_transport = optarg;
			break;
		case OPT_THREADS: if (parse_count("--threads", optarg, &a->serve.threads)) return -EINVAL; break;
		case OPT_DEPTH: if (parse_count("--depth", optarg, &a->serve.depth)) return -EINVAL; break;
		case 'r': a->open.readonly = true; break;
		case 'd': a->daemon = true; break;
		case 'v': devio_log_set_level(DEVIO_LOG_DEBUG); break;
		case 'h': attach_usage(stdout); exit(0);
		default: return -EINVAL;
		}
	}
	if (optind != argc - 1 || !a->mnt) {
		devio_err(optind != argc - 1 ? "want exactly one URI" : "want --fuse MOUNTPOINT (or --nbd-device)");
		return -EINVAL;
	}
	a->uri = argv[optind];
	return 0;
}

/* Open the URI and serve it through the FUSE front end until signalled. */
static int run_attach(struct attach_args *a)
{
	struct devio_export ex = { .name = "", .source = a->uri };
	struct devio_server srv = { .exports = &ex, .n_exports = 1, .opts = a->serve };
	struct serve_frontend fe = { .type = &devio_frontend_fuse, .arg = a->mnt };
	int r, rc;

	r = devio_backend_open(a->uri, &a->open, &ex.backend);
	if (r)
		return 1; /* the backend said why */
	rc = serve_run(&srv, &fe, 1);
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

	if (wants_nbd_device(argc, argv))
		return attach_nbd_device(argc, argv);
	if (parse_attach(argc, argv, &a)) {
		attach_usage(stderr);
		return 2;
	}
	return a.daemon ? daemonize_and_run(&a) : run_attach(&a);
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
 * any more (killed), delete the device left behind ourselves. */
static int detach_ublk(const char *dev)
{
	unsigned id;
	pid_t pid = find_server(dev);
	int r;

	if (pid)
		return stop_server(dev, pid);
	if (devio_ublk_parse_dev(dev, &id)) {
		devio_err("detach %s: not a ublk device name", dev);
		return 1;
	}
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

	if (argc != 2 || argv[1][0] == '-') {
		attach_usage(stderr);
		return 2;
	}
	if (!strncmp(argv[1], "/dev/nbd", 8))
		return detach_nbd_device(argv[1]);
	if (!strncmp(argv[1], "/dev/ublkb", 10))
		return detach_ublk(argv[1]);
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
