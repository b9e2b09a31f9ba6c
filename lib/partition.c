/* partition.c - find partition N of a disk image: MBR primaries and the
 * logical partitions of the EBR chain, or GPT entries behind a protective
 * MBR, in one of two numberings (partition.h).
 *
 * Linux's (and sfdisk's, and nbdkit's partition filter's): a primary is
 * its slot, 1-4, used when its size is not zero (an empty slot is a gap);
 * the extended container has a number but is no partition to serve; the
 * logical partitions are 5, 6, ... along the EBR chains.  A GPT entry is
 * its index in the table, used when its type GUID is not zero.
 *
 * ImDisk's devio: every primary entry with a non-zero type counts, in slot
 * order, 1, 2, ... (an extended entry too: it is the container); then the
 * logical partitions count on; GPT entries in use count 1, 2, ... in table
 * order.  With partitions filled in slot order the two agree.
 *
 * Each EBR's first entry is a logical partition, its second the link to
 * the next EBR, as sfdisk, fdisk and ImDisk write them.
 *
 * Every byte read here is untrusted: signatures and CRCs are checked, the
 * EBR chain is bounded and loops are detected, GPT sizes and counts are
 * bounded before anything is allocated, and every result is checked to lie
 * inside the image with overflow-safe arithmetic.  A damaged primary GPT
 * falls back to the backup header in the last sector; GPTs written for
 * 4096-byte sectors (header at 4096) are recognised.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include "devio/partition.h"
#include "devio/util.h"

#define SECTOR 512u
#define MBR_TABLE 446u
#define MAX_LOGICALS 256          /* longest EBR chain followed */
#define GPT_MAX_ENTRY_SIZE 4096u
#define GPT_MAX_ENTRIES 16384u
#define GPT_MAX_ARRAY (1u << 20)  /* bytes of entry array read at most */

struct mbr_entry {
	uint8_t boot, type;
	uint32_t start, sectors;
};

struct pctx {
	const char *name;
	devio_read_fn read;
	void *ctx;
	uint64_t image_size;
	bool linux_numbers;       /* DEVIO_PART_LINUX, else ImDisk's */
	int want, seen;           /* partition asked for, partitions counted */
	int number;               /* the number the last partition counted got */
	uint64_t *offset, *length;
};

static uint32_t part_get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t part_get_le64(const uint8_t *p)
{
	return (uint64_t)part_get_le32(p) | (uint64_t)part_get_le32(p + 4) << 32;
}

/* CRC-32 (IEEE 802.3, reflected, as GPT uses), bit by bit: tables are small. */
static uint32_t part_crc32_ieee(const uint8_t *p, size_t len)
{
	uint32_t crc = 0xFFFFFFFFu;

	while (len--) {
		crc ^= *p++;
		for (int k = 0; k < 8; k++)
			crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1)));
	}
	return ~crc;
}

/* Read len bytes at off, which must lie inside the image. */
static int part_read_at(struct pctx *c, void *buf, uint64_t len, uint64_t off, const char *what)
{
	int r;

	if (off > c->image_size || len > c->image_size - off) {
		devio_err("%s: %s at offset %" PRIu64 " lies past the end of the image (%" PRIu64 " bytes)",
			  c->name, what, off, c->image_size);
		return -EINVAL;
	}
	r = c->read(c->ctx, buf, len, off);
	if (r)
		devio_err("%s: cannot read %s at offset %" PRIu64 ": %s", c->name, what, off, strerror(-r));
	return r;
}

