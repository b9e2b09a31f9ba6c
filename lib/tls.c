/* tls.c - TLS over a connected socket with GnuTLS (include/devio/tls.h):
 * credentials (X.509 from a certificates directory laid out as nbdkit and
 * qemu do, or a PSK file of "username:hexkey" lines), the handshake under
 * a deadline, record send/recv, close_notify.
 *
 * The socket stays blocking; our own pull function honours a per-call
 * "don't wait" flag so that the NBD reader can look for more requests
 * without sleeping (GnuTLS keeps a partial record and resumes it).  When
 * GnuTLS hands the record layer to the kernel (KTLS: GnuTLS built with it
 * and enabled in its system config, the tls module loaded), records go
 * through the socket directly; the log says which.
 *
 * A PSK file is untrusted input: read up to DEVIO_TLS_PSK_FILE_MAX bytes,
 * lines up to DEVIO_TLS_PSK_LINE_MAX, user names and keys bounded, hex
 * checked; fuzz/fuzz_tls_psk.c runs the parser.
 */
#include <errno.h>
#include <stdatomic.h>
#include <fcntl.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <poll.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include "devio/tls.h"
#include "devio/util.h"

#define TLS_PSK_PRIORITY ":+ECDHE-PSK:+DHE-PSK:+PSK"
#define TLS_READ_AHEAD 65536u  /* bytes one receive may take from the socket */
#define TLS_RECORD 16384u      /* the most plaintext one record carries */

struct devio_tls_creds {
	bool server, psk;
	gnutls_certificate_credentials_t x509;
	gnutls_psk_server_credentials_t psk_server;
	gnutls_psk_client_credentials_t psk_client;
	gnutls_priority_t prio;
	bool verify_peer;
	char *psk_text;    /* the server's PSK file, looked up per handshake */
	size_t psk_len;
	char source[300];  /* for messages */
};

struct devio_tls {
	gnutls_session_t s;
	struct devio_tls_creds *cr;
	int fd;
	bool nonblock;     /* pull: do not wait (reader thread only) */
	bool owns_cr;      /* free cr with the session */
	bool ktls;
	atomic_bool broken; /* a fatal error or a send timeout: no goodbye (reader and senders set it) */
	uint64_t deadline; /* pull/push during the handshake */
	char peer[64];
	/* Read-ahead: GnuTLS asks for a record's header, then its body; one
	 * receive of whatever the socket holds serves many such asks (several
	 * small requests' records in one syscall instead of two each). */
	size_t ra_start, ra_end;
	uint8_t ra[TLS_READ_AHEAD];
	/* Small pieces of a writev (reply headers, 4 KiB reads) are copied
	 * here until they fill a record.  out_left: plaintext bytes of the
	 * writev not sent yet; push_more: more packed records follow this
	 * one (MSG_MORE, so that the kernel sends the batch as one). */
	size_t out_len, out_left;
	bool push_more;
	uint8_t out[TLS_RECORD];
};

static int tls_err(const char *what, const char *where, int gr)
{
	devio_err("tls: %s%s%s: %s", what, where ? " " : "", where ? where : "", gnutls_strerror(gr));
	return gr == GNUTLS_E_MEMORY_ERROR ? -ENOMEM : -EINVAL;
}

/* ---- PSK files ---- */

static int tls_hex(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if ((c | 32) >= 'a' && (c | 32) <= 'f')
		return (c | 32) - 'a' + 10;
	return -1;
}

/* One line (without its newline): 1 and the key if it is user's, 0 if
 * another user's or a comment, -EINVAL if malformed. */
static int tls_psk_line(const char *l, size_t n, const char *user, uint8_t *key, char *first_user, int *keylen)
{
	const char *colon;
	size_t ulen, hlen;

	if (n && l[n - 1] == '\r')
		n--;
	if (n == 0 || l[0] == '#')
		return 0;
	if (n > DEVIO_TLS_PSK_LINE_MAX || !(colon = memchr(l, ':', n)))
		return -EINVAL;
	ulen = (size_t)(colon - l);
	hlen = n - ulen - 1;
	if (ulen == 0 || ulen > DEVIO_TLS_PSK_USER_MAX || hlen == 0 || hlen % 2 || hlen / 2 > DEVIO_TLS_PSK_KEY_MAX ||
	    memchr(l, '\0', n))
		return -EINVAL;
	for (size_t i = 0; i < hlen; i++)
		if (tls_hex(colon[1 + i]) < 0)
			return -EINVAL;
	if (user && (strlen(user) != ulen || memcmp(user, l, ulen)))
		return 0;
	for (size_t i = 0; i < hlen / 2; i++)
		key[i] = (uint8_t)(tls_hex(colon[1 + 2 * i]) * 16 + tls_hex(colon[2 + 2 * i]));
	if (!user && first_user) {
		memcpy(first_user, l, ulen);
		first_user[ulen] = '\0';
	}
	*keylen = (int)(hlen / 2);
	return 1;
}

