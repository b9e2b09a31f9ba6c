/* fuse_proto.h - the FUSE kernel ABI this project speaks (protocol 7.x as
 * the kernel's include/uapi/linux/fuse.h defines it, including the
 * FUSE-over-io_uring structures that Debian 12's 6.1 headers lack), and the
 * request codec shared by the --fuse front end and its fuzz target.
 *
 * The codec (lib/fuse_codec.c) turns one request from the kernel (header,
 * op header, payload) into either a finished reply or one devio_request to
 * run first; it never touches a file descriptor, so it runs on bytes from
 * /dev/fuse, from a ring entry or from a fuzzer alike. */
#ifndef DEVIO_FUSE_PROTO_H
#define DEVIO_FUSE_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "devio/backend.h"
#include "devio/request.h"

#define DEVIO_FUSE_MAJOR 7
#define DEVIO_FUSE_MINOR 42
#define DEVIO_FUSE_ROOT_ID 1
#define DEVIO_FUSE_FILE_ID 2

enum devio_fuse_opcode {
	DEVIO_FUSE_LOOKUP = 1,
	DEVIO_FUSE_FORGET = 2,
	DEVIO_FUSE_GETATTR = 3,
	DEVIO_FUSE_SETATTR = 4,
	DEVIO_FUSE_OPEN = 14,
	DEVIO_FUSE_READ = 15,
	DEVIO_FUSE_WRITE = 16,
	DEVIO_FUSE_STATFS = 17,
	DEVIO_FUSE_RELEASE = 18,
	DEVIO_FUSE_FSYNC = 20,
	DEVIO_FUSE_SETXATTR = 21,
	DEVIO_FUSE_GETXATTR = 22,
	DEVIO_FUSE_LISTXATTR = 23,
	DEVIO_FUSE_REMOVEXATTR = 24,
	DEVIO_FUSE_FLUSH = 25,
	DEVIO_FUSE_INIT = 26,
	DEVIO_FUSE_OPENDIR = 27,
	DEVIO_FUSE_READDIR = 28,
	DEVIO_FUSE_RELEASEDIR = 29,
	DEVIO_FUSE_FSYNCDIR = 30,
	DEVIO_FUSE_ACCESS = 34,
	DEVIO_FUSE_INTERRUPT = 36,
	DEVIO_FUSE_DESTROY = 38,
	DEVIO_FUSE_BATCH_FORGET = 42,
	DEVIO_FUSE_FALLOCATE = 43,
	DEVIO_FUSE_READDIRPLUS = 44,
	DEVIO_FUSE_LSEEK = 46,
	DEVIO_FUSE_SYNCFS = 50,
};

/* INIT flags (64 bits: flags | flags2 << 32). */
#define DEVIO_FUSE_ASYNC_READ       (1ull << 0)
#define DEVIO_FUSE_BIG_WRITES       (1ull << 5)
#define DEVIO_FUSE_ASYNC_DIO        (1ull << 15)
#define DEVIO_FUSE_PARALLEL_DIROPS  (1ull << 18)
#define DEVIO_FUSE_MAX_PAGES        (1ull << 22)
#define DEVIO_FUSE_INIT_EXT         (1ull << 30)
#define DEVIO_FUSE_OVER_IO_URING    (1ull << 41)
#define DEVIO_FUSE_REQUEST_TIMEOUT  (1ull << 42) /* Linux 6.14: init_out.request_timeout */

/* open_out.open_flags */
#define DEVIO_FOPEN_PARALLEL_DIRECT_WRITES (1u << 6)

/* setattr_in.valid */
#define DEVIO_FATTR_MODE (1u << 0)
#define DEVIO_FATTR_UID  (1u << 1)
#define DEVIO_FATTR_GID  (1u << 2)
#define DEVIO_FATTR_SIZE (1u << 3)

struct fuse_in_header {
	uint32_t len, opcode;
	uint64_t unique, nodeid;
	uint32_t uid, gid, pid;
	uint16_t total_extlen, padding;
};

struct fuse_out_header {
	uint32_t len;
	int32_t error;
	uint64_t unique;
};

struct fuse_attr {
	uint64_t ino, size, blocks, atime, mtime, ctime;
	uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};

struct fuse_entry_out {
	uint64_t nodeid, generation, entry_valid, attr_valid;
	uint32_t entry_valid_nsec, attr_valid_nsec;
	struct fuse_attr attr;
};

struct fuse_attr_out {
	uint64_t attr_valid;
	uint32_t attr_valid_nsec, dummy;
	struct fuse_attr attr;
};

struct fuse_setattr_in {
	uint32_t valid, padding;
	uint64_t fh, size, lock_owner, atime, mtime, ctime;
	uint32_t atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5;
};

struct fuse_open_in { uint32_t flags, open_flags; };
struct fuse_open_out { uint64_t fh; uint32_t open_flags; int32_t backing_id; };

struct fuse_release_in { uint64_t fh; uint32_t flags, release_flags; uint64_t lock_owner; };

struct fuse_rw_in { /* fuse_read_in and fuse_write_in share this layout */
	uint64_t fh, offset;
	uint32_t size, rw_flags;
	uint64_t lock_owner;
	uint32_t flags, padding;
};

