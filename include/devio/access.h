/* access.h - who may connect to a TCP listener: --allow ADDR[/PREFIX]
 * lists (lib/access.c).  IPv4 entries and peers are compared as
 * v4-mapped IPv6 (::ffff:a.b.c.d), so "--allow 10.0.0.0/8" also admits a
 * v4 client of a dual-stack socket, and "--allow ::ffff:10.0.0.0/104" is
 * the same entry. */
#ifndef DEVIO_ACCESS_H
#define DEVIO_ACCESS_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DEVIO_ALLOW_MAX 32

struct devio_allow {
	uint8_t addr[16];   /* IPv6, or v4-mapped; the bits past prefix are zero */
	unsigned prefix;    /* 0..128 */
};

/* "ADDR" or "ADDR/PREFIX" (IPv4 a.b.c.d[/0..32], IPv6 x::y[/0..128],
 * optionally in [brackets]); host bits past the prefix must be zero.
 * 0 or -EINVAL. */
int devio_allow_parse(const char *s, struct devio_allow *out);

/* True if the peer address sa (AF_INET or AF_INET6) is inside any of the
 * n entries; a peer of another family (AF_UNIX) never is. */
bool devio_allow_match(const struct devio_allow *list, unsigned n, const struct sockaddr *sa, socklen_t len);

#ifdef __cplusplus
}
#endif
#endif
