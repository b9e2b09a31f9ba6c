/* nbd.c - the --nbd front end: serves srv->exports over NBD (fixed
 * newstyle, structured replies, base:allocation) on TCP or Unix sockets.
 *
 * Threads: one listener per --nbd address (lib/listener.c: at most
 * NBD_MAX_CONNS clients at once); one reader thread per client
 * connection.  The reader decodes requests from a buffered socket into a
 * bounded pool of slots (request + buffer) and starts them with
 * devio_submit() (io_uring for the file backend) or on a worker pool for
 * synchronous backends.  Completions, on whatever thread, encode the reply
 * into the slot and queue it; one thread at a time sends the queue with
 * writev, so replies go out in batches, out of order, header and data in
 * one call.  While the reader still has buffered requests to process it
 * "corks" the queue, so a burst of requests is answered with few syscalls.
 *
 * This file: the registration, start/stop/status, a connection's life
 * (negotiation, setup, the reader loop, teardown); the rest is split by
 * concern (nbd_int.h lists the files).
 *
 * TLS (--tls on|require, lib/tls.c): NBD_OPT_STARTTLS during the
 * negotiation (lib/nbd_codec.c) starts a session on the connection, and
 * from then on the negotiation, the reader and the sender go through it
 * (nbd_rx_recv, nbd_tx_send_iov); the spliced paths are off on it.
 *
 * Ordering: a FLUSH covers every write whose reply was sent before the
 * FLUSH arrived; replies are only sent after the backend completed the
 * write, so submitting the flush when it arrives is enough.  FUA is the
 * core's and the backend's business (DEVIO_REQ_FUA).
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "devio/listener.h"
#include "devio/util.h"
#include "devio/workers.h"
#include "nbd_int.h"

#define NBD_DEFAULT_DEPTH 64
#define NBD_MAX_CONNS 128                  /* clients served at once; more are closed at once */
#define NBD_STOP_GRACE_MS 2000             /* stop: time to answer what is in flight */
#define NBD_MAX_DEPTH 1024

/* ---- negotiation I/O on the socket or, after STARTTLS, the session ---- */

static int nbd_sock_read(void *ctx, void *buf, size_t len)
{
	struct nbd_conn *c = ctx;

	return c->tls ? devio_tls_read_full(c->tls, buf, len) : devio_read_full(c->fd, buf, len);
}

static int nbd_sock_write(void *ctx, const void *buf, size_t len)
{
	struct nbd_conn *c = ctx;

	return c->tls ? devio_tls_write_full(c->tls, buf, len) : devio_write_full(c->fd, buf, len);
}

static int nbd_starttls(void *ctx)
{
	struct nbd_conn *c = ctx;

	return devio_tls_handshake(c->st->tls_creds, c->fd, true, NULL, c->peer, 0, &c->tls);
}

/* ---- connections ---- */

static void nbd_conn_wait_idle(struct nbd_conn *c)
{
	pthread_mutex_lock(&c->lock);
	c->corked = false;
	nbd_tx_flush_locked(c, true);
	while (c->inflight)
		pthread_cond_wait(&c->cond, &c->lock);
	c->closing = true;
	pthread_cond_signal(&c->tx_cond);
	pthread_mutex_unlock(&c->lock);
	if (c->has_sender)
		pthread_join(c->sender, NULL);
	c->has_sender = false;
}

static int nbd_socket_family(int fd)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);

	return getsockname(fd, (struct sockaddr *)&ss, &len) ? -1 : ss.ss_family;
}

static int nbd_conn_setup(struct nbd_conn *c)
{
	unsigned depth = c->st->depth;

	c->rx = malloc(NBD_RX_SIZE);
	c->slots = calloc(depth, sizeof(*c->slots));
	if (!c->rx || !c->slots)
		return -ENOMEM;
	for (unsigned i = 0; i < depth; i++) {
		c->slots[i].c = c;
		c->slots[i].next = c->free_slots;
		c->free_slots = &c->slots[i];
	}
	c->b = c->s.export->backend;
	c->in_place_writes = nbd_socket_family(c->fd) == AF_UNIX;
	nbd_pipe_setup(c);
	c->hold_backoff = 1;
	c->use_workers = c->st->workers && devio_wants_pool(c->b, c->st->srv->opts.threads);
	/* Without a sender thread (it could not start) completions send
	 * themselves, as inline ones do. */
	if (devio_backend_async(c->b) || c->use_workers)
		c->has_sender = pthread_create(&c->sender, NULL, nbd_sender_main, c) == 0;
	return 0;
}