int devio_tls_psk_find(const char *buf, size_t len, const char *user, uint8_t key[DEVIO_TLS_PSK_KEY_MAX],
		       char *first_user, unsigned *lineno)
{
	size_t pos = 0;
	unsigned line = 0;

	while (pos < len) {
		const char *nl = memchr(buf + pos, '\n', len - pos);
		size_t n = nl ? (size_t)(nl - buf - pos) : len - pos;
		int keylen = 0, r;

		line++;
		if (lineno)
			*lineno = line;
		r = tls_psk_line(buf + pos, n, user, key, first_user, &keylen);
		if (r < 0)
			return r;
		if (r > 0)
			return keylen;
		pos += n + 1;
	}
	return -ENOENT;
}

/* Read the whole PSK file (bounded); warn when others may read it. */
static int tls_psk_load(const char *path, char **text, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	ssize_t n;

	if (fd < 0 || fstat(fd, &st)) {
		int e = errno;
		devio_err("tls: PSK file %s: %s", path, strerror(e));
		if (fd >= 0)
			close(fd);
		return -e;
	}
	if (!S_ISREG(st.st_mode) || st.st_size > DEVIO_TLS_PSK_FILE_MAX) {
		devio_err("tls: PSK file %s: not a regular file of at most %u bytes", path, DEVIO_TLS_PSK_FILE_MAX);
		close(fd);
		return -EINVAL;
	}
	if (st.st_mode & 077)
		devio_warn("tls: PSK file %s can be read by others (mode %03o): chmod 600 it", path,
			   (unsigned)(st.st_mode & 0777));
	*text = malloc((size_t)st.st_size + 1);
	if (!*text) {
		close(fd);
		return -ENOMEM;
	}
	n = read(fd, *text, (size_t)st.st_size);
	close(fd);
	if (n != st.st_size) {
		devio_err("tls: PSK file %s: short read", path);
		free(*text);
		return -EIO;
	}
	*len = (size_t)n;
	return 0;
}

/* Look user up (NULL: only check every line) and say what is wrong. */
static int tls_psk_check(const char *path, const char *text, size_t len, const char *user, uint8_t *key)
{
	unsigned line = 0;
	int r = devio_tls_psk_find(text, len, user ? user : "\n", key, NULL, &line);

	if (r == -EINVAL)
		devio_err("tls: PSK file %s line %u: want USERNAME:HEXKEY (an even number of hex digits, "
			  "at most %u bytes of key, names up to %u bytes, lines up to %u)",
			  path, line, DEVIO_TLS_PSK_KEY_MAX, DEVIO_TLS_PSK_USER_MAX, DEVIO_TLS_PSK_LINE_MAX);
	else if (r == -ENOENT && !user)
		return 0;
	else if (r == -ENOENT)
		devio_err("tls: PSK file %s: no key for user '%s'", path, user);
	return r;
}

/* The server's PSK callback: the key for the user the client named. */
static int tls_psk_server_cb(gnutls_session_t s, const char *user, gnutls_datum_t *key)
{
	struct devio_tls *t = gnutls_session_get_ptr(s);
	uint8_t k[DEVIO_TLS_PSK_KEY_MAX];
	int n = devio_tls_psk_find(t->cr->psk_text, t->cr->psk_len, user, k, NULL, NULL);

	if (n <= 0) {
		devio_warn("tls %s: PSK user '%.64s' unknown; refused", t->peer, user);
		return -1;
	}
	key->data = gnutls_malloc((size_t)n);
	if (!key->data)
		return -1;
	memcpy(key->data, k, (size_t)n);
	key->size = (unsigned)n;
	explicit_bzero(k, sizeof(k));
	return 0;
}

