/* SPDX-License-Identifier: PostgreSQL */
/*
 * Server outages, against the real server: a stop and restart under load (bounded acquires,
 * backoff, recovery, no stale connection afterwards) and a server that accepts TCP and never
 * answers (connect_timeout_ms).
 *
 * The outage test stops the shared test server; its .fini starts it again whatever happened,
 * so a failure here does not take the server away from the tests that follow.
 */
#include <errno.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#include "test_lifecycle.h"

static void server_up_again(void)
{
	const char *ctl = getenv("PGR_TEST_CTL"), *dir = getenv("PGR_TEST_CTL_DIR");
	if (!ctl || !dir)
		return;
	char cmd[1024];
	snprintf(cmd, sizeof(cmd), "'%s' server-start '%s' >/dev/null 2>&1", ctl, dir);
	if (system(cmd) != 0)
		fprintf(stderr, "lifecycle: could not start the test server again\n");
}

enum {
	PHASE_UP = 0,
	PHASE_DOWN,
	PHASE_RESTARTED
};
enum {
	THREADS = 4,
	ACQ_MS = 300
};

/*
 * Slack above a deadline: acquires wait on an absolute futex deadline and connects on a linked
 * io_uring timeout, both exact in the kernel; what comes late is a thread's trip back onto a
 * CPU (one for a waiter, two for the manager: to start the connect, then to see it time out),
 * a few 4 ms scheduler quanta each on a busy 2-CPU machine. 40 ms leaves room for ten.
 */
#define LATE_MS 40

struct load {
	pgr_pool *p;
	_Atomic int stop;
	_Atomic int phase;
	_Atomic int64_t first_ok_ms; /* first successful query after the restart */
	_Atomic int ok;
	/* Acquires that started and ended while the server was down. */
	_Atomic int down_fail;
	_Atomic int down_connect_failed;
	_Atomic int down_bad_rc; /* neither -PGR_E_CONNECT_FAILED nor -ETIMEDOUT */
	_Atomic int down_bad_rc_value;
	_Atomic int64_t down_min_ms, down_max_ms;
	/* Query errors on connections handed out after the first success following the restart. */
	_Atomic int stale;
	pthread_mutex_t lock;
	char down_error[512]; /* pgr_pool_last_error after a failed acquire while down */
	char stale_error[512];
};

static void atomic_min(_Atomic int64_t *v, int64_t x)
{
	int64_t cur = atomic_load(v);
	while (x < cur && !atomic_compare_exchange_weak(v, &cur, x))
		;
}

static void atomic_max(_Atomic int64_t *v, int64_t x)
{
	int64_t cur = atomic_load(v);
	while (x > cur && !atomic_compare_exchange_weak(v, &cur, x))
		;
}

/* Worker threads record; only the test's thread asserts. */
static void *load_main(void *arg)
{
	struct load *l = arg;
	while (!atomic_load(&l->stop)) {
		int ph0 = atomic_load(&l->phase);
		int64_t t0 = tu_now_ms();
		pgr_conn *c = NULL;
		int rc = pgr_acquire(l->p, ACQ_MS, &c);
		int64_t t1 = tu_now_ms();
		int ph1 = atomic_load(&l->phase);
		if (rc != 0) {
			if (ph0 == PHASE_DOWN && ph1 == PHASE_DOWN) {
				atomic_fetch_add(&l->down_fail, 1);
				atomic_min(&l->down_min_ms, t1 - t0);
				atomic_max(&l->down_max_ms, t1 - t0);
				if (rc == -PGR_E_CONNECT_FAILED) {
					atomic_fetch_add(&l->down_connect_failed, 1);
					pthread_mutex_lock(&l->lock);
					pgr_pool_last_error(l->p, l->down_error,
					                    sizeof(l->down_error));
					pthread_mutex_unlock(&l->lock);
				} else if (rc != -ETIMEDOUT) {
					atomic_fetch_add(&l->down_bad_rc, 1);
					atomic_store(&l->down_bad_rc_value, rc);
				}
			}
			continue;
		}
		int64_t first = atomic_load(&l->first_ok_ms);
		bool after_recovery = ph0 == PHASE_RESTARTED && first != 0 && t1 > first;
		PGconn *pg = pgr_conn_pg(c);
		PGresult *r = PQexec(pg, "select 1");
		bool ok = PQresultStatus(r) == PGRES_TUPLES_OK;
		PQclear(r);
		if (ok) {
			atomic_fetch_add(&l->ok, 1);
			int64_t zero = 0;
			if (ph0 == PHASE_RESTARTED)
				atomic_compare_exchange_strong(&l->first_ok_ms, &zero, tu_now_ms());
		} else if (after_recovery) {
			atomic_fetch_add(&l->stale, 1);
			pthread_mutex_lock(&l->lock);
			snprintf(l->stale_error, sizeof(l->stale_error), "%s", PQerrorMessage(pg));
			pthread_mutex_unlock(&l->lock);
		}
		pgr_release(c);
	}
	return NULL;
}

