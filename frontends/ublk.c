/* ublk.c - the --ublk front end: a real /dev/ublkbN block device whose
 * requests the kernel's ublk driver hands to this process, the Linux
 * counterpart of ImDisk's DevIO client driver.
 *
 * Control: commands on /dev/ublk-control as io_uring URING_CMDs (128-byte
 * SQEs): GET_FEATURES, ADD_DEV, SET_PARAMS, START_DEV, STOP_DEV, DEL_DEV.
 * Data: one thread per hardware queue with an io_uring of its own.  Each
 * tag (request slot) has a buffer; the thread issues FETCH_REQ for every
 * tag, and when one completes it reads the tag's descriptor from the
 * queue's mmap()ed descriptor array, checks it, submits a devio_request to
 * the backend and, when that completes, queues COMMIT_AND_FETCH_REQ with
 * the result.  All commits gathered in one pass go to the kernel in one
 * io_uring_enter, which also waits for the next completions.  The thread,
 * its ring and the inbox for completions from other threads are
 * lib/ring.c's; the file backend puts its I/O on the same ring.
 *
 * Batched commands (UBLK_F_BATCH_IO, 7.x; ublk_batch_*): where offered
 * the per-tag commands give way to PREP_IO_CMDS (every tag at once), a
 * multishot FETCH_IO_CMDS that writes the tags of ready requests into
 * buffers of a provided-buffer ring, and one COMMIT_IO_CMDS per pass with
 * every result gathered in it (what the driver did not take is sent
 * again).
 *
 * Data copy, chosen once per device: over a backend that takes
 * registered pages (a plain file) none at all, the request's own pages
 * being fixed buffer `tag` of the queue's ring, registered by the driver
 * (UBLK_F_AUTO_BUF_REG) or by us (UBLK_F_SUPPORT_ZERO_COPY), and read or
 * written by the backend's I/O on that ring; else with UBLK_F_USER_COPY
 * (kernel 6.5+) the thread moves a request's data with pread/pwrite on
 * /dev/ublkcN at the tag's offset; otherwise the driver copies into the
 * buffer named in FETCH/COMMIT.
 *
 * Recovery (--recovery, --recover) and the hand-over (SIGUSR2): the device
 * outlives its server; a hand-over quiesces it (QUIESCE_DEV, where the
 * driver has UBLK_F_QUIESCE) and the server exits without deleting it, so
 * that `devio serve ... --recover` takes it over.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <liburing.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/frontend.h"
#include "devio/ring.h"
#include "devio/ublk.h"
#include "devio/util.h"
#include "devio/workers.h"
#include "../lib/ublk_abi.h"

#define UBLK_CONTROL "/dev/ublk-control"
#define DEFAULT_DEPTH 64
#define DEFAULT_MAX_IO (512u * 1024)        /* copy modes: a buffer this large per tag */
#define DEFAULT_MAX_IO_FIXED (1024u * 1024) /* zero copy: no buffer; a 1 MiB request stays whole */
#define NO_DEV_ID UINT32_MAX
#define STOP_GRACE_NS (3ull * 1000 * 1000 * 1000)
#define UBLK_QUIESCE_TIMEOUT_MS 30000 /* for a fetch of every queue to be idle */

struct ublk_queue;

/* One request slot of a queue. */
struct ublk_tag {
	struct devio_request req;
	struct ublk_queue *q;
	void *buf;
	uint16_t tag;
	uint8_t op;        /* the ublk op being served */
	bool dead;         /* aborted by the driver: no more commands */
	bool registered;   /* zero copy: the pages are fixed buffer `tag` of the ring */
	bool held;         /* batch: fetched and not yet staged for a commit */
};

struct ublk_dev;

/* One hardware queue: a ring thread (lib/ring.c) and its tags. */
struct ublk_queue {
	struct ublk_dev *dev;
	unsigned qid;
	struct devio_ring *ring;
	struct devio_ring_stats final; /* the ring's counters once it is gone */
	const struct devio_ublk_io_desc *descs;
	size_t descs_len;
	struct ublk_tag *tags;
	unsigned cmds_out;     /* FETCH/COMMIT commands the kernel holds */
	uint64_t buf_cmd;      /* its address tags (UN)REGISTER_IO_BUF SQEs: their CQEs only on failure */
	/* UBLK_F_BATCH_IO (ublk_batch_*): results wait in stage until the
	 * pass ends, then go in one COMMIT_IO_CMDS from sent (one such
	 * command in flight per queue); the FETCH_IO_CMDS writes tags into
	 * fbufs, handed to the driver through the buffer ring br. */
	unsigned char *stage, *sent;
	unsigned n_stage, n_sent, sent_off; /* elements; sent_off: accepted so far */
	bool commit_busy;
	bool fetch_again;  /* the fetch found no SQE when it ended: flush queues it */
	struct io_uring_buf_ring *br;
	size_t br_len;
	unsigned char *fbufs;
	unsigned nfbufs, fbuf_len;
	uint16_t *tagv;                     /* scratch for one fetch CQE's tags */
	uint64_t prep_cmd, fetch_cmd, commit_cmd; /* their addresses tag the batch SQEs */
	/* counters, read by ublk_status() and printed at exit */
	_Atomic uint64_t served, copies, zero_copies, errors, commit_cmds, partial_commits;
};

struct ublk_dev {
	struct devio_backend *b;
	struct devio_workers *workers; /* the core's pool for backends that wait, or NULL */
	int ctrl_fd;
	int cdev_fd;
	struct io_uring ctrl_ring;
	bool ctrl_ring_ok;
	bool ioctl_encode;
	bool user_copy;
	enum devio_ublk_copy copy;
	bool batch;                    /* UBLK_F_BATCH_IO commands, else per tag */
	const char *batch_why;         /* why not, for the log */
	uint64_t features;
	struct devio_ublk_dev_info info;
	unsigned nr_queues, depth;
	uint32_t max_io, lbs;
	uint64_t dev_sectors;
	uint64_t recovery_flags;       /* UBLK_F_USER_RECOVERY and its variant, or 0 */
	bool added, started;
	atomic_bool handover;          /* handed over: stop leaves the device to a successor */
	atomic_bool stopping;
	_Atomic uint64_t stop_deadline;
	struct ublk_queue *queues;
	char bdev[32], cdev[32];
};

/* ---- descriptor checks (unit-tested) ---- */

int devio_ublk_decode(uint32_t op_flags, uint32_t nr_sectors, uint64_t start_sector,
		      uint64_t dev_sectors, uint32_t max_io_bytes, struct devio_request *req)
{
	unsigned op = op_flags & 0xff;

	req->flags = 0;
	req->offset = 0;
	req->length = 0;
	switch (op) {
	case DEVIO_UBLK_IO_OP_READ:
		req->op = DEVIO_OP_READ;
		break;
	case DEVIO_UBLK_IO_OP_WRITE:
		req->op = DEVIO_OP_WRITE;
		if (op_flags & DEVIO_UBLK_IO_F_FUA)
			req->flags |= DEVIO_REQ_FUA;
		break;
	case DEVIO_UBLK_IO_OP_FLUSH:
		req->op = DEVIO_OP_FLUSH;
		return 0;
	case DEVIO_UBLK_IO_OP_DISCARD:
		req->op = DEVIO_OP_TRIM;
		break;
	case DEVIO_UBLK_IO_OP_WRITE_ZEROES:
		req->op = DEVIO_OP_ZERO;
		if (op_flags & DEVIO_UBLK_IO_F_NOUNMAP)
			req->flags |= DEVIO_REQ_NO_HOLE;
		break;
	default:
		return -EOPNOTSUPP;
	}
	if (nr_sectors == 0 || start_sector > dev_sectors || nr_sectors > dev_sectors - start_sector)
		return -EINVAL;
	if (start_sector > (UINT64_MAX >> 9) - nr_sectors) /* byte offsets must fit 64 bits */
		return -EINVAL;
	if ((req->op == DEVIO_OP_READ || req->op == DEVIO_OP_WRITE) &&
	    (uint64_t)nr_sectors << 9 > max_io_bytes)
		return -EINVAL;
	req->offset = start_sector << 9;
	req->length = (uint64_t)nr_sectors << 9;
	return 0;
}

unsigned devio_ublk_batch_tags(const void *buf, size_t len, unsigned depth, uint16_t *out, unsigned *bad)
{
	const unsigned char *p = buf;
	unsigned n = 0;

	*bad = len & 1;
	for (size_t i = 0; i + 2 <= len; i += 2) {
		uint16_t tag;

		memcpy(&tag, p + i, sizeof(tag));
		if (tag < depth)
			out[n++] = tag;
		else if (tag != DEVIO_UBLK_BATCH_UNUSED_TAG)
			(*bad)++;
	}
	return n;
}

unsigned devio_ublk_commit_outcome(int res, unsigned left, unsigned elem_bytes, int first_result, bool *as_eio)
{
	unsigned took = res > 0 && elem_bytes ? (unsigned)res / elem_bytes : 0;

	*as_eio = false;
	if (took)
		return took < left ? took : left;
	if (res == -ENODEV)
		return left;
	if (res == -EBUSY || first_result == -EIO || !left)
		return left ? 1 : 0;
	*as_eio = true;
	return 0;
}

int devio_ublk_pick_batch(uint64_t features, bool ioctl_encode, int want, bool *out)
{
	bool offered = (features & DEVIO_UBLK_F_BATCH_IO) && ioctl_encode;

	if (want == DEVIO_UBLK_BATCH_ON && !offered)
		return -EOPNOTSUPP;
	*out = want != DEVIO_UBLK_BATCH_OFF && offered;
	return 0;
}

int devio_ublk_parse_dev(const char *s, unsigned *dev_id)
{
	uint64_t v;

	if (!strncmp(s, "/dev/", 5))
		s += 5;
	if (!strncmp(s, "ublkb", 5) || !strncmp(s, "ublkc", 5))
		s += 5;
	if (!*s || devio_parse_u64(s, &v) || v >= NO_DEV_ID)
		return -EINVAL;
	*dev_id = (unsigned)v;
	return 0;
}

/* ---- features and the data path (unit-tested) ---- */

static const char *const ublk_feature_name[] = {
	"zero-copy", "comp-in-task", "need-get-data", "user-recovery", "recovery-reissue",
	"unprivileged", "ioctl-encode", "user-copy", "zoned", "recovery-fail-io", "update-size",
	"auto-buf-reg", "quiesce", "per-io-daemon", "buf-reg-off-daemon", "batch-io", "integrity",
	"safe-stop", "no-auto-part-scan", "shmem-zc",
};

const char *devio_ublk_feature_names(uint64_t features, char *buf, size_t len)
{
	size_t n = 0;

	if (len)
		buf[0] = '\0';
	for (unsigned i = 0; i < 64 && n < len; i++) {
		const size_t known = sizeof(ublk_feature_name) / sizeof(ublk_feature_name[0]);
		int w;

		if (!(features & (1ull << i)))
			continue;
		w = i < known ? snprintf(buf + n, len - n, "%s%s", n ? " " : "", ublk_feature_name[i])
			      : snprintf(buf + n, len - n, "%sbit-%u", n ? " " : "", i);
		if (w < 0)
			break;
		n += (size_t)w;
	}
	return buf;
}

