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
