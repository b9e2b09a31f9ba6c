/* rbd.c - a Ceph RBD image as a backend, through librbd's asynchronous API.
 *
 * rbd:POOL/IMAGE, rbd:POOL/NAMESPACE/IMAGE, either with @SNAP (served
 * read-only).  The cluster is found through --ceph-conf (else librados'
 * default search: $CEPH_CONF, /etc/ceph/ceph.conf), the client name through
 * --ceph-id (default admin) and its key through --ceph-keyring (else the
 * conf's).  `submit` starts rbd_aio_* requests, many in flight, and librbd
 * completes them on its own threads; FUA is a flush after the change (the
 * core adds it on the synchronous path).  librbd's
 * cache is off: a write is acknowledged once the OSDs hold it.  A
 * writable image with the exclusive-lock feature is locked explicitly at
 * open, so librbd never hands the lock to another client: a second writer
 * is refused instead of taking turns with us.  Every cluster operation is
 * bounded by --ceph-timeout (librados' op and mount timeouts): an
 * unreachable cluster fails requests with an error, it never hangs them.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <rados/librados.h>
#include <rbd/features.h>
#include <rbd/librbd.h>
#include "devio/backend.h"
#include "devio/util.h"

#define RBD_NAME_MAX 256
#define RBD_DEFAULT_TIMEOUT 60 /* seconds */

struct rbd_store {
	char name[1100];           /* the source, for messages */
	char pool[RBD_NAME_MAX], ns[RBD_NAME_MAX], image[RBD_NAME_MAX], snap[RBD_NAME_MAX];
	rados_t cluster;
	rados_ioctx_t io;
	rbd_image_t img;
	uint64_t watch;
	bool watching, locked;
	uint64_t size, obj_size;
	unsigned long errors;      /* failed requests, for rate-limited messages */
};

/* A failed request, told for the first 8 and then every 1000th: an
 * unreachable cluster fails every request, and the log must stay readable. */
static void rbd_report(struct rbd_store *st, const char *what, uint64_t len, uint64_t off, int err)
{
	unsigned long n = __atomic_add_fetch(&st->errors, 1, __ATOMIC_RELAXED);

	if (n <= 8 || n % 1000 == 0)
		devio_err("%s: %s of %" PRIu64 " bytes at offset %" PRIu64 " failed: %s%s", st->name, what, len, off,
			  strerror(-err), n == 8 ? " (further errors: every 1000th is told)" : "");
}

/* req->priv[0] while in flight: a FUA change (WRITE, TRIM, ZERO) done,
 * its flush next. */
#define RBD_STAGE_FLUSH_AFTER 1u

/* ---- the asynchronous path ---- */

static void rbd_aio_done(rbd_completion_t c, void *arg);

static int rbd_aio_start(struct rbd_store *st, struct devio_request *req)
{
	rbd_completion_t c;
	int r = rbd_aio_create_completion(req, rbd_aio_done, &c);

	if (r < 0)
		return r;
	if (req->priv[0] == RBD_STAGE_FLUSH_AFTER) { /* the change is done: its FUA flush */
		r = rbd_aio_flush(st->img, c);
		if (r < 0)
			rbd_aio_release(c);
		return r;
	}
	switch (req->op) {
	case DEVIO_OP_READ:
		r = rbd_aio_read(st->img, req->offset, req->length, req->buf, c);
		break;
	case DEVIO_OP_WRITE:
		r = rbd_aio_write(st->img, req->offset, req->length, req->buf, c);
		break;
	case DEVIO_OP_FLUSH:
		r = rbd_aio_flush(st->img, c);
		break;
	case DEVIO_OP_TRIM:
		r = rbd_aio_discard(st->img, req->offset, req->length, c);
		break;
	case DEVIO_OP_ZERO:
		r = rbd_aio_write_zeroes(st->img, req->offset, req->length, c,
					 req->flags & DEVIO_REQ_NO_HOLE ? RBD_WRITE_ZEROES_FLAG_THICK_PROVISION : 0, 0);
		break;
	default:
		r = -EINVAL;
	}
	if (r < 0)
		rbd_aio_release(c);
	return r;
}

