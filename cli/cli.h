/* cli.h - the subcommands of the `devio` command and what they share. */
#ifndef DEVIO_CLI_H
#define DEVIO_CLI_H

#include <getopt.h>
#include <stdbool.h>
#include <stddef.h>
#include "devio/backend.h"
#include "devio/frontend.h"

/* Subcommands: argv[0] is the subcommand's name.  Return the exit status. */
int cmd_serve(int argc, char **argv);
int cmd_status(int argc, char **argv);
int cmd_info(int argc, char **argv);    /* cli/client_cmds.c */
int cmd_cat(int argc, char **argv);
int cmd_write(int argc, char **argv);
int cmd_copy(int argc, char **argv);
int cmd_convert(int argc, char **argv); /* cli/convert.c */
int cmd_attach(int argc, char **argv);  /* cli/attach.c */
int cmd_detach(int argc, char **argv);
/* attach --nbd-device / detach /dev/nbdN: the kernel's nbd client over
 * netlink (cli/attach_nbd.c); argv as given to cmd_attach/cmd_detach. */
int attach_nbd_device(int argc, char **argv);
int detach_nbd_device(const char *dev);
/* ImDisk's own command line: devio [-r] tcp-port|commdev diskdev ... */
int cmd_imdisk(int argc, char **argv);  /* cli/imdisk.c; argv[0] is "devio" */

/* One front end to start: a type and its argument. */
struct serve_frontend {
	const struct devio_frontend_type *type;
	const char *arg;
	void *state;
};

/* Start every front end, wait for SIGINT/SIGTERM (or for every front end
 * to report finished()), stop them in reverse order, flush the exports.
 * Does not close the backends.  Returns an exit status. */
int serve_run(struct devio_server *srv, struct serve_frontend *fe, size_t n);

/* The copy engine of `devio copy` and `devio convert` (cli/client_cmds.c):
 * [start, end) of src to the same offsets of dst, a reader thread one
 * block ahead of the writer, blocks the source's extents say read as
 * zeroes not read; dst flushed at the end. */
struct cli_copy {
	struct devio_backend *src, *dst;
	const char *cmd, *src_name, *dst_name; /* for messages */
	uint64_t start, end, block;            /* block: bytes per request */
	bool progress;    /* a progress line on stderr (bar, rate, ETA) that clears itself */
	bool dst_zero;    /* dst reads as zeroes already: zero blocks and all-zero
			   * pieces read are skipped, not written (a sparse image) */
	uint64_t done;    /* out: every byte below this is written */
	uint64_t zeroed;  /* out: bytes not read (zero by the source's extents) */
	uint64_t skipped; /* out: with dst_zero, bytes not written */
};

/* 0, -EINTR after SIGINT/SIGTERM (done says where to resume), or the
 * error, logged. */
int cli_copy_run(struct cli_copy *c);

/* Export options shared by `devio info` and `devio convert`, as serve
 * has them: --offset, --size, --partition, --format, --cow.  Put
 * CLI_EXPORT_OPTIONS in a getopt_long table; cli_export_option() returns
 * 1 for one of them (parsed into o), 0 for another option, -EINVAL (said
 * why) for a bad value. */
enum { CLI_OPT_OFFSET = 0x200, CLI_OPT_SIZE, CLI_OPT_PARTITION, CLI_OPT_FORMAT, CLI_OPT_COW };
#define CLI_EXPORT_OPTIONS \
	{ "offset", required_argument, NULL, CLI_OPT_OFFSET }, \
	{ "size", required_argument, NULL, CLI_OPT_SIZE }, \
	{ "partition", required_argument, NULL, CLI_OPT_PARTITION }, \
	{ "format", required_argument, NULL, CLI_OPT_FORMAT }, \
	{ "cow", required_argument, NULL, CLI_OPT_COW }
#define CLI_EXPORT_USAGE "[--offset N] [--size N] [--partition N] [--format F] [--cow FILE]"
int cli_export_option(const char *cmd, int c, const char *val, struct devio_open_opts *o);

/* a and b (a may be NULL) name the same file: same device and inode. */
bool cli_same_file(const char *a, const char *b);
/* s is a server URI or ram:, not a path. */
bool cli_is_uri(const char *s);
/* path created (or truncated) as a sparse file of size bytes: 0 or the
 * error, logged. */
int cli_create_sparse(const char *cmd, const char *path, uint64_t size);

/* Where running servers describe themselves for `devio status`. */
#define DEVIO_RUN_DIR "/run/devio"

#endif
