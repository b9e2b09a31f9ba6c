/* file.c - image files and block devices as backends (stores): all of
 * the file; a window or partition of it is a layer over this one
 * (layers/window.c).
 *
 * The synchronous callbacks use pread/pwrite/fallocate/ioctl on one file
 * descriptor shared by every thread (nothing here depends on the file
 * position).  Reads, writes and flushes also go through io_uring (the
 * code at the end of this file): ops->submit queues them on one ring and a
 * completion thread calls req->complete(); submit runs everything else
 * synchronously before it returns.  ops->ring_submit puts them on the
 * caller's ring instead (a FUSE or ublk queue thread, ring.h); there a
 * READ or WRITE may also name pages registered on that ring
 * (DEVIO_BUF_FIXED: a ublk request's own, zero copy), moved with
 * READ_FIXED/WRITE_FIXED.
 *
 * With O_DIRECT (--direct) offsets, lengths and buffers must be aligned to
 * the device's logical block size (4096 for regular files, which every
 * Linux filesystem accepts); reads that are not are bounced through an
 * aligned buffer, writes that are not are read-modify-written.  Every
 * change of bytes holds the blocks it touches in a range lock, an RMW
 * exclusively, so no WRITE, TRIM or ZERO of another connection lands
 * between an RMW's read and its write-back of a shared block.  The bytes
 * of a file past its last whole block (an image whose size is not a
 * multiple of 4096) cannot be moved with O_DIRECT at all: they go through
 * a second descriptor of the same file without it.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <liburing.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/range_lock.h"
#include "devio/ring.h"
#include "devio/util.h"

#define FILE_BOUNCE_MAX (1u << 20) /* bounce/zero buffers: at most 1 MiB at a time */

struct file_ring;

struct devio_file {
	struct devio_backend b;
	int fd;
	char *path;
	uint32_t align;     /* O_DIRECT alignment, 1 without */
	uint32_t lbs;       /* logical block size (512 for files) */
	bool is_blk, readonly, direct;
	bool whole;         /* the window is the whole regular file: it may grow (file_grow) */
	bool uring_reads;   /* io_uring reads the page cache without a worker */
	bool uring_writes;  /* io_uring writes the page cache without a worker */
	struct devio_range_lock ranges; /* O_DIRECT: blocks being changed */
	uint64_t dio_end;   /* O_DIRECT: the end of the file's last whole block */
	int tail_fd;        /* O_DIRECT: the same file without it, for past dio_end; or -1 */
	struct file_ring *uring;  /* NULL: synchronous only */
};

static void file_uring_start(struct devio_file *f);
static void file_uring_stop(struct devio_file *f);
static int file_uring_submit(struct devio_file *f, struct devio_request *req);
static int file_ring_submit(struct devio_backend *b, struct devio_request *req, struct devio_ring *ring);
static void file_ring_cqe(struct devio_backend *b, struct devio_request *req, int res);

static struct devio_file *file_of(struct devio_backend *b)
{
	return (struct devio_file *)b->priv;
}

static bool file_is_aligned(const struct devio_file *f, const void *buf, uint64_t len, uint64_t off)
{
	uint64_t a = f->align;

	return (off % a) == 0 && (len % a) == 0 && ((uintptr_t)buf % a) == 0;
}

/* pread at an absolute offset, all of it: short reads continue, EOF is an
 * error (the range was checked to lie inside the file). */
static int file_raw_pread(struct devio_file *f, int fd, void *buf, uint64_t len, uint64_t off)
{
	unsigned char *p = buf;

	while (len) {
		size_t n = len > (1u << 30) ? (1u << 30) : (size_t)len;
		ssize_t r = pread(fd, p, n, (off_t)off);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			r = -errno;
			devio_err("%s: read of %zu bytes at offset %" PRIu64 ": %s", f->path, n, off,
				  strerror(errno));
			return (int)r;
		}
		if (r == 0) {
			devio_err("%s: read at offset %" PRIu64 ": unexpected end of file (did it shrink?)",
				  f->path, off);
			return -EIO;
		}
		p += r;
		off += (uint64_t)r;
		len -= (uint64_t)r;
	}
	return 0;
}

static int file_raw_pwrite(struct devio_file *f, int fd, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	const unsigned char *p = buf;

	while (len) {
		size_t n = len > (1u << 30) ? (1u << 30) : (size_t)len;
		struct iovec iov = { (void *)p, n };
		ssize_t r = pwritev2(fd, &iov, 1, (off_t)off, (flags & DEVIO_REQ_FUA) ? RWF_DSYNC : 0);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			r = -errno;
			devio_err("%s: write of %zu bytes at offset %" PRIu64 ": %s", f->path, n, off,
				  strerror(errno));
			return (int)r;
		}
		if (r == 0) {
			devio_err("%s: write at offset %" PRIu64 " wrote nothing", f->path, off);
			return -EIO;
		}
		p += r;
		off += (uint64_t)r;
		len -= (uint64_t)r;
	}
	return 0;
}

static void *file_bounce_alloc(const struct devio_file *f, size_t len)
{
	void *p = NULL;

	if (posix_memalign(&p, f->align < 4096 ? 4096 : f->align, len))
		return NULL;
	return p;
}

/* Read any range of whole blocks' bytes with O_DIRECT: through an aligned
 * bounce buffer. */
static int file_bounce_pread(struct devio_file *f, void *buf, uint64_t len, uint64_t off)
{
	unsigned char *out = buf, *bb = file_bounce_alloc(f, FILE_BOUNCE_MAX);
	int r = 0;

	if (!bb)
		return -ENOMEM;
	while (len && !r) {
		uint64_t start = off / f->align * f->align;
		uint64_t skip = off - start;
		uint64_t n = FILE_BOUNCE_MAX - skip < len ? FILE_BOUNCE_MAX - skip : len;
		uint64_t span = (skip + n + f->align - 1) / f->align * f->align;

		r = file_raw_pread(f, f->fd, bb, span, start);
		if (!r)
			memcpy(out, bb + skip, n);
		out += n;
		off += n;
		len -= n;
	}
	free(bb);
	return r;
}

/* Write any range of whole blocks' bytes with O_DIRECT: partial blocks are
 * read, patched and written back.  The caller holds the blocks
 * exclusively (file_hold). */
