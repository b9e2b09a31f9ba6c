/* fuzz_nbd_handshake.c - libFuzzer target for the server side of NBD's
 * fixed newstyle negotiation (lib/nbd_codec.c): arbitrary bytes are the
 * client's half of the handshake (flags, then options); the server's
 * answers are thrown away.  Two exports on a tiny in-memory backend of its
 * own.  Catches over-reads of option payloads, unbounded allocations and
 * loops that never end.  The last byte picks the --tls mode (off, on,
 * require; STARTTLS "succeeds" without a handshake): under require no
 * export may be chosen before STARTTLS. */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include "devio/backend.h"
#include "devio/frontend.h"
#include "devio/tls.h"
#include "devio/util.h"
#include "../lib/nbd_proto.h"

struct input {
	const uint8_t *data;
	size_t size, pos;
	bool tls;
};

static int in_starttls(void *ctx)
{
	((struct input *)ctx)->tls = true;
	return 0;
}

static int in_read(void *ctx, void *buf, size_t len)
{
	struct input *in = ctx;

	if (len > in->size - in->pos)
		return -ECONNRESET;
	memcpy(buf, in->data + in->pos, len);
	in->pos += len;
	return 0;
}

static int out_write(void *ctx, const void *buf, size_t len)
{
	volatile uint8_t sink = 0;

	/* Touch every byte so that ASan sees a reply built from bad memory. */
	for (size_t i = 0; i < len; i++)
		sink ^= ((const uint8_t *)buf)[i];
	(void)sink;
	return 0;
}

static int zero_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	memset(buf, 0, len);
	return 0;
}

static const struct devio_backend_ops zero_ops = { .name = "fuzz-zero", .pread = zero_pread };

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct devio_backend b1 = { .ops = &zero_ops, .size = 1 << 20, .block_size = 512,
					   .caps = DEVIO_CAP_READONLY };
	static struct devio_backend b2 = { .ops = &zero_ops, .size = 4096, .block_size = 1,
					   .caps = DEVIO_CAP_EXTENTS | DEVIO_CAP_MULTI_CONN };
	static struct devio_export exports[] = { { "", "zero", &b1 }, { "disk", "zero", &b2 } };
	struct devio_server srv = { .exports = exports, .n_exports = 2 };
	struct input in = { data, size, 0, false };
	struct devio_nbd_io io = { in_read, out_write, &in, "fuzz", size ? data[size - 1] % 3 : 0, in_starttls };
	struct devio_nbd_session s;
	int r;

	devio_log_set_level(DEVIO_LOG_ERROR);
	r = devio_nbd_negotiate(&io, &srv, &s);
	if (r == 0 && !s.export)
		__builtin_trap(); /* success must name an export */
	if (r == 0 && io.tls_mode == DEVIO_TLS_REQUIRE && !in.tls)
		__builtin_trap(); /* an export reached without TLS */
	return 0;
}