static bool ublk_copy_fixed(enum devio_ublk_copy c)
{
	return c == DEVIO_UBLK_COPY_ZERO || c == DEVIO_UBLK_COPY_AUTO_BUF_REG;
}

/* Is mode c offered by a driver with these features? */
static bool ublk_copy_offered(uint64_t features, enum devio_ublk_copy c)
{
	switch (c) {
	case DEVIO_UBLK_COPY_KERNEL:
		return true;
	case DEVIO_UBLK_COPY_USER:
		return features & DEVIO_UBLK_F_USER_COPY;
	case DEVIO_UBLK_COPY_ZERO:
		return features & DEVIO_UBLK_F_SUPPORT_ZERO_COPY;
	case DEVIO_UBLK_COPY_AUTO_BUF_REG:
		return features & DEVIO_UBLK_F_AUTO_BUF_REG;
	}
	return false;
}

int devio_ublk_pick_copy(uint64_t features, int want, bool fixed_ok, enum devio_ublk_copy *out)
{
	static const enum devio_ublk_copy order[] = {
		DEVIO_UBLK_COPY_AUTO_BUF_REG, DEVIO_UBLK_COPY_ZERO, DEVIO_UBLK_COPY_USER, DEVIO_UBLK_COPY_KERNEL,
	};

	if (want >= 0) {
		if (want > DEVIO_UBLK_COPY_AUTO_BUF_REG || !ublk_copy_offered(features, (enum devio_ublk_copy)want))
			return -EOPNOTSUPP;
		if (ublk_copy_fixed((enum devio_ublk_copy)want) && !fixed_ok)
			return -EINVAL;
		*out = (enum devio_ublk_copy)want;
		return 0;
	}
	for (size_t i = 0; i < sizeof(order) / sizeof(order[0]); i++) {
		bool fixed = ublk_copy_fixed(order[i]);

		if (want == DEVIO_UBLK_WANT_ZERO && !fixed)
			break;
		if (!ublk_copy_offered(features, order[i]) || (fixed && !fixed_ok))
			continue;
		*out = order[i];
		return 0;
	}
	/* only a zero-copy mode was wanted: say which side lacks it */
	return ublk_copy_offered(features, DEVIO_UBLK_COPY_ZERO) ||
	       ublk_copy_offered(features, DEVIO_UBLK_COPY_AUTO_BUF_REG) ? -EINVAL : -EOPNOTSUPP;
}

const char *devio_ublk_copy_name(enum devio_ublk_copy c)
{
	static const char *const names[] = { "kernel copy", "user copy", "zero copy (REGISTER_IO_BUF)",
					     "zero copy (auto buffer registration)" };

	return (unsigned)c < sizeof(names) / sizeof(names[0]) ? names[c] : "?";
}

const char *devio_ublk_copy_mode(enum devio_ublk_copy c)
{
	static const char *const modes[] = { "kernel-copy", "user-copy", "zero-copy", "auto-buf-reg" };

	return (unsigned)c < sizeof(modes) / sizeof(modes[0]) ? modes[c] : "?";
}

/* ---- control commands ---- */

static void ublk_prep_uring_cmd(struct io_uring_sqe *sqe, int fd, uint32_t op, const void *cmd, size_t len)
{
	memset(sqe, 0, 128);
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = fd;
	sqe->cmd_op = op;
	memcpy(sqe->cmd, cmd, len);
}

/* The opcode for control command nr: ioctl-encoded when the driver knows
 * them (and always for commands that only exist that way). */
static uint32_t ublk_ctrl_op(const struct ublk_dev *d, unsigned nr)
{
	bool reads = nr == DEVIO_UBLK_CMD_GET_QUEUE_AFFINITY || nr == DEVIO_UBLK_CMD_GET_DEV_INFO ||
		     nr == DEVIO_UBLK_CMD_GET_PARAMS || nr == DEVIO_UBLK_CMD_GET_FEATURES;

	if (!d->ioctl_encode && nr != DEVIO_UBLK_CMD_GET_FEATURES && nr != DEVIO_UBLK_CMD_QUIESCE_DEV)
		return nr;
	return reads ? DEVIO_UBLK_U_CMDR(nr) : DEVIO_UBLK_U_CMD(nr);
}

/* Run one control command and wait for its result. */
static int ublk_ctrl_cmd(struct ublk_dev *d, unsigned nr, struct devio_ublk_ctrl_cmd *cmd)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&d->ctrl_ring);
	struct io_uring_cqe *cqe;
	int r;

	if (!sqe)
		return -EBUSY;
	ublk_prep_uring_cmd(sqe, d->ctrl_fd, ublk_ctrl_op(d, nr), cmd, sizeof(*cmd));
	r = io_uring_submit(&d->ctrl_ring);
	if (r < 0)
		return r;
	do
		r = io_uring_wait_cqe(&d->ctrl_ring, &cqe);
	while (r == -EINTR);
	if (r < 0)
		return r;
	r = cqe->res;
	io_uring_cqe_seen(&d->ctrl_ring, cqe);
	return r;
}

static int ublk_ctrl_open(struct ublk_dev *d)
{
	int r;

	d->ctrl_fd = open(UBLK_CONTROL, O_RDWR | O_CLOEXEC);
	if (d->ctrl_fd < 0) {
		r = -errno;
		devio_err("ublk: %s: %s (is the ublk_drv module loaded?)", UBLK_CONTROL, strerror(-r));
		return r;
	}
	r = io_uring_queue_init(4, &d->ctrl_ring, IORING_SETUP_SQE128);
	if (r < 0) {
		devio_err("ublk: io_uring with 128-byte SQEs: %s", strerror(-r));
		return r;
	}
	d->ctrl_ring_ok = true;
	return 0;
}

static void ublk_ctrl_close(struct ublk_dev *d)
{
	if (d->ctrl_ring_ok)
		io_uring_queue_exit(&d->ctrl_ring);
	d->ctrl_ring_ok = false;
	if (d->ctrl_fd >= 0)
		close(d->ctrl_fd);
	d->ctrl_fd = -1;
}

/* GET_FEATURES (6.5+); older drivers know only the legacy opcodes. */
static void ublk_get_features(struct ublk_dev *d)
{
	struct devio_ublk_ctrl_cmd cmd = { .dev_id = NO_DEV_ID, .queue_id = 0xffff };
	uint64_t features = 0;

	cmd.addr = (uintptr_t)&features;
	cmd.len = sizeof(features);
	if (ublk_ctrl_cmd(d, DEVIO_UBLK_CMD_GET_FEATURES, &cmd) < 0)
		features = 0;
	d->features = features;
	d->ioctl_encode = features & DEVIO_UBLK_F_CMD_IOCTL_ENCODE;
}

static int ublk_simple_cmd(struct ublk_dev *d, unsigned nr, uint64_t data)
{
	struct devio_ublk_ctrl_cmd cmd = { .dev_id = d->info.dev_id, .queue_id = 0xffff };

	cmd.data[0] = data;
	return ublk_ctrl_cmd(d, nr, &cmd);
}

int devio_ublk_delete(unsigned dev_id)
{
	struct ublk_dev d = { .ctrl_fd = -1 };
	int r;

	r = ublk_ctrl_open(&d);
	if (r)
		goto out;
	ublk_get_features(&d);
	d.info.dev_id = dev_id;
	r = ublk_simple_cmd(&d, DEVIO_UBLK_CMD_STOP_DEV, 0);
	if (r < 0 && r != -ENODEV)
		devio_warn("ublk: device %u: STOP_DEV: %s", dev_id, strerror(-r));
	r = ublk_simple_cmd(&d, DEVIO_UBLK_CMD_DEL_DEV, 0);
	if (r < 0)
		devio_err("ublk: device %u: DEL_DEV: %s", dev_id, strerror(-r));
out:
	ublk_ctrl_close(&d);
	return r < 0 ? r : 0;
}

/* Does anyone hold /dev/ublkbN open?  The kernel tells for a mount, a
 * device-mapper or RAID holder and any exclusive claim (an O_EXCL open
 * fails with EBUSY); plain openers are found among /proc/PID/fd.  1 with
 * who in why, 0 if nobody, or -errno when the device cannot be looked at. */
int devio_ublk_in_use(unsigned dev_id, char *why, size_t len)
{
	char path[64], link[PATH_MAX];
	DIR *dir;
	struct dirent *de;
	int fd, busy = 0;

	snprintf(path, sizeof(path), "/sys/block/ublkb%u/holders", dev_id);
	dir = opendir(path);
	while (dir && (de = readdir(dir)))
		if (de->d_name[0] != '.') {
			snprintf(why, len, "held by %s", de->d_name);
			busy = 1;
		}
	if (dir)
		closedir(dir);
	snprintf(path, sizeof(path), "/dev/ublkb%u", dev_id);
	fd = busy ? -1 : open(path, O_RDONLY | O_EXCL | O_CLOEXEC | O_NONBLOCK);
	if (fd >= 0)
		close(fd);
	else if (!busy && errno == EBUSY) {
		snprintf(why, len, "mounted or claimed exclusively");
		busy = 1;
	} else if (!busy && errno == ENOENT)
		return 0; /* no disk (any more) */
	dir = busy ? NULL : opendir("/proc");
	while (dir && !busy && (de = readdir(dir))) {
		char fdpath[300];
		DIR *fds;
		struct dirent *fe;

		if (de->d_name[0] < '1' || de->d_name[0] > '9')
			continue;
		snprintf(fdpath, sizeof(fdpath), "/proc/%s/fd", de->d_name);
		fds = opendir(fdpath);
		while (fds && !busy && (fe = readdir(fds))) {
			char one[600];
			ssize_t n;

			snprintf(one, sizeof(one), "%s/%s", fdpath, fe->d_name);
			n = readlink(one, link, sizeof(link) - 1);
			if (n > 0 && (link[n] = '\0', !strcmp(link, path))) {
				snprintf(why, len, "open in pid %s", de->d_name);
				busy = 1;
			}
		}
		if (fds)
			closedir(fds);
	}
	if (dir)
		closedir(dir);
	return busy;
}

/* ---- device setup ---- */

static unsigned ublk_ilog2u(uint32_t v)
{
	unsigned s = 0;

	while ((1u << (s + 1)) <= v && s < 31)
		s++;
	return s;
}

/* The ADD_DEV flag of a data path (0 for kernel copy). */
static uint64_t ublk_copy_flag(enum devio_ublk_copy c)
{
	static const uint64_t flag[] = { 0, DEVIO_UBLK_F_USER_COPY, DEVIO_UBLK_F_SUPPORT_ZERO_COPY,
					 DEVIO_UBLK_F_AUTO_BUF_REG };

	return flag[c];
}

