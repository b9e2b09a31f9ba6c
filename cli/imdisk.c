/* imdisk.c - ImDisk's own devio command line, as a drop-in:
 *
 *   devio [-r] tcp-port|commdev diskdev [blocks] [offset] [alignm] [buffersize]
 *   devio [-r] tcp-port|commdev diskdev [partitionnumber] [alignm] [buffersize]
 *
 * The two forms are told apart as ImDisk's devio does (docs/devio-protocol.md,
 * "ImDisk command line"): the third word with a size suffix (K/M/G/T/B
 * powers of 1024, k/m/g/t/b powers of 1000) is a size in bytes; a plain
 * number below 512 is a partition number (0 = the whole image); a larger
 * plain number counts 512-byte blocks.  Without it, partition 1 is served
 * when sector 0 holds a master boot record, else the whole image; a
 * partition number for an image without one also serves the whole image.  When a
 * partition was selected the next words are [alignm] [buffersize];
 * otherwise [offset] (512-byte blocks, or bytes with a suffix) comes first.
 *
 * tcp-port: a bare number, listening on EVERY interface as devio does.
 * commdev: "-" for stdin/stdout, a device path, shm:NAME (shared memory,
 * frontends/shm.c; alignm and buffersize do not apply) or drv:NAME
 * (this machine's equivalent of the DevIO client driver:
 * a ublk device when /dev/ublk-control exists, else a FUSE file at
 * /run/devio/NAME with a loop device).
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
#include "devio/protocol.h"
#include "devio/util.h"

struct imdisk_args {
	bool readonly;
	bool novhd;    /* --novhd: no VHD detection */
	const char *comm;
	const char *image;
	const char *words[4]; /* what follows diskdev */
	int n_words;
};

static void imdisk_usage(void)
{
	fprintf(stderr,
		"usage: devio [-r] tcp-port|commdev diskdev [blocks] [offset] [alignm] [buffersize]\n"
		"       devio [-r] tcp-port|commdev diskdev [partitionnumber] [alignm] [buffersize]\n"
		"tcp-port: listen on every interface; commdev: - (stdin/stdout), a device path,\n"
		"shm:NAME (shared memory, docs/shm.md), drv:NAME (ublk device, or FUSE file\n"
		"/run/devio/NAME with a loop device).\n"
		"blocks and offset count 512-byte blocks, or bytes with a K/M/G/T/B suffix\n"
		"(k/m/g/t/b: powers of 1000); a plain number below 512 is a partition number.\n"
		"Run 'devio --help' for the devio subcommands.\n");
}

/* ImDisk's number: digits with an optional one-letter suffix.  *bytes is
 * set when a suffix made it a byte count. */
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

/* Does sector 0 hold a master boot record, by devio's test? */
static bool has_mbr(const char *image)
{
	uint8_t s[512];
	int fd = open(image, O_RDONLY | O_CLOEXEC);
	bool ok;

	if (fd < 0)
		return false;
	ok = pread(fd, s, sizeof(s), 0) == (ssize_t)sizeof(s) && s[510] == 0x55 && s[511] == 0xAA;
	for (int e = 0; ok && e < 4; e++)
		ok = (s[446 + 16 * e] & 0x7F) == 0;
	close(fd);
	return ok;
}

/* Decide size, offset or partition; the remaining words are alignm and
 * buffersize, returned through *rest. */
static int imdisk_geometry(struct imdisk_args *a, struct devio_open_opts *o, int *rest)
{
	uint64_t v;
	bool bytes;
	int w = 0;

	o->numbering = DEVIO_PART_IMDISK; /* ImDisk's own partition numbers */
	if (a->n_words == 0) {
		if (has_mbr(a->image))
			o->partition = 1;
	} else {
		if (imdisk_number(a->words[w++], &v, &bytes)) {
			devio_err("%s: bad blocks or partition number '%s'", a->image, a->words[0]);
			return -EINVAL;
		}
		if (bytes) {
			o->has_size = v != 0;
			o->size = v;
		} else if (v < 512) {
			o->partition = (int)v;
			if (v && !has_mbr(a->image)) {
				/* as devio does: no table, no partitions */
				fprintf(stderr, "devio: %s: no master boot record; using the entire image\n",
					a->image);
				o->partition = 0;
			}
		} else {
			if (v > UINT64_MAX >> 9)
				return -ERANGE;
			o->has_size = true;
			o->size = v << 9;
		}
	}
	if (!o->partition && w < a->n_words) {
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

/* drv:NAME: a ublk device when the kernel has ublk, else a FUSE file
 * under DEVIO_RUN_DIR with a loop device (fuse's --loop). */
static int imdisk_driver(const char *c, struct feopts *f, char *buf, size_t buflen)
{
	int r;

	/* NAME becomes a directory under DEVIO_RUN_DIR: "." or ".." would
	 * mount over the run directory itself or its parent */
	if (!c[4] || strchr(c + 4, '/') || !strcmp(c + 4, ".") || !strcmp(c + 4, "..")) {
		devio_err("%s: want drv:NAME", c);
		return -EINVAL;
	}
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

/* Open the image and serve it through the front end f names. */
static int imdisk_serve(struct imdisk_args *a, struct devio_open_opts *o, struct feopts *f)
{
	struct devio_export e = { .name = "", .source = a->image };
	struct devio_server srv = { .exports = &e, .n_exports = 1, .opts = f->serve };
	int r, rc;

	r = devio_backend_open(a->image, o, &e.backend);
	if (r)
		return 1; /* the backend said why */
	if (o->partition)
		fprintf(stderr, "devio: using partition %d of %s\n", o->partition, a->image);
	fprintf(stderr, "devio: serving %llu bytes of %s%s\n", (unsigned long long)e.backend->size, a->image,
		e.backend->caps & DEVIO_CAP_READONLY ? " read-only" : "");
	rc = serve_run(&srv, f->fe, f->n_fe);
	devio_backend_close(e.backend);
	return rc;
}

int cmd_imdisk(int argc, char **argv)
{
	struct imdisk_args a = { 0 };
	struct devio_open_opts o = { 0 };
	struct feopts f;
	char opts[96], arg[4200];
	int rest, rc;

	if (imdisk_parse(argc, argv, &a)) {
		devio_err("unknown command or bad ImDisk command line: %s", argc > 1 ? argv[1] : "");
		imdisk_usage();
		return 2;
	}
	o.readonly = a.readonly;
	o.format = a.novhd ? "raw" : "auto";
	if (imdisk_geometry(&a, &o, &rest) || imdisk_stream_opts(&a, rest, opts, sizeof(opts))) {
		imdisk_usage();
		return 2;
	}
	if (feopts_init(&f, devio_frontends, NULL))
		return 1;
	rc = imdisk_frontend(&a, &f, opts, arg, sizeof(arg)) ? 2 : 0;
	if (!rc) {
		feopts_finish(&f);
		rc = imdisk_serve(&a, &o, &f);
	}
	feopts_free(&f);
	return rc;
}