/* Read a 512-byte sector with a partition table and check its 0x55AA. */
static int part_read_table(struct pctx *c, uint64_t lba, uint8_t *sec, struct mbr_entry e[4],
			   const char *what)
{
	uint64_t off = lba * SECTOR;
	int r;

	if (lba > UINT64_MAX / SECTOR) {
		devio_err("%s: %s at sector %" PRIu64 " is out of range", c->name, what, lba);
		return -EINVAL;
	}
	r = part_read_at(c, sec, SECTOR, off, what);
	if (r)
		return r;
	if (sec[510] != 0x55 || sec[511] != 0xAA) {
		devio_err("%s: %s at offset %" PRIu64 ": no 0x55AA signature", c->name, what, off);
		return -EINVAL;
	}
	for (int i = 0; i < 4; i++) {
		const uint8_t *p = sec + MBR_TABLE + 16 * i;

		e[i].boot = p[0];
		e[i].type = p[4];
		e[i].start = part_get_le32(p + 8);
		e[i].sectors = part_get_le32(p + 12);
	}
	return 0;
}

static bool part_is_extended(uint8_t type)
{
	return type == 0x05 || type == 0x0F || type == 0x85;
}

/* Does the entry hold a partition?  Linux and sfdisk go by the size,
 * ImDisk by the type. */
static bool part_is_used(const struct pctx *c, const struct mbr_entry *e)
{
	return c->linux_numbers ? e->sectors != 0 : e->type != 0;
}

/* The partition found: check it lies inside the image and report it. */
static int part_found(struct pctx *c, uint64_t start_lba, uint64_t sectors, uint32_t ss, uint64_t table_off)
{
	uint64_t off = start_lba * ss, len = sectors * ss;

	if (sectors == 0) {
		devio_err("%s: partition %d (table at offset %" PRIu64 ") is empty", c->name, c->want, table_off);
		return -EINVAL;
	}
	if (off > c->image_size || len > c->image_size - off) {
		devio_err("%s: partition %d (table at offset %" PRIu64 ") spans %" PRIu64 "..%" PRIu64
			  ", past the end of the image (%" PRIu64 " bytes)",
			  c->name, c->want, table_off, off, off + len, c->image_size);
		return -EINVAL;
	}
	*c->offset = off;
	*c->length = len;
	return 0;
}

/* Walk the EBR chain of the extended partition starting at ext_lba.  Each
 * EBR's first entry is a logical partition relative to that EBR; its
 * second entry links to the next EBR relative to ext_lba.  Returns 0 if
 * found, 1 if the chain ended without reaching the partition wanted. */
static int part_walk_ebrs(struct pctx *c, uint64_t ext_lba)
{
	uint64_t visited[MAX_LOGICALS];
	uint64_t lba = ext_lba;
	uint8_t sec[SECTOR];
	struct mbr_entry e[4];

	for (int i = 0; i < MAX_LOGICALS; i++) {
		int r;

		for (int k = 0; k < i; k++) {
			if (visited[k] == lba) {
				devio_err("%s: EBR chain loops back to offset %" PRIu64, c->name, lba * SECTOR);
				return -EINVAL;
			}
		}
		visited[i] = lba;
		r = part_read_table(c, lba, sec, e, "extended boot record");
		if (r)
			return r;
		if (part_is_used(c, &e[0]) && !part_is_extended(e[0].type)) {
			c->seen++;
			if (++c->number == c->want)
				return part_found(c, lba + e[0].start, e[0].sectors, SECTOR, lba * SECTOR);
		}
		if (!part_is_extended(e[1].type) || e[1].start == 0)
			return 1;
		lba = ext_lba + e[1].start;
	}
	devio_err("%s: EBR chain longer than %d entries (from offset %" PRIu64 ")", c->name, MAX_LOGICALS,
		  ext_lba * SECTOR);
	return -EINVAL;
}

/* Check a GPT header at lba (sectors of ss bytes): signature, size, CRC,
 * then the entry array (bounded) and its CRC.  On success *entries is
 * malloc'd. */
