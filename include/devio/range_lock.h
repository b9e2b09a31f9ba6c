/* range_lock.h - shared and exclusive locks on byte ranges, first come
 * first served.
 *
 * For backends that read-modify-write partial blocks (O_DIRECT files): an
 * RMW holds its blocks exclusively, every other change of bytes holds its
 * blocks shared, so no write, TRIM or ZERO lands between an RMW's read and
 * its write-back of the same block.  A range is granted when no range
 * asked for before it overlaps and conflicts (either is exclusive), so a
 * waiting RMW is not starved by later writes.  A holder may release from
 * another thread than the one that acquired (an io_uring completion). */
#ifndef DEVIO_RANGE_LOCK_H
#define DEVIO_RANGE_LOCK_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One held or wanted range; the caller owns the memory until release. */
struct devio_range {
	uint64_t start, end; /* [start, end) */
	bool exclusive;
	struct devio_range *prev, *next;
};

struct devio_range_lock {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct devio_range *head, *tail; /* in the order asked */
	unsigned exclusive;              /* how many of them are exclusive */
};

void devio_range_lock_init(struct devio_range_lock *l);
void devio_range_lock_destroy(struct devio_range_lock *l);
/* Wait until [start, end) can be held (shared or exclusive), then hold it. */
void devio_range_acquire(struct devio_range_lock *l, struct devio_range *r, uint64_t start, uint64_t end,
			 bool exclusive);
void devio_range_release(struct devio_range_lock *l, struct devio_range *r);

#ifdef __cplusplus
}
#endif
#endif
