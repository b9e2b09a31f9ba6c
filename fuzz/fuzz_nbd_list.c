/* fuzz_nbd_list.c - libFuzzer target for `devio list`'s side of NBD:
 * NBD_OPT_LIST (lib/nbd_client.c, devio_nbd_client_list).  The input is
 * everything a malicious server sends: the greeting, then replies to the
 * option (NBD_REP_SERVER with its name and description, errors, the ACK).
 * A thread plays that server over a socketpair (writes the input, then
 * shuts down its side and drains what the client sends); the client must
 * come back with the names it was given or an error, and never touch
 * memory outside its buffers. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "devio/util.h"
#include "../lib/nbd_client.h"

struct server {
	int fd;
	const uint8_t *data;
	size_t size;
};

static void *serve_once(void *arg)
{
	struct server *s = arg;
	char buf[4096];

	for (size_t off = 0; off < s->size;) { /* no SIGPIPE once the client has hung up */
		ssize_t n = send(s->fd, s->data + off, s->size - off, MSG_NOSIGNAL);

		if (n <= 0)
			break;
		off += (size_t)n;
	}
	shutdown(s->fd, SHUT_WR);
	while (read(s->fd, buf, sizeof(buf)) > 0)
		;
	return NULL;
}

static int count_export(void *ctx, const char *name, const char *desc)
{
	/* the names are C strings within their bounds */
	*(size_t *)ctx += strlen(name) + strlen(desc) + 1;
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct server s = { .data = data, .size = size };
	size_t seen = 0;
	pthread_t t;
	int sv[2];

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
		return 0;
	s.fd = sv[1];
	if (pthread_create(&t, NULL, serve_once, &s)) {
		close(sv[0]);
		close(sv[1]);
		return 0;
	}
	devio_nbd_client_list(sv[0], "fuzz", 2, count_export, &seen);
	shutdown(sv[0], SHUT_RDWR);
	pthread_join(t, NULL);
	close(sv[0]);
	close(sv[1]);
	return 0;
}
