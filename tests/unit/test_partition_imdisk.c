/* test_partition_imdisk.c - ImDisk's partition numbering on the ImDisk
 * command line (lib/partition_imdisk.c): every MBR layout case (empty
 * slots, an extended slot in the middle, logicals at its place, two
 * extended slots, a 0x85 container, invalid EBRs, a link before a
 * logical), the refusals where ImDisk's devio would serve the wrong bytes
 * or the whole image, loops, and what no master boot record means. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include "devio/partition.h"

#define MiB (1ull << 20)
#define IMG (64 * MiB)

static uint8_t *img;

static int mem_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
	if (off > IMG || len > IMG - off)
		return -EIO;
	memcpy(buf, img + off, len);
	return 0;
}

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* A table entry in the sector at lba (and its 0x55AA). */
static void entry(uint64_t lba, int slot, uint8_t type, uint32_t start, uint32_t sectors)
{
	uint8_t *sec = img + lba * 512, *e = sec + 446 + 16 * slot;

	e[4] = type;
	put32(e + 8, start);
	put32(e + 12, sectors);
	sec[510] = 0x55;
	sec[511] = 0xAA;
}

static int setup(void **state)
{
	img = calloc(1, IMG);
	return img ? 0 : -1;
}

static int teardown(void **state)
{
	free(img);
	return 0;
}

static int find(int n, uint64_t *off, uint64_t *len)
{
	*off = *len = 0;
	return devio_partition_find_imdisk("t.img", mem_read, NULL, IMG, n, off, len);
}

static void expect(int n, uint64_t start, uint64_t sectors)
{
	uint64_t off, len;

	assert_int_equal(find(n, &off, &len), 0);
	assert_int_equal(off, start * 512);
	assert_int_equal(len, sectors * 512);
}

static void expect_r(int n, int r)
{
	uint64_t off, len;

	assert_int_equal(find(n, &off, &len), r);
}

/* Extended at lba with logicals of the given sizes: one EBR each, every
 * 4096 sectors; links relative to the first EBR. */
static void chain(int slot, uint32_t lba, int n)
{
	entry(0, slot, 0x0F, lba, 4096u * (uint32_t)n);
	for (int i = 0; i < n; i++) {
		uint32_t ebr = lba + 4096u * (uint32_t)i;

		entry(ebr, 0, 0x83, 63, 1000 + (uint32_t)i);
		if (i + 1 < n)
			entry(ebr, 1, 0x05, 4096u * (uint32_t)(i + 1), 4096);
	}
}

/* The example: p1, extended in slot 2 with two logicals, p3. */
static void test_logicals_take_the_extended_slot(void **state)
{
	memset(img, 0, IMG);
	entry(0, 0, 0x83, 2048, 2048);
	chain(1, 8192, 2);
	entry(0, 2, 0x07, 65536, 4096);
	expect(1, 2048, 2048);
	expect(2, 8192 + 63, 1000);
	expect(3, 8192 + 4096 + 63, 1001);
	expect(4, 65536, 4096);
	expect_r(5, -ENOENT); /* a chain was walked: ImDisk says "not found" */
}

static void test_empty_slots_skipped(void **state)
{
	memset(img, 0, IMG);
	entry(0, 1, 0x0C, 100, 200);
	entry(0, 3, 0x83, 1000, 200);
	expect(1, 100, 200);
	expect(2, 1000, 200);
}

/* Primaries only: ImDisk would serve the whole image as "partition 3". */
static void test_missing_without_chain_is_whole(void **state)
{
	memset(img, 0, IMG);
	entry(0, 0, 0x83, 2048, 2048);
	entry(0, 1, 0x83, 4096, 2048);
	expect_r(3, DEVIO_IMDISK_WHOLE);
	memset(img, 0, 512);
	img[510] = 0x55;
	img[511] = 0xAA;
	expect_r(1, DEVIO_IMDISK_WHOLE); /* a table with nothing in it */
}

