/* fuzz_mem.h - the one in-memory backend the fuzz targets serve: bytes in a
 * heap buffer that may grow (as a file can), extents from its contents
 * (zero granules are holes, as a sparse file's would be), and the core's
 * contract checked on every call: a request inside the store and never
 * longer than max_io, or the target traps. */
#ifndef DEVIO_FUZZ_MEM_H
#define DEVIO_FUZZ_MEM_H

#include <stdint.h>
#include "devio/backend.h"

struct fuzz_mem {
	struct devio_backend b;
	uint8_t *p;
	uint64_t limit;    /* grow() refuses past this many bytes (0: never grows) */
	uint32_t granule;  /* extents: zero runs of this many bytes are holes */
};

/* A store of size bytes (zeroes, or data where pattern is true: every
 * other granule holds bytes, so extents alternate), block_size, growing up
 * to limit.  The buffer is reused by the next init. */
struct devio_backend *fuzz_mem_init(struct fuzz_mem *m, uint64_t size, uint32_t block_size, uint64_t limit,
				    uint32_t granule, int pattern);

#endif
