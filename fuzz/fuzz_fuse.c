/* fuzz_fuse.c - libFuzzer target for the FUSE request codec: arbitrary
 * bytes as one /dev/fuse message, then as a ring entry (op header +
 * payload), answered against a small RAM store.  The first message of
 * every input is a valid INIT so that the other opcodes are reached. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../lib/fuse_proto.h"
#include "devio/request.h"
#include "fuzz_mem.h"

#define DISK_SIZE (1u << 16)
#define REPLY_CAP (1u << 17)

static uint8_t reply[REPLY_CAP];

static void run(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	devio_fuse_handle(fs, msg);
	if (msg->has_io) {
		devio_execute(fs->backend, &msg->req);
		devio_fuse_finish(fs, msg);
	}
	if (msg->reply_len > msg->reply_cap)
		abort();
}

static void init_fs(struct devio_fuse_fs *fs)
{
	struct { struct fuse_in_header h; struct fuse_init_in i; } init = {
		{ sizeof(init), DEVIO_FUSE_INIT, 1, 0, 0, 0, 0, 0, 0 },
		{ 7, 44, 131072, 0xffffffffu, 0xffffffffu, { 0 } },
	};
	struct devio_fuse_msg msg = { .reply = reply, .reply_cap = REPLY_CAP };

	devio_fuse_split((const uint8_t *)&init, sizeof(init), &msg);
	run(fs, &msg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct fuzz_mem m;
	struct devio_fuse_fs fs = { .backend = fuzz_mem_init(&m, DISK_SIZE, 1, 0, 4096, 1), .name = "disk", .size = DISK_SIZE,
				    .max_write = REPLY_CAP, .offer_uring = true };
	struct devio_fuse_msg msg = { .reply = reply, .reply_cap = REPLY_CAP };
	uint8_t *copy;

	init_fs(&fs);
	fs.readonly = size > 0 && (data[0] & 1);
	/* 1: a /dev/fuse message (the length field must match) */
	copy = malloc(size ? size : 1);
	memcpy(copy, data, size);
	if (size >= sizeof(struct fuse_in_header))
		memcpy(copy, &(uint32_t){ (uint32_t)size }, 4);
	if (devio_fuse_split(copy, size, &msg) == 0)
		run(&fs, &msg);
	/* 2: a ring entry: in header, 128 bytes of op header, the rest payload */
	memset(&msg, 0, sizeof(msg));
	msg.reply = reply;
	msg.reply_cap = REPLY_CAP;
	if (size >= sizeof(struct fuse_in_header) + 128) {
		memcpy(&msg.in, copy, sizeof(msg.in));
		msg.arg = copy + sizeof(msg.in);
		msg.arglen = 128;
		/* as on the ring, the payload and the reply share one buffer */
		msg.datalen = size - sizeof(msg.in) - 128;
		if (msg.datalen > REPLY_CAP)
			msg.datalen = REPLY_CAP;
		memcpy(reply, copy + sizeof(msg.in) + 128, msg.datalen);
		msg.data = reply;
		run(&fs, &msg);
	}
	free(copy);
	return 0;
}