static void test_no_mbr(void **state)
{
	memset(img, 0, IMG);
	entry(0, 0, 0x83, 2048, 2048);
	img[446 + 16] = 0x01; /* a boot flag other than 0x00/0x80 */
	expect_r(1, DEVIO_IMDISK_NO_MBR);
	img[446 + 16] = 0x80;
	expect(1, 2048, 2048);
	img[511] = 0;
	expect_r(1, DEVIO_IMDISK_NO_MBR);
}

/* 0x85 is no extended type for ImDisk: it counts as a partition and would
 * be served as a container, so it is refused; its logicals never count. */
static void test_linux_extended_counts_and_is_refused(void **state)
{
	memset(img, 0, IMG);
	entry(0, 0, 0x85, 8192, 8192);
	entry(8192, 0, 0x83, 63, 1000);
	entry(0, 1, 0x83, 2048, 2048);
	expect_r(1, -EINVAL);
	expect(2, 2048, 2048);
	expect_r(3, DEVIO_IMDISK_WHOLE);
}

/* Two extended slots: ImDisk walks the second one after finding the
 * partition in the first, and serves from the wrong offset: refused.  In
 * the second chain, and a primary after both, numbering goes on. */
static void test_two_extended_slots(void **state)
{
	memset(img, 0, IMG);
	chain(0, 8192, 2);
	entry(0, 1, 0x05, 32768, 4096);
	entry(32768, 0, 0x07, 63, 500);
	entry(0, 2, 0x83, 65536, 100);
	expect_r(1, -EINVAL);
	expect_r(2, -EINVAL);
	expect(3, 32768 + 63, 500);
	expect(4, 65536, 100);
}

/* An EBR without 0x55AA ends its chain; a link before a logical hides it;
 * more than one logical entry in one EBR all count. */
static void test_ebr_quirks(void **state)
{
	memset(img, 0, IMG);
	entry(0, 0, 0x0F, 8192, 16384);
	entry(8192, 0, 0x83, 63, 100);
	entry(8192, 1, 0x83, 300, 100);
	entry(8192, 2, 0x05, 4096, 4096);
	entry(8192 + 4096, 0, 0x05, 8192, 4096); /* a link first: */
	entry(8192 + 4096, 1, 0x83, 63, 700);    /* this one is never seen */
	/* the linked EBR at 8192 + 8192 is left without a signature */
	entry(0, 1, 0x83, 65536, 10);
	expect(1, 8192 + 63, 100);
	expect(2, 8192 + 300, 100);
	expect(3, 65536, 10);
	expect_r(4, -ENOENT);
}

static void test_loop_and_bad_ranges(void **state)
{
	memset(img, 0, IMG);
	entry(0, 0, 0x05, 8192, 4096);
	entry(8192, 0, 0x83, 63, 10);
	entry(8192, 1, 0x05, 0, 4096); /* links back to itself */
	expect(1, 8192 + 63, 10);
	expect_r(2, -EINVAL);
	memset(img, 0, IMG);
	entry(0, 0, 0x83, 2048, 0);                 /* empty */
	entry(0, 1, 0x83, (uint32_t)(IMG / 512) - 10, 100); /* past the end */
	expect_r(1, -EINVAL);
	expect_r(2, -EINVAL);
	expect_r(0, -EINVAL);
	expect_r(512, -EINVAL);
}

/* A protective MBR is a GPT's: read as one (here a damaged one). */
static void test_protective_mbr_is_gpt(void **state)
{
	memset(img, 0, IMG);
	entry(0, 0, 0xEE, 1, (uint32_t)(IMG / 512) - 1);
	expect_r(1, -EINVAL); /* no "EFI PART" header: an error, never the protective entry */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_logicals_take_the_extended_slot),
		cmocka_unit_test(test_empty_slots_skipped),
		cmocka_unit_test(test_missing_without_chain_is_whole),
		cmocka_unit_test(test_no_mbr),
		cmocka_unit_test(test_linux_extended_counts_and_is_refused),
		cmocka_unit_test(test_two_extended_slots),
		cmocka_unit_test(test_ebr_quirks),
		cmocka_unit_test(test_loop_and_bad_ranges),
		cmocka_unit_test(test_protective_mbr_is_gpt),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
