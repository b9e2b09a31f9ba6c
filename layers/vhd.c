/* vhd.c - Microsoft's Virtual Hard Disk image format as a layer: fixed,
 * dynamic and differencing images, read and write, as the "Virtual Hard
 * Disk Image Format Specification" (2006) lays them out and as ImDisk's
 * devio serves them.
 *
 * A fixed image is the disk's bytes followed by a 512-byte footer.  A
 * dynamic image is a footer copy at offset 0, a 1024-byte header, a block
 * allocation table (BAT: big-endian sector offsets, 0xFFFFFFFF = not
 * allocated), then blocks (a sector bitmap, one bit per sector, most
 * significant bit first, padded to whole sectors; then block_size bytes),
 * and the footer again at the very end.  A differencing image is a dynamic
 * one whose unallocated blocks and unset bitmap bits read from a parent
 * image, found by the header's parent locators; the parent is opened
 * read-only, only when the user named the format (an image found by
 * auto-detection never makes devio open another file).
 *
 * Every field read from the image is untrusted: sizes, offsets and counts
 * are checked against the image's size and sane bounds before anything is
 * read or allocated, and a corrupt image is refused with a message naming
 * the image, the field and its offset.
 *
 * Concurrency: reads, and writes to sectors already present, take no lock
 * (the BAT and bitmap pointers are read atomically).  Everything that
 * changes the BAT or a bitmap runs under vhd->lock.
 *
 * Order of writes when a block is allocated (under the lock), so that at
 * every point a crash (kill -9, or a power cut after the flush) leaves an
 * image whose BAT points only at blocks whose bitmap and data were written:
 *   1. the footer, at the new end of the file (the file grows past a
 *      hole; the old footer, where the block's bitmap goes, still stands,
 *      and the footer copy at offset 0 never changes);
 *   2. the block's sector bitmap (over the old footer) and its data;
 *   3. a flush of the lower backend (a barrier: 1 and 2 are durable);
 *   4. the BAT entry.
 * A crash before 4 leaks the space (the file ends with a valid footer
 * after it; the next open appends after that footer).  An image
 * devio_vhd_create_open() just made skips step 3 until its first flush:
 * no one sees it before its maker has flushed it and renamed it into
 * place (devio convert), so a barrier per block would buy nothing.  In a block already
 * allocated (a differencing image's, or one another tool wrote with a
 * partial bitmap), data is written and flushed before the bitmap bits that
 * make it visible; blocks devio allocates in a dynamic image have every
 * bit set and never take that path.
 * TRIM/ZERO of a whole block of a dynamic image frees it: the BAT entry
 * becomes 0xFFFFFFFF on disk first, then the block's bytes are trimmed in
 * the lower store where it can (a hole in the middle of the file, never
 * reused); a partial block, or any block of a differencing image (whose
 * parent would show through), gets zeroes written instead.  An all-zero
 * write to an unallocated block of a dynamic image allocates nothing.
 *
 * devio_vhd_create() makes new images (`devio convert -O vhd`): dynamic
 * with 2 MiB blocks and an empty BAT, or fixed (a sparse file and the
 * footer), built under a temporary name and renamed into place.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "devio/layer.h"
#include "devio/util.h"

#define VHD_SECTOR        512u
#define VHD_FOOTER_SIZE   512u
#define VHD_HEADER_SIZE   1024u
#define VHD_TYPE_FIXED    2u
#define VHD_TYPE_DYNAMIC  3u
#define VHD_TYPE_DIFF     4u
#define VHD_BAT_UNUSED    0xFFFFFFFFu
#define VHD_MIN_BLOCK     512u
#define VHD_MAX_BLOCK     (256u << 20)   /* Hyper-V's largest; qemu and Windows use 2 MiB */
#define VHD_MAX_BAT       (1u << 24)     /* entries: a 64 MiB table at most */
#define VHD_MAX_DEPTH     16             /* differencing chain */
#define VHD_MAX_LOCATOR   4096u          /* bytes of one parent locator's path */
#define VHD_N_LOCATORS    8
#define VHD_ZERO_CHUNK    65536u

/* Platform codes of parent locators. */
#define VHD_PLAT_W2RU 0x57327275u /* "W2ru": Windows relative path, UTF-16LE */
#define VHD_PLAT_W2KU 0x57326B75u /* "W2ku": Windows absolute path, UTF-16LE */
#define VHD_PLAT_MACX 0x4D616358u /* "MacX": file:// URL, UTF-8 */

/* A loaded bitmap whose every bit is set (dynamic blocks devio and qemu
 * allocate): no memory, no per-sector test. */
static uint8_t vhd_full_marker, vhd_empty_marker;
#define VHD_BITMAP_FULL (&vhd_full_marker)
/* No bit set: the bitmap a new block of a differencing image starts from. */
#define VHD_BITMAP_EMPTY (&vhd_empty_marker)

struct vhd_file_id {
	dev_t dev;
	ino_t ino;
};

/* The files of a differencing chain opened so far, for loop detection. */
struct vhd_chain {
	int depth;
	struct vhd_file_id ids[VHD_MAX_DEPTH + 1];
};

struct vhd {
	struct devio_backend b;
	char *name;
	uint32_t type;
	uint8_t footer[VHD_FOOTER_SIZE]; /* as read: written again at each new end */
	uint64_t bat_off;
	uint32_t block_size, block_shift, bitmap_size, n_blocks;
	uint32_t *bat;            /* host order, atomic access */
	uint8_t **bitmaps;        /* per block: NULL (not loaded), VHD_BITMAP_FULL or bitmap_size bytes */
	struct devio_backend *parent; /* differencing: the parent image stack, read-only */
	char *parent_path;
	pthread_mutex_t lock;     /* allocation, BAT and bitmap changes */
	uint64_t next_alloc;      /* where the next block goes: the end footer's offset */
	bool told_full;           /* "cannot grow" logged once */
	bool unordered;           /* a new image no one sees yet: no barrier per block until the first flush */
};

static struct vhd *vhd_of(struct devio_backend *b)
{
	return b->priv;
}

static uint32_t vhd_be32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t vhd_be64(const uint8_t *p)
{
	return (uint64_t)vhd_be32(p) << 32 | vhd_be32(p + 4);
}

static void vhd_put_be32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

/* One's complement of the sum of the bytes, the checksum field skipped. */
static uint32_t vhd_checksum(const uint8_t *p, size_t len, size_t field)
{
	uint32_t sum = 0;

	for (size_t i = 0; i < len; i++)
		if (i < field || i >= field + 4)
			sum += p[i];
	return ~sum;
}

static bool vhd_is_zero(const uint8_t *p, uint64_t len)
{
	return len == 0 || (p[0] == 0 && memcmp(p, p + 1, (size_t)len - 1) == 0);
}

/* ---- footer and header ---- */

/* Is this 512-byte sector a VHD footer?  0 yes; -EINVAL (logged) for a bad
 * checksum or version; -ENOENT no cookie (not logged). */
static int vhd_footer_check(const char *name, const uint8_t *f, uint64_t at)
{
	uint32_t want = vhd_be32(f + 64), got = vhd_checksum(f, VHD_FOOTER_SIZE, 64);

	if (memcmp(f, "conectix", 8))
		return -ENOENT;
	if (want != got) {
		devio_err("%s: VHD footer at offset %" PRIu64 ": checksum field is 0x%08x, the footer's bytes "
			  "give 0x%08x (corrupt image; --format raw serves the bytes as they are)", name, at, want, got);
		return -EINVAL;
	}
	if (vhd_be32(f + 12) >> 16 != 1) {
		devio_err("%s: VHD footer at offset %" PRIu64 ": file format version 0x%08x (field at +12), "
			  "only 1.x is known", name, at, vhd_be32(f + 12));
		return -EINVAL;
	}
	return 0;
}

/* The footer: at the end, or (dynamic images whose end was lost, as a
 * crash of another tool may leave them) its copy at offset 0.  *at_end
 * says which. */
static int vhd_footer_read(const char *name, struct devio_backend *lower, uint8_t *f, bool *at_end)
{
	uint64_t end = lower->size - VHD_FOOTER_SIZE;
	int r, r0;

	r = devio_layer_read(lower, f, VHD_FOOTER_SIZE, end);
	if (r)
		return r;
	r = vhd_footer_check(name, f, end);
	*at_end = r == 0;
	if (r != -ENOENT)
		return r;
	r0 = devio_layer_read(lower, f, VHD_FOOTER_SIZE, 0);
	if (r0)
		return r0;
	r0 = vhd_footer_check(name, f, 0);
	if (r0 == -ENOENT || (!r0 && vhd_be32(f + 60) == VHD_TYPE_FIXED)) {
		devio_err("%s: no VHD footer (\"conectix\") in the last 512 bytes (offset %" PRIu64 ")", name, end);
		return -EINVAL;
	}
	if (!r0)
		devio_warn("%s: no VHD footer at the end (offset %" PRIu64 "); using its copy at offset 0", name,
			   end);
	return r0;
}

