/* util.c - size parsing, clocks and writing a control file. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include "devio/util.h"

/* Digits of base 10 (or 16 after "0x"): a leading zero is no octal
 * prefix, "010" is ten.  *end: the first byte after them. */
static int util_digits(const char *s, uint64_t *out, const char **end)
{
	unsigned base = 10;
	uint64_t v = 0;
	const char *p = s;

	if (!s || !isdigit((unsigned char)*s))
		return -EINVAL;
	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X') && isxdigit((unsigned char)p[2])) {
		base = 16;
		p += 2;
	}
	for (; base == 10 ? isdigit((unsigned char)*p) : isxdigit((unsigned char)*p); p++) {
		unsigned d = isdigit((unsigned char)*p) ? (unsigned)(*p - '0') : (unsigned)(tolower((unsigned char)*p) - 'a' + 10);

		if (v > (UINT64_MAX - d) / base)
			return -ERANGE;
		v = v * base + d;
	}
	*out = v;
	*end = p;
	return 0;
}

int devio_parse_u64(const char *s, uint64_t *out)
{
	const char *end;
	uint64_t v;
	int r = util_digits(s, &v, &end);

	if (r)
		return r;
	if (*end)
		return -EINVAL;
	*out = v;
	return 0;
}

/* ".5" after the integer part: the fraction's digits as a number and its
 * scale (10^digits); at most 18 digits count, more are dropped. */
static const char *util_fraction(const char *p, uint64_t *frac, uint64_t *scale)
{
	*frac = 0;
	*scale = 1;
	if (*p != '.' || !isdigit((unsigned char)p[1]))
		return p;
	for (p++; isdigit((unsigned char)*p); p++)
		if (*scale < 1000000000000000000ull) {
			*frac = *frac * 10 + (uint64_t)(*p - '0');
			*scale *= 10;
		}
	return p;
}

int devio_parse_size(const char *s, uint64_t *out)
{
	static const char units[] = "KMGTPE";
	const char *end, *u;
	uint64_t v, frac, scale, mul = 1;
	unsigned __int128 total;
	int r = util_digits(s, &v, &end);

	if (r)
		return r;
	if (end[0] == '.' && (end - s < 2 || tolower((unsigned char)s[1]) != 'x'))
		end = util_fraction(end, &frac, &scale);
	else
		frac = 0, scale = 1;
	if (*end) {
		u = strchr(units, toupper((unsigned char)*end));
		if (!u)
			return -EINVAL;
		mul <<= 10u * (unsigned)(u - units + 1);
		end++;
		if (!strcasecmp(end, "iB"))
			end += 2;
		else if (!strcasecmp(end, "B"))
			end += 1;
		if (*end)
			return -EINVAL;
	}
	total = (unsigned __int128)v * mul + (unsigned __int128)frac * mul / scale;
	if ((unsigned __int128)frac * mul % scale)
		return -EINVAL; /* "1.5" bytes, "0.3K": not a whole number of bytes */
	if (total > UINT64_MAX)
		return -ERANGE;
	*out = (uint64_t)total;
	return 0;
}

uint64_t devio_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int devio_write_ctl(const char *path, const char *val)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC), r = 0;

	if (fd < 0)
		return -errno;
	if (write(fd, val, strlen(val)) < 0)
		r = -errno;
	close(fd);
	return r;
}
