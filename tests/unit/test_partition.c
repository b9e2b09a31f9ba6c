/* test_partition.c - partition numbering on images built here (MBR with
 * primaries, an extended partition and logicals; GPT) and by sfdisk, whose
 * own listing (`sfdisk -d`) is the reference; and malformed tables: bad
 * signatures and boot flags, EBR loops, a damaged primary GPT (the backup
 * answers), 4096-byte-sector GPT, tables and partitions past the
 * end, CRC mismatches, absurd GPT entry counts and sizes. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>
#include "devio/partition.h"
#include "devio/util.h"

#define MiB (1ull << 20)

struct mem_image {
	uint8_t *p;
	uint64_t size;
};

static int mem_read(void *ctx, void *buf, uint64_t len, uint64_t off)
{
	struct mem_image *m = ctx;

	if (off > m->size || len > m->size - off)
		return -EIO;
	memcpy(buf, m->p + off, len);
	return 0;
}

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void put_entry(uint8_t *sec, int slot, uint8_t boot, uint8_t type, uint32_t start, uint32_t sectors)
{
	uint8_t *e = sec + 446 + 16 * slot;

	e[0] = boot;
	e[4] = type;
	put32(e + 8, start);
	put32(e + 12, sectors);
	sec[510] = 0x55;
	sec[511] = 0xAA;
}

/* ImDisk's numbering (the tests of the tables' checks use it) */
static int find(struct mem_image *m, int n, uint64_t *off, uint64_t *len)
{
	return devio_partition_find("test.img", mem_read, m, m->size, DEVIO_PART_IMDISK, n, off, len);
}

/* Linux's and sfdisk's numbering */
static int find_linux(struct mem_image *m, int n, uint64_t *off, uint64_t *len)
{
	return devio_partition_find("test.img", mem_read, m, m->size, DEVIO_PART_LINUX, n, off, len);
}

/* 16 MiB: slot 1 Linux, slot 2 empty, slot 3 NTFS, slot 4 extended with
 * two logicals (EBR links relative to the extended partition's start). */
static void build_mbr(struct mem_image *m)
{
	m->size = 16 * MiB;
	m->p = calloc(1, m->size);
	put_entry(m->p, 0, 0x80, 0x83, 2048, 2048);
	put_entry(m->p, 2, 0x00, 0x07, 4096, 2048);
	put_entry(m->p, 3, 0x00, 0x0F, 8192, 16384);
	put_entry(m->p + 8192 * 512, 0, 0, 0x83, 2048, 1000);
	put_entry(m->p + 8192 * 512, 1, 0, 0x05, 4096, 8192);
	put_entry(m->p + 12288 * 512, 0, 0, 0x82, 100, 500);
}

static void test_mbr_numbering(void **state)
{
	struct mem_image m;
	uint64_t off, len;

	build_mbr(&m);
	assert_int_equal(find(&m, 1, &off, &len), 0);
	assert_int_equal(off, 2048 * 512);
	assert_int_equal(len, 2048 * 512);
	assert_int_equal(find(&m, 2, &off, &len), 0); /* slot 3: empty slots do not count */
	assert_int_equal(off, 4096 * 512);
	assert_int_equal(find(&m, 3, &off, &len), 0); /* the extended container */
	assert_int_equal(off, 8192 * 512);
	assert_int_equal(len, 16384 * 512);
	assert_int_equal(find(&m, 4, &off, &len), 0); /* first logical, relative to its EBR */
	assert_int_equal(off, (8192 + 2048) * 512);
	assert_int_equal(len, 1000 * 512);
	assert_int_equal(find(&m, 5, &off, &len), 0); /* second: EBR at extended + 4096 */
	assert_int_equal(off, (12288 + 100) * 512);
	assert_int_equal(len, 500 * 512);
	assert_int_equal(find(&m, 6, &off, &len), -ENOENT);
	assert_int_equal(find(&m, 0, &off, &len), -EINVAL);
	free(m.p);
}

