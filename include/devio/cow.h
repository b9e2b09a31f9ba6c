/* cow.h - the copy-on-write overlay layer (layers/cow.c): every write to a
 * read-only source lands in an overlay (a file in the format below, or a
 * RAM disk), reads come from the overlay where it holds the block and from
 * the source elsewhere.  docs/formats.md describes the file format.
 *
 * The header decoder is separate so that it can be fuzzed on its own: the
 * header is untrusted input. */
#ifndef DEVIO_COW_H
#define DEVIO_COW_H

#include <stddef.h>
#include <stdint.h>
#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DEVIO_COW_MAGIC "DEVIOCOW"      /* 8 bytes, no terminator on disk */
#define DEVIO_COW_VERSION 1u
#define DEVIO_COW_HEADER_SIZE 4096u      /* the header's region; the bitmap follows */
#define DEVIO_COW_MIN_BLOCK 4096u
#define DEVIO_COW_MAX_BLOCK (64u << 20)
#define DEVIO_COW_MAX_BLOCKS (1ull << 28) /* a 32 MiB bitmap at most */

/* What a header says, with the layout derived from it. */
struct devio_cow_header {
	uint64_t virtual_size;  /* the source's size: the overlay serves exactly this */
	uint32_t block_size;    /* power of two, DEVIO_COW_MIN_BLOCK..MAX_BLOCK */
	uint64_t nblocks;       /* virtual_size / block_size, rounded up */
	uint64_t bitmap_offset; /* DEVIO_COW_HEADER_SIZE */
	uint64_t bitmap_length; /* nblocks bits rounded up to 4 KiB pages */
	uint64_t data_offset;   /* block N's bytes are at data_offset + N * block_size */
};

/* The layout of an overlay of size bytes with blocks of block_size (0:
 * the default, 64 KiB, larger for sources so big that the bitmap would
 * pass DEVIO_COW_MAX_BLOCKS).  -EINVAL for an impossible block size or a
 * size too large. */
int devio_cow_layout(uint64_t size, uint32_t block_size, struct devio_cow_header *h);

/* The on-disk header (DEVIO_COW_HEADER_SIZE bytes) for h. */
void devio_cow_header_encode(const struct devio_cow_header *h, uint8_t *buf);

/* Decode and check a header of len bytes: 0, or -EINVAL with *why (a
 * static string naming the field) and *field (its byte offset). */
int devio_cow_header_decode(const uint8_t *buf, size_t len, struct devio_cow_header *h, const char **why,
			    unsigned *field);

/* The overlay layer over lower (opened read-only by the caller, never
 * written): file "ram" keeps the writes in memory, any other name is an
 * overlay file, created if missing unless opts->readonly.  Refuses a file
 * made over a source of another size.  On error lower is left open and
 * the cause was logged. */
int devio_cow_open(struct devio_backend *lower, const char *file, const struct devio_open_opts *opts,
		   struct devio_backend **out);

#ifdef __cplusplus
}
#endif
#endif
