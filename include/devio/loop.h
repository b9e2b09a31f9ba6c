/* loop.h - attach a file to a loop device (/dev/loop-control and
 * LOOP_CONFIGURE) with direct I/O, a chosen logical block size and
 * autoclear, and detach it again.  Used by the --fuse front end's --loop. */
#ifndef DEVIO_LOOP_H
#define DEVIO_LOOP_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct devio_loop {
	int fd;           /* held open: with autoclear the device goes away when it closes */
	int number;
	char path[32];    /* "/dev/loopN" */
	bool direct_io;   /* the kernel accepted direct I/O */
};

/* Attach file (opened read-only when readonly) to a free loop device with
 * direct I/O on, block_size-byte logical blocks (0 = 512) and autoclear.
 * 0 or -errno (logged). */
int devio_loop_attach(const char *file, bool readonly, uint32_t block_size, struct devio_loop *out);
/* Detach (LOOP_CLR_FD) and close; the kernel finishes it once the last
 * opener is gone.  0 or -errno. */
int devio_loop_detach(struct devio_loop *lo);

#ifdef __cplusplus
}
#endif
#endif
