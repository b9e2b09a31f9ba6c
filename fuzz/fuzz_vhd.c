/* fuzz_vhd.c - libFuzzer target: arbitrary bytes as a VHD image in memory
 * (a store that can grow, as a file can) for the VHD layer: footer,
 * header, BAT, bitmaps and parent locators parsed with the format named
 * (--format vhd), then reads, a write read back, a zero, a trim and the
 * extents.  A successful write must read back as written, a zero as
 * zeroes, extents must cover the range in order. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "devio/backend.h"
#include "devio/layer.h"
#include "devio/util.h"
#include "fuzz_mem.h"

#define FUZZ_MAX_GROW (16u << 20) /* the image may grow this much */
#define FUZZ_IO 8192u

/* Logging: the quiet stand-in of fuzz_log.c (linked in by meson). */


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
	static struct fuzz_mem m;
	struct devio_open_opts opts = { .format = "vhd" };
	struct devio_backend *v;

	if (size == 0)
		return 0;
	fuzz_mem_init(&m, size, 1, size + FUZZ_MAX_GROW, 512, 0);
	memcpy(m.p, data, size);
	m.b.caps = DEVIO_CAP_TRIM | DEVIO_CAP_EXTENTS;
	/* parents are looked for next to a folder that does not exist */
	if (devio_format_open("/nonexistent-devio-fuzz/image.vhd", &m.b, size & 1 ? "vhd" : "auto", &opts, &v) == 0) {
		if (v != &m.b) {
			exercise(v, data, size);
			v->lower = NULL;
			devio_backend_close(v);
		}
	}
	return 0;
}
