/* fuse_codec.c - decodes FUSE requests for the one-file file system of a
 * --fuse export and encodes the replies (lib/fuse_proto.h).  Every field
 * from the kernel is checked: op header sizes, name lengths, offsets and
 * sizes against the fixed file size and the reply buffer.  The file never
 * changes size: reads past the end are short, writes past it are short
 * (then -ENOSPC), truncation is refused. */
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "fuse_proto.h"
#include "devio/util.h"

#define ATTR_VALID_SECONDS 3600 /* nothing but us changes the tree */
#define STATFS_BSIZE 4096
#define FALLOC_KEEP_SIZE  0x01
#define FALLOC_PUNCH_HOLE 0x02
#define FALLOC_ZERO_RANGE 0x10
#define SEEK_DATA_ 3
#define SEEK_HOLE_ 4

static const struct { uint32_t op; const char *name; size_t arg; } fc_ops[] = {
	{ DEVIO_FUSE_LOOKUP, "LOOKUP", 0 },
	{ DEVIO_FUSE_FORGET, "FORGET", 8 },
	{ DEVIO_FUSE_GETATTR, "GETATTR", 16 },
	{ DEVIO_FUSE_SETATTR, "SETATTR", sizeof(struct fuse_setattr_in) },
	{ DEVIO_FUSE_OPEN, "OPEN", sizeof(struct fuse_open_in) },
	{ DEVIO_FUSE_READ, "READ", sizeof(struct fuse_rw_in) },
	{ DEVIO_FUSE_WRITE, "WRITE", sizeof(struct fuse_rw_in) },
	{ DEVIO_FUSE_STATFS, "STATFS", 0 },
	{ DEVIO_FUSE_RELEASE, "RELEASE", sizeof(struct fuse_release_in) },
	{ DEVIO_FUSE_FSYNC, "FSYNC", 16 },
	{ DEVIO_FUSE_SETXATTR, "SETXATTR", 0 },
	{ DEVIO_FUSE_GETXATTR, "GETXATTR", 0 },
	{ DEVIO_FUSE_LISTXATTR, "LISTXATTR", 0 },
	{ DEVIO_FUSE_REMOVEXATTR, "REMOVEXATTR", 0 },
	{ DEVIO_FUSE_FLUSH, "FLUSH", 24 },
	{ DEVIO_FUSE_INIT, "INIT", sizeof(struct fuse_init_in) },
	{ DEVIO_FUSE_OPENDIR, "OPENDIR", sizeof(struct fuse_open_in) },
	{ DEVIO_FUSE_READDIR, "READDIR", sizeof(struct fuse_rw_in) },
	{ DEVIO_FUSE_RELEASEDIR, "RELEASEDIR", sizeof(struct fuse_release_in) },
	{ DEVIO_FUSE_FSYNCDIR, "FSYNCDIR", 16 },
	{ DEVIO_FUSE_ACCESS, "ACCESS", sizeof(struct fuse_access_in) },
	{ DEVIO_FUSE_INTERRUPT, "INTERRUPT", 8 },
	{ DEVIO_FUSE_DESTROY, "DESTROY", 0 },
	{ DEVIO_FUSE_BATCH_FORGET, "BATCH_FORGET", 8 },
	{ DEVIO_FUSE_FALLOCATE, "FALLOCATE", sizeof(struct fuse_fallocate_in) },
	{ DEVIO_FUSE_READDIRPLUS, "READDIRPLUS", sizeof(struct fuse_rw_in) },
	{ DEVIO_FUSE_LSEEK, "LSEEK", sizeof(struct fuse_lseek_in) },
	{ DEVIO_FUSE_SYNCFS, "SYNCFS", 8 },
};

size_t devio_fuse_arg_size(uint32_t opcode)
{
	for (size_t i = 0; i < sizeof(fc_ops) / sizeof(fc_ops[0]); i++)
		if (fc_ops[i].op == opcode)
			return fc_ops[i].arg;
	return 0;
}

