/* fuzz_stream.c - libFuzzer target for the devio stream protocol decoder:
 * arbitrary bytes are fed as one client's request stream to
 * devio_stream_session() over a memfd (answers go to /dev/null), with a
 * small in-memory backend of its own so the target depends on nothing
 * else.  Catches over-reads, unbounded allocations and stuck loops. */
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/stream.h"
#include "devio/util.h"

#define MEM_SIZE (1u << 20)

static uint8_t mem[MEM_SIZE];

static int mem_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	memcpy(buf, mem + off, len);
	return 0;
}

static int mem_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	memcpy(mem + off, buf, len);
	return 0;
}

static int mem_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	memset(mem + off, 0, len);
	return 0;
}

static const struct devio_backend_ops mem_ops = {
	.name = "fuzz-mem",
	.pread = mem_pread,
	.pwrite = mem_pwrite,
	.trim = mem_trim,
	.zero = mem_trim,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int null_fd = -1;
	struct devio_backend b = { .ops = &mem_ops, .size = MEM_SIZE, .block_size = 1,
				   .caps = DEVIO_CAP_TRIM | DEVIO_CAP_ZERO };
	struct devio_stream_opts o = { .max_transfer = 256 << 10, .stop_fd = -1, .name = "fuzz" };
	int in;

	if (null_fd < 0) {
		devio_log_set_level(DEVIO_LOG_ERROR);
		null_fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
	}
	/* Odd first byte: a read-only export, to reach the EROFS paths. */
	if (size && (data[0] & 1))
		b.caps |= DEVIO_CAP_READONLY;
	in = memfd_create("fuzz_stream", MFD_CLOEXEC);
	if (in < 0)
		return 0;
	if (size && write(in, data, size) != (ssize_t)size) {
		close(in);
		return 0;
	}
	lseek(in, 0, SEEK_SET);
	devio_stream_session(&b, in, null_fd, &o);
	close(in);
	return 0;
}