static int file_rmw_pwrite(struct devio_file *f, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	const unsigned char *in = buf;
	unsigned char *bb = file_bounce_alloc(f, FILE_BOUNCE_MAX);
	int r = 0;

	if (!bb)
		return -ENOMEM;
	while (len && !r) {
		uint64_t start = off / f->align * f->align;
		uint64_t skip = off - start;
		uint64_t n = FILE_BOUNCE_MAX - skip < len ? FILE_BOUNCE_MAX - skip : len;
		uint64_t span = (skip + n + f->align - 1) / f->align * f->align;

		if (skip || n % f->align)
			r = file_raw_pread(f, f->fd, bb, span, start); /* only head and tail matter; simple and rare */
		if (!r) {
			memcpy(bb + skip, in, n);
			r = file_raw_pwrite(f, f->fd, bb, span, start, flags);
		}
		in += n;
		off += n;
		len -= n;
	}
	free(bb);
	return r;
}

/* How many of the len bytes at off lie before dio_end (O_DIRECT can move
 * them); the rest go through tail_fd. */
static uint64_t file_dio_part(const struct devio_file *f, uint64_t len, uint64_t off)
{
	if (off >= f->dio_end)
		return 0;
	return len < f->dio_end - off ? len : f->dio_end - off;
}

/* Read any range at an absolute offset with O_DIRECT. */
static int file_dio_pread(struct devio_file *f, void *buf, uint64_t len, uint64_t off)
{
	uint64_t n = file_dio_part(f, len, off);
	int r = 0;

	if (n)
		r = file_is_aligned(f, buf, n, off) ? file_raw_pread(f, f->fd, buf, n, off) : file_bounce_pread(f, buf, n, off);
	if (!r && len > n)
		r = file_raw_pread(f, f->tail_fd, (unsigned char *)buf + n, len - n, off + n);
	return r;
}

/* Write any range at an absolute offset with O_DIRECT; the caller holds
 * its blocks (file_hold). */
static int file_dio_pwrite(struct devio_file *f, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	uint64_t n = file_dio_part(f, len, off);
	int r = 0;

	if (n)
		r = file_is_aligned(f, buf, n, off) ? file_raw_pwrite(f, f->fd, buf, n, off, flags)
					       : file_rmw_pwrite(f, buf, n, off, flags);
	if (!r && len > n)
		r = file_raw_pwrite(f, f->tail_fd, (const unsigned char *)buf + n, len - n, off + n, flags);
	return r;
}

/* With O_DIRECT, hold the blocks that a change of [off, off+len) touches:
 * exclusively where it has a partial block to read-modify-write.  Without,
 * nothing to do (the page cache changes bytes, not blocks). */
static void file_hold(struct devio_file *f, struct devio_range *held, uint64_t off, uint64_t len)
{
	uint64_t a = f->align;

	if (f->direct)
		devio_range_acquire(&f->ranges, held, off / a * a, (off + len + a - 1) / a * a, (off | len) % a != 0);
}

static void file_unhold(struct devio_file *f, struct devio_range *held)
{
	if (f->direct)
		devio_range_release(&f->ranges, held);
}

/* Read at off. */
static int file_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	struct devio_file *f = file_of(b);

	if (f->direct)
		return file_dio_pread(f, buf, len, off);
	return file_raw_pread(f, f->fd, buf, len, off);
}

static int file_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	struct devio_file *f = file_of(b);
	struct devio_range held;
	int r;

	if (!f->direct)
		return file_raw_pwrite(f, f->fd, buf, len, off, flags);
	file_hold(f, &held, off, len);
	r = file_dio_pwrite(f, buf, len, off, flags);
	file_unhold(f, &held);
	return r;
}

static int file_flush(struct devio_backend *b)
{
	struct devio_file *f = file_of(b);

	if (fdatasync(f->fd) < 0) {
		int r = -errno;

		devio_err("%s: fdatasync: %s", f->path, strerror(errno));
		return r;
	}
	return 0;
}

/* Move len bytes between the file at *pos and a pipe with splice(2), into
 * the file or out of it.  Returns 0, -EAGAIN when the pipe is empty (into
 * the file) or full (out of it) and the pipe's end is non-blocking, or
 * another negative errno (-EIO at the end of the pipe or of the file). */
