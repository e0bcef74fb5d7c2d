/* SPDX-License-Identifier: PostgreSQL */
/*
 * The pgring driver: the pool under test, through its public API only.
 *
 * Configuration: min_idle = max_size = conns (the pool opens every connection up front and
 * never grows or shrinks during a run); every other field keeps pgr_config_init's default,
 * except ping_after_idle_ms, which the checkout section sets to -1 (bench_pool_opts.no_ping):
 * with no query in the loop, a ping at checkout would measure a server round trip, not the pool.
 * pgr_pool_create opens connections in the background, so create waits, polling
 * pgr_pool_stats, until all of them are idle before the harness starts measuring.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "bench.h"
#include "pgring.h"

/* variant: 0 = defaults, 1 = histograms off (cfg.metrics = 0), 2 = leak tracking on too */
static int create_variant(const bench_target *t, const bench_pool_opts *o, void **pool, char *err,
                          size_t errlen, int variant)
{
	uint32_t conns = o->conns;
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = t->conninfo;
	cfg.name = "bench";
	cfg.min_idle = conns;
	cfg.max_size = conns;
	if (o->no_ping)
		cfg.ping_after_idle_ms = -1;
	if (variant == 1)
		cfg.metrics = false;
	if (variant == 2)
		cfg.leak_threshold_ms = 60000; /* records the acquire site on every checkout */

	pgr_pool *p = NULL;
	int rc = pgr_pool_create(&cfg, &p);
	if (rc != 0) {
		snprintf(err, errlen, "pgr_pool_create: %s", pgr_strerror(rc));
		return rc;
	}
	uint64_t deadline = bench_now_ns() + (uint64_t)BENCH_FILL_TIMEOUT_MS * 1000000u;
	for (;;) {
		pgr_stats st;
		pgr_pool_stats(p, &st);
		if (st.idle >= conns)
			break;
		if (bench_now_ns() > deadline) {
			char last[256] = "";
			pgr_pool_last_error(p, last, sizeof last);
			snprintf(err, errlen, "only %u of %u connections idle after %d ms%s%s",
			         st.idle, conns, BENCH_FILL_TIMEOUT_MS, last[0] ? ": " : "", last);
			pgr_pool_destroy(p);
			return -ETIMEDOUT;
		}
		nanosleep(&(struct timespec){.tv_nsec = 2000000}, NULL);
	}
	*pool = p;
	return 0;
}

static int pgring_create(const bench_target *t, const bench_pool_opts *o, void **pool, char *err,
                         size_t errlen)
{
	return create_variant(t, o, pool, err, errlen, 0);
}

static int pgring_bare_create(const bench_target *t, const bench_pool_opts *o, void **pool,
                              char *err, size_t errlen)
{
	return create_variant(t, o, pool, err, errlen, 1);
}

static int pgring_leak_create(const bench_target *t, const bench_pool_opts *o, void **pool,
                              char *err, size_t errlen)
{
	return create_variant(t, o, pool, err, errlen, 2);
}

static int pgring_acquire(void *pool, unsigned tid, bench_conn *out)
{
	(void)tid;
	pgr_conn *c;
	int rc = pgr_acquire((pgr_pool *)pool, BENCH_ACQUIRE_TIMEOUT_MS, &c);
	if (rc != 0)
		return rc;
	out->h = c;
	out->pg = pgr_conn_pg(c);
	return 0;
}

static void pgring_release(void *pool, unsigned tid, bench_conn *c)
{
	(void)pool;
	(void)tid;
	pgr_release((pgr_conn *)c->h);
}

static void pgring_destroy(void *pool)
{
	pgr_pool_destroy((pgr_pool *)pool);
}

const bench_driver bench_driver_pgring = {
    .name = "pgring",
    .has_pg = 1,
    .create = pgring_create,
    .acquire = pgring_acquire,
    .release = pgring_release,
    .destroy = pgring_destroy,
};

/* The cost of observability: histograms off, and leak tracking on (plus histograms). */
const bench_driver bench_driver_pgring_bare = {
    .name = "pgring_bare",
    .has_pg = 1,
    .create = pgring_bare_create,
    .acquire = pgring_acquire,
    .release = pgring_release,
    .destroy = pgring_destroy,
};

const bench_driver bench_driver_pgring_leak = {
    .name = "pgring_leak",
    .has_pg = 1,
    .create = pgring_leak_create,
    .acquire = pgring_acquire,
    .release = pgring_release,
    .destroy = pgring_destroy,
};