Test(lifecycle, server_restart_under_load_fails_fast_backs_off_and_recovers, .timeout = 90,
     .fini = server_up_again)
{
	enum {
		DOWN_MS = 2000,
		MIN = 4
	};
	const char *app = "lc_outage";
	struct lc_events *ev = lc_events_new();
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, ev, &ci);
	cfg.min_idle = cfg.max_size = MIN;
	cfg.backoff_min_ms = 100;
	cfg.backoff_max_ms = 1000;
	cfg.connect_timeout_ms = 2000;
	pgr_pool *p = tu_pool(&cfg);
	free(ci);

	struct load *l = calloc(1, sizeof(*l));
	cr_assert(l);
	l->p = p;
	l->down_min_ms = INT64_MAX;
	pthread_mutex_init(&l->lock, NULL);
	pthread_t th[THREADS];
	for (int i = 0; i < THREADS; i++)
		pthread_create(&th[i], NULL, load_main, l);
	cr_assert(TU_WAIT_UNTIL(atomic_load(&l->ok) >= 100, 10000), "no load before the outage");

	/* Down for about DOWN_MS, load running all along. */
	uint64_t cf0 = tu_stats(p).connects_failed;
	int64_t t_stop = tu_now_ms();
	tu_server_ctl("server-stop");
	atomic_store(&l->phase, PHASE_DOWN);
	while (tu_now_ms() < t_stop + DOWN_MS)
		tu_sleep_ms(20);
	atomic_store(&l->phase,
	             PHASE_UP); /* acquires in flight across the restart are not judged */
	uint64_t cf1 = tu_stats(p).connects_failed;
	int64_t t_down = tu_now_ms() - t_stop;
	tu_server_ctl("server-start");
	int64_t t_start = tu_now_ms();
	atomic_store(&l->phase, PHASE_RESTARTED);

	cr_assert(TU_WAIT_UNTIL(atomic_load(&l->first_ok_ms) != 0, 10000),
	          "no successful query within 10 s of the restart");
	int64_t recovery = atomic_load(&l->first_ok_ms) - t_start;
	uint64_t attempts = cf1 - cf0;
	fprintf(stderr,
	        "lifecycle: server down %lld ms: %llu failed connect attempts "
	        "(backoff 100..1000 ms); first successful query %lld ms after server-start\n",
	        (long long)t_down, (unsigned long long)attempts, (long long)recovery);

	/* Keep the load on a while after recovery: nothing stale may come out of the pool. */
	int ok_at_recovery = atomic_load(&l->ok);
	cr_assert(TU_WAIT_UNTIL(atomic_load(&l->ok) >= ok_at_recovery + 200, 10000));
	atomic_store(&l->stop, 1);
	for (int i = 0; i < THREADS; i++)
		pthread_join(th[i], NULL);

	/* While down: every acquire failed at its own deadline, saying why. */
	cr_assert_gt(atomic_load(&l->down_fail), 0, "no acquire failed while the server was down");
	cr_assert_gt(atomic_load(&l->down_connect_failed), 0,
	             "no acquire reported -PGR_E_CONNECT_FAILED while the server was down");
	cr_assert_eq(atomic_load(&l->down_bad_rc), 0, "unexpected acquire error %d (%s)",
	             atomic_load(&l->down_bad_rc_value),
	             pgr_strerror(atomic_load(&l->down_bad_rc_value)));
	cr_assert_geq(atomic_load(&l->down_min_ms), ACQ_MS - 2,
	              "an acquire gave up before its deadline");
	cr_assert_leq(atomic_load(&l->down_max_ms), ACQ_MS + LATE_MS, "an acquire took %lld ms",
	              (long long)atomic_load(&l->down_max_ms));
	cr_assert(strstr(l->down_error, "connection to server at") != NULL,
	          "last error does not name the connection failure: '%s'", l->down_error);
	cr_assert(lc_events_find_msg(ev, PGR_EV_ACQUIRE_TIMEOUT, "last connect error: "),
	          "no acquire-timeout event carries the connect error");
	/*
	 * Backoff bound. While failing, the manager runs one attempt at a time, and after each
	 * failure waits at least half the current step (equal jitter), the step doubling from
	 * backoff_min 100 ms to backoff_max 1000 ms: 50, 100, 200, 400, then 500 ms each. So the
	 * retries come at least 50, 150, 350, 750, 1250, 1750, 2250 ms after the first failure:
	 * 6 in a 2 s window. Attempts already in flight when the first one failed (at most
	 * max_connecting = 4, the first included) fail too and only speed the doubling up:
	 * 4 + 6 = 10, 11 if the window stretches past 2.25 s. 15 leaves room for a slow stop.
	 */
	cr_assert_geq(attempts, 1);
	cr_assert_leq(attempts, 15, "%llu connect attempts in %lld ms down: no backoff",
	              (unsigned long long)attempts, (long long)t_down);
	cr_assert_lt(recovery, 3000, "recovered %lld ms after the restart", (long long)recovery);
	cr_assert_eq(atomic_load(&l->stale), 0, "%d queries failed after recovery: %s",
	             atomic_load(&l->stale), l->stale_error);
	/* And the pool fills back up to min_idle. */
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).idle == MIN, 5000), "idle %u after recovery",
	          tu_stats(p).idle);
	pgr_pool_destroy(p);
	pthread_mutex_destroy(&l->lock);
	free(l);
	lc_events_free(ev);
}

