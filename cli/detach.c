/* detach.c - `devio detach [--all] [--force] MOUNTPOINT|/dev/loopN|...`:
 * find the server that serves the target (cli/runstate.c: a live server
 * is one whose lock is held and whose start time matches), signal it
 * through a pidfd and wait until it has unmounted, detached and exited.
 *
 * - A server with more than one front end is stopped only with --all
 *   (this stops all of it: there is no stopping one front end alone).
 * - What a server that died (kill -9) left behind is cleaned up: its FUSE
 *   mount ("Transport endpoint is not connected") and its loop device,
 *   found in its stale status file or from the target itself.  A mount is
 *   removed only when the topmost mount at the path is devio's, and a
 *   loop device only when its backing file is on that mount.
 * - --force: a hung server (stopped, or stuck in a backend) blocks every
 *   FUSE request; the connection is aborted through fusectl first (the
 *   loop device's I/O then fails at once), the server is woken, told to
 *   stop, and killed if it has not exited in time.
 * - --handover /dev/ublkbN: SIGUSR2 instead of SIGTERM; a --recovery
 *   server quiesces the device and exits leaving it to the next server
 *   (`devio serve SOURCE --ublk=N --recover`); its users see no error.
 * /dev/nbdN goes to the kernel nbd client (attach_nbd.c). */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <linux/loop.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "cli.h"
#include "devio/mountinfo.h"
#include "devio/ublk.h"
#include "devio/util.h"

#define DETACH_WAIT_MS 30000  /* a server unmounts and detaches before it exits */
#define DETACH_KILL_WAIT_MS 10000
#define FUSECTL "/sys/fs/fuse/connections"

struct detach {
	const char *target;        /* absolute */
	bool all, force, handover;
	struct run_server srv;     /* the server found (srv.pid 0: none) */
	bool dead;                 /* ... only a dead one's entry */
	unsigned n_frontends;
	char others[512];          /* the server's other front ends */
	char mnt[PATH_MAX], loop[32];
};

static void detach_usage(FILE *out)
{
	fprintf(out, "usage: devio detach [--all] [--force] MOUNTPOINT|/dev/loopN|/dev/nbdN|/dev/ublkbN\n"
		     "       devio detach --handover /dev/ublkbN\n"
		     "  --all    the server serves more front ends: stop all of it\n"
		     "  --force  abort a hung FUSE connection (fusectl) and kill the server if it does not stop;\n"
		     "           detach a ublk device even while it is open\n"
		     "  --handover  the server of a --recovery ublk device quiesces it and exits, leaving the device\n"
		     "           (in use or not) to `devio serve SOURCE --ublk=N --recover`\n");
}

/* ---- the server's status file ---- */

/* Does this front end's block of lines describe the target? */
static bool detach_line_hits(const char *line, const char *target)
{
	size_t n = strlen(target);
	static const char *const keys[] = { "frontend --fuse ", "  fuse mount ", "ublk device ", "  loop " };

	for (size_t k = 0; k < 4; k++) {
		size_t kl = strlen(keys[k]);

		if (!strncmp(line, keys[k], kl) && !strncmp(line + kl, target, n) &&
		    (line[kl + n] == '\0' || line[kl + n] == ' '))
			return true;
	}
	return false;
}

/* Read a status file: whether it serves target, its other front ends,
 * and the mount and loop device of the front end that does. */
static bool detach_scan(const char *path, struct detach *d)
{
	char line[PATH_MAX + 64], fe[PATH_MAX + 64] = "", mnt[PATH_MAX] = "", loop[32] = "";
	FILE *f = fopen(path, "re");
	bool hit = false, block_hit = false;

	if (!f)
		return false;
	d->n_frontends = 0;
	d->others[0] = '\0';
	for (bool more = true; more;) {
		more = fgets(line, sizeof(line), f) != NULL;
		line[more ? strcspn(line, "\n") : 0] = '\0';
		if (!more || !strncmp(line, "frontend ", 9)) { /* the end of a front end's block */
			size_t n = strlen(d->others);

			if (fe[0] && !block_hit)
				snprintf(d->others + n, sizeof(d->others) - n, "%s%s", n ? ", " : "", fe);
			if (block_hit) {
				memcpy(d->mnt, mnt, sizeof(mnt));
				memcpy(d->loop, loop, sizeof(loop));
			}
			snprintf(fe, sizeof(fe), "%s", more ? line + 9 : "");
			d->n_frontends += more;
			block_hit = false;
			mnt[0] = loop[0] = '\0';
		}
		if (!strncmp(line, "  fuse mount ", 13))
			snprintf(mnt, sizeof(mnt), "%.*s", (int)strcspn(line + 13, " "), line + 13);
		if (!strncmp(line, "  loop ", 7))
			snprintf(loop, sizeof(loop), "%.*s", (int)strcspn(line + 7, " "), line + 7);
		if (detach_line_hits(line, d->target))
			block_hit = hit = true;
	}
	fclose(f);
	return hit;
}