static int file_splice_loop(struct devio_file *f, int pipe_fd, loff_t *pos, uint64_t len, bool into_file)
{
	while (len) {
		size_t want = len > (1u << 30) ? (1u << 30) : (size_t)len;
		ssize_t n = into_file ? splice(pipe_fd, NULL, f->fd, pos, want, SPLICE_F_MOVE)
				      : splice(f->fd, pos, pipe_fd, NULL, want, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EIO;
		len -= (uint64_t)n;
	}
	return 0;
}

/* A write whose payload waits in a pipe: splice moves it into the page
 * cache, which copies from the pipe's pages (a socket's own buffers when
 * the front end spliced them in).  FUA: the core flushes after. */
static int file_splice_write(struct devio_file *f, int pipe_fd, uint64_t len, uint64_t off)
{
	loff_t pos = (loff_t)off;
	int r = file_splice_loop(f, pipe_fd, &pos, len, true);

	if (r) {
		devio_err("%s: write of %" PRIu64 " bytes at offset %" PRIu64 " from a pipe: %s", f->path, len,
			  off, r == -EIO || r == -EAGAIN ? "the pipe ran dry" : strerror(-r));
		return r == -EAGAIN ? -EIO : r;
	}
	return 0;
}

/* A read into a pipe: the pipe takes references to the page cache's
 * pages (no copy) for the front end to splice into a socket. */
static int file_splice_read(struct devio_file *f, int pipe_fd, uint64_t len, uint64_t off, bool moved)
{
	loff_t pos = (loff_t)off;
	struct stat st;
	int r;

	/* Only a file without holes: finding them per read (SEEK_HOLE) walks
	 * the page cache to the next hole, and the copying path sends holes
	 * as holes.  A read a format layer moved here (an allocated qcow2
	 * cluster run, a VHD block) is data whatever the image file's holes:
	 * the layer, not the file, tells the disk's holes. */
	if (!f->is_blk && !moved && (fstat(f->fd, &st) || (uint64_t)st.st_blocks * 512 < (uint64_t)st.st_size))
		return -EAGAIN;
	r = file_splice_loop(f, pipe_fd, &pos, len, false);
	if (r && r != -EAGAIN) /* -EAGAIN: the pipe is full, the caller copies instead */
		devio_err("%s: read of %" PRIu64 " bytes at offset %" PRIu64 " into a pipe: %s", f->path, len,
			  off, r == -EIO ? "unexpected end of file" : strerror(-r));
	return r;
}

/* READ and WRITE with a pipe for a buffer (DEVIO_BUF_PIPE). */
static int file_splice(struct devio_backend *b, struct devio_request *req)
{
	struct devio_file *f = file_of(b);

	if (req->op == DEVIO_OP_WRITE)
		return file_splice_write(f, req->pipe_fd, req->length, req->offset);
	return file_splice_read(f, req->pipe_fd, req->length, req->offset, req->remapper != NULL);
}

/* Write zeroes at an absolute offset, the slow way (with O_DIRECT the
 * caller holds the blocks). */
static int file_write_zeroes(struct devio_file *f, uint64_t off, uint64_t len)
{
	uint64_t n = len < FILE_BOUNCE_MAX ? len : FILE_BOUNCE_MAX;
	unsigned char *z;
	int r = 0;

	if (f->direct)
		n = (n + f->align - 1) / f->align * f->align;
	z = file_bounce_alloc(f, (size_t)n);
	if (!z)
		return -ENOMEM;
	memset(z, 0, (size_t)n);
	while (len && !r) {
		uint64_t m = len < n ? len : n;

		r = f->direct ? file_dio_pwrite(f, z, m, off, 0) : file_raw_pwrite(f, f->fd, z, m, off, 0);
		off += m;
		len -= m;
	}
	free(z);
	return r;
}

static int file_try_fallocate(struct devio_file *f, int mode, uint64_t off, uint64_t len)
{
	while (fallocate(f->fd, mode, (off_t)off, (off_t)len) < 0) {
		if (errno != EINTR)
			return -errno;
	}
	return 0;
}

/* Block devices: the ioctls take 512-byte aligned ranges; the unaligned
 * head and tail are written as zeroes.  op is BLKDISCARD or BLKZEROOUT, or
 * 0 to use fallocate(mode) on the device. */
static int file_blk_range(struct devio_file *f, unsigned long op, int mode, uint64_t off, uint64_t len)
{
	uint64_t a = f->lbs, start = (off + a - 1) / a * a, end = (off + len) / a * a;
	int r;

	if (start >= end)
		return file_write_zeroes(f, off, len);
	if (op) {
		uint64_t range[2] = { start, end - start };

		r = ioctl(f->fd, op, range) < 0 ? -errno : 0;
	} else {
		r = file_try_fallocate(f, mode, start, end - start);
	}
	if (r)
		return r;
	r = file_write_zeroes(f, off, start - off);
	if (!r)
		r = file_write_zeroes(f, end, off + len - end);
	return r;
}

static bool file_not_supported(int r)
{
	return r == -EOPNOTSUPP || r == -ENOSYS || r == -EINVAL || r == -ENOTTY;
}

/* TRIM: punch a hole (discard on a block device); where the filesystem or
 * device cannot, write zeroes so that the range still reads back zero. */
static int file_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct devio_file *f = file_of(b);
	struct devio_range held;
	int r;

	file_hold(f, &held, off, len);
	if (f->is_blk) {
		r = file_blk_range(f, BLKDISCARD, 0, off, len);
		if (file_not_supported(r))
			r = file_blk_range(f, BLKZEROOUT, 0, off, len);
	} else {
		r = file_try_fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
		if (file_not_supported(r))
			r = file_write_zeroes(f, off, len);
	}
	file_unhold(f, &held);
	if (r)
		devio_err("%s: trim of %" PRIu64 " bytes at offset %" PRIu64 ": %s", f->path, len, off,
			  strerror(-r));
	return r;
}

/* ZERO on a regular file: ZERO_RANGE, else a hole when allowed, else (not
 * for FAST_ZERO) zeroes written. */
static int file_zero_reg(struct devio_file *f, uint64_t abs, uint64_t len, uint32_t flags)
{
	int r = file_try_fallocate(f, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, abs, len);

	if (!file_not_supported(r))
		return r;
	if (!(flags & DEVIO_REQ_NO_HOLE)) {
		r = file_try_fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, abs, len);
		if (!file_not_supported(r))
			return r;
	}
	if (flags & DEVIO_REQ_FAST_ZERO)
		return -ENOTSUP;
	return file_write_zeroes(f, abs, len);
}

/* ZERO on a block device: fallocate(PUNCH_HOLE) on a device never falls
 * back to writing (fast or -EOPNOTSUPP); ZERO_RANGE/BLKZEROOUT may. */
static int file_zero_blk(struct devio_file *f, uint64_t abs, uint64_t len, uint32_t flags)
{
	int r;

	if (flags & DEVIO_REQ_FAST_ZERO) {
		r = file_blk_range(f, 0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, abs, len);
		return file_not_supported(r) ? -ENOTSUP : r;
	}
	r = file_blk_range(f, BLKZEROOUT, 0, abs, len);
	if (file_not_supported(r))
		r = file_write_zeroes(f, abs, len);
	return r;
}

static int file_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct devio_file *f = file_of(b);
	struct devio_range held;
	int r;

	file_hold(f, &held, off, len);
	r = f->is_blk ? file_zero_blk(f, off, len, flags) : file_zero_reg(f, off, len, flags);
	file_unhold(f, &held);
	if (r && r != -ENOTSUP)
		devio_err("%s: zero of %" PRIu64 " bytes at offset %" PRIu64 ": %s", f->path, len, off,
			  strerror(-r));
	return r;
}

/* SEEK_DATA/SEEK_HOLE walk of [off, off+len).  Block devices
 * and filesystems without holes report everything as data. */
