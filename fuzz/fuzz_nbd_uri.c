/* fuzz_nbd_uri.c - libFuzzer target for the NBD URI parser
 * (lib/nbd_uri.c): any bytes, as a NUL-terminated string, must parse or
 * be refused with a message, never read or write outside the string and
 * the result; a success must give a TCP address or a Unix socket path
 * and an export name that fit their buffers and hold no NUL. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../lib/nbd_client.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct devio_nbd_uri u;
	char *s, why[256];
	int r;

	if (size > 16384)
		return 0;
	s = malloc(size + 1);
	if (!s)
		return 0;
	memcpy(s, data, size);
	s[size] = '\0';
	r = devio_nbd_uri_parse(s, &u, why, sizeof(why));
	if (r == 0) {
		if (u.addr.kind != DEVIO_ADDR_TCP && u.addr.kind != DEVIO_ADDR_UNIX)
			abort();
		if (u.addr.kind == DEVIO_ADDR_UNIX && !u.addr.path[0])
			abort();
		if (strlen(u.export) > NBD_MAX_EXPORT_NAME)
			abort();
	} else if (!why[0] || strlen(why) >= sizeof(why)) {
		abort(); /* every refusal says why */
	}
	(void)devio_nbd_uri_is_nbd(s);
	free(s);
	return 0;
}
