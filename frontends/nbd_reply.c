/* nbd_reply.c - the --nbd front end's reply encoders: simple replies,
 * structured ones (read data and hole chunks, block status, error chunks
 * with a message) written into a slot's header buffer and iovec, ready
 * for nbd_tx.c to send.  No I/O here.
 */
#include <stdio.h>
#include <string.h>
#include "nbd_int.h"

#define NBD_SPARSE_BLOCK 4096u

static void nbd_reply_iov_add(struct nbd_slot *sl, void *base, size_t len)
{
	sl->iov[sl->niov].iov_base = base;
	sl->iov[sl->niov].iov_len = len;
	sl->niov++;
}

static void nbd_reply_encode_simple(struct nbd_slot *sl, uint32_t error, bool with_data)
{
	nbd_put32(sl->hdr, NBD_SIMPLE_REPLY_MAGIC);
	nbd_put32(sl->hdr + 4, error);
	nbd_put64(sl->hdr + 8, sl->nr.cookie);
	sl->niov = 0;
	nbd_reply_iov_add(sl, sl->hdr, NBD_SIMPLE_REPLY_SIZE);
	if (with_data && sl->nr.length)
		nbd_reply_iov_add(sl, sl->buf, sl->nr.length);
}

/* Write a chunk header at p; returns p advanced. */
static uint8_t *nbd_reply_chunk_header(uint8_t *p, struct nbd_slot *sl, uint16_t flags, uint16_t type, uint32_t len)
{
	nbd_put32(p, NBD_STRUCTURED_REPLY_MAGIC);
	nbd_put16(p + 4, flags);
	nbd_put16(p + 6, type);
	nbd_put64(p + 8, sl->nr.cookie);
	nbd_put32(p + 16, len);
	return p + NBD_CHUNK_HEADER_SIZE;
}

/* "NBD_CMD_READ", or "NBD_CMD 9" for a command we do not know. */
const char *nbd_cmd_label(uint16_t type, char *buf, size_t len)
{
	const char *name = devio_nbd_cmd_name(type);

	if (name)
		return name;
	snprintf(buf, len, "NBD_CMD %u", type);
	return buf;
}

/* An error chunk whose message says what failed and why (NULL: the NBD
 * error's name). */
static void nbd_reply_encode_error_chunk(struct nbd_slot *sl, uint32_t error, const char *why)
{
	char msg[256], cmd[24];
	uint8_t *p = sl->hdr, *start = sl->hdr;
	int mlen;

	mlen = snprintf(msg, sizeof(msg), "devio: %s offset %llu length %u: %s",
			nbd_cmd_label(sl->nr.type, cmd, sizeof(cmd)), (unsigned long long)sl->nr.offset, sl->nr.length,
			why ? why : devio_nbd_error_name(error));
	if (mlen < 0)
		mlen = 0;
	if (mlen >= (int)sizeof(msg))
		mlen = (int)sizeof(msg) - 1; /* cut short */
	p = nbd_reply_chunk_header(p, sl, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 6u + (uint32_t)mlen);
	nbd_put32(p, error);
	nbd_put16(p + 4, (uint16_t)mlen);
	memcpy(p + 6, msg, (size_t)mlen);
	p += 6 + mlen;
	sl->niov = 0;
	nbd_reply_iov_add(sl, start, (size_t)(p - start));
}

static bool nbd_reply_all_zero(const uint8_t *p, size_t len)
{
	static const uint8_t zeroes[NBD_SPARSE_BLOCK];

	return len <= sizeof(zeroes) && !memcmp(p, zeroes, len);
}

/* Split [0, length) of a read into data and hole runs at 4 KiB blocks
 * (absolute offsets); at most NBD_MAX_CHUNKS runs, the last one data. */
static int nbd_reply_sparse_runs(struct nbd_slot *sl, uint32_t *start, uint32_t *len, bool *hole)
{
	uint64_t off = sl->nr.offset;
	uint32_t total = sl->nr.length, pos = 0;
	int n = 0;

	while (pos < total) {
		uint32_t skew = (uint32_t)((off + pos) % NBD_SPARSE_BLOCK);
		uint32_t step = NBD_SPARSE_BLOCK - skew;
		bool z;

		if (step > total - pos)
			step = total - pos;
		z = step == NBD_SPARSE_BLOCK && nbd_reply_all_zero(sl->buf + pos, step);
		if (n && hole[n - 1] == z) {
			len[n - 1] += step;
		} else if (n == NBD_MAX_CHUNKS) {
			/* Out of chunks: the rest is sent as data. */
			if (hole[n - 1]) {
				n--; /* turn the last hole back into data */
				hole[n] = false;
				n++;
			}
			len[n - 1] = total - start[n - 1];
			break;
		} else {
			start[n] = pos;
			len[n] = step;
			hole[n] = z;
			n++;
		}
		pos += step;
	}
	return n;
}

