/* SPDX-License-Identifier: PostgreSQL */
/* The checkout core against a real server: round trip, exhaustion, deadlines, FIFO, waiters. */
#include <errno.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>

#include "placeholder.h"
#include "pool.h" /* cpu_shard: which CPUs map to which shard */
#include "testutil.h"

#include <dlfcn.h>
#include <time.h>

/*
 * A pause point inside a release. The core reads CLOCK_MONOTONIC_COARSE (pgr__coarse_ms) when
 * it has no runtime clock, as a placeholder pool without a manager; this binary's
 * clock_gettime stops the armed thread at its Nth such read, and is glibc's otherwise.
 */
enum {
	COARSE_OFF,
	COARSE_COUNT,
	COARSE_ARMED,
	COARSE_PAUSED,
	COARSE_GO
};
static _Atomic int coarse_state;
static _Atomic int coarse_calls, coarse_pause_at;
static pthread_t coarse_thread;

int clock_gettime(clockid_t id, struct timespec *ts)
{
	static int (*real)(clockid_t, struct timespec *);
	if (!real)
		real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
	int st = atomic_load(&coarse_state);
	if (id == CLOCK_MONOTONIC_COARSE && (st == COARSE_COUNT || st == COARSE_ARMED) &&
	    pthread_equal(pthread_self(), coarse_thread)) {
		int n = atomic_fetch_add(&coarse_calls, 1) + 1;
		if (st == COARSE_ARMED && n == atomic_load(&coarse_pause_at)) {
			atomic_store(&coarse_state, COARSE_PAUSED);
			while (atomic_load(&coarse_state) != COARSE_GO)
				tu_sleep_ms(1);
		}
	}
	return real(id, ts);
}

/*
 * Deadline slack: the wait is an absolute CLOCK_MONOTONIC futex deadline, so never early (the
 * test's millisecond clock truncates: 1 ms); late by the futex timer slack (50 us) plus the
 * waiter's trip back onto a CPU, a few 4 ms scheduler quanta on a busy 2-CPU machine. 120 ms
 * leaves room for thirty such quanta (the suite also runs under the sanitizers and beside
 * other work, with load averages near 10).
 */
#define LATE_MS 120

static pgr_pool *small_pool(uint32_t size, struct tu_events *ev)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = size;
	cfg.max_size = size;
	cfg.ping_after_idle_ms = -1;
	if (ev) {
		tu_events_init(ev);
		cfg.on_event = tu_events_cb;
		cfg.user_data = ev;
	}
	return tu_pool(&cfg);
}

Test(checkout, acquire_release_runs_select_1, .timeout = 30)
{
	pgr_pool *p = small_pool(2, NULL);
	pgr_conn *c = NULL;
	cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
	PGresult *r = PQexec(pgr_conn_pg(c), "select 1");
	cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK);
	cr_assert_str_eq(PQgetvalue(r, 0, 0), "1");
	PQclear(r);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.in_use, 1);
	cr_assert_eq(s.idle, 1);
	pgr_release(c);
	s = tu_stats(p);
	cr_assert_eq(s.in_use, 0);
	cr_assert_eq(s.idle, 2);
	cr_assert_eq(s.acquires, 1);
	cr_assert_eq(s.connects_ok, 2);
	pgr_pool_destroy(p);
}

Test(checkout, same_connection_is_reused, .timeout = 30)
{
	pgr_pool *p = small_pool(1, NULL);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
	int pid = PQbackendPID(pgr_conn_pg(c));
	pgr_release(c);
	for (int i = 0; i < 100; i++) {
		cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
		cr_assert_eq(PQbackendPID(pgr_conn_pg(c)), pid);
		pgr_release(c);
	}
	cr_assert_eq(tu_stats(p).connects_ok, 1);
	pgr_pool_destroy(p);
}

Test(checkout, try_acquire_on_exhausted_pool_fails_at_once, .timeout = 30)
{
	pgr_pool *p = small_pool(1, NULL);
	pgr_conn *a, *b = NULL;
	cr_assert_eq(pgr_try_acquire(p, &a), 0);
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pgr_try_acquire(p, &b), -EAGAIN);
	cr_assert_lt(tu_now_ms() - t0, 50);
	cr_assert_null(b);
	pgr_release(a);
	cr_assert_eq(pgr_try_acquire(p, &b), 0);
	pgr_release(b);
	pgr_pool_destroy(p);
}