/* The same image as Linux numbers it: slots by index (2 is a gap), the
 * extended container refused, logicals from 5. */
static void test_mbr_linux_numbering(void **state)
{
	struct mem_image m;
	uint64_t off, len;

	build_mbr(&m);
	assert_int_equal(find_linux(&m, 1, &off, &len), 0);
	assert_int_equal(off, 2048 * 512);
	assert_int_equal(find_linux(&m, 2, &off, &len), -ENOENT); /* the empty slot */
	assert_int_equal(find_linux(&m, 3, &off, &len), 0);
	assert_int_equal(off, 4096 * 512);
	assert_int_equal(find_linux(&m, 4, &off, &len), -EINVAL); /* the extended container */
	assert_int_equal(find_linux(&m, 5, &off, &len), 0);
	assert_int_equal(off, (8192 + 2048) * 512);
	assert_int_equal(len, 1000 * 512);
	assert_int_equal(find_linux(&m, 6, &off, &len), 0);
	assert_int_equal(off, (12288 + 100) * 512);
	assert_int_equal(len, 500 * 512);
	assert_int_equal(find_linux(&m, 7, &off, &len), -ENOENT);
	assert_int_equal(find_linux(&m, 0, &off, &len), -EINVAL);
	/* a slot with a type but no sectors is no partition to Linux */
	put_entry(m.p, 0, 0, 0x83, 2048, 0);
	assert_int_equal(find_linux(&m, 1, &off, &len), -ENOENT);
	assert_int_equal(find(&m, 1, &off, &len), -EINVAL); /* ImDisk: an empty partition */
	free(m.p);
}

static void test_mbr_malformed(void **state)
{
	struct mem_image m;
	uint64_t off, len;

	build_mbr(&m);
	m.p[511] = 0;
	assert_int_equal(find(&m, 1, &off, &len), -EINVAL); /* no signature */
	m.p[511] = 0xAA;
	m.p[446] = 0x81;
	assert_int_equal(find(&m, 1, &off, &len), -EINVAL); /* boot flag */
	m.p[446] = 0x80;
	/* EBR chain that links back to its first EBR, and to itself */
	put_entry(m.p + 12288 * 512, 1, 0, 0x05, 0, 100);
	assert_int_equal(find(&m, 5, &off, &len), 0);
	put32(m.p + 12288 * 512 + 446 + 16 + 8, 0);
	put_entry(m.p + 12288 * 512, 1, 0, 0x05, 4096, 100); /* self */
	assert_int_equal(find(&m, 6, &off, &len), -EINVAL);
	put_entry(m.p + 8192 * 512, 1, 0, 0x05, 1, 100);
	put_entry(m.p + 8193 * 512, 1, 0, 0x05, 2, 100);
	put_entry(m.p + 8194 * 512, 1, 0, 0x05, 1, 100);     /* back to the second */
	assert_int_equal(find(&m, 7, &off, &len), -EINVAL);
	/* an EBR past the end */
	put_entry(m.p + 8192 * 512, 1, 0, 0x05, 0x7FFFFFFF, 100);
	assert_int_equal(find(&m, 5, &off, &len), -EINVAL);
	/* a partition past the end, and one that overflows 32-bit sectors */
	put_entry(m.p, 0, 0, 0x83, 2048, 40000);
	assert_int_equal(find(&m, 1, &off, &len), -EINVAL);
	put_entry(m.p, 0, 0, 0x83, 0xFFFFFFFF, 0xFFFFFFFF);
	assert_int_equal(find(&m, 1, &off, &len), -EINVAL);
	put_entry(m.p, 0, 0, 0x83, 2048, 0);
	assert_int_equal(find(&m, 1, &off, &len), -EINVAL); /* empty */
	/* images too small for a table */
	m.size = 100;
	assert_int_equal(find(&m, 1, &off, &len), -EINVAL);
	free(m.p);
}

