/* partition_imdisk.c - partition N as ImDisk's devio picks it, for the
 * ImDisk command line (`devio PORT IMAGE N`, cli/imdisk.c).
 *
 * ImDisk's rule, from its behaviour: sector 0 is a master boot record when
 * it ends in 0x55AA and the four boot flags masked with 0x7F are zero.  The
 * primary slots are walked in order; an empty slot (type 0) is skipped; an
 * extended slot (type 0x05 or 0x0F) is never counted itself: its EBR chain
 * is walked there and then, and every non-empty, non-link entry of each EBR
 * counts on (so the logicals take the extended slot's place in the order:
 * p1, extended in slot 2, p3 -> 1 = p1, 2 and 3 = the logicals, 4 = p3); any
 * other type counts as a partition (0x85, Linux's extended, included).  An
 * EBR link is relative to the first EBR; an EBR without 0x55AA or with a bad
 * boot flag ends its chain.
 *
 * Where that rule makes ImDisk's devio serve the wrong bytes, this refuses
 * instead (-EINVAL, logged): the number picks a 0x85 container; a second
 * extended slot follows the one holding the partition (ImDisk goes on
 * walking it and serves from the wrong offset); the chain loops (ImDisk
 * hangs).  When no partition N exists and no chain was walked, ImDisk serves
 * the whole image as "partition N": DEVIO_IMDISK_WHOLE tells the caller,
 * which refuses an explicit N.  A protective MBR (type 0xEE) is read as a
 * GPT by devio_partition_find() (ImDisk would serve the protective entry).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <string.h>
#include "devio/partition.h"
#include "devio/util.h"

#define PI_SECTOR 512u
#define PI_MAX_EBRS 256

struct pi_walk {
	const char *name;
	devio_read_fn read;
	void *ctx;
	uint64_t image_size;
	int want, seen;
	bool found, walked;
	uint8_t type;           /* of the partition found */
	uint64_t start, sectors; /* in sectors */
};

static uint32_t pi_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static const uint8_t *pi_entry(const uint8_t *sec, int i)
{
	return sec + 446 + 16 * i;
}

bool devio_partition_imdisk_is_mbr(const uint8_t sec[512])
{
	if (sec[510] != 0x55 || sec[511] != 0xAA)
		return false;
	for (int i = 0; i < 4; i++)
		if (pi_entry(sec, i)[0] & 0x7F)
			return false;
	return true;
}

static bool pi_is_extended(uint8_t type)
{
	return type == 0x05 || type == 0x0F;
}

/* Read the sector at lba; false where ImDisk's read would come up short. */
static bool pi_read(struct pi_walk *w, uint64_t lba, uint8_t *sec)
{
	uint64_t off = lba * PI_SECTOR;

	if (off > w->image_size || PI_SECTOR > w->image_size - off)
		return false;
	return w->read(w->ctx, sec, PI_SECTOR, off) == 0;
}

static void pi_count(struct pi_walk *w, uint8_t type, uint64_t start, uint64_t sectors)
{
	if (++w->seen != w->want)
		return;
	w->found = true;
	w->type = type;
	w->start = start;
	w->sectors = sectors;
}

/* The EBR chain from first (an LBA): 0, or -EINVAL for a loop. */
static int pi_chain(struct pi_walk *w, uint64_t first)
{
	uint64_t visited[PI_MAX_EBRS], ebr = first;
	uint8_t sec[PI_SECTOR];

	w->walked = true;
	for (int n = 0; n < PI_MAX_EBRS; n++) {
		bool link = false;

		for (int k = 0; k < n; k++)
			if (visited[k] == ebr) {
				devio_err("%s: EBR chain loops back to offset %" PRIu64 " (ImDisk's devio would hang)",
					  w->name, ebr * PI_SECTOR);
				return -EINVAL;
			}
		visited[n] = ebr;
		if (!pi_read(w, ebr, sec) || !devio_partition_imdisk_is_mbr(sec))
			return 0; /* ImDisk: "Invalid extended partition table", the chain ends */
		for (int e = 0; e < 4 && !w->found; e++) {
			const uint8_t *p = pi_entry(sec, e);

			if (p[4] == 0)
				continue;
			if (pi_is_extended(p[4])) {
				ebr = first + pi_le32(p + 8);
				link = true;
				break;
			}
			pi_count(w, p[4], ebr + pi_le32(p + 8), pi_le32(p + 12));
		}
		if (w->found || !link)
			return 0;
	}
	devio_err("%s: EBR chain longer than %d entries", w->name, PI_MAX_EBRS);
	return -EINVAL;
}

/* The primary slots, in order. */
static int pi_walk_mbr(struct pi_walk *w, const uint8_t *mbr)
{
	for (int i = 0; i < 4; i++) {
		const uint8_t *p = pi_entry(mbr, i);
		int r;

		if (p[4] == 0)
			continue;
		if (!pi_is_extended(p[4])) {
			if (!w->found)
				pi_count(w, p[4], pi_le32(p + 8), pi_le32(p + 12));
			if (w->found)
				return 0; /* ImDisk stops at a primary */
			continue;
		}
		if (w->found) {
			devio_err("%s: partition %d is a logical partition followed by a second extended partition "
				  "(slot %d): ImDisk's devio would serve the wrong bytes for it", w->name, w->want, i + 1);
			return -EINVAL;
		}
		if ((r = pi_chain(w, pi_le32(p + 8))))
			return r;
	}
	return 0;
}

/* Check what was found as ImDisk checks it, and refuse a container. */
static int pi_result(struct pi_walk *w, uint64_t *offset, uint64_t *length)
{
	uint64_t off = w->start * PI_SECTOR, len = w->sectors * PI_SECTOR;

	if (w->type == 0x85) {
		devio_err("%s: partition %d is an extended partition of type 0x85 (a container): ImDisk's devio "
			  "would serve the container; give the number of a logical partition instead", w->name, w->want);
		return -EINVAL;
	}
	if (len == 0) {
		devio_err("%s: partition %d is empty", w->name, w->want);
		return -EINVAL;
	}
	if (off > w->image_size || len > w->image_size - off) {
		devio_err("%s: partition %d spans %" PRIu64 "..%" PRIu64 ", past the end of the image (%" PRIu64
			  " bytes)", w->name, w->want, off, off + len, w->image_size);
		return -EINVAL;
	}
	*offset = off;
	*length = len;
	return 0;
}

int devio_partition_find_imdisk(const char *name, devio_read_fn read, void *ctx, uint64_t image_size, int n,
				uint64_t *offset, uint64_t *length)
{
	struct pi_walk w = { .name = name ? name : "image", .read = read, .ctx = ctx, .image_size = image_size,
			     .want = n };
	uint8_t mbr[PI_SECTOR];
	int r;

	if (n < 1 || n >= 512) {
		devio_err("%s: partition number %d: ImDisk's partitions count 1..511", w.name, n);
		return -EINVAL;
	}
	if (!pi_read(&w, 0, mbr) || !devio_partition_imdisk_is_mbr(mbr))
		return DEVIO_IMDISK_NO_MBR;
	for (int i = 0; i < 4; i++)
		if (pi_entry(mbr, i)[4] == 0xEE)
			return devio_partition_find(w.name, read, ctx, image_size, n, DEVIO_PART_IMDISK, offset, length);
	if ((r = pi_walk_mbr(&w, mbr)))
		return r;
	if (!w.found)
		return w.walked ? -ENOENT : DEVIO_IMDISK_WHOLE;
	return pi_result(&w, offset, length);
}
