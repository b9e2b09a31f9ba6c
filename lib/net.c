/* net.c - transport addresses (tcp:, unix:, stdio, devices), listening and
 * connecting sockets, and full-length reads and writes. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include "devio/util.h"

static int net_copy_str(char *dst, size_t dstlen, const char *src, size_t n)
{
	if (n >= dstlen)
		return -ENAMETOOLONG;
	memcpy(dst, src, n);
	dst[n] = '\0';
	return 0;
}

/* "[HOST:]PORT", "[v6]:PORT", "HOST:" */
static int net_parse_hostport(const char *s, const char *default_port, struct devio_addr *a)
{
	const char *colon;

	if (*s == '[') {
		const char *close = strchr(s, ']');
		if (!close || (close[1] && close[1] != ':'))
			return -EINVAL;
		if (net_copy_str(a->host, sizeof(a->host), s + 1, (size_t)(close - s - 1)))
			return -ENAMETOOLONG;
		s = close[1] ? close + 2 : close + 1;
	} else if ((colon = strrchr(s, ':'))) {
		if (net_copy_str(a->host, sizeof(a->host), s, (size_t)(colon - s)))
			return -ENAMETOOLONG;
		s = colon + 1;
	}
	if (!*s) {
		if (!default_port)
			return -EINVAL;
		s = default_port;
	}
	for (const char *p = s; *p; p++)
		if (*p < '0' || *p > '9')
			return -EINVAL;
	if (strlen(s) > 5 || strtoul(s, NULL, 10) > 65535)
		return -ERANGE; /* getaddrinfo would take port 99999 as 34463 */
	return net_copy_str(a->port, sizeof(a->port), s, strlen(s));
}

int devio_addr_parse(const char *s, const char *default_port, struct devio_addr *a)
{
	memset(a, 0, sizeof(*a));
	if (!s || !*s)
		return -EINVAL;
	if (!strcmp(s, "stdio") || !strcmp(s, "-")) {
		a->kind = DEVIO_ADDR_STDIO;
		return 0;
	}
	if (!strncmp(s, "tcp:", 4)) {
		a->kind = DEVIO_ADDR_TCP;
		return net_parse_hostport(s + 4, default_port, a);
	}
	if (!strcmp(s, "systemd") || !strncmp(s, "systemd:", 8)) {
		a->kind = DEVIO_ADDR_SYSTEMD;
		return net_copy_str(a->path, sizeof(a->path), s + 7 + (s[7] == ':'),
				    strlen(s + 7 + (s[7] == ':')));
	}
	if (!strncmp(s, "unix:", 5)) {
		a->kind = DEVIO_ADDR_UNIX;
		if (!s[5])
			return -EINVAL;
		return net_copy_str(a->path, sizeof(((struct sockaddr_un *)0)->sun_path), s + 5,
				    strlen(s + 5));
	}
	if (s[0] == '/') {
		a->kind = DEVIO_ADDR_DEVICE;
		return net_copy_str(a->path, sizeof(a->path), s, strlen(s));
	}
	return -EINVAL;
}

void devio_addr_format(const struct devio_addr *a, char *out, size_t outlen)
{
	switch (a->kind) {
	case DEVIO_ADDR_TCP:
		if (strchr(a->host, ':'))
			snprintf(out, outlen, "tcp:[%s]:%s", a->host, a->port);
		else
			snprintf(out, outlen, "tcp:%s:%s", a->host[0] ? a->host : "127.0.0.1", a->port);
		break;
	case DEVIO_ADDR_UNIX:
		snprintf(out, outlen, "unix:%s", a->path);
		break;
	case DEVIO_ADDR_STDIO:
		snprintf(out, outlen, "stdio");
		break;
	case DEVIO_ADDR_DEVICE:
		snprintf(out, outlen, "%s", a->path);
		break;
	case DEVIO_ADDR_SYSTEMD:
		snprintf(out, outlen, "systemd%s%s", a->path[0] ? ":" : "", a->path);
		break;
	}
}

void devio_socket_tune(int fd)
{
	int one = 1, buf = 4 << 20;

	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)); /* fails harmlessly on AF_UNIX */
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
}

static int net_unix_sockaddr(const struct devio_addr *a, struct sockaddr_un *sun)
{
	memset(sun, 0, sizeof(*sun));
	sun->sun_family = AF_UNIX;
	if (strlen(a->path) >= sizeof(sun->sun_path))
		return -ENAMETOOLONG;
	strcpy(sun->sun_path, a->path);
	return 0;
}

/* A socket file at the path: 0 if nobody accepts on it any more (stale,
 * ours to replace), -EADDRINUSE if a server answers (logged). */
