/* backend.h - the table of operations every store of bytes implements.
 *
 * A backend owns the bytes of one export: an image file or device, a RAM
 * disk, a remote server (the stores), or a layer over another backend (a
 * window or partition of it, an image format: layer.h).  Front ends reach
 * it only through struct devio_request (request.h), devio_extents()
 * (layer.h) and the fields below.  Every callback but pread is optional (a
 * layer that sets remap has no data callbacks at all); the capability
 * bits say what is offered and must tell the truth, because front ends
 * advertise them to clients without looking at the callbacks.
 *
 * The data callbacks are called only by the core (lib/request.c), after
 * its checks.  Synchronous callbacks return 0 or a negative errno and
 * move the whole length (a backend never returns a short transfer; the
 * core has already checked the range).  They must be safe to call from
 * several threads at once.  A backend that can run requests asynchronously (the file backend,
 * through io_uring) also sets `submit`; the core then uses it.
 */
#ifndef DEVIO_BACKEND_H
#define DEVIO_BACKEND_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include "partition.h"
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
/* Buffer kinds taken (request.h), for front ends to choose a fast path;
 * never advertised to clients. */
#define DEVIO_CAP_SPLICE_WRITE (1u << 9)  /* WRITE from DEVIO_BUF_PIPE */
#define DEVIO_CAP_SPLICE_READ  (1u << 10) /* READ into DEVIO_BUF_PIPE */
#define DEVIO_CAP_PWRITE_FUA   (1u << 11) /* pwrite honours DEVIO_REQ_FUA itself: the core adds no flush */
#define DEVIO_CAP_MAP          (1u << 12) /* READ and WRITE as DEVIO_BUF_MAP */
#define DEVIO_CAP_FIXED        (1u << 13) /* READ and WRITE as DEVIO_BUF_FIXED, through ring_submit */

/* Extent flags, as NBD's base:allocation defines them. */
#define DEVIO_EXTENT_HOLE (1u << 0) /* not allocated */
#define DEVIO_EXTENT_ZERO (1u << 1) /* reads as zeroes */

/* Called for each extent, in order; a non-zero return stops the walk and
 * is returned by extents(). */
typedef int (*devio_extent_fn)(void *ctx, uint64_t offset, uint64_t length, uint32_t flags);

