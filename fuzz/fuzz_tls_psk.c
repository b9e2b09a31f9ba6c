/* fuzz_tls_psk.c - libFuzzer target for the PSK file parser (lib/tls.c,
 * devio_tls_psk_find): any bytes are a PSK file's text.  Looking up the
 * first user, a fixed one and that first user again must stay inside the
 * text and the key buffer, give a key of 1..DEVIO_TLS_PSK_KEY_MAX bytes
 * or an error, and agree with each other. */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "devio/tls.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint8_t key[DEVIO_TLS_PSK_KEY_MAX], again[DEVIO_TLS_PSK_KEY_MAX];
	char first[DEVIO_TLS_PSK_USER_MAX + 1];
	unsigned line = 0;
	char *text;
	int n, m;

	if (size > 65536)
		return 0;
	text = malloc(size ? size : 1); /* exactly size bytes: no NUL after them */
	if (!text)
		return 0;
	memcpy(text, data, size);
	n = devio_tls_psk_find(text, size, NULL, key, first, &line);
	if (n == 0 || n > DEVIO_TLS_PSK_KEY_MAX || (n < 0 && n != -EINVAL && n != -ENOENT))
		abort();
	if (n > 0) {
		if (strlen(first) == 0 || strlen(first) > DEVIO_TLS_PSK_USER_MAX)
			abort();
		m = devio_tls_psk_find(text, size, first, again, NULL, NULL);
		if (m != n || memcmp(key, again, (size_t)n))
			abort(); /* the first user's own lookup finds the same key */
	}
	m = devio_tls_psk_find(text, size, "alice", again, NULL, NULL);
	if (m == 0 || m > DEVIO_TLS_PSK_KEY_MAX)
		abort();
	free(text);
	return 0;
}
