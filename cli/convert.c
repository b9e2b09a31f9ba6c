/* convert.c - `devio convert [-O raw|vhd|qcow2] [-o OPTS] [-p] SRC DST`, the
 * counterpart of `qemu-img convert`: any source (an image, ram:, devio://,
 * nbd://, a stack built with serve's export options) into a new image of
 * the given format.  The new image is sparse: ranges the source's extents
 * call zero, and all-zero pieces read, are never written.  The copying is
 * client_cmds.c's copy engine.  A new vhd or qcow2 image is made under a
 * temporary name next to DST and renamed over it when complete: a failed
 * or interrupted convert leaves DST as it was.  Also what info, copy and convert share:
 * the export options, the same-file check, a new sparse file. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "cli.h"
#include "devio/backend.h"
#include "devio/layer.h"
#include "devio/util.h"

#define CONVERT_BLOCK (1u << 20)

int cli_export_option(const char *cmd, int c, const char *val, struct devio_open_opts *o)
{
	uint64_t v;

	switch (c) {
	case CLI_OPT_OFFSET:
	case CLI_OPT_SIZE:
		if (devio_parse_size(val, &v)) {
			cli_size_error(cmd, c == CLI_OPT_OFFSET ? "--offset" : "--size", val, devio_parse_size(val, &v));
			return -EINVAL;
		}
		if (c == CLI_OPT_OFFSET)
			o->has_offset = true, o->offset = v;
		else
			o->has_size = true, o->size = v;
		return 1;
	case CLI_OPT_PARTITION:
		if (devio_parse_u64(val, &v) || v < 1 || v > 128) {
			devio_err("%s: --partition: want 1..128, got '%s'", cmd, val);
			return -EINVAL;
		}
		o->partition = (int)v;
		return 1;
	case CLI_OPT_FORMAT:
		o->format = val;
		return 1;
	case CLI_OPT_COW:
		o->cow = val;
		return 1;
	default:
		return 0;
	}
}

/* One file or device: block devices by the device they are (two nodes of
 * one disk are one), anything else by device and inode. */
static bool convert_same_node(const struct stat *a, const struct stat *b)
{
	if (S_ISBLK(a->st_mode) || S_ISBLK(b->st_mode))
		return S_ISBLK(a->st_mode) && S_ISBLK(b->st_mode) && a->st_rdev == b->st_rdev;
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

static bool convert_same_inode(const char *a, const char *b)
{
	struct stat sa, sb;

	return a && b && !stat(a, &sa) && !stat(b, &sb) && convert_same_node(&sa, &sb);
}

bool cli_same_file(const char *a, const char *b)
{
	char *fa, *fb;
	bool same;

	if (!a || !b)
		return false;
	if (!cli_is_uri(a) && !cli_is_uri(b))
		return convert_same_inode(a, b);
	fa = cli_is_uri(a) ? cli_status_local_file(a) : NULL; /* a server here, serving a file */
	fb = cli_is_uri(b) ? cli_status_local_file(b) : NULL;
	same = convert_same_inode(fa ? fa : a, fb ? fb : b);
	free(fa);
	free(fb);
	return same;
}

/* How many of this process's descriptors are open on path (a file or a
 * block device; convert_same_node), or 0.  Counted before the source is
 * opened and again after it: more the second time is a file the source is
 * made of (a differencing VHD's parents at any depth, an overlay, a
 * backing file, the image under a partition), on whatever descriptor it
 * got (0-2 too, where the caller closed those), while what the caller
 * itself holds (a redirection) counts the same both times. */
static int convert_fds_on(const char *path)
{
	struct stat want, st;
	struct dirent *e;
	char fdp[32 + sizeof(e->d_name)];
	int n = 0;
	DIR *d;

	if (cli_is_uri(path) || stat(path, &want) || !(S_ISREG(want.st_mode) || S_ISBLK(want.st_mode)) ||
	    !(d = opendir("/proc/self/fd")))
		return 0;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.' || atoi(e->d_name) == dirfd(d))
			continue;
		snprintf(fdp, sizeof(fdp), "/proc/self/fd/%s", e->d_name);
		n += !stat(fdp, &st) && convert_same_node(&st, &want);
	}
	closedir(d);
	return n;
}

