/* nbd_client.c - the client side of NBD's handshake, for the nbd://
 * backend and the kernel nbd client alike (lib/nbd_client.h).
 *
 * Fixed newstyle: optional NBD_OPT_STRUCTURED_REPLY and
 * NBD_OPT_SET_META_CONTEXT base:allocation, then NBD_OPT_GO asking for
 * NBD_INFO_BLOCK_SIZE, with NBD_OPT_EXPORT_NAME for servers that do not
 * know GO (or that are not fixed newstyle).  Every byte comes from an
 * untrusted server: magic numbers and the option echoed are checked,
 * reply lengths are bounded (NBD_MAX_OPTION_LEN, the rest of a long reply
 * is read and thrown away), the number of replies is bounded, and the
 * whole handshake has a deadline (poll before every read and write), so a
 * server that stalls or trickles cannot hold the caller.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "devio/util.h"
#include "nbd_client.h"
#include "nbd_proto.h"

/* The second greeting word of an oldstyle server. */
#define NBD_OLDSTYLE_MAGIC 0x0000420281861253ull
/* Replies to one option before the server is taken as broken. */
#define NBD_CLIENT_MAX_REPLIES 1024
/* Bytes of one option reply client_kept (INFO, META_CONTEXT, error messages). */
#define NBD_CLIENT_REPLY_KEEP 512u

struct hs {
	int fd;
	struct devio_tls *tls;   /* after STARTTLS */
	uint64_t deadline;       /* devio_now_ns() bound for the whole handshake */
	unsigned timeout_s;
	const char *name;
	const char *export;
	struct devio_nbd_client_info *info;
};

/* ---- transfers under the deadline ---- */

static int client_wait(struct hs *h, short events)
{
	for (;;) {
		uint64_t now = devio_now_ns();
		struct pollfd p = { .fd = h->fd, .events = events };
		int n;

		if (now >= h->deadline)
			return -ETIMEDOUT;
		n = poll(&p, 1, (int)((h->deadline - now) / 1000000u) + 1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n > 0)
			return 0;
	}
}

/* Through TLS: what the session holds, else wait for the socket; a
 * partial record says -EAGAIN and we wait again. */
