/* nbd_client.h - the client end of NBD, shared by the nbd:// backend
 * (backends/nbd_remote.c), `devio attach --nbd-device` (cli/attach_nbd.c)
 * and the fuzz targets: NBD URIs (lib/nbd_uri.c, NetworkBlockDevice/nbd
 * doc/uri.md) and the handshake up to the transmission phase
 * (lib/nbd_client.c).  The transmission phase is the caller's: the
 * backend pipelines requests itself, the kernel gets the socket.
 */
#ifndef DEVIO_NBD_CLIENT_H
#define DEVIO_NBD_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "devio/tls.h"
#include "devio/util.h"

/* Longest export name sent (the protocol's limit is 4096 bytes). */
#define NBD_MAX_EXPORT_NAME 4096
/* Default bound on the whole handshake, in seconds. */
#define NBD_CLIENT_TIMEOUT_S 30

/* ---- URIs ---- */

/* What an NBD URI names: where to connect, which export, and for
 * nbds:// the TLS credentials (empty strings: not given). */
struct devio_nbd_uri {
	struct devio_addr addr;                 /* DEVIO_ADDR_TCP or DEVIO_ADDR_UNIX */
	char export[NBD_MAX_EXPORT_NAME + 1];
	bool tls;                               /* nbds:// or nbds+unix:// */
	char tls_certificates[4096];            /* tls-certificates=DIR */
	char tls_psk_file[4096];                /* tls-psk-file=FILE */
	char tls_username[256];                 /* tls-username=NAME or USER@ */
};

/* Does s start with an NBD scheme (nbd, nbds, nbd+X, nbds+X) and "://"?
 * Such a string is never a file name: it is an NBD URI, good or bad. */
bool devio_nbd_uri_is_nbd(const char *s);

/* Percent-decode [s, s+n), the part of a URI called what, into out (NUL-
 * terminated; a %00 and bytes that must be encoded are refused): 0, or
 * -EINVAL/-ENAMETOOLONG with why saying what is wrong.  devio+tls://
 * (backends/devio_remote.c) decodes its parameters with it too. */
int devio_uri_decode(const char *what, const char *s, size_t n, char *out, size_t outlen, char *why, size_t whylen);

/* Parse nbd[s]://[USER@]HOST[:PORT][/EXPORT] or
 * nbd[s]+unix:///EXPORT?socket=PATH (IPv6 hosts in brackets,
 * percent-encoding anywhere; tls-* parameters on nbds only).  Returns 0,
 * -EPROTONOSUPPORT for a scheme this build cannot serve (vsock),
 * -ENAMETOOLONG, or -EINVAL; on an error why (if not NULL) says what is
 * wrong, for a human. */
int devio_nbd_uri_parse(const char *uri, struct devio_nbd_uri *out, char *why, size_t whylen);

/* ---- handshake ---- */

struct devio_nbd_client_opts {
	const char *export;     /* "" is the default export */
	const char *name;       /* for messages: the URI */
	bool structured;        /* ask for structured replies ... */
	bool base_allocation;   /* ... and the base:allocation context */
	unsigned timeout_s;     /* bound on the whole handshake; 0 = NBD_CLIENT_TIMEOUT_S */
	/* TLS: with tls set, NBD_OPT_STARTTLS first (a server without it is
	 * refused), the server's certificate checked against tls_hostname;
	 * the session goes to *tls_out.  devio_nbd_client_connect sets these
	 * from an nbds:// URI when tls_out is given, and refuses one if not. */
	struct devio_tls_creds *tls;
	const char *tls_hostname;
	struct devio_tls **tls_out;
};

/* What the server said about the export. */
struct devio_nbd_client_info {
	uint64_t size;
	uint16_t tflags;        /* transmission flags */
	uint32_t min_block;     /* a power of two up to 64 KiB; 1 if none given */
	uint32_t pref_block;    /* a power of two >= min_block, or 0 if none given */
	uint32_t max_block;     /* >= min_block, or 0 if none given */
	bool structured;        /* structured replies acknowledged */
	bool base_allocation;   /* base:allocation selected ... */
	uint32_t meta_id;       /* ... with this context id */
	bool go;                /* NBD_OPT_GO (else NBD_OPT_EXPORT_NAME) entered transmission */
};

/* Run the handshake on a connected socket: fixed newstyle (or plain
 * newstyle with NBD_OPT_EXPORT_NAME only), optional structured replies
 * and base:allocation, NBD_OPT_GO asking for the block sizes, falling
 * back to NBD_OPT_EXPORT_NAME for a server without GO.  Every byte from
 * the server is checked; the whole handshake gets opts->timeout_s.
 * Returns 0 with the socket in the transmission phase and *info filled,
 * or a negative errno after logging why (-ENOENT: no such export,
 * -ETIMEDOUT, -EPROTO, ...). */
int devio_nbd_client_handshake(int fd, const struct devio_nbd_client_opts *opts,
			       struct devio_nbd_client_info *info);

/* Connect to u and run the handshake (opts->export is u->export if NULL).
 * Returns the socket, blocking and without timeouts, or a negative
 * errno after logging why.  For an nbds:// URI the credentials come from
 * it and the session, which owns them, goes to *opts->tls_out: every
 * byte of the transmission phase goes through it. */
int devio_nbd_client_connect(const struct devio_nbd_uri *u, const struct devio_nbd_client_opts *opts,
			     struct devio_nbd_client_info *info);

/* NBD_OPT_LIST on a connected socket: fn(ctx, name, description) for
 * each export the server names (fn returns 0 to go on), then
 * NBD_OPT_ABORT.  Every reply is checked and bounded; the whole exchange
 * gets timeout_s (0 = NBD_CLIENT_TIMEOUT_S).  0, -ENOTSUP (the server
 * does not list: said why), or another negative errno after logging why. */
int devio_nbd_client_list(int fd, const char *name, unsigned timeout_s,
			  int (*fn)(void *ctx, const char *name, const char *desc), void *ctx);
/* The same for a URI: connects, and for nbds:// lists after STARTTLS
 * with the URI's credentials (the server's certificate checked). */
int devio_nbd_client_list_uri(const struct devio_nbd_uri *u, const char *name, unsigned timeout_s,
			      int (*fn)(void *ctx, const char *name, const char *desc), void *ctx);

#endif