static int ublk_add_dev(struct ublk_dev *d, uint32_t want_id)
{
	struct devio_ublk_ctrl_cmd cmd = { .dev_id = want_id, .queue_id = 0xffff };
	int r;

	d->info.nr_hw_queues = (uint16_t)d->nr_queues;
	d->info.queue_depth = (uint16_t)d->depth;
	d->info.max_io_buf_bytes = d->max_io;
	d->info.dev_id = want_id;
	d->info.ublksrv_pid = (int32_t)getpid();
	d->info.flags = ublk_copy_flag(d->copy);
	if (d->ioctl_encode)
		d->info.flags |= DEVIO_UBLK_F_CMD_IOCTL_ENCODE;
	d->info.flags |= d->recovery_flags;
	if (d->batch)
		d->info.flags |= DEVIO_UBLK_F_BATCH_IO;
	cmd.addr = (uintptr_t)&d->info;
	cmd.len = sizeof(d->info);
	r = ublk_ctrl_cmd(d, DEVIO_UBLK_CMD_ADD_DEV, &cmd);
	if (r < 0) {
		devio_err("ublk: ADD_DEV (id %s, %u queues, depth %u, %u-byte buffers): %s",
			  want_id == NO_DEV_ID ? "auto" : "given", d->nr_queues, d->depth, d->max_io,
			  strerror(-r));
		return r;
	}
	d->added = true;
	snprintf(d->bdev, sizeof(d->bdev), "/dev/ublkb%u", d->info.dev_id);
	snprintf(d->cdev, sizeof(d->cdev), "/dev/ublkc%u", d->info.dev_id);
	if (ublk_copy_flag(d->copy) && !(d->info.flags & ublk_copy_flag(d->copy))) { /* the driver answers what it took */
		devio_err("ublk: %s: the driver did not take %s", d->bdev, devio_ublk_copy_name(d->copy));
		return -EOPNOTSUPP;
	}
	if (d->batch && !(d->info.flags & DEVIO_UBLK_F_BATCH_IO)) {
		devio_err("ublk: %s: the driver did not take batched commands (UBLK_F_BATCH_IO)", d->bdev);
		return -EOPNOTSUPP;
	}
	return 0;
}

static int ublk_set_params(struct ublk_dev *d)
{
	struct devio_ublk_ctrl_cmd cmd = { .dev_id = d->info.dev_id, .queue_id = 0xffff };
	struct devio_ublk_params p = { .len = sizeof(p), .types = DEVIO_UBLK_PARAM_TYPE_BASIC };
	uint32_t pbs = d->b->block_size > d->lbs && d->b->block_size <= 4096 &&
		       !(d->b->block_size & (d->b->block_size - 1)) ? d->b->block_size : d->lbs;
	uint32_t caps = d->b->caps;
	int r;

	p.basic.logical_bs_shift = (uint8_t)ublk_ilog2u(d->lbs);
	p.basic.physical_bs_shift = (uint8_t)ublk_ilog2u(pbs);
	p.basic.io_min_shift = p.basic.physical_bs_shift;
	p.basic.io_opt_shift = p.basic.physical_bs_shift;
	p.basic.max_sectors = d->max_io >> 9;
	p.basic.dev_sectors = d->dev_sectors;
	if (caps & DEVIO_CAP_READONLY)
		p.basic.attrs |= DEVIO_UBLK_ATTR_READ_ONLY;
	if (caps & DEVIO_CAP_FLUSH) {
		p.basic.attrs |= DEVIO_UBLK_ATTR_VOLATILE_CACHE;
		if (caps & DEVIO_CAP_FUA)
			p.basic.attrs |= DEVIO_UBLK_ATTR_FUA;
	}
	if ((caps & (DEVIO_CAP_TRIM | DEVIO_CAP_ZERO)) && !(caps & DEVIO_CAP_READONLY)) {
		p.types |= DEVIO_UBLK_PARAM_TYPE_DISCARD;
		p.discard.discard_granularity = pbs > 4096 ? pbs : 4096;
		p.discard.max_discard_segments = 1;
		if (caps & DEVIO_CAP_TRIM)
			p.discard.max_discard_sectors = UINT32_MAX >> 9 & ~7u;
		if (caps & DEVIO_CAP_ZERO)
			p.discard.max_write_zeroes_sectors = UINT32_MAX >> 9 & ~7u;
	}
	cmd.addr = (uintptr_t)&p;
	cmd.len = sizeof(p);
	r = ublk_ctrl_cmd(d, DEVIO_UBLK_CMD_SET_PARAMS, &cmd);
	if (r < 0)
		devio_err("ublk: %s: SET_PARAMS (%llu sectors, block %u/%u): %s", d->bdev,
			  (unsigned long long)d->dev_sectors, d->lbs, pbs, strerror(-r));
	return r < 0 ? r : 0;
}

/* /dev/ublkcN appears through devtmpfs/udev shortly after ADD_DEV. */
static int ublk_open_cdev(struct ublk_dev *d)
{
	for (int i = 0; i < 200; i++) {
		struct timespec ts = { 0, 10 * 1000 * 1000 };

		d->cdev_fd = open(d->cdev, O_RDWR | O_CLOEXEC);
		if (d->cdev_fd >= 0)
			return 0;
		if (errno != ENOENT)
			break;
		nanosleep(&ts, NULL);
	}
	devio_err("ublk: %s: %s", d->cdev, strerror(errno));
	return -errno;
}

/* ---- the queue threads ---- */

static uint64_t ublk_user_copy_off(const struct ublk_queue *q, uint16_t tag)
{
	return DEVIO_UBLKSRV_IO_BUF_OFFSET + ((uint64_t)q->qid << DEVIO_UBLK_QID_OFF) +
	       ((uint64_t)tag << DEVIO_UBLK_TAG_OFF);
}

static uint32_t ublk_io_op(const struct ublk_dev *d, unsigned nr)
{
	return d->ioctl_encode ? DEVIO_UBLK_U_IO(nr) : nr;
}

/* Queue FETCH_REQ (first time) or COMMIT_AND_FETCH_REQ with result. */
static int ublk_queue_io_cmd(struct ublk_queue *q, struct ublk_tag *t, unsigned nr, int result)
{
	struct devio_ublk_io_cmd cmd = { .q_id = (uint16_t)q->qid, .tag = t->tag, .result = result };
	struct io_uring_sqe *sqe = devio_ring_get_sqe(q->ring);

	if (!sqe)
		return -EBUSY;
	if (q->dev->copy == DEVIO_UBLK_COPY_KERNEL)
		cmd.addr = (uintptr_t)t->buf;
	ublk_prep_uring_cmd(sqe, 0, ublk_io_op(q->dev, nr), &cmd, sizeof(cmd));
	if (q->dev->copy == DEVIO_UBLK_COPY_AUTO_BUF_REG) /* the next request's pages: fixed buffer `tag` */
		sqe->addr = DEVIO_UBLK_AUTO_BUF_REG(t->tag, 0);
	sqe->flags |= IOSQE_FIXED_FILE;
	devio_ring_sqe_owner(sqe, t);
	q->cmds_out++;
	if (nr == DEVIO_UBLK_IO_COMMIT_AND_FETCH_REQ)
		atomic_fetch_add_explicit(&q->commit_cmds, 1, memory_order_relaxed);
	return 0;
}

/* Zero copy (UBLK_F_SUPPORT_ZERO_COPY): (un)register the tag's request
 * pages as fixed buffer `tag` of the queue's ring.  SQEs run in order,
 * and these complete when issued: the backend's I/O queued after a
 * REGISTER finds the buffer, a COMMIT queued after an UNREGISTER finds it
 * gone.  Only a failure posts a CQE. */
static int ublk_queue_buf_cmd(struct ublk_queue *q, struct ublk_tag *t, unsigned nr)
{
	struct devio_ublk_io_cmd cmd = { .q_id = (uint16_t)q->qid, .tag = t->tag, .addr = t->tag };
	struct io_uring_sqe *sqe = devio_ring_get_sqe(q->ring);

	if (!sqe)
		return -EBUSY;
	ublk_prep_uring_cmd(sqe, 0, DEVIO_UBLK_U_IO(nr), &cmd, sizeof(cmd));
	sqe->flags |= IOSQE_FIXED_FILE | IOSQE_CQE_SKIP_SUCCESS;
	devio_ring_sqe_owner(sqe, &q->buf_cmd);
	t->registered = nr == DEVIO_UBLK_IO_REGISTER_IO_BUF;
	return 0;
}

/* ---- batched commands (UBLK_F_BATCH_IO) ---- */

static void ublk_start_request(struct ublk_queue *q, struct ublk_tag *t);

/* Kernel copy names each tag's buffer in its elements. */
static unsigned ublk_batch_elem_bytes(const struct ublk_dev *d)
{
	return d->copy == DEVIO_UBLK_COPY_KERNEL ? 16 : 8;
}

/* Tag t's element of PREP/COMMIT (result res) at p. */
static void ublk_batch_elem(const struct ublk_queue *q, const struct ublk_tag *t, int res, unsigned char *p)
{
	struct devio_ublk_elem e = { .tag = t->tag, .result = res };

	if (q->dev->copy == DEVIO_UBLK_COPY_AUTO_BUF_REG)
		e.buf_index = t->tag; /* the next request's pages: fixed buffer `tag` */
	memcpy(p, &e, sizeof(e));
	if (q->dev->copy == DEVIO_UBLK_COPY_KERNEL) {
		uint64_t addr = (uintptr_t)t->buf;

		memcpy(p + sizeof(e), &addr, sizeof(addr));
	}
}

/* Queue PREP_IO_CMDS or COMMIT_IO_CMDS for the n elements at elems (which
 * stay untouched until the CQE). */
static int ublk_batch_cmd(struct ublk_queue *q, unsigned nr, const unsigned char *elems, unsigned n, void *owner)
{
	struct ublk_dev *d = q->dev;
	struct devio_ublk_batch_io cmd = { .q_id = (uint16_t)q->qid, .nr_elem = (uint16_t)n,
					   .elem_bytes = (uint8_t)ublk_batch_elem_bytes(d) };
	struct io_uring_sqe *sqe = devio_ring_get_sqe(q->ring);

	if (!sqe)
		return -EBUSY;
	if (d->copy == DEVIO_UBLK_COPY_KERNEL)
		cmd.flags = DEVIO_UBLK_BATCH_F_HAS_BUF_ADDR;
	ublk_prep_uring_cmd(sqe, 0, DEVIO_UBLK_U_BATCH(nr), &cmd, sizeof(cmd));
	sqe->addr = (uintptr_t)elems;
	sqe->len = n * cmd.elem_bytes;
	sqe->flags |= IOSQE_FIXED_FILE;
	devio_ring_sqe_owner(sqe, owner);
	q->cmds_out++;
	return 0;
}

/* The multishot FETCH_IO_CMDS: tags of ready requests into buffer group 0. */
static int ublk_batch_fetch(struct ublk_queue *q)
{
	struct devio_ublk_batch_io cmd = { .q_id = (uint16_t)q->qid, .nr_elem = (uint16_t)(q->fbuf_len / 2),
					   .elem_bytes = 2 };
	struct io_uring_sqe *sqe = devio_ring_get_sqe(q->ring);

	if (!sqe)
		return -EBUSY;
	ublk_prep_uring_cmd(sqe, 0, DEVIO_UBLK_U_BATCH(DEVIO_UBLK_IO_FETCH_IO_CMDS), &cmd, sizeof(cmd));
	sqe->uring_cmd_flags = DEVIO_IORING_URING_CMD_MULTISHOT;
	sqe->flags |= IOSQE_FIXED_FILE | IOSQE_BUFFER_SELECT;
	sqe->buf_group = 0;
	devio_ring_sqe_owner(sqe, &q->fetch_cmd);
	q->cmds_out++;
	return 0;
}