static int file_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	struct devio_file *f = file_of(b);
	uint64_t pos = off, end = off + len;

	if (f->is_blk)
		return fn(ctx, off, len, 0);
	while (pos < end) {
		off_t data = lseek(f->fd, (off_t)pos, SEEK_DATA);
		uint64_t hole_end, data_end;
		int r;

		if (data < 0 && errno == ENXIO)
			data = (off_t)end; /* only a hole remains */
		else if (data < 0)
			return fn(ctx, pos, end - pos, 0); /* cannot tell: data */
		hole_end = (uint64_t)data < end ? (uint64_t)data : end;
		if (hole_end > pos) {
			r = fn(ctx, pos, hole_end - pos, DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO);
			if (r)
				return r;
			pos = hole_end;
			if (pos >= end)
				break;
		}
		data = lseek(f->fd, (off_t)pos, SEEK_HOLE);
		data_end = data < 0 || (uint64_t)data > end ? end : (uint64_t)data;
		if (data_end <= pos)
			data_end = end; /* a racing write filled the hole: call it data */
		r = fn(ctx, pos, data_end - pos, 0);
		if (r)
			return r;
		pos = data_end;
	}
	return 0;
}

static int file_open_tail_fd(struct devio_file *f, uint64_t image_size);

/* Let writes reach size bytes: for an image format that appends blocks
 * (VHD, qcow2).  The file itself grows as those writes land; with O_DIRECT
 * the bytes past the last whole block at open go through the tail
 * descriptor, as the tail of the file did. */
static int file_grow(struct devio_backend *b, uint64_t size)
{
	struct devio_file *f = file_of(b);
	int r;

	if (!f->whole || f->readonly)
		return -EOPNOTSUPP;
	if (size <= b->size)
		return 0;
	if (size > (uint64_t)INT64_MAX)
		return -EFBIG;
	if (f->direct && f->tail_fd < 0) {
		r = file_open_tail_fd(f, size);
		if (r)
			return r;
	}
	__atomic_store_n(&b->size, size, __ATOMIC_RELEASE);
	return 0;
}

static void file_describe(struct devio_backend *b, char *out, size_t outlen)
{
	struct devio_file *f = file_of(b);
	const char *uring = !f->uring ? "" :
			    f->direct ? ", io_uring for all I/O" :
			    f->uring_reads && f->uring_writes ? ", io_uring for reads and writes" :
			    f->uring_reads ? ", io_uring for reads" :
			    f->uring_writes ? ", io_uring for writes" : ", io_uring for flushes";

	snprintf(out, outlen, "%s %s: %" PRIu64 " bytes, %s%s%s",
		 f->is_blk ? "block device" : "file", f->path, b->size,
		 f->readonly ? "read-only" : "read-write", f->direct ? ", O_DIRECT" : "", uring);
}

static void file_close(struct devio_backend *b)
{
	struct devio_file *f = file_of(b);

	file_uring_stop(f);
	close(f->fd);
	if (f->tail_fd >= 0)
		close(f->tail_fd);
	devio_range_lock_destroy(&f->ranges);
	free(f->path);
	free(f);
}

/* A page-cache read that needs no waiting is cheapest done right here: one
 * preadv2(RWF_NOWAIT) copies what is cached.  True if that finished req;
 * otherwise req->priv[0] says how much it did and the ring does the rest
 * (measured through NBD: the hop to the completion thread cost more than
 * the copy). */
static bool file_read_cached(struct devio_file *f, struct devio_request *req)
{
	struct iovec iov = { req->buf, req->length };
	ssize_t r;

	req->priv[0] = 0;
	if (f->direct || !f->uring || !f->uring_reads || req->op != DEVIO_OP_READ || req->length == 0 ||
	    req->length > (1u << 30))
		return false;
	r = preadv2(f->fd, &iov, 1, (off_t)(req->offset), RWF_NOWAIT);
	if (r <= 0)
		return false; /* not cached (EAGAIN), or let the ring report it */
	if ((uint64_t)r == req->length) {
		req->result = 0;
		req->complete(req);
		return true;
	}
	req->priv[0] = (uint64_t)r;
	return false;
}

/* submit: reads, writes and flushes through io_uring, CACHE as a hint to
 * the page cache; everything else (and everything when the ring is
 * unavailable or full) goes back to the core, which runs it with the
 * synchronous callbacks. */
static int file_submit(struct devio_backend *b, struct devio_request *req)
{
	struct devio_file *f = file_of(b);

	if (req->op == DEVIO_OP_CACHE) {
		posix_fadvise(f->fd, (off_t)(req->offset), (off_t)req->length, POSIX_FADV_WILLNEED);
		req->result = 0;
		req->complete(req);
		return 0;
	}
	if (file_read_cached(f, req) || file_uring_submit(f, req) == 0)
		return 0;
	return -EAGAIN;
}

static const struct devio_backend_ops file_ops = {
	.name = "file",
	.pread = file_pread,
	.pwrite = file_pwrite,
	.flush = file_flush,
	.trim = file_trim,
	.zero = file_zero,
	.extents = file_extents,
	.submit = file_submit,
	.splice = file_splice,
	.describe = file_describe,
	.grow = file_grow,
	.close = file_close,
	.ring_submit = file_ring_submit,
	.ring_cqe = file_ring_cqe,
};

