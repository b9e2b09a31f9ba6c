/* nbd_codec.c - the server side of NBD's fixed newstyle negotiation, the
 * decoding and checking of transmission requests, and the header layouts
 * and error values both ends use (the client: lib/nbd_client.c,
 * backends/nbd_remote.c).
 *
 * Used by frontends/nbd.c on sockets and by fuzz/fuzz_nbd_*.c on byte
 * strings: every byte read here comes from an untrusted peer, so every
 * length is checked against what was actually received and nothing is
 * allocated beyond NBD_MAX_OPTION_LEN.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "devio/backend.h"
#include "devio/tls.h"
#include "devio/util.h"
#include "nbd_proto.h"

#define NBD_DEFAULT_PREFERRED 4096u
/* Time a negotiation may spend sending option data we throw away. */
#define NBD_OPTION_SKIP_NS (60ull * 1000000000ull)

struct negotiation {
	struct devio_nbd_io *io;
	struct devio_server *srv;
	struct devio_nbd_session *s;
	bool no_zeroes;
	char meta_export[4097]; /* export that SET_META_CONTEXT was for */
	bool meta_set;
	bool tls;               /* STARTTLS succeeded */
	uint8_t *data;          /* option payload, NBD_MAX_OPTION_LEN + 1 bytes */
	uint32_t len;           /* bytes of data */
	uint64_t skip_until;    /* deadline for skipped option data; 0 = none yet */
};

uint16_t devio_nbd_tflags(const struct devio_backend *b, bool structured)
{
	bool ro = b->caps & DEVIO_CAP_READONLY;
	uint16_t f = NBD_FLAG_HAS_FLAGS;

	if (ro)
		f |= NBD_FLAG_READ_ONLY;
	if (b->caps & DEVIO_CAP_FLUSH)
		f |= NBD_FLAG_SEND_FLUSH;
	if (!ro && (b->caps & DEVIO_CAP_FUA))
		f |= NBD_FLAG_SEND_FUA;
	if (!ro && (b->caps & DEVIO_CAP_TRIM))
		f |= NBD_FLAG_SEND_TRIM;
	if (!ro)
		f |= NBD_FLAG_SEND_WRITE_ZEROES; /* the core writes zeroes if it must */
	if (!ro && (b->caps & DEVIO_CAP_FAST_ZERO))
		f |= NBD_FLAG_SEND_FAST_ZERO;
	if (structured)
		f |= NBD_FLAG_SEND_DF;
	if (b->caps & DEVIO_CAP_MULTI_CONN)
		f |= NBD_FLAG_CAN_MULTI_CONN;
	if (b->caps & DEVIO_CAP_CACHE)
		f |= NBD_FLAG_SEND_CACHE;
	return f;
}

/* Send one option reply: header and len bytes of data. */
static int nc_send_rep(struct negotiation *n, uint32_t opt, uint32_t type, const void *data, uint32_t len)
{
	uint8_t hdr[NBD_OPTION_REPLY_HEADER_SIZE];
	int r;

	devio_nbd_encode_option_reply(hdr, opt, type, len);
	r = n->io->write(n->io->ctx, hdr, sizeof(hdr));
	if (!r && len)
		r = n->io->write(n->io->ctx, data, len);
	return r;
}

/* An error reply with a message for the human at the client. */
static int nc_send_err(struct negotiation *n, uint32_t opt, uint32_t type, const char *msg)
{
	devio_debug("nbd %s: option %u: %s", n->io->peer, opt, msg);
	return nc_send_rep(n, opt, type, msg, (uint32_t)strlen(msg));
}

static struct devio_export *nc_find_export(struct negotiation *n, const uint8_t *name, uint32_t len)
{
	for (size_t i = 0; i < n->srv->n_exports; i++) {
		const char *e = n->srv->exports[i].name;
		if (strlen(e) == len && !memcmp(e, name, len))
			return &n->srv->exports[i];
	}
	return NULL;
}

static bool nc_meta_applies(struct negotiation *n, const struct devio_export *e)
{
	return n->meta_set && !strcmp(n->meta_export, e->name);
}

