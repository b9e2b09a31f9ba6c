/* attach_nbd.c - `devio attach nbd://…|nbd+unix://… --nbd-device [/dev/nbdN]`
 * and `devio detach /dev/nbdN`: give this machine a block device for an NBD
 * server through the kernel's own nbd client.
 *
 * Each connection first does the NBD handshake in user space
 * (lib/nbd_client.c: fixed newstyle, NBD_OPT_GO asking for the block
 * sizes, simple replies), since the kernel only speaks the transmission
 * phase; the URI is parsed by lib/nbd_uri.c, as for the nbd:// backend.
 * The connected sockets, the export's size, block size and transmission
 * flags then go to the kernel in one
 * NBD_CMD_CONNECT message of the generic netlink family "nbd", written by
 * hand on a raw NETLINK_GENERIC socket.  Several connections are used when
 * the server advertises CAN_MULTI_CONN (or --connections says so).  The
 * kernel keeps the sockets; this process exits, or with --reconnect stays
 * as the device's monitor: the kernel is given a dead-connection timeout
 * (requests wait that long for a new socket instead of failing), and on
 * each NBD_CMD_LINK_DEAD notification (the family's multicast group) the
 * monitor dials again, checks the export is the same and hands the new
 * socket over with NBD_CMD_RECONFIGURE; it ends when the device is
 * detached.
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include "cli.h"
#include "devio/util.h"
#include "../lib/nbd_client.h"
#include "../lib/nbd_proto.h"

#define MAX_CONNECTIONS    16
#define RECONNECT_TIMEOUT_S 60          /* --reconnect: dead_conn_timeout unless --timeout */
#define RECONNECT_REQUEST_TIMEOUT_S 5   /* --reconnect: a request unanswered this long is requeued */
#define NL_BUF             8192

struct nbd_target {
	struct devio_nbd_uri u;
	struct devio_nbd_client_opts hs;  /* what the handshake asks for */
};

/* Connect and negotiate one socket up to the transmission phase, with
 * the same handshake as the nbd:// backend (lib/nbd_client.c) minus
 * structured replies, which the kernel's client does not speak. */
static int an_connect_one(const struct nbd_target *t, struct devio_nbd_client_info *info)
{
	return devio_nbd_client_connect(&t->u, &t->hs, info);
}

/* ---- generic netlink ---- */

struct nl_msg {
	char buf[NL_BUF];
	size_t len;
	size_t nest[4];
	int depth;
};

static void an_nl_init(struct nl_msg *m, uint16_t type, uint8_t cmd, uint8_t version)
{
	struct nlmsghdr *h = (struct nlmsghdr *)m->buf;
	struct genlmsghdr *g = NLMSG_DATA(h);

	memset(m, 0, sizeof(*m));
	h->nlmsg_type = type;
	h->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
	h->nlmsg_seq = 1;
	g->cmd = cmd;
	g->version = version;
	m->len = NLMSG_LENGTH(GENL_HDRLEN);
}

static int an_nl_put(struct nl_msg *m, uint16_t type, const void *data, size_t len)
{
	struct nlattr *a = (struct nlattr *)(m->buf + m->len);

	if (m->len + NLA_ALIGN(NLA_HDRLEN + len) > sizeof(m->buf))
		return -E2BIG;
	a->nla_type = type;
	a->nla_len = (uint16_t)(NLA_HDRLEN + len);
	if (len)
		memcpy((char *)a + NLA_HDRLEN, data, len);
	m->len += NLA_ALIGN(a->nla_len);
	return 0;
}

static int an_nl_put_u32(struct nl_msg *m, uint16_t type, uint32_t v) { return an_nl_put(m, type, &v, 4); }
static int an_nl_put_u64(struct nl_msg *m, uint16_t type, uint64_t v) { return an_nl_put(m, type, &v, 8); }

static int an_nl_nest_start(struct nl_msg *m, uint16_t type)
{
	if (m->depth == 4)
		return -E2BIG;
	m->nest[m->depth++] = m->len;
	return an_nl_put(m, type | NLA_F_NESTED, NULL, 0);
}

