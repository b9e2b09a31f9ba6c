/* plugin.c - a backend loaded from a shared object (include/devio/plugin.h):
 *
 *   plugin:LIB[:ARGS]        devio's plugin ABI (LIB exports devio_plugin_entry)
 *   plugin:LIB;PROC[:ARGS]   ImDisk's custom I/O library ABI: PROC is a
 *                            dllopen_proc as ImDisk's devio.h declares it
 *                            (`devio --dll=LIB;PROC` on the ImDisk line)
 *
 * LIB ends at the first ':' or ';' (a path holding either cannot be named).
 * A LIB without '/' is searched by dlopen's rules, as LoadLibrary searches.
 *
 * Everything a plugin returns is checked: the ABI version and table size,
 * required callbacks, the handle's size (not 0, below 2^63), every count
 * (a short or long read/write is an I/O error), every error code (outside
 * -4095..-1 it becomes EIO) and every extent (in order, no gaps, inside the
 * range, known flags).  Each refusal is logged once, naming the plugin,
 * the operation and the offset.  Calls are serialised by a mutex unless the
 * plugin says DEVIO_PLUGIN_THREAD_SAFE.
 */
#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include "devio/backend.h"
#include "devio/plugin.h"
#include "devio/util.h"

#define PLUGIN_MAX_SIZE ((uint64_t)INT64_MAX)
#define PLUGIN_MAX_ERRNO 4095

/* ImDisk's custom I/O library ABI (devio.h of ImDisk's devio). */
typedef ssize_t (*imd_read_fn)(void *handle, void *buf, size_t size, int64_t offset);
typedef ssize_t (*imd_write_fn)(void *handle, void *buf, size_t size, int64_t offset);
typedef int (*imd_close_fn)(void *handle);
typedef void *(*imd_open_fn)(const char *str, int read_only, imd_read_fn *rd, imd_write_fn *wr,
			     imd_close_fn *cl, int64_t *size);

struct plugin {
	char name[300];            /* the source, for messages */
	void *dl;
	struct devio_plugin ops;   /* the plugin's table; fields past its struct_size zeroed */
	struct devio_backend_ops bops; /* the backend's, without what the plugin lacks */
	void *handle;
	bool opened;
	bool serial;
	pthread_mutex_t lock;
	/* ImDisk ABI: the library's own handle and callbacks */
	void *imd_handle;
	imd_read_fn imd_read;
	imd_write_fn imd_write;
	imd_close_fn imd_close;
};

/* ---- checking what the plugin returns ---- */

/* r is meant to be 0 or -errno. */
static int plugin_status(struct plugin *pl, const char *what, uint64_t off, int64_t r)
{
	if (r == 0 || (r < 0 && r >= -PLUGIN_MAX_ERRNO))
		return (int)r;
	devio_err("%s: %s at offset %" PRIu64 " returned %" PRId64 ", not 0 or a negative errno", pl->name, what,
		  off, r);
	return -EIO;
}

/* r is meant to be len or -errno. */
static int plugin_count(struct plugin *pl, const char *what, uint64_t off, uint64_t len, int64_t r)
{
	if (r >= 0 && (uint64_t)r == len)
		return 0;
	if (r < 0 && r >= -PLUGIN_MAX_ERRNO)
		return (int)r;
	if (r >= 0)
		devio_err("%s: %s at offset %" PRIu64 " moved %" PRId64 " of %" PRIu64 " bytes", pl->name, what, off,
			  r, len);
	else
		devio_err("%s: %s at offset %" PRIu64 " returned %" PRId64 ", not a negative errno", pl->name,
			  what, off, r);
	return -EIO;
}

static void plugin_lock(struct plugin *pl)
{
	if (pl->serial)
		pthread_mutex_lock(&pl->lock);
}

static void plugin_unlock(struct plugin *pl)
{
	if (pl->serial)
		pthread_mutex_unlock(&pl->lock);
}

/* ---- the backend's operations ---- */

static int plugin_xfer(struct plugin *pl, bool wr, void *buf, uint64_t len, uint64_t off)
{
	uint64_t step = pl->ops.max_transfer ? pl->ops.max_transfer : len;
	int r = 0;

	while (len && !r) {
		uint64_t n = len < step ? len : step;
		int64_t got;

		plugin_lock(pl);
		got = wr ? pl->ops.write(pl->handle, buf, n, off)
			 : pl->ops.read(pl->handle, buf, n, off);
		plugin_unlock(pl);
		r = plugin_count(pl, wr ? "write" : "read", off, n, got);
		buf = (char *)buf + n;
		off += n;
		len -= n;
	}
	return r;
}

static int plugin_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	return plugin_xfer(b->priv, false, buf, len, off);
}

static int plugin_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	return plugin_xfer(b->priv, true, (void *)buf, len, off);
}

