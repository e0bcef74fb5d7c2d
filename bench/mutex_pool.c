/* SPDX-License-Identifier: PostgreSQL */
/*
 * BASELINE: the textbook mutex + condition variable pool (see mutex_pool.h).
 */
#include "mutex_pool.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "bench.h"

struct mutex_pool {
	pthread_mutex_t mu;
	pthread_cond_t cv; /* "a connection was pushed"; bound to CLOCK_MONOTONIC */
	PGconn **stack;    /* idle connections, [0, n_idle) */
	uint32_t n_idle;
	uint32_t size;
	uint32_t waiters; /* callers blocked in pthread_cond_timedwait */
	PGconn **all;     /* every connection, for destroy */
};

int mutex_pool_create(const char *conninfo, uint32_t size, mutex_pool **out, char *err,
                      size_t errlen)
{
	mutex_pool *p = calloc(1, sizeof *p);
	if (!p)
		return -ENOMEM;
	p->stack = calloc(size, sizeof *p->stack);
	p->all = calloc(size, sizeof *p->all);
	if (!p->stack || !p->all) {
		free(p->stack);
		free(p->all);
		free(p);
		return -ENOMEM;
	}
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&p->cv, &ca);
	pthread_condattr_destroy(&ca);
	pthread_mutex_init(&p->mu, NULL);
	for (uint32_t i = 0; i < size; i++) {
		PGconn *pg = bench_connect(conninfo, err, errlen);
		if (!pg) {
			mutex_pool_destroy(p);
			return -ECONNREFUSED;
		}
		p->all[p->size++] = pg;
		p->stack[p->n_idle++] = pg;
	}
	*out = p;
	return 0;
}

void mutex_pool_destroy(mutex_pool *p)
{
	if (!p)
		return;
	for (uint32_t i = 0; i < p->size; i++)
		PQfinish(p->all[i]);
	pthread_cond_destroy(&p->cv);
	pthread_mutex_destroy(&p->mu);
	free(p->stack);
	free(p->all);
	free(p);
}

int mutex_pool_acquire(mutex_pool *p, int64_t timeout_ms, PGconn **out)
{
	pthread_mutex_lock(&p->mu);
	if (p->n_idle == 0) {
		struct timespec dl;
		clock_gettime(CLOCK_MONOTONIC, &dl);
		dl.tv_sec += timeout_ms / 1000;
		dl.tv_nsec += (timeout_ms % 1000) * 1000000;
		if (dl.tv_nsec >= 1000000000) {
			dl.tv_sec++;
			dl.tv_nsec -= 1000000000;
		}
		while (p->n_idle == 0) {
			p->waiters++;
			int rc = pthread_cond_timedwait(&p->cv, &p->mu, &dl);
			p->waiters--;
			if (rc == ETIMEDOUT && p->n_idle == 0) {
				pthread_mutex_unlock(&p->mu);
				return -ETIMEDOUT;
			}
		}
	}
	*out = p->stack[--p->n_idle];
	pthread_mutex_unlock(&p->mu);
	return 0;
}

void mutex_pool_release(mutex_pool *p, PGconn *pg)
{
	pthread_mutex_lock(&p->mu);
	p->stack[p->n_idle++] = pg;
	if (p->waiters)
		pthread_cond_signal(&p->cv);
	pthread_mutex_unlock(&p->mu);
}