int devio_vhd_detect(const char *name, struct devio_backend *lower)
{
	uint8_t f[VHD_FOOTER_SIZE];
	int r;

	if (lower->size < VHD_FOOTER_SIZE)
		return 0;
	r = devio_layer_read(lower, f, VHD_FOOTER_SIZE, lower->size - VHD_FOOTER_SIZE);
	if (r)
		return r;
	if (!memcmp(f, "conectix", 8))
		return 1;
	r = devio_layer_read(lower, f, VHD_FOOTER_SIZE, 0);
	if (r)
		return r;
	/* A dynamic image's footer copy and header: its end may be lost. */
	if (memcmp(f, "conectix", 8) || lower->size < VHD_FOOTER_SIZE + VHD_HEADER_SIZE)
		return 0;
	r = devio_layer_read(lower, f, 8, VHD_FOOTER_SIZE);
	if (r)
		return r;
	(void)name;
	return !memcmp(f, "cxsparse", 8);
}

/* The dynamic header: where data_offset says, whole inside the image. */
static int vhd_header_read(struct vhd *v, uint64_t limit, uint8_t *h)
{
	uint64_t at = vhd_be64(v->footer + 16);
	uint32_t want, got;
	int r;

	if (at < VHD_FOOTER_SIZE || at > limit || limit - at < VHD_HEADER_SIZE) {
		devio_err("%s: VHD footer: data offset %" PRIu64 " (field at +16) does not leave room for the "
			  "1024-byte header in the %" PRIu64 "-byte image", v->name, at, limit);
		return -EINVAL;
	}
	r = devio_layer_read(v->b.lower, h, VHD_HEADER_SIZE, at);
	if (r)
		return r;
	if (memcmp(h, "cxsparse", 8)) {
		devio_err("%s: VHD dynamic header at offset %" PRIu64 ": no \"cxsparse\" cookie", v->name, at);
		return -EINVAL;
	}
	want = vhd_be32(h + 36);
	got = vhd_checksum(h, VHD_HEADER_SIZE, 36);
	if (want != got) {
		devio_err("%s: VHD dynamic header at offset %" PRIu64 ": checksum field (+36) is 0x%08x, the "
			  "header's bytes give 0x%08x", v->name, at, want, got);
		return -EINVAL;
	}
	return 0;
}

/* Block size, table size against the virtual size and the image. */
static int vhd_geometry(struct vhd *v, const uint8_t *h, uint64_t hdr_at, uint64_t limit)
{
	uint64_t entries = vhd_be32(h + 28), need;
	uint32_t bs = vhd_be32(h + 32);

	v->bat_off = vhd_be64(h + 16);
	if (bs < VHD_MIN_BLOCK || bs > VHD_MAX_BLOCK || (bs & (bs - 1))) {
		devio_err("%s: VHD header at offset %" PRIu64 ": block size %u (field at +32) is not a power of "
			  "two from %u to %u", v->name, hdr_at, bs, VHD_MIN_BLOCK, VHD_MAX_BLOCK);
		return -EINVAL;
	}
	v->block_size = bs;
	v->block_shift = (uint32_t)__builtin_ctz(bs);
	v->bitmap_size = ((bs / VHD_SECTOR + 7) / 8 + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
	need = (v->b.size >> v->block_shift) + ((v->b.size & (bs - 1)) != 0);
	if (entries > VHD_MAX_BAT || need > entries) {
		devio_err("%s: VHD header at offset %" PRIu64 ": max table entries %" PRIu64 " (field at +28) "
			  "for a %" PRIu64 "-byte disk of %u-byte blocks (%" PRIu64 " needed, at most %u)", v->name,
			  hdr_at, entries, v->b.size, bs, need, VHD_MAX_BAT);
		return -EINVAL;
	}
	if (v->bat_off < VHD_FOOTER_SIZE || v->bat_off > limit || limit - v->bat_off < need * 4) {
		devio_err("%s: VHD header at offset %" PRIu64 ": table offset %" PRIu64 " (field at +16) puts the "
			  "%" PRIu64 "-entry BAT outside the %" PRIu64 "-byte image", v->name, hdr_at, v->bat_off,
			  need, limit);
		return -EINVAL;
	}
	v->n_blocks = (uint32_t)need;
	return 0;
}

/* Does a block at sector e lie inside [lo, limit) and clear of the
 * header and the BAT? */
static bool vhd_block_fits(const struct vhd *v, uint32_t e, uint64_t hdr_at, uint64_t limit)
{
	uint64_t start = (uint64_t)e * VHD_SECTOR, end = start + v->bitmap_size + v->block_size;
	uint64_t bat_end = v->bat_off + (uint64_t)v->n_blocks * 4;

	if (start < VHD_FOOTER_SIZE || end > limit)
		return false;
	if (start < hdr_at + VHD_HEADER_SIZE && end > hdr_at)
		return false;
	return !(start < bat_end && end > v->bat_off);
}

static int vhd_cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

/* No two allocated blocks may share bytes: a write to one would change
 * the other. */
static int vhd_bat_overlaps(struct vhd *v)
{
	uint32_t *s = malloc(((size_t)v->n_blocks + 1) * sizeof(*s)), n = 0;
	uint64_t span = v->bitmap_size + (uint64_t)v->block_size;
	int r = 0;

	if (!s)
		return -ENOMEM;
	for (uint32_t i = 0; i < v->n_blocks; i++)
		if (v->bat[i] != VHD_BAT_UNUSED)
			s[n++] = v->bat[i];
	qsort(s, n, sizeof(*s), vhd_cmp_u32);
	for (uint32_t i = 1; i < n && !r; i++)
		if ((uint64_t)s[i - 1] * VHD_SECTOR + span > (uint64_t)s[i] * VHD_SECTOR) {
			devio_err("%s: VHD BAT (offset %" PRIu64 "): the blocks at sectors %u and %u overlap", v->name,
				  v->bat_off, s[i - 1], s[i]);
			r = -EINVAL;
		}
	free(s);
	return r;
}

static int vhd_bat_read(struct vhd *v, uint64_t hdr_at, uint64_t limit)
{
	uint8_t *raw = malloc((size_t)v->n_blocks * 4 + 1);
	int r;

	v->bat = calloc((size_t)v->n_blocks + 1, sizeof(*v->bat));
	v->bitmaps = calloc((size_t)v->n_blocks + 1, sizeof(*v->bitmaps));
	if (!raw || !v->bat || !v->bitmaps) {
		free(raw);
		return -ENOMEM;
	}
	r = devio_layer_read(v->b.lower, raw, (uint64_t)v->n_blocks * 4, v->bat_off);
	for (uint32_t i = 0; !r && i < v->n_blocks; i++) {
		uint32_t e = vhd_be32(raw + 4 * (size_t)i);

		if (e != VHD_BAT_UNUSED && !vhd_block_fits(v, e, hdr_at, limit)) {
			devio_err("%s: VHD BAT entry %u (offset %" PRIu64 ") points at sector %u: the block would "
				  "overlap the image's metadata or pass its end (%" PRIu64 " bytes)", v->name, i,
				  v->bat_off + 4 * (uint64_t)i, e, limit);
			r = -EINVAL;
		}
		v->bat[i] = e;
	}
	free(raw);
	return r ? r : vhd_bat_overlaps(v);
}

/* ---- bitmaps ---- */

static uint32_t vhd_bat_get(struct vhd *v, uint32_t blk)
{
	return __atomic_load_n(&v->bat[blk], __ATOMIC_ACQUIRE);
}

static bool vhd_bit(const uint8_t *bm, uint32_t sec)
{
	if (bm == VHD_BITMAP_FULL || bm == VHD_BITMAP_EMPTY)
		return bm == VHD_BITMAP_FULL;
	return (__atomic_load_n(&bm[sec / 8], __ATOMIC_RELAXED) >> (7 - sec % 8)) & 1;
}

static bool vhd_bits_all(const uint8_t *bm, uint32_t first, uint32_t last)
{
	for (uint32_t s = first; bm != VHD_BITMAP_FULL && s <= last; s++)
		if (!vhd_bit(bm, s))
			return false;
	return true;
}

/* Sectors of a block: the bytes of one block carry block_size/512 bits. */
static uint32_t vhd_sectors(const struct vhd *v)
{
	return v->block_size / VHD_SECTOR;
}

static bool vhd_buf_full(const struct vhd *v, const uint8_t *bm)
{
	uint32_t n = vhd_sectors(v);

	for (uint32_t s = 0; s < n; s++)
		if (!((bm[s / 8] >> (7 - s % 8)) & 1))
			return false;
	return true;
}

/* The bitmap of allocated block blk at sector e, read once (the caller
 * holds the lock). */
static int vhd_bitmap_locked(struct vhd *v, uint32_t blk, uint32_t e, uint8_t **out)
{
	uint8_t *bm = v->bitmaps[blk];
	int r = 0;

	if (!bm) {
		bm = malloc(v->bitmap_size);
		r = bm ? devio_layer_read(v->b.lower, bm, v->bitmap_size, (uint64_t)e * VHD_SECTOR) : -ENOMEM;
		if (!r && vhd_buf_full(v, bm)) {
			free(bm);
			bm = VHD_BITMAP_FULL;
		}
		if (r) {
			free(bm);
			return r;
		}
		__atomic_store_n(&v->bitmaps[blk], bm, __ATOMIC_RELEASE);
	}
	*out = bm;
	return 0;
}

/* The same without the lock once it is loaded. */
static int vhd_bitmap(struct vhd *v, uint32_t blk, uint32_t e, uint8_t **out)
{
	uint8_t *bm = __atomic_load_n(&v->bitmaps[blk], __ATOMIC_ACQUIRE);
	int r;

	if (bm) {
		*out = bm;
		return 0;
	}
	pthread_mutex_lock(&v->lock);
	r = vhd_bitmap_locked(v, blk, e, out);
	pthread_mutex_unlock(&v->lock);
	return r;
}

/* ---- reads ---- */

/* What lies under the image at voff: the parent's bytes, or zeroes. */
static int vhd_read_below(struct vhd *v, uint8_t *buf, uint64_t len, uint64_t voff)
{
	uint64_t n = 0;
	int r = 0;

	if (v->parent && voff < v->parent->size)
		n = len < v->parent->size - voff ? len : v->parent->size - voff;
	if (n)
		r = devio_layer_read(v->parent, buf, n, voff);
	memset(buf + n, 0, (size_t)(len - n));
	return r;
}

/* Within one allocated block whose bitmap is partial: runs of present
 * sectors from the block, the rest from below. */
static int vhd_read_runs(struct vhd *v, const uint8_t *bm, uint64_t data, uint8_t *buf, uint64_t len,
			 uint64_t in, uint64_t voff)
{
	int r = 0;

	while (len && !r) {
		bool present = vhd_bit(bm, (uint32_t)(in / VHD_SECTOR));
		uint64_t n = VHD_SECTOR - in % VHD_SECTOR;

		while (n < len && vhd_bit(bm, (uint32_t)((in + n) / VHD_SECTOR)) == present)
			n += VHD_SECTOR;
		if (n > len)
			n = len;
		r = present ? devio_layer_read(v->b.lower, buf, n, data + in) : vhd_read_below(v, buf, n, voff);
		buf += n;
		in += n;
		voff += n;
		len -= n;
	}
	return r;
}

/* [voff, voff+len) inside one block. */
static int vhd_read_block(struct vhd *v, uint8_t *buf, uint64_t len, uint64_t voff)
{
	uint32_t blk = (uint32_t)(voff >> v->block_shift);
	uint64_t in = voff & (v->block_size - 1), data;
	uint32_t e = vhd_bat_get(v, blk);
	uint8_t *bm;
	int r;

	if (e == VHD_BAT_UNUSED)
		return vhd_read_below(v, buf, len, voff);
	r = vhd_bitmap(v, blk, e, &bm);
	if (r)
		return r;
	data = (uint64_t)e * VHD_SECTOR + v->bitmap_size;
	if (bm == VHD_BITMAP_FULL)
		return devio_layer_read(v->b.lower, buf, len, data + in);
	return vhd_read_runs(v, bm, data, buf, len, in, voff);
}

/* Split [off, off+len) at block boundaries and call fn for each piece. */
static int vhd_each_block(struct vhd *v, uint8_t *buf, uint64_t len, uint64_t off, uint32_t flags,
			  int (*fn)(struct vhd *, uint8_t *, uint64_t, uint64_t, uint32_t))
{
	int r = 0;

	while (len && !r) {
		uint64_t room = v->block_size - (off & (v->block_size - 1));
		uint64_t n = len < room ? len : room;

		r = fn(v, buf, n, off, flags);
		if (buf)
			buf += n;
		off += n;
		len -= n;
	}
	return r;
}

static int vhd_read_piece(struct vhd *v, uint8_t *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	(void)flags;
	return vhd_read_block(v, buf, len, off);
}

static int vhd_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	return vhd_each_block(vhd_of(b), buf, len, off, 0, vhd_read_piece);
}

