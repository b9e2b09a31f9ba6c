/* stream.h - one session of the devio stream protocol on a pair of file
 * descriptors (frontends/stream.c).  The --devio front end runs one per
 * connection; the fuzz target and tests call it directly on any byte
 * stream.  Every byte read is untrusted: lengths are bounded by
 * max_transfer and DEVIO_MAX_RANGES_BYTES before anything is allocated. */
#ifndef DEVIO_STREAM_H
#define DEVIO_STREAM_H

#include <stdint.h>
#include "backend.h"
#include "request.h"

#ifdef __cplusplus
extern "C" {
#endif

struct devio_tls;

struct devio_stream_opts {
	uint32_t max_transfer;  /* largest READ/WRITE served; 0 = DEVIO_MAX_TRANSFER */
	uint32_t alignment;     /* req_alignment reported and enforced; 0 = report the backend's block size, enforce none */
	int stop_fd;            /* readable = stop the session (-1: none; sockets use shutdown()) */
	const char *name;       /* peer name for log messages */
	struct devio_tls *tls;  /* set (rfd == wfd, handshake done): every byte through TLS (lib/tls.c) */
};

/* Serve requests read from rfd, answering on wfd, until CLOSE, EOF or a
 * transport error.  Returns 0 after CLOSE or EOF between requests,
 * -ECONNRESET if the peer vanished mid-request, -EPROTO if the stream can
 * no longer be followed (e.g. a WRITE longer than max_transfer, answered
 * with an error first), another -errno for a transport error. */
int devio_stream_session(struct devio_backend *b, int rfd, int wfd, const struct devio_stream_opts *opts);

#ifdef __cplusplus
}
#endif
#endif