/* A finished request's result waits for the end of the pass. */
static void ublk_batch_stage(struct ublk_queue *q, struct ublk_tag *t, int res)
{
	if (q->n_stage >= q->dev->depth) { /* each tag at most once: cannot happen */
		devio_err("ublk: %s: queue %u tag %u: no room for its result", q->dev->bdev, q->qid, t->tag);
		return;
	}
	ublk_batch_elem(q, t, res, q->stage + (size_t)q->n_stage * ublk_batch_elem_bytes(q->dev));
	q->n_stage++;
	t->held = false;
}

/* COMMIT_IO_CMDS for what of sent the driver has not taken yet. */
static void ublk_batch_send(struct ublk_queue *q)
{
	unsigned eb = ublk_batch_elem_bytes(q->dev);

	if (ublk_batch_cmd(q, DEVIO_UBLK_IO_COMMIT_IO_CMDS, q->sent + (size_t)q->sent_off * eb,
			   q->n_sent - q->sent_off, &q->commit_cmd)) {
		devio_err("ublk: %s: queue %u: no SQE for the commit of %u results", q->dev->bdev, q->qid,
			  q->n_sent - q->sent_off);
		q->commit_busy = false;
		return;
	}
	q->commit_busy = true;
	atomic_fetch_add_explicit(&q->commit_cmds, 1, memory_order_relaxed);
}

/* owner->flush: the pass's results in one command (stage and sent swap);
 * first a fetch or the rest of a commit that found no SQE earlier.
 * The driver answers COMMIT_IO_CMDS when it is submitted: 1 such CQE
 * (0 when none was queued), so the same io_uring_enter waits on for the
 * next requests. */
static unsigned ublk_batch_flush(struct devio_ring *r, void *ctx)
{
	struct ublk_queue *q = ctx;
	unsigned char *p = q->sent;

	if (!q->dev->batch)
		return 0;
	if (q->fetch_again && (atomic_load(&q->dev->handover) || !ublk_batch_fetch(q)))
		q->fetch_again = false;
	if (q->commit_busy)
		return 0;
	if (q->sent_off < q->n_sent) { /* a commit that found no SQE: its rest first */
		ublk_batch_send(q);
		return q->commit_busy ? 1 : 0;
	}
	if (!q->n_stage)
		return 0;
	q->sent = q->stage;
	q->stage = p;
	q->n_sent = q->n_stage;
	q->n_stage = 0;
	q->sent_off = 0;
	ublk_batch_send(q);
	return q->commit_busy ? 1 : 0;
}

/* COMMIT_IO_CMDS's CQE: bytes of elements taken; the rest goes again.
 * Nothing taken (-errno): the first element the driver refused goes again
 * as -EIO, and is dropped when it was -EIO already or cannot be answered
 * (devio_ublk_commit_outcome; all on -ENODEV, the device going away), so
 * that no result loops forever and none is given up while a resend may
 * still end its request. */
static void ublk_batch_commit_cqe(struct ublk_queue *q, int res)
{
	unsigned eb = ublk_batch_elem_bytes(q->dev), left = q->n_sent - q->sent_off;
	unsigned char *first = q->sent + (size_t)q->sent_off * eb;
	struct devio_ublk_elem e;
	bool as_eio;
	unsigned done;

	q->cmds_out--;
	if (!left) { /* cannot happen: a commit is only sent with results in it */
		q->commit_busy = false;
		return;
	}
	memcpy(&e, first, sizeof(e));
	done = devio_ublk_commit_outcome(res, left, eb, e.result, &as_eio);
	if (res >= (int)eb) {
		if (done < left)
			atomic_fetch_add_explicit(&q->partial_commits, 1, memory_order_relaxed);
	} else if (res != -ENODEV || !atomic_load(&q->dev->stopping)) {
		devio_err("ublk: %s: queue %u: COMMIT_IO_CMDS of %u results: %s; %u %s from tag %u on", q->dev->bdev,
			  q->qid, left, strerror(res < 0 ? -res : EIO), as_eio ? 1 : done,
			  as_eio ? "sent again as -EIO" : "dropped", e.tag);
	}
	if (as_eio) {
		e.result = -EIO;
		memcpy(first, &e, sizeof(e));
	}
	q->sent_off += done;
	if (q->sent_off < q->n_sent)
		ublk_batch_send(q);
	else
		q->commit_busy = false;
}

/* The tags a fetch wrote into buffer bid (len bytes): checked, the buffer
 * handed back to the driver, each request started. */
static void ublk_batch_tags_in(struct ublk_queue *q, unsigned bid, unsigned len)
{
	unsigned char *buf;
	unsigned n, bad;

	if (bid >= q->nfbufs) {
		devio_err("ublk: %s: queue %u: fetch into buffer %u of %u", q->dev->bdev, q->qid, bid, q->nfbufs);
		return;
	}
	buf = q->fbufs + (size_t)bid * q->fbuf_len;
	n = devio_ublk_batch_tags(buf, len < q->fbuf_len ? len : q->fbuf_len, q->dev->depth, q->tagv, &bad);
	io_uring_buf_ring_add(q->br, buf, q->fbuf_len, (unsigned short)bid, io_uring_buf_ring_mask(q->nfbufs), 0);
	io_uring_buf_ring_advance(q->br, 1);
	if (bad || len > q->fbuf_len)
		devio_warn("ublk: %s: queue %u: fetch of %u bytes with %u tags out of range", q->dev->bdev, q->qid, len, bad);
	for (unsigned i = 0; i < n; i++) {
		struct ublk_tag *t = &q->tags[q->tagv[i]];

		if (t->held) {
			devio_warn("ublk: %s: queue %u: tag %u fetched while being served; ignored", q->dev->bdev, q->qid,
				   t->tag);
			continue;
		}
		t->held = true;
		ublk_start_request(q, t);
	}
}

/* A FETCH_IO_CMDS CQE: tags, and while it says more, nothing else.  Once
 * it ended it is queued again, unless the driver aborted it (stopped,
 * quiesced: UBLK_IO_RES_ABORT), it failed, or the server is handing the
 * device over.  Stopping is no reason: STOP_DEV waits for the disk's last
 * requests (its dirty pages among them), which only a fetch brings in; a
 * fetch queued once the driver has stopped ends with its abort, or when
 * the ring closes (ublk_teardown). */
static void ublk_batch_fetch_cqe(struct ublk_queue *q, int res)
{
	unsigned flags = devio_ring_cqe_flags(q->ring);

	if (res >= 0 && (flags & IORING_CQE_F_BUFFER))
		ublk_batch_tags_in(q, flags >> IORING_CQE_BUFFER_SHIFT, (unsigned)res);
	if (flags & IORING_CQE_F_MORE)
		return;
	q->cmds_out--;
	if ((res >= 0 || res == -ENOBUFS) && !atomic_load(&q->dev->handover)) {
		if (ublk_batch_fetch(q)) { /* no SQE now: the pass's flush tries again */
			devio_warn("ublk: %s: queue %u: no SQE to fetch again; retried", q->dev->bdev, q->qid);
			q->fetch_again = true;
		}
		return;
	}
	if (res < 0 && res != -ENODEV && res != -ECANCELED)
		devio_err("ublk: %s: queue %u: FETCH_IO_CMDS: %s", q->dev->bdev, q->qid, strerror(-res));
}

/* PREP_IO_CMDS for every tag, waited for here (the only CQE that can come
 * now: the inbox read waits for other threads, none of which has a
 * request yet), so that a refusal stops the start with its reason. */
static int ublk_batch_prep(struct ublk_queue *q)
{
	struct io_uring *u = devio_ring_uring(q->ring);
	struct io_uring_cqe *cqe;
	int r;

	for (unsigned i = 0; i < q->dev->depth; i++)
		ublk_batch_elem(q, &q->tags[i], 0, q->sent + (size_t)i * ublk_batch_elem_bytes(q->dev));
	r = ublk_batch_cmd(q, DEVIO_UBLK_IO_PREP_IO_CMDS, q->sent, q->dev->depth, &q->prep_cmd);
	if (!r)
		r = io_uring_submit_and_wait(u, 1);
	if (r >= 0)
		r = io_uring_peek_cqe(u, &cqe);
	if (!r && io_uring_cqe_get_data(cqe) != &q->prep_cmd)
		r = -EPROTO;
	if (!r) {
		r = cqe->res;
		io_uring_cqe_seen(u, cqe);
		q->cmds_out--;
	}
	if (r < 0)
		devio_err("ublk: %s: queue %u: PREP_IO_CMDS for %u tags: %s", q->dev->bdev, q->qid, q->dev->depth,
			  strerror(-r));
	return r < 0 ? r : 0;
}

/* On the queue thread: the fetch buffers as buffer group 0 of the ring,
 * every tag prepared, the multishot fetch queued. */
static int ublk_batch_setup(struct ublk_queue *q)
{
	struct io_uring_buf_reg reg = { .ring_addr = (uintptr_t)q->br, .ring_entries = q->nfbufs, .bgid = 0 };
	int r = io_uring_register_buf_ring(devio_ring_uring(q->ring), &reg, 0);

	if (r < 0) {
		devio_err("ublk: %s: queue %u: a ring of %u fetch buffers: %s", q->dev->bdev, q->qid, q->nfbufs,
			  strerror(-r));
		return r;
	}
	io_uring_buf_ring_init(q->br);
	for (unsigned i = 0; i < q->nfbufs; i++)
		io_uring_buf_ring_add(q->br, q->fbufs + (size_t)i * q->fbuf_len, q->fbuf_len, (unsigned short)i,
				      io_uring_buf_ring_mask(q->nfbufs), (int)i);
	io_uring_buf_ring_advance(q->br, (int)q->nfbufs);
	r = ublk_batch_prep(q);
	return r ? r : ublk_batch_fetch(q);
}

/* The batch buffers: two element arrays of depth, one fetch buffer (up to
 * 128 tags, what the driver writes per CQE) per tag, since each CQE uses
 * one and each carries a tag not yet answered. */
