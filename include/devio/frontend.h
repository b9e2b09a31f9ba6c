/* frontend.h - how `devio serve` starts and stops its client ends.
 *
 * A front end (frontends/NAME.c) turns one wire format or kernel interface
 * into struct devio_request and back.  `devio serve` opens the exports,
 * starts every front end named on its command line (each runs on threads
 * of its own), waits for SIGINT/SIGTERM, then stops them in reverse order.
 */
#ifndef DEVIO_FRONTEND_H
#define DEVIO_FRONTEND_H

#include <stdbool.h>
#include <stdio.h>
#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

struct devio_export {
	const char *name;             /* "" for the default export */
	const char *source;           /* as given on the command line */
	struct devio_backend *backend;
};

/* Options of `devio serve` that front ends read. */
struct devio_serve_opts {
	bool all_interfaces;   /* ImDisk drop-in: listen on every interface */
	bool loop;             /* --loop: attach a loop device to the FUSE file */
	unsigned queues;       /* --queues: 0 = one per CPU */
	unsigned depth;        /* --depth: requests in flight per queue, 0 = default */
	unsigned threads;      /* --threads: worker threads, 0 = default */
	uint32_t block_size;   /* --block-size: logical block size, 0 = default */
	const char *fuse_transport; /* --fuse-transport auto|uring|dev */
};

struct devio_server {
	struct devio_export *exports; /* exports[0] is the default */
	size_t n_exports;
	struct devio_serve_opts opts;
};

/* Look up an export by name ("" = the default); NULL if none. */
struct devio_export *devio_server_export(struct devio_server *srv, const char *name);

struct devio_frontend_type {
	const char *option;   /* the serve option that starts it: "devio", "nbd", ... */
	const char *arg_help; /* e.g. "tcp:[HOST:]PORT|unix:PATH|stdio|DEVICE" */
	/* Start serving srv at arg; threads of its own; 0 or -errno (logged). */
	int (*start)(struct devio_server *srv, const char *arg, void **state);
	/* Stop: no new clients, finish or fail what is in flight, join threads,
	 * release kernel objects (unmount, detach, delete device). */
	void (*stop)(void *state);
	/* Lines for `devio status` (transport in use, clients, devices). */
	void (*status)(void *state, FILE *out);
	/* Optional: returns true once the front end has nothing left to serve
	 * (e.g. a stdio stream whose peer sent CLOSE); serve then exits. */
	bool (*finished)(void *state);
};

extern const struct devio_frontend_type devio_frontend_stream; /* --devio */
extern const struct devio_frontend_type devio_frontend_nbd;    /* --nbd   */
extern const struct devio_frontend_type devio_frontend_fuse;   /* --fuse  */
extern const struct devio_frontend_type devio_frontend_ublk;   /* --ublk  */
extern const struct devio_frontend_type devio_frontend_shm;    /* --devio shm:NAME */

#ifdef __cplusplus
}
#endif
#endif
