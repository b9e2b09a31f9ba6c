/* imdisk.c - ImDisk's devio command line (not written yet). */
#include "cli.h"
int cmd_imdisk(int argc, char **argv) { (void)argc; (void)argv; return 2; }
