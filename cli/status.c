/* status.c - `devio status [--json]`: every running devio server of this
 * user (of every user for root): its exports with absolute source paths
 * and their stacks, each front end with its address, connections and the
 * devices it made, pid and uptime.  Both sides are here: a server
 * publishes PID.json in its run directory (runstate_dir()) (status_publish(), written whole and
 * renamed into place), `devio status` reads every live one (entries of
 * servers that died are removed, cli/runstate.c) and prints it as text or
 * as one JSON document.  PID.status, the text file, stays for `devio
 * detach` and for servers of an older devio (printed as it is). */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "cli.h"
#include "devio/util.h"
#include "../lib/nbd_client.h"

/* ---- the server's side ---- */

static json_t *status_export(const struct devio_export *e)
{
	json_t *o = json_object();
	char fmt[256];

	cli_json_set_text(o, "name", e->name);
	cli_json_set_text(o, "source", e->source);
	json_object_set_new(o, "size", json_integer((json_int_t)e->backend->size));
	json_object_set_new(o, "read_only", json_boolean(e->backend->caps & DEVIO_CAP_READONLY));
	cli_format_name(e->backend, fmt, sizeof(fmt));
	json_object_set_new(o, "format", json_string(fmt));
	json_object_set_new(o, "stack", cli_json_stack(e->backend));
	return o;
}

static json_t *status_details(const struct serve_frontend *fe)
{
	json_t *lines = json_array();
	char *buf = NULL, *line, *save = NULL;
	size_t len = 0;
	FILE *f;

	if (!fe->type->status || !(f = open_memstream(&buf, &len)))
		return lines;
	fe->type->status(fe->state, f);
	fclose(f);
	for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
		json_array_append_new(lines, cli_json_text(line));
	free(buf);
	return lines;
}

static json_t *status_frontend(const struct serve_frontend *fe)
{
	struct devio_frontend_info *info = calloc(1, sizeof(*info));
	json_t *o = json_object();

	json_object_set_new(o, "type", json_string(fe->type->option));
	cli_json_set_text(o, "argument", fe->arg ? fe->arg : "");
	if (info && fe->type->info) {
		info->connections = -1;
		fe->type->info(fe->state, info);
		if (info->address[0])
			cli_json_set_text(o, "address", info->address);
		if (info->connections >= 0) {
			json_object_set_new(o, "connections", json_integer(info->connections));
			json_object_set_new(o, "served", json_integer((json_int_t)info->served));
		}
		if (info->device[0])
			cli_json_set_text(o, "device", info->device);
		if (info->mount[0])
			cli_json_set_text(o, "mount", info->mount);
	}
	free(info);
	json_object_set_new(o, "details", status_details(fe));
	return o;
}

/* Write root to a new file of mode 0600 whatever the umask: it names
 * the images and where they are served (docs/security.md). */
static int status_dump_private(json_t *root, const char *path)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600), r;

	if (fd < 0)
		return -errno;
	r = fchmod(fd, 0600) || json_dumpfd(root, fd, JSON_INDENT(1)) ? -EIO : 0;
	if (close(fd) && !r)
		r = -EIO;
	return r;
}

void cli_status_publish(struct devio_server *srv, struct serve_frontend *fe, size_t n, time_t started)
{
	json_t *root = json_object(), *exports = json_array(), *fes = json_array();
	char path[PATH_MAX + 32], tmp[PATH_MAX + 64];

	json_object_set_new(root, "pid", json_integer(getpid()));
	json_object_set_new(root, "uid", json_integer(getuid()));
	json_object_set_new(root, "start_ticks", json_integer((json_int_t)runstate_start_time(getpid())));
	json_object_set_new(root, "started", json_integer((json_int_t)started));
	for (size_t i = 0; i < srv->n_exports; i++)
		json_array_append_new(exports, status_export(&srv->exports[i]));
	for (size_t i = 0; i < n; i++)
		json_array_append_new(fes, status_frontend(&fe[i]));
	json_object_set_new(root, "exports", exports);
	json_object_set_new(root, "frontends", fes);
	snprintf(path, sizeof(path), "%s/%d.json", runstate_dir(), (int)getpid());
	snprintf(tmp, sizeof(tmp), "%s.tmp", path); /* readers never see half a file */
	if (status_dump_private(root, tmp) || rename(tmp, path))
		unlink(tmp);
	json_decref(root);
}