bool cli_is_uri(const char *s)
{
	return strstr(s, "://") || !strncmp(s, "ram:", 4);
}

int cli_create_sparse(const char *cmd, const char *path, uint64_t size)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666), r = 0;

	if (fd < 0 || ftruncate(fd, (off_t)size)) {
		r = -errno;
		devio_err("%s: %s: cannot create: %s", cmd, path, strerror(-r));
	}
	if (fd >= 0)
		close(fd);
	return r;
}

/* A raw DST: a server's export or a block device is written in place (it
 * must be large enough); a file is created (or truncated) sparse, so it
 * reads as zeroes (*fresh). */
static int convert_open_raw(const char *dst, uint64_t size, struct devio_backend **out, bool *fresh)
{
	struct devio_open_opts o = { 0 };
	struct stat st;
	int r;

	*fresh = false;
	if (cli_is_uri(dst) || (!stat(dst, &st) && !S_ISREG(st.st_mode))) {
		r = devio_backend_open(dst, &o, out);
		if (!r && (*out)->size < size) {
			devio_err("convert: %s (%llu bytes) is smaller than the source (%llu bytes)", dst,
				  (unsigned long long)(*out)->size, (unsigned long long)size);
			devio_backend_close(*out);
			r = -ENOSPC;
		}
		return r;
	}
	if ((r = cli_create_sparse("convert", dst, size)))
		return r;
	*fresh = true;
	return devio_file_open(dst, &o, out);
}

/* An image format's DST: made under a temporary name next to it (*tmp,
 * devio_file_replace_begin) and renamed over it only when the copy is
 * complete (convert_commit), so a failed or interrupted convert leaves
 * DST as it was.  *keep: a descriptor on the new image, opened for
 * writing before anything is copied into it, whose close at the end
 * reports what the writer's close would (devio_backend_close returns
 * nothing): a write-back error since it was opened, where the file system
 * says so at close (NFS, FUSE), whatever descriptor wrote. */
static int convert_open_image(const char *fmt, const char *opts, const char *dst, uint64_t size,
			      struct devio_backend **out, char **tmp, int *keep)
{
	struct stat st;
	int fd, r;

	if (cli_is_uri(dst) || (!stat(dst, &st) && !S_ISREG(st.st_mode))) {
		devio_err("convert: -O %s makes a new image file: %s is not one (-O raw writes a device or a "
			  "server in place)", fmt, dst);
		return -EINVAL;
	}
	fd = devio_file_replace_begin(dst, 0666, tmp);
	if (fd < 0) {
		devio_err("convert: cannot create a file next to %s: %s", dst, strerror(-fd));
		return fd;
	}
	close(fd);
	r = devio_format_create(fmt, *tmp, size, opts, out); /* a new file, replacing this one */
	if (!r && (*keep = open(*tmp, O_WRONLY | O_CLOEXEC)) < 0) {
		r = -errno;
		devio_err("convert: %s: cannot open the new image: %s", *tmp, strerror(-r));
		devio_backend_close(*out);
	}
	if (r) {
		unlink(*tmp);
		free(*tmp);
		*tmp = NULL;
	}
	return r;
}

/* The finished image (flushed by the copy, closed by its backend) takes
 * DST's name once keep, a descriptor on it, closes without an error; a
 * failed one goes. */
static int convert_commit(const char *tmp, const char *dst, int keep, int r)
{
	int rr;

	if (close(keep) && !r) {
		r = -errno;
		devio_err("convert: %s: closing the new image: %s", tmp, strerror(-r));
	}
	rr = devio_file_replace_end(tmp, r);
	if (rr && !r)
		devio_err("convert: cannot rename %s to %s: %s", tmp, dst, strerror(-rr));
	return rr;
}

static void convert_report(const struct cli_copy *c, int r)
{
	if (r)
		fprintf(stderr, "devio: convert stopped (%s) after %llu bytes\n",
			r == -EINTR ? "interrupted" : strerror(-r), (unsigned long long)c->done);
	else
		fprintf(stderr, "devio: converted %llu bytes from %s to %s (%llu of them zero ranges not read, "
			"%llu bytes not written)\n", (unsigned long long)c->end, c->src_name, c->dst_name,
			(unsigned long long)c->zeroed, (unsigned long long)c->skipped);
}

