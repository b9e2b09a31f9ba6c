/* listener.h - the accept loop of the socket front ends (--devio and
 * --nbd, lib/listener.c): a listening TCP or Unix socket, one thread per
 * connection, a cap on connections served at once, a pause instead of a
 * spin when accept() runs out of descriptors, a graceful stop, and the
 * Unix socket file removed when it is still ours.
 *
 * What a connection speaks is the front end's: serve() runs on the
 * connection's own thread and the listener closes the socket after it
 * returns.  Refusals and accept failures are logged rate-limited (the 1st,
 * 2nd, 4th, 8th, ... of each), so a client reconnecting in a loop or a
 * process out of descriptors cannot flood the log.
 */
#ifndef DEVIO_LISTENER_H
#define DEVIO_LISTENER_H

#include <stdint.h>
#include "util.h"

#ifdef __cplusplus
extern "C" {
#endif

struct devio_listener;

struct devio_listener_conf {
	const char *name;     /* for messages: "--devio tcp:127.0.0.1:9000" */
	unsigned max_conns;   /* served at once; more are accepted and closed at once */
	unsigned grace_ms;    /* stop: time connections get to finish once their input is shut */
	/* Serve one connection (id counts from 1) on its own thread. */
	void (*serve)(void *ctx, int fd, uint64_t id);
	void *ctx;
};

struct devio_listener_stats {
	unsigned active;      /* connections being served now */
	uint64_t served;      /* connections accepted and served so far */
	uint64_t refused;     /* connections closed at once: over the cap or stopping */
	uint16_t port;        /* TCP: the port it listens on (the one picked for port 0); else 0 */
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

#ifdef __cplusplus
}
#endif
#endif
