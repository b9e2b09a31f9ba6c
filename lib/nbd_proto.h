/* nbd_proto.h - constants of the NBD protocol (NetworkBlockDevice/nbd
 * doc/proto.md) and the codec shared by the --nbd front end, the NBD
 * client backend and the fuzz targets.
 *
 * Every NBD field is big-endian.  The codec works on byte buffers and on
 * a small read/write callback pair (struct devio_nbd_io) so that the
 * negotiation can run on a socket or, in the fuzzers, on a byte string.
 */
#ifndef DEVIO_NBD_PROTO_H
#define DEVIO_NBD_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "devio/frontend.h"

/* Magic numbers. */
#define NBD_MAGIC                  0x4e42444d41474943ull /* "NBDMAGIC" */
#define NBD_OPTS_MAGIC             0x49484156454f5054ull /* "IHAVEOPT" */
#define NBD_REP_MAGIC              0x0003e889045565a9ull
#define NBD_REQUEST_MAGIC          0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC     0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu

/* Handshake flags (server) and client flags. */
#define NBD_FLAG_FIXED_NEWSTYLE   (1u << 0)
#define NBD_FLAG_NO_ZEROES        (1u << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_C_NO_ZEROES      (1u << 1)

/* Transmission flags. */
#define NBD_FLAG_HAS_FLAGS         (1u << 0)
#define NBD_FLAG_READ_ONLY         (1u << 1)
#define NBD_FLAG_SEND_FLUSH        (1u << 2)
#define NBD_FLAG_SEND_FUA          (1u << 3)
#define NBD_FLAG_ROTATIONAL        (1u << 4)
#define NBD_FLAG_SEND_TRIM         (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define NBD_FLAG_SEND_DF           (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN    (1u << 8)
#define NBD_FLAG_SEND_RESIZE       (1u << 9)
#define NBD_FLAG_SEND_CACHE        (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO    (1u << 11)

/* Options. */
#define NBD_OPT_EXPORT_NAME       1
#define NBD_OPT_ABORT             2
#define NBD_OPT_LIST              3
#define NBD_OPT_STARTTLS          5
#define NBD_OPT_INFO              6
#define NBD_OPT_GO                7
#define NBD_OPT_STRUCTURED_REPLY  8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT  10
#define NBD_OPT_EXTENDED_HEADERS  11

/* Option replies. */
#define NBD_REP_ACK          1u
#define NBD_REP_SERVER       2u
#define NBD_REP_INFO         3u
#define NBD_REP_META_CONTEXT 4u
#define NBD_REP_ERR(n)       ((1u << 31) + (n))
#define NBD_REP_ERR_UNSUP           NBD_REP_ERR(1)
#define NBD_REP_ERR_POLICY          NBD_REP_ERR(2)
#define NBD_REP_ERR_INVALID         NBD_REP_ERR(3)
#define NBD_REP_ERR_PLATFORM        NBD_REP_ERR(4)
#define NBD_REP_ERR_TLS_REQD        NBD_REP_ERR(5)
#define NBD_REP_ERR_UNKNOWN         NBD_REP_ERR(6)
#define NBD_REP_ERR_SHUTDOWN        NBD_REP_ERR(7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD NBD_REP_ERR(8)
#define NBD_REP_ERR_TOO_BIG         NBD_REP_ERR(9)

/* NBD_REP_INFO types. */
#define NBD_INFO_EXPORT      0
#define NBD_INFO_NAME        1
#define NBD_INFO_DESCRIPTION 2
#define NBD_INFO_BLOCK_SIZE  3

/* Commands and command flags. */
#define NBD_CMD_READ         0
#define NBD_CMD_WRITE        1
#define NBD_CMD_DISC         2
#define NBD_CMD_FLUSH        3
#define NBD_CMD_TRIM         4
#define NBD_CMD_CACHE        5
#define NBD_CMD_WRITE_ZEROES 6
#define NBD_CMD_BLOCK_STATUS 7

#define NBD_CMD_FLAG_FUA       (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE   (1u << 1)
#define NBD_CMD_FLAG_DF        (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE   (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO (1u << 4)