static void convert_usage(FILE *out)
{
	fprintf(out, "usage: devio convert [-O raw|vhd|qcow2] [-o OPTIONS] [-p] " CLI_EXPORT_USAGE " SRC DST\n"
		     "  -O FORMAT   the new image's format (default raw)\n"
		     "  -o OPTIONS  the new image's options, as qemu-img's: vhd takes subformat=dynamic|fixed\n"
		     "              and force_size=on|off (off: the size rounded up to a whole CHS geometry),\n"
		     "              qcow2 compat=0.10|1.1 (default 1.1) and cluster_size=512..2M (default 64k)\n"
		     "  -p          a progress line (on a terminal)\n"
		     "  export options as for `devio serve`: a window, a partition, the source's format, an overlay\n");
}

static int convert_run(const char *fmt, const char *fopts, bool show, const struct devio_open_opts *o,
		       const char *src, const char *dst)
{
	struct cli_copy c = { .cmd = "convert", .src_name = src, .dst_name = dst, .block = CONVERT_BLOCK };
	struct devio_open_opts so = *o;
	bool fresh = false;
	char *tmp = NULL;
	int held, keep = -1, r;

	if (cli_same_file(src, dst) || cli_same_file(o->cow, dst)) {
		devio_err("convert: %s and %s are the same file: refusing to copy an image onto itself", src, dst);
		return 1;
	}
	so.readonly = true;
	held = convert_fds_on(dst);
	if (devio_backend_open(src, &so, &c.src))
		return 1;
	if (convert_fds_on(dst) > held) {
		devio_err("convert: %s reads %s (a differencing image's parent, a backing file, an overlay): refusing to write "
			  "over a file the source is made of", src, dst);
		devio_backend_close(c.src);
		return 1;
	}
	fresh = strcmp(fmt, "raw") != 0;
	if (fresh)
		r = convert_open_image(fmt, fopts, dst, c.src->size, &c.dst, &tmp, &keep);
	else
		r = convert_open_raw(dst, c.src->size, &c.dst, &fresh);
	if (r) {
		devio_backend_close(c.src);
		return 1;
	}
	c.end = c.src->size;
	c.progress = show && isatty(STDERR_FILENO);
	c.dst_zero = fresh;
	r = cli_copy_run(&c);
	devio_backend_close(c.dst);
	devio_backend_close(c.src);
	if (tmp)
		r = convert_commit(tmp, dst, keep, r);
	else if (r && fresh)
		devio_file_remove(dst); /* no half image left behind (through a link: its target) */
	free(tmp);
	convert_report(&c, r);
	return r == -EINTR ? 130 : r ? 1 : 0;
}

int cmd_convert(int argc, char **argv)
{
	static const struct option opts[] = { CLI_STD_OPTIONS, CLI_EXPORT_OPTIONS, { 0 } };
	struct devio_open_opts o = { 0 };
	const char *fmt = "raw", *fopts = NULL;
	bool show = false;
	int c, k;

	optind = 1;
	while ((c = cli_getopt("convert", argc, argv, "O:o:phV", opts, convert_usage)) != -1) {
		if (c == 'O')
			fmt = optarg;
		else if (c == 'o')
			fopts = optarg;
		else if (c == 'p')
			show = true;
		else if ((k = cli_export_option("convert", c, optarg, &o)) < 0)
			return cli_usage_hint("convert");
	}
	if (strcmp(fmt, "raw") && strcmp(fmt, "vhd") && strcmp(fmt, "qcow2"))
		return cli_usage_error("convert", "-O: want raw, vhd or qcow2, got '%s'", fmt);
	if (fopts && !strcmp(fmt, "raw"))
		return cli_usage_error("convert", "-o: a raw image takes no options");
	if (optind != argc - 2)
		return cli_usage_error("convert", "want SRC and DST");
	return convert_run(fmt, fopts, show, &o, argv[optind], argv[optind + 1]);
}
