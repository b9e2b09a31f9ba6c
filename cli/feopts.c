/* feopts.c - the front ends named on one command line and their options.
 *
 * `devio serve`, `devio attach` and the ImDisk command line build their
 * getopt tables and usage text from the front ends' registrations
 * (struct devio_frontend_type in include/devio/frontend.h): --NAME starts
 * a front end, and each option a front end declares is parsed by that
 * front end's callback into its own options struct, which its start()
 * receives.  An option several front ends declare (--depth) goes to each
 * of them.  The serving options (--threads) are the core's run policy and
 * go to struct devio_serve_opts.
 *
 * getopt codes: the command's own below FEOPTS_CODE_BASE, then one per
 * offered front end, one per option name, one per serving option. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "cli.h"
#include "devio/util.h"

#define FEOPTS_START_CODE FEOPTS_CODE_BASE
#define FEOPTS_NAME_CODE (FEOPTS_CODE_BASE + 0x100)
#define FEOPTS_SERVING_CODE (FEOPTS_CODE_BASE + 0x200)
#define FEOPTS_HELP_COLUMN 25

static const struct devio_frontend_option feopts_serving[] = {
	{ "threads", "N", "the core's pool for backends that wait (default 8; 1: all inline); --fuse over "
			  "/dev/fuse: its readers",
	  devio_opt_uint, offsetof(struct devio_serve_opts, threads) },
	{ NULL },
};

static size_t feopts_count(const struct devio_frontend_option *o)
{
	size_t n = 0;

	while (o && o[n].name)
		n++;
	return n;
}

static int feopts_name_index(const struct feopts *f, const char *name)
{
	for (size_t j = 0; j < f->n_names; j++)
		if (!strcmp(f->names[j], name))
			return (int)j;
	return -1;
}

static bool feopts_declares(const struct devio_frontend_type *t, const char *name)
{
	for (size_t k = 0; t->options && t->options[k].name; k++)
		if (!strcmp(t->options[k].name, name))
			return true;
	return false;
}

static const struct option *feopts_find(const struct option *table, size_t n, const char *name)
{
	for (size_t i = 0; i < n; i++)
		if (!strcmp(table[i].name, name))
			return &table[i];
	return NULL;
}

/* Append one getopt entry; two options of one command never share a name. */
static int feopts_append(struct feopts *f, size_t *n, struct option o)
{
	if (feopts_find(f->table, *n, o.name)) {
		devio_err("--%s: declared twice for this command", o.name);
		return -EINVAL;
	}
	f->table[(*n)++] = o;
	return 0;
}

/* A front end's option: a new name, or one another front end declared
 * already (then both must agree on taking an argument). */
static int feopts_add_name(struct feopts *f, size_t *n, const struct devio_frontend_option *o)
{
	const struct option *seen = feopts_find(f->table, *n, o->name);
	int has_arg = !o->arg ? no_argument : o->arg_optional ? optional_argument : required_argument;

	if (seen && seen->val >= FEOPTS_NAME_CODE && seen->val < FEOPTS_SERVING_CODE) {
		if (seen->has_arg == has_arg)
			return 0;
		devio_err("front ends disagree whether --%s takes an argument", o->name);
		return -EINVAL;
	}
	if (feopts_append(f, n, (struct option){ o->name, has_arg, NULL, FEOPTS_NAME_CODE + (int)f->n_names }))
		return -EINVAL;
	f->names[f->n_names++] = o->name;
	return 0;
}

static int feopts_build_table(struct feopts *f, const struct option *own, size_t n_own, size_t n_opts)
{
	size_t n = 0;
	int r = 0;

	f->table = calloc(n_own + f->n_types + n_opts + feopts_count(feopts_serving) + 1, sizeof(*f->table));
	f->names = calloc(n_opts + 1, sizeof(*f->names));
	f->given = calloc(n_opts + 1, sizeof(*f->given));
	if (!f->table || !f->names || !f->given)
		return -ENOMEM;
	for (size_t k = 0; k < n_own && !r; k++)
		r = own[k].val < FEOPTS_CODE_BASE ? feopts_append(f, &n, own[k]) : -EINVAL;
	for (size_t i = 0; i < f->n_types && !r; i++)
		r = feopts_append(f, &n, (struct option){ f->types[i]->option,
							  f->types[i]->arg_optional ? optional_argument : required_argument,
							  NULL, FEOPTS_START_CODE + (int)i });
	for (size_t k = 0; feopts_serving[k].name && !r; k++)
		r = feopts_append(f, &n, (struct option){ feopts_serving[k].name, required_argument, NULL,
							  FEOPTS_SERVING_CODE + (int)k });
	/* the front ends' options last: their names index f->names */
	for (size_t i = 0; i < f->n_types && !r; i++)
		for (size_t k = 0; f->types[i]->options && f->types[i]->options[k].name && !r; k++)
			r = feopts_add_name(f, &n, &f->types[i]->options[k]);
	return r;
}

