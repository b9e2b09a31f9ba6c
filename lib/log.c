/* log.c - one-line messages with a level filter, to one target: stderr
 * (the default), a file (reopened on request, for SIGHUP after
 * logrotate), syslog, or the systemd journal's native socket.  Every
 * message is written with a single write(2)/send(2) so lines from threads
 * don't mix; each thread counts the errors it logged (devio_log_errors).
 * A tee descriptor also gets every line (a --fork child's pipe to its
 * parent until it is ready). */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>
#include "devio/util.h"

#define LOG_JOURNAL_SOCKET "/run/systemd/journal/socket"

enum log_kind { LOG_KIND_STDERR, LOG_KIND_FILE, LOG_KIND_SYSLOG, LOG_KIND_JOURNAL };

static enum devio_log_level log_level = DEVIO_LOG_INFO;
static __thread unsigned long log_errors;
static __thread bool log_quiet; /* this thread's errors and warnings as debug lines */
static enum log_kind log_kind = LOG_KIND_STDERR;
static int log_fd = STDERR_FILENO;  /* file or journal socket; replaced with dup2 on reopen */
static int log_tee = -1;
static char log_path[4096];

unsigned long devio_log_errors(void) { return log_errors; }
void devio_log_quiet(bool on) { log_quiet = on; }

void devio_log_set_level(enum devio_log_level level) { log_level = level; }
enum devio_log_level devio_log_get_level(void) { return log_level; }

static int log_open_file(const char *path)
{
	int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0640);

	return fd < 0 ? -errno : fd;
}

static int log_open_journal(void)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX, .sun_path = LOG_JOURNAL_SOCKET };
	int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0), r;

	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) < 0) {
		r = -errno;
		close(fd);
		return r;
	}
	return fd;
}

int devio_log_open(const char *target)
{
	int fd;

	if (!target || !strcmp(target, "stderr")) {
		log_kind = LOG_KIND_STDERR;
		log_fd = STDERR_FILENO;
		return 0;
	}
	if (!strcmp(target, "syslog")) {
		if (access("/dev/log", W_OK) < 0)
			devio_warn("--log syslog: /dev/log: %s; messages will be lost", strerror(errno));
		openlog("devio", LOG_PID | LOG_NDELAY, LOG_DAEMON);
		log_kind = LOG_KIND_SYSLOG;
		return 0;
	}
	if (!strcmp(target, "journal")) {
		fd = log_open_journal();
		if (fd < 0) {
			devio_err("--log journal: %s: %s", LOG_JOURNAL_SOCKET, strerror(-fd));
			return fd;
		}
		log_kind = LOG_KIND_JOURNAL;
		log_fd = fd;
		return 0;
	}
	if ((size_t)snprintf(log_path, sizeof(log_path), "%s", target) >= sizeof(log_path))
		return -ENAMETOOLONG;
	fd = log_open_file(log_path);
	if (fd < 0) {
		devio_err("--log %s: %s", target, strerror(-fd));
		return fd;
	}
	log_kind = LOG_KIND_FILE;
	log_fd = fd;
	return 0;
}

int devio_log_reopen(void)
{
	int fd;

	if (log_kind != LOG_KIND_FILE)
		return 0;
	fd = log_open_file(log_path);
	if (fd < 0) {
		devio_err("log %s: cannot reopen: %s", log_path, strerror(-fd));
		return fd;
	}
	/* the same descriptor number: threads writing right now never see it closed */
	if (dup2(fd, log_fd) < 0) {
		fd = -errno;
		devio_err("log %s: cannot reopen: %s", log_path, strerror(-fd));
		return fd;
	}
	close(fd);
	devio_info("log %s reopened", log_path);
	return 0;
}

int devio_log_fd(void)
{
	return log_kind == LOG_KIND_FILE || log_kind == LOG_KIND_STDERR ? log_fd : -1;
}

void devio_log_tee(int fd) { log_tee = fd; }

static void log_write(int fd, const char *buf, size_t len)
{
	if (fd >= 0 && write(fd, buf, len) < 0)
		return; /* nowhere left to say it */
}

/* line: "devio: ...\n", n bytes with the newline; msg_at: where the
 * message starts after "devio: ". */
static void log_emit(enum devio_log_level level, const char *line, size_t n, size_t msg_at)
{
	static const int prio[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };
	int msg_len = (int)(n - 1 - msg_at);
	char buf[1200];
	int m;

	if (log_tee >= 0 && log_tee != log_fd)
		log_write(log_tee, line, n);
	switch (log_kind) {
	case LOG_KIND_STDERR:
		log_write(log_fd, line, n);
		return;
	case LOG_KIND_SYSLOG:
		syslog(prio[level], "%.*s", msg_len, line + msg_at);
		return;
	case LOG_KIND_JOURNAL:
		m = snprintf(buf, sizeof(buf), "PRIORITY=%d\nSYSLOG_IDENTIFIER=devio\nSYSLOG_PID=%d\nMESSAGE=%.*s\n",
			     prio[level], (int)getpid(), msg_len, line + msg_at);
		if (m > 0 && send(log_fd, buf, (size_t)m < sizeof(buf) ? (size_t)m : sizeof(buf) - 1, MSG_NOSIGNAL) < 0)
			return;
		return;
	case LOG_KIND_FILE: {
		struct timespec ts;
		struct tm tm;

		clock_gettime(CLOCK_REALTIME, &ts);
		gmtime_r(&ts.tv_sec, &tm);
		m = snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02dZ [%d] %.*s", tm.tm_year + 1900,
			     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)getpid(), (int)n, line);
		log_write(log_fd, buf, m > 0 && (size_t)m < sizeof(buf) ? (size_t)m : 0);
		return;
	}
	}
}

void devio_log(enum devio_log_level level, const char *fmt, ...)
{
	static const char *const prefix[] = { "error: ", "warning: ", "", "debug: " };
	char line[1024];
	va_list ap;
	int n;

	if (level == DEVIO_LOG_ERROR)
		log_errors++;
	if (log_quiet && level < DEVIO_LOG_INFO)
		level = DEVIO_LOG_DEBUG;
	if (level > log_level)
		return;
	n = snprintf(line, sizeof(line), "devio: %s", prefix[level]);
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	for (int i = 0; i < n; i++)
		if (line[i] == '\n') /* one message, one line, whatever a path holds */
			line[i] = ' ';
	line[n++] = '\n';
	log_emit(level, line, (size_t)n, strlen("devio: "));
}
