/* cli.h - the subcommands of the `devio` command and what they share. */
#ifndef DEVIO_CLI_H
#define DEVIO_CLI_H

#include <getopt.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <time.h>
#include "devio/backend.h"
#include "devio/frontend.h"

/* Subcommands: argv[0] is the subcommand's name.  Return the exit status. */
int cmd_serve(int argc, char **argv);
int cmd_status(int argc, char **argv);
int cmd_list(int argc, char **argv);    /* cli/list.c */
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

/* ---- usage.c: the conventions of every subcommand (docs/cli.md) ---- */
#define CLI_EXIT_USAGE 2  /* 0: done, 1: it failed, 2: a usage error */
/* In every getopt_long table (with "hV" among the short options). */
#define CLI_STD_OPTIONS { "help", no_argument, NULL, 'h' }, { "version", no_argument, NULL, 'V' }
/* getopt_long() with the conventions: -h/--help (usage(stdout), exit 0),
 * -V/--version (exit 0), an unknown option or a missing argument (one
 * line naming it and the hint, exit 2).  Returns any other code, or -1. */
int cli_getopt(const char *cmd, int argc, char **argv, const char *shortopts, const struct option *longopts,
	       void (*usage)(FILE *out));
/* "devio: error: CMD: <message>" and the hint; returns CLI_EXIT_USAGE. */
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The hint alone ("try 'devio CMD --help'"), after the problem was
 * logged; returns CLI_EXIT_USAGE. */
int cli_usage_hint(const char *cmd);
void cli_version(void);
/* "OPT: bad size 'VAL'" or "... is too large" for devio_parse_size()'s r. */
void cli_size_error(const char *cmd, const char *opt, const char *val, int r);

/* One front end to start: a type, its argument and its options. */
struct serve_frontend {
	const struct devio_frontend_type *type;
	const char *arg;
	const void *opts; /* the type's options struct (NULL = defaults) */
	void *state;
};

/* The front ends named on one command line and their options
 * (cli/feopts.c): the getopt table and the usage text are built from the
 * front ends' registrations, so a new front end needs no change here.
 * An option goes to every offered front end that declares it; one that no
 * named front end declares is a warning. */
#define FEOPTS_MAX_TYPES 16
#define FEOPTS_MAX_FRONTENDS 16

struct feopts {
	const struct devio_frontend_type *types[FEOPTS_MAX_TYPES]; /* offered */
	size_t n_types;
	void *opts[FEOPTS_MAX_TYPES]; /* each type's options struct */
	bool named[FEOPTS_MAX_TYPES]; /* started on this command line */
	struct devio_serve_opts serve; /* serving options (--threads) */
	struct serve_frontend fe[FEOPTS_MAX_FRONTENDS];
	size_t n_fe;
	struct option *table; /* the command's own options, then ours */
	const char **names;   /* the front ends' option names, once each */
	bool *given;          /* ... and whether each was given */
	size_t n_names;
};

/* Offer types (NULL-terminated) and the command's own getopt options
 * (their val below FEOPTS_CODE_BASE; NULL if none).  0 or -errno. */
#define FEOPTS_CODE_BASE 0x1000
int feopts_init(struct feopts *f, const struct devio_frontend_type *const *types, const struct option *own);
/* A getopt_long code and its argument: 0 when handled, 1 when it is not
 * a front end's or serving option (the command's own), -EINVAL (logged). */
int feopts_parse(struct feopts *f, int code, const char *val);
/* What a command line would do: start type at arg; --name [val]. */
int feopts_add(struct feopts *f, const struct devio_frontend_type *type, const char *arg);
int feopts_set(struct feopts *f, const char *name, const char *val);
/* After the last option: hand each front end its options, warn about
 * options no named front end takes. */
void feopts_finish(struct feopts *f);
/* "--nbd, --fuse or --ublk": the offered front ends (that declare the
 * option name, unless NULL). */
void feopts_list(const struct feopts *f, const char *name, char *out, size_t outlen);
/* "  --fuse MOUNTPOINT  ..." with each front end's options under it; the
 * serving options. */
void feopts_usage_frontends(const struct feopts *f, FILE *out);
void feopts_usage_serving(FILE *out);
void feopts_free(struct feopts *f);

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

/* a and b (a may be NULL) name the same file: same device and inode,
 * also where one is the URI of a devio server on this machine serving
 * that file (what `devio status` says). */
bool cli_same_file(const char *a, const char *b);
/* s is a server URI or ram:, not a path. */
bool cli_is_uri(const char *s);
/* path created (or truncated) as a sparse file of size bytes: 0 or the
 * error, logged. */
int cli_create_sparse(const char *cmd, const char *path, uint64_t size);

/* ---- describe.c: JSON and text for what the commands find ---- */
typedef struct json_t json_t;
/* obj[key] = s as JSON text; bytes that are not UTF-8 become U+FFFD
 * there, and then obj[key + "_hex"] holds the exact bytes in hex. */
void cli_json_set_text(json_t *obj, const char *key, const char *s);
/* s as JSON text, what is not UTF-8 as U+FFFD. */
json_t *cli_json_text(const char *s);
/* s for a terminal: control bytes, backslash and what is not UTF-8 as
 * \n, \\ and \xNN. */
const char *cli_text_escape(const char *s, char *out, size_t outlen);
/* Each layer from the top: {layer, size, description}. */
json_t *cli_json_stack(struct devio_backend *b);
/* "qcow2", "cow over raw": the layers from the top, then raw when no
 * format layer reads the store. */
