/* listener.c - the one accept loop for the socket front ends (--devio in
 * frontends/stream.c, --nbd in frontends/nbd.c): include/devio/listener.h.
 *
 * One accept thread per listening socket.  Each accepted socket is tuned
 * (devio_socket_tune, TCP keepalive) and gets its own joinable thread
 * running the front end's serve(); finished threads are joined by the
 * accept thread as it goes and by stop().  All the counters and the list
 * of connections are under one lock; a connection closes its socket
 * under that lock, so stop() never shuts down a descriptor number that
 * was already reused.
 *
 * Access and limits (docs/security.md): the peer address is checked
 * against --allow right after accept, before a byte is read; a Unix
 * socket is created 0600 (--socket-mode, --socket-group) whatever the
 * umask; each connection has a handshake deadline, enforced by the
 * accept thread (it wakes every LISTENER_REAP_MS and shuts the socket of
 * a connection past it), and once the front end says the handshake is
 * over (devio_listener_conn_ready, on the connection's own thread) the
 * socket's SO_RCVTIMEO/SO_SNDTIMEO carry the idle and stall timeouts.
 *
 * Socket activation (address systemd[:NAME]): systemd or
 * systemd-socket-activate passes listening sockets from descriptor 3 on
 * (LISTEN_FDS, for the process LISTEN_PID, named by LISTEN_FDNAMES); each
 * listener takes one, by name or the next one not taken, and serves it
 * like its own (it never unlinks a socket file it did not make).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "devio/frontend.h"
#include "devio/listener.h"
#include "devio/util.h"

/* accept() out of descriptors or memory: wait this long before trying again. */
#define LISTENER_PAUSE_MS 200
/* The accept thread wakes this often to join finished connections. */
#define LISTENER_REAP_MS 1000
/* stop(): after the grace, warn if connections still run after this long. */
#define LISTENER_STUCK_S 10
/* Socket activation: at most this many descriptors handed over. */
#define LISTENER_MAX_ACTIVATED 64
#define LISTENER_FIRST_FD 3 /* SD_LISTEN_FDS_START */

struct listener_conn {
	struct devio_listener *l;
	int fd;                   /* -1 once closed (l->lock) */
	uint64_t id;
	uint64_t deadline_ms;     /* handshake deadline (monotonic), 0 = none (l->lock) */
	/* the connection's own thread only: idle time across receive timeouts */
	uint64_t silent_since_ms, last_timeout_ms;
	pthread_t thread;
	bool finished;            /* serve() returned; joinable */
	struct listener_conn *next;
};

struct devio_listener {
	struct devio_listener_conf conf;
	struct devio_listen_opts opts; /* conf.opts, copied */
	unsigned handshake_s, idle_s, stall_s; /* in effect */
	char name[300];
	struct devio_addr addr;
	int lfd;
	int stop_pipe[2];
	pthread_t thread;
	bool thread_started;
	bool tcp;                 /* keepalive for its connections */
	dev_t sock_dev;           /* the Unix socket file this listener made */
	ino_t sock_ino;
	pthread_mutex_t lock;
	pthread_cond_t changed;   /* a connection ended */
	struct listener_conn *conns;
	unsigned active;
	uint64_t served, refused, accept_errors, disallowed, timed_out;
	bool stopping;
};

/* The 1st, 2nd, 4th, 8th, ... occurrence is told. */
static bool listener_tell(uint64_t n)
{
	return n && (n & (n - 1)) == 0;
}

static uint64_t listener_now_ms(void)
{
	return devio_now_ns() / 1000000;
}

/* ---- connections ---- */

/* The connection this thread serves (listener_conn_main), else NULL. */
static __thread struct listener_conn *listener_self;

static void *listener_conn_main(void *arg)
{
	struct listener_conn *c = arg;
	struct devio_listener *l = c->l;

	listener_self = c;
	l->conf.serve(l->conf.ctx, c->fd, c->id);
	listener_self = NULL;
	pthread_mutex_lock(&l->lock);
	close(c->fd);
	c->fd = -1;
	c->finished = true;
	l->active--;
	pthread_cond_broadcast(&l->changed);
	pthread_mutex_unlock(&l->lock);
	return NULL;
}

/* Join connections whose threads have ended, or all of them (lock held;
 * it is dropped around each join). */