static bool detach_find_one(const struct run_server *s, void *ctx)
{
	struct detach *d = ctx;
	struct detach found = *d;

	if (!detach_scan(s->status_path, &found))
		return false;
	if (!s->alive) { /* remember what a dead one left; a live one wins */
		if (!d->srv.pid) {
			*d = found;
			d->srv = *s;
			d->dead = true;
		}
		return false;
	}
	*d = found;
	d->srv = *s;
	d->dead = false;
	return true;
}

/* ---- cleaning what a dead or hung server left ---- */

/* Abort FUSE connection conn (fusectl, mounted if it is not). */
static int detach_abort_conn(unsigned conn)
{
	char path[96];
	int r;

	snprintf(path, sizeof(path), FUSECTL "/%u/abort", conn);
	r = devio_write_ctl(path, "1");
	if (r == -ENOENT && mount("fusectl", FUSECTL, "fusectl", 0, NULL) == 0)
		r = devio_write_ctl(path, "1");
	return r == -ENOENT ? 0 : r; /* no such connection: it is gone already */
}

/* devio's FUSE mount at mnt, the topmost there: 1 and *m, 0 if none, -EPERM
 * if another file system is mounted there (logged). */
static int detach_devio_mount(const char *mnt, struct devio_mount *m)
{
	int r = devio_mount_top(mnt, m);

	if (r <= 0)
		return r;
	if (strcmp(m->fstype, "fuse.devio")) {
		devio_err("detach %s: the mount there is %s (from %s), not devio's; leaving it", mnt, m->fstype,
			  m->source);
		return -EPERM;
	}
	return 1;
}

static int detach_abort_mount(const char *mnt)
{
	struct devio_mount m;
	int r = detach_devio_mount(mnt, &m);

	if (r <= 0)
		return r;
	r = detach_abort_conn(m.minor);
	if (r)
		devio_err("detach %s: abort FUSE connection %u: %s", mnt, m.minor, strerror(-r));
	else
		devio_info("detach %s: aborted FUSE connection %u", mnt, m.minor);
	return r;
}

/* Unmount devio's dead mount at mnt (lazily if something holds it). */
static int detach_dead_mount(const char *mnt)
{
	struct devio_mount m;
	int r = detach_devio_mount(mnt, &m);

	if (r <= 0)
		return r;
	detach_abort_conn(m.minor);
	if (umount2(mnt, UMOUNT_NOFOLLOW) < 0 && umount2(mnt, MNT_DETACH | UMOUNT_NOFOLLOW) < 0) {
		r = -errno;
		devio_err("detach %s: unmount: %s", mnt, strerror(-r));
		return r;
	}
	devio_info("detach %s: removed the mount its server left", mnt);
	return 1;
}

/* The backing file of loop device dev ("" if none). */
static void detach_loop_backing(const char *dev, char *out, size_t outlen)
{
	char path[96];
	FILE *f;

	out[0] = '\0';
	snprintf(path, sizeof(path), "/sys/block/%s/loop/backing_file", dev + 5);
	f = fopen(path, "re");
	if (!f)
		return;
	if (!fgets(out, (int)outlen, f))
		out[0] = '\0';
	out[strcspn(out, "\n")] = '\0';
	fclose(f);
}

