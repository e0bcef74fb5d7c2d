/* SPDX-License-Identifier: PostgreSQL */
/*
 * Stress with faults and misuse, against the real server: blocking threads and io_uring loops
 * (rings kept full half the time) share one pool whose every checkout is pre-pinged, while a
 * chaos thread stalls backends (SIGSTOP/SIGCONT) and kills them, and the callers misuse the API
 * (double releases, stale handles, releases with a query in flight). At the end the pool is
 * drained in the middle of the work. Asserts: no connection is ever held by two callers, no
 * misuse call is accepted, the pool heals to min_idle once the faults stop, drain and destroy
 * end. Plain program (Criterion cannot run under ThreadSanitizer); prints "N passed, N failed".
 */
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pgring.h"
#include "stressutil.h"

#define POOL     4
#define NTHREADS 3
#define NLOOPS   2
#define CHAINS   3

static void sleep_ms(int64_t ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
	nanosleep(&ts, NULL);
}

static pgr_pool *pool;
static _Atomic int holder[4096]; /* conn id -> caller tag + 1, 0 when free */
static _Atomic bool stop_work, stop_chaos, draining;
static _Atomic uint64_t checkouts, misuse_refused, acquire_errors;
static const char *conninfo;

static void hold(pgr_conn *c, int tag)
{
	int prev = atomic_exchange(&holder[pgr_conn_id(c)], tag + 1);
	if (prev != 0)
		FAIL("connection %u held by %d and %d at once", pgr_conn_id(c), prev - 1, tag);
	atomic_fetch_add(&checkouts, 1);
}

static void unhold(pgr_conn *c, int tag)
{
	int prev = atomic_exchange(&holder[pgr_conn_id(c)], 0);
	if (prev != tag + 1)
		FAIL("connection %u released by %d but held by %d", pgr_conn_id(c), tag, prev - 1);
}

static bool acceptable_acquire_error(int rc)
{
	return rc == -ETIMEDOUT || rc == -PGR_E_CONNECT_FAILED || rc == -ESHUTDOWN || rc == -EAGAIN;
}

/* A misuse call must be refused, never accepted. */
static void expect_refused(int rc, const char *what)
{
	if (rc == 0)
		FAIL("misuse accepted: %s", what);
	else
		atomic_fetch_add(&misuse_refused, 1);
}

/* ---- blocking threads ---- */

static void *thread_main(void *arg)
{
	int tag = (int)(intptr_t)arg;
	unsigned seed = (unsigned)tag * 7919u + 3;
	pgr_conn *stale = NULL;
	while (!atomic_load(&stop_work)) {
		pgr_conn *c;
		int rc = pgr_acquire(pool, 1000, &c);
		if (rc) {
			if (!acceptable_acquire_error(rc))
				FAIL("acquire: %s", pgr_strerror(rc));
			atomic_fetch_add(&acquire_errors, 1);
			if (rc == -ESHUTDOWN)
				break;
			continue;
		}
		hold(c, tag);
		int r = rand_r(&seed) % 8;
		bool broken = false;
		if (r < 3) {
			PGresult *res = PQexec(pgr_conn_pg(c), "select 1");
			broken = PQresultStatus(res) != PGRES_TUPLES_OK;
			PQclear(res);
		} else if (r == 3) {
			PQclear(PQexec(pgr_conn_pg(c), "begin")); /* rolled back on return */
		}
		/* A handle from an earlier checkout must never release this one. */
		if (stale && rand_r(&seed) % 2)
			expect_refused(pgr_release(stale), "release of a stale handle");
		unhold(c, tag);
		rc = broken ? pgr_discard(c) : pgr_release(c);
		if (rc)
			FAIL("release: %s", pgr_strerror(rc));
		if (rand_r(&seed) % 4 == 0)
			expect_refused(pgr_release(c), "second release");
		stale = c;
	}
	return NULL;
}

/* ---- io_uring loops ---- */

struct loop;
struct chain {
	struct loop *lp;
	int tag;
	pgr_conn *conn;
	bool busy;
};

struct loop {
	struct io_uring ring;
	pgr_loop *l;
	struct chain chains[CHAINS];
	unsigned seed;
	uint64_t nops;
};

static void chain_start(struct chain *ch);

static void on_query(pgr_loop *l, int err, PGresult *res, void *arg)
{
	struct chain *ch = arg;
	bool ok =
	    err == 0 && res &&
	    (PQresultStatus(res) == PGRES_TUPLES_OK || PQresultStatus(res) == PGRES_COMMAND_OK);
	PQclear(res);
	unhold(ch->conn, ch->tag);
	int rc = ok ? pgr_loop_release(l, ch->conn) : pgr_discard(ch->conn);
	if (rc)
		FAIL("loop release: %s", pgr_strerror(rc));
	if (rand_r(&ch->lp->seed) % 4 == 0)
		expect_refused(pgr_loop_release(l, ch->conn), "second loop release");
	ch->conn = NULL;
	ch->busy = false;
}

