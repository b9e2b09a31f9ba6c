/* fuzz_qcow2.c - libFuzzer target: arbitrary bytes as a qcow2 image file
 * (header, extensions, L1/L2 and refcount tables) in the in-memory backend
 * (fuzz_mem.c), which can grow a little; opened as the auto-detection would, then read,
 * written, zeroed, trimmed, mapped and flushed at offsets drawn from the
 * input.  Anything may fail; nothing may crash, leak or touch memory
 * outside the image. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "devio/layer.h"
#include "devio/qcow2.h"
#include "devio/util.h"
#include "fuzz_mem.h"

#define FUZZ_GROW (4u << 20) /* the image may grow this much */


static int count_extent(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	(*(uint64_t *)ctx) += len;
	return 0;
}

static uint64_t pick(const uint8_t *data, size_t size, unsigned i, uint64_t limit)
{
	uint64_t v = 0;

	for (unsigned k = 0; k < 8; k++)
		v = v << 8 | (size ? data[(i * 8 + k) % size] : 0);
	return limit ? v % limit : 0;
}

/* A few requests of every kind over the opened layer. */
static void exercise(struct devio_backend *q, const uint8_t *data, size_t size)
{
	static uint8_t buf[1 << 17];
	uint64_t vs = q->size, seen = 0;

	for (unsigned i = 0; i < 12 && vs; i++) {
		uint64_t off = pick(data, size, i, vs), len = 1 + pick(data, size, i + 40, sizeof(buf));
		struct devio_request req = { .offset = off, .length = len > vs - off ? vs - off : len, .buf = buf };

		switch (i % 6) {
		case 0: case 1: req.op = DEVIO_OP_READ; break;
		case 2: req.op = DEVIO_OP_WRITE; memset(buf, (int)i, sizeof(buf)); break;
		case 3: req.op = DEVIO_OP_ZERO; req.flags = (i & 8) ? DEVIO_REQ_NO_HOLE : 0; break;
		case 4: req.op = DEVIO_OP_TRIM; break;
		default: req.op = DEVIO_OP_FLUSH; break;
		}
		devio_run(q, &req);
	}
	devio_extents(q, 0, vs < (64u << 20) ? vs : (64u << 20), count_extent, &seen);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct fuzz_mem m;
	struct devio_backend *b, *q = NULL;

	devio_log_set_level(DEVIO_LOG_ERROR);
	devio_qcow2_set_cache_size(1); /* 16 tables: evictions too */
	b = fuzz_mem_init(&m, size, 1, size + FUZZ_GROW, 512, 0);
	memcpy(m.p, data, size);
	b->caps = DEVIO_CAP_FLUSH | DEVIO_CAP_TRIM;
	if (devio_qcow2_probe(b) && devio_qcow2_open("fuzz.qcow2", b, false, NULL, &q) == 0) {
		exercise(q, data, size);
		q->lower = NULL; /* the store is ours */
		devio_backend_close(q);
	}
	return 0;
}
