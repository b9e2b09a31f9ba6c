/* layer.h - backends that wrap another backend.
 *
 * A layer (nbdkit's filters are the model) is a struct devio_backend whose
 * `lower` points at the backend it wraps: a window or partition of it, an
 * image format read from it (VHD, qcow2), a copy-on-write overlay over it,
 * a read-only guard.  A source string plus options composes a stack:
 *
 *     store (file, ram:, devio://, nbd://) -> format -> window (partition,
 *     offset/size, read-only guard) -> overlay
 *
 * The core closes a stack from the top: devio_backend_close() closes the
 * layer, then its lower backend.  A layer reaches its lower backend only
 * through the functions below, which run a request with the core's checks
 * and rules (range, read-only, FUA, ZERO fallback), never by calling the
 * lower backend's operations itself.  A layer that only moves requests
 * (the window) sets ops->remap instead and the core runs each request on
 * the lower backend's own path (backend.h).
 */
#ifndef DEVIO_LAYER_H
#define DEVIO_LAYER_H

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Make b a layer over lower with ops and priv: size, block size, maximum
 * transfer, run kind and the capabilities in `keep` are lower's (the layer
 * changes them afterwards as it needs), less the buffer kinds (MAP,
 * SPLICE_*) a layer with data callbacks does not take itself. */
void devio_layer_init(struct devio_backend *b, const struct devio_backend_ops *ops,
		      struct devio_backend *lower, uint32_t keep, void *priv);

/* Synchronous requests to the lower backend with devio_run(), on the
 * calling thread (no hop to an asynchronous path and back): 0 or a
 * negative errno.  Argument order as in struct devio_backend_ops. */
int devio_layer_read(struct devio_backend *lower, void *buf, uint64_t len, uint64_t off);
int devio_layer_write(struct devio_backend *lower, const void *buf, uint64_t len, uint64_t off, uint32_t flags);
int devio_layer_flush(struct devio_backend *lower);
int devio_layer_trim(struct devio_backend *lower, uint64_t off, uint64_t len, uint32_t flags);
int devio_layer_zero(struct devio_backend *lower, uint64_t off, uint64_t len, uint32_t flags);
/* Let writes to the lower backend reach size bytes (ops->grow): 0,
 * -EOPNOTSUPP if its size is fixed, -EROFS if it is read-only. */
int devio_layer_grow(struct devio_backend *lower, uint64_t size);

/* The extents of [off, off+len) of any backend, after a range check: its
 * own extents callback, or one data extent where it has none. */
int devio_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx);

/* Image formats (lib/format.c): the format layer for an opened store.
 * format is "auto" (or NULL: detect VHD and qcow2 by their signatures, and
 * refuse images that name a backing file or parent), "raw" (no layer), or
 * a format's name (its backing file, if any, opened read-only relative to
 * `name`'s folder).  On success *out is the format layer, or lower itself
 * for raw bytes; on error lower is left open and a message names the
 * image, the field and the offset. */
int devio_format_open(const char *name, struct devio_backend *lower, const char *format,
		      const struct devio_open_opts *opts, struct devio_backend **out);

/* A new image of format ("vhd", "qcow2") at path (a file there is
 * replaced) with a virtual size of size bytes, for `devio convert`: *out
 * is a writable backend over it whose unwritten ranges read as zeroes (the
 * converter skips zero ranges).  options is qemu-img's -o string
 * ("subformat=fixed", KEY=VALUE pairs separated by commas) or NULL for
 * the format's defaults; a key the format does not know is an error.  The
 * caller flushes and closes it with devio_backend_close(); before that
 * flush a crash may leave it inconsistent (a new image is published only
 * after it: devio convert renames it into place).  Raw images
 * are the caller's own business.  On error the cause was logged and no
 * file is left: -ENOTSUP for a format that cannot be created yet,
 * -EINVAL for an unknown one or a bad option. */
int devio_format_create(const char *format, const char *path, uint64_t size, const char *options,
			struct devio_backend **out);
/* VHD (layers/vhd.c), new images.  devio_vhd_create: a new empty VHD
 * image file at path (one there is replaced), dynamic (2 MiB blocks, none
 * allocated) or with DEVIO_VHD_FIXED fixed (a sparse file of size bytes and the footer),
 * built under a temporary name in the same folder and renamed into place:
 * on error nothing is left and the cause was logged.  Its current size is
 * size (rounded up to a 512-byte sector, at most 2040 GiB; with
 * DEVIO_VHD_CHS_SIZE rounded up to a whole geometry, qemu-img's
 * force_size=off), its creator "dvio", a fresh unique id.
 * devio_vhd_chs: the specification's disk geometry for a number of
 * sectors, as the footer's field holds it (C << 16 | H << 8 | S); a new
 * image gets it when it covers the size exactly, else 65535/16/255 (then
 * qemu, as Windows, reads the current size; a warning says so). */
#define DEVIO_VHD_FIXED    1u
#define DEVIO_VHD_CHS_SIZE 2u
int devio_vhd_create(const char *path, uint64_t size, unsigned flags);
uint32_t devio_vhd_chs(uint64_t sectors);
/* devio_vhd_create, then the image opened read-write (the file backend
 * and the VHD layer) into *out; on error no file is left.  Until its
 * first flush it skips the barrier each new block otherwise costs: the
 * caller publishes the image only after flushing it (devio convert). */
int devio_vhd_create_open(const char *path, uint64_t size, unsigned flags, struct devio_backend **out);
/* VHD (layers/vhd.c).  devio_vhd_detect: 1 if lower holds a VHD (a
 * "conectix" footer at its end, or at offset 0 followed by a "cxsparse"
 * header), 0 if not, or a negative errno.  devio_vhd_open: the VHD layer
 * over lower; a differencing image's parent is opened (read-only) only
 * when named is true (the user asked for --format vhd). */
int devio_vhd_detect(const char *name, struct devio_backend *lower);
int devio_vhd_open(const char *name, struct devio_backend *lower, bool named, const struct devio_open_opts *opts,
		   struct devio_backend **out);
/* The window layer (layers/window.c) for --partition (numbered as
 * opts->numbering says), --offset/--size inside it and -r over a lower
 * backend that is writable, in one layer: *out is the window, or lower
 * itself when opts ask for none of these.  On error lower is left open
 * and a message names `name`, the offset and the cause. */
int devio_window_open(const char *name, struct devio_backend *lower, const struct devio_open_opts *opts,
		      struct devio_backend **out);

#ifdef __cplusplus
}
#endif
#endif
