/* fuzz_cow.c - libFuzzer target: arbitrary bytes as a copy-on-write
 * overlay header for devio_cow_header_decode().  What it accepts must
 * describe a layout that fits its own bounds: blocks within the limits,
 * the bitmap after the header and large enough for every block, the data
 * after the bitmap, and the whole file's length without overflow.  Each
 * input is tried as it is and with its checksum made right, so that the
 * checks behind the checksum are reached too. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "devio/cow.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static uint32_t fuzz_crc32(const uint8_t *p, size_t n)
{
	uint32_t crc = 0xffffffffu;

	while (n--) {
		crc ^= *p++;
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xedb88320u & -(crc & 1u));
	}
	return ~crc;
}

static void fuzz_one(const uint8_t *data, size_t size)
{
	struct devio_cow_header h, again;
	uint8_t buf[DEVIO_COW_HEADER_SIZE];
	const char *why = NULL;
	unsigned field = 0;

	if (devio_cow_header_decode(data, size, &h, &why, &field)) {
		if (!why || field >= 64)
			abort(); /* every refusal names its field */
		return;
	}
	if (h.block_size < DEVIO_COW_MIN_BLOCK || h.block_size > DEVIO_COW_MAX_BLOCK ||
	    (h.block_size & (h.block_size - 1)) || h.nblocks > DEVIO_COW_MAX_BLOCKS ||
	    h.nblocks * h.block_size < h.virtual_size || h.bitmap_offset < DEVIO_COW_HEADER_SIZE ||
	    h.bitmap_length * 8 < h.nblocks || h.data_offset < h.bitmap_offset + h.bitmap_length ||
	    h.data_offset % h.block_size || h.data_offset + h.nblocks * h.block_size < h.data_offset)
		abort();
	/* what it accepts, it writes back the same */
	devio_cow_header_encode(&h, buf);
	if (devio_cow_header_decode(buf, sizeof(buf), &again, &why, &field) || again.virtual_size != h.virtual_size ||
	    again.block_size != h.block_size || again.data_offset != h.data_offset)
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint8_t fixed[DEVIO_COW_HEADER_SIZE];
	uint32_t crc;

	fuzz_one(data, size);
	if (size < 64 || size > sizeof(fixed))
		return 0;
	memcpy(fixed, data, size);
	crc = fuzz_crc32(fixed, 60); /* little-endian on disk */
	for (int i = 0; i < 4; i++)
		fixed[60 + i] = (uint8_t)(crc >> (8 * i));
	fuzz_one(fixed, size);
	return 0;
}