/* ---- credentials ---- */

static int tls_path(char *out, size_t len, const char *dir, const char *file)
{
	int n = snprintf(out, len, "%s/%s", dir, file);

	return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

static bool tls_exists(const char *path)
{
	return access(path, R_OK) == 0;
}

/* ca-cert.pem (and ca-crl.pem) of dir; required: say so when missing. */
static int tls_load_ca(struct devio_tls_creds *cr, const char *dir, bool required)
{
	char ca[4200], crl[4200];
	int gr;

	if (tls_path(ca, sizeof(ca), dir, "ca-cert.pem") || tls_path(crl, sizeof(crl), dir, "ca-crl.pem"))
		return -ENAMETOOLONG;
	if (!tls_exists(ca)) {
		if (!required)
			return 0;
		devio_err("tls: %s: missing (needed to check the peer's certificate)", ca);
		return -ENOENT;
	}
	if ((gr = gnutls_certificate_set_x509_trust_file(cr->x509, ca, GNUTLS_X509_FMT_PEM)) < 0)
		return tls_err("loading", ca, gr);
	if (tls_exists(crl) && (gr = gnutls_certificate_set_x509_crl_file(cr->x509, crl, GNUTLS_X509_FMT_PEM)) < 0)
		return tls_err("loading", crl, gr);
	return 0;
}

/* PREFIX-cert.pem and PREFIX-key.pem of dir; required or both absent. */
static int tls_load_pair(struct devio_tls_creds *cr, const char *dir, const char *prefix, bool required)
{
	char cert[4200], key[4200], name[32];
	int gr;

	snprintf(name, sizeof(name), "%s-cert.pem", prefix);
	if (tls_path(cert, sizeof(cert), dir, name))
		return -ENAMETOOLONG;
	snprintf(name, sizeof(name), "%s-key.pem", prefix);
	if (tls_path(key, sizeof(key), dir, name))
		return -ENAMETOOLONG;
	if (!tls_exists(cert) && !tls_exists(key) && !required)
		return 0;
	if ((gr = gnutls_certificate_set_x509_key_file(cr->x509, cert, key, GNUTLS_X509_FMT_PEM)) < 0)
		return tls_err("loading", cert, gr);
	return 0;
}

static int tls_creds_x509(struct devio_tls_creds *cr, const struct devio_tls_conf *conf)
{
	const char *dir = conf->certificates;
	int gr, r;

	if ((gr = gnutls_certificate_allocate_credentials(&cr->x509)) < 0)
		return tls_err("allocating credentials", NULL, gr);
	if (cr->server) {
		if ((r = tls_load_ca(cr, dir, conf->verify_peer)))
			return r;
		return tls_load_pair(cr, dir, "server", true);
	}
	if (!dir) {
		if ((gr = gnutls_certificate_set_x509_system_trust(cr->x509)) < 0)
			return tls_err("loading the system's trusted CAs", NULL, gr);
		return 0;
	}
	if ((r = tls_load_ca(cr, dir, true)))
		return r;
	return tls_load_pair(cr, dir, "client", false);
}

static const char *tls_login_name(void)
{
	struct passwd *pw = getpwuid(getuid());
	const char *u = getenv("USER");

	return pw && pw->pw_name ? pw->pw_name : u ? u : "nobody";
}

static int tls_creds_psk(struct devio_tls_creds *cr, const struct devio_tls_conf *conf)
{
	uint8_t key[DEVIO_TLS_PSK_KEY_MAX];
	const char *user = conf->username ? conf->username : tls_login_name();
	gnutls_datum_t k;
	int gr, n;

	if ((n = tls_psk_load(conf->psk_file, &cr->psk_text, &cr->psk_len)))
		return n;
	if (cr->server) {
		/* Check every line now, so a bad file fails at start. */
		if ((n = tls_psk_check(conf->psk_file, cr->psk_text, cr->psk_len, NULL, key)))
			return n;
		if ((gr = gnutls_psk_allocate_server_credentials(&cr->psk_server)) < 0)
			return tls_err("allocating PSK credentials", NULL, gr);
		gnutls_psk_set_server_credentials_function(cr->psk_server, tls_psk_server_cb);
		gnutls_psk_set_server_known_dh_params(cr->psk_server, GNUTLS_SEC_PARAM_MEDIUM);
		return 0;
	}
	if ((n = tls_psk_check(conf->psk_file, cr->psk_text, cr->psk_len, user, key)) < 0)
		return n;
	if ((gr = gnutls_psk_allocate_client_credentials(&cr->psk_client)) < 0) {
		explicit_bzero(key, sizeof(key));
		return tls_err("allocating PSK credentials", NULL, gr);
	}
	k.data = key;
	k.size = (unsigned)n;
	gr = gnutls_psk_set_client_credentials(cr->psk_client, user, &k, GNUTLS_PSK_KEY_RAW);
	explicit_bzero(key, sizeof(key));
	return gr < 0 ? tls_err("setting the PSK for", user, gr) : 0;
}

static int tls_creds_priority(struct devio_tls_creds *cr, const struct devio_tls_conf *conf)
{
	char prio[1024];
	const char *err = NULL;
	int gr;

	if (conf->priority)
		snprintf(prio, sizeof(prio), "%s", conf->priority);
	else
		snprintf(prio, sizeof(prio), "%s%s", DEVIO_TLS_PRIORITY, cr->psk ? TLS_PSK_PRIORITY : "");
	if ((gr = gnutls_priority_init(&cr->prio, prio, &err)) < 0) {
		devio_err("tls: bad priority string '%s' at '%s': %s", prio, err ? err : "", gnutls_strerror(gr));
		return -EINVAL;
	}
	return 0;
}

int devio_tls_creds_new(const struct devio_tls_conf *conf, bool server, struct devio_tls_creds **out)
{
	struct devio_tls_creds *cr;
	int r;

	*out = NULL;
	if (conf->psk_file && conf->certificates) {
		devio_err("tls: give either certificates or a PSK file, not both");
		return -EINVAL;
	}
	if (server && !conf->psk_file && !conf->certificates) {
		devio_err("tls: the server needs --tls-certificates DIR or --tls-psk FILE");
		return -EINVAL;
	}
	cr = calloc(1, sizeof(*cr));
	if (!cr)
		return -ENOMEM;
	cr->server = server;
	cr->psk = conf->psk_file != NULL;
	cr->verify_peer = conf->verify_peer;
	snprintf(cr->source, sizeof(cr->source), "%s", conf->psk_file   ? conf->psk_file
						       : conf->certificates ? conf->certificates
									  : "system CAs");
	r = cr->psk ? tls_creds_psk(cr, conf) : tls_creds_x509(cr, conf);
	if (!r)
		r = tls_creds_priority(cr, conf);
	if (r) {
		devio_tls_creds_free(cr);
		return r;
	}
	*out = cr;
	return 0;
}

void devio_tls_creds_free(struct devio_tls_creds *cr)
{
	if (!cr)
		return;
	if (cr->x509)
		gnutls_certificate_free_credentials(cr->x509);
	if (cr->psk_server)
		gnutls_psk_free_server_credentials(cr->psk_server);
	if (cr->psk_client)
		gnutls_psk_free_client_credentials(cr->psk_client);
	if (cr->prio)
		gnutls_priority_deinit(cr->prio);
	if (cr->psk_text)
		explicit_bzero(cr->psk_text, cr->psk_len);
	free(cr->psk_text);
	free(cr);
}

const char *devio_tls_creds_kind(const struct devio_tls_creds *cr)
{
	return cr->psk ? "PSK" : "X.509";
}

/* ---- the transport under GnuTLS ---- */

static ssize_t tls_pull(gnutls_transport_ptr_t p, void *buf, size_t len)
{
	struct devio_tls *t = p;
	bool direct;
	ssize_t n;

	if (t->ra_end > t->ra_start) {
		n = (ssize_t)(t->ra_end - t->ra_start < len ? t->ra_end - t->ra_start : len);
		memcpy(buf, t->ra + t->ra_start, (size_t)n);
		t->ra_start += (size_t)n;
		return n;
	}
	direct = len >= sizeof(t->ra); /* nothing to gain: no copy of ours */
	do
		n = recv(t->fd, direct ? buf : t->ra, direct ? len : sizeof(t->ra), t->nonblock ? MSG_DONTWAIT : 0);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		gnutls_transport_set_errno(t->s, errno == EWOULDBLOCK ? EAGAIN : errno);
		return n;
	}
	if (direct || n == 0)
		return n;
	t->ra_start = 0;
	t->ra_end = (size_t)n;
	return tls_pull(p, buf, len);
}