static void listener_reap_locked(struct devio_listener *l, bool all)
{
	struct listener_conn **pp = &l->conns;

	while (*pp) {
		struct listener_conn *c = *pp;

		if (!c->finished && !all) {
			pp = &c->next;
			continue;
		}
		*pp = c->next;
		pthread_mutex_unlock(&l->lock);
		pthread_join(c->thread, NULL);
		free(c);
		pthread_mutex_lock(&l->lock);
		pp = &l->conns; /* the list may have changed meanwhile */
	}
}

/* A TCP peer that vanishes without a FIN (its host crashed, the link went
 * down) would hold its slot and thread forever, since an idle client is
 * legitimate: keepalive probes find it within about two minutes and the
 * blocked read then fails.  A live idle client answers them. */
static void listener_keepalive(int fd)
{
	int one = 1, idle = 60, intvl = 10, cnt = 6;

	setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
	setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
}

/* Refuse fd: over the cap or stopping (lock held). */
static void listener_refuse_locked(struct devio_listener *l, int fd)
{
	uint64_t n = ++l->refused;

	close(fd);
	if (listener_tell(n))
		devio_warn("%s: refusing a client: %u connections already served at once (%llu refused so far)",
			   l->name, l->opts.max_conns, (unsigned long long)n);
}

/* Serve fd on a new thread (lock held). */
static void listener_conn_start_locked(struct devio_listener *l, int fd)
{
	struct listener_conn *c = calloc(1, sizeof(*c));

	if (!c) {
		close(fd);
		l->refused++;
		return;
	}
	c->l = l;
	c->fd = fd;
	c->id = l->served + 1;
	if (l->handshake_s)
		c->deadline_ms = listener_now_ms() + l->handshake_s * 1000ull;
	if (pthread_create(&c->thread, NULL, listener_conn_main, c)) {
		devio_warn("%s: cannot start a connection thread", l->name);
		close(fd);
		free(c);
		l->refused++;
		return;
	}
	l->served++;
	l->active++;
	c->next = l->conns;
	l->conns = c;
}

/* accept() failed with e.  Out of descriptors or memory, the pending
 * connection stays readable: pause (stop still wakes us) instead of
 * spinning and logging at full speed. */
static void listener_accept_failed(struct devio_listener *l, int e)
{
	struct pollfd p = { .fd = l->stop_pipe[0], .events = POLLIN };

	if (e == EINTR || e == EAGAIN || e == ECONNABORTED)
		return;
	if (listener_tell(++l->accept_errors))
		devio_warn("%s: accept: %s (%llu failures so far)", l->name, strerror(e),
			   (unsigned long long)l->accept_errors);
	if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM)
		poll(&p, 1, LISTENER_PAUSE_MS);
}

/* A TCP peer outside every --allow prefix: closed before a byte is read. */
/* An IPv6 peer's address for the log; an IPv4 client of a dual-stack
 * socket (v4-mapped, ::ffff:a.b.c.d) as the IPv4 address it is. */
static void listener_v6_name(const struct in6_addr *a, char *out, socklen_t len)
{
	if (IN6_IS_ADDR_V4MAPPED(a))
		inet_ntop(AF_INET, a->s6_addr + 12, out, len);
	else
		inet_ntop(AF_INET6, a, out, len);
}

static bool listener_disallowed(struct devio_listener *l, int fd, const struct sockaddr_storage *ss, socklen_t len)
{
	char host[INET6_ADDRSTRLEN] = "?";
	uint64_t n;

	if (!l->tcp || !l->opts.n_allow || devio_allow_match(l->opts.allow, l->opts.n_allow,
							     (const struct sockaddr *)ss, len))
		return false;
	close(fd);
	pthread_mutex_lock(&l->lock);
	n = ++l->disallowed;
	l->refused++;
	pthread_mutex_unlock(&l->lock);
	if (listener_tell(n)) {
		if (ss->ss_family == AF_INET)
			inet_ntop(AF_INET, &((const struct sockaddr_in *)ss)->sin_addr, host, sizeof(host));
		else if (ss->ss_family == AF_INET6)
			listener_v6_name(&((const struct sockaddr_in6 *)ss)->sin6_addr, host, sizeof(host));
		devio_warn("%s: refusing %s: not in --allow (%llu refused so far)", l->name, host,
			   (unsigned long long)n);
	}
	return true;
}

