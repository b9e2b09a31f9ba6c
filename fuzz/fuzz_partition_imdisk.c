/* fuzz_partition_imdisk.c - libFuzzer target: arbitrary bytes as a disk
 * image for devio_partition_find_imdisk() (the ImDisk line's numbering),
 * partitions 1..8.  Whatever it answers must lie inside the image. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "devio/partition.h"
#include "devio/util.h"

struct image {
	const uint8_t *p;
	uint64_t size;
};

static int image_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
	const struct image *im = ctx;

	if (off > im->size || len > im->size - off)
		abort(); /* the parser must range-check before reading */
	memcpy(buf, im->p + off, len);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct image im = { data, size };

	devio_log_set_level(DEVIO_LOG_ERROR);
	for (int n = 1; n <= 8; n++) {
		uint64_t off = 0, len = 0;

		if (devio_partition_find_imdisk("fuzz", image_read, &im, size, n, &off, &len) == 0 &&
		    (len == 0 || off > size || len > size - off))
			abort();
	}
	return 0;
}