Test(checkout, acquire_times_out_within_deadline_when_exhausted, .timeout = 30)
{
	struct tu_events ev;
	pgr_pool *p = small_pool(1, &ev);
	pgr_conn *a, *b = NULL;
	cr_assert_eq(pgr_acquire(p, 1000, &a), 0);
	int64_t t0 = tu_now_ms();
	int rc = pgr_acquire(p, 200, &b);
	int64_t took = tu_now_ms() - t0;
	cr_assert_eq(rc, -ETIMEDOUT, "rc=%d %s", rc, pgr_strerror(rc));
	cr_assert_geq(took, 200 - 1, "returned after %lld ms, before its deadline",
	              (long long)took);
	cr_assert_lt(took, 200 + LATE_MS, "returned %lld ms after a 200 ms deadline",
	             (long long)took);
	cr_assert_eq(tu_stats(p).timeouts, 1);
	cr_assert_eq(tu_stats(p).waiting, 0);
	/* The timeout explains itself. */
	int i = tu_events_find(&ev, PGR_EV_ACQUIRE_TIMEOUT, "in_use=1");
	cr_assert_geq(i, 0, "no acquire-timeout event with the pool state");
	char err[512];
	pgr_pool_last_error(p, err, sizeof(err));
	cr_assert(strstr(err, "timed out"), "last error: %s", err);
	/* ... with the pool's state at that moment. */
	cr_assert(strstr(err, "size=1/1") && strstr(err, "in_use=1") && strstr(err, "idle=0"),
	          "last error lacks the pool state: %s", err);
	pgr_release(a);
	pgr_pool_destroy(p);
}

Test(checkout, negative_timeout_uses_configured_default, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = cfg.max_size = 1;
	cfg.acquire_timeout_ms = 150;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *a, *b;
	cr_assert_eq(pgr_acquire(p, -1, &a), 0);
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pgr_acquire(p, -1, &b), -ETIMEDOUT);
	int64_t took = tu_now_ms() - t0;
	cr_assert(took >= 150 - 1 && took < 150 + LATE_MS, "took %lld ms", (long long)took);
	pgr_release(a);
	pgr_pool_destroy(p);
}

/* ---- waiters ---- */

struct waiter_arg {
	pgr_pool *p;
	int order_slot;
	int64_t timeout_ms;
	int rc;
	_Atomic int *served_counter;
	int served_rank;
	int hold_ms;
};

static void *waiter_main(void *a)
{
	struct waiter_arg *w = a;
	pgr_conn *c;
	w->rc = pgr_acquire(w->p, w->timeout_ms, &c);
	if (w->rc == 0) {
		w->served_rank = atomic_fetch_add(w->served_counter, 1);
		if (w->hold_ms)
			tu_sleep_ms(w->hold_ms);
		pgr_release(c);
	}
	return NULL;
}

Test(checkout, waiters_are_served_in_arrival_order, .timeout = 60)
{
	pgr_pool *p = small_pool(1, NULL);
	pgr_conn *held;
	cr_assert_eq(pgr_acquire(p, 1000, &held), 0);
	enum {
		N = 6
	};
	pthread_t th[N];
	struct waiter_arg wa[N];
	_Atomic int served = 0;
	for (int i = 0; i < N; i++) {
		wa[i] = (struct waiter_arg){.p = p,
		                            .order_slot = i,
		                            .timeout_ms = 20000,
		                            .served_counter = &served,
		                            .served_rank = -1,
		                            .hold_ms = 2};
		pthread_create(&th[i], NULL, waiter_main, &wa[i]);
		/* Arrival order is the order they show up in the queue. */
		cr_assert(TU_WAIT_UNTIL(tu_stats(p).waiting == (uint32_t)i + 1, 5000),
		          "waiter %d never queued", i);
	}
	pgr_release(held);
	for (int i = 0; i < N; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i < N; i++) {
		cr_assert_eq(wa[i].rc, 0);
		cr_assert_eq(wa[i].served_rank, i, "waiter %d was served %d-th", i,
		             wa[i].served_rank);
	}
	/* Each was served by a hand-off or, nudged awake, from a shard: waits, in arrival order. */
	cr_assert_geq(tu_stats(p).waits, N);
	pgr_pool_destroy(p);
}