static void an_nl_nest_end(struct nl_msg *m)
{
	struct nlattr *a = (struct nlattr *)(m->buf + m->nest[--m->depth]);

	a->nla_len = (uint16_t)(m->len - m->nest[m->depth]);
}

/* Find attribute type among the top-level attributes of a genl reply. */
static const struct nlattr *an_nl_find(const struct nlmsghdr *h, uint16_t type)
{
	const char *p = (const char *)NLMSG_DATA(h) + GENL_HDRLEN;
	const char *end = (const char *)h + h->nlmsg_len;

	while (p + NLA_HDRLEN <= end) {
		const struct nlattr *a = (const struct nlattr *)p;

		if (a->nla_len < NLA_HDRLEN || p + a->nla_len > end)
			break;
		if ((a->nla_type & NLA_TYPE_MASK) == type)
			return a;
		p += NLA_ALIGN(a->nla_len);
	}
	return NULL;
}

/* Send m; read replies until the ACK.  on_reply sees each data message. */
static int an_nl_talk(int fd, struct nl_msg *m, void (*on_reply)(const struct nlmsghdr *, void *), void *ctx)
{
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
	char buf[NL_BUF] __attribute__((aligned(8)));

	((struct nlmsghdr *)m->buf)->nlmsg_len = (uint32_t)m->len;
	if (sendto(fd, m->buf, m->len, 0, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return -errno;
	for (;;) {
		struct sockaddr_nl from;
		socklen_t fromlen = sizeof(from);
		ssize_t n = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&from, &fromlen);
		const struct nlmsghdr *h;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (fromlen < sizeof(from) || from.nl_pid != 0)
			continue; /* only the kernel answers us */
		for (h = (const struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_type == NLMSG_ERROR) {
				const struct nlmsgerr *e = NLMSG_DATA(h);
				if (h->nlmsg_len < NLMSG_LENGTH(sizeof(*e)))
					return -EPROTO;
				return e->error; /* 0 is the ACK */
			}
			if (h->nlmsg_type == NLMSG_DONE)
				return 0;
			if (on_reply)
				on_reply(h, ctx);
		}
	}
}

struct family_ids {
	uint16_t family;
	uint32_t mcast;  /* the "nbd_mc_group" multicast group, 0 if none */
};

/* The nested attributes inside a, one by one: *p starts at 0. */
static const struct nlattr *an_nl_next_nested(const struct nlattr *a, size_t *p)
{
	const char *base = (const char *)a + NLA_HDRLEN;
	size_t len = a->nla_len - NLA_HDRLEN;
	const struct nlattr *n;

	if (*p + NLA_HDRLEN > len)
		return NULL;
	n = (const struct nlattr *)(base + *p);
	if (n->nla_len < NLA_HDRLEN || *p + n->nla_len > len)
		return NULL;
	*p += NLA_ALIGN(n->nla_len);
	return n;
}

/* CTRL_ATTR_MCAST_GROUPS: the id of the group named NBD_GENL_MCAST_GROUP_NAME. */
static uint32_t an_mcast_group_id(const struct nlattr *groups)
{
	const struct nlattr *g, *f;
	size_t p = 0, q;

	while ((g = an_nl_next_nested(groups, &p))) {
		const char *name = NULL;
		uint32_t id = 0;

		for (q = 0; (f = an_nl_next_nested(g, &q));) {
			size_t n = f->nla_len - NLA_HDRLEN;
			const char *v = (const char *)f + NLA_HDRLEN;

			if ((f->nla_type & NLA_TYPE_MASK) == CTRL_ATTR_MCAST_GRP_NAME && n && v[n - 1] == 0)
				name = v;
			if ((f->nla_type & NLA_TYPE_MASK) == CTRL_ATTR_MCAST_GRP_ID && n >= 4)
				memcpy(&id, v, 4);
		}
		if (name && !strcmp(name, NBD_GENL_MCAST_GROUP_NAME))
			return id;
	}
	return 0;
}

static void an_family_reply(const struct nlmsghdr *h, void *ctx)
{
	struct family_ids *ids = ctx;
	const struct nlattr *a = an_nl_find(h, CTRL_ATTR_FAMILY_ID);

	if (a && a->nla_len >= NLA_HDRLEN + 2)
		memcpy(&ids->family, (const char *)a + NLA_HDRLEN, 2);
	a = an_nl_find(h, CTRL_ATTR_MCAST_GROUPS);
	if (a)
		ids->mcast = an_mcast_group_id(a);
}

/* Open a generic netlink socket and resolve the "nbd" family (and its
 * multicast group, if mcast is not NULL). */
static int an_genl_open_ids(uint16_t *family, uint32_t *mcast)
{
	struct nl_msg *m = malloc(sizeof(*m));
	struct family_ids ids = { 0, 0 };
	int fd, r;

	if (!m)
		return -ENOMEM;
	fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
	if (fd < 0) {
		r = -errno;
		goto out;
	}
	an_nl_init(m, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
	r = an_nl_put(m, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME, sizeof(NBD_GENL_FAMILY_NAME));
	if (!r)
		r = an_nl_talk(fd, m, an_family_reply, &ids);
	if (!r && !ids.family)
		r = -ENOENT;
	*family = ids.family;
	if (mcast)
		*mcast = ids.mcast;
	if (r) {
		devio_err("netlink family \"nbd\": %s (is the nbd module loaded? modprobe nbd)", strerror(-r));
		close(fd);
		goto out;
	}
	r = fd;
out:
	free(m);
	return r;
}

static int an_genl_open(uint16_t *family)
{
	return an_genl_open_ids(family, NULL);
}

static void an_index_reply(const struct nlmsghdr *h, void *ctx)
{
	const struct nlattr *a = an_nl_find(h, NBD_ATTR_INDEX);

	if (a && a->nla_len >= NLA_HDRLEN + 4)
		memcpy(ctx, (const char *)a + NLA_HDRLEN, 4);
}

static uint64_t an_pick_block_size(const struct devio_nbd_client_info *info)
{
	uint32_t bs = info->pref_block ? info->pref_block : info->min_block;

	if (bs < 512 || bs > 4096 || (bs & (bs - 1)))
		bs = info->min_block >= 512 && info->min_block <= 4096 &&
		     !(info->min_block & (info->min_block - 1)) ? info->min_block : 512;
	return bs;
}

/* The kernel's timeouts: per request (0: the kernel's default), and how
 * long requests wait for a new socket once every connection is dead (0:
 * they fail at once). */
struct nbd_timeouts {
	uint32_t request, dead_conn;
};

static int an_genl_connect(int nl, uint16_t family, int index, const struct devio_nbd_client_info *info,
			   const int *fds, int nfds, const struct nbd_timeouts *to, uint32_t *got_index)
{
	struct nl_msg *m = malloc(sizeof(*m));
	int r = 0;

	if (!m)
		return -ENOMEM;
	an_nl_init(m, family, NBD_CMD_CONNECT, NBD_GENL_VERSION);
	if (index >= 0)
		r |= an_nl_put_u32(m, NBD_ATTR_INDEX, (uint32_t)index);
	r |= an_nl_put_u64(m, NBD_ATTR_SIZE_BYTES, info->size);
	r |= an_nl_put_u64(m, NBD_ATTR_BLOCK_SIZE_BYTES, an_pick_block_size(info));
	r |= an_nl_put_u64(m, NBD_ATTR_SERVER_FLAGS, info->tflags);
	if (to->request)
		r |= an_nl_put_u64(m, NBD_ATTR_TIMEOUT, to->request);
	if (to->dead_conn)
		r |= an_nl_put_u64(m, NBD_ATTR_DEAD_CONN_TIMEOUT, to->dead_conn);
	r |= an_nl_nest_start(m, NBD_ATTR_SOCKETS);
	for (int i = 0; i < nfds && !r; i++) {
		r |= an_nl_nest_start(m, NBD_SOCK_ITEM);
		r |= an_nl_put_u32(m, NBD_SOCK_FD, (uint32_t)fds[i]);
		an_nl_nest_end(m);
	}
	an_nl_nest_end(m);
	*got_index = UINT32_MAX;
	if (!r)
		r = an_nl_talk(nl, m, an_index_reply, got_index);
	free(m);
	return r;
}

/* ---- --reconnect: the device's monitor ---- */

static volatile sig_atomic_t mon_stop;

static void an_mon_on_signal(int sig)
{
	(void)sig;
	mon_stop = 1;
}

/* Is /dev/nbdN attached?  The kernel shows its pid file while it is. */
static bool an_mon_attached(uint32_t index)
{
	char path[64];
	struct stat st;

	snprintf(path, sizeof(path), "/sys/block/nbd%u/pid", index);
	return stat(path, &st) == 0;
}

/* A netlink socket in the "nbd" family's multicast group. */
static int an_mon_subscribe(uint32_t group)
{
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC), r;

	if (fd < 0)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof(group)) < 0) {
		r = -errno;
		close(fd);
		return r;
	}
	return fd;
}

