/* ublk.h - helpers of the ublk front end (frontends/ublk.c) that other
 * parts of the project use: the check that turns a descriptor the kernel
 * wrote into a request (unit-tested on crafted descriptors), and removing
 * a ublk device left behind by a server that died. */
#ifndef DEVIO_UBLK_H
#define DEVIO_UBLK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "request.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Decode one ublk I/O descriptor (op_flags, nr_sectors, start_sector as
 * the driver wrote them) for a device of dev_sectors 512-byte sectors whose
 * per-request buffers hold max_io_bytes.  Fills req->op, flags, offset and
 * length.  Returns 0, -EOPNOTSUPP for an op we do not serve, or -EINVAL
 * when the range is empty, overflows, leaves the device or exceeds the
 * buffer. */
int devio_ublk_decode(uint32_t op_flags, uint32_t nr_sectors, uint64_t start_sector,
		      uint64_t dev_sectors, uint32_t max_io_bytes, struct devio_request *req);

/* Stop and delete ublk device dev_id (from /dev/ublkbN or /dev/ublkcN)
 * through /dev/ublk-control, e.g. after its server was killed.  0 or
 * -errno (logged). */
int devio_ublk_delete(unsigned dev_id);

/* The feature bits of GET_FEATURES by name ("user-copy auto-buf-reg ..."),
 * unknown bits as "bit-N", into buf (always terminated); returns buf. */
const char *devio_ublk_feature_names(uint64_t features, char *buf, size_t len);

/* How a request's data moves between the driver and the backend. */
enum devio_ublk_copy {
	DEVIO_UBLK_COPY_KERNEL, /* the driver copies into our buffer (classic) */
	DEVIO_UBLK_COPY_USER,   /* pread/pwrite on /dev/ublkcN (UBLK_F_USER_COPY) */
	/* Zero copy: the request's pages are a fixed buffer of the queue's
	 * ring and the backend's I/O on that ring reads or writes them
	 * (DEVIO_BUF_FIXED).  ZERO registers them with REGISTER_IO_BUF and
	 * unregisters them before the commit (UBLK_F_SUPPORT_ZERO_COPY,
	 * 6.15+); AUTO_BUF_REG has the driver register them before it hands
	 * the request over and unregister them on the commit
	 * (UBLK_F_AUTO_BUF_REG, 6.16+): no extra command. */
	DEVIO_UBLK_COPY_ZERO,
	DEVIO_UBLK_COPY_AUTO_BUF_REG,
};

/* devio_ublk_pick_copy's want besides a mode: */
#define DEVIO_UBLK_WANT_BEST (-1) /* the best the driver and the backend allow */
#define DEVIO_UBLK_WANT_ZERO (-2) /* the best zero-copy mode */

/* The data path for a driver with these features and a backend stack that
 * takes fixed buffers or not (devio_backend_takes_fixed), in the order
 * auto-buf-reg, zero copy, user copy, kernel copy; or the one wanted.
 * 0, -EOPNOTSUPP when the driver lacks the one wanted, -EINVAL when it
 * is a zero-copy mode and the backend cannot take it. */
int devio_ublk_pick_copy(uint64_t features, int want, bool fixed_ok, enum devio_ublk_copy *out);
/* "user copy", ... for messages; the mode as a word: "user-copy",
 * "kernel-copy", "zero-copy", "auto-buf-reg". */
const char *devio_ublk_copy_name(enum devio_ublk_copy c);
const char *devio_ublk_copy_mode(enum devio_ublk_copy c);

/* Batched commands (UBLK_F_BATCH_IO): want DEVIO_UBLK_BATCH_AUTO (where
 * the driver offers them and the opcodes are ioctl-encoded, which they
 * only exist as), _ON (-EOPNOTSUPP where not) or _OFF (per-tag
 * FETCH_REQ/COMMIT_AND_FETCH_REQ).  0 and *out, or -EOPNOTSUPP. */
enum { DEVIO_UBLK_BATCH_AUTO, DEVIO_UBLK_BATCH_ON, DEVIO_UBLK_BATCH_OFF };
int devio_ublk_pick_batch(uint64_t features, bool ioctl_encode, int want, bool *out);

/* The tags a FETCH_IO_CMDS completion wrote: len bytes of 16-bit tags at
 * buf (untrusted).  Copies those below depth to out (room for len / 2),
 * skips the driver's "unused" marker, counts anything else (and an odd
 * trailing byte) in *bad; returns how many went to out. */
unsigned devio_ublk_batch_tags(const void *buf, size_t len, unsigned depth, uint16_t *out, unsigned *bad);

/* What a COMMIT_IO_CMDS completion means for the left elements of
 * elem_bytes it carried, the first of which has result first_result: res
 * is the bytes of whole elements the driver took, or -errno when it took
 * none (it stops at the first element it refuses).  Returns how many
 * elements, from the first, are done with: those taken; else, the first
 * being refused, 0 with *as_eio set when it should go again answered
 * -EIO (a request is never left unanswered while a resend may still end
 * it), 1 when a resend cannot change the answer (-EBUSY: the driver holds
 * no request of ours on that tag; or it went as -EIO already), every one
 * on -ENODEV (the device is gone). */
unsigned devio_ublk_commit_outcome(int res, unsigned left, unsigned elem_bytes, int first_result, bool *as_eio);

/* Is /dev/ublkbN open (mounted, held, claimed, or open in a process)?
 * 1 with the reason in why, 0 if not (or no such disk), -errno. */
int devio_ublk_in_use(unsigned dev_id, char *why, size_t len);

/* Parse "/dev/ublkbN", "/dev/ublkcN", "ublkbN" or "N" into N; 0 or -EINVAL. */
int devio_ublk_parse_dev(const char *s, unsigned *dev_id);

#ifdef __cplusplus
}
#endif
#endif
