/* ublk_abi.h - the parts of the kernel's ublk UAPI (include/uapi/linux/
 * ublk_cmd.h) that frontends/ublk.c uses, written out here because Debian
 * 12's 6.1 headers predate the ioctl-encoded commands, GET_FEATURES and
 * user copy.  Names carry a DEVIO_ prefix so this header can sit beside
 * <linux/ublk_cmd.h> without clashing; values and layouts are the kernel's.
 */
#ifndef DEVIO_UBLK_ABI_H
#define DEVIO_UBLK_ABI_H

#include <stdint.h>
#include <sys/ioctl.h>

/* Legacy (plain number) control commands. */
#define DEVIO_UBLK_CMD_GET_QUEUE_AFFINITY 0x01
#define DEVIO_UBLK_CMD_GET_DEV_INFO       0x02
#define DEVIO_UBLK_CMD_ADD_DEV            0x04
#define DEVIO_UBLK_CMD_DEL_DEV            0x05
#define DEVIO_UBLK_CMD_START_DEV          0x06
#define DEVIO_UBLK_CMD_STOP_DEV           0x07
#define DEVIO_UBLK_CMD_SET_PARAMS         0x08
#define DEVIO_UBLK_CMD_GET_PARAMS         0x09
#define DEVIO_UBLK_CMD_START_USER_RECOVERY 0x10
#define DEVIO_UBLK_CMD_END_USER_RECOVERY  0x11
#define DEVIO_UBLK_CMD_GET_FEATURES       0x13 /* only ever ioctl-encoded */
#define DEVIO_UBLK_CMD_QUIESCE_DEV        0x16 /* ioctl-encoded, UBLK_F_QUIESCE */
#define DEVIO_UBLK_CMD_TRY_STOP_DEV       0x17 /* ioctl-encoded, UBLK_F_SAFE_STOP_DEV */

/* Legacy I/O commands. */
#define DEVIO_UBLK_IO_FETCH_REQ            0x20
#define DEVIO_UBLK_IO_COMMIT_AND_FETCH_REQ 0x21
/* Only ever ioctl-encoded (UBLK_F_SUPPORT_ZERO_COPY): the request's pages
 * as fixed buffer `addr` of the ring that carries the command, and back. */
#define DEVIO_UBLK_IO_REGISTER_IO_BUF      0x23
#define DEVIO_UBLK_IO_UNREGISTER_IO_BUF    0x24

/* UBLK_F_BATCH_IO (7.x): per-queue commands that replace FETCH_REQ and
 * COMMIT_AND_FETCH_REQ (which such a device refuses), ioctl-encoded with
 * struct devio_ublk_batch_io.  PREP_IO_CMDS hands the driver tags (an
 * array of elements at the SQE's addr, len bytes), CQE 0 or -errno;
 * COMMIT_IO_CMDS commits results (elements likewise), CQE = bytes of
 * elements taken (the rest was not committed: send it again) or -errno
 * when none was; FETCH_IO_CMDS is multishot (IORING_URING_CMD_MULTISHOT,
 * IOSQE_BUFFER_SELECT from buffer group sqe->buf_group): each CQE carries
 * res bytes of u16 tags of ready requests in a provided buffer,
 * UBLK_IO_RES_ABORT (-ENODEV) when the queue is stopping or quiesced. */
#define DEVIO_UBLK_IO_PREP_IO_CMDS   0x25
#define DEVIO_UBLK_IO_COMMIT_IO_CMDS 0x26
#define DEVIO_UBLK_IO_FETCH_IO_CMDS  0x27

struct devio_ublk_batch_io {
	uint16_t q_id;
#define DEVIO_UBLK_BATCH_F_HAS_ZONE_LBA  (1 << 0)
#define DEVIO_UBLK_BATCH_F_HAS_BUF_ADDR  (1 << 1) /* kernel copy: elements carry buf_addr */
#define DEVIO_UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK (1 << 2)
	uint16_t flags;
	uint16_t nr_elem;
	uint8_t elem_bytes;     /* 8, +8 with HAS_BUF_ADDR, +8 with HAS_ZONE_LBA */
	uint8_t reserved;
	uint64_t reserved2;
};

/* One element of PREP/COMMIT; with HAS_BUF_ADDR followed by the 64-bit
 * address of the tag's buffer. */
struct devio_ublk_elem {
	uint16_t tag;
	uint16_t buf_index;     /* UBLK_F_AUTO_BUF_REG: where the next request's pages go */
	int32_t result;         /* COMMIT: bytes done or -errno */
};

/* A tag in a FETCH buffer that stands for nothing: skip it. */
#define DEVIO_UBLK_BATCH_UNUSED_TAG 0xffff

/* io_uring bits liburing 2.3 (Debian 12) does not name yet. */
#define DEVIO_IORING_URING_CMD_MULTISHOT (1U << 1)