static int file_open_fd(struct devio_file *f, const struct devio_open_opts *opts)
{
	int flags = (opts->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC | (opts->direct ? O_DIRECT : 0);

	f->fd = open(f->path, flags);
	if (f->fd >= 0)
		return 0;
	if (!opts->readonly && (errno == EACCES || errno == EROFS || errno == EPERM))
		devio_err("%s: cannot open read-write: %s (use --readonly to serve it read-only)", f->path,
			  strerror(errno));
	else if (opts->direct && errno == EINVAL)
		devio_err("%s: cannot open with O_DIRECT: this filesystem does not support it", f->path);
	else
		devio_err("%s: cannot open: %s", f->path, strerror(errno));
	return -errno;
}

/* Which requests io_uring runs without an io-wq worker.  O_DIRECT: all.
 * Page-cache reads: where the file takes RWF_NOWAIT (ext4, XFS, btrfs,
 * block devices; not tmpfs), asked of the kernel with a 1-byte read.
 * Page-cache writes: only where the filesystem does async buffered writes
 * (FMODE_BUF_WASYNC: XFS, btrfs).  Elsewhere io_uring punts each request
 * to a worker thread (and serialises writes to one file on one worker);
 * measured, a plain pread/pwrite in the submitting thread is faster. */
static void file_probe_uring_paths(struct devio_file *f, uint64_t size)
{
	unsigned char byte;
	struct iovec iov = { &byte, 1 };
	struct statfs sfs;

	f->uring_reads = f->uring_writes = true;
	if (f->direct)
		return;
	if (size && preadv2(f->fd, &iov, 1, 0, RWF_NOWAIT) < 0 && errno == EOPNOTSUPP)
		f->uring_reads = false;
	f->uring_writes = !f->is_blk && fstatfs(f->fd, &sfs) == 0 &&
			  (sfs.f_type == 0x58465342 /* XFS */ || sfs.f_type == (typeof(sfs.f_type))0x9123683E /* btrfs */);
}

/* O_DIRECT on a file whose size is not a multiple of the alignment: a
 * descriptor of the same open file (not the path again, which may name
 * another file by now) without O_DIRECT, for the bytes past dio_end. */
static int file_open_tail_fd(struct devio_file *f, uint64_t image_size)
{
	char self[64];
	int flags = fcntl(f->fd, F_GETFL), err;
	struct stat a, b;

	snprintf(self, sizeof(self), "/proc/self/fd/%d", f->fd);
	f->tail_fd = flags < 0 ? -1 : open(self, (flags & O_ACCMODE) | O_CLOEXEC);
	if (f->tail_fd < 0 && flags >= 0) /* no /proc here: the path, if it is still the same file */
		f->tail_fd = open(f->path, (flags & O_ACCMODE) | O_CLOEXEC);
	if (f->tail_fd >= 0 && (fstat(f->fd, &a) || fstat(f->tail_fd, &b) || a.st_dev != b.st_dev ||
				a.st_ino != b.st_ino)) {
		close(f->tail_fd);
		f->tail_fd = -1;
		errno = ESTALE; /* the path names another file by now */
	}
	if (f->tail_fd >= 0)
		return 0;
	err = errno;
	devio_err("%s: cannot reopen for the last %" PRIu64 " bytes, which O_DIRECT cannot reach: %s", f->path,
		  image_size - f->dio_end, strerror(err));
	return -err;
}

/* Size, kind and alignment of the open file. */
static int file_probe(struct devio_file *f, uint64_t *image_size)
{
	struct stat st;

	if (fstat(f->fd, &st) < 0)
		return -errno;
	if (S_ISBLK(st.st_mode)) {
		int lbs = 512;

		f->is_blk = true;
		if (ioctl(f->fd, BLKGETSIZE64, image_size) < 0) {
			devio_err("%s: BLKGETSIZE64: %s", f->path, strerror(errno));
			return -errno;
		}
		if (ioctl(f->fd, BLKSSZGET, &lbs) < 0 || lbs < 512 || lbs > 65536)
			lbs = 512;
		f->lbs = (uint32_t)lbs;
		f->align = f->direct ? f->lbs : 1;
		f->dio_end = *image_size;
		return 0;
	}
	if (!S_ISREG(st.st_mode)) {
		devio_err("%s: not a regular file or a block device", f->path);
		return -EINVAL;
	}
	*image_size = (uint64_t)st.st_size;
	f->lbs = 512;
	f->align = f->direct ? 4096 : 1;
	f->dio_end = *image_size / f->align * f->align;
	return f->dio_end < *image_size ? file_open_tail_fd(f, *image_size) : 0;
}

/* Can this filesystem punch holes?  Punching past the end changes nothing. */
static bool file_probe_punch(struct devio_file *f, uint64_t image_size)
{
	uint64_t past = (image_size + 65535) / 65536 * 65536 + 65536;

	if (f->is_blk || f->readonly)
		return f->is_blk;
	return file_try_fallocate(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, past, 4096) == 0;
}

int devio_file_open(const char *path, const struct devio_open_opts *opts, struct devio_backend **out)
{
	static const struct devio_open_opts none;
	struct devio_file *f;
	uint64_t size = 0;
	int r;

	if (!opts)
		opts = &none;
	f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	f->path = strdup(path);
	if (!f->path) {
		free(f);
		return -ENOMEM;
	}
	devio_range_lock_init(&f->ranges);
	f->tail_fd = -1;
	f->readonly = opts->readonly;
	f->direct = opts->direct;
	r = file_open_fd(f, opts);
	if (r)
		goto out_free;
	r = file_probe(f, &size);
	if (r)
		goto out_close;
	f->b.ops = &file_ops;
	f->whole = !f->is_blk && !opts->partition && !opts->has_offset && !opts->has_size;
	f->b.size = size;
	f->b.block_size = f->align;
	f->b.priv = f;
	f->b.caps = DEVIO_CAP_FLUSH | DEVIO_CAP_FUA | DEVIO_CAP_ZERO | DEVIO_CAP_EXTENTS |
		    DEVIO_CAP_MULTI_CONN | DEVIO_CAP_CACHE | DEVIO_CAP_PWRITE_FUA /* RWF_DSYNC */;
	if (f->readonly)
		f->b.caps |= DEVIO_CAP_READONLY;
	else if (file_probe_punch(f, size))
		f->b.caps |= DEVIO_CAP_TRIM | DEVIO_CAP_FAST_ZERO;
	file_probe_uring_paths(f, size);
	/* Spliced reads and writes run synchronously: offered where plain ones
	 * do too (not where io_uring reads the page cache or writes it
	 * asynchronously) and not for O_DIRECT, which wants aligned memory a
	 * pipe's pages are not. */
	if (!f->direct && !f->uring_writes)
		f->b.caps |= DEVIO_CAP_SPLICE_WRITE;
	if (!f->direct && !f->uring_reads)
		f->b.caps |= DEVIO_CAP_SPLICE_READ;
	file_uring_start(f);
	if (!f->direct && f->uring) /* io_uring works here: pages registered on a caller's ring too */
		f->b.caps |= DEVIO_CAP_FIXED;
	*out = &f->b;
	return 0;

out_close:
	close(f->fd);
	if (f->tail_fd >= 0)
		close(f->tail_fd);
out_free:
	devio_range_lock_destroy(&f->ranges);
	free(f->path);
	free(f);
	return r;
}

/* ---- the asynchronous path: io_uring ----
 *
 * One ring per backend.  Any thread may queue a request: it pushes it on
 * a lock-free list and, unless another thread holds the submitter token,
 * takes it, moves every queued request into SQEs and submits them with
 * one io_uring_enter() (liburing's io_uring_submit); requests other
 * threads queue meanwhile ride along in the next batch.  Only the token
 * holder touches the submission queue; a completion thread reaps CQEs in
 * batches (the completion side may run beside a submitter), finishes
 * short transfers and retries EAGAIN/EINTR by queueing the rest again,
 * and calls req->complete(); what it queues meanwhile is submitted once
 * after the batch.  In-flight requests are capped at the CQ size so the
 * CQ cannot overflow; past the cap file_submit() runs requests
 * synchronously.  req->priv[0] counts the bytes done so far; with
 * O_DIRECT req->priv[1] is a struct file_dio.
 * An O_DIRECT write holds its blocks shared from submit to completion, so
 * a completion callback must not start any O_DIRECT WRITE, TRIM or ZERO:
 * ranges are granted first come first served, and one queued behind an
 * RMW that waits for a completion only this thread reaps never comes.
 * None does: front ends start requests from their own threads (NBD runs
 * the pieces of a split request on its reader for this reason).
 *
 * The same SQEs can go on the caller's ring instead (ops->ring_submit, a
 * FUSE or ublk queue thread, ring.h): the CQE then comes back to the
 * thread that waits for its next command anyway.  Only requests that need
 * nothing held until completion go there (no O_DIRECT write or bounce).
 */

#define RING_SQ_ENTRIES 256u
#define RING_CQ_ENTRIES 1024u
#define RING_MAX_INFLIGHT RING_CQ_ENTRIES
#define RING_MAX_SQE_LEN (1u << 30)
#define RING_REAP_BATCH 64u
#define RING_MAX_SUBMIT_FAILURES 1000u

struct file_ring {
	struct io_uring ring;
	_Atomic(struct devio_request *) pending; /* queued, not yet in SQEs (newest first) */
	atomic_bool submitting;   /* the submitter token: only its holder touches the SQ */
	bool fixed_file;          /* fd registered as fixed file 0 */
	_Atomic bool closing;     /* set by close: no new requests */
	bool ext_arg;             /* the reaper's wait can have a timeout */
	_Atomic unsigned inflight;
	pthread_t reaper;
};

/* An O_DIRECT request on the ring: an aligned copy of a buffer the device
 * cannot take, the blocks that a write holds shared.  req->priv[1]. */
struct file_dio {
	unsigned char *bounce;
	struct devio_range held;
};

/* This ring on its completion thread while it handles a batch of CQEs: the
 * requests it queues again (short transfers, retries, and whatever the
 * completion callbacks start) go to the kernel together after the batch. */
static __thread struct file_ring *ring_reaping;

/* Fill sqe with (the rest of) req. */
static void file_ring_prep(struct devio_file *f, struct devio_request *req, struct io_uring_sqe *sqe, bool fixed)
{
	int fd = fixed ? 0 : f->fd;
	uint64_t done = req->priv[0], left = req->length - done;
	unsigned n = left > RING_MAX_SQE_LEN ? RING_MAX_SQE_LEN : (unsigned)left;
	struct file_dio *d = (struct file_dio *)(uintptr_t)req->priv[1];
	char *buf = d && d->bounce ? (char *)d->bounce : (char *)req->buf;

	if (req->kind == DEVIO_BUF_FIXED) {
		/* the caller's registered pages: the address is an offset into them */
		if (req->op == DEVIO_OP_READ)
			io_uring_prep_read_fixed(sqe, fd, (void *)(uintptr_t)done, n, req->offset + done,
						 (int)req->buf_index);
		else
			io_uring_prep_write_fixed(sqe, fd, (void *)(uintptr_t)done, n, req->offset + done,
						  (int)req->buf_index);
		if (req->op == DEVIO_OP_WRITE && (req->flags & DEVIO_REQ_FUA))
			sqe->rw_flags = RWF_DSYNC;
	} else if (req->op == DEVIO_OP_READ) {
		io_uring_prep_read(sqe, fd, buf + done, n, req->offset + done);
	} else if (req->op == DEVIO_OP_WRITE) {
		io_uring_prep_write(sqe, fd, buf + done, n, req->offset + done);
		if (req->flags & DEVIO_REQ_FUA)
			sqe->rw_flags = RWF_DSYNC;
	} else {
		io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
	}
	if (fixed)
		sqe->flags |= IOSQE_FIXED_FILE;
}

/* Submit every SQE the kernel has not taken yet (token held). */
static void file_ring_push(struct devio_file *f)
{
	struct file_ring *fr = f->uring;
	unsigned failures = 0;

	while (io_uring_sq_ready(&fr->ring) > 0) {
		int r = io_uring_submit(&fr->ring);

		if (r > 0) {
			failures = 0;
			continue;
		}
		if (++failures >= RING_MAX_SUBMIT_FAILURES) {
			devio_err("%s: io_uring_enter keeps failing (%d); %u requests wait for the next submit",
				  f->path, r, io_uring_sq_ready(&fr->ring));
			return;
		}
		sched_yield();
	}
}

/* Move the queued requests into SQEs, oldest first (token held). */
static void file_ring_fill(struct devio_file *f)
{
	struct file_ring *fr = f->uring;
	struct devio_request *req = atomic_exchange(&fr->pending, NULL), *fifo = NULL;

	while (req) {
		struct devio_request *next = req->next;

		req->next = fifo;
		fifo = req;
		req = next;
	}
	for (req = fifo; req; req = req->next) {
		struct io_uring_sqe *sqe;

		while (!(sqe = io_uring_get_sqe(&fr->ring))) {
			file_ring_push(f);
			if (io_uring_sq_space_left(&fr->ring) == 0)
				sched_yield();
		}
		file_ring_prep(f, req, sqe, fr->fixed_file);
		io_uring_sqe_set_data(sqe, req);
	}
}

/* Take the submitter token unless another thread holds it, and submit
 * what is queued until nothing is left; a request queued by a thread that
 * found the token taken is seen by the holder's last look at the list. */
static void file_ring_kick(struct devio_file *f)
{
	struct file_ring *fr = f->uring;

	while (!atomic_exchange(&fr->submitting, true)) {
		file_ring_fill(f);
		file_ring_push(f);
		atomic_store(&fr->submitting, false);
		if (!atomic_load(&fr->pending))
			break;
	}
}

/* Queue (the rest of) req on the backend's own ring. */
static void file_ring_queue(struct devio_file *f, struct devio_request *req)
{
	struct file_ring *fr = f->uring;
	struct devio_request *old = atomic_load(&fr->pending);

	do
		req->next = old;
	while (!atomic_compare_exchange_weak(&fr->pending, &old, req));
	if (ring_reaping != fr) /* the reaper submits once per batch of CQEs */
		file_ring_kick(f);
}

/* Queue the rest of req where it runs: the caller's ring or our own. */
static void file_ring_requeue(struct devio_file *f, struct devio_request *req, struct devio_ring *on)
{
	struct io_uring_sqe *sqe;

	if (!on) {
		file_ring_queue(f, req);
		return;
	}
	sqe = devio_ring_get_sqe(on);
	if (!sqe) {
		devio_err("%s: %s at offset %" PRIu64 ": no submission slot on the queue's ring", f->path,
			  devio_op_name(req->op), req->offset);
		req->result = -EBUSY;
		req->complete(req);
		return;
	}
	file_ring_prep(f, req, sqe, false);
	devio_ring_sqe_request(sqe, req);
}

/* Set up req->priv[1] for an O_DIRECT read or write of an aligned range. */
static int file_ring_dio_start(struct devio_file *f, struct devio_request *req)
{
	bool bounce = !file_is_aligned(f, req->buf, 0, 0);
	struct file_dio *d;

	req->priv[1] = 0;
	if (!bounce && req->op != DEVIO_OP_WRITE)
		return 0;
	if (bounce && req->length > FILE_BOUNCE_MAX)
		return -E2BIG;
	d = calloc(1, sizeof(*d));
	if (!d || (bounce && !(d->bounce = file_bounce_alloc(f, req->length)))) {
		free(d);
		return -ENOMEM;
	}
	if (bounce && req->op == DEVIO_OP_WRITE)
		memcpy(d->bounce, req->buf, req->length);
	if (req->op == DEVIO_OP_WRITE)
		file_hold(f, &d->held, req->offset, req->length);
	req->priv[1] = (uintptr_t)d;
	return 0;
}

static void file_ring_dio_end(struct devio_file *f, struct devio_request *req, int r)
{
	struct file_dio *d = (struct file_dio *)(uintptr_t)req->priv[1];

	if (!d)
		return;
	if (req->op == DEVIO_OP_WRITE)
		file_unhold(f, &d->held);
	if (d->bounce && r == 0 && req->op == DEVIO_OP_READ)
		memcpy(req->buf, d->bounce, req->length);
	free(d->bounce);
	free(d);
	req->priv[1] = 0;
}

/* The blocks are let go before complete(): what the callback starts next
 * may want them. */
static void file_ring_finish(struct devio_file *f, struct devio_request *req, int r, struct devio_ring *on)
{
	file_ring_dio_end(f, req, r);
	req->result = r;
	req->complete(req);
	if (!on)
		atomic_fetch_sub(&f->uring->inflight, 1);
}

/* One CQE for req (on our ring, or on the caller's ring `on`): done,
 * continue a short transfer, retry, or fail. */
static void file_ring_handle(struct devio_file *f, struct devio_request *req, int res, struct devio_ring *on)
{
	bool retry = res == -EAGAIN || res == -EINTR || (res == -ECANCELED && !on && !f->uring->closing);

	if (retry) {
		file_ring_requeue(f, req, on);
		return;
	}
	if (res < 0) {
		devio_err("%s: %s of %" PRIu64 " bytes at offset %" PRIu64 ": %s", f->path, devio_op_name(req->op),
			  req->length, req->offset, strerror(-res));
		file_ring_finish(f, req, res, on);
		return;
	}
	if (req->op == DEVIO_OP_FLUSH) {
		file_ring_finish(f, req, 0, on);
		return;
	}
	if (res == 0) {
		devio_err("%s: %s at offset %" PRIu64 ": unexpected end of file (did it shrink?)", f->path,
			  devio_op_name(req->op), req->offset + req->priv[0]);
		file_ring_finish(f, req, -EIO, on);
		return;
	}
	req->priv[0] += (uint64_t)res;
	if (req->priv[0] < req->length)
		file_ring_requeue(f, req, on); /* short transfer: the rest */
	else
		file_ring_finish(f, req, 0, on);
}

/* Sleep until a completion.  The timeout is a safety net: SQEs the kernel
 * did not take are pushed again after it.  Touches only the completion
 * side, so a submitter may run meanwhile. */
static int file_ring_wait(struct file_ring *fr)
{
	struct __kernel_timespec ts = { .tv_sec = 1 };
	struct io_uring_cqe *cqe;

	if (fr->ext_arg) /* else liburing would queue a timeout SQE: not ours to touch */
		return io_uring_wait_cqe_timeout(&fr->ring, &cqe, &ts);
	return io_uring_wait_cqe(&fr->ring, &cqe);
}

/* The completion thread: reap, handle, until closed and drained.  What the
 * completion callbacks queue is submitted after each batch. */
static void *file_ring_reaper(void *arg)
{
	struct devio_file *f = arg;
	struct file_ring *fr = f->uring;
	bool stop_seen = false;

	while (!stop_seen || atomic_load(&fr->inflight)) {
		struct io_uring_cqe *cqe;
		struct { struct devio_request *req; int res; } got[RING_REAP_BATCH];
		unsigned head, n = 0;

		io_uring_for_each_cqe(&fr->ring, head, cqe) {
			got[n].req = io_uring_cqe_get_data(cqe);
			got[n].res = cqe->res;
			if (++n == RING_REAP_BATCH)
				break;
		}
		if (n == 0) {
			int r = file_ring_wait(fr);

			if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY && r != -ETIME) {
				devio_err("%s: io_uring_enter: %s; completion thread stops", f->path, strerror(-r));
				break;
			}
			if (r == -ETIME)
				file_ring_kick(f);
			continue;
		}
		io_uring_cq_advance(&fr->ring, n);
		ring_reaping = fr;
		for (unsigned i = 0; i < n; i++) {
			if (got[i].req)
				file_ring_handle(f, got[i].req, got[i].res, NULL);
			else
				stop_seen = true;
		}
		ring_reaping = NULL;
		file_ring_kick(f);
	}
	return NULL;
}

