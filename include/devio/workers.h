/* workers.h - a pool of threads that run requests with devio_submit().
 *
 * For front ends that receive many requests at once and want a backend
 * without an asynchronous path (the RAM disk, a remote server) to use more
 * than one core.  Requests queued to the pool run in FIFO order of start,
 * complete in any order; stopping the pool drains the queue first. */
#ifndef DEVIO_WORKERS_H
#define DEVIO_WORKERS_H

#include <stdbool.h>
#include "request.h"

#ifdef __cplusplus
extern "C" {
#endif

struct devio_workers;
struct devio_backend;

/* The one policy for where a front end with many requests in flight runs
 * b's requests: on the thread that has them (an asynchronous backend's
 * submit; a backend that only copies memory, DEVIO_RUN_CPU), or on a pool
 * (a backend whose callbacks wait for a disk or a network, so requests in
 * flight overlap).  threads is --threads: 0 the default, 1 everything on
 * the front end's threads, N > 1 every synchronous backend on N threads. */
bool devio_wants_pool(const struct devio_backend *b, unsigned threads);
/* The pool size for --threads (threads > 1) or the default. */
unsigned devio_pool_size(unsigned threads);

struct devio_workers *devio_workers_new(unsigned nthreads);
void devio_workers_submit(struct devio_workers *w, struct devio_backend *b, struct devio_request *req);
/* Runs every queued request, then joins the threads. */
void devio_workers_free(struct devio_workers *w);

#ifdef __cplusplus
}
#endif
#endif
