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
 * kernel keeps the sockets; this process exits.
 */
#include <errno.h>
#include <limits.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "cli.h"
#include "devio/util.h"
#include "../lib/nbd_client.h"
#include "../lib/nbd_proto.h"

#define MAX_CONNECTIONS    16
#define NL_BUF             8192

struct nbd_target {
	struct devio_nbd_uri u;
	struct devio_nbd_client_opts hs;  /* what the handshake asks for */
};

/* Connect and negotiate one socket up to the transmission phase, with
 * the same handshake as the nbd:// backend (lib/nbd_client.c) minus
 * structured replies, which the kernel's client does not speak. */
static int nbd_connect_one(const struct nbd_target *t, struct devio_nbd_client_info *info)
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

static void nl_init(struct nl_msg *m, uint16_t type, uint8_t cmd, uint8_t version)
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

static int nl_put(struct nl_msg *m, uint16_t type, const void *data, size_t len)
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

static int nl_put_u32(struct nl_msg *m, uint16_t type, uint32_t v) { return nl_put(m, type, &v, 4); }
static int nl_put_u64(struct nl_msg *m, uint16_t type, uint64_t v) { return nl_put(m, type, &v, 8); }

static int nl_nest_start(struct nl_msg *m, uint16_t type)
{
	if (m->depth == 4)
		return -E2BIG;
	m->nest[m->depth++] = m->len;
	return nl_put(m, type | NLA_F_NESTED, NULL, 0);
}

static void nl_nest_end(struct nl_msg *m)
{
	struct nlattr *a = (struct nlattr *)(m->buf + m->nest[--m->depth]);

	a->nla_len = (uint16_t)(m->len - m->nest[m->depth]);
}

/* Find attribute type among the top-level attributes of a genl reply. */
static const struct nlattr *nl_find(const struct nlmsghdr *h, uint16_t type)
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
static int nl_talk(int fd, struct nl_msg *m, void (*on_reply)(const struct nlmsghdr *, void *), void *ctx)
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

static void family_reply(const struct nlmsghdr *h, void *ctx)
{
	const struct nlattr *a = nl_find(h, CTRL_ATTR_FAMILY_ID);

	if (a && a->nla_len >= NLA_HDRLEN + 2)
		memcpy(ctx, (const char *)a + NLA_HDRLEN, 2);
}