static int file_ring_setup(struct file_ring *fr)
{
	struct io_uring_params p;
	int r;

	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL;
	p.cq_entries = RING_CQ_ENTRIES;
	r = io_uring_queue_init_params(RING_SQ_ENTRIES, &fr->ring, &p);
	if (r == -EINVAL) { /* older kernel: no SUBMIT_ALL */
		memset(&p, 0, sizeof(p));
		p.flags = IORING_SETUP_CQSIZE;
		p.cq_entries = RING_CQ_ENTRIES;
		r = io_uring_queue_init_params(RING_SQ_ENTRIES, &fr->ring, &p);
	}
	if (r)
		return r;
	if (!(p.features & IORING_FEAT_NODROP)) {
		io_uring_queue_exit(&fr->ring);
		return -EOPNOTSUPP;
	}
	fr->ext_arg = (p.features & IORING_FEAT_EXT_ARG) != 0;
	return 0;
}

static void file_uring_start(struct devio_file *f)
{
	struct file_ring *fr = calloc(1, sizeof(*fr));
	int r;

	if (!fr)
		return;
	r = file_ring_setup(fr);
	if (r) {
		devio_info("%s: io_uring unavailable (%s): synchronous I/O only", f->path, strerror(-r));
		free(fr);
		return;
	}
	fr->fixed_file = io_uring_register_files(&fr->ring, &f->fd, 1) == 0;
	f->uring = fr;
	if (pthread_create(&fr->reaper, NULL, file_ring_reaper, f)) {
		devio_info("%s: cannot start the io_uring completion thread: synchronous I/O only", f->path);
		f->uring = NULL;
		io_uring_queue_exit(&fr->ring);
		free(fr);
	}
}

