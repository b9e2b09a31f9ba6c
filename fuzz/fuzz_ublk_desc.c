/* fuzz_ublk_desc.c - libFuzzer target for the ublk descriptor check: the
 * driver-written descriptor (op_flags, nr_sectors, start_sector) plus the
 * device geometry come from the input; a request that passes must lie
 * inside the device and, for reads and writes, inside the tag's buffer. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "devio/request.h"
#include "devio/ublk.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct {
		uint32_t op_flags, nr_sectors;
		uint64_t start_sector, dev_sectors;
		uint32_t max_io;
	} in;
	struct devio_request req;

	if (size < sizeof(in))
		return 0;
	memcpy(&in, data, sizeof(in));
	if (devio_ublk_decode(in.op_flags, in.nr_sectors, in.start_sector, in.dev_sectors, in.max_io, &req))
		return 0;
	if (req.op == DEVIO_OP_FLUSH)
		return 0;
	if (req.length == 0 || req.offset / 512 + req.length / 512 > in.dev_sectors ||
	    req.offset + req.length < req.offset)
		abort();
	if ((req.op == DEVIO_OP_READ || req.op == DEVIO_OP_WRITE) && req.length > in.max_io)
		abort();
	return 0;
}
