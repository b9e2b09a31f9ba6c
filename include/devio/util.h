/* util.h - logging, size parsing, addresses, full-length socket I/O and
 * replacing a file whole, shared by the library, the front ends and the
 * command line. */
#ifndef DEVIO_UTIL_H
#define DEVIO_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

enum devio_log_level { DEVIO_LOG_ERROR, DEVIO_LOG_WARN, DEVIO_LOG_INFO, DEVIO_LOG_DEBUG };

void devio_log_set_level(enum devio_log_level level);
enum devio_log_level devio_log_get_level(void);
void devio_log(enum devio_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define devio_err(...)   devio_log(DEVIO_LOG_ERROR, __VA_ARGS__)
#define devio_warn(...)  devio_log(DEVIO_LOG_WARN, __VA_ARGS__)
#define devio_info(...)  devio_log(DEVIO_LOG_INFO, __VA_ARGS__)
#define devio_debug(...) devio_log(DEVIO_LOG_DEBUG, __VA_ARGS__)
/* Errors this thread has logged so far.  A caller that reports a failure
 * prints its own line only when the callee, which knows the cause better,
 * printed none: each failure is told once. */
unsigned long devio_log_errors(void);
/* Log this thread's errors and warnings as debug lines (still counted)
 * while on: a loop that retries (a reconnection) says once what failed. */
void devio_log_quiet(bool on);
/* Where messages go: "stderr" (the default), "syslog" (LOG_DAEMON),
 * "journal" (the systemd journal's native socket) or a FILE (appended,
 * each line time-stamped).  0 or -errno (logged). */
int devio_log_open(const char *target);
/* Reopen the log file (after logrotate moved it; SIGHUP), saying so in
 * the new file; 0 (nothing to do for other targets), or -errno (logged;
 * the old file stays in use). */
int devio_log_reopen(void);
/* The descriptor lines are written to (stderr or the file), -1 for syslog
 * and the journal. */
int devio_log_fd(void);
/* Also write every line to fd (-1: stop), e.g. a pipe to a parent. */
void devio_log_tee(int fd);

/* "4096", "64K", "1.5G", "1T", "512MiB", "0x1000".  Decimal ("010" is
 * ten, never octal) or 0x hex; suffixes K/M/G/T/P/E (powers of 1024),
 * optional trailing "B"/"iB"; a decimal fraction with a suffix as long as
 * the result is whole bytes (as qemu-img takes them).  0, -EINVAL, or
 * -ERANGE when it does not fit in 64 bits. */
int devio_parse_size(const char *s, uint64_t *out);
/* Plain unsigned decimal ("010" is ten) or 0x hex integer; 0 or
 * -EINVAL/-ERANGE. */
int devio_parse_u64(const char *s, uint64_t *out);

/* A transport address: tcp:[HOST:]PORT, unix:PATH, stdio, a device path,
 * or systemd[:NAME]: a listening socket handed over by systemd (socket
 * activation: LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES; lib/listener.c). */
enum devio_addr_kind { DEVIO_ADDR_TCP, DEVIO_ADDR_UNIX, DEVIO_ADDR_STDIO, DEVIO_ADDR_DEVICE, DEVIO_ADDR_SYSTEMD };
struct devio_addr {
	enum devio_addr_kind kind;
	char host[256];   /* TCP: empty = loopback when listening */
	char port[16];    /* TCP */
	char path[256];   /* UNIX socket path or device path; SYSTEMD: the FileDescriptorName ("" = the next) */
};

/* Parse "tcp:[HOST:]PORT", "tcp:[::1]:PORT", "unix:PATH", "stdio"/"-",
 * "/dev/..." (a character device) or "systemd[:NAME]".  default_port is used for "tcp:" or
 * "tcp:HOST:" with no port (may be NULL). */
int devio_addr_parse(const char *s, const char *default_port, struct devio_addr *out);
void devio_addr_format(const struct devio_addr *a, char *out, size_t outlen);
/* Listening socket (SOCK_CLOEXEC, SO_REUSEADDR).  A Unix socket file is
 * replaced only when stale (connect() is refused); one a server still
 * accepts on is -EADDRINUSE ("in use by another server").  Returns fd or
 * -errno (logged). */
int devio_listen(const struct devio_addr *a, int backlog);
/* The same; a Unix socket file gets exactly mode (devio_listen: 0600) and,
 * if gid >= 0, that group, whatever the umask. */
int devio_listen_mode(const struct devio_addr *a, int backlog, unsigned mode, long gid);
/* Connected socket with TCP_NODELAY for TCP.  Returns fd or -errno (a
 * TCP socket that connected to itself is -ECONNREFUSED). */
int devio_connect(const struct devio_addr *a);
/* Is this TCP socket connected to itself (its own address and port)? */
bool devio_socket_is_self(int fd);
/* Tune a connected stream socket for block I/O (TCP_NODELAY, buffers). */
void devio_socket_tune(int fd);

/* Move exactly len bytes, retrying on EINTR and short transfers.
 * Return 0, -errno, or -ECONNRESET when the peer closed (EOF). */
int devio_read_full(int fd, void *buf, size_t len);
int devio_write_full(int fd, const void *buf, size_t len);
/* Read and throw away len bytes. */
int devio_discard_full(int fd, uint64_t len);

/* A file replaced whole (lib/filereplace.c): write_fn(fd, ctx) writes
 * the new bytes into an empty file under a temporary name next to path
 * (mode: as open()'s, less the umask), which is synced and renamed over
 * path, and path's folder synced.  0, or write_fn's -errno or another
 * one; on failure path is as it was and no temporary file stays.  Nothing
 * is logged.  A symbolic link at path is followed (as open(O_CREAT)
 * would): its target is replaced, the link stays. */
int devio_file_replace(const char *path, unsigned mode, int (*write_fn)(int fd, void *ctx), void *ctx);
/* The same in two steps, for a writer that opens the file by name:
 * _begin makes the temporary file (*tmp, malloc'd; freed by the caller)
 * and returns its descriptor or -errno; _end with r == 0 renames it over
 * the file _begin resolved path to and syncs the folder (the writer
 * synced the bytes), with r != 0 or when the rename fails removes it.
 * Returns r or the rename's -errno. */
int devio_file_replace_begin(const char *path, unsigned mode, char **tmp);
int devio_file_replace_end(const char *tmp, int r);
/* Remove the file path names, following a symbolic link there as
 * devio_file_replace does (the link stays): for a new file that failed
 * half made.  0 or -errno. */
int devio_file_remove(const char *path);

/* Write val in one write to a control file (sysfs, fusectl, a module
 * parameter); 0 or -errno, not logged. */
int devio_write_ctl(const char *path, const char *val);

/* Monotonic time in nanoseconds. */
uint64_t devio_now_ns(void);

#ifdef __cplusplus
}
#endif
#endif