/* Wait up to ms for bytes (the handshake's deadline). */
static int tls_pull_timeout(gnutls_transport_ptr_t p, unsigned ms)
{
	struct devio_tls *t = p;
	struct pollfd pfd = { .fd = t->fd, .events = POLLIN };
	int n;

	if (t->ra_end > t->ra_start)
		return 1;
	do
		n = poll(&pfd, 1, ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : (int)ms);
	while (n < 0 && errno == EINTR);
	return n;
}

static ssize_t tls_vec_push(gnutls_transport_ptr_t p, const giovec_t *iov, int n)
{
	struct devio_tls *t = p;
	struct msghdr mh = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n };
	ssize_t w;

	do
		w = sendmsg(t->fd, &mh, MSG_NOSIGNAL | (t->push_more ? MSG_MORE : 0));
	while (w < 0 && errno == EINTR);
	if (w < 0)
		gnutls_transport_set_errno(t->s, errno);
	return w;
}

static ssize_t tls_push(gnutls_transport_ptr_t p, const void *buf, size_t len)
{
	giovec_t v = { (void *)buf, len };

	return tls_vec_push(p, &v, 1);
}

/* ---- sessions ---- */

static int tls_session_new(struct devio_tls_creds *cr, int fd, bool server, const char *peer, struct devio_tls **out)
{
	struct devio_tls *t = calloc(1, sizeof(*t));
	int gr;

	if (!t)
		return -ENOMEM;
	t->fd = fd;
	t->cr = cr;
	snprintf(t->peer, sizeof(t->peer), "%s", peer ? peer : "peer");
	if ((gr = gnutls_init(&t->s, (server ? GNUTLS_SERVER : GNUTLS_CLIENT) | GNUTLS_NO_SIGNAL)) < 0) {
		free(t);
		return tls_err("starting a session", NULL, gr);
	}
	gnutls_session_set_ptr(t->s, t);
	gnutls_transport_set_ptr(t->s, t);
	gnutls_transport_set_pull_function(t->s, tls_pull);
	gnutls_transport_set_pull_timeout_function(t->s, tls_pull_timeout);
	gnutls_transport_set_push_function(t->s, tls_push);
	gnutls_transport_set_vec_push_function(t->s, tls_vec_push);
	gr = gnutls_priority_set(t->s, cr->prio);
	if (gr >= 0)
		gr = cr->psk ? gnutls_credentials_set(t->s, GNUTLS_CRD_PSK,
						      server ? (void *)cr->psk_server : (void *)cr->psk_client)
			     : gnutls_credentials_set(t->s, GNUTLS_CRD_CERTIFICATE, cr->x509);
	if (gr < 0) {
		devio_tls_free(t);
		return tls_err("setting up a session", NULL, gr);
	}
	*out = t;
	return 0;
}

