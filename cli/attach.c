/* attach.c - `devio attach URI --fuse DIR [--loop]` (or `--ublk`) gives
 * this machine a file (and a block device) for a remote devio or NBD
 * server: the URI is opened as a backend, kept connected across restarts
 * of the server (--timeout), and served by the FUSE or ublk front end in
 * this process, the Linux counterpart of `imdisk -a -t proxy` (`devio
 * detach` is cli/detach.c).  --nbd-device and /dev/nbdN go to the kernel nbd client (attach_nbd.c). */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "cli.h"
#include "devio/util.h"

/* The front ends attach offers: a local file or device for the export. */
static const struct devio_frontend_type *const attach_frontends[] = { &devio_frontend_fuse, &devio_frontend_ublk,
								      NULL };

#define ATTACH_TIMEOUT_S 60

static void attach_usage(FILE *out)
{
	struct feopts f;

	fprintf(out,
		"usage: devio attach URI --fuse MOUNTPOINT [--loop] [-r] [-d] [--timeout SECONDS]\n"
		"       devio attach URI --ublk [-r] [-d] [--timeout SECONDS]\n"
		"       devio attach URI --nbd-device [...]   (devio attach --nbd-device --help)\n"
		"URI: devio://HOST:PORT, devio+unix:///PATH, nbd://HOST[:PORT][/EXPORT], nbd+unix:///EXPORT?socket=PATH,\n"
		"     over TLS nbds://, nbds+unix://, devio+tls:// (man devio)\n"
		"front end and its options:\n");
	if (!feopts_init(&f, attach_frontends, NULL)) {
		feopts_usage_frontends(&f, out);
		feopts_free(&f);
	}
	fprintf(out,
		"options:\n"
		"  -r, --readonly         refuse writes\n"
		"  --size N               the export's size where the server does not tell it\n"
		"  --timeout SECONDS      how long requests wait for a lost server to come back (default 60;\n"
		"                         reconnected and resent in order, then EIO; 0: fail at once)\n"
		"  -d, --daemon           return once the device is ready; the server runs on (--fork)\n"
		"  -v, --verbose\n"
		"serving options (the core's run policy):\n");
	feopts_usage_serving(out);
	daemon_usage(out);
	fprintf(out, "to stop it: devio detach MOUNTPOINT|/dev/loopN|/dev/ublkbN|/dev/nbdN (devio detach --help)\n");
}

enum { OPT_NBD_DEVICE = 256, OPT_SIZE, OPT_TIMEOUT };

/* attach's own options; the front end's and --threads come from feopts.c */
static const struct option attach_options[] = {
	{ "nbd-device", optional_argument, NULL, OPT_NBD_DEVICE },
	{ "readonly", no_argument, NULL, 'r' },
	{ "size", required_argument, NULL, OPT_SIZE },
	{ "timeout", required_argument, NULL, OPT_TIMEOUT },
	{ "daemon", no_argument, NULL, 'd' },
	{ "verbose", no_argument, NULL, 'v' },
	CLI_STD_OPTIONS,
	{ NULL, 0, NULL, 0 },
};

struct attach_args {
	const char *uri;
	struct devio_open_opts open;
	struct feopts fe;
	struct daemon_opts daemon;
};

static bool attach_wants_nbd_device(int argc, char **argv)
{
	for (int i = 1; i < argc; i++)
		if (!strncmp(argv[i], "--nbd-device", 12))
			return true;
	return false;
}

static int attach_parse_one(struct attach_args *a, int c, const char *val)
{
	switch (c) {
	case OPT_SIZE:
		/* a server that does not tell its size (ImDisk's devio on a block device) */
		a->open.has_size = true;
		if (devio_parse_size(val, &a->open.size) || !a->open.size) {
			cli_size_error(NULL, "--size", val, devio_parse_size(val, &a->open.size));
			return -EINVAL;
		}
		return 0;
	case OPT_TIMEOUT:
		return devio_opt_uint("timeout", val, &a->open.remote_timeout);
	case 'r': a->open.readonly = true; return 0;
	case 'd': a->daemon.fork = true; return 0;
	case 'v': devio_log_set_level(DEVIO_LOG_DEBUG); return 0;
	case OPT_NBD_DEVICE: /* also what getopt makes of an abbreviation such as --nbd */
		devio_err("attach: --nbd-device (the kernel's nbd client) does not go with --fuse or --ublk");
		return -EINVAL;
	default: return -EINVAL;
	}
}

/* 0, or the exit status of a usage error. */
static int attach_parse(int argc, char **argv, struct attach_args *a)
{
	int c, r;

	optind = 1;
	while ((c = cli_getopt("attach", argc, argv, "rdvhV", a->fe.table, attach_usage)) != -1) {
		r = feopts_parse(&a->fe, c, optarg);
		if (r == 1)
			r = daemon_parse(&a->daemon, c, optarg);
		if (r == 1)
			r = attach_parse_one(a, c, optarg);
		if (r) /* the option said what is wrong */
			return cli_usage_hint("attach");
	}
	if (optind != argc - 1 || !a->fe.n_fe)
		return cli_usage_error("attach", optind != argc - 1 ? "want exactly one URI"
								     : "want --fuse MOUNTPOINT, --ublk or --nbd-device");
	a->uri = argv[optind];
	if (daemon_check(&a->daemon))
		return cli_usage_hint("attach");
	feopts_finish(&a->fe);
	return 0;
}

/* Open the URI and serve it through the front end until signalled. */
static int attach_run(struct attach_args *a)
{
	struct devio_export ex = { .name = "", .source = a->uri };
	struct devio_server srv = { .exports = &ex, .n_exports = 1, .opts = a->fe.serve };
	int r, rc;

	r = devio_backend_open(a->uri, &a->open, &ex.backend);
	if (r)
		return 1; /* the backend said why */
	rc = serve_run(&srv, a->fe.fe, a->fe.n_fe);
	devio_backend_close(ex.backend);
	return rc;
}

int cmd_attach(int argc, char **argv)
{
	static struct attach_args a; /* its daemon options live as long as the process */
	struct option *own;
	int rc;

	if (attach_wants_nbd_device(argc, argv))
		return attach_nbd_device(argc, argv);
	memset(&a, 0, sizeof(a));
	a.open.remote_timeout = ATTACH_TIMEOUT_S;
	own = daemon_merge_options(attach_options);
	if (!own || feopts_init(&a.fe, attach_frontends, own)) {
		free(own);
		return 1;
	}
	rc = attach_parse(argc, argv, &a);
	if (rc == 0 && !daemon_start(&a.daemon, &rc))
		rc = attach_run(&a);
	feopts_free(&a.fe);
	free(own);
	return rc;
}