/* How many NBD_CMD_LINK_DEAD notifications for /dev/nbdN are queued (the
 * kernel sends one per connection that dies); reads them all.  A lost
 * notification (ENOBUFS) counts as one. */
static unsigned an_mon_link_dead(int fd, uint16_t family, uint32_t index)
{
	char buf[NL_BUF] __attribute__((aligned(8)));
	unsigned dead = 0;

	for (;;) {
		struct sockaddr_nl from;
		socklen_t fromlen = sizeof(from);
		ssize_t n = recvfrom(fd, buf, sizeof(buf), MSG_DONTWAIT, (struct sockaddr *)&from, &fromlen);
		const struct nlmsghdr *h;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return dead + (errno == ENOBUFS);
		if (fromlen < sizeof(from) || from.nl_pid != 0)
			continue; /* only the kernel tells */
		for (h = (const struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
			const struct genlmsghdr *g = NLMSG_DATA(h);
			const struct nlattr *a;
			uint32_t i;

			if (h->nlmsg_type != family || h->nlmsg_len < NLMSG_LENGTH(GENL_HDRLEN) ||
			    g->cmd != NBD_CMD_LINK_DEAD)
				continue;
			a = an_nl_find(h, NBD_ATTR_INDEX);
			if (a && a->nla_len >= NLA_HDRLEN + 4) {
				memcpy(&i, (const char *)a + NLA_HDRLEN, 4);
				dead += i == index;
			}
		}
	}
}

/* Hand one connected socket to the kernel in place of a dead one. */
static int an_genl_reconfigure(int nl, uint16_t family, uint32_t index, int fd)
{
	struct nl_msg *m = malloc(sizeof(*m));
	int r = 0;

	if (!m)
		return -ENOMEM;
	an_nl_init(m, family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION);
	r |= an_nl_put_u32(m, NBD_ATTR_INDEX, index);
	r |= an_nl_nest_start(m, NBD_ATTR_SOCKETS);
	r |= an_nl_nest_start(m, NBD_SOCK_ITEM);
	r |= an_nl_put_u32(m, NBD_SOCK_FD, (uint32_t)fd);
	an_nl_nest_end(m);
	an_nl_nest_end(m);
	if (!r)
		r = an_nl_talk(nl, m, NULL, NULL);
	free(m);
	return r;
}

struct monitor {
	int nl, mon;            /* commands; notifications */
	uint16_t family;
	uint32_t index;
	uint32_t dead_conn;     /* the kernel's wait for a new socket, s */
	const struct nbd_target *t;
	const struct devio_nbd_client_info *info;
};

/* One new socket for the export the device was attached to: the socket,
 * -EAGAIN (why says why; try again) or -ESTALE (another export now). */
static int an_mon_dial(const struct monitor *m, char *why, size_t len)
{
	struct devio_nbd_client_info now = { 0 };
	int fd;

	devio_log_quiet(true); /* one line per loss, not per attempt */
	fd = an_connect_one(m->t, &now);
	devio_log_quiet(false);
	if (fd < 0) {
		snprintf(why, len, "%s", strerror(-fd));
		return -EAGAIN;
	}
	if (now.size != m->info->size || now.tflags != m->info->tflags) {
		devio_err("%s: /dev/nbd%u: the server now offers %llu bytes (flags 0x%x), not %llu (0x%x); "
			  "not reconnecting", m->t->hs.name, m->index, (unsigned long long)now.size, now.tflags,
			  (unsigned long long)m->info->size, m->info->tflags);
		close(fd);
		return -ESTALE;
	}
	return fd;
}

/* Replace dead connections (more may die meanwhile) with backoff until
 * none is left.  0, or -ESTALE. */
static int an_mon_reconnect(const struct monitor *m, unsigned dead)
{
	uint64_t t0 = devio_now_ns(), backoff_us = 50000;
	unsigned given = 0;
	bool told = false;
	char why[160] = "";

	while (given < dead && !mon_stop && an_mon_attached(m->index)) {
		int fd = an_mon_dial(m, why, sizeof(why)), r;

		if (fd == -ESTALE)
			return fd;
		if (fd >= 0) {
			r = an_genl_reconfigure(m->nl, m->family, m->index, fd);
			close(fd); /* the kernel holds its own reference */
			if (!r) {
				given++;
				dead += an_mon_link_dead(m->mon, m->family, m->index);
				continue;
			}
			snprintf(why, sizeof(why), "NBD_CMD_RECONFIGURE: %s", strerror(-r));
		}
		if (!told && devio_now_ns() - t0 >= (uint64_t)m->dead_conn * 1000000000ull) {
			devio_err("%s: /dev/nbd%u: no server for %u s (%s): the kernel fails I/O until it is back; "
				  "still trying", m->t->hs.name, m->index, m->dead_conn, why);
			told = true;
		}
		usleep((useconds_t)backoff_us);
		backoff_us = backoff_us * 2 > 2000000 ? 2000000 : backoff_us * 2;
		dead += an_mon_link_dead(m->mon, m->family, m->index);
	}
	if (given)
		devio_info("%s: /dev/nbd%u: connection lost; reconnected after %.1f s (%u socket(s) given)",
			   m->t->hs.name, m->index, (double)(devio_now_ns() - t0) / 1e9, given);
	return 0;
}

/* Watch /dev/nbdN until it is detached (or SIGTERM/SIGINT: the device
 * stays).  0, or 1 when the server came back with another export. */
static int an_mon_run(const struct monitor *m)
{
	struct sigaction sa = { .sa_handler = an_mon_on_signal }; /* no SA_RESTART: poll returns */

	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	devio_info("%s: /dev/nbd%u: reconnecting when the server goes away (requests wait %u s)", m->t->hs.name,
		   m->index, m->dead_conn);
	while (!mon_stop && an_mon_attached(m->index)) {
		struct pollfd p = { .fd = m->mon, .events = POLLIN };
		unsigned dead;

		if (poll(&p, 1, 1000) <= 0)
			continue;
		dead = an_mon_link_dead(m->mon, m->family, m->index);
		if (dead && an_mon_reconnect(m, dead) == -ESTALE)
			return 1;
	}
	return 0;
}

/* ---- the commands ---- */

static void an_usage(FILE *out)
{
	fprintf(out, "usage: devio attach nbd://HOST[:PORT][/EXPORT]|nbd+unix:///EXPORT?socket=PATH\n"
			"         --nbd-device [/dev/nbdN] [--connections N] [--timeout SECONDS] [--reconnect]\n"
			"  --timeout bounds the handshake (default 30 s) and is the kernel's request timeout\n"
			"  --reconnect: stay as the device's monitor and give the kernel a new socket when the\n"
			"      server comes back; requests wait --timeout seconds (default 60) for it, and one\n"
			"      in flight at the loss is sent again after %u s (the kernel's request timeout)\n",
		RECONNECT_REQUEST_TIMEOUT_S);
}

static int an_parse_nbd_index(const char *dev, int *index)
{
	uint64_t v;

	if (!strncmp(dev, "/dev/", 5))
		dev += 5;
	if (strncmp(dev, "nbd", 3) || devio_parse_u64(dev + 3, &v) || v > INT_MAX)
		return -EINVAL;
	*index = (int)v;
	return 0;
}

struct attach_args {
	const char *uri;
	int index;           /* -1: any free device */
	unsigned connections; /* 0: decide from CAN_MULTI_CONN */
	uint32_t timeout;
	bool reconnect;      /* stay as the monitor */
};

static int an_parse_args(int argc, char **argv, struct attach_args *a)
{
	uint64_t v;

	a->uri = NULL;
	a->index = -1;
	a->connections = 0;
	a->timeout = 0;
	a->reconnect = false;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--nbd-device")) {
			if (i + 1 < argc && (!strncmp(argv[i + 1], "/dev/nbd", 8) ||
					     (!strncmp(argv[i + 1], "nbd", 3) && strncmp(argv[i + 1], "nbd:", 4) &&
					      strncmp(argv[i + 1], "nbd+", 4)))) {
				if (an_parse_nbd_index(argv[++i], &a->index)) {
					devio_err("--nbd-device: want /dev/nbdN, got '%s'", argv[i]);
					return -EINVAL;
				}
			}
		} else if (!strncmp(argv[i], "--nbd-device=", 13)) {
			if (an_parse_nbd_index(argv[i] + 13, &a->index)) {
				devio_err("--nbd-device: want /dev/nbdN, got '%s'", argv[i] + 13);
				return -EINVAL;
			}
		} else if (!strcmp(argv[i], "--connections") && i + 1 < argc) {
			if (devio_parse_u64(argv[++i], &v) || v < 1 || v > MAX_CONNECTIONS) {
				devio_err("--connections: want 1..%d, got '%s'", MAX_CONNECTIONS, argv[i]);
				return -EINVAL;
			}
			a->connections = (unsigned)v;
		} else if (!strcmp(argv[i], "--timeout") && i + 1 < argc) {
			if (devio_parse_u64(argv[++i], &v) || v > 86400) {
				devio_err("--timeout: want seconds, got '%s'", argv[i]);
				return -EINVAL;
			}
			a->timeout = (uint32_t)v;
		} else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			an_usage(stdout);
			exit(0);
		} else if (!strcmp(argv[i], "-V") || !strcmp(argv[i], "--version")) {
			cli_version();
			exit(0);
		} else if (!strcmp(argv[i], "--reconnect")) {
			a->reconnect = true;
		} else if (argv[i][0] != '-' && !a->uri) {
			a->uri = argv[i];
		} else {
			devio_err("attach: %s '%s'", argv[i][0] == '-' ? "unknown option" : "unexpected argument", argv[i]);
			return -EINVAL;
		}
	}
	if (!a->uri) {
		devio_err("attach: no NBD URI given");
		return -EINVAL;
	}
	return 0;
}

