/* ram.c - a RAM disk that takes memory only where it is written and gives
 * it back on TRIM/ZERO, like ImDisk Toolkit's RamDyn.
 *
 * The whole disk is one anonymous MAP_NORESERVE mapping: the kernel hands
 * out a page the first time it is written and takes it back on
 * madvise(MADV_DONTNEED), so a ram:1T disk costs nothing at open.  Beside
 * it a table of one 32-bit state word per 64 KiB chunk says whether the
 * chunk was ever written (for reads of never-written chunks, EXTENTS and
 * the resident-memory cap) and keeps a TRIM that frees a chunk from racing
 * a WRITE that is filling it:
 *
 *   bit 31 ALLOC    the chunk holds data (counted in `resident`)
 *   bit 30 FREEING  a TRIM/ZERO is giving the chunk's pages back
 *   bits 0..29      writers copying into the chunk right now
 *
 * Writers and readers take no lock: a write bumps the writer count with a
 * compare-and-swap (allocating the chunk on the way), a read of an
 * unallocated chunk just fills zeroes.  A whole-chunk TRIM waits until no
 * writer is inside, marks FREEING, drops the pages and clears the word.
 * A ZERO with NO_HOLE enters its chunks as a writer instead (allocating
 * them) and drops their pages, so they stay allocated and counted.
 *
 * 64 KiB chunks: small enough that a filesystem's discards of freed blocks
 * really free memory and that the cap is counted finely, large enough that
 * the table for 1 TiB is 64 MiB of lazily-zeroed address space (touched
 * only where the disk is used).  Memory is counted per chunk, so
 * devio_ram_resident() is an upper bound of what the pages really use.
 */
#include <errno.h>
#include <inttypes.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/util.h"

#define RAM_CHUNK_SHIFT 16
#define RAM_CHUNK_SIZE (1ull << RAM_CHUNK_SHIFT)
#define RAM_ALLOC   (1u << 31)
#define RAM_FREEING (1u << 30)
#define RAM_WRITERS (RAM_FREEING - 1)
#define RAM_MAX_SIZE (1ull << 46) /* one mapping; x86-64 user space is 128 TiB */

struct ram_disk {
	struct devio_backend b;
	unsigned char *mem;        /* size rounded up to whole chunks */
	size_t map_len;
	uint64_t nchunks;
	_Atomic uint32_t *state;   /* one word per chunk, see above */
	_Atomic uint64_t resident; /* bytes of allocated chunks */
	uint64_t max_resident;     /* 0 = no cap */
	long page_size;
};

static struct ram_disk *ram_of(struct devio_backend *b)
{
	return (struct ram_disk *)b->priv;
}

/* Count a new chunk against the cap; false if it would exceed it. */
static bool ram_reserve(struct ram_disk *rd)
{
	uint64_t now = atomic_fetch_add(&rd->resident, RAM_CHUNK_SIZE);

	if (rd->max_resident && now + RAM_CHUNK_SIZE > rd->max_resident) {
		atomic_fetch_sub(&rd->resident, RAM_CHUNK_SIZE);
		return false;
	}
	return true;
}

/* Enter chunk c as a writer, allocating it if needed; *fresh (if not
 * NULL) says whether this call allocated it (then it reads as zeroes: a
 * chunk is cleared only after its pages were dropped). */
static int ram_enter_writer_fresh(struct ram_disk *rd, uint64_t c, bool *fresh)
{
	uint32_t s = atomic_load(&rd->state[c]);

	for (;;) {
		bool reserved = false;

		if (s & RAM_FREEING) {
			sched_yield();
			s = atomic_load(&rd->state[c]);
			continue;
		}
		if (!(s & RAM_ALLOC)) {
			if (!ram_reserve(rd))
				return -ENOSPC;
			reserved = true;
		}
		if (atomic_compare_exchange_weak(&rd->state[c], &s, (s + 1) | RAM_ALLOC)) {
			if (fresh)
				*fresh = reserved;
			return 0;
		}
		if (reserved)
			atomic_fetch_sub(&rd->resident, RAM_CHUNK_SIZE);
	}
}

