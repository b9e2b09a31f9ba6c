/* qcow2.c - QEMU's qcow2 image format (versions 2 and 3) as a layer over
 * the backend that holds the image file (docs/formats.md, "qcow2").
 *
 * A guest offset maps through the L1 table (in memory) and an L2 table (a
 * bounded cache) to a host cluster; refcount blocks (a second bounded
 * cache) count the references of every host cluster.  Reads, and writes
 * into clusters already ours, take the metadata lock shared, only to look
 * a cached mapping up; the data moves outside it.  Loading a table,
 * allocation and table updates take it exclusively.
 *
 * Crash consistency (what `qemu-img check` must find after a kill -9 or a
 * power cut at any moment: leaks allowed, nothing else):
 *   - metadata is written back at FLUSH (or when a dirty table must leave
 *     a cache) in this order: refcount blocks, [sync, refcount table],
 *     sync, L2 tables, [sync, L1 table], sync.  A refcount increment is
 *     thus durable before any reference to the cluster, and data before
 *     the L2 entry that points at it (an entry is set only once its data
 *     write has returned);
 *   - a reference that goes away (TRIM, ZERO, a rewritten compressed
 *     cluster) is only queued: the refcount is decremented after the
 *     cleared entry has been written and synced, by the next FLUSH, and
 *     only when no request that may still use the old mapping is running
 *     (the `reuse` lock), so a freed cluster is never reused under a
 *     stale reader or writer.
 * Every header field, table entry and offset is untrusted: checked
 * against the format's rules and the file's size before use.
 *
 * devio_qcow2_create() makes new, empty images (`devio convert -O
 * qcow2`): header, refcount table, the refcount blocks that count every
 * metadata cluster, an empty L1 table; built under a temporary name and
 * renamed into place.
 */
#include <endian.h>
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
#include <unistd.h>
#include <zlib.h>
#include "devio/layer.h"
#include "devio/qcow2.h"
#include "devio/util.h"

#define QC_MAGIC 0x514649fbu
#define QC_V2_HEADER 72u
#define QC_V3_HEADER 104u
#define QC_INCOMPAT_DIRTY    (1ull << 0)
#define QC_INCOMPAT_CORRUPT  (1ull << 1)
#define QC_INCOMPAT_DATAFILE (1ull << 2)
#define QC_INCOMPAT_COMPRESS (1ull << 3)
#define QC_INCOMPAT_EXTL2    (1ull << 4)
#define QC_COPIED     (1ull << 63)
#define QC_L2_COMPRESSED (1ull << 62)
#define QC_ZERO       1ull
#define QC_OFF_MASK   0x00fffffffffffe00ull /* L1, L2 and refcount table offsets */
#define QC_L1_RESERVED 0x7f000000000001ffull
#define QC_L2_RESERVED 0x3f000000000001feull
#define QC_RT_RESERVED 0x1ffull
#define QC_EXT_END      0x00000000u
#define QC_EXT_BACKFMT  0xe2792acau
#define QC_EXT_FEATURES 0x6803f857u
#define QC_MAX_L1_BYTES (32u << 20) /* qemu's limits too */
#define QC_MAX_RT_BYTES (8u << 20)
#define QC_MAX_BACKING_NAME 1023u
#define QC_MAX_CHAIN 16
#define QC_CACHE_BYTES (32u << 20)  /* per cache */
#define QC_MIN_SLOTS 16u

enum qc_kind { QC_UNALLOC, QC_ZEROES, QC_DATA, QC_COMPRESSED };

struct qc_map {
	enum qc_kind kind;
	uint64_t host;  /* QC_DATA: cluster offset; QC_COMPRESSED: byte offset */
	uint64_t csize; /* QC_COMPRESSED: bytes from host that hold it */
	uint64_t entry; /* the raw L2 entry */
};

struct qc_slot {
	uint64_t key, off; /* table index (L1 or refcount table), file offset */
	uint8_t *data;     /* one cluster, as on disk (big-endian) */
	bool used, ref, dirty;
};

struct qc_cache {
	struct qc_slot *slot;
	uint32_t n, hand, ndirty;
	uint32_t *index;   /* key -> slot + 1, 0 = not cached */
	uint64_t nindex;
};

struct qc_range {
	uint64_t off, len;
};

struct qcow2 {
	struct devio_backend b;
	struct devio_backend *lower, *backing;
	char *name;
	uint32_t version, cluster_bits, header_length, nb_snapshots;
	uint64_t snap_off;
	uint64_t cs, l2_entries, vsize;
	uint32_t l2_bits, rb_bits;           /* log2 entries per L2 table, per refcount block */
	uint32_t l2_esize, unit_bits;        /* L2 entry bytes; log2 bytes one mapping covers */
	bool extl2;                          /* extended L2 entries: 32 subclusters a cluster */
	uint32_t csize_shift;
	uint64_t csize_mask, coff_mask;      /* compressed descriptors */
	uint64_t incompat, compat, autoclear;
	uint64_t *l1, l1_off, l1_lo, l1_hi; /* dirty span [lo, hi) */
	uint32_t l1_size;
	uint64_t *rt, rt_off, rt_entries, rt_lo, rt_hi;
	bool readonly;
	_Atomic bool unsynced;  /* written since the last sync of the lower backend */
	uint64_t file_end;  /* cluster-aligned end of the image: new clusters go here */
	uint64_t free_hint; /* first cluster that may be free */
	struct qc_cache l2c, rbc;
	pthread_rwlock_t meta;  /* shared: lookups of cached tables; exclusive: everything else */
	pthread_rwlock_t reuse; /* shared: a request using mappings; exclusive: freeing */
	pthread_mutex_t busy_lock;
	pthread_cond_t busy_cond;
	uint64_t *busy;         /* guest clusters being allocated (busy_lock) */
	size_t nbusy, busy_cap;
	struct qc_range *frees; /* references gone, refcounts not yet decremented */
	size_t nfrees, frees_cap;
	/* Requests moved to the image file (qc_try_remap) run without the
	 * reuse lock: each counts itself in inflight[gen & 1] until it ends.
	 * Freed ranges wait in `waiting` for the slot of the generation they
	 * were cleared in to drain (qc_drain, at FLUSH). */
	_Atomic uint64_t gen;
	_Atomic uint32_t inflight[2];
	pthread_mutex_t drain_lock;
	struct qc_range *waiting, *fresh; /* cleared before the last flip; after it */
	size_t nwaiting, nfresh;
	char backing_name[QC_MAX_BACKING_NAME + 1];
	char backing_fmt[32];
};

static _Atomic size_t qc_cache_bytes = QC_CACHE_BYTES;

void devio_qcow2_set_cache_size(size_t bytes)
{
	atomic_store(&qc_cache_bytes, bytes ? bytes : QC_CACHE_BYTES);
}

/* Backing chains being opened on this thread (opening is synchronous). */
static __thread struct {
	int depth;
	dev_t dev[QC_MAX_CHAIN + 1];
	ino_t ino[QC_MAX_CHAIN + 1];
} qc_chain;

static struct qcow2 *to_qc(struct devio_backend *b)
{
	return (struct qcow2 *)b->priv;
}

static uint64_t get64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, 8);
	return be64toh(v);
}

static uint32_t get32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, 4);
	return be32toh(v);
}

static void put64(uint8_t *p, uint64_t v)
{
	v = htobe64(v);
	memcpy(p, &v, 8);
}

static uint64_t round_up(uint64_t v, uint64_t a)
{
	return (v + a - 1) / a * a;
}

/* ---- lower I/O ---- */

/* Read [off, off+len) of the image; bytes past its end read as zeroes. */
static int qc_lower_read(struct qcow2 *q, void *buf, uint64_t len, uint64_t off)
{
	uint64_t size = q->lower->size, n = off >= size ? 0 : (len < size - off ? len : size - off);

	if (n < len)
		memset((uint8_t *)buf + n, 0, len - n);
	return n ? devio_layer_read(q->lower, buf, n, off) : 0;
}

/* A metadata write; FLUSH syncs it even when nothing else is dirty. */
static int qc_meta_write(struct qcow2 *q, const void *buf, uint64_t len, uint64_t off)
{
	int r = devio_layer_write(q->lower, buf, len, off, 0);

	if (!r)
		atomic_store(&q->unsynced, true);
	return r;
}

static int qc_sync(struct qcow2 *q)
{
	atomic_store(&q->unsynced, false);
	return devio_layer_flush(q->lower);
}

/* ---- caches of L2 tables and refcount blocks ---- */

static int qc_cache_init(struct qcow2 *q, struct qc_cache *c, uint64_t nindex)
{
	uint64_t n = atomic_load(&qc_cache_bytes) / q->cs;

	if (n < QC_MIN_SLOTS)
		n = QC_MIN_SLOTS;
	if (nindex && n > nindex)
		n = nindex;
	if (n == 0)
		n = 1;
	c->n = (uint32_t)n;
	c->slot = calloc(n, sizeof(*c->slot));
	c->nindex = nindex;
	c->index = calloc(nindex ? nindex : 1, sizeof(*c->index));
	return c->slot && c->index ? 0 : -ENOMEM;
}

static void qc_cache_free(struct qc_cache *c)
{
	for (uint32_t i = 0; c->slot && i < c->n; i++)
		free(c->slot[i].data);
	free(c->slot);
	free(c->index);
}

static int qc_meta_flush(struct qcow2 *q, bool sync_end);

/* A slot for a table that is not cached: an unused one, or the least
 * recently used (clock); a dirty victim is written back with everything
 * else first, in the safe order. */
static int qc_cache_victim(struct qcow2 *q, struct qc_cache *c, struct qc_slot **out)
{
	struct qc_slot *s;
	int r;

	for (;;) {
		s = &c->slot[c->hand];
		c->hand = (c->hand + 1) % c->n;
		if (!s->used || !s->ref)
			break;
		s->ref = false;
	}
	if (s->used && s->dirty) {
		r = qc_meta_flush(q, false);
		if (r)
			return r;
	}
	if (s->used)
		c->index[s->key] = 0;
	s->used = false;
	if (!s->data) {
		s->data = malloc(q->cs);
		if (!s->data)
			return -ENOMEM;
	}
	*out = s;
	return 0;
}

/* The table with index key at file offset off, loaded (or, fresh, a new
 * zeroed one). */
static int qc_cache_get(struct qcow2 *q, struct qc_cache *c, uint64_t key, uint64_t off, bool fresh,
			struct qc_slot **out)
{
	struct qc_slot *s;
	int r;

