/* fuzz_nbd_request.c - libFuzzer target for the NBD transmission phase:
 * the --nbd front end's connection code (devio_nbd_serve_fd) serves one
 * client over a socketpair.  A canned handshake comes first (its variant
 * picked by the first input byte: structured replies and base:allocation
 * or not, read-only or not, EXPORT_NAME or GO); the rest of the input is
 * the client's request stream.  A thread writes it, another drains the
 * replies.  A 1 MiB in-memory backend (fuzz_mem.c: 64 KiB granules,
 * alternately data and holes until written); in some variants it takes at
 * most 3000 bytes at once (max_io), and traps on more, so that the front
 * end must split. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/frontend.h"
#include "devio/util.h"
#include "../lib/nbd_proto.h"
#include "fuzz_mem.h"

#define MEM_SIZE (1u << 20)


struct feed {
	int fd;
	const uint8_t *data;
	size_t size;
};

static void *writer(void *arg)
{
	struct feed *f = arg;

	devio_write_full(f->fd, f->data, f->size);
	shutdown(f->fd, SHUT_WR);
	return NULL;
}

static void *drainer(void *arg)
{
	struct feed *f = arg;
	char buf[65536];

	while (read(f->fd, buf, sizeof(buf)) > 0)
		;
	return NULL;
}

/* The client's handshake: flags, options, and the export choice. */
static size_t handshake(uint8_t v, uint8_t *out)
{
	uint8_t *p = out;

	nbd_put32(p, NBD_FLAG_C_FIXED_NEWSTYLE | (v & 1 ? NBD_FLAG_C_NO_ZEROES : 0));
	p += 4;
	if (v & 2) {
		nbd_put64(p, NBD_OPTS_MAGIC);
		nbd_put32(p + 8, NBD_OPT_STRUCTURED_REPLY);
		nbd_put32(p + 12, 0);
		p += 16;
		nbd_put64(p, NBD_OPTS_MAGIC);
		nbd_put32(p + 8, NBD_OPT_SET_META_CONTEXT);
		nbd_put32(p + 12, 4 + 4 + 4 + 15);
		nbd_put32(p + 16, 0);
		nbd_put32(p + 20, 1);
		nbd_put32(p + 24, 15);
		memcpy(p + 28, "base:allocation", 15);
		p += 16 + 27;
	}
	nbd_put64(p, NBD_OPTS_MAGIC);
	if (v & 4) {
		nbd_put32(p + 8, NBD_OPT_EXPORT_NAME);
		nbd_put32(p + 12, 0);
		p += 16;
	} else {
		nbd_put32(p + 8, NBD_OPT_GO);
		nbd_put32(p + 12, 6);
		nbd_put32(p + 16, 0);
		nbd_put16(p + 20, 0);
		p += 22;
	}
	return (size_t)(p - out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static uint8_t buf[128 + 65536];
	static struct fuzz_mem m;
	struct devio_backend *b = fuzz_mem_init(&m, MEM_SIZE, 512, 0, 65536, 1);
	struct devio_export e = { "", "mem", b };
	struct devio_server srv = { .exports = &e, .n_exports = 1 };
	struct feed wf, df;
	pthread_t wt, dt;
	size_t n;
	int sv[2];

	if (size < 1 || size > 65536)
		return 0;
	devio_log_set_level(DEVIO_LOG_ERROR);
	b->caps |= DEVIO_CAP_FAST_ZERO;
	if (data[0] & 8)
		b->caps |= DEVIO_CAP_READONLY;
	if (data[0] & 16)
		b->max_io = 3000;
	n = handshake(data[0], buf);
	memcpy(buf + n, data + 1, size - 1);
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		return 0;
	wf = (struct feed){ sv[0], buf, n + size - 1 };
	df = (struct feed){ sv[0], NULL, 0 };
	pthread_create(&wt, NULL, writer, &wf);
	pthread_create(&dt, NULL, drainer, &df);
	devio_nbd_serve_fd(&srv, sv[1]);
	shutdown(sv[1], SHUT_RDWR);
	pthread_join(wt, NULL);
	pthread_join(dt, NULL);
	close(sv[0]);
	close(sv[1]);
	return 0;
}
