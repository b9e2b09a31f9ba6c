/* test_util.c - size parsing, address parsing, the request checks,
 * replacing a file whole (lib/filereplace.c) and telling a TCP socket
 * connected to itself (lib/net.c). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/util.h"

static void test_parse_size(void **state)
{
	uint64_t v;

	assert_int_equal(devio_parse_size("4096", &v), 0);
	assert_int_equal(v, 4096);
	assert_int_equal(devio_parse_size("64K", &v), 0);
	assert_int_equal(v, 65536);
	assert_int_equal(devio_parse_size("1T", &v), 0);
	assert_int_equal(v, 1ull << 40);
	assert_int_equal(devio_parse_size("2GiB", &v), 0);
	assert_int_equal(v, 2ull << 30);
	assert_int_equal(devio_parse_size("0x1000", &v), 0);
	assert_int_equal(v, 4096);
	assert_int_equal(devio_parse_size("", &v), -EINVAL);
	assert_int_equal(devio_parse_size("-1", &v), -EINVAL);
	assert_int_equal(devio_parse_size("12Q", &v), -EINVAL);
	assert_int_equal(devio_parse_size("1.5G", &v), 0);
	assert_int_equal(v, 3ull << 29);
	assert_int_equal(devio_parse_size("010M", &v), 0); /* decimal, not octal */
	assert_int_equal(v, 10ull << 20);
	assert_int_equal(devio_parse_size("0.5K", &v), 0);
	assert_int_equal(v, 512);
	assert_int_equal(devio_parse_size("1.5", &v), -EINVAL);
	assert_int_equal(devio_parse_size("0.0001K", &v), -EINVAL);
	assert_int_equal(devio_parse_size("1.", &v), -EINVAL);
	assert_int_equal(devio_parse_size(" 1", &v), -EINVAL);
	assert_int_equal(devio_parse_size("16E", &v), -ERANGE);
	assert_int_equal(devio_parse_u64("010", &v), 0);
	assert_int_equal(v, 10);
	assert_int_equal(devio_parse_u64("18446744073709551616", &v), -ERANGE);
	assert_int_equal(devio_parse_u64("0x", &v), -EINVAL);
	assert_int_equal(devio_parse_size("16E", &v), -ERANGE);
	assert_int_equal(devio_parse_size("99999999999999999999", &v), -ERANGE);
}

static void test_addr_parse(void **state)
{
	struct devio_addr a;

	assert_int_equal(devio_addr_parse("tcp:9000", NULL, &a), 0);
	assert_int_equal(a.kind, DEVIO_ADDR_TCP);
	assert_string_equal(a.host, "");
	assert_string_equal(a.port, "9000");
	assert_int_equal(devio_addr_parse("tcp:[::1]:77", NULL, &a), 0);
	assert_string_equal(a.host, "::1");
	assert_string_equal(a.port, "77");
	assert_int_equal(devio_addr_parse("tcp:localhost:", "10809", &a), 0);
	assert_string_equal(a.port, "10809");
	assert_int_equal(devio_addr_parse("tcp:host:port", NULL, &a), -EINVAL);
	assert_int_equal(devio_addr_parse("unix:/tmp/x.sock", NULL, &a), 0);
	assert_int_equal(a.kind, DEVIO_ADDR_UNIX);
	assert_int_equal(devio_addr_parse("stdio", NULL, &a), 0);
	assert_int_equal(a.kind, DEVIO_ADDR_STDIO);
	assert_int_equal(devio_addr_parse("/dev/ttyS0", NULL, &a), 0);
	assert_int_equal(a.kind, DEVIO_ADDR_DEVICE);
	assert_int_equal(devio_addr_parse("bogus", NULL, &a), -EINVAL);
}

static int fake_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off) { return 0; }
static const struct devio_backend_ops fake_ops = { .name = "fake", .pread = fake_pread };

static void test_request_check(void **state)
{
	struct devio_backend b = { .ops = &fake_ops, .size = 1000, .caps = DEVIO_CAP_READONLY };
	char buf[16];
	struct devio_request r = { .op = DEVIO_OP_READ, .offset = 990, .length = 10, .buf = buf };

	assert_int_equal(devio_request_check(&b, &r), 0);
	r.length = 11;
	assert_int_equal(devio_request_check(&b, &r), -EINVAL);
	r.offset = UINT64_MAX - 4; /* offset + length wraps */
	r.length = 10;
	assert_int_equal(devio_request_check(&b, &r), -EINVAL);
	r.op = DEVIO_OP_WRITE;
	r.offset = 0;
	assert_int_equal(devio_request_check(&b, &r), -EROFS);
	r.op = (enum devio_op)99;
	assert_int_equal(devio_request_check(&b, &r), -EINVAL);
}

/* Entries in dir besides . and .. */
static int util_entries(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int n = 0;

	assert_non_null(d);
	while ((e = readdir(d)))
		n += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
	closedir(d);
	return n;
}

static void util_put(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	assert_non_null(f);
	fputs(text, f);
	fclose(f);
}

static void util_expect(const char *path, const char *text)
{
	char buf[64] = { 0 };
	FILE *f = fopen(path, "r");

	assert_non_null(f);
	assert_true(fread(buf, 1, sizeof(buf) - 1, f) <= strlen(text));
	fclose(f);
	assert_string_equal(buf, text);
}

