/* bad_plugin.c - a plugin that breaks the rules of include/devio/plugin.h
 * on purpose, for test_plugin.py: devio must refuse each misdeed with a
 * clear error and keep serving (or refuse to start), never crash.
 *
 * ARGS picks the misdeed, on a 1 MiB disk in memory:
 *   good      behaves (the control)
 *   short     read returns half the length
 *   long      read returns more than the length
 *   errno     read returns -99999, write returns -EIO * 1000
 *   flushret  flush returns 7
 *   extents   extents leaves a gap / reports nothing
 *   huge      size 2^64 - 1            zero      size 0
 *   openpos   open returns 5           openfail  open returns -ENOENT
 * and BAD_PLUGIN_ENTRY in the environment spoils the table itself:
 *   null (entry returns NULL), abi (version 99), short (struct_size 8),
 *   noread (read callback NULL).
 * imd_open/imd_null are ImDisk-style dllopen procedures over a file (ARGS
 * is its path) and one that fails.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <devio/plugin.h>

#define SIZE (1u << 20)

struct bad {
	char mode[16];
	unsigned char *mem;
};

static int bad_open(const char *args, int readonly, void **handle)
{
	struct bad *b;

	if (!strcmp(args, "openpos"))
		return 5;
	if (!strcmp(args, "openfail"))
		return -ENOENT;
	b = calloc(1, sizeof(*b));
	if (!b || !(b->mem = calloc(1, SIZE))) {
		free(b);
		return -ENOMEM;
	}
	strncpy(b->mode, args, sizeof(b->mode) - 1);
	*handle = b;
	return 0;
}

static int bad_size(void *h, uint64_t *bytes)
{
	struct bad *b = h;

	*bytes = !strcmp(b->mode, "huge") ? UINT64_MAX : !strcmp(b->mode, "zero") ? 0 : SIZE;
	return 0;
}

static int64_t bad_read(void *h, void *buf, uint64_t len, uint64_t off)
{
	struct bad *b = h;

	memcpy(buf, b->mem + off, len);
	if (!strcmp(b->mode, "short"))
		return (int64_t)len / 2;
	if (!strcmp(b->mode, "long"))
		return (int64_t)len + 4096;
	if (!strcmp(b->mode, "errno"))
		return -99999;
	return (int64_t)len;
}

static int64_t bad_write(void *h, const void *buf, uint64_t len, uint64_t off)
{
	struct bad *b = h;

	if (!strcmp(b->mode, "errno"))
		return -EIO * 1000;
	memcpy(b->mem + off, buf, len);
	return (int64_t)len;
}

static int bad_flush(void *h)
{
	return !strcmp(((struct bad *)h)->mode, "flushret") ? 7 : 0;
}

static int bad_extents(void *h, uint64_t off, uint64_t len, devio_plugin_extent_fn fn, void *ctx)
{
	struct bad *b = h;

	if (strcmp(b->mode, "extents"))
		return fn(ctx, off, len, 0), 0;
	if (len > 8192)
		fn(ctx, off + 4096, 4096, 0); /* a gap at the start */
	return 0;                             /* or nothing at all */
}

static void bad_close(void *h)
{
	struct bad *b = h;

	free(b->mem);
	free(b);
}

static struct devio_plugin bad_plugin = {
	.abi_version = DEVIO_PLUGIN_ABI_VERSION,
	.struct_size = sizeof(struct devio_plugin),
	.name = "bad",
	.flags = DEVIO_PLUGIN_THREAD_SAFE,
	.open = bad_open,
	.size = bad_size,
	.read = bad_read,
	.close = bad_close,
	.write = bad_write,
	.flush = bad_flush,
	.extents = bad_extents,
};

DEVIO_PLUGIN_EXPORT const struct devio_plugin *devio_plugin_entry(void)
{
	const char *e = getenv("BAD_PLUGIN_ENTRY");

	if (!e)
		return &bad_plugin;
	if (!strcmp(e, "null"))
		return NULL;
	if (!strcmp(e, "abi"))
		bad_plugin.abi_version = 99;
	if (!strcmp(e, "short"))
		bad_plugin.struct_size = 8;
	if (!strcmp(e, "noread"))
		bad_plugin.read = NULL;
	return &bad_plugin;
}

/* ImDisk's custom I/O library ABI (ImDisk's devio.h), over a file. */
typedef ssize_t (*imd_read_fn)(void *, void *, size_t, int64_t);
typedef ssize_t (*imd_write_fn)(void *, void *, size_t, int64_t);
typedef int (*imd_close_fn)(void *);

static ssize_t imd_read(void *h, void *buf, size_t size, int64_t off)
{
	return pread((int)(intptr_t)h - 1, buf, size, off);
}

static ssize_t imd_write(void *h, void *buf, size_t size, int64_t off)
{
	return pwrite((int)(intptr_t)h - 1, buf, size, off);
}

static int imd_close(void *h)
{
	return close((int)(intptr_t)h - 1);
}

void *imd_open(const char *file, int read_only, imd_read_fn *rd, imd_write_fn *wr, imd_close_fn *cl, int64_t *size);
void *imd_open(const char *file, int read_only, imd_read_fn *rd, imd_write_fn *wr, imd_close_fn *cl, int64_t *size)
{
	int fd = open(file, read_only ? O_RDONLY : O_RDWR);

	if (fd < 0)
		return NULL;
	*rd = imd_read;
	*wr = imd_write;
	*cl = imd_close;
	*size = lseek(fd, 0, SEEK_END);
	return (void *)(intptr_t)(fd + 1);
}

void *imd_null(const char *file, int read_only, imd_read_fn *rd, imd_write_fn *wr, imd_close_fn *cl, int64_t *size);
void *imd_null(const char *file, int read_only, imd_read_fn *rd, imd_write_fn *wr, imd_close_fn *cl, int64_t *size)
{
	return NULL;
}
