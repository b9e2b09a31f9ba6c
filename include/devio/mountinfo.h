/* mountinfo.h - which mount sits on a path, from /proc/self/mountinfo
 * (lib/mountinfo.c), without touching the file system there (a hung or
 * dead FUSE server would block or fail a stat).  The FUSE front end uses
 * it to refuse a mount point that is already one and to unmount its own
 * mount by identity; `devio detach` to find and clean a dead mount. */
#ifndef DEVIO_MOUNTINFO_H
#define DEVIO_MOUNTINFO_H

#include <limits.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

struct devio_mount {
	int id, parent;          /* mount IDs */
	unsigned major, minor;   /* st_dev of the file system; a FUSE connection's number is minor */
	char fstype[64];         /* "fuse.devio", "ext4", ... */
	char source[256];
};

/* The topmost mount at mount point path (absolute, no trailing slash):
 * 1 with *out filled, 0 if path is not a mount point, -errno. */
int devio_mount_top(const char *path, struct devio_mount *out);
/* The same from another file in mountinfo's format (tests). */
int devio_mount_top_in(const char *mountinfo, const char *path, struct devio_mount *out);
/* The mount with this ID wherever it is now (moved, or its parent
 * renamed): 1 with *out and its mount point, 0 if gone, -errno.  *top
 * tells whether it is the topmost there (nothing stacked on it). */
int devio_mount_by_id(int id, struct devio_mount *out, char *point, size_t pointlen, bool *top);

#ifdef __cplusplus
}
#endif
#endif