/* Structured reply flags and chunk types. */
#define NBD_REPLY_FLAG_DONE          (1u << 0)
#define NBD_REPLY_TYPE_NONE          0
#define NBD_REPLY_TYPE_OFFSET_DATA   1
#define NBD_REPLY_TYPE_OFFSET_HOLE   2
#define NBD_REPLY_TYPE_BLOCK_STATUS  5
#define NBD_REPLY_TYPE_ERROR         ((1u << 15) + 1)
#define NBD_REPLY_TYPE_ERROR_OFFSET  ((1u << 15) + 2)

/* base:allocation flags. */
#define NBD_STATE_HOLE (1u << 0)
#define NBD_STATE_ZERO (1u << 1)

/* Error values on the wire. */
#define NBD_EPERM     1
#define NBD_EIO       5
#define NBD_ENOMEM    12
#define NBD_EINVAL    22
#define NBD_ENOSPC    28
#define NBD_EOVERFLOW 75
#define NBD_ENOTSUP   95
#define NBD_ESHUTDOWN 108

#define NBD_DEFAULT_PORT "10809"
#define NBD_REQUEST_SIZE 28u
#define NBD_SIMPLE_REPLY_SIZE 16u
#define NBD_CHUNK_HEADER_SIZE 20u
#define NBD_OPTION_HEADER_SIZE 16u
#define NBD_OPTION_REPLY_HEADER_SIZE 20u
/* Largest option payload we read into memory.  A larger one is read and
 * thrown away: an option we do not implement is then answered ERR_UNSUP
 * whatever its length, one we implement ERR_TOO_BIG up to
 * NBD_MAX_OPTION_SKIP, beyond which the peer is dropped. */
#define NBD_MAX_OPTION_LEN  (64u << 10)
#define NBD_MAX_OPTION_SKIP (32u << 20)
/* READ/WRITE lengths served, whatever the backend's max_io (the front end
 * splits): NBD_MAX_BLOCK is the maximum block size advertised in
 * NBD_INFO_BLOCK_SIZE and the limit for a client that asked for it in its
 * NBD_OPT_GO (it promised to keep to it); a client that did not (or used
 * NBD_OPT_EXPORT_NAME) never learned a limit and is served up to
 * NBD_MAX_PAYLOAD, as nbdkit does. */
#define NBD_MAX_BLOCK       (32u << 20)
#define NBD_MAX_PAYLOAD     (64u << 20)
/* Options a client may send before it must choose an export. */
#define NBD_MAX_OPTIONS     4096
/* The metadata context id of base:allocation. */
#define NBD_META_ID_BASE_ALLOCATION 1u

/* Big-endian helpers. */
static inline uint16_t nbd_get16(const void *p)
{
	const uint8_t *b = p;
	return (uint16_t)((unsigned)b[0] << 8 | b[1]);
}
static inline uint32_t nbd_get32(const void *p)
{
	const uint8_t *b = p;
	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}
static inline uint64_t nbd_get64(const void *p)
{
	return (uint64_t)nbd_get32(p) << 32 | nbd_get32((const uint8_t *)p + 4);
}
static inline void nbd_put16(void *p, uint16_t v)
{
	uint8_t *b = p;
	b[0] = (uint8_t)(v >> 8);
	b[1] = (uint8_t)v;
}
static inline void nbd_put32(void *p, uint32_t v)
{
	uint8_t *b = p;
	b[0] = (uint8_t)(v >> 24);
	b[1] = (uint8_t)(v >> 16);
	b[2] = (uint8_t)(v >> 8);
	b[3] = (uint8_t)v;
}
static inline void nbd_put64(void *p, uint64_t v)
{
	nbd_put32(p, (uint32_t)(v >> 32));
	nbd_put32((uint8_t *)p + 4, (uint32_t)v);
}

