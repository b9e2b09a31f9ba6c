/* fuzz_ublk_batch_tags.c - libFuzzer target for the check of the tags a
 * batched ublk fetch (FETCH_IO_CMDS) wrote: the queue depth comes from the
 * first two bytes, the buffer from the rest; every tag handed on must be
 * below the depth, and good plus bad plus skipped markers must account for
 * every 16-bit slot. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "devio/ublk.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint16_t depth, *out;
	unsigned n, bad, markers = 0;

	if (size < 2)
		return 0;
	memcpy(&depth, data, sizeof(depth));
	data += 2;
	size -= 2;
	out = malloc(size / 2 * sizeof(*out) + 1);
	if (!out)
		return 0;
	n = devio_ublk_batch_tags(data, size, depth, out, &bad);
	for (size_t i = 0; i + 2 <= size; i += 2)
		markers += data[i] == 0xff && data[i + 1] == 0xff;
	if (n > size / 2 || n + bad + markers != size / 2 + (size & 1))
		abort();
	for (unsigned i = 0; i < n; i++)
		if (out[i] >= depth)
			abort();
	free(out);
	return 0;
}
