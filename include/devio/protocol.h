/* protocol.h - constants and codecs of the devio stream protocol.
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

#ifdef __cplusplus
}
#endif
#endif