/* ---- devio status ---- */

struct status_ctx {
	bool json;
	json_t *servers; /* --json */
	int found;
};

static void status_uptime(long long secs, char *out, size_t outlen)
{
	if (secs < 0)
		secs = 0;
	if (secs >= 86400)
		snprintf(out, outlen, "%lldd%02lldh%02lldm", secs / 86400, secs / 3600 % 24, secs / 60 % 60);
	else if (secs >= 3600)
		snprintf(out, outlen, "%lldh%02lldm%02llds", secs / 3600, secs / 60 % 60, secs % 60);
	else if (secs >= 60)
		snprintf(out, outlen, "%lldm%02llds", secs / 60, secs % 60);
	else
		snprintf(out, outlen, "%llds", secs);
}

/* The text of o[key], escaped for a terminal: the exact bytes of
 * key_hex where the publisher had to write them so. */
static const char *status_str(json_t *o, const char *key, char *out, size_t outlen)
{
	char hex_key[64], *raw;
	const char *s = json_string_value(json_object_get(o, key)), *hex;
	size_t n;

	snprintf(hex_key, sizeof(hex_key), "%s_hex", key);
	hex = json_string_value(json_object_get(o, hex_key));
	if (!hex || (n = strlen(hex) / 2) == 0 || !(raw = calloc(1, n + 1)))
		return cli_text_escape(s ? s : "", out, outlen);
	for (size_t i = 0; i < n; i++) {
		unsigned v = 0;

		sscanf(hex + 2 * i, "%2x", &v);
		raw[i] = v ? (char)v : '?';
	}
	cli_text_escape(raw, out, outlen);
	free(raw);
	return out;
}

static void status_text_export(json_t *e)
{
	static char a[PATH_MAX * 4], b[PATH_MAX * 4];
	size_t i;
	json_t *l;

	printf("export '%s' %s\n", status_str(e, "name", a, sizeof(a)), status_str(e, "source", b, sizeof(b)));
	printf("  size %lld, format %s%s\n", (long long)json_integer_value(json_object_get(e, "size")),
	       status_str(e, "format", a, sizeof(a)), json_is_true(json_object_get(e, "read_only")) ? ", read-only" : "");
	json_array_foreach(json_object_get(e, "stack"), i, l)
		printf("  %s: %s\n", status_str(l, "layer", a, sizeof(a)), status_str(l, "description", b, sizeof(b)));
}

static void status_text_frontend(json_t *f)
{
	static char a[PATH_MAX * 4], b[PATH_MAX * 4];
	json_t *c = json_object_get(f, "connections"), *l;
	size_t i;

	printf("frontend --%s %s\n", status_str(f, "type", a, sizeof(a)), status_str(f, "argument", b, sizeof(b)));
	if (json_object_get(f, "address"))
		printf("  address %s\n", status_str(f, "address", a, sizeof(a)));
	if (c)
		printf("  connections %lld (%lld served)\n", (long long)json_integer_value(c),
		       (long long)json_integer_value(json_object_get(f, "served")));
	if (json_object_get(f, "mount"))
		printf("  mount %s\n", status_str(f, "mount", a, sizeof(a)));
	if (json_object_get(f, "device"))
		printf("  device %s\n", status_str(f, "device", a, sizeof(a)));
	json_array_foreach(json_object_get(f, "details"), i, l)
		printf("%s\n", json_string_value(l) ? json_string_value(l) : "");
}

static void status_text(json_t *s)
{
	json_t *v;
	size_t i;
	char up[32];

	status_uptime(json_integer_value(json_object_get(s, "uptime")), up, sizeof(up));
	printf("pid %lld\nuptime %s\nuid %lld\n", (long long)json_integer_value(json_object_get(s, "pid")), up,
	       (long long)json_integer_value(json_object_get(s, "uid")));
	json_array_foreach(json_object_get(s, "exports"), i, v)
		status_text_export(v);
	json_array_foreach(json_object_get(s, "frontends"), i, v)
		status_text_frontend(v);
}

