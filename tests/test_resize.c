/* SPDX-License-Identifier: PostgreSQL */
/* pgr_pool_resize: growing serves waiters at once, shrinking never touches a connection in use. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>

#include "testutil.h"

struct waiter {
	pgr_pool *p;
	int rc;
	pgr_conn *c;
	int64_t got_ms;
	_Atomic int started;
};

static void *wait_thread(void *arg)
{
	struct waiter *w = arg;
	atomic_store(&w->started, 1);
	w->rc = pgr_acquire(w->p, 8000, &w->c);
	w->got_ms = tu_now_ms();
	return NULL;
}

Test(resize, growing_serves_parked_waiters_at_once, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = 1;
	cfg.max_size = 1;
	cfg.max_capacity = 4;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *held;
	cr_assert_eq(pgr_acquire(p, 5000, &held), 0);
	struct waiter w[2] = {{.p = p}, {.p = p}};
	pthread_t t[2];
	for (int i = 0; i < 2; i++)
		pthread_create(&t[i], NULL, wait_thread, &w[i]);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).waiting == 2, 5000), "waiters did not park");
	/* At the limit, nobody returns the held connection: only the resize can serve them. */
	tu_sleep_ms(100);
	cr_assert_eq(tu_stats(p).connects_ok, 1, "the pool grew before the resize");
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pgr_pool_resize(p, 1, 3, 0), 0);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.max_size, 3);
	for (int i = 0; i < 2; i++)
		pthread_join(t[i], NULL);
	int64_t worst = 0;
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(w[i].rc, 0, "waiter %d: %s", i, pgr_strerror(w[i].rc));
		if (w[i].got_ms - t0 > worst)
			worst = w[i].got_ms - t0;
	}
	/*
	 * Two loopback connects (a few ms each, run side by side under max_connecting) after one
	 * manager wake-up. 2 s leaves room for a loaded 2-CPU machine and is a quarter of the
	 * 8 s deadline the waiters would otherwise reach.
	 */
	cr_log_info("waiters served %lld ms after the resize", (long long)worst);
	cr_assert_lt(worst, 2000, "waiters served only after %lld ms", (long long)worst);
	pgr_release(w[0].c);
	pgr_release(w[1].c);
	pgr_release(held);
	pgr_pool_destroy(p);
}

Test(resize, shrinking_closes_idle_surplus_with_reason_resized, .timeout = 30)
{
	const char *app = "pgr_t_resize_idle";
	char *ci = tu_conninfo_app(tu_conninfo(), app);
	PGconn *admin = tu_admin();
	struct tu_events ev;
	tu_events_init(&ev);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = 5;
	cfg.max_size = 6;
	cfg.on_event = tu_events_cb;
	cfg.user_data = &ev;
	pgr_pool *p = tu_pool(&cfg);
	cr_assert_eq(pgr_pool_resize(p, 1, 2, 0), 0);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).size == 2, 5000), "size=%u", tu_stats(p).size);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.closes_by_reason[PGR_CLOSE_RESIZED], 3);
	cr_assert_eq(s.closes, 3);
	cr_assert_eq(s.max_size, 2);
	cr_assert_geq(tu_events_find(&ev, PGR_EV_CONN_CLOSED, "resized"), 0);
	cr_assert(TU_WAIT_UNTIL(tu_count_app(admin, app) == 2, 5000));
	/* The surplus went, not more: the pool still serves from what is left. */
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
	pgr_release(c);
	cr_assert_eq(tu_stats(p).connects_ok, 5);
	pgr_pool_destroy(p);
	PQfinish(admin);
	free(ci);
}

Test(resize, shrinking_retires_connections_in_use_only_when_they_come_back, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = 4;
	cfg.max_size = 4;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *c[4];
	for (int i = 0; i < 4; i++)
		cr_assert_eq(pgr_acquire(p, 5000, &c[i]), 0);
	cr_assert_eq(pgr_pool_resize(p, 0, 2, 0), 0);
	/* Give the manager every chance to misbehave: the holders keep working meanwhile. */
	tu_sleep_ms(100);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.closes, 0, "a connection in use was closed");
	cr_assert_eq(s.in_use, 4);
	for (int i = 0; i < 4; i++) {
		PGresult *r = PQexec(pgr_conn_pg(c[i]), "select 1");
		cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "holder %d lost its connection",
		             i);
		PQclear(r);
	}
	for (int i = 0; i < 4; i++)
		cr_assert_eq(pgr_release(c[i]), 0);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).size == 2, 5000), "size=%u", tu_stats(p).size);
	s = tu_stats(p);
	cr_assert_eq(s.closes_by_reason[PGR_CLOSE_RESIZED], 2);
	cr_assert_eq(s.idle, 2);
	pgr_pool_destroy(p);
}

