/* frontend.h - how `devio serve` starts and stops its client ends.
 *
 * A front end (frontends/NAME.c) turns one wire format or kernel interface
 * into struct devio_request and back.  `devio serve` opens the exports,
 * starts every front end named on its command line (each runs on threads
 * of its own), waits for SIGINT/SIGTERM, then stops them in reverse order.
 * Each front end declares its own options and help in its registration
 * (struct devio_frontend_type); the command line is built from them.
 */
#ifndef DEVIO_FRONTEND_H
#define DEVIO_FRONTEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

struct devio_frontend_info;

struct devio_export {
	const char *name;             /* "" for the default export */
	const char *source;           /* as given on the command line */
	struct devio_backend *backend;
};

/* Serving options: the core's run policy, the same for every front end
 * (docs/design.md, "Options").  A front end's own options (--loop,
 * --depth, ...) live in its own struct, declared by its options table. */
struct devio_serve_opts {
	unsigned threads;      /* --threads: the core's worker pool, 0 = default */
};

struct devio_server {
	struct devio_export *exports; /* exports[0] is the default */
	size_t n_exports;
	struct devio_serve_opts opts;
};

/* Look up an export by name ("" = the default); NULL if none. */
struct devio_export *devio_server_export(struct devio_server *srv, const char *name);

/* One option a front end declares: --NAME [ARG].  Several front ends may
 * declare the same NAME (--depth): a value given once goes to each of
 * them.  parse() stores val (NULL for a flag) into the field at offset in
 * the front end's options struct; it returns 0 or -EINVAL, logged with the
 * option's name.  devio_opt_flag and friends below fit most options. */
struct devio_frontend_option {
	const char *name;     /* without "--" */
	const char *arg;      /* the argument in the help ("N", "auto|uring|dev"); NULL: a flag */
	const char *help;     /* one line */
	int (*parse)(const char *name, const char *val, void *field);
	size_t offset;        /* of the field in the options struct */
	bool arg_optional;    /* --NAME or --NAME=ARG (parse() gets NULL for the first) */
};

struct devio_frontend_type {
	const char *option;   /* the serve option that starts it: "devio", "nbd", ... */
	const char *arg_help; /* e.g. "tcp:[HOST:]PORT|unix:PATH|stdio|DEVICE" */
	bool arg_optional;    /* --ublk or --ublk=ARG */
	const char *help;     /* one line for the usage */
	/* Its options ({ NULL }-terminated; NULL if none) and the size of the
	 * struct they are parsed into; all zero means every default. */
	const struct devio_frontend_option *options;
	size_t opts_size;
	/* Start serving srv at arg with opts (its own options struct, NULL =
	 * defaults); threads of its own; 0 or -errno (logged). */
	int (*start)(struct devio_server *srv, const char *arg, const void *opts, void **state);
	/* Stop: no new clients, finish or fail what is in flight, join threads,
	 * release kernel objects (unmount, detach, delete device). */
	void (*stop)(void *state);
	/* Lines for `devio status` (transport in use, clients, devices). */
	void (*status)(void *state, FILE *out);
	/* Optional: check arg as start() would, with no side effect, while the
	 * command line is read (a bad one is a usage error); 0 or -EINVAL
	 * (logged). */
	int (*check)(const char *arg);
	/* Optional: what `devio status --json` shows of it (info comes zeroed,
	 * connections -1). */
	void (*info)(void *state, struct devio_frontend_info *info);
	/* Optional: returns true once the front end has nothing left to serve
	 * (e.g. a stdio stream whose peer sent CLOSE); serve then exits. */
	bool (*finished)(void *state);
	/* Optional: the front end that serves this argument of the option, when
	 * another one shares it (--devio shm:NAME is the shm front end's);
	 * that one then starts with this type's options struct (the shm front
	 * end reads the --devio listener options at its start). */
	const struct devio_frontend_type *(*variant)(const char *arg);
	/* Optional: whether this argument of the option makes use of name,
	 * one of the options the type declares (--devio takes the TLS
	 * options, and only its tls: addresses use them).  Without it every
	 * option it declares is used.  An option that no front end on the
	 * command line uses is warned about as having no effect. */
	bool (*uses)(const char *arg, const char *name);
	/* Optional: a hand-over (SIGUSR2, `devio detach --handover`): make
	 * ready to stop so that a new server can take the kernel object over
	 * with no error seen by its users (ublk --recovery: quiesce the device;
	 * stop() then leaves it in place).  0: stop() follows; -errno: refused
	 * (logged), serving goes on.  A server hands over only when every
	 * front end it runs has this. */
	int (*handover)(void *state);
};

/* A running front end for `devio status`: where clients reach it and
 * what it made on this machine; "" where it has none. */
struct devio_frontend_info {
	char address[320];        /* "tcp:127.0.0.1:10809", "unix:/run/x.sock", "shm:/NAME" */
	char device[4400];        /* /dev/loopN, /dev/ublkbN, the FUSE file */
	char mount[4096];         /* a FUSE mount point */
	long connections;         /* clients connected now; -1: not a server of clients */
	unsigned long long served; /* connections served so far */
};

/* Every front end, in the order of the usage; NULL-terminated.  Adding a
 * front end: its file, plus one line in frontends/registry.c. */
extern const struct devio_frontend_type *const devio_frontends[];

/* The front end started by --option; NULL if none. */
const struct devio_frontend_type *devio_frontend_find(const char *option);

/* parse() callbacks for struct devio_frontend_option: a flag (bool), a
 * count 0..1048576 (unsigned, 0 = the default), a block size (uint32_t, a
 * power of two from 512 to 64K), a string (const char *, pointing at the
 * argument: the command line outlives the server). */
int devio_opt_flag(const char *name, const char *val, void *field);
int devio_opt_string(const char *name, const char *val, void *field);
int devio_opt_uint(const char *name, const char *val, void *field);
int devio_opt_block_size(const char *name, const char *val, void *field);

extern const struct devio_frontend_type devio_frontend_stream; /* --devio */
extern const struct devio_frontend_type devio_frontend_nbd;    /* --nbd   */
extern const struct devio_frontend_type devio_frontend_fuse;   /* --fuse  */
extern const struct devio_frontend_type devio_frontend_ublk;   /* --ublk  */
extern const struct devio_frontend_type devio_frontend_shm;    /* --devio shm:NAME */

#ifdef __cplusplus
}
#endif
#endif