const char *devio_fuse_opname(uint32_t opcode)
{
	for (size_t i = 0; i < sizeof(fc_ops) / sizeof(fc_ops[0]); i++)
		if (fc_ops[i].op == opcode)
			return fc_ops[i].name;
	return "UNKNOWN";
}

int devio_fuse_split(const uint8_t *buf, size_t n, struct devio_fuse_msg *msg)
{
	size_t arg;

	memset(&msg->in, 0, sizeof(msg->in));
	if (n < sizeof(msg->in))
		return -EINVAL;
	memcpy(&msg->in, buf, sizeof(msg->in));
	if (msg->in.len != n)
		return -EINVAL;
	n -= sizeof(msg->in);
	buf += sizeof(msg->in);
	arg = devio_fuse_arg_size(msg->in.opcode);
	if (msg->in.opcode == DEVIO_FUSE_INIT)
		arg = n; /* older kernels send a shorter init_in */
	if (arg > n)
		return -EINVAL;
	msg->arg = buf;
	msg->arglen = arg;
	msg->data = buf + arg;
	msg->datalen = n - arg;
	return 0;
}

/* Copy the op header into a zeroed struct; -EINVAL if the kernel sent less. */
static int fc_get_arg(const struct devio_fuse_msg *msg, void *dst, size_t need)
{
	if (msg->arglen < need || !msg->arg)
		return -EINVAL;
	memcpy(dst, msg->arg, need);
	return 0;
}

static int fc_put_reply(struct devio_fuse_msg *msg, const void *body, size_t len)
{
	if (len > msg->reply_cap)
		return -EINVAL;
	memcpy(msg->reply, body, len);
	msg->reply_len = len;
	return 0;
}

static void fc_fill_attr(const struct devio_fuse_fs *fs, uint64_t ino, struct fuse_attr *a)
{
	memset(a, 0, sizeof(*a));
	a->ino = ino;
	a->atime = a->mtime = a->ctime = fs->mtime;
	a->uid = fs->uid;
	a->gid = fs->gid;
	a->blksize = STATFS_BSIZE;
	if (ino == DEVIO_FUSE_ROOT_ID) {
		a->mode = S_IFDIR | 0755;
		a->nlink = 2;
		return;
	}
	a->mode = S_IFREG | ((fs->mode ? fs->mode & 07777 : 0600) & (fs->readonly ? ~0222u : ~0u));
	a->nlink = 1;
	a->size = fs->size;
	a->blocks = (fs->size + 511) / 512;
}

static void fc_fill_entry(const struct devio_fuse_fs *fs, struct fuse_entry_out *e)
{
	memset(e, 0, sizeof(*e));
	e->nodeid = DEVIO_FUSE_FILE_ID;
	e->generation = 1;
	e->entry_valid = e->attr_valid = ATTR_VALID_SECONDS;
	fc_fill_attr(fs, DEVIO_FUSE_FILE_ID, &e->attr);
}

