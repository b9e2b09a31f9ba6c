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

/* Memory for each of an image's two metadata caches (L2 tables, refcount
 * blocks), for images opened afterwards; 0 = the default, 32 MiB.  At
 * least 16 tables are cached whatever the size.  For tests and tuning. */
void devio_qcow2_set_cache_size(size_t bytes);

#ifdef __cplusplus
}
#endif
#endif
