/* cow.c - the copy-on-write overlay layer (`--cow FILE|ram`).
 *
 * The source (the lower backend) is opened read-only and never written.
 * The overlay store (a file in the format of docs/formats.md, or a RAM
 * disk) holds whole blocks: block N at data_offset + N * block_size, and a
 * bitmap says which blocks the overlay holds.  A write to a block the
 * overlay lacks copies the block up (the source's bytes, merged with the
 * write) before it marks the block present; TRIM and ZERO mark blocks
 * present and zeroed (punched in the store).
 *
 * Crash consistency: a bit is set in memory only after its block's bytes
 * are written; the bitmap reaches the file only in FLUSH, after an
 * fdatasync made those bytes durable, then a second fdatasync makes the
 * bits durable.  So a block whose bit is on disk was wholly written, and
 * a flushed write survives a kill -9.  Bits only ever go from 0 to 1, so
 * a torn bitmap page is still consistent.
 *
 * Concurrency: reads take no lock (bits are atomic words; a set bit is
 * never cleared).  Making a block present holds one of COW_STRIPES
 * mutexes (by block number), so two writers of one missing block never
 * both copy it up.  Flushes are serialised among themselves only.
 */
#include <errno.h>
#include <endian.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include "devio/cow.h"
#include "devio/layer.h"
#include "devio/util.h"

#define COW_DEFAULT_BLOCK (64u << 10)
#define COW_PAGE 4096u                       /* bitmap bytes per dirty mark */
#define COW_PAGE_WORDS (COW_PAGE / 8u)
#define COW_STRIPES 64u
#define COW_MAX_SIZE (1ull << 62)

struct cow {
	struct devio_backend b;
	struct devio_backend *store;  /* the overlay's bytes: file or RAM disk */
	char *name;                   /* FILE, or "ram" */
	int lock_fd;                  /* holds a flock on FILE; -1 for ram */
	bool persistent;              /* header and bitmap live in the store */
	struct devio_cow_header h;
	unsigned shift;               /* log2(block_size) */
	_Atomic uint64_t *bits;       /* bit N: block N is in the overlay */
	size_t nwords;
	_Atomic uint8_t *dirty;       /* per bitmap page: changed since the last flush */
	size_t npages;
	_Atomic uint64_t present;     /* blocks in the overlay */
	char *zeroes;                 /* block_size zero bytes, never written */
	pthread_mutex_t stripes[COW_STRIPES];
	pthread_mutex_t flush_lock;
};

static struct cow *cow_of(struct devio_backend *b)
{
	return b->priv;
}

/* ---- the header ---- */

static void cow_put32(uint8_t *p, uint32_t v)
{
	v = htole32(v);
	memcpy(p, &v, 4);
}

static void cow_put64(uint8_t *p, uint64_t v)
{
	v = htole64(v);
	memcpy(p, &v, 8);
}

static uint32_t cow_get32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return le32toh(v);
}

static uint64_t cow_get64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return le64toh(v);
}

/* CRC-32 (IEEE 802.3, reflected), bit by bit: the header is 60 bytes. */
static uint32_t cow_crc32(const uint8_t *p, size_t n)
{
	uint32_t crc = 0xffffffffu;

	while (n--) {
		crc ^= *p++;
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xedb88320u & -(crc & 1u));
	}
	return ~crc;
}

static uint64_t cow_round_up(uint64_t v, uint64_t to)
{
	return (v + to - 1) / to * to;
}

int devio_cow_layout(uint64_t size, uint32_t block_size, struct devio_cow_header *h)
{
	if (size > COW_MAX_SIZE)
		return -EINVAL;
	if (block_size == 0)
		for (block_size = COW_DEFAULT_BLOCK; block_size < DEVIO_COW_MAX_BLOCK &&
		     cow_round_up(size, block_size) / block_size > DEVIO_COW_MAX_BLOCKS / 2;)
			block_size <<= 1;
	if (block_size < DEVIO_COW_MIN_BLOCK || block_size > DEVIO_COW_MAX_BLOCK || (block_size & (block_size - 1)))
		return -EINVAL;
	h->virtual_size = size;
	h->block_size = block_size;
	h->nblocks = cow_round_up(size, block_size) / block_size;
	if (h->nblocks > DEVIO_COW_MAX_BLOCKS)
		return -EINVAL;
	h->bitmap_offset = DEVIO_COW_HEADER_SIZE;
	h->bitmap_length = cow_round_up((h->nblocks + 7) / 8, COW_PAGE);
	if (h->bitmap_length == 0)
		h->bitmap_length = COW_PAGE;
	h->data_offset = cow_round_up(h->bitmap_offset + h->bitmap_length, block_size);
	return 0;
}