/* ---- the fast path: requests moved to the image file ---- */

/* backend.h try_remap: a READ or WRITE inside one allocated block whose
 * bitmap is loaded and has every sector it touches present goes straight
 * to the block's bytes in the file.  No count of such requests is kept:
 * a freed block's bytes are never reused (new blocks always go at the
 * end), so a request racing with the TRIM that frees its block can only
 * read or write a hole nothing refers to. */
static bool vhd_try_remap(struct devio_backend *b, struct devio_request *req)
{
	struct vhd *v = vhd_of(b);
	uint32_t blk = (uint32_t)(req->offset >> v->block_shift);
	uint64_t in = req->offset & (v->block_size - 1), host;
	uint32_t e = vhd_bat_get(v, blk);
	const uint8_t *bm;

	if (in + req->length > v->block_size || e == VHD_BAT_UNUSED)
		return false;
	bm = __atomic_load_n(&v->bitmaps[blk], __ATOMIC_ACQUIRE);
	if (!bm || !vhd_bits_all(bm, (uint32_t)(in / VHD_SECTOR), (uint32_t)((in + req->length - 1) / VHD_SECTOR)))
		return false;
	host = (uint64_t)e * VHD_SECTOR + v->bitmap_size + in;
	if (host > b->lower->size || req->length > b->lower->size - host)
		return false;
	req->offset = host;
	return true;
}

/* A fixed image's bytes are the file's, at the same offsets. */
static bool vhd_fixed_try_remap(struct devio_backend *b, struct devio_request *req)
{
	(void)b;
	(void)req;
	return true;
}

/* ---- writes ---- */

static int vhd_bat_put(struct vhd *v, uint32_t blk, uint32_t e)
{
	uint8_t raw[4];
	int r;

	vhd_put_be32(raw, e);
	r = devio_layer_write(v->b.lower, raw, 4, v->bat_off + 4 * (uint64_t)blk, 0);
	if (!r)
		__atomic_store_n(&v->bat[blk], e, __ATOMIC_RELEASE);
	return r;
}

/* Set bits first..last in memory (the bitmap is a real buffer). */
static void vhd_bits_set(uint8_t *bm, uint32_t first, uint32_t last)
{
	for (uint32_t s = first; s <= last; s++)
		__atomic_fetch_or(&bm[s / 8], (uint8_t)(0x80u >> (s % 8)), __ATOMIC_RELEASE);
}

/* A write of [in, in+len) of a block, its partial edge sectors that are
 * not present completed from below, at the block's data offset. */
static int vhd_write_edges(struct vhd *v, const uint8_t *bm, uint64_t data, const uint8_t *buf,
			   uint64_t len, uint64_t in, uint64_t voff)
{
	uint64_t head = in % VHD_SECTOR, end = in + len, tail = end % VHD_SECTOR;
	uint8_t sec[VHD_SECTOR];
	int r;

	if (head && !vhd_bit(bm, (uint32_t)(in / VHD_SECTOR))) {
		uint64_t n = VHD_SECTOR - head < len ? VHD_SECTOR - head : len;

		r = vhd_read_below(v, sec, VHD_SECTOR, voff - head);
		if (r)
			return r;
		memcpy(sec + head, buf, (size_t)n);
		r = devio_layer_write(v->b.lower, sec, VHD_SECTOR, data + in - head, 0);
		if (r || n == len)
			return r;
		buf += n;
		in += n;
		voff += n;
		len -= n;
	}
	if (tail && len >= tail && !vhd_bit(bm, (uint32_t)(end / VHD_SECTOR))) {
		r = vhd_read_below(v, sec, VHD_SECTOR, voff + len - tail);
		if (r)
			return r;
		memcpy(sec, buf + len - tail, (size_t)tail);
		r = devio_layer_write(v->b.lower, sec, VHD_SECTOR, data + end - tail, 0);
		if (r)
			return r;
		len -= tail;
	}
	return len ? devio_layer_write(v->b.lower, buf, len, data + in, 0) : 0;
}