static int net_unix_check_stale(const struct devio_addr *a)
{
	struct sockaddr_un sun;
	int fd, r;

	if (net_unix_sockaddr(a, &sun))
		return 0;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	r = connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == 0 ? 0 : -errno;
	close(fd);
	if (r == -ECONNREFUSED || r == -ENOENT)
		return 0;
	if (r == 0 || r == -EAGAIN) /* EAGAIN: a server whose backlog is full */
		devio_err("%s: in use by another server; not replacing it", a->path);
	else
		devio_err("%s: cannot tell whether a server uses it (%s); not replacing it", a->path, strerror(-r));
	return -EADDRINUSE;
}

/* Make room at the path: nothing there, or a stale socket (removed unless
 * someone replaced it meanwhile).  0 or -errno (logged). */
static int net_unix_clear_path(const struct devio_addr *a)
{
	struct stat st, now;
	int r;

	if (lstat(a->path, &st) < 0)
		return 0;
	if (!S_ISSOCK(st.st_mode)) {
		devio_err("%s: exists and is not a socket; not replacing it", a->path);
		return -EEXIST;
	}
	if ((r = net_unix_check_stale(a)))
		return r;
	if (lstat(a->path, &now) == 0 && now.st_dev == st.st_dev && now.st_ino == st.st_ino)
		unlink(a->path);
	return 0;
}

/* Give the listening socket at tmp the path.  link() never replaces, so
 * of two servers starting at once one gets the path and the other finds
 * it in use.  0 or -errno (logged). */
static int net_unix_publish(const struct devio_addr *tmp, const struct devio_addr *a)
{
	int r;

	for (int tries = 0; tries < 4; tries++) {
		if (link(tmp->path, a->path) == 0)
			return 0;
		if (errno != EEXIST) {
			r = -errno;
			devio_err("%s: cannot listen: %s", a->path, strerror(-r));
			return r;
		}
		if ((r = net_unix_clear_path(a)))
			return r;
	}
	devio_err("%s: in use by another server; not replacing it", a->path);
	return -EADDRINUSE;
}

/* The socket file's mode and group, exactly, whatever the umask: bind()
 * gives the file the socket inode's mode less the umask, so the inode is
 * made mode first (nobody can open the file wider than that, even for a
 * moment), then the file is set to the mode and group (before it is
 * linked to its real path).  0 or -errno. */
static int net_unix_set_mode(int fd, unsigned mode)
{
	return fchmod(fd, mode) ? -errno : 0;
}

static int net_unix_fix_file(const struct devio_addr *real, const char *path, unsigned mode, long gid)
{
	int r = 0;

	if (gid >= 0 && chown(path, (uid_t)-1, (gid_t)gid))
		r = -errno;
	if (!r && chmod(path, mode))
		r = -errno;
	if (r)
		devio_err("%s: cannot set the socket's %s: %s", real->path, gid >= 0 ? "group and mode" : "mode",
			  strerror(-r));
	return r;
}

/* The socket file appears at bind(), before listen(): bind under a
 * temporary name and link it into place once it accepts connections, so
 * a client that sees the path can always connect.  A live socket at the
 * path is never replaced ("in use by another server"); a stale one is. */
static int net_listen_unix(const struct devio_addr *a, int backlog, unsigned mode, long gid)
{
	struct devio_addr tmp = *a;
	struct sockaddr_un sun;
	int fd, r;

	if ((r = net_unix_clear_path(a)))
		return r;
	if (snprintf(tmp.path, sizeof(tmp.path), "%s.%d.tmp", a->path, (int)getpid()) >= (int)sizeof(tmp.path) ||
	    net_unix_sockaddr(&tmp, &sun)) {
		tmp = *a; /* no room for the temporary name: bind in place */
		if ((r = net_unix_sockaddr(a, &sun)))
			return r;
	}
	unlink(tmp.path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if ((r = net_unix_set_mode(fd, mode))) {
		close(fd);
		return r;
	}
	if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) || listen(fd, backlog)) {
		r = -errno;
		devio_err("%s: cannot listen: %s", a->path, strerror(-r));
		unlink(tmp.path);
		close(fd);
		return r;
	}
	if ((r = net_unix_fix_file(a, tmp.path, mode, gid))) {
		unlink(tmp.path);
		close(fd);
		return r;
	}
	if (strcmp(tmp.path, a->path)) {
		r = net_unix_publish(&tmp, a);
		unlink(tmp.path);
		if (r) {
			close(fd);
			return r;
		}
	}
	return fd;
}

/* Every interface ("*", "::"): the IPv6 wildcard with IPV6_V6ONLY off, so
 * one socket takes IPv4 clients too (as v4-mapped ::ffff:a.b.c.d, which
 * --allow's IPv4 entries match: lib/access.c).  -EAFNOSUPPORT where the
 * machine has no IPv6 (the caller then binds 0.0.0.0). */