static int ram_enter_writer(struct ram_disk *rd, uint64_t c)
{
	return ram_enter_writer_fresh(rd, c, NULL);
}

/* Enter chunk c as a writer only if it is allocated; false if not. */
static bool ram_enter_allocated(struct ram_disk *rd, uint64_t c)
{
	uint32_t s = atomic_load(&rd->state[c]);

	for (;;) {
		if (!(s & RAM_ALLOC))
			return false; /* unallocated or being freed: zeroes */
		if (atomic_compare_exchange_weak(&rd->state[c], &s, s + 1))
			return true;
	}
}

static void ram_leave_writer(struct ram_disk *rd, uint64_t c)
{
	atomic_fetch_sub(&rd->state[c], 1);
}

/* Give chunk c's memory back to the OS if it is allocated. */
static void ram_free_chunk(struct ram_disk *rd, uint64_t c)
{
	uint32_t s = atomic_load(&rd->state[c]);

	for (;;) {
		if (!(s & RAM_ALLOC) || (s & RAM_FREEING))
			return; /* nothing to free, or another TRIM frees it */
		if (s & RAM_WRITERS) {
			sched_yield();
			s = atomic_load(&rd->state[c]);
			continue;
		}
		if (atomic_compare_exchange_weak(&rd->state[c], &s, RAM_FREEING))
			break;
	}
	madvise(rd->mem + (c << RAM_CHUNK_SHIFT), RAM_CHUNK_SIZE, MADV_DONTNEED);
	atomic_fetch_sub(&rd->resident, RAM_CHUNK_SIZE);
	atomic_store(&rd->state[c], 0);
}

/* Zero bytes of a chunk the caller is a writer of: whole pages are
 * dropped (they read as zeroes and take no memory until written again),
 * the edges written with zeroes.  The chunk stays allocated. */
static void ram_zero_bytes(struct ram_disk *rd, uint64_t off, uint64_t len)
{
	uint64_t ps = (uint64_t)rd->page_size;
	uint64_t pstart = (off + ps - 1) / ps * ps, pend = (off + len) / ps * ps;

	if (pstart < pend) {
		memset(rd->mem + off, 0, pstart - off);
		madvise(rd->mem + pstart, pend - pstart, MADV_DONTNEED);
		memset(rd->mem + pend, 0, off + len - pend);
	} else {
		memset(rd->mem + off, 0, len);
	}
}

/* Zero part of a chunk that may be unallocated (which reads as zeroes). */
static void ram_zero_part(struct ram_disk *rd, uint64_t off, uint64_t len)
{
	uint64_t c = off >> RAM_CHUNK_SHIFT;

	if (!ram_enter_allocated(rd, c))
		return; /* reads as zeroes already */
	ram_zero_bytes(rd, off, len);
	ram_leave_writer(rd, c);
}

/* Zero part of one chunk and keep it allocated (NO_HOLE): a chunk that
 * was not is allocated here, counted against the cap (-ENOSPC past it). */
static int ram_zero_keep(struct ram_disk *rd, uint64_t off, uint64_t len)
{
	uint64_t c = off >> RAM_CHUNK_SHIFT;
	bool fresh = false;
	int r = ram_enter_writer_fresh(rd, c, &fresh);

	if (r)
		return r;
	if (!fresh)
		ram_zero_bytes(rd, off, len);
	ram_leave_writer(rd, c);
	return 0;
}

/* Bytes that allocating the unallocated chunks of a range would add. */
static uint64_t ram_missing(struct ram_disk *rd, uint64_t off, uint64_t len)
{
	uint64_t first = off >> RAM_CHUNK_SHIFT, last = (off + len - 1) >> RAM_CHUNK_SHIFT, n = 0;

	for (uint64_t c = first; c <= last; c++)
		if (!(atomic_load(&rd->state[c]) & RAM_ALLOC))
			n += RAM_CHUNK_SIZE;
	return n;
}