Test(checkout, waiters_over_max_waiters_are_rejected_at_once, .timeout = 60)
{
	struct tu_events ev;
	tu_events_init(&ev);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = cfg.max_size = 1;
	cfg.max_waiters = 2;
	cfg.on_event = tu_events_cb;
	cfg.user_data = &ev;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *held, *c = NULL;
	cr_assert_eq(pgr_acquire(p, 1000, &held), 0);
	pthread_t th[2];
	struct waiter_arg wa[2];
	_Atomic int served = 0;
	for (int i = 0; i < 2; i++) {
		wa[i] = (struct waiter_arg){.p = p, .timeout_ms = 20000, .served_counter = &served};
		pthread_create(&th[i], NULL, waiter_main, &wa[i]);
	}
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).waiting == 2, 5000));
	int64_t t0 = tu_now_ms();
	int rc = pgr_acquire(p, 5000, &c);
	cr_assert_eq(rc, -PGR_E_TOO_MANY_WAITERS, "rc=%d (%s)", rc, pgr_strerror(rc));
	cr_assert_lt(tu_now_ms() - t0, 100, "rejection was not immediate");
	cr_assert_eq(tu_stats(p).rejected, 1);
	cr_assert_eq(tu_events_count(&ev, PGR_EV_WAITER_REJECTED), 1);
	cr_assert_eq(tu_events_count(&ev, PGR_EV_POOL_EXHAUSTED), 1);
	pgr_release(held);
	for (int i = 0; i < 2; i++) {
		pthread_join(th[i], NULL);
		cr_assert_eq(wa[i].rc, 0);
	}
	pgr_pool_destroy(p);
}

Test(checkout, scoped_checkout_releases_at_block_end, .timeout = 30)
{
	pgr_pool *p = small_pool(1, NULL);
	{
		PGR_SCOPED_CONN(c);
		cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
		cr_assert_eq(tu_stats(p).in_use, 1);
	}
	cr_assert_eq(tu_stats(p).in_use, 0);
	cr_assert_eq(tu_stats(p).idle, 1);
	pgr_pool_destroy(p);
}

Test(checkout, discard_closes_and_pool_refills, .timeout = 30)
{
	struct tu_events ev;
	pgr_pool *p = small_pool(1, &ev);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
	int pid = PQbackendPID(pgr_conn_pg(c));
	pgr_discard(c);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).closes_by_reason[PGR_CLOSE_DISCARDED] == 1, 5000));
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	cr_assert_neq(PQbackendPID(pgr_conn_pg(c)), pid);
	pgr_release(c);
	cr_assert_geq(tu_events_find(&ev, PGR_EV_CONN_CLOSED, "discarded"), 0);
	pgr_pool_destroy(p);
}

Test(checkout, pool_grows_on_demand_up_to_max_size, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = 0;
	cfg.max_size = 3;
	pgr_pool *p = tu_pool(&cfg);
	cr_assert_eq(tu_stats(p).size, 0);
	pgr_conn *c[3];
	for (int i = 0; i < 3; i++)
		cr_assert_eq(pgr_acquire(p, 5000, &c[i]), 0, "acquire %d", i);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.size, 3);
	cr_assert_eq(s.in_use, 3);
	pgr_conn *x;
	cr_assert_eq(pgr_acquire(p, 100, &x), -ETIMEDOUT);
	for (int i = 0; i < 3; i++)
		pgr_release(c[i]);
	cr_assert_eq(tu_stats(p).connects_ok, 3);
	pgr_pool_destroy(p);
}

/* ---- stealing across shards ---- */

struct steal_run {
	pgr_pool *p;
	int cpu_a, cpu_b; /* allowed CPUs whose shards differ */
	uint64_t steals[4];
};

static void pin(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	cr_assert_eq(sched_setaffinity(0, sizeof(set), &set), 0, "pin to CPU %d: %s", cpu,
	             strerror(errno));
	cr_assert_eq(sched_getcpu(), cpu);
}