	if (c->index[key]) {
		s = &c->slot[c->index[key] - 1];
		s->ref = true;
		*out = s;
		return 0;
	}
	r = qc_cache_victim(q, c, &s);
	if (r)
		return r;
	if (fresh)
		memset(s->data, 0, q->cs);
	else if ((r = qc_lower_read(q, s->data, q->cs, off)))
		return r;
	s->key = key;
	s->off = off;
	s->used = s->ref = true;
	s->dirty = false;
	c->index[key] = (uint32_t)(s - c->slot) + 1;
	*out = s;
	return 0;
}

static void qc_cache_dirty(struct qc_cache *c, struct qc_slot *s)
{
	if (!s->dirty)
		c->ndirty++;
	s->dirty = true;
}

static int qc_cache_write(struct qcow2 *q, struct qc_cache *c)
{
	for (uint32_t i = 0; i < c->n && c->ndirty; i++) {
		struct qc_slot *s = &c->slot[i];
		int r;

		if (!s->used || !s->dirty)
			continue;
		r = qc_meta_write(q, s->data, q->cs, s->off);
		if (r)
			return r;
		s->dirty = false;
		c->ndirty--;
	}
	return 0;
}

/* ---- L1 and refcount table write-back ---- */

static void qc_span_add(uint64_t *lo, uint64_t *hi, uint64_t i)
{
	if (*lo >= *hi) {
		*lo = i;
		*hi = i + 1;
	} else {
		*lo = i < *lo ? i : *lo;
		*hi = i + 1 > *hi ? i + 1 : *hi;
	}
}

/* Write entries [*lo, *hi) of a table of host-order entries at off. */
static int qc_table_write(struct qcow2 *q, const uint64_t *t, uint64_t off, uint64_t *lo, uint64_t *hi)
{
	uint64_t n = *hi - *lo;
	uint8_t *buf;
	int r;

	if (*lo >= *hi)
		return 0;
	buf = malloc(n * 8);
	if (!buf)
		return -ENOMEM;
	for (uint64_t i = 0; i < n; i++)
		put64(buf + i * 8, t[*lo + i]);
	r = qc_meta_write(q, buf, n * 8, off + *lo * 8);
	free(buf);
	if (!r)
		*lo = *hi = 0;
	return r;
}

/* Write back dirty metadata in the order that keeps the image consistent
 * at every moment (see the top of this file). */
static int qc_meta_flush(struct qcow2 *q, bool sync_end)
{
	bool written = false;
	int r = 0;

	if (q->rbc.ndirty || q->rt_lo < q->rt_hi) {
		r = qc_cache_write(q, &q->rbc);
		if (!r && q->rt_lo < q->rt_hi && !(r = qc_sync(q)))
			r = qc_table_write(q, q->rt, q->rt_off, &q->rt_lo, &q->rt_hi);
		written = true;
	}
	if (!r && (q->l2c.ndirty || q->l1_lo < q->l1_hi)) {
		if (written || atomic_load(&q->unsynced))
			r = qc_sync(q);
		if (!r)
			r = qc_cache_write(q, &q->l2c);
		if (!r && q->l1_lo < q->l1_hi && !(r = qc_sync(q)))
			r = qc_table_write(q, q->l1, q->l1_off, &q->l1_lo, &q->l1_hi);
		written = true;
	}
	if (!r && sync_end && (written || atomic_load(&q->unsynced)))
		r = qc_sync(q);
	return r;
}

/* ---- refcounts ---- */

static int qc_rt_grow(struct qcow2 *q, uint64_t need);
static int qc_rc_add(struct qcow2 *q, uint64_t cl, int delta);

/* Make room for a cluster at the end of the image: the lower backend must
 * be able to grow (a whole regular file). */
static int qc_extend(struct qcow2 *q, uint64_t end)
{
	int r = devio_layer_grow(q->lower, end);

	if (r) {
		devio_err("%s: qcow2: no room for a new cluster at offset %" PRIu64
			  " (the image cannot grow here: not a whole regular file): %s",
			  q->name, end - q->cs, strerror(-r));
		return -ENOSPC;
	}
	if (end > q->file_end)
		q->file_end = end;
	return 0;
}

/* A new refcount block for refcount table index i, at the end of the
 * image; it counts itself when it lies in its own range. */
static int qc_rb_new(struct qcow2 *q, uint64_t i)
{
	uint64_t at = q->file_end, cl = at >> q->cluster_bits;
	struct qc_slot *s;
	int r = qc_extend(q, at + q->cs);

	if (r)
		return r;
	r = qc_cache_get(q, &q->rbc, i, at, true, &s);
	if (r)
		return r;
	qc_cache_dirty(&q->rbc, s);
	q->rt[i] = at;
	qc_span_add(&q->rt_lo, &q->rt_hi, i);
	if (cl >> q->rb_bits == i) {
		uint16_t one = htobe16(1);

		memcpy(s->data + (cl & ((1ull << q->rb_bits) - 1)) * 2, &one, 2);
		return 0;
	}
	return qc_rc_add(q, cl, 1);
}

/* The refcount block that counts cluster cl, or NULL (*s) if none. */
static int qc_rb_get(struct qcow2 *q, uint64_t cl, bool create, struct qc_slot **s)
{
	uint64_t i = cl >> q->rb_bits;
	int r;

	*s = NULL;
	if (i >= q->rt_entries) {
		if (!create)
			return 0;
		r = qc_rt_grow(q, i);
		if (r)
			return r;
	}
	if (!q->rt[i]) {
		if (!create)
			return 0;
		r = qc_rb_new(q, i);
		if (r)
			return r;
	}
	return qc_cache_get(q, &q->rbc, i, q->rt[i], false, s);
}

static int qc_rc_get(struct qcow2 *q, uint64_t cl, uint32_t *rc)
{
	struct qc_slot *s;
	uint16_t v;
	int r = qc_rb_get(q, cl, false, &s);

	*rc = 0;
	if (r || !s)
		return r;
	memcpy(&v, s->data + (cl & ((1ull << q->rb_bits) - 1)) * 2, 2);
	*rc = be16toh(v);
	return 0;
}

static int qc_rc_add(struct qcow2 *q, uint64_t cl, int delta)
{
	struct qc_slot *s;
	uint8_t *p;
	uint16_t v;
	int r = qc_rb_get(q, cl, delta > 0, &s);

	if (r)
		return r;
	if (!s) {
		devio_err("%s: qcow2: refcount of cluster at offset %" PRIu64 " would go below zero",
			  q->name, cl << q->cluster_bits);
		return -EIO;
	}
	p = s->data + (cl & ((1ull << q->rb_bits) - 1)) * 2;
	memcpy(&v, p, 2);
	v = be16toh(v);
	if ((delta < 0 && v == 0) || (delta > 0 && v == UINT16_MAX)) {
		devio_err("%s: qcow2: refcount %u of cluster at offset %" PRIu64 " (refcount block at offset %"
			  PRIu64 ") cannot change by %d", q->name, v, cl << q->cluster_bits, s->off, delta);
		return -EIO;
	}
	v = htobe16((uint16_t)(v + delta));
	memcpy(p, &v, 2);
	qc_cache_dirty(&q->rbc, s);
	if (delta < 0 && v == 0 && cl < q->free_hint)
		q->free_hint = cl;
	return 0;
}

/* A free host cluster, counted (refcount 1); *fresh (if not NULL): it lies
 * past everything ever allocated, so it was never written and reads as
 * zeroes. */
static int qc_alloc_fresh(struct qcow2 *q, uint64_t *off, bool *fresh)
{
	uint64_t cl = q->free_hint;
	uint32_t rc;
	int r;

	for (;; cl++) {
		r = qc_rc_get(q, cl, &rc);
		if (r)
			return r;
		if (rc == 0)
			break;
		if (cl > (q->file_end >> q->cluster_bits) + 65536) { /* a damaged image: no endless scan */
			devio_err("%s: qcow2: refcounts claim clusters far past the end of the image (offset %" PRIu64 ")",
				  q->name, cl << q->cluster_bits);
			return -EIO;
		}
	}
	if (fresh)
		*fresh = (cl << q->cluster_bits) >= q->file_end;
	r = qc_extend(q, (cl + 1) << q->cluster_bits);
	if (!r)
		r = qc_rc_add(q, cl, 1);
	if (r)
		return r;
	q->free_hint = cl + 1;
	*off = cl << q->cluster_bits;
	return 0;
}

static int qc_alloc(struct qcow2 *q, uint64_t *off)
{
	return qc_alloc_fresh(q, off, NULL);
}

/* The new refcount table's size and how many new refcount blocks it and
 * they need when laid out from `start`: a fixed point, found in a few
 * rounds. */
static int qc_rt_plan(struct qcow2 *q, uint64_t need, uint64_t start, uint64_t *entries, uint64_t *tclusters,
		      uint64_t *nblocks)
{
	uint64_t ent = need + 1 > q->rt_entries * 2 ? need + 1 : q->rt_entries * 2, blocks = 0;

	for (int round = 0; round < 16; round++) {
		uint64_t tc = round_up(ent * 8, q->cs) >> q->cluster_bits;
		uint64_t end = start + ((tc + blocks) << q->cluster_bits);
		uint64_t first = (start >> q->cluster_bits) >> q->rb_bits;
		uint64_t last = ((end - 1) >> q->cluster_bits) >> q->rb_bits, want = 0;

		if (tc * q->cs > QC_MAX_RT_BYTES)
			break;
		for (uint64_t i = first; i <= last; i++)
			want += i >= q->rt_entries || !q->rt[i];
		if (need < first || need > last)
			want += need >= q->rt_entries || !q->rt[need];
		if (last >= ent) {
			ent = last + 1;
			continue;
		}
		if (want == blocks) {
			*entries = tc << (q->cluster_bits - 3);
			*tclusters = tc;
			*nblocks = blocks;
			return 0;
		}
		blocks = want;
	}
	devio_err("%s: qcow2: the refcount table would exceed %u bytes", q->name, QC_MAX_RT_BYTES);
	return -ENOSPC;
}

/* Point the header at a new refcount table (12 bytes at offset 48). */
static int qc_write_rt_header(struct qcow2 *q, uint64_t off, uint64_t clusters)
{
	uint8_t h[12];
	uint32_t c = htobe32((uint32_t)clusters);

	put64(h, off);
	memcpy(h + 8, &c, 4);
	return qc_meta_write(q, h, sizeof(h), 48);
}

