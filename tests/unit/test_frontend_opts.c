/* test_frontend_opts.c - the front ends' option tables (frontends/registry.c)
 * and the command line built from them (cli/feopts.c): every registered
 * table is sound, an option several front ends declare reaches each of
 * them, a getopt_long run starts front ends with their own options. */
#include <errno.h>
#include <getopt.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>
#include "cli.h"
#include "devio/frontend.h"

static size_t type_index(const struct feopts *f, const struct devio_frontend_type *t)
{
	for (size_t i = 0; i < f->n_types; i++)
		if (f->types[i] == t)
			return i;
	fail_msg("--%s not offered", t->option);
	return 0;
}

/* Where option name of type t lands in t's options struct in f. */
static const void *field(const struct feopts *f, const struct devio_frontend_type *t, const char *name)
{
	for (size_t k = 0; t->options[k].name; k++)
		if (!strcmp(t->options[k].name, name))
			return (const char *)f->opts[type_index(f, t)] + t->options[k].offset;
	fail_msg("--%s has no --%s", t->option, name);
	return NULL;
}

static unsigned uint_field(const struct feopts *f, const struct devio_frontend_type *t, const char *name)
{
	return *(const unsigned *)field(f, t, name);
}

static void test_registry_is_sound(void **state)
{
	size_t n = 0;

	for (; devio_frontends[n]; n++) {
		const struct devio_frontend_type *t = devio_frontends[n];

		assert_ptr_equal(devio_frontend_find(t->option), t);
		assert_non_null(t->help);
		assert_non_null(t->start);
		assert_non_null(t->stop);
		for (size_t k = 0; t->options && t->options[k].name; k++) {
			const struct devio_frontend_option *o = &t->options[k];

			assert_non_null(o->help);
			assert_non_null(o->parse);
			assert_true(o->offset < t->opts_size);
			for (size_t l = 0; l < k; l++) /* declared once per front end */
				assert_string_not_equal(t->options[l].name, o->name);
		}
	}
	assert_int_equal(n, 4);
	assert_null(devio_frontend_find("no-such-front-end"));
}

static void test_value_parsers(void **state)
{
	unsigned u = 7;
	uint32_t bs = 0;
	bool flag = false;

	assert_int_equal(devio_opt_uint("depth", "0", &u), 0);
	assert_int_equal(u, 0); /* 0 = the front end's default */
	assert_int_equal(devio_opt_uint("depth", "1048576", &u), 0);
	assert_int_equal(devio_opt_uint("depth", "1048577", &u), -EINVAL);
	assert_int_equal(devio_opt_uint("depth", "x", &u), -EINVAL);
	assert_int_equal(devio_opt_uint("depth", NULL, &u), -EINVAL);
	assert_int_equal(u, 1048576);
	assert_int_equal(devio_opt_block_size("block-size", "4K", &bs), 0);
	assert_int_equal(bs, 4096);
	assert_int_equal(devio_opt_block_size("block-size", "256", &bs), -EINVAL);
	assert_int_equal(devio_opt_block_size("block-size", "3000", &bs), -EINVAL);
	assert_int_equal(devio_opt_block_size("block-size", "128K", &bs), -EINVAL);
	assert_int_equal(bs, 4096);
	assert_int_equal(devio_opt_flag("loop", NULL, &flag), 0);
	assert_true(flag);
}

static void test_shared_option_reaches_each(void **state)
{
	struct feopts f;
	char who[128];

	assert_int_equal(feopts_init(&f, devio_frontends, NULL), 0);
	assert_int_equal(feopts_set(&f, "depth", "7"), 0);
	assert_int_equal(uint_field(&f, &devio_frontend_nbd, "depth"), 7);
	assert_int_equal(uint_field(&f, &devio_frontend_fuse, "depth"), 7);
	assert_int_equal(uint_field(&f, &devio_frontend_ublk, "depth"), 7);
	assert_int_equal(feopts_set(&f, "depth", "seven"), -EINVAL);
	assert_int_equal(feopts_set(&f, "no-such-option", "1"), -EINVAL);
	assert_int_equal(feopts_set(&f, "threads", "3"), 0);
	assert_int_equal(f.serve.threads, 3);
	feopts_list(&f, "depth", who, sizeof(who));
	assert_string_equal(who, "--nbd, --fuse or --ublk");
	feopts_list(&f, "loop", who, sizeof(who));
	assert_string_equal(who, "--fuse");
	feopts_free(&f);
}