static void nbd_conn_serve(struct nbd_conn *c)
{
	struct devio_nbd_io io = { nbd_sock_read, nbd_sock_write, c, c->peer, c->st->tls_mode, nbd_starttls };
	struct timeval tv = { 30, 0 }, none = { 0, 0 };
	int r;

	c->reader_tid = pthread_self();
	/* A client gets 30 s per read during the handshake (and a listener's
	 * connection --handshake-timeout for all of it). */
	setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	r = devio_nbd_negotiate(&io, c->st->srv, &c->s);
	setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof(none));
	if (!r)
		devio_listener_conn_ready(); /* a listener's: its idle and stall timeouts from now on */
	if (r) {
		devio_debug("nbd %s: negotiation ended: %s", c->peer, strerror(-r));
		return;
	}
	if ((r = nbd_conn_setup(c))) {
		devio_err("nbd %s: export '%s': %s", c->peer, c->s.export->name, strerror(-r));
		return;
	}
	devio_debug("nbd %s: export '%s' structured=%d", c->peer, c->s.export->name, c->s.structured);
	nbd_tx_cork(c);
	/* A client whose replies cannot be sent any more (--stall-timeout,
	 * a reset) is not read on: its requests would only be run for nobody. */
	do
		r = nbd_handle_one(c);
	while (r == 0 && !__atomic_load_n(&c->broken, __ATOMIC_RELAXED));
	if (r < 0 && r != -ECONNRESET)
		devio_debug("nbd %s: connection ends: %s", c->peer, strerror(-r));
	if (c->refused > NBD_LOG_REFUSED)
		devio_warn("nbd %s: %u requests refused on this connection, %u of them not logged", c->peer,
			   c->refused, c->refused - NBD_LOG_REFUSED);
	/* NBD_CMD_DISC or a vanished client: finish what is in flight. */
	nbd_conn_wait_idle(c);
	if (c->splice_writes || c->splice_reads) {
		close(c->pipe[0]);
		close(c->pipe[1]);
	}
}

