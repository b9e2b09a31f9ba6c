/* listener.h - the accept loop of the socket front ends (--devio and
 * --nbd, lib/listener.c): a listening TCP or Unix socket, one thread per
 * connection, a cap on connections served at once, a pause instead of a
 * spin when accept() runs out of descriptors, a graceful stop, and the
 * Unix socket file removed when it is still ours.  Access and limits
 * (docs/security.md): --allow checked on the peer address right after
 * accept, before a byte is read; the Unix socket created 0600 (or
 * --socket-mode/--socket-group) whatever the umask; a handshake deadline,
 * idle and stall timeouts per connection.
 *
 * What a connection speaks is the front end's: serve() runs on the
 * connection's own thread and the listener closes the socket after it
 * returns.  Refusals and accept failures are logged rate-limited (the 1st,
 * 2nd, 4th, 8th, ... of each), so a client reconnecting in a loop or a
 * process out of descriptors cannot flood the log.
 */
#ifndef DEVIO_LISTENER_H
#define DEVIO_LISTENER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include "access.h"
#include "util.h"

#ifdef __cplusplus
extern "C" {
#endif

struct devio_listener;

/* The options every socket front end (--devio, --nbd) takes for its
 * listener (docs/security.md).  All zero: the defaults below. */
struct devio_listen_opts {
	struct devio_allow allow[DEVIO_ALLOW_MAX]; /* --allow (TCP): none = everyone */
	unsigned n_allow;
	unsigned socket_mode;      /* --socket-mode: the Unix socket's, 0 = 0600 */
	bool has_group;            /* --socket-group */
	gid_t group;
	unsigned max_conns;        /* --max-connections, 0 = the front end's default */
	/* seconds; *_set tells an explicit 0 (off) from the default */
	unsigned handshake_timeout; /* until the front end calls devio_listener_conn_ready() */
	unsigned idle_timeout;      /* nothing received between requests; default off */
	unsigned stall_timeout;     /* stuck mid-request, or replies not taken */
	bool handshake_set, stall_set;
};

#define DEVIO_LISTEN_HANDSHAKE_S 10     /* default --handshake-timeout */
#define DEVIO_LISTEN_STALL_TCP_S 300    /* default --stall-timeout on TCP (Unix: off) */

/* The listener options as entries of a front end's options table, parsed
 * into the struct devio_listen_opts at offset in its options struct:
 *   DEVIO_LISTEN_OPTIONS(offsetof(struct nbd_opts, listen)), */
int devio_listen_opt(const char *name, const char *val, void *field);
#define DEVIO_LISTEN_OPTIONS(off) \
	{ "allow", "ADDR[/PREFIX]", "TCP: admit only these peers (repeatable; default: everyone who reaches the port)", \
	  devio_listen_opt, (off) }, \
	{ "socket-mode", "MODE", "Unix socket file's mode, octal (default 0600, whatever the umask)", \
	  devio_listen_opt, (off) }, \
	{ "socket-group", "GROUP", "Unix socket file's group (name or number)", devio_listen_opt, (off) }, \
	{ "max-connections", "N", "clients served at once; more are closed at once (--devio: 64, --nbd: 128)", \
	  devio_listen_opt, (off) }, \
	{ "handshake-timeout", "SECONDS", "drop a client that has not negotiated (NBD) or sent a whole first " \
	  "request (devio) by then (default 10, 0 = never)", devio_listen_opt, (off) }, \
	{ "idle-timeout", "SECONDS", "drop a client that sends nothing between requests this long (default: never)", \
	  devio_listen_opt, (off) }, \
	{ "stall-timeout", "SECONDS", "drop a client stuck this long mid-request or not taking its replies " \
	  "(default 300 on TCP, 0 = never; never on Unix sockets)", devio_listen_opt, (off) }

struct devio_listener_conf {
	const char *name;     /* for messages: "--devio tcp:127.0.0.1:9000" */
	unsigned max_conns;   /* served at once; more are accepted and closed at once */
	unsigned grace_ms;    /* stop: time connections get to finish once their input is shut */
	const struct devio_listen_opts *opts; /* NULL: every default; copied */
	/* Serve one connection (id counts from 1) on its own thread. */
	void (*serve)(void *ctx, int fd, uint64_t id);
	void *ctx;
};

struct devio_listener_stats {
	unsigned active;      /* connections being served now */
	uint64_t served;      /* connections accepted and served so far */
	uint16_t port;        /* TCP: the port it listens on (the one picked for port 0); else 0 */
	uint64_t refused;     /* connections closed at once: over the cap, not --allow'ed, or stopping */
	uint64_t timed_out;   /* connections dropped by the handshake, idle or stall timeout */
};

/* Listen on a (TCP or Unix; a Unix socket appears at its path only once
 * it accepts) and start the accept thread.  0, or -errno after logging. */
int devio_listener_start(const struct devio_addr *a, const struct devio_listener_conf *conf,
			 struct devio_listener **out);

/* Stop accepting and remove the Unix socket (if it is still ours); shut
 * the input of every connection so its session ends after the request it
 * is in, give them grace_ms, then shut them down entirely; wait for every
 * connection thread and free the listener. */
void devio_listener_stop(struct devio_listener *l);

void devio_listener_stats(struct devio_listener *l, struct devio_listener_stats *out);

/* On a connection's own thread (serve()); no-ops on any other thread.
 * conn_ready: the handshake is over (NBD: negotiated; devio: a first
 * request served): the handshake deadline ends and the idle/stall
 * timeouts start (SO_RCVTIMEO and SO_SNDTIMEO on the socket).
 * conn_wait_more: a receive timed out (EAGAIN); between says whether it
 * was between requests.  True: keep waiting (an idle client, and no
 * --idle-timeout reached); false: drop the client (logged, rate-limited). */
void devio_listener_conn_ready(void);
bool devio_listener_conn_wait_more(bool between);

#ifdef __cplusplus
}
#endif
#endif
