/* fuzz_shm_client.c - libFuzzer target for the shared-memory client
 * backend (backends/devio_shm.c) reading a hostile server's region.  Each
 * input is what a one-shot server on a Unix socket does: its hello (INFO
 * words, extension flags, optionally a broken geometry), then rounds of
 * completion ring entries, a completion tail step and answer headers,
 * written each time the client rings; then it hangs up, so whatever is
 * still in flight fails at once.  The client opens it and runs a split
 * read, a write, a trim, a zero and a flush. */
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/protocol.h"
#include "devio/shm.h"
#include "devio/util.h"

#define NSLOTS 2u
#define DATA 4096u

/* Logging: the quiet stand-in of fuzz_log.c (linked in by meson). */

struct fake {
	int lfd;
	const uint8_t *data;
	size_t size;
	char path[108];
};

static uint64_t take64(struct fake *f)
{
	uint8_t b[8] = { 0 };
	size_t k = f->size < 8 ? f->size : 8;

	memcpy(b, f->data, k);
	f->data += k;
	f->size -= k;
	return devio_get_le64(b);
}

static void send_hello(struct fake *f, int fd, int fds[3], uint64_t rsize)
{
	uint64_t w[DEVIO_SHM_H__COUNT] = { DEVIO_SHM_MAGIC, DEVIO_SHM_VERSION, 0, NSLOTS, DATA, rsize };
	uint8_t hello[DEVIO_SHM_HELLO_BYTES];
	union { char b[CMSG_SPACE(3 * sizeof(int))]; struct cmsghdr a; } u = { 0 };
	struct iovec iov = { hello, sizeof(hello) };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b, .msg_controllen = sizeof(u.b) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	uint64_t how = take64(f);

	for (int i = DEVIO_SHM_H_FILE_SIZE; i <= DEVIO_SHM_H_EXT; i++)
		w[i] = take64(f);
	if (how & 1) /* a broken hello: one word replaced */
		w[(how >> 8) % DEVIO_SHM_H__COUNT] = take64(f);
	for (int i = 0; i < DEVIO_SHM_H__COUNT; i++)
		devio_put_le64(hello + 8 * i, w[i]);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(3 * sizeof(int));
	memcpy(CMSG_DATA(c), fds, 3 * sizeof(int));
	sendmsg(fd, &msg, MSG_NOSIGNAL);
}

/* One round per doorbell (or after 1 ms without one), at most 16: ring
 * entries, a tail step, two answer headers. */
static void answer(struct fake *f, uint8_t *m, uint64_t ctl, int req_efd, int resp_efd)
{
	uint32_t tail = 0;
	uint64_t v;
	int rounds = 0;

	__atomic_store_n((uint32_t *)(void *)(m + ctl + DEVIO_SHM_CTL_SQ_WAKE), 1, __ATOMIC_SEQ_CST);
	while (f->size && rounds++ < 16) {
		struct pollfd p = { .fd = req_efd, .events = POLLIN };
		uint64_t w = take64(f), hdr[4];

		if (poll(&p, 1, 1) > 0 && read(req_efd, &v, sizeof(v)) < 0)
			break;
		for (int i = 0; i < 4; i++)
			hdr[i] = take64(f);
		memcpy(m + ctl + DEVIO_SHM_CTL_RINGS + 4 * devio_shm_ring_cap(NSLOTS), &w, 8);
		for (uint32_t t = 0; t < NSLOTS; t++) {
			devio_put_le64(m + t * devio_shm_slot_size(DATA), hdr[2 * t]);
			devio_put_le64(m + t * devio_shm_slot_size(DATA) + 8, hdr[2 * t + 1]);
		}
		tail += (uint32_t)(hdr[0] >> 56) % 4;
		__atomic_store_n((uint32_t *)(void *)(m + ctl + DEVIO_SHM_CTL_CQ_TAIL), tail, __ATOMIC_RELEASE);
		v = 1;
		if (write(resp_efd, &v, sizeof(v)) < 0)
			break;
	}
}

static void *serve_once(void *arg)
{
	struct fake *f = arg;
	uint64_t rsize = devio_shm_region_size(NSLOTS, DATA), ctl = devio_shm_ctl_offset(NSLOTS, DATA);
	int fd = accept(f->lfd, NULL, NULL);
	int fds[3] = { memfd_create("fuzz", MFD_CLOEXEC | MFD_ALLOW_SEALING), eventfd(0, EFD_CLOEXEC),
		       eventfd(0, EFD_CLOEXEC) };
	uint8_t *m = MAP_FAILED;

	close(f->lfd);
	unlink(f->path);
	if (fds[0] >= 0 && !ftruncate(fds[0], (off_t)rsize) && !fcntl(fds[0], F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW))
		m = mmap(NULL, rsize, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
	if (fd >= 0 && m != MAP_FAILED && fds[1] >= 0 && fds[2] >= 0) {
		send_hello(f, fd, fds, rsize);
		answer(f, m, ctl, fds[1], fds[2]);
	}
	if (m != MAP_FAILED)
		munmap(m, rsize);
	for (int i = 0; i < 3; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	if (fd >= 0)
		close(fd); /* the client sees the hang-up: what is in flight fails */
	return NULL;
}

static int listen_at(struct fake *f)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };

	snprintf(f->path, sizeof(f->path), "/tmp/fuzz_shm_client.%d.sock", (int)getpid());
	unlink(f->path);
	strcpy(sun.sun_path, f->path);
	f->lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (f->lfd < 0)
		return -1;
	if (bind(f->lfd, (struct sockaddr *)&sun, sizeof(sun)) || listen(f->lfd, 4)) {
		close(f->lfd);
		return -1;
	}
	return 0;
}

static void exercise(struct devio_backend *b)
{
	static char buf[64 << 10];
	uint64_t n = b->size < sizeof(buf) ? b->size : sizeof(buf);
	struct devio_request r = { .op = DEVIO_OP_READ, .length = n, .buf = buf };

	if (n)
		devio_execute(b, &r);
	if (b->size > 10) {
		r = (struct devio_request){ .op = DEVIO_OP_WRITE, .offset = 5, .length = 4, .buf = "fuzz" };
		devio_execute(b, &r);
	}
	if (b->size > 4096) {
		r = (struct devio_request){ .op = DEVIO_OP_TRIM, .length = 4096 };
		devio_execute(b, &r);
		r = (struct devio_request){ .op = DEVIO_OP_ZERO, .offset = 4089, .length = 7 };
		devio_execute(b, &r);
	}
	r = (struct devio_request){ .op = DEVIO_OP_FLUSH };
	devio_execute(b, &r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fake f = { .data = data, .size = size };
	struct devio_backend *b = NULL;
	char uri[160];
	pthread_t t;

	if (listen_at(&f))
		return 0;
	if (pthread_create(&t, NULL, serve_once, &f)) {
		close(f.lfd);
		return 0;
	}
	snprintf(uri, sizeof(uri), "devio+shm://%s", f.path);
	if (devio_remote_shm_open(uri, NULL, &b) == 0) {
		exercise(b);
		devio_backend_close(b);
	}
	pthread_join(t, NULL);
	return 0;
}
