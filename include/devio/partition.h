/* partition.h - find partition N of a disk image in its MBR (primaries,
 * then logicals along the EBR chain, numbered as ImDisk's devio numbers
 * them) or its GPT (entries in table order).  Every byte of the tables is
 * untrusted: loops are bounded and every offset is range-checked. */
#ifndef DEVIO_PARTITION_H
#define DEVIO_PARTITION_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Reads len bytes at off of the image into buf; 0 or -errno. */
typedef int (*devio_read_fn)(void *ctx, void *buf, uint64_t len, uint64_t off);

/* Find partition n (1-based) of an image of image_size bytes.  On success
 * *offset and *length are in bytes and lie inside the image.  -ENOENT if
 * there is no such partition, -EINVAL if the tables are malformed (and a
 * message names the image, the offset and the cause). */
int devio_partition_find(const char *name, devio_read_fn read, void *ctx, uint64_t image_size,
			 int n, uint64_t *offset, uint64_t *length);

#ifdef __cplusplus
}
#endif
#endif
