/* backend.h - the table of operations every store of bytes implements.
 *
 * A backend owns the bytes of one export: an image file (whole, a window of
 * it, one partition), a RAM disk, a remote server.  Front ends reach it only
 * through this table and struct devio_request (request.h).  Every callback
 * but pread is optional; the capability bits say what is offered and must
 * tell the truth, because front ends advertise them to clients.
 *
 * Synchronous callbacks return 0 or a negative errno and move the whole
 * length (a backend never returns a short transfer; the core has already
 * checked the range).  They must be safe to call from several threads at
 * once.  A backend that can run requests asynchronously (the file backend,
 * through io_uring) also sets `submit`; the core then uses it.
 */
#ifndef DEVIO_BACKEND_H
#define DEVIO_BACKEND_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include "request.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Capability bits (struct devio_backend.caps). */
#define DEVIO_CAP_READONLY   (1u << 0)
#define DEVIO_CAP_FLUSH      (1u << 1) /* flush makes completed writes durable (free if nothing is volatile) */
#define DEVIO_CAP_FUA        (1u << 2) /* FUA honoured (natively or by flushing) */
#define DEVIO_CAP_TRIM       (1u << 3)
#define DEVIO_CAP_ZERO       (1u << 4)
#define DEVIO_CAP_FAST_ZERO  (1u << 5) /* zero can tell fast from slow */
#define DEVIO_CAP_EXTENTS    (1u << 6) /* extents reports holes truthfully */
#define DEVIO_CAP_MULTI_CONN (1u << 7) /* a flush on one connection covers writes of all */
#define DEVIO_CAP_CACHE      (1u << 8) /* CACHE accepted (a hint: may be a no-op) */
#define DEVIO_CAP_SPLICE_WRITE (1u << 9) /* splice_write works here (not advertised to clients) */
#define DEVIO_CAP_SPLICE_READ  (1u << 10) /* splice_read works here (not advertised to clients) */
#define DEVIO_CAP_PWRITE_FUA   (1u << 11) /* pwrite honours DEVIO_REQ_FUA itself: the core adds no flush */

/* Extent flags, as NBD's base:allocation defines them. */
#define DEVIO_EXTENT_HOLE (1u << 0) /* not allocated */
#define DEVIO_EXTENT_ZERO (1u << 1) /* reads as zeroes */

/* Called for each extent, in order; a non-zero return stops the walk and
 * is returned by extents(). */
typedef int (*devio_extent_fn)(void *ctx, uint64_t offset, uint64_t length, uint32_t flags);

struct devio_backend;

struct devio_backend_ops {
	const char *name;
	int (*pread)(struct devio_backend *b, void *buf, uint64_t len, uint64_t off);
	int (*pwrite)(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags);
	int (*flush)(struct devio_backend *b);
	int (*trim)(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags);
	int (*zero)(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags);
	/* Describe [off, off+len): every byte at least once, in order.  May
	 * stop early after at least one extent. */
	int (*extents)(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx);
	/* Optional asynchronous path: start req (already checked) and call
	 * req->complete() later.  Return 0 if started, or a negative errno to
	 * make the core run it synchronously instead (e.g. -EAGAIN). */
	int (*submit)(struct devio_backend *b, struct devio_request *req);
	/* Optional, for stores kept in memory (ram): the bytes of [off,
	 * off+len) in place, as up to max pieces in order; a piece whose
	 * iov_base is NULL reads as zeroes (never written).  The memory stays
	 * mapped until close; a concurrent WRITE or TRIM may change it, as it
	 * may change what a racing read sees.  Returns the number of pieces,
	 * or -E2BIG if more than max are needed.  Lets a front end send a
	 * read straight from the store, without copying it first. */
	int (*map_read)(struct devio_backend *b, uint64_t off, uint64_t len, struct iovec *iov, int max);
	/* Optional, with map_read: [off, off+len) opened for writing in place,
	 * as up to max pieces (none NULL).  The range counts as being written
	 * (a TRIM of it waits) until unmap_write(), so hold it only while the
	 * bytes are at hand.  Returns the number of pieces, -ENOSPC when the
	 * store is full, -E2BIG if more than max pieces are needed. */
	int (*map_write)(struct devio_backend *b, uint64_t off, uint64_t len, struct iovec *iov, int max);
	void (*unmap_write)(struct devio_backend *b, uint64_t off, uint64_t len);
	/* Optional, for stores in the page cache (file, where DEVIO_CAP_
	 * SPLICE_WRITE says so): write len bytes at off taken from the read
	 * end of a pipe holding at least that many, with splice(2).  A front
	 * end that spliced a socket's payload into the pipe gets it written
	 * with one copy (socket buffers to page cache) instead of two.
	 * Honours DEVIO_REQ_FUA.  On error the pipe may still hold the rest;
	 * the caller empties it. */
	int (*splice_write)(struct devio_backend *b, int pipe_fd, uint64_t len, uint64_t off, uint32_t flags);
	/* Optional, the other way (DEVIO_CAP_SPLICE_READ): put the len bytes
	 * at off into the write end of a pipe, by reference to the page cache
	 * where the kernel can, for a front end that splices them on into a
	 * socket (no copy on this side at all).  Never waits for room in the
	 * pipe; -EAGAIN (read the usual way instead) if it fills up, or for a
	 * file with holes, which the usual way can send as holes.  On error
	 * the pipe may hold a part. */
	int (*splice_read)(struct devio_backend *b, int pipe_fd, uint64_t len, uint64_t off);
	/* One-line human description for `devio status` and logs (optional). */
	void (*describe)(struct devio_backend *b, char *out, size_t outlen);
	void (*close)(struct devio_backend *b);
};