/* A server of an older devio: its text file as it is. */
static void status_legacy(const struct run_server *s)
{
	char line[1024];
	FILE *f = fopen(s->status_path, "re");

	while (f && fgets(line, sizeof(line), f))
		fputs(line, stdout);
	if (f)
		fclose(f);
}

static bool status_one(const struct run_server *s, void *ctx)
{
	struct status_ctx *c = ctx;
	char path[PATH_MAX + 32];
	json_t *j;

	if (!s->alive)
		return false;
	snprintf(path, sizeof(path), "%s/%d.json", s->dir, (int)s->pid);
	j = json_load_file(path, 0, NULL);
	if (j && getuid() != 0 && json_integer_value(json_object_get(j, "uid")) != (json_int_t)getuid()) {
		json_decref(j); /* another user's */
		return false;
	}
	if (!j && c->json)
		return false;
	if (c->found++ && !c->json)
		putchar('\n');
	if (!j) {
		status_legacy(s);
		return false;
	}
	json_object_set_new(j, "uptime", json_integer((json_int_t)time(NULL) -
						      json_integer_value(json_object_get(j, "started"))));
	if (c->json)
		json_array_append(c->servers, j);
	else
		status_text(j);
	json_decref(j);
	return false;
}

json_t *cli_status_servers(void)
{
	struct status_ctx c = { .json = true, .servers = json_array() };

	runstate_each(status_one, &c);
	return c.servers;
}

void cli_status_print(json_t *server)
{
	status_text(server);
}

/* ---- devio info URI: the server behind it ---- */

/* Where uri connects: its address and the front end that serves it. */
static int status_uri_addr(const char *uri, struct devio_addr *a, const char **type)
{
	struct devio_nbd_uri *u;
	char spec[PATH_MAX + 8];
	size_t n = strcspn(uri, "?");
	int r;

	*type = "devio";
	if (!strncmp(uri, "devio://", 8) || !strncmp(uri, "devio+tls://", 12)) {
		const char *hp = uri + (uri[5] == '+' ? 12 : 8);
		const char *at = memchr(hp, '@', strcspn(hp, "/?"));

		hp = at ? at + 1 : hp; /* devio+tls://USER@HOST */
		snprintf(spec, sizeof(spec), "tcp:%.*s", (int)strcspn(hp, "/?"), hp);
		return devio_addr_parse(spec, "9000", a);
	}
	if (!strncmp(uri, "devio+unix://", 13)) {
		snprintf(spec, sizeof(spec), "unix:%.*s", (int)(n - 13), uri + 13);
		return devio_addr_parse(spec, NULL, a);
	}
	if (!devio_nbd_uri_is_nbd(uri) || !(u = calloc(1, sizeof(*u))))
		return -EINVAL;
	*type = "nbd";
	r = devio_nbd_uri_parse(uri, u, NULL, 0);
	*a = u->addr;
	free(u);
	return r;
}

static bool status_loopback(const char *host)
{
	return !host[0] || !strcmp(host, "*") || !strcmp(host, "localhost") || !strncmp(host, "127.", 4) ||
	       !strcmp(host, "::1");
}

/* Does the front end's address (as devio_addr_format wrote it) take a
 * connection to want?  Unix sockets: the same file; TCP: the same port
 * on the same host, loopback names all being this machine. */
