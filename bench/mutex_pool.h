/* SPDX-License-Identifier: PostgreSQL */
/*
 * BASELINE, not part of pgring: the textbook connection pool that pgr_bench compares against.
 *
 * One pthread mutex guards an array stack of idle PGconn*; a caller that finds the stack empty
 * waits on one condition variable (CLOCK_MONOTONIC, with a deadline); a release pushes the
 * connection back and signals one waiter. This is the design most hand-written C pools use,
 * kept deliberately plain (no spinning, no sharding) and without handicaps (the signal is
 * skipped when nobody waits, the deadline is computed only on the waiting path).
 *
 * Thread-safety: mutex_pool_acquire and mutex_pool_release may be called from any thread;
 * create and destroy from one thread with no checkout in progress.
 */
#ifndef PGR_BENCH_MUTEX_POOL_H
#define PGR_BENCH_MUTEX_POOL_H

#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

typedef struct mutex_pool mutex_pool;

/* Open `size` connections (blocking, one after the other). Returns 0 and sets *out, or a
 * negative errno with libpq's message in err. */
int mutex_pool_create(const char *conninfo, uint32_t size, mutex_pool **out, char *err,
                      size_t errlen);
/* Close every connection and free the pool. */
void mutex_pool_destroy(mutex_pool *p);
/* Take an idle connection, waiting up to timeout_ms. Returns 0 and sets *out, or -ETIMEDOUT. */
int mutex_pool_acquire(mutex_pool *p, int64_t timeout_ms, PGconn **out);
/* Give a connection back and wake one waiter, if any. */
void mutex_pool_release(mutex_pool *p, PGconn *pg);

#endif
