/* runstate.c - which devio servers run on this machine, from DEVIO_RUN_DIR,
 * identified by more than a pid (a pid is reused once its process is
 * gone): a server holds an flock on PID.lock for its whole life and writes
 * its start time (/proc/PID/stat) into PID.status.  An entry whose lock
 * nobody holds is stale and removed; `devio detach` signals a pid only
 * while its lock is held and its start time matches (cli/attach.c, through
 * a pidfd so the check and the signal name one process).  Entries of an
 * older devio without a lock file count while the pid is a running devio.
 * Root and whoever may write DEVIO_RUN_DIR publish there; another user's
 * server in $XDG_RUNTIME_DIR/devio.  Readers look in DEVIO_RUN_DIR, their
 * own runtime directory, and (root) every /run/user/UID/devio. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include "cli.h"

static int runstate_fd = -1;
static char runstate_lock_path[PATH_MAX + 32];

const char *runstate_dir(void)
{
	static char dir[PATH_MAX];
	const char *xdg = getenv("XDG_RUNTIME_DIR");

	if (dir[0])
		return dir;
	mkdir(DEVIO_RUN_DIR, 0755);
	if (geteuid() == 0 || !access(DEVIO_RUN_DIR, W_OK) || !xdg || xdg[0] != '/' ||
	    strlen(xdg) + sizeof("/devio") > sizeof(dir))
		return strcpy(dir, DEVIO_RUN_DIR);
	snprintf(dir, sizeof(dir), "%s/devio", xdg);
	mkdir(dir, 0700);
	return dir;
}

int runstate_lock(void)
{
	snprintf(runstate_lock_path, sizeof(runstate_lock_path), "%s/%d.lock", runstate_dir(), (int)getpid());
	unlink(runstate_lock_path); /* left by an earlier process with our pid */
	runstate_fd = open(runstate_lock_path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (runstate_fd < 0)
		return -errno;
	if (flock(runstate_fd, LOCK_EX | LOCK_NB) < 0) {
		int r = -errno;

		close(runstate_fd);
		runstate_fd = -1;
		return r;
	}
	return 0;
}

void runstate_unlock(void)
{
	char path[PATH_MAX + 32];

	if (runstate_fd < 0)
		return;
	snprintf(path, sizeof(path), "%s/%d.status", runstate_dir(), (int)getpid());
	unlink(path);
	snprintf(path, sizeof(path), "%s/%d.json", runstate_dir(), (int)getpid());
	unlink(path);
	unlink(runstate_lock_path);
	close(runstate_fd);
	runstate_fd = -1;
}

unsigned long long runstate_start_time(pid_t pid)
{
	char path[64], buf[1024], *p;
	unsigned long long start = 0;
	FILE *f;
	size_t n;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return 0;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
	/* after ")": state is field 3, starttime field 22 */
	for (int field = 2; p && field < 22; field++)
		p = strchr(p + 1, ' ');
	if (p)
		start = strtoull(p + 1, NULL, 10);
	return start;
}

static bool runstate_is_devio(pid_t pid)
{
	char path[64], comm[32] = "";
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/comm", (int)pid);
	f = fopen(path, "re");
	if (!f)
		return false;
	if (!fgets(comm, sizeof(comm), f))
		comm[0] = '\0';
	fclose(f);
	return !strncmp(comm, "devio", 5);
}

/* 1: PID.lock is held (the server lives), 0: nobody holds it, -ENOENT: no lock file. */
static int runstate_lock_held(const char *dir, pid_t pid)
{
	char path[PATH_MAX + 32];
	int fd, held;

	snprintf(path, sizeof(path), "%s/%d.lock", dir, (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	held = flock(fd, LOCK_SH | LOCK_NB) < 0 && errno == EWOULDBLOCK;
	close(fd);
	return held;
}

bool runstate_alive(const struct run_server *s)
{
	int held = runstate_lock_held(s->dir, s->pid);

	if (held == 0)
		return false;
	if (held < 0 && (kill(s->pid, 0) < 0 && errno == ESRCH))
		return false;
	if (s->start && runstate_start_time(s->pid) != s->start)
		return false; /* the pid now names another process */
	return held > 0 || runstate_is_devio(s->pid);
}

static void runstate_read_start(struct run_server *s)
{
	char line[256];
	FILE *f = fopen(s->status_path, "re");

	if (!f)
		return;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, "start ", 6))
			s->start = strtoull(line + 6, NULL, 10);
	fclose(f);
}

/* Everything PID may have left in dir (the .tmp files: killed while
 * writing one). */
static void runstate_remove(const char *dir, pid_t pid)
{
	static const char *const ext[] = { "status", "json", "lock", "status.tmp", "json.tmp" };
	char path[PATH_MAX + 32];

	for (size_t i = 0; i < sizeof(ext) / sizeof(ext[0]); i++) {
		snprintf(path, sizeof(path), "%s/%d.%s", dir, (int)pid, ext[i]);
		unlink(path);
	}
}

/* A PID.lock, PID.json or a .tmp file without PID.status: what a server
 * that died while starting or while writing its files left, once it is
 * not alive (runstate_alive). */
static void runstate_orphan(const struct run_server *s)
{
	char path[PATH_MAX + 32];
	struct stat st;

	snprintf(path, sizeof(path), "%s/%d.status", s->dir, (int)s->pid);
	if (stat(path, &st) < 0 && errno == ENOENT && !runstate_alive(s))
		runstate_remove(s->dir, s->pid);
}

/* The entries of one directory; true once fn asked to stop. */
static bool runstate_each_in(const char *dir, bool (*fn)(const struct run_server *s, void *ctx), void *ctx)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	bool done = false;

	while (d && !done && (de = readdir(d))) {
		struct run_server s = { .pid = atoi(de->d_name) };
		const char *dot = strchr(de->d_name, '.');

		if (s.pid <= 0 || !dot)
			continue;
		snprintf(s.dir, sizeof(s.dir), "%s", dir);
		if (strcmp(dot, ".status")) {
			runstate_orphan(&s);
			continue;
		}
		snprintf(s.status_path, sizeof(s.status_path), "%s/%d.status", dir, (int)s.pid);
		runstate_read_start(&s);
		s.alive = runstate_alive(&s);
		done = fn(&s, ctx); /* a dead one's file still tells what it left behind */
		if (!s.alive)
			runstate_remove(dir, s.pid); /* left by a server that died */
	}
	if (d)
		closedir(d);
	return done;
}

void runstate_each(bool (*fn)(const struct run_server *s, void *ctx), void *ctx)
{
	char dir[PATH_MAX];
	struct dirent *de;
	DIR *users;

	if (runstate_each_in(DEVIO_RUN_DIR, fn, ctx))
		return;
	if (strcmp(runstate_dir(), DEVIO_RUN_DIR) && runstate_each_in(runstate_dir(), fn, ctx))
		return;
	if (geteuid() != 0 || !(users = opendir("/run/user")))
		return;
	while ((de = readdir(users)))
		if (atoi(de->d_name) > 0 && snprintf(dir, sizeof(dir), "/run/user/%s/devio", de->d_name) < (int)sizeof(dir) &&
		    runstate_each_in(dir, fn, ctx))
			break;
	closedir(users);
}
