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
 * Socket activation (address systemd[:NAME]): systemd or
 * systemd-socket-activate passes listening sockets from descriptor 3 on
 * (LISTEN_FDS, for the process LISTEN_PID, named by LISTEN_FDNAMES); each
 * listener takes one, by name or the next one not taken, and serves it
 * like its own (it never unlinks a socket file it did not make).
 */
#include <errno.h>
#include <fcntl.h>
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
	pthread_t thread;
	bool finished;            /* serve() returned; joinable */
	struct listener_conn *next;
};

struct devio_listener {
	struct devio_listener_conf conf;
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
	uint64_t served, refused, accept_errors;
	bool stopping;
};

/* The 1st, 2nd, 4th, 8th, ... occurrence is told. */
static bool listener_tell(uint64_t n)
{
	return n && (n & (n - 1)) == 0;
}

/* ---- connections ---- */

static void *listener_conn_main(void *arg)
{
	struct listener_conn *c = arg;
	struct devio_listener *l = c->l;

	l->conf.serve(l->conf.ctx, c->fd, c->id);
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
			   l->name, l->conf.max_conns, (unsigned long long)n);
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

static void listener_accept_one(struct devio_listener *l)
{
	int fd = accept4(l->lfd, NULL, NULL, SOCK_CLOEXEC);

	if (fd < 0) {
		listener_accept_failed(l, errno);
		return;
	}
	devio_socket_tune(fd);
	if (l->tcp)
		listener_keepalive(fd);
	pthread_mutex_lock(&l->lock);
	if (l->stopping || l->active >= l->conf.max_conns)
		listener_refuse_locked(l, fd);
	else
		listener_conn_start_locked(l, fd);
	listener_reap_locked(l, false);
	pthread_mutex_unlock(&l->lock);
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
		listener_reap_locked(l, false);
		pthread_mutex_unlock(&l->lock);
	}
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
	l->lfd = devio_listen(&l->addr, (int)(l->conf.max_conns < 128 ? 128 : l->conf.max_conns));
	if (l->lfd < 0)
		return l->lfd;
	if (l->addr.kind == DEVIO_ADDR_UNIX && lstat(l->addr.path, &st) == 0) {
		l->sock_dev = st.st_dev;
		l->sock_ino = st.st_ino;
	}
	if (l->addr.kind == DEVIO_ADDR_TCP && !strcmp(l->addr.host, "*"))
		devio_info("%s: listening on every interface", l->name);
	return 0;
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