/* librbd's thread: the request is done, or its FUA flush comes next. */
static void rbd_aio_done(rbd_completion_t c, void *arg)
{
	struct devio_request *req = arg;
	struct rbd_store *st = req->backend->priv;
	ssize_t ret = rbd_aio_get_return_value(c);
	int r = ret < 0 ? (int)ret : 0;

	rbd_aio_release(c);
	if (!r && req->op == DEVIO_OP_READ && (uint64_t)ret != req->length)
		r = -EIO; /* inside the image (checked): a short read is the cluster's fault */
	if (!r && req->op != DEVIO_OP_READ && req->op != DEVIO_OP_FLUSH && (req->flags & DEVIO_REQ_FUA) &&
	    req->priv[0] != RBD_STAGE_FLUSH_AFTER) {
		req->priv[0] = RBD_STAGE_FLUSH_AFTER;
		r = rbd_aio_start(st, req);
		if (!r)
			return;
	}
	if (r)
		rbd_report(st, devio_op_name(req->op), req->length, req->offset, r);
	req->result = r;
	req->complete(req);
}

static int rbd_submit(struct devio_backend *b, struct devio_request *req)
{
	struct rbd_store *st = b->priv;

	if (req->op == DEVIO_OP_CACHE)
		return -EOPNOTSUPP; /* the core answers it: a hint we have no use for */
	if (req->op == DEVIO_OP_ZERO && (req->flags & DEVIO_REQ_NO_HOLE) && (req->flags & DEVIO_REQ_FAST_ZERO))
		return -EOPNOTSUPP; /* the core runs it synchronously: rbd_zero refuses it */
	if (req->length == 0 && req->op != DEVIO_OP_FLUSH)
		return -EAGAIN; /* nothing to move: the core completes it */
	req->priv[0] = 0;
	return rbd_aio_start(st, req);
}

/* ---- the synchronous callbacks ---- */

static int rbd_sync_result(struct rbd_store *st, const char *what, ssize_t r, uint64_t len, uint64_t off)
{
	if (r >= 0 && (uint64_t)r == len)
		return 0;
	if (r >= 0)
		r = -EIO;
	rbd_report(st, what, len, off, (int)r);
	return (int)r;
}

static int rbd_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	struct rbd_store *st = b->priv;

	return rbd_sync_result(st, "READ", rbd_read(st->img, off, len, buf), len, off);
}

static int rbd_flush_image(struct devio_backend *b)
{
	struct rbd_store *st = b->priv;
	int r = rbd_flush(st->img);

	if (r < 0)
		rbd_report(st, "FLUSH", 0, 0, r);
	return r;
}

static int rbd_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	struct rbd_store *st = b->priv;

	return rbd_sync_result(st, "WRITE", rbd_write(st->img, off, len, buf), len, off); /* FUA: the core's flush */
}

static int rbd_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct rbd_store *st = b->priv;
	int r = rbd_discard(st->img, off, len);

	return r < 0 ? rbd_sync_result(st, "TRIM", r, len, off) : 0;
}

static int rbd_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct rbd_store *st = b->priv;
	ssize_t r;

	if ((flags & DEVIO_REQ_NO_HOLE) && (flags & DEVIO_REQ_FAST_ZERO))
		return -ENOTSUP;
	r = rbd_write_zeroes(st->img, off, len,
			     flags & DEVIO_REQ_NO_HOLE ? RBD_WRITE_ZEROES_FLAG_THICK_PROVISION : 0, 0);
	return r < 0 || (uint64_t)r != len ? rbd_sync_result(st, "ZERO", r, len, off) : 0;
}

/* ---- extents: rbd_diff_iterate2 names the allocated ranges; gaps are holes ---- */

