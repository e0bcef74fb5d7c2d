/* SPDX-License-Identifier: PostgreSQL */
/* max_overflow with SQLAlchemy's semantics, checked on the server's side too. */
#include <errno.h>

#include "testutil.h"

Test(overflow, burst_above_max_size_then_overflow_closed_on_return, .timeout = 60)
{
	const char *app = "pgr_t_overflow";
	char *ci = tu_conninfo_app(tu_conninfo(), app);
	PGconn *admin = tu_admin();
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = 2;
	cfg.max_size = 2;
	cfg.max_overflow = 2;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *c[4];
	for (int i = 0; i < 4; i++)
		cr_assert_eq(pgr_acquire(p, 5000, &c[i]), 0, "acquire %d of max_size+max_overflow",
		             i);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.size, 4);
	cr_assert_eq(s.in_use, 4);
	cr_assert_eq(s.overflow_in_use, 2);
	cr_assert_eq(tu_count_app(admin, app), 4);
	/* The next one waits, and times out: the limit holds. */
	pgr_conn *x;
	cr_assert_eq(pgr_acquire(p, 200, &x), -ETIMEDOUT);
	cr_assert_leq(tu_count_app(admin, app), 4, "server sees more than max_size+max_overflow");
	for (int i = 0; i < 4; i++)
		pgr_release(c[i]);
	/* Overflow connections close on return while the pool already holds max_size. */
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).size == 2, 5000), "size=%u", tu_stats(p).size);
	s = tu_stats(p);
	cr_assert_eq(s.closes_by_reason[PGR_CLOSE_OVERFLOW], 2);
	cr_assert_eq(s.overflow_in_use, 0);
	cr_assert_eq(s.idle, 2);
	cr_assert(TU_WAIT_UNTIL(tu_count_app(admin, app) == 2, 5000));
	pgr_pool_destroy(p);
	cr_assert(TU_WAIT_UNTIL(tu_count_app(admin, app) == 0, 5000), "connections left open");
	PQfinish(admin);
	free(ci);
}

struct hammer {
	pgr_pool *p;
	int iters;
	int errors;
};

static void *hammer_main(void *a)
{
	struct hammer *h = a;
	for (int i = 0; i < h->iters; i++) {
		pgr_conn *c;
		if (pgr_acquire(h->p, 10000, &c) != 0) {
			h->errors++;
			continue;
		}
		PGresult *r = PQexec(pgr_conn_pg(c), "select pg_sleep(0.002)");
		if (PQresultStatus(r) != PGRES_TUPLES_OK)
			h->errors++;
		PQclear(r);
		pgr_release(c);
	}
	return NULL;
}

Test(overflow, server_never_sees_more_than_the_limit_under_load, .timeout = 120)
{
	const char *app = "pgr_t_overflow_load";
	char *ci = tu_conninfo_app(tu_conninfo(), app);
	PGconn *admin = tu_admin();
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = 1;
	cfg.max_size = 2;
	cfg.max_overflow = 1;
	pgr_pool *p = tu_pool(&cfg);
	enum {
		T = 8
	};
	pthread_t th[T];
	struct hammer h[T];
	for (int i = 0; i < T; i++) {
		h[i] = (struct hammer){.p = p, .iters = 60};
		pthread_create(&th[i], NULL, hammer_main, &h[i]);
	}
	long peak = 0;
	bool running = true;
	while (running) {
		long n = tu_count_app(admin, app);
		if (n > peak)
			peak = n;
		cr_assert_leq(tu_stats(p).size, 3);
		running = tu_stats(p).acquires < (uint64_t)T * 60;
		tu_sleep_ms(5);
	}
	for (int i = 0; i < T; i++) {
		pthread_join(th[i], NULL);
		cr_assert_eq(h[i].errors, 0);
	}
	cr_assert_leq(peak, 3, "server saw %ld connections, limit is 3", peak);
	cr_assert_geq(peak, 2);
	pgr_pool_destroy(p);
	PQfinish(admin);
	free(ci);
}