/* The control command, carried in the 80-byte cmd area of a 128-byte SQE. */
struct devio_ublk_ctrl_cmd {
	uint32_t dev_id;
	uint16_t queue_id;  /* 0xffff when not for a queue */
	uint16_t len;       /* of the buffer at addr */
	uint64_t addr;
	uint64_t data[1];
	uint16_t dev_path_len;
	uint16_t pad;
	uint32_t reserved;
};

/* The I/O command, in the cmd area of an SQE on /dev/ublkcN. */
struct devio_ublk_io_cmd {
	uint16_t q_id;
	uint16_t tag;
	int32_t result;     /* COMMIT: bytes done or -errno */
	uint64_t addr;      /* classic copy: the tag's buffer; else 0;
			     * (UN)REGISTER_IO_BUF: the buffer index */
};

/* UBLK_F_AUTO_BUF_REG: FETCH and COMMIT_AND_FETCH carry in the SQE's own
 * addr field (not the command's) the fixed buffer index (bits 0-15) at
 * which the driver registers the next request's pages, flags in bits
 * 16-23, the rest zero. */
#define DEVIO_UBLK_AUTO_BUF_REG(index, flags) ((uint64_t)(uint16_t)(index) | (uint64_t)(uint8_t)(flags) << 16)

/* The ioctl encodings (feature UBLK_F_CMD_IOCTL_ENCODE). */
#define DEVIO_UBLK_U_CMD(nr)  _IOWR('u', (nr), struct devio_ublk_ctrl_cmd)
#define DEVIO_UBLK_U_CMDR(nr) _IOR('u', (nr), struct devio_ublk_ctrl_cmd)
#define DEVIO_UBLK_U_IO(nr)   _IOWR('u', (nr), struct devio_ublk_io_cmd)
#define DEVIO_UBLK_U_BATCH(nr) _IOWR('u', (nr), struct devio_ublk_batch_io)

struct devio_ublk_dev_info {
	uint16_t nr_hw_queues;
	uint16_t queue_depth;
	uint16_t state;
	uint16_t pad0;
	uint32_t max_io_buf_bytes;
	uint32_t dev_id;
	int32_t ublksrv_pid;
	uint32_t pad1;
	uint64_t flags;
	uint64_t ublksrv_flags;
	uint32_t owner_uid;
	uint32_t owner_gid;
	uint64_t reserved1;
	uint64_t reserved2;
};

/* Device feature flags (ADD_DEV dev_info.flags, GET_FEATURES). */
#define DEVIO_UBLK_F_SUPPORT_ZERO_COPY  (1ULL << 0)  /* 6.15: REGISTER_IO_BUF */
#define DEVIO_UBLK_F_URING_CMD_COMP_IN_TASK (1ULL << 1)
#define DEVIO_UBLK_F_NEED_GET_DATA      (1ULL << 2)
#define DEVIO_UBLK_F_USER_RECOVERY      (1ULL << 3)  /* 6.0 */
#define DEVIO_UBLK_F_USER_RECOVERY_REISSUE (1ULL << 4)
#define DEVIO_UBLK_F_UNPRIVILEGED_DEV   (1ULL << 5)
#define DEVIO_UBLK_F_CMD_IOCTL_ENCODE   (1ULL << 6)
#define DEVIO_UBLK_F_USER_COPY          (1ULL << 7)  /* 6.5 */
#define DEVIO_UBLK_F_ZONED              (1ULL << 8)
#define DEVIO_UBLK_F_USER_RECOVERY_FAIL_IO (1ULL << 9) /* 6.13 */
#define DEVIO_UBLK_F_UPDATE_SIZE        (1ULL << 10)
#define DEVIO_UBLK_F_AUTO_BUF_REG       (1ULL << 11) /* 6.16 */
#define DEVIO_UBLK_F_QUIESCE            (1ULL << 12)
#define DEVIO_UBLK_F_PER_IO_DAEMON      (1ULL << 13)
#define DEVIO_UBLK_F_BUF_REG_OFF_DAEMON (1ULL << 14)
#define DEVIO_UBLK_F_BATCH_IO           (1ULL << 15)
#define DEVIO_UBLK_F_INTEGRITY          (1ULL << 16)
#define DEVIO_UBLK_F_SAFE_STOP_DEV      (1ULL << 17) /* TRY_STOP_DEV */
#define DEVIO_UBLK_F_NO_AUTO_PART_SCAN  (1ULL << 18)
#define DEVIO_UBLK_F_SHMEM_ZC           (1ULL << 19)

/* Device states. */
#define DEVIO_UBLK_S_DEV_DEAD 0
#define DEVIO_UBLK_S_DEV_LIVE 1
#define DEVIO_UBLK_S_DEV_QUIESCED 2
#define DEVIO_UBLK_S_DEV_FAIL_IO 3