static int ublk_batch_alloc(struct ublk_queue *q)
{
	unsigned depth = q->dev->depth, eb = ublk_batch_elem_bytes(q->dev);
	size_t page = (size_t)sysconf(_SC_PAGESIZE);

	q->nfbufs = 1;
	while (q->nfbufs < depth)
		q->nfbufs <<= 1;
	q->fbuf_len = (depth < 128 ? depth : 128) * 2;
	q->fbuf_len = (q->fbuf_len + 7) & ~7u;
	q->stage = calloc(depth, eb);
	q->sent = calloc(depth, eb);
	q->tagv = calloc(q->fbuf_len / 2, sizeof(*q->tagv));
	q->fbufs = calloc(q->nfbufs, q->fbuf_len);
	q->br_len = (q->nfbufs * sizeof(struct io_uring_buf) + page - 1) / page * page;
	q->br = mmap(NULL, q->br_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (q->br == MAP_FAILED)
		q->br = NULL;
	return q->stage && q->sent && q->tagv && q->fbufs && q->br ? 0 : -ENOMEM;
}

static void ublk_batch_free(struct ublk_queue *q)
{
	if (q->br)
		munmap(q->br, q->br_len);
	free(q->stage);
	free(q->sent);
	free(q->tagv);
	free(q->fbufs);
}

/* Commit one finished request and fetch the tag's next one. */
static void ublk_commit_tag(struct ublk_queue *q, struct ublk_tag *t)
{
	struct devio_request *req = &t->req;
	int res = req->result;

	if (res == 0 && (req->op == DEVIO_OP_READ || req->op == DEVIO_OP_WRITE))
		res = (int)req->length;
	if (res > 0 && req->op == DEVIO_OP_READ && q->dev->user_copy) {
		ssize_t n = pwrite(q->dev->cdev_fd, t->buf, req->length, (off_t)ublk_user_copy_off(q, t->tag));

		atomic_fetch_add_explicit(&q->copies, 1, memory_order_relaxed);
		if (n != (ssize_t)req->length) {
			devio_err("ublk: %s: queue %u tag %u: copying read at %llu to the kernel: %s",
				  q->dev->bdev, q->qid, t->tag, (unsigned long long)req->offset,
				  n < 0 ? strerror(errno) : "short copy");
			res = -EIO;
		}
	}
	if (res < 0) {
		/* the first few failures per queue are worth a warning, not a flood */
		enum devio_log_level lvl = atomic_fetch_add_explicit(&q->errors, 1, memory_order_relaxed) < 10
					   ? DEVIO_LOG_WARN : DEVIO_LOG_DEBUG;

		devio_log(lvl, "ublk: %s: %s at %llu length %llu failed: %s", q->dev->bdev,
			  devio_op_name(req->op), (unsigned long long)req->offset,
			  (unsigned long long)req->length, strerror(-res));
	}
	atomic_fetch_add_explicit(&q->served, 1, memory_order_relaxed);
	if (t->registered && ublk_queue_buf_cmd(q, t, DEVIO_UBLK_IO_UNREGISTER_IO_BUF))
		devio_err("ublk: %s: queue %u tag %u: no SQE to unregister the buffer", q->dev->bdev, q->qid, t->tag);
	if (q->dev->batch)
		ublk_batch_stage(q, t, res); /* sent at the end of the pass (ublk_batch_flush) */
	else if (ublk_queue_io_cmd(q, t, DEVIO_UBLK_IO_COMMIT_AND_FETCH_REQ, res))
		devio_err("ublk: %s: queue %u tag %u: no SQE for the commit", q->dev->bdev, q->qid, t->tag);
}

/* A request the backend finished (owner->done). */
static void ublk_queue_done(struct devio_ring *r, void *ctx, struct devio_request *req)
{
	ublk_commit_tag(ctx, req->opaque);
}

/* A fetched request: check the descriptor and start it. */
static void ublk_start_request(struct ublk_queue *q, struct ublk_tag *t)
{
	struct ublk_dev *d = q->dev;
	struct devio_ublk_io_desc desc;
	struct devio_request *req = &t->req;
	int r;

	memcpy(&desc, (const void *)&q->descs[t->tag], sizeof(desc)); /* read once */
	req->result = 0;
	req->buf = t->buf;
	req->kind = DEVIO_BUF_MEM;
	r = devio_ublk_decode(desc.op_flags, desc.nr_sectors, desc.start_sector, d->dev_sectors,
			      d->max_io, req);
	if (r) {
		devio_warn("ublk: %s: queue %u tag %u: refusing op %u at sector %llu, %u sectors: %s",
			   d->bdev, q->qid, t->tag, desc.op_flags & 0xff,
			   (unsigned long long)desc.start_sector, desc.nr_sectors, strerror(-r));
		goto fail;
	}
	if ((req->op == DEVIO_OP_READ || req->op == DEVIO_OP_WRITE) && ublk_copy_fixed(d->copy)) {
		/* zero copy: the backend's I/O on this ring moves the pages */
		req->kind = DEVIO_BUF_FIXED;
		req->buf_index = t->tag;
		if (d->copy == DEVIO_UBLK_COPY_ZERO && ublk_queue_buf_cmd(q, t, DEVIO_UBLK_IO_REGISTER_IO_BUF)) {
			r = -EBUSY;
			goto fail;
		}
		atomic_fetch_add_explicit(&q->zero_copies, 1, memory_order_relaxed);
	}
	if (req->op == DEVIO_OP_WRITE && d->user_copy) {
		ssize_t n = pread(d->cdev_fd, t->buf, req->length, (off_t)ublk_user_copy_off(q, t->tag));

		atomic_fetch_add_explicit(&q->copies, 1, memory_order_relaxed);
		if (n != (ssize_t)req->length) {
			devio_err("ublk: %s: write at %llu: copying from the kernel: %s", d->bdev,
				  (unsigned long long)req->offset, n < 0 ? strerror(errno) : "short copy");
			r = -EIO;
			goto fail;
		}
	}
	devio_ring_submit(q->ring, d->b, req);
	return;
fail:
	req->result = r;
	ublk_commit_tag(q, t);
}

/* The CQE of a tag's FETCH or COMMIT_AND_FETCH (owner->cqe). */
static void ublk_queue_cqe(struct devio_ring *r, void *ctx, void *data, int res)
{
	struct ublk_queue *q = ctx;
	struct ublk_tag *t = data;

	if (data == &q->buf_cmd) { /* a failed (UN)REGISTER_IO_BUF: the I/O after it fails too */
		devio_err("ublk: %s: queue %u: registering a request's buffer: %s", q->dev->bdev, q->qid,
			  strerror(-res));
		return;
	}
	if (data == &q->fetch_cmd) {
		ublk_batch_fetch_cqe(q, res);
		return;
	}
	if (data == &q->commit_cmd) {
		ublk_batch_commit_cqe(q, res);
		return;
	}
	q->cmds_out--;
	if (res == DEVIO_UBLK_IO_RES_OK) {
		ublk_start_request(q, t);
		return;
	}
	t->dead = true;
	if (res != -ENODEV)
		devio_err("ublk: %s: queue %u tag %u: fetch/commit failed: %s", q->dev->bdev, q->qid,
			  t->tag, strerror(-res));
}

/* Done when the driver holds no command of ours, or, stopping, once the
 * grace after STOP_DEV is over (closing the ring cancels the rest); the
 * ring module waits for the requests still with the backend. */
static bool ublk_queue_finished(struct devio_ring *r, void *ctx)
{
	struct ublk_queue *q = ctx;

	if (!q->cmds_out && !q->n_stage && q->sent_off >= q->n_sent && !q->fetch_again)
		return true;
	if (atomic_load(&q->dev->handover) && (io_uring_sq_ready(devio_ring_uring(r)) || q->n_stage))
		return false; /* handing over: answers still queued go to the kernel before the ring closes */
	return atomic_load(&q->dev->stopping) && devio_now_ns() >= atomic_load(&q->dev->stop_deadline);
}

static size_t ublk_round_up_sz(size_t v, size_t align)
{
	return (v + align - 1) / align * align;
}

/* On the queue thread: the descriptors, /dev/ublkcN as fixed file 0, a
 * FETCH_REQ for every tag (batch: PREP_IO_CMDS and one FETCH_IO_CMDS). */
static int ublk_queue_setup(struct devio_ring *ring, void *ctx)
{
	struct ublk_queue *q = ctx;
	struct ublk_dev *d = q->dev;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	/* each queue's array starts at qid * the size of the largest one */
	size_t max_len = ublk_round_up_sz(DEVIO_UBLK_MAX_QUEUE_DEPTH * sizeof(struct devio_ublk_io_desc), page);
	void *p;
	int r;

	q->ring = ring;
	q->descs_len = ublk_round_up_sz(d->depth * sizeof(struct devio_ublk_io_desc), page);
	p = mmap(NULL, q->descs_len, PROT_READ, MAP_SHARED | MAP_POPULATE, d->cdev_fd,
		 (off_t)(DEVIO_UBLKSRV_CMD_BUF_OFFSET + q->qid * max_len));
	if (p == MAP_FAILED) {
		r = -errno;
		devio_err("ublk: %s: queue %u: mmap of the descriptors: %s", d->cdev, q->qid, strerror(-r));
		return r;
	}
	q->descs = p;
	r = io_uring_register_files(devio_ring_uring(ring), &d->cdev_fd, 1);
	if (r < 0) {
		devio_err("ublk: queue %u: registering %s: %s", q->qid, d->cdev, strerror(-r));
		return r;
	}
	/* zero copy: an empty fixed-buffer table, one slot per tag */
	r = ublk_copy_fixed(d->copy) ? io_uring_register_buffers_sparse(devio_ring_uring(ring), d->depth) : 0;
	if (r < 0) {
		devio_err("ublk: queue %u: a table of %u fixed buffers: %s", q->qid, d->depth, strerror(-r));
		return r;
	}
	if (d->batch)
		r = ublk_batch_setup(q);
	for (unsigned i = 0; !d->batch && i < d->depth && !r; i++)
		r = ublk_queue_io_cmd(q, &q->tags[i], DEVIO_UBLK_IO_FETCH_REQ, 0);
	if (r)
		return r;
	r = io_uring_submit(devio_ring_uring(ring));
	return r < 0 ? r : 0;
}

static const struct devio_ring_owner queue_owner = {
	.setup = ublk_queue_setup,
	.cqe = ublk_queue_cqe,
	.done = ublk_queue_done,
	.finished = ublk_queue_finished,
	.flush = ublk_batch_flush,
};

static int ublk_queue_alloc(struct ublk_queue *q)
{
	struct ublk_dev *d = q->dev;

	q->tags = calloc(d->depth, sizeof(*q->tags));
	if (!q->tags)
		return -ENOMEM;
	for (unsigned i = 0; i < d->depth; i++) {
		struct ublk_tag *t = &q->tags[i];

		/* zero copy moves the request's own pages: no buffer of ours */
		if (!ublk_copy_fixed(d->copy) && posix_memalign(&t->buf, 4096, d->max_io))
			return -ENOMEM;
		t->q = q;
		t->tag = (uint16_t)i;
		t->req.opaque = t;
	}
	return d->batch ? ublk_batch_alloc(q) : 0;
}

/* After the ring is gone (its thread joined, its commands cancelled). */
static void ublk_queue_free(struct ublk_queue *q)
{
	if (q->descs)
		munmap((void *)q->descs, q->descs_len);
	if (q->tags)
		for (unsigned i = 0; i < q->dev->depth; i++)
			free(q->tags[i].buf);
	free(q->tags);
	ublk_batch_free(q);
}

/* The CPUs whose requests the driver sends to queue q, for its thread;
 * false if the driver does not say. */
static bool ublk_queue_affinity(struct ublk_dev *d, struct ublk_queue *q, cpu_set_t *set)
{
	struct devio_ublk_ctrl_cmd cmd = { .dev_id = d->info.dev_id, .queue_id = (uint16_t)q->qid };
	int r;

	CPU_ZERO(set);
	cmd.addr = (uintptr_t)set;
	cmd.len = sizeof(*set);
	r = ublk_ctrl_cmd(d, DEVIO_UBLK_CMD_GET_QUEUE_AFFINITY, &cmd);
	if (r < 0 || CPU_COUNT(set) == 0) {
		devio_debug("ublk: %s: queue %u: no affinity: %s", d->bdev, q->qid, strerror(r < 0 ? -r : 0));
		return false;
	}
	return true;
}

static int ublk_start_queue(struct ublk_dev *d, struct ublk_queue *q)
{
	char name[64];
	cpu_set_t cpus;
	struct devio_ring_params p = {
		.name = name,
		/* commands, the backend's I/O, zero copy's (UN)REGISTER, the inbox */
		.entries = d->depth * (d->copy == DEVIO_UBLK_COPY_ZERO ? 4 : 2) + 2,
		.flags = IORING_SETUP_SQE128,
		/* only this thread submits, and it always waits in io_uring_enter:
		 * the driver's and the file I/O's completions run there, no
		 * task-work interrupt each */
		.try_flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
		.workers = d->workers,
		.owner = &queue_owner,
		.ctx = q,
	};
	int r = ublk_queue_alloc(q);

	if (r)
		return r;
	snprintf(name, sizeof(name), "ublk: %s: queue %u", d->bdev, q->qid);
	if (ublk_queue_affinity(d, q, &cpus))
		p.cpus = &cpus;
	return devio_ring_start(&p, &q->ring);
}

static int ublk_start_queues(struct ublk_dev *d)
{
	d->queues = calloc(d->nr_queues, sizeof(*d->queues));
	if (!d->queues)
		return -ENOMEM;
	for (unsigned i = 0; i < d->nr_queues; i++) {
		d->queues[i].dev = d;
		d->queues[i].qid = i;
	}
	for (unsigned i = 0; i < d->nr_queues; i++) {
		int r = ublk_start_queue(d, &d->queues[i]);

		if (r)
			return r;
	}
	return 0;
}

/* ---- the front end ---- */

static int ublk_parse_arg(struct ublk_dev *d, const char *arg, uint32_t *want_id, int *copy, bool *legacy)
{
	char buf[64], *tok, *save;

	*want_id = NO_DEV_ID;
	*copy = DEVIO_UBLK_WANT_BEST;
	*legacy = false;
	if (!arg || !*arg)
		return 0;
	if (strlen(arg) >= sizeof(buf))
		return -EINVAL;
	strcpy(buf, arg);
	for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		uint64_t v;

		if (!strcmp(tok, "user-copy"))
			*copy = DEVIO_UBLK_COPY_USER;
		else if (!strcmp(tok, "kernel-copy"))
			*copy = DEVIO_UBLK_COPY_KERNEL;
		else if (!strcmp(tok, "zero-copy"))
			*copy = DEVIO_UBLK_WANT_ZERO;
		else if (!strcmp(tok, "auto-buf-reg"))
			*copy = DEVIO_UBLK_COPY_AUTO_BUF_REG;
		else if (!strcmp(tok, "register-buf"))
			*copy = DEVIO_UBLK_COPY_ZERO;
		else if (!strcmp(tok, "legacy-opcodes"))
			*legacy = true;
		else if (!devio_parse_u64(tok, &v) && v < NO_DEV_ID)
			*want_id = (uint32_t)v;
		else
			return -EINVAL;
	}
	return 0;
}