/* Read: allocated chunks are copied, the others read as zeroes. */
static int ram_pread(struct devio_backend *b, void *buf, uint64_t len, uint64_t off)
{
	struct ram_disk *rd = ram_of(b);
	unsigned char *out = buf;

	while (len) {
		uint64_t c = off >> RAM_CHUNK_SHIFT;
		uint64_t n = RAM_CHUNK_SIZE - (off & (RAM_CHUNK_SIZE - 1));

		if (n > len)
			n = len;
		if (atomic_load_explicit(&rd->state[c], memory_order_acquire) & RAM_ALLOC)
			memcpy(out, rd->mem + off, n);
		else
			memset(out, 0, n);
		out += n;
		off += n;
		len -= n;
	}
	return 0;
}

/* Pieces of the mapping itself; never-written chunks as NULL pieces (so
 * that reading them maps no pages).  Adjacent pieces of one kind merge. */
static int ram_map_read(struct ram_disk *rd, uint64_t off, uint64_t len, struct iovec *iov, int max)
{
	int n = 0;

	while (len) {
		uint64_t c = off >> RAM_CHUNK_SHIFT;
		uint64_t step = RAM_CHUNK_SIZE - (off & (RAM_CHUNK_SIZE - 1));
		bool data = atomic_load_explicit(&rd->state[c], memory_order_acquire) & RAM_ALLOC;

		if (step > len)
			step = len;
		if (n && (iov[n - 1].iov_base != NULL) == data) {
			iov[n - 1].iov_len += step;
		} else {
			if (n == max)
				return -E2BIG;
			iov[n].iov_base = data ? rd->mem + off : NULL;
			iov[n].iov_len = step;
			n++;
		}
		off += step;
		len -= step;
	}
	return n;
}

static void ram_leave_range(struct ram_disk *rd, uint64_t off, uint64_t len)
{
	uint64_t first = off >> RAM_CHUNK_SHIFT, last = (off + len - 1) >> RAM_CHUNK_SHIFT;

	for (uint64_t c = first; c <= last; c++)
		ram_leave_writer(rd, c);
}

/* Enter every chunk of the range as a writer (allocating it), so that the
 * caller may copy straight into the mapping; one piece, as the mapping is
 * contiguous. */
static int ram_map_write(struct ram_disk *rd, uint64_t off, uint64_t len, struct iovec *iov, int max)
{
	uint64_t first = off >> RAM_CHUNK_SHIFT, last = (off + len - 1) >> RAM_CHUNK_SHIFT;

	if (max < 1)
		return -E2BIG;
	for (uint64_t c = first; c <= last; c++) {
		int r = ram_enter_writer(rd, c);

		if (r) {
			if (c > first)
				ram_leave_range(rd, off, (c << RAM_CHUNK_SHIFT) - off);
			return r;
		}
	}
	iov[0].iov_base = rd->mem + off;
	iov[0].iov_len = len;
	return 1;
}

/* A READ or WRITE in place (DEVIO_BUF_MAP): the pieces, their number in
 * req->iovcnt. */
static int ram_map(struct devio_backend *b, struct devio_request *req)
{
	struct ram_disk *rd = ram_of(b);
	int n = req->op == DEVIO_OP_WRITE ? ram_map_write(rd, req->offset, req->length, req->iov, req->iovcnt)
					   : ram_map_read(rd, req->offset, req->length, req->iov, req->iovcnt);

	if (n < 0)
		return n;
	req->iovcnt = n;
	return 0;
}

/* The end of a WRITE in place: its chunks' writers leave. */
static void ram_unmap(struct devio_backend *b, struct devio_request *req)
{
	ram_leave_range(ram_of(b), req->offset, req->length);
}