/* A larger refcount table, with the refcount blocks that count it, at
 * the end of the image; the header switches to it once all of it is
 * durable, then the old table's clusters are given back. */
/* Switch the in-memory refcount table to a copy with ent entries at
 * start (the image's header still names the old one). */
static int qc_rt_install(struct qcow2 *q, uint64_t ent, uint64_t start)
{
	uint64_t *rt = calloc(ent, sizeof(*rt));
	uint32_t *index = calloc(ent, sizeof(*index));

	if (!rt || !index) {
		free(rt);
		free(index);
		return -ENOMEM;
	}
	memcpy(rt, q->rt, q->rt_entries * sizeof(*rt));
	memcpy(index, q->rbc.index, q->rt_entries * sizeof(*index));
	free(q->rt);
	free(q->rbc.index);
	q->rt = rt;
	q->rbc.index = index;
	q->rbc.nindex = ent;
	q->rt_entries = ent;
	q->rt_off = start;
	q->rt_lo = 0;
	q->rt_hi = ent;
	return 0;
}

/* New (zeroed, dirty) refcount blocks from next on, for the indices that
 * cover [start, end) and for need, where there are none yet. */
static int qc_rt_place_blocks(struct qcow2 *q, uint64_t need, uint64_t start, uint64_t end, uint64_t next)
{
	uint64_t first = (start >> q->cluster_bits) >> q->rb_bits, last = ((end - 1) >> q->cluster_bits) >> q->rb_bits;

	for (uint64_t i = 0; i < q->rt_entries && next < end; i++) {
		struct qc_slot *s;
		int r;

		if ((i != need && (i < first || i > last)) || q->rt[i])
			continue;
		if ((r = qc_cache_get(q, &q->rbc, i, next, true, &s)))
			return r;
		qc_cache_dirty(&q->rbc, s);
		q->rt[i] = next;
		next += q->cs;
	}
	return 0;
}

/* A larger refcount table, with the refcount blocks that count it, at
 * the end of the image; the header switches to it once all of it is
 * durable, then the old table's clusters are given back. */
static int qc_rt_grow(struct qcow2 *q, uint64_t need)
{
	uint64_t start = q->file_end, ent = 0, tc = 0, nb = 0, end, old_off = q->rt_off;
	uint64_t old_clusters = round_up(q->rt_entries * 8, q->cs) >> q->cluster_bits;
	int r = qc_meta_flush(q, false);

	if (!r)
		r = qc_rt_plan(q, need, start, &ent, &tc, &nb);
	end = start + ((tc + nb) << q->cluster_bits);
	if (!r)
		r = qc_extend(q, end);
	if (!r)
		r = qc_rt_install(q, ent, start);
	if (!r)
		r = qc_rt_place_blocks(q, need, start, end, start + (tc << q->cluster_bits));
	for (uint64_t cl = start >> q->cluster_bits; !r && cl < end >> q->cluster_bits; cl++)
		r = qc_rc_add(q, cl, 1);
	if (!r)
		r = qc_meta_flush(q, true);
	if (!r)
		r = qc_write_rt_header(q, start, tc);
	if (!r)
		r = qc_sync(q);
	for (uint64_t c = 0; !r && c < old_clusters; c++)
		r = qc_rc_add(q, (old_off >> q->cluster_bits) + c, -1);
	if (!r)
		devio_info("%s: qcow2: refcount table moved to offset %" PRIu64 " (%" PRIu64 " entries)", q->name,
			   start, ent);
	return r;
}

/* ---- the guest-to-host mapping ---- */

/* Check an L1 entry: 0 (no L2 table) or an aligned offset inside the
 * file with no reserved bits. */
static int qc_l1_check(struct qcow2 *q, uint64_t i)
{
	uint64_t e = q->l1[i], off = e & QC_OFF_MASK;

	if (!e)
		return 0;
	if ((e & QC_L1_RESERVED) || (off & (q->cs - 1)) || off == 0 || off >= q->file_end) {
		devio_err("%s: qcow2: bad L1 entry %" PRIu64 " (0x%016" PRIx64 ") at offset %" PRIu64
			  ": reserved bits, misaligned or outside the image", q->name, i, e, q->l1_off + i * 8);
		return -EIO;
	}
	return 0;
}

/* The L2 table for guest cluster gc; *s NULL if there is none and
 * create is false.  create makes one (refcounted, zeroed). */
static int qc_l2_get(struct qcow2 *q, uint64_t gc, bool create, struct qc_slot **s)
{
	uint64_t i = gc >> q->l2_bits, off;
	int r;

	*s = NULL;
	if (!q->l1[i]) {
		if (!create)
			return 0;
		r = qc_alloc(q, &off);
		if (r)
			return r;
		r = qc_cache_get(q, &q->l2c, i, off, true, s);
		if (r) {
			qc_rc_add(q, off >> q->cluster_bits, -1); /* nothing refers to it yet */
			return r;
		}
		qc_cache_dirty(&q->l2c, *s);
		q->l1[i] = off | QC_COPIED;
		qc_span_add(&q->l1_lo, &q->l1_hi, i);
		return 0;
	}
	if (create && !(q->l1[i] & QC_COPIED)) {
		devio_err("%s: qcow2: L2 table %" PRIu64 " (L1 entry at offset %" PRIu64
			  ") is shared (no COPIED flag): writing it is not supported", q->name, i, q->l1_off + i * 8);
		return -EIO;
	}
	return qc_cache_get(q, &q->l2c, i, q->l1[i] & QC_OFF_MASK, false, s);
}

/* Decode L2 entry e of guest cluster gc (table at l2off); a bad one is
 * logged unless quiet. */
static int qc_decode(struct qcow2 *q, uint64_t e, uint64_t gc, uint64_t l2off, bool quiet, struct qc_map *m)
{
	const char *why = NULL;

	memset(m, 0, sizeof(*m));
	m->entry = e;
	if (e & QC_L2_COMPRESSED) {
		uint64_t nsec = ((e >> q->csize_shift) & q->csize_mask) + 1;

		m->kind = QC_COMPRESSED;
		m->host = e & q->coff_mask;
		m->csize = nsec * 512 - (m->host & 511);
		if (e & QC_COPIED)
			why = "compressed with the COPIED flag";
		else if (m->host < q->cs || m->host >= q->lower->size)
			why = "compressed data outside the image";
	} else {
		m->host = e & QC_OFF_MASK;
		if (e & QC_L2_RESERVED)
			why = "reserved bits set";
		else if ((e & QC_ZERO) && q->version < 3)
			why = "zero flag in a version 2 image";
		else if ((e & QC_ZERO) && q->extl2)
			why = "zero flag with extended L2 entries";
		else if (m->host & (q->cs - 1))
			why = "misaligned cluster offset";
		else if (m->host && m->host >= q->file_end)
			why = "cluster offset past the end of the image";
		else if (!m->host && (e & QC_COPIED))
			why = "COPIED flag without an offset";
		m->kind = (e & QC_ZERO) ? QC_ZEROES : m->host ? QC_DATA : QC_UNALLOC;
	}
	if (why && !quiet)
		devio_err("%s: qcow2: bad L2 entry 0x%016" PRIx64 " for guest offset %" PRIu64
			  " at offset %" PRIu64 ": %s", q->name, e, gc << q->cluster_bits,
			  l2off + (gc & (q->l2_entries - 1)) * q->l2_esize, why);
	return why ? -EIO : 0;
}

/* Extended L2 entries: subcluster sc of the cluster m maps, from the
 * entry's allocation/zero bitmap b. */
static int qc_subcluster(struct qcow2 *q, struct qc_map *m, uint64_t b, uint64_t gc, uint64_t l2off, unsigned sc,
			 bool quiet)
{
	const char *why = NULL;

	if (m->kind == QC_COMPRESSED) {
		if (b)
			why = "subcluster bitmap of a compressed cluster not zero";
	} else if (b & (b >> 32) & 0xffffffffu) {
		why = "subcluster both allocated and zero";
	} else if ((b >> sc) & 1) {
		if (!m->host)
			why = "allocated subcluster without a cluster offset";
		m->kind = QC_DATA;
		m->host += (uint64_t)sc << q->unit_bits;
	} else {
		m->kind = (b >> (32 + sc)) & 1 ? QC_ZEROES : QC_UNALLOC;
		m->host = 0;
	}
	if (why && !quiet)
		devio_err("%s: qcow2: bad extended L2 entry (bitmap 0x%016" PRIx64 ") for guest offset %" PRIu64
			  " at offset %" PRIu64 ": %s", q->name, b, gc << q->cluster_bits,
			  l2off + (gc & (q->l2_entries - 1)) * 16, why);
	return why ? -EIO : 0;
}

/* Under the lock: the mapping of guest unit u (a cluster, or with
 * extended L2 entries a subcluster).  shared (the lock held shared): only
 * from a cached table, -EAGAIN if it is not. */
static int qc_lookup_mode(struct qcow2 *q, uint64_t u, bool shared, bool quiet, struct qc_map *m)
{
	uint64_t gc = u >> (q->cluster_bits - q->unit_bits), i = gc >> q->l2_bits;
	const uint8_t *e;
	struct qc_slot *s;
	int r;

	if (!q->l1[i]) {
		memset(m, 0, sizeof(*m));
		return 0;
	}
	if (shared) {
		if (!q->l2c.index[i])
			return -EAGAIN;
		s = &q->l2c.slot[q->l2c.index[i] - 1];
		__atomic_store_n(&s->ref, true, __ATOMIC_RELAXED);
	} else if ((r = qc_l2_get(q, gc, false, &s))) {
		return r;
	}
	e = s->data + (gc & (q->l2_entries - 1)) * q->l2_esize;
	r = qc_decode(q, get64(e), gc, s->off, quiet, m);
	if (!r && q->extl2)
		r = qc_subcluster(q, m, get64(e + 8), gc, s->off, (unsigned)(u & 31), quiet);
	return r;
}

/* A whole cluster's mapping (images without extended L2 entries: the
 * only ones written). */
static int qc_lookup(struct qcow2 *q, uint64_t gc, struct qc_map *m)
{
	return qc_lookup_mode(q, gc, false, false, m);
}

