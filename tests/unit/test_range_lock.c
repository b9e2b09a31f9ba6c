/* test_range_lock.c - the byte-range lock: shared ranges share, exclusive
 * ones wait for every overlapping range asked before them and hold back
 * every overlapping range asked after them, disjoint ranges never wait,
 * and a range may be released by another thread than its holder. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <time.h>
#include "devio/range_lock.h"

struct waiter {
	struct devio_range_lock *l;
	struct devio_range r;
	uint64_t start, end;
	bool exclusive;
	atomic_bool granted;
	pthread_t t;
};

static void *waiter_main(void *arg)
{
	struct waiter *w = arg;

	devio_range_acquire(w->l, &w->r, w->start, w->end, w->exclusive);
	atomic_store(&w->granted, true);
	return NULL;
}

static void waiter_start(struct waiter *w, struct devio_range_lock *l, uint64_t start, uint64_t end, bool excl)
{
	w->l = l;
	w->start = start;
	w->end = end;
	w->exclusive = excl;
	atomic_store(&w->granted, false);
	assert_int_equal(pthread_create(&w->t, NULL, waiter_main, w), 0);
}

/* Long enough for a thread that could go on to have done so. */
static void settle(void)
{
	struct timespec ts = { 0, 50 * 1000 * 1000 };

	nanosleep(&ts, NULL);
}

static void waiter_join(struct waiter *w)
{
	assert_int_equal(pthread_join(w->t, NULL), 0);
	assert_true(atomic_load(&w->granted));
}

static void test_shared_and_disjoint_never_wait(void **state)
{
	struct devio_range_lock l;
	struct devio_range a, b, c;

	devio_range_lock_init(&l);
	devio_range_acquire(&l, &a, 0, 8192, false);
	devio_range_acquire(&l, &b, 4096, 12288, false); /* overlaps a, both shared */
	devio_range_acquire(&l, &c, 12288, 16384, true); /* exclusive, touches neither */
	devio_range_release(&l, &b);
	devio_range_release(&l, &a);
	devio_range_release(&l, &c);
	assert_null(l.head);
	assert_null(l.tail);
	assert_int_equal(l.exclusive, 0);
	devio_range_lock_destroy(&l);
}

static void test_exclusive_waits_for_earlier_shared(void **state)
{
	struct devio_range_lock l;
	struct devio_range held;
	struct waiter w;

	devio_range_lock_init(&l);
	devio_range_acquire(&l, &held, 4096, 8192, false);
	waiter_start(&w, &l, 0, 8192, true);
	settle();
	assert_false(atomic_load(&w.granted));
	devio_range_release(&l, &held);
	waiter_join(&w);
	devio_range_release(&l, &w.r);
	devio_range_lock_destroy(&l);
}

static void test_later_shared_waits_behind_waiting_exclusive(void **state)
{
	struct devio_range_lock l;
	struct devio_range held;
	struct waiter excl, later, elsewhere;

	devio_range_lock_init(&l);
	devio_range_acquire(&l, &held, 0, 4096, false);
	waiter_start(&excl, &l, 0, 4096, true);
	settle();
	waiter_start(&later, &l, 0, 4096, false);      /* would share with held, but excl came first */
	waiter_start(&elsewhere, &l, 4096, 8192, false); /* disjoint: goes on */
	waiter_join(&elsewhere);
	settle();
	assert_false(atomic_load(&excl.granted));
	assert_false(atomic_load(&later.granted));
	devio_range_release(&l, &held);
	waiter_join(&excl);
	settle();
	assert_false(atomic_load(&later.granted));
	devio_range_release(&l, &excl.r);
	waiter_join(&later);
	devio_range_release(&l, &later.r);
	devio_range_release(&l, &elsewhere.r);
	devio_range_lock_destroy(&l);
}

/* The holder's thread is gone when the range is let go, as when an
 * io_uring completion thread releases a write's blocks. */
static void test_release_from_another_thread(void **state)
{
	struct devio_range_lock l;
	struct waiter holder, excl;

	devio_range_lock_init(&l);
	waiter_start(&holder, &l, 0, 4096, false);
	waiter_join(&holder);
	waiter_start(&excl, &l, 0, 4096, true);
	settle();
	assert_false(atomic_load(&excl.granted));
	devio_range_release(&l, &holder.r);
	waiter_join(&excl);
	devio_range_release(&l, &excl.r);
	devio_range_lock_destroy(&l);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_shared_and_disjoint_never_wait),
		cmocka_unit_test(test_exclusive_waits_for_earlier_shared),
		cmocka_unit_test(test_later_shared_waits_behind_waiting_exclusive),
		cmocka_unit_test(test_release_from_another_thread),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