static void on_acquire(pgr_loop *l, int err, pgr_conn *c, void *arg)
{
	struct chain *ch = arg;
	if (err) {
		if (!acceptable_acquire_error(err) && err != -ECANCELED)
			FAIL("async acquire: %s", pgr_strerror(err));
		atomic_fetch_add(&acquire_errors, 1);
		ch->busy = false;
		return;
	}
	hold(c, ch->tag);
	ch->conn = c;
	int r = rand_r(&ch->lp->seed) % 4;
	if (r == 0) {
		unhold(c, ch->tag);
		if (pgr_loop_release(l, c))
			FAIL("loop release");
		ch->conn = NULL;
		ch->busy = false;
		return;
	}
	const char *sql = r == 1 ? "begin" : "select 1";
	int rc = pgr_loop_query(l, c, sql, 0, NULL, 1000, on_query, ch);
	if (rc) {
		FAIL("loop query: %s", pgr_strerror(rc));
		return;
	}
	/* Releasing with the query in flight must be refused, and leave the query alone. */
	if (rand_r(&ch->lp->seed) % 3 == 0)
		expect_refused(pgr_release(c), "release with a query in flight");
}

static void chain_start(struct chain *ch)
{
	ch->busy = true;
	int rc = pgr_loop_acquire(ch->lp->l, 500, on_acquire, ch);
	if (rc) {
		ch->busy = false;
		if (!acceptable_acquire_error(rc) && rc != -EBUSY)
			FAIL("loop acquire: %s", pgr_strerror(rc));
	}
}

static void loop_turn(struct loop *lp, bool fill)
{
	struct __kernel_timespec ts = {0, 5000000};
	struct io_uring_cqe *cqe;
	io_uring_submit_and_wait_timeout(&lp->ring, &cqe, 1, &ts, NULL);
	pgr_loop_flush(lp->l);
	if (fill) {
		struct io_uring_sqe *s;
		while ((s = io_uring_get_sqe(&lp->ring)) != NULL) {
			io_uring_prep_nop(s);
			io_uring_sqe_set_data64(s, 1);
		}
	}
	unsigned head, n = 0;
	io_uring_for_each_cqe (&lp->ring, head, cqe) {
		if (!pgr_loop_handle_cqe(lp->l, cqe))
			lp->nops++;
		n++;
	}
	io_uring_cq_advance(&lp->ring, n);
}

static void *loop_main(void *arg)
{
	struct loop *lp = arg;
	if (io_uring_queue_init(16, &lp->ring, 0) != 0 ||
	    pgr_loop_create(pool, &lp->ring, 64, &lp->l) != 0) {
		FAIL("loop setup");
		return NULL;
	}
	while (!atomic_load(&stop_work)) {
		for (int i = 0; i < CHAINS; i++)
			if (!lp->chains[i].busy && !atomic_load(&draining))
				chain_start(&lp->chains[i]);
		loop_turn(lp, rand_r(&lp->seed) % 2);
	}
	int64_t dl = now_ms() + 10000;
	while (pgr_loop_destroy(lp->l) == -EBUSY) {
		if (now_ms() > dl) {
			FAIL("loop destroy never finished (pending %u)", pgr_loop_pending(lp->l));
			break;
		}
		loop_turn(lp, false);
	}
	io_uring_queue_exit(&lp->ring);
	return NULL;
}

/* ---- chaos ---- */

static int backend_pids(PGconn *admin, int *pids, int max)
{
	PGresult *r = PQexec(admin, "select pid from pg_stat_activity where application_name = "
	                            "'pgr_stress_faults'");
	int n = PQresultStatus(r) == PGRES_TUPLES_OK ? PQntuples(r) : 0;
	if (n > max)
		n = max;
	for (int i = 0; i < n; i++)
		pids[i] = atoi(PQgetvalue(r, i, 0));
	PQclear(r);
	return n;
}

static _Atomic uint64_t stalls, kills;

static void *chaos_main(void *arg)
{
	(void)arg;
	PGconn *admin = PQconnectdb(conninfo);
	unsigned seed = 12345;
	while (!atomic_load(&stop_chaos)) {
		int pids[16];
		int n = backend_pids(admin, pids, 16);
		if (n > 0) {
			int pid = pids[rand_r(&seed) % n];
			if (rand_r(&seed) % 5 == 0) {
				char sql[96];
				snprintf(sql, sizeof(sql), "select pg_terminate_backend(%d)", pid);
				PQclear(PQexec(admin, sql));
				atomic_fetch_add(&kills, 1);
			} else if (kill(pid, SIGSTOP) == 0) {
				atomic_fetch_add(&stalls, 1);
				sleep_ms(50 + rand_r(&seed) % 300);
				kill(pid, SIGCONT);
			}
		}
		sleep_ms(30 + rand_r(&seed) % 100);
	}
	PQfinish(admin);
	return NULL;
}

