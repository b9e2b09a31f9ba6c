/* devio_remote.c - a remote devio server as a backend (not written yet). */
#include <errno.h>
#include "devio/backend.h"

int devio_remote_devio_open(const char *uri, const struct devio_open_opts *opts, struct devio_backend **out)
{
	(void)uri; (void)opts; (void)out;
	return -ENOSYS;
}
