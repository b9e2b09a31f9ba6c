/* fuzz_stream.c - libFuzzer target for the devio stream protocol decoder:
 * arbitrary bytes are fed as one client's request stream to
 * devio_stream_session() over a memfd (answers go to /dev/null), against
 * the shared in-memory backend (fuzz_mem.c).  Catches over-reads,
 * unbounded allocations and stuck loops. */
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/stream.h"
#include "devio/util.h"
#include "fuzz_mem.h"

#define MEM_SIZE (1u << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int null_fd = -1;
	static struct fuzz_mem m;
	struct devio_backend *b = fuzz_mem_init(&m, MEM_SIZE, 1, 0, 4096, 0);
	struct devio_stream_opts o = { .max_transfer = 256 << 10, .stop_fd = -1, .name = "fuzz" };
	int in;

	if (null_fd < 0) {
		devio_log_set_level(DEVIO_LOG_ERROR);
		null_fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
	}
	/* Odd first byte: a read-only export, to reach the EROFS paths. */
	if (size && (data[0] & 1))
		b->caps |= DEVIO_CAP_READONLY;
	in = memfd_create("fuzz_stream", MFD_CLOEXEC);
	if (in < 0)
		return 0;
	if (size && write(in, data, size) != (ssize_t)size) {
		close(in);
		return 0;
	}
	lseek(in, 0, SEEK_SET);
	devio_stream_session(b, in, null_fd, &o);
	close(in);
	return 0;
}
