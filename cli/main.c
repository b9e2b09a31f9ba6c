/* main.c - the `devio` command: dispatches to subcommands, and falls back
 * to ImDisk's devio command line when the first word is not one. */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include "cli.h"
#include "devio/util.h"

static const struct {
	const char *name;
	int (*fn)(int, char **);
	const char *help;
} main_commands[] = {
	{ "serve", cmd_serve, "serve SOURCE FRONTEND... [options]   serve an image (devio serve --help)" },
	{ "info", cmd_info, "info URI|IMAGE [--json]  format, size, allocation, flags and layers of an export" },
	{ "cat", cmd_cat, "cat URI|IMAGE [--offset N] [--length N]   export bytes to stdout" },
	{ "write", cmd_write, "write URI|IMAGE [--offset N]   stdin into the export" },
	{ "copy", cmd_copy, "copy SRC DST [--resume-from N]   copy between images and servers" },
	{ "convert", cmd_convert, "convert [-O raw|vhd|qcow2] [-p] SRC DST   a new sparse image from any source" },
	{ "attach", cmd_attach, "attach URI --fuse DIR [--loop] | --nbd-device   a local device for a server" },
	{ "detach", cmd_detach, "detach DIR|/dev/loopN|/dev/nbdN" },
	{ "status", cmd_status, "status [--json]          every running server: sources, stack, front ends, devices" },
	{ "list", cmd_list, "list URI                 a server's exports (NBD_OPT_LIST)" },
};

static void main_usage(FILE *out)
{
	fprintf(out, "usage: devio COMMAND [ARGS]\n\ncommands:\n");
	for (size_t i = 0; i < sizeof(main_commands) / sizeof(main_commands[0]); i++)
		fprintf(out, "  devio %s\n", main_commands[i].help);
	fprintf(out, "\nFRONTEND (repeatable, with its argument):");
	for (size_t i = 0; devio_frontends[i]; i++)
		fprintf(out, " --%s%s", devio_frontends[i]->option, devio_frontends[i + 1] ? "," : "\n");
	fprintf(out, "\nImDisk's devio command line also works:\n"
		     "  devio [-r] tcp-port|commdev diskdev [blocks] [offset] [alignm] [buffersize]\n"
		     "  devio [-r] tcp-port|commdev diskdev [partitionnumber] [alignm] [buffersize]\n"
		     "\nSOURCE: an image file or block device, or ram:SIZE (e.g. ram:4G)\n"
		     "URI: devio://HOST:PORT, devio+unix:///PATH, nbd://HOST[:PORT][/EXPORT],\n"
		     "     nbd+unix:///EXPORT?socket=PATH; over TLS nbds://, nbds+unix://, devio+tls:// (man devio)\n"
		     "\nEvery command takes -h/--help and -V/--version.  Exit status: 0 done, 1 failed,\n"
		     "2 usage error (docs/cli.md).\n");
}

/* One word that is no command: ImDisk's command line needs two words,
 * so this is no ImDisk one either (unless it looks like ImDisk's port or
 * device, then ImDisk's usage answers it). */
static bool main_unknown_command(int argc, char **argv)
{
	return argc == 2 && argv[1][0] != '-' && !strpbrk(argv[1], "/:") &&
	       strspn(argv[1], "0123456789") != strlen(argv[1]);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return cli_usage_error(NULL, "no command given");
	if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
		main_usage(stdout);
		return 0;
	}
	if (!strcmp(argv[1], "-V") || !strcmp(argv[1], "--version") || !strcmp(argv[1], "version")) {
		cli_version();
		return 0;
	}
	for (size_t i = 0; i < sizeof(main_commands) / sizeof(main_commands[0]); i++)
		if (!strcmp(argv[1], main_commands[i].name))
			return main_commands[i].fn(argc - 1, argv + 1);
	if (main_unknown_command(argc, argv))
		return cli_usage_error(NULL, "unknown command '%s'", argv[1]);
	return cmd_imdisk(argc, argv);
}