/* Full-length transfers for the negotiation: 0, or -errno / -ECONNRESET. */
struct devio_nbd_io {
	int (*read)(void *ctx, void *buf, size_t len);
	int (*write)(void *ctx, const void *buf, size_t len);
	void *ctx;
	const char *peer; /* for messages */
	/* TLS (enum devio_tls_mode): off answers STARTTLS with ERR_UNSUP;
	 * on offers it; require answers every option but STARTTLS and ABORT
	 * with ERR_TLS_REQD until TLS is up.  starttls runs the handshake
	 * after the ACK and switches read and write to the session. */
	int tls_mode;
	int (*starttls)(void *ctx);
};

/* What the negotiation agreed for one connection. */
struct devio_nbd_session {
	struct devio_export *export;
	bool structured;        /* NBD_OPT_STRUCTURED_REPLY acknowledged */
	bool base_allocation;   /* base:allocation selected for this export */
	uint16_t tflags;        /* transmission flags sent */
	uint32_t max_payload;   /* longest READ/WRITE: NBD_MAX_BLOCK or NBD_MAX_PAYLOAD */
};

/* Transmission flags for a backend (structured: replies negotiated). */
uint16_t devio_nbd_tflags(const struct devio_backend *b, bool structured);

/* Server side of the fixed newstyle handshake on io: greeting, options,
 * until the client chooses an export (0, *out filled) or aborts / breaks
 * the protocol / disconnects (negative errno, logged at debug level
 * unless it is the peer's fault, then as a warning). */
int devio_nbd_negotiate(struct devio_nbd_io *io, struct devio_server *srv, struct devio_nbd_session *out);

/* One decoded transmission request. */
struct devio_nbd_request {
	uint16_t flags, type;
	uint64_t cookie, offset;
	uint32_t length;
};

/* Decode the 28-byte request header; -EPROTO on a bad magic. */
int devio_nbd_decode_request(const uint8_t *hdr, struct devio_nbd_request *r);
/* Encode one (the client's side of the same layout). */
void devio_nbd_encode_request(uint8_t hdr[NBD_REQUEST_SIZE], const struct devio_nbd_request *r);

/* Option headers (client to server) and option reply headers (server to
 * client), both ends of the negotiation.  The decoders return -EPROTO on
 * a bad magic (or, for a reply, an option other than the one asked). */
void devio_nbd_encode_option(uint8_t hdr[NBD_OPTION_HEADER_SIZE], uint32_t opt, uint32_t len);
int devio_nbd_decode_option(const uint8_t hdr[NBD_OPTION_HEADER_SIZE], uint32_t *opt, uint32_t *len);
void devio_nbd_encode_option_reply(uint8_t hdr[NBD_OPTION_REPLY_HEADER_SIZE], uint32_t opt, uint32_t type,
				   uint32_t len);
int devio_nbd_decode_option_reply(const uint8_t hdr[NBD_OPTION_REPLY_HEADER_SIZE], uint32_t opt, uint32_t *type,
				  uint32_t *len);
/* Check a decoded request against the session: 0 or the NBD error value
 * to answer with (NBD_EINVAL, NBD_EPERM, NBD_ENOSPC, NBD_EOVERFLOW).  On
 * an error, why (if not NULL) gets the rule that refused it, for a human:
 * "NBD_CMD 9 unknown", "write to a read-only export", ... */
uint32_t devio_nbd_check_request(const struct devio_nbd_session *s, const struct devio_nbd_request *r,
				 char *why, size_t whylen);
/* "NBD_CMD_READ" ..., or NULL for a command this codec does not know. */
const char *devio_nbd_cmd_name(uint16_t type);
/* "EINVAL" ... for an NBD error value ("EIO" for any other). */
const char *devio_nbd_error_name(uint32_t err);
/* Map a negative errno from a backend to an NBD error value, and an NBD
 * error value from the wire back to a negative errno (unknown ones: EIO). */
uint32_t devio_nbd_errno(int err);
int devio_nbd_to_errno(uint32_t err);

/* Serve one already-connected client on fd (negotiation, then requests
 * until it leaves) on the calling thread, as the --nbd front end does for
 * every connection; fd is not closed.  For the fuzzers and tests. */
void devio_nbd_serve_fd(struct devio_server *srv, int fd);

#endif
