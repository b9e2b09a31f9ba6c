/* imdisk.c - ImDisk's own devio command line, as a drop-in:
 *
 *   devio [--dll=LIB[;PROC]] [--novhd] [-r] tcp-port|commdev diskdev [blocks] [offset] [alignm] [buffersize]
 *   devio [--dll=LIB[;PROC]] [--novhd] [-r] tcp-port|commdev diskdev [partitionnumber] [alignm] [buffersize]
 *
 * The two forms are told apart as ImDisk's devio does (docs/devio-protocol.md,
 * "ImDisk command line"): the third word with a size suffix (K/M/G/T/B
 * powers of 1024, k/m/g/t/b powers of 1000) is a size in bytes; a plain
 * number below 512 is a partition number (0 = the whole image); a larger
 * plain number counts 512-byte blocks.  Without it, partition 1 is served
 * when sector 0 holds a master boot record, else the whole image; a
 * partition number for an image without one also serves the whole image.
 * Partitions are numbered as ImDisk numbers them
 * (devio_partition_find_imdisk), the tables read through the opened image,
 * which is then opened again windowed.  When a partition was selected the
 * next words are [alignm] [buffersize]; otherwise [offset] (512-byte
 * blocks, or bytes with a suffix) comes first.
 *
 * --dll=LIB;PROC: diskdev is opened by ImDisk's dllopen procedure PROC of
 * LIB; --dll=LIB: by a devio plugin (backends/plugin.c).
 *
 * tcp-port: a bare number, listening on EVERY interface as devio does.
 * commdev: "-" for stdin (answers on fd 0 when it is open both ways), a
 * device path, shm:NAME (shared memory, frontends/shm.c; alignm and
 * buffersize do not apply) or drv:NAME (this machine's equivalent of the
 * DevIO client driver: a ublk device when /dev/ublk-control exists, else a
 * FUSE file at /run/devio/NAME with a loop device).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "cli.h"
#include "devio/backend.h"
#include "devio/partition.h"
#include "devio/protocol.h"
#include "devio/util.h"

struct imdisk_args {
	bool readonly;
	bool novhd;    /* --novhd: no VHD detection */
	const char *dll; /* --dll=LIB[;PROC]: diskdev is the library's argument */
	const char *comm;
	const char *image;
	const char *words[4]; /* what follows diskdev */
	int n_words;
};

static void imdisk_usage(void)
{
	fprintf(stderr,
		"usage: devio [--dll=LIB[;PROC]] [--novhd] [-r] tcp-port|commdev diskdev [blocks] [offset] [alignm] [buffersize]\n"
		"       devio [--dll=LIB[;PROC]] [--novhd] [-r] tcp-port|commdev diskdev [partitionnumber] [alignm] [buffersize]\n"
		"--dll: diskdev is opened by a library: PROC is ImDisk's dllopen procedure, without\n"
		"it LIB is a devio plugin (docs/plugins.md).\n"
		"tcp-port: listen on every interface; commdev: - (stdin/stdout), a device path,\n"
		"shm:NAME (shared memory, docs/shm.md), drv:NAME (ublk device, or FUSE file\n"
		"/run/devio/NAME with a loop device).\n"
		"blocks and offset count 512-byte blocks, or bytes with a K/M/G/T/B suffix\n"
		"(k/m/g/t/b: powers of 1000); a plain number below 512 is a partition number.\n"
		"Run 'devio --help' for the devio subcommands.\n");
}

/* ImDisk's number: digits with an optional one-letter suffix.  *bytes is
 * set when a suffix made it a byte count.  Base 0 (0x hex, a leading 0
 * octal) on purpose: ImDisk's devio reads its numbers so, and this
 * command line stays ImDisk's; devio's own commands are decimal
 * (devio_parse_size, docs/cli.md). */