/* Let the store reach size bytes; the first refusal is logged, once. */
static int vhd_grow(struct vhd *v, uint64_t size)
{
	int r = devio_layer_grow(v->b.lower, size);

	if (r && !v->told_full) {
		v->told_full = true;
		devio_err("%s: cannot append a VHD block (the image would reach %" PRIu64 " bytes): %s", v->name,
			  size, r == -EOPNOTSUPP ? "this store cannot grow (a window, a device or a remote server)"
						 : strerror(-r));
	}
	return r == -EOPNOTSUPP ? -ENOSPC : r;
}

/* The bitmap of a new block, in a buffer the caller frees: every bit set
 * for a dynamic image (so is every byte of the block: past the file's end
 * they are zeroes), only the written sectors for a differencing one. */
static uint8_t *vhd_new_bitmap(struct vhd *v, uint64_t in, uint64_t len)
{
	uint8_t *bm = calloc(1, v->bitmap_size);

	if (!bm)
		return NULL;
	if (!v->parent)
		memset(bm, 0xff, (v->block_size / VHD_SECTOR + 7) / 8);
	else
		vhd_bits_set(bm, (uint32_t)(in / VHD_SECTOR), (uint32_t)((in + len - 1) / VHD_SECTOR));
	return bm;
}

/* Publish a new block's bitmap in memory: in place of an older buffer
 * (the block was freed before: a reader may still hold it), else new. */
static void vhd_bitmap_publish(struct vhd *v, uint32_t blk, uint8_t *bm)
{
	uint8_t *old = v->bitmaps[blk];

	if (!v->parent) {
		if (old && old != VHD_BITMAP_FULL)
			vhd_bits_set(old, 0, vhd_sectors(v) - 1);
		else
			__atomic_store_n(&v->bitmaps[blk], VHD_BITMAP_FULL, __ATOMIC_RELEASE);
		free(bm);
	} else if (old && old != VHD_BITMAP_FULL) {
		for (uint32_t i = 0; i < v->bitmap_size; i++)
			__atomic_store_n(&old[i], bm[i], __ATOMIC_RELEASE);
		free(bm);
	} else {
		__atomic_store_n(&v->bitmaps[blk], bm, __ATOMIC_RELEASE);
	}
}

/* Steps 1-3 of the allocation order (opening comment): the footer at the
 * new end, the bitmap and data, the barrier. */
static int vhd_fill_block(struct vhd *v, uint64_t pos, const uint8_t *bm, const uint8_t *buf, uint64_t len,
			  uint64_t in, uint64_t voff)
{
	uint64_t end = pos + v->bitmap_size + v->block_size;
	int r;

	r = devio_layer_write(v->b.lower, v->footer, VHD_FOOTER_SIZE, end, 0);
	if (r)
		return r; /* nothing refers to [pos, end]: the next try writes the same footer there */
	v->next_alloc = end; /* from here on a failure leaks the block, nothing worse */
	r = devio_layer_write(v->b.lower, bm, v->bitmap_size, pos, 0);
	if (!r) /* no sector of the block was there before: edges from below */
		r = vhd_write_edges(v, v->parent ? VHD_BITMAP_EMPTY : VHD_BITMAP_FULL, pos + v->bitmap_size, buf,
				    len, in, voff);
	if (!r && !__atomic_load_n(&v->unordered, __ATOMIC_ACQUIRE))
		r = devio_layer_flush(v->b.lower);
	return r;
}

/* Allocate block blk for a write of [in, in+len) of it (under the lock). */
static int vhd_alloc(struct vhd *v, uint32_t blk, const uint8_t *buf, uint64_t len, uint64_t in, uint64_t voff)
{
	uint64_t pos = (v->next_alloc + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
	uint64_t end = pos + v->bitmap_size + v->block_size;
	uint8_t *bm;
	int r;

	if (pos / VHD_SECTOR >= VHD_BAT_UNUSED) {
		devio_err("%s: VHD image full: a block at offset %" PRIu64 " is past what a BAT entry can address",
			  v->name, pos);
		return -ENOSPC;
	}
	r = vhd_grow(v, end + VHD_FOOTER_SIZE);
	if (r)
		return r;
	bm = vhd_new_bitmap(v, in, len);
	if (!bm)
		return -ENOMEM;
	r = vhd_fill_block(v, pos, bm, buf, len, in, voff);
	if (r) {
		free(bm);
		return r;
	}
	/* the bitmap before the BAT entry: a reader that sees the entry finds
	 * it (while the entry is unused, nobody looks at it) */
	vhd_bitmap_publish(v, blk, bm);
	return vhd_bat_put(v, blk, (uint32_t)(pos / VHD_SECTOR));
}

/* Set the bits of sectors first..last of an allocated block, on disk,
 * after a barrier: the data they make visible is durable first. */
static int vhd_bitmap_update(struct vhd *v, uint32_t e, uint8_t *bm, uint32_t first, uint32_t last)
{
	uint8_t *copy;
	int r;

	if (bm == VHD_BITMAP_FULL)
		return 0;
	r = devio_layer_flush(v->b.lower);
	if (r)
		return r;
	copy = malloc(v->bitmap_size);
	if (!copy)
		return -ENOMEM;
	for (uint32_t i = 0; i < v->bitmap_size; i++)
		copy[i] = __atomic_load_n(&bm[i], __ATOMIC_RELAXED);
	vhd_bits_set(copy, first, last);
	r = devio_layer_write(v->b.lower, copy, v->bitmap_size, (uint64_t)e * VHD_SECTOR, 0);
	if (!r)
		vhd_bits_set(bm, first, last);
	free(copy);
	return r;
}

/* A write that allocates or changes a bitmap (under the lock). */
static int vhd_write_locked(struct vhd *v, const uint8_t *buf, uint64_t len, uint64_t voff)
{
	uint32_t blk = (uint32_t)(voff >> v->block_shift);
	uint64_t in = voff & (v->block_size - 1);
	uint32_t e = vhd_bat_get(v, blk), first = (uint32_t)(in / VHD_SECTOR);
	uint32_t last = (uint32_t)((in + len - 1) / VHD_SECTOR);
	uint8_t *bm;
	int r;

	if (e == VHD_BAT_UNUSED) {
		if (!v->parent && vhd_is_zero(buf, len))
			return 0; /* reads as zeroes already */
		return vhd_alloc(v, blk, buf, len, in, voff);
	}
	r = vhd_bitmap_locked(v, blk, e, &bm);
	if (!r)
		r = vhd_write_edges(v, bm, (uint64_t)e * VHD_SECTOR + v->bitmap_size, buf, len, in, voff);
	if (!r && !vhd_bits_all(bm, first, last))
		r = vhd_bitmap_update(v, e, bm, first, last);
	return r;
}

/* [voff, voff+len) inside one block: straight to the block where every
 * sector it touches is present, else under the lock. */
static int vhd_write_block(struct vhd *v, uint8_t *buf, uint64_t len, uint64_t voff, uint32_t flags)
{
	uint32_t blk = (uint32_t)(voff >> v->block_shift);
	uint64_t in = voff & (v->block_size - 1);
	uint32_t e = vhd_bat_get(v, blk);
	uint8_t *bm = NULL;
	int r;

	(void)flags;
	if (e != VHD_BAT_UNUSED) {
		r = vhd_bitmap(v, blk, e, &bm);
		if (r)
			return r;
		if (vhd_bits_all(bm, (uint32_t)(in / VHD_SECTOR), (uint32_t)((in + len - 1) / VHD_SECTOR)))
			return devio_layer_write(v->b.lower, buf, len, (uint64_t)e * VHD_SECTOR + v->bitmap_size + in, 0);
	}
	pthread_mutex_lock(&v->lock);
	r = vhd_write_locked(v, buf, len, voff);
	pthread_mutex_unlock(&v->lock);
	return r;
}

static int vhd_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	return vhd_each_block(vhd_of(b), (uint8_t *)buf, len, off, flags, vhd_write_block);
}