struct fuse_write_out { uint32_t size, padding; };

struct fuse_kstatfs {
	uint64_t blocks, bfree, bavail, files, ffree;
	uint32_t bsize, namelen, frsize, padding;
	uint32_t spare[6];
};

struct fuse_access_in { uint32_t mask, padding; };

struct fuse_init_in {
	uint32_t major, minor, max_readahead, flags;
	uint32_t flags2, unused[11];
};

struct fuse_init_out {
	uint32_t major, minor, max_readahead, flags;
	uint16_t max_background, congestion_threshold;
	uint32_t max_write, time_gran;
	uint16_t max_pages, map_alignment;
	uint32_t flags2, max_stack_depth;
	uint16_t request_timeout;
	uint16_t unused[11];
};

struct fuse_fallocate_in { uint64_t fh, offset, length; uint32_t mode, padding; };
struct fuse_lseek_in { uint64_t fh, offset; uint32_t whence, padding; };
struct fuse_lseek_out { uint64_t offset; };

struct fuse_dirent { uint64_t ino, off; uint32_t namelen, type; /* name follows */ };
struct fuse_direntplus { struct fuse_entry_out entry_out; struct fuse_dirent dirent; };

/* ---- FUSE over io_uring (fs/fuse/dev_uring.c) ---- */
#define DEVIO_FUSE_URING_CMD_REGISTER 1
#define DEVIO_FUSE_URING_CMD_COMMIT_AND_FETCH 2

struct fuse_uring_ent_in_out {
	uint64_t flags, commit_id;
	uint32_t payload_sz, padding;
	uint64_t reserved;
};

struct fuse_uring_req_header {
	uint8_t in_out[128];  /* fuse_in_header in, fuse_out_header out */
	uint8_t op_in[128];   /* the operation's own header */
	struct fuse_uring_ent_in_out ring_ent_in_out;
};

struct fuse_uring_cmd_req {
	uint64_t flags, commit_id;
	uint16_t qid;
	uint8_t padding[6];
};

_Static_assert(sizeof(struct fuse_in_header) == 40, "fuse_in_header");
_Static_assert(sizeof(struct fuse_attr) == 88, "fuse_attr");
_Static_assert(sizeof(struct fuse_entry_out) == 128, "fuse_entry_out");
_Static_assert(sizeof(struct fuse_setattr_in) == 88, "fuse_setattr_in");
_Static_assert(sizeof(struct fuse_init_out) == 64, "fuse_init_out");
_Static_assert(sizeof(struct fuse_kstatfs) == 80, "fuse_kstatfs");
_Static_assert(sizeof(struct fuse_uring_req_header) == 288, "fuse_uring_req_header");
_Static_assert(sizeof(struct fuse_uring_cmd_req) == 24, "fuse_uring_cmd_req");

/* ---- the codec ---- */

/* The one-file file system a FUSE export shows. */
struct devio_fuse_fs {
	struct devio_backend *backend;
	char name[256];        /* the file's name in the mount root */
	uint64_t size;
	bool readonly;
	uint32_t uid, gid;
	uint32_t mode;         /* the file's permission bits (0: 0600); read-only: no write bits */
	uint64_t mtime;        /* seconds, for the attributes */
	uint32_t max_write;    /* what INIT offers (and the largest payload) */
	bool offer_uring;      /* ask for FUSE_OVER_IO_URING in INIT */
	uint16_t request_timeout; /* seconds, sent when the kernel offers FUSE_REQUEST_TIMEOUT; 0: none */
	/* set by INIT */
	bool initialized, uring_granted, destroyed, timeout_granted;
	uint32_t kernel_minor;
};

/* One request and its reply.  The caller fills the request part and the
 * reply buffer; the codec fills the rest. */
struct devio_fuse_msg {
	struct fuse_in_header in;
	const uint8_t *arg;    /* the op header (may be shorter than expected: checked) */
	size_t arglen;
	const uint8_t *data;   /* what follows the op header: names, write data */
	size_t datalen;
	uint8_t *reply;        /* where the reply body goes (may alias data: inputs are read first) */
	size_t reply_cap;
	/* results */
	int32_t error;         /* 0 or a negative errno for the out header */
	size_t reply_len;      /* body bytes */
	bool no_reply;         /* FORGET, BATCH_FORGET, INTERRUPT */
	bool has_io;           /* run req, then call devio_fuse_finish() */
	struct devio_request req;
};

/* Size of the op header the kernel sends before the payload for opcode
 * (0 for an opcode whose arguments are all payload). */
size_t devio_fuse_arg_size(uint32_t opcode);
/* Split one contiguous /dev/fuse message of n bytes into msg's request
 * part; -EINVAL if it is malformed (then msg->in is zero if even the
 * header is short). */
int devio_fuse_split(const uint8_t *buf, size_t n, struct devio_fuse_msg *msg);
/* Decode and answer msg; sets has_io when msg->req must run first. */
void devio_fuse_handle(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg);
/* After msg->req has completed: build the reply. */
void devio_fuse_finish(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg);
const char *devio_fuse_opname(uint32_t opcode);

#endif
