/* SPDX-License-Identifier: PostgreSQL */
/*
 * Stress of pgr_loop_exec against the real server: io_uring loops on their own threads pipeline
 * statements (good ones, failing ones, slow ones with short deadlines, with the prepared cache
 * on and a tiny LRU so that DEALLOCATEs run) over a small pool that blocking threads also use,
 * while a chaos thread kills the loops' backends. At the end the pool is drained with
 * statements in flight. All of it twice: with a sync point per statement, and with groups of
 * up to four statements sharing one (exec_sync_group). Asserts: every accepted statement is
 * answered exactly once; a success carries the right value; errors are only the kinds the contract
 * lists; the loops destroy and the pool drains. Plain program so that it runs under
 * ThreadSanitizer; prints "N passed, N failed".
 */
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pgring.h"
#include "stressutil.h"

#define POOL     4
#define NLOOPS   2
#define NTHREADS 2
#define SLOTS    24
#define RUN_MS   4000 /* per run, two runs */

static pgr_pool *pool;
static _Atomic int64_t until_ms;
static _Atomic bool draining;
static _Atomic uint64_t n_ok, n_sqlerr, n_timeout, n_eio, n_other, n_busy;

struct lp;
struct slot {
	struct lp *l;
	int kind; /* 0 value, 1 division by zero, 2 slow with a short deadline */
	int value;
	int answers;
	bool busy;
	char p[16];
};

struct lp {
	int id;
	struct io_uring ring;
	pgr_loop *loop;
	unsigned seed;
	struct slot s[SLOTS];
};

static const char *const texts[] = {
    "select $1::int",   "select $1::int + 0", "select $1::int * 1",
    "select ($1::int)", "select $1::int - 0",
};

static void issue(struct slot *s);

static void on_res(pgr_loop *l, int err, PGresult *r, void *arg)
{
	(void)l;
	struct slot *s = arg;
	if (!s->busy)
		FAIL("a statement answered twice");
	s->busy = false;
	s->answers++;
	if (err == 0 && PQresultStatus(r) == PGRES_TUPLES_OK) {
		if (s->kind != 0 && s->kind != 2)
			FAIL("a failing statement succeeded");
		if (s->kind == 0 && atoi(PQgetvalue(r, 0, 0)) != s->value)
			FAIL("wrong value %s for %d", PQgetvalue(r, 0, 0), s->value);
		atomic_fetch_add(&n_ok, 1);
	} else if (err == 0 && PQresultStatus(r) == PGRES_FATAL_ERROR) {
		atomic_fetch_add(&n_sqlerr, 1);
	} else if (err == -ETIMEDOUT) {
		atomic_fetch_add(&n_timeout, 1);
	} else if (err == -EIO) {
		atomic_fetch_add(&n_eio, 1);
	} else if (err == -ESHUTDOWN || err == -ECANCELED || err == -PGR_E_CONNECT_FAILED) {
		atomic_fetch_add(&n_other, 1);
	} else {
		FAIL("unexpected answer %d (%s)", err, pgr_strerror(err));
	}
	PQclear(r);
	if (now_ms() < atomic_load(&until_ms) && !atomic_load(&draining))
		issue(s);
}

static void issue(struct slot *s)
{
	struct lp *l = s->l;
	int k = rand_r(&l->seed) % 20;
	s->kind = k == 0 ? 1 : k == 1 ? 2 : 0;
	s->value = rand_r(&l->seed) % 100000;
	snprintf(s->p, sizeof s->p, "%d", s->value);
	const char *pv[1] = {s->p};
	const char *sql = texts[rand_r(&l->seed) % 5];
	int64_t tmo = 2000;
	if (s->kind == 1) {
		sql = "select 1 / ($1::int * 0)";
	} else if (s->kind == 2) {
		sql = "select pg_sleep(0.2), $1::int";
		tmo = 20 + rand_r(&l->seed) % 300;
	}
	s->busy = true;
	int rc = pgr_loop_exec(l->loop, sql, 1, pv, tmo, on_res, s);
	if (rc) {
		s->busy = false;
		if (rc != -EBUSY && rc != -ESHUTDOWN)
			FAIL("pgr_loop_exec: %s", pgr_strerror(rc));
		atomic_fetch_add(&n_busy, 1);
	}
}

static void turn(struct lp *l)
{
	struct __kernel_timespec ts = {.tv_nsec = 5000000};
	struct io_uring_cqe *cqe;
	io_uring_submit_and_wait_timeout(&l->ring, &cqe, 1, &ts, NULL);
	unsigned head, n = 0;
	io_uring_for_each_cqe (&l->ring, head, cqe) {
		if (!pgr_loop_handle_cqe(l->loop, cqe))
			FAIL("a CQE that is not pgring's");
		n++;
	}
	io_uring_cq_advance(&l->ring, n);
}

