/* fuzz_partition_imdisk.c - libFuzzer target: arbitrary bytes as a disk
 * image for devio_partition_find_imdisk() (the ImDisk line's numbering),
 * partitions 1..8.  Whatever it answers must lie inside the image (the
 * harness: fuzz_part.c). */
#include "fuzz_part.h"

static int fuzz_partition_imdisk_find(devio_read_fn read, void *ctx, uint64_t size, int k, uint64_t *off,
				      uint64_t *len)
{
	return devio_partition_find_imdisk("fuzz", read, ctx, size, k + 1, off, len);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_part_run(data, size, 8, fuzz_partition_imdisk_find);
	return 0;
}
