/* fuzz_devio_uri.c - libFuzzer target for the devio:// URI parser
 * (backends/devio_remote.c: devio://, devio+tls:// with its tls-*
 * parameters and USER@, devio+unix://): any bytes, as a NUL-terminated
 * string, must parse or be refused, never read or write outside the string
 * or the parser's fixed buffers; nothing is connected or opened. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "devio/backend.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const char *const prefixes[] = { "devio+tls://", "devio://", "devio+unix://", "" };
	size_t plen;
	char *s;

	if (size < 1 || size > 16384)
		return 0;
	/* the first byte picks a scheme, so most inputs reach the parser's depth */
	plen = strlen(prefixes[data[0] & 3]);
	s = malloc(plen + size);
	if (!s)
		return 0;
	memcpy(s, prefixes[data[0] & 3], plen);
	memcpy(s + plen, data + 1, size - 1);
	s[plen + size - 1] = '\0';
	(void)devio_remote_devio_check_uri(s);
	free(s);
	return 0;
}
