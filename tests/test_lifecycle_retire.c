/* SPDX-License-Identifier: PostgreSQL */
/*
 * Retirement by time, against the real server: max_lifetime with jitter (idle connections
 * retired by the manager, busy ones at release), idle_timeout down to min_idle, min_idle kept
 * after closes, and background keepalive pings.
 */
#include <errno.h>
#include <poll.h>
#include <string.h>

#include "pool.h" /* the pool's coarse clock, for exact lower bounds on idle time */
#include "test_lifecycle.h"

Test(lifecycle, idle_connections_retire_at_max_lifetime_with_jitter, .timeout = 60)
{
	enum {
		N = 8,
		LIFE = 300,
		JITTER = 200,
		LATE_MS = 2 * PGR__TICK_MS + 30
	};
	const char *app = "lc_life_idle";
	struct lc_events *ev = lc_events_new();
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, ev, &ci);
	cfg.min_idle = cfg.max_size = N;
	cfg.max_connecting = N; /* born together */
	cfg.max_lifetime_ms = LIFE;
	cfg.lifetime_jitter_ms = JITTER;
	int64_t t_create = tu_now_ms();
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	PGconn *admin = tu_admin();
	int first[LC_MAX_PIDS];
	int nfirst = lc_app_pids(admin, app, first, LC_MAX_PIDS);
	cr_assert_gt(nfirst, 0);

	/* Each slot's first connection: born with the pool, retired by the manager. */
	int64_t opened[N], closed[N];
	for (uint32_t id = 0; id < N; id++) {
		struct lc_ev e;
		cr_assert(TU_WAIT_UNTIL(lc_events_first(ev, PGR_EV_CONN_CLOSED, "max_lifetime", id,
		                                        0, &e, NULL),
		                        5000),
		          "slot %u was never retired for its lifetime", id);
		closed[id] = e.t_ms;
		cr_assert(lc_events_first(ev, PGR_EV_CONN_OPENED, NULL, id, 0, &e, NULL));
		opened[id] = e.t_ms;
	}
	int64_t lo = INT64_MAX, hi = INT64_MIN;
	for (int i = 0; i < N; i++) {
		int64_t life = closed[i] - opened[i];
		/* Born after t_create, so never retired before the shortest lifetime has passed. */
		cr_assert_geq(closed[i] - t_create, LIFE - JITTER,
		              "slot %d retired %lld ms after create", i,
		              (long long)(closed[i] - t_create));
		/*
		 * Jitter is taken off: the lifetime lies in [LIFE - JITTER, LIFE], plus the
		 * manager's lateness: it compares expiry with its coarse clock once per 10 ms tick,
		 * that clock lags real time by up to one tick, and the close event follows after
		 * a scheduling delay (a few 4 ms quanta on a busy 2-CPU machine). Jitter added
		 * instead would put most lifetimes far above LIFE.
		 */
		/* The opened event is stamped a moment after the birth time expiry counts from:
		 * one tick of slack below. */
		cr_assert_geq(life, LIFE - JITTER - PGR__TICK_MS, "slot %d lived %lld ms", i,
		              (long long)life);
		cr_assert_leq(life, LIFE + LATE_MS, "slot %d lived %lld ms, past max_lifetime", i,
		              (long long)life);
		lo = life < lo ? life : lo;
		hi = life > hi ? life : hi;
	}
	/*
	 * Jitter is drawn per connection in [0, 200] ms: eight connections opened together end up
	 * spread out. Eight draws all within 40 ms of each other: probability about 1e-4.
	 */
	cr_assert_geq(hi - lo, 40, "lifetimes all within %lld ms: no jitter", (long long)(hi - lo));

	/* The manager replaced them: none of the first backends is left, the pool keeps refilling.
	 */
	cr_assert(TU_WAIT_UNTIL(({
		                        int now_pids[LC_MAX_PIDS];
		                        int n = lc_app_pids(admin, app, now_pids, LC_MAX_PIDS);
		                        bool old = false;
		                        for (int i = 0; i < n; i++)
			                        old |= lc_in(first, nfirst, now_pids[i]);
		                        !old &&n > 0;
	                        }),
	                        5000),
	          "backends of the first connections are still there");
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).connects_ok >= 2 * N, 5000));
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.acquires, 0, "nobody used the pool: the manager retired them");
	cr_assert_eq(s.closes, s.closes_by_reason[PGR_CLOSE_MAX_LIFETIME],
	             "closes for other reasons");
	cr_assert_geq(s.closes_by_reason[PGR_CLOSE_MAX_LIFETIME], N);
	pgr_pool_destroy(p);
	lc_events_free(ev);
	PQfinish(admin);
}