static void listener_accept_one(struct devio_listener *l)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	int fd = accept4(l->lfd, (struct sockaddr *)&ss, &len, SOCK_CLOEXEC);

	if (fd < 0) {
		listener_accept_failed(l, errno);
		return;
	}
	if (listener_disallowed(l, fd, &ss, len))
		return;
	devio_socket_tune(fd);
	if (l->tcp)
		listener_keepalive(fd);
	pthread_mutex_lock(&l->lock);
	if (l->stopping || l->active >= l->opts.max_conns)
		listener_refuse_locked(l, fd);
	else
		listener_conn_start_locked(l, fd);
	listener_reap_locked(l, false);
	pthread_mutex_unlock(&l->lock);
}

/* Shut the socket of every connection past its handshake deadline (lock
 * held); its thread then sees EOF and ends as usual. */
static void listener_expire_locked(struct devio_listener *l)
{
	uint64_t now = listener_now_ms();

	for (struct listener_conn *c = l->conns; c; c = c->next) {
		if (!c->deadline_ms || now < c->deadline_ms || c->fd < 0)
			continue;
		c->deadline_ms = 0;
		shutdown(c->fd, SHUT_RDWR);
		if (listener_tell(++l->timed_out))
			devio_warn("%s: dropping client %llu: no handshake within %u s (%llu dropped by timeouts so far)",
				   l->name, (unsigned long long)c->id, l->handshake_s, (unsigned long long)l->timed_out);
	}
}

static void *listener_main(void *arg)
{
	struct devio_listener *l = arg;

	for (;;) {
		struct pollfd p[2] = { { .fd = l->lfd, .events = POLLIN }, { .fd = l->stop_pipe[0], .events = POLLIN } };
		int n = poll(p, 2, LISTENER_REAP_MS);

		if (n < 0 && errno != EINTR) {
			devio_err("%s: poll: %s", l->name, strerror(errno));
			return NULL;
		}
		if (n > 0 && p[1].revents)
			return NULL;
		if (n > 0 && p[0].revents)
			listener_accept_one(l);
		pthread_mutex_lock(&l->lock);
		listener_expire_locked(l);
		listener_reap_locked(l, false);
		pthread_mutex_unlock(&l->lock);
	}
}

/* ---- timeouts on the connection's own thread ---- */

/* The receive timeout: the shorter of the idle and stall timeouts. */
static unsigned listener_rcv_s(const struct devio_listener *l)
{
	if (!l->idle_s || (l->stall_s && l->stall_s < l->idle_s))
		return l->stall_s;
	return l->idle_s;
}

void devio_listener_conn_ready(void)
{
	struct listener_conn *c = listener_self;
	struct timeval rcv = { 0, 0 }, snd = { 0, 0 };

	if (!c)
		return;
	pthread_mutex_lock(&c->l->lock);
	c->deadline_ms = 0;
	pthread_mutex_unlock(&c->l->lock);
	rcv.tv_sec = listener_rcv_s(c->l);
	snd.tv_sec = c->l->stall_s;
	setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &rcv, sizeof(rcv));
	setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &snd, sizeof(snd));
}

static bool listener_conn_drop(struct listener_conn *c, const char *why, unsigned s)
{
	struct devio_listener *l = c->l;
	uint64_t n;

	pthread_mutex_lock(&l->lock);
	n = ++l->timed_out;
	pthread_mutex_unlock(&l->lock);
	if (listener_tell(n))
		devio_warn("%s: dropping client %llu: %s for %u s (%llu dropped by timeouts so far)", l->name,
			   (unsigned long long)c->id, why, s, (unsigned long long)n);
	return false;
}

bool devio_listener_conn_wait_more(bool between)
{
	struct listener_conn *c = listener_self;
	struct devio_listener *l;
	uint64_t now, rcv_ms;

	if (!c || !listener_rcv_s(c->l))
		return false; /* not ours: some other timeout */
	l = c->l;
	if (!between)
		return listener_conn_drop(c, "stuck in the middle of a request", listener_rcv_s(l));
	if (!l->idle_s)
		return true; /* an idle client is a client */
	/* Timeouts back to back (no byte came in between) add up. */
	now = listener_now_ms();
	rcv_ms = listener_rcv_s(l) * 1000ull;
	if (!c->last_timeout_ms || now - c->last_timeout_ms > rcv_ms + 1000)
		c->silent_since_ms = now - rcv_ms;
	c->last_timeout_ms = now;
	if (now - c->silent_since_ms + 500 < l->idle_s * 1000ull)
		return true;
	return listener_conn_drop(c, "idle", l->idle_s);
}