/* Drain: a NOP with no request tells the reaper to stop once nothing is
 * in flight. */
static void file_uring_stop(struct devio_file *f)
{
	struct file_ring *fr = f->uring;
	struct io_uring_sqe *sqe;

	if (!fr)
		return;
	fr->closing = true;
	while (atomic_exchange(&fr->submitting, true))
		sched_yield();
	file_ring_fill(f);
	while (!(sqe = io_uring_get_sqe(&fr->ring)))
		file_ring_push(f);
	io_uring_prep_nop(sqe);
	io_uring_sqe_set_data(sqe, NULL);
	file_ring_push(f);
	atomic_store(&fr->submitting, false);
	pthread_join(fr->reaper, NULL);
	io_uring_queue_exit(&fr->ring);
	free(fr);
	f->uring = NULL;
}

/* What any io_uring path takes (the own ring adds its in-flight cap). */
static bool file_ring_takes(const struct devio_file *f, const struct devio_request *req)
{
	if (req->op != DEVIO_OP_READ && req->op != DEVIO_OP_WRITE && req->op != DEVIO_OP_FLUSH)
		return false;
	if (req->op != DEVIO_OP_FLUSH && (req->length == 0 ||
	    (f->direct && !file_is_aligned(f, NULL, req->length, req->offset))))
		return false; /* unaligned O_DIRECT ranges: read-modify-write in file_submit */
	if (req->op == DEVIO_OP_READ && !f->uring_reads)
		return false; /* a page-cache copy: cheaper here than through an io-wq worker */
	if (req->op == DEVIO_OP_WRITE && !f->uring_writes && !(req->flags & DEVIO_REQ_FUA))
		return false; /* the same, and io-wq serialises writes to one file */
	return true;
}