Test(lifecycle, busy_connection_past_its_lifetime_is_retired_at_release, .timeout = 30)
{
	enum {
		LIFE = 300,
		JITTER = 200
	};
	const char *app = "lc_life_busy";
	struct lc_events *ev = lc_events_new();
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, ev, &ci);
	cfg.min_idle = cfg.max_size = 1;
	cfg.max_lifetime_ms = LIFE;
	cfg.lifetime_jitter_ms = JITTER;
	pgr_pool *p = tu_pool(&cfg);
	free(ci);

	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	int pid = PQbackendPID(pgr_conn_pg(c));
	uint32_t id = pgr_conn_id(c);
	int64_t t_acq = tu_now_ms();
	/* Hold it past its whole lifetime. */
	while (tu_now_ms() < t_acq + LIFE + 100)
		tu_sleep_ms(20);
	/* Never closed under its holder. */
	cr_assert_eq(lc_events_count(ev, PGR_EV_CONN_CLOSED, NULL, id), 0);
	cr_assert(lc_ok(pgr_conn_pg(c), "select 1"), "held connection broken: %s",
	          PQerrorMessage(pgr_conn_pg(c)));
	int64_t t_rel = tu_now_ms();
	pgr_release(c);

	struct lc_ev e;
	cr_assert(
	    TU_WAIT_UNTIL(lc_events_first(ev, PGR_EV_CONN_CLOSED, NULL, id, 0, &e, NULL), 5000),
	    "expired connection not closed after its release");
	cr_assert_str_eq(e.reason, "max_lifetime");
	cr_assert_geq(e.t_ms, t_rel);
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	cr_assert_neq(PQbackendPID(pgr_conn_pg(c)), pid, "an expired connection was handed out");
	cr_assert(lc_ok(pgr_conn_pg(c), "select 1"));
	pgr_release(c);
	pgr_pool_destroy(p);
	lc_events_free(ev);
}

/* Check out n connections at once (the pool grows to n), then return them all. */
static void grow_to(pgr_pool *p, int n, int *pids)
{
	pgr_conn *c[16];
	cr_assert_leq(n, 16);
	for (int i = 0; i < n; i++) {
		int rc = pgr_acquire(p, 5000, &c[i]);
		cr_assert_eq(rc, 0, "acquire %d: %s", i, pgr_strerror(rc));
		if (pids)
			pids[i] = PQbackendPID(pgr_conn_pg(c[i]));
	}
	cr_assert_eq(tu_stats(p).size, (uint32_t)n);
	for (int i = 0; i < n; i++)
		pgr_release(c[i]);
}

