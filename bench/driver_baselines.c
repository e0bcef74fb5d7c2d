/* SPDX-License-Identifier: PostgreSQL */
/*
 * Baseline drivers that need nothing but libpq:
 *
 *   mutex_condvar      the textbook pool of mutex_pool.c
 *   connect_per_query  no pool at all: PQconnectdb at acquire, PQfinish at release
 *   dedicated          one connection per worker thread, opened up front (the ceiling a pool
 *                      can approach: checkout costs nothing)
 *   pgbouncer          one client connection per worker thread to PgBouncer in transaction
 *                      mode (PGR_BENCH_PGBOUNCER_CONNINFO), which multiplexes them onto its own
 *                      server pool; every query pays the extra hop
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "mutex_pool.h"

PGconn *bench_connect(const char *conninfo, char *err, size_t errlen)
{
	PGconn *pg = PQconnectdb(conninfo);
	if (pg && PQstatus(pg) == CONNECTION_OK)
		return pg;
	if (err && errlen) {
		snprintf(err, errlen, "%s", pg ? PQerrorMessage(pg) : "out of memory");
		size_t n = strlen(err);
		while (n && (err[n - 1] == '\n' || err[n - 1] == ' '))
			err[--n] = '\0';
	}
	PQfinish(pg);
	return NULL;
}

/* ---- mutex_condvar ---- */

static int mutex_create(const bench_target *t, const bench_pool_opts *o, void **pool, char *err,
                        size_t errlen)
{
	return mutex_pool_create(t->conninfo, o->conns, (mutex_pool **)pool, err, errlen);
}

static int mutex_acquire(void *pool, unsigned tid, bench_conn *out)
{
	(void)tid;
	PGconn *pg;
	int rc = mutex_pool_acquire(pool, BENCH_ACQUIRE_TIMEOUT_MS, &pg);
	if (rc != 0)
		return rc;
	out->h = pg;
	out->pg = pg;
	return 0;
}

static void mutex_release(void *pool, unsigned tid, bench_conn *c)
{
	(void)tid;
	mutex_pool_release(pool, c->pg);
}

static void mutex_destroy(void *pool)
{
	mutex_pool_destroy(pool);
}

const bench_driver bench_driver_mutex = {
    .name = "mutex_condvar",
    .has_pg = 1,
    .create = mutex_create,
    .acquire = mutex_acquire,
    .release = mutex_release,
    .destroy = mutex_destroy,
};

/* ---- connect_per_query ---- */

static int cpq_create(const bench_target *t, const bench_pool_opts *o, void **pool, char *err,
                      size_t errlen)
{
	(void)o;
	/* Fail early, and once, when the server cannot be reached at all. */
	PGconn *pg = bench_connect(t->conninfo, err, errlen);
	if (!pg)
		return -ECONNREFUSED;
	PQfinish(pg);
	*pool = (void *)t->conninfo;
	return 0;
}

static int cpq_acquire(void *pool, unsigned tid, bench_conn *out)
{
	(void)tid;
	PGconn *pg = bench_connect(pool, NULL, 0);
	if (!pg)
		return -ECONNREFUSED;
	out->h = pg;
	out->pg = pg;
	return 0;
}

static void cpq_release(void *pool, unsigned tid, bench_conn *c)
{
	(void)pool;
	(void)tid;
	PQfinish(c->pg);
}

static void cpq_destroy(void *pool)
{
	(void)pool;
}

const bench_driver bench_driver_cpq = {
    .name = "connect_per_query",
    .has_pg = 1,
    .create = cpq_create,
    .acquire = cpq_acquire,
    .release = cpq_release,
    .destroy = cpq_destroy,
};

/* ---- dedicated / pgbouncer: one connection per worker thread ---- */

typedef struct dedicated {
	uint32_t n;
	PGconn *pg[];
} dedicated;

static void dedicated_destroy(void *pool)
{
	dedicated *d = pool;
	for (uint32_t i = 0; i < d->n; i++)
		PQfinish(d->pg[i]);
	free(d);
}

static int dedicated_open(const char *conninfo, uint32_t threads, void **pool, char *err,
                          size_t errlen)
{
	dedicated *d = calloc(1, sizeof *d + threads * sizeof d->pg[0]);
	if (!d)
		return -ENOMEM;
	for (uint32_t i = 0; i < threads; i++) {
		d->pg[i] = bench_connect(conninfo, err, errlen);
		if (!d->pg[i]) {
			dedicated_destroy(d);
			return -ECONNREFUSED;
		}
		d->n++;
	}
	*pool = d;
	return 0;
}

static int dedicated_create(const bench_target *t, const bench_pool_opts *o, void **pool, char *err,
                            size_t errlen)
{
	return dedicated_open(t->conninfo, o->threads, pool, err, errlen);
}

static int pgbouncer_create(const bench_target *t, const bench_pool_opts *o, void **pool, char *err,
                            size_t errlen)
{
	if (!t->pgbouncer) {
		snprintf(err, errlen, "skipped (not running)");
		return -ENOENT;
	}
	return dedicated_open(t->pgbouncer, o->threads, pool, err, errlen);
}

static int dedicated_acquire(void *pool, unsigned tid, bench_conn *out)
{
	dedicated *d = pool;
	out->h = NULL;
	out->pg = d->pg[tid];
	return 0;
}

static void dedicated_release(void *pool, unsigned tid, bench_conn *c)
{
	(void)pool;
	(void)tid;
	(void)c;
}

const bench_driver bench_driver_dedicated = {
    .name = "dedicated",
    .has_pg = 1,
    .create = dedicated_create,
    .acquire = dedicated_acquire,
    .release = dedicated_release,
    .destroy = dedicated_destroy,
};

const bench_driver bench_driver_pgbouncer = {
    .name = "pgbouncer",
    .has_pg = 1,
    .create = pgbouncer_create,
    .acquire = dedicated_acquire,
    .release = dedicated_release,
    .destroy = dedicated_destroy,
};