static void *loop_main(void *a)
{
	struct lp *l = a;
	if (io_uring_queue_init(64, &l->ring, 0) || pgr_loop_create(pool, &l->ring, 0, &l->loop)) {
		FAIL("loop setup");
		return NULL;
	}
	for (int i = 0; i < SLOTS; i++) {
		l->s[i].l = l;
		issue(&l->s[i]);
	}
	int64_t hard = atomic_load(&until_ms) + 15000;
	for (;;) {
		bool busy = false;
		for (int i = 0; i < SLOTS; i++) {
			busy |= l->s[i].busy;
			/* Slots refused (-EBUSY) retry here. */
			if (!l->s[i].busy && now_ms() < atomic_load(&until_ms) &&
			    !atomic_load(&draining) && rand_r(&l->seed) % 4 == 0)
				issue(&l->s[i]);
		}
		if (!busy && now_ms() >= atomic_load(&until_ms))
			break;
		if (now_ms() > hard) {
			FAIL("loop %d: statements never answered", l->id);
			break;
		}
		turn(l);
	}
	int64_t dl = now_ms() + 10000;
	while (pgr_loop_destroy(l->loop) == -EBUSY) {
		if (now_ms() > dl) {
			FAIL("loop %d never destroyed", l->id);
			return NULL;
		}
		turn(l);
	}
	for (int i = 0; i < SLOTS; i++)
		if (l->s[i].busy)
			FAIL("a statement was never answered");
	io_uring_queue_exit(&l->ring);
	return NULL;
}

static void *blocking_main(void *a)
{
	(void)a;
	while (now_ms() < atomic_load(&until_ms) && !atomic_load(&draining)) {
		pgr_conn *c;
		if (pgr_acquire(pool, 50, &c) == 0) {
			PGresult *r = PQexec(pgr_conn_pg(c), "select 1");
			PQclear(r);
			pgr_release(c);
		}
	}
	return NULL;
}

static void *chaos_main(void *a)
{
	PGconn *admin = PQconnectdb((const char *)a);
	if (PQstatus(admin) != CONNECTION_OK) {
		FAIL("admin connection: %s", PQerrorMessage(admin));
		PQfinish(admin);
		return NULL;
	}
	while (now_ms() < atomic_load(&until_ms) - 1000) {
		struct timespec ts = {.tv_nsec = 400000000};
		nanosleep(&ts, NULL);
		PGresult *r =
		    PQexec(admin, "select pg_terminate_backend(pid) from pg_stat_activity "
		                  "where application_name = 'pgr_stress_exec' and "
		                  "state = 'active' limit 1");
		PQclear(r);
	}
	PQfinish(admin);
	return NULL;
}

/* One run on a fresh pool; sync_group: exec_sync_group (1: a sync point per statement). */
static void run(const char *conninfo, uint32_t sync_group)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = conninfo;
	cfg.max_size = POOL;
	cfg.min_idle = 2;
	cfg.exec_max_conns = 2;
	cfg.exec_pipeline_depth = 8;
	cfg.exec_max_pending = 32;
	cfg.exec_idle_release_ms = 50;
	cfg.exec_sync_group = sync_group;
	cfg.prepare_threshold = 1;
	cfg.prepare_cache_size = 3; /* five texts: evictions and DEALLOCATEs all the time */
	cfg.reset_timeout_ms = 1000;
	if (pgr_pool_create(&cfg, &pool)) {
		FAIL("pool create failed");
		return;
	}
	atomic_store(&draining, false);
	atomic_store(&until_ms, now_ms() + RUN_MS);
	pthread_t lt[NLOOPS], bt[NTHREADS], ct;
	struct lp *L = calloc(NLOOPS, sizeof *L);
	for (int i = 0; i < NLOOPS; i++) {
		L[i].id = i;
		L[i].seed = 1234u + (unsigned)i + sync_group;
		pthread_create(&lt[i], NULL, loop_main, &L[i]);
	}
	for (int i = 0; i < NTHREADS; i++)
		pthread_create(&bt[i], NULL, blocking_main, NULL);
	pthread_create(&ct, NULL, chaos_main, (void *)conninfo);
	pthread_join(ct, NULL);
	/* Drain in the middle of the work: statements in flight finish, queued ones are told. */
	struct timespec ts = {.tv_sec = 1};
	nanosleep(&ts, NULL);
	atomic_store(&draining, true);
	int drc = pgr_pool_drain(pool, 10000);
	for (int i = 0; i < NTHREADS; i++)
		pthread_join(bt[i], NULL);
	for (int i = 0; i < NLOOPS; i++)
		pthread_join(lt[i], NULL);
	if (drc != 0)
		FAIL("drain: %s", pgr_strerror(drc));
	if (pgr_pool_destroy(pool) != 0)
		FAIL("pool destroy");
	free(L);
}

int main(void)
{
	const char *base = getenv("PGR_TEST_CONNINFO");
	if (!base || !*base) {
		fprintf(stderr, "PGR_TEST_CONNINFO is not set: run through ./run.sh test\n");
		return 1;
	}
	char conninfo[1024];
	snprintf(conninfo, sizeof conninfo, "%s application_name=pgr_stress_exec", base);
	/* A sync point per statement, then groups of up to four sharing one (failed groups
	 * re-sent statement by statement while backends are killed). */
	run(conninfo, 1);
	run(conninfo, 4);
	uint64_t ok = atomic_load(&n_ok);
	if (ok < 100)
		FAIL("only %llu statements succeeded", (unsigned long long)ok);
	fprintf(stderr,
	        "stress_exec: ok %llu, sql errors %llu, timeouts %llu, eio %llu, "
	        "shutdown/cancelled %llu, refused %llu\n",
	        (unsigned long long)ok, (unsigned long long)atomic_load(&n_sqlerr),
	        (unsigned long long)atomic_load(&n_timeout),
	        (unsigned long long)atomic_load(&n_eio), (unsigned long long)atomic_load(&n_other),
	        (unsigned long long)atomic_load(&n_busy));
	int f = atomic_load(&failures);
	printf("%d passed, %d failed\n", f ? 0 : 1, f ? 1 : 0);
	return f ? 1 : 0;
}
