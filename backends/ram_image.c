/* ram_image.c - a RAM disk that outlives a reboot, as ImDisk Toolkit's
 * RamDyn users keep theirs: ram:SIZE,image=FILE[,sync-interval=S][,sync-every=N]
 *
 * A layer over the RAM disk (backends/ram.c, untouched): FILE is loaded at
 * open (only its data extents, and only chunks that are not all zeroes, so
 * holes stay unallocated in RAM), every change marks its 64 KiB chunks
 * dirty (after the change, so a write-back racing it sees it again next
 * time), and dirty chunks are written back to FILE:
 *  - by a background thread every sync-interval seconds (default 30),
 *    sooner once sync-every bytes (default 64M) were changed since the last;
 *  - on FLUSH (and so FUA), and at a clean stop (close).
 * A crash loses at most what was changed since the last write-back: at
 * most sync-interval seconds of writes, none that a FLUSH covered.
 *
 * Never a torn chunk: a write-back first writes the dirty chunks to
 * FILE.journal (header, records, a trailer with their count and checksum),
 * fsyncs it, then writes them into FILE, fsyncs FILE and empties the
 * journal.  At open a complete journal is replayed into FILE first (the
 * crash came while FILE was being written), an incomplete one ignored (the
 * crash came before FILE was touched: it holds the previous write-back).
 * The journal is untrusted: lengths, counts, indices and the checksum are
 * checked before anything is applied (fuzz/fuzz_ram_journal.c).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/layer.h"
#include "devio/util.h"

#define RI_CHUNK (64u << 10)   /* the RAM disk's chunk */
#define RI_HDR 32
#define RI_REC_HDR 16
#define RI_TRAILER 24
#define RI_DATA 0
#define RI_ZERO 1
#define RI_DEFAULT_INTERVAL 30
#define RI_DEFAULT_EVERY (64ull << 20)

struct ram_image {
	char path[PATH_MAX], jpath[PATH_MAX + 16];
	int fd, jfd;
	uint64_t size, nchunks, nwords;
	_Atomic uint64_t *dirty;     /* one bit per chunk */
	uint64_t *taking;            /* the bits one write-back took */
	_Atomic uint64_t changed;    /* bytes changed since the last write-back */
	unsigned interval;           /* seconds */
	uint64_t every;              /* bytes */
	pthread_mutex_t sync_lock;   /* one write-back at a time */
	pthread_mutex_t lock;        /* for the thread's wait */
	pthread_cond_t wake;
	bool stop, started;
	pthread_t thread;
	unsigned char *buf;          /* one chunk */
};

/* ---- the journal's bytes ---- */

static uint64_t ri_fnv(uint64_t h, const void *p, size_t n)
{
	const unsigned char *c = p;

	while (n--)
		h = (h ^ *c++) * 0x100000001b3ull;
	return h;
}

#define RI_FNV_INIT 0xcbf29ce484222325ull

