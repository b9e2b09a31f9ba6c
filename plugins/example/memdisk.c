/* memdisk.c - the example devio plugin (include/devio/plugin.h): a sparse
 * RAM disk that allocates 64 KiB chunks where it is written and frees them
 * on trim and zero, so it shows every optional callback.
 *
 *   cc -shared -fPIC -o libdevio-memdisk.so memdisk.c $(pkg-config --cflags devio)
 *   devio serve plugin:./libdevio-memdisk.so:64M --nbd unix:/tmp/m.sock
 *
 * ARGS is the size (bytes, or with a K/M/G suffix).  It does not set
 * DEVIO_PLUGIN_THREAD_SAFE, so devio calls it one call at a time and it
 * needs no lock of its own.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <devio/plugin.h>

#define CHUNK (64u << 10)

struct memdisk {
	uint64_t size, nchunks;
	unsigned char **chunk; /* NULL: never written, reads as zeroes */
};

static int md_parse_size(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;
	unsigned shift = 0;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (end == s || errno || *s == '-')
		return -EINVAL;
	switch (*end) {
	case 'G': shift += 10; /* fall through */
	case 'M': shift += 10; /* fall through */
	case 'K': shift += 10; end++; break;
	default: break;
	}
	if (*end || v == 0 || v > (1ull << 40) >> shift)
		return -EINVAL;
	*out = (uint64_t)v << shift;
	return 0;
}

static int md_open(const char *args, int readonly, void **handle)
{
	struct memdisk *m = calloc(1, sizeof(*m));

	if (!m)
		return -ENOMEM;
	if (md_parse_size(args, &m->size)) {
		free(m);
		return -EINVAL;
	}
	m->nchunks = (m->size + CHUNK - 1) / CHUNK;
	m->chunk = calloc(m->nchunks, sizeof(*m->chunk));
	if (!m->chunk) {
		free(m);
		return -ENOMEM;
	}
	*handle = m;
	return 0;
}

static int md_size(void *handle, uint64_t *bytes)
{
	*bytes = ((struct memdisk *)handle)->size;
	return 0;
}

/* The piece of [o, end) that lies in o's chunk. */
static uint64_t md_piece(uint64_t o, uint64_t end)
{
	uint64_t room = CHUNK - o % CHUNK;

	return room < end - o ? room : end - o;
}

static int64_t md_read(void *handle, void *buf, uint64_t len, uint64_t off)
{
	struct memdisk *m = handle;
	unsigned char *p = buf;

	for (uint64_t o = off, n; o < off + len; o += n) {
		uint64_t i = o / CHUNK, in = o % CHUNK;

		n = md_piece(o, off + len);
		if (m->chunk[i])
			memcpy(p, m->chunk[i] + in, n);
		else
			memset(p, 0, n);
		p += n;
	}
	return (int64_t)len;
}

static int64_t md_write(void *handle, const void *buf, uint64_t len, uint64_t off)
{
	struct memdisk *m = handle;
	const unsigned char *p = buf;

	for (uint64_t o = off, n; o < off + len; o += n) {
		uint64_t i = o / CHUNK, in = o % CHUNK;

		n = md_piece(o, off + len);
		if (!m->chunk[i] && !(m->chunk[i] = calloc(1, CHUNK)))
			return -ENOMEM;
		memcpy(m->chunk[i] + in, p, n);
		p += n;
	}
	return (int64_t)len;
}

/* Whole chunks are freed; the edges of the range are zeroed in place. */
static int md_zero(void *handle, uint64_t off, uint64_t len, int may_trim)
{
	struct memdisk *m = handle;

	for (uint64_t o = off, n; o < off + len; o += n) {
		uint64_t i = o / CHUNK, in = o % CHUNK;

		n = md_piece(o, off + len);
		if (!m->chunk[i])
			continue;
		if (n == CHUNK && may_trim) {
			free(m->chunk[i]);
			m->chunk[i] = NULL;
		} else {
			memset(m->chunk[i] + in, 0, n);
		}
	}
	return 0;
}

static int md_trim(void *handle, uint64_t off, uint64_t len)
{
	return md_zero(handle, off, len, 1);
}

static int md_flush(void *handle)
{
	return 0; /* nothing outlives the process anyway */
}

static int md_extents(void *handle, uint64_t off, uint64_t len, devio_plugin_extent_fn fn, void *ctx)
{
	struct memdisk *m = handle;

	for (uint64_t o = off, n; o < off + len; o += n) {
		uint64_t i = o / CHUNK;

		n = md_piece(o, off + len);
		uint32_t flags = m->chunk[i] ? 0 : DEVIO_PLUGIN_EXTENT_HOLE | DEVIO_PLUGIN_EXTENT_ZERO;

		if (fn(ctx, o, n, flags))
			break;
	}
	return 0;
}

static void md_close(void *handle)
{
	struct memdisk *m = handle;

	for (uint64_t i = 0; i < m->nchunks; i++)
		free(m->chunk[i]);
	free(m->chunk);
	free(m);
}

static const struct devio_plugin memdisk_plugin = {
	.abi_version = DEVIO_PLUGIN_ABI_VERSION,
	.struct_size = sizeof(struct devio_plugin),
	.name = "memdisk",
	.flags = 0,
	.open = md_open,
	.size = md_size,
	.read = md_read,
	.close = md_close,
	.write = md_write,
	.flush = md_flush,
	.trim = md_trim,
	.zero = md_zero,
	.extents = md_extents,
};

DEVIO_PLUGIN_EXPORT const struct devio_plugin *devio_plugin_entry(void)
{
	return &memdisk_plugin;
}
