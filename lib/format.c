/* format.c - picks the image-format layer for an opened store: detection
 * by signature, the user's --format, and the rule that an image named only
 * by auto-detection never makes devio open a backing file. */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "devio/layer.h"
#include "devio/qcow2.h"
#include "devio/util.h"

/* VHD: detected by its footer, or named.  1 = not a VHD (auto only). */
static int format_vhd(const char *name, struct devio_backend *lower, bool named,
		      const struct devio_open_opts *opts, struct devio_backend **out)
{
	int r = named ? 1 : devio_vhd_detect(name, lower);

	if (r < 0) /* a raw device with an unreadable sector is still served */
		devio_warn("%s: cannot read where a VHD footer would be (%s): serving the bytes as they are", name,
			   strerror(-r));
	if (r <= 0)
		return 1;
	return devio_vhd_open(name, lower, named, opts, out);
}

/* qcow2: detected by its magic, or named; a backing file only when named
 * (devio_qcow2_open refuses it otherwise).  1 = not qcow2 (auto only). */
static int format_qcow2(const char *name, struct devio_backend *lower, bool named,
			const struct devio_open_opts *opts, struct devio_backend **out)
{
	if (!named && !devio_qcow2_probe(lower))
		return 1;
	return devio_qcow2_open(name, lower, named, opts, out);
}

/* Auto-detection looks at image files and devices.  A remote export
 * (devio://, nbd://) is what its server chose to serve, and a new RAM disk
 * holds nothing: either is read as an image format only when asked. */
static bool format_detectable(const char *name)
{
	return !strstr(name, "://") && strncmp(name, "ram:", 4);
}

/* --format auto: qcow2 by its magic at the start, then VHD by its footer
 * at the end; raw bytes if neither. */
static int format_detect(const char *name, struct devio_backend *lower, const struct devio_open_opts *opts,
			 struct devio_backend **out)
{
	int r = format_qcow2(name, lower, false, opts, out);

	if (r == 1)
		r = format_vhd(name, lower, false, opts, out);
	if (r == 1) {
		*out = lower;
		r = 0;
	}
	return r;
}

int devio_format_open(const char *name, struct devio_backend *lower, const char *format,
		      const struct devio_open_opts *opts, struct devio_backend **out)
{
	if (format && !strcmp(format, "raw")) {
		*out = lower;
		return 0;
	}
	if (!format || !strcmp(format, "auto")) {
		if (format_detectable(name))
			return format_detect(name, lower, opts, out);
		*out = lower;
		return 0;
	}
	if (!strcmp(format, "vhd"))
		return format_vhd(name, lower, true, opts, out);
	if (!strcmp(format, "qcow2"))
		return format_qcow2(name, lower, true, opts, out);
	devio_err("%s: format '%s' is not supported (known: auto, raw, vhd, qcow2)", name, format);
	return -EINVAL;
}

/* -o KEY=VALUE[,KEY=VALUE...] of a new image: each pair to fn (0, or a
 * negative errno it logged). */
static int format_options(const char *path, const char *options,
			  int (*fn)(const char *path, const char *key, const char *val, void *ctx), void *ctx)
{
	char *copy, *save = NULL, *item;
	int r = 0;

	if (!options || !*options)
		return 0;
	copy = strdup(options);
	if (!copy)
		return -ENOMEM;
	for (item = strtok_r(copy, ",", &save); item && !r; item = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(item, '=');

		if (!eq) {
			devio_err("-o %s: want KEY=VALUE (for %s)", item, path);
			r = -EINVAL;
			break;
		}
		*eq = 0;
		r = fn(path, item, eq + 1, ctx);
	}
	free(copy);
	return r;
}

/* Set or clear flag by a yes/no value; false if val is neither. */
static bool format_flag(unsigned *flags, unsigned flag, const char *val, const char *yes, const char *no)
{
	if (strcmp(val, yes) && strcmp(val, no))
		return false;
	*flags = !strcmp(val, yes) ? *flags | flag : *flags & ~flag;
	return true;
}

/* VHD's options, named as qemu-img's: subformat=dynamic|fixed and
 * force_size=on (the size as given: the default) or off (rounded up to a
 * whole CHS geometry, qemu-img's default). */
static int format_vhd_option(const char *path, const char *key, const char *val, void *ctx)
{
	unsigned *flags = ctx;

	if (!strcmp(key, "subformat") && format_flag(flags, DEVIO_VHD_FIXED, val, "fixed", "dynamic"))
		return 0;
	if (!strcmp(key, "force_size") && format_flag(flags, DEVIO_VHD_CHS_SIZE, val, "off", "on"))
		return 0;
	devio_err("-o %s=%s: a VHD (%s) takes subformat=dynamic|fixed, force_size=on|off", key, val, path);
	return -EINVAL;
}

static int format_vhd_create(const char *path, uint64_t size, const char *options, struct devio_backend **out)
{
	unsigned flags = 0;
	int r = format_options(path, options, format_vhd_option, &flags);

	return r ? r : devio_vhd_create_open(path, size, flags, out);
}

/* qcow2's options, named as qemu-img's: compat=0.10|1.1 (or v2|v3) and
 * cluster_size=N (bytes, or with a k/M suffix). */
static int format_qcow2_option(const char *path, const char *key, const char *val, void *ctx)
{
	struct devio_qcow2_new *o = ctx;
	char *end = NULL;
	unsigned long long n;
	unsigned shift = 0;

	if (!strcmp(key, "compat") && (!strcmp(val, "0.10") || !strcmp(val, "v2"))) {
		o->version = 2;
		return 0;
	}
	if (!strcmp(key, "compat") && (!strcmp(val, "1.1") || !strcmp(val, "v3"))) {
		o->version = 3;
		return 0;
	}
	if (!strcmp(key, "cluster_size") && *val >= '0' && *val <= '9') {
		errno = 0;
		n = strtoull(val, &end, 10);
		if (*end == 'k' || *end == 'K')
			shift = 10;
		else if (*end == 'M')
			shift = 20;
		end += shift != 0;
		if (!errno && !*end && n <= (UINT32_MAX >> shift)) {
			o->cluster_size = (uint32_t)(n << shift); /* devio_qcow2_create checks the range */
			return 0;
		}
	}
	devio_err("-o %s=%s: a qcow2 image (%s) takes compat=0.10|1.1, cluster_size=512..2M (a power of two)",
		  key, val, path);
	return -EINVAL;
}

static int format_qcow2_create(const char *path, uint64_t size, const char *options, struct devio_backend **out)
{
	struct devio_qcow2_new o = { 0 };
	int r = format_options(path, options, format_qcow2_option, &o);

	return r ? r : devio_qcow2_create(path, size, &o, out);
}

/* Each format adds its create function here. */
int devio_format_create(const char *format, const char *path, uint64_t size, const char *options,
			struct devio_backend **out)
{
	if (!strcmp(format, "vhd"))
		return format_vhd_create(path, size, options, out);
	if (!strcmp(format, "qcow2"))
		return format_qcow2_create(path, size, options, out);
	devio_err("%s: cannot create images of format '%s' (known: vhd, qcow2)", path, format);
	return -EINVAL;
}