/* The offered types and an options struct for each. */
static int feopts_take_types(struct feopts *f, const struct devio_frontend_type *const *types, size_t *n_opts)
{
	for (; types[f->n_types]; f->n_types++) {
		const struct devio_frontend_type *t = types[f->n_types];

		if (f->n_types == FEOPTS_MAX_TYPES) {
			devio_err("more than %d front ends", FEOPTS_MAX_TYPES);
			return -EINVAL;
		}
		if (t->options && !t->opts_size) {
			devio_err("--%s: options but no options struct", t->option);
			return -EINVAL;
		}
		f->types[f->n_types] = t;
		*n_opts += feopts_count(t->options);
		if (t->opts_size && !(f->opts[f->n_types] = calloc(1, t->opts_size)))
			return -ENOMEM;
	}
	return 0;
}

int feopts_init(struct feopts *f, const struct devio_frontend_type *const *types, const struct option *own)
{
	size_t n_own = 0, n_opts = 0;
	int r;

	memset(f, 0, sizeof(*f));
	while (own && own[n_own].name)
		n_own++;
	r = feopts_take_types(f, types, &n_opts);
	if (!r)
		r = feopts_build_table(f, own, n_own, n_opts);
	if (r)
		feopts_free(f);
	return r;
}

static int feopts_set_index(struct feopts *f, size_t j, const char *val)
{
	f->given[j] = true;
	for (size_t i = 0; i < f->n_types; i++) {
		const struct devio_frontend_option *o = f->types[i]->options;

		for (size_t k = 0; o && o[k].name; k++) {
			int r;

			if (strcmp(o[k].name, f->names[j]))
				continue;
			r = o[k].parse(o[k].name, val, (char *)f->opts[i] + o[k].offset);
			if (r)
				return r; /* logged; one message even if several declare it */
		}
	}
	return 0;
}

static int feopts_set_serving(struct feopts *f, size_t k, const char *val)
{
	return feopts_serving[k].parse(feopts_serving[k].name, val, (char *)&f->serve + feopts_serving[k].offset);
}

int feopts_add(struct feopts *f, const struct devio_frontend_type *type, const char *arg)
{
	for (size_t i = 0; i < f->n_types; i++) {
		if (f->types[i] != type)
			continue;
		if (f->n_fe == FEOPTS_MAX_FRONTENDS) {
			devio_err("too many front ends (at most %d)", FEOPTS_MAX_FRONTENDS);
			return -E2BIG;
		}
		const struct devio_frontend_type *v = type->variant ? type->variant(arg) : NULL;

		if ((v ? v : type)->check && (v ? v : type)->check(arg))
			return -EINVAL; /* said why: a usage error */
		f->named[i] = true;
		/* a variant gets the options struct of the type it varies */
		f->fe[f->n_fe++] = (struct serve_frontend){ .type = v ? v : type, .arg = arg, .opts = f->opts[i] };
		return 0;
	}
	devio_err("--%s: not a front end of this command", type->option);
	return -EINVAL;
}

int feopts_set(struct feopts *f, const char *name, const char *val)
{
	int j = feopts_name_index(f, name);

	if (j >= 0)
		return feopts_set_index(f, (size_t)j, val);
	for (size_t k = 0; feopts_serving[k].name; k++)
		if (!strcmp(feopts_serving[k].name, name))
			return feopts_set_serving(f, k, val);
	devio_err("--%s: no front end of this command has this option", name);
	return -EINVAL;
}

