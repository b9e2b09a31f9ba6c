/* vmtool.c - small helper for the guest scenarios (tests/vm): reaches the
 * project's kernel-device helpers directly, so a scenario does not depend
 * on how the `devio` command line wires them up.
 *
 *   vmtool ublk-del DEV           STOP_DEV + DEL_DEV (e.g. after kill -9)
 *   vmtool nbd-attach URI --nbd-device [/dev/nbdN] ...   attach_nbd_device()
 *   vmtool nbd-detach /dev/nbdN   detach_nbd_device()
 */
#include <stdio.h>
#include <string.h>
#include "cli.h"
#include "devio/ublk.h"

int main(int argc, char **argv)
{
	unsigned id;

	if (argc >= 3 && !strcmp(argv[1], "ublk-del")) {
		if (devio_ublk_parse_dev(argv[2], &id)) {
			fprintf(stderr, "vmtool: bad ublk device '%s'\n", argv[2]);
			return 2;
		}
		return devio_ublk_delete(id) ? 1 : 0;
	}
	if (argc >= 3 && !strcmp(argv[1], "nbd-attach")) {
		argv[1] = "attach";
		return attach_nbd_device(argc - 1, argv + 1);
	}
	if (argc == 3 && !strcmp(argv[1], "nbd-detach"))
		return detach_nbd_device(argv[2]);
	fprintf(stderr, "usage: vmtool ublk-del DEV | nbd-attach URI --nbd-device [DEV] | nbd-detach DEV\n");
	return 2;
}