/* Completion results of FETCH/COMMIT_AND_FETCH. */
#define DEVIO_UBLK_IO_RES_OK            0
#define DEVIO_UBLK_IO_RES_NEED_GET_DATA 1
/* UBLK_IO_RES_ABORT is -ENODEV: the device is going away, no re-fetch. */

/* Where the per-queue descriptor arrays and (user copy) the per-tag data
 * live in the /dev/ublkcN offset space. */
#define DEVIO_UBLKSRV_CMD_BUF_OFFSET 0ULL
#define DEVIO_UBLKSRV_IO_BUF_OFFSET  0x80000000ULL
#define DEVIO_UBLK_MAX_QUEUE_DEPTH   4096
#define DEVIO_UBLK_IO_BUF_BITS       25
#define DEVIO_UBLK_TAG_OFF           DEVIO_UBLK_IO_BUF_BITS
#define DEVIO_UBLK_TAG_BITS          16
#define DEVIO_UBLK_QID_OFF           (DEVIO_UBLK_TAG_OFF + DEVIO_UBLK_TAG_BITS)
#define DEVIO_UBLK_MAX_NR_QUEUES     4096

/* Request ops and flags in ublksrv_io_desc.op_flags. */
#define DEVIO_UBLK_IO_OP_READ         0
#define DEVIO_UBLK_IO_OP_WRITE        1
#define DEVIO_UBLK_IO_OP_FLUSH        2
#define DEVIO_UBLK_IO_OP_DISCARD      3
#define DEVIO_UBLK_IO_OP_WRITE_SAME   4
#define DEVIO_UBLK_IO_OP_WRITE_ZEROES 5
#define DEVIO_UBLK_IO_F_FUA           (1U << 13)
#define DEVIO_UBLK_IO_F_NOUNMAP       (1U << 15)

/* One request as the driver describes it, indexed by tag, in memory the
 * driver writes and we map read-only.  Untrusted until checked. */
struct devio_ublk_io_desc {
	uint32_t op_flags;      /* op: bits 0-7, flags: bits 8-31 */
	uint32_t nr_sectors;
	uint64_t start_sector;
	uint64_t addr;
};

struct devio_ublk_param_basic {
#define DEVIO_UBLK_ATTR_READ_ONLY      (1 << 0)
#define DEVIO_UBLK_ATTR_ROTATIONAL     (1 << 1)
#define DEVIO_UBLK_ATTR_VOLATILE_CACHE (1 << 2)
#define DEVIO_UBLK_ATTR_FUA            (1 << 3)
	uint32_t attrs;
	uint8_t logical_bs_shift;
	uint8_t physical_bs_shift;
	uint8_t io_opt_shift;
	uint8_t io_min_shift;
	uint32_t max_sectors;
	uint32_t chunk_sectors;
	uint64_t dev_sectors;
	uint64_t virt_boundary_mask;
};

struct devio_ublk_param_discard {
	uint32_t discard_alignment;
	uint32_t discard_granularity;
	uint32_t max_discard_sectors;
	uint32_t max_write_zeroes_sectors;
	uint16_t max_discard_segments;
	uint16_t reserved0;
};

struct devio_ublk_param_devt {
	uint32_t char_major;
	uint32_t char_minor;
	uint32_t disk_major;
	uint32_t disk_minor;
};

/* The 6.1-era prefix of struct ublk_params; the driver accepts a shorter
 * len than its own and copies only that much. */
struct devio_ublk_params {
	uint32_t len;
#define DEVIO_UBLK_PARAM_TYPE_BASIC   (1 << 0)
#define DEVIO_UBLK_PARAM_TYPE_DISCARD (1 << 1)
#define DEVIO_UBLK_PARAM_TYPE_DEVT    (1 << 2)
	uint32_t types;
	struct devio_ublk_param_basic basic;
	struct devio_ublk_param_discard discard;
	struct devio_ublk_param_devt devt;
};

_Static_assert(sizeof(struct devio_ublk_ctrl_cmd) == 32, "ublksrv_ctrl_cmd layout");
_Static_assert(sizeof(struct devio_ublk_io_cmd) == 16, "ublksrv_io_cmd layout");
_Static_assert(sizeof(struct devio_ublk_batch_io) == 16, "ublk_batch_io layout");
_Static_assert(sizeof(struct devio_ublk_elem) == 8, "ublk_elem_header layout");
_Static_assert(sizeof(struct devio_ublk_io_desc) == 24, "ublksrv_io_desc layout");
_Static_assert(sizeof(struct devio_ublk_dev_info) == 64, "ublksrv_ctrl_dev_info layout");
_Static_assert(sizeof(struct devio_ublk_param_basic) == 32, "ublk_param_basic layout");
_Static_assert(sizeof(struct devio_ublk_param_discard) == 20, "ublk_param_discard layout");

#endif