/* Under the lock: set guest cluster gc's entry (its L2 table exists). */
static int qc_set_entry(struct qcow2 *q, uint64_t gc, uint64_t e)
{
	struct qc_slot *s;
	int r = qc_l2_get(q, gc, true, &s);

	if (r)
		return r;
	put64(s->data + (gc & (q->l2_entries - 1)) * q->l2_esize, e);
	qc_cache_dirty(&q->l2c, s);
	return 0;
}

/* Under the lock: queue the host clusters an old mapping used, to be
 * decremented once the entry that replaced it is durable. */
static int qc_free_later(struct qcow2 *q, const struct qc_map *m)
{
	struct qc_range rg;

	if (m->kind == QC_COMPRESSED) {
		rg.off = m->host & ~511ull;
		rg.len = m->csize + (m->host & 511);
	} else if (m->host) {
		rg.off = m->host;
		rg.len = q->cs;
	} else {
		return 0;
	}
	if (q->nfrees && q->frees[q->nfrees - 1].off + q->frees[q->nfrees - 1].len == rg.off &&
	    m->kind != QC_COMPRESSED) {
		q->frees[q->nfrees - 1].len += rg.len;
		return 0;
	}
	if (q->nfrees == q->frees_cap) {
		size_t cap = q->frees_cap ? q->frees_cap * 2 : 64;
		struct qc_range *n = realloc(q->frees, cap * sizeof(*n));

		if (!n)
			return -ENOMEM; /* a leak, never a corruption */
		q->frees = n;
		q->frees_cap = cap;
	}
	q->frees[q->nfrees++] = rg;
	return 0;
}

/* Decrement the refcounts of every cluster a queued range touches. */
static int qc_free_apply(struct qcow2 *q, const struct qc_range *rg, size_t n)
{
	int r = 0;

	for (size_t i = 0; i < n && !r; i++) {
		uint64_t first = rg[i].off >> q->cluster_bits, last = (rg[i].off + rg[i].len - 1) >> q->cluster_bits;

		for (uint64_t cl = first; cl <= last && !r; cl++)
			r = qc_rc_add(q, cl, -1);
	}
	return r;
}

/* ---- guest clusters being allocated ---- */

/* Under busy_lock. */
static bool qc_is_busy(struct qcow2 *q, uint64_t gc)
{
	for (size_t i = 0; i < q->nbusy; i++)
		if (q->busy[i] == gc)
			return true;
	return false;
}

/* Take the lock exclusively with guest cluster gc not being allocated by
 * another request (waiting for it without the lock). */
static void qc_lock_idle(struct qcow2 *q, uint64_t gc)
{
	for (;;) {
		bool busy;

		pthread_rwlock_wrlock(&q->meta);
		pthread_mutex_lock(&q->busy_lock);
		busy = qc_is_busy(q, gc);
		pthread_mutex_unlock(&q->busy_lock);
		if (!busy)
			return;
		pthread_rwlock_unlock(&q->meta);
		pthread_mutex_lock(&q->busy_lock);
		while (qc_is_busy(q, gc))
			pthread_cond_wait(&q->busy_cond, &q->busy_lock);
		pthread_mutex_unlock(&q->busy_lock);
	}
}

static int qc_busy_add(struct qcow2 *q, uint64_t gc)
{
	int r = 0;

	pthread_mutex_lock(&q->busy_lock);
	if (q->nbusy == q->busy_cap) {
		size_t cap = q->busy_cap ? q->busy_cap * 2 : 16;
		uint64_t *n = realloc(q->busy, cap * sizeof(*n));

		if (n) {
			q->busy = n;
			q->busy_cap = cap;
		}
	}
	if (q->nbusy < q->busy_cap)
		q->busy[q->nbusy++] = gc;
	else
		r = -ENOMEM;
	pthread_mutex_unlock(&q->busy_lock);
	return r;
}

static void qc_busy_del(struct qcow2 *q, uint64_t gc)
{
	pthread_mutex_lock(&q->busy_lock);
	for (size_t i = 0; i < q->nbusy; i++)
		if (q->busy[i] == gc) {
			q->busy[i] = q->busy[--q->nbusy];
			break;
		}
	pthread_cond_broadcast(&q->busy_cond);
	pthread_mutex_unlock(&q->busy_lock);
}

/* ---- reading ---- */

/* Inflate one compressed cluster into out (cs bytes). */
static int qc_inflate(struct qcow2 *q, const struct qc_map *m, uint64_t gc, uint8_t *out)
{
	uint64_t avail = m->host < q->lower->size ? q->lower->size - m->host : 0;
	uint64_t n = m->csize < avail ? m->csize : avail;
	uint8_t *in = malloc(n ? n : 1);
	z_stream z = { 0 };
	int r, zr;

	if (!in)
		return -ENOMEM;
	r = qc_lower_read(q, in, n, m->host);
	if (!r && inflateInit2(&z, -15) != Z_OK)
		r = -ENOMEM;
	if (!r) {
		z.next_in = in;
		z.avail_in = (uInt)n;
		z.next_out = out;
		z.avail_out = (uInt)q->cs;
		zr = inflate(&z, Z_FINISH);
		if ((zr != Z_STREAM_END && zr != Z_BUF_ERROR && zr != Z_OK) || z.avail_out != 0) {
			devio_err("%s: qcow2: compressed cluster for guest offset %" PRIu64 " at offset %" PRIu64
				  " (%" PRIu64 " bytes) does not inflate to %" PRIu64 " bytes", q->name,
				  gc << q->cluster_bits, m->host, n, q->cs);
			r = -EIO;
		}
		inflateEnd(&z);
	}
	free(in);
	return r;
}

static int qc_backing_read(struct qcow2 *q, void *buf, uint64_t len, uint64_t off)
{
	uint64_t size = q->backing ? q->backing->size : 0;
	uint64_t n = off >= size ? 0 : (len < size - off ? len : size - off);

	if (n < len)
		memset((uint8_t *)buf + n, 0, len - n);
	return n ? devio_layer_read(q->backing, buf, n, off) : 0;
}

/* Read n bytes at guest offset off, all mapped by m (one run). */
static int qc_read_run(struct qcow2 *q, const struct qc_map *m, void *buf, uint64_t n, uint64_t off)
{
	uint8_t *tmp;
	int r;

	switch (m->kind) {
	case QC_DATA:
		return qc_lower_read(q, buf, n, m->host + (off & ((1ull << q->unit_bits) - 1)));
	case QC_UNALLOC:
		return qc_backing_read(q, buf, n, off);
	case QC_ZEROES:
		memset(buf, 0, n);
		return 0;
	case QC_COMPRESSED:
		tmp = malloc(q->cs);
		if (!tmp)
			return -ENOMEM;
		r = qc_inflate(q, m, off >> q->cluster_bits, tmp);
		if (!r)
			memcpy(buf, tmp + (off & (q->cs - 1)), n);
		free(tmp);
		return r;
	}
	return -EIO;
}

/* Under the lock: the mapping at guest offset off and how many bytes
 * (up to len) the same run covers: contiguous data, or the same kind of
 * unallocated/zero clusters (a range without an L2 table in one step). */
static int qc_map_run(struct qcow2 *q, uint64_t off, uint64_t len, bool shared, struct qc_map *m, uint64_t *n)
{
	uint64_t us = 1ull << q->unit_bits, first = off >> q->unit_bits, u = first, done = us - (off & (us - 1));
	uint32_t per_table = q->l2_bits + q->cluster_bits - q->unit_bits; /* log2 units an L2 table maps */
	int r = qc_lookup_mode(q, u, shared, false, m);

	while (!r && done < len && m->kind != QC_COMPRESSED) {
		struct qc_map next;

		if (m->kind == QC_UNALLOC && !q->l1[(u + 1) >> per_table]) {
			uint64_t end = (((u + 1) >> per_table) + 1) << per_table; /* past that table's range */

			done += (end - u - 1) << q->unit_bits;
			u = end - 1;
			continue;
		}
		if (qc_lookup_mode(q, u + 1, shared, true, &next) || next.kind != m->kind || /* a bad entry: its own run says so */
		    (m->kind == QC_DATA && (next.host != m->host + ((u + 1 - first) << q->unit_bits) ||
					    ((next.entry ^ m->entry) & QC_COPIED))))
			break;
		u++;
		done += us;
	}
	*n = done < len ? done : len;
	return r;
}

/* The run at off: with the lock shared where the tables are cached (the
 * common case: readers do not wait for each other), else exclusively. */
static int qc_map(struct qcow2 *q, uint64_t off, uint64_t len, struct qc_map *m, uint64_t *n)
{
	int r;

	pthread_rwlock_rdlock(&q->meta);
	r = qc_map_run(q, off, len, true, m, n);
	pthread_rwlock_unlock(&q->meta);
	if (r != -EAGAIN)
		return r;
	pthread_rwlock_wrlock(&q->meta);
	r = qc_map_run(q, off, len, false, m, n);
	pthread_rwlock_unlock(&q->meta);
	return r;
}

static int qc_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	struct qcow2 *q = to_qc(b);
	uint8_t *p = buf;
	int r = 0;

	pthread_rwlock_rdlock(&q->reuse);
	while (len && !r) {
		struct qc_map m;
		uint64_t n;

		r = qc_map(q, off, len, &m, &n);
		if (!r)
			r = qc_read_run(q, &m, p, n, off);
		p += n;
		off += n;
		len -= n;
	}
	pthread_rwlock_unlock(&q->reuse);
	return r;
}

/* ---- writing ---- */

/* Data at host offset; buf NULL writes zeroes. */
static int qc_data_write(struct qcow2 *q, const void *buf, uint64_t len, uint64_t host)
{
	int r = buf ? devio_layer_write(q->lower, buf, len, host, 0)
		    : devio_layer_zero(q->lower, host, len, DEVIO_REQ_NO_HOLE);

	if (!r)
		atomic_store(&q->unsynced, true);
	return r;
}

/* A whole new cluster at host: guest cluster gc as m shows it, with n
 * bytes at in replaced by buf (zeroes if NULL). */