static int vhd_flush(struct devio_backend *b)
{
	__atomic_store_n(&vhd_of(b)->unordered, false, __ATOMIC_RELEASE); /* ordered from here on */
	return devio_layer_flush(b->lower);
}

/* ---- trim, zero ---- */

/* Free allocated block blk of a dynamic image (under the lock): the BAT
 * entry first, then the block's bytes go back to the store if it can. */
static int vhd_free_block(struct vhd *v, uint32_t blk)
{
	uint32_t e = vhd_bat_get(v, blk);
	int r;

	if (e == VHD_BAT_UNUSED)
		return 0;
	r = vhd_bat_put(v, blk, VHD_BAT_UNUSED);
	if (!r && (v->b.lower->caps & DEVIO_CAP_TRIM))
		(void)devio_layer_trim(v->b.lower, (uint64_t)e * VHD_SECTOR, v->bitmap_size + v->block_size, 0);
	return r;
}

/* Zeroes written over [voff, voff+len) inside one block. */
static int vhd_write_zeroes(struct vhd *v, uint64_t len, uint64_t voff)
{
	static const uint8_t zeroes[VHD_ZERO_CHUNK];
	int r = 0;

	while (len && !r) {
		uint64_t n = len < VHD_ZERO_CHUNK ? len : VHD_ZERO_CHUNK;

		r = vhd_write_block(v, (uint8_t *)zeroes, n, voff, 0);
		voff += n;
		len -= n;
	}
	return r;
}

static int vhd_zero_block(struct vhd *v, uint8_t *unused, uint64_t len, uint64_t voff, uint32_t flags)
{
	uint32_t blk = (uint32_t)(voff >> v->block_shift);
	bool whole = (voff & (v->block_size - 1)) == 0 && (len == v->block_size || voff + len == v->b.size);
	int r;

	(void)unused;
	if (!v->parent && vhd_bat_get(v, blk) == VHD_BAT_UNUSED)
		return 0;
	if (v->parent || !whole || (flags & DEVIO_REQ_NO_HOLE))
		return vhd_write_zeroes(v, len, voff);
	pthread_mutex_lock(&v->lock);
	r = vhd_free_block(v, blk);
	pthread_mutex_unlock(&v->lock);
	return r;
}

static int vhd_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	return vhd_each_block(vhd_of(b), NULL, len, off, flags & ~DEVIO_REQ_NO_HOLE, vhd_zero_block);
}

static int vhd_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	if (flags & DEVIO_REQ_FAST_ZERO)
		return -EOPNOTSUPP; /* not offered: some zeroes are written */
	return vhd_each_block(vhd_of(b), NULL, len, off, flags, vhd_zero_block);
}

/* ---- extents ---- */

/* Consecutive extents with the same flags, merged before they are told. */
struct vhd_emit {
	devio_extent_fn fn;
	void *ctx;
	uint64_t off, len;
	uint32_t flags;
	bool stop;   /* the parent or the store stopped early: so do we */
};

static int vhd_emit_flush(struct vhd_emit *em)
{
	int r = em->len ? em->fn(em->ctx, em->off, em->len, em->flags) : 0;

	em->off += em->len;
	em->len = 0;
	return r;
}

static int vhd_emit(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct vhd_emit *em = ctx;
	int r = 0;

	if (em->len && em->flags != flags)
		r = vhd_emit_flush(em);
	if (!em->len) {
		em->off = off;
		em->flags = flags;
	}
	em->len += len;
	return r;
}

/* An unallocated piece: the parent's extents where it has bytes. */
static int vhd_extents_below(struct vhd *v, uint64_t off, uint64_t len, struct vhd_emit *em)
{
	uint64_t n = 0, want;
	int r;

	if (v->parent && off < v->parent->size)
		n = len < v->parent->size - off ? len : v->parent->size - off;
	if (n) {
		want = em->off + em->len + n;
		r = devio_extents(v->parent, off, n, vhd_emit, em);
		if (r)
			return r;
		if (em->off + em->len < want) {
			em->stop = true;
			return 0;
		}
	}
	return len > n ? vhd_emit(em, off + n, len - n, DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO) : 0;
}

/* The store's extents under an allocated block's data, told at the
 * virtual offsets they stand for. */
struct vhd_shift {
	struct vhd_emit *em;
	uint64_t lower_base, virt_base;
};

static int vhd_emit_shifted(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct vhd_shift *s = ctx;

	return vhd_emit(s->em, off - s->lower_base + s->virt_base, len, flags);
}

/* An allocated piece: where every sector is in the block, the holes of
 * the file under it (a block devio appends is sparse until written). */
static int vhd_extents_block(struct vhd *v, uint32_t e, uint64_t off, uint64_t len, struct vhd_emit *em)
{
	struct vhd_shift s = { em, (uint64_t)e * VHD_SECTOR + v->bitmap_size + (off & (v->block_size - 1)), off };
	uint64_t want = em->off + em->len + len;
	uint8_t *bm;
	int r = vhd_bitmap(v, (uint32_t)(off >> v->block_shift), e, &bm);

	if (r || bm != VHD_BITMAP_FULL || !(v->b.lower->caps & DEVIO_CAP_EXTENTS))
		return r ? r : vhd_emit(em, off, len, 0);
	r = devio_extents(v->b.lower, s.lower_base, len, vhd_emit_shifted, &s);
	if (!r && em->off + em->len < want)
		em->stop = true;
	return r;
}

static int vhd_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	struct vhd *v = vhd_of(b);
	struct vhd_emit em = { fn, ctx, off, 0, 0, false };
	int r = 0;

	while (len && !r && !em.stop) {
		uint64_t room = v->block_size - (off & (v->block_size - 1));
		uint64_t n = len < room ? len : room;

		uint32_t e = vhd_bat_get(v, (uint32_t)(off >> v->block_shift));

		if (e != VHD_BAT_UNUSED)
			r = vhd_extents_block(v, e, off, n, &em);
		else
			r = vhd_extents_below(v, off, n, &em);
		off += n;
		len -= n;
	}
	return r ? r : vhd_emit_flush(&em);
}

/* ---- fixed images: the bytes before the footer ---- */

static int vhd_fixed_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	return devio_layer_read(b->lower, buf, len, off);
}

static int vhd_fixed_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	return devio_layer_write(b->lower, buf, len, off, flags & ~DEVIO_REQ_FUA);
}

static int vhd_fixed_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	return devio_layer_trim(b->lower, off, len, flags & ~DEVIO_REQ_FUA);
}

static int vhd_fixed_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	return devio_layer_zero(b->lower, off, len, flags & ~DEVIO_REQ_FUA);
}

static int vhd_fixed_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	return devio_extents(b->lower, off, len, fn, ctx);
}

/* ---- describe, close ---- */

static void vhd_describe(struct devio_backend *b, char *out, size_t outlen)
{
	struct vhd *v = vhd_of(b);
	const char *kind = v->type == VHD_TYPE_FIXED ? "fixed" : v->parent ? "differencing" : "dynamic";
	char lower[256] = "";
	uint32_t used = 0;

	for (uint32_t i = 0; i < v->n_blocks; i++)
		used += vhd_bat_get(v, i) != VHD_BAT_UNUSED;
	if (b->lower->ops->describe)
		b->lower->ops->describe(b->lower, lower, sizeof(lower));
	if (v->type == VHD_TYPE_FIXED)
		snprintf(out, outlen, "VHD %s: %" PRIu64 " bytes, in %s", kind, b->size, lower);
	else
		snprintf(out, outlen, "VHD %s: %" PRIu64 " bytes, %u of %u blocks of %u bytes allocated%s%s, in %s",
			 kind, b->size, used, v->n_blocks, v->block_size, v->parent ? ", parent " : "",
			 v->parent ? v->parent_path : "", lower);
}

static void vhd_free(struct vhd *v)
{
	for (uint32_t i = 0; v->bitmaps && i < v->n_blocks; i++)
		if (v->bitmaps[i] != VHD_BITMAP_FULL)
			free(v->bitmaps[i]);
	if (v->parent)
		devio_backend_close(v->parent);
	pthread_mutex_destroy(&v->lock);
	free(v->bitmaps);
	free(v->bat);
	free(v->parent_path);
	free(v->name);
	free(v);
}

static void vhd_close(struct devio_backend *b)
{
	vhd_free(vhd_of(b));
}

static const struct devio_backend_ops vhd_fixed_ops = {
	.name = "vhd",
	.pread = vhd_fixed_pread,
	.pwrite = vhd_fixed_pwrite,
	.try_remap = vhd_fixed_try_remap,
	.flush = vhd_flush,
	.trim = vhd_fixed_trim,
	.zero = vhd_fixed_zero,
	.extents = vhd_fixed_extents,
	.describe = vhd_describe,
	.close = vhd_close,
};

