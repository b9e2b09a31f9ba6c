/* fuzz_part.h - the harness the partition-table targets share
 * (fuzz_partition.c, fuzz_partition_imdisk.c): the fuzzer's bytes as a
 * disk image behind a devio_read_fn that traps on a read outside it (the
 * parser must range-check before reading), and every answer checked to
 * lie inside the image. */
#ifndef DEVIO_FUZZ_PART_H
#define DEVIO_FUZZ_PART_H

#include <stddef.h>
#include <stdint.h>
#include "devio/partition.h"

/* One lookup, the k-th of a run: a devio_partition_find* call. */
typedef int (*fuzz_part_find_fn)(devio_read_fn read, void *ctx, uint64_t image_size, int k, uint64_t *off,
				 uint64_t *len);

/* find for k = 0..tries-1 over data; aborts when an answer (0 returned)
 * is empty or reaches past the image. */
void fuzz_part_run(const uint8_t *data, size_t size, int tries, fuzz_part_find_fn find);

#endif