static void ri_put64(unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t ri_get64(const unsigned char *p)
{
	uint64_t v = 0;

	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static int ri_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
	while (len) {
		ssize_t n = pread(fd, buf, len, (off_t)off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		buf = (char *)buf + n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static int ri_pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
	while (len) {
		ssize_t n = pwrite(fd, buf, len, (off_t)off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		buf = (const char *)buf + n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

/* One record's chunk into the image: data written, zeroes punched. */
static int ri_apply_one(int image_fd, uint64_t size, uint64_t idx, uint64_t kind, unsigned char *data)
{
	uint64_t off = idx * RI_CHUNK, n = size - off < RI_CHUNK ? size - off : RI_CHUNK;

	if (kind == RI_DATA)
		return ri_pwrite_full(image_fd, data, (size_t)n, off);
	if (fallocate(image_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)n) == 0)
		return 0;
	memset(data, 0, n); /* no hole punching here: write the zeroes */
	return ri_pwrite_full(image_fd, data, (size_t)n, off);
}

/* Walk a journal of jlen bytes: check everything (apply false), or apply
 * it to image_fd (apply true, after a check).  buf holds one chunk.
 * Layout: header (magic, size, chunk size, 0), records (index, kind,
 * and a chunk of data for RI_DATA), trailer (magic, record count, FNV-1a
 * of header and records). */
static int ri_walk(int jfd, uint64_t jlen, int image_fd, uint64_t size, bool apply, unsigned char *buf)
{
	unsigned char h[RI_HDR], t[RI_TRAILER];
	uint64_t nchunks = (size + RI_CHUNK - 1) / RI_CHUNK, n = 0, pos = RI_HDR, sum, end;
	int r;

	if (jlen < RI_HDR + RI_TRAILER || ri_pread_full(jfd, h, RI_HDR, 0))
		return -EINVAL;
	if (memcmp(h, "DEVIORJ1", 8) || ri_get64(h + 8) != size || ri_get64(h + 16) != RI_CHUNK || ri_get64(h + 24))
		return -EINVAL;
	end = jlen - RI_TRAILER;
	sum = ri_fnv(RI_FNV_INIT, h, RI_HDR);
	while (pos < end) {
		unsigned char rh[RI_REC_HDR];
		uint64_t idx, kind;

		if (end - pos < RI_REC_HDR || ri_pread_full(jfd, rh, RI_REC_HDR, pos))
			return -EINVAL;
		idx = ri_get64(rh);
		kind = ri_get64(rh + 8);
		if (idx >= nchunks || kind > RI_ZERO || ++n > nchunks)
			return -EINVAL;
		pos += RI_REC_HDR;
		sum = ri_fnv(sum, rh, RI_REC_HDR);
		if (kind == RI_DATA) {
			if (end - pos < RI_CHUNK || ri_pread_full(jfd, buf, RI_CHUNK, pos))
				return -EINVAL;
			pos += RI_CHUNK;
			sum = ri_fnv(sum, buf, RI_CHUNK);
		}
		if (apply && (r = ri_apply_one(image_fd, size, idx, kind, buf)))
			return r;
	}
	if (ri_pread_full(jfd, t, RI_TRAILER, end))
		return -EINVAL;
	if (memcmp(t, "DEVIOJOK", 8) || ri_get64(t + 8) != n || ri_get64(t + 16) != sum)
		return -EINVAL;
	return 0;
}

int devio_ram_journal_replay(int jfd, int image_fd, uint64_t size)
{
	unsigned char *buf;
	struct stat st;
	int r;

	if (fstat(jfd, &st))
		return -errno;
	if (st.st_size == 0)
		return 1; /* empty: nothing to do */
	buf = malloc(RI_CHUNK);
	if (!buf)
		return -ENOMEM;
	r = ri_walk(jfd, (uint64_t)st.st_size, image_fd, size, false, buf);
	if (r == 0)
		r = ri_walk(jfd, (uint64_t)st.st_size, image_fd, size, true, buf);
	else
		r = 2; /* incomplete or damaged: the image holds the previous write-back */
	if (r == 0 && fsync(image_fd))
		r = -errno;
	free(buf);
	return r;
}

/* ---- write-back ---- */

static bool ri_all_zero(const unsigned char *p, size_t n)
{
	return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* Write the taken chunks' records after the header. */
static int ri_write_records(struct ram_image *ri, struct devio_backend *lower, uint64_t *n, uint64_t *sum,
			    uint64_t *pos)
{
	for (uint64_t w = 0; w < ri->nwords; w++) {
		for (uint64_t bits = ri->taking[w]; bits; bits &= bits - 1) {
			uint64_t idx = w * 64 + (uint64_t)__builtin_ctzll(bits), off = idx * RI_CHUNK;
			uint64_t len = ri->size - off < RI_CHUNK ? ri->size - off : RI_CHUNK;
			unsigned char rh[RI_REC_HDR];
			int r;

			memset(ri->buf, 0, RI_CHUNK);
			if ((r = devio_layer_read(lower, ri->buf, len, off)))
				return r;
			ri_put64(rh, idx);
			ri_put64(rh + 8, ri_all_zero(ri->buf, RI_CHUNK) ? RI_ZERO : RI_DATA);
			if ((r = ri_pwrite_full(ri->jfd, rh, RI_REC_HDR, *pos)))
				return r;
			*sum = ri_fnv(*sum, rh, RI_REC_HDR);
			*pos += RI_REC_HDR;
			if (ri_get64(rh + 8) == RI_DATA) {
				if ((r = ri_pwrite_full(ri->jfd, ri->buf, RI_CHUNK, *pos)))
					return r;
				*sum = ri_fnv(*sum, ri->buf, RI_CHUNK);
				*pos += RI_CHUNK;
			}
			(*n)++;
		}
	}
	return 0;
}

/* The journal of the taken chunks, complete and on disk. */
static int ri_journal(struct ram_image *ri, struct devio_backend *lower)
{
	unsigned char h[RI_HDR] = "DEVIORJ1", t[RI_TRAILER] = "DEVIOJOK";
	uint64_t n = 0, pos = RI_HDR, sum;
	int r;

	if (ftruncate(ri->jfd, 0))
		return -errno;
	ri_put64(h + 8, ri->size);
	ri_put64(h + 16, RI_CHUNK);
	sum = ri_fnv(RI_FNV_INIT, h, RI_HDR);
	if ((r = ri_pwrite_full(ri->jfd, h, RI_HDR, 0)) || (r = ri_write_records(ri, lower, &n, &sum, &pos)))
		return r;
	ri_put64(t + 8, n);
	ri_put64(t + 16, sum);
	if ((r = ri_pwrite_full(ri->jfd, t, RI_TRAILER, pos)))
		return r;
	return fsync(ri->jfd) ? -errno : 0;
}

/* Take the dirty bits (they are set again by changes from now on). */
static bool ri_take(struct ram_image *ri)
{
	bool any = false;

	for (uint64_t w = 0; w < ri->nwords; w++) {
		ri->taking[w] = atomic_exchange(&ri->dirty[w], 0);
		any |= ri->taking[w] != 0;
	}
	return any;
}

/* A failed write-back leaves its chunks dirty for the next one. */
static void ri_untake(struct ram_image *ri)
{
	for (uint64_t w = 0; w < ri->nwords; w++)
		atomic_fetch_or(&ri->dirty[w], ri->taking[w]);
}

/* Journal, image, empty journal: see the top of the file. */
static int ri_sync(struct devio_backend *b)
{
	struct ram_image *ri = b->priv;
	int r = 0;

	pthread_mutex_lock(&ri->sync_lock);
	atomic_store(&ri->changed, 0);
	if (ri_take(ri)) {
		r = ri_journal(ri, b->lower);
		if (!r && getenv("DEVIO_RAM_IMAGE_CRASH_AFTER_JOURNAL"))
			_exit(99); /* tests: a crash between the journal and the image */
		if (!r)
			r = devio_ram_journal_replay(ri->jfd, ri->fd, ri->size);
		if (!r && (ftruncate(ri->jfd, 0) || fsync(ri->jfd)))
			r = -errno;
		if (r) {
			ri_untake(ri);
			devio_err("%s: write-back failed: %s (the changes stay in memory, retried)", ri->path,
				  strerror(r < 0 ? -r : EIO));
		}
	}
	pthread_mutex_unlock(&ri->sync_lock);
	return r < 0 ? r : r ? -EIO : 0;
}

static void *ri_thread(void *arg)
{
	struct devio_backend *b = arg;
	struct ram_image *ri = b->priv;

	pthread_mutex_lock(&ri->lock);
	while (!ri->stop) {
		struct timespec until;

		clock_gettime(CLOCK_MONOTONIC, &until);
		until.tv_sec += ri->interval;
		while (!ri->stop && atomic_load(&ri->changed) < ri->every &&
		       pthread_cond_timedwait(&ri->wake, &ri->lock, &until) != ETIMEDOUT)
			;
		if (ri->stop)
			break;
		pthread_mutex_unlock(&ri->lock);
		ri_sync(b);
		pthread_mutex_lock(&ri->lock);
	}
	pthread_mutex_unlock(&ri->lock);
	return NULL;
}

/* ---- the layer's operations ---- */

/* Mark [off, off+len) changed, after the change itself. */
static void ri_changed(struct ram_image *ri, uint64_t off, uint64_t len)
{
	uint64_t first = off / RI_CHUNK, last = (off + len - 1) / RI_CHUNK;

	if (len == 0)
		return;
	for (uint64_t c = first; c <= last; c++)
		atomic_fetch_or(&ri->dirty[c / 64], 1ull << (c % 64));
	if (atomic_fetch_add(&ri->changed, len) + len >= ri->every) {
		pthread_mutex_lock(&ri->lock);
		pthread_cond_signal(&ri->wake);
		pthread_mutex_unlock(&ri->lock);
	}
}

static int ri_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	return devio_layer_read(b->lower, buf, len, off);
}

static int ri_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	int r = devio_layer_write(b->lower, buf, len, off, 0);

	if (!r)
		ri_changed(b->priv, off, len);
	return r;
}

static int ri_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	int r = devio_layer_trim(b->lower, off, len, flags);

	if (!r)
		ri_changed(b->priv, off, len);
	return r;
}

static int ri_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	int r = devio_layer_zero(b->lower, off, len, flags);

	if (!r)
		ri_changed(b->priv, off, len);
	return r;
}

static int ri_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	return devio_extents(b->lower, off, len, fn, ctx);
}

static void ri_describe(struct devio_backend *b, char *out, size_t outlen)
{
	struct ram_image *ri = b->priv;
	char lower[200] = "";

	b->lower->ops->describe(b->lower, lower, sizeof(lower));
	snprintf(out, outlen, "%s, kept in %s (written back every %u s or %" PRIu64 " bytes)", lower, ri->path,
		 ri->interval, ri->every);
}

static void ri_free(struct ram_image *ri)
{
	if (ri->fd >= 0)
		close(ri->fd);
	if (ri->jfd >= 0)
		close(ri->jfd);
	free((void *)ri->dirty);
	free(ri->taking);
	free(ri->buf);
	pthread_cond_destroy(&ri->wake);
	pthread_mutex_destroy(&ri->lock);
	pthread_mutex_destroy(&ri->sync_lock);
	free(ri);
}

/* A clean stop writes everything back. */
static void ri_close(struct devio_backend *b)
{
	struct ram_image *ri = b->priv;

	if (ri->started) {
		pthread_mutex_lock(&ri->lock);
		ri->stop = true;
		pthread_cond_signal(&ri->wake);
		pthread_mutex_unlock(&ri->lock);
		pthread_join(ri->thread, NULL);
	}
	if (ri_sync(b) == 0)
		devio_info("%s: written back", ri->path);
	ri_free(ri);
	free(b);
}

static const struct devio_backend_ops ri_ops = {
	.name = "ram-image",
	.pread = ri_pread,
	.pwrite = ri_pwrite,
	.flush = ri_sync,
	.trim = ri_trim,
	.zero = ri_zero,
	.extents = ri_extents,
	.describe = ri_describe,
	.close = ri_close,
};

/* ---- opening ---- */

/* The image's data extents into the RAM disk, chunk by chunk, skipping
 * chunks of zeroes: only what holds data takes memory. */
static int ri_load(struct ram_image *ri, struct devio_backend *ram)
{
	off_t data = 0, hole;
	int r;

	while ((data = lseek(ri->fd, data, SEEK_DATA)) >= 0 && (uint64_t)data < ri->size) {
		hole = lseek(ri->fd, data, SEEK_HOLE);
		if (hole < 0 || (uint64_t)hole > ri->size)
			hole = (off_t)ri->size;
		for (uint64_t off = (uint64_t)data / RI_CHUNK * RI_CHUNK; off < (uint64_t)hole; off += RI_CHUNK) {
			uint64_t n = ri->size - off < RI_CHUNK ? ri->size - off : RI_CHUNK;

			if ((r = ri_pread_full(ri->fd, ri->buf, (size_t)n, off))) {
				devio_err("%s: cannot read at offset %" PRIu64 ": %s", ri->path, off, strerror(-r));
				return r;
			}
			if (!ri_all_zero(ri->buf, (size_t)n) && (r = devio_layer_write(ram, ri->buf, n, off, 0))) {
				devio_err("%s: cannot load offset %" PRIu64 " into the RAM disk: %s", ri->path, off,
					  strerror(-r));
				return r;
			}
		}
		data = hole;
	}
	if (data < 0 && errno != ENXIO) {
		devio_err("%s: cannot find its data: %s", ri->path, strerror(errno));
		return -errno;
	}
	return 0;
}

/* Open (creating) FILE and its journal; replay a complete journal. */
static int ri_files(struct ram_image *ri)
{
	struct stat st;
	int r;

	ri->fd = open(ri->path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (ri->fd < 0 || fstat(ri->fd, &st)) {
		devio_err("%s: cannot open: %s", ri->path, strerror(errno));
		return -errno;
	}
	if ((uint64_t)st.st_size > ri->size) {
		devio_err("%s: the image holds %" PRIu64 " bytes, more than the RAM disk's %" PRIu64, ri->path,
			  (uint64_t)st.st_size, ri->size);
		return -EINVAL;
	}
	if ((uint64_t)st.st_size < ri->size && ftruncate(ri->fd, (off_t)ri->size)) {
		devio_err("%s: cannot grow to %" PRIu64 " bytes: %s", ri->path, ri->size, strerror(errno));
		return -errno;
	}
	snprintf(ri->jpath, sizeof(ri->jpath), "%s.journal", ri->path);
	ri->jfd = open(ri->jpath, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (ri->jfd < 0) {
		devio_err("%s: cannot open: %s", ri->jpath, strerror(errno));
		return -errno;
	}
	r = devio_ram_journal_replay(ri->jfd, ri->fd, ri->size);
	if (r == 0)
		devio_warn("%s: completed the write-back a crash interrupted (from %s)", ri->path, ri->jpath);
	else if (r == 2)
		devio_warn("%s: ignored an incomplete journal (%s): the image holds the last complete write-back",
			   ri->path, ri->jpath);
	if (r < 0) {
		devio_err("%s: replaying %s failed: %s", ri->path, ri->jpath, strerror(-r));
		return r;
	}
	if (ftruncate(ri->jfd, 0) || fsync(ri->jfd))
		return -errno;
	return 0;
}

/* ",image=FILE[,sync-interval=S][,sync-every=N]" after ram:SIZE. */
static int ri_parse(struct ram_image *ri, const char *spec)
{
	char buf[PATH_MAX + 64], *save = NULL;
	uint64_t v;

	if (strlen(spec) >= sizeof(buf))
		return -ENAMETOOLONG;
	strcpy(buf, spec);
	for (char *kv = strtok_r(buf, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
		if (!strncmp(kv, "image=", 6) && kv[6] && strlen(kv + 6) < sizeof(ri->path))
			strcpy(ri->path, kv + 6);
		else if (!strncmp(kv, "sync-interval=", 14) && !devio_parse_u64(kv + 14, &v) && v >= 1 && v <= 86400)
			ri->interval = (unsigned)v;
		else if (!strncmp(kv, "sync-every=", 11) && !devio_parse_size(kv + 11, &v) && v >= RI_CHUNK)
			ri->every = v;
		else
			return -EINVAL;
	}
	return ri->path[0] ? 0 : -EINVAL;
}

static struct ram_image *ri_alloc(uint64_t size)
{
	struct ram_image *ri = calloc(1, sizeof(*ri));
	pthread_condattr_t ca;

	if (!ri)
		return NULL;
	ri->fd = ri->jfd = -1;
	ri->size = size;
	ri->nchunks = (size + RI_CHUNK - 1) / RI_CHUNK;
	ri->nwords = (ri->nchunks + 63) / 64;
	ri->interval = RI_DEFAULT_INTERVAL;
	ri->every = RI_DEFAULT_EVERY;
	pthread_mutex_init(&ri->sync_lock, NULL);
	pthread_mutex_init(&ri->lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&ri->wake, &ca);
	pthread_condattr_destroy(&ca);
	ri->dirty = calloc(ri->nwords, sizeof(*ri->dirty));
	ri->taking = calloc(ri->nwords, sizeof(*ri->taking));
	ri->buf = malloc(RI_CHUNK);
	if (!ri->dirty || !ri->taking || !ri->buf) {
		ri_free(ri);
		return NULL;
	}
	return ri;
}

int devio_ram_image_open(uint64_t size, const char *spec, uint64_t max_resident, struct devio_backend **out)
{
	struct devio_backend *ram = NULL, *b = NULL;
	struct ram_image *ri = ri_alloc(size);
	int r;

	if (!ri)
		return -ENOMEM;
	if ((r = ri_parse(ri, spec))) {
		devio_err("ram:...%s: want ,image=FILE[,sync-interval=SECONDS][,sync-every=SIZE]", spec);
		goto fail;
	}
	if ((r = ri_files(ri)) || (r = devio_ram_open(size, max_resident, &ram)) || (r = ri_load(ri, ram)))
		goto fail;
	b = calloc(1, sizeof(*b));
	if (!b) {
		r = -ENOMEM;
		goto fail;
	}
	devio_layer_init(b, &ri_ops, ram, ~0u, ri);
	b->caps |= DEVIO_CAP_FLUSH | DEVIO_CAP_FUA;
	if ((r = -pthread_create(&ri->thread, NULL, ri_thread, b)))
		goto fail;
	ri->started = true;
	*out = b;
	return 0;
fail:
	free(b);
	devio_backend_close(ram);
	ri_free(ri);
	return r;
}