static void *steal_main(void *arg)
{
	struct steal_run *r = arg;
	pgr_conn *c[2];
	/* Both connections go to CPU b's shard: returned from there. */
	pin(r->cpu_b);
	for (int i = 0; i < 2; i++)
		cr_assert_eq(pgr_acquire(r->p, 5000, &c[i]), 0);
	for (int i = 0; i < 2; i++)
		cr_assert_eq(pgr_release(c[i]), 0);
	r->steals[0] = tu_stats(r->p).steals;
	/* CPU a's shard is empty: the checkout takes one from b's. */
	pin(r->cpu_a);
	cr_assert_eq(pgr_acquire(r->p, 5000, &c[0]), 0);
	r->steals[1] = tu_stats(r->p).steals;
	/* Returned on a, it sits in a's shard: taking it again is no steal. */
	cr_assert_eq(pgr_release(c[0]), 0);
	cr_assert_eq(pgr_acquire(r->p, 5000, &c[0]), 0);
	r->steals[2] = tu_stats(r->p).steals;
	/* The other one is still in b's shard. */
	cr_assert_eq(pgr_acquire(r->p, 5000, &c[1]), 0);
	r->steals[3] = tu_stats(r->p).steals;
	for (int i = 0; i < 2; i++)
		cr_assert_eq(pgr_release(c[i]), 0);
	return NULL;
}

Test(checkout, a_caller_whose_shard_is_empty_steals_from_another_shard, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = cfg.max_size = 2;
	cfg.shards = 2;
	pgr_pool *p = tu_pool(&cfg);
	/* The shards alone: the per-CPU caches have their own test below. */
	pgr__pool_set_percpu(p, false);
	struct steal_run r = {.p = p, .cpu_a = -1, .cpu_b = -1};
	cpu_set_t allowed;
	cr_assert_eq(sched_getaffinity(0, sizeof(allowed), &allowed), 0);
	for (int cpu = 0; cpu < CPU_SETSIZE && cpu < (int)PGR__MAX_CPUS; cpu++) {
		if (!CPU_ISSET(cpu, &allowed))
			continue;
		if (r.cpu_a < 0)
			r.cpu_a = cpu;
		else if (p->cpu_shard[cpu] != p->cpu_shard[r.cpu_a]) {
			r.cpu_b = cpu;
			break;
		}
	}
	cr_assert_geq(r.cpu_b, 0,
	              "this test needs two CPUs this process may run on whose shards differ "
	              "(found %d CPU(s))",
	              CPU_COUNT(&allowed));
	pthread_t th;
	cr_assert_eq(pthread_create(&th, NULL, steal_main, &r), 0);
	pthread_join(th, NULL);
	cr_assert_eq(r.steals[1], r.steals[0] + 1, "no steal from the other shard");
	cr_assert_eq(r.steals[2], r.steals[1], "a connection in the caller's own shard was stolen");
	cr_assert_eq(r.steals[3], r.steals[2] + 1);
	pgr_pool_destroy(p);
}

/* ---- per-CPU caches ---- */

/* The first two CPUs this process may run on. */
static void two_cpus(int cpus[2])
{
	cpu_set_t allowed;
	cr_assert_eq(sched_getaffinity(0, sizeof(allowed), &allowed), 0);
	int n = 0;
	for (int cpu = 0; cpu < CPU_SETSIZE && n < 2; cpu++)
		if (CPU_ISSET(cpu, &allowed))
			cpus[n++] = cpu;
	cr_assert_eq(n, 2, "this test needs two CPUs this process may run on");
}

struct sleeper_run {
	pgr_pool *p;
	int cpu;
	int rc;
	int64_t waited_ms;
};

static void *sleeper_main(void *arg)
{
	struct sleeper_run *r = arg;
	pin(r->cpu);
	pgr_conn *c;
	int64_t t0 = tu_now_ms();
	r->rc = pgr_acquire(r->p, 5000, &c);
	r->waited_ms = tu_now_ms() - t0;
	if (r->rc == 0)
		pgr_release(c);
	return NULL;
}

/*
 * A caller asleep in the queue, not yet due a hand-off: the connection returned meanwhile on
 * another CPU must reach it (to a shard, with the sleeper woken), never sit in the returning
 * CPU's cache while the sleeper waits out its deadline. The sleeper closed the caches' gate
 * before it parked (percpu.h).
 */