static int qc_fill(struct qcow2 *q, const struct qc_map *m, uint64_t gc, const void *buf, uint64_t in,
		   uint64_t n, uint64_t host, bool fresh)
{
	static const uint8_t tail[512];
	uint8_t *tmp;
	int r = 0;

	if (n == q->cs && buf)
		return qc_data_write(q, buf, n, host);
	if (fresh && (m->kind == QC_ZEROES || (m->kind == QC_UNALLOC && !q->backing))) {
		/* a never written cluster over zeroes: only the new bytes, and
		 * the cluster's last sector so that the file covers all of it */
		uint64_t end = buf ? in + n : 0, from = q->cs - sizeof(tail);

		if (buf)
			r = qc_data_write(q, buf, n, host + in);
		if (end > from)
			from = end;
		if (!r && from < q->cs)
			r = qc_data_write(q, tail, q->cs - from, host + from);
		return r;
	}
	/* zeroes too are written, not fallocated: the cluster may lie past
	 * the end of the file, which only a write extends */
	tmp = malloc(q->cs);
	if (!tmp)
		return -ENOMEM;
	if (n < q->cs)
		r = qc_read_run(q, m, tmp, q->cs, gc << q->cluster_bits);
	if (!r) {
		if (buf)
			memcpy(tmp + in, buf, n);
		else
			memset(tmp + in, 0, n);
		r = qc_data_write(q, tmp, q->cs, host);
	}
	free(tmp);
	return r;
}

/* Write n bytes (inside one cluster) at guest offset off: in place where
 * the cluster is ours, else into a newly allocated cluster. */
static int qc_write_piece(struct qcow2 *q, const void *buf, uint64_t off, uint64_t n)
{
	uint64_t gc = off >> q->cluster_bits, in = off & (q->cs - 1), host = 0, run;
	struct qc_map m;
	struct qc_slot *s;
	bool fresh = false;
	int r;

	/* A cluster of ours (an allocation in progress never looks like one):
	 * in place, the lock shared only for the lookup. */
	r = qc_map(q, off, n, &m, &run);
	if (!r && m.kind == QC_DATA && (m.entry & QC_COPIED))
		return qc_data_write(q, buf, n, m.host + in);
	qc_lock_idle(q, gc);
	r = qc_lookup(q, gc, &m);
	if (!r && m.kind == QC_DATA && (m.entry & QC_COPIED)) {
		pthread_rwlock_unlock(&q->meta);
		return qc_data_write(q, buf, n, m.host + in);
	}
	if (!r)
		r = qc_l2_get(q, gc, true, &s); /* the table exists before the data is written */
	if (!r)
		r = qc_alloc_fresh(q, &host, &fresh);
	if (!r && (r = qc_busy_add(q, gc)))
		qc_rc_add(q, host >> q->cluster_bits, -1);
	pthread_rwlock_unlock(&q->meta);
	if (r)
		return r;
	r = qc_fill(q, &m, gc, buf, in, n, host, fresh);
	pthread_rwlock_wrlock(&q->meta);
	if (!r)
		r = qc_set_entry(q, gc, host | QC_COPIED);
	if (!r)
		qc_free_later(q, &m);
	else
		qc_rc_add(q, host >> q->cluster_bits, -1); /* never referenced */
	qc_busy_del(q, gc);
	pthread_rwlock_unlock(&q->meta);
	return r;
}

/* Run fn over [off, off+len) cluster piece by cluster piece, holding the
 * mappings in use against reuse. */
static int qc_each_piece(struct qcow2 *q, uint64_t off, uint64_t len, const uint8_t *buf,
			 int (*fn)(struct qcow2 *q, const uint8_t *buf, uint64_t off, uint64_t n, uint32_t flags),
			 uint32_t flags)
{
	int r = 0;

	pthread_rwlock_rdlock(&q->reuse);
	while (len && !r) {
		uint64_t n = q->cs - (off & (q->cs - 1));

		n = n < len ? n : len;
		r = fn(q, buf, off, n, flags);
		if (buf)
			buf += n;
		off += n;
		len -= n;
	}
	pthread_rwlock_unlock(&q->reuse);
	return r;
}

/* Runs of clusters already ours are written in place with one write
 * each (a 1 MiB write over allocated data is one write); the rest cluster
 * by cluster. */
static int qc_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	struct qcow2 *q = to_qc(b);
	const uint8_t *p = buf;
	int r = 0;

	pthread_rwlock_rdlock(&q->reuse);
	while (len && !r) {
		struct qc_map m;
		uint64_t n;

		r = qc_map(q, off, len, &m, &n);
		if (r)
			break;
		if (m.kind == QC_DATA && (m.entry & QC_COPIED)) {
			r = qc_data_write(q, p, n, m.host + (off & ((1ull << q->unit_bits) - 1)));
		} else {
			n = q->cs - (off & (q->cs - 1));
			n = n < len ? n : len;
			r = qc_write_piece(q, p, off, n);
		}
		p += n;
		off += n;
		len -= n;
	}
	pthread_rwlock_unlock(&q->reuse);
	return r;
}

/* ---- TRIM and ZERO ---- */

/* The entry a whole cluster gets when its data goes away: unallocated
 * where that reads as zeroes (no backing file), else the v3 zero flag. */
static uint64_t qc_gone_entry(struct qcow2 *q)
{
	return q->backing ? QC_ZERO : 0;
}

/* Drop guest cluster gc's data: a new entry, the old host cluster punched
 * (if only this entry used it) and queued for its refcount. */
static int qc_drop_cluster(struct qcow2 *q, uint64_t gc)
{
	uint64_t e = qc_gone_entry(q);
	struct qc_map m;
	struct qc_slot *s;
	int r;

	qc_lock_idle(q, gc);
	r = qc_lookup(q, gc, &m);
	if (r || (m.kind == QC_UNALLOC && !e) || (m.kind == QC_ZEROES && !m.host))
		goto out;
	r = qc_l2_get(q, gc, true, &s);
	if (!r)
		r = qc_set_entry(q, gc, e);
	if (!r)
		r = qc_free_later(q, &m);
	if (!r && m.kind == QC_DATA && (m.entry & QC_COPIED) && (q->lower->caps & DEVIO_CAP_TRIM))
		devio_layer_trim(q->lower, m.host, q->cs, 0); /* space back now; a failure only costs space */
out:
	pthread_rwlock_unlock(&q->meta);
	return r;
}

/* Does guest cluster gc read as zeroes already? */
static int qc_reads_zero(struct qcow2 *q, uint64_t gc, bool *zero)
{
	struct qc_map m;
	int r;

	uint64_t n;

	r = qc_map(q, gc << q->cluster_bits, 1, &m, &n);
	*zero = !r && (m.kind == QC_ZEROES || (m.kind == QC_UNALLOC && !q->backing));
	return r;
}

static int qc_zero_fn(struct qcow2 *q, const uint8_t *buf, uint64_t off, uint64_t n, uint32_t flags)
{
	bool zero;
	int r;

	if (n == q->cs && !(flags & DEVIO_REQ_NO_HOLE) && (q->version >= 3 || !q->backing))
		return qc_drop_cluster(q, off >> q->cluster_bits);
	if (flags & DEVIO_REQ_FAST_ZERO)
		return -ENOTSUP;
	r = qc_reads_zero(q, off >> q->cluster_bits, &zero);
	if (r || (zero && !(flags & DEVIO_REQ_NO_HOLE)))
		return r;
	return qc_write_piece(q, NULL, off, n);
}

static int qc_trim_fn(struct qcow2 *q, const uint8_t *buf, uint64_t off, uint64_t n, uint32_t flags)
{
	/* Only whole clusters; a version 2 image over a backing file has no
	 * way to say "zero" and keeps its data (TRIM makes it undefined). */
	if (n < q->cs || (q->version < 3 && q->backing))
		return 0;
	return qc_drop_cluster(q, off >> q->cluster_bits);
}

static int qc_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	return qc_each_piece(to_qc(b), off, len, NULL, qc_zero_fn, flags);
}

static int qc_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	return qc_each_piece(to_qc(b), off, len, NULL, qc_trim_fn, flags);
}

/* ---- the fast path: requests moved to the image file ---- */

/* Count a moved request in the current generation's slot (the slot of
 * the generation it read is the one it counts in: rechecked). */
static unsigned qc_remap_enter(struct qcow2 *q)
{
	for (;;) {
		uint64_t g = atomic_load(&q->gen);
		unsigned slot = (unsigned)(g & 1);

		atomic_fetch_add(&q->inflight[slot], 1);
		if (atomic_load(&q->gen) == g)
			return slot;
		atomic_fetch_sub(&q->inflight[slot], 1);
	}
}

static void qc_remap_leave(struct qcow2 *q, unsigned slot)
{
	atomic_fetch_sub(&q->inflight[slot], 1);
}

/* Can guest [off, off+len) go straight to the image file, and where?  A
 * READ or WRITE wholly inside one run of allocated data clusters (for a
 * WRITE: ours alone, COPIED), found in the cached tables with the lock
 * shared; anything else (unallocated, zero, compressed, a table not
 * cached, a write that must allocate) is the data callbacks' work. */
static bool qc_remap_at(struct devio_backend *b, bool write, uint64_t off, uint64_t len, uint64_t *host)
{
	struct qcow2 *q = to_qc(b);
	struct qc_map m;
	uint64_t n;
	int r;

	pthread_rwlock_rdlock(&q->meta);
	r = qc_map_run(q, off, len, true, &m, &n);
	pthread_rwlock_unlock(&q->meta);
	if (r || n < len || m.kind != QC_DATA || (write && !(m.entry & QC_COPIED)))
		return false;
	*host = m.host + (off & ((1ull << q->unit_bits) - 1));
	return *host <= q->lower->size && len <= q->lower->size - *host; /* else the data callbacks say why */
}

/* backend.h try_remap: counted in its generation before the lookup, so
 * that a cluster this request may use is not freed until it has ended
 * (qc_drain). */
static bool qc_try_remap(struct devio_backend *b, struct devio_request *req)
{
	struct qcow2 *q = to_qc(b);
	bool write = req->op == DEVIO_OP_WRITE;
	unsigned slot = qc_remap_enter(q);
	uint64_t host;

	if (!qc_remap_at(b, write, req->offset, req->length, &host)) {
		qc_remap_leave(q, slot);
		return false;
	}
	if (write)
		atomic_store(&q->unsynced, true);
	req->offset = host;
	req->remap_tag = slot;
	return true;
}

static void qc_remap_done(struct devio_backend *b, struct devio_request *req)
{
	qc_remap_leave(to_qc(b), (unsigned)req->remap_tag);
}

static int qc_ranges_append(struct qc_range **to, size_t *nto, struct qc_range *from, size_t n)
{
	struct qc_range *t;

	if (!n)
		return 0;
	t = realloc(*to, (*nto + n) * sizeof(*t));
	if (!t)
		return -ENOMEM; /* a leak, never a corruption */
	memcpy(t + *nto, from, n * sizeof(*t));
	*to = t;
	*nto += n;
	return 0;
}

