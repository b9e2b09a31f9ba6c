/* file.c - image files and block devices (not written yet). */
#include <errno.h>
#include "devio/backend.h"

int devio_file_open(const char *path, const struct devio_open_opts *opts, struct devio_backend **out)
{
	(void)path; (void)opts; (void)out;
	return -ENOSYS;
}