void devio_cow_header_encode(const struct devio_cow_header *h, uint8_t *buf)
{
	memset(buf, 0, DEVIO_COW_HEADER_SIZE);
	memcpy(buf, DEVIO_COW_MAGIC, 8);
	cow_put32(buf + 8, DEVIO_COW_VERSION);
	cow_put32(buf + 12, DEVIO_COW_HEADER_SIZE);
	cow_put64(buf + 16, h->virtual_size);
	cow_put32(buf + 24, h->block_size);
	cow_put32(buf + 28, 0); /* flags */
	cow_put64(buf + 32, h->bitmap_offset);
	cow_put64(buf + 40, h->bitmap_length);
	cow_put64(buf + 48, h->data_offset);
	cow_put32(buf + 60, cow_crc32(buf, 60));
}

static int cow_bad(const char **why, unsigned *field, const char *what, unsigned at)
{
	*why = what;
	*field = at;
	return -EINVAL;
}

int devio_cow_header_decode(const uint8_t *buf, size_t len, struct devio_cow_header *h, const char **why,
			    unsigned *field)
{
	struct devio_cow_header want;

	if (len < 64)
		return cow_bad(why, field, "file too short for a header", 0);
	if (memcmp(buf, DEVIO_COW_MAGIC, 8))
		return cow_bad(why, field, "magic is not DEVIOCOW (not a devio overlay)", 0);
	if (cow_get32(buf + 8) != DEVIO_COW_VERSION)
		return cow_bad(why, field, "version not supported (want 1)", 8);
	if (cow_get32(buf + 60) != cow_crc32(buf, 60))
		return cow_bad(why, field, "header checksum does not match", 60);
	if (cow_get32(buf + 12) != DEVIO_COW_HEADER_SIZE)
		return cow_bad(why, field, "header size is not 4096", 12);
	if (cow_get32(buf + 28) != 0)
		return cow_bad(why, field, "unknown flags", 28);
	if (devio_cow_layout(cow_get64(buf + 16), cow_get32(buf + 24), &want)) {
		if (cow_get64(buf + 16) > COW_MAX_SIZE)
			return cow_bad(why, field, "virtual size too large", 16);
		return cow_bad(why, field, "block size not a power of two in 4K..64M, or too many blocks", 24);
	}
	if (cow_get64(buf + 32) != want.bitmap_offset)
		return cow_bad(why, field, "bitmap offset is not 4096", 32);
	if (cow_get64(buf + 40) != want.bitmap_length)
		return cow_bad(why, field, "bitmap length does not match the size and block size", 40);
	if (cow_get64(buf + 48) != want.data_offset)
		return cow_bad(why, field, "data offset does not match the layout", 48);
	*h = want;
	return 0;
}

/* ---- the bitmap ---- */

static bool cow_present(struct cow *c, uint64_t blk)
{
	return atomic_load_explicit(&c->bits[blk / 64], memory_order_acquire) & (1ull << (blk % 64));
}

/* Block blk's bytes are in the store: say so (to readers now, to the file
 * at the next flush). */
static void cow_mark(struct cow *c, uint64_t blk)
{
	uint64_t bit = 1ull << (blk % 64);

	if (atomic_fetch_or_explicit(&c->bits[blk / 64], bit, memory_order_release) & bit)
		return;
	atomic_fetch_add(&c->present, 1);
	if (c->persistent)
		atomic_store(&c->dirty[blk / 64 / COW_PAGE_WORDS], 1);
}

static uint64_t cow_block_len(struct cow *c, uint64_t blk)
{
	uint64_t start = blk << c->shift;

	return c->b.size - start < c->h.block_size ? c->b.size - start : c->h.block_size;
}

/* The length of the run from off (< off + len) whose blocks all are, or
 * all are not, in the overlay; *in says which. */
static uint64_t cow_run(struct cow *c, uint64_t off, uint64_t len, bool *in)
{
	uint64_t blk = off >> c->shift;
	uint64_t n = ((blk + 1) << c->shift) - off;

	*in = cow_present(c, blk);
	while (n < len && cow_present(c, ++blk) == *in)
		n += c->h.block_size;
	return n < len ? n : len;
}

