/* nbd_uri.c - NBD URIs as NetworkBlockDevice/nbd doc/uri.md defines them:
 * nbd://HOST[:PORT][/EXPORT] and nbd+unix:///EXPORT?socket=PATH, and
 * their TLS forms nbds:// and nbds+unix:// with tls-certificates=DIR,
 * tls-psk-file=FILE, tls-username=NAME (or USER@HOST), for the nbd://
 * backend and `devio attach --nbd-device` alike.
 *
 * Strict on purpose: a URI is untrusted text typed by a human, and a typo
 * must be an error that says what is wrong, never a file name and never
 * silently ignored.  Unknown schemes and query parameters are errors; the
 * scheme this build cannot serve (vsock) says so; percent-encoding is
 * decoded everywhere and a %00 (NUL) is refused.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/un.h>
#include "nbd_client.h"
#include "nbd_proto.h"

struct uri_err {
	char *why;
	size_t whylen;
};

static int __attribute__((format(printf, 3, 4))) uri_fail(struct uri_err *e, int err, const char *fmt, ...)
{
	va_list ap;

	if (e->why && e->whylen) {
		/* what this build lacks is not a mistake in the URI */
		int n = snprintf(e->why, e->whylen, "%s", err == -EPROTONOSUPPORT ? "" : "not an NBD URI: ");

		va_start(ap, fmt);
		if (n >= 0 && (size_t)n < e->whylen)
			vsnprintf(e->why + n, e->whylen - (size_t)n, fmt, ap);
		va_end(ap);
	}
	return err;
}

/* ---- schemes ---- */

enum uri_kind { URI_TCP, URI_UNIX, URI_VSOCK, URI_UNKNOWN };

/* Length of the scheme at s (RFC 3986: ALPHA *( ALPHA / DIGIT / + - . ))
 * if "://" follows it, else 0. */
static size_t uri_scheme_len(const char *s)
{
	size_t n = 0;

	if (!((s[0] | 32) >= 'a' && (s[0] | 32) <= 'z'))
		return 0;
	while ((s[n] | 32) >= 'a' && (s[n] | 32) <= 'z') /* ASCII letters (| 32 folds case) */
		n++;
	while ((s[n] >= '0' && s[n] <= '9') || ((s[n] | 32) >= 'a' && (s[n] | 32) <= 'z') || s[n] == '+' ||
	       s[n] == '-' || s[n] == '.')
		n++;
	return strncmp(s + n, "://", 3) ? 0 : n;
}

static bool uri_scheme_is(const char *s, size_t n, const char *name)
{
	return strlen(name) == n && !strncasecmp(s, name, n);
}

static enum uri_kind uri_scheme_kind(const char *s, size_t n)
{
	if (uri_scheme_is(s, n, "nbd") || uri_scheme_is(s, n, "nbds"))
		return URI_TCP;
	if (uri_scheme_is(s, n, "nbd+unix") || uri_scheme_is(s, n, "nbds+unix"))
		return URI_UNIX;
	if (uri_scheme_is(s, n, "nbd+vsock") || uri_scheme_is(s, n, "nbds+vsock"))
		return URI_VSOCK;
	return URI_UNKNOWN;
}

bool devio_nbd_uri_is_nbd(const char *s)
{
	size_t n = s ? uri_scheme_len(s) : 0;

	if (n < 3 || strncasecmp(s, "nbd", 3))
		return false;
	if (n == 3 || s[3] == '+')
		return true;
	return (s[3] | 32) == 's' && (n == 4 || s[4] == '+');
}

/* ---- characters and percent-encoding ---- */

static int uri_unhex(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if ((c | 32) >= 'a' && (c | 32) <= 'f')
		return (c | 32) - 'a' + 10;
	return -1;
}

/* A byte that may not appear in a URI as it is (RFC 3986 section 2). */
static bool uri_must_encode(unsigned char c)
{
	return c <= 0x20 || c >= 0x7f || strchr("\"<>\\^`{|}[]", c);
}