/* Write: each chunk touched is allocated (or -ENOSPC past the cap). */
static int ram_pwrite(struct devio_backend *b, const void *buf, uint64_t len, uint64_t off, uint32_t flags)
{
	struct ram_disk *rd = ram_of(b);
	const unsigned char *in = buf;

	while (len) {
		uint64_t c = off >> RAM_CHUNK_SHIFT;
		uint64_t n = RAM_CHUNK_SIZE - (off & (RAM_CHUNK_SIZE - 1));
		int r;

		if (n > len)
			n = len;
		r = ram_enter_writer(rd, c);
		if (r) {
			devio_debug("ram: write at offset %" PRIu64 ": resident cap of %" PRIu64 " bytes reached",
				    off, rd->max_resident);
			return r;
		}
		memcpy(rd->mem + off, in, n);
		ram_leave_writer(rd, c);
		in += n;
		off += n;
		len -= n;
	}
	return 0;
}

/* TRIM (and ZERO without NO_HOLE): whole chunks are freed, partial ones
 * zeroed (their whole pages freed). */
static int ram_trim(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct ram_disk *rd = ram_of(b);

	while (len) {
		uint64_t in_chunk = off & (RAM_CHUNK_SIZE - 1);
		uint64_t n = RAM_CHUNK_SIZE - in_chunk;

		if (n > len)
			n = len;
		if (n == RAM_CHUNK_SIZE || (in_chunk == 0 && off + n == b->size))
			ram_free_chunk(rd, off >> RAM_CHUNK_SHIFT); /* whole, or all the last one has */
		else
			ram_zero_part(rd, off, n);
		off += n;
		len -= n;
	}
	return 0;
}

/* ZERO without NO_HOLE frees like TRIM.  With NO_HOLE the range stays
 * provisioned: every chunk is allocated (counted against the cap) and
 * zeroed, so a later write there cannot fail for room and extents say
 * data.  A range that cannot fit is refused before anything changes
 * (unless a racing write takes the room first: then the chunks before
 * the one that did not fit are zeroed). */
static int ram_zero(struct devio_backend *b, uint64_t off, uint64_t len, uint32_t flags)
{
	struct ram_disk *rd = ram_of(b);

	if (!(flags & DEVIO_REQ_NO_HOLE))
		return ram_trim(b, off, len, flags);
	if (len == 0)
		return 0; /* ram_missing() wants at least one byte */
	if (rd->max_resident && atomic_load(&rd->resident) + ram_missing(rd, off, len) > rd->max_resident)
		goto full;
	while (len) {
		uint64_t n = RAM_CHUNK_SIZE - (off & (RAM_CHUNK_SIZE - 1));

		if (n > len)
			n = len;
		if (ram_zero_keep(rd, off, n))
			goto full;
		off += n;
		len -= n;
	}
	return 0;
full:
	devio_debug("ram: zero (no hole) at offset %" PRIu64 ": resident cap of %" PRIu64 " bytes reached",
		    off, rd->max_resident);
	return -ENOSPC;
}

/* Nothing is volatile beyond the disk itself: every completed write is
 * as durable as it will ever be, so FLUSH and FUA cost nothing. */
static int ram_flush(struct devio_backend *b)
{
	return 0;
}

/* Allocated chunks are data, the others holes that read as zeroes. */
static int ram_extents(struct devio_backend *b, uint64_t off, uint64_t len, devio_extent_fn fn, void *ctx)
{
	struct ram_disk *rd = ram_of(b);
	uint64_t end = off + len;

	while (off < end) {
		bool alloc = atomic_load(&rd->state[off >> RAM_CHUNK_SHIFT]) & RAM_ALLOC;
		uint64_t start = off;
		int r;

		do {
			off = ((off >> RAM_CHUNK_SHIFT) + 1) << RAM_CHUNK_SHIFT;
		} while (off < end && (bool)(atomic_load(&rd->state[off >> RAM_CHUNK_SHIFT]) & RAM_ALLOC) == alloc);
		if (off > end)
			off = end;
		r = fn(ctx, start, off - start, alloc ? 0 : DEVIO_EXTENT_HOLE | DEVIO_EXTENT_ZERO);
		if (r)
			return r;
	}
	return 0;
}

