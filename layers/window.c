/* window.c - the window layer: a range of the backend below it, found as an
 * MBR/GPT partition (--partition N), cut with --offset/--size inside that,
 * and made read-only (-r over a store that is writable), in any
 * combination, over any source (file, ram:, devio://, nbd://, an image
 * format).  One layer does all three: each only moves requests or refuses
 * writes.
 *
 * The window costs nothing on the fast paths: it has no data callbacks,
 * only remap (backend.h), which the core calls to move each checked
 * request in place to the lower backend's offsets, as the kernel remaps a
 * bio's sector for a partition; the request then runs on the lower
 * backend's own path (io_uring, splice, in place).  Extents come back in
 * the window's offsets.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include "devio/layer.h"
#include "devio/partition.h"
#include "devio/util.h"

struct window {
	struct devio_backend b;
	uint64_t base;   /* the window's first byte in the lower backend */
	int partition;   /* 0, or the partition the window lies in */
	uint64_t part_base;
};

static struct window *window_of(struct devio_backend *b)
{
	return b->priv;
}

static void window_remap(struct devio_backend *b, struct devio_request *req)
{
	if (req->op != DEVIO_OP_FLUSH)
		req->offset += window_of(b)->base;
}

struct window_walk {
	devio_extent_fn fn;
	void *ctx;
	uint64_t start, end; /* in the lower backend */
};

/* An extent of the lower backend, clipped to the window and moved back
 * into its offsets. */
static int window_extent(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct window_walk *w = ctx;
	uint64_t end = len > UINT64_MAX - off ? UINT64_MAX : off + len;

	if (off < w->start)
		off = w->start;
	if (end > w->end)
		end = w->end;
	if (end <= off)
		return 0;
	return w->fn(w->ctx, off - w->start, end - off, flags);
}

static int window_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	struct window *w = window_of(b);
	struct window_walk walk = { fn, ctx, w->base, w->base + b->size };

	return devio_extents(b->lower, w->base + off, len, window_extent, &walk);
}

static void window_describe(struct devio_backend *b, char *out, size_t outlen)
{
	struct window *w = window_of(b);
	char lower[200] = "";
	char part[64] = "";

	if (b->lower->ops->describe)
		b->lower->ops->describe(b->lower, lower, sizeof(lower));
	if (w->partition)
		snprintf(part, sizeof(part), "partition %d at %" PRIu64 ", ", w->partition, w->part_base);
	snprintf(out, outlen, "%s%" PRIu64 " bytes at offset %" PRIu64 "%s of %s", part, b->size, w->base,
		 (b->caps & DEVIO_CAP_READONLY) && !(b->lower->caps & DEVIO_CAP_READONLY) ? ", read-only" : "",
		 lower[0] ? lower : b->lower->ops->name);
}

static void window_close(struct devio_backend *b)
{
	free(window_of(b));
}

static const struct devio_backend_ops window_ops = {
	.name = "window",
	.remap = window_remap,
	.extents = window_extents,
	.describe = window_describe,
	.close = window_close,
};

static int window_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
	return devio_layer_read(ctx, buf, len, off);
}

/* --partition, then --offset/--size inside it: base and size in lower. */
static int window_place(const char *name, struct devio_backend *lower, const struct devio_open_opts *opts,
			struct window *w, uint64_t *size)
{
	uint64_t base = 0, avail = lower->size;
	int r;

	if (opts->partition) {
		r = devio_partition_find(name, window_read, lower, lower->size, opts->numbering, opts->partition,
					 &base, &avail);
		if (r)
			return r;
		w->partition = opts->partition;
		w->part_base = base;
	}
	if (opts->has_offset) {
		if (opts->offset > avail) {
			devio_err("%s: offset %" PRIu64 " lies past the end (%" PRIu64 " bytes)", name, opts->offset,
				  avail);
			return -EINVAL;
		}
		base += opts->offset;
		avail -= opts->offset;
	}
	if (opts->has_size) {
		if (opts->size == 0 || opts->size > avail) {
			devio_err("%s: size %" PRIu64 " does not fit: %" PRIu64 " bytes from offset %" PRIu64, name,
				  opts->size, avail, base);
			return -EINVAL;
		}
		avail = opts->size;
	}
	if (lower->block_size > 1 && base % lower->block_size) {
		devio_err("%s: the window starts at offset %" PRIu64 ", not a multiple of the %" PRIu32
			  "-byte blocks the backend below it takes (O_DIRECT, a server's block size)", name, base,
			  lower->block_size);
		return -EINVAL;
	}
	w->base = base;
	*size = avail;
	return 0;
}

int devio_window_open(const char *name, struct devio_backend *lower, const struct devio_open_opts *opts,
		      struct devio_backend **out)
{
	bool guard = opts->readonly && !(lower->caps & DEVIO_CAP_READONLY);
	struct window *w;
	uint64_t size;
	int r;

	if (!opts->partition && !opts->has_offset && !opts->has_size && !guard) {
		*out = lower;
		return 0;
	}
	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	r = window_place(name, lower, opts, w, &size);
	if (r) {
		free(w);
		return r;
	}
	devio_layer_init(&w->b, &window_ops, lower, ~0u, w);
	w->b.size = size;
	if (opts->readonly)
		w->b.caps = (w->b.caps | DEVIO_CAP_READONLY) &
			    ~(DEVIO_CAP_TRIM | DEVIO_CAP_FAST_ZERO | DEVIO_CAP_SPLICE_WRITE);
	*out = &w->b;
	return 0;
}