/* ---- socket activation ---- */

static pthread_mutex_t listener_act_lock = PTHREAD_MUTEX_INITIALIZER;
static bool listener_act_read;
static unsigned listener_act_n;
static bool listener_act_taken[LISTENER_MAX_ACTIVATED];
static char listener_act_names[LISTENER_MAX_ACTIVATED][64];

/* Take in what systemd handed over, once (lock held); the variables are
 * removed so that a child (--run) does not take the sockets for its own. */
static void listener_act_load_locked(void)
{
	const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS"), *names = getenv("LISTEN_FDNAMES");
	uint64_t p = 0, n = 0;

	if (listener_act_read)
		return;
	listener_act_read = true;
	if (!pid || !fds || devio_parse_u64(pid, &p) || p != (uint64_t)getpid() || devio_parse_u64(fds, &n))
		return;
	if (n > LISTENER_MAX_ACTIVATED) {
		devio_warn("socket activation: %llu descriptors handed over; serving the first %d",
			   (unsigned long long)n, LISTENER_MAX_ACTIVATED);
		n = LISTENER_MAX_ACTIVATED;
	}
	listener_act_n = (unsigned)n;
	for (unsigned i = 0; i < listener_act_n; i++) {
		size_t len = names ? strcspn(names, ":") : 0;

		snprintf(listener_act_names[i], sizeof(listener_act_names[i]), "%.*s", (int)len, names ? names : "");
		if (names)
			names = names[len] ? names + len + 1 : NULL;
		fcntl(LISTENER_FIRST_FD + (int)i, F_SETFD, FD_CLOEXEC);
	}
	unsetenv("LISTEN_PID");
	unsetenv("LISTEN_FDS");
	unsetenv("LISTEN_FDNAMES");
}

/* A handed-over descriptor fit to accept on: a listening stream socket. */
static int listener_act_check(struct devio_listener *l, int fd)
{
	int type = 0, listening = 0;
	socklen_t len = sizeof(type);

	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) || type != SOCK_STREAM) {
		devio_err("%s: descriptor %d from systemd is not a stream socket", l->name, fd);
		return -ENOTSOCK;
	}
	len = sizeof(listening);
	if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) || !listening) {
		devio_err("%s: descriptor %d from systemd is not listening (Accept=yes is not supported)", l->name,
			  fd);
		return -EINVAL;
	}
	return 0;
}

/* The listening socket for systemd[:NAME]: by name, or the next one. */
static int listener_act_take(struct devio_listener *l)
{
	const char *want = l->addr.path;
	int fd = -ENOENT;

	pthread_mutex_lock(&listener_act_lock);
	listener_act_load_locked();
	for (unsigned i = 0; i < listener_act_n && fd < 0; i++) {
		if (listener_act_taken[i] || (want[0] && strcmp(listener_act_names[i], want)))
			continue;
		listener_act_taken[i] = true;
		fd = LISTENER_FIRST_FD + (int)i;
	}
	pthread_mutex_unlock(&listener_act_lock);
	if (fd < 0) {
		if (want[0])
			devio_err("%s: systemd handed over no socket named '%s' (FileDescriptorName=)", l->name, want);
		else
			devio_err("%s: no socket left from systemd (LISTEN_FDS/LISTEN_PID: not socket-activated?)",
				  l->name);
		return fd;
	}
	return listener_act_check(l, fd) ? -EINVAL : fd;
}

/* ---- start and stop ---- */

static int listener_open(struct devio_listener *l)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	struct stat st;

	if (l->addr.kind == DEVIO_ADDR_SYSTEMD) {
		l->lfd = listener_act_take(l);
		if (l->lfd < 0)
			return l->lfd;
		l->tcp = getsockname(l->lfd, (struct sockaddr *)&ss, &sl) == 0 &&
			 (ss.ss_family == AF_INET || ss.ss_family == AF_INET6);
		return 0;
	}
	l->tcp = l->addr.kind == DEVIO_ADDR_TCP;
	l->lfd = devio_listen_mode(&l->addr, (int)(l->opts.max_conns < 128 ? 128 : l->opts.max_conns),
				   l->opts.socket_mode ? l->opts.socket_mode : 0600,
				   l->opts.has_group ? (long)l->opts.group : -1);
	if (l->lfd < 0)
		return l->lfd;
	if (l->addr.kind == DEVIO_ADDR_UNIX && lstat(l->addr.path, &st) == 0) {
		l->sock_dev = st.st_dev;
		l->sock_ino = st.st_ino;
	}
	if (l->addr.kind == DEVIO_ADDR_TCP && !strcmp(l->addr.host, "*"))
		devio_info("%s: listening on every interface%s", l->name,
			   l->opts.n_allow ? "" : " (no --allow: any peer that reaches the port is served)");
	return 0;
}

