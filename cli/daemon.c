/* daemon.c - how `devio serve` and `devio attach` run as a service, the
 * conventions of nbdkit and qemu-nbd: --fork (the parent returns once
 * every front end is ready, with the child's own error messages and a
 * failing exit status otherwise), --pidfile, --exit-with-parent, --run CMD
 * (captive: serve while CMD runs, exit with its status), --log TARGET, and
 * SIGHUP reopening a log file (serve.c's loop calls daemon_tick()).
 *
 * --fork: the child's stdout and stderr are pipes the parent copies to its
 * own until the child is ready (a byte on a third pipe) or exits; then
 * the child points stdout at /dev/null and stderr at its log (the file,
 * or the original stderr when that is a file or --log stderr was given,
 * else /dev/null), and the parent exits 0. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include "cli.h"
#include "devio/util.h"

enum { OPT_FORK = DAEMON_CODE_BASE, OPT_FOREGROUND, OPT_PIDFILE, OPT_EXIT_WITH_PARENT, OPT_RUN, OPT_LOG, OPT_USER };

const struct option daemon_options[] = {
	{ "fork", no_argument, NULL, OPT_FORK },
	{ "foreground", no_argument, NULL, OPT_FOREGROUND },
	{ "pidfile", required_argument, NULL, OPT_PIDFILE },
	{ "exit-with-parent", no_argument, NULL, OPT_EXIT_WITH_PARENT },
	{ "run", required_argument, NULL, OPT_RUN },
	{ "log", required_argument, NULL, OPT_LOG },
	{ "user", required_argument, NULL, OPT_USER },
	{ NULL, 0, NULL, 0 },
};

static struct daemon_opts *daemon_cur;   /* set by daemon_start() */
static int daemon_ready_fd = -1;         /* --fork child: tell the parent */
static int daemon_orig_stderr = -1;      /* --fork child: where stderr was */
static pid_t daemon_run_pid;             /* --run: the command */
static int daemon_run_status = -1;
static bool daemon_pidfile_written;
static volatile sig_atomic_t daemon_hup;

void daemon_usage(FILE *out)
{
	fprintf(out,
		"running as a service (docs/service.md):\n"
		"  --fork                 return once every front end is ready (the server runs on)\n"
		"  --foreground           stay in the foreground (the default)\n"
		"  --pidfile FILE         write the server's pid to FILE once it is ready\n"
		"  --exit-with-parent     stop when the process that started devio exits\n"
		"  --run CMD              run CMD (/bin/sh -c) once ready, with $uri $nbd $devio $device set;\n"
		"                         stop when it exits and exit with its status\n"
		"  --log stderr|syslog|journal|FILE   where messages go (SIGHUP reopens FILE)\n"
		"  --user USER[:GROUP]    once images, sockets and devices are open, drop root for this user\n"
		"                         (not with --fuse or --ublk; docs/security.md)\n");
}

int daemon_parse(struct daemon_opts *d, int code, const char *val)
{
	switch (code) {
	case OPT_FORK: d->fork = true; return 0;
	case OPT_FOREGROUND: d->fork = false; return 0;
	case OPT_PIDFILE: d->pidfile = val; return 0;
	case OPT_EXIT_WITH_PARENT: d->exit_with_parent = true; return 0;
	case OPT_RUN: d->run = val; return 0;
	case OPT_LOG: d->log = val; return 0;
	case OPT_USER: d->user = val; return 0;
	default: return 1;
	}
}

int daemon_check(struct daemon_opts *d)
{
	if (d->fork && d->run) {
		devio_err("--run keeps devio in the foreground: not with --fork");
		return -EINVAL;
	}
	if (d->fork && d->exit_with_parent) {
		devio_err("--exit-with-parent: the parent of a --fork server exits at once");
		return -EINVAL;
	}
	if (d->log && !d->log[0]) {
		devio_err("--log: want stderr, syslog, journal or a file name");
		return -EINVAL;
	}
	if (d->user && privdrop_parse(d->user, &d->priv))
		return -EINVAL;
	return 0;
}

int daemon_check_frontends(const struct serve_frontend *fe, size_t n)
{
	return daemon_cur ? privdrop_check_frontends(&daemon_cur->priv, fe, n) : 0;
}

struct option *daemon_merge_options(const struct option *own)
{
	size_t n = 0, m = 0;
	struct option *all;

