/* shm.h - the shared-memory transport of the devio protocol: the layout
 * of a region and its rings, the hello message that hands it over, and
 * where the socket lives.  Shared by the server (frontends/shm.c, --devio
 * shm:NAME) and the client backend (backends/devio_shm.c, devio+shm://NAME).
 * docs/shm.md describes it for people; this is the one definition.
 *
 * A region is a sealed memfd (it can neither shrink nor grow), private to
 * one client connection:
 *
 *   slot 0: [0, 4096) header, [4096, 4096 + data_size) data   (ImDisk's shm layout)
 *   slot 1: the same at slot_size = 4096 + data_size, ...
 *   control page at nslots * slot_size: indexes, wake-up flags, two rings
 *
 * A slot's header holds an ImDisk request (code, then its 64-bit fields),
 * overwritten by the answer; the tag of a request is its slot number,
 * passed through the submission ring (client to server) and back through
 * the completion ring.  Every index and tag read from the region is
 * untrusted on both sides.
 */
#ifndef DEVIO_SHM_H
#define DEVIO_SHM_H

#include <endian.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DEVIO_SHM_MAGIC 0x4d48534f49564544ull /* "DEVIOSHM" little-endian */
#define DEVIO_SHM_VERSION 1u
#define DEVIO_SHM_HDR 4096u             /* a slot's header area (IMDPROXY_HEADER_SIZE) */
#define DEVIO_SHM_MAX_SLOTS 1024u
#define DEVIO_SHM_MIN_DATA 4096u
#define DEVIO_SHM_MAX_DATA (64u << 20)
#define DEVIO_SHM_DEFAULT_SLOTS 32u
#define DEVIO_SHM_DEFAULT_DATA (1u << 20)

/* Extension request code (outside ImDisk's 0..9): make completed writes
 * durable.  Offered when the hello's ext flags have DEVIO_SHM_EXT_FLUSH. */
#define DEVIO_SHM_REQ_FLUSH 16u
#define DEVIO_SHM_EXT_FLUSH 0x1u

/* Control page offsets (bytes from its start); each index on its own line. */
#define DEVIO_SHM_CTL_MAGIC   0u    /* u64 magic, u32 version, u32 nslots, u32 data_size */
#define DEVIO_SHM_CTL_SQ_TAIL 64u   /* u32, written by the client */
#define DEVIO_SHM_CTL_SQ_WAKE 128u  /* u32, written by the server: 1 = ring the request doorbell */
#define DEVIO_SHM_CTL_CQ_TAIL 192u  /* u32, written by the server */
#define DEVIO_SHM_CTL_CQ_WAKE 256u  /* u32, written by the client: 1 = ring the answer doorbell */
#define DEVIO_SHM_CTL_RINGS   512u  /* u32 sq[cap], then u32 cq[cap] */

/* Hello: what the server sends with the three descriptors (memfd, request
 * eventfd, answer eventfd).  Sixteen little-endian 64-bit words. */
enum devio_shm_hello_word {
	DEVIO_SHM_H_MAGIC = 0,
	DEVIO_SHM_H_VERSION,
	DEVIO_SHM_H_STATUS,    /* 0, or an errno: the server refuses (no fds follow) */
	DEVIO_SHM_H_NSLOTS,
	DEVIO_SHM_H_DATA_SIZE,
	DEVIO_SHM_H_REGION_SIZE,
	DEVIO_SHM_H_FILE_SIZE, /* INFO: size, alignment, flags */
	DEVIO_SHM_H_ALIGNMENT,
	DEVIO_SHM_H_FLAGS,
	DEVIO_SHM_H_EXT,       /* DEVIO_SHM_EXT_* */
	DEVIO_SHM_H__COUNT = 16,
};
#define DEVIO_SHM_HELLO_BYTES (8u * DEVIO_SHM_H__COUNT)

