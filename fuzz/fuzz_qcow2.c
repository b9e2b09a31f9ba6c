/* fuzz_qcow2.c - libFuzzer target: arbitrary bytes as a qcow2 image file
 * (header, extensions, L1/L2 and refcount tables) in an in-memory backend
 * that can grow a little; opened as the auto-detection would, then read,
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

#define FUZZ_GROW (4u << 20) /* the image may grow this much */

struct mem {
	struct devio_backend b;
	uint8_t *p;
	uint64_t len, cap; /* bytes held, bytes allocated */
};

static int mem_room(struct mem *m, uint64_t end)
{
	if (end <= m->len)
		return 0;
	if (end > m->cap)
		return -ENOSPC;
	memset(m->p + m->len, 0, end - m->len);
	m->len = end;
	return 0;
}

static int mem_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	struct mem *m = b->priv;

	if (off + len > m->len) { /* inside size (the core checked) but not yet written */
		if (mem_room(m, off + len))
			return -EIO;
	}
	memcpy(buf, m->p + off, len);
	return 0;
}

static int mem_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	struct mem *m = b->priv;

	if (mem_room(m, off + len))
		return -ENOSPC;
	memcpy(m->p + off, buf, len);
	return 0;
}

static int mem_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct mem *m = b->priv;

	if (mem_room(m, off + len))
		return -ENOSPC;
	memset(m->p + off, 0, len);
	return 0;
}

static int mem_flush(struct devio_backend *b)
{
	return 0;
}

static const struct devio_backend_ops mem_ops = {
	.name = "fuzz-mem",
	.pread = mem_pread,
	.pwrite = mem_pwrite,
	.flush = mem_flush,
	.trim = mem_trim,
};

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
	struct mem *m = calloc(1, sizeof(*m));
	struct devio_backend *q = NULL;

	devio_log_set_level(DEVIO_LOG_ERROR);
	devio_qcow2_set_cache_size(1); /* 16 tables: evictions too */
	if (!m)
		return 0;
	m->cap = size + FUZZ_GROW;
	m->p = malloc(m->cap);
	if (!m->p) {
		free(m);
		return 0;
	}
	memcpy(m->p, data, size);
	m->len = size;
	m->b.ops = &mem_ops;
	m->b.size = size;
	m->b.block_size = 1;
	m->b.priv = m;
	m->b.caps = DEVIO_CAP_FLUSH | DEVIO_CAP_TRIM | DEVIO_CAP_GROWS;
	if (devio_qcow2_probe(&m->b) && devio_qcow2_open("fuzz.qcow2", &m->b, false, NULL, &q) == 0) {
		exercise(q, data, size);
		devio_backend_close(q);
	}
	free(m->p);
	free(m);
	return 0;
}