/* How the synchronous callbacks behave, for the core's policy of where
 * they run (devio_wants_pool in workers.h); a backend with submit is run
 * through it whatever this says. */
enum devio_run_kind {
	DEVIO_RUN_BLOCKING = 0, /* may wait for a disk or a network: a pool overlaps requests */
	DEVIO_RUN_CPU,          /* only copies memory: fastest on the thread that has the request */
};

struct devio_backend {
	const struct devio_backend_ops *ops;
	enum devio_run_kind run;
	uint64_t size;       /* bytes */
	uint32_t block_size; /* preferred/minimum I/O granularity; 1 if any */
	uint32_t caps;       /* DEVIO_CAP_* */
	uint32_t max_io;     /* largest single transfer the backend accepts; 0 = no limit */
	void *priv;
	struct devio_backend *lower; /* a layer's wrapped backend (layer.h); NULL for a store */
};

/* How to open a SOURCE given on a command line. */
struct devio_open_opts {
	bool readonly;
	bool has_offset, has_size;
	uint64_t offset;   /* bytes into the image */
	uint64_t size;     /* bytes; 0 with has_size false = to the end */
	int partition;     /* 0 = whole image; N = MBR/GPT partition N */
	uint64_t ram_max;  /* ram: cap on resident bytes, 0 = none */
	bool direct;       /* file: O_DIRECT */
	const char *ceph_conf;    /* rbd: ceph.conf (NULL: librados' default search) */
	const char *ceph_id;      /* rbd: client name without "client." (NULL: admin) */
	const char *ceph_keyring; /* rbd: keyring file (NULL: the conf's) */
	unsigned ceph_timeout;    /* rbd: seconds before a cluster operation fails (0: 60) */
	const char *format; /* NULL or "auto": detect; "raw"; "vhd", "qcow2" (layer.h) */
};

/* Open SOURCE: "ram:SIZE", "devio://HOST:PORT", "devio+unix:///PATH",
 * "nbd://...", or a path to an image file or block device.  On error
 * returns a negative errno and has logged why. */
int devio_backend_open(const char *source, const struct devio_open_opts *opts, struct devio_backend **out);
void devio_backend_close(struct devio_backend *b);

/* A READ of [off, off+len) in place (ops->map_read), after the same range
 * checks as devio_submit(): pieces, -EOPNOTSUPP if the backend keeps no
 * bytes in memory, -E2BIG if they need more than max pieces, -EINVAL out
 * of range. */
int devio_map_read(struct devio_backend *b, uint64_t off, uint64_t len, struct iovec *iov, int max);

/* A WRITE in place (ops->map_write), after devio_submit()'s checks:
 * -EROFS read-only, -ENOSPC out of range or full, -EOPNOTSUPP not
 * offered.  Every successful devio_map_write() needs its unmap. */
int devio_map_write(struct devio_backend *b, uint64_t off, uint64_t len, struct iovec *iov, int max);
void devio_unmap_write(struct devio_backend *b, uint64_t off, uint64_t len);

/* A WRITE whose payload waits in a pipe (ops->splice_write), after
 * devio_submit()'s checks: -EROFS, -ENOSPC out of range, -EOPNOTSUPP not
 * offered (DEVIO_CAP_SPLICE_WRITE unset). */
int devio_splice_write(struct devio_backend *b, int pipe_fd, uint64_t off, uint64_t len, uint32_t flags);

/* A READ into a pipe (ops->splice_read), after devio_submit()'s checks:
 * -EINVAL out of range, -EOPNOTSUPP not offered. */
int devio_splice_read(struct devio_backend *b, int pipe_fd, uint64_t off, uint64_t len);

/* Individual backends (backends/NAME.c). */
int devio_file_open(const char *path, const struct devio_open_opts *opts, struct devio_backend **out);
int devio_ram_open(uint64_t size, uint64_t max_resident, struct devio_backend **out);
/* Remote servers as backends: the client ends of the two protocols. */
int devio_remote_devio_open(const char *uri, const struct devio_open_opts *opts, struct devio_backend **out); /* devio://, devio+unix:// */
int devio_remote_nbd_open(const char *uri, const struct devio_open_opts *opts, struct devio_backend **out);   /* nbd://, nbd+unix:// */
/* A Ceph RBD image (rbd:POOL/[NAMESPACE/]IMAGE[@SNAP]); -ENOTSUP in a build without librbd. */
int devio_rbd_open(const char *source, const struct devio_open_opts *opts, struct devio_backend **out);
/* A backend in a shared object: plugin:LIB[;PROC][:ARGS] (backends/plugin.c, include/devio/plugin.h). */
int devio_plugin_open(const char *source, const struct devio_open_opts *opts, struct devio_backend **out);

/* ram:SIZE,image=FILE[,sync-interval=S][,sync-every=N]: a RAM disk kept in
 * FILE (backends/ram_image.c); spec is what follows SIZE's comma. */
int devio_ram_image_open(uint64_t size, const char *spec, uint64_t max_resident, struct devio_backend **out);
/* Its journal: a complete one applied to image_fd and fsynced (0), an
 * empty one (1) or an incomplete or damaged one (2) left alone; -errno. */
int devio_ram_journal_replay(int journal_fd, int image_fd, uint64_t size);

/* RAM backend introspection, for tests and `devio status`. */
uint64_t devio_ram_resident(struct devio_backend *b);

#ifdef __cplusplus
}
#endif
#endif