static unsigned an_default_connections(const struct devio_nbd_client_info *info)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	if (!(info->tflags & NBD_FLAG_CAN_MULTI_CONN))
		return 1;
	return n < 2 ? 2 : n > 8 ? 8 : (unsigned)n;
}

/* Open every connection: returns how many, or -errno with none left open. */
static int an_open_connections(const struct nbd_target *t, struct attach_args *a,
			       struct devio_nbd_client_info *info, int *fds)
{
	int n = 0, r;

	r = an_connect_one(t, info);
	if (r < 0)
		return r;
	fds[n++] = r;
	if (!a->connections)
		a->connections = an_default_connections(info);
	else if (a->connections > 1 && !(info->tflags & NBD_FLAG_CAN_MULTI_CONN))
		devio_warn("%s: server does not advertise CAN_MULTI_CONN; using %u connections anyway", t->hs.name,
			   a->connections);
	while ((unsigned)n < a->connections) {
		struct devio_nbd_client_info more = { 0 };

		r = an_connect_one(t, &more);
		if (r < 0)
			goto out_close;
		fds[n++] = r;
		if (more.size != info->size || more.tflags != info->tflags) {
			devio_err("%s: connection %d sees a different export (size %llu, flags 0x%x)", t->hs.name, n,
				  (unsigned long long)more.size, more.tflags);
			r = -EPROTO;
			goto out_close;
		}
	}
	return n;
out_close:
	while (n > 0)
		close(fds[--n]);
	return r;
}

