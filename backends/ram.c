/* ram.c - growable RAM disk (not written yet). */
#include <errno.h>
#include "devio/backend.h"

int devio_ram_open(uint64_t size, uint64_t max_resident, struct devio_backend **out)
{
	(void)size; (void)max_resident; (void)out;
	return -ENOSYS;
}

uint64_t devio_ram_resident(struct devio_backend *b) { (void)b; return 0; }