struct devio_backend;
struct devio_ring;

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
	/* Optional: READ and WRITE with the other buffer kinds (request.h),
	 * already checked, in this backend's coordinates.  map: a store kept
	 * in memory (ram, DEVIO_CAP_MAP) fills req->iov with pieces of itself
	 * (-E2BIG if more than req->iovcnt are needed, -ENOSPC when a WRITE
	 * finds the store full); a WRITE holds its range until unmap.  splice:
	 * a store in the page cache (file, DEVIO_CAP_SPLICE_READ/_WRITE) moves
	 * the bytes between itself and req->pipe_fd with splice(2): one copy
	 * from a socket's pages into the page cache for a WRITE, none for a
	 * READ, which the front end splices on into its socket.  FUA is the
	 * core's (a flush after, as for every backend without PWRITE_FUA). */
	int (*map)(struct devio_backend *b, struct devio_request *req);
	void (*unmap)(struct devio_backend *b, struct devio_request *req);
	int (*splice)(struct devio_backend *b, struct devio_request *req);
	/* A layer that only moves requests (a window of its lower backend, a
	 * read-only guard: layer.h) sets remap instead of the data callbacks.
	 * The core checks a request against this layer, calls remap to move
	 * it in place into lower's coordinates, then runs it on lower, with
	 * lower's asynchronous path and buffer kinds: the layer costs nothing
	 * on the fast paths.  Requests never reach this layer's other data
	 * callbacks; extents, describe and close are still its own. */
	void (*remap)(struct devio_backend *b, struct devio_request *req);
	/* A format layer (qcow2, VHD) with data callbacks may also move most
	 * requests as remap does: the core offers try_remap each checked READ
	 * or WRITE of some bytes in memory (no FUA) that reaches it.  true:
	 * the layer moved req in place into lower's coordinates (the whole
	 * range lies in one run of lower: an allocated cluster run), and
	 * the core runs it on lower's own path (io_uring, the caller's ring)
	 * on the submitting thread, with no hop to the worker pool; it may
	 * keep a word in req->remap_tag.  false: the layer's data callbacks
	 * run it (on the pool where the core's policy puts them).  At most
	 * one such layer moves a request; once the moved request has
	 * finished, before complete(), the core calls remap_done (if set),
	 * e.g. so that the layer may reuse space the old mapping used.
	 * Called concurrently from any thread; must not wait for I/O. */
	bool (*try_remap)(struct devio_backend *b, struct devio_request *req);
	void (*remap_done)(struct devio_backend *b, struct devio_request *req);
	/* Optional, for stores that can get longer (a whole image file): let
	 * writes reach up to size bytes from now on (b->size becomes size; the
	 * store grows as those writes land, so write its new end first).
	 * Never shrinks.  -EOPNOTSUPP where the store's size is fixed (a
	 * device, a window, a remote server, a RAM disk).  For image formats
	 * that append blocks (layer.h: devio_layer_grow). */
	int (*grow)(struct devio_backend *b, uint64_t size);
	/* One-line human description for `devio status` and logs (optional). */
	void (*describe)(struct devio_backend *b, char *out, size_t outlen);
	void (*close)(struct devio_backend *b);
	/* Optional, for a backend with an io_uring path: put req's I/O on
	 * the caller's io_uring (a FUSE or ublk queue, ring.h) instead of its
	 * own, so that the completion arrives on the thread that waits there
	 * anyway: one ring, no hand-off.  SQEs from devio_ring_get_sqe(ring),
	 * tagged with devio_ring_sqe_request(sqe, req).  The core calls it on
	 * the ring's thread only, for READ and WRITE of at least one byte
	 * (FUA only with DEVIO_CAP_PWRITE_FUA) and FLUSH.  Returns 0 if it
	 * finished or queued req, -EAGAIN to decline (the core goes on with
	 * submit), or another negative errno to fail it.  A DEVIO_BUF_FIXED
	 * READ or WRITE (DEVIO_CAP_FIXED) has no other way: declining it
	 * fails it. */
	int (*ring_submit)(struct devio_backend *b, struct devio_request *req, struct devio_ring *ring);
	/* With ring_submit: the CQE of one of its SQEs, on the ring's thread
	 * (req->ring): complete req, or queue the rest on req->ring. */
	void (*ring_cqe)(struct devio_backend *b, struct devio_request *req, int res);
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
	uint64_t offset;   /* bytes into the image (the partition, if any) */
	uint64_t size;     /* bytes; 0 with has_size false = to the end */
	int partition;     /* 0 = whole image; N = MBR/GPT partition N, numbered as below */
	enum devio_part_numbering numbering; /* partition.h: Linux's by default */
	uint64_t ram_max;  /* ram: cap on resident bytes, 0 = none */
	bool direct;       /* file: O_DIRECT */
	const char *ceph_conf;    /* rbd: ceph.conf (NULL: librados' default search) */
	const char *ceph_id;      /* rbd: client name without "client." (NULL: admin) */
	const char *ceph_keyring; /* rbd: keyring file (NULL: the conf's) */
	unsigned ceph_timeout;    /* rbd: seconds before a cluster operation fails (0: 60) */
	/* devio://, nbd://: seconds a request waits for the server to come
	 * back after the connection breaks (reconnecting, then reissuing what
	 * was not acknowledged); 0: no reconnection, fail at once. */
	unsigned remote_timeout;
	const char *format; /* NULL or "auto": detect; "raw"; "vhd", "qcow2" (layer.h) */
	const char *cow;    /* NULL, or a copy-on-write overlay on top: FILE or "ram" (cow.h) */
};

/* Open SOURCE: "ram:SIZE", "devio://HOST:PORT", "devio+unix:///PATH",
 * "nbd://...", or a path to an image file or block device.  On error
 * returns a negative errno and has logged why. */
int devio_backend_open(const char *source, const struct devio_open_opts *opts, struct devio_backend **out);
void devio_backend_close(struct devio_backend *b);

/* Whether b's requests may complete on another thread than the one that
 * submitted them (its store has an asynchronous path): a front end then
 * needs somewhere to send replies from. */
bool devio_backend_async(const struct devio_backend *b);

/* Whether READ and WRITE on b may carry DEVIO_BUF_FIXED buffers: its
 * store (past the layers that only remap) takes them.  For a front end
 * choosing its data path once per device (ublk zero copy). */
bool devio_backend_takes_fixed(const struct devio_backend *b);

/* Individual backends (backends/NAME.c). */
int devio_file_open(const char *path, const struct devio_open_opts *opts, struct devio_backend **out);
int devio_ram_open(uint64_t size, uint64_t max_resident, struct devio_backend **out);
/* Remote servers as backends: the client ends of the two protocols. */
int devio_remote_devio_open(const char *uri, const struct devio_open_opts *opts, struct devio_backend **out); /* devio://, devio+tls://, devio+unix:// */
/* Parse a devio://, devio+tls:// or devio+unix:// URI as the open would,
 * with no connection and no file opened: 0, or -EINVAL/-ENAMETOOLONG
 * after saying why (fuzz/fuzz_devio_uri.c). */
int devio_remote_devio_check_uri(const char *uri);
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