/* ---- requests ---- */

static int cow_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	struct cow *c = cow_of(b);
	char *out = buf;

	while (len) {
		bool in;
		uint64_t n = cow_run(c, off, len, &in);
		int r = in ? devio_layer_read(c->store, out, n, c->h.data_offset + off)
			   : devio_layer_read(b->lower, out, n, off);

		if (r)
			return r;
		out += n;
		off += n;
		len -= n;
	}
	return 0;
}

/* Make block blk present holding its source bytes with [off, off+len)
 * (inside it) replaced by data.  Called with the block's stripe held. */
static int cow_copy_up(struct cow *c, uint64_t blk, const void *data, uint64_t len, uint64_t off)
{
	uint64_t start = blk << c->shift, blen = cow_block_len(c, blk);
	unsigned long errors;
	char *tmp;
	int r;

	if (len == blen)
		return devio_layer_write(c->store, data, len, c->h.data_offset + start, 0);
	tmp = malloc(blen);
	if (!tmp)
		return -ENOMEM;
	errors = devio_log_errors();
	r = devio_layer_read(c->b.lower, tmp, blen, start);
	if (r && devio_log_errors() == errors) /* the source did not say why */
		devio_err("%s: copy-up of block %" PRIu64 ": reading the source at offset %" PRIu64 ": %s",
			  c->name, blk, start, strerror(-r));
	if (!r) {
		memcpy(tmp + (off - start), data, len);
		r = devio_layer_write(c->store, tmp, blen, c->h.data_offset + start, 0);
	}
	free(tmp);
	return r;
}

/* Zeroes for the block's whole area in the store: a hole where it can
 * (TRIM on the file and RAM stores reads back as zeroes), else ZERO. */
static int cow_clear(struct cow *c, uint64_t blk)
{
	uint64_t at = c->h.data_offset + (blk << c->shift);

	if (c->store->caps & DEVIO_CAP_TRIM)
		return devio_layer_trim(c->store, at, c->h.block_size, 0);
	return devio_layer_zero(c->store, at, c->h.block_size, 0);
}

/* A write (data) or whole-block clear (data NULL) inside block blk. */
static int cow_write_block(struct cow *c, uint64_t blk, const void *data, uint64_t len, uint64_t off)
{
	pthread_mutex_t *m = &c->stripes[blk % COW_STRIPES];
	int r;

	if (!cow_present(c, blk) || !data) {
		pthread_mutex_lock(m);
		if (!data)
			r = cow_clear(c, blk);
		else if (!cow_present(c, blk))
			r = cow_copy_up(c, blk, data, len, off);
		else
			r = devio_layer_write(c->store, data, len, c->h.data_offset + off, 0);
		if (!r)
			cow_mark(c, blk);
		pthread_mutex_unlock(m);
		return r;
	}
	return devio_layer_write(c->store, data, len, c->h.data_offset + off, 0);
}

/* Each block's piece of [off, off+len): written from buf, or (buf NULL)
 * zeroed, whole blocks by a hole. */
static int cow_each_block(struct cow *c, const char *buf, uint64_t len, uint64_t off)
{
	while (len) {
		uint64_t blk = off >> c->shift;
		uint64_t n = ((blk + 1) << c->shift) - off;
		bool whole;
		int r;

		if (n > len)
			n = len;
		whole = off == blk << c->shift && n == cow_block_len(c, blk);
		if (buf)
			r = cow_write_block(c, blk, buf, n, off);
		else
			r = cow_write_block(c, blk, whole ? NULL : c->zeroes, n, off);
		if (r)
			return r;
		if (buf)
			buf += n;
		off += n;
		len -= n;
	}
	return 0;
}

static int cow_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	return cow_each_block(cow_of(b), buf, len, off);
}

/* TRIM and ZERO alike: the range reads back as zeroes from the overlay
 * (TRIM must not uncover the source's bytes). */
static int cow_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	return cow_each_block(cow_of(b), NULL, len, off);
}

/* Copy the dirty bitmap pages (clearing their marks) into a new array of
 * pages; *idx[i] is page i's number.  Returns how many, or -ENOMEM. */