/* Decode [s, s+n) of the part called what into out (NUL-terminated). */
static int uri_decode(struct uri_err *e, const char *what, const char *s, size_t n, char *out, size_t outlen)
{
	size_t o = 0;

	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c == '%') {
			if (n - i < 3 || uri_unhex(s[i + 1]) < 0 || uri_unhex(s[i + 2]) < 0)
				return uri_fail(e, -EINVAL, "bad percent-encoding '%.*s' in the %s (want %%XX, two hex digits)",
						(int)(n - i < 3 ? n - i : 3), s + i, what);
			c = (unsigned char)(uri_unhex(s[i + 1]) * 16 + uri_unhex(s[i + 2]));
			if (c == 0)
				return uri_fail(e, -EINVAL, "%%00 (a NUL byte) in the %s", what);
			i += 2;
		} else if (uri_must_encode(c)) {
			return uri_fail(e, -EINVAL, "the %s has a byte 0x%02X ('%c') that must be percent-encoded (%%%02X)",
					what, c, c > 0x20 && c < 0x7f ? c : '?', c);
		}
		if (o + 1 >= outlen)
			return uri_fail(e, -ENAMETOOLONG, "the %s is longer than %zu bytes", what, outlen - 1);
		out[o++] = (char)c;
	}
	out[o] = '\0';
	return 0;
}

int devio_uri_decode(const char *what, const char *s, size_t n, char *out, size_t outlen, char *why, size_t whylen)
{
	struct uri_err e = { why, whylen };

	if (why && whylen)
		why[0] = '\0';
	return uri_decode(&e, what, s, n, out, outlen);
}

/* ---- authority ---- */

/* "PORT" or "" (the default); digits only, 1..65535. */
static int uri_port(struct uri_err *e, const char *s, size_t n, struct devio_addr *a)
{
	unsigned long v = 0;

	if (n == 0) {
		snprintf(a->port, sizeof(a->port), "%s", NBD_DEFAULT_PORT);
		return 0;
	}
	for (size_t i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9' || i >= 5)
			return uri_fail(e, -EINVAL, "bad port '%.*s' (want 1..65535)", (int)(n > 32 ? 32 : n), s);
		v = v * 10 + (unsigned long)(s[i] - '0');
	}
	if (v == 0 || v > 65535)
		return uri_fail(e, -EINVAL, "bad port '%.*s' (want 1..65535)", (int)n, s);
	snprintf(a->port, sizeof(a->port), "%lu", v);
	return 0;
}

/* Hex digits, ':' and '.', then maybe a zone: %25 and letters, digits, -._~ */
static bool uri_ipv6_chars(const char *p, const char *end)
{
	bool zone = false;

	for (; p < end; p++) {
		bool alnum = uri_unhex(*p) >= 0 || ((*p | 32) >= 'a' && (*p | 32) <= 'z');

		zone |= *p == '%';
		if (!(uri_unhex(*p) >= 0 || *p == ':' || *p == '.' || *p == '%' ||
		      (zone && (alnum || strchr("-_~", *p)))))
			return false;
	}
	return true;
}

/* USER@ before the host: the TLS PSK user name (nbds:// only). */
static int uri_user(struct uri_err *e, const char **s, size_t *n, struct devio_nbd_uri *u)
{
	const char *at = memchr(*s, '@', *n);
	int r;

	if (!at)
		return 0;
	if (!u->tls)
		return uri_fail(e, -EINVAL, "a user name (USER@HOST) is for TLS: use nbds://");
	if ((r = uri_decode(e, "user name", *s, (size_t)(at - *s), u->tls_username, sizeof(u->tls_username))))
		return r;
	*n -= (size_t)(at + 1 - *s);
	*s = at + 1;
	return 0;
}

