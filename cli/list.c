/* list.c - `devio list URI`: the exports a server offers, as `nbdinfo
 * --list` shows them.  An NBD server is asked with NBD_OPT_LIST
 * (lib/nbd_client.c); a devio server has exactly one export (the devio
 * protocol names none), which is said, after checking that it answers. */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "cli.h"
#include "devio/backend.h"
#include "devio/util.h"
#include "../lib/nbd_client.h"

static void list_usage(FILE *out)
{
	fprintf(out, "usage: devio list URI [--json]\n"
		     "  the exports of an NBD server (NBD_OPT_LIST), each with its description;\n"
		     "  a devio:// server has exactly one export\n");
}

struct list_out {
	const char *uri;
	json_t *exports; /* --json: the array; NULL: text */
	unsigned n;
};

static int list_one(void *ctx, const char *name, const char *desc)
{
	struct list_out *l = ctx;
	char n[3 * 4096 + 16], d[3 * 4096 + 16];

	if (!l->n++ && !l->exports)
		printf("%s:\n", l->uri); /* once the server answered */
	if (l->exports) {
		json_t *e = json_object();

		cli_json_set_text(e, "name", name);
		cli_json_set_text(e, "description", desc);
		json_array_append_new(l->exports, e);
		return 0;
	}
	printf("export '%s'%s\n", cli_text_escape(name, n, sizeof(n)), name[0] ? "" : " (the default export)");
	if (desc[0])
		printf("  description: %s\n", cli_text_escape(desc, d, sizeof(d)));
	return 0;
}

/* DEVIO_REMOTE_TIMEOUT=SECONDS bounds the exchange as it bounds nbd://'s handshake. */
static unsigned list_timeout(void)
{
	const char *e = getenv("DEVIO_REMOTE_TIMEOUT");
	uint64_t v;

	return e && !devio_parse_u64(e, &v) && v >= 1 && v <= 86400 ? (unsigned)v : 0;
}

static int list_nbd(const char *uri, struct list_out *l)
{
	struct devio_nbd_uri *u = calloc(1, sizeof(*u));
	char why[256];
	int r;

	if (!u)
		return -ENOMEM;
	if ((r = devio_nbd_uri_parse(uri, u, why, sizeof(why)))) {
		devio_err("list: %s: %s", uri, why);
		free(u);
		return r;
	}
	r = devio_nbd_client_list_uri(u, uri, list_timeout(), list_one, l);
	free(u);
	return r;
}

/* devio://: one export, no name; opened to see that it answers. */
static int list_devio(const char *uri, struct list_out *l)
{
	struct devio_open_opts o = { .readonly = true };
	struct devio_backend *b;
	int r = devio_backend_open(uri, &o, &b);

	if (r)
		return r;
	devio_backend_close(b);
	if (!l->exports)
		printf("%s: one export (the devio protocol has no export names; see devio info %s)\n", uri, uri);
	return l->exports ? list_one(l, "", "") : 0;
}

int cmd_list(int argc, char **argv)
{
	static const struct option opts[] = { { "json", no_argument, NULL, 'j' }, CLI_STD_OPTIONS, { 0 } };
	struct list_out l = { 0 };
	bool json = false, devio;
	int c, r;

	optind = 1;
	while ((c = cli_getopt("list", argc, argv, "jhV", opts, list_usage)) != -1)
		if (c == 'j')
			json = true;
	if (optind != argc - 1)
		return cli_usage_error("list", "want one URI");
	l.uri = argv[optind];
	devio = !strncmp(l.uri, "devio://", 8) || !strncmp(l.uri, "devio+", 6);
	if (!devio && !devio_nbd_uri_is_nbd(l.uri))
		return cli_usage_error("list", "'%s' is no server URI (nbd://, nbd+unix://, devio://, devio+tls://, devio+unix://)",
				       l.uri);
	if (json)
		l.exports = json_array();
	r = devio ? list_devio(l.uri, &l) : list_nbd(l.uri, &l);
	if (!r && !json && !devio && !l.n)
		printf("%s: no exports listed\n", l.uri);
	if (!r && json) {
		json_t *root = json_object();

		cli_json_set_text(root, "uri", l.uri);
		json_object_set_new(root, "protocol", json_string(devio ? "devio" : "nbd"));
		json_object_set_new(root, "exports", l.exports);
		l.exports = NULL;
		r = json_dumpf(root, stdout, JSON_INDENT(2)) || fputc('\n', stdout) == EOF ? -EIO : 0;
		json_decref(root);
	}
	json_decref(l.exports);
	return r ? 1 : 0;
}