int attach_nbd_device(int argc, char **argv)
{
	struct nbd_target *t = calloc(1, sizeof(*t));
	struct devio_nbd_client_info info = { 0 };
	struct attach_args a;
	int fds[MAX_CONNECTIONS], nfds = 0, nl = -1, mon = -1, rc = 1, r;
	struct nbd_timeouts to;
	uint32_t index, group = 0;
	uint16_t family;
	char why[256];

	if (!t)
		return 1;
	/* usage errors point at this form's own help (docs/cli.md) */
	if (an_parse_args(argc, argv, &a)) {
		rc = cli_usage_hint("attach --nbd-device");
		goto out;
	}
	if ((r = devio_nbd_uri_parse(a.uri, &t->u, why, sizeof(why)))) {
		devio_err("%s: %s", a.uri, why);
		rc = cli_usage_hint("attach --nbd-device");
		goto out;
	}
	t->hs.name = a.uri;
	t->hs.export = t->u.export;
	t->hs.timeout_s = a.timeout ? a.timeout : NBD_CLIENT_TIMEOUT_S;
	r = an_open_connections(t, &a, &info, fds);
	if (r < 0)
		goto out;
	nfds = r;
	devio_info("%s: export of %llu bytes, flags 0x%x, %d connection%s negotiated", a.uri,
		   (unsigned long long)info.size, info.tflags, nfds, nfds == 1 ? "" : "s");
	nl = an_genl_open_ids(&family, &group);
	if (nl < 0)
		goto out_close;
	to = (struct nbd_timeouts){ .request = a.timeout };
	if (a.reconnect) {
		/* listening before CONNECT: no notification is missed */
		mon = group ? an_mon_subscribe(group) : -ENOENT;
		if (mon < 0) {
			devio_err("%s: --reconnect: the nbd family's notifications: %s", a.uri, strerror(-mon));
			goto out_close;
		}
		to.request = RECONNECT_REQUEST_TIMEOUT_S;
		to.dead_conn = a.timeout ? a.timeout : RECONNECT_TIMEOUT_S;
	}
	r = an_genl_connect(nl, family, a.index, &info, fds, nfds, &to, &index);
	if (r) {
		devio_err("%s: NBD_CMD_CONNECT%s: %s", a.uri, a.index >= 0 ? " (device busy?)" : "", strerror(-r));
		goto out_close;
	}
	if (index == UINT32_MAX)
		index = (uint32_t)a.index;
	printf("/dev/nbd%u\n", index);
	fflush(stdout);
	devio_info("%s: attached as /dev/nbd%u: %llu bytes, block %llu, %d connection%s, flags 0x%x", a.uri, index,
		   (unsigned long long)info.size, (unsigned long long)an_pick_block_size(&info), nfds,
		   nfds == 1 ? "" : "s", info.tflags);
	rc = 0;
out_close:
	/* the kernel holds its own references to the sockets */
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
	if (!rc && mon >= 0) {
		struct monitor m = { .nl = nl, .mon = mon, .family = family, .index = index,
				     .dead_conn = to.dead_conn, .t = t, .info = &info };

		rc = an_mon_run(&m);
	}
	if (mon >= 0)
		close(mon);
	if (nl >= 0)
		close(nl);
out:
	free(t);
	return rc;
}

int detach_nbd_device(const char *dev)
{
	struct nl_msg *m;
	uint16_t family;
	int index, nl, r;

	if (an_parse_nbd_index(dev, &index)) {
		devio_err("detach: want /dev/nbdN, got '%s'", dev);
		return 2;
	}
	nl = an_genl_open(&family);
	if (nl < 0)
		return 1;
	m = malloc(sizeof(*m));
	if (!m) {
		close(nl);
		return 1;
	}
	an_nl_init(m, family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION);
	r = an_nl_put_u32(m, NBD_ATTR_INDEX, (uint32_t)index);
	if (!r)
		r = an_nl_talk(nl, m, NULL, NULL);
	free(m);
	close(nl);
	if (r) {
		devio_err("%s: NBD_CMD_DISCONNECT: %s", dev, strerror(-r));
		return 1;
	}
	devio_info("%s: disconnected", dev);
	return 0;
}