Test(lifecycle, idle_pool_shrinks_to_min_idle_and_not_below, .timeout = 30)
{
	enum {
		MIN = 2,
		MAX = 6,
		IDLE_MS = 300
	};
	const char *app = "lc_idle_shrink";
	struct lc_events *ev = lc_events_new();
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, ev, &ci);
	cfg.min_idle = MIN;
	cfg.max_size = MAX;
	cfg.idle_timeout_ms = IDLE_MS;
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	PGconn *admin = tu_admin();

	/*
	 * Idle time runs on the pool's coarse clock; read it before the returns, so the lower
	 * bound below is exact: nothing may close for idleness before IDLE_MS on that clock.
	 */
	int64_t t_rel = 0;
	{
		pgr_conn *c[MAX];
		for (int i = 0; i < MAX; i++)
			cr_assert_eq(pgr_acquire(p, 5000, &c[i]), 0, "acquire %d", i);
		cr_assert_eq(tu_stats(p).size, MAX);
		t_rel = pgr__now_ms(p);
		for (int i = 0; i < MAX; i++)
			pgr_release(c[i]);
	}
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).size == MIN, 5000), "size %u, want %u",
	          tu_stats(p).size, MIN);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.closes_by_reason[PGR_CLOSE_IDLE_TIMEOUT], MAX - MIN);
	cr_assert_eq(s.closes, MAX - MIN);
	cr_assert_eq(lc_events_count(ev, PGR_EV_CONN_CLOSED, "idle_timeout", UINT32_MAX),
	             MAX - MIN);
	for (int from = 0, at;; from = at + 1) {
		struct lc_ev e;
		if (!lc_events_first(ev, PGR_EV_CONN_CLOSED, "idle_timeout", UINT32_MAX, from, &e,
		                     &at))
			break;
		cr_assert_geq(e.t_ms, t_rel + IDLE_MS, "closed after %lld ms idle",
		              (long long)(e.t_ms - t_rel));
	}
	/* Three more idle timeouts: it stays at min_idle. */
	cr_assert_not(
	    TU_WAIT_UNTIL(tu_stats(p).size < MIN || tu_stats(p).closes > MAX - MIN, 3 * IDLE_MS),
	    "shrank below min_idle: size %u", tu_stats(p).size);
	cr_assert_eq(tu_stats(p).idle, MIN);
	cr_assert(TU_WAIT_UNTIL(tu_count_app(admin, app) == MIN, 5000));

	/* Closes for other reasons are made up: min_idle comes back after discards. */
	int gone[MIN];
	pgr_conn *c[MIN];
	for (int i = 0; i < MIN; i++) {
		cr_assert_eq(pgr_acquire(p, 5000, &c[i]), 0);
		gone[i] = PQbackendPID(pgr_conn_pg(c[i]));
	}
	for (int i = 0; i < MIN; i++)
		pgr_discard(c[i]);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).closes_by_reason[PGR_CLOSE_DISCARDED] == MIN &&
	                            tu_stats(p).idle == MIN,
	                        5000),
	          "min_idle not restored: idle %u", tu_stats(p).idle);
	int pids[LC_MAX_PIDS];
	cr_assert(TU_WAIT_UNTIL(lc_app_pids(admin, app, pids, LC_MAX_PIDS) == MIN, 5000));
	for (int i = 0; i < MIN; i++)
		cr_assert_not(lc_in(gone, MIN, pids[i]), "discarded backend %d still open",
		              pids[i]);
	pgr_pool_destroy(p);
	lc_events_free(ev);
	PQfinish(admin);
}

Test(lifecycle, idle_timeout_still_fires_with_keepalive_pings, .timeout = 30)
{
	enum {
		MIN = 1,
		MAX = 3,
		IDLE_MS = 300
	};
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), "lc_idle_keepalive", NULL, &ci);
	cfg.min_idle = MIN;
	cfg.max_size = MAX;
	cfg.idle_timeout_ms = IDLE_MS;
	cfg.keepalive_interval_ms = 100; /* pings more often than idle connections time out */
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	grow_to(p, MAX, NULL);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).size == MIN, 5000),
	          "keepalive pings kept idle connections alive: size %u, pings %llu",
	          tu_stats(p).size, (unsigned long long)tu_stats(p).pings);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.closes_by_reason[PGR_CLOSE_IDLE_TIMEOUT], MAX - MIN);
	cr_assert_gt(s.pings, 0);
	cr_assert_eq(s.pings_failed, 0);
	pgr_pool_destroy(p);
}

