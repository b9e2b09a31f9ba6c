/* attach.c - devio attach/detach (not written yet). */
#include "cli.h"
int cmd_attach(int argc, char **argv) { (void)argc; (void)argv; return 1; }
int cmd_detach(int argc, char **argv) { (void)argc; (void)argv; return 1; }
