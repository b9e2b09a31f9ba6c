/* fuzz_part.c - the partition-table targets' harness (fuzz_part.h). */
#include <stdlib.h>
#include <string.h>
#include "devio/util.h"
#include "fuzz_part.h"

struct fuzz_part_image {
	const uint8_t *p;
	uint64_t size;
};

static int fuzz_part_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
	const struct fuzz_part_image *im = ctx;

	if (off > im->size || len > im->size - off)
		abort(); /* the parser must range-check before reading */
	memcpy(buf, im->p + off, len);
	return 0;
}

void fuzz_part_run(const uint8_t *data, size_t size, int tries, fuzz_part_find_fn find)
{
	struct fuzz_part_image im = { data, size };

	devio_log_set_level(DEVIO_LOG_ERROR);
	for (int k = 0; k < tries; k++) {
		uint64_t off = 0, len = 0;

		if (find(fuzz_part_read, &im, size, k, &off, &len) == 0 && (len == 0 || off > size || len > size - off))
			abort();
	}
}