static const struct devio_backend_ops vhd_dynamic_ops = {
	.name = "vhd",
	.pread = vhd_pread,
	.pwrite = vhd_pwrite,
	.try_remap = vhd_try_remap,
	.flush = vhd_flush,
	.trim = vhd_trim,
	.zero = vhd_zero,
	.extents = vhd_extents,
	.describe = vhd_describe,
	.close = vhd_close,
};

/* ---- parent locators ---- */

/* Append code point c as UTF-8; false if it does not fit. */
static bool vhd_utf8_put(char *out, size_t cap, size_t *n, uint32_t c)
{
	uint8_t tmp[4];
	size_t k = 0;

	if (c < 0x80) {
		tmp[k++] = (uint8_t)c;
	} else if (c < 0x800) {
		tmp[k++] = (uint8_t)(0xC0 | c >> 6);
		tmp[k++] = (uint8_t)(0x80 | (c & 0x3F));
	} else if (c < 0x10000) {
		tmp[k++] = (uint8_t)(0xE0 | c >> 12);
		tmp[k++] = (uint8_t)(0x80 | ((c >> 6) & 0x3F));
		tmp[k++] = (uint8_t)(0x80 | (c & 0x3F));
	} else {
		tmp[k++] = (uint8_t)(0xF0 | c >> 18);
		tmp[k++] = (uint8_t)(0x80 | ((c >> 12) & 0x3F));
		tmp[k++] = (uint8_t)(0x80 | ((c >> 6) & 0x3F));
		tmp[k++] = (uint8_t)(0x80 | (c & 0x3F));
	}
	if (*n + k >= cap)
		return false;
	memcpy(out + *n, tmp, k);
	*n += k;
	return true;
}

/* UTF-16LE (Windows locators) to a NUL-terminated UTF-8 string, stopping
 * at a NUL; false for unpaired surrogates or no room. */
static bool vhd_utf16le_to_utf8(const uint8_t *in, size_t len, char *out, size_t cap)
{
	size_t n = 0;

	for (size_t i = 0; i + 1 < len; i += 2) {
		uint32_t c = (uint32_t)in[i] | (uint32_t)in[i + 1] << 8;

		if (c == 0)
			break;
		if (c >= 0xD800 && c < 0xDC00) {
			uint32_t lo = i + 3 < len ? ((uint32_t)in[i + 2] | (uint32_t)in[i + 3] << 8) : 0;

			if (lo < 0xDC00 || lo >= 0xE000)
				return false;
			c = 0x10000 + ((c - 0xD800) << 10) + (lo - 0xDC00);
			i += 2;
		} else if (c >= 0xDC00 && c < 0xE000) {
			return false;
		}
		if (!vhd_utf8_put(out, cap, &n, c))
			return false;
	}
	out[n] = 0;
	return n > 0;
}

/* A locator's bytes as a path on this system, or false (logged at debug
 * level: another locator may do). */
static bool vhd_locator_path(uint32_t code, const uint8_t *data, size_t len, char *out, size_t cap)
{
	char *p;

	if (code == VHD_PLAT_MACX) {
		if (len >= cap || memchr(data, 0, len))
			return false;
		memcpy(out, data, len);
		out[len] = 0;
		p = !strncmp(out, "file://localhost/", 17) ? out + 16 : !strncmp(out, "file:///", 8) ? out + 7 : NULL;
		if (!p)
			return false;
		memmove(out, p, strlen(p) + 1);
		return true;
	}
	if (!vhd_utf16le_to_utf8(data, len, out, cap))
		return false;
	for (p = out; *p; p++)
		if (*p == '\\')
			*p = '/';
	if (code == VHD_PLAT_W2KU)
		return out[0] == '/'; /* "C:/..." is not a path here */
	return out[0] != '/' && !(out[0] && out[1] == ':'); /* W2ru: relative */
}

/* Resolve a locator's path against the child's folder into out. */
static bool vhd_resolve(const char *child, uint32_t code, const char *path, char *out, size_t cap)
{
	const char *slash = strrchr(child, '/');
	int n;

	if (code != VHD_PLAT_W2RU || !slash)
		n = snprintf(out, cap, "%s", path);
	else
		n = snprintf(out, cap, "%.*s/%s", (int)(slash - child), child, path);
	return n > 0 && (size_t)n < cap;
}

/* Which locator to try first: relative, then file URL, then absolute. */
static int vhd_locator_rank(uint32_t code)
{
	return code == VHD_PLAT_W2RU ? 0 : code == VHD_PLAT_MACX ? 1 : code == VHD_PLAT_W2KU ? 2 : -1;
}

/* One locator entry (24 bytes at +576 + 24 * i of the header) read and
 * resolved into out: 0, 1 (not usable here), or a negative errno. */
static int vhd_locator_read(struct vhd *v, const uint8_t *ent, uint64_t limit, uint64_t ent_at, char *out,
			    size_t cap)
{
	uint32_t code = vhd_be32(ent), len = vhd_be32(ent + 8);
	uint64_t at = vhd_be64(ent + 16);
	char path[PATH_MAX];
	uint8_t *data;
	int r;

	if (vhd_locator_rank(code) < 0 || len == 0)
		return 1;
	if (len > VHD_MAX_LOCATOR || at > limit || limit - at < len) {
		devio_err("%s: VHD parent locator at offset %" PRIu64 ": %u bytes at offset %" PRIu64 " lie outside "
			  "the image or exceed %u bytes", v->name, ent_at, len, at, VHD_MAX_LOCATOR);
		return -EINVAL;
	}
	data = malloc(len);
	if (!data)
		return -ENOMEM;
	r = devio_layer_read(v->b.lower, data, len, at);
	if (!r)
		r = vhd_locator_path(code, data, len, path, sizeof(path)) &&
		    vhd_resolve(v->name, code, path, out, cap) ? 0 : 1;
	free(data);
	return r;
}

/* The parent's path: the best locator that names an existing file. */
static int vhd_parent_path(struct vhd *v, const uint8_t *h, uint64_t hdr_at, uint64_t limit, char *out,
			   size_t cap)
{
	struct stat st;

	for (int rank = 0; rank < 3; rank++) {
		for (int i = 0; i < VHD_N_LOCATORS; i++) {
			const uint8_t *ent = h + 576 + 24 * i;
			int r;

			if (vhd_locator_rank(vhd_be32(ent)) != rank)
				continue;
			r = vhd_locator_read(v, ent, limit, hdr_at + 576 + 24 * (uint64_t)i, out, cap);
			if (r < 0)
				return r;
			if (r == 0 && stat(out, &st) == 0 && (S_ISREG(st.st_mode) || S_ISBLK(st.st_mode)))
				return 0;
			if (r == 0)
				devio_info("%s: VHD parent locator %d names %s: no image file there", v->name, i, out);
		}
	}
	devio_err("%s: differencing VHD: no parent locator (header at offset %" PRIu64 ", entries at +576) names "
		  "an image that exists here", v->name, hdr_at);
	return -ENOENT;
}

/* ---- opening ---- */

static int vhd_open_image(const char *name, struct devio_backend *lower, bool named,
			  const struct devio_open_opts *opts, struct vhd_chain *chain, struct devio_backend **out);

/* Is this file already in the chain?  Adds it if not. */
static int vhd_chain_add(struct vhd_chain *chain, const char *path)
{
	struct stat st;

	if (stat(path, &st))
		return -errno;
	for (int i = 0; i < chain->depth; i++)
		if (chain->ids[i].dev == st.st_dev && chain->ids[i].ino == st.st_ino)
			return -ELOOP;
	if (chain->depth > VHD_MAX_DEPTH)
		return -EMLINK;
	chain->ids[chain->depth].dev = st.st_dev;
	chain->ids[chain->depth].ino = st.st_ino;
	chain->depth++;
	return 0;
}

/* Open the parent at path read-only, as a VHD, and check that it is the
 * image the child was made from. */
static int vhd_parent_open(struct vhd *v, const uint8_t *h, const char *path, const struct devio_open_opts *opts,
			   struct vhd_chain *chain)
{
	struct devio_open_opts po = { .readonly = true, .direct = opts->direct, .format = "vhd" };
	struct devio_backend *store;
	int r = vhd_chain_add(chain, path);