/* A long but valid EBR chain stops at the bound instead of running on. */
static void test_ebr_chain_bound(void **state)
{
	struct mem_image m = { calloc(1, 4 * MiB), 4 * MiB };
	uint64_t off, len;

	put_entry(m.p, 0, 0, 0x05, 1, 8000);
	for (uint32_t i = 0; i < 1000; i++) {
		put_entry(m.p + (1 + i) * 512, 0, 0, 0x83, 1, 1);
		put_entry(m.p + (1 + i) * 512, 1, 0, 0x05, i + 1, 2);
	}
	assert_int_equal(find(&m, 3, &off, &len), 0);
	assert_int_equal(off, 3 * 512); /* the EBR at sector 2, its partition one further */
	assert_int_equal(find(&m, 900, &off, &len), -EINVAL);
	free(m.p);
}

/* ---- sfdisk as the reference ---- */

static char dir[64];

static int make_dir(void **state)
{
	strcpy(dir, "/var/tmp/devio-test-part-XXXXXX");
	return mkdtemp(dir) ? 0 : -1;
}

static int remove_dir(void **state)
{
	char cmd[128];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	return system(cmd);
}

struct ref_part {
	int n;
	uint64_t start, size; /* sectors */
	bool extended;        /* the MBR's container of logical partitions */
};

/* An `sfdisk -d` line of an MBR extended partition (type 5, f or 85). */
static bool is_extended_line(const char *line)
{
	const char *t = strstr(line, "type=");
	unsigned type;

	return t && sscanf(t, "type=%x", &type) == 1 && (type == 0x5 || type == 0xf || type == 0x85);
}

/* Partition an image with sfdisk, then read back its own listing. */
static int sfdisk_make(const char *path, uint64_t size, const char *script, struct ref_part *ref, int max)
{
	char cmd[512], line[512];
	FILE *f;
	int fd, count = 0;

	fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)size), 0);
	close(fd);
	snprintf(cmd, sizeof(cmd), "sfdisk -q '%s' >/dev/null 2>&1", path);
	f = popen(cmd, "w");
	assert_non_null(f);
	fputs(script, f);
	assert_int_equal(pclose(f), 0);
	snprintf(cmd, sizeof(cmd), "sfdisk -d '%s'", path);
	f = popen(cmd, "r");
	assert_non_null(f);
	while (fgets(line, sizeof(line), f) && count < max) {
		const char *p = strstr(line, " : start=");
		unsigned long long start, sz;
		int n;

		if (!p || sscanf(p, " : start= %llu, size= %llu", &start, &sz) != 2)
			continue;
		for (p--; p > line && p[-1] >= '0' && p[-1] <= '9'; p--)
			;
		n = atoi(p);
		ref[count++] = (struct ref_part){ n, start, sz, is_extended_line(line) };
	}
	assert_int_equal(pclose(f), 0);
	return count;
}

static void load(const char *path, struct mem_image *m)
{
	int fd = open(path, O_RDONLY);
	struct stat st;

	assert_true(fd >= 0);
	assert_int_equal(fstat(fd, &st), 0);
	m->size = (uint64_t)st.st_size;
	m->p = malloc(m->size);
	assert_int_equal(pread(fd, m->p, m->size, 0), (ssize_t)m->size);
	close(fd);
}

static void compare_with_sfdisk(const char *path, const struct ref_part *ref, int count)
{
	struct mem_image m;
	uint64_t off, len;

	load(path, &m);
	for (int i = 0; i < count; i++) {
		if (ref[i].extended) {
			assert_int_equal(find_linux(&m, ref[i].n, &off, &len), -EINVAL);
			continue;
		}
		assert_int_equal(find_linux(&m, ref[i].n, &off, &len), 0);
		assert_int_equal(off, ref[i].start * 512);
		assert_int_equal(len, ref[i].size * 512);
	}
	assert_int_equal(find_linux(&m, ref[count - 1].n + 1, &off, &len), -ENOENT);
	for (int n = 1, i = 0; n < ref[count - 1].n; n++) { /* the numbers sfdisk skipped do not exist */
		while (i < count && ref[i].n < n)
			i++;
		if (ref[i].n != n)
			assert_int_equal(find_linux(&m, n, &off, &len), -ENOENT);
	}
	free(m.p);
}

