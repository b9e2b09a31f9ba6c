/* layer.c - what every layer needs to wrap a lower backend: its initial
 * geometry and capabilities, synchronous requests to the lower backend
 * through the core's checks, and extents with a default. */
#include <errno.h>
#include "devio/layer.h"
#include "devio/request.h"

void devio_layer_init(struct devio_backend *b, const struct devio_backend_ops *ops,
		      struct devio_backend *lower, uint32_t keep, void *priv)
{
	b->ops = ops;
	b->lower = lower;
	b->run = lower->run;
	b->size = lower->size;
	b->block_size = lower->block_size;
	b->max_io = lower->max_io;
	b->caps = lower->caps & keep;
	b->priv = priv;
	/* Buffers in place, in a pipe or registered on a ring reach a layer with data callbacks
	 * only if it takes them itself; a layer that remaps passes them on. */
	if (!ops->remap && !ops->map)
		b->caps &= ~DEVIO_CAP_MAP;
	if (!ops->remap && !ops->splice)
		b->caps &= ~(DEVIO_CAP_SPLICE_READ | DEVIO_CAP_SPLICE_WRITE);
	if (!ops->remap && !ops->ring_submit) /* registered pages: only the store's ring I/O moves them */
		b->caps &= ~DEVIO_CAP_FIXED;
}

static int layer_request(struct devio_backend *lower, enum devio_op op, void *buf, uint64_t len,
			 uint64_t off, uint32_t flags)
{
	struct devio_request req = { .op = op, .flags = flags, .offset = off, .length = len, .buf = buf };

	return devio_run(lower, &req);
}

int devio_layer_read(struct devio_backend *lower, void *buf, uint64_t len, uint64_t off)
{
	return layer_request(lower, DEVIO_OP_READ, buf, len, off, 0);
}

int devio_layer_write(struct devio_backend *lower, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	return layer_request(lower, DEVIO_OP_WRITE, (void *)buf, len, off, flags);
}

int devio_layer_flush(struct devio_backend *lower)
{
	return layer_request(lower, DEVIO_OP_FLUSH, NULL, 0, 0, 0);
}

int devio_layer_trim(struct devio_backend *lower, uint64_t off, uint64_t len, uint32_t flags)
{
	return layer_request(lower, DEVIO_OP_TRIM, NULL, len, off, flags);
}

int devio_layer_zero(struct devio_backend *lower, uint64_t off, uint64_t len, uint32_t flags)
{
	return layer_request(lower, DEVIO_OP_ZERO, NULL, len, off, flags);
}

int devio_layer_grow(struct devio_backend *lower, uint64_t size)
{
	if (lower->caps & DEVIO_CAP_READONLY)
		return -EROFS;
	if (size <= lower->size)
		return 0;
	if (!lower->ops->grow)
		return -EOPNOTSUPP;
	return lower->ops->grow(lower, size);
}

int devio_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	if (off > b->size || len > b->size - off)
		return -EINVAL;
	if (len == 0)
		return 0;
	if (!b->ops->extents)
		return fn(ctx, off, len, 0);
	return b->ops->extents(b, off, len, fn, ctx);
}
