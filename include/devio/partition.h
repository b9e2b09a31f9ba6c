/* partition.h - find partition N of a disk image in its MBR (primaries,
 * then logicals along the EBR chain) or its GPT, numbered as Linux and
 * sfdisk number them or as ImDisk's devio does.  Every byte of the tables
 * is untrusted: loops are bounded and every offset is range-checked. */
#ifndef DEVIO_PARTITION_H
#define DEVIO_PARTITION_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* How partitions are numbered. */
enum devio_part_numbering {
	/* Linux, sfdisk, nbdkit's partition filter: MBR slots 1-4 by slot
	 * index (an empty slot is a gap; the extended container is no
	 * partition to serve), logical partitions 5, 6, ... along the EBR
	 * chain; GPT entry N by its index in the table. */
	DEVIO_PART_LINUX = 0,
	/* ImDisk's devio: every used MBR slot counts 1, 2, ... in slot order
	 * (the extended container too), then the logicals count on; GPT
	 * entries in use count 1, 2, ... in table order. */
	DEVIO_PART_IMDISK,
};

/* Reads len bytes at off of the image into buf; 0 or -errno. */
typedef int (*devio_read_fn)(void *ctx, void *buf, uint64_t len, uint64_t off);

/* Find partition n (1-based) of an image of image_size bytes.  On success
 * *offset and *length are in bytes and lie inside the image.  -ENOENT if
 * there is no such partition, -EINVAL if the tables are malformed (and a
 * message names the image, the offset and the cause). */
int devio_partition_find(const char *name, devio_read_fn read, void *ctx, uint64_t image_size,
			 enum devio_part_numbering numbering, int n, uint64_t *offset, uint64_t *length);

/* Partition n as ImDisk's devio numbers MBR partitions (the ImDisk
 * command line; lib/partition_imdisk.c says the rule).  0 with *offset and
 * *length set; DEVIO_IMDISK_NO_MBR when sector 0 is no master boot record
 * by ImDisk's test (it serves the whole image); DEVIO_IMDISK_WHOLE when
 * there is no partition n and ImDisk would serve the whole image as if it
 * were; -ENOENT when there is none and ImDisk would say so; -EINVAL
 * (logged) where ImDisk would serve the wrong bytes or the tables are
 * malformed.  GPT (a protective MBR): devio_partition_find(). */
#define DEVIO_IMDISK_NO_MBR 1
#define DEVIO_IMDISK_WHOLE 2
int devio_partition_find_imdisk(const char *name, devio_read_fn read, void *ctx, uint64_t image_size,
				int n, uint64_t *offset, uint64_t *length);
/* ImDisk's test for a master boot record in a 512-byte sector. */
bool devio_partition_imdisk_is_mbr(const uint8_t sec[512]);

#ifdef __cplusplus
}
#endif
#endif