/* A client checks the server's certificate against hostname (a name or
 * an address); a server with verify_peer asks for and checks the client's. */
static void tls_session_verify(struct devio_tls *t, bool server, const char *hostname)
{
	if (t->cr->psk)
		return;
	if (server) {
		if (t->cr->verify_peer) {
			gnutls_certificate_server_set_request(t->s, GNUTLS_CERT_REQUIRE);
			gnutls_session_set_verify_cert(t->s, NULL, 0);
		}
		return;
	}
	if (hostname && *hostname && !strchr(hostname, ':') && strspn(hostname, "0123456789.") != strlen(hostname))
		gnutls_server_name_set(t->s, GNUTLS_NAME_DNS, hostname, strlen(hostname));
	gnutls_session_set_verify_cert(t->s, hostname && *hostname ? hostname : "localhost", 0);
}

static int tls_handshake_err(struct devio_tls *t, int gr)
{
	char why[200] = "";

	if (gr == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
		gnutls_datum_t d = { NULL, 0 };
		unsigned st = gnutls_session_get_verify_cert_status(t->s);

		if (gnutls_certificate_verification_status_print(st, GNUTLS_CRT_X509, &d, 0) >= 0 && d.data)
			snprintf(why, sizeof(why), ": %s", (const char *)d.data);
		gnutls_free(d.data);
	}
	devio_warn("tls %s: handshake failed: %s%s", t->peer, gnutls_strerror(gr), why);
	if (gr == GNUTLS_E_TIMEDOUT)
		return -ETIMEDOUT;
	if (gr == GNUTLS_E_PREMATURE_TERMINATION || gr == GNUTLS_E_PUSH_ERROR || gr == GNUTLS_E_PULL_ERROR)
		return -ECONNRESET;
	return -EACCES;
}

