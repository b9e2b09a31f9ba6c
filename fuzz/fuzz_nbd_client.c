/* fuzz_nbd_client.c - libFuzzer target for the NBD client: the one
 * handshake (lib/nbd_client.c, shared with attach --nbd-device) and the
 * backend's transmission phase (backends/nbd_remote.c), opened through
 * devio_remote_nbd_open().  The input is everything a malicious server
 * sends — greeting, option replies, then simple replies and structured
 * chunks.  A thread plays that server on a Unix socket (writes the input,
 * then closes its side, draining what the client sends); the client opens
 * the export and runs a read, a write, a block-status walk and a flush,
 * each of which must come back (with data or an error) without touching
 * memory outside its buffers. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/util.h"

struct server {
	int lfd;
	const uint8_t *data;
	size_t size;
};

static void *serve_once(void *arg)
{
	struct server *s = arg;
	char buf[65536];
	int fd = accept(s->lfd, NULL, NULL);

	if (fd < 0)
		return NULL;
	devio_write_full(fd, s->data, s->size);
	shutdown(fd, SHUT_WR);
	while (read(fd, buf, sizeof(buf)) > 0)
		;
	close(fd);
	return NULL;
}

static int count_extent(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	(*(uint64_t *)ctx) += len;
	return 0;
}

static void exercise(struct devio_backend *b)
{
	static uint8_t buf[8192];
	uint64_t seen = 0;

	if (b->size >= sizeof(buf)) {
		b->ops->pread(b, buf, sizeof(buf), 0);
		if (!(b->caps & DEVIO_CAP_READONLY))
			b->ops->pwrite(b, buf, 512, 512, DEVIO_REQ_FUA);
	}
	if (b->ops->extents && b->size)
		b->ops->extents(b, 0, b->size < (1u << 20) ? b->size : (1u << 20), count_extent, &seen);
	if (b->ops->flush)
		b->ops->flush(b);
}

static char path[108];

static void remove_socket(void)
{
	unlink(path);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static char uri[160];
	static int lfd = -1;
	struct server s = { 0 };
	struct devio_backend *b;
	pthread_t t;

	if (size > 65536)
		return 0;
	if (lfd < 0) {
		struct sockaddr_un sun = { .sun_family = AF_UNIX };

		devio_log_set_level(DEVIO_LOG_ERROR);
		snprintf(path, sizeof(path), "/tmp/fuzz-nbd-client-%d.sock", (int)getpid());
		unlink(path);
		strcpy(sun.sun_path, path);
		lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (lfd < 0 || bind(lfd, (struct sockaddr *)&sun, sizeof(sun)) || listen(lfd, 4))
			abort();
		atexit(remove_socket);
		snprintf(uri, sizeof(uri), "nbd+unix:///?socket=%s", path);
	}
	s = (struct server){ lfd, data, size };
	pthread_create(&t, NULL, serve_once, &s);
	if (devio_remote_nbd_open(uri, NULL, &b) == 0) {
		exercise(b);
		devio_backend_close(b);
	}
	pthread_join(t, NULL);
	return 0;
}