/* Frees (n ranges, cleared and durable) join `fresh`; returns in *out
 * the ranges no moved request can still use.  A range cleared in
 * generation G may be in use by requests counted in G or before; the
 * flip to G+1 happens only once the slot of G-1 is empty, so once the
 * slot of G is empty too, nothing uses it.  Never waits (the request
 * being waited for could be queued behind this one on a ring): what is
 * not free yet stays for the next FLUSH or the close. */
static int qc_drain(struct qcow2 *q, struct qc_range *frees, size_t n, struct qc_range **out, size_t *nout)
{
	int r;

	*out = NULL;
	*nout = 0;
	pthread_mutex_lock(&q->drain_lock);
	r = qc_ranges_append(&q->fresh, &q->nfresh, frees, n);
	for (int i = 0; i < 2; i++) {
		unsigned old = (unsigned)(atomic_load(&q->gen) & 1) ^ 1;

		if (atomic_load(&q->inflight[old]))
			break;
		if (q->nwaiting) {
			if (*out) { /* the second round: both lists */
				qc_ranges_append(out, nout, q->waiting, q->nwaiting);
				free(q->waiting);
			} else {
				*out = q->waiting;
				*nout = q->nwaiting;
			}
		}
		q->waiting = NULL;
		q->nwaiting = 0;
		if (!q->nfresh)
			break;
		q->waiting = q->fresh;
		q->nwaiting = q->nfresh;
		q->fresh = NULL;
		q->nfresh = 0;
		atomic_fetch_add(&q->gen, 1);
	}
	pthread_mutex_unlock(&q->drain_lock);
	return r;
}

/* ---- FLUSH ---- */

static int qc_flush(struct devio_backend *b)
{
	struct qcow2 *q = to_qc(b);
	struct qc_range *frees, *ready;
	size_t n, nready;
	int r;

	if (q->readonly)
		return 0;
	pthread_rwlock_wrlock(&q->meta);
	r = qc_meta_flush(q, true);
	frees = q->frees;
	n = r ? 0 : q->nfrees;
	if (n) {
		q->frees = NULL;
		q->nfrees = q->frees_cap = 0;
	}
	pthread_rwlock_unlock(&q->meta);
	if (r)
		return r;
	/* The cleared entries are durable: give their clusters back once no
	 * request can still be using the old mappings (moved ones: qc_drain;
	 * the data callbacks' own: the reuse lock). */
	r = qc_drain(q, frees, n, &ready, &nready);
	free(frees);
	if (!nready)
		return r;
	pthread_rwlock_wrlock(&q->reuse);
	pthread_rwlock_wrlock(&q->meta);
	if (!r)
		r = qc_free_apply(q, ready, nready);
	pthread_rwlock_unlock(&q->meta);
	pthread_rwlock_unlock(&q->reuse);
	free(ready);
	return r;
}

/* ---- extents ---- */

static int qc_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	struct qcow2 *q = to_qc(b);
	int r = 0;

	while (len && !r) {
		struct qc_map m;
		uint64_t n;
		uint32_t flags = 0;

		r = qc_map(q, off, len, &m, &n);
		if (r)
			break;
		if (m.kind == QC_ZEROES)
			flags = m.host ? DEVIO_EXTENT_ZERO : DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO;
		else if (m.kind == QC_UNALLOC && !q->backing)
			flags = DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO;
		r = fn(ctx, off, n, flags);
		off += n;
		len -= n;
	}
	return r;
}

/* ---- describe and close ---- */

static void qc_describe(struct devio_backend *b, char *out, size_t outlen)
{
	struct qcow2 *q = to_qc(b);

	snprintf(out, outlen, "qcow2 v%u %s, %" PRIu64 " bytes, %" PRIu64 "-byte clusters%s%s%s",
		 q->version, q->name, b->size, q->cs, q->readonly ? ", read-only" : "",
		 q->backing ? ", backing file " : "", q->backing ? q->backing_name : "");
}

static void qc_free(struct qcow2 *q)
{
	if (q->backing)
		devio_backend_close(q->backing);
	qc_cache_free(&q->l2c);
	qc_cache_free(&q->rbc);
	pthread_rwlock_destroy(&q->meta);
	pthread_mutex_destroy(&q->busy_lock);
	pthread_cond_destroy(&q->busy_cond);
	pthread_rwlock_destroy(&q->reuse);
	pthread_mutex_destroy(&q->drain_lock);
	free(q->waiting);
	free(q->fresh);
	free(q->l1);
	free(q->rt);
	free(q->busy);
	free(q->frees);
	free(q->name);
	free(q);
}

static void qc_close(struct devio_backend *b)
{
	struct qcow2 *q = to_qc(b);

	/* the second write-back stores the decrements the first one applied */
	if (!q->readonly && (qc_flush(b) || qc_meta_flush(q, true)))
		devio_err("%s: qcow2: metadata not fully written at close (leaked clusters possible)", q->name);
	qc_free(q);
}

static const struct devio_backend_ops qc_ops = {
	.name = "qcow2",
	.pread = qc_pread,
	.pwrite = qc_pwrite,
	.try_remap = qc_try_remap,
	.remap_done = qc_remap_done,
	.flush = qc_flush,
	.trim = qc_trim,
	.zero = qc_zero,
	.extents = qc_extents,
	.describe = qc_describe,
	.close = qc_close,
};

/* ---- opening: header, extensions, tables ---- */

static int qc_bad(struct qcow2 *q, const char *field, uint64_t off, const char *why)
{
	devio_err("%s: qcow2 header field %s at offset %" PRIu64 ": %s", q->name, field, off, why);
	return -EINVAL;
}

/* The feature name table's name for an incompatible bit, if any. */
static void qc_feature_name(const uint8_t *tab, uint32_t len, unsigned bit, char *out, size_t outlen)
{
	snprintf(out, outlen, "bit %u", bit);
	for (uint32_t i = 0; tab && i + 48 <= len; i += 48)
		if (tab[i] == 0 && tab[i + 1] == bit)
			snprintf(out, outlen, "bit %u (%.46s)", bit, (const char *)tab + i + 2);
}

/* Header extensions in [start, end) of the first cluster h. */
static int qc_parse_ext(struct qcow2 *q, const uint8_t *h, uint32_t start, uint32_t end,
			const uint8_t **features, uint32_t *features_len)
{
	uint32_t pos = start;

	while (pos + 8 <= end) {
		uint32_t type = get32(h + pos), len = get32(h + pos + 4);

		if (type == QC_EXT_END)
			return 0;
		if (len > end - pos - 8)
			return qc_bad(q, "header extension length", pos + 4, "runs past the first cluster");
		if (type == QC_EXT_BACKFMT) {
			if (len == 0 || len >= sizeof(q->backing_fmt))
				return qc_bad(q, "backing file format", pos + 8, "empty or too long");
			memcpy(q->backing_fmt, h + pos + 8, len);
			q->backing_fmt[len] = 0;
		} else if (type == QC_EXT_FEATURES) {
			*features = h + pos + 8;
			*features_len = len;
		}
		pos += 8 + (uint32_t)round_up(len, 8);
	}
	return 0;
}

/* Refuse what this layer cannot do right; serve read-only what it can
 * only read. */
static int qc_check_features(struct qcow2 *q, const uint8_t *features, uint32_t flen)
{
	uint64_t known = QC_INCOMPAT_DIRTY | QC_INCOMPAT_CORRUPT | QC_INCOMPAT_EXTL2;
	char name[80];

	if (q->incompat & QC_INCOMPAT_CORRUPT)
		return qc_bad(q, "incompatible_features", 72,
			      "the image is marked corrupt (run qemu-img check -r all)");
	for (unsigned bit = 0; bit < 64; bit++) {
		const char *why = NULL;

		if (!(q->incompat & (1ull << bit)) || (known & (1ull << bit)))
			continue;
		if (bit == 2)
			why = "an external data file is not supported";
		else if (bit == 3)
			why = "a compression type other than zlib (zstd) is not supported";
		qc_feature_name(features, flen, bit, name, sizeof(name));
		devio_err("%s: qcow2 header field incompatible_features at offset 72: %s set: %s", q->name, name,
			  why ? why : "unknown feature, refused");
		return -EINVAL;
	}
	if (q->extl2) {
		devio_warn("%s: qcow2 image has extended L2 entries (subclusters): served read-only", q->name);
		q->readonly = true;
	}
	if (q->incompat & QC_INCOMPAT_DIRTY) {
		devio_warn("%s: qcow2 image is dirty (lazy refcounts not repaired): served read-only; "
			   "`qemu-img check -r all` repairs it", q->name);
		q->readonly = true;
	}
	return 0;
}

/* The name of the snapshot table entry at *off (printable ASCII, at most
 * outlen - 1 bytes); *off moves to the next entry.  Untrusted: every
 * length is checked against the file. */
static int qc_snapshot_name(struct qcow2 *q, uint64_t *off, char *out, size_t outlen)
{
	uint64_t size = q->lower->size, at, n;
	uint8_t e[40];
	int r;

	if (*off > size || sizeof(e) > size - *off)
		return -EIO;
	if ((r = devio_layer_read(q->lower, e, sizeof(e), *off)))
		return r;
	at = *off + sizeof(e) + get32(e + 36) + ((uint32_t)e[12] << 8 | e[13]); /* extra data, id */
	n = (uint32_t)e[14] << 8 | e[15];
	*off = round_up(at + n, 8);
	n = n < outlen - 1 ? n : outlen - 1;
	if (at > size || n > size - at)
		return -EIO;
	if ((r = devio_layer_read(q->lower, out, n, at)))
		return r;
	out[n] = 0;
	for (uint64_t i = 0; i < n; i++)
		if (out[i] < 0x20 || out[i] > 0x7e)
			out[i] = '?';
	return 0;
}

/* Images with internal snapshots are served read-only; say which ones. */
static void qc_list_snapshots(struct qcow2 *q)
{
	char list[256] = "", name[48];
	uint64_t off = q->snap_off;
	size_t used = 0;

	if (!q->nb_snapshots)
		return;
	for (uint32_t i = 0; i < q->nb_snapshots && i < 32 && used < sizeof(list) - 1; i++) {
		bool bad = qc_snapshot_name(q, &off, name, sizeof(name)) != 0;
		int n;

		if (bad)
			snprintf(name, sizeof(name), "unreadable table entry at offset %" PRIu64, off);
		n = snprintf(list + used, sizeof(list) - used, "%s'%s'", used ? ", " : "", name);
		used += n > 0 ? (size_t)n : 0;
		if (bad)
			break;
	}
	devio_warn("%s: qcow2 image has %u internal snapshots (%s): served read-only (the active layer)",
		   q->name, q->nb_snapshots, list);
	q->readonly = true;
}

