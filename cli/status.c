/* status.c - `devio status`: what every running `devio serve` on this
 * machine serves, and through which transports (from DEVIO_RUN_DIR). */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "cli.h"

int cmd_status(int argc, char **argv)
{
	DIR *d;
	struct dirent *de;
	int found = 0;

	(void)argv;
	if (argc > 1) {
		fprintf(stderr, "usage: devio status\n");
		return 2;
	}
	d = opendir(DEVIO_RUN_DIR);
	while (d && (de = readdir(d))) {
		char path[512], line[1024];
		FILE *f;
		int pid = atoi(de->d_name);

		const char *dot = strchr(de->d_name, '.');

		if (pid <= 0 || !dot || strcmp(dot, ".status"))
			continue;
		snprintf(path, sizeof(path), DEVIO_RUN_DIR "/%s", de->d_name);
		if (kill(pid, 0) && errno == ESRCH) {
			unlink(path); /* left by a server that died */
			continue;
		}
		f = fopen(path, "r");
		if (!f)
			continue;
		if (found++)
			putchar('\n');
		while (fgets(line, sizeof(line), f))
			fputs(line, stdout);
		fclose(f);
	}
	if (d)
		closedir(d);
	if (!found)
		printf("no devio server running\n");
	return 0;
}
