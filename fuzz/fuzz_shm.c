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

#define MEM_SIZE (1u << 20)
#define NSLOTS 4u
#define DATA 4096u

static uint8_t mem[MEM_SIZE];

static int mem_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	memcpy(buf, mem + off, len);
	return 0;
}

static int mem_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	memcpy(mem + off, buf, len);
	return 0;
}

static int mem_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	memset(mem + off, 0, len);
	return 0;
}

static const struct devio_backend_ops mem_ops = {
	.name = "fuzz-mem",
	.pread = mem_pread,
	.pwrite = mem_pwrite,
	.trim = mem_trim,
	.zero = mem_trim,
};

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
	struct devio_backend b = { .ops = &mem_ops, .size = MEM_SIZE, .block_size = 1,
				   .run = DEVIO_RUN_CPU, .caps = DEVIO_CAP_TRIM | DEVIO_CAP_ZERO };
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
	if (mode & 1)
		b.caps |= DEVIO_CAP_READONLY;
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
	devio_shm_serve_region(&b, region, rsize, NSLOTS, DATA);
	return 0;
}
