/* devio_codec.c - the devio stream protocol's layouts, encoders, decoders
 * and checks (include/devio/protocol.h), shared by the server
 * (frontends/stream.c) and the client (backends/devio_remote.c) so that
 * both ends agree on every byte by construction.  Transport, buffering
 * and what to do with a request stay with each end.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "devio/backend.h"
#include "devio/protocol.h"

size_t devio_proto_req_hdr_size(uint64_t code)
{
	switch (code) {
	case DEVIO_REQ_READ:
	case DEVIO_REQ_WRITE:
	case DEVIO_REQ_CONNECT:
		return 16;  /* offset, length / flags, length */
	case DEVIO_REQ_UNMAP:
	case DEVIO_REQ_ZERO:
		return 8;   /* length of the range array */
	case DEVIO_REQ_SCSI:
		return 32;  /* cdb[16], request_length, max_response_length */
	case DEVIO_REQ_SHARED:
		return 48;  /* operation, scope, type, existing, current, operation keys */
	default:
		return 0;
	}
}

void devio_proto_decode_req(uint64_t code, const uint8_t *hdr, struct devio_proto_req *r)
{
	memset(r, 0, sizeof(*r));
	r->code = code;
	switch (code) {
	case DEVIO_REQ_READ:
	case DEVIO_REQ_WRITE:
		r->offset = devio_get_le64(hdr);
		r->length = devio_get_le64(hdr + 8);
		break;
	case DEVIO_REQ_CONNECT:
		r->flags = devio_get_le64(hdr);
		r->length = devio_get_le64(hdr + 8);
		break;
	case DEVIO_REQ_UNMAP:
	case DEVIO_REQ_ZERO:
		r->length = devio_get_le64(hdr);
		break;
	case DEVIO_REQ_SCSI:
		r->length = devio_get_le64(hdr + 16);
		break;
	default:
		break;
	}
}

size_t devio_proto_encode_req(const struct devio_proto_req *r, uint8_t *out)
{
	devio_put_le64(out, r->code);
	switch (r->code) {
	case DEVIO_REQ_READ:
	case DEVIO_REQ_WRITE:
		devio_put_le64(out + 8, r->offset);
		devio_put_le64(out + 16, r->length);
		return 24;
	case DEVIO_REQ_UNMAP:
	case DEVIO_REQ_ZERO:
		devio_put_le64(out + 8, DEVIO_RANGE_SIZE);
		devio_put_le64(out + 16, r->offset);
		devio_put_le64(out + 24, r->length);
		return 32;
	default:
		return DEVIO_CODE_SIZE;
	}
}

int devio_proto_decode_range(const uint8_t *p, uint64_t size, uint64_t *off, uint64_t *len)
{
	int64_t soff = (int64_t)devio_get_le64(p);

	*off = (uint64_t)soff;
	*len = devio_get_le64(p + 8);
	if (soff < 0 || *off > size || *len > size - *off)
		return -EINVAL;
	return 0;
}

uint64_t devio_proto_wire_errno(int result)
{
	return result < 0 ? (uint64_t)-result : 0;
}

int devio_proto_peer_errno(uint64_t e)
{
	if (e == 0)
		return 0;
	return e < 4096 ? -(int)e : -EIO;
}

void devio_proto_encode_answer(uint8_t out[DEVIO_ANSWER_SIZE], int result, uint64_t length)
{
	devio_put_le64(out, devio_proto_wire_errno(result));
	devio_put_le64(out + 8, length);
}

int devio_proto_decode_answer(const uint8_t in[DEVIO_ANSWER_SIZE], uint64_t asked, int *result, uint64_t *length)
{
	uint64_t e = devio_get_le64(in), n = devio_get_le64(in + 8);

	*length = 0;
	if (e) {
		*result = devio_proto_peer_errno(e);
		return 0; /* no data follows an error */
	}
	if (n > asked)
		return -EPROTO;
	*length = n;
	*result = n == asked ? 0 : -EIO;
	return 0;
}

void devio_proto_encode_info(uint8_t out[DEVIO_INFO_SIZE], const struct devio_info *i)
{
	devio_put_le64(out, i->file_size);
	devio_put_le64(out + 8, i->req_alignment);
	devio_put_le64(out + 16, i->flags);
}

int devio_proto_decode_info(const uint8_t in[DEVIO_INFO_SIZE], struct devio_info *i, char *why, size_t whylen)
{
	i->file_size = devio_get_le64(in);
	i->req_alignment = devio_get_le64(in + 8);
	i->flags = devio_get_le64(in + 16);
	if (i->file_size > INT64_MAX) {
		if (why && whylen)
			snprintf(why, whylen, "the server claims %llu bytes: more than the protocol can address",
				 (unsigned long long)i->file_size);
		return -EINVAL;
	}
	if (i->req_alignment == 0)
		i->req_alignment = 1;
	if (i->req_alignment > DEVIO_MAX_ALIGN || (i->req_alignment & (i->req_alignment - 1))) {
		if (why && whylen)
			snprintf(why, whylen, "the server wants %llu-byte alignment: not a power of two up to %u",
				 (unsigned long long)i->req_alignment, DEVIO_MAX_ALIGN);
		return -EINVAL;
	}
	return 0;
}

uint64_t devio_proto_info_flags(const struct devio_backend *b)
{
	uint64_t flags = 0;

	if (b->caps & DEVIO_CAP_READONLY)
		return DEVIO_INFO_RO;
	if (b->caps & DEVIO_CAP_TRIM)
		flags |= DEVIO_INFO_SUPPORTS_UNMAP;
	return flags | DEVIO_INFO_SUPPORTS_ZERO; /* writable: the core writes zeroes where it must */
}

uint32_t devio_proto_caps(uint64_t info_flags)
{
	uint32_t caps = 0;

	if (info_flags & DEVIO_INFO_RO)
		caps |= DEVIO_CAP_READONLY;
	if (info_flags & DEVIO_INFO_SUPPORTS_UNMAP)
		caps |= DEVIO_CAP_TRIM;
	if (info_flags & DEVIO_INFO_SUPPORTS_ZERO)
		caps |= DEVIO_CAP_ZERO;
	return caps;
}