static int plugin_flush(struct devio_backend *b)
{
	struct plugin *pl = b->priv;
	int r;

	plugin_lock(pl);
	r = pl->ops.flush(pl->handle);
	plugin_unlock(pl);
	return plugin_status(pl, "flush", 0, r);
}

static int plugin_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct plugin *pl = b->priv;
	int r;

	plugin_lock(pl);
	r = pl->ops.trim(pl->handle, off, len);
	plugin_unlock(pl);
	return plugin_status(pl, "trim", off, r);
}

static int plugin_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct plugin *pl = b->priv;
	int r;

	if (flags & DEVIO_REQ_FAST_ZERO)
		return -EOPNOTSUPP; /* the ABI cannot say whether zero is fast */
	plugin_lock(pl);
	r = pl->ops.zero(pl->handle, off, len, !(flags & DEVIO_REQ_NO_HOLE));
	plugin_unlock(pl);
	return plugin_status(pl, "zero", off, r);
}

/* The walk of one extents call: what the plugin reports, checked before
 * it reaches devio's callback. */
struct plugin_walk {
	struct plugin *pl;
	uint64_t next, end;
	devio_extent_fn fn;
	void *ctx;
	int stop;    /* devio's callback asked to stop (its value) */
	bool bad;    /* the plugin broke the rules */
	bool any;
};

static int plugin_extent(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct plugin_walk *w = ctx;

	if (w->bad || w->stop || w->next == w->end)
		return 1;
	if (off != w->next || len == 0 || (flags & ~(DEVIO_PLUGIN_EXTENT_HOLE | DEVIO_PLUGIN_EXTENT_ZERO))) {
		devio_err("%s: extents: extent %" PRIu64 "+%" PRIu64 " flags 0x%x where one at %" PRIu64
			  " was due", w->pl->name, off, len, flags, w->next);
		w->bad = true;
		return 1;
	}
	if (len > w->end - off)
		len = w->end - off; /* past the range asked: clipped */
	w->next = off + len;
	w->any = true;
	w->stop = w->fn(w->ctx, off, len, flags);
	return w->stop ? 1 : 0;
}

static int plugin_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	struct plugin *pl = b->priv;
	struct plugin_walk w = { .pl = pl, .next = off, .end = off + len, .fn = fn, .ctx = ctx };
	int r;

	plugin_lock(pl);
	r = pl->ops.extents(pl->handle, off, len, plugin_extent, &w);
	plugin_unlock(pl);
	if (w.bad)
		return -EIO;
	if (w.stop)
		return w.stop;
	r = plugin_status(pl, "extents", off, r);
	if (!r && !w.any) {
		devio_err("%s: extents at offset %" PRIu64 " reported nothing", pl->name, off);
		return -EIO;
	}
	return r;
}

static void plugin_describe(struct devio_backend *b, char *out, size_t outlen)
{
	struct plugin *pl = b->priv;

	snprintf(out, outlen, "plugin %s (%s%s)", pl->name, pl->ops.name ? pl->ops.name : "unnamed",
		 pl->serial ? ", one call at a time" : ", thread-safe");
}

static void plugin_free(struct plugin *pl)
{
	if (pl->opened)
		pl->ops.close(pl->handle);
	if (pl->dl)
		dlclose(pl->dl);
	pthread_mutex_destroy(&pl->lock);
	free(pl);
}

static void plugin_close(struct devio_backend *b)
{
	plugin_free(b->priv);
	free(b);
}

static const struct devio_backend_ops plugin_backend_ops = {
	.name = "plugin",
	.pread = plugin_pread,
	.pwrite = plugin_pwrite,
	.flush = plugin_flush,
	.trim = plugin_trim,
	.zero = plugin_zero,
	.extents = plugin_extents,
	.describe = plugin_describe,
	.close = plugin_close,
};

/* ---- ImDisk's library ABI, behind the same table ---- */

/* ImDisk's callbacks return a byte count or -1 with errno set. */
static int64_t plugin_imd_result(ssize_t n)
{
	int e = errno;

	if (n >= 0)
		return n;
	return n == -1 && e > 0 && e <= PLUGIN_MAX_ERRNO ? -e : n;
}

static int64_t plugin_imd_read(void *h, void *buf, uint64_t len, uint64_t off)
{
	struct plugin *pl = h;

	errno = 0;
	return plugin_imd_result(pl->imd_read(pl->imd_handle, buf, (size_t)len, (int64_t)off));
}

static int64_t plugin_imd_write(void *h, const void *buf, uint64_t len, uint64_t off)
{
	struct plugin *pl = h;

	errno = 0;
	return plugin_imd_result(pl->imd_write(pl->imd_handle, (void *)buf, (size_t)len, (int64_t)off));
}

