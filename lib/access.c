/* access.c - --allow ADDR[/PREFIX] lists for the TCP listeners
 * (include/devio/access.h): parse an entry, match a peer against a list.
 * Everything is compared as IPv6, IPv4 as v4-mapped (::ffff:0:0/96). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include "devio/access.h"
#include "devio/util.h"

static void access_map_v4(const struct in_addr *a4, uint8_t out[16])
{
	memset(out, 0, 10);
	out[10] = out[11] = 0xff;
	memcpy(out + 12, &a4->s_addr, 4);
}

/* Do the first prefix bits of a and b agree? */
static bool access_prefix_equal(const uint8_t *a, const uint8_t *b, unsigned prefix)
{
	unsigned bytes = prefix / 8, bits = prefix % 8;

	if (memcmp(a, b, bytes))
		return false;
	if (!bits)
		return true;
	return ((a[bytes] ^ b[bytes]) & (uint8_t)(0xff << (8 - bits))) == 0;
}

static bool access_host_bits_zero(const uint8_t *a, unsigned prefix)
{
	static const uint8_t zero[16];
	uint8_t masked[16];

	memcpy(masked, a, 16);
	for (unsigned i = 0; i < 128; i++)
		if (i < prefix)
			masked[i / 8] &= (uint8_t)~(0x80u >> (i % 8));
	return !memcmp(masked, zero, 16);
}

int devio_allow_parse(const char *s, struct devio_allow *out)
{
	char host[INET6_ADDRSTRLEN + 2];
	const char *slash = strchr(s, '/');
	size_t hl = slash ? (size_t)(slash - s) : strlen(s);
	struct in_addr a4;
	struct in6_addr a6;
	uint64_t prefix;
	unsigned max;

	if (hl >= 2 && s[0] == '[' && s[hl - 1] == ']') {
		s++;
		hl -= 2;
	}
	if (!hl || hl >= sizeof(host))
		return -EINVAL;
	memcpy(host, s, hl);
	host[hl] = '\0';
	memset(out, 0, sizeof(*out));
	if (inet_pton(AF_INET, host, &a4) == 1) {
		access_map_v4(&a4, out->addr);
		max = 32;
	} else if (inet_pton(AF_INET6, host, &a6) == 1) {
		memcpy(out->addr, a6.s6_addr, 16);
		max = 128;
	} else {
		return -EINVAL;
	}
	prefix = max;
	if (slash && (devio_parse_u64(slash + 1, &prefix) || prefix > max))
		return -EINVAL;
	out->prefix = (unsigned)prefix + (max == 32 ? 96 : 0);
	return access_host_bits_zero(out->addr, out->prefix) ? 0 : -EINVAL;
}

bool devio_allow_match(const struct devio_allow *list, unsigned n, const struct sockaddr *sa, socklen_t len)
{
	uint8_t peer[16];

	if (sa->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in))
		access_map_v4(&((const struct sockaddr_in *)sa)->sin_addr, peer);
	else if (sa->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6))
		memcpy(peer, ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr, 16);
	else
		return false;
	for (unsigned i = 0; i < n; i++)
		if (access_prefix_equal(peer, list[i].addr, list[i].prefix))
			return true;
	return false;
}