int devio_tls_handshake(struct devio_tls_creds *cr, int fd, bool server, const char *hostname, const char *peer,
			unsigned timeout_ms, struct devio_tls **out)
{
	struct devio_tls *t;
	int r, gr;

	*out = NULL;
	if ((r = tls_session_new(cr, fd, server, peer, &t)))
		return r;
	tls_session_verify(t, server, hostname);
	gnutls_handshake_set_timeout(t->s, timeout_ms ? timeout_ms : DEVIO_TLS_HANDSHAKE_MS);
	do
		gr = gnutls_handshake(t->s);
	while (gr < 0 && !gnutls_error_is_fatal(gr));
	if (gr < 0) {
		r = tls_handshake_err(t, gr);
		devio_tls_free(t);
		return r;
	}
	{
		char *desc = gnutls_session_get_desc(t->s);

		devio_debug("tls %s: %s, %s, %s", t->peer, desc ? desc : "?", devio_tls_creds_kind(cr),
			    devio_tls_ktls_state());
		gnutls_free(desc);
	}
	*out = t;
	return 0;
}

/* GnuTLS before 3.7.3 has no KTLS, and Debian 12's 3.7.9 exports no way
 * to turn it on or ask about it (gnutls_transport_is_ktls_enabled came
 * later): records are encrypted in user space, by GnuTLS. */
const char *devio_tls_ktls_state(void)
{
	static char s[96];

	if (!s[0])
		snprintf(s, sizeof(s), "kernel TLS off (GnuTLS %s: records in user space)", gnutls_check_version(NULL));
	return s;
}

bool devio_tls_ktls(const struct devio_tls *t)
{
	return t->ktls;
}

bool devio_tls_pending(struct devio_tls *t)
{
	return gnutls_record_check_pending(t->s) > 0 || t->ra_end > t->ra_start;
}

/* ---- records ---- */

static ssize_t tls_gnutls_errno(struct devio_tls *t, ssize_t gr)
{
	switch (gr) {
	case GNUTLS_E_AGAIN:
		return -EAGAIN;
	case GNUTLS_E_INTERRUPTED:
		return -EINTR;
	case GNUTLS_E_PREMATURE_TERMINATION:
	case GNUTLS_E_PUSH_ERROR:
	case GNUTLS_E_PULL_ERROR:
		atomic_store(&t->broken, true);
		return -ECONNRESET;
	default:
		if (gnutls_error_is_fatal((int)gr))
			atomic_store(&t->broken, true);
		devio_debug("tls %s: %s", t->peer, gnutls_strerror((int)gr));
		return -EPROTO;
	}
}

ssize_t devio_tls_recv(struct devio_tls *t, void *buf, size_t len, bool nonblock)
{
	for (;;) {
		ssize_t n;

		t->nonblock = nonblock;
		n = gnutls_record_recv(t->s, buf, len);
		t->nonblock = false;
		if (n >= 0)
			return n;
		n = tls_gnutls_errno(t, n);
		if (n == -EAGAIN && !nonblock)
			return -ETIMEDOUT; /* the socket's SO_RCVTIMEO ran out */
		if (n != -EINTR)
			return n;
	}
}