static int client_tls_read(struct hs *h, char *p, size_t len)
{
	while (len) {
		ssize_t n;
		int r = devio_tls_pending(h->tls) ? 0 : client_wait(h, POLLIN);

		if (r)
			return r;
		n = devio_tls_recv(h->tls, p, len, true);
		if (n == -EAGAIN)
			continue;
		if (n < 0)
			return (int)n;
		if (n == 0)
			return -ECONNRESET;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int client_read(struct hs *h, void *buf, size_t len)
{
	char *p = buf;

	if (h->tls)
		return client_tls_read(h, p, len);
	while (len) {
		ssize_t n;
		int r = client_wait(h, POLLIN);

		if (r)
			return r;
		n = recv(h->fd, p, len, MSG_DONTWAIT);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -ECONNRESET;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int client_write(struct hs *h, const void *buf, size_t len)
{
	const char *p = buf;

	if (h->tls) /* small writes; the socket's SO_SNDTIMEO bounds them */
		return devio_tls_write_full(h->tls, buf, len);
	while (len) {
		ssize_t n;
		int r = client_wait(h, POLLOUT);

		if (r)
			return r;
		n = send(h->fd, p, len, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n < 0)
			return -errno;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int client_discard(struct hs *h, uint32_t len)
{
	char scratch[4096];

	while (len) {
		uint32_t n = len < sizeof(scratch) ? len : (uint32_t)sizeof(scratch);
		int r = client_read(h, scratch, n);

		if (r)
			return r;
		len -= n;
	}
	return 0;
}

/* ---- options and replies ---- */

static int client_send_option(struct hs *h, uint32_t opt, const void *data, uint32_t len)
{
	uint8_t hdr[NBD_OPTION_HEADER_SIZE];
	int r;

	devio_nbd_encode_option(hdr, opt, len);
	r = client_write(h, hdr, sizeof(hdr));
	return r || !len ? r : client_write(h, data, len);
}

struct reply {
	uint32_t type, len;      /* len: as sent; at most NBD_CLIENT_REPLY_KEEP kept */
	uint8_t data[NBD_CLIENT_REPLY_KEEP];
};

static uint32_t client_kept(const struct reply *rp)
{
	return rp->len < sizeof(rp->data) ? rp->len : (uint32_t)sizeof(rp->data);
}

/* Read one reply to opt; -EPROTO (logged) if it is not one. */
static int client_read_reply(struct hs *h, uint32_t opt, struct reply *rp)
{
	uint8_t hdr[NBD_OPTION_REPLY_HEADER_SIZE];
	int r;

	if ((r = client_read(h, hdr, sizeof(hdr))))
		return r;
	if (devio_nbd_decode_option_reply(hdr, opt, &rp->type, &rp->len)) {
		devio_err("%s: bad option reply to option %u (magic 0x%016llx, option %u)", h->name, opt,
			  (unsigned long long)nbd_get64(hdr), nbd_get32(hdr + 8));
		return -EPROTO;
	}
	if (rp->len > NBD_MAX_OPTION_LEN) {
		devio_err("%s: bad option reply to option %u: %u bytes, over the %u-byte limit", h->name, opt,
			  rp->len, NBD_MAX_OPTION_LEN);
		return -EPROTO;
	}
	if ((r = client_read(h, rp->data, client_kept(rp))))
		return r;
	return client_discard(h, rp->len - client_kept(rp));
}

static bool client_is_error(uint32_t type)
{
	return type & (1u << 31);
}

/* An error reply's message, for a human: printable bytes only. */
static const char *client_reply_text(struct reply *rp, char *out, size_t outlen)
{
	size_t n = 0;

	for (uint32_t i = 0; i < client_kept(rp) && n + 1 < outlen; i++)
		out[n++] = rp->data[i] >= 0x20 && rp->data[i] < 0x7f ? (char)rp->data[i] : '?';
	out[n] = '\0';
	return out;
}

static int client_unexpected(struct hs *h, const char *opt, const struct reply *rp)
{
	devio_err("%s: unexpected reply 0x%x to %s", h->name, rp->type, opt);
	return -EPROTO;
}

/* NBD_OPT_STRUCTURED_REPLY: an ACK turns them on; an error leaves them off. */
static int client_opt_structured(struct hs *h)
{
	struct reply rp;
	int r;

	if ((r = client_send_option(h, NBD_OPT_STRUCTURED_REPLY, NULL, 0)) ||
	    (r = client_read_reply(h, NBD_OPT_STRUCTURED_REPLY, &rp)))
		return r;
	if (rp.type == NBD_REP_ACK)
		h->info->structured = true;
	else if (!client_is_error(rp.type))
		return client_unexpected(h, "NBD_OPT_STRUCTURED_REPLY", &rp);
	return 0;
}

/* The export name as options carry it (length, then the bytes) at opt;
 * returns the name's length. */
static uint32_t client_put_export(struct hs *h, uint8_t *opt)
{
	uint32_t nlen = (uint32_t)strlen(h->export);

	nbd_put32(opt, nlen);
	memcpy(opt + 4, h->export, nlen);
	return nlen;
}

/* NBD_OPT_SET_META_CONTEXT base:allocation for the export; a server that
 * refuses it is used without. */
static int client_opt_meta(struct hs *h)
{
	static const char ctx[] = "base:allocation";
	uint8_t opt[4 + NBD_MAX_EXPORT_NAME + 4 + 4 + sizeof(ctx)];
	uint32_t nlen = client_put_export(h, opt), qlen = sizeof(ctx) - 1;
	struct reply rp;
	int r;

	nbd_put32(opt + 4 + nlen, 1);
	nbd_put32(opt + 8 + nlen, qlen);
	memcpy(opt + 12 + nlen, ctx, qlen);
	if ((r = client_send_option(h, NBD_OPT_SET_META_CONTEXT, opt, 12 + nlen + qlen)))
		return r;
	for (unsigned i = 0; i < NBD_CLIENT_MAX_REPLIES; i++) {
		if ((r = client_read_reply(h, NBD_OPT_SET_META_CONTEXT, &rp)))
			return r;
		if (rp.type == NBD_REP_ACK || client_is_error(rp.type))
			return 0;
		if (rp.type != NBD_REP_META_CONTEXT)
			return client_unexpected(h, "NBD_OPT_SET_META_CONTEXT", &rp);
		if (rp.len == 4 + qlen && !memcmp(rp.data + 4, ctx, qlen)) {
			h->info->meta_id = nbd_get32(rp.data);
			h->info->base_allocation = true;
		}
	}
	devio_err("%s: more than %d replies to NBD_OPT_SET_META_CONTEXT", h->name, NBD_CLIENT_MAX_REPLIES);
	return -EPROTO;
}

static bool client_pow2(uint32_t v)
{
	return v && !(v & (v - 1));
}

/* NBD_INFO_BLOCK_SIZE: keep what the spec allows, drop the rest. */
static void client_info_block_size(struct hs *h, const uint8_t *d)
{
	uint32_t mn = nbd_get32(d), pref = nbd_get32(d + 4), mx = nbd_get32(d + 8);

	if (!client_pow2(mn) || mn > 65536) {
		devio_debug("%s: ignoring a minimum block size of %u", h->name, mn);
		return;
	}
	h->info->min_block = mn;
	h->info->pref_block = client_pow2(pref) && pref >= mn ? pref : 0;
	h->info->max_block = mx >= mn && (mx == UINT32_MAX || mx % mn == 0) ? mx : 0;
}

/* One NBD_REP_INFO to NBD_OPT_GO; *have_export once NBD_INFO_EXPORT came. */
static int client_go_info(struct hs *h, const struct reply *rp, bool *have_export)
{
	uint16_t type = rp->len >= 2 ? nbd_get16(rp->data) : 0xffff;

	if (rp->len < 2) {
		devio_err("%s: NBD_REP_INFO of %u bytes", h->name, rp->len);
		return -EPROTO;
	}
	if (type == NBD_INFO_EXPORT) {
		if (rp->len != 12) {
			devio_err("%s: NBD_INFO_EXPORT of %u bytes (want 12)", h->name, rp->len);
			return -EPROTO;
		}
		h->info->size = nbd_get64(rp->data + 2);
		h->info->tflags = nbd_get16(rp->data + 10);
		*have_export = true;
	} else if (type == NBD_INFO_BLOCK_SIZE) {
		if (rp->len != 14) {
			devio_err("%s: NBD_INFO_BLOCK_SIZE of %u bytes (want 14)", h->name, rp->len);
			return -EPROTO;
		}
		client_info_block_size(h, rp->data + 2);
	}
	return 0; /* other information is for humans */
}

/* The server refused NBD_OPT_GO with an error reply. */
static int client_go_refused(struct hs *h, struct reply *rp)
{
	char msg[NBD_CLIENT_REPLY_KEEP + 1];

	if (rp->type == NBD_REP_ERR_TLS_REQD) {
		devio_err("%s: the server requires TLS: connect with nbds:// (or nbds+unix://) and "
			  "tls-certificates= or tls-psk-file=", h->name);
		return -EPROTONOSUPPORT;
	}
	devio_err("%s: the server refused the export '%s' (NBD_OPT_GO error 0x%x%s%s)", h->name, h->export, rp->type,
		  rp->len ? ": " : "", client_reply_text(rp, msg, sizeof(msg)));
	return rp->type == NBD_REP_ERR_UNKNOWN ? -ENOENT : -EPROTO;
}

/* NBD_OPT_GO asking for the block sizes; 1 if the server does not know it. */
static int client_opt_go(struct hs *h)
{
	uint8_t opt[4 + NBD_MAX_EXPORT_NAME + 2 + 2];
	uint32_t nlen = client_put_export(h, opt);
	bool have_export = false;
	struct reply rp;
	int r;

	nbd_put16(opt + 4 + nlen, 1);
	nbd_put16(opt + 6 + nlen, NBD_INFO_BLOCK_SIZE);
	if ((r = client_send_option(h, NBD_OPT_GO, opt, 8 + nlen)))
		return r;
	for (unsigned i = 0; i < NBD_CLIENT_MAX_REPLIES; i++) {
		if ((r = client_read_reply(h, NBD_OPT_GO, &rp)))
			return r;
		if (rp.type == NBD_REP_ERR_UNSUP)
			return 1;
		if (client_is_error(rp.type))
			return client_go_refused(h, &rp);
		if (rp.type == NBD_REP_INFO && (r = client_go_info(h, &rp, &have_export)))
			return r;
		if (rp.type == NBD_REP_ACK && !have_export) {
			devio_err("%s: the server sent no export size (NBD_OPT_GO acknowledged without NBD_INFO_EXPORT)", h->name);
			return -EPROTO;
		}
		if (rp.type == NBD_REP_ACK) {
			h->info->go = true;
			return 0;
		}
		if (rp.type != NBD_REP_INFO)
			return client_unexpected(h, "NBD_OPT_GO", &rp);
	}
	devio_err("%s: more than %d replies to NBD_OPT_GO", h->name, NBD_CLIENT_MAX_REPLIES);
	return -EPROTO;
}

/* NBD_OPT_EXPORT_NAME: size and flags, then 124 zeroes unless declined. */
static int client_opt_export_name(struct hs *h, bool no_zeroes)
{
	uint8_t reply[10 + 124];
	int r;

	if ((r = client_send_option(h, NBD_OPT_EXPORT_NAME, h->export, (uint32_t)strlen(h->export))))
		return r;
	r = client_read(h, reply, no_zeroes ? 10 : sizeof(reply));
	if (r == -ECONNRESET) {
		devio_err("%s: the server closed the connection after NBD_OPT_EXPORT_NAME (no export '%s'?)",
			  h->name, h->export);
		return -ENOENT;
	}
	if (r)
		return r;
	h->info->size = nbd_get64(reply);
	h->info->tflags = nbd_get16(reply + 8);
	return 0;
}

/* The greeting; answers with the client flags.  *hflags: the server's. */
static int client_greet(struct hs *h, uint16_t *hflags)
{
	uint8_t hello[18], cf[4];
	int r = client_read(h, hello, sizeof(hello));

	if (r)
		return r;
	if (nbd_get64(hello) != NBD_MAGIC) {
		devio_err("%s: not an NBD server (bad greeting)", h->name);
		return -EPROTO;
	}
	if (nbd_get64(hello + 8) == NBD_OLDSTYLE_MAGIC) {
		devio_err("%s: not a fixed-newstyle NBD server (an oldstyle one: unsupported)", h->name);
		return -EPROTO;
	}
	if (nbd_get64(hello + 8) != NBD_OPTS_MAGIC) {
		devio_err("%s: not a fixed-newstyle NBD server (bad greeting)", h->name);
		return -EPROTO;
	}
	*hflags = nbd_get16(hello + 16);
	nbd_put32(cf, (*hflags & NBD_FLAG_FIXED_NEWSTYLE ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) |
		      (*hflags & NBD_FLAG_NO_ZEROES ? NBD_FLAG_C_NO_ZEROES : 0));
	return client_write(h, cf, sizeof(cf));
}

/* NBD_OPT_STARTTLS, then the TLS handshake in what is left of the time. */
static int client_starttls(struct hs *h, const struct devio_nbd_client_opts *o, uint16_t hflags)
{
	struct timeval tv = { h->timeout_s, 0 };
	uint64_t now = devio_now_ns();
	struct reply rp;
	char text[160];
	int r;

	if (!(hflags & NBD_FLAG_FIXED_NEWSTYLE)) {
		devio_err("%s: the server is not fixed newstyle: no TLS there", h->name);
		return -EPROTONOSUPPORT;
	}
	if ((r = client_send_option(h, NBD_OPT_STARTTLS, NULL, 0)) || (r = client_read_reply(h, NBD_OPT_STARTTLS, &rp)))
		return r;
	if (rp.type != NBD_REP_ACK) {
		devio_err("%s: the server refused TLS (NBD_OPT_STARTTLS): %s", h->name,
			  client_reply_text(&rp, text, sizeof(text)));
		return -EPROTONOSUPPORT;
	}
	if (now >= h->deadline)
		return -ETIMEDOUT;
	/* Record writes block on the socket: bound them by the deadline too. */
	setsockopt(h->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	r = devio_tls_handshake(o->tls, h->fd, false, o->tls_hostname, h->name,
				(unsigned)((h->deadline - now) / 1000000u) + 1, &h->tls);
	return r == -ETIMEDOUT || r == -ECONNRESET ? r : r ? -EACCES : 0;
}

static int client_handshake(struct hs *h, const struct devio_nbd_client_opts *o)
{
	uint16_t hflags = 0;
	int r;

	if ((r = client_greet(h, &hflags)))
		return r;
	if (o->tls && (r = client_starttls(h, o, hflags)))
		return r;
	if (!(hflags & NBD_FLAG_FIXED_NEWSTYLE)) /* options other than EXPORT_NAME would end it */
		return client_opt_export_name(h, hflags & NBD_FLAG_NO_ZEROES);
	if (o->structured && (r = client_opt_structured(h)))
		return r;
	if (h->info->structured && o->base_allocation && (r = client_opt_meta(h)))
		return r;
	r = client_opt_go(h);
	return r == 1 ? client_opt_export_name(h, hflags & NBD_FLAG_NO_ZEROES) : r;
}

int devio_nbd_client_handshake(int fd, const struct devio_nbd_client_opts *o, struct devio_nbd_client_info *info)
{
	unsigned long errors = devio_log_errors();
	struct hs h = { .fd = fd, .info = info, .name = o->name ? o->name : "nbd client",
			.export = o->export ? o->export : "" };
	int r;

	memset(info, 0, sizeof(*info));
	info->min_block = 1;
	h.timeout_s = o->timeout_s ? o->timeout_s : NBD_CLIENT_TIMEOUT_S;
	h.deadline = devio_now_ns() + (uint64_t)h.timeout_s * 1000000000ull;
	if (strlen(h.export) > NBD_MAX_EXPORT_NAME) {
		devio_err("%s: export name longer than %d bytes", h.name, NBD_MAX_EXPORT_NAME);
		return -ENAMETOOLONG;
	}
	r = client_handshake(&h, o);
	if (h.tls) {
		struct timeval none = { 0, 0 };

		setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof(none));
		if (r || !o->tls_out)
			devio_tls_free(h.tls);
		else
			*o->tls_out = h.tls;
	}
	if (r == -ETIMEDOUT)
		devio_err("%s: NBD handshake: the server stalled (no answer within %u s)", h.name, h.timeout_s);
	else if (r == -ECONNRESET && devio_log_errors() == errors)
		devio_err("%s: NBD handshake: the server closed the connection", h.name);
	else if (r && devio_log_errors() == errors)
		devio_err("%s: NBD handshake: %s", h.name, strerror(-r));
	if (!r)
		devio_debug("%s: export '%s': %llu bytes, flags 0x%x, %s%s", h.name, h.export,
			    (unsigned long long)info->size, info->tflags, info->go ? "NBD_OPT_GO" : "NBD_OPT_EXPORT_NAME",
			    info->structured ? ", structured replies" : "");
	return r;
}

/* The credentials an nbds:// URI names; its host is the name the
 * server's certificate must carry ("localhost" over a Unix socket). */
static int client_tls_creds(const struct devio_nbd_uri *u, struct devio_nbd_client_opts *o,
			    struct devio_tls_creds **cr)
{
	struct devio_tls_conf conf = {
		.certificates = u->tls_certificates[0] ? u->tls_certificates : NULL,
		.psk_file = u->tls_psk_file[0] ? u->tls_psk_file : NULL,
		.username = u->tls_username[0] ? u->tls_username : NULL,
	};

	if (!o->tls_out) {
		devio_err("%s: TLS is not possible here (the kernel's nbd client speaks no TLS)",
			  o->name ? o->name : "nbd client");
		return -EPROTONOSUPPORT;
	}
	o->tls_hostname = u->addr.kind == DEVIO_ADDR_TCP && u->addr.host[0] ? u->addr.host : "localhost";
	if (devio_tls_creds_new(&conf, false, cr))
		return -EINVAL;
	o->tls = *cr;
	return 0;
}

/* ---- NBD_OPT_LIST ---- */

/* Replies to NBD_OPT_LIST taken before the server is taken as broken. */
#define NBD_CLIENT_MAX_EXPORTS 65536

/* One NBD_REP_SERVER payload: u32 name length, name, description. */
static int client_list_entry(struct hs *h, const uint8_t *d, uint32_t len,
			     int (*fn)(void *ctx, const char *name, const char *desc), void *ctx)
{
	uint32_t nlen = len >= 4 ? nbd_get32(d) : UINT32_MAX;
	char *name, *desc;
	int r;

	if (nlen > len - 4 || nlen > NBD_MAX_EXPORT_NAME || memchr(d + 4, 0, len - 4)) {
		devio_err("%s: bad NBD_REP_SERVER reply (%u bytes, name of %u)", h->name, len, nlen);
		return -EPROTO;
	}
	name = strndup((const char *)d + 4, nlen);
	desc = strndup((const char *)d + 4 + nlen, len - 4 - nlen);
	r = name && desc ? fn(ctx, name, desc) : -ENOMEM;
	free(name);
	free(desc);
	return r;
}

/* Read replies to NBD_OPT_LIST up to the ACK. */
static int client_list_replies(struct hs *h, int (*fn)(void *ctx, const char *name, const char *desc), void *ctx)
{
	uint8_t hdr[NBD_OPTION_REPLY_HEADER_SIZE], *d = malloc(NBD_MAX_OPTION_LEN);
	uint32_t type, len;
	int r = d ? 0 : -ENOMEM;

	for (unsigned n = 0; !r; n++) {
		if ((r = client_read(h, hdr, sizeof(hdr))))
			break;
		if (devio_nbd_decode_option_reply(hdr, NBD_OPT_LIST, &type, &len) || len > NBD_MAX_OPTION_LEN) {
			devio_err("%s: bad reply to NBD_OPT_LIST", h->name);
			r = -EPROTO;
		} else if (!(r = client_read(h, d, len))) {
			if (type == NBD_REP_ACK)
				break;
			if (client_is_error(type)) {
				struct reply rp = { .type = type, .len = len < NBD_CLIENT_REPLY_KEEP ? len : NBD_CLIENT_REPLY_KEEP };
				char why[NBD_CLIENT_REPLY_KEEP + 1];

				memcpy(rp.data, d, rp.len);
				devio_err("%s: the server does not list its exports (error 0x%x%s%s)", h->name, type,
					  len ? ": " : "", client_reply_text(&rp, why, sizeof(why)));
				r = type == NBD_REP_ERR_UNSUP || type == NBD_REP_ERR_POLICY ? -ENOTSUP : -EPROTO;
			} else if (type != NBD_REP_SERVER || n >= NBD_CLIENT_MAX_EXPORTS) {
				r = client_unexpected(h, "NBD_OPT_LIST", &(struct reply){ .type = type });
			} else {
				r = client_list_entry(h, d, len, fn, ctx);
			}
		}
	}
	free(d);
	return r;
}

/* NBD_OPT_LIST on h's connection, after STARTTLS when o->tls is set. */
static int client_list(struct hs *h, const struct devio_nbd_client_opts *o,
		       int (*fn)(void *ctx, const char *name, const char *desc), void *ctx)
{
	uint16_t hflags = 0;
	int r;

	r = client_greet(h, &hflags);
	if (!r && !(hflags & NBD_FLAG_FIXED_NEWSTYLE)) {
		devio_err("%s: the server does not list its exports (not fixed newstyle)", h->name);
		return -ENOTSUP;
	}
	if (!r && o && o->tls)
		r = client_starttls(h, o, hflags);
	if (!r)
		r = client_send_option(h, NBD_OPT_LIST, NULL, 0);
	if (!r)
		r = client_list_replies(h, fn, ctx);
	if (r == -ETIMEDOUT)
		devio_err("%s: NBD handshake: the server stalled (no answer within %u s)", h->name, h->timeout_s);
	else if (r == -ECONNRESET)
		devio_err("%s: NBD handshake: the server closed the connection", h->name);
	if (!r || r == -ENOTSUP) /* a polite goodbye; its reply is not waited for */
		client_send_option(h, NBD_OPT_ABORT, NULL, 0);
	return r;
}

int devio_nbd_client_list(int fd, const char *name, unsigned timeout_s,
			  int (*fn)(void *ctx, const char *name, const char *desc), void *ctx)
{
	struct devio_nbd_client_info info;
	struct hs h = { .fd = fd, .info = &info, .name = name ? name : "nbd client", .export = "" };

	h.timeout_s = timeout_s ? timeout_s : NBD_CLIENT_TIMEOUT_S;
	h.deadline = devio_now_ns() + (uint64_t)h.timeout_s * 1000000000ull;
	return client_list(&h, NULL, fn, ctx);
}

int devio_nbd_client_list_uri(const struct devio_nbd_uri *u, const char *name, unsigned timeout_s,
			      int (*fn)(void *ctx, const char *name, const char *desc), void *ctx)
{
	struct devio_nbd_client_info info;
	struct hs h = { .info = &info, .name = name ? name : "nbd client", .export = "" };
	struct devio_nbd_client_opts o = { .name = h.name };
	struct devio_tls_creds *cr = NULL;
	struct devio_tls *unused = NULL;
	int r;

	o.tls_out = &unused; /* only to say TLS is possible here */
	if (u->tls && (r = client_tls_creds(u, &o, &cr)))
		return r;
	h.fd = devio_connect(&u->addr);
	if (h.fd < 0) {
		devio_err("%s: cannot connect: %s", h.name, strerror(-h.fd));
		devio_tls_creds_free(cr);
		return h.fd;
	}
	h.timeout_s = timeout_s ? timeout_s : NBD_CLIENT_TIMEOUT_S;
	h.deadline = devio_now_ns() + (uint64_t)h.timeout_s * 1000000000ull;
	r = client_list(&h, &o, fn, ctx);
	devio_tls_free(h.tls);
	devio_tls_creds_free(cr);
	close(h.fd);
	return r;
}

int devio_nbd_client_connect(const struct devio_nbd_uri *u, const struct devio_nbd_client_opts *opts,
			     struct devio_nbd_client_info *info)
{
	struct devio_nbd_client_opts o = *opts;
	struct devio_tls_creds *cr = NULL;
	int fd, r;

	if (u->tls && (r = client_tls_creds(u, &o, &cr)))
		return r;
	fd = devio_connect(&u->addr);
	if (fd < 0) {
		devio_err("%s: cannot connect: %s", o.name ? o.name : "nbd client", strerror(-fd));
		devio_tls_creds_free(cr);
		return fd;
	}
	if (!o.export)
		o.export = u->export;
	if ((r = devio_nbd_client_handshake(fd, &o, info))) {
		devio_tls_creds_free(cr);
		close(fd);
		return r;
	}
	if (cr)
		devio_tls_adopt_creds(*o.tls_out, cr);
	return fd;
}