static void plugin_imd_close(void *h)
{
	struct plugin *pl = h;

	if (pl->imd_close(pl->imd_handle))
		devio_warn("%s: the library's close failed", pl->name);
}

static int plugin_imd_size(void *h, uint64_t *bytes)
{
	*bytes = 0; /* filled in from dllopen's answer by the caller */
	return 0;
}

/* Call PROC as dllopen and check what it handed back. */
static int plugin_imd_open(struct plugin *pl, const char *proc, const char *args, bool readonly, uint64_t *size)
{
	imd_open_fn open_fn = (imd_open_fn)(uintptr_t)dlsym(pl->dl, proc);
	int64_t sz = 0;

	if (!open_fn) {
		devio_err("%s: no procedure %s in the library", pl->name, proc);
		return -ENOENT;
	}
	errno = 0;
	pl->imd_handle = open_fn(args, readonly, &pl->imd_read, &pl->imd_write, &pl->imd_close, &sz);
	if (!pl->imd_handle || pl->imd_handle == (void *)-1) {
		devio_err("%s: %s('%s') failed%s%s", pl->name, proc, args, errno ? ": " : "", errno ? strerror(errno) : "");
		return -EIO;
	}
	if (!pl->imd_read || !pl->imd_close || (!readonly && !pl->imd_write)) {
		/* the handle cannot be closed without a close procedure */
		devio_err("%s: %s gave no %s procedure", pl->name, proc,
			  !pl->imd_read ? "read" : !pl->imd_close ? "close" : "write");
		return -EINVAL;
	}
	pl->ops = (struct devio_plugin){ .name = "ImDisk dllopen", .size = plugin_imd_size, .read = plugin_imd_read,
					 .close = plugin_imd_close, .write = readonly ? NULL : plugin_imd_write };
	pl->handle = pl;
	pl->opened = true;
	pl->serial = true;
	if (sz < 0) {
		devio_err("%s: %s reported a negative size (%" PRId64 ")", pl->name, proc, sz);
		return -EINVAL;
	}
	*size = (uint64_t)sz;
	return 0;
}

/* ---- devio's ABI ---- */

/* Copy and check the plugin's table. */
static int plugin_table(struct plugin *pl)
{
	devio_plugin_entry_fn entry = (devio_plugin_entry_fn)(uintptr_t)dlsym(pl->dl, DEVIO_PLUGIN_ENTRY);
	const struct devio_plugin *t;

	if (!entry) {
		devio_err("%s: the library exports no %s (not a devio plugin? ImDisk libraries need ;PROC)", pl->name,
			  DEVIO_PLUGIN_ENTRY);
		return -ENOENT;
	}
	t = entry();
	if (!t) {
		devio_err("%s: %s returned NULL", pl->name, DEVIO_PLUGIN_ENTRY);
		return -EINVAL;
	}
	if (t->abi_version != DEVIO_PLUGIN_ABI_VERSION) {
		devio_err("%s: built for plugin ABI %" PRIu32 ", this devio has %d", pl->name, t->abi_version,
			  DEVIO_PLUGIN_ABI_VERSION);
		return -EPROTO;
	}
	if (t->struct_size < offsetof(struct devio_plugin, write)) {
		devio_err("%s: plugin table of %" PRIu32 " bytes is too short", pl->name, t->struct_size);
		return -EPROTO;
	}
	memcpy(&pl->ops, t, t->struct_size < sizeof(pl->ops) ? t->struct_size : sizeof(pl->ops));
	if (!pl->ops.open || !pl->ops.size || !pl->ops.read || !pl->ops.close) {
		devio_err("%s: the plugin lacks a required callback (open, size, read, close)", pl->name);
		return -EINVAL;
	}
	pl->serial = !(pl->ops.flags & DEVIO_PLUGIN_THREAD_SAFE);
	return 0;
}

static int plugin_start(struct plugin *pl, const char *args, bool readonly, uint64_t *size)
{
	int r = plugin_table(pl);

	if (r)
		return r;
	r = plugin_status(pl, "open", 0, pl->ops.open(args, readonly, &pl->handle));
	if (r) {
		devio_err("%s: open('%s') failed: %s", pl->name, args, strerror(-r));
		return r;
	}
	pl->opened = true;
	r = plugin_status(pl, "size", 0, pl->ops.size(pl->handle, size));
	if (r)
		devio_err("%s: size failed: %s", pl->name, strerror(-r));
	return r;
}

/* ---- opening ---- */

/* The size to serve: the plugin's, or where it says 0 (it cannot tell)
 * --offset + --size, which the window layer above then cuts out. */
