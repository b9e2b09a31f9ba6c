/* fuzz_mem.c - the in-memory backend every fuzz target serves (fuzz_mem.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "fuzz_mem.h"

/* The core checked the range and split transfers at max_io: a call that
 * breaks either is a bug in whatever called us.  (max_io bounds the bytes
 * moved, not the range a TRIM, ZERO or extents query covers.) */
static void fuzz_mem_check(const struct devio_backend *b, uint64_t off, uint64_t len, int moves_bytes)
{
	if (off > b->size || len > b->size - off || (moves_bytes && b->max_io && len > b->max_io))
		__builtin_trap();
}

static int fuzz_mem_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	struct fuzz_mem *m = b->priv;

	fuzz_mem_check(b, off, len, 1);
	memcpy(buf, m->p + off, len);
	return 0;
}

static int fuzz_mem_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	struct fuzz_mem *m = b->priv;

	fuzz_mem_check(b, off, len, 1);
	memcpy(m->p + off, buf, len);
	return 0;
}

static int fuzz_mem_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct fuzz_mem *m = b->priv;

	fuzz_mem_check(b, off, len, 0);
	memset(m->p + off, 0, len);
	return 0;
}

static int fuzz_mem_grow(struct devio_backend *b, uint64_t size)
{
	struct fuzz_mem *m = b->priv;
	uint8_t *p;

	if (size <= b->size)
		return 0;
	if (size > m->limit)
		return -ENOSPC;
	p = realloc(m->p, size);
	if (!p)
		return -ENOMEM;
	memset(p + b->size, 0, size - b->size);
	m->p = p;
	b->size = size;
	return 0;
}

static int fuzz_mem_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	struct fuzz_mem *m = b->priv;

	fuzz_mem_check(b, off, len, 0);
	while (len) {
		uint64_t n = m->granule - off % m->granule < len ? m->granule - off % m->granule : len;
		int zero = m->p[off] == 0 && !memcmp(m->p + off, m->p + off + 1, n - 1);
		int r = fn(ctx, off, n, zero ? DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO : 0);

		if (r)
			return r;
		off += n;
		len -= n;
	}
	return 0;
}

static const struct devio_backend_ops fuzz_mem_ops = {
	.name = "fuzz-mem",
	.pread = fuzz_mem_pread,
	.pwrite = fuzz_mem_pwrite,
	.trim = fuzz_mem_zero,
	.zero = fuzz_mem_zero,
	.extents = fuzz_mem_extents,
	.grow = fuzz_mem_grow,
};

struct devio_backend *fuzz_mem_init(struct fuzz_mem *m, uint64_t size, uint32_t block_size, uint64_t limit,
				    uint32_t granule, int pattern)
{
	uint8_t *p = realloc(m->p, size ? size : 1);

	if (!p)
		abort();
	memset(m, 0, sizeof(*m));
	m->p = p;
	m->limit = limit;
	m->granule = granule ? granule : 512;
	memset(p, 0, size);
	for (uint64_t g = 0; pattern && g < size; g += 2 * (uint64_t)m->granule)
		memset(p + g, 0xA5, size - g < m->granule ? size - g : m->granule);
	m->b.ops = &fuzz_mem_ops;
	m->b.size = size;
	m->b.block_size = block_size ? block_size : 1;
	m->b.caps = DEVIO_CAP_FLUSH | DEVIO_CAP_FUA | DEVIO_CAP_TRIM | DEVIO_CAP_ZERO | DEVIO_CAP_EXTENTS;
	m->b.priv = m;
	return &m->b;
}
