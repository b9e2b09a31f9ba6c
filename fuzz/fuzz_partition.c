/* fuzz_partition.c - libFuzzer target: arbitrary bytes as a disk image for
 * devio_partition_find(), partitions 1..8 in both numberings.  Whatever it
 * answers must lie inside the image (the harness: fuzz_part.c). */
#include "fuzz_part.h"

static int fuzz_partition_find(devio_read_fn read, void *ctx, uint64_t size, int k, uint64_t *off, uint64_t *len)
{
	enum devio_part_numbering numbering = k < 8 ? DEVIO_PART_LINUX : DEVIO_PART_IMDISK;

	return devio_partition_find("fuzz", read, ctx, size, numbering, k % 8 + 1, off, len);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_part_run(data, size, 16, fuzz_partition_find);
	return 0;
}