static int plugin_size(struct plugin *pl, const struct devio_open_opts *o, uint64_t *size)
{
	uint64_t base = o->has_offset ? o->offset : 0;

	if (*size > PLUGIN_MAX_SIZE) {
		devio_err("%s: the plugin reports %" PRIu64 " bytes, more than 2^63 - 1", pl->name, *size);
		return -EINVAL;
	}
	if (*size == 0 && o->has_size && o->size && base <= PLUGIN_MAX_SIZE - o->size)
		*size = base + o->size;
	if (*size == 0) {
		devio_err("%s: the plugin reports size 0; give the size with --size", pl->name);
		return -EINVAL;
	}
	return 0;
}

static void plugin_caps(struct devio_backend *b, const struct plugin *pl, bool readonly)
{
	b->caps = DEVIO_CAP_MULTI_CONN;
	if (readonly || !pl->ops.write)
		b->caps |= DEVIO_CAP_READONLY;
	if (pl->ops.flush)
		b->caps |= DEVIO_CAP_FLUSH | DEVIO_CAP_FUA;
	if (pl->ops.trim && !(b->caps & DEVIO_CAP_READONLY))
		b->caps |= DEVIO_CAP_TRIM;
	if (pl->ops.zero && !(b->caps & DEVIO_CAP_READONLY))
		b->caps |= DEVIO_CAP_ZERO;
	if (pl->ops.extents)
		b->caps |= DEVIO_CAP_EXTENTS;
}

/* The ops a plugin lacks are not offered to the core either. */
static void plugin_backend_table(struct plugin *pl)
{
	struct devio_backend_ops *ops = &pl->bops;

	*ops = plugin_backend_ops;
	if (!pl->ops.write)
		ops->pwrite = NULL;
	if (!pl->ops.flush)
		ops->flush = NULL;
	if (!pl->ops.trim)
		ops->trim = NULL;
	if (!pl->ops.zero)
		ops->zero = NULL;
	if (!pl->ops.extents)
		ops->extents = NULL;
}

/* Split "LIB[;PROC][:ARGS]" (after "plugin:") into its parts in buf. */
static int plugin_parse(const char *spec, char *buf, size_t buflen, char **lib, char **proc, char **args)
{
	size_t n;

	if (strlen(spec) >= buflen)
		return -ENAMETOOLONG;
	strcpy(buf, spec);
	*lib = buf;
	*proc = NULL;
	*args = buf + strlen(buf);
	n = strcspn(buf, ":;");
	if (n == 0)
		return -EINVAL;
	if (buf[n] == ';') {
		buf[n] = '\0';
		*proc = buf + n + 1;
		n = strcspn(*proc, ":");
		if (n == 0)
			return -EINVAL;
		if ((*proc)[n] == ':') {
			(*proc)[n] = '\0';
			*args = *proc + n + 1;
		}
	} else if (buf[n] == ':') {
		buf[n] = '\0';
		*args = buf + n + 1;
	}
	return 0;
}

static int plugin_load(struct plugin *pl, const char *source, const struct devio_open_opts *o, uint64_t *size)
{
	char spec[4096], *lib, *proc, *args;
	int r = plugin_parse(source + 7, spec, sizeof(spec), &lib, &proc, &args);

	if (r) {
		devio_err("%s: want plugin:LIB[:ARGS] or plugin:LIB;PROC[:ARGS]", source);
		return r;
	}
	pl->dl = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
	if (!pl->dl) {
		devio_err("%s: cannot load: %s", source, dlerror());
		return -ENOENT;
	}
	if (proc && strcmp(proc, DEVIO_PLUGIN_ENTRY))
		r = plugin_imd_open(pl, proc, args, o->readonly, size);
	else
		r = plugin_start(pl, args, o->readonly, size);
	return r ? r : plugin_size(pl, o, size);
}

int devio_plugin_open(const char *source, const struct devio_open_opts *opts, struct devio_backend **out)
{
	struct plugin *pl = calloc(1, sizeof(*pl));
	struct devio_backend *b = NULL;
	uint64_t size = 0;
	int r;

	if (!pl)
		return -ENOMEM;
	pthread_mutex_init(&pl->lock, NULL);
	snprintf(pl->name, sizeof(pl->name), "%s", source);
	if (opts->partition) {
		devio_err("%s: --partition does not apply to a plugin (the ImDisk line's partition numbers do)", source);
		r = -EINVAL;
		goto fail;
	}
	if ((r = plugin_load(pl, source, opts, &size)))
		goto fail;
	b = calloc(1, sizeof(*b));
	if (!b) {
		r = -ENOMEM;
		goto fail;
	}
	plugin_backend_table(pl);
	b->ops = &pl->bops;
	b->run = DEVIO_RUN_BLOCKING;
	b->size = size;
	b->block_size = 1;
	b->priv = pl;
	plugin_caps(b, pl, opts->readonly);
	*out = b;
	return 0;
fail:
	free(b);
	plugin_free(pl);
	return r;
}