static void test_getopt_starts_front_ends(void **state)
{
	static const struct option own[] = { { "readonly", no_argument, NULL, 'r' }, { NULL, 0, NULL, 0 } };
	char *argv[] = { "serve", "--nbd", "unix:/s", "--ublk", "--depth", "9", "-r", "--fuse", "/m",
			 "--loop", "--ublk=3,user-copy", "img", NULL };
	int argc = (int)(sizeof(argv) / sizeof(argv[0])) - 1, c, own_seen = 0;
	struct feopts f;

	assert_int_equal(feopts_init(&f, devio_frontends, own), 0);
	optind = 1;
	while ((c = getopt_long(argc, argv, "r", f.table, NULL)) != -1) {
		int r = feopts_parse(&f, c, optarg);

		if (r == 1) {
			assert_int_equal(c, 'r'); /* the command's own */
			own_seen++;
		} else {
			assert_int_equal(r, 0);
		}
	}
	assert_int_equal(own_seen, 1);
	assert_int_equal(optind, argc - 1);
	assert_int_equal(f.n_fe, 4);
	assert_ptr_equal(f.fe[0].type, &devio_frontend_nbd);
	assert_string_equal(f.fe[0].arg, "unix:/s");
	assert_ptr_equal(f.fe[1].type, &devio_frontend_ublk);
	assert_null(f.fe[1].arg);
	assert_ptr_equal(f.fe[2].type, &devio_frontend_fuse);
	assert_string_equal(f.fe[3].arg, "3,user-copy");
	/* each front end gets its own type's options struct */
	assert_ptr_equal(f.fe[0].opts, f.opts[type_index(&f, &devio_frontend_nbd)]);
	assert_ptr_equal(f.fe[1].opts, f.fe[3].opts);
	assert_ptr_not_equal(f.fe[1].opts, f.fe[2].opts);
	assert_int_equal(uint_field(&f, &devio_frontend_ublk, "depth"), 9);
	feopts_finish(&f);
	feopts_free(&f);
}

/* An option whose argument is optional (--recovery[=reissue|fail-io]):
 * bare, it does not take the next word; with =ARG it gets ARG. */
static int run_recovery(const char *opt, int *mode, int *next)
{
	char *argv[] = { "serve", "--ublk", (char *)opt, "img", NULL };
	struct feopts f;
	int c, r = 0;

	assert_int_equal(feopts_init(&f, devio_frontends, NULL), 0);
	optind = 1;
	while ((c = getopt_long(4, argv, "", f.table, NULL)) != -1)
		if (r == 0)
			r = feopts_parse(&f, c, optarg);
	*mode = *(const int *)field(&f, &devio_frontend_ublk, "recovery");
	*next = optind;
	feopts_free(&f);
	return r;
}

static void test_optional_argument(void **state)
{
	int mode, next;

	assert_int_equal(run_recovery("--recovery", &mode, &next), 0);
	assert_int_equal(mode, 1); /* reissue */
	assert_int_equal(next, 3); /* "img" stays the source */
	assert_int_equal(run_recovery("--recovery=fail-io", &mode, &next), 0);
	assert_int_equal(mode, 2);
	assert_int_equal(run_recovery("--recovery=reissue", &mode, &next), 0);
	assert_int_equal(mode, 1);
	assert_int_equal(run_recovery("--recovery=later", &mode, &next), -EINVAL);
}