	if (r == -ELOOP || r == -EMLINK)
		devio_err("%s: VHD parent %s: %s", v->name, path, r == -ELOOP ? "the chain of parents loops"
			  : "the chain of parents is deeper than 16");
	if (r)
		return r == -ELOOP || r == -EMLINK ? -EINVAL : r;
	r = devio_file_open(path, &po, &store);
	if (r)
		return r;
	r = vhd_open_image(path, store, true, &po, chain, &v->parent);
	if (r) {
		devio_backend_close(store);
		return r;
	}
	if (memcmp(vhd_of(v->parent)->footer + 68, h + 40, 16)) {
		devio_err("%s: VHD parent %s is not the image this one was made from (its unique id differs from "
			  "the header's parent unique id at +40)", v->name, path);
		return -EINVAL;
	}
	v->parent_path = strdup(path);
	return v->parent_path ? 0 : -ENOMEM;
}

static int vhd_differencing(struct vhd *v, const uint8_t *h, uint64_t hdr_at, uint64_t limit, bool named,
			    const struct devio_open_opts *opts, struct vhd_chain *chain)
{
	char path[PATH_MAX];
	int r;

	if (!named) {
		devio_err("%s: a differencing VHD: it names a parent image, which devio opens only when the format "
			  "is named (devio serve IMAGE --format vhd ...); --format raw or ImDisk's --novhd serve the "
			  "container's bytes", v->name);
		return -EINVAL;
	}
	if (strstr(v->name, "://") || !strncmp(v->name, "ram:", 4)) {
		devio_err("%s: a differencing VHD's parent is found next to a local image file only", v->name);
		return -EINVAL;
	}
	if (chain->depth == 0) {
		r = vhd_chain_add(chain, v->name);
		if (r)
			return r;
	}
	r = vhd_parent_path(v, h, hdr_at, limit, path, sizeof(path));
	return r ? r : vhd_parent_open(v, h, path, opts, chain);
}

/* Where the next block goes: after the end footer's place, or past the
 * end of a file whose end footer was lost. */
static void vhd_next_alloc(struct vhd *v, bool at_end)
{
	uint64_t size = v->b.lower->size;

	v->next_alloc = at_end ? size - VHD_FOOTER_SIZE : size;
}

static int vhd_open_dynamic(struct vhd *v, bool at_end, bool named, const struct devio_open_opts *opts,
			    struct vhd_chain *chain)
{
	uint64_t limit = at_end ? v->b.lower->size - VHD_FOOTER_SIZE : v->b.lower->size;
	uint64_t hdr_at = vhd_be64(v->footer + 16);
	uint8_t h[VHD_HEADER_SIZE];
	int r;

	r = vhd_header_read(v, limit, h);
	if (!r)
		r = vhd_geometry(v, h, hdr_at, limit);
	if (!r)
		r = vhd_bat_read(v, hdr_at, limit);
	if (!r && v->type == VHD_TYPE_DIFF)
		r = vhd_differencing(v, h, hdr_at, limit, named, opts, chain);
	vhd_next_alloc(v, at_end);
	return r;
}

static int vhd_open_fixed(struct vhd *v, bool at_end)
{
	if (!at_end || v->b.size > v->b.lower->size - VHD_FOOTER_SIZE) {
		devio_err("%s: fixed VHD: current size %" PRIu64 " (footer field at +48) does not fit before the "
			  "footer at offset %" PRIu64, v->name, v->b.size, v->b.lower->size - VHD_FOOTER_SIZE);
		return -EINVAL;
	}
	return 0;
}

/* The layer's geometry and capabilities over lower. */
static void vhd_init_layer(struct vhd *v, struct devio_backend *lower)
{
	const uint32_t fixed_keep = DEVIO_CAP_READONLY | DEVIO_CAP_FLUSH | DEVIO_CAP_FUA | DEVIO_CAP_TRIM |
				    DEVIO_CAP_ZERO | DEVIO_CAP_FAST_ZERO | DEVIO_CAP_EXTENTS |
				    DEVIO_CAP_MULTI_CONN | DEVIO_CAP_CACHE;
	const uint32_t dyn_keep = DEVIO_CAP_READONLY | DEVIO_CAP_FLUSH | DEVIO_CAP_FUA | DEVIO_CAP_MULTI_CONN |
				  DEVIO_CAP_CACHE;
	bool fixed = v->type == VHD_TYPE_FIXED;

	devio_layer_init(&v->b, fixed ? &vhd_fixed_ops : &vhd_dynamic_ops, lower, fixed ? fixed_keep : dyn_keep, v);
	if (!fixed)
		v->b.caps |= DEVIO_CAP_ZERO | DEVIO_CAP_EXTENTS;
	v->b.caps |= lower->caps & DEVIO_CAP_SPLICE_READ; /* where try_remap moves them (backend.h) */
	/* TRIM reads back as zeroes here (FUSE's punch relies on it): in a
	 * differencing image that means writing them, which a client that
	 * discards a whole disk (mkfs) should not be invited to do */
	if (v->type == VHD_TYPE_DYNAMIC)
		v->b.caps |= DEVIO_CAP_TRIM;
	if (v->b.block_size < VHD_SECTOR)
		v->b.block_size = VHD_SECTOR;
	v->b.size = vhd_be64(v->footer + 48);
}

static int vhd_open_image(const char *name, struct devio_backend *lower, bool named,
			  const struct devio_open_opts *opts, struct vhd_chain *chain, struct devio_backend **out)
{
	struct vhd *v;
	bool at_end = false;
	int r;

	if (lower->size < VHD_FOOTER_SIZE) {
		devio_err("%s: %" PRIu64 " bytes: too small for a VHD image", name, lower->size);
		return -EINVAL;
	}
	v = calloc(1, sizeof(*v));
	if (!v || !(v->name = strdup(name))) {
		free(v);
		return -ENOMEM;
	}
	pthread_mutex_init(&v->lock, NULL);
	r = vhd_footer_read(name, lower, v->footer, &at_end);
	if (!r) {
		v->type = vhd_be32(v->footer + 60);
		vhd_init_layer(v, lower);
		if (v->type == VHD_TYPE_FIXED)
			r = vhd_open_fixed(v, at_end);
		else if (v->type == VHD_TYPE_DYNAMIC || v->type == VHD_TYPE_DIFF)
			r = vhd_open_dynamic(v, at_end, named, opts, chain);
		else
			devio_err("%s: VHD footer: disk type %u (field at +60) is none of fixed (2), dynamic (3), "
				  "differencing (4)", name, v->type), r = -EINVAL;
	}
	if (r) {
		vhd_free(v);
		return r;
	}
	*out = &v->b;
	return 0;
}

int devio_vhd_open(const char *name, struct devio_backend *lower, bool named, const struct devio_open_opts *opts,
		   struct devio_backend **out)
{
	static const struct devio_open_opts none;
	struct vhd_chain chain = { 0 };

	return vhd_open_image(name, lower, named, opts ? opts : &none, &chain, out);
}

/* ---- creating images ---- */

#define VHD_NEW_BLOCK  (2u << 20)             /* as qemu and Windows make them */
#define VHD_NEW_MAX    (2040ull << 30)        /* qemu's and Windows' largest VHD */
#define VHD_EPOCH      946684800              /* 2000-01-01 00:00:00 UTC, the timestamps' zero */
#define VHD_CHS_MAX    (65535ull * 16 * 255)  /* sectors of the largest geometry */
#define VHD_CHS(c, h, s) ((uint32_t)(c) << 16 | (uint32_t)(h) << 8 | (uint32_t)(s))

static void vhd_put_be64(uint8_t *p, uint64_t v)
{
	vhd_put_be32(p, (uint32_t)(v >> 32));
	vhd_put_be32(p + 4, (uint32_t)v);
}

/* The specification's CHS calculation (its appendix), as the footer's
 * field holds it: cylinders << 16 | heads << 8 | sectors per track. */
uint32_t devio_vhd_chs(uint64_t sectors)
{
	uint64_t spt, heads, cth;

	if (sectors > VHD_CHS_MAX)
		sectors = VHD_CHS_MAX;
	if (sectors >= 65535ull * 16 * 63)
		return VHD_CHS(sectors / 255 / 16, 16, 255);
	spt = 17;
	cth = sectors / spt;
	heads = (cth + 1023) / 1024;
	if (heads < 4)
		heads = 4;
	if (cth >= heads * 1024 || heads > 16) {
		spt = 31;
		heads = 16;
		cth = sectors / spt;
	}
	if (cth >= heads * 1024) {
		spt = 63;
		heads = 16;
		cth = sectors / spt;
	}
	return VHD_CHS(cth / heads, heads, spt);
}

