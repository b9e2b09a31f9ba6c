/* qcow2.h - the qcow2 image format as a layer (layers/qcow2.c): probing and
 * opening, called by lib/format.c and by the fuzz target. */
#ifndef DEVIO_QCOW2_H
#define DEVIO_QCOW2_H

#include <stdbool.h>
#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The first bytes of lower carry the qcow2 magic ("QFI\xfb"). */
bool devio_qcow2_probe(struct devio_backend *lower);

/* A qcow2 layer over lower (the image file), versions 2 and 3.  explicit:
 * the user named the format (--format qcow2), so a backing file the image
 * names may be opened, read-only, relative to name's folder; without it an
 * image with a backing file is refused.  Images with internal snapshots or
 * a dirty bit (lazy refcounts) are served read-only.  On error lower is
 * left open and a message names the image, the field and the offset. */
int devio_qcow2_open(const char *name, struct devio_backend *lower, bool explicit,
		     const struct devio_open_opts *opts, struct devio_backend **out);

/* A new, empty qcow2 image at path (one there is replaced) of size bytes
 * (rounded up to 512), built under a temporary name in the same folder,
 * synced and renamed into place: refcount_order 4, no backing file, no
 * feature bits.  o may be NULL: version 3 (compat 1.1) and 64 KiB
 * clusters.  With out, the image is then opened read-write (the file
 * backend and the qcow2 layer) into *out.  On error nothing is left and
 * the cause was logged (-EINVAL for a bad option, -EFBIG for a size too
 * large for the cluster size's 32 MiB L1 table). */
struct devio_qcow2_new {
	unsigned version;      /* 2 or 3; 0: 3 */
	uint32_t cluster_size; /* a power of two, 512 .. 2 MiB; 0: 64 KiB */
};
int devio_qcow2_create(const char *path, uint64_t size, const struct devio_qcow2_new *o,
		       struct devio_backend **out);

/* Memory for each of an image's two metadata caches (L2 tables, refcount
 * blocks), for images opened afterwards; 0 = the default, 32 MiB.  At
 * least 16 tables are cached whatever the size.  For tests and tuning. */
void devio_qcow2_set_cache_size(size_t bytes);

#ifdef __cplusplus
}
#endif
#endif
