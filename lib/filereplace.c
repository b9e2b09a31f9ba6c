/* filereplace.c - a file replaced whole: its new bytes go to a temporary
 * name next to it (same folder, so the rename is atomic), are synced,
 * and the file is renamed over the old name, then the folder is synced
 * so the new name is durable too.  A failure at any step leaves the old
 * file (or no file) as it was and no temporary file behind.  Used by the
 * image formats that make a new image (qcow2, vhd) and by `devio
 * convert`.  Nothing is logged here: the caller, who knows what the file
 * is, says what failed.  A symbolic link at the name is followed, as
 * open(O_CREAT) would: its target is replaced and the link stays. */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>
#include "devio/util.h"

#define FILEREPLACE_SUFFIX ".XXXXXX" /* the temporary's: the target's name and this */

/* A new file PATH.XXXXXX (six random letters or digits, as mkstemp's) made
 * with O_EXCL and MODE, so the kernel applies the umask: no umask() call,
 * which would change it for every thread of a running server, and no
 * mkstemp, whose descriptor a concurrently exec'd child would inherit. */
static int filereplace_open_tmp(const char *path, unsigned mode, char *tmp)
{
	static const char set[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
	char *x = tmp + strlen(path) + 1; /* after the suffix's dot */

	for (int tries = 0; tries < 100; tries++) {
		unsigned char rnd[6];
		int fd;

		if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd))
			return -EIO;
		for (size_t i = 0; i < sizeof(rnd); i++)
			x[i] = set[rnd[i] % (sizeof(set) - 1)];
		fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, (mode_t)mode & 07777);
		if (fd >= 0 || errno != EEXIST)
			return fd >= 0 ? fd : -errno;
	}
	return -EEXIST;
}

/* The next name on a link's way: its text, relative to the link's folder. */
static char *filereplace_link_step(const char *link)
{
	char text[PATH_MAX], *dir, *next = NULL;
	ssize_t n = readlink(link, text, sizeof(text) - 1);

	if (n < 0)
		return NULL;
	text[n] = '\0';
	if (text[0] == '/')
		return strdup(text);
	dir = strdup(link);
	if (dir && asprintf(&next, "%s/%s", dirname(dir), text) < 0)
		next = NULL;
	free(dir);
	return next;
}

/* The file to replace for path (malloc'd): path itself, or where the
 * symbolic links there lead, even to a name not made yet; NULL with
 * errno set (ELOOP for a link that goes round). */
static char *filereplace_target(const char *path)
{
	char *cur = strdup(path);
	struct stat st;

	for (int hops = 0; cur; hops++) {
		char *next;

		if (lstat(cur, &st) || !S_ISLNK(st.st_mode))
			return cur;
		if (hops == 40) {
			free(cur);
			errno = ELOOP;
			return NULL;
		}
		next = filereplace_link_step(cur);
		free(cur);
		cur = next;
	}
	return NULL;
}

int devio_file_replace_begin(const char *path, unsigned mode, char **tmp)
{
	char *target = filereplace_target(path);
	int fd;

	*tmp = NULL;
	if (!target)
		return errno ? -errno : -ENOMEM;
	if (asprintf(tmp, "%s" FILEREPLACE_SUFFIX, target) < 0) {
		*tmp = NULL;
		free(target);
		return -ENOMEM;
	}
	fd = filereplace_open_tmp(target, mode, *tmp);
	free(target);
	if (fd >= 0)
		return fd;
	free(*tmp);
	*tmp = NULL;
	return fd;
}

/* The folder that holds path, synced after a rename into it. */
static void filereplace_sync_dir(const char *path)
{
	char *copy = strdup(path);
	int fd;

	if (copy && (fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC)) >= 0) {
		(void)fsync(fd);
		close(fd);
	}
	free(copy);
}

int devio_file_replace_end(const char *tmp, int r)
{
	/* the name _begin resolved (the temporary's less its suffix), not the
	 * caller's path again: a link changed meanwhile must not send the
	 * rename elsewhere */
	size_t n = strlen(tmp), suffix = strlen(FILEREPLACE_SUFFIX);
	char *target = r || n <= suffix ? NULL : strndup(tmp, n - suffix);

	if (!r && !target)
		r = n <= suffix ? -EINVAL : -ENOMEM;
	if (!r && rename(tmp, target))
		r = -errno;
	if (r) {
		unlink(tmp);
		free(target);
		return r;
	}
	filereplace_sync_dir(target);
	free(target);
	return 0;
}

int devio_file_remove(const char *path)
{
	char *target = filereplace_target(path);
	int r = 0;

	if (!target)
		return errno ? -errno : -ENOMEM;
	if (unlink(target))
		r = -errno;
	free(target);
	return r;
}

int devio_file_replace(const char *path, unsigned mode, int (*write_fn)(int fd, void *ctx), void *ctx)
{
	char *tmp;
	int fd = devio_file_replace_begin(path, mode, &tmp), r;

	if (fd < 0)
		return fd;
	r = write_fn(fd, ctx);
	if (!r && fsync(fd))
		r = -errno;
	if (close(fd) && !r)
		r = -errno;
	r = devio_file_replace_end(tmp, r);
	free(tmp);
	return r;
}