static int fc_do_init(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	struct fuse_init_in in = { 0 };
	struct fuse_init_out out = { 0 };
	uint64_t offered, want;

	if (msg->arglen < 16 || !msg->arg)
		return -EINVAL;
	memcpy(&in, msg->arg, msg->arglen < sizeof(in) ? msg->arglen : sizeof(in));
	out.major = DEVIO_FUSE_MAJOR;
	if (in.major < 7)
		return -EPROTO;
	if (in.major > 7) /* the kernel retries with 7 */
		return fc_put_reply(msg, &out, 8);
	if (in.minor < 23) /* a 64-byte init_out, parallel DIO writes */
		return -EPROTO;
	offered = in.flags;
	if ((in.flags & DEVIO_FUSE_INIT_EXT) && msg->arglen >= 20)
		offered |= (uint64_t)in.flags2 << 32;
	want = DEVIO_FUSE_ASYNC_READ | DEVIO_FUSE_BIG_WRITES | DEVIO_FUSE_ASYNC_DIO |
	       DEVIO_FUSE_PARALLEL_DIROPS | DEVIO_FUSE_MAX_PAGES | DEVIO_FUSE_INIT_EXT;
	if (fs->offer_uring)
		want |= DEVIO_FUSE_OVER_IO_URING;
	if (fs->request_timeout) /* the kernel aborts the connection when a request takes longer */
		want |= DEVIO_FUSE_REQUEST_TIMEOUT;
	want &= offered;
	if (want & DEVIO_FUSE_REQUEST_TIMEOUT)
		out.request_timeout = fs->request_timeout;
	out.minor = in.minor < DEVIO_FUSE_MINOR ? in.minor : DEVIO_FUSE_MINOR;
	out.max_readahead = in.max_readahead;
	out.flags = (uint32_t)want;
	out.flags2 = (uint32_t)(want >> 32);
	out.max_background = 128;
	out.congestion_threshold = 96;
	out.max_write = fs->max_write;
	out.time_gran = 1;
	out.max_pages = (uint16_t)(fs->max_write / 4096);
	fs->kernel_minor = in.minor;
	fs->uring_granted = (want & DEVIO_FUSE_OVER_IO_URING) != 0;
	fs->timeout_granted = (want & DEVIO_FUSE_REQUEST_TIMEOUT) != 0;
	fs->initialized = true;
	return fc_put_reply(msg, &out, sizeof(out));
}

static int fc_do_lookup(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	struct fuse_entry_out e;
	size_t n = strlen(fs->name);

	if (msg->in.nodeid != DEVIO_FUSE_ROOT_ID)
		return -ENOTDIR;
	/* the name and its NUL */
	if (msg->datalen != n + 1 || memcmp(msg->data, fs->name, n + 1))
		return -ENOENT;
	fc_fill_entry(fs, &e);
	return fc_put_reply(msg, &e, sizeof(e));
}

static int fc_attr_reply(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	struct fuse_attr_out o = { .attr_valid = ATTR_VALID_SECONDS };

	if (msg->in.nodeid != DEVIO_FUSE_ROOT_ID && msg->in.nodeid != DEVIO_FUSE_FILE_ID)
		return -ENOENT;
	fc_fill_attr(fs, msg->in.nodeid, &o.attr);
	return fc_put_reply(msg, &o, sizeof(o));
}

static int fc_do_setattr(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	struct fuse_setattr_in in;

	if (fc_get_arg(msg, &in, sizeof(in)))
		return -EINVAL;
	if ((in.valid & DEVIO_FATTR_SIZE) && (msg->in.nodeid != DEVIO_FUSE_FILE_ID || in.size != fs->size))
		return -EPERM; /* the size of a disk is fixed */
	if (in.valid & (DEVIO_FATTR_MODE | DEVIO_FATTR_UID | DEVIO_FATTR_GID))
		return -EPERM;
	return fc_attr_reply(fs, msg); /* times: accepted, not kept */
}

static int fc_do_open(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg, bool dir)
{
	struct fuse_open_in in;
	struct fuse_open_out out = { 0 };

	if (fc_get_arg(msg, &in, sizeof(in)))
		return -EINVAL;
	if (dir != (msg->in.nodeid == DEVIO_FUSE_ROOT_ID))
		return dir ? -ENOTDIR : -EISDIR;
	if (!dir && msg->in.nodeid != DEVIO_FUSE_FILE_ID)
		return -ENOENT;
	if (!dir && fs->readonly && (in.flags & O_ACCMODE) != O_RDONLY)
		return -EROFS;
	if (!dir && (in.flags & O_TRUNC))
		return -EPERM;
	if (!dir)
		out.open_flags = DEVIO_FOPEN_PARALLEL_DIRECT_WRITES;
	return fc_put_reply(msg, &out, sizeof(out));
}

static int fc_do_statfs(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	struct fuse_kstatfs st = { 0 };

	st.bsize = st.frsize = STATFS_BSIZE;
	st.blocks = (fs->size + STATFS_BSIZE - 1) / STATFS_BSIZE;
	st.files = 2;
	st.namelen = 255;
	return fc_put_reply(msg, &st, sizeof(st));
}