/* Fixed header fields of the first cluster h (len bytes of it read). */
static int qc_parse_fixed(struct qcow2 *q, const uint8_t *h, uint32_t len)
{
	uint32_t order = 4;

	q->version = get32(h + 4);
	if (q->version != 2 && q->version != 3)
		return qc_bad(q, "version", 4, "only versions 2 and 3 exist");
	q->header_length = QC_V2_HEADER;
	if (q->version == 3) {
		if (len < QC_V3_HEADER)
			return qc_bad(q, "header_length", 100, "image shorter than a version 3 header");
		q->incompat = get64(h + 72);
		q->compat = get64(h + 80);
		q->autoclear = get64(h + 88);
		order = get32(h + 96);
		q->header_length = get32(h + 100);
		if (q->header_length < QC_V3_HEADER || q->header_length % 8 || q->header_length > len)
			return qc_bad(q, "header_length", 100, "below 104, not a multiple of 8, or past the first cluster");
		if (q->header_length > 104 && h[104] != 0 && !(q->incompat & QC_INCOMPAT_COMPRESS))
			return qc_bad(q, "compression_type", 104, "non-zlib compression without its feature bit");
		if (q->incompat & QC_INCOMPAT_EXTL2) {
			if (q->cluster_bits < 14)
				return qc_bad(q, "cluster_bits", 20, "extended L2 entries need clusters of 16 KiB or more");
			q->extl2 = true;
			q->l2_bits = q->cluster_bits - 4;
			q->l2_entries = 1ull << q->l2_bits;
			q->l2_esize = 16;
			q->unit_bits = q->cluster_bits - 5;
		}
	}
	if (order != 4)
		return qc_bad(q, "refcount_order", 96, "only 16-bit refcounts (order 4, the default) are supported");
	if (get32(h + 32) != 0)
		return qc_bad(q, "crypt_method", 32, "encrypted images are not supported");
	q->nb_snapshots = get32(h + 60);
	q->snap_off = get64(h + 64);
	if (q->nb_snapshots && (q->snap_off & (q->cs - 1)))
		return qc_bad(q, "snapshots_offset", 64, "not aligned to a cluster");
	return 0;
}

/* L1 and refcount table geometry against the virtual size and the file. */
static int qc_parse_tables(struct qcow2 *q, const uint8_t *h)
{
	uint64_t size = get64(h + 24), per_l2 = q->l2_entries << q->cluster_bits, need;
	uint64_t fsize = q->lower->size;
	uint32_t rtc = get32(h + 56);

	q->l1_size = get32(h + 36);
	q->l1_off = get64(h + 40);
	q->rt_off = get64(h + 48);
	if (size > (1ull << 62) || size % 512)
		return qc_bad(q, "size", 24, "larger than 2^62 or not a multiple of 512");
	need = size / per_l2 + (size % per_l2 != 0);
	if (q->l1_size < need)
		return qc_bad(q, "l1_size", 36, "too small for the virtual size");
	if ((uint64_t)q->l1_size * 8 > QC_MAX_L1_BYTES)
		return qc_bad(q, "l1_size", 36, "L1 table larger than 32 MiB");
	if (q->l1_size && ((q->l1_off & (q->cs - 1)) || q->l1_off == 0 || q->l1_off > fsize ||
			   (uint64_t)q->l1_size * 8 > fsize - q->l1_off))
		return qc_bad(q, "l1_table_offset", 40, "misaligned, zero or the table passes the end of the image");
	if (rtc == 0 || (uint64_t)rtc * q->cs > QC_MAX_RT_BYTES)
		return qc_bad(q, "refcount_table_clusters", 56, "zero or larger than 8 MiB");
	if ((q->rt_off & (q->cs - 1)) || q->rt_off == 0 || q->rt_off > fsize ||
	    (uint64_t)rtc * q->cs > fsize - q->rt_off)
		return qc_bad(q, "refcount_table_offset", 48, "misaligned, zero or the table passes the end of the image");
	q->rt_entries = ((uint64_t)rtc * q->cs) / 8;
	q->vsize = size;
	return 0;
}

static int qc_load_table(struct qcow2 *q, uint64_t **t, uint64_t n, uint64_t off)
{
	uint8_t *raw = malloc(n ? n * 8 : 1);
	int r;

	*t = calloc(n ? n : 1, sizeof(**t));
	if (!raw || !*t) {
		free(raw);
		return -ENOMEM;
	}
	r = n ? devio_layer_read(q->lower, raw, n * 8, off) : 0;
	for (uint64_t i = 0; !r && i < n; i++)
		(*t)[i] = get64(raw + i * 8);
	free(raw);
	return r;
}

static int qc_load_tables(struct qcow2 *q)
{
	int r = qc_load_table(q, &q->l1, q->l1_size, q->l1_off);

	if (!r)
		r = qc_load_table(q, &q->rt, q->rt_entries, q->rt_off);
	for (uint64_t i = 0; !r && i < q->l1_size; i++)
		r = qc_l1_check(q, i);
	for (uint64_t i = 0; !r && i < q->rt_entries; i++) {
		uint64_t e = q->rt[i];

		if ((e & QC_RT_RESERVED) || (e && e >= q->file_end)) {
			devio_err("%s: qcow2: bad refcount table entry %" PRIu64 " (0x%016" PRIx64 ") at offset %"
				  PRIu64 ": reserved bits or outside the image", q->name, i, e, q->rt_off + i * 8);
			r = -EIO;
		}
	}
	return r;
}

/* ---- backing files ---- */

static int qc_chain_push(const char *path)
{
	struct stat st;

	if (stat(path, &st))
		return 0; /* not a file (opening it says why) */
	for (int i = 0; i < qc_chain.depth; i++)
		if (qc_chain.dev[i] == st.st_dev && qc_chain.ino[i] == st.st_ino)
			return -ELOOP;
	if (qc_chain.depth >= QC_MAX_CHAIN)
		return -EMLINK;
	qc_chain.dev[qc_chain.depth] = st.st_dev;
	qc_chain.ino[qc_chain.depth] = st.st_ino;
	qc_chain.depth++;
	return 1;
}

/* The backing file's path: absolute as named, else relative to the
 * image's folder (never a URI or ram: source: always a path). */
static int qc_backing_path(struct qcow2 *q, char *out, size_t outlen)
{
	const char *slash = strrchr(q->name, '/');
	int n;

	if (strstr(q->name, "://") || !strncmp(q->name, "ram:", 4)) {
		devio_err("%s: qcow2: a backing file is only followed for an image file", q->name);
		return -EINVAL;
	}
	if (q->backing_name[0] == '/')
		n = snprintf(out, outlen, "%s", q->backing_name);
	else if (slash)
		n = snprintf(out, outlen, "%.*s/%s", (int)(slash - q->name), q->name, q->backing_name);
	else
		n = snprintf(out, outlen, "./%s", q->backing_name);
	return n < 0 || (size_t)n >= outlen ? -ENAMETOOLONG : 0;
}

static int qc_open_backing(struct qcow2 *q)
{
	struct devio_open_opts bo = { .readonly = true };
	char path[PATH_MAX];
	int r = qc_backing_path(q, path, sizeof(path)), pushed;

	if (r)
		return r;
	if (q->backing_fmt[0]) {
		if (strcmp(q->backing_fmt, "qcow2") && strcmp(q->backing_fmt, "raw")) {
			devio_err("%s: qcow2: backing file format '%s' is not supported (qcow2 or raw)", q->name,
				  q->backing_fmt);
			return -EINVAL;
		}
		bo.format = q->backing_fmt;
	}
	pushed = qc_chain_push(path);
	if (pushed < 0) {
		devio_err("%s: qcow2: backing file %s: %s", q->name, path,
			  pushed == -ELOOP ? "the chain loops back to an image already in it"
					   : "the backing chain is deeper than 16 images");
		return -ELOOP;
	}
	r = devio_backend_open(path, &bo, &q->backing);
	qc_chain.depth -= pushed;
	if (r)
		devio_err("%s: qcow2: cannot open backing file %s", q->name, path);
	return r;
}

static int qc_read_backing_name(struct qcow2 *q, const uint8_t *h, uint32_t len)
{
	uint64_t off = get64(h + 8);
	uint32_t n = get32(h + 16);

	if (!off)
		return 0;
	if (n == 0 || n > QC_MAX_BACKING_NAME || off > len || n > len - off)
		return qc_bad(q, "backing_file_offset", 8, "name empty, longer than 1023 bytes or outside the first cluster");
	memcpy(q->backing_name, h + off, n);
	q->backing_name[n] = 0;
	if (strlen(q->backing_name) != n)
		return qc_bad(q, "backing_file_size", 16, "the name holds a NUL byte");
	return 0;
}

/* ---- open ---- */

bool devio_qcow2_probe(struct devio_backend *lower)
{
	uint8_t m[4];

	return lower->size >= QC_V2_HEADER && devio_layer_read(lower, m, 4, 0) == 0 && get32(m) == QC_MAGIC;
}

static void qc_geometry(struct qcow2 *q, uint32_t cb)
{
	q->cluster_bits = cb;
	q->cs = 1ull << cb;
	q->l2_bits = cb - 3;
	q->l2_entries = 1ull << q->l2_bits;
	q->l2_esize = 8;
	q->unit_bits = cb;
	q->rb_bits = cb - 1;
	q->csize_shift = 62 - (cb - 8);
	q->csize_mask = (1ull << (cb - 8)) - 1;
	q->coff_mask = (1ull << q->csize_shift) - 1;
	q->file_end = round_up(q->lower->size, q->cs);
	q->free_hint = q->file_end >> cb;
}

/* Everything the first cluster says: fixed fields, extensions, features,
 * the backing file's name, the tables' geometry. */