static int file_uring_submit(struct devio_file *f, struct devio_request *req)
{
	struct file_ring *fr = f->uring;

	if (!fr || fr->closing || !file_ring_takes(f, req))
		return -EAGAIN;
	if (atomic_fetch_add(&fr->inflight, 1) >= RING_MAX_INFLIGHT) {
		atomic_fetch_sub(&fr->inflight, 1);
		return -EAGAIN;
	}
	/* priv[0]: bytes a cached read already copied (0 for the rest) */
	req->priv[1] = 0;
	if (f->direct && req->op != DEVIO_OP_FLUSH && file_ring_dio_start(f, req)) {
		atomic_fetch_sub(&fr->inflight, 1);
		return -EAGAIN; /* run synchronously: bounced in pieces */
	}
	file_ring_queue(f, req);
	return 0;
}

/* A READ or WRITE of pages registered on the caller's ring (zero copy):
 * the ring is the only way to them, wherever the page cache would be
 * cheaper to copy on this thread. */
static int file_ring_fixed(struct devio_file *f, struct devio_request *req, struct devio_ring *ring)
{
	struct io_uring_sqe *sqe;

	if (f->direct)
		return -EOPNOTSUPP; /* not offered (no DEVIO_CAP_FIXED) */
	sqe = devio_ring_get_sqe(ring);
	if (!sqe) {
		devio_err("%s: %s at offset %" PRIu64 ": no submission slot on the queue's ring", f->path,
			  devio_op_name(req->op), req->offset);
		return -EBUSY;
	}
	req->priv[0] = req->priv[1] = 0;
	file_ring_prep(f, req, sqe, false);
	devio_ring_sqe_request(sqe, req);
	return 0;
}

/* ring_submit: req on the caller's ring.  Declined where something would
 * be held until completion (an O_DIRECT write's blocks, a bounce buffer)
 * and where the own ring would decline too. */
static int file_ring_submit(struct devio_backend *b, struct devio_request *req, struct devio_ring *ring)
{
	struct devio_file *f = file_of(b);
	struct io_uring_sqe *sqe;

	if (req->kind == DEVIO_BUF_FIXED)
		return file_ring_fixed(f, req, ring);
	if (!f->uring || !file_ring_takes(f, req))
		return -EAGAIN;
	if (f->direct && (req->op == DEVIO_OP_WRITE || !file_is_aligned(f, req->buf, 0, 0)))
		return -EAGAIN;
	if (file_read_cached(f, req))
		return 0;
	sqe = devio_ring_get_sqe(ring);
	if (!sqe)
		return -EAGAIN;
	req->priv[1] = 0;
	file_ring_prep(f, req, sqe, false);
	devio_ring_sqe_request(sqe, req);
	return 0;
}

static void file_ring_cqe(struct devio_backend *b, struct devio_request *req, int res)
{
	file_ring_handle(file_of(b), req, res, req->ring);
}