/* The --ublk front end's options (ublk_options below). */
struct ublk_opts {
	unsigned queues;     /* --queues: 0 = one per CPU */
	unsigned depth;      /* --depth: tags per queue, 0 = DEFAULT_DEPTH */
	uint32_t block_size; /* --block-size: logical block size, 0 = 512 */
	int recovery;        /* --recovery[=reissue|fail-io]: enum ublk_recovery */
	bool recover;        /* --recover: take over device ID from a server that died */
	int copy;            /* --ublk-copy: 0 = not given, else UBLK_OPT_COPY(want) */
	uint32_t max_io;     /* --max-io: largest request in bytes, 0 = by data path */
	int batch;           /* --ublk-batch: 0 = not given, else 1 + DEVIO_UBLK_BATCH_* */
};

static int ublk_opt_batch(const char *name, const char *val, void *field)
{
	static const char *const words[] = { "auto", "on", "off" };
	int *batch = field;

	for (int i = 0; val && i < 3; i++)
		if (!strcmp(val, words[i])) {
			*batch = 1 + i; /* DEVIO_UBLK_BATCH_AUTO, _ON, _OFF */
			return 0;
		}
	devio_err("--%s: want auto, on or off, got '%s'", name, val ? val : "");
	return -EINVAL;
}

/* --ublk-copy's value in ublk_opts.copy: want (DEVIO_UBLK_WANT_*, or a
 * mode) shifted so that 0 means not given. */
#define UBLK_OPT_COPY(want) ((want) + 3)

static int ublk_opt_copy(const char *name, const char *val, void *field)
{
	static const struct { const char *name; int want; } words[] = {
		{ "auto", DEVIO_UBLK_WANT_BEST }, { "zero", DEVIO_UBLK_WANT_ZERO },
		{ "user", DEVIO_UBLK_COPY_USER }, { "kernel", DEVIO_UBLK_COPY_KERNEL },
		{ "auto-buf-reg", DEVIO_UBLK_COPY_AUTO_BUF_REG }, { "register-buf", DEVIO_UBLK_COPY_ZERO },
	};
	int *copy = field;

	for (size_t i = 0; val && i < sizeof(words) / sizeof(words[0]); i++)
		if (!strcmp(val, words[i].name)) {
			*copy = UBLK_OPT_COPY(words[i].want);
			return 0;
		}
	devio_err("--%s: want auto, zero, user, kernel, auto-buf-reg or register-buf, got '%s'", name,
		  val ? val : "");
	return -EINVAL;
}

/* --max-io BYTES: a multiple of 4096, at most what the user-copy offsets
 * leave a tag (32 MiB). */
static int ublk_opt_max_io(const char *name, const char *val, void *field)
{
	uint64_t v;

	if (!val || devio_parse_size(val, &v) || v < 4096 || v % 4096 || v > (1u << DEVIO_UBLK_IO_BUF_BITS)) {
		devio_err("--%s: want a multiple of 4096 from 4096 to %u, got '%s'", name,
			  1u << DEVIO_UBLK_IO_BUF_BITS, val ? val : "");
		return -EINVAL;
	}
	*(uint32_t *)field = (uint32_t)v;
	return 0;
}

/* What the driver does with I/O while no server serves a device. */
enum ublk_recovery {
	UBLK_RECOVERY_OFF,     /* the device goes away with its server */
	UBLK_RECOVERY_REISSUE, /* queued, in-flight I/O reissued to the next server */
	UBLK_RECOVERY_FAIL_IO, /* the device stays, I/O fails until a server is back */
};

static int ublk_opt_recovery(const char *name, const char *val, void *field)
{
	int *mode = field;

	if (!val || !strcmp(val, "reissue"))
		*mode = UBLK_RECOVERY_REISSUE;
	else if (!strcmp(val, "fail-io"))
		*mode = UBLK_RECOVERY_FAIL_IO;
	else {
		devio_err("--%s: want reissue or fail-io, got '%s'", name, val);
		return -EINVAL;
	}
	return 0;
}

/* The ADD_DEV flags for --recovery, if this driver has them. */
static int ublk_recovery_flags(struct ublk_dev *d, int mode)
{
	uint64_t f = d->features;

	d->recovery_flags = 0;
	if (mode == UBLK_RECOVERY_OFF)
		return 0;
	/* no GET_FEATURES (pre-6.5): recovery with reissue exists since 6.0, ADD_DEV tells */
	if (f && !(f & DEVIO_UBLK_F_USER_RECOVERY)) {
		devio_err("ublk: --recovery: this kernel has no UBLK_F_USER_RECOVERY");
		return -EOPNOTSUPP;
	}
	if (mode == UBLK_RECOVERY_FAIL_IO && !(f & DEVIO_UBLK_F_USER_RECOVERY_FAIL_IO)) {
		devio_err("ublk: --recovery=fail-io: this kernel has no UBLK_F_USER_RECOVERY_FAIL_IO (6.13+)");
		return -EOPNOTSUPP;
	}
	d->recovery_flags = DEVIO_UBLK_F_USER_RECOVERY | (mode == UBLK_RECOVERY_FAIL_IO
							  ? DEVIO_UBLK_F_USER_RECOVERY_FAIL_IO
							  : DEVIO_UBLK_F_USER_RECOVERY_REISSUE);
	/* a graceful hand-over (ublk_handover) where the driver can quiesce;
	 * not with batched commands: the driver's QUIESCE_DEV cancels their
	 * fetches with force_abort set, and fails (EIO) the requests that
	 * come while the next server starts instead of requeueing them */
	if (mode == UBLK_RECOVERY_REISSUE && (f & DEVIO_UBLK_F_QUIESCE) && !d->batch)
		d->recovery_flags |= DEVIO_UBLK_F_QUIESCE;
	return 0;
}

static const char *ublk_recovery_name(uint64_t flags)
{
	if (!(flags & DEVIO_UBLK_F_USER_RECOVERY))
		return "off";
	if (flags & DEVIO_UBLK_F_USER_RECOVERY_FAIL_IO)
		return "fail-io";
	return flags & DEVIO_UBLK_F_USER_RECOVERY_REISSUE ? "reissue" : "fail-inflight";
}

static int ublk_setup_geometry(struct ublk_dev *d, const struct ublk_opts *o)
{
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);

	d->lbs = o->block_size ? o->block_size : 512;
	if (d->lbs > 4096) {
		devio_err("ublk: --block-size %u: the kernel allows at most 4096", d->lbs);
		return -EINVAL;
	}
	d->nr_queues = o->queues ? o->queues : (ncpu > 0 ? (unsigned)ncpu : 1);
	if (d->nr_queues > 64)
		d->nr_queues = 64;
	d->depth = o->depth ? o->depth : DEFAULT_DEPTH;
	if (d->depth > DEVIO_UBLK_MAX_QUEUE_DEPTH) {
		devio_err("ublk: --depth %u: at most %d", d->depth, DEVIO_UBLK_MAX_QUEUE_DEPTH);
		return -EINVAL;
	}
	d->max_io = o->max_io; /* 0: by data path, ublk_set_max_io() */
	d->dev_sectors = d->b->size / d->lbs * d->lbs >> 9;
	if (!d->dev_sectors) {
		devio_err("ublk: export of %llu bytes is smaller than one %u-byte block",
			  (unsigned long long)d->b->size, d->lbs);
		return -EINVAL;
	}
	return 0;
}

/* The largest request, once the data path is known: --max-io, else 1 MiB
 * with zero copy (no buffer of ours; dd's and the page cache's 1 MiB
 * requests then reach the backend whole, as on the loop device) and 512
 * KiB with a buffer per tag; never more than the backend takes. */
static int ublk_set_max_io(struct ublk_dev *d)
{
	if (!d->max_io)
		d->max_io = ublk_copy_fixed(d->copy) ? DEFAULT_MAX_IO_FIXED : DEFAULT_MAX_IO;
	if (d->b->max_io && d->b->max_io < d->max_io)
		d->max_io = d->b->max_io & ~4095u;
	if (d->max_io < 4096 || d->max_io < d->lbs) {
		devio_err("ublk: backend transfers of %u bytes are too small", d->b->max_io);
		return -EINVAL;
	}
	return 0;
}

static void ublk_teardown(struct ublk_dev *d);

/* Once per server: what the driver offers and the data path taken, with
 * why a better one in the order auto-buf-reg, zero copy, user copy, kernel
 * copy was passed over. */