/* write_fn: ctx's text, then the failure -EIO when the text says so. */
static int util_write(int fd, void *ctx)
{
	const char *text = ctx;

	if (write(fd, text, strlen(text)) != (ssize_t)strlen(text))
		return -errno;
	return strstr(text, "fail") ? -EIO : 0;
}

/* Through symbolic links: the target replaced, the link kept, also for a
 * relative link to a file not made yet; a loop of links refused. */
static void util_file_replace_links(const char *dir, const char *path)
{
	char link[80], dangling[80], target[80], loop[80];
	struct stat st;

	snprintf(link, sizeof(link), "%s/link", dir);
	assert_int_equal(symlink(path, link), 0);
	assert_int_equal(devio_file_replace(link, 0666, util_write, "via link"), 0);
	assert_int_equal(lstat(link, &st), 0);
	assert_true(S_ISLNK(st.st_mode));
	util_expect(path, "via link");
	snprintf(dangling, sizeof(dangling), "%s/dangling", dir);
	snprintf(target, sizeof(target), "%s/later", dir);
	assert_int_equal(symlink("later", dangling), 0);
	assert_int_equal(devio_file_replace(dangling, 0666, util_write, "made"), 0);
	util_expect(target, "made");
	assert_int_equal(lstat(dangling, &st), 0);
	assert_true(S_ISLNK(st.st_mode));
	snprintf(loop, sizeof(loop), "%s/loop", dir);
	assert_int_equal(symlink("loop", loop), 0);
	assert_int_equal(devio_file_replace(loop, 0666, util_write, "never"), -ELOOP);
	assert_int_equal(util_entries(dir), 5); /* img, link, dangling, later, loop */
	unlink(link);
	unlink(dangling);
	unlink(target);
	unlink(loop);
}

static void test_file_replace(void **state)
{
	char dir[] = "/tmp/devio-replace-XXXXXX", path[64], sub[80];
	mode_t mask = umask(022);
	struct stat st;
	char *tmp;
	int fd;

	(void)state;
	assert_non_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/img", dir);
	/* new, then replaced: the new bytes, the mode less the umask, no
	 * temporary file */
	assert_int_equal(devio_file_replace(path, 0666, util_write, "first"), 0);
	util_expect(path, "first");
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0644);
	assert_int_equal(devio_file_replace(path, 0600, util_write, "second"), 0);
	util_expect(path, "second");
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(st.st_mode & 07777, 0600);
	assert_int_equal(util_entries(dir), 1);
	/* write_fn fails after writing: the old file untouched, nothing else */
	assert_int_equal(devio_file_replace(path, 0666, util_write, "half then fail"), -EIO);
	util_expect(path, "second");
	assert_int_equal(util_entries(dir), 1);
	/* the rename fails (a non-empty folder is in the way): it stays */
	snprintf(sub, sizeof(sub), "%s/d", dir);
	assert_int_equal(mkdir(sub, 0700), 0);
	snprintf(sub, sizeof(sub), "%s/d/x", dir);
	util_put(sub, "x");
	snprintf(sub, sizeof(sub), "%s/d", dir);
	assert_true(devio_file_replace(sub, 0666, util_write, "new") < 0);
	util_expect(path, "second");
	assert_int_equal(util_entries(dir), 2);
	/* no folder: the error, nothing made */
	snprintf(sub, sizeof(sub), "%s/none/img", dir);
	assert_int_equal(devio_file_replace(sub, 0666, util_write, "new"), -ENOENT);
	/* two steps, failed: the temporary file goes, the old one stays */
	fd = devio_file_replace_begin(path, 0666, &tmp);
	assert_true(fd >= 0);
	assert_int_equal(util_entries(dir), 3);
	close(fd);
	assert_int_equal(devio_file_replace_end(tmp, -EINTR), -EINTR);
	free(tmp);
	util_expect(path, "second");
	assert_int_equal(util_entries(dir), 2);
	snprintf(sub, sizeof(sub), "%s/d/x", dir);
	unlink(sub);
	snprintf(sub, sizeof(sub), "%s/d", dir);
	rmdir(sub);
	util_file_replace_links(dir, path);
	unlink(path);
	rmdir(dir);
	umask(mask);
}

/* A socket bound to a port, connecting to that port, connects to itself
 * (TCP simultaneous open): told as such; a real connection is not. */
static void test_socket_is_self(void **state)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t al = sizeof(a);
	int s = socket(AF_INET, SOCK_STREAM, 0), l = socket(AF_INET, SOCK_STREAM, 0), c;

	(void)state;
	assert_true(s >= 0 && l >= 0);
	assert_int_equal(bind(s, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(getsockname(s, (struct sockaddr *)&a, &al), 0);
	assert_int_equal(connect(s, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_true(devio_socket_is_self(s));
	close(s);

	a.sin_port = 0;
	assert_int_equal(bind(l, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(l, 1), 0);
	al = sizeof(a);
	assert_int_equal(getsockname(l, (struct sockaddr *)&a, &al), 0);
	c = socket(AF_INET, SOCK_STREAM, 0);
	assert_int_equal(connect(c, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_false(devio_socket_is_self(c));
	close(c);
	close(l);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse_size),
		cmocka_unit_test(test_addr_parse),
		cmocka_unit_test(test_request_check),
		cmocka_unit_test(test_file_replace),
		cmocka_unit_test(test_socket_is_self),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