/* Detach loop device dev if its backing file is on mnt. */
static int detach_dead_loop(const char *dev, const char *mnt)
{
	char back[PATH_MAX];
	size_t n = strlen(mnt);
	int fd, r = 0;

	detach_loop_backing(dev, back, sizeof(back));
	if (!back[0])
		return 0; /* not attached any more (autoclear) */
	if (strncmp(back, mnt, n) || back[n] != '/') {
		devio_warn("detach %s: its backing file is %s now, not on %s; leaving it", dev, back, mnt);
		return 0;
	}
	fd = open(dev, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || ioctl(fd, LOOP_CLR_FD, 0) < 0)
		r = errno == ENXIO ? 0 : -errno;
	if (fd >= 0)
		close(fd);
	if (r)
		devio_err("detach %s: LOOP_CLR_FD: %s", dev, strerror(-r));
	else
		devio_info("detach %s: detached (it goes once its last user closes it)", dev);
	return r ? r : 1;
}

/* The loop device and mount of d (from a status file, or the target:
 * a mount point, or a loop device on a file in devio's mount). */
static int detach_leftovers(struct detach *d)
{
	struct devio_mount m;
	int r, done = 0;

	if (!d->mnt[0] && !strncmp(d->target, "/dev/loop", 9)) {
		char back[PATH_MAX], *slash;

		detach_loop_backing(d->target, back, sizeof(back));
		slash = strrchr(back, '/');
		if (!slash || slash == back)
			return 0;
		*slash = '\0';
		snprintf(d->mnt, sizeof(d->mnt), "%s", back);
		snprintf(d->loop, sizeof(d->loop), "%s", d->target);
	}
	if (!d->mnt[0])
		snprintf(d->mnt, sizeof(d->mnt), "%s", d->target);
	r = detach_devio_mount(d->mnt, &m); /* nothing is touched unless devio's mount is there */
	if (r <= 0)
		return r;
	if (d->loop[0] && (r = detach_dead_loop(d->loop, d->mnt)) < 0)
		return r;
	done += d->loop[0] ? r : 0;
	r = detach_dead_mount(d->mnt);
	return r < 0 ? r : done + r;
}

/* ---- the live server ---- */

static int detach_pidfd(pid_t pid)
{
	return (int)syscall(SYS_pidfd_open, pid, 0);
}

