/* privdrop.c - `devio serve --user USER[:GROUP]`: once the images, sockets
 * and devices are open, the server gives up root for good (docs/security.md).
 * USER alone takes the user's primary group and supplementary groups
 * (initgroups); USER:GROUP exactly that one group.  The drop is checked
 * afterwards (real, effective and saved ids, and that root cannot be taken
 * back), and a server that cannot drop exits rather than serve as root. */
#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>
#include "cli.h"
#include "devio/util.h"

static int privdrop_group(const char *name, gid_t *gid)
{
	struct group *g = getgrnam(name);
	uint64_t v;

	if (g) {
		*gid = g->gr_gid;
		return 0;
	}
	if (!devio_parse_u64(name, &v) && v < (gid_t)-1) {
		*gid = (gid_t)v;
		return 0;
	}
	devio_err("--user: no group '%s'", name);
	return -EINVAL;
}

int privdrop_parse(const char *val, struct privdrop *p)
{
	char user[256];
	const char *colon = strchr(val, ':');
	size_t ul = colon ? (size_t)(colon - val) : strlen(val);
	struct passwd *pw;

	memset(p, 0, sizeof(*p));
	if (!ul || ul >= sizeof(user) || (colon && !colon[1])) {
		devio_err("--user: want USER or USER:GROUP, got '%s'", val);
		return -EINVAL;
	}
	memcpy(user, val, ul);
	user[ul] = '\0';
	pw = getpwnam(user);
	if (!pw) {
		devio_err("--user: no user '%s'", user);
		return -EINVAL;
	}
	snprintf(p->name, sizeof(p->name), "%s", user);
	p->uid = pw->pw_uid;
	p->gid = pw->pw_gid;
	p->only_group = colon != NULL;
	if (colon && privdrop_group(colon + 1, &p->gid))
		return -EINVAL;
	p->set = true;
	return 0;
}

/* The ids are what was asked and root cannot come back. */
static int privdrop_verify(const struct privdrop *p)
{
	uid_t r, e, s;
	gid_t rg, eg, sg;

	if (getresuid(&r, &e, &s) || getresgid(&rg, &eg, &sg))
		return -errno;
	if (r != p->uid || e != p->uid || s != p->uid || rg != p->gid || eg != p->gid || sg != p->gid)
		return -EPERM;
	if (p->uid != 0 && (setuid(0) == 0 || seteuid(0) == 0))
		return -EPERM;
	return 0;
}

int privdrop_apply(const struct privdrop *p)
{
	int r = 0;

	if (!p->set)
		return 0;
	if (p->only_group ? setgroups(1, &p->gid) : initgroups(p->name, p->gid))
		r = -errno;
	if (!r && setgid(p->gid))
		r = -errno;
	if (!r && setuid(p->uid))
		r = -errno;
	if (!r)
		r = privdrop_verify(p);
	if (r) {
		devio_err("--user %s: cannot drop root: %s", p->name, strerror(-r));
		return r;
	}
	/* a core dump would hold image data; and no new privileges from exec */
	prctl(PR_SET_DUMPABLE, 0);
	prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
	devio_info("running as user %s (uid %u, gid %u)", p->name, (unsigned)p->uid, (unsigned)p->gid);
	return 0;
}

int privdrop_check_frontends(const struct privdrop *p, const struct serve_frontend *fe, size_t n)
{
	if (!p->set)
		return 0;
	for (size_t i = 0; i < n; i++) {
		const char *o = fe[i].type->option;

		if (!strcmp(o, "fuse") || !strcmp(o, "ublk")) {
			devio_err("--user: not with --%s: unmounting or deleting the device at exit needs root "
				  "(serve NBD or devio as the user, and attach as root)", o);
			return -EINVAL;
		}
	}
	return 0;
}