	while (own && own[n].name)
		n++;
	while (daemon_options[m].name)
		m++;
	all = calloc(n + m + 1, sizeof(*all));
	if (!all)
		return NULL;
	if (n)
		memcpy(all, own, n * sizeof(*all));
	memcpy(all + n, daemon_options, m * sizeof(*all));
	return all;
}

/* ---- --fork ---- */

/* Copy what the child says on its two pipes to our stdout and stderr
 * until both are closed (ready or dead). */
static void daemon_relay(int out_fd, int err_fd)
{
	struct pollfd p[2] = { { .fd = out_fd, .events = POLLIN }, { .fd = err_fd, .events = POLLIN } };
	char buf[4096];

	while (p[0].fd >= 0 || p[1].fd >= 0) {
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		for (int i = 0; i < 2; i++) {
			ssize_t n;

			if (p[i].fd < 0 || !p[i].revents)
				continue;
			n = read(p[i].fd, buf, sizeof(buf));
			if (n <= 0) {
				close(p[i].fd);
				p[i].fd = -1;
			} else if (devio_write_full(i ? STDERR_FILENO : STDOUT_FILENO, buf, (size_t)n)) {
				/* our caller went away; keep draining */
			}
		}
	}
}

/* The parent: the exit status for the command (0 once the child is ready). */
static int daemon_parent(pid_t pid, int out_fd, int err_fd, int ready_fd)
{
	char c = 0;
	int status;

	daemon_relay(out_fd, err_fd);
	if (read(ready_fd, &c, 1) == 1 && c == 'R') {
		close(ready_fd);
		return 0;
	}
	close(ready_fd);
	if (waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status))
		return WEXITSTATUS(status);
	devio_err("the server (pid %d) exited before it was ready", (int)pid);
	return 1;
}

/* The default log of a --fork server: its stderr when that is a file
 * (the caller's choice), else the journal or syslog when there is one. */
static const char *daemon_default_log(void)
{
	struct stat st;

	if (fstat(STDERR_FILENO, &st) == 0 && S_ISREG(st.st_mode))
		return "stderr";
	if (access("/run/systemd/journal/socket", W_OK) == 0)
		return "journal";
	if (access("/dev/log", W_OK) == 0)
		return "syslog";
	return NULL;
}

/* 0 in the child, which goes on; the parent's exit status (+1) otherwise. */
static int daemon_fork(struct daemon_opts *d)
{
	int out[2], err[2], ready[2];
	pid_t parent = getpid(), pid;
	const char *lp = getenv("LISTEN_PID");
	char buf[32];

	if (!d->log)
		d->log = daemon_default_log();
	daemon_orig_stderr = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3);
	if (pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC) || pipe2(ready, O_CLOEXEC)) {
		devio_err("--fork: pipe: %s", strerror(errno));
		return 2;
	}
	fflush(stdout);
	fflush(stderr);
	pid = fork();
	if (pid < 0) {
		devio_err("--fork: %s", strerror(errno));
		return 2;
	}
	if (pid > 0) {
		close(out[1]);
		close(err[1]);
		close(ready[1]);
		return daemon_parent(pid, out[0], err[0], ready[0]) + 1;
	}
	close(out[0]);
	close(err[0]);
	close(ready[0]);
	setsid();
	dup2(out[1], STDOUT_FILENO);
	dup2(err[1], STDERR_FILENO);
	close(out[1]);
	close(err[1]);
	daemon_ready_fd = ready[1];
	/* socket activation meant for the parent is now ours */
	if (lp && (pid_t)atoi(lp) == parent) {
		snprintf(buf, sizeof(buf), "%d", (int)getpid());
		setenv("LISTEN_PID", buf, 1);
	}
	return 0;
}

int daemon_start(struct daemon_opts *d, int *exit_status)
{
	pid_t ppid = getppid();
	int r;

	daemon_cur = d;
	if (d->fork && (r = daemon_fork(d)) > 0) {
		*exit_status = r - 1;
		return 1;
	}
	if (d->log && devio_log_open(d->log)) {
		*exit_status = 1;
		return 1;
	}
	if (d->fork && devio_log_fd() != STDERR_FILENO)
		devio_log_tee(STDERR_FILENO); /* the parent shows it until we are ready */
	if (d->fork && !d->log)
		devio_warn("--fork: no journal or syslog here, and stderr is not a file: give --log FILE to keep "
			   "the server's messages");
	if (d->exit_with_parent) {
		prctl(PR_SET_PDEATHSIG, SIGTERM);
		if (getppid() != ppid) /* it died before the line above */
			raise(SIGTERM);
	}
	return 0;
}