/* One directory entry at *pos of the reply; false when it does not fit. */
static bool fc_add_dirent(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg, size_t cap, bool plus,
			  uint64_t ino, uint64_t off, const char *name)
{
	size_t namelen = strlen(name);
	size_t head = plus ? sizeof(struct fuse_direntplus) : sizeof(struct fuse_dirent);
	size_t len = (head + namelen + 7) & ~(size_t)7;
	uint8_t *p = msg->reply + msg->reply_len;
	struct fuse_dirent d = { .ino = ino, .off = off, .namelen = (uint32_t)namelen,
				 .type = ino == DEVIO_FUSE_FILE_ID ? DT_REG : DT_DIR };

	if (len > cap - msg->reply_len)
		return false;
	memset(p, 0, len);
	if (plus) {
		struct fuse_entry_out e = { 0 };

		if (ino == DEVIO_FUSE_FILE_ID)
			fc_fill_entry(fs, &e); /* counts as a lookup; "." and ".." do not */
		memcpy(p, &e, sizeof(e));
		p += sizeof(e);
	}
	memcpy(p, &d, sizeof(d));
	memcpy(p + sizeof(d), name, namelen);
	msg->reply_len += len;
	return true;
}

static int fc_do_readdir(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg, bool plus)
{
	struct fuse_rw_in in;
	const char *names[3] = { ".", "..", fs->name };
	uint64_t inos[3] = { DEVIO_FUSE_ROOT_ID, DEVIO_FUSE_ROOT_ID, DEVIO_FUSE_FILE_ID };
	size_t cap;

	if (fc_get_arg(msg, &in, sizeof(in)))
		return -EINVAL;
	if (msg->in.nodeid != DEVIO_FUSE_ROOT_ID)
		return -ENOTDIR;
	cap = in.size < msg->reply_cap ? in.size : msg->reply_cap;
	msg->reply_len = 0;
	for (uint64_t i = in.offset; i < 3; i++)
		if (!fc_add_dirent(fs, msg, cap, plus, inos[i], i + 1, names[i]))
			break;
	return 0;
}

static int fc_do_access(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	struct fuse_access_in in;

	if (fc_get_arg(msg, &in, sizeof(in)))
		return -EINVAL;
	if (msg->in.nodeid != DEVIO_FUSE_ROOT_ID && msg->in.nodeid != DEVIO_FUSE_FILE_ID)
		return -ENOENT;
	if ((in.mask & W_OK) && fs->readonly && msg->in.nodeid == DEVIO_FUSE_FILE_ID)
		return -EROFS;
	return 0;
}

static void fc_start_io(struct devio_fuse_msg *msg, enum devio_op op, uint64_t off, uint64_t len, void *buf)
{
	memset(&msg->req, 0, sizeof(msg->req));
	msg->req.op = op;
	msg->req.offset = off;
	msg->req.length = len;
	msg->req.buf = buf;
	msg->has_io = true;
}

static int fc_do_read(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	struct fuse_rw_in in;
	uint64_t len;

	if (fc_get_arg(msg, &in, sizeof(in)))
		return -EINVAL;
	if (msg->in.nodeid != DEVIO_FUSE_FILE_ID)
		return -EISDIR;
	if (in.size > msg->reply_cap)
		return -EINVAL;
	if (in.offset >= fs->size)
		return 0; /* end of file: zero bytes */
	len = fs->size - in.offset < in.size ? fs->size - in.offset : in.size;
	fc_start_io(msg, DEVIO_OP_READ, in.offset, len, msg->reply);
	return 0;
}

static int fc_do_write(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	struct fuse_rw_in in;
	uint64_t len;

	if (fc_get_arg(msg, &in, sizeof(in)))
		return -EINVAL;
	if (msg->in.nodeid != DEVIO_FUSE_FILE_ID)
		return -EISDIR;
	if (in.size > msg->datalen)
		return -EINVAL;
	if (fs->readonly)
		return -EROFS;
	if (in.size && in.offset >= fs->size)
		return -ENOSPC;
	len = fs->size - in.offset < in.size ? fs->size - in.offset : in.size;
	fc_start_io(msg, DEVIO_OP_WRITE, in.offset, len, (void *)msg->data);
	return 0;
}