/* The timeouts in effect: explicit ones, else the defaults for TCP/Unix. */
static void listener_timeouts(struct devio_listener *l)
{
	const struct devio_listen_opts *o = &l->opts;

	l->handshake_s = o->handshake_set ? o->handshake_timeout : DEVIO_LISTEN_HANDSHAKE_S;
	l->idle_s = o->idle_timeout;
	l->stall_s = o->stall_set ? o->stall_timeout : l->tcp ? DEVIO_LISTEN_STALL_TCP_S : 0;
	if (!l->tcp && o->n_allow)
		devio_debug("%s: --allow applies to TCP peers; this socket admits whoever may open it", l->name);
}

/* Remove the Unix socket file, unless another server replaced it since. */
static void listener_unlink(struct devio_listener *l)
{
	struct stat st;

	if (l->addr.kind != DEVIO_ADDR_UNIX || !l->sock_ino)
		return;
	if (lstat(l->addr.path, &st) == 0 && st.st_dev == l->sock_dev && st.st_ino == l->sock_ino)
		unlink(l->addr.path);
}

static void listener_free(struct devio_listener *l)
{
	if (l->lfd >= 0)
		close(l->lfd);
	if (l->stop_pipe[0] >= 0) {
		close(l->stop_pipe[0]);
		close(l->stop_pipe[1]);
	}
	pthread_cond_destroy(&l->changed);
	pthread_mutex_destroy(&l->lock);
	free(l);
}

int devio_listener_start(const struct devio_addr *a, const struct devio_listener_conf *conf,
			 struct devio_listener **out)
{
	struct devio_listener *l = calloc(1, sizeof(*l));
	pthread_condattr_t ca;
	int r;

	if (!l)
		return -ENOMEM;
	l->conf = *conf;
	if (conf->opts)
		l->opts = *conf->opts;
	l->conf.opts = NULL;
	if (!l->opts.max_conns)
		l->opts.max_conns = conf->max_conns;
	l->addr = *a;
	l->lfd = l->stop_pipe[0] = l->stop_pipe[1] = -1;
	snprintf(l->name, sizeof(l->name), "%s", conf->name ? conf->name : "listener");
	pthread_mutex_init(&l->lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&l->changed, &ca);
	pthread_condattr_destroy(&ca);
	if (pipe2(l->stop_pipe, O_CLOEXEC)) {
		r = -errno;
		goto out_free;
	}
	if ((r = listener_open(l)))
		goto out_free;
	listener_timeouts(l);
	if ((r = -pthread_create(&l->thread, NULL, listener_main, l))) {
		listener_unlink(l);
		goto out_free;
	}
	l->thread_started = true;
	*out = l;
	return 0;
out_free:
	listener_free(l);
	return r;
}

/* Shut every open connection's socket (lock held). */
static void listener_shutdown_locked(struct devio_listener *l, int how)
{
	for (struct listener_conn *c = l->conns; c; c = c->next)
		if (c->fd >= 0)
			shutdown(c->fd, how);
}

/* Wait for every connection to end, up to ms (-1: no bound); lock held. */
static void listener_wait_locked(struct devio_listener *l, long ms)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	t.tv_sec += ms / 1000;
	t.tv_nsec += (ms % 1000) * 1000000;
	if (t.tv_nsec >= 1000000000) {
		t.tv_sec++;
		t.tv_nsec -= 1000000000;
	}
	while (l->active) {
		if (ms < 0)
			pthread_cond_wait(&l->changed, &l->lock);
		else if (pthread_cond_timedwait(&l->changed, &l->lock, &t) == ETIMEDOUT)
			return;
	}
}