/* [USER@]HOST[:PORT] or [USER@][IPV6][:PORT]; an empty host is this machine. */
static int uri_authority(struct uri_err *e, const char *s, size_t n, struct devio_nbd_uri *u)
{
	struct devio_addr *a = &u->addr;
	const char *end = s + n, *colon;
	int r;

	a->kind = DEVIO_ADDR_TCP;
	if ((r = uri_user(e, &s, &n, u)))
		return r;
	if (n && s[0] == '[') {
		const char *close = memchr(s, ']', n);

		if (!close || close == s + 1)
			return uri_fail(e, -EINVAL, "bad IPv6 address: want [ADDRESS] in brackets");
		if (!uri_ipv6_chars(s + 1, close))
			return uri_fail(e, -EINVAL, "bad IPv6 address '%.*s'", (int)(close - s + 1), s);
		if ((r = uri_decode(e, "IPv6 address", s + 1, (size_t)(close - s - 1), a->host, sizeof(a->host))))
			return r;
		if (close + 1 == end)
			return uri_port(e, end, 0, a);
		if (close[1] != ':')
			return uri_fail(e, -EINVAL, "unexpected '%c' after the IPv6 address", close[1]);
		return uri_port(e, close + 2, (size_t)(end - close - 2), a);
	}
	colon = memchr(s, ':', n);
	if ((r = uri_decode(e, "host", s, colon ? (size_t)(colon - s) : n, a->host, sizeof(a->host))))
		return r;
	if (strchr(a->host, ':') || strchr(a->host, '/'))
		return uri_fail(e, -EINVAL, "bad host '%s' (an IPv6 address goes in brackets: [::1])", a->host);
	return uri_port(e, colon ? colon + 1 : end, colon ? (size_t)(end - colon - 1) : 0, a);
}

/* ---- query ---- */

/* tls-certificates=DIR, tls-psk-file=FILE, tls-username=NAME: once each,
 * on nbds:// URIs only. */
static int uri_tls_param(struct uri_err *e, const char *key, const char *val, size_t n, struct devio_nbd_uri *u)
{
	static const char *const keys[] = { "tls-certificates", "tls-psk-file", "tls-username" };
	char *const fields[] = { u->tls_certificates, u->tls_psk_file, u->tls_username };
	const size_t lens[] = { sizeof(u->tls_certificates), sizeof(u->tls_psk_file), sizeof(u->tls_username) };

	for (size_t i = 0; i < 3; i++) {
		if (strcmp(key, keys[i]))
			continue;
		if (!u->tls)
			return uri_fail(e, -EINVAL, "%s= belongs to nbds:// and nbds+unix:// URIs", key);
		if (fields[i][0])
			return uri_fail(e, -EINVAL, "%s given twice (or with USER@)", key);
		if (!val || n == 0)
			return uri_fail(e, -EINVAL, "%s= without a value", key);
		return uri_decode(e, key, val, n, fields[i], lens[i]);
	}
	return uri_fail(e, -EINVAL, "unknown query parameter '%s'", key);
}

/* One "KEY=VALUE" of the query; *have_socket counts socket= seen. */
static int uri_query_param(struct uri_err *e, enum uri_kind kind, const char *s, size_t n, struct devio_nbd_uri *u,
		       bool *have_socket)
{
	const char *eq = memchr(s, '=', n);
	char key[64];
	int r;

	if (n == 0)
		return uri_fail(e, -EINVAL, "empty query parameter");
	if ((r = uri_decode(e, "query parameter name", s, eq ? (size_t)(eq - s) : n, key, sizeof(key))))
		return r;
	if (!strncmp(key, "tls-", 4))
		return uri_tls_param(e, key, eq ? eq + 1 : NULL, eq ? (size_t)(s + n - eq - 1) : 0, u);
	if (strcmp(key, "socket"))
		return uri_fail(e, -EINVAL, "unknown query parameter '%s'", key);
	if (kind != URI_UNIX)
		return uri_fail(e, -EINVAL, "socket= belongs to nbd+unix:// URIs, not nbd://");
	if (*have_socket)
		return uri_fail(e, -EINVAL, "socket= given twice");
	*have_socket = true;
	if (!eq || eq + 1 == s + n)
		return uri_fail(e, -EINVAL, "socket= without a path");
	u->addr.kind = DEVIO_ADDR_UNIX;
	r = uri_decode(e, "socket path", eq + 1, (size_t)(s + n - eq - 1), u->addr.path,
		   sizeof(((struct sockaddr_un *)0)->sun_path));
	return r;
}