Test(checkout, a_release_while_a_caller_sleeps_reaches_it_not_a_cpu_cache, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = cfg.max_size = 1;
	pgr_pool *p = tu_pool(&cfg);
	int cpus[2];
	two_cpus(cpus);
	pin(cpus[0]);
	pgr_conn *held;
	cr_assert_eq(pgr_acquire(p, 5000, &held), 0);
	struct sleeper_run r = {.p = p, .cpu = cpus[1]};
	pthread_t th;
	cr_assert_eq(pthread_create(&th, NULL, sleeper_main, &r), 0);
	/* Until the caller has given up spinning and sleeps. */
	bool asleep = false;
	for (int i = 0; i < 500000 && !asleep; i++) {
		if (atomic_load_explicit(&p->nwaiters, memory_order_acquire) == 1) {
			uint32_t head = p->wq_head;
			asleep = head != PGR__NONE &&
			         atomic_load_explicit(&p->waiters[head].state,
			                              memory_order_acquire) == PGR__W_SLEEPING;
		}
		if (!asleep)
			sched_yield();
	}
	cr_assert(asleep, "the caller never went to sleep");
	cr_assert_eq(pgr_release(held), 0);
	pthread_join(th, NULL);
	cr_assert_eq(r.rc, 0, "%s", pgr_strerror(r.rc));
	cr_assert_lt(r.waited_ms, 1000,
	             "the sleeper waited %lld ms for a connection returned to "
	             "the pool",
	             (long long)r.waited_ms);
	pgr_pool_destroy(p);
}

struct cache_run {
	pgr_pool *p;
	int cpu_a, cpu_b;
	int rc_try, rc_again;
	int pid_first, pid_try;
	uint64_t steals[2];
};

static void *cache_main(void *arg)
{
	struct cache_run *r = arg;
	pgr_conn *c;
	/* Returned on CPU a, the one connection sits in a's cache. */
	pin(r->cpu_a);
	cr_assert_eq(pgr_acquire(r->p, 5000, &c), 0);
	r->pid_first = PQbackendPID(pgr_conn_pg(c));
	cr_assert_eq(pgr_release(c), 0);
	r->steals[0] = tu_stats(r->p).steals;
	/* On CPU b nothing is in b's cache or in a shard: a try_acquire must still find it. */
	pin(r->cpu_b);
	r->rc_try = pgr_try_acquire(r->p, &c);
	if (r->rc_try == 0) {
		r->pid_try = PQbackendPID(pgr_conn_pg(c));
		r->steals[1] = tu_stats(r->p).steals;
		pgr_release(c);
		/* Now cached on b: taken again without a steal. */
		r->rc_again = pgr_try_acquire(r->p, &c);
		if (r->rc_again == 0)
			pgr_release(c);
	}
	return NULL;
}

Test(checkout, a_connection_cached_by_another_cpu_is_taken_even_without_waiting, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = cfg.max_size = 1;
	pgr_pool *p = tu_pool(&cfg);
	if (!pgr__pool_percpu(p))
		cr_skip_test("per-CPU caches are not available in this build or on this machine");
	struct cache_run r = {.p = p, .cpu_a = -1, .cpu_b = -1};
	cpu_set_t allowed;
	cr_assert_eq(sched_getaffinity(0, sizeof(allowed), &allowed), 0);
	for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
		if (!CPU_ISSET(cpu, &allowed))
			continue;
		if (r.cpu_a < 0)
			r.cpu_a = cpu;
		else {
			r.cpu_b = cpu;
			break;
		}
	}
	cr_assert_geq(r.cpu_b, 0, "this test needs two CPUs this process may run on");
	pthread_t th;
	cr_assert_eq(pthread_create(&th, NULL, cache_main, &r), 0);
	pthread_join(th, NULL);
	cr_assert_eq(r.rc_try, 0, "a connection idle in another CPU's cache was not found: %s",
	             pgr_strerror(r.rc_try));
	cr_assert_eq(r.pid_try, r.pid_first);
	cr_assert_eq(r.steals[1], r.steals[0] + 1, "taking it from a's cache is a steal");
	cr_assert_eq(r.rc_again, 0);
	pgr_stats st = tu_stats(p);
	cr_assert_eq(st.steals, r.steals[1], "taken again on b: no steal");
	cr_assert_eq(st.idle, 1);
	cr_assert_eq(st.connects_ok, 1);
	pgr_pool_destroy(p);
}

struct paused_release {
	pgr_conn *c;
	int cpu;
	int mode; /* COARSE_COUNT or COARSE_ARMED */
	int rc;
};

static void *paused_release_main(void *arg)
{
	struct paused_release *r = arg;
	pin(r->cpu);
	coarse_thread = pthread_self();
	atomic_store(&coarse_calls, 0);
	atomic_store(&coarse_state, r->mode);
	r->rc = pgr_release(r->c);
	atomic_store(&coarse_state, COARSE_OFF);
	return NULL;
}

