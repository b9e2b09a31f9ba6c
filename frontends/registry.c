/* registry.c - the list of front ends `devio serve` offers, and the
 * parsers their option tables share (include/devio/frontend.h). */
#include <errno.h>
#include <string.h>
#include "devio/frontend.h"
#include "devio/util.h"

const struct devio_frontend_type *const devio_frontends[] = {
	&devio_frontend_stream,
	&devio_frontend_nbd,
	&devio_frontend_fuse,
	&devio_frontend_ublk,
	NULL,
};

const struct devio_frontend_type *devio_frontend_find(const char *option)
{
	for (size_t i = 0; devio_frontends[i]; i++)
		if (!strcmp(devio_frontends[i]->option, option))
			return devio_frontends[i];
	return NULL;
}

int devio_opt_flag(const char *name, const char *val, void *field)
{
	*(bool *)field = true;
	return 0;
}

int devio_opt_string(const char *name, const char *val, void *field)
{
	if (!val || !*val) {
		devio_err("--%s: wants an argument", name);
		return -EINVAL;
	}
	*(const char **)field = val;
	return 0;
}

int devio_opt_uint(const char *name, const char *val, void *field)
{
	uint64_t v;

	if (!val || devio_parse_u64(val, &v) || v > 1u << 20) {
		devio_err("--%s: bad number '%s'", name, val ? val : "");
		return -EINVAL;
	}
	*(unsigned *)field = (unsigned)v;
	return 0;
}

int devio_opt_block_size(const char *name, const char *val, void *field)
{
	uint64_t v;

	if (!val || devio_parse_size(val, &v)) {
		devio_err("--%s: bad size '%s'", name, val ? val : "");
		return -EINVAL;
	}
	if (v < 512 || v > 65536 || (v & (v - 1))) {
		devio_err("--%s: want a power of two from 512 to 64K, got '%s'", name, val);
		return -EINVAL;
	}
	*(uint32_t *)field = (uint32_t)v;
	return 0;
}
