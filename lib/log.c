/* log.c - one-line messages to stderr with a level filter.  Every message
 * is written with a single write(2) so lines from threads don't mix; each
 * thread counts the errors it logged (devio_log_errors). */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "devio/util.h"

static enum devio_log_level log_level = DEVIO_LOG_INFO;
static __thread unsigned long log_errors;

unsigned long devio_log_errors(void) { return log_errors; }

void devio_log_set_level(enum devio_log_level level) { log_level = level; }
enum devio_log_level devio_log_get_level(void) { return log_level; }

void devio_log(enum devio_log_level level, const char *fmt, ...)
{
	static const char *const prefix[] = { "error: ", "warning: ", "", "debug: " };
	char line[1024];
	va_list ap;
	int n;

	if (level > log_level)
		return;
	if (level == DEVIO_LOG_ERROR)
		log_errors++;
	n = snprintf(line, sizeof(line), "devio: %s", prefix[level]);
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	if (write(STDERR_FILENO, line, (size_t)n) < 0)
		return;
}