/* Ring capacity: nslots rounded up to a power of two. */
static inline uint32_t devio_shm_ring_cap(uint32_t nslots)
{
	uint32_t cap = 1;

	while (cap < nslots)
		cap <<= 1;
	return cap;
}

static inline uint64_t devio_shm_slot_size(uint32_t data_size)
{
	return (uint64_t)DEVIO_SHM_HDR + data_size;
}

static inline uint64_t devio_shm_ctl_offset(uint32_t nslots, uint32_t data_size)
{
	return (uint64_t)nslots * devio_shm_slot_size(data_size);
}

/* The whole region: slots, then the control page(s), in 4 KiB pages. */
static inline uint64_t devio_shm_region_size(uint32_t nslots, uint32_t data_size)
{
	uint64_t ctl = DEVIO_SHM_CTL_RINGS + 8ull * devio_shm_ring_cap(nslots);

	return devio_shm_ctl_offset(nslots, data_size) + ((ctl + 4095) & ~4095ull);
}

/* Loads and stores of the region's little-endian fields, which the other
 * side may change at any time: each is one atomic access, so a field is
 * loaded once into a local and checked there, never read twice. */
static inline uint64_t devio_shm_get64(const uint8_t *p)
{
	return le64toh(__atomic_load_n((const uint64_t *)(const void *)p, __ATOMIC_RELAXED));
}

static inline void devio_shm_put64(uint8_t *p, uint64_t v)
{
	__atomic_store_n((uint64_t *)(void *)p, htole64(v), __ATOMIC_RELAXED);
}

static inline uint32_t devio_shm_get32(const uint8_t *p, int order)
{
	return le32toh(__atomic_load_n((const uint32_t *)(const void *)p, order));
}

static inline void devio_shm_put32(uint8_t *p, uint32_t v, int order)
{
	__atomic_store_n((uint32_t *)(void *)p, htole32(v), order);
}

/* Take the other side's "I sleep" flag (1 -> 0): true if this call did,
 * and so owes it the doorbell.  Whoever takes the flag rings, once. */
static inline bool devio_shm_take_wake(uint8_t *flag)
{
	uint32_t want = htole32(1);

	return __atomic_compare_exchange_n((uint32_t *)(void *)flag, &want, 0, false, __ATOMIC_SEQ_CST,
					   __ATOMIC_RELAXED);
}

/* Is this a geometry both sides accept? */
static inline bool devio_shm_geometry_ok(uint64_t nslots, uint64_t data_size)
{
	return nslots >= 1 && nslots <= DEVIO_SHM_MAX_SLOTS && data_size >= DEVIO_SHM_MIN_DATA &&
	       data_size <= DEVIO_SHM_MAX_DATA && data_size % 4096 == 0;
}

/* The socket for NAME: NAME itself when it starts with '/', else
 * /run/devio/shm/NAME as root or $XDG_RUNTIME_DIR/devio/shm/NAME.  With
 * create, the directories are made (0700 for the last).  0, or -EINVAL for
 * a bad name (empty, '/' inside, "." or ".."), -ENAMETOOLONG. */
int devio_shm_socket_path(const char *name, bool create, char *out, size_t outlen);

/* Serve the requests waiting in a region that is already mapped at
 * region (size bytes, laid out for nslots and data_size), on backend b,
 * synchronously, as one wake-up of the server would; then write their
 * answers and completions.  For the fuzz target and unit tests: returns 0,
 * or -EPROTO when the region breaks the protocol (the server would drop
 * that client). */
struct devio_backend;
int devio_shm_serve_region(struct devio_backend *b, void *region, uint64_t size, uint32_t nslots,
			   uint32_t data_size);

/* The client backend: devio+shm://NAME (backends/devio_shm.c). */
struct devio_open_opts;
int devio_remote_shm_open(const char *uri, const struct devio_open_opts *opts, struct devio_backend **out);

#ifdef __cplusplus
}
#endif
#endif