struct rbd_walk {
	devio_extent_fn fn;
	void *ctx;
	uint64_t pos, end;
	int stop;
};

static int rbd_walk_to(struct rbd_walk *w, uint64_t off, uint64_t len, uint32_t flags)
{
	if (off > w->pos && !w->stop)
		w->stop = w->fn(w->ctx, w->pos, off - w->pos, DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO);
	if (len && !w->stop)
		w->stop = w->fn(w->ctx, off, len, flags);
	w->pos = off + len;
	return w->stop;
}

static int rbd_walk_cb(uint64_t off, size_t len, int exists, void *arg)
{
	struct rbd_walk *w = arg;

	if (off < w->pos || off > w->end || len > w->end - off)
		return -EIO; /* out of order or outside what was asked: not to be passed on */
	return rbd_walk_to(w, off, len, exists ? 0 : DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO);
}

static int rbd_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	struct rbd_store *st = b->priv;
	struct rbd_walk w = { fn, ctx, off, off + len, 0 };
	int r = rbd_diff_iterate2(st->img, NULL, off, len, 1, 0, rbd_walk_cb, &w);

	if (w.stop)
		return w.stop;
	if (r < 0) {
		rbd_report(st, "block status", len, off, r);
		return r;
	}
	return rbd_walk_to(&w, w.end, 0, 0);
}

/* ---- opening and closing ---- */

static void rbd_describe(struct devio_backend *b, char *out, size_t outlen)
{
	struct rbd_store *st = b->priv;

	snprintf(out, outlen, "rbd %s%s%s/%s%s%s, %" PRIu64 "-byte objects%s", st->pool, st->ns[0] ? "/" : "",
		 st->ns, st->image, st->snap[0] ? "@" : "", st->snap, st->obj_size,
		 st->locked ? ", exclusive lock held" : "");
}

static void rbd_store_free(struct rbd_store *st)
{
	if (st->watching)
		rbd_update_unwatch(st->img, st->watch);
	if (st->img)
		rbd_close(st->img); /* releases the exclusive lock */
	if (st->io)
		rados_ioctx_destroy(st->io);
	if (st->cluster)
		rados_shutdown(st->cluster);
	free(st);
}

static void rbd_store_close(struct devio_backend *b)
{
	rbd_store_free(b->priv);
	free(b);
}

static const struct devio_backend_ops rbd_ops = {
	.name = "rbd",
	.pread = rbd_pread,
	.pwrite = rbd_pwrite,
	.flush = rbd_flush_image,
	.trim = rbd_trim,
	.zero = rbd_zero,
	.extents = rbd_extents,
	.submit = rbd_submit,
	.describe = rbd_describe,
	.close = rbd_store_close,
};

/* One name component: 1..255 bytes (no '/' or '@': split out before). */
static int rbd_component(struct rbd_store *st, const char *what, const char *s, char *out)
{
	size_t n = s ? strlen(s) : 0;

	if (n == 0 || n >= RBD_NAME_MAX) {
		devio_err("%s: %s %s name (want rbd:POOL/IMAGE[@SNAP] or rbd:POOL/NAMESPACE/IMAGE[@SNAP])",
			  st->name, n ? "too long a" : "no", what);
		return -EINVAL;
	}
	memcpy(out, s, n + 1);
	return 0;
}