/*
 * A release that looked for waiters just before a caller queued, and then commits its
 * connection to its CPU's cache: the caller, asleep by then, never looks in that cache. It
 * closed the caches' gate before its last look and its sleep (percpu.h), so the commit fails
 * and the connection goes to a shard, where the release's second look at the waiters finds
 * the sleeper. The releaser is stopped between its look at the waiters and its commit (at
 * its last clock read, the cache's calm check), and the caller queues and sleeps meanwhile.
 */
Test(checkout, a_release_racing_a_caller_into_sleep_does_not_strand_its_connection_in_a_cache,
     .timeout = 30)
{
	int cpus[2];
	two_cpus(cpus);
	pgr_config cfg;
	pgr__fake_config(&cfg, 1);
	pgr_pool *p = NULL;
	cr_assert_eq(pgr__pool_create_fake(&cfg, &p), 0);
	cr_assert_gt(p->npcpu, 0, "no per-CPU caches here (rseq or membarrier missing)");

	/* The pool's clock read through the coarse clock, not a ticked cache: the pause point. */
	atomic_store(&p->clock->live, 0);
	/* How many coarse clock reads a release makes: the last is the cache's calm check. */
	struct paused_release r = {.cpu = cpus[0], .mode = COARSE_COUNT};
	cr_assert_eq(pgr_acquire(p, 0, &r.c), 0);
	pthread_t t;
	pthread_create(&t, NULL, paused_release_main, &r);
	pthread_join(t, NULL);
	cr_assert_eq(r.rc, 0);
	int reads = atomic_load(&coarse_calls);
	cr_assert_gt(reads, 0, "a release reads no coarse clock: the pause point is gone");

	cr_assert_eq(pgr_acquire(p, 0, &r.c), 0);
	/* Taken from the releaser's CPU's cache (a steal, a fence): releases leave the caches
	 * alone for PGR__PCPU_CALM_MS after that, and this one must try the cache. */
	tu_sleep_ms(PGR__PCPU_CALM_MS * 2);
	r.mode = COARSE_ARMED;
	atomic_store(&coarse_pause_at, reads);
	pthread_create(&t, NULL, paused_release_main, &r);
	cr_assert(TU_WAIT_UNTIL(atomic_load(&coarse_state) == COARSE_PAUSED, 2000),
	          "the releaser did not stop");
	cr_assert_eq(atomic_load(&p->nwaiters), 0);

	struct sleeper_run s = {.p = p, .cpu = cpus[1]};
	pthread_t st;
	cr_assert_eq(pthread_create(&st, NULL, sleeper_main, &s), 0);
	bool asleep = false;
	for (int i = 0; i < 2000 && !asleep; i++) {
		uint32_t head = p->wq_head;
		asleep = atomic_load(&p->nwaiters) == 1 && head != PGR__NONE &&
		         atomic_load(&p->waiters[head].state) == PGR__W_SLEEPING;
		if (!asleep)
			tu_sleep_ms(1);
	}
	cr_assert(asleep, "the caller never went to sleep");
	atomic_store(&coarse_state, COARSE_GO);
	pthread_join(t, NULL);
	cr_assert_eq(r.rc, 0);
	pthread_join(st, NULL);
	cr_assert_eq(s.rc, 0, "the sleeper: %s", pgr_strerror(s.rc));
	cr_assert_lt(s.waited_ms, 1000,
	             "the sleeper waited %lld ms while the connection sat in a CPU's cache",
	             (long long)s.waited_ms);
	pgr_pool_destroy(p);
}

/*
 * ping_after_idle_ms 0 pings on every checkout, even one of a connection whose return was
 * stamped ahead of the clock the checkout reads: while the runtime ticks the hot path's clock
 * it lags the coarse clock by up to a tick, and a return stamped from the coarse clock (the
 * ticking had stopped) looks up to a tick in the future.
 */
Test(checkout, a_return_stamped_ahead_of_the_clock_is_still_pinged_when_every_checkout_pings,
     .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = cfg.max_size = 1;
	cfg.ping_after_idle_ms = 0;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	uint32_t id = pgr_conn_id(c);
	cr_assert_eq(pgr_release(c), 0);
	atomic_store(&p->conns[id].fresh, 0);
	atomic_store(&p->conns[id].idle_since_ms, pgr__now_ms(p) + 3);
	uint64_t pings = tu_stats(p).pings;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	cr_assert_eq(tu_stats(p).pings, pings + 1, "the checkout skipped its ping");
	cr_assert_eq(pgr_release(c), 0);
	pgr_pool_destroy(p);
}
