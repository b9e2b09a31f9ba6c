/* cli.h - the subcommands of the `devio` command and what they share. */
#ifndef DEVIO_CLI_H
#define DEVIO_CLI_H

#include <stddef.h>
#include "devio/frontend.h"

/* Subcommands: argv[0] is the subcommand's name.  Return the exit status. */
int cmd_serve(int argc, char **argv);
int cmd_status(int argc, char **argv);
int cmd_info(int argc, char **argv);    /* cli/client_cmds.c */
int cmd_cat(int argc, char **argv);
int cmd_write(int argc, char **argv);
int cmd_copy(int argc, char **argv);
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

/* Where running servers describe themselves for `devio status`. */
#define DEVIO_RUN_DIR "/run/devio"

#endif
