/* range_lock.c - shared/exclusive byte-range locks granted in the order
 * asked (range_lock.h).  A list of every held and waiting range under one
 * mutex: the users are the rare paths (O_DIRECT read-modify-write and the
 * writes that must not overlap one), with at most a few hundred ranges. */
#include "devio/range_lock.h"

void devio_range_lock_init(struct devio_range_lock *l)
{
	pthread_mutex_init(&l->mu, NULL);
	pthread_cond_init(&l->cv, NULL);
	l->head = l->tail = NULL;
	l->exclusive = 0;
}

void devio_range_lock_destroy(struct devio_range_lock *l)
{
	pthread_cond_destroy(&l->cv);
	pthread_mutex_destroy(&l->mu);
}

static bool range_conflicts(const struct devio_range *a, const struct devio_range *b)
{
	return (a->exclusive || b->exclusive) && a->start < b->end && b->start < a->end;
}

/* r may be held: nothing asked before it conflicts.  Shared ranges among
 * shared ones, the common case, need no walk. */
static bool range_grantable(const struct devio_range_lock *l, const struct devio_range *r)
{
	if (!r->exclusive && l->exclusive == 0)
		return true;
	for (const struct devio_range *e = r->prev; e; e = e->prev)
		if (range_conflicts(e, r))
			return false;
	return true;
}

void devio_range_acquire(struct devio_range_lock *l, struct devio_range *r, uint64_t start, uint64_t end,
			 bool exclusive)
{
	r->start = start;
	r->end = end;
	r->exclusive = exclusive;
	r->next = NULL;
	pthread_mutex_lock(&l->mu);
	r->prev = l->tail;
	if (l->tail)
		l->tail->next = r;
	else
		l->head = r;
	l->tail = r;
	l->exclusive += exclusive;
	while (!range_grantable(l, r))
		pthread_cond_wait(&l->cv, &l->mu);
	pthread_mutex_unlock(&l->mu);
}

void devio_range_release(struct devio_range_lock *l, struct devio_range *r)
{
	pthread_mutex_lock(&l->mu);
	if (r->prev)
		r->prev->next = r->next;
	else
		l->head = r->next;
	if (r->next)
		r->next->prev = r->prev;
	else
		l->tail = r->prev;
	l->exclusive -= r->exclusive;
	if (l->head) /* someone may wait for r */
		pthread_cond_broadcast(&l->cv);
	pthread_mutex_unlock(&l->mu);
}
