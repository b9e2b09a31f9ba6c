/* backend.c - opens the stack of backends a SOURCE and its options name
 * (store, image format, window), closes stacks, and finds a server's
 * export by name. */
#include <ctype.h>
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include "devio/backend.h"
#include "devio/cow.h"
#include "devio/frontend.h"
#include "devio/layer.h"
#include "devio/shm.h"
#include "devio/util.h"
#include "nbd_client.h"


/* SCHEME://... that is no file: an unsupported URI (said so), never "No
 * such file or directory". */
static bool backend_unknown_scheme(const char *source)
{
	size_t n = strspn(source, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-");
	struct stat st;

	if (n == 0 || !isalpha((unsigned char)source[0]) || strncmp(source + n, "://", 3) || !stat(source, &st))
		return false;
	devio_err("%s: unsupported URI scheme '%.*s' (devio://, devio+unix://, devio+shm://, nbd://, "
		  "nbd+unix://, or a file)", source, (int)n, source);
	return true;
}

static int backend_store_open(const char *source, const struct devio_open_opts *opts,
			      struct devio_backend **out)
{
	uint64_t size;
	int r;

	if (!strncmp(source, "ram:", 4)) {
		const char *image = strchr(source, ','); /* ram:SIZE,image=FILE */
		char sz[32];

		snprintf(sz, sizeof(sz), "%.*s", image ? (int)(image - source - 4) : 31, source + 4);
		r = devio_parse_size(sz, &size);
		if (r || size == 0) {
			devio_err("%s: %s RAM disk size (want ram:SIZE, e.g. ram:1G)", source,
				  r == -ERANGE ? "too large a" : "bad");
			return -EINVAL;
		}
		return image ? devio_ram_image_open(size, image + 1, opts->ram_max, out)
			     : devio_ram_open(size, opts->ram_max, out);
	}
	if (!strncmp(source, "devio://", 8) || !strncmp(source, "devio+unix://", 13) || !strncmp(source, "devio+tls://", 12))
		return devio_remote_devio_open(source, opts, out);
	if (!strncmp(source, "devio+shm://", 12))
		return devio_remote_shm_open(source, opts, out);
	if (devio_nbd_uri_is_nbd(source)) /* nbds://, nbd+vsock://: an error, never a file */
		return devio_remote_nbd_open(source, opts, out);
	if (!strncmp(source, "rbd:", 4))
		return devio_rbd_open(source, opts, out);
	if (!strncmp(source, "plugin:", 7))
		return devio_plugin_open(source, opts, out);
	if (backend_unknown_scheme(source))
		return -EPROTONOSUPPORT;
	return devio_file_open(source, opts, out);
}

#ifndef DEVIO_HAVE_RBD
int devio_rbd_open(const char *source, const struct devio_open_opts *opts, struct devio_backend **out)
{
	(void)opts;
	(void)out;
	devio_err("%s: this devio was built without Ceph RBD support (librbd-dev)", source);
	return -ENOTSUP;
}
#endif

/* The stack a SOURCE and its options name, bottom up: the store; the
 * image-format layer; the window layer for --partition, --offset/--size
 * inside it and -r where the store below is writable.  A layer that is
 * not needed is not there. */
static int backend_open(const char *source, const struct devio_open_opts *opts, struct devio_backend **out)
{
	struct devio_backend *store, *fmt;
	int r = backend_store_open(source, opts, &store);

	if (r)
		return r;
	r = devio_format_open(source, store, opts->format, opts, &fmt);
	if (r) {
		devio_backend_close(store);
		return r;
	}
	r = devio_window_open(source, fmt, opts, out);
	if (r)
		devio_backend_close(fmt);
	return r;
}

/* With --cow: the stack below opened read-only whatever the options say
 * (the source is never written), the overlay on top. */
static int backend_cow_stack_open(const char *source, const struct devio_open_opts *opts,
				  struct devio_backend **out)
{
	struct devio_open_opts below = *opts;
	struct devio_backend *lower;
	int r;

	below.readonly = true;
	below.cow = NULL;
	r = backend_open(source, &below, &lower);
	if (r)
		return r;
	r = devio_cow_open(lower, opts->cow, opts, out);
	if (r)
		devio_backend_close(lower);
	return r;
}

/* The backends log why they fail; the few failures they do not explain
 * (out of memory) are told here, so every failure is told once. */
int devio_backend_open(const char *source, const struct devio_open_opts *opts, struct devio_backend **out)
{
	static const struct devio_open_opts none;
	unsigned long errors = devio_log_errors();
	int r = opts && opts->cow ? backend_cow_stack_open(source, opts, out)
				  : backend_open(source, opts ? opts : &none, out);

	if (r && devio_log_errors() == errors)
		devio_err("%s: cannot open: %s", source, strerror(-r));
	return r;
}

/* A stack closes from the top: the layer first, then what it wrapped. */
void devio_backend_close(struct devio_backend *b)
{
	while (b) {
		struct devio_backend *lower = b->lower;

		if (b->ops->close)
			b->ops->close(b);
		b = lower;
	}
}

struct devio_export *devio_server_export(struct devio_server *srv, const char *name)
{
	if (!name)
		name = "";
	for (size_t i = 0; i < srv->n_exports; i++)
		if (!strcmp(srv->exports[i].name, name))
			return &srv->exports[i];
	return NULL;
}
