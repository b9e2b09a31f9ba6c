/* workers.h - a pool of threads that run requests with devio_submit().
 *
 * For front ends that receive many requests at once and want a backend
 * without an asynchronous path (the RAM disk, a remote server) to use more
 * than one core.  Requests queued to the pool run in FIFO order of start,
 * complete in any order; stopping the pool drains the queue first. */
#ifndef DEVIO_WORKERS_H
#define DEVIO_WORKERS_H

#include "request.h"

#ifdef __cplusplus
extern "C" {
#endif

struct devio_workers;

struct devio_workers *devio_workers_new(unsigned nthreads);
void devio_workers_submit(struct devio_workers *w, struct devio_backend *b, struct devio_request *req);
/* Runs every queued request, then joins the threads. */
void devio_workers_free(struct devio_workers *w);

#ifdef __cplusplus
}
#endif
#endif
