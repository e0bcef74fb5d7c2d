/* SPDX-License-Identifier: PostgreSQL */
/*
 * Stress: pgr_pool_resize from two threads at once while workers check out, query and return
 * connections, some of them inside a transaction (a rollback on return) and some discarded,
 * against the real server. A plain program so that it runs under ThreadSanitizer (CTest label
 * "stress"). Asserts no connection held by two callers at once, no failed checkout (acquires
 * wait up to 10 s: a waiter lost by a resize cannot pass for a timeout), never more open
 * connections than the capacity, and that the pool settles to the last resize's limit.
 * Prints "N passed, N failed".
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "pgring.h"

#define WORKERS  6
#define CAPACITY 8
#define RUN_MS   3000

static int failures;
#define CHECK(cond, ...)                                                                           \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);            \
			fprintf(stderr, __VA_ARGS__);                                              \
			fprintf(stderr, "\n");                                                     \
			failures++;                                                                \
		}                                                                                  \
	} while (0)

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static pgr_pool *pool;
static _Atomic int stop;
static _Atomic int holder[CAPACITY];
static _Atomic long checkouts, errors, double_holds, resize_errors, max_size_seen;

static void *worker(void *arg)
{
	unsigned seed = (unsigned)(uintptr_t)arg;
	while (!atomic_load(&stop)) {
		pgr_conn *c;
		int rc = pgr_acquire(pool, 10000, &c);
		if (rc) {
			fprintf(stderr, "acquire: %s\n", pgr_strerror(rc));
			atomic_fetch_add(&errors, 1);
			continue;
		}
		uint32_t id = pgr_conn_id(c);
		if (id >= CAPACITY || atomic_fetch_add(&holder[id], 1) != 0)
			atomic_fetch_add(&double_holds, 1);
		int kind = (int)(rand_r(&seed) % 8);
		PGresult *r = PQexec(pgr_conn_pg(c), kind == 0 ? "begin; select 1" : "select 1");
		if (PQresultStatus(r) != PGRES_TUPLES_OK)
			atomic_fetch_add(&errors, 1);
		PQclear(r);
		pgr_stats s;
		pgr_pool_stats(pool, &s);
		long sz = s.size;
		long prev = atomic_load(&max_size_seen);
		while (sz > prev && !atomic_compare_exchange_weak(&max_size_seen, &prev, sz))
			;
		if (id < CAPACITY)
			atomic_fetch_sub(&holder[id], 1);
		rc = kind == 1 ? pgr_discard(c) : pgr_release(c);
		if (rc)
			atomic_fetch_add(&errors, 1);
		atomic_fetch_add(&checkouts, 1);
	}
	return NULL;
}

static void *resizer(void *arg)
{
	unsigned seed = (unsigned)(uintptr_t)arg;
	while (!atomic_load(&stop)) {
		uint32_t max = 1 + rand_r(&seed) % CAPACITY;
		uint32_t over = rand_r(&seed) % (CAPACITY - max + 1);
		uint32_t min = rand_r(&seed) % (max + 1);
		if (pgr_pool_resize(pool, min, max, over) != 0)
			atomic_fetch_add(&resize_errors, 1);
		struct timespec ts = {.tv_nsec = (long)(rand_r(&seed) % 20) * 1000000};
		nanosleep(&ts, NULL);
	}
	return NULL;
}

int main(void)
{
	const char *ci = getenv("PGR_TEST_CONNINFO");
	if (!ci || !*ci) {
		fprintf(stderr, "PGR_TEST_CONNINFO is not set (run through ./run.sh test)\n");
		printf("0 passed, 1 failed\n");
		return 1;
	}
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = 1;
	cfg.max_size = 2;
	cfg.max_capacity = CAPACITY;
	cfg.idle_timeout_ms = 200;
	int rc = pgr_pool_create(&cfg, &pool);
	if (rc) {
		fprintf(stderr, "pgr_pool_create: %s\n", pgr_strerror(rc));
		printf("0 passed, 1 failed\n");
		return 1;
	}
	pthread_t w[WORKERS], r[2];
	for (uintptr_t i = 0; i < WORKERS; i++)
		pthread_create(&w[i], NULL, worker, (void *)(i + 1));
	for (uintptr_t i = 0; i < 2; i++)
		pthread_create(&r[i], NULL, resizer, (void *)(i + 100));
	int64_t end = now_ms() + RUN_MS;
	while (now_ms() < end) {
		struct timespec ts = {.tv_nsec = 50 * 1000000};
		nanosleep(&ts, NULL);
	}
	atomic_store(&stop, 1);
	for (int i = 0; i < 2; i++)
		pthread_join(r[i], NULL);
	for (int i = 0; i < WORKERS; i++)
		pthread_join(w[i], NULL);
	rc = pgr_pool_resize(pool, 0, 1, 0);
	CHECK(rc == 0, "final resize: %s", pgr_strerror(rc));
	pgr_stats s;
	int64_t settle = now_ms() + 5000;
	do {
		pgr_pool_stats(pool, &s);
		if (s.size <= 1)
			break;
		struct timespec ts = {.tv_nsec = 5 * 1000000};
		nanosleep(&ts, NULL);
	} while (now_ms() < settle);
	fprintf(stderr,
	        "stress_resize: %ld checkouts, most open %ld, closes: resized %llu overflow %llu "
	        "discarded %llu\n",
	        atomic_load(&checkouts), atomic_load(&max_size_seen),
	        (unsigned long long)s.closes_by_reason[PGR_CLOSE_RESIZED],
	        (unsigned long long)s.closes_by_reason[PGR_CLOSE_OVERFLOW],
	        (unsigned long long)s.closes_by_reason[PGR_CLOSE_DISCARDED]);
	CHECK(atomic_load(&errors) == 0, "%ld failed checkouts or queries", atomic_load(&errors));
	CHECK(atomic_load(&double_holds) == 0, "%ld double holds", atomic_load(&double_holds));
	CHECK(atomic_load(&resize_errors) == 0, "%ld refused resizes", atomic_load(&resize_errors));
	CHECK(atomic_load(&checkouts) > 100, "only %ld checkouts", atomic_load(&checkouts));
	CHECK(atomic_load(&max_size_seen) <= CAPACITY, "%ld open", atomic_load(&max_size_seen));
	CHECK(s.size <= 1, "size %u after the last resize to 1", s.size);
	CHECK(s.in_use == 0, "in_use %u", s.in_use);
	CHECK(s.closes_by_reason[PGR_CLOSE_RESIZED] > 0, "no resized close");
	pgr_pool_destroy(pool);
	printf("%d passed, %d failed\n", failures ? 0 : 1, failures ? 1 : 0);
	return failures ? 1 : 0;
}