void devio_listener_stop(struct devio_listener *l)
{
	if (!l)
		return;
	pthread_mutex_lock(&l->lock);
	l->stopping = true;
	pthread_mutex_unlock(&l->lock);
	if (write(l->stop_pipe[1], "x", 1) < 0)
		devio_warn("%s: cannot wake the accept thread: %s", l->name, strerror(errno));
	if (l->thread_started)
		pthread_join(l->thread, NULL);
	listener_unlink(l);
	close(l->lfd);
	l->lfd = -1;
	/* No new requests; what is in flight gets the grace to be answered,
	 * then every connection is cut. */
	pthread_mutex_lock(&l->lock);
	listener_shutdown_locked(l, SHUT_RD);
	listener_wait_locked(l, (long)l->conf.grace_ms);
	listener_shutdown_locked(l, SHUT_RDWR);
	listener_wait_locked(l, LISTENER_STUCK_S * 1000L);
	if (l->active)
		devio_warn("%s: waiting for %u connection(s) still running a request", l->name, l->active);
	listener_wait_locked(l, -1);
	listener_reap_locked(l, true);
	pthread_mutex_unlock(&l->lock);
	listener_free(l);
}

void devio_listener_stats(struct devio_listener *l, struct devio_listener_stats *out)
{
	pthread_mutex_lock(&l->lock);
	out->active = l->active;
	out->served = l->served;
	out->refused = l->refused;
	out->timed_out = l->timed_out;
	pthread_mutex_unlock(&l->lock);
	out->port = 0;
	if (l->tcp && l->lfd >= 0) {
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);

		if (!getsockname(l->lfd, (struct sockaddr *)&ss, &sl))
			out->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
								 : ((struct sockaddr_in *)&ss)->sin_port);
	}
}

/* ---- the listener options (DEVIO_LISTEN_OPTIONS) ---- */

#define LISTENER_MAX_TIMEOUT_S 86400

static int listener_opt_seconds(const char *name, const char *val, unsigned *out, bool *set)
{
	uint64_t v;

	if (devio_parse_u64(val, &v) || v > LISTENER_MAX_TIMEOUT_S) {
		devio_err("--%s: want seconds from 0 to %d, got '%s'", name, LISTENER_MAX_TIMEOUT_S, val);
		return -EINVAL;
	}
	*out = (unsigned)v;
	if (set)
		*set = true;
	return 0;
}

static int listener_opt_allow(struct devio_listen_opts *o, const char *val)
{
	if (o->n_allow == DEVIO_ALLOW_MAX) {
		devio_err("--allow: at most %d entries", DEVIO_ALLOW_MAX);
		return -EINVAL;
	}
	if (devio_allow_parse(val, &o->allow[o->n_allow])) {
		devio_err("--allow: want an IPv4 or IPv6 address with an optional /PREFIX and no host bits past it, "
			  "got '%s'", val);
		return -EINVAL;
	}
	o->n_allow++;
	return 0;
}

static int listener_opt_mode(struct devio_listen_opts *o, const char *val)
{
	char *end;
	unsigned long m = strtoul(val, &end, 8);

	if (!*val || *end || m == 0 || m > 0777) {
		devio_err("--socket-mode: want an octal mode from 1 to 0777 (e.g. 0660), got '%s'", val);
		return -EINVAL;
	}
	o->socket_mode = (unsigned)m;
	return 0;
}

static int listener_opt_group(struct devio_listen_opts *o, const char *val)
{
	struct group *g = getgrnam(val);
	uint64_t v;

	if (g)
		o->group = g->gr_gid;
	else if (!devio_parse_u64(val, &v) && v < (gid_t)-1)
		o->group = (gid_t)v;
	else {
		devio_err("--socket-group: no group '%s'", val);
		return -EINVAL;
	}
	o->has_group = true;
	return 0;
}

int devio_listen_opt(const char *name, const char *val, void *field)
{
	struct devio_listen_opts *o = field;

	if (!val)
		return -EINVAL;
	if (!strcmp(name, "allow"))
		return listener_opt_allow(o, val);
	if (!strcmp(name, "socket-mode"))
		return listener_opt_mode(o, val);
	if (!strcmp(name, "socket-group"))
		return listener_opt_group(o, val);
	if (!strcmp(name, "max-connections"))
		return devio_opt_uint(name, val, &o->max_conns);
	if (!strcmp(name, "handshake-timeout"))
		return listener_opt_seconds(name, val, &o->handshake_timeout, &o->handshake_set);
	if (!strcmp(name, "idle-timeout"))
		return listener_opt_seconds(name, val, &o->idle_timeout, NULL);
	if (!strcmp(name, "stall-timeout"))
		return listener_opt_seconds(name, val, &o->stall_timeout, &o->stall_set);
	devio_err("--%s: not a listener option", name);
	return -EINVAL;
}
