/* fuzz_shm.c - libFuzzer target for the shared-memory server's slot
 * decoder: each input becomes the contents of one client's region (the
 * submission ring's tail and entries, every slot's ImDisk header and the
 * start of its data, or with bit 1 of the first byte the raw region from
 * its start), served once by devio_shm_serve_region() on a small in-memory
 * backend of the target's own.  Bit 0 of the first byte makes the export
 * read-only.  Catches reads outside the region, unbounded lengths, tags
 * and ring indexes used unchecked. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "devio/backend.h"
#include "devio/shm.h"
#include "devio/util.h"
#include "fuzz_mem.h"

#define MEM_SIZE (1u << 20)
#define NSLOTS 4u
#define DATA 4096u


/* Take up to n bytes of the input into dst. */
static void take(uint8_t *dst, size_t n, const uint8_t **data, size_t *size)
{
	size_t k = n < *size ? n : *size;

	memcpy(dst, *data, k);
	*data += k;
	*size -= k;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t *region;
	uint64_t rsize = devio_shm_region_size(NSLOTS, DATA);
	uint64_t ctl = devio_shm_ctl_offset(NSLOTS, DATA);
	static struct fuzz_mem m;
	struct devio_backend *b = fuzz_mem_init(&m, MEM_SIZE, 1, 0, 4096, 0);
	uint8_t mode;

	if (!region) {
		devio_log_set_level(DEVIO_LOG_ERROR);
		region = aligned_alloc(4096, rsize);
		if (!region)
			abort();
	}
	if (size < 1)
		return 0;
	mode = *data++;
	size--;
	b->run = DEVIO_RUN_CPU;
	if (mode & 1)
		b->caps |= DEVIO_CAP_READONLY;
	memset(region, 0, rsize);
	if (mode & 2) {
		take(region, rsize, &data, &size);
	} else {
		take(region + ctl + DEVIO_SHM_CTL_SQ_TAIL, 4, &data, &size);
		take(region + ctl + DEVIO_SHM_CTL_RINGS, 4 * NSLOTS, &data, &size);
		for (uint32_t t = 0; t < NSLOTS; t++) {
			take(region + t * devio_shm_slot_size(DATA), 32, &data, &size);
			take(region + t * devio_shm_slot_size(DATA) + DEVIO_SHM_HDR, 64, &data, &size);
		}
	}
	devio_shm_serve_region(b, region, rsize, NSLOTS, DATA);
	return 0;
}
