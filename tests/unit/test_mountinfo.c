/* test_mountinfo.c - lib/mountinfo.c: escaped mount points, the topmost
 * of stacked mounts, lines that are not mountinfo; and the systemd[:NAME]
 * address that socket activation uses. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <cmocka.h>
#include <string.h>
#include <unistd.h>
#include "devio/mountinfo.h"
#include "devio/util.h"

static char file[64];

static void write_mountinfo(const char *text)
{
	int fd;

	snprintf(file, sizeof(file), "/tmp/devio-mountinfo-XXXXXX");
	fd = mkstemp(file);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
	close(fd);
}

static void test_stacked_and_escaped(void **state)
{
	struct devio_mount m;

	write_mountinfo("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
			"40 1 0:40 / /mnt/a\\040b rw,nosuid - fuse.devio devio rw,user_id=0\n"
			"41 40 0:41 / /mnt/a\\040b rw - tmpfs my\\040tmp rw\n"
			"42 1 0:42 / /mnt/c rw shared:5 master:1 - fuse.devio devio rw\n"
			"garbage without the separator\n"
			"43 1 0:43 / /mnt/d rw\n");
	assert_int_equal(devio_mount_top_in(file, "/mnt/a b", &m), 1);
	assert_int_equal(m.id, 41); /* the tmpfs sits on devio's mount */
	assert_string_equal(m.fstype, "tmpfs");
	assert_string_equal(m.source, "my tmp");
	assert_int_equal(devio_mount_top_in(file, "/mnt/c", &m), 1);
	assert_int_equal(m.id, 42); /* optional fields before the separator */
	assert_int_equal(m.minor, 42);
	assert_string_equal(m.fstype, "fuse.devio");
	assert_int_equal(devio_mount_top_in(file, "/mnt/d", &m), 0); /* no " - " */
	assert_int_equal(devio_mount_top_in(file, "/mnt/a", &m), 0);
	assert_int_equal(devio_mount_top_in(file, "/mnt/a\\040b", &m), 0);
	unlink(file);
	assert_int_equal(devio_mount_top_in(file, "/", &m), -ENOENT);
}

static void test_root_is_a_mount(void **state)
{
	struct devio_mount m;

	assert_int_equal(devio_mount_top("/", &m), 1);
	assert_true(m.id > 0);
	assert_int_equal(devio_mount_top("/no/such/devio/dir", &m), 0);
}

static void test_systemd_address(void **state)
{
	struct devio_addr a;
	char s[64];

	assert_int_equal(devio_addr_parse("systemd", NULL, &a), 0);
	assert_int_equal(a.kind, DEVIO_ADDR_SYSTEMD);
	assert_string_equal(a.path, "");
	devio_addr_format(&a, s, sizeof(s));
	assert_string_equal(s, "systemd");
	assert_int_equal(devio_addr_parse("systemd:nbd", NULL, &a), 0);
	assert_string_equal(a.path, "nbd");
	devio_addr_format(&a, s, sizeof(s));
	assert_string_equal(s, "systemd:nbd");
	assert_int_equal(devio_addr_parse("systemdx", NULL, &a), -EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_stacked_and_escaped),
		cmocka_unit_test(test_root_is_a_mount),
		cmocka_unit_test(test_systemd_address),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