static void test_clash_with_own_option_is_refused(void **state)
{
	static const struct option own[] = { { "depth", required_argument, NULL, 'd' }, { NULL, 0, NULL, 0 } };
	struct feopts f;

	assert_int_equal(feopts_init(&f, devio_frontends, own), -EINVAL);
}

/* A front end added by a table alone: its options parse into its struct,
 * a name it shares with NBD reaches both. */
struct fake_opts {
	bool turbo;
	unsigned depth;
};

static int fake_start(struct devio_server *srv, const char *arg, const void *opts, void **st) { return 0; }
static void fake_stop(void *st) { }

static const struct devio_frontend_option fake_options[] = {
	{ "turbo", NULL, "go faster", devio_opt_flag, offsetof(struct fake_opts, turbo) },
	{ "depth", "N", "in flight", devio_opt_uint, offsetof(struct fake_opts, depth) },
	{ NULL },
};

static const struct devio_frontend_type fake = {
	.option = "fake", .arg_help = "WHERE", .help = "a test front end", .options = fake_options,
	.opts_size = sizeof(struct fake_opts), .start = fake_start, .stop = fake_stop,
};

static void test_a_new_front_end_is_a_table(void **state)
{
	static const struct devio_frontend_type *const types[] = { &devio_frontend_nbd, &fake, NULL };
	const struct fake_opts *o;
	struct feopts f;

	assert_int_equal(feopts_init(&f, types, NULL), 0);
	assert_int_equal(feopts_add(&f, &fake, "here"), 0);
	assert_int_equal(feopts_set(&f, "turbo", NULL), 0);
	assert_int_equal(feopts_set(&f, "depth", "5"), 0);
	o = f.fe[0].opts;
	assert_true(o->turbo);
	assert_int_equal(o->depth, 5);
	assert_int_equal(uint_field(&f, &devio_frontend_nbd, "depth"), 5);
	feopts_free(&f);
}

static void test_inconsistent_tables_are_refused(void **state)
{
	static const struct devio_frontend_option flag_depth[] = {
		{ "depth", NULL, "a flag here", devio_opt_flag, 0 }, { NULL },
	};
	static const struct devio_frontend_type flagged = {
		.option = "flagged", .help = "", .options = flag_depth, .opts_size = sizeof(bool),
		.start = fake_start, .stop = fake_stop,
	};
	static const struct devio_frontend_type *const disagree[] = { &devio_frontend_nbd, &flagged, NULL };
	static const struct option own_fuse[] = { { "fuse", no_argument, NULL, 'f' }, { NULL, 0, NULL, 0 } };
	struct feopts f;

	assert_int_equal(feopts_init(&f, disagree, NULL), -EINVAL);
	assert_int_equal(feopts_init(&f, devio_frontends, own_fuse), -EINVAL); /* a front end's name */
}

static void test_only_offered_front_ends(void **state)
{
	static const struct devio_frontend_type *const fuse_only[] = { &devio_frontend_fuse, NULL };
	struct feopts f;

	assert_int_equal(feopts_init(&f, fuse_only, NULL), 0);
	assert_int_equal(feopts_add(&f, &devio_frontend_nbd, "tcp:1"), -EINVAL);
	assert_int_equal(feopts_set(&f, "queues", "2"), -EINVAL); /* ublk's, not offered */
	assert_int_equal(feopts_add(&f, &devio_frontend_fuse, "/m"), 0);
	assert_int_equal(feopts_set(&f, "loop", NULL), 0);
	assert_true(*(const bool *)field(&f, &devio_frontend_fuse, "loop"));
	feopts_free(&f);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_registry_is_sound),
		cmocka_unit_test(test_value_parsers),
		cmocka_unit_test(test_shared_option_reaches_each),
		cmocka_unit_test(test_getopt_starts_front_ends),
		cmocka_unit_test(test_optional_argument),
		cmocka_unit_test(test_clash_with_own_option_is_refused),
		cmocka_unit_test(test_only_offered_front_ends),
		cmocka_unit_test(test_a_new_front_end_is_a_table),
		cmocka_unit_test(test_inconsistent_tables_are_refused),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