static bool status_addr_match(const char *address, const struct devio_addr *want)
{
	struct devio_addr have;
	struct stat sa, sb;
	char tcp[sizeof(((struct devio_frontend_info *)0)->address)];

	if (!strncmp(address, "tls:", 4)) { /* --devio tls: is a TCP address */
		snprintf(tcp, sizeof(tcp), "tcp:%s", address + 4);
		address = tcp;
	}
	if (devio_addr_parse(address, NULL, &have) || have.kind != want->kind)
		return false;
	if (have.kind == DEVIO_ADDR_UNIX)
		return !strcmp(have.path, want->path) ||
		       (!stat(have.path, &sa) && !stat(want->path, &sb) && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino);
	if (have.kind != DEVIO_ADDR_TCP || strcmp(have.port, want->port))
		return false;
	return !strcmp(have.host, want->host) || !strcmp(have.host, "*") || !strcmp(have.host, "::") ||
	       (status_loopback(have.host) && status_loopback(want->host));
}

json_t *cli_status_find_uri(const char *uri)
{
	json_t *servers, *srv, *fe, *found = NULL;
	struct devio_addr want;
	const char *type;
	size_t i, k;

	if (status_uri_addr(uri, &want, &type))
		return NULL;
	servers = cli_status_servers();
	json_array_foreach(servers, i, srv) {
		json_array_foreach(json_object_get(srv, "frontends"), k, fe) {
			const char *addr = json_string_value(json_object_get(fe, "address"));

			if (!found && addr && !strcmp(json_string_value(json_object_get(fe, "type")), type) &&
			    status_addr_match(addr, &want))
				found = json_incref(srv);
		}
	}
	json_decref(servers);
	return found;
}

/* The export's source as bytes (exact: from source_hex when there is
 * one); NULL if it is not a local file (a URI, ram:) or sits under an
 * overlay (writes to it never reach the file). */
static char *status_export_file(json_t *e)
{
	const char *s = json_string_value(json_object_get(e, "source"));
	const char *hex = json_string_value(json_object_get(e, "source_hex"));
	const char *fmt = json_string_value(json_object_get(e, "format"));
	char *out;

	if (!s || (fmt && strstr(fmt, "cow")) || s[0] != '/')
		return NULL;
	if (!hex)
		return strdup(s);
	if (!(out = calloc(1, strlen(hex) / 2 + 1)))
		return NULL;
	for (size_t i = 0; i < strlen(hex) / 2; i++) {
		unsigned v = 0;

		sscanf(hex + 2 * i, "%2x", &v);
		out[i] = (char)v;
	}
	return out;
}

char *cli_status_local_file(const char *uri)
{
	json_t *srv = cli_status_find_uri(uri), *e;
	struct devio_nbd_uri *u = NULL;
	const char *want = "";
	char *file = NULL;
	size_t i;

	if (!srv)
		return NULL;
	if (devio_nbd_uri_is_nbd(uri) && (u = calloc(1, sizeof(*u))) && !devio_nbd_uri_parse(uri, u, NULL, 0))
		want = u->export;
	json_array_foreach(json_object_get(srv, "exports"), i, e) {
		const char *name = json_string_value(json_object_get(e, "name"));

		if (!file && name && !strcmp(name, want))
			file = status_export_file(e);
	}
	free(u);
	json_decref(srv);
	return file;
}

static void status_usage(FILE *out)
{
	fprintf(out, "usage: devio status [--json]\n"
		     "  every running devio server of this user (of all users for root): exports and their\n"
		     "  stacks, front ends with addresses, connections and devices, pid and uptime\n");
}

int cmd_status(int argc, char **argv)
{
	static const struct option opts[] = { { "json", no_argument, NULL, 'j' }, CLI_STD_OPTIONS, { 0 } };
	struct status_ctx c = { 0 };
	int ch, r = 0;

	optind = 1;
	while ((ch = cli_getopt("status", argc, argv, "jhV", opts, status_usage)) != -1)
		c.json = true;
	if (optind != argc)
		return cli_usage_error("status", "unexpected argument '%s'", argv[optind]);
	if (c.json) {
		json_t *root = json_object();

		c.servers = cli_status_servers();
		json_object_set_new(root, "servers", c.servers);
		r = json_dumpf(root, stdout, JSON_INDENT(2)) || fputc('\n', stdout) == EOF;
		json_decref(root);
		return r ? 1 : 0;
	}
	runstate_each(status_one, &c);
	if (!c.found)
		printf("no devio server running\n");
	return 0;
}
