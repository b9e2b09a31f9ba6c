/* usage.c - the command line conventions every subcommand shares
 * (docs/cli.md): -h/--help prints the command's own usage to stdout and
 * exits 0, -V/--version prints the version and exits 0, and a usage error
 * is one line naming the problem plus "try 'devio CMD --help'" on stderr,
 * exit status 2.  Front ends' options are parsed into the same getopt
 * loop (cli/feopts.c), so options added there inherit all of this. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cli.h"
#include "devio/util.h"

void cli_version(void)
{
	printf("devio %s\n", DEVIO_VERSION);
}

int cli_usage_hint(const char *cmd)
{
	fprintf(stderr, "try 'devio%s%s --help'\n", cmd ? " " : "", cmd ? cmd : "");
	return CLI_EXIT_USAGE;
}

int cli_usage_error(const char *cmd, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	devio_err("%s%s%s", cmd ? cmd : "", cmd ? ": " : "", msg);
	return cli_usage_hint(cmd);
}

void cli_size_error(const char *cmd, const char *opt, const char *val, int r)
{
	if (r == -ERANGE)
		devio_err("%s%s%s: '%s' is too large (at most 16E - 1 bytes)", cmd ? cmd : "", cmd ? ": " : "", opt, val);
	else
		devio_err("%s%s%s: bad size '%s'", cmd ? cmd : "", cmd ? ": " : "", opt, val);
}

static bool usage_known(const struct option *longopts, const char *name, size_t len)
{
	for (; longopts && longopts->name; longopts++)
		if (strlen(longopts->name) == len && !strncmp(longopts->name, name, len))
			return true;
	return false;
}

/* The option getopt stopped at, as the user wrote it ("--foo", "-x"). */
static void usage_bad_option(const char *cmd, char **argv, const struct option *longopts, bool missing)
{
	const char *arg = optind > 0 ? argv[optind - 1] : "";
	int n = (int)strcspn(arg, "=");

	if (optopt && optopt < 0x100 && (strncmp(arg, "--", 2) || !arg[2])) /* short, maybe inside "-abc" */
		cli_usage_error(cmd, missing ? "option -%c needs an argument" : "unknown option -%c", optopt);
	else if (missing)
		cli_usage_error(cmd, "option %.*s needs an argument", n, arg);
	else if (arg[n] == '=' && usage_known(longopts, arg + 2, (size_t)n - 2))
		cli_usage_error(cmd, "option %.*s takes no argument", n, arg);
	else
		cli_usage_error(cmd, "unknown option %.*s", n, arg);
}

int cli_getopt(const char *cmd, int argc, char **argv, const char *shortopts, const struct option *longopts,
	       void (*usage)(FILE *out))
{
	char opts[128];
	int c;

	snprintf(opts, sizeof(opts), ":%s", shortopts);
	opterr = 0;
	c = getopt_long(argc, argv, opts, longopts, NULL);
	switch (c) {
	case 'h':
		usage(stdout);
		exit(0);
	case 'V':
		cli_version();
		exit(0);
	case '?':
	case ':':
		usage_bad_option(cmd, argv, longopts, c == ':');
		exit(CLI_EXIT_USAGE);
	default:
		return c;
	}
}