static int detach_signal(int pidfd, int sig)
{
	return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

/* SIGTERM (--force: and SIGCONT, then SIGKILL if it hangs on; --handover:
 * SIGUSR2) and wait. */
static int detach_stop_server(struct detach *d)
{
	int pidfd = detach_pidfd(d->srv.pid), r = 1;
	struct pollfd p = { .fd = pidfd, .events = POLLIN };

	/* the pidfd names one process: check that it is still that server */
	if (pidfd < 0 || !runstate_alive(&d->srv)) {
		devio_err("detach %s: pid %d is no longer that devio server", d->target, (int)d->srv.pid);
		if (pidfd >= 0)
			close(pidfd);
		return 1;
	}
	if (detach_signal(pidfd, d->handover ? SIGUSR2 : SIGTERM) < 0) {
		devio_err("detach %s: signal pid %d: %s", d->target, (int)d->srv.pid, strerror(errno));
		goto out;
	}
	if (d->force)
		detach_signal(pidfd, SIGCONT);
	if (poll(&p, 1, DETACH_WAIT_MS) == 1) {
		r = 0;
		goto out;
	}
	if (d->handover) {
		devio_err("detach %s: server pid %d did not hand over within %d s (it logs why; it still serves)",
			  d->target, (int)d->srv.pid, DETACH_WAIT_MS / 1000);
		goto out;
	}
	if (!d->force) {
		devio_err("detach %s: server pid %d still running after %d s (hung? devio detach --force)", d->target,
			  (int)d->srv.pid, DETACH_WAIT_MS / 1000);
		goto out;
	}
	devio_warn("detach %s: server pid %d did not stop; killing it", d->target, (int)d->srv.pid);
	detach_signal(pidfd, SIGKILL);
	if (poll(&p, 1, DETACH_KILL_WAIT_MS) == 1)
		r = 0;
out:
	close(pidfd);
	return r;
}

static int detach_live(struct detach *d)
{
	int r;

	if (d->n_frontends > 1 && !d->all) {
		devio_err("detach %s: server pid %d also serves %s; stopping it stops all of them: "
			  "devio detach --all %s", d->target, (int)d->srv.pid, d->others, d->target);
		return 1;
	}
	if (d->force && d->mnt[0])
		detach_abort_mount(d->mnt);
	r = detach_stop_server(d);
	if (r == 0 && d->force && detach_leftovers(d) < 0)
		r = 1;
	return r;
}

/* ---- the command ---- */

/* The target as an absolute path, even when it is a dead mount that
 * realpath() cannot stat (ENOTCONN). */
static int detach_abspath(const char *arg, char *out)
{
	char dir[PATH_MAX], *slash;
	size_t n;

	if (realpath(arg, out))
		return 0;
	if (snprintf(dir, sizeof(dir), "%s", arg) >= (int)sizeof(dir))
		return -ENAMETOOLONG;
	while ((n = strlen(dir)) > 1 && dir[n - 1] == '/')
		dir[n - 1] = '\0';
	slash = strrchr(dir, '/');
	if (slash == dir) /* /name */
		return snprintf(out, PATH_MAX, "%s", dir) >= PATH_MAX ? -ENAMETOOLONG : 0;
	if (slash)
		*slash = '\0';
	if (!realpath(slash ? dir : ".", out))
		return -errno;
	n = strlen(out);
	if (snprintf(out + n, PATH_MAX - n, "/%s", slash ? slash + 1 : dir) >= (int)(PATH_MAX - n))
		return -ENAMETOOLONG;
	return 0;
}

/* Stop the server (it deletes its device), or delete a device whose
 * server was killed.  Refused while the device is open (mounted, held,
 * open in a process) unless --force: its users would see I/O errors. */
static int detach_ublk(struct detach *d)
{
	char why[128];
	unsigned id;
	int r;

	if (devio_ublk_parse_dev(d->target, &id)) {
		devio_err("detach %s: not a ublk device name", d->target);
		return 1;
	}
	if (d->handover) { /* for devices in use: that is the point */
		if (d->srv.pid && !d->dead)
			return detach_stop_server(d);
		devio_err("detach --handover %s: no devio server serves it%s", d->target,
			  d->dead ? " any more (devio serve SOURCE --ublk=N --recover takes it over)" : "");
		return 1;
	}
	if (!d->force && devio_ublk_in_use(id, why, sizeof(why)) > 0) {
		devio_err("detach %s: in use (%s); unmount or close it first, or --force", d->target, why);
		return 1;
	}
	if (d->srv.pid && !d->dead)
		return detach_live(d);
	r = devio_ublk_delete(id);
	if (r) {
		devio_err("detach %s: %s", d->target, strerror(-r));
		return 1;
	}
	return 0;
}

static int detach_parse(int argc, char **argv, struct detach *d)
{
	static const struct option opts[] = {
		{ "all", no_argument, NULL, 'a' },
		{ "force", no_argument, NULL, 'f' },
		{ "handover", no_argument, NULL, 'H' },
		CLI_STD_OPTIONS,
		{ NULL, 0, NULL, 0 },
	};
	int c;

	optind = 1;
	while ((c = cli_getopt("detach", argc, argv, "afhV", opts, detach_usage)) != -1) {
		if (c == 'a')
			d->all = true;
		else if (c == 'f')
			d->force = true;
		else if (c == 'H')
			d->handover = true;
	}
	if (optind != argc - 1)
		return cli_usage_error("detach", "want one MOUNTPOINT or device");
	return 0;
}

int cmd_detach(int argc, char **argv)
{
	static char target[PATH_MAX];
	struct detach d = { 0 };
	int r = detach_parse(argc, argv, &d);

	if (r)
		return r;
	if (!strncmp(argv[optind], "/dev/nbd", 8))
		return detach_nbd_device(argv[optind]);
	if ((r = detach_abspath(argv[optind], target))) {
		devio_err("detach %s: %s", argv[optind], strerror(-r));
		return 1;
	}
	d.target = target;
	if (d.handover && strncmp(target, "/dev/ublkb", 10)) {
		devio_err("detach --handover %s: only a ublk device (/dev/ublkbN) can be handed over", target);
		return 1;
	}
	runstate_each(detach_find_one, &d);
	if (!strncmp(target, "/dev/ublkb", 10))
		return detach_ublk(&d);
	if (d.srv.pid && !d.dead)
		return detach_live(&d);
	r = detach_leftovers(&d);
	if (r > 0)
		return 0;
	if (r == 0)
		devio_err("detach %s: no devio server serves it (see devio status)", target);
	return 1;
}
