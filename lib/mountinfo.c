/* mountinfo.c - mounts at a path from /proc/self/mountinfo
 * (include/devio/mountinfo.h).  A line is
 *   ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
 * with space, tab, newline and backslash in paths written as \ooo. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "devio/mountinfo.h"

#define MOUNTINFO_MAX 64 /* mounts stacked on one path that we look at */

/* Decode \ooo escapes in place. */
static void mountinfo_unescape(char *s)
{
	char *w = s;

	for (; *s; s++) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' && s[3] >= '0' &&
		    s[3] <= '7') {
			*w++ = (char)((s[1] - '0') * 64 + (s[2] - '0') * 8 + (s[3] - '0'));
			s += 3;
		} else {
			*w++ = *s;
		}
	}
	*w = '\0';
}

/* Parse one line; 1 if its mount point is path (any, when path is NULL;
 * then it is copied to point). */
static int mountinfo_parse(char *line, const char *path, struct devio_mount *m, char *point, size_t pointlen)
{
	char *save = NULL, *f[6], *dash;

	dash = strstr(line, " - ");
	if (!dash)
		return 0;
	*dash = '\0';
	for (int i = 0; i < 6; i++)
		if (!(f[i] = strtok_r(i ? NULL : line, " ", &save)))
			return 0;
	mountinfo_unescape(f[4]);
	if (path && strcmp(f[4], path))
		return 0;
	if (point)
		snprintf(point, pointlen, "%s", f[4]);
	memset(m, 0, sizeof(*m));
	m->id = atoi(f[0]);
	m->parent = atoi(f[1]);
	if (sscanf(f[2], "%u:%u", &m->major, &m->minor) != 2)
		return 0;
	save = NULL;
	f[0] = strtok_r(dash + 3, " \n", &save);
	f[1] = f[0] ? strtok_r(NULL, " \n", &save) : NULL;
	snprintf(m->fstype, sizeof(m->fstype), "%s", f[0] ? f[0] : "");
	if (f[1])
		mountinfo_unescape(f[1]);
	snprintf(m->source, sizeof(m->source), "%s", f[1] ? f[1] : "");
	return 1;
}

/* Every mount at path, in the file's order; their number or -errno. */
static int mountinfo_at(const char *file, const char *path, struct devio_mount *out, int max)
{
	FILE *f = fopen(file, "re");
	char *line = NULL;
	size_t cap = 0;
	int n = 0;

	if (!f)
		return -errno;
	while (n < max && getline(&line, &cap, f) > 0)
		n += mountinfo_parse(line, path, &out[n], NULL, 0);
	free(line);
	fclose(f);
	return n;
}

/* The one of ms[] that no other mount at the same path sits on. */
static int mountinfo_top_index(const struct devio_mount *ms, int n)
{
	for (int i = n - 1; i >= 0; i--) {
		bool covered = false;

		for (int j = 0; j < n && !covered; j++)
			covered = j != i && ms[j].parent == ms[i].id;
		if (!covered)
			return i;
	}
	return -1;
}

int devio_mount_top_in(const char *file, const char *path, struct devio_mount *out)
{
	struct devio_mount ms[MOUNTINFO_MAX];
	int n = mountinfo_at(file, path, ms, MOUNTINFO_MAX), i;

	if (n <= 0)
		return n;
	i = mountinfo_top_index(ms, n);
	if (i < 0)
		return 0;
	*out = ms[i];
	return 1;
}

int devio_mount_top(const char *path, struct devio_mount *out)
{
	return devio_mount_top_in("/proc/self/mountinfo", path, out);
}

/* The mount with this ID, wherever it is now: 1 and its mount point, 0, -errno. */
static int mountinfo_find_id(int id, struct devio_mount *out, char *point, size_t pointlen)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	char *line = NULL;
	size_t cap = 0;
	int found = 0;

	if (!f)
		return -errno;
	while (!found && getline(&line, &cap, f) > 0)
		found = mountinfo_parse(line, NULL, out, point, pointlen) && out->id == id;
	free(line);
	fclose(f);
	return found;
}

int devio_mount_by_id(int id, struct devio_mount *out, char *point, size_t pointlen, bool *top)
{
	struct devio_mount ms[MOUNTINFO_MAX];
	int r = mountinfo_find_id(id, out, point, pointlen), n;

	if (r <= 0)
		return r;
	n = mountinfo_at("/proc/self/mountinfo", point, ms, MOUNTINFO_MAX);
	for (int i = 0; i < n; i++)
		if (ms[i].id == id)
			*top = mountinfo_top_index(ms, n) == i;
	return 1;
}