static int imdisk_number(const char *s, uint64_t *v, bool *bytes)
{
	char *end;
	unsigned long long n;
	uint64_t mul = 1;

	errno = 0;
	n = strtoull(s, &end, 0);
	if (end == s || errno || *s == '-')
		return -EINVAL;
	*bytes = *end != '\0';
	if (!*end) {
		*v = n;
		return 0;
	}
	if (end[1])
		return -EINVAL;
	switch (*end) {
	case 'T': mul <<= 10; /* fall through */
	case 'G': mul <<= 10; /* fall through */
	case 'M': mul <<= 10; /* fall through */
	case 'K': mul <<= 10; /* fall through */
	case 'B': break;
	case 't': mul *= 1000; /* fall through */
	case 'g': mul *= 1000; /* fall through */
	case 'm': mul *= 1000; /* fall through */
	case 'k': mul *= 1000; /* fall through */
	case 'b': break;
	default: return -EINVAL;
	}
	if (n > UINT64_MAX / mul)
		return -ERANGE;
	*v = n * mul;
	return 0;
}

static int imdisk_parse(int argc, char **argv, struct imdisk_args *a)
{
	int i = 1;

	for (; i < argc && argv[i][0] == '-' && argv[i][1]; i++) {
		if (!strcmp(argv[i], "-r"))
			a->readonly = true;
		else if (!strcmp(argv[i], "--novhd"))
			a->novhd = true; /* the image's bytes as they are, VHD or not */
		else if (!strncmp(argv[i], "--dll=", 6) && argv[i][6])
			a->dll = argv[i] + 6;
		else
			return -EINVAL;
	}
	if (argc - i < 2 || argc - i > 6)
		return -EINVAL;
	a->comm = argv[i];
	a->image = argv[i + 1];
	for (i += 2; i < argc; i++)
		a->words[a->n_words++] = argv[i];
	return 0;
}

/* Reads for the partition tables, through the opened image (a VHD's
 * sectors, a plugin's bytes). */
static int imdisk_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
	struct devio_request req = { .op = DEVIO_OP_READ, .offset = off, .length = len, .buf = buf };

	return devio_run(ctx, &req);
}

/* Partition n (ImDisk's numbering) of the opened image b, into o's
 * offset and size.  explicit: n was given on the command line.  Sets
 * *whole when ImDisk would serve the whole image instead. */
static int imdisk_partition(struct imdisk_args *a, struct devio_backend *b, int n, bool explicit,
			    struct devio_open_opts *o, bool *whole)
{
	uint64_t off, len;
	int r = devio_partition_find_imdisk(a->image, imdisk_read, b, b->size, n, &off, &len);

	*whole = r == DEVIO_IMDISK_NO_MBR || (r == DEVIO_IMDISK_WHOLE && !explicit);
	if (r == DEVIO_IMDISK_NO_MBR) {
		if (explicit) /* as devio does: no table, no partitions */
			fprintf(stderr, "devio: %s: no master boot record; using the entire image\n", a->image);
		return 0;
	}
	if (r == DEVIO_IMDISK_WHOLE && !explicit) {
		fprintf(stderr, "devio: %s: the master boot record lists no partition; using the entire image\n",
			a->image);
		return 0;
	}
	if (r == DEVIO_IMDISK_WHOLE || r == -ENOENT) {
		devio_err("%s: no partition %d%s", a->image, n,
			  r == DEVIO_IMDISK_WHOLE ? " (ImDisk's devio would serve the whole image as if it were)" : "");
		return -ENOENT;
	}
	if (r)
		return r; /* logged */
	o->has_offset = o->has_size = true;
	o->offset = off;
	o->size = len;
	fprintf(stderr, "devio: using partition %d of %s (%llu bytes at offset %llu)\n", n, a->image,
		(unsigned long long)len, (unsigned long long)off);
	return 0;
}

/* Decide size, offset or partition, reading the tables through b (the
 * whole image, opened); the remaining words are alignm and buffersize,
 * returned through *rest. */
static int imdisk_geometry(struct imdisk_args *a, struct devio_backend *b, struct devio_open_opts *o, int *rest)
{
	uint64_t v;
	bool bytes, whole = true;
	int w = 0, r;

	if (a->n_words == 0) {
		if ((r = imdisk_partition(a, b, 1, false, o, &whole)))
			return r;
	} else {
		if (imdisk_number(a->words[w++], &v, &bytes)) {
			devio_err("%s: bad blocks or partition number '%s'", a->image, a->words[0]);
			return -EINVAL;
		}
		if (bytes) {
			o->has_size = v != 0;
			o->size = v;
		} else if (v < 512) {
			if (v && (r = imdisk_partition(a, b, (int)v, true, o, &whole)))
				return r;
		} else {
			if (v > UINT64_MAX >> 9)
				return -ERANGE;
			o->has_size = true;
			o->size = v << 9;
		}
	}
	if (whole && w < a->n_words) {
		if (imdisk_number(a->words[w], &v, &bytes) || (!bytes && v > UINT64_MAX >> 9)) {
			devio_err("%s: bad offset '%s'", a->image, a->words[w]);
			return -EINVAL;
		}
		o->has_offset = v != 0;
		o->offset = bytes ? v : v << 9;
		w++;
	}
	*rest = w;
	return 0;
}