static uint32_t idle_now(void)
{
	pgr_stats s;
	pgr_pool_stats(pool, &s);
	return s.idle;
}

int main(void)
{
	const char *base = getenv("PGR_TEST_CONNINFO");
	if (!base || !*base) {
		fprintf(stderr, "PGR_TEST_CONNINFO is not set: run through ./run.sh test\n");
		printf("0 passed, 1 failed\n");
		return 1;
	}
	static char ci[1024];
	snprintf(ci, sizeof(ci), "%s application_name=pgr_stress_faults", base);
	conninfo = base;
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.max_size = POOL;
	cfg.min_idle = POOL;
	cfg.ping_after_idle_ms = 0; /* every checkout pre-pinged: loops ping on their rings */
	cfg.ping_timeout_ms = 150;
	cfg.reset_timeout_ms = 300;
	cfg.backoff_min_ms = 20;
	cfg.backoff_max_ms = 100;
	int rc = pgr_pool_create(&cfg, &pool);
	if (rc) {
		fprintf(stderr, "create: %s\n", pgr_strerror(rc));
		printf("0 passed, 1 failed\n");
		return 1;
	}
	int64_t dl = now_ms() + 10000;
	while (idle_now() < POOL && now_ms() < dl)
		sleep_ms(5);

	pthread_t th[NTHREADS], lt[NLOOPS], chaos;
	static struct loop loops[NLOOPS];
	for (int i = 0; i < NTHREADS; i++)
		pthread_create(&th[i], NULL, thread_main, (void *)(intptr_t)i);
	for (int i = 0; i < NLOOPS; i++) {
		loops[i].seed = 77u + (unsigned)i;
		for (int k = 0; k < CHAINS; k++)
			loops[i].chains[k] =
			    (struct chain){.lp = &loops[i], .tag = 100 + i * 10 + k};
		pthread_create(&lt[i], NULL, loop_main, &loops[i]);
	}
	pthread_create(&chaos, NULL, chaos_main, NULL);
	sleep_ms(4000);
	atomic_store(&stop_chaos, true);
	pthread_join(chaos, NULL);
	/* Faults over: the pool must heal while the work goes on. */
	sleep_ms(1500);
	uint64_t before = atomic_load(&checkouts);
	sleep_ms(500);
	uint64_t progress = atomic_load(&checkouts) - before;
	int passed = 0, failed_cases = 0;
	if (progress == 0) {
		FAIL("no checkout in the 500 ms after the faults stopped");
	}
	/* Drain in the middle of the work. */
	atomic_store(&draining, true);
	int64_t t0 = now_ms();
	rc = pgr_pool_drain(pool, 2000);
	int64_t took = now_ms() - t0;
	atomic_store(&stop_work, true);
	for (int i = 0; i < NTHREADS; i++)
		pthread_join(th[i], NULL);
	for (int i = 0; i < NLOOPS; i++)
		pthread_join(lt[i], NULL);
	if (rc != 0 && rc != -ETIMEDOUT)
		FAIL("drain: %s", pgr_strerror(rc));
	if (took > 2000 + 500)
		FAIL("drain took %lld ms for a 2000 ms deadline", (long long)took);
	pgr_stats st;
	pgr_pool_stats(pool, &st);
	if (pgr_pool_destroy(pool) != 0)
		FAIL("destroy refused after every loop was destroyed");
	printf("faults: %llu checkouts, %llu acquire errors, %llu misuses refused, %llu stalls, "
	       "%llu kills, closes %llu (ping_failed %llu, broken %llu, server_error %llu), "
	       "drain %lld ms rc=%d\n",
	       (unsigned long long)atomic_load(&checkouts),
	       (unsigned long long)atomic_load(&acquire_errors),
	       (unsigned long long)atomic_load(&misuse_refused),
	       (unsigned long long)atomic_load(&stalls), (unsigned long long)atomic_load(&kills),
	       (unsigned long long)st.closes,
	       (unsigned long long)st.closes_by_reason[PGR_CLOSE_PING_FAILED],
	       (unsigned long long)st.closes_by_reason[PGR_CLOSE_BROKEN],
	       (unsigned long long)st.closes_by_reason[PGR_CLOSE_SERVER_ERROR], (long long)took,
	       rc);
	for (int r = 0; r < PGR_CLOSE_REASONS; r++)
		if (st.closes_by_reason[r])
			printf("  closed %s: %llu\n",
			       pgr_close_reason_name((enum pgr_close_reason)r),
			       (unsigned long long)st.closes_by_reason[r]);
	if (atomic_load(&misuse_refused) == 0)
		FAIL("no misuse was tried: the test did not do its job");
	if (atomic_load(&stalls) == 0)
		FAIL("no backend was stalled: the test did not do its job");
	if (atomic_load(&failures) == 0)
		passed++;
	else
		failed_cases++;
	printf("%d passed, %d failed\n", passed, failed_cases);
	return failed_cases ? 1 : 0;
}
