/* test_partition.c - unit tests for the partition code (being written). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

static void test_placeholder(void **state)
{
}

int main(void)
{
	const struct CMUnitTest tests[] = { cmocka_unit_test(test_placeholder) };

	return cmocka_run_group_tests(tests, NULL, NULL);
}