Test(lifecycle, keepalive_pings_idle_connections_in_background, .timeout = 30)
{
	enum {
		N = 2,
		INTERVAL = 200,
		WINDOW = 1000,
		/*
		 * A connection is pinged again INTERVAL after its last ping ended, as the manager's
		 * coarse clock sees it: the period is INTERVAL plus that clock's lag (one 4 ms
		 * jiffy), the manager's wake-up (a few 4 ms quanta on a busy 2-CPU machine) and the
		 * ping's round trip (under 1 ms). 50 ms covers them, so each connection gets
		 * between WINDOW / (INTERVAL + LATE) and WINDOW / INTERVAL + 1 pings in
		 * WINDOW: 4..6.
		 */
		LATE = 50
	};
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), "lc_keepalive", NULL, &ci);
	cfg.min_idle = cfg.max_size = N;
	cfg.keepalive_interval_ms = INTERVAL;
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).pings >= 2 * N, 5000), "no background pings");

	uint64_t p0 = tu_stats(p).pings;
	int64_t t0 = tu_now_ms();
	while (tu_now_ms() < t0 + WINDOW)
		tu_sleep_ms(10);
	uint64_t p1 = tu_stats(p).pings;
	int64_t w = tu_now_ms() - t0;
	uint64_t lo = (uint64_t)N * (uint64_t)(w / (INTERVAL + LATE));
	uint64_t hi = (uint64_t)N * (uint64_t)(w / INTERVAL + 1);
	cr_log_info("%llu pings in %lld ms, band %llu..%llu", (unsigned long long)(p1 - p0),
	            (long long)w, (unsigned long long)lo, (unsigned long long)hi);
	cr_assert(p1 - p0 >= lo && p1 - p0 <= hi, "%llu pings in %lld ms, want %llu..%llu",
	          (unsigned long long)(p1 - p0), (long long)w, (unsigned long long)lo,
	          (unsigned long long)hi);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.acquires, 0);
	cr_assert_eq(s.pings_failed, 0);
	cr_assert_eq(s.closes, 0);
	pgr_pool_destroy(p);
}

Test(lifecycle, keepalive_replaces_dead_idle_connection_before_a_caller_sees_it, .timeout = 30)
{
	enum {
		N = 2
	};
	const char *app = "lc_keepalive_dead";
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, NULL, &ci);
	cfg.min_idle = cfg.max_size = N;
	cfg.keepalive_interval_ms = 100;
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	PGconn *admin = tu_admin();
	int pids[LC_MAX_PIDS];
	cr_assert(TU_WAIT_UNTIL(lc_app_pids(admin, app, pids, LC_MAX_PIDS) == N, 5000));
	int dead = pids[0];
	lc_terminate(admin, dead);

	/* Without any checkout, the keepalive finds it, closes it and opens a replacement. */
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).closes_by_reason[PGR_CLOSE_PING_FAILED] == 1 &&
	                            tu_stats(p).idle == N && tu_stats(p).connects_ok == N + 1,
	                        5000),
	          "dead connection not replaced: ping_failed closes %llu, idle %u",
	          (unsigned long long)tu_stats(p).closes_by_reason[PGR_CLOSE_PING_FAILED],
	          tu_stats(p).idle);
	cr_assert_eq(tu_stats(p).acquires, 0);
	cr_assert(TU_WAIT_UNTIL(!lc_pid_alive(admin, dead) && tu_count_app(admin, app) == N, 5000));

	pgr_conn *c[N];
	for (int i = 0; i < N; i++) {
		cr_assert_eq(pgr_acquire(p, 5000, &c[i]), 0);
		cr_assert_neq(PQbackendPID(pgr_conn_pg(c[i])), dead);
		cr_assert(lc_ok(pgr_conn_pg(c[i]), "select 1"), "%s",
		          PQerrorMessage(pgr_conn_pg(c[i])));
	}
	for (int i = 0; i < N; i++)
		pgr_release(c[i]);
	cr_assert_eq(tu_stats(p).closes, 1);
	pgr_pool_destroy(p);
	PQfinish(admin);
}

