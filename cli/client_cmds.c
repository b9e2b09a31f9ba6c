/* client_cmds.c - devio info/cat/write/copy (not written yet). */
#include "cli.h"
int cmd_info(int argc, char **argv) { (void)argc; (void)argv; return 1; }
int cmd_cat(int argc, char **argv) { (void)argc; (void)argv; return 1; }
int cmd_write(int argc, char **argv) { (void)argc; (void)argv; return 1; }
int cmd_copy(int argc, char **argv) { (void)argc; (void)argv; return 1; }