static void test_sfdisk_mbr(void **state)
{
	char path[128];
	struct ref_part ref[16];
	int n;

	snprintf(path, sizeof(path), "%s/mbr.img", dir);
	n = sfdisk_make(path, 64 * MiB,
			"label: dos\n"
			"start=2048, size=8192, type=83\n"
			"size=8192, type=7\n"
			"size=4096, type=c, bootable\n"
			"type=5\n"
			"size=10240, type=83\n"
			"size=6144, type=82\n", ref, 16);
	assert_int_equal(n, 6); /* 3 primaries, the extended, 2 logicals */
	assert_int_equal(ref[4].n, 5);
	assert_int_equal(ref[5].n, 6);
	compare_with_sfdisk(path, ref, n);
}

static uint32_t crc32_ref(const uint8_t *p, size_t len)
{
	uint32_t crc = ~0u;

	for (size_t i = 0; i < len; i++) {
		crc ^= p[i];
		for (int k = 0; k < 8; k++)
			crc = crc & 1 ? (crc >> 1) ^ 0xEDB88320u : crc >> 1;
	}
	return ~crc;
}

static void fix_header_crc(struct mem_image *m)
{
	uint8_t *h = m->p + 512;

	put32(h + 16, 0);
	put32(h + 16, crc32_ref(h, 92));
}

/* Primaries in slots 1 and 3 (2 and 4 empty), an extended partition in
 * slot 4 after all, with three logicals: sfdisk's numbers are the
 * reference, gaps included. */
static void test_sfdisk_mbr_gaps(void **state)
{
	char path[128];
	struct ref_part ref[16];
	int n;

	snprintf(path, sizeof(path), "%s/gaps.img", dir);
	n = sfdisk_make(path, 64 * MiB,
			"label: dos\n"
			"gaps.img1 : start=2048, size=4096, type=83\n"
			"gaps.img3 : start=8192, size=4096, type=7\n"
			"gaps.img4 : start=16384, size=65536, type=5\n"
			"gaps.img5 : start=18432, size=8192, type=83\n"
			"gaps.img6 : start=28672, size=2048, type=82\n"
			"gaps.img7 : start=32768, size=16384, type=83\n", ref, 16);
	assert_int_equal(n, 6);
	assert_int_equal(ref[1].n, 3);
	assert_true(ref[2].extended);
	compare_with_sfdisk(path, ref, n);
}

static void test_sfdisk_gpt(void **state)
{
	char path[128];
	struct ref_part ref[16];
	struct mem_image m;
	uint64_t off, len;
	int n;

	snprintf(path, sizeof(path), "%s/gpt.img", dir);
	n = sfdisk_make(path, 64 * MiB,
			"label: gpt\n"
			"size=8192, type=L\n"
			"size=16384, type=S\n"
			"size=2048, type=U\n", ref, 16);
	assert_int_equal(n, 3);
	compare_with_sfdisk(path, ref, n);

	/* malformed copies of the same image */
	load(path, &m);
	m.p[512 + 200] ^= 1; /* past the header size: not covered, still fine */
	assert_int_equal(find(&m, 2, &off, &len), 0);
	m.p[512 + 40] ^= 1; /* first usable LBA: header CRC breaks */
	assert_int_equal(find(&m, 2, &off, &len), 0); /* the backup header answers */
	assert_int_equal(off, ref[1].start * 512);
	assert_int_equal(len, ref[1].size * 512);
	memset(m.p + m.size - 512, 0, 512); /* and without a backup, the damage shows */
	assert_int_equal(find(&m, 2, &off, &len), -EINVAL);
	m.p[512 + 40] ^= 1;
	m.p[1024 + 130] ^= 1; /* an entry: array CRC breaks */
	assert_int_equal(find(&m, 1, &off, &len), -EINVAL);
	m.p[1024 + 130] ^= 1;
	put32(m.p + 512 + 80, 0x7FFFFFFF); /* absurd entry count */
	fix_header_crc(&m);
	assert_int_equal(find(&m, 1, &off, &len), -EINVAL);
	put32(m.p + 512 + 80, 128);
	put32(m.p + 512 + 84, 100); /* entries smaller than 128 bytes */
	fix_header_crc(&m);
	assert_int_equal(find(&m, 1, &off, &len), -EINVAL);
	put32(m.p + 512 + 84, 128);
	put32(m.p + 512 + 72, 0x100000); /* entry array past the end */
	fix_header_crc(&m);
	assert_int_equal(find(&m, 1, &off, &len), -EINVAL);
	put32(m.p + 512 + 72, 2);
	fix_header_crc(&m);
	assert_int_equal(find(&m, 3, &off, &len), 0);
	memcpy(m.p + 512, "EFI PARX", 8);
	assert_int_equal(find(&m, 1, &off, &len), -EINVAL);
	free(m.p);
}

