/* test_nbd_uri.c - lib/nbd_uri.c against the examples of the NBD URI
 * specification (NetworkBlockDevice/nbd doc/uri.md) and the URIs it must
 * refuse: unknown schemes and parameters, bad percent-encoding, %00, the
 * vsock schemes this build cannot serve, TLS parameters outside nbds://. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include "../../lib/nbd_client.h"

static struct devio_nbd_uri u;
static char why[256];

static int parse(const char *s)
{
	return devio_nbd_uri_parse(s, &u, why, sizeof(why));
}

/* The export name table of the specification. */
static void test_spec_export_names(void **state)
{
	static const char *const cases[][2] = {
		{ "nbd://example.com/disk", "disk" },
		{ "nbd+unix:///disk?socket=sock", "disk" },
		{ "nbd://example.com/", "" },
		{ "nbd://example.com", "" },
		{ "nbd://example.com//disk", "/disk" },
		{ "nbd://example.com/hello%20world", "hello world" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		assert_int_equal(parse(cases[i][0]), 0);
		assert_string_equal(u.export, cases[i][1]);
	}
}

static void test_tcp(void **state)
{
	assert_int_equal(parse("nbd://example.com:10810/exp"), 0);
	assert_int_equal(u.addr.kind, DEVIO_ADDR_TCP);
	assert_string_equal(u.addr.host, "example.com");
	assert_string_equal(u.addr.port, "10810");
	assert_int_equal(parse("nbd://127.0.0.1"), 0);
	assert_string_equal(u.addr.port, "10809");
	assert_int_equal(parse("nbd://127.0.0.1:/"), 0); /* an empty port is the default */
	assert_string_equal(u.addr.port, "10809");
	assert_int_equal(parse("nbd://[::1]:10809/a"), 0);
	assert_string_equal(u.addr.host, "::1");
	assert_string_equal(u.export, "a");
	assert_int_equal(parse("nbd://[fe80::1%25eth0]"), 0);
	assert_string_equal(u.addr.host, "fe80::1%eth0");
	assert_int_equal(parse("NBD://Host"), 0); /* schemes are case-insensitive */
	assert_string_equal(u.addr.host, "Host");
	assert_int_equal(parse("nbd:///x"), 0); /* no host: this machine */
	assert_string_equal(u.addr.host, "");
	assert_int_equal(parse("nbd://h/a%2Fb%3F%25"), 0);
	assert_string_equal(u.export, "a/b?%");
}

static void test_unix(void **state)
{
	assert_int_equal(parse("nbd+unix:///?socket=/run/d.sock"), 0);
	assert_int_equal(u.addr.kind, DEVIO_ADDR_UNIX);
	assert_string_equal(u.addr.path, "/run/d.sock");
	assert_string_equal(u.export, "");
	assert_int_equal(parse("nbd+unix://?socket=rel%20dir/s"), 0);
	assert_string_equal(u.addr.path, "rel dir/s");
	assert_int_equal(parse("nbd+unix:///e%C3%A9?socket=s"), 0);
	assert_string_equal(u.export, "e\xc3\xa9");
}

static void test_tls(void **state)
{
	assert_int_equal(parse("nbds://h:10810/e?tls-certificates=/etc/pki/x%20y"), 0);
	assert_true(u.tls);
	assert_string_equal(u.addr.host, "h");
	assert_string_equal(u.tls_certificates, "/etc/pki/x y");
	assert_string_equal(u.tls_psk_file, "");
	assert_int_equal(parse("NBDS://alice@[::1]/?tls-psk-file=/k.psk"), 0);
	assert_true(u.tls);
	assert_string_equal(u.tls_username, "alice");
	assert_string_equal(u.addr.host, "::1");
	assert_string_equal(u.tls_psk_file, "/k.psk");
	assert_int_equal(parse("nbds+unix:///d?socket=/s&tls-psk-file=k&tls-username=b%40c"), 0);
	assert_true(u.tls);
	assert_int_equal(u.addr.kind, DEVIO_ADDR_UNIX);
	assert_string_equal(u.tls_username, "b@c");
	assert_int_equal(parse("nbds://h"), 0); /* the system's CAs */
	assert_int_equal(parse("nbd://h"), 0);
	assert_false(u.tls);
}

static void test_refused(void **state)
{
	static const struct { const char *uri; int err; const char *says; } cases[] = {
		{ "nbds+vsock://2:10809/", -EPROTONOSUPPORT, "no vsock" },
		{ "nbd+vsock://2:10809/", -EPROTONOSUPPORT, "no vsock" },
		{ "nbds://h/?tls-type=x509", -EINVAL, "unknown query parameter 'tls-type'" },
		{ "nbd://h/?tls-certificates=/d", -EINVAL, "belongs to nbds://" },
		{ "nbd+unix:///?socket=s&tls-psk-file=k", -EINVAL, "belongs to nbds://" },
		{ "nbd://user@h/", -EINVAL, "use nbds://" },
		{ "nbds://h/?tls-psk-file=a&tls-psk-file=b", -EINVAL, "twice" },
		{ "nbds://u@h/?tls-username=v", -EINVAL, "twice" },
		{ "nbds://h/?tls-psk-file=", -EINVAL, "without a value" },
		{ "nbds://h/?tls-certificates=d&tls-psk-file=k", -EINVAL, "exclude each other" },
		{ "nbds://h/?tls-psk-file=%00", -EINVAL, "%00" },
		{ "nbd+foo:///x", -EINVAL, "unknown scheme" },
		{ "http://h/", -EINVAL, "unknown scheme" },
		{ "disk.img", -EINVAL, "not an NBD URI: want nbd://" },
		{ "nbd:h/e", -EINVAL, "not an NBD URI: want nbd://" },
		{ "", -EINVAL, "not an NBD URI: want nbd://" },
		{ "nbd://h/e?x-foo=1", -EINVAL, "unknown query parameter 'x-foo'" },
		{ "nbd://h/e?socket=/s", -EINVAL, "nbd+unix" },
		{ "nbd+unix:///e", -EINVAL, "needs ?socket=" },
		{ "nbd+unix:///e?socket=", -EINVAL, "without a path" },
		{ "nbd+unix:///e?socket=a&socket=b", -EINVAL, "twice" },
		{ "nbd+unix:///e?socket=a&", -EINVAL, "empty query" },
		{ "nbd+unix://host/e?socket=a", -EINVAL, "takes no host" },
		{ "nbd+unix:///?socket=%00/abstract", -EINVAL, "%00" },
		{ "nbd://h/a%00b", -EINVAL, "%00" },
		{ "nbd://h/a%2", -EINVAL, "percent-encoding" },
		{ "nbd://h/a%zz", -EINVAL, "percent-encoding" },
		{ "nbd://h/a b", -EINVAL, "percent-encoded" },
		{ "nbd://h/e#frag", -EINVAL, "fragment" },
		{ "nbd://h:0/", -EINVAL, "bad port" },
		{ "nbd://h:65536/", -EINVAL, "bad port" },
		{ "nbd://h:12x/", -EINVAL, "bad port" },
		{ "nbd://::1/", -EINVAL, "" },
		{ "nbd://[::1/", -EINVAL, "IPv6" },
		{ "nbd://[]/", -EINVAL, "IPv6" },
		{ "nbd://[::1]x/", -EINVAL, "after the IPv6" },
		{ "nbd://[zz::1]/", -EINVAL, "IPv6" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int r = parse(cases[i].uri);

		if (r != cases[i].err || !strstr(why, cases[i].says))
			fail_msg("%s: got %d '%s', want %d '%s'", cases[i].uri, r, why, cases[i].err, cases[i].says);
	}
}

static void test_limits(void **state)
{
	char uri[6000];

	/* 4096 bytes of export name are fine, 4097 are not */
	strcpy(uri, "nbd://h/");
	memset(uri + 8, 'a', 4096);
	uri[8 + 4096] = '\0';
	assert_int_equal(parse(uri), 0);
	assert_int_equal(strlen(u.export), 4096);
	strcat(uri, "a");
	assert_int_equal(parse(uri), -ENAMETOOLONG);
	/* a socket path longer than sun_path */
	strcpy(uri, "nbd+unix:///?socket=/");
	memset(uri + strlen(uri), 'p', 200);
	uri[21 + 200] = '\0';
	assert_int_equal(parse(uri), -ENAMETOOLONG);
}

static void test_is_nbd(void **state)
{
	assert_true(devio_nbd_uri_is_nbd("nbd://h"));
	assert_true(devio_nbd_uri_is_nbd("nbds://h"));
	assert_true(devio_nbd_uri_is_nbd("nbd+vsock://1"));
	assert_true(devio_nbd_uri_is_nbd("nbds+unix:///?socket=s"));
	assert_true(devio_nbd_uri_is_nbd("NBD+UNIX:///?socket=s"));
	assert_false(devio_nbd_uri_is_nbd("nbd.img"));
	assert_false(devio_nbd_uri_is_nbd("nbd:x"));
	assert_false(devio_nbd_uri_is_nbd("nbdx://h"));
	assert_false(devio_nbd_uri_is_nbd("devio://h:1"));
	assert_false(devio_nbd_uri_is_nbd(NULL));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_spec_export_names),
		cmocka_unit_test(test_tcp),
		cmocka_unit_test(test_unix),
		cmocka_unit_test(test_tls),
		cmocka_unit_test(test_refused),
		cmocka_unit_test(test_limits),
		cmocka_unit_test(test_is_nbd),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
