/* SPDX-License-Identifier: PostgreSQL */
/*
 * Stress: several pools on one shared runtime, against the real server. Threads run checkouts
 * and queries on each pool while a churn thread creates, uses, drains and destroys pools on the
 * same runtime over and over. Asserts: no connection is held twice within a pool, no error on
 * the steady pools, every churned pool drains, the runtime is destroyed at the end. Runs in the
 * normal build and under ThreadSanitizer; prints "N passed, N failed".
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "pgring.h"
#include "stressutil.h"

#define POOLS   3
#define PER     2
#define SECONDS 3

static const char *conninfo;
static pgr_runtime *rt;
static _Atomic bool stop;

struct steady {
	pgr_pool *p;
	_Atomic int holder[64];
	_Atomic uint64_t ok;
};

static void *steady_main(void *arg)
{
	struct steady *s = arg;
	int me = (int)(intptr_t)pthread_self() | 1;
	unsigned seed = (unsigned)(uintptr_t)arg;
	while (!atomic_load(&stop)) {
		pgr_conn *c;
		int rc = pgr_acquire(s->p, 5000, &c);
		if (rc) {
			FAIL("acquire: %s", pgr_strerror(rc));
			continue;
		}
		uint32_t id = pgr_conn_id(c);
		if (atomic_exchange(&s->holder[id], me) != 0)
			FAIL("connection %u held twice", id);
		if (rand_r(&seed) % 4 == 0) {
			PGresult *r = PQexec(pgr_conn_pg(c), "select 1");
			if (PQresultStatus(r) != PGRES_TUPLES_OK)
				FAIL("query: %s", PQresultErrorMessage(r));
			PQclear(r);
		}
		atomic_store(&s->holder[id], 0);
		if ((rc = pgr_release(c)) != 0)
			FAIL("release: %s", pgr_strerror(rc));
		atomic_fetch_add(&s->ok, 1);
	}
	return NULL;
}

static _Atomic uint64_t churned;

static void *churn_main(void *arg)
{
	(void)arg;
	while (!atomic_load(&stop)) {
		pgr_config cfg;
		pgr_config_init(&cfg);
		cfg.conninfo = conninfo;
		cfg.max_size = 2;
		cfg.min_idle = 1;
		cfg.runtime = rt;
		pgr_pool *p;
		int rc = pgr_pool_create(&cfg, &p);
		if (rc) {
			FAIL("create on a shared runtime: %s", pgr_strerror(rc));
			return NULL;
		}
		pgr_conn *c;
		if ((rc = pgr_acquire(p, 5000, &c)) == 0) {
			PGresult *r = PQexec(pgr_conn_pg(c), "select 1");
			PQclear(r);
			pgr_release(c);
		} else {
			FAIL("churned pool acquire: %s", pgr_strerror(rc));
		}
		if ((rc = pgr_pool_drain(p, 2000)) != 0)
			FAIL("drain: %s", pgr_strerror(rc));
		pgr_pool_destroy(p);
		atomic_fetch_add(&churned, 1);
	}
	return NULL;
}

int main(void)
{
	conninfo = getenv("PGR_TEST_CONNINFO");
	if (!conninfo || !*conninfo) {
		fprintf(stderr, "PGR_TEST_CONNINFO is not set: run through ./run.sh test\n");
		printf("0 passed, 1 failed\n");
		return 1;
	}
	if (pgr_runtime_create(true, &rt) != 0) {
		printf("0 passed, 1 failed\n");
		return 1;
	}
	static struct steady s[POOLS];
	pthread_t th[POOLS * PER], churn;
	for (int i = 0; i < POOLS; i++) {
		pgr_config cfg;
		pgr_config_init(&cfg);
		cfg.conninfo = conninfo;
		cfg.max_size = 2;
		cfg.min_idle = 2;
		cfg.runtime = rt;
		if (pgr_pool_create(&cfg, &s[i].p) != 0) {
			printf("0 passed, 1 failed\n");
			return 1;
		}
	}
	for (int i = 0; i < POOLS * PER; i++)
		pthread_create(&th[i], NULL, steady_main, &s[i / PER]);
	pthread_create(&churn, NULL, churn_main, NULL);
	/*
	 * At least SECONDS, and until two pools have churned: each churned pool's first acquire
	 * waits for a connect, and a PostgreSQL backend's start under this load (six threads busy
	 * on two CPUs) has taken 1-3 s, plain PQconnectdb included. 30 s is a hang.
	 */
	int64_t start = now_ms(), until = start + SECONDS * 1000;
	while (now_ms() < until || (atomic_load(&churned) < 2 && now_ms() < start + 30 * 1000)) {
		struct timespec ts = {0, 50000000};
		nanosleep(&ts, NULL);
	}
	atomic_store(&stop, true);
	for (int i = 0; i < POOLS * PER; i++)
		pthread_join(th[i], NULL);
	pthread_join(churn, NULL);
	uint64_t total = 0;
	for (int i = 0; i < POOLS; i++) {
		pgr_stats st;
		pgr_pool_stats(s[i].p, &st);
		if (atomic_load(&s[i].ok) < 10)
			FAIL("pool %d made %llu checkouts", i, (unsigned long long)s[i].ok);
		if (st.closes)
			FAIL("pool %d closed %llu connections", i, (unsigned long long)st.closes);
		total += atomic_load(&s[i].ok);
		pgr_pool_destroy(s[i].p);
	}
	if (atomic_load(&churned) < 2)
		FAIL("only %llu pools churned", (unsigned long long)atomic_load(&churned));
	if (pgr_runtime_destroy(rt) != 0)
		FAIL("runtime destroy refused after every pool was destroyed");
	printf("runtime: %d steady pools, %llu checkouts, %llu pools created and destroyed\n",
	       POOLS, (unsigned long long)total, (unsigned long long)atomic_load(&churned));
	int failed = atomic_load(&failures) != 0;
	printf("%d passed, %d failed\n", !failed, failed);
	return failed;
}