/* alignm and buffersize become options of the --devio front end. */
static int imdisk_stream_opts(struct imdisk_args *a, int w, char *out, size_t outlen)
{
	uint64_t align = 0, bufsize = 0;
	bool bytes;
	size_t n = 0;

	out[0] = '\0';
	if (w < a->n_words && (imdisk_number(a->words[w], &align, &bytes) || bytes || align > 65536)) {
		devio_err("bad alignment '%s' (want 0..65536)", a->words[w]);
		return -EINVAL;
	}
	w++;
	if (w < a->n_words && (imdisk_number(a->words[w], &bufsize, &bytes) || bufsize == 0)) {
		devio_err("bad buffer size '%s'", a->words[w]);
		return -EINVAL;
	}
	w++;
	if (w < a->n_words) {
		devio_err("too many arguments after '%s'", a->image);
		return -EINVAL;
	}
	if (align > 1)
		n += (size_t)snprintf(out + n, outlen - n, ",align=%llu", (unsigned long long)align);
	if (bufsize) {
		if (bufsize < 512)
			bufsize = 512;
		if (bufsize > DEVIO_MAX_TRANSFER) {
			devio_warn("buffer size %llu: using this server's limit of %u bytes",
				   (unsigned long long)bufsize, DEVIO_MAX_TRANSFER);
			bufsize = DEVIO_MAX_TRANSFER;
		}
		snprintf(out + n, outlen - n, ",max-transfer=%llu", (unsigned long long)bufsize);
	}
	return 0;
}

/* What can be refused before the image is opened: words that are no
 * numbers, a drv: name that is no plain name. */
static int imdisk_precheck(const struct imdisk_args *a)
{
	const char *c = a->comm;
	uint64_t v;
	bool bytes;

	for (int i = 0; i < a->n_words; i++)
		if (imdisk_number(a->words[i], &v, &bytes)) {
			devio_err("%s: '%s' is not a number", a->image, a->words[i]);
			return -EINVAL;
		}
	/* NAME becomes a directory under DEVIO_RUN_DIR: "." or ".." would
	 * mount over the run directory itself or its parent */
	if (!strncmp(c, "drv:", 4) &&
	    (!c[4] || strchr(c + 4, '/') || !strcmp(c + 4, ".") || !strcmp(c + 4, ".."))) {
		devio_err("%s: want drv:NAME", c);
		return -EINVAL;
	}
	return 0;
}

/* drv:NAME: a ublk device when the kernel has ublk, else a FUSE file
 * under DEVIO_RUN_DIR with a loop device (fuse's --loop). */
static int imdisk_driver(const char *c, struct feopts *f, char *buf, size_t buflen)
{
	int r;

	if (access("/dev/ublk-control", F_OK) == 0) {
		snprintf(buf, buflen, "%s", c + 4);
		return feopts_add(f, &devio_frontend_ublk, buf);
	}
	mkdir(DEVIO_RUN_DIR, 0755);
	snprintf(buf, buflen, DEVIO_RUN_DIR "/%s", c + 4);
	if (mkdir(buf, 0755) && errno != EEXIST) {
		r = -errno;
		devio_err("%s: cannot create %s: %s", c, buf, strerror(-r));
		return r;
	}
	r = feopts_add(f, &devio_frontend_fuse, buf);
	return r ? r : feopts_set(f, "loop", NULL);
}

/* The front end for commdev and its argument (in buf), as `devio serve`
 * would be given them. */