static uint64_t vhd_chs_sectors(uint32_t chs)
{
	return (uint64_t)(chs >> 16) * ((chs >> 8) & 0xff) * (chs & 0xff);
}

/* The geometry a new image of `sectors` gets: the specification's when it
 * holds exactly that many sectors.  Otherwise the largest (65535/16/255),
 * which tells qemu to take the size from the current size field (as
 * Windows always does, and as qemu-img's force_size=on writes it); a
 * geometry smaller than the disk would make qemu cut its end off. */
static uint32_t vhd_new_chs(const char *path, uint64_t sectors)
{
	uint32_t chs = devio_vhd_chs(sectors);

	if (vhd_chs_sectors(chs) == sectors || sectors >= VHD_CHS_MAX)
		return chs;
	devio_warn("%s: %" PRIu64 " bytes is no whole CHS geometry (the VHD specification's is %u/%u/%u, %" PRIu64
		   " bytes): the footer says 65535/16/255, so that qemu takes the size from the current size "
		   "field as Windows does (qemu-img's force_size=on); Virtual PC would see another size", path,
		   sectors * VHD_SECTOR, chs >> 16, (chs >> 8) & 0xff, chs & 0xff,
		   vhd_chs_sectors(chs) * VHD_SECTOR);
	return VHD_CHS(65535, 16, 255);
}

/* qemu-img's default (force_size=off): sectors rounded up to the first
 * whole geometry that holds them, which Virtual PC sees as qemu does.
 * Past the largest geometry, sectors themselves. */
static uint64_t vhd_chs_round_up(uint64_t sectors)
{
	for (uint64_t n = sectors; n < VHD_CHS_MAX; n++) {
		uint64_t got = vhd_chs_sectors(devio_vhd_chs(n));

		if (got >= sectors)
			return got;
	}
	return sectors;
}

/* A new image's footer: a fresh unique id, the time, devio as creator. */
static int vhd_new_footer(const char *path, uint8_t *f, uint64_t size, bool fixed)
{
	uint8_t *uid = f + 68;

	memset(f, 0, VHD_FOOTER_SIZE);
	if (getrandom(uid, 16, 0) != 16) {
		int r = -errno;

		devio_err("%s: no random bytes for the VHD's unique id: %s", path, strerror(-r));
		return r;
	}
	uid[6] = (uint8_t)((uid[6] & 0x0f) | 0x40); /* a version 4 (random) UUID */
	uid[8] = (uint8_t)((uid[8] & 0x3f) | 0x80);
	memcpy(f, "conectix", 8);
	vhd_put_be32(f + 8, 2);                     /* features: the reserved bit, always set */
	vhd_put_be32(f + 12, 0x10000);              /* file format version 1.0 */
	vhd_put_be64(f + 16, fixed ? UINT64_MAX : VHD_FOOTER_SIZE);
	vhd_put_be32(f + 24, (uint32_t)(time(NULL) - VHD_EPOCH));
	memcpy(f + 28, "dvio", 4);                  /* creator application */
	vhd_put_be32(f + 32, 0x10000);              /* its version */
	memcpy(f + 36, "Wi2k", 4);                  /* creator host OS, as qemu writes it */
	vhd_put_be64(f + 40, size);                 /* original size */
	vhd_put_be64(f + 48, size);                 /* current size */
	vhd_put_be32(f + 56, vhd_new_chs(path, size / VHD_SECTOR));
	vhd_put_be32(f + 60, fixed ? VHD_TYPE_FIXED : VHD_TYPE_DYNAMIC);
	vhd_put_be32(f + 64, vhd_checksum(f, VHD_FOOTER_SIZE, 64));
	return 0;
}

/* A dynamic image's metadata: footer copy, header, BAT (all unused),
 * footer; *len its bytes.  NULL if out of memory. */
static uint8_t *vhd_new_dynamic(const uint8_t *f, uint64_t size, size_t *len)
{
	uint32_t entries = (uint32_t)((size + VHD_NEW_BLOCK - 1) / VHD_NEW_BLOCK);
	size_t bat = ((size_t)entries * 4 + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
	size_t bat_off = VHD_FOOTER_SIZE + VHD_HEADER_SIZE;
	uint8_t *p, *h;

	*len = bat_off + bat + VHD_FOOTER_SIZE;
	p = calloc(1, *len);
	if (!p)
		return NULL;
	h = p + VHD_FOOTER_SIZE;
	memcpy(p, f, VHD_FOOTER_SIZE);
	memcpy(h, "cxsparse", 8);
	vhd_put_be64(h + 8, UINT64_MAX);            /* no further header */
	vhd_put_be64(h + 16, bat_off);
	vhd_put_be32(h + 24, 0x10000);              /* header version 1.0 */
	vhd_put_be32(h + 28, entries);
	vhd_put_be32(h + 32, VHD_NEW_BLOCK);
	vhd_put_be32(h + 36, vhd_checksum(h, VHD_HEADER_SIZE, 36));
	memset(p + bat_off, 0xff, bat);
	memcpy(p + bat_off + bat, f, VHD_FOOTER_SIZE);
	return p;
}

struct vhd_new_src {
	const uint8_t *f;
	uint64_t size;
	bool fixed;
};

/* Write the image into fd (a new empty file; devio_file_replace's
 * write_fn): a fixed one is size bytes of hole then the footer; a dynamic
 * one its metadata. */
static int vhd_new_write(int fd, void *ctx)
{
	const struct vhd_new_src *n = ctx;
	uint8_t *meta = NULL;
	size_t len = VHD_FOOTER_SIZE;
	int r = 0;

	if (!n->fixed && !(meta = vhd_new_dynamic(n->f, n->size, &len)))
		return -ENOMEM;
	errno = 0;
	if (n->fixed && ftruncate(fd, (off_t)n->size))
		r = -errno;
	else if (pwrite(fd, n->fixed ? n->f : meta, len, n->fixed ? (off_t)n->size : 0) != (ssize_t)len)
		r = errno ? -errno : -EIO;
	free(meta);
	return r;
}

/* Is path free for a new image (missing, or a regular file to replace)? */
static int vhd_new_target(const char *path)
{
	struct stat st;

	if (stat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
		devio_err("%s: not a regular file: a new VHD image is a file (a device or a server is written "
			  "with -O raw)", path);
		return -EINVAL;
	}
	return 0;
}

/* The size a new image can have: whole sectors (or a whole geometry),
 * at most 2040 GiB. */
static int vhd_new_size(const char *path, uint64_t *size, unsigned flags)
{
	uint64_t s = *size;

	if (s == 0 || s > VHD_NEW_MAX) {
		devio_err("%s: cannot make a VHD of %" PRIu64 " bytes (1 byte to 2040 GiB)", path, s);
		return -EFBIG;
	}
	if (s % VHD_SECTOR) {
		*size = (s + VHD_SECTOR - 1) / VHD_SECTOR * VHD_SECTOR;
		devio_warn("%s: a VHD holds whole 512-byte sectors: %" PRIu64 " bytes become %" PRIu64, path, s,
			   *size);
	}
	if (flags & DEVIO_VHD_CHS_SIZE)
		*size = vhd_chs_round_up(*size / VHD_SECTOR) * VHD_SECTOR;
	return 0;
}

int devio_vhd_create(const char *path, uint64_t size, unsigned flags)
{
	bool fixed = flags & DEVIO_VHD_FIXED;
	uint8_t f[VHD_FOOTER_SIZE];
	int r = vhd_new_target(path);

	if (!r)
		r = vhd_new_size(path, &size, flags);
	if (!r)
		r = vhd_new_footer(path, f, size, fixed);
	if (r)
		return r;
	r = devio_file_replace(path, 0666, vhd_new_write, &(struct vhd_new_src){ f, size, fixed });
	if (r)
		devio_err("%s: cannot create the VHD image: %s", path, strerror(-r));
	return r;
}

int devio_vhd_create_open(const char *path, uint64_t size, unsigned flags, struct devio_backend **out)
{
	static const struct devio_open_opts o = { .format = "vhd" };
	struct devio_backend *store;
	struct vhd_chain chain = { 0 };
	int r = devio_vhd_create(path, size, flags);

	if (r)
		return r;
	r = devio_file_open(path, &o, &store);
	if (!r && (r = vhd_open_image(path, store, true, &o, &chain, out)))
		devio_backend_close(store);
	if (r) {
		devio_file_remove(path); /* nothing half made stays */
		return r;
	}
	vhd_of(*out)->unordered = true;
	return 0;
}