static void ram_describe(struct devio_backend *b, char *out, size_t outlen)
{
	struct ram_disk *rd = ram_of(b);

	snprintf(out, outlen, "ram: %" PRIu64 " bytes, %" PRIu64 " resident%s", b->size,
		 (uint64_t)atomic_load(&rd->resident), rd->max_resident ? " (capped)" : "");
}

static void ram_close(struct devio_backend *b)
{
	struct ram_disk *rd = ram_of(b);

	munmap(rd->mem, rd->map_len);
	free((void *)rd->state);
	free(rd);
}

static const struct devio_backend_ops ram_ops = {
	.name = "ram",
	.pread = ram_pread,
	.pwrite = ram_pwrite,
	.map = ram_map,
	.unmap = ram_unmap,
	.flush = ram_flush,
	.trim = ram_trim,
	.zero = ram_zero,
	.extents = ram_extents,
	.describe = ram_describe,
	.close = ram_close,
};

uint64_t devio_ram_resident(struct devio_backend *b)
{
	if (!b || b->ops != &ram_ops)
		return 0;
	return atomic_load(&ram_of(b)->resident);
}

int devio_ram_open(uint64_t size, uint64_t max_resident, struct devio_backend **out)
{
	struct ram_disk *rd;
	uint64_t nchunks;

	if (size == 0 || size > RAM_MAX_SIZE) {
		devio_err("ram: size %" PRIu64 " is outside 1 byte .. %" PRIu64 " (64 TiB: half the address space)",
			  size, (uint64_t)RAM_MAX_SIZE);
		return -EINVAL;
	}
	nchunks = (size + RAM_CHUNK_SIZE - 1) >> RAM_CHUNK_SHIFT;
	rd = calloc(1, sizeof(*rd));
	if (!rd)
		return -ENOMEM;
	rd->nchunks = nchunks;
	rd->max_resident = max_resident;
	rd->page_size = sysconf(_SC_PAGESIZE);
	rd->map_len = (size_t)(nchunks << RAM_CHUNK_SHIFT);
	rd->mem = mmap(NULL, rd->map_len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (rd->mem == MAP_FAILED) {
		devio_err("ram: cannot reserve %" PRIu64 " bytes of address space: %s", size, strerror(errno));
		goto out_free;
	}
	rd->state = calloc(nchunks, sizeof(*rd->state));
	if (!rd->state) {
		devio_err("ram: no memory for the chunk table of a %" PRIu64 "-byte disk", size);
		munmap(rd->mem, rd->map_len);
		goto out_free;
	}
	/* Huge pages would make a 4 KiB write cost 2 MiB and a 64 KiB TRIM
	 * split them: keep the accounting per chunk true. */
	madvise(rd->mem, rd->map_len, MADV_NOHUGEPAGE);
	rd->b.ops = &ram_ops;
	rd->b.size = size;
	rd->b.block_size = 1;
	/* FLUSH and FUA are free (ram_flush); CACHE is a no-op (the core's),
	 * everything being in memory already. */
	rd->b.caps = DEVIO_CAP_FLUSH | DEVIO_CAP_FUA | DEVIO_CAP_CACHE | DEVIO_CAP_TRIM | DEVIO_CAP_ZERO |
		     DEVIO_CAP_FAST_ZERO | DEVIO_CAP_EXTENTS | DEVIO_CAP_MULTI_CONN | DEVIO_CAP_MAP;
	rd->b.run = DEVIO_RUN_CPU; /* callbacks copy memory, never wait */
	rd->b.priv = rd;
	*out = &rd->b;
	return 0;

out_free:
	free((void *)rd->state);
	free(rd);
	return -ENOMEM;
}