static int imdisk_frontend(struct imdisk_args *a, struct feopts *f, const char *opts, char *buf, size_t buflen)
{
	const char *c = a->comm;
	uint64_t port;

	if (!strncmp(c, "shm:", 4)) { /* the stream front end's shm: variant; alignm/buffersize: not for shm */
		snprintf(buf, buflen, "%s", c);
		return feopts_add(f, &devio_frontend_stream, buf);
	}
	if (!strncmp(c, "drv:", 4))
		return imdisk_driver(c, f, buf, buflen);
	if (!devio_parse_u64(c, &port)) {
		if (port == 0 || port > 65535) {
			devio_err("%s: not a TCP port", c);
			return -EINVAL;
		}
		fprintf(stderr, "devio: listening on TCP port %llu on ALL interfaces (as ImDisk's devio does)\n",
			(unsigned long long)port);
		snprintf(buf, buflen, "tcp:*:%llu%s", (unsigned long long)port, opts);
	} else if (!strcmp(c, "-")) {
		snprintf(buf, buflen, "stdio%s", opts);
	} else if (c[0] == '/') {
		snprintf(buf, buflen, "%s%s", c, opts);
	} else {
		char cwd[4096];

		if (!getcwd(cwd, sizeof(cwd)))
			return -errno;
		if ((size_t)snprintf(buf, buflen, "%s/%s%s", cwd, c, opts) >= buflen) {
			/* truncated, it would name another file */
			devio_err("%s: path too long", c);
			return -ENAMETOOLONG;
		}
	}
	return feopts_add(f, &devio_frontend_stream, buf);
}

/* The image (or the library's device, for --dll) as a backend. */
static const char *imdisk_source(struct imdisk_args *a, char *buf, size_t buflen)
{
	if (!a->dll)
		return a->image;
	if ((size_t)snprintf(buf, buflen, "plugin:%s:%s", a->dll, a->image) >= buflen)
		return NULL;
	return buf;
}

/* Open the whole image, read its tables for size, offset or partition,
 * and open it again with them when they window it. */
static int imdisk_open(struct imdisk_args *a, const char *source, struct devio_open_opts *o, int *rest,
		       struct devio_backend **out)
{
	int r = devio_backend_open(source, o, out);

	if (r)
		return r; /* the backend said why */
	if ((r = imdisk_geometry(a, *out, o, rest)))
		goto fail;
	if (!o->has_offset && !o->has_size)
		return 0;
	devio_backend_close(*out);
	*out = NULL; /* a failed open below leaves it as it was: closed */
	return devio_backend_open(source, o, out);
fail:
	devio_backend_close(*out);
	*out = NULL;
	return r;
}

/* Serve the opened image through the front end f names. */
static int imdisk_serve(struct imdisk_args *a, struct devio_export *e, struct feopts *f)
{
	struct devio_server srv = { .exports = e, .n_exports = 1, .opts = f->serve };

	fprintf(stderr, "devio: serving %llu bytes of %s%s\n", (unsigned long long)e->backend->size, a->image,
		e->backend->caps & DEVIO_CAP_READONLY ? " read-only" : "");
	return serve_run(&srv, f->fe, f->n_fe);
}

int cmd_imdisk(int argc, char **argv)
{
	struct imdisk_args a = { 0 };
	struct devio_open_opts o = { 0 };
	struct devio_export e = { .name = "" };
	struct feopts f;
	char opts[96], arg[4200], src[4200];
	int rest, rc;

	if (imdisk_parse(argc, argv, &a) || imdisk_precheck(&a)) {
		devio_err("unknown command or bad ImDisk command line: %s", argc > 1 ? argv[1] : "");
		imdisk_usage();
		return 2;
	}
	o.readonly = a.readonly;
	o.format = a.novhd ? "raw" : "auto";
	e.source = imdisk_source(&a, src, sizeof(src));
	if (!e.source) {
		devio_err("--dll=%s: too long", a.dll);
		return 2;
	}
	if (imdisk_open(&a, e.source, &o, &rest, &e.backend))
		return 1;
	rc = imdisk_stream_opts(&a, rest, opts, sizeof(opts)) ? 2 : 0;
	if (!rc && feopts_init(&f, devio_frontends, NULL))
		rc = 1;
	if (!rc) {
		rc = imdisk_frontend(&a, &f, opts, arg, sizeof(arg)) ? 2 : 0;
		if (!rc) {
			feopts_finish(&f);
			rc = imdisk_serve(&a, &e, &f);
		}
		feopts_free(&f);
	} else if (rc == 2) {
		imdisk_usage();
	}
	devio_backend_close(e.backend);
	return rc;
}