static void nbd_reply_encode_read_structured(struct nbd_slot *sl)
{
	uint32_t start[NBD_MAX_CHUNKS], len[NBD_MAX_CHUNKS];
	bool hole[NBD_MAX_CHUNKS];
	uint8_t *p = sl->hdr;
	int n;

	sl->niov = 0;
	if (sl->nr.length == 0) {
		p = nbd_reply_chunk_header(p, sl, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
		nbd_reply_iov_add(sl, sl->hdr, NBD_CHUNK_HEADER_SIZE);
		return;
	}
	if (sl->nr.flags & NBD_CMD_FLAG_DF) {
		start[0] = 0;
		len[0] = sl->nr.length;
		hole[0] = false;
		n = 1;
	} else {
		n = nbd_reply_sparse_runs(sl, start, len, hole);
	}
	for (int i = 0; i < n; i++) {
		uint8_t *h = p;
		uint16_t flags = i == n - 1 ? NBD_REPLY_FLAG_DONE : 0;

		if (hole[i]) {
			p = nbd_reply_chunk_header(p, sl, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
			nbd_put64(p, sl->nr.offset + start[i]);
			nbd_put32(p + 8, len[i]);
			p += 12;
			nbd_reply_iov_add(sl, h, (size_t)(p - h));
		} else {
			p = nbd_reply_chunk_header(p, sl, flags, NBD_REPLY_TYPE_OFFSET_DATA, 8 + len[i]);
			nbd_put64(p, sl->nr.offset + start[i]);
			p += 8;
			nbd_reply_iov_add(sl, h, (size_t)(p - h));
			nbd_reply_iov_add(sl, sl->buf + start[i], len[i]);
		}
	}
}

/* A READ sent straight from the store's memory (sl->pieces; NULL pieces
 * are holes, only present when structured replies allow sending them). */
static void nbd_reply_encode_read_mapped(struct nbd_slot *sl)
{
	uint64_t off = sl->nr.offset;
	uint8_t *p = sl->hdr;
	int n = sl->npieces;

	sl->niov = 0;
	if (!sl->c->s.structured) {
		nbd_reply_encode_simple(sl, 0, false);
	} else if (sl->nr.flags & NBD_CMD_FLAG_DF) {
		p = nbd_reply_chunk_header(p, sl, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 8 + sl->nr.length);
		nbd_put64(p, off);
		nbd_reply_iov_add(sl, sl->hdr, (size_t)(p + 8 - sl->hdr));
	} else {
		for (int i = 0; i < n; i++) {
			uint8_t *h = p;
			uint16_t flags = i == n - 1 ? NBD_REPLY_FLAG_DONE : 0;
			uint32_t len = (uint32_t)sl->pieces[i].iov_len;

			if (sl->pieces[i].iov_base) {
				p = nbd_reply_chunk_header(p, sl, flags, NBD_REPLY_TYPE_OFFSET_DATA, 8 + len);
				nbd_put64(p, off);
				p += 8;
				nbd_reply_iov_add(sl, h, (size_t)(p - h));
				nbd_reply_iov_add(sl, sl->pieces[i].iov_base, len);
			} else {
				p = nbd_reply_chunk_header(p, sl, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
				nbd_put64(p, off);
				nbd_put32(p + 8, len);
				p += 12;
				nbd_reply_iov_add(sl, h, (size_t)(p - h));
			}
			off += len;
		}
		return;
	}
	for (int i = 0; i < n; i++)
		nbd_reply_iov_add(sl, sl->pieces[i].iov_base, sl->pieces[i].iov_len);
}

/* Encode the reply for a finished slot (error already mapped; why, if
 * not NULL, says why for the client's human). */
void nbd_encode_reply(struct nbd_slot *sl, uint32_t error, const char *why)
{
	bool structured = sl->c->s.structured;

	if (error) {
		if (structured)
			nbd_reply_encode_error_chunk(sl, error, why);
		else
			nbd_reply_encode_simple(sl, error, false);
		return;
	}
	if (sl->nr.type == NBD_CMD_READ) {
		if (sl->npieces)
			nbd_reply_encode_read_mapped(sl);
		else if (structured)
			nbd_reply_encode_read_structured(sl);
		else
			nbd_reply_encode_simple(sl, 0, true);
		return;
	}
	if (sl->nr.type == NBD_CMD_BLOCK_STATUS) {
		/* sl->buf holds context id + descriptors; sl->held is unused here. */
		uint8_t *p = nbd_reply_chunk_header(sl->hdr, sl, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS,
					  (uint32_t)sl->req.length);
		sl->niov = 0;
		nbd_reply_iov_add(sl, sl->hdr, (size_t)(p - sl->hdr));
		nbd_reply_iov_add(sl, sl->buf, sl->req.length);
		return;
	}
	nbd_reply_encode_simple(sl, 0, false);
}

/* The reply to a READ whose data follows from elsewhere (the connection's
 * pipe): one data chunk's header, or a simple reply's. */
void nbd_encode_read_header(struct nbd_slot *sl)
{
	uint8_t *p;

	if (sl->c->s.structured) {
		p = nbd_reply_chunk_header(sl->hdr, sl, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA,
					   8 + sl->nr.length);
		nbd_put64(p, sl->nr.offset);
		sl->niov = 0;
		nbd_reply_iov_add(sl, sl->hdr, (size_t)(p + 8 - sl->hdr));
	} else {
		nbd_reply_encode_simple(sl, 0, false);
	}
}