/* NBD_OPT_EXPORT_NAME: cannot fail with a reply; an unknown name drops
 * the connection, as the protocol says. */
static int nc_opt_export_name(struct negotiation *n)
{
	struct devio_export *e = nc_find_export(n, n->data, n->len);
	uint8_t reply[10 + 124];
	size_t len = n->no_zeroes ? 10 : sizeof(reply);

	if (!e) {
		devio_warn("nbd %s: NBD_OPT_EXPORT_NAME: no export named '%.*s'; closing", n->io->peer,
			   (int)(n->len > 256 ? 256 : n->len), (const char *)n->data);
		return -ENOENT;
	}
	n->s->export = e;
	n->s->base_allocation = n->s->structured && nc_meta_applies(n, e);
	n->s->tflags = devio_nbd_tflags(e->backend, n->s->structured);
	n->s->max_payload = NBD_MAX_PAYLOAD; /* the client never learns a maximum */
	memset(reply, 0, sizeof(reply));
	nbd_put64(reply, e->backend->size);
	nbd_put16(reply + 8, n->s->tflags);
	return n->io->write(n->io->ctx, reply, len);
}

static int nc_opt_list(struct negotiation *n)
{
	uint8_t buf[4 + 4096];
	int r;

	if (n->len)
		return nc_send_err(n, NBD_OPT_LIST, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
	for (size_t i = 0; i < n->srv->n_exports; i++) {
		const char *name = n->srv->exports[i].name;
		size_t len = strlen(name);

		if (len > 4096)
			continue;
		nbd_put32(buf, (uint32_t)len);
		memcpy(buf + 4, name, len);
		r = nc_send_rep(n, NBD_OPT_LIST, NBD_REP_SERVER, buf, (uint32_t)(4 + len));
		if (r)
			return r;
	}
	return nc_send_rep(n, NBD_OPT_LIST, NBD_REP_ACK, NULL, 0);
}

static int nc_send_info(struct negotiation *n, uint32_t opt, uint16_t type, const void *data, uint32_t len)
{
	uint8_t buf[2 + 4096];

	if (len > 4096)
		len = 4096; /* names come from our command line; never longer in practice */
	nbd_put16(buf, type);
	memcpy(buf + 2, data, len);
	return nc_send_rep(n, opt, NBD_REP_INFO, buf, 2 + len);
}

static int nc_send_description(struct negotiation *n, uint32_t opt, const struct devio_export *e)
{
	char desc[512];
	int len = snprintf(desc, sizeof(desc), "devio %s export", e->backend->ops->name ? e->backend->ops->name : "");

	if (len < 0 || len >= (int)sizeof(desc))
		return 0;
	return nc_send_info(n, opt, NBD_INFO_DESCRIPTION, desc, (uint32_t)len);
}

static int nc_send_block_size(struct negotiation *n, uint32_t opt, const struct devio_backend *b)
{
	uint8_t bs[12];
	uint32_t pref = b->block_size > NBD_DEFAULT_PREFERRED ? b->block_size : NBD_DEFAULT_PREFERRED;

	nbd_put32(bs, 1);
	nbd_put32(bs + 4, pref);
	nbd_put32(bs + 8, NBD_MAX_BLOCK); /* whatever b->max_io: the front end splits */
	return nc_send_info(n, opt, NBD_INFO_BLOCK_SIZE, bs, sizeof(bs));
}

/* NBD_OPT_INFO and NBD_OPT_GO: name, requested infos; reply with the
 * infos (NBD_INFO_EXPORT always), then ACK.  Returns 1 after a GO. */
static int nc_opt_info_go(struct negotiation *n, uint32_t opt)
{
	struct devio_export *e;
	uint32_t namelen;
	uint16_t ninfos, tflags;
	const uint8_t *infos;
	bool asked_sizes = false;
	uint8_t exp[10];
	int r;

	if (n->len < 6)
		return nc_send_err(n, opt, NBD_REP_ERR_INVALID, "option too short");
	namelen = nbd_get32(n->data);
	if (namelen > n->len - 6)
		return nc_send_err(n, opt, NBD_REP_ERR_INVALID, "export name longer than the option");
	ninfos = nbd_get16(n->data + 4 + namelen);
	if ((uint64_t)n->len != 6ull + namelen + 2ull * ninfos)
		return nc_send_err(n, opt, NBD_REP_ERR_INVALID,
				   "information request count does not match the option length");
	e = nc_find_export(n, n->data + 4, namelen);
	if (!e)
		return nc_send_err(n, opt, NBD_REP_ERR_UNKNOWN, "no such export");
	tflags = devio_nbd_tflags(e->backend, n->s->structured);
	infos = n->data + 6 + namelen;
	for (uint16_t i = 0; i < ninfos; i++) {
		uint16_t type = nbd_get16(infos + 2 * i);

		r = 0;
		if (type == NBD_INFO_NAME)
			r = nc_send_info(n, opt, NBD_INFO_NAME, e->name, (uint32_t)strlen(e->name));
		else if (type == NBD_INFO_DESCRIPTION)
			r = nc_send_description(n, opt, e);
		else if (type == NBD_INFO_BLOCK_SIZE)
			asked_sizes = true; /* sent below in any case */
		if (r)
			return r;
	}
	/* Our minimum block size is 1, so sending the sizes unasked is safe. */
	if ((r = nc_send_block_size(n, opt, e->backend)))
		return r;
	nbd_put64(exp, e->backend->size);
	nbd_put16(exp + 8, tflags);
	if ((r = nc_send_info(n, opt, NBD_INFO_EXPORT, exp, sizeof(exp))))
		return r;
	if ((r = nc_send_rep(n, opt, NBD_REP_ACK, NULL, 0)))
		return r;
	if (opt != NBD_OPT_GO)
		return 0;
	n->s->export = e;
	n->s->tflags = tflags;
	n->s->base_allocation = n->s->structured && nc_meta_applies(n, e);
	/* Asking for the block sizes in GO is a promise to keep to them. */
	n->s->max_payload = asked_sizes ? NBD_MAX_BLOCK : NBD_MAX_PAYLOAD;
	return 1;
}

static int nc_opt_structured_reply(struct negotiation *n)
{
	if (n->len)
		return nc_send_err(n, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID,
				   "NBD_OPT_STRUCTURED_REPLY takes no data");
	n->s->structured = true;
	return nc_send_rep(n, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NULL, 0);
}

/* Does a query name base:allocation?  LIST also accepts the bare
 * namespace "base:" (every context in it). */
static bool nc_query_matches(const uint8_t *q, uint32_t len, bool list)
{
	static const char ctx[] = "base:allocation";

	if (len == sizeof(ctx) - 1 && !memcmp(q, ctx, len))
		return true;
	return list && len == 5 && !memcmp(q, "base:", 5);
}

static int nc_send_meta_context(struct negotiation *n, uint32_t opt, uint32_t id)
{
	static const char ctx[] = "base:allocation";
	uint8_t buf[4 + sizeof(ctx)];

	nbd_put32(buf, id);
	memcpy(buf + 4, ctx, sizeof(ctx) - 1);
	return nc_send_rep(n, opt, NBD_REP_META_CONTEXT, buf, (uint32_t)(4 + sizeof(ctx) - 1));
}

/* NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: export name,
 * query count, queries.  We know one context, base:allocation. */
static int nc_opt_meta_context(struct negotiation *n, uint32_t opt)
{
	bool list = opt == NBD_OPT_LIST_META_CONTEXT, found = false;
	uint32_t namelen, nq, pos;
	struct devio_export *e;

	if (!n->s->structured)
		return nc_send_err(n, opt, NBD_REP_ERR_INVALID, "negotiate structured replies first");
	if (n->len < 8)
		return nc_send_err(n, opt, NBD_REP_ERR_INVALID, "option too short");
	namelen = nbd_get32(n->data);
	if (namelen > n->len - 8)
		return nc_send_err(n, opt, NBD_REP_ERR_INVALID, "export name longer than the option");
	nq = nbd_get32(n->data + 4 + namelen);
	pos = 8 + namelen;
	/* First pass: check the whole query list fits exactly. */
	for (uint32_t i = 0; i < nq; i++) {
		uint32_t qlen;

		if (n->len - pos < 4)
			return nc_send_err(n, opt, NBD_REP_ERR_INVALID, "query list longer than the option");
		qlen = nbd_get32(n->data + pos);
		if (qlen > n->len - pos - 4)
			return nc_send_err(n, opt, NBD_REP_ERR_INVALID, "query longer than the option");
		if (nc_query_matches(n->data + pos + 4, qlen, list))
			found = true;
		pos += 4 + qlen;
	}
	if (pos != n->len)
		return nc_send_err(n, opt, NBD_REP_ERR_INVALID, "trailing bytes after the queries");
	e = nc_find_export(n, n->data + 4, namelen);
	if (!e)
		return nc_send_err(n, opt, NBD_REP_ERR_UNKNOWN, "no such export");
	if (list && nq == 0)
		found = true;
	if (!list) {
		n->meta_set = found;
		snprintf(n->meta_export, sizeof(n->meta_export), "%s", e->name);
	}
	if (found) {
		int r = nc_send_meta_context(n, opt, list ? 0 : NBD_META_ID_BASE_ALLOCATION);
		if (r)
			return r;
	}
	return nc_send_rep(n, opt, NBD_REP_ACK, NULL, 0);
}

/* NBD_OPT_STARTTLS: ACK, then the handshake; a failed one ends the
 * connection.  Nothing negotiated in the clear carries over. */
static int nc_opt_starttls(struct negotiation *n)
{
	int r;

	if (n->io->tls_mode == DEVIO_TLS_OFF || !n->io->starttls)
		return nc_send_err(n, NBD_OPT_STARTTLS, NBD_REP_ERR_UNSUP, "this server does not offer TLS");
	if (n->tls)
		return nc_send_err(n, NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID, "TLS is already on");
	if (n->len)
		return nc_send_err(n, NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID,
				   "NBD_OPT_STARTTLS takes no data");
	if ((r = nc_send_rep(n, NBD_OPT_STARTTLS, NBD_REP_ACK, NULL, 0)))
		return r;
	if ((r = n->io->starttls(n->io->ctx)))
		return r;
	n->tls = true;
	n->s->structured = false;
	n->meta_set = false;
	return 0;
}

/* Under --tls require, before STARTTLS: 1 when opt may run, else 0
 * after refusing it with ERR_TLS_REQD (an EXPORT_NAME cannot be refused:
 * the connection ends) or -errno. */
static int nc_tls_allows(struct negotiation *n, uint32_t opt)
{
	if (n->io->tls_mode != DEVIO_TLS_REQUIRE || n->tls || opt == NBD_OPT_STARTTLS || opt == NBD_OPT_ABORT)
		return 1;
	if (opt == NBD_OPT_EXPORT_NAME) {
		devio_warn("nbd %s: NBD_OPT_EXPORT_NAME before TLS (--tls require); closing", n->io->peer);
		return -EACCES;
	}
	return nc_send_err(n, opt, NBD_REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first");
}

/* Options this server carries out. */
static bool nc_option_implemented(uint32_t opt)
{
	switch (opt) {
	case NBD_OPT_EXPORT_NAME:
	case NBD_OPT_ABORT:
	case NBD_OPT_LIST:
	case NBD_OPT_STARTTLS:
	case NBD_OPT_INFO:
	case NBD_OPT_GO:
	case NBD_OPT_STRUCTURED_REPLY:
	case NBD_OPT_LIST_META_CONTEXT:
	case NBD_OPT_SET_META_CONTEXT:
		return true;
	default:
		return false;
	}
}

/* Read len bytes of option data and throw them away, in pieces through
 * n->data; all the skipping of one negotiation gets NBD_OPTION_SKIP_NS. */
static int nc_skip_data(struct negotiation *n, uint32_t opt, uint32_t len)
{
	int r;

	if (!n->skip_until)
		n->skip_until = devio_now_ns() + NBD_OPTION_SKIP_NS;
	while (len) {
		uint32_t chunk = len < NBD_MAX_OPTION_LEN ? len : NBD_MAX_OPTION_LEN;

		if (devio_now_ns() > n->skip_until) {
			devio_warn("nbd %s: option %u: %u bytes of its data still unsent after %llu s of "
				   "oversized options; closing", n->io->peer, opt, len,
				   NBD_OPTION_SKIP_NS / 1000000000ull);
			return -ETIMEDOUT;
		}
		if ((r = n->io->read(n->io->ctx, n->data, chunk)))
			return r;
		len -= chunk;
	}
	return 0;
}

/* Read one option header and its payload, or throw away a payload over
 * NBD_MAX_OPTION_LEN: any length for an option we do not implement (it
 * gets ERR_UNSUP), up to NBD_MAX_OPTION_SKIP for one we do (ERR_TOO_BIG).
 * Returns 0, 1 when the payload was thrown away, or -errno. */
static int nc_read_option(struct negotiation *n, uint32_t *opt)
{
	uint8_t hdr[NBD_OPTION_HEADER_SIZE];
	uint32_t len;
	int r;

	if ((r = n->io->read(n->io->ctx, hdr, sizeof(hdr))))
		return r;
	if (devio_nbd_decode_option(hdr, opt, &len)) {
		devio_warn("nbd %s: bad option magic; closing", n->io->peer);
		return -EPROTO;
	}
	n->len = 0;
	if (len <= NBD_MAX_OPTION_LEN) {
		n->len = len;
		return len ? n->io->read(n->io->ctx, n->data, len) : 0;
	}
	if (*opt == NBD_OPT_EXPORT_NAME || (nc_option_implemented(*opt) && len > NBD_MAX_OPTION_SKIP)) {
		devio_warn("nbd %s: option %u with %u bytes of data is too large; closing", n->io->peer, *opt, len);
		return -EMSGSIZE;
	}
	r = nc_skip_data(n, *opt, len);
	return r ? r : 1;
}

/* Run one option; 1 once the client chose an export, 0 to go on. */
static int nc_do_option(struct negotiation *n, uint32_t opt)
{
	int r;

	switch (opt) {
	case NBD_OPT_EXPORT_NAME:
		r = nc_opt_export_name(n);
		return r ? r : 1;
	case NBD_OPT_ABORT:
		nc_send_rep(n, opt, NBD_REP_ACK, NULL, 0); /* the peer may already be gone */
		return -ECONNABORTED;
	case NBD_OPT_LIST:
		return nc_opt_list(n);
	case NBD_OPT_STARTTLS:
		return nc_opt_starttls(n);
	case NBD_OPT_INFO:
	case NBD_OPT_GO:
		return nc_opt_info_go(n, opt);
	case NBD_OPT_STRUCTURED_REPLY:
		return nc_opt_structured_reply(n);
	case NBD_OPT_LIST_META_CONTEXT:
	case NBD_OPT_SET_META_CONTEXT:
		return nc_opt_meta_context(n, opt);
	default:
		return nc_send_err(n, opt, NBD_REP_ERR_UNSUP, "unknown option");
	}
}

/* Answer an option whose payload nc_read_option() threw away. */
static int nc_refuse_skipped(struct negotiation *n, uint32_t opt)
{
	if (nc_option_implemented(opt))
		return nc_send_err(n, opt, NBD_REP_ERR_TOO_BIG, "option data too large");
	return nc_do_option(n, opt); /* ERR_UNSUP; n->len is 0 */
}

/* Run or refuse one option nc_read_option() read (skipped: its data was
 * thrown away).  1 once the client chose an export, 0 to go on. */
static int nc_run_option(struct negotiation *n, uint32_t opt, bool skipped)
{
	int r = nc_tls_allows(n, opt);

	if (r != 1)
		return r; /* 0: refused with a reply */
	return skipped ? nc_refuse_skipped(n, opt) : nc_do_option(n, opt);
}

static int nc_greet(struct negotiation *n)
{
	uint8_t hello[18], cflags[4];
	uint32_t f;
	int r;

	nbd_put64(hello, NBD_MAGIC);
	nbd_put64(hello + 8, NBD_OPTS_MAGIC);
	nbd_put16(hello + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
	if ((r = n->io->write(n->io->ctx, hello, sizeof(hello))))
		return r;
	if ((r = n->io->read(n->io->ctx, cflags, sizeof(cflags))))
		return r;
	f = nbd_get32(cflags);
	if (f & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
		devio_warn("nbd %s: unknown client flags 0x%x; closing", n->io->peer, f);
		return -EPROTO;
	}
	n->no_zeroes = f & NBD_FLAG_C_NO_ZEROES;
	return 0;
}

int devio_nbd_negotiate(struct devio_nbd_io *io, struct devio_server *srv, struct devio_nbd_session *out)
{
	struct negotiation *n;
	int r;

	memset(out, 0, sizeof(*out));
	n = calloc(1, sizeof(*n));
	if (!n)
		return -ENOMEM;
	n->data = malloc(NBD_MAX_OPTION_LEN + 1);
	if (!n->data) {
		r = -ENOMEM;
		goto out_free;
	}
	n->io = io;
	n->srv = srv;
	n->s = out;
	if ((r = nc_greet(n)))
		goto out_free;
	for (unsigned i = 0; i < NBD_MAX_OPTIONS; i++) {
		uint32_t opt = 0;

		r = nc_read_option(n, &opt);
		/* A SET_META_CONTEXT replaces the selection even when it fails
		 * (malformed, too big, unknown export, no structured replies). */
		if (r >= 0 && opt == NBD_OPT_SET_META_CONTEXT)
			n->meta_set = false;
		if (r >= 0)
			r = nc_run_option(n, opt, r == 1);
		if (r)
			goto out_free;
	}
	if (r == 0) {
		devio_warn("nbd %s: more than %d options without choosing an export; closing", io->peer,
			   NBD_MAX_OPTIONS);
		r = -EPROTO;
	}
out_free:
	free(n->data);
	free(n);
	return r == 1 ? 0 : r < 0 ? r : -EPROTO;
}

int devio_nbd_decode_request(const uint8_t *hdr, struct devio_nbd_request *r)
{
	if (nbd_get32(hdr) != NBD_REQUEST_MAGIC)
		return -EPROTO;
	r->flags = nbd_get16(hdr + 4);
	r->type = nbd_get16(hdr + 6);
	r->cookie = nbd_get64(hdr + 8);
	r->offset = nbd_get64(hdr + 16);
	r->length = nbd_get32(hdr + 24);
	return 0;
}

void devio_nbd_encode_request(uint8_t hdr[NBD_REQUEST_SIZE], const struct devio_nbd_request *r)
{
	nbd_put32(hdr, NBD_REQUEST_MAGIC);
	nbd_put16(hdr + 4, r->flags);
	nbd_put16(hdr + 6, r->type);
	nbd_put64(hdr + 8, r->cookie);
	nbd_put64(hdr + 16, r->offset);
	nbd_put32(hdr + 24, r->length);
}

void devio_nbd_encode_option(uint8_t hdr[NBD_OPTION_HEADER_SIZE], uint32_t opt, uint32_t len)
{
	nbd_put64(hdr, NBD_OPTS_MAGIC);
	nbd_put32(hdr + 8, opt);
	nbd_put32(hdr + 12, len);
}

int devio_nbd_decode_option(const uint8_t hdr[NBD_OPTION_HEADER_SIZE], uint32_t *opt, uint32_t *len)
{
	if (nbd_get64(hdr) != NBD_OPTS_MAGIC)
		return -EPROTO;
	*opt = nbd_get32(hdr + 8);
	*len = nbd_get32(hdr + 12);
	return 0;
}

void devio_nbd_encode_option_reply(uint8_t hdr[NBD_OPTION_REPLY_HEADER_SIZE], uint32_t opt, uint32_t type,
				   uint32_t len)
{
	nbd_put64(hdr, NBD_REP_MAGIC);
	nbd_put32(hdr + 8, opt);
	nbd_put32(hdr + 12, type);
	nbd_put32(hdr + 16, len);
}

int devio_nbd_decode_option_reply(const uint8_t hdr[NBD_OPTION_REPLY_HEADER_SIZE], uint32_t opt, uint32_t *type,
				  uint32_t *len)
{
	*type = nbd_get32(hdr + 12);
	*len = nbd_get32(hdr + 16);
	return nbd_get64(hdr) == NBD_REP_MAGIC && nbd_get32(hdr + 8) == opt ? 0 : -EPROTO;
}

/* Command flags each command may carry, given what was negotiated. */
static uint16_t nc_allowed_flags(const struct devio_nbd_session *s, uint16_t type)
{
	uint16_t f = (s->tflags & NBD_FLAG_SEND_FUA) ? NBD_CMD_FLAG_FUA : 0;

	switch (type) {
	case NBD_CMD_READ:
		return f | ((s->tflags & NBD_FLAG_SEND_DF) ? NBD_CMD_FLAG_DF : 0);
	case NBD_CMD_WRITE_ZEROES:
		return f | NBD_CMD_FLAG_NO_HOLE |
		       ((s->tflags & NBD_FLAG_SEND_FAST_ZERO) ? NBD_CMD_FLAG_FAST_ZERO : 0);
	case NBD_CMD_BLOCK_STATUS:
		return f | NBD_CMD_FLAG_REQ_ONE;
	default:
		return f;
	}
}

static bool nc_advertised(const struct devio_nbd_session *s, uint16_t type)
{
	switch (type) {
	case NBD_CMD_READ:
	case NBD_CMD_DISC:
	case NBD_CMD_FLUSH: /* harmless even when not advertised */
		return true;
	case NBD_CMD_WRITE:
		return true; /* read-only is answered with EPERM before this */
	case NBD_CMD_TRIM:
		return s->tflags & NBD_FLAG_SEND_TRIM;
	case NBD_CMD_WRITE_ZEROES:
		return s->tflags & NBD_FLAG_SEND_WRITE_ZEROES;
	case NBD_CMD_CACHE:
		return s->tflags & NBD_FLAG_SEND_CACHE;
	case NBD_CMD_BLOCK_STATUS:
		return s->structured && s->base_allocation;
	default:
		return false;
	}
}

const char *devio_nbd_cmd_name(uint16_t type)
{
	static const char *const names[] = {
		"NBD_CMD_READ", "NBD_CMD_WRITE", "NBD_CMD_DISC", "NBD_CMD_FLUSH",
		"NBD_CMD_TRIM", "NBD_CMD_CACHE", "NBD_CMD_WRITE_ZEROES", "NBD_CMD_BLOCK_STATUS",
	};

	return type < sizeof(names) / sizeof(names[0]) ? names[type] : NULL;
}

const char *devio_nbd_error_name(uint32_t err)
{
	switch (err) {
	case 0: return "no error";
	case NBD_EPERM: return "EPERM";
	case NBD_ENOMEM: return "ENOMEM";
	case NBD_EINVAL: return "EINVAL";
	case NBD_ENOSPC: return "ENOSPC";
	case NBD_EOVERFLOW: return "EOVERFLOW";
	case NBD_ENOTSUP: return "ENOTSUP";
	case NBD_ESHUTDOWN: return "ESHUTDOWN";
	default: return "EIO";
	}
}

/* Refuse with err, saying why (printf-style) if the caller wants to know. */
static uint32_t __attribute__((format(printf, 4, 5)))
nc_refuse(uint32_t err, char *why, size_t whylen, const char *fmt, ...)
{
	va_list ap;

	if (why && whylen) {
		va_start(ap, fmt);
		vsnprintf(why, whylen, fmt, ap);
		va_end(ap);
	}
	return err;
}

/* The rule a command that was not advertised breaks. */
static uint32_t nc_refuse_unadvertised(const struct devio_nbd_session *s, uint16_t type, char *why,
				       size_t whylen)
{
	if (type == NBD_CMD_BLOCK_STATUS && !s->structured)
		return nc_refuse(NBD_EINVAL, why, whylen, "structured replies not negotiated");
	if (type == NBD_CMD_BLOCK_STATUS)
		return nc_refuse(NBD_EINVAL, why, whylen,
				 "no metadata context selected (NBD_OPT_SET_META_CONTEXT)");
	return nc_refuse(NBD_EINVAL, why, whylen, "%s not advertised for this export",
			 devio_nbd_cmd_name(type));
}

uint32_t devio_nbd_check_request(const struct devio_nbd_session *s, const struct devio_nbd_request *r,
				 char *why, size_t whylen)
{
	const struct devio_backend *b = s->export->backend;
	bool writes = r->type == NBD_CMD_WRITE || r->type == NBD_CMD_TRIM || r->type == NBD_CMD_WRITE_ZEROES;
	uint16_t bad_flags;

	if (!devio_nbd_cmd_name(r->type))
		return nc_refuse(NBD_EINVAL, why, whylen, "NBD_CMD %u unknown", r->type);
	if ((bad_flags = r->flags & ~nc_allowed_flags(s, r->type)))
		return nc_refuse(NBD_EINVAL, why, whylen,
				 "command flags 0x%x not valid for %s or not negotiated",
				 bad_flags, devio_nbd_cmd_name(r->type));
	if (writes && (b->caps & DEVIO_CAP_READONLY))
		return nc_refuse(NBD_EPERM, why, whylen, "write to a read-only export");
	if (!nc_advertised(s, r->type))
		return nc_refuse_unadvertised(s, r->type, why, whylen);
	if (r->type == NBD_CMD_DISC || r->type == NBD_CMD_FLUSH)
		return 0;
	if ((r->type == NBD_CMD_READ || r->type == NBD_CMD_WRITE) && r->length > s->max_payload)
		return nc_refuse(NBD_EOVERFLOW, why, whylen, "length 0x%x over the %u MiB maximum%s",
				 r->length, s->max_payload >> 20,
				 s->max_payload == NBD_MAX_BLOCK ? " block size the client asked for" : "");
	if (r->type == NBD_CMD_BLOCK_STATUS && r->length == 0)
		return nc_refuse(NBD_EINVAL, why, whylen, "NBD_CMD_BLOCK_STATUS of length 0");
	if (r->offset > b->size || r->length > b->size - r->offset)
		return nc_refuse(r->type == NBD_CMD_WRITE || r->type == NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL,
				 why, whylen, "offset+length past the end of the %llu-byte export",
				 (unsigned long long)b->size);
	return 0;
}

uint32_t devio_nbd_errno(int err)
{
	switch (-err) {
	case 0:
		return 0;
	case EPERM:
	case EROFS:
	case EACCES:
		return NBD_EPERM;
	case ENOMEM:
		return NBD_ENOMEM;
	case EINVAL:
		return NBD_EINVAL;
	case ENOSPC:
	case EDQUOT:
	case EFBIG:
		return NBD_ENOSPC;
	case EOVERFLOW:
		return NBD_EOVERFLOW;
	case EOPNOTSUPP:
		return NBD_ENOTSUP;
	case ESHUTDOWN:
		return NBD_ESHUTDOWN;
	default:
		return NBD_EIO;
	}
}

int devio_nbd_to_errno(uint32_t err)
{
	switch (err) {
	case 0: return 0;
	case NBD_EPERM: return -EPERM;
	case NBD_ENOMEM: return -ENOMEM;
	case NBD_EINVAL: return -EINVAL;
	case NBD_ENOSPC: return -ENOSPC;
	case NBD_EOVERFLOW: return -EOVERFLOW;
	case NBD_ENOTSUP: return -EOPNOTSUPP;
	case NBD_ESHUTDOWN: return -ESHUTDOWN;
	default: return -EIO;
	}
}
