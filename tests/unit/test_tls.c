/* test_tls.c - the PSK file parser of lib/tls.c (devio_tls_psk_find):
 * psktool's lines, comments, CRLF, the first user, and every malformed
 * line refused with its number (bad hex, odd length, no colon, empty
 * name or key, names and keys over their bounds, a NUL inside). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include "devio/tls.h"

static uint8_t key[DEVIO_TLS_PSK_KEY_MAX];

static int find(const char *text, const char *user, unsigned *line)
{
	return devio_tls_psk_find(text, strlen(text), user, key, NULL, line);
}

static void test_found(void **state)
{
	static const char f[] = "# devio keys\r\n\nbob:00ff\r\nalice:0a0B\nalice:ffff\n";
	char first[DEVIO_TLS_PSK_USER_MAX + 1];
	unsigned line = 0;

	assert_int_equal(find(f, "alice", &line), 2);
	assert_int_equal(line, 4);
	assert_int_equal(key[0], 0x0a); /* the first line of a user wins */
	assert_int_equal(key[1], 0x0b);
	assert_int_equal(find(f, "bob", NULL), 2);
	assert_int_equal(key[1], 0xff);
	assert_int_equal(find(f, "carol", NULL), -ENOENT);
	assert_int_equal(find(f, "ali", NULL), -ENOENT);
	assert_int_equal(devio_tls_psk_find(f, strlen(f), NULL, key, first, NULL), 2);
	assert_string_equal(first, "bob");
	assert_int_equal(find("", "alice", NULL), -ENOENT);
	/* no newline at the end, and a text that is not NUL-terminated */
	assert_int_equal(devio_tls_psk_find("alice:0102XX", 10, "alice", key, NULL, NULL), 2);
	assert_int_equal(key[1], 2);
}

static void test_malformed(void **state)
{
	static const struct { const char *text; unsigned line; } cases[] = {
		{ "alice:0g\n", 1 },
		{ "ok:00\nalice:abc\n", 2 },
		{ "alice\n", 1 },
		{ ":00\n", 1 },
		{ "alice:\n", 1 },
		{ "alice: 00\n", 1 },
	};
	char big[2 * DEVIO_TLS_PSK_KEY_MAX + 300];
	unsigned line;

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		line = 0;
		if (find(cases[i].text, "alice", &line) != -EINVAL || line != cases[i].line)
			fail_msg("'%s': want -EINVAL at line %u, got line %u", cases[i].text, cases[i].line, line);
	}
	/* a key of DEVIO_TLS_PSK_KEY_MAX bytes is fine, one more is not */
	strcpy(big, "k:");
	memset(big + 2, 'a', 2 * DEVIO_TLS_PSK_KEY_MAX);
	big[2 + 2 * DEVIO_TLS_PSK_KEY_MAX] = '\0';
	assert_int_equal(find(big, "k", NULL), DEVIO_TLS_PSK_KEY_MAX);
	strcat(big, "aa");
	assert_int_equal(find(big, "k", NULL), -EINVAL);
	/* a user name over DEVIO_TLS_PSK_USER_MAX */
	memset(big, 'u', DEVIO_TLS_PSK_USER_MAX + 1);
	strcpy(big + DEVIO_TLS_PSK_USER_MAX + 1, ":00");
	assert_int_equal(find(big, NULL, NULL), -EINVAL);
	/* a NUL inside a line */
	assert_int_equal(devio_tls_psk_find("al\0ce:00\n", 9, "alice", key, NULL, NULL), -EINVAL);
	/* a malformed line after the one looked for is not reached */
	assert_int_equal(find("alice:00\nbad\n", "alice", NULL), 1);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_found),
		cmocka_unit_test(test_malformed),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