static int qc_parse_first_cluster(struct qcow2 *q)
{
	const uint8_t *features = NULL;
	uint32_t flen = 0, len = (uint32_t)(q->lower->size < q->cs ? q->lower->size : q->cs);
	uint8_t *h = malloc(len);
	int r;

	if (!h)
		return -ENOMEM;
	r = devio_layer_read(q->lower, h, len, 0);
	if (!r)
		r = qc_parse_fixed(q, h, len);
	if (!r) {
		uint64_t boff = get64(h + 8);
		uint32_t end = boff > q->header_length && boff < len ? (uint32_t)boff : len;

		r = qc_parse_ext(q, h, q->header_length, end, &features, &flen);
	}
	if (!r)
		r = qc_check_features(q, features, flen);
	if (!r)
		r = qc_read_backing_name(q, h, len);
	if (!r)
		r = qc_parse_tables(q, h);
	free(h);
	return r;
}

static int qc_parse(struct qcow2 *q, bool explicit)
{
	uint8_t head[QC_V3_HEADER] = { 0 };
	uint32_t cb;
	int r;

	if (q->lower->size < QC_V2_HEADER)
		return qc_bad(q, "magic", 0, "image shorter than a qcow2 header");
	r = devio_layer_read(q->lower, head, q->lower->size < QC_V3_HEADER ? QC_V2_HEADER : QC_V3_HEADER, 0);
	if (r)
		return r;
	if (get32(head) != QC_MAGIC)
		return qc_bad(q, "magic", 0, "not a qcow2 image (no QFI\\xfb)");
	cb = get32(head + 20);
	if (cb < 9 || cb > 21)
		return qc_bad(q, "cluster_bits", 20, "cluster size outside 512 B .. 2 MiB");
	qc_geometry(q, cb);
	r = qc_parse_first_cluster(q);
	if (!r)
		qc_list_snapshots(q);
	if (!r && q->backing_name[0] && !explicit && !qc_chain.depth) {
		devio_err("%s: qcow2 image names a backing file (%s): refused on automatic detection; "
			  "serve it with --format qcow2 to follow it (opened read-only)", q->name, q->backing_name);
		return -EPERM;
	}
	if (!r)
		r = qc_load_tables(q);
	if (!r && q->backing_name[0])
		r = qc_open_backing(q);
	return r;
}

/* Writing an image with auto-clear bits we do not know: clear them first. */
static int qc_clear_autoclear(struct qcow2 *q)
{
	uint8_t v[8] = { 0 };
	int r;

	if (q->version < 3 || !q->autoclear)
		return 0;
	r = qc_meta_write(q, v, 8, 88);
	if (!r)
		r = qc_sync(q);
	if (!r)
		q->autoclear = 0;
	return r;
}

int devio_qcow2_open(const char *name, struct devio_backend *lower, bool explicit,
		     const struct devio_open_opts *opts, struct devio_backend **out)
{
	struct qcow2 *q = calloc(1, sizeof(*q));
	pthread_rwlockattr_t ra;
	int r, pushed = 0;

	if (!q || !(q->name = strdup(name))) {
		free(q);
		return -ENOMEM;
	}
	q->lower = lower;
	pthread_mutex_init(&q->busy_lock, NULL);
	pthread_cond_init(&q->busy_cond, NULL);
	pthread_mutex_init(&q->drain_lock, NULL);
	pthread_rwlockattr_init(&ra);
	pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&q->reuse, &ra);
	pthread_rwlock_init(&q->meta, &ra);
	pthread_rwlockattr_destroy(&ra);
	q->readonly = (lower->caps & DEVIO_CAP_READONLY) || (opts && opts->readonly);
	if (explicit && !qc_chain.depth)
		pushed = qc_chain_push(name) > 0; /* the top of a chain, for loop detection */
	r = qc_parse(q, explicit);
	qc_chain.depth -= pushed;
	if (!r)
		r = qc_cache_init(q, &q->l2c, q->l1_size);
	if (!r)
		r = qc_cache_init(q, &q->rbc, q->rt_entries);
	if (!r && !q->readonly)
		r = qc_clear_autoclear(q);
	if (r) {
		qc_free(q);
		return r;
	}
	devio_layer_init(&q->b, &qc_ops, lower, DEVIO_CAP_FLUSH | DEVIO_CAP_FUA | DEVIO_CAP_MULTI_CONN | DEVIO_CAP_CACHE, q);
	q->b.size = q->vsize; /* devio_layer_init copied the file's */
	/* READs into a pipe: spliced from the file where try_remap moves
	 * them, else -EAGAIN (the front end reads into memory instead) */
	q->b.caps |= DEVIO_CAP_EXTENTS | (lower->caps & DEVIO_CAP_SPLICE_READ);
	if (q->readonly)
		q->b.caps = (q->b.caps & ~(DEVIO_CAP_FLUSH | DEVIO_CAP_FUA)) | DEVIO_CAP_READONLY;
	else
		q->b.caps |= DEVIO_CAP_FLUSH | DEVIO_CAP_FUA | DEVIO_CAP_TRIM | DEVIO_CAP_ZERO;
	*out = &q->b;
	return 0;
}

/* ---- new images ---- */

/* A new image's layout, in clusters from the start: the header, the
 * refcount table (rt), the refcount blocks (rb, counting all n metadata
 * clusters), the L1 table (l1c; none for an empty disk, as qemu). */
struct qc_new {
	uint32_t version, cb;
	uint64_t size, cs, l1_n, rt, rb, l1c, n;
};

static void put32(uint8_t *p, uint32_t v)
{
	v = htobe32(v);
	memcpy(p, &v, 4);
}

/* The options checked, the size rounded to 512 bytes, the layout worked
 * out (the refcount blocks count themselves: grown until they fit). */
static int qc_new_layout(const char *path, const struct devio_qcow2_new *o, struct qc_new *g)
{
	uint64_t cs = o && o->cluster_size ? o->cluster_size : 65536, per_l1, n, rb, rt;

	g->version = o && o->version ? o->version : 3;
	if (g->version != 2 && g->version != 3) {
		devio_err("%s: qcow2 version %u does not exist (2: compat=0.10, 3: compat=1.1)", path, g->version);
		return -EINVAL;
	}
	if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1))) {
		devio_err("%s: cluster_size %" PRIu64 ": want a power of two from 512 to 2M", path, cs);
		return -EINVAL;
	}
	if (g->size > (1ull << 62)) {
		devio_err("%s: cannot make a qcow2 image of %" PRIu64 " bytes (at most 2^62)", path, g->size);
		return -EFBIG;
	}
	if (g->size % 512) {
		devio_warn("%s: a qcow2 image holds whole 512-byte sectors: %" PRIu64 " bytes become %" PRIu64,
			   path, g->size, round_up(g->size, 512));
		g->size = round_up(g->size, 512);
	}
	g->cs = cs;
	g->cb = (uint32_t)__builtin_ctzll(cs);
	per_l1 = (cs / 8) * cs;
	g->l1_n = g->size / per_l1 + (g->size % per_l1 != 0);
	if (g->l1_n * 8 > QC_MAX_L1_BYTES) {
		devio_err("%s: %" PRIu64 " bytes need an L1 table over 32 MiB with %" PRIu64 "-byte clusters: "
			  "take larger clusters (-o cluster_size=)", path, g->size, cs);
		return -EFBIG;
	}
	g->l1c = round_up(g->l1_n * 8, cs) / cs;
	g->rt = g->rb = 1;
	for (;;) {
		n = 1 + g->rt + g->rb + g->l1c;
		rb = (n + cs / 2 - 1) / (cs / 2);
		rt = round_up(rb * 8, cs) / cs;
		if (rb == g->rb && rt == g->rt)
			break;
		g->rb = rb;
		g->rt = rt;
	}
	g->n = n;
	return 0;
}

/* The image's bytes (g->n clusters); NULL if out of memory. */
static uint8_t *qc_new_image(const struct qc_new *g)
{
	uint64_t rb_off = (1 + g->rt) * g->cs, l1_off = rb_off + g->rb * g->cs;
	uint8_t *p = calloc(g->n, g->cs);

	if (!p)
		return NULL;
	put32(p, QC_MAGIC);
	put32(p + 4, g->version);
	put32(p + 20, g->cb);
	put64(p + 24, g->size);
	put32(p + 36, (uint32_t)g->l1_n);
	put64(p + 40, g->l1c ? l1_off : 0);
	put64(p + 48, g->cs);              /* the refcount table: cluster 1 */
	put32(p + 56, (uint32_t)g->rt);
	if (g->version == 3) {             /* no feature bits */
		put32(p + 96, 4);          /* refcount_order: 16 bits */
		put32(p + 100, QC_V3_HEADER);
	}                                  /* the extensions' end: 8 zero bytes after the header */
	for (uint64_t i = 0; i < g->rb; i++)
		put64(p + g->cs + i * 8, rb_off + i * g->cs);
	for (uint64_t cl = 0; cl < g->n; cl++)  /* contiguous blocks: one array of 16-bit counts */
		p[rb_off + cl * 2 + 1] = 1;
	return p;
}

/* The image written into fd (a new empty file; devio_file_replace's
 * write_fn). */
static int qc_new_write(int fd, void *ctx)
{
	const struct qc_new *g = ctx;
	uint8_t *p = qc_new_image(g);
	uint64_t len = g->n * g->cs;
	int r = 0;

	if (!p)
		return -ENOMEM;
	errno = 0;
	if (pwrite(fd, p, len, 0) != (ssize_t)len)
		r = errno ? -errno : -EIO;
	free(p);
	return r;
}

/* Open what devio_file_replace made: the file backend and the qcow2 layer. */
static int qc_new_open(const char *path, struct devio_backend **out)
{
	static const struct devio_open_opts o = { .format = "qcow2" };
	struct devio_backend *store;
	int r = devio_file_open(path, &o, &store);

	if (!r && (r = devio_qcow2_open(path, store, true, &o, out)))
		devio_backend_close(store);
	return r;
}

int devio_qcow2_create(const char *path, uint64_t size, const struct devio_qcow2_new *o,
		       struct devio_backend **out)
{
	struct qc_new g = { .size = size };
	struct stat st;
	int r;

	if (stat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
		devio_err("%s: not a regular file: a new qcow2 image is a file", path);
		return -EINVAL;
	}
	r = qc_new_layout(path, o, &g);
	if (r)
		return r;
	r = devio_file_replace(path, 0666, qc_new_write, &g);
	if (r) {
		devio_err("%s: cannot create the qcow2 image: %s", path, strerror(-r));
		return r;
	}
	if (out && (r = qc_new_open(path, out)))
		devio_file_remove(path); /* nothing half made stays */
	return r;
}