void cli_format_name(struct devio_backend *b, char *out, size_t outlen);

/* Where running servers describe themselves for `devio status`. */
#define DEVIO_RUN_DIR "/run/devio"

/* ---- status.c: what a server publishes for `devio status` ---- */
/* Write DEVIO_RUN_DIR/PID.json: pid, uid, start time, each export with
 * its stack, each front end with its address, connections and devices. */
void cli_status_publish(struct devio_server *srv, struct serve_frontend *fe, size_t n, time_t started);
/* Every live server's document, as `devio status --json` lists them. */
json_t *cli_status_servers(void);
/* The server (a new reference, or NULL) with a front end at uri
 * (nbd://, nbd+unix://, devio://, devio+unix://): for `devio info`. */
json_t *cli_status_find_uri(const char *uri);
/* The local file a running devio server serves at uri (malloc'd), or
 * NULL (no such server, not a file, or under an overlay). */
char *cli_status_local_file(const char *uri);
/* A server's document as `devio status` prints it. */
void cli_status_print(json_t *server);
/* ---- privdrop.c: --user USER[:GROUP] (docs/security.md) ---- */
struct privdrop {
	bool set;
	bool only_group;        /* USER:GROUP: that group alone; USER: the user's groups */
	char name[256];
	uid_t uid;
	gid_t gid;
};
/* Resolve USER[:GROUP] now (before anything is opened); -EINVAL, logged. */
int privdrop_parse(const char *val, struct privdrop *p);
/* Refuse front ends whose teardown needs root (--fuse, --ublk); logged. */
int privdrop_check_frontends(const struct privdrop *p, const struct serve_frontend *fe, size_t n);
/* Drop to the user for good and check it; 0 or -errno (logged). */
int privdrop_apply(const struct privdrop *p);

/* ---- daemon.c: running as a service (docs/service.md) ---- */
struct daemon_opts {
	bool fork;              /* --fork (--foreground: false, the default) */
	bool exit_with_parent;  /* --exit-with-parent */
	const char *pidfile;    /* --pidfile FILE */
	const char *run;        /* --run CMD */
	const char *log;        /* --log stderr|syslog|journal|FILE */
	const char *user;       /* --user USER[:GROUP] */
	struct privdrop priv;   /* user, resolved by daemon_check() */
};
/* getopt codes of daemon_options, below FEOPTS_CODE_BASE */
#define DAEMON_CODE_BASE 0x800
extern const struct option daemon_options[];
/* own + daemon_options in one getopt table (free it); NULL if no memory. */
struct option *daemon_merge_options(const struct option *own);
/* 0 when handled, 1 when code is not a daemon option. */
int daemon_parse(struct daemon_opts *d, int code, const char *val);
/* Options that do not go together: -EINVAL (logged; a usage error). */
int daemon_check(struct daemon_opts *d);
void daemon_usage(FILE *out);
/* Before the exports are opened: --fork (the parent waits here for the
 * child to be ready), --log, --exit-with-parent.  0: go on serving;
 * 1: return *exit_status now (the --fork parent, or a bad --log). */
int daemon_start(struct daemon_opts *d, int *exit_status);
/* serve_run(): SIGHUP reopens the log (instead of stopping). */
void daemon_signals(void);
/* Every front end is ready: the pid file, --run CMD with env (NAME,
 * VALUE pairs), the --fork parent told.  0 or -errno (logged).  Nothing
 * without daemon_start() (the ImDisk command line). */
int daemon_ready(const char *const env[][2], size_t n_env);
/* Before any front end starts: refuse what --user cannot serve. */
int daemon_check_frontends(const struct serve_frontend *fe, size_t n);
/* While serving: handle SIGHUP; the --run command's exit status once it
 * has exited, else -1. */
int daemon_tick(void);
/* Stopping: end the --run command, remove the pid file; the command's
 * exit status or -1. */
int daemon_stop(void);

/* ---- runstate.c: which servers run, identified by more than a pid ---- */
/* A server's entry in DEVIO_RUN_DIR: PID.status (what it serves, with its
 * start time) and PID.lock, flock()ed by the server for its whole life. */
struct run_server {
	pid_t pid;
	unsigned long long start;   /* /proc/PID/stat starttime; 0 if the file has none */
	char dir[4096];             /* the directory of its entry */
	char status_path[4096 + 32];
	bool alive;                 /* false: a server that died (its entry is removed after fn) */
};
/* Where this process publishes its entry: DEVIO_RUN_DIR for root (and
 * whoever may write it), else $XDG_RUNTIME_DIR/devio. */
const char *runstate_dir(void);
/* The server's side: take PID.lock (held until exit). 0 or -errno. */
int runstate_lock(void);
/* Remove this server's PID.lock and PID.status. */
void runstate_unlock(void);
/* /proc/PID/stat field 22 (clock ticks after boot); 0 if no such process. */
unsigned long long runstate_start_time(pid_t pid);
/* Call fn for every entry, live or dead (a dead one is removed after fn
 * saw it); fn returns true to stop. */
void runstate_each(bool (*fn)(const struct run_server *s, void *ctx), void *ctx);
/* Is s still that very server?  (Lock held, same start time, a devio.) */
bool runstate_alive(const struct run_server *s);

#endif
