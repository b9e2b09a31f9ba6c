/* format.c - picks the image-format layer for an opened store: detection
 * by signature, the user's --format, and the rule that an image named only
 * by auto-detection never makes devio open a backing file. */
#include <errno.h>
#include <string.h>
#include "devio/layer.h"
#include "devio/qcow2.h"
#include "devio/util.h"

/* qcow2: detected by its magic; a backing file only when named explicitly
 * (devio_qcow2_open refuses it otherwise). */
static int format_qcow2(const char *name, struct devio_backend *lower, const char *format,
			const struct devio_open_opts *opts, struct devio_backend **out)
{
	bool explicit = format && !strcmp(format, "qcow2");

	if (!explicit && !devio_qcow2_probe(lower))
		return 1; /* not qcow2: try the next format */
	return devio_qcow2_open(name, lower, explicit, opts, out);
}

int devio_format_open(const char *name, struct devio_backend *lower, const char *format,
		      const struct devio_open_opts *opts, struct devio_backend **out)
{
	bool detect = !format || !strcmp(format, "auto");
	int r;

	if (format && !strcmp(format, "raw")) {
		*out = lower;
		return 0;
	}
	if (detect || !strcmp(format, "qcow2")) {
		r = format_qcow2(name, lower, format, opts, out);
		if (r <= 0)
			return r;
	}
	if (detect) {
		*out = lower;
		return 0;
	}
	devio_err("%s: format '%s' is not supported (known: raw, qcow2)", name, format);
	return -EINVAL;
}