/* POOL/IMAGE[@SNAP] or POOL/NAMESPACE/IMAGE[@SNAP] (after "rbd:") */
static int rbd_parse_source(struct rbd_store *st, const char *spec)
{
	char buf[4 * RBD_NAME_MAX], *part[4] = { 0 }, *snap, *save = NULL;
	int n = 0, slashes = 0, r;

	if (strlen(spec) >= sizeof(buf))
		return rbd_component(st, "image", spec, st->image); /* says: too long */
	strcpy(buf, spec);
	snap = strchr(buf, '@');
	if (snap)
		*snap++ = '\0';
	for (const char *c = buf; *c; c++)
		slashes += *c == '/';
	for (char *t = strtok_r(buf, "/", &save); t && n < 4; t = strtok_r(NULL, "/", &save))
		part[n++] = t;
	if (n < 2 || n > 3 || slashes != n - 1) /* also an empty component: "p//i", "/p/i" */
		return rbd_component(st, "image", NULL, st->image); /* says what is wanted */
	if ((r = rbd_component(st, "pool", part[0], st->pool)) ||
	    (n == 3 && (r = rbd_component(st, "namespace", part[1], st->ns))) ||
	    (r = rbd_component(st, "image", part[n - 1], st->image)))
		return r;
	return snap ? rbd_component(st, "snapshot", snap, st->snap) : 0;
}

static int rbd_conf_set(struct rbd_store *st, const char *key, const char *val)
{
	int r = rados_conf_set(st->cluster, key, val);

	if (r < 0)
		devio_err("%s: Ceph option %s=%s refused: %s", st->name, key, val, strerror(-r));
	return r;
}

static int rbd_connect(struct rbd_store *st, const struct devio_open_opts *o)
{
	unsigned timeout = o->ceph_timeout ? o->ceph_timeout : RBD_DEFAULT_TIMEOUT;
	const char *keys[] = { "client_mount_timeout", "rados_osd_op_timeout", "rados_mon_op_timeout" };
	char secs[16];
	int r = rados_create(&st->cluster, o->ceph_id);

	if (r < 0) {
		devio_err("%s: cannot create a Ceph client%s%s: %s", st->name, o->ceph_id ? " for id " : "",
			  o->ceph_id ? o->ceph_id : "", strerror(-r));
		st->cluster = NULL;
		return r;
	}
	r = rados_conf_read_file(st->cluster, o->ceph_conf);
	if (r < 0) {
		devio_err("%s: cannot read the Ceph configuration %s: %s", st->name,
			  o->ceph_conf ? o->ceph_conf : "($CEPH_CONF, /etc/ceph/ceph.conf; or give --ceph-conf)",
			  strerror(-r));
		return r;
	}
	/* No librbd cache: a write is acknowledged once the OSDs have it, so
	 * what devio acknowledges survives devio's own crash (measured: also
	 * faster for writes than a write-through cache; CEPH_ARGS='--rbd_cache=true
	 * --rbd_cache_policy=writeback' trades safety for speed). */
	if ((r = rbd_conf_set(st, "rbd_cache", "false")) < 0)
		return r;
	rados_conf_parse_env(st->cluster, NULL); /* CEPH_ARGS, as the ceph tools do */
	if (o->ceph_keyring && (r = rbd_conf_set(st, "keyring", o->ceph_keyring)) < 0)
		return r;
	snprintf(secs, sizeof(secs), "%u", timeout);
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
		if ((r = rbd_conf_set(st, keys[i], secs)) < 0)
			return r;
	r = rados_connect(st->cluster);
	if (r < 0)
		devio_err("%s: cannot connect to the Ceph cluster (%s, within %u s): %s", st->name,
			  o->ceph_conf ? o->ceph_conf : "default configuration", timeout, strerror(-r));
	return r;
}

static int rbd_open_image(struct rbd_store *st, bool readonly)
{
	int r = rados_ioctx_create(st->cluster, st->pool, &st->io);

	if (r < 0) {
		devio_err("%s: pool '%s': %s", st->name, st->pool, r == -ENOENT ? "no such pool" : strerror(-r));
		st->io = NULL;
		return r;
	}
	if (st->ns[0])
		rados_ioctx_set_namespace(st->io, st->ns);
	if (readonly)
		r = rbd_open_read_only(st->io, st->image, &st->img, st->snap[0] ? st->snap : NULL);
	else
		r = rbd_open(st->io, st->image, &st->img, NULL);
	if (r < 0) {
		devio_err("%s: cannot open image '%s'%s%s: %s", st->name, st->image, st->snap[0] ? " at snapshot " : "",
			  st->snap, r == -ENOENT ? "no such image or snapshot" : strerror(-r));
		st->img = NULL;
	}
	return r;
}

