/* protocol.h - the devio stream protocol, once for both ends: constants,
 * the layout of every request and answer, their encoders and decoders and
 * the checks on what a peer sends (lib/devio_codec.c).  The server is
 * frontends/stream.c, the client backends/devio_remote.c.
 *
 * Wire-compatible with ImDisk's proxy devices and its `devio` server
 * (docs/devio-protocol.md): every field is a 64-bit little-endian integer.
 * The decoder functions take untrusted bytes and never trust a length.
 */
#ifndef DEVIO_PROTOCOL_H
#define DEVIO_PROTOCOL_H

#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

enum devio_req_code {
	DEVIO_REQ_NULL = 0,
	DEVIO_REQ_INFO = 1,
	DEVIO_REQ_READ = 2,
	DEVIO_REQ_WRITE = 3,
	DEVIO_REQ_CONNECT = 4,
	DEVIO_REQ_CLOSE = 5,
	DEVIO_REQ_UNMAP = 6,
	DEVIO_REQ_ZERO = 7,
	DEVIO_REQ_SCSI = 8,
	DEVIO_REQ_SHARED = 9,
};

/* INFO flags. */
#define DEVIO_INFO_RO              0x01u
#define DEVIO_INFO_SUPPORTS_UNMAP  0x02u
#define DEVIO_INFO_SUPPORTS_ZERO   0x04u
#define DEVIO_INFO_SUPPORTS_SCSI   0x08u
#define DEVIO_INFO_SUPPORTS_SHARED 0x10u
#define DEVIO_INFO_KEEP_OPEN       0x20u

/* One UNMAP/ZERO range on the wire: signed offset, unsigned length. */
#define DEVIO_RANGE_SIZE 16u

/* Largest READ/WRITE this project serves in one request (a bigger one is
 * answered with an error, never allocated). ImDisk's devio uses 64 MiB. */
#define DEVIO_MAX_TRANSFER (64u << 20)
/* Largest UNMAP/ZERO range array accepted. */
#define DEVIO_MAX_RANGES_BYTES (1u << 20)
/* CONNECT carries a connection string: more than this is not a string. */
#define DEVIO_MAX_CONNECT_BYTES 65536u
/* SCSI pass-through payloads a server consumes (and refuses) without keeping. */
#define DEVIO_MAX_SCSI_BYTES (1u << 20)
/* Largest req_alignment a client accepts (a power of two). */
#define DEVIO_MAX_ALIGN (1u << 20)

/* Sizes on the wire. */
#define DEVIO_CODE_SIZE 8u        /* the request code that starts every request */
#define DEVIO_INFO_SIZE 24u       /* INFO answer: file_size, req_alignment, flags */
#define DEVIO_ANSWER_SIZE 16u     /* READ/WRITE/CONNECT/SCSI answer: error, length */
#define DEVIO_ERRNO_SIZE 8u       /* UNMAP/ZERO answer: error */
#define DEVIO_SHARED_ANSWER_SIZE 64u
#define DEVIO_MAX_REQ_HDR (DEVIO_CODE_SIZE + 48u) /* longest request header (SHARED) */

struct devio_info {
	uint64_t file_size;
	uint64_t req_alignment;
	uint64_t flags;
};

static inline uint64_t devio_get_le64(const void *p)
{
	const uint8_t *b = (const uint8_t *)p;
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = (v << 8) | b[i];
	return v;
}

static inline void devio_put_le64(void *p, uint64_t v)
{
	uint8_t *b = (uint8_t *)p;
	for (int i = 0; i < 8; i++, v >>= 8)
		b[i] = (uint8_t)v;
}

/* ---- requests ---- */

/* One request header, decoded.  READ/WRITE: offset, length (WRITE's
 * payload follows); UNMAP/ZERO: length bytes of ranges follow; CONNECT:
 * flags, length bytes of string follow; SCSI: length bytes of data follow
 * (cdb and max_response_length are not kept); SHARED: nothing kept. */
struct devio_proto_req {
	uint64_t code;
	uint64_t offset;
	uint64_t length;
	uint64_t flags;
};

/* Bytes of header after the code word for a request code (0 for INFO,
 * CLOSE and codes the protocol does not define). */
size_t devio_proto_req_hdr_size(uint64_t code);
/* Decode the header that follows the code word (hdr holds
 * devio_proto_req_hdr_size(code) bytes). */
void devio_proto_decode_req(uint64_t code, const uint8_t *hdr, struct devio_proto_req *r);
/* Encode a READ/WRITE/INFO/CLOSE request, or an UNMAP/ZERO with the one
 * range [offset, offset+length), into out (DEVIO_MAX_REQ_HDR bytes);
 * returns its length (payloads are the caller's). */
size_t devio_proto_encode_req(const struct devio_proto_req *r, uint8_t *out);

/* One UNMAP/ZERO range checked against an export of size bytes: 0, or
 * -EINVAL for a negative start, an overflow or a range past the end. */
int devio_proto_decode_range(const uint8_t *p, uint64_t size, uint64_t *off, uint64_t *len);

/* ---- answers ---- */

/* A result (0 or -errno) as the wire's error word, and back: a peer's
 * error word outside 1..4095 is EIO. */
uint64_t devio_proto_wire_errno(int result);
int devio_proto_peer_errno(uint64_t e);

/* error + length (READ, WRITE, CONNECT, SCSI). */
void devio_proto_encode_answer(uint8_t out[DEVIO_ANSWER_SIZE], int result, uint64_t length);
/* Decode the answer to a READ/WRITE of asked bytes: 0 with *result the
 * server's verdict (0, its -errno, or -EIO for a short transfer) and
 * *length the bytes that follow (a READ's data), or -EPROTO when the
 * server claims more than was asked (the stream is then lost). */
int devio_proto_decode_answer(const uint8_t in[DEVIO_ANSWER_SIZE], uint64_t asked, int *result, uint64_t *length);

void devio_proto_encode_info(uint8_t out[DEVIO_INFO_SIZE], const struct devio_info *i);
/* Decode and check an INFO answer: 0, or -EINVAL (why says what) for a
 * size past 2^63 (range offsets are signed) or an alignment that is not a
 * power of two up to DEVIO_MAX_ALIGN.  An alignment of 0 becomes 1. */
int devio_proto_decode_info(const uint8_t in[DEVIO_INFO_SIZE], struct devio_info *i, char *why, size_t whylen);

struct devio_backend;
/* INFO flags a server reports for a backend: RO, or UNMAP (the backend
 * trims) and ZERO (always when writable: the core writes zeroes). */
uint64_t devio_proto_info_flags(const struct devio_backend *b);
/* Backend capabilities (DEVIO_CAP_*) a client takes from INFO flags. */
uint32_t devio_proto_caps(uint64_t info_flags);

#ifdef __cplusplus
}
#endif
#endif
