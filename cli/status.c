/* status.c - `devio status`: what every running `devio serve` on this
 * machine serves, and through which transports (from DEVIO_RUN_DIR; the
 * entries of servers that died are removed, cli/runstate.c). */
#include <stdio.h>
#include "cli.h"

static bool status_print(const struct run_server *s, void *ctx)
{
	int *found = ctx;
	char line[1024];
	FILE *f;

	if (!s->alive)
		return false;
	f = fopen(s->status_path, "re");
	if (!f)
		return false;
	if ((*found)++)
		putchar('\n');
	while (fgets(line, sizeof(line), f))
		fputs(line, stdout);
	fclose(f);
	return false;
}

static void status_usage(FILE *out)
{
	fprintf(out, "usage: devio status\n");
}

int cmd_status(int argc, char **argv)
{
	int found = 0;

	static const struct option opts[] = { CLI_STD_OPTIONS, { 0 } };
	int c;

	optind = 1;
	while ((c = cli_getopt("status", argc, argv, "hV", opts, status_usage)) != -1)
		;
	if (optind != argc)
		return cli_usage_error("status", "unexpected argument '%s'", argv[optind]);
	runstate_each(status_print, &found);
	if (!found)
		printf("no devio server running\n");
	return 0;
}