/* A GPT written for 4096-byte sectors (header at byte 4096, every LBA in
 * 4096-byte units): sfdisk on a loop device with 4 KiB logical blocks (this
 * sfdisk has no --sector-size), the loop device detached by the shell's
 * trap on every path. */
static void test_sfdisk_gpt_4k(void **state)
{
	char path[128], cmd[1024], line[512];
	struct ref_part ref[8];
	struct mem_image m;
	uint64_t off, len;
	int fd, n = 0;
	FILE *f;

	if (geteuid() != 0)
		skip();
	snprintf(path, sizeof(path), "%s/gpt4k.img", dir);
	fd = open(path, O_CREAT | O_TRUNC | O_RDWR, 0644);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, 64 * MiB), 0);
	close(fd);
	snprintf(cmd, sizeof(cmd),
		 "set -e; d=$(losetup -b 4096 -f --show '%s'); trap 'losetup -d $d' EXIT; "
		 "printf 'label: gpt\\nsize=1024, type=L\\nsize=2048, type=L\\n' | sfdisk -q $d >/dev/null 2>&1; "
		 "sfdisk -d $d > '%s.dump'", path, path);
	assert_int_equal(system(cmd), 0);
	snprintf(cmd, sizeof(cmd), "%s.dump", path);
	f = fopen(cmd, "r");
	assert_non_null(f);
	while (fgets(line, sizeof(line), f) && n < 8) {
		unsigned long long start, sz;
		const char *p = strstr(line, " : start=");

		if (p && sscanf(p, " : start= %llu, size= %llu", &start, &sz) == 2) {
			ref[n] = (struct ref_part){ n + 1, start, sz };
			n++;
		}
	}
	fclose(f);
	assert_int_equal(n, 2);
	load(path, &m);
	assert_memory_equal(m.p + 4096, "EFI PART", 8);
	for (int i = 0; i < n; i++) {
		assert_int_equal(find(&m, i + 1, &off, &len), 0);
		assert_int_equal(off, ref[i].start * 4096);
		assert_int_equal(len, ref[i].size * 4096);
	}
	assert_int_equal(find(&m, 3, &off, &len), -ENOENT);
	free(m.p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_mbr_numbering),
		cmocka_unit_test(test_mbr_linux_numbering),
		cmocka_unit_test(test_mbr_malformed),
		cmocka_unit_test(test_ebr_chain_bound),
		cmocka_unit_test(test_sfdisk_mbr),
		cmocka_unit_test(test_sfdisk_mbr_gaps),
		cmocka_unit_test(test_sfdisk_gpt),
		cmocka_unit_test(test_sfdisk_gpt_4k),
	};

	devio_log_set_level(getenv("DEVIO_TEST_VERBOSE") ? DEVIO_LOG_DEBUG : DEVIO_LOG_ERROR);
	return cmocka_run_group_tests(tests, make_dir, remove_dir);
}