int devio_tls_read_full(struct devio_tls *t, void *buf, size_t len)
{
	uint8_t *p = buf;

	while (len) {
		ssize_t n = devio_tls_recv(t, p, len, false);

		if (n == 0)
			return -ECONNRESET;
		if (n < 0)
			return (int)n;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

int devio_tls_discard_full(struct devio_tls *t, uint64_t len)
{
	uint8_t scratch[4096];

	while (len) {
		size_t n = len < sizeof(scratch) ? (size_t)len : sizeof(scratch);
		int r = devio_tls_read_full(t, scratch, n);

		if (r)
			return r;
		len -= n;
	}
	return 0;
}

/* The largest record the session sends (the peer may have asked for
 * less with the record size limit extension). */
static size_t tls_record_size(struct devio_tls *t)
{
	size_t max = gnutls_record_get_max_size(t->s);

	return max && max < TLS_RECORD ? max : TLS_RECORD;
}

/* Send len bytes of the writev as records, one per gnutls_record_send
 * and sendmsg.  packed: records of gathered small pieces, sent with
 * MSG_MORE unless they are the writev's last (a batch of small replies
 * goes out as one); the records of a large piece go without it (with
 * MSG_MORE 1 MiB reads lost 20%: the client waited for larger chunks). */
static int tls_send_all(struct devio_tls *t, const uint8_t *p, size_t len, bool packed)
{
	size_t rec = tls_record_size(t);

	while (len) {
		size_t k = len < rec ? len : rec;
		ssize_t n;

		t->push_more = packed && t->out_left > k;
		n = gnutls_record_send(t->s, p, k);
		if (n < 0) {
			n = tls_gnutls_errno(t, n);
			if (n == -EINTR)
				continue;
			if (n == -EAGAIN) { /* SO_SNDTIMEO ran out: the peer reads nothing */
				atomic_store(&t->broken, true);
				return -ETIMEDOUT;
			}
			return (int)n;
		}
		p += n;
		len -= (size_t)n;
		t->out_left -= (size_t)n;
	}
	return 0;
}

/* Send what the record buffer holds. */
static int tls_out_flush(struct devio_tls *t)
{
	size_t n = t->out_len;

	t->out_len = 0;
	return n ? tls_send_all(t, t->out, n, true) : 0;
}

/* One piece: whole records straight from the caller's memory while the
 * buffer is empty, the rest copied in, each full buffer sent at once. */
static int tls_write_piece(struct devio_tls *t, const uint8_t *p, size_t len, size_t rec)
{
	int r = 0;

	while (len && !r) {
		size_t k;

		if (!t->out_len && len >= rec) {
			k = len - len % rec;
			r = tls_send_all(t, p, k, false);
		} else {
			k = rec - t->out_len < len ? rec - t->out_len : len;
			memcpy(t->out + t->out_len, p, k);
			t->out_len += k;
			if (t->out_len == rec)
				r = tls_out_flush(t);
		}
		p += k;
		len -= k;
	}
	return r;
}

/* Pieces are packed into full records (headers, short replies and 4 KiB
 * reads copied together; large pieces encrypted from where they are, no
 * copy of ours): one record and one sendmsg per 16 KiB instead of one or
 * two per reply; a batch of small replies' sendmsgs with MSG_MORE but the
 * last, so the peer is woken for the batch once.  writev does not change
 * iov. */
int devio_tls_writev(struct devio_tls *t, struct iovec *iov, int n)
{
	size_t rec = tls_record_size(t);
	int r = 0;

	t->out_len = 0;
	t->out_left = 0;
	for (int i = 0; i < n; i++)
		t->out_left += iov[i].iov_len;
	for (int i = 0; i < n && !r; i++)
		r = tls_write_piece(t, iov[i].iov_base, iov[i].iov_len, rec);
	if (!r)
		r = tls_out_flush(t);
	t->out_len = t->out_left = 0;
	t->push_more = false;
	return r;
}

int devio_tls_write_full(struct devio_tls *t, const void *buf, size_t len)
{
	struct iovec v = { (void *)buf, len };

	return devio_tls_writev(t, &v, 1);
}

void devio_tls_bye(struct devio_tls *t)
{
	struct timeval tv = { 2, 0 };

	if (!t)
		return;
	/* Do not wait for the peer's close_notify: it may never come; nor
	 * for long on a peer that reads nothing, and not at all after the
	 * session failed or a send timed out (the alert cannot go out). */
	if (!atomic_load(&t->broken)) {
		setsockopt(t->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
		gnutls_bye(t->s, GNUTLS_SHUT_WR);
	}
	devio_tls_free(t);
}

void devio_tls_adopt_creds(struct devio_tls *t, struct devio_tls_creds *cr)
{
	t->owns_cr = t->cr == cr;
}

void devio_tls_free(struct devio_tls *t)
{
	if (!t)
		return;
	gnutls_deinit(t->s);
	if (t->owns_cr)
		devio_tls_creds_free(t->cr);
	free(t);
}
