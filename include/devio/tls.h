/* tls.h - TLS for devio's network ends (GnuTLS, lib/tls.c): credentials
 * from the options nbdkit and qemu-nbd use (--tls-certificates DIR,
 * --tls-psk FILE, --tls-verify-peer, --tls-priority), and a small session
 * wrapper over a connected socket (handshake with a deadline, send, recv,
 * bye).  Used by the NBD front end's STARTTLS (frontends/nbd.c) and the
 * NBD client (lib/nbd_client.c, backends/nbd_remote.c).
 */
#ifndef DEVIO_TLS_H
#define DEVIO_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

/* --tls: off (STARTTLS refused), on (offered), require (nothing else). */
enum devio_tls_mode { DEVIO_TLS_OFF, DEVIO_TLS_ON, DEVIO_TLS_REQUIRE };

/* Longest PSK user name and key (bytes) taken from a PSK file. */
#define DEVIO_TLS_PSK_USER_MAX 255
#define DEVIO_TLS_PSK_KEY_MAX 256
/* Longest line of a PSK file and the largest file read. */
#define DEVIO_TLS_PSK_LINE_MAX 1024
#define DEVIO_TLS_PSK_FILE_MAX (1u << 20)
/* Default bound on a handshake, in milliseconds. */
#define DEVIO_TLS_HANDSHAKE_MS 30000

/* What to load.  Either certificates or psk_file.  Server: DIR holds
 * server-cert.pem and server-key.pem, and ca-cert.pem (needed with
 * verify_peer, which asks for and checks client certificates).  Client:
 * DIR holds ca-cert.pem (without DIR: the system's trusted CAs) and
 * optionally client-cert.pem and client-key.pem; the server's
 * certificate is always checked against the CA and the host name. */
struct devio_tls_conf {
	const char *certificates;
	const char *psk_file;
	const char *username;   /* client PSK identity; NULL: the login name */
	const char *priority;   /* GnuTLS priority string; NULL: DEVIO_TLS_PRIORITY */
	bool verify_peer;
};

/* The server's credential options (--tls-certificates, --tls-psk,
 * --tls-verify-peer, --tls-priority) as entries of a front end's options
 * table (include/devio/frontend.h), parsed into the struct devio_tls_conf
 * at offset off in its options struct; every help text opens with prefix
 * ("" or, for a front end that uses them only on some addresses, "tls:: "):
 *   DEVIO_TLS_OPTIONS(offsetof(struct nbd_opts, tls_conf), ""), */
#define DEVIO_TLS_OPTIONS(off, prefix) \
	{ "tls-certificates", "DIR", prefix "X.509, DIR/server-cert.pem, server-key.pem, ca-cert.pem " \
	  "(docs/security.md)", devio_opt_string, (off) + offsetof(struct devio_tls_conf, certificates) }, \
	{ "tls-psk", "FILE", prefix "pre-shared keys, USERNAME:HEXKEY lines (psktool's format)", \
	  devio_opt_string, (off) + offsetof(struct devio_tls_conf, psk_file) }, \
	{ "tls-verify-peer", NULL, prefix "X.509, clients need a certificate from ca-cert.pem's CA", \
	  devio_opt_flag, (off) + offsetof(struct devio_tls_conf, verify_peer) }, \
	{ "tls-priority", "STRING", prefix "GnuTLS priority string (default: TLS 1.3, then 1.2)", \
	  devio_opt_string, (off) + offsetof(struct devio_tls_conf, priority) }

/* TLS 1.3 preferred, 1.2 accepted, nothing older; PSK key exchanges are
 * appended when a PSK file is in use. */
#define DEVIO_TLS_PRIORITY "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

struct devio_tls_creds;
struct devio_tls;

/* Load credentials for a server or a client; 0 or -errno (logged). */
int devio_tls_creds_new(const struct devio_tls_conf *conf, bool server, struct devio_tls_creds **out);
void devio_tls_creds_free(struct devio_tls_creds *cr);
/* "X.509" or "PSK", for messages. */
const char *devio_tls_creds_kind(const struct devio_tls_creds *cr);

/* Run the handshake on the connected blocking socket fd within
 * timeout_ms (0: DEVIO_TLS_HANDSHAKE_MS).  A client checks the server's
 * certificate against hostname.  peer names the other end in messages.
 * Returns 0 with *out a session (the fd stays the caller's), or -errno
 * after logging why (-EACCES: the peer's credentials were refused). */
int devio_tls_handshake(struct devio_tls_creds *cr, int fd, bool server, const char *hostname, const char *peer,
			unsigned timeout_ms, struct devio_tls **out);

/* "kernel TLS off (...)": for the log. */
const char *devio_tls_ktls_state(void);
/* The session frees cr (the credentials it was made with) when freed. */
void devio_tls_adopt_creds(struct devio_tls *t, struct devio_tls_creds *cr);
/* Is the kernel doing the record layer (KTLS) in both directions? */
bool devio_tls_ktls(const struct devio_tls *t);
/* Bytes waiting in the session, decrypted or read ahead from the socket:
 * poll() on the socket would not see them. */
bool devio_tls_pending(struct devio_tls *t);

/* Receive up to len bytes: > 0, 0 at the end of the stream, -EAGAIN when
 * nonblock and nothing is there yet, -ETIMEDOUT when the socket's
 * SO_RCVTIMEO ran out, or -errno.  One thread may receive while another
 * sends. */
ssize_t devio_tls_recv(struct devio_tls *t, void *buf, size_t len, bool nonblock);
int devio_tls_read_full(struct devio_tls *t, void *buf, size_t len);
int devio_tls_discard_full(struct devio_tls *t, uint64_t len);
/* Send everything: 0 or -errno.  writev may change iov. */
int devio_tls_write_full(struct devio_tls *t, const void *buf, size_t len);
int devio_tls_writev(struct devio_tls *t, struct iovec *iov, int n);

/* Send close_notify (without waiting for the peer's; the socket gets a
 * 2 s send timeout for it) and free. */
void devio_tls_bye(struct devio_tls *t);
/* Free without a word to the peer (NULL is fine). */
void devio_tls_free(struct devio_tls *t);

/* ---- PSK files (untrusted input) ---- */

/* Find user's key in a PSK file's text (buf, len bytes, need not end in
 * NUL): lines "USERNAME:HEXKEY", '#' comments and blank lines allowed.
 * Returns the key length (> 0) with key filled, -ENOENT when user has no
 * line, -EINVAL on a malformed line (lineno set, 1-based).  user NULL:
 * the first user, copied to first_user (DEVIO_TLS_PSK_USER_MAX + 1). */
int devio_tls_psk_find(const char *buf, size_t len, const char *user, uint8_t key[DEVIO_TLS_PSK_KEY_MAX],
		       char *first_user, unsigned *lineno);

#endif