/* ---- ready: pid file, --run, the --fork parent ---- */

static int daemon_write_pidfile(const char *path)
{
	char tmp[4096], line[32];
	int fd, n = snprintf(line, sizeof(line), "%d\n", (int)getpid());

	if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= sizeof(tmp))
		return -ENAMETOOLONG;
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || devio_write_full(fd, line, (size_t)n) || close(fd) || rename(tmp, path)) {
		int r = -errno;

		devio_err("--pidfile %s: %s", path, strerror(-r));
		unlink(tmp);
		return r;
	}
	daemon_pidfile_written = true;
	return 0;
}

/* The --fork child is ready: tell the parent, let go of its pipes. */
static void daemon_detach_stdio(void)
{
	int null = open("/dev/null", O_RDWR | O_CLOEXEC);
	int err = devio_log_fd();

	if (null < 0)
		return;
	if (err < 0 || err == STDERR_FILENO)
		err = daemon_cur->log && !strcmp(daemon_cur->log, "stderr") ? daemon_orig_stderr : null;
	devio_log_tee(-1);
	fflush(stdout);
	dup2(null, STDIN_FILENO);
	dup2(null, STDOUT_FILENO);
	dup2(err >= 0 ? err : null, STDERR_FILENO);
	close(null);
	if (daemon_orig_stderr >= 0) /* a pipe kept open would keep our caller waiting */
		close(daemon_orig_stderr);
	daemon_orig_stderr = -1;
	if (write(daemon_ready_fd, "R", 1) != 1)
		devio_warn("--fork: the parent is gone");
	close(daemon_ready_fd);
	daemon_ready_fd = -1;
}

int daemon_ready(const char *const env[][2], size_t n_env)
{
	struct daemon_opts *d = daemon_cur;

	if (!d)
		return 0;
	if (d->pidfile && daemon_write_pidfile(d->pidfile))
		return -EIO;
	if (privdrop_apply(&d->priv))
		return -EPERM;
	if (d->run) {
		fflush(stdout);
		daemon_run_pid = fork();
		if (daemon_run_pid < 0) {
			devio_err("--run: fork: %s", strerror(errno));
			return -EIO;
		}
		if (daemon_run_pid == 0) {
			for (size_t i = 0; i < n_env; i++)
				setenv(env[i][0], env[i][1], 1);
			signal(SIGPIPE, SIG_DFL);
			execl("/bin/sh", "sh", "-c", d->run, (char *)NULL);
			_exit(127);
		}
		devio_info("--run: started (pid %d): %s", (int)daemon_run_pid, d->run);
	}
	if (daemon_ready_fd >= 0)
		daemon_detach_stdio();
	return 0;
}

static void daemon_on_hup(int sig) { daemon_hup = 1; }

void daemon_signals(void)
{
	struct sigaction sa = { .sa_handler = daemon_on_hup };

	sigaction(SIGHUP, &sa, NULL);
}

int daemon_tick(void)
{
	int status;

	if (daemon_hup) {
		daemon_hup = 0;
		devio_log_reopen(); /* a log file: says so in the new one */
	}
	if (daemon_run_pid > 0 && waitpid(daemon_run_pid, &status, WNOHANG) == daemon_run_pid) {
		daemon_run_pid = 0;
		daemon_run_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		devio_info("--run: the command exited with status %d: stopping", daemon_run_status);
	}
	return daemon_run_status;
}

int daemon_stop(void)
{
	int status;

	if (daemon_run_pid > 0) { /* we were told to stop first: so is the command */
		kill(daemon_run_pid, SIGTERM);
		if (waitpid(daemon_run_pid, &status, 0) == daemon_run_pid && daemon_run_status < 0)
			daemon_run_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
		daemon_run_pid = 0;
	}
	if (daemon_pidfile_written) {
		unlink(daemon_cur->pidfile);
		daemon_pidfile_written = false;
	}
	return daemon_run_status;
}
