/* fuzz_vhd.c - libFuzzer target: arbitrary bytes as a VHD image in memory
 * (a store that can grow, as a file can) for the VHD layer: footer,
 * header, BAT, bitmaps and parent locators parsed with the format named
 * (--format vhd), then reads, a write read back, a zero, a trim and the
 * extents.  A successful write must read back as written, a zero as
 * zeroes, extents must cover the range in order. */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "devio/backend.h"
#include "devio/layer.h"
#include "devio/util.h"

#define FUZZ_MAX_GROW (16u << 20) /* the image may grow this much */
#define FUZZ_IO 8192u

/* The refusals are logged as errors: dropped unless FUZZ_VERBOSE is set
 * (these stand in for lib/log.c, as in fuzz_devio_client.c). */
static enum devio_log_level fuzz_log_level = DEVIO_LOG_ERROR;
static int fuzz_verbose = -1;

void devio_log_set_level(enum devio_log_level level) { fuzz_log_level = level; }
enum devio_log_level devio_log_get_level(void) { return fuzz_log_level; }
unsigned long devio_log_errors(void) { return 0; }

void devio_log(enum devio_log_level level, const char *fmt, ...)
{
	va_list ap;

	if (fuzz_verbose < 0)
		fuzz_verbose = getenv("FUZZ_VERBOSE") != NULL;
	if (!fuzz_verbose || level > fuzz_log_level)
		return;
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

struct mem {
	struct devio_backend b;
	uint8_t *p;
	uint64_t limit;
};

static int mem_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	struct mem *m = b->priv;

	memcpy(buf, m->p + off, len);
	return 0;
}

static int mem_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	struct mem *m = b->priv;

	memcpy(m->p + off, buf, len);
	return 0;
}

static int mem_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct mem *m = b->priv;

	memset(m->p + off, 0, len);
	return 0;
}

static int mem_grow(struct devio_backend *b, uint64_t size)
{
	struct mem *m = b->priv;
	uint8_t *p;

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

/* 512-byte pieces of zeroes are holes, as a sparse file's would be. */
static int mem_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	struct mem *m = b->priv;

	while (len) {
		uint64_t n = 512 - off % 512 < len ? 512 - off % 512 : len;
		bool zero = m->p[off] == 0 && !memcmp(m->p + off, m->p + off + 1, n - 1);
		int r = fn(ctx, off, n, zero ? DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO : 0);

		if (r)
			return r;
		off += n;
		len -= n;
	}
	return 0;
}

static const struct devio_backend_ops mem_ops = {
	.name = "fuzz-mem",
	.pread = mem_pread,
	.pwrite = mem_pwrite,
	.trim = mem_trim,
	.extents = mem_extents,
	.grow = mem_grow,
};

struct walk {
	uint64_t next, end;
};

static int check_extent(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct walk *w = ctx;

	if (off != w->next || len == 0 || len > w->end - off)
		abort();
	w->next = off + len;
	return 0;
}

static uint64_t pick(const uint8_t *data, size_t size, size_t k, uint64_t range)
{
	uint64_t v = 0;

	for (size_t i = 0; i < 8 && size > k + i; i++)
		v = v << 8 | data[size - 1 - k - i];
	return range ? v % range : 0;
}

static void exercise(struct devio_backend *v, const uint8_t *data, size_t size)
{
	static uint8_t buf[FUZZ_IO], back[FUZZ_IO];
	uint64_t len = v->size < FUZZ_IO ? v->size : FUZZ_IO;
	uint64_t off = pick(data, size, 0, v->size - len + 1);
	struct walk w = { off, off + (v->size - off < (64u << 20) ? v->size - off : (64u << 20)) };

	devio_layer_read(v, buf, len, 0);
	devio_layer_read(v, buf, len, v->size - len);
	memset(buf, 0xA5, sizeof(buf));
	buf[0] = (uint8_t)size;
	if (devio_layer_write(v, buf, len, off, 0) == 0 && devio_layer_read(v, back, len, off) == 0 &&
	    memcmp(buf, back, len))
		abort();
	if (devio_layer_zero(v, off, len, 0) == 0 && devio_layer_read(v, back, len, off) == 0 &&
	    memcmp(back, (uint8_t[FUZZ_IO]){ 0 }, len))
		abort();
	devio_layer_trim(v, pick(data, size, 8, v->size), len < v->size ? len : v->size, 0);
	if (w.end > off && devio_extents(v, off, w.end - off, check_extent, &w) == 0 && w.next != w.end)
		abort();
	devio_layer_flush(v);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct mem m = { .limit = size + FUZZ_MAX_GROW };
	struct devio_open_opts opts = { .format = "vhd" };
	struct devio_backend *v;

	if (size == 0)
		return 0;
	m.p = malloc(size);
	if (!m.p)
		return 0;
	memcpy(m.p, data, size);
	m.b.ops = &mem_ops;
	m.b.size = size;
	m.b.block_size = 1;
	m.b.caps = DEVIO_CAP_TRIM | DEVIO_CAP_EXTENTS;
	m.b.priv = &m;
	/* parents are looked for next to a folder that does not exist */
	if (devio_format_open("/nonexistent-devio-fuzz/image.vhd", &m.b, size & 1 ? "vhd" : "auto", &opts, &v) == 0) {
		if (v != &m.b) {
			exercise(v, data, size);
			v->lower = NULL;
			devio_backend_close(v);
		}
	}
	free(m.p);
	return 0;
}