int feopts_parse(struct feopts *f, int code, const char *val)
{
	int i = code - FEOPTS_START_CODE, j = code - FEOPTS_NAME_CODE, k = code - FEOPTS_SERVING_CODE;

	if (i >= 0 && (size_t)i < f->n_types)
		return feopts_add(f, f->types[i], val);
	if (j >= 0 && (size_t)j < f->n_names)
		return feopts_set_index(f, (size_t)j, val);
	if (k >= 0 && (size_t)k < feopts_count(feopts_serving))
		return feopts_set_serving(f, (size_t)k, val);
	return 1;
}

void feopts_list(const struct feopts *f, const char *name, char *out, size_t outlen)
{
	size_t n = 0, total = 0, seen = 0;

	for (size_t i = 0; i < f->n_types; i++)
		total += !name || feopts_declares(f->types[i], name);
	out[0] = '\0';
	for (size_t i = 0; i < f->n_types && n < outlen; i++) {
		if (name && !feopts_declares(f->types[i], name))
			continue;
		seen++;
		n += (size_t)snprintf(out + n, outlen - n, "%s--%s", seen == 1 ? "" : seen == total ? " or " : ", ",
				      f->types[i]->option);
	}
}

/* Does a front end named on the command line use option name: its type
 * declares it and takes it on that argument (type->uses)?  If not, *idle
 * is one named with it declared but not used there (or left NULL), and
 * *idle_type its type. */
static bool feopts_used(const struct feopts *f, const char *name, const struct serve_frontend **idle,
			const struct devio_frontend_type **idle_type)
{
	*idle = NULL;
	for (size_t i = 0; i < f->n_types; i++) {
		const struct devio_frontend_type *t = f->types[i];

		if (!f->named[i] || !feopts_declares(t, name))
			continue;
		if (!t->uses)
			return true;
		for (size_t k = 0; k < f->n_fe; k++) { /* its front ends have its options struct */
			if (f->fe[k].opts != f->opts[i])
				continue;
			if (t->uses(f->fe[k].arg, name))
				return true;
			if (!*idle)
				*idle = &f->fe[k], *idle_type = t;
		}
	}
	return false;
}

void feopts_finish(struct feopts *f)
{
	for (size_t j = 0; j < f->n_names; j++) {
		const struct devio_frontend_type *t = NULL;
		const struct serve_frontend *idle;
		char who[256];

		if (!f->given[j] || feopts_used(f, f->names[j], &idle, &t))
			continue;
		if (idle) {
			devio_warn("--%s has no effect on --%s %s, and no other front end here uses it", f->names[j],
				   t->option, idle->arg ? idle->arg : "");
			continue;
		}
		feopts_list(f, f->names[j], who, sizeof(who));
		devio_warn("--%s has no effect without %s", f->names[j], who);
	}
}

/* "--name ARG" (or "--name[=ARG]") and its help, aligned. */
static void feopts_line(FILE *out, int indent, const char *name, const char *arg, bool optional,
			const char *help)
{
	char left[256];
	int n = snprintf(left, sizeof(left), "%*s--%s%s%s%s", indent, "", name,
			 !arg ? "" : optional ? "[=" : " ", arg ? arg : "", arg && optional ? "]" : "");

	if (n < FEOPTS_HELP_COLUMN - 1)
		fprintf(out, "%-*s%s\n", FEOPTS_HELP_COLUMN, left, help ? help : "");
	else
		fprintf(out, "%s\n%*s%s\n", left, FEOPTS_HELP_COLUMN, "", help ? help : "");
}

void feopts_usage_frontends(const struct feopts *f, FILE *out)
{
	for (size_t i = 0; i < f->n_types; i++) {
		const struct devio_frontend_type *t = f->types[i];

		feopts_line(out, 2, t->option, t->arg_help, t->arg_optional, t->help);
		for (size_t k = 0; t->options && t->options[k].name; k++)
			feopts_line(out, 4, t->options[k].name, t->options[k].arg, t->options[k].arg_optional,
				    t->options[k].help);
	}
}

void feopts_usage_serving(FILE *out)
{
	for (size_t k = 0; feopts_serving[k].name; k++)
		feopts_line(out, 2, feopts_serving[k].name, feopts_serving[k].arg, false, feopts_serving[k].help);
}

void feopts_free(struct feopts *f)
{
	for (size_t i = 0; i < f->n_types; i++)
		free(f->opts[i]);
	free(f->table);
	free(f->names);
	free(f->given);
	memset(f, 0, sizeof(*f));
}