static int net_listen_tcp_dual(const struct devio_addr *a, int backlog)
{
	struct sockaddr_in6 sin6 = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_ANY_INIT,
				     .sin6_port = htons((uint16_t)strtoul(a->port, NULL, 10)) };
	int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0), zero = 0, one = 1, r;

	if (fd < 0)
		return -errno;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) ||
	    bind(fd, (struct sockaddr *)&sin6, sizeof(sin6)) || listen(fd, backlog)) {
		r = -errno;
		close(fd);
		if (r != -EAFNOSUPPORT && r != -EADDRNOTAVAIL)
			devio_err("tcp:[::]:%s: cannot listen: %s", a->port, strerror(-r));
		return r;
	}
	return fd;
}

static int net_listen_tcp(const struct devio_addr *a, int backlog)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
	struct addrinfo *res, *ai;
	const char *host = a->host[0] ? a->host : "127.0.0.1";
	int fd = -1, r, one = 1;

	if (!strcmp(host, "*") || !strcmp(host, "::")) {
		fd = net_listen_tcp_dual(a, backlog);
		if (fd >= 0 || (fd != -EAFNOSUPPORT && fd != -EADDRNOTAVAIL))
			return fd;
		host = "0.0.0.0"; /* no IPv6 here: every IPv4 interface */
	}
	r = getaddrinfo(host, a->port, &hints, &res);
	if (r) {
		devio_err("tcp:%s:%s: %s", a->host, a->port, gai_strerror(r));
		return -EINVAL;
	}
	r = -EADDRNOTAVAIL;
	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
		if (fd < 0) {
			r = -errno;
			continue;
		}
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, backlog) == 0)
			break;
		r = -errno;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0) {
		devio_err("tcp:%s:%s: cannot listen: %s", host, a->port, strerror(-r));
		return r;
	}
	return fd;
}

int devio_listen(const struct devio_addr *a, int backlog)
{
	return devio_listen_mode(a, backlog, 0600, -1);
}

int devio_listen_mode(const struct devio_addr *a, int backlog, unsigned mode, long gid)
{
	switch (a->kind) {
	case DEVIO_ADDR_TCP:
		return net_listen_tcp(a, backlog);
	case DEVIO_ADDR_UNIX:
		return net_listen_unix(a, backlog, mode, gid);
	default:
		return -EINVAL;
	}
}

/* With nobody listening on a local port in the ephemeral range, a
 * connect() may be given that very port as its own and connect to itself
 * (TCP simultaneous open): it then reads back what it sends and holds
 * the port, so the server cannot bind it when it comes back. */
bool devio_socket_is_self(int fd)
{
	struct sockaddr_storage me, peer;
	socklen_t ml = sizeof(me), pl = sizeof(peer);

	if (getsockname(fd, (struct sockaddr *)&me, &ml) || getpeername(fd, (struct sockaddr *)&peer, &pl))
		return false;
	return ml == pl && !memcmp(&me, &peer, ml);
}

int devio_connect(const struct devio_addr *a)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV };
	struct addrinfo *res, *ai;
	struct sockaddr_un sun;
	int fd = -1, r;

	if (a->kind == DEVIO_ADDR_UNIX) {
		if ((r = net_unix_sockaddr(a, &sun)))
			return r;
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			return -errno;
		if (connect(fd, (struct sockaddr *)&sun, sizeof(sun))) {
			r = -errno;
			close(fd);
			return r;
		}
		devio_socket_tune(fd);
		return fd;
	}
	if (a->kind != DEVIO_ADDR_TCP)
		return -EINVAL;
	r = getaddrinfo(a->host[0] ? a->host : "127.0.0.1", a->port, &hints, &res);
	if (r)
		return -EHOSTUNREACH;
	r = -ECONNREFUSED;
	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
		if (fd < 0) {
			r = -errno;
			continue;
		}
		if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
			if (!devio_socket_is_self(fd))
				break;
			r = -ECONNREFUSED; /* nobody listens there */
		} else {
			r = -errno;
		}
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0)
		return r;
	devio_socket_tune(fd);
	return fd;
}

int devio_read_full(int fd, void *buf, size_t len)
{
	char *p = buf;

	while (len) {
		ssize_t n = read(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -ECONNRESET;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

int devio_write_full(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
		if (n < 0 && errno == ENOTSOCK)
			n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

int devio_discard_full(int fd, uint64_t len)
{
	char scratch[65536];

	while (len) {
		size_t n = len < sizeof(scratch) ? (size_t)len : sizeof(scratch);
		int r = devio_read_full(fd, scratch, n);
		if (r)
			return r;
		len -= n;
	}
	return 0;
}