static void nbd_conn_free(struct nbd_conn *c)
{
	if (c->broken)
		devio_tls_free(c->tls);
	else
		devio_tls_bye(c->tls);
	if (c->slots)
		for (unsigned i = 0; i < c->st->depth; i++)
			free(c->slots[i].buf);
	free(c->slots);
	free(c->rx);
	pthread_cond_destroy(&c->cond);
	pthread_cond_destroy(&c->tx_cond);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

/* Serve one connection on fd to its end on this thread (fd stays open). */
static void nbd_conn_run(struct nbd_state *st, int fd, const char *peer)
{
	struct nbd_conn *c = calloc(1, sizeof(*c));

	if (!c)
		return;
	c->st = st;
	c->fd = fd;
	snprintf(c->peer, sizeof(c->peer), "%s", peer);
	pthread_mutex_init(&c->lock, NULL);
	pthread_cond_init(&c->cond, NULL);
	pthread_cond_init(&c->tx_cond, NULL);
	nbd_conn_serve(c);
	nbd_conn_free(c);
}

void devio_nbd_serve_fd(struct devio_server *srv, int fd)
{
	struct nbd_state st = { .srv = srv, .depth = NBD_DEFAULT_DEPTH };
	char peer[32];

	snprintf(peer, sizeof(peer), "fd%d", fd);
	nbd_conn_run(&st, fd, peer);
}

/* One connection, on the listener's thread for it (which closes fd). */
static void nbd_serve_conn(void *ctx, int fd, uint64_t id)
{
	struct nbd_state *st = ctx;
	char peer[64];

	snprintf(peer, sizeof(peer), "%s#%llu", st->addr.kind == DEVIO_ADDR_UNIX ? "unix" : "tcp",
		 (unsigned long long)id);
	nbd_conn_run(st, fd, peer);
}

/* One pool for the server when the core's policy (devio_wants_pool) puts
 * any export's requests on one: a remote devio server's callbacks wait
 * for round trips; the RAM disk runs on the connection's reader thread,
 * which measured faster than a pool (fewer wake-ups; docs/nbd.md). */
static unsigned nbd_worker_count(const struct devio_server *srv)
{
	for (size_t i = 0; i < srv->n_exports; i++)
		if (devio_wants_pool(srv->exports[i].backend, srv->opts.threads))
			return devio_pool_size(srv->opts.threads);
	return 0;
}

static void nbd_state_free(struct nbd_state *st)
{
	devio_workers_free(st->workers);
	devio_tls_creds_free(st->tls_creds);
	free(st);
}

/* The --nbd front end's options (nbd_options below). */
struct nbd_opts {
	unsigned depth; /* --depth: requests in flight per connection, 0 = NBD_DEFAULT_DEPTH */
	struct devio_listen_opts listen; /* --allow, --socket-mode, timeouts: lib/listener.c */
	unsigned tls;   /* --tls: 0 not given, else 1 + enum devio_tls_mode */
	struct devio_tls_conf tls_conf; /* --tls-certificates, --tls-psk, --tls-verify-peer, --tls-priority */
};

static int nbd_opt_tls(const char *name, const char *val, void *field)
{
	static const char *const modes[] = { "off", "on", "require" };

	for (unsigned i = 0; val && i < 3; i++)
		if (!strcmp(val, modes[i])) {
			*(unsigned *)field = 1 + i;
			return 0;
		}
	devio_err("--%s: want off, on or require, got '%s'", name, val ? val : "");
	return -EINVAL;
}

/* --tls and the credentials: credentials alone mean require (as
 * qemu-nbd's --tls-creds); on/require without credentials is an error. */
static int nbd_tls_setup(struct nbd_state *st, const struct nbd_opts *o)
{
	bool creds = o && (o->tls_conf.certificates || o->tls_conf.psk_file);
	int r;

	st->tls_mode = !o || !o->tls ? (creds ? DEVIO_TLS_REQUIRE : DEVIO_TLS_OFF) : (int)o->tls - 1;
	if (st->tls_mode == DEVIO_TLS_OFF) {
		if (creds)
			devio_warn("nbd: --tls off: the TLS credentials given are not used");
		return 0;
	}
	if (!creds) {
		devio_err("--tls %s: give --tls-certificates DIR or --tls-psk FILE",
			  st->tls_mode == DEVIO_TLS_ON ? "on" : "require");
		return -EINVAL;
	}
	if ((r = devio_tls_creds_new(&o->tls_conf, true, &st->tls_creds)))
		return r;
	if (o->tls_conf.verify_peer && o->tls_conf.psk_file)
		devio_info("nbd: --tls-verify-peer: with PSK every client proves its key anyway");
	return 0;
}

static int nbd_listen(struct nbd_state *st, const struct nbd_opts *o)
{
	char name[320];
	struct devio_listener_conf conf = { .name = name, .max_conns = NBD_MAX_CONNS, .grace_ms = NBD_STOP_GRACE_MS,
					    .opts = o ? &o->listen : NULL, .serve = nbd_serve_conn, .ctx = st };

	snprintf(name, sizeof(name), "nbd %s", st->name);
	return devio_listener_start(&st->addr, &conf, &st->listener);
}

/* --nbd's argument: 0 or -EINVAL (said why). */
static int nbd_parse_addr(const char *arg, struct devio_addr *a)
{
	int r = devio_addr_parse(arg, NBD_DEFAULT_PORT, a);

	if (r || (a->kind != DEVIO_ADDR_TCP && a->kind != DEVIO_ADDR_UNIX && a->kind != DEVIO_ADDR_SYSTEMD)) {
		if (r == -ERANGE)
			devio_err("--nbd %s: port out of range (want 0..65535; 0: any free port)", arg);
		else
			devio_err("--nbd %s: want tcp:[HOST:]PORT, unix:PATH or systemd[:NAME]", arg);
		return -EINVAL;
	}
	return 0;
}

static int nbd_start(struct devio_server *srv, const char *arg, const void *opts, void **state)
{
	const struct nbd_opts *o = opts;
	struct nbd_state *st;
	int r;

	st = calloc(1, sizeof(*st));
	if (!st)
		return -ENOMEM;
	st->srv = srv;
	st->depth = o && o->depth ? o->depth : NBD_DEFAULT_DEPTH;
	if (st->depth > NBD_MAX_DEPTH)
		st->depth = NBD_MAX_DEPTH;
	r = nbd_parse_addr(arg, &st->addr);
	if (r)
		goto out_free;
	devio_addr_format(&st->addr, st->name, sizeof(st->name));
	if ((r = nbd_tls_setup(st, o)))
		goto out_free;
	if (nbd_worker_count(srv)) {
		st->workers = devio_workers_new(nbd_worker_count(srv));
		if (!st->workers) {
			r = -ENOMEM;
			goto out_free;
		}
	}
	if ((r = nbd_listen(st, o)))
		goto out_free;
	devio_info("nbd: serving %zu export%s on %s%s%s%s%s", srv->n_exports, srv->n_exports == 1 ? "" : "s", st->name,
		   st->tls_creds ? (st->tls_mode == DEVIO_TLS_REQUIRE ? ", TLS required, " : ", TLS offered, ") : "",
		   st->tls_creds ? devio_tls_creds_kind(st->tls_creds) : "", st->tls_creds ? ", " : "",
		   st->tls_creds ? devio_tls_ktls_state() : "");
	*state = st;
	return 0;
out_free:
	nbd_state_free(st);
	return r;
}

static void nbd_stop(void *state)
{
	struct nbd_state *st = state;

	if (!st)
		return;
	/* No new requests; what is in flight is answered (the spec's SHOULD)
	 * for up to NBD_STOP_GRACE_MS, then every connection is cut. */
	devio_listener_stop(st->listener);
	nbd_state_free(st);
}

static void nbd_status(void *state, FILE *out)
{
	struct nbd_state *st = state;
	struct devio_listener_stats ls;

	devio_listener_stats(st->listener, &ls);
	fprintf(out, "  nbd %s: %u connection%s, %llu served, %llu refused, %llu dropped by timeouts\n", st->name,
		ls.active, ls.active == 1 ? "" : "s", (unsigned long long)ls.served, (unsigned long long)ls.refused,
		(unsigned long long)ls.timed_out);
}

static int nbd_check(const char *arg)
{
	struct devio_addr a;

	return nbd_parse_addr(arg, &a);
}

static void nbd_info(void *state, struct devio_frontend_info *info)
{
	struct nbd_state *st = state;
	struct devio_listener_stats ls;
	struct devio_addr a = st->addr;

	devio_listener_stats(st->listener, &ls);
	if (a.kind == DEVIO_ADDR_TCP && ls.port) /* tcp:0: the port picked */
		snprintf(a.port, sizeof(a.port), "%u", ls.port);
	devio_addr_format(&a, info->address, sizeof(info->address));
	info->connections = ls.active;
	info->served = ls.served;
}

static const struct devio_frontend_option nbd_options[] = {
	{ "depth", "N", "requests in flight per connection (default 64, at most 1024)", devio_opt_uint,
	  offsetof(struct nbd_opts, depth) },
	{ "tls", "off|on|require", "NBD STARTTLS: require (the default with credentials) refuses clients without TLS",
	  nbd_opt_tls, offsetof(struct nbd_opts, tls) },
	DEVIO_TLS_OPTIONS(offsetof(struct nbd_opts, tls_conf), ""),
	DEVIO_LISTEN_OPTIONS(offsetof(struct nbd_opts, listen)),
	{ NULL },
};

const struct devio_frontend_type devio_frontend_nbd = {
	.option = "nbd",
	.arg_help = "tcp:[HOST:]PORT|unix:PATH|systemd[:NAME]",
	.help = "NBD, newstyle fixed (default port 10809)",
	.options = nbd_options,
	.opts_size = sizeof(struct nbd_opts),
	.start = nbd_start,
	.stop = nbd_stop,
	.status = nbd_status,
	.info = nbd_info,
	.check = nbd_check,
};