static int fc_do_fallocate(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	struct fuse_fallocate_in in;
	uint32_t caps = fs->backend->caps;
	uint64_t end, len;

	if (fc_get_arg(msg, &in, sizeof(in)))
		return -EINVAL;
	if (msg->in.nodeid != DEVIO_FUSE_FILE_ID)
		return -EISDIR;
	if (fs->readonly)
		return -EROFS;
	if (in.mode & ~(uint32_t)(FALLOC_KEEP_SIZE | FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE))
		return -EOPNOTSUPP;
	if (__builtin_add_overflow(in.offset, in.length, &end))
		return -EFBIG;
	if (end > fs->size && !(in.mode & FALLOC_KEEP_SIZE))
		return -EFBIG; /* would grow the file */
	if (in.offset >= fs->size || !(in.mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE)))
		return 0; /* nothing to do: the whole file is always there */
	len = (end > fs->size ? fs->size : end) - in.offset;
	if (in.mode & FALLOC_PUNCH_HOLE) {
		if (!(in.mode & FALLOC_KEEP_SIZE) || (in.mode & FALLOC_ZERO_RANGE))
			return -EOPNOTSUPP;
		/* TRIM (the backends' TRIM reads back as zeroes), else ZERO */
		if (caps & DEVIO_CAP_TRIM)
			fc_start_io(msg, DEVIO_OP_TRIM, in.offset, len, NULL);
		else if (caps & DEVIO_CAP_ZERO)
			fc_start_io(msg, DEVIO_OP_ZERO, in.offset, len, NULL);
		else
			return -EOPNOTSUPP;
		return 0;
	}
	fc_start_io(msg, DEVIO_OP_ZERO, in.offset, len, NULL);
	msg->req.flags = DEVIO_REQ_NO_HOLE;
	return 0;
}

struct seek_ctx {
	bool want_data;
	uint64_t found, next;
	bool hit;
};

static int fc_seek_cb(void *ctx, uint64_t off, uint64_t len, uint32_t flags)
{
	struct seek_ctx *s = ctx;
	bool data = !(flags & DEVIO_EXTENT_HOLE);

	s->next = off + len;
	if (data == s->want_data) {
		s->found = off;
		s->hit = true;
		return 1;
	}
	return 0;
}

/* SEEK_DATA/SEEK_HOLE from the backend's extents (all data if it has none). */
static int fc_find_extent(struct devio_fuse_fs *fs, uint64_t off, bool want_data, uint64_t *out)
{
	struct devio_backend *b = fs->backend;
	struct seek_ctx s = { .want_data = want_data };
	unsigned guard = 0;

	if (!b->ops->extents || !(b->caps & DEVIO_CAP_EXTENTS)) {
		*out = want_data ? off : fs->size;
		return 0;
	}
	while (off < fs->size && guard++ < 1000000) {
		int r;

		s.next = off;
		r = b->ops->extents(b, off, fs->size - off, fc_seek_cb, &s);
		if (r < 0)
			return r;
		if (s.hit) {
			*out = s.found < off ? off : s.found;
			return 0;
		}
		if (s.next <= off)
			return -EIO; /* the backend made no progress */
		off = s.next;
	}
	if (want_data)
		return -ENXIO;
	*out = fs->size; /* the implicit hole at the end of file */
	return 0;
}

static int fc_do_lseek(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	struct fuse_lseek_in in;
	struct fuse_lseek_out out;
	int r;

	if (fc_get_arg(msg, &in, sizeof(in)))
		return -EINVAL;
	if (msg->in.nodeid != DEVIO_FUSE_FILE_ID)
		return -EISDIR;
	if (in.whence != SEEK_DATA_ && in.whence != SEEK_HOLE_)
		return -EINVAL;
	if (in.offset >= fs->size)
		return -ENXIO;
	r = fc_find_extent(fs, in.offset, in.whence == SEEK_DATA_, &out.offset);
	if (r)
		return r;
	return fc_put_reply(msg, &out, sizeof(out));
}

