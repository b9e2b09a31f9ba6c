/* partition.c - MBR/GPT partition lookup (not written yet). */
#include <errno.h>
#include "devio/partition.h"

int devio_partition_find(const char *name, devio_read_fn read, void *ctx, uint64_t image_size,
			 int n, uint64_t *offset, uint64_t *length)
{
	(void)name; (void)read; (void)ctx; (void)image_size; (void)n; (void)offset; (void)length;
	return -ENOSYS;
}
