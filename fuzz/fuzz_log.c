/* fuzz_log.c - a quiet stand-in for lib/log.c, linked into the fuzz targets
 * whose code under test refuses hostile input with a logged error on
 * nearly every run (megabytes of lines per 20 s would bury libFuzzer's own
 * output).  The targets link the static library, so these definitions
 * stand in for all of lib/log.c's, which is then never pulled in: messages
 * are dropped unless FUZZ_VERBOSE is set in the environment. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include "devio/util.h"

static enum devio_log_level fuzz_log_level = DEVIO_LOG_ERROR;
static int fuzz_verbose = -1;

void devio_log_set_level(enum devio_log_level level) { fuzz_log_level = level; }
enum devio_log_level devio_log_get_level(void) { return fuzz_log_level; }
unsigned long devio_log_errors(void) { return 0; } /* nothing is counted: nothing is shown */
void devio_log_quiet(bool on) { (void)on; }

void devio_log(enum devio_log_level level, const char *fmt, ...)
{
	va_list ap;

	if (fuzz_verbose < 0)
		fuzz_verbose = getenv("FUZZ_VERBOSE") != NULL;
	if (!fuzz_verbose || level > fuzz_log_level)
		return;
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}