static long cow_snapshot(struct cow *c, uint64_t **pages, size_t **idx)
{
	size_t n = 0, cap = 0;

	*pages = NULL;
	*idx = NULL;
	for (size_t p = 0; p < c->npages; p++) {
		if (!atomic_exchange(&c->dirty[p], 0))
			continue;
		if (n == cap) {
			size_t ncap = cap ? cap * 2 : 16;
			uint64_t *np = realloc(*pages, ncap * COW_PAGE);
			size_t *ni = np ? realloc(*idx, ncap * sizeof(size_t)) : NULL;

			if (np)
				*pages = np;
			if (!ni) {
				atomic_store(&c->dirty[p], 1);
				return -ENOMEM;
			}
			*idx = ni;
			cap = ncap;
		}
		for (size_t w = 0; w < COW_PAGE_WORDS; w++)
			(*pages)[n * COW_PAGE_WORDS + w] = htole64(atomic_load(&c->bits[p * COW_PAGE_WORDS + w]));
		(*idx)[n++] = p;
	}
	return (long)n;
}

/* Data first (fdatasync), then the bits that describe it, then sync those. */
static int cow_flush_bitmap(struct cow *c)
{
	unsigned long errors = devio_log_errors();
	uint64_t *pages;
	size_t *idx;
	long n = cow_snapshot(c, &pages, &idx);
	int r = n < 0 ? (int)n : devio_layer_flush(c->store);

	for (long i = 0; !r && i < n; i++)
		r = devio_layer_write(c->store, pages + i * COW_PAGE_WORDS, COW_PAGE,
				      c->h.bitmap_offset + idx[i] * COW_PAGE, 0);
	if (!r && n > 0)
		r = devio_layer_flush(c->store);
	if (r) {
		if (devio_log_errors() == errors) /* the store did not say why */
			devio_err("%s: flush of the overlay bitmap: %s", c->name, strerror(-r));
		for (long i = 0; i < n; i++)
			atomic_store(&c->dirty[idx[i]], 1); /* written at the next flush */
	}
	free(pages);
	free(idx);
	return r;
}

static int cow_flush(struct devio_backend *b)
{
	struct cow *c = cow_of(b);
	int r;

	if (!c->persistent || (b->caps & DEVIO_CAP_READONLY))
		return 0; /* a RAM overlay has nothing to make durable */
	pthread_mutex_lock(&c->flush_lock);
	r = cow_flush_bitmap(c);
	pthread_mutex_unlock(&c->flush_lock);
	return r;
}

/* ---- extents: the overlay's for its blocks, the source's elsewhere ---- */

struct cow_walk {
	devio_extent_fn fn;
	void *ctx;
	uint64_t delta; /* subtracted from the store's offsets */
	uint64_t pos;   /* end of the last extent passed on, in the layer's offsets */
};

static int cow_walk_extent(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct cow_walk *w = ctx;

	w->pos = off - w->delta + len;
	return w->fn(w->ctx, off - w->delta, len, flags);
}

static int cow_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	struct cow *c = cow_of(b);
	uint64_t end = off + len;

	while (off < end) {
		bool in;
		uint64_t n = cow_run(c, off, end - off, &in);
		struct cow_walk w = { fn, ctx, in ? c->h.data_offset : 0, off };
		int r = in ? devio_extents(c->store, c->h.data_offset + off, n, cow_walk_extent, &w)
			   : devio_extents(b->lower, off, n, cow_walk_extent, &w);

		if (r)
			return r;
		if (w.pos <= off)
			return -EIO; /* a walk that said nothing */
		off = w.pos;
	}
	return 0;
}

static void cow_describe(struct devio_backend *b, char *out, size_t outlen)
{
	struct cow *c = cow_of(b);

	snprintf(out, outlen, "copy-on-write overlay %s: %" PRIu64 " of %" PRIu64 " blocks of %u bytes written%s",
		 c->persistent ? c->name : "in RAM", (uint64_t)atomic_load(&c->present), c->h.nblocks,
		 c->h.block_size, b->caps & DEVIO_CAP_READONLY ? ", read-only" : "");
}

static void cow_free(struct cow *c)
{
	if (c->store)
		devio_backend_close(c->store);
	if (c->lock_fd >= 0)
		close(c->lock_fd);
	for (unsigned i = 0; i < COW_STRIPES; i++)
		pthread_mutex_destroy(&c->stripes[i]);
	pthread_mutex_destroy(&c->flush_lock);
	free((void *)c->bits);
	free((void *)c->dirty);
	free(c->zeroes);
	free(c->name);
	free(c);
}