static int uri_query(struct uri_err *e, enum uri_kind kind, const char *s, size_t n, struct devio_nbd_uri *u)
{
	bool have_socket = false;
	const char *end = s ? s + n : NULL; /* s is NULL when there is no query */
	int r;

	while (s && s < end) {
		const char *amp = memchr(s, '&', (size_t)(end - s));
		size_t len = amp ? (size_t)(amp - s) : (size_t)(end - s);

		if ((r = uri_query_param(e, kind, s, len, u, &have_socket)))
			return r;
		s = amp ? amp + 1 : end;
		if (amp && s == end)
			return uri_fail(e, -EINVAL, "empty query parameter");
	}
	if (kind == URI_UNIX && !have_socket)
		return uri_fail(e, -EINVAL, "nbd+unix:// needs ?socket=PATH");
	if (u->tls_certificates[0] && u->tls_psk_file[0])
		return uri_fail(e, -EINVAL, "tls-certificates= and tls-psk-file= exclude each other");
	return 0;
}

/* ---- the whole URI ---- */

static int uri_check_scheme(struct uri_err *e, const char *uri, size_t n, enum uri_kind kind)
{
	if (n == 0)
		return uri_fail(e, -EINVAL, "want nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH (nbds://, nbds+unix://: TLS)");
	if (kind == URI_VSOCK)
		return uri_fail(e, -EPROTONOSUPPORT, "%.*s://: unsupported (no vsock in this build)", (int)n, uri);
	if (kind == URI_UNKNOWN)
		return uri_fail(e, -EINVAL, "unknown scheme '%.*s' (want nbd://, nbds://, nbd+unix:// or nbds+unix://)",
				(int)(n > 32 ? 32 : n), uri);
	return 0;
}

int devio_nbd_uri_parse(const char *uri, struct devio_nbd_uri *u, char *why, size_t whylen)
{
	struct uri_err e = { why, whylen };
	size_t n = uri ? uri_scheme_len(uri) : 0;
	enum uri_kind kind = uri_scheme_kind(uri ? uri : "", n);
	const char *auth, *path, *query;
	size_t alen, plen;
	int r;

	memset(u, 0, sizeof(*u));
	if (why && whylen)
		why[0] = '\0';
	if ((r = uri_check_scheme(&e, uri ? uri : "", n, kind)))
		return r;
	u->tls = (uri[3] | 32) == 's';
	auth = uri + n + 3;
	if (strchr(auth, '#'))
		return uri_fail(&e, -EINVAL, "a fragment (#...) means nothing in an NBD URI");
	alen = strcspn(auth, "/?");
	path = auth + alen;
	plen = strcspn(path, "?");
	query = path[plen] == '?' ? path + plen + 1 : NULL;
	if (kind == URI_UNIX && alen)
		return uri_fail(&e, -EINVAL, "nbd[s]+unix:// takes no host ('%.*s'): want nbd+unix:///EXPORT?socket=PATH",
				(int)(alen > 64 ? 64 : alen), auth);
	if (kind == URI_TCP && (r = uri_authority(&e, auth, alen, u)))
		return r;
	/* The export name is the path without its leading '/'. */
	if (plen && (r = uri_decode(&e, "export name", path + 1, plen - 1, u->export, sizeof(u->export))))
		return r;
	return uri_query(&e, kind, query, query ? strlen(query) : 0, u);
}
