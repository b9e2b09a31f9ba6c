/* test_access.c - --allow entries (lib/access.c): parsing, prefixes, and
 * IPv4 peers matched as v4-mapped IPv6. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include "devio/access.h"

static bool access_v4(const struct devio_allow *l, unsigned n, const char *ip)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };

	assert_int_equal(inet_pton(AF_INET, ip, &sin.sin_addr), 1);
	return devio_allow_match(l, n, (struct sockaddr *)&sin, sizeof(sin));
}

static bool access_v6(const struct devio_allow *l, unsigned n, const char *ip)
{
	struct sockaddr_in6 sin6 = { .sin6_family = AF_INET6 };

	assert_int_equal(inet_pton(AF_INET6, ip, &sin6.sin6_addr), 1);
	return devio_allow_match(l, n, (struct sockaddr *)&sin6, sizeof(sin6));
}

static void test_parse(void **state)
{
	struct devio_allow a;

	assert_int_equal(devio_allow_parse("10.0.0.0/8", &a), 0);
	assert_int_equal(a.prefix, 104);
	assert_int_equal(devio_allow_parse("192.168.1.7", &a), 0);
	assert_int_equal(a.prefix, 128);
	assert_int_equal(devio_allow_parse("[fd00::]/8", &a), 0);
	assert_int_equal(a.prefix, 8);
	assert_int_equal(devio_allow_parse("0.0.0.0/0", &a), 0);
	assert_int_equal(devio_allow_parse("::/0", &a), 0);
	assert_int_equal(devio_allow_parse("10.0.0.1/8", &a), -EINVAL);  /* host bits set */
	assert_int_equal(devio_allow_parse("10.0.0.0/33", &a), -EINVAL);
	assert_int_equal(devio_allow_parse("::1/129", &a), -EINVAL);
	assert_int_equal(devio_allow_parse("10.0.0.0/", &a), -EINVAL);
	assert_int_equal(devio_allow_parse("host.example", &a), -EINVAL);
	assert_int_equal(devio_allow_parse("", &a), -EINVAL);
	assert_int_equal(devio_allow_parse("/8", &a), -EINVAL);
}

static void test_match(void **state)
{
	struct devio_allow l[3];

	assert_int_equal(devio_allow_parse("10.1.0.0/16", &l[0]), 0);
	assert_int_equal(devio_allow_parse("192.168.5.0/25", &l[1]), 0);
	assert_int_equal(devio_allow_parse("fd00:1::/32", &l[2]), 0);
	assert_true(access_v4(l, 3, "10.1.255.3"));
	assert_false(access_v4(l, 3, "10.2.0.1"));
	assert_true(access_v4(l, 3, "192.168.5.127"));
	assert_false(access_v4(l, 3, "192.168.5.128"));
	assert_true(access_v6(l, 3, "::ffff:10.1.2.3")); /* a v4 client of a dual-stack socket */
	assert_false(access_v6(l, 3, "::10.1.2.3"));      /* v4-compatible is not v4 */
	assert_true(access_v6(l, 3, "fd00:1:ffff::1"));
	assert_false(access_v6(l, 3, "fd00:2::1"));
	assert_false(access_v4(l, 0, "10.1.0.1"));         /* an empty list admits nobody here */
}

static void test_everyone_and_other_families(void **state)
{
	struct devio_allow any4, any6;
	struct sockaddr sa = { .sa_family = AF_UNIX };

	assert_int_equal(devio_allow_parse("0.0.0.0/0", &any4), 0);
	assert_int_equal(devio_allow_parse("::/0", &any6), 0);
	assert_true(access_v4(&any4, 1, "203.0.113.9"));
	assert_false(access_v6(&any4, 1, "2001:db8::1")); /* v4's /0 is ::ffff:0:0/96 */
	assert_true(access_v6(&any6, 1, "2001:db8::1"));
	assert_true(access_v4(&any6, 1, "203.0.113.9"));
	assert_false(devio_allow_match(&any6, 1, &sa, sizeof(sa)));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse),
		cmocka_unit_test(test_match),
		cmocka_unit_test(test_everyone_and_other_families),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
