/* describe.c - how the command line describes what it finds, for `devio
 * info`, `devio status` and `devio list`: JSON text for any bytes (a path
 * need not be UTF-8: docs/cli.md), the same bytes escaped for a terminal,
 * and a stack of layers. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "cli.h"
#include "devio/layer.h"

/* The length of the valid UTF-8 sequence at s, 0 if there is none. */
static size_t describe_utf8_len(const unsigned char *s)
{
	size_t n = s[0] < 0x80 ? 1 : s[0] >= 0xc2 && s[0] < 0xe0 ? 2 : s[0] >= 0xe0 && s[0] < 0xf0 ? 3 :
		   s[0] >= 0xf0 && s[0] < 0xf5 ? 4 : 0;
	uint32_t cp = n == 1 ? s[0] : n == 2 ? s[0] & 0x1f : n == 3 ? s[0] & 0x0f : s[0] & 0x07;

	for (size_t i = 1; i < n; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (s[i] & 0x3f);
	}
	if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp < 0xe000))) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)))
		return 0;
	return n;
}

/* A JSON string for any bytes (a path may be no UTF-8 at all): what is
 * not valid UTF-8 becomes U+FFFD; *exact says whether nothing was. */
static json_t *describe_json_text(const char *s, bool *exact)
{
	size_t len = strlen(s), o = 0;
	char *copy;
	json_t *j;

	*exact = true;
	if ((j = json_string(s)))
		return j;
	copy = malloc(len * 3 + 1);
	if (!copy)
		return NULL;
	for (const unsigned char *p = (const unsigned char *)s; *p;) {
		size_t n = describe_utf8_len(p);

		if (n) {
			memcpy(copy + o, p, n);
			o += n;
			p += n;
			continue;
		}
		memcpy(copy + o, "\xef\xbf\xbd", 3);
		o += 3;
		p++;
		*exact = false;
	}
	j = json_stringn(copy, o);
	free(copy);
	return j;
}

/* The bytes of s in hex, for a name that JSON text cannot hold exactly. */
static json_t *describe_json_hex(const char *s)
{
	size_t len = strlen(s);
	char *hex = malloc(len * 2 + 1);
	json_t *j;

	if (!hex)
		return NULL;
	for (size_t i = 0; i < len; i++)
		snprintf(hex + 2 * i, 3, "%02x", (unsigned char)s[i]);
	j = json_string(hex);
	free(hex);
	return j;
}

/* "qcow2", "cow over raw", "cow over vhd": the layers from the top, then
 * raw when no format layer reads the store. */
void cli_format_name(struct devio_backend *b, char *out, size_t outlen)
{
	const char *last = NULL;
	size_t o = 0;

	out[0] = '\0';
	for (; b->lower && o < outlen; b = b->lower) {
		last = b->ops->name ? b->ops->name : "layer";
		o += (size_t)snprintf(out + o, outlen - o, "%s%s", o ? " over " : "", last);
	}
	if (o < outlen && (!last || (strcmp(last, "vhd") && strcmp(last, "qcow2"))))
		snprintf(out + o, outlen - o, "%sraw", o ? " over " : "");
}


json_t *cli_json_text(const char *s)
{
	bool exact;

	return describe_json_text(s, &exact);
}

void cli_json_set_text(json_t *obj, const char *key, const char *s)
{
	bool exact;
	char hex_key[64];

	json_object_set_new(obj, key, describe_json_text(s, &exact));
	if (exact)
		return;
	snprintf(hex_key, sizeof(hex_key), "%s_hex", key);
	json_object_set_new(obj, hex_key, describe_json_hex(s));
}

const char *cli_text_escape(const char *s, char *out, size_t outlen)
{
	size_t o = 0;

	for (const unsigned char *p = (const unsigned char *)s; *p && o + 5 < outlen;) {
		size_t n = describe_utf8_len(p);

		if (n > 1 || (n == 1 && *p >= 0x20 && *p != 0x7f && *p != '\\')) {
			memcpy(out + o, p, n);
			o += n;
			p += n;
			continue;
		}
		o += (size_t)snprintf(out + o, outlen - o, *p == '\n' ? "\\n" : *p == '\\' ? "\\\\" : "\\x%02x", *p);
		p++;
	}
	out[o] = '\0';
	return out;
}

json_t *cli_json_stack(struct devio_backend *b)
{
	json_t *stack = json_array();
	char desc[1024];

	for (struct devio_backend *l = b; l; l = l->lower) {
		json_t *e = json_object();

		desc[0] = '\0';
		if (l->ops->describe)
			l->ops->describe(l, desc, sizeof(desc));
		json_object_set_new(e, "layer", json_string(l->ops->name ? l->ops->name : "layer"));
		json_object_set_new(e, "size", json_integer((json_int_t)l->size));
		cli_json_set_text(e, "description", desc);
		json_array_append_new(stack, e);
	}
	return stack;
}