static void ublk_log_features(const struct ublk_dev *d)
{
	char names[512];
	const char *why = "";
	bool zc = d->features & (DEVIO_UBLK_F_AUTO_BUF_REG | DEVIO_UBLK_F_SUPPORT_ZERO_COPY);

	if (!ublk_copy_fixed(d->copy) && zc)
		why = devio_backend_takes_fixed(d->b) ? "; zero copy offered, not chosen"
						      : "; zero copy offered, but the backend takes no registered buffers (only a plain file does)";
	else if (!zc && d->copy != DEVIO_UBLK_COPY_KERNEL)
		why = "; no zero copy in this driver (6.15+)";
	devio_info("ublk: driver features 0x%llx (%s); data path: %s%s (order: auto-buf-reg, zero-copy, user-copy, kernel-copy)",
		   (unsigned long long)d->features,
		   d->features ? devio_ublk_feature_names(d->features, names, sizeof(names))
			       : "no GET_FEATURES: a pre-6.5 driver",
		   devio_ublk_copy_name(d->copy), why);
}

static const char *ublk_batch_word(const struct ublk_dev *d)
{
	return d->batch ? "batch" : "per-tag";
}

/* Once per server: batched or per-tag commands, and why not batched. */
static void ublk_log_batch(const struct ublk_dev *d)
{
	if (d->batch)
		devio_info("ublk: commands: batch (UBLK_F_BATCH_IO: PREP_IO_CMDS, multishot FETCH_IO_CMDS, COMMIT_IO_CMDS)");
	else
		devio_info("ublk: commands: per tag (FETCH_REQ, COMMIT_AND_FETCH_REQ); batch %s", d->batch_why);
}

/* Batched commands where wanted (want: DEVIO_UBLK_BATCH_*) and offered. */
static int ublk_pick_batch(struct ublk_dev *d, int want)
{
	if (devio_ublk_pick_batch(d->features, d->ioctl_encode, want, &d->batch)) {
		devio_err("ublk: --ublk-batch on: %s", d->features & DEVIO_UBLK_F_BATCH_IO
			  ? "batched commands need ioctl-encoded opcodes" : "this kernel's ublk driver has no UBLK_F_BATCH_IO (7.x)");
		return -EOPNOTSUPP;
	}
	d->batch_why = d->batch ? "" : want == DEVIO_UBLK_BATCH_OFF ? "off (--ublk-batch off)"
		       : !(d->features & DEVIO_UBLK_F_BATCH_IO) ? "not offered by this driver (UBLK_F_BATCH_IO, 7.x)"
		       : "not with legacy opcodes";
	ublk_log_batch(d);
	return 0;
}

/* A new device: ADD_DEV, SET_PARAMS, the queues, START_DEV. */
static int ublk_create(struct ublk_dev *d, uint32_t want_id, int copy, int recovery, int batch)
{
	int r = devio_ublk_pick_copy(d->features, copy, devio_backend_takes_fixed(d->b), &d->copy);

	if (r) {
		const char *what = copy == DEVIO_UBLK_WANT_ZERO ? "zero copy"
				   : devio_ublk_copy_name((enum devio_ublk_copy)copy);

		if (r == -EINVAL)
			devio_err("ublk: %s: the backend takes no registered buffers (only a plain file, not O_DIRECT, does)", what);
		else
			devio_err("ublk: this kernel's ublk driver has no %s (features 0x%llx)", what,
				  (unsigned long long)d->features);
		return r;
	}
	d->user_copy = d->copy == DEVIO_UBLK_COPY_USER;
	r = ublk_set_max_io(d);
	if (!r)
		r = ublk_pick_batch(d, batch);
	if (!r)
		r = ublk_recovery_flags(d, recovery);
	if (r)
		return r;
	ublk_log_features(d);
	r = ublk_add_dev(d, want_id);
	if (!r)
		r = ublk_set_params(d);
	if (!r)
		r = ublk_open_cdev(d);
	if (!r)
		r = ublk_start_queues(d);
	if (r)
		return r;
	r = ublk_simple_cmd(d, DEVIO_UBLK_CMD_START_DEV, (uint64_t)getpid());
	if (r < 0)
		devio_err("ublk: %s: START_DEV: %s", d->bdev, strerror(-r));
	return r < 0 ? r : 0;
}

/* The device as the driver keeps it (GET_DEV_INFO, GET_PARAMS): the
 * geometry a server taking it over must serve. */
static int ublk_adopt(struct ublk_dev *d, uint32_t id)
{
	struct devio_ublk_ctrl_cmd cmd = { .dev_id = id, .queue_id = 0xffff };
	struct devio_ublk_params p = { .len = sizeof(p) };
	int r;

	cmd.addr = (uintptr_t)&d->info;
	cmd.len = sizeof(d->info);
	r = ublk_ctrl_cmd(d, DEVIO_UBLK_CMD_GET_DEV_INFO, &cmd);
	if (r >= 0) {
		cmd.addr = (uintptr_t)&p;
		cmd.len = sizeof(p);
		r = ublk_ctrl_cmd(d, DEVIO_UBLK_CMD_GET_PARAMS, &cmd);
	}
	if (r < 0) {
		devio_err("ublk: device %u: %s", id, strerror(-r));
		return r;
	}
	snprintf(d->bdev, sizeof(d->bdev), "/dev/ublkb%u", id);
	snprintf(d->cdev, sizeof(d->cdev), "/dev/ublkc%u", id);
	d->nr_queues = d->info.nr_hw_queues;
	d->depth = d->info.queue_depth;
	d->max_io = d->info.max_io_buf_bytes;
	d->dev_sectors = p.basic.dev_sectors;
	d->lbs = 1u << (p.basic.logical_bs_shift & 31);
	d->recovery_flags = d->info.flags & (DEVIO_UBLK_F_USER_RECOVERY | DEVIO_UBLK_F_USER_RECOVERY_REISSUE |
					     DEVIO_UBLK_F_USER_RECOVERY_FAIL_IO | DEVIO_UBLK_F_QUIESCE);
	d->ioctl_encode = d->info.flags & DEVIO_UBLK_F_CMD_IOCTL_ENCODE;
	d->user_copy = d->info.flags & DEVIO_UBLK_F_USER_COPY;
	d->batch = d->info.flags & DEVIO_UBLK_F_BATCH_IO; /* its /dev/ublkcN takes only the one kind */
	d->batch_why = "off (the device was made without UBLK_F_BATCH_IO)";
	d->copy = d->info.flags & DEVIO_UBLK_F_AUTO_BUF_REG ? DEVIO_UBLK_COPY_AUTO_BUF_REG
		  : d->info.flags & DEVIO_UBLK_F_SUPPORT_ZERO_COPY ? DEVIO_UBLK_COPY_ZERO
		  : d->user_copy ? DEVIO_UBLK_COPY_USER : DEVIO_UBLK_COPY_KERNEL;
	if (ublk_copy_fixed(d->copy) && !devio_backend_takes_fixed(d->b)) {
		devio_err("ublk: %s was made with %s: this backend takes no registered buffers", d->bdev,
			  devio_ublk_copy_name(d->copy));
		return -EINVAL;
	}
	if (!(d->recovery_flags & DEVIO_UBLK_F_USER_RECOVERY)) {
		devio_err("ublk: %s was made without --recovery: no server can take it over", d->bdev);
		return -EINVAL;
	}
	if (!d->nr_queues || d->nr_queues > 64 || !d->depth || d->depth > DEVIO_UBLK_MAX_QUEUE_DEPTH ||
	    d->max_io < 4096 || d->max_io > (1u << DEVIO_UBLK_IO_BUF_BITS) || (d->b->max_io && d->b->max_io < d->max_io)) {
		devio_err("ublk: %s: %u queues of depth %u with %u-byte requests: not what this server can serve",
			  d->bdev, d->nr_queues, d->depth, d->max_io);
		return -EINVAL;
	}
	if (!d->dev_sectors || d->dev_sectors > d->b->size >> 9) {
		devio_err("ublk: %s has %llu sectors, the export only %llu bytes", d->bdev,
			  (unsigned long long)d->dev_sectors, (unsigned long long)d->b->size);
		return -EINVAL;
	}
	return 0;
}

/* START_USER_RECOVERY: busy until the dead server's /dev/ublkcN is
 * released and the driver has quiesced the device; wait for that. */
static int ublk_start_recovery(struct ublk_dev *d)
{
	uint64_t deadline = devio_now_ns() + 30ull * 1000 * 1000 * 1000;
	int r;

	while ((r = ublk_simple_cmd(d, DEVIO_UBLK_CMD_START_USER_RECOVERY, 0)) == -EBUSY && devio_now_ns() < deadline) {
		struct timespec ts = { 0, 50 * 1000 * 1000 };

		nanosleep(&ts, NULL);
	}
	if (r < 0)
		devio_err("ublk: %s: START_USER_RECOVERY: %s%s", d->bdev, strerror(-r),
			  r == -EBUSY ? " (is its server still running?)" : "");
	return r < 0 ? r : 0;
}

/* Take over device id from a server that died: its geometry, fresh
 * queues fetching every tag, END_USER_RECOVERY (the driver then reissues
 * or fails what the old server left, per the device's recovery flags). */
static int ublk_recover(struct ublk_dev *d, uint32_t id)
{
	int r = ublk_adopt(d, id);

	if (r)
		return r;
	ublk_log_features(d);
	ublk_log_batch(d);
	r = ublk_start_recovery(d);
	if (!r)
		r = ublk_open_cdev(d);
	if (!r)
		r = ublk_start_queues(d);
	if (r)
		return r;
	r = ublk_simple_cmd(d, DEVIO_UBLK_CMD_END_USER_RECOVERY, (uint64_t)getpid());
	if (r < 0) {
		devio_err("ublk: %s: END_USER_RECOVERY: %s", d->bdev, strerror(-r));
		return r;
	}
	d->added = true; /* ours now: SIGTERM stops and deletes it */
	return 0;
}

static int ublk_start(struct devio_server *srv, const char *arg, const void *opts, void **state)
{
	static const struct ublk_opts defaults;
	const struct ublk_opts *o = opts ? opts : &defaults;
	struct ublk_dev *d = calloc(1, sizeof(*d));
	uint32_t want_id;
	bool legacy;
	int copy, r;

	if (!d)
		return -ENOMEM;
	d->ctrl_fd = d->cdev_fd = -1;
	d->b = srv->exports[0].backend;
	r = ublk_parse_arg(d, arg, &want_id, &copy, &legacy);
	if (r) {
		devio_err("ublk: bad argument '%s' (want [ID][,user-copy|,kernel-copy|,zero-copy][,legacy-opcodes])", arg);
		goto fail;
	}
	if (o->copy)
		copy = o->copy - UBLK_OPT_COPY(0); /* --ublk-copy */
	if (o->recover && (want_id == NO_DEV_ID || copy != DEVIO_UBLK_WANT_BEST || o->recovery || o->max_io || o->batch)) {
		devio_err("ublk: --recover takes over an existing device: --ublk=ID, its copy mode, request size, commands and recovery stay as they were made");
		r = -EINVAL;
		goto fail;
	}
	r = o->recover ? 0 : ublk_setup_geometry(d, o);
	if (r)
		goto fail;
	if (devio_wants_pool(d->b, srv->opts.threads) &&
	    !(d->workers = devio_workers_new(devio_pool_size(srv->opts.threads)))) {
		devio_err("ublk: cannot start the worker threads");
		r = -ENOMEM;
		goto fail;
	}
	r = ublk_ctrl_open(d);
	if (r)
		goto fail;
	ublk_get_features(d);
	if (legacy)
		d->ioctl_encode = false; /* what a pre-6.5 driver gets; for testing the fallback */
	r = o->recover ? ublk_recover(d, want_id)
		       : ublk_create(d, want_id, copy, o->recovery, o->batch ? o->batch - 1 : DEVIO_UBLK_BATCH_AUTO);
	if (r)
		goto fail;
	d->started = true;
	devio_info("ublk: %s: %llu bytes, %u queues, depth %u, %u-byte requests, %s, %s opcodes, %s commands, recovery %s%s (driver features 0x%llx)",
		   d->bdev, (unsigned long long)d->dev_sectors << 9, d->nr_queues, d->depth, d->max_io,
		   devio_ublk_copy_name(d->copy), d->ioctl_encode ? "ioctl-encoded" : "legacy", ublk_batch_word(d),
		   ublk_recovery_name(d->recovery_flags), o->recover ? ", taken over" : "",
		   (unsigned long long)d->features);
	*state = d;
	return 0;
fail:
	ublk_teardown(d);
	return r < 0 ? r : -EIO;
}