/* The layer's own state only: the source is closed by the core after. */
static void cow_close(struct devio_backend *b)
{
	struct cow *c = cow_of(b);

	cow_flush(b); /* the bitmap reaches the file; a failure was logged */
	cow_free(c);
}

static const struct devio_backend_ops cow_ops = {
	.name = "cow",
	.pread = cow_pread,
	.pwrite = cow_pwrite,
	.flush = cow_flush,
	.trim = cow_zero,
	.zero = cow_zero,
	.extents = cow_extents,
	.describe = cow_describe,
	.close = cow_close,
};

/* ---- opening ---- */

static int cow_alloc_bitmap(struct cow *c)
{
	c->nwords = c->h.bitmap_length / 8;
	c->npages = c->h.bitmap_length / COW_PAGE;
	c->bits = calloc(c->nwords, sizeof(uint64_t));
	c->dirty = calloc(c->npages, 1);
	c->zeroes = calloc(1, c->h.block_size);
	return c->bits && c->dirty && c->zeroes ? 0 : -ENOMEM;
}

/* A new overlay file: built under a temporary name, then linked into
 * place, so FILE never exists without its header.  A FILE someone made
 * meanwhile is kept (and opened next). */
static int cow_create(const char *file, uint64_t size)
{
	struct devio_cow_header h;
	uint8_t hdr[DEVIO_COW_HEADER_SIZE];
	char *tmp = NULL, *dir;
	mode_t mask = umask(0);
	int fd, r = 0;

	umask(mask);
	if (devio_cow_layout(size, 0, &h))
		return -EFBIG;
	devio_cow_header_encode(&h, hdr);
	if (asprintf(&tmp, "%s.XXXXXX", file) < 0)
		return -ENOMEM;
	fd = mkstemp(tmp);
	if (fd < 0) {
		r = -errno;
		free(tmp);
		return r;
	}
	if (fchmod(fd, 0666 & ~mask) || pwrite(fd, hdr, sizeof(hdr), 0) != (ssize_t)sizeof(hdr) ||
	    ftruncate(fd, (off_t)(h.data_offset + h.nblocks * h.block_size)) || fsync(fd) ||
	    (link(tmp, file) && errno != EEXIST))
		r = errno ? -errno : -EIO;
	close(fd);
	unlink(tmp);
	dir = dirname(tmp);
	if (!r && (fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) >= 0) {
		fsync(fd); /* the new name is durable too */
		close(fd);
	}
	free(tmp);
	return r;
}