/* Drive a pool without a manager thread: one pgr_pool_run whenever its fd is readable. */
static void run_manager_for(pgr_pool *p, int64_t ms)
{
	int64_t end = tu_now_ms() + ms;
	while (tu_now_ms() < end) {
		struct pollfd pfd = {.fd = pgr_pool_fd(p), .events = POLLIN};
		if (poll(&pfd, 1, 5) > 0)
			cr_assert_eq(pgr_pool_run(p), 0);
	}
}

/*
 * The checkout's own lifetime check, with the manager kept out of the way: the pool's manager
 * runs only when the test calls pgr_pool_run, so nothing but the checkout can notice that the
 * idle connection has passed its lifetime.
 */
Test(lifecycle, connection_past_its_lifetime_is_never_handed_out_at_checkout, .timeout = 30)
{
	enum {
		LIFE = 1000
	};
	const char *app = "lc_life_checkout";
	struct lc_events *ev = lc_events_new();
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, ev, &ci);
	cfg.min_idle = cfg.max_size = 1;
	cfg.max_lifetime_ms = LIFE;
	cfg.manager_thread = false;
	pgr_pool *p;
	cr_assert_eq(pgr_pool_create(&cfg, &p), 0);
	free(ci);
	int64_t end = tu_now_ms() + 5000;
	while (tu_stats(p).idle < 1 && tu_now_ms() < end)
		run_manager_for(p, 10);
	cr_assert_eq(tu_stats(p).idle, 1, "the pool never connected");
	pgr_conn *c;
	cr_assert_eq(pgr_try_acquire(p, &c), 0);
	int pid = PQbackendPID(pgr_conn_pg(c));
	struct pgr_conn *slot = pgr__slot(c);
	cr_assert_eq(pgr_release(c), 0);
	/*
	 * Let the hot path's clock stop (no checkout reads it for PGR__CLOCK_QUIET ticks): a
	 * checkout then reads CLOCK_MONOTONIC_COARSE itself, so the clock is current although the
	 * runtime that would tick it does not run.
	 */
	end = tu_now_ms() + 3000;
	while (atomic_load(&p->clock->live) && tu_now_ms() < end)
		run_manager_for(p, 10);
	cr_assert_eq(atomic_load(&p->clock->live), 0, "the clock never stopped");
	int64_t expire = atomic_load(&slot->expire_ms);
	cr_assert_lt(pgr__coarse_ms(), expire, "expired while the manager still ran");

	/* Past its lifetime by two coarse-clock ticks, with no manager round since. */
	while (pgr__coarse_ms() < expire + 2 * PGR__TICK_MS)
		tu_sleep_ms(5);
	int rc = pgr_try_acquire(p, &c);
	if (rc == 0) {
		int got = PQbackendPID(pgr_conn_pg(c));
		pgr_release(c);
		cr_assert_neq(got, pid, "a connection past its lifetime was handed out");
	}
	cr_assert_eq(rc, -EAGAIN, "try_acquire: %s", pgr_strerror(rc));
	cr_assert_eq(lc_events_count(ev, PGR_EV_CONN_CLOSED, NULL, UINT32_MAX), 0,
	             "the manager closed it, not the checkout");

	/* The manager closes what the checkout handed it, for its lifetime, and opens another. */
	end = tu_now_ms() + 5000;
	while (tu_stats(p).idle < 1 && tu_now_ms() < end)
		run_manager_for(p, 10);
	cr_assert_eq(tu_stats(p).closes_by_reason[PGR_CLOSE_MAX_LIFETIME], 1);
	cr_assert_eq(lc_events_count(ev, PGR_EV_CONN_CLOSED, "max_lifetime", UINT32_MAX), 1);
	cr_assert_eq(pgr_try_acquire(p, &c), 0);
	cr_assert_neq(PQbackendPID(pgr_conn_pg(c)), pid);
	cr_assert(lc_ok(pgr_conn_pg(c), "select 1"));
	cr_assert_eq(pgr_release(c), 0);
	pgr_pool_destroy(p);
	lc_events_free(ev);
}