/* Writable: take the exclusive lock for good, or refuse to serve. */
static int rbd_lock(struct rbd_store *st)
{
	char *owners[4];
	size_t n = 4;
	uint64_t features = 0;
	rbd_lock_mode_t mode;
	int r;

	if (rbd_get_features(st->img, &features) < 0 || !(features & RBD_FEATURE_EXCLUSIVE_LOCK)) {
		devio_warn("%s: the image has no exclusive-lock feature: nothing stops a second writer", st->name);
		return 0;
	}
	r = rbd_lock_acquire(st->img, RBD_LOCK_MODE_EXCLUSIVE);
	if (r == 0) {
		st->locked = true;
		return 0;
	}
	if (rbd_lock_get_owners(st->img, &mode, owners, &n) == 0 && n > 0) {
		devio_err("%s: the image is locked by another client (%s): serve it read-only (-r) or stop that writer",
			  st->name, owners[0]);
		rbd_lock_get_owners_cleanup(owners, n);
	} else {
		devio_err("%s: cannot take the image's exclusive lock: %s", st->name, strerror(-r));
	}
	return r == -EROFS || r == -EBUSY ? -EBUSY : r;
}

/* The image was changed by someone else; a resize is the one we can see. */
static void rbd_watch_cb(void *arg)
{
	struct rbd_store *st = arg;
	uint64_t size;

	if (rbd_get_size(st->img, &size) == 0 && size != st->size)
		devio_warn("%s: the image was resized from %" PRIu64 " to %" PRIu64 " bytes; clients keep the size"
			   " they were given until devio is restarted", st->name, st->size, size);
}

static int rbd_geometry(struct rbd_store *st)
{
	rbd_image_info_t info;
	int r = rbd_stat(st->img, &info, sizeof(info));

	if (r < 0) {
		devio_err("%s: cannot stat the image: %s", st->name, strerror(-r));
		return r;
	}
	st->size = info.size;
	st->obj_size = info.obj_size;
	if (st->size == 0) {
		devio_err("%s: the image is empty (size 0)", st->name);
		return -EINVAL;
	}
	if (rbd_update_watch(st->img, &st->watch, rbd_watch_cb, st) == 0)
		st->watching = true;
	return 0;
}

int devio_rbd_open(const char *source, const struct devio_open_opts *opts, struct devio_backend **out)
{
	struct rbd_store *st = calloc(1, sizeof(*st));
	struct devio_backend *b = calloc(1, sizeof(*b));
	bool readonly;
	int r;

	if (!st || !b) {
		free(st);
		free(b);
		return -ENOMEM;
	}
	snprintf(st->name, sizeof(st->name), "%s", source);
	if ((r = rbd_parse_source(st, source + 4)))
		goto fail;
	readonly = opts->readonly || st->snap[0];
	if ((r = rbd_connect(st, opts)) || (r = rbd_open_image(st, readonly)) || (!readonly && (r = rbd_lock(st))) ||
	    (r = rbd_geometry(st)))
		goto fail;
	b->ops = &rbd_ops;
	b->run = DEVIO_RUN_BLOCKING;
	b->size = st->size;
	b->block_size = 512;
	b->caps = DEVIO_CAP_FLUSH | DEVIO_CAP_FUA | DEVIO_CAP_TRIM | DEVIO_CAP_ZERO | DEVIO_CAP_FAST_ZERO |
		  DEVIO_CAP_EXTENTS | DEVIO_CAP_CACHE | DEVIO_CAP_MULTI_CONN | (readonly ? DEVIO_CAP_READONLY : 0);
	b->priv = st;
	*out = b;
	return 0;
fail:
	rbd_store_free(st);
	free(b);
	return r;
}