static void ublk_print_counters(struct ublk_dev *d, FILE *out)
{
	for (unsigned i = 0; d->queues && i < d->nr_queues; i++) {
		struct ublk_queue *q = &d->queues[i];
		struct devio_ring_stats st = q->final;

		if (q->ring)
			devio_ring_get_stats(q->ring, &st);
		fprintf(out, "ublk %s queue %u served %llu io_uring_enter %llu copy_syscalls %llu zero_copy %llu max_batch %llu errors %llu backend_ios_on_ring %llu commit_cmds %llu partial_commits %llu commands %s mode %s\n",
			d->bdev, i, (unsigned long long)atomic_load(&q->served), (unsigned long long)st.enters,
			(unsigned long long)atomic_load(&q->copies), (unsigned long long)atomic_load(&q->zero_copies),
			(unsigned long long)st.max_batch, (unsigned long long)atomic_load(&q->errors),
			(unsigned long long)st.ring_ios, (unsigned long long)atomic_load(&q->commit_cmds),
			(unsigned long long)atomic_load(&q->partial_commits), ublk_batch_word(d), devio_ublk_copy_mode(d->copy));
	}
}

/* Stop the device (the driver aborts our fetches), join the queue threads,
 * release the character device, then delete the device. */
static void ublk_teardown(struct ublk_dev *d)
{
	int r = 0;
	/* While STOP_DEV waits for the disk's last requests the queue threads
	 * keep serving; once it returns no request can come, and a thread
	 * whose fetches the driver has not aborted may leave: closing its
	 * ring cancels them. */
	uint64_t t0 = devio_now_ns();

	bool keep = atomic_load(&d->handover); /* for the next server: no STOP_DEV, no DEL_DEV */

	atomic_store(&d->stop_deadline, UINT64_MAX);
	atomic_store(&d->stopping, true);
	for (unsigned i = 0; d->queues && i < d->nr_queues; i++)
		devio_ring_stop(d->queues[i].ring);
	if (d->added && d->ctrl_ring_ok && !keep) {
		r = ublk_simple_cmd(d, DEVIO_UBLK_CMD_STOP_DEV, 0);
		if (r < 0 && d->started)
			devio_warn("ublk: %s: STOP_DEV: %s", d->bdev, strerror(-r));
		devio_debug("ublk: %s: STOP_DEV took %llu ms", d->bdev,
			    (unsigned long long)(devio_now_ns() - t0) / 1000000);
	}
	atomic_store(&d->stop_deadline, r < 0 && d->started ? devio_now_ns() + STOP_GRACE_NS : devio_now_ns());
	for (unsigned i = 0; d->queues && i < d->nr_queues; i++)
		if (d->queues[i].ring)
			devio_ring_wake(d->queues[i].ring);
	for (unsigned i = 0; d->queues && i < d->nr_queues; i++) {
		struct ublk_queue *q = &d->queues[i];

		devio_ring_free(q->ring, &q->final); /* joins the thread, cancels what the driver still holds */
		q->ring = NULL;
	}
	devio_workers_free(d->workers); /* idle: each queue waited for its requests */
	if (d->started) {
		FILE *mem;
		char *text = NULL;
		size_t len = 0;

		mem = open_memstream(&text, &len);
		if (mem) {
			ublk_print_counters(d, mem);
			fclose(mem);
			devio_info("ublk: %s: %s\n%.*s", d->bdev, keep ? "handed over (the device stays for --recover)"
				   : "stopped", len ? (int)len - 1 : 0, text ? text : "");
			free(text);
		}
	}
	for (unsigned i = 0; d->queues && i < d->nr_queues; i++)
		ublk_queue_free(&d->queues[i]);
	free(d->queues);
	if (d->cdev_fd >= 0)
		close(d->cdev_fd);
	if (d->added && d->ctrl_ring_ok && !keep) {
		r = ublk_simple_cmd(d, DEVIO_UBLK_CMD_DEL_DEV, 0);
		if (r < 0)
			devio_err("ublk: %s: DEL_DEV: %s", d->bdev, strerror(-r));
	}
	ublk_ctrl_close(d);
	free(d);
}

/* QUIESCE_DEV: the driver holds new requests back (requeued for the next
 * server), waits until each queue has a fetch of ours idle and then ends
 * our fetches (UBLK_IO_RES_ABORT); requests already with us are finished
 * and committed as usual.  0, or -errno (the hand-over then goes on the
 * kill-and-recover way: what is in flight is reissued to the next server). */
static int ublk_quiesce(struct ublk_dev *d)
{
	uint64_t t0 = devio_now_ns();
	int r;

	if (!(d->recovery_flags & DEVIO_UBLK_F_QUIESCE) || d->batch) {
		devio_info("ublk: %s: hand-over without quiesce (%s): the queues close and the driver reissues what "
			   "was in flight to the next server", d->bdev,
			   !(d->features & DEVIO_UBLK_F_QUIESCE) ? "this kernel has no UBLK_F_QUIESCE"
			   : d->batch ? "batched commands: QUIESCE_DEV would fail new I/O"
				      : "the device was made without UBLK_F_QUIESCE");
		return -EOPNOTSUPP;
	}
	r = ublk_simple_cmd(d, DEVIO_UBLK_CMD_QUIESCE_DEV, UBLK_QUIESCE_TIMEOUT_MS);
	if (r < 0) {
		devio_warn("ublk: %s: QUIESCE_DEV: %s; handing over anyway (what is in flight is reissued to the next "
			   "server)", d->bdev, strerror(-r));
		return r;
	}
	devio_info("ublk: %s: quiesced in %llu ms; handing over", d->bdev,
		   (unsigned long long)(devio_now_ns() - t0) / 1000000);
	return 0;
}

/* SIGUSR2 (frontend.h handover): quiesce a --recovery device and let
 * ublk_stop() leave it for `devio serve ... --ublk=ID --recover`. */
static int ublk_handover(void *state)
{
	struct ublk_dev *d = state;

	if (!(d->recovery_flags & DEVIO_UBLK_F_USER_RECOVERY)) {
		devio_err("ublk: %s: hand-over refused: made without --recovery, no server could take it over", d->bdev);
		return -EOPNOTSUPP;
	}
	if (d->recovery_flags & DEVIO_UBLK_F_USER_RECOVERY_FAIL_IO) {
		devio_err("ublk: %s: hand-over refused: with --recovery=fail-io its users would see errors until the "
			  "next server is up", d->bdev);
		return -EOPNOTSUPP;
	}
	ublk_quiesce(d);
	atomic_store(&d->handover, true);
	return 0;
}

static void ublk_stop(void *state)
{
	if (state)
		ublk_teardown(state);
}

static void ublk_status(void *state, FILE *out)
{
	struct ublk_dev *d = state;

	char names[512];

	fprintf(out, "ublk device %s queues %u depth %u max_io %u mode %s opcodes %s commands %s\n", d->bdev,
		d->nr_queues, d->depth, d->max_io, devio_ublk_copy_mode(d->copy),
		d->ioctl_encode ? "ioctl" : "legacy", ublk_batch_word(d));
	fprintf(out, "ublk %s recovery %s%s\n", d->bdev, ublk_recovery_name(d->recovery_flags),
		!(d->recovery_flags & DEVIO_UBLK_F_USER_RECOVERY) || (d->recovery_flags & DEVIO_UBLK_F_USER_RECOVERY_FAIL_IO)
		? "" : (d->recovery_flags & DEVIO_UBLK_F_QUIESCE) && !d->batch ? " hand-over quiesce" : " hand-over kill-and-recover");
	fprintf(out, "ublk %s data path: %s; driver features 0x%llx (%s)\n", d->bdev,
		devio_ublk_copy_name(d->copy), (unsigned long long)d->features,
		devio_ublk_feature_names(d->features, names, sizeof(names)));
	ublk_print_counters(d, out);
}

static void ublk_info(void *state, struct devio_frontend_info *info)
{
	struct ublk_dev *d = state;

	snprintf(info->device, sizeof(info->device), "%s", d->bdev);
}

static const struct devio_frontend_option ublk_options[] = {
	{ "queues", "N", "queues, a thread each (default one per CPU, at most 64)", devio_opt_uint,
	  offsetof(struct ublk_opts, queues) },
	{ "depth", "N", "requests in flight per queue (default 64, at most 4096)", devio_opt_uint,
	  offsetof(struct ublk_opts, depth) },
	{ "block-size", "N", "logical block size (default 512, at most 4096)", devio_opt_block_size,
	  offsetof(struct ublk_opts, block_size) },
	{ "recovery", "reissue|fail-io", "the device outlives its server (I/O waits for --recover, or fails)",
	  ublk_opt_recovery, offsetof(struct ublk_opts, recovery), true },
	{ "recover", NULL, "take over /dev/ublkbID (--ublk=ID) whose --recovery server died", devio_opt_flag,
	  offsetof(struct ublk_opts, recover) },
	{ "max-io", "BYTES", "largest request (default 1 MiB with zero copy, else 512 KiB)", ublk_opt_max_io,
	  offsetof(struct ublk_opts, max_io) },
	{ "ublk-copy", "auto|zero|user|kernel", "the data path: best offered (default), zero copy (a plain file only), user or kernel copy",
	  ublk_opt_copy, offsetof(struct ublk_opts, copy) },
	{ "ublk-batch", "auto|on|off", "batched commands (UBLK_F_BATCH_IO): where offered (default), required, or per-tag commands",
	  ublk_opt_batch, offsetof(struct ublk_opts, batch) },
	{ NULL },
};

const struct devio_frontend_type devio_frontend_ublk = {
	.option = "ublk",
	.arg_help = "[ID][,user-copy|,kernel-copy|,zero-copy][,legacy-opcodes]",
	.arg_optional = true,
	.help = "a /dev/ublkbN block device",
	.options = ublk_options,
	.opts_size = sizeof(struct ublk_opts),
	.start = ublk_start,
	.stop = ublk_stop,
	.status = ublk_status,
	.handover = ublk_handover,
	.info = ublk_info,
};