static int part_gpt_load(struct pctx *c, uint32_t ss, uint64_t lba, uint8_t **entries, uint32_t *count,
			 uint32_t *esize)
{
	uint8_t hdr[SECTOR];
	uint64_t off, array_lba, array_bytes;
	uint32_t hsize, crc;
	uint8_t *arr;
	int r;

	if (lba > UINT64_MAX / ss)
		return -EINVAL;
	off = lba * ss;
	r = part_read_at(c, hdr, SECTOR, off, "GPT header");
	if (r)
		return r;
	if (memcmp(hdr, "EFI PART", 8)) {
		devio_err("%s: no \"EFI PART\" GPT header at offset %" PRIu64, c->name, off);
		return -EINVAL;
	}
	hsize = part_get_le32(hdr + 12);
	if (hsize < 92 || hsize > SECTOR) {
		devio_err("%s: GPT header at offset %" PRIu64 ": bad header size %" PRIu32, c->name, off, hsize);
		return -EINVAL;
	}
	crc = part_get_le32(hdr + 16);
	memset(hdr + 16, 0, 4);
	if (part_crc32_ieee(hdr, hsize) != crc) {
		devio_err("%s: GPT header at offset %" PRIu64 ": CRC32 mismatch", c->name, off);
		return -EINVAL;
	}
	array_lba = part_get_le64(hdr + 72);
	*count = part_get_le32(hdr + 80);
	*esize = part_get_le32(hdr + 84);
	if (*esize < 128 || *esize > GPT_MAX_ENTRY_SIZE || *esize % 8 || *count > GPT_MAX_ENTRIES) {
		devio_err("%s: GPT header at offset %" PRIu64 ": %" PRIu32 " entries of %" PRIu32
			  " bytes is not a valid table", c->name, off, *count, *esize);
		return -EINVAL;
	}
	array_bytes = (uint64_t)*count * *esize;
	if (array_bytes > GPT_MAX_ARRAY || array_lba > UINT64_MAX / ss) {
		devio_err("%s: GPT header at offset %" PRIu64 ": entry array too large or out of range", c->name, off);
		return -EINVAL;
	}
	arr = malloc(array_bytes ? array_bytes : 1);
	if (!arr)
		return -ENOMEM;
	r = part_read_at(c, arr, array_bytes, array_lba * ss, "GPT entry array");
	if (!r && part_crc32_ieee(arr, array_bytes) != part_get_le32(hdr + 88)) {
		devio_err("%s: GPT entry array at offset %" PRIu64 ": CRC32 mismatch", c->name, array_lba * ss);
		r = -EINVAL;
	}
	if (r) {
		free(arr);
		return r;
	}
	*entries = arr;
	return 0;
}

static bool part_all_zero(const uint8_t *p, size_t n)
{
	while (n--)
		if (*p++)
			return false;
	return true;
}

/* The GPT's sector size: where "EFI PART" is, at 512 or at 4096. */
static uint32_t part_gpt_sector_size(struct pctx *c)
{
	uint8_t sig[8];

	if (c->image_size >= 2 * 4096 && c->read(c->ctx, sig, 8, 512) == 0 && memcmp(sig, "EFI PART", 8) &&
	    c->read(c->ctx, sig, 8, 4096) == 0 && !memcmp(sig, "EFI PART", 8))
		return 4096;
	return SECTOR;
}

/* The primary header at LBA 1, else the backup in the last sector. */
static int part_gpt_load_any(struct pctx *c, uint32_t ss, uint8_t **arr, uint32_t *count, uint32_t *esize)
{
	uint64_t last = c->image_size / ss - 1;
	int r = part_gpt_load(c, ss, 1, arr, count, esize);

	if (r != -EINVAL || last <= 1)
		return r;
	r = part_gpt_load(c, ss, last, arr, count, esize);
	if (!r)
		devio_warn("%s: primary GPT damaged; using the backup header at offset %" PRIu64, c->name,
			   last * ss);
	return r;
}

