/* stream.c - the --devio front end (not written yet). */
#include <errno.h>
#include "devio/frontend.h"

static int start(struct devio_server *srv, const char *arg, void **state)
{
	(void)srv; (void)arg; (void)state;
	return -ENOSYS;
}

static void stop(void *state) { (void)state; }

const struct devio_frontend_type devio_frontend_stream = {
	.option = "devio",
	.start = start,
	.stop = stop,
};