Test(lifecycle, silent_server_fails_connect_after_connect_timeout, .timeout = 30)
{
	enum {
		CONNECT_MS = 300,
		ACQ = 1500
	};
	int port;
	int lfd = tu_silent_listener(&port);
	char ci[256];
	snprintf(ci, sizeof(ci),
	         "host=127.0.0.1 port=%d user=pgr_trust dbname=postgres sslmode=disable", port);
	struct lc_events *ev = lc_events_new();
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.max_size = 1;
	cfg.connect_timeout_ms = CONNECT_MS;
	cfg.on_event = lc_events_cb;
	cfg.user_data = ev;
	pgr_pool *p = NULL;
	cr_assert_eq(pgr_pool_create(&cfg, &p), 0);

	pgr_conn *c = NULL;
	int64_t t0 = tu_now_ms();
	int rc = pgr_acquire(p, ACQ, &c);
	int64_t took = tu_now_ms() - t0;
	cr_assert_eq(rc, -PGR_E_CONNECT_FAILED, "rc %d (%s)", rc, pgr_strerror(rc));
	cr_assert_geq(took, ACQ - 2);
	cr_assert_lt(took, ACQ + LATE_MS, "acquire took %lld ms", (long long)took);

	/* The attempt itself was abandoned at connect_timeout_ms, and said so. */
	struct lc_ev e;
	cr_assert(lc_events_first(ev, PGR_EV_CONNECT_FAILED, NULL, UINT32_MAX, 0, &e, NULL),
	          "no connect-failed event");
	cr_assert_geq(e.t_ms - t0, CONNECT_MS, "gave up after %lld ms", (long long)(e.t_ms - t0));
	cr_assert_lt(e.t_ms - t0, CONNECT_MS + LATE_MS, "gave up after %lld ms",
	             (long long)(e.t_ms - t0));
	cr_assert(strstr(e.msg, "timeout"), "connect-failed event: %s", e.msg);
	char err[512];
	pgr_pool_last_error(p, err, sizeof(err));
	cr_assert(strstr(err, "timeout"), "last error: %s", err);
	cr_assert_geq(tu_stats(p).connects_failed, 1);
	cr_assert_eq(tu_stats(p).connects_ok, 0);

	/* Destroy with an attempt still hanging on the silent server: no hang. */
	int64_t t1 = tu_now_ms();
	pgr_pool_destroy(p);
	cr_assert_lt(tu_now_ms() - t1, 2000);
	close(lfd);
	lc_events_free(ev);
}
