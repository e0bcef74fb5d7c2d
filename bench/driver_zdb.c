/* SPDX-License-Identifier: PostgreSQL */
/*
 * BASELINE: libzdb's ConnectionPool (Debian libzdb-dev), the established C pool.
 * Built only when pkg-config finds zdb (PGR_HAVE_ZDB).
 *
 * The pool is sized like the others: initial = max = conns, opened by ConnectionPool_start
 * before measuring; no reaper thread. A checkout is ConnectionPool_getConnection and a return
 * is Connection_close. libzdb never waits for a connection: getConnection returns NULL once
 * max connections are out, so when all are busy the driver retries with sched_yield() (the
 * cheapest wait a libzdb user can write) until BENCH_ACQUIRE_TIMEOUT_MS.
 *
 * libzdb takes a URL, postgresql://user[:password]@host:port/dbname, built from the live
 * connection's PQhost/PQport/PQuser/PQdb; over TCP libzdb insists on a password, so an
 * unused one is passed when the conninfo has none (trust authentication ignores it). A
 * socket-directory host becomes the unix-socket URL property. libzdb reports errors as
 * exceptions (TRY/CATCH, per thread); acquire and release throw none in this use.
 */
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zdb.h>

#include "bench.h"

typedef struct zdb_pool {
	URL_T url;
	ConnectionPool_T pool;
} zdb_pool;

static int zdb_create(const bench_target *t, const bench_pool_opts *o, void **out, char *err,
                      size_t errlen)
{
	char url[1024];
	const char *pw = t->password[0] ? t->password : "unused";
	if (t->host[0] == '/')
		snprintf(url, sizeof url, "postgresql://%s:%s@localhost:%s/%s?unix-socket=%s",
		         t->user, pw, t->port, t->dbname, t->host);
	else
		snprintf(url, sizeof url, "postgresql://%s:%s@%s:%s/%s", t->user, pw, t->host,
		         t->port, t->dbname);

	zdb_pool *z = calloc(1, sizeof *z);
	if (!z)
		return -ENOMEM;
	z->url = URL_new(url);
	if (!z->url) {
		snprintf(err, errlen, "libzdb rejected the URL");
		free(z);
		return -EINVAL;
	}
	z->pool = ConnectionPool_new(z->url);
	ConnectionPool_setInitialConnections(z->pool, (int)o->conns);
	ConnectionPool_setMaxConnections(z->pool, (int)o->conns);
	volatile int rc = 0;
	TRY
	{
		ConnectionPool_start(z->pool);
	}
	CATCH(SQLException)
	{
		snprintf(err, errlen, "ConnectionPool_start: %s", Exception_frame.message);
		rc = -ECONNREFUSED;
	}
	END_TRY;
	if (rc == 0 && ConnectionPool_size(z->pool) < (int)o->conns) {
		snprintf(err, errlen, "libzdb opened %d of %u connections",
		         ConnectionPool_size(z->pool), o->conns);
		rc = -ECONNREFUSED;
	}
	if (rc != 0) {
		ConnectionPool_free(&z->pool);
		URL_free(&z->url);
		free(z);
		return rc;
	}
	*out = z;
	return 0;
}

static int zdb_acquire(void *pool, unsigned tid, bench_conn *out)
{
	(void)tid;
	zdb_pool *z = pool;
	Connection_T c = ConnectionPool_getConnection(z->pool);
	if (!c) {
		uint64_t deadline = bench_now_ns() + (uint64_t)BENCH_ACQUIRE_TIMEOUT_MS * 1000000u;
		unsigned n = 0;
		while (!(c = ConnectionPool_getConnection(z->pool))) {
			sched_yield();
			if ((++n & 63) == 0 && bench_now_ns() > deadline)
				return -ETIMEDOUT;
		}
	}
	out->h = c;
	out->pg = NULL;
	return 0;
}

static void zdb_release(void *pool, unsigned tid, bench_conn *c)
{
	(void)pool;
	(void)tid;
	Connection_close((Connection_T)c->h);
}

static void zdb_destroy(void *pool)
{
	zdb_pool *z = pool;
	ConnectionPool_free(&z->pool);
	URL_free(&z->url);
	free(z);
}

const bench_driver bench_driver_zdb = {
    .name = "libzdb",
    .has_pg = 0,
    .create = zdb_create,
    .acquire = zdb_acquire,
    .release = zdb_release,
    .destroy = zdb_destroy,
};
