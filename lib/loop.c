/* loop.c - loop device attach/detach for the --fuse --loop option: ask
 * /dev/loop-control for a free device, configure it in one LOOP_CONFIGURE
 * call (backing fd, 512-byte logical blocks, direct I/O, autoclear), and
 * keep it open so that it goes away with this process.  Discard reaches the
 * backing file as fallocate(PUNCH_HOLE) when its file system has fallocate. */
#include <errno.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include "devio/loop.h"
#include "devio/util.h"

static bool loop_read_dio_flag(int number)
{
	char path[64], v = '0';
	int fd;

	snprintf(path, sizeof(path), "/sys/block/loop%d/loop/dio", number);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	if (read(fd, &v, 1) != 1)
		v = '0';
	close(fd);
	return v == '1';
}

/* One try: a free device configured with file_fd; -EBUSY if someone took it first. */
static int loop_configure_free(int ctl, int file_fd, bool readonly, uint32_t block_size,
			       struct devio_loop *out)
{
	struct loop_config cfg;
	int n, fd;

	n = ioctl(ctl, LOOP_CTL_GET_FREE);
	if (n < 0)
		return -errno;
	snprintf(out->path, sizeof(out->path), "/dev/loop%d", n);
	fd = open(out->path, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	memset(&cfg, 0, sizeof(cfg));
	cfg.fd = (uint32_t)file_fd;
	cfg.block_size = block_size;
	cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO | (readonly ? LO_FLAGS_READ_ONLY : 0);
	if (ioctl(fd, LOOP_CONFIGURE, &cfg) < 0) {
		int err = -errno;
		close(fd);
		return err;
	}
	out->fd = fd;
	out->number = n;
	return 0;
}

int devio_loop_attach(const char *file, bool readonly, uint32_t block_size, struct devio_loop *out)
{
	int ctl, file_fd, r = -EBUSY;

	memset(out, 0, sizeof(*out));
	out->fd = -1;
	if (!block_size)
		block_size = 512;
	file_fd = open(file, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (file_fd < 0) {
		r = -errno;
		devio_err("loop: %s: cannot open: %s", file, strerror(-r));
		return r;
	}
	ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
	if (ctl < 0) {
		r = -errno;
		devio_err("loop: /dev/loop-control: %s", strerror(-r));
		goto out_file;
	}
	/* another process may grab the free device between the two calls */
	for (int tries = 0; tries < 20 && r == -EBUSY; tries++)
		r = loop_configure_free(ctl, file_fd, readonly, block_size, out);
	close(ctl);
	if (r) {
		devio_err("loop: %s: LOOP_CONFIGURE failed: %s", file, strerror(-r));
		goto out_file;
	}
	out->direct_io = loop_read_dio_flag(out->number);
	if (!out->direct_io)
		devio_warn("loop: %s on %s: the kernel refused direct I/O; using its page cache", file, out->path);
out_file:
	close(file_fd); /* the loop device holds its own reference */
	return r;
}

int devio_loop_detach(struct devio_loop *lo)
{
	int r = 0;

	if (lo->fd < 0)
		return 0;
	if (ioctl(lo->fd, LOOP_CLR_FD, 0) < 0 && errno != ENXIO) {
		r = -errno;
		devio_warn("loop: %s: LOOP_CLR_FD: %s (autoclear detaches it when unused)", lo->path, strerror(-r));
	}
	close(lo->fd);
	lo->fd = -1;
	return r;
}