/* Open (creating if missing and writable) and lock FILE. */
static int cow_lock_file(struct cow *c, const char *file, uint64_t size, bool readonly)
{
	int r;

	c->lock_fd = open(file, (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
	if (c->lock_fd < 0 && errno == ENOENT && !readonly) {
		r = cow_create(file, size);
		if (r) {
			devio_err("%s: cannot create the overlay: %s", file, strerror(-r));
			return r;
		}
		devio_info("%s: new copy-on-write overlay for %" PRIu64 " bytes", file, size);
		c->lock_fd = open(file, O_RDWR | O_CLOEXEC);
	}
	if (c->lock_fd < 0) {
		r = -errno;
		devio_err("%s: cannot open the overlay: %s%s", file, strerror(-r),
			  r == -ENOENT ? " (a read-only overlay is never created)" : "");
		return r;
	}
	if (flock(c->lock_fd, (readonly ? LOCK_SH : LOCK_EX) | LOCK_NB)) {
		r = -errno;
		devio_err("%s: the overlay is in use by another process (or another export of this server)", file);
		return r == -EWOULDBLOCK ? -EBUSY : r;
	}
	return 0;
}

/* The header, checked against the source and the file's length. */
static int cow_read_header(struct cow *c, uint64_t size)
{
	uint8_t hdr[DEVIO_COW_HEADER_SIZE];
	const char *why;
	unsigned field;
	int r;

	if (c->store->size < DEVIO_COW_HEADER_SIZE) {
		devio_err("%s: %" PRIu64 " bytes, too short to be a devio overlay", c->name, c->store->size);
		return -EINVAL;
	}
	r = devio_layer_read(c->store, hdr, sizeof(hdr), 0);
	if (r)
		return r;
	if (devio_cow_header_decode(hdr, sizeof(hdr), &c->h, &why, &field)) {
		devio_err("%s: bad overlay header at offset %u: %s", c->name, field, why);
		return -EINVAL;
	}
	if (c->h.virtual_size != size) {
		devio_err("%s: the overlay was made over a source of %" PRIu64 " bytes; this source has %" PRIu64
			  " bytes: refusing to mix them", c->name, c->h.virtual_size, size);
		return -EINVAL;
	}
	if (c->store->size < c->h.data_offset + c->h.nblocks * c->h.block_size) {
		devio_err("%s: truncated: %" PRIu64 " bytes, the overlay's layout needs %" PRIu64, c->name,
			  c->store->size, c->h.data_offset + c->h.nblocks * c->h.block_size);
		return -EINVAL;
	}
	return 0;
}

/* The bitmap from the file; bits past the last block are ignored. */
static int cow_load_bitmap(struct cow *c)
{
	uint64_t *words = (uint64_t *)c->bits, n = 0;
	int r = devio_layer_read(c->store, words, c->h.bitmap_length, c->h.bitmap_offset);

	if (r)
		return r;
	for (size_t i = 0; i < c->nwords; i++) {
		uint64_t w = le64toh(words[i]);
		uint64_t first = (uint64_t)i * 64;

		if (first >= c->h.nblocks)
			w = 0;
		else if (c->h.nblocks - first < 64)
			w &= (1ull << (c->h.nblocks - first)) - 1;
		words[i] = w;
		n += (uint64_t)__builtin_popcountll(w);
	}
	atomic_store(&c->present, n);
	return 0;
}

static int cow_open_file(struct cow *c, uint64_t size, bool readonly)
{
	struct devio_open_opts o = { .readonly = readonly };
	int r = cow_lock_file(c, c->name, size, readonly);

	if (r)
		return r;
	c->persistent = true;
	r = devio_file_open(c->name, &o, &c->store);
	if (!r)
		r = cow_read_header(c, size);
	if (!r)
		r = cow_alloc_bitmap(c);
	if (!r)
		r = cow_load_bitmap(c);
	return r;
}

static int cow_open_ram(struct cow *c, uint64_t size, uint64_t ram_max)
{
	int r = devio_cow_layout(size, 0, &c->h);

	if (r) {
		devio_err("ram overlay: a source of %" PRIu64 " bytes is too large", size);
		return r;
	}
	c->h.data_offset = 0; /* nothing but blocks in RAM */
	r = cow_alloc_bitmap(c);
	if (!r)
		r = devio_ram_open(c->h.nblocks * c->h.block_size, ram_max, &c->store);
	return r;
}

int devio_cow_open(struct devio_backend *lower, const char *file, const struct devio_open_opts *opts,
		   struct devio_backend **out)
{
	bool readonly = opts && opts->readonly;
	struct cow *c = calloc(1, sizeof(*c));
	int r;

	if (!c)
		return -ENOMEM;
	c->lock_fd = -1;
	for (unsigned i = 0; i < COW_STRIPES; i++)
		pthread_mutex_init(&c->stripes[i], NULL);
	pthread_mutex_init(&c->flush_lock, NULL);
	c->name = strdup(file);
	if (!c->name)
		r = -ENOMEM;
	else if (lower->size == 0) {
		devio_err("%s: cannot overlay an empty source", file);
		r = -EINVAL;
	} else
		r = strcmp(file, "ram") ? cow_open_file(c, lower->size, readonly)
					: cow_open_ram(c, lower->size, opts ? opts->ram_max : 0);
	if (r) {
		cow_free(c);
		return r;
	}
	c->shift = (unsigned)__builtin_ctz(c->h.block_size);
	devio_layer_init(&c->b, &cow_ops, lower, 0, c);
	c->b.caps = DEVIO_CAP_FLUSH | DEVIO_CAP_EXTENTS | DEVIO_CAP_MULTI_CONN | DEVIO_CAP_CACHE |
		    (readonly ? DEVIO_CAP_READONLY : DEVIO_CAP_FUA | DEVIO_CAP_TRIM | DEVIO_CAP_ZERO);
	if (c->store->run == DEVIO_RUN_BLOCKING)
		c->b.run = DEVIO_RUN_BLOCKING;
	*out = &c->b;
	return 0;
}