/* GPT: entries with a non-zero type GUID count 1, 2, ... in table order. */
static int part_find_gpt(struct pctx *c)
{
	uint8_t *arr = NULL;
	uint32_t count = 0, esize = 0, ss = part_gpt_sector_size(c);
	int r = part_gpt_load_any(c, ss, &arr, &count, &esize);

	if (r)
		return r;
	r = -ENOENT;
	for (uint32_t i = 0; i < count; i++) {
		const uint8_t *e = arr + (size_t)i * esize;
		uint64_t first = part_get_le64(e + 32), last = part_get_le64(e + 40);

		if (part_all_zero(e, 16))
			continue;
		c->seen++;
		if ((c->linux_numbers ? (int)i + 1 : c->seen) != c->want)
			continue;
		if (last < first || first > UINT64_MAX / ss || last - first >= UINT64_MAX / ss) {
			devio_err("%s: GPT entry %" PRIu32 ": bad range of sectors %" PRIu64 "..%" PRIu64, c->name,
				  i + 1, first, last);
			r = -EINVAL;
		} else {
			r = part_found(c, first, last - first + 1, ss, 2 * (uint64_t)ss);
		}
		break;
	}
	free(arr);
	return r;
}

/* The primary slots: Linux numbers them by slot, ImDisk counts the used
 * ones.  -ENOENT: not among them. */
static int part_find_primary(struct pctx *c, const struct mbr_entry e[4])
{
	for (int i = 0; i < 4; i++) {
		if (!part_is_used(c, &e[i]))
			continue;
		c->number = c->linux_numbers ? i + 1 : c->number + 1;
		if (!c->linux_numbers || !part_is_extended(e[i].type))
			c->seen++;
		if (c->number != c->want)
			continue;
		if (c->linux_numbers && part_is_extended(e[i].type)) {
			devio_err("%s: partition %d is the extended partition, a container of the logical ones "
				  "(5 and up), not a partition to serve", c->name, c->want);
			return -EINVAL;
		}
		return part_found(c, e[i].start, e[i].sectors, SECTOR, 0);
	}
	return -ENOENT;
}

static int part_find_mbr(struct pctx *c)
{
	uint8_t sec[SECTOR];
	struct mbr_entry e[4];
	int r = part_read_table(c, 0, sec, e, "master boot record");

	if (r)
		return r;
	for (int i = 0; i < 4; i++) {
		if (e[i].boot & 0x7F) {
			devio_err("%s: master boot record entry %d: boot flag 0x%02x is not valid (no partition table?)",
				  c->name, i + 1, e[i].boot);
			return -EINVAL;
		}
	}
	for (int i = 0; i < 4; i++)
		if (e[i].type == 0xEE)
			return part_find_gpt(c);
	r = part_find_primary(c, e);
	if (r != -ENOENT)
		return r;
	if (c->linux_numbers)
		c->number = 4; /* logical partitions start at 5 */
	for (int i = 0; i < 4; i++) {
		if (!part_is_used(c, &e[i]) || !part_is_extended(e[i].type) || e[i].start == 0)
			continue;
		r = part_walk_ebrs(c, e[i].start);
		if (r <= 0)
			return r;
	}
	return -ENOENT;
}

int devio_partition_find(const char *name, devio_read_fn read, void *ctx, uint64_t image_size,
			 enum devio_part_numbering numbering, int n, uint64_t *offset, uint64_t *length)
{
	struct pctx c = { .name = name ? name : "image", .read = read, .ctx = ctx, .image_size = image_size,
			  .linux_numbers = numbering == DEVIO_PART_LINUX, .want = n,
			  .offset = offset, .length = length };
	int r;

	if (n < 1) {
		devio_err("%s: partition number %d: partitions count from 1", c.name, n);
		return -EINVAL;
	}
	if (image_size < SECTOR) {
		devio_err("%s: %" PRIu64 " bytes is too small to hold a partition table", c.name, image_size);
		return -EINVAL;
	}
	r = part_find_mbr(&c);
	if (r == -ENOENT)
		devio_err("%s: no partition %d (the tables list %d)", c.name, n, c.seen);
	return r;
}