static int fc_do_flush_op(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	if (msg->in.nodeid != DEVIO_FUSE_FILE_ID || fs->readonly)
		return 0;
	fc_start_io(msg, DEVIO_OP_FLUSH, 0, 0, NULL);
	return 0;
}

static int fc_dispatch(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	uint32_t op = msg->in.opcode;

	if (!fs->initialized && op != DEVIO_FUSE_INIT)
		return -EIO;
	switch (op) {
	case DEVIO_FUSE_INIT: return fs->initialized ? -EINVAL : fc_do_init(fs, msg);
	case DEVIO_FUSE_LOOKUP: return fc_do_lookup(fs, msg);
	case DEVIO_FUSE_FORGET:
	case DEVIO_FUSE_BATCH_FORGET:
	case DEVIO_FUSE_INTERRUPT: /* requests finish quickly; nothing to cancel */
		msg->no_reply = true;
		return 0;
	case DEVIO_FUSE_GETATTR: return fc_attr_reply(fs, msg);
	case DEVIO_FUSE_SETATTR: return fc_do_setattr(fs, msg);
	case DEVIO_FUSE_OPEN: return fc_do_open(fs, msg, false);
	case DEVIO_FUSE_OPENDIR: return fc_do_open(fs, msg, true);
	case DEVIO_FUSE_RELEASE:
	case DEVIO_FUSE_RELEASEDIR:
	case DEVIO_FUSE_FSYNCDIR:
		return 0;
	case DEVIO_FUSE_READ: return fc_do_read(fs, msg);
	case DEVIO_FUSE_WRITE: return fc_do_write(fs, msg);
	case DEVIO_FUSE_STATFS: return fc_do_statfs(fs, msg);
	case DEVIO_FUSE_FSYNC:
	case DEVIO_FUSE_FLUSH:
	case DEVIO_FUSE_SYNCFS:
		return fc_do_flush_op(fs, msg);
	case DEVIO_FUSE_READDIR: return fc_do_readdir(fs, msg, false);
	case DEVIO_FUSE_READDIRPLUS: return fc_do_readdir(fs, msg, true);
	case DEVIO_FUSE_ACCESS: return fc_do_access(fs, msg);
	case DEVIO_FUSE_FALLOCATE: return fc_do_fallocate(fs, msg);
	case DEVIO_FUSE_LSEEK: return fc_do_lseek(fs, msg);
	case DEVIO_FUSE_DESTROY:
		fs->destroyed = true;
		return 0;
	default:
		return -ENOSYS; /* xattrs, links, locks, ioctl, ... */
	}
}

void devio_fuse_handle(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	msg->reply_len = 0;
	msg->no_reply = false;
	msg->has_io = false;
	msg->error = fc_dispatch(fs, msg);
	if (msg->error) {
		msg->has_io = false;
		msg->reply_len = 0;
	}
}

void devio_fuse_finish(struct devio_fuse_fs *fs, struct devio_fuse_msg *msg)
{
	struct devio_request *req = &msg->req;

	msg->has_io = false;
	msg->reply_len = 0;
	msg->error = req->result;
	if (req->result) {
		devio_warn("fuse %s: %s at offset %llu length %llu failed: %s", fs->name,
			   devio_op_name(req->op), (unsigned long long)req->offset,
			   (unsigned long long)req->length, strerror(-req->result));
		/* the application sees EIO for a failed transfer, as from a disk */
		if (req->result != -ENOSPC && req->result != -EROFS && req->result != -EOPNOTSUPP)
			msg->error = -EIO;
		return;
	}
	if (msg->in.opcode == DEVIO_FUSE_READ) {
		msg->reply_len = req->length; /* the data is already in msg->reply */
	} else if (msg->in.opcode == DEVIO_FUSE_WRITE) {
		struct fuse_write_out out = { .size = (uint32_t)req->length };

		fc_put_reply(msg, &out, sizeof(out));
	}
}
