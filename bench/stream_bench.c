/* stream_bench.c - the yardstick for bench/bench_stream.sh: a devio stream
 * protocol load generator (client) and a bare sink/echo server that answers
 * the same requests with the same byte counts but touches no storage, so
 * the ratio devio/sink shows what the server costs beyond the transport.
 *
 *   stream_bench sink tcp:PORT|unix:PATH
 *   stream_bench client tcp:PORT|unix:PATH read|write BLOCK SECONDS [SPAN]
 *
 * The client keeps one request outstanding (QD1, as the protocol does),
 * walks the first SPAN bytes (default 256 MiB) sequentially and prints
 * "ops MiB/s usec/op".  Standalone on purpose: no libdevio code inside. */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static void put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++, v >>= 8)
		p[i] = (uint8_t)v;
}

static uint64_t get64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return v;
}

static int read_all(int fd, void *buf, size_t n)
{
	char *p = buf;
	while (n) {
		ssize_t k = read(fd, p, n);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

static int writev_all(int fd, struct iovec *iov, int cnt)
{
	while (cnt) {
		ssize_t k = writev(fd, iov, cnt);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0)
			return -1;
		while (cnt && (size_t)k >= iov->iov_len) {
			k -= (ssize_t)iov->iov_len;
			iov++;
			cnt--;
		}
		if (cnt) {
			iov->iov_base = (char *)iov->iov_base + k;
			iov->iov_len -= (size_t)k;
		}
	}
	return 0;
}

static void tune(int fd)
{
	int one = 1, buf = 4 << 20;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
}

static int make_addr(const char *a, struct sockaddr_storage *ss, socklen_t *len)
{
	memset(ss, 0, sizeof(*ss));
	if (!strncmp(a, "unix:", 5)) {
		struct sockaddr_un *u = (struct sockaddr_un *)ss;
		u->sun_family = AF_UNIX;
		snprintf(u->sun_path, sizeof(u->sun_path), "%s", a + 5);
		*len = sizeof(*u);
		return AF_UNIX;
	}
	if (!strncmp(a, "tcp:", 4)) {
		struct sockaddr_in *in = (struct sockaddr_in *)ss;
		in->sin_family = AF_INET;
		in->sin_port = htons((uint16_t)atoi(a + 4));
		in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		*len = sizeof(*in);
		return AF_INET;
	}
	return -1;
}

#define MAXBUF (64u << 20)

static void serve_one(int fd, char *buf)
{
	uint8_t h[24];

	for (;;) {
		uint64_t code, len;
		struct iovec iov[2];

		if (read_all(fd, h, 8))
			return;
		code = get64(h);
		if (code == 1) { /* INFO: a large export, alignment 1, no flags */
			put64(h, 1ull << 40);
			put64(h + 8, 1);
			put64(h + 16, 0);
			iov[0] = (struct iovec){ h, 24 };
			if (writev_all(fd, iov, 1))
				return;
			continue;
		}
		if (code != 2 && code != 3)
			return;
		if (read_all(fd, h, 16))
			return;
		len = get64(h + 8);
		if (len > MAXBUF)
			return;
		if (code == 3 && read_all(fd, buf, len))
			return;
		put64(h, 0);
		put64(h + 8, len);
		iov[0] = (struct iovec){ h, 16 };
		iov[1] = (struct iovec){ buf, code == 2 ? len : 0 };
		if (writev_all(fd, iov, code == 2 ? 2 : 1))
			return;
	}
}

static int sink(const char *a)
{
	struct sockaddr_storage ss;
	socklen_t len;
	int fam = make_addr(a, &ss, &len), one = 1, lfd;
	char *buf = malloc(MAXBUF);

	if (fam < 0 || !buf)
		return 2;
	if (fam == AF_UNIX)
		unlink(((struct sockaddr_un *)&ss)->sun_path);
	lfd = socket(fam, SOCK_STREAM, 0);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *)&ss, len) || listen(lfd, 4)) {
		perror("sink: bind/listen");
		return 1;
	}
	memset(buf, 0xA5, MAXBUF);
	for (;;) {
		int fd = accept(lfd, NULL, NULL);
		if (fd < 0)
			continue;
		tune(fd);
		serve_one(fd, buf);
		close(fd);
	}
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int client(const char *a, const char *op, uint64_t bs, double secs, uint64_t span)
{
	struct sockaddr_storage ss;
	socklen_t len;
	int fam = make_addr(a, &ss, &len), fd;
	int is_write = !strcmp(op, "write");
	uint8_t h[24];
	char *buf = malloc(bs);
	uint64_t off = 0, ops = 0, size;
	double t0, t;

	if (fam < 0 || !buf || bs == 0 || bs > MAXBUF)
		return 2;
	memset(buf, 0x5A, bs);
	fd = socket(fam, SOCK_STREAM, 0);
	if (connect(fd, (struct sockaddr *)&ss, len)) {
		perror("client: connect");
		return 1;
	}
	tune(fd);
	put64(h, 1);
	if (writev_all(fd, &(struct iovec){ h, 8 }, 1) || read_all(fd, h, 24))
		return 1;
	size = get64(h);
	if (span > size)
		span = size;
	span -= span % bs;
	if (span < bs)
		return 2;
	t0 = now();
	do {
		for (int i = 0; i < 64; i++) {
			struct iovec iov[2] = { { h, 24 }, { buf, is_write ? bs : 0 } };

			put64(h, is_write ? 3 : 2);
			put64(h + 8, off);
			put64(h + 16, bs);
			if (writev_all(fd, iov, is_write ? 2 : 1) || read_all(fd, h, 16))
				return 1;
			if (get64(h) || get64(h + 8) != bs) {
				fprintf(stderr, "client: error %llu at %llu\n", (unsigned long long)get64(h),
					(unsigned long long)off);
				return 1;
			}
			if (!is_write && read_all(fd, buf, bs))
				return 1;
			ops++;
			off = (off + bs) % span;
		}
		t = now() - t0;
	} while (t < secs);
	put64(h, 5);
	writev_all(fd, &(struct iovec){ h, 8 }, 1);
	close(fd);
	printf("%llu %.1f %.2f\n", (unsigned long long)ops, (double)ops * (double)bs / t / 1048576.0, t / (double)ops * 1e6);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "sink"))
		return sink(argv[2]);
	if ((argc == 6 || argc == 7) && !strcmp(argv[1], "client"))
		return client(argv[2], argv[3], strtoull(argv[4], NULL, 0), atof(argv[5]),
			      argc == 7 ? strtoull(argv[6], NULL, 0) : 256ull << 20);
	fprintf(stderr, "usage: stream_bench sink ADDR | client ADDR read|write BLOCK SECONDS [SPAN]\n");
	return 2;
}