Test(resize, a_resize_past_the_capacity_is_refused_and_names_the_field, .timeout = 30)
{
	struct tu_events ev;
	tu_events_init(&ev);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.max_size = 2;
	cfg.max_capacity = 6;
	cfg.on_event = tu_events_cb;
	cfg.user_data = &ev;
	pgr_pool *p = tu_pool(&cfg);
	cr_assert_eq(pgr_pool_resize(p, 0, 5, 2), -EINVAL);
	cr_assert_eq(pgr_pool_resize(p, 0, 0, 0), -EINVAL);
	cr_assert_eq(pgr_pool_resize(p, 3, 2, 0), -EINVAL);
	cr_assert_eq(pgr_pool_resize(NULL, 0, 1, 0), -EINVAL);
	cr_assert_eq(tu_events_count(&ev, PGR_EV_CONFIG_ERROR), 3);
	int i = tu_events_find(&ev, PGR_EV_CONFIG_ERROR, "max_capacity 6");
	cr_assert_geq(i, 0);
	cr_assert_str_eq(ev.field[i], "max_overflow");
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.max_size, 2, "a refused resize changed the limits");
	cr_assert_eq(s.max_overflow, 0);
	cr_assert_eq(pgr_pool_resize(p, 0, 4, 2), 0, "exactly the capacity is allowed");
	pgr_pool_drain(p, 1000);
	cr_assert_eq(pgr_pool_resize(p, 0, 1, 0), -ESHUTDOWN);
	pgr_pool_destroy(p);

	/* At create: the capacity must hold max_size + max_overflow. */
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.max_size = 4;
	cfg.max_capacity = 3;
	cr_assert_eq(pgr_pool_create(&cfg, &p), -EINVAL);
	cfg.max_capacity = 5000;
	cr_assert_eq(pgr_pool_create(&cfg, &p), -EINVAL);
}

/* ---- under load ---- */

#define WORKERS 6

struct load {
	pgr_pool *p;
	_Atomic int stop;
	_Atomic int holders[64];
	_Atomic long ok, errors, double_holds;
};

static void *worker(void *arg)
{
	struct load *L = arg;
	while (!atomic_load(&L->stop)) {
		pgr_conn *c;
		int rc = pgr_acquire(L->p, 8000, &c);
		if (rc) {
			atomic_fetch_add(&L->errors, 1);
			continue;
		}
		uint32_t id = pgr_conn_id(c);
		if (atomic_fetch_add(&L->holders[id], 1) != 0)
			atomic_fetch_add(&L->double_holds, 1);
		PGresult *r = PQexec(pgr_conn_pg(c), "select pg_backend_pid()");
		if (PQresultStatus(r) != PGRES_TUPLES_OK)
			atomic_fetch_add(&L->errors, 1);
		PQclear(r);
		atomic_fetch_sub(&L->holders[id], 1);
		pgr_release(c);
		atomic_fetch_add(&L->ok, 1);
	}
	return NULL;
}

Test(resize, resizing_under_load_keeps_every_checkout_whole, .timeout = 60)
{
	const char *app = "pgr_t_resize_load";
	char *ci = tu_conninfo_app(tu_conninfo(), app);
	PGconn *admin = tu_admin();
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = 1;
	cfg.max_size = 2;
	cfg.max_capacity = 8;
	pgr_pool *p = tu_pool(&cfg);
	struct load L = {.p = p};
	pthread_t t[WORKERS];
	for (int i = 0; i < WORKERS; i++)
		pthread_create(&t[i], NULL, worker, &L);
	static const uint32_t sizes[][3] = {{0, 6, 2}, {1, 1, 0}, {2, 4, 0}, {0, 2, 1}, {4, 8, 0}};
	long max_seen = 0;
	for (int round = 0; round < 10; round++) {
		const uint32_t *z = sizes[round % 5];
		cr_assert_eq(pgr_pool_resize(p, z[0], z[1], z[2]), 0);
		int64_t until = tu_now_ms() + 150;
		while (tu_now_ms() < until) {
			long n = tu_count_app(admin, app);
			if (n > max_seen)
				max_seen = n;
			tu_sleep_ms(10);
		}
	}
	cr_assert_eq(pgr_pool_resize(p, 0, 1, 0), 0);
	atomic_store(&L.stop, 1);
	for (int i = 0; i < WORKERS; i++)
		pthread_join(t[i], NULL);
	cr_log_info("resize under load: %ld checkouts, most connections seen %ld", L.ok, max_seen);
	cr_assert_eq(L.errors, 0);
	cr_assert_eq(L.double_holds, 0);
	cr_assert_gt(L.ok, 100);
	cr_assert_leq(max_seen, 8, "more connections than the capacity");
	/* Quiet now: the last resize's limit holds. */
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).size <= 1, 5000), "size=%u", tu_stats(p).size);
	pgr_stats s = tu_stats(p);
	cr_assert_gt(s.closes_by_reason[PGR_CLOSE_RESIZED], 0);
	cr_assert_eq(s.in_use, 0);
	cr_assert(TU_WAIT_UNTIL(tu_count_app(admin, app) <= 1, 5000));
	pgr_pool_destroy(p);
	PQfinish(admin);
	free(ci);
}
