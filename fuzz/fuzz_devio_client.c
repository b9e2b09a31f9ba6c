/* fuzz_devio_client.c - libFuzzer target for the other direction: the
 * devio client backend (backends/devio_remote.c) reading a hostile
 * server's answers.  Each input is everything a one-shot server on a Unix
 * socket says (INFO answer first, then answers to whatever the client
 * asks); the client opens it and runs a read, an unaligned write, a trim
 * and a zero.  The server stops listening after its one connection, so the
 * client's single reconnect fails at once instead of waiting. */
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

/* Logging: the quiet stand-in of fuzz_log.c (linked in by meson). */

struct fake_server {
	int lfd;
	const uint8_t *data;
	size_t size;
	char path[108];
};

static void *serve_once(void *arg)
{
	struct fake_server *fs = arg;
	char sink[65536];
	int fd = accept(fs->lfd, NULL, NULL);

	close(fs->lfd); /* a reconnect is refused */
	unlink(fs->path);
	if (fd < 0)
		return NULL;
	if (fs->size)
		devio_write_full(fd, fs->data, fs->size);
	shutdown(fd, SHUT_WR);
	while (read(fd, sink, sizeof(sink)) > 0)
		; /* take whatever the client sends until it hangs up */
	close(fd);
	return NULL;
}

static int listen_at(struct fake_server *fs)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };

	snprintf(fs->path, sizeof(fs->path), "/tmp/fuzz_devio_client.%d.sock", (int)getpid());
	unlink(fs->path);
	strcpy(sun.sun_path, fs->path);
	fs->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fs->lfd < 0)
		return -1;
	if (bind(fs->lfd, (struct sockaddr *)&sun, sizeof(sun)) || listen(fs->lfd, 4)) {
		close(fs->lfd);
		return -1;
	}
	return 0;
}

static void exercise(struct devio_backend *b)
{
	static char buf[3 << 20];
	uint64_t n = b->size < sizeof(buf) ? b->size : sizeof(buf);

	if (n)
		b->ops->pread(b, buf, n, 0);
	if (b->size > 10 && !(b->caps & DEVIO_CAP_READONLY))
		b->ops->pwrite(b, "fuzz", b->size - 5 < 4 ? b->size - 5 : 4, 5, 0);
	if (b->size > 4096 && b->ops->trim)
		b->ops->trim(b, 0, 4096, 0);
	if (b->size > 4096 && b->ops->zero)
		b->ops->zero(b, 4096 - 7, 7, 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fake_server fs = { .data = data, .size = size };
	struct devio_open_opts o = { .has_size = true, .size = 1 << 20 }; /* used if INFO says 0 */
	struct devio_backend *b = NULL;
	char uri[160];
	pthread_t t;

	if (listen_at(&fs))
		return 0;
	if (pthread_create(&t, NULL, serve_once, &fs)) {
		close(fs.lfd);
		return 0;
	}
	snprintf(uri, sizeof(uri), "devio+unix://%s", fs.path);
	if (devio_remote_devio_open(uri, &o, &b) == 0) {
		exercise(b);
		devio_backend_close(b);
	} else {
		/* the server may still wait for a connection that never came */
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		struct sockaddr_un sun = { .sun_family = AF_UNIX };

		strcpy(sun.sun_path, fs.path);
		if (fd >= 0 && connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == 0)
			shutdown(fd, SHUT_RDWR);
		if (fd >= 0)
			close(fd);
	}
	pthread_join(t, NULL);
	return 0;
}