/* Open a generic netlink socket and resolve the "nbd" family. */
static int nbd_genl_open(uint16_t *family)
{
	struct nl_msg *m = malloc(sizeof(*m));
	int fd, r;

	if (!m)
		return -ENOMEM;
	fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
	if (fd < 0) {
		r = -errno;
		goto out;
	}
	*family = 0;
	nl_init(m, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
	r = nl_put(m, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME, sizeof(NBD_GENL_FAMILY_NAME));
	if (!r)
		r = nl_talk(fd, m, family_reply, family);
	if (!r && !*family)
		r = -ENOENT;
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

static void index_reply(const struct nlmsghdr *h, void *ctx)
{
	const struct nlattr *a = nl_find(h, NBD_ATTR_INDEX);

	if (a && a->nla_len >= NLA_HDRLEN + 4)
		memcpy(ctx, (const char *)a + NLA_HDRLEN, 4);
}

static uint64_t pick_block_size(const struct devio_nbd_client_info *info)
{
	uint32_t bs = info->pref_block ? info->pref_block : info->min_block;

	if (bs < 512 || bs > 4096 || (bs & (bs - 1)))
		bs = info->min_block >= 512 && info->min_block <= 4096 &&
		     !(info->min_block & (info->min_block - 1)) ? info->min_block : 512;
	return bs;
}

static int nbd_genl_connect(int nl, uint16_t family, int index, const struct devio_nbd_client_info *info,
			    const int *fds, int nfds, uint32_t timeout, uint32_t *got_index)
{
	struct nl_msg *m = malloc(sizeof(*m));
	int r = 0;

	if (!m)
		return -ENOMEM;
	nl_init(m, family, NBD_CMD_CONNECT, NBD_GENL_VERSION);
	if (index >= 0)
		r |= nl_put_u32(m, NBD_ATTR_INDEX, (uint32_t)index);
	r |= nl_put_u64(m, NBD_ATTR_SIZE_BYTES, info->size);
	r |= nl_put_u64(m, NBD_ATTR_BLOCK_SIZE_BYTES, pick_block_size(info));
	r |= nl_put_u64(m, NBD_ATTR_SERVER_FLAGS, info->tflags);
	if (timeout)
		r |= nl_put_u64(m, NBD_ATTR_TIMEOUT, timeout);
	r |= nl_nest_start(m, NBD_ATTR_SOCKETS);
	for (int i = 0; i < nfds && !r; i++) {
		r |= nl_nest_start(m, NBD_SOCK_ITEM);
		r |= nl_put_u32(m, NBD_SOCK_FD, (uint32_t)fds[i]);
		nl_nest_end(m);
	}
	nl_nest_end(m);
	*got_index = UINT32_MAX;
	if (!r)
		r = nl_talk(nl, m, index_reply, got_index);
	free(m);
	return r;
}

/* ---- the commands ---- */

static void attach_usage(FILE *out)
{
	fprintf(out, "usage: devio attach nbd://HOST[:PORT][/EXPORT]|nbd+unix:///EXPORT?socket=PATH\n"
			"         --nbd-device [/dev/nbdN] [--connections N] [--timeout SECONDS]\n"
			"  --timeout bounds the handshake (default 30 s) and is the kernel's request timeout\n");
}

static int parse_nbd_index(const char *dev, int *index)
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
};

static int parse_attach_args(int argc, char **argv, struct attach_args *a)
{
	uint64_t v;

	a->uri = NULL;
	a->index = -1;
	a->connections = 0;
	a->timeout = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--nbd-device")) {
			if (i + 1 < argc && (!strncmp(argv[i + 1], "/dev/nbd", 8) ||
					     (!strncmp(argv[i + 1], "nbd", 3) && strncmp(argv[i + 1], "nbd:", 4) &&
					      strncmp(argv[i + 1], "nbd+", 4)))) {
				if (parse_nbd_index(argv[++i], &a->index)) {
					devio_err("--nbd-device: want /dev/nbdN, got '%s'", argv[i]);
					return -EINVAL;
				}
			}
		} else if (!strncmp(argv[i], "--nbd-device=", 13)) {
			if (parse_nbd_index(argv[i] + 13, &a->index)) {
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
			attach_usage(stdout);
			exit(0);
		} else if (!strcmp(argv[i], "-V") || !strcmp(argv[i], "--version")) {
			cli_version();
			exit(0);
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

static unsigned default_connections(const struct devio_nbd_client_info *info)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	if (!(info->tflags & NBD_FLAG_CAN_MULTI_CONN))
		return 1;
	return n < 2 ? 2 : n > 8 ? 8 : (unsigned)n;
}

/* Open every connection: returns how many, or -errno with none left open. */
static int open_connections(const struct nbd_target *t, struct attach_args *a, struct devio_nbd_client_info *info,
			    int *fds)
{
	int n = 0, r;

	r = nbd_connect_one(t, info);
	if (r < 0)
		return r;
	fds[n++] = r;
	if (!a->connections)
		a->connections = default_connections(info);
	else if (a->connections > 1 && !(info->tflags & NBD_FLAG_CAN_MULTI_CONN))
		devio_warn("%s: server does not advertise CAN_MULTI_CONN; using %u connections anyway", t->hs.name,
			   a->connections);
	while ((unsigned)n < a->connections) {
		struct devio_nbd_client_info more = { 0 };

		r = nbd_connect_one(t, &more);
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
	int fds[MAX_CONNECTIONS], nfds = 0, nl = -1, rc = 1, r;
	uint16_t family;
	uint32_t index;
	char why[256];

	if (!t)
		return 1;
	if (parse_attach_args(argc, argv, &a)) {
		rc = cli_usage_hint("attach");
		goto out;
	}
	if ((r = devio_nbd_uri_parse(a.uri, &t->u, why, sizeof(why)))) {
		devio_err("%s: %s", a.uri, why);
		rc = 2;
		goto out;
	}
	t->hs.name = a.uri;
	t->hs.export = t->u.export;
	t->hs.timeout_s = a.timeout ? a.timeout : NBD_CLIENT_TIMEOUT_S;
	r = open_connections(t, &a, &info, fds);
	if (r < 0)
		goto out;
	nfds = r;
	devio_info("%s: export of %llu bytes, flags 0x%x, %d connection%s negotiated", a.uri,
		   (unsigned long long)info.size, info.tflags, nfds, nfds == 1 ? "" : "s");
	nl = nbd_genl_open(&family);
	if (nl < 0)
		goto out_close;
	r = nbd_genl_connect(nl, family, a.index, &info, fds, nfds, a.timeout, &index);
	if (r) {
		devio_err("%s: NBD_CMD_CONNECT%s: %s", a.uri, a.index >= 0 ? " (device busy?)" : "", strerror(-r));
		goto out_close;
	}
	if (index == UINT32_MAX)
		index = (uint32_t)a.index;
	printf("/dev/nbd%u\n", index);
	fflush(stdout);
	devio_info("%s: attached as /dev/nbd%u: %llu bytes, block %llu, %d connection%s, flags 0x%x", a.uri, index,
		   (unsigned long long)info.size, (unsigned long long)pick_block_size(&info), nfds,
		   nfds == 1 ? "" : "s", info.tflags);
	rc = 0;
out_close:
	/* the kernel holds its own references to the sockets */
	for (int i = 0; i < nfds; i++)
		close(fds[i]);
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

	if (parse_nbd_index(dev, &index)) {
		devio_err("detach: want /dev/nbdN, got '%s'", dev);
		return 2;
	}
	nl = nbd_genl_open(&family);
	if (nl < 0)
		return 1;
	m = malloc(sizeof(*m));
	if (!m) {
		close(nl);
		return 1;
	}
	nl_init(m, family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION);
	r = nl_put_u32(m, NBD_ATTR_INDEX, (uint32_t)index);
	if (!r)
		r = nl_talk(nl, m, NULL, NULL);
	free(m);
	close(nl);
	if (r) {
		devio_err("%s: NBD_CMD_DISCONNECT: %s", dev, strerror(-r));
		return 1;
	}
	devio_info("%s: disconnected", dev);
	return 0;
}
