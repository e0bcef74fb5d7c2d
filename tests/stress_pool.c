/* SPDX-License-Identifier: PostgreSQL */
/*
 * Stress: many threads through acquire/query/release for seconds on a small pool, against the
 * real server. Built as a plain program (not Criterion) because Criterion's sandbox cannot
 * start under ThreadSanitizer (Snaipe/Criterion#274); ./run.sh test runs it in the TSan build
 * (CTest label "stress") and in the normal build. Acquires wait up to 10 s, so any timeout is
 * a failure (a lost wake-up cannot pass for an ordinary timeout). Asserts no connection held
 * by two callers at once, no error, no lost connection, that every checkout was accounted for,
 * that the contended pool queued callers and handed them connections, and that the longest
 * wait is bounded. Prints "N passed, N failed".
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pgring.h"

#define PGR__MAX_CONNS_ 4096 /* slot ids are below the pool's capacity, at most this */

static int failures;
#define CHECK(cond, ...)                                                                           \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);            \
			fprintf(stderr, __VA_ARGS__);                                              \
			fprintf(stderr, "\n");                                                     \
			failures++;                                                                \
			return;                                                                    \
		}                                                                                  \
	} while (0)

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t now_ms(void)
{
	return now_ns() / 1000000;
}

/*
 * Longest wait allowed. A hold is at most one query round trip (tens of microseconds) or a
 * return that needs a rollback (the manager's round trip), but the holder can lose its CPU
 * for a scheduler quantum (about 4 ms here, several times that under TSan) to each of the
 * other runnable threads, the server's backends included, for each of threads/pool holds
 * queued ahead. 2 s is far above that and far below the 10 s deadline.
 */
#define MAX_WAIT_MS 2000

/* Who holds each connection (by pgr_conn_id): 0 = nobody, else a worker's id + 1. */
static _Atomic int holder[PGR__MAX_CONNS_];
static _Atomic uint64_t double_holds, release_errors;
static _Atomic int64_t max_wait_ns;

static pgr_stats stats(pgr_pool *p)
{
	pgr_stats s;
	pgr_pool_stats(p, &s);
	return s;
}

static bool wait_idle(pgr_pool *p, uint32_t n, int64_t ms)
{
	int64_t dl = now_ms() + ms;
	while (stats(p).idle != n) {
		if (now_ms() > dl)
			return false;
		struct timespec ts = {0, 2000000};
		nanosleep(&ts, NULL);
	}
	return true;
}

struct worker {
	int id;
	pgr_pool *p;
	int64_t until_ms;
	uint64_t ok, errors;
	int mode; /* 0: checkout only (rare queries), 1: query every time */
};

static void *worker_main(void *a)
{
	struct worker *w = a;
	unsigned seed = (unsigned)(uintptr_t)w;
	while (now_ms() < w->until_ms) {
		pgr_conn *c;
		int64_t t0 = now_ns();
		int rc = pgr_acquire(w->p, 10000, &c);
		int64_t waited = now_ns() - t0, seen = atomic_load(&max_wait_ns);
		while (waited > seen && !atomic_compare_exchange_weak(&max_wait_ns, &seen, waited))
			;
		if (rc != 0) {
			fprintf(stderr, "acquire: %s\n", pgr_strerror(rc));
			w->errors++;
			continue;
		}
		w->ok++;
		uint32_t id = pgr_conn_id(c);
		if (id >= PGR__MAX_CONNS_ || atomic_exchange(&holder[id], w->id + 1) != 0)
			atomic_fetch_add(&double_holds, 1);
		int r = rand_r(&seed) % 16;
		if (w->mode == 1 || r == 0) {
			PGresult *res = PQexec(pgr_conn_pg(c), "select 1");
			if (PQresultStatus(res) != PGRES_TUPLES_OK)
				w->errors++;
			PQclear(res);
		}
		if (r == 1) /* returned inside a transaction: the manager rolls it back */
			PQclear(PQexec(pgr_conn_pg(c), "begin"));
		if (r == 2) {
			/* a short timeout that may expire: exercises waiter cancellation */
			pgr_conn *c2;
			if (pgr_acquire(w->p, 1, &c2) == 0) {
				uint32_t id2 = pgr_conn_id(c2);
				if (id2 >= PGR__MAX_CONNS_ ||
				    atomic_exchange(&holder[id2], w->id + 1) != 0)
					atomic_fetch_add(&double_holds, 1);
				else
					atomic_store(&holder[id2], 0);
				if (pgr_release(c2) != 0)
					atomic_fetch_add(&release_errors, 1);
			}
		}
		if (id < PGR__MAX_CONNS_)
			atomic_store(&holder[id], 0);
		if (pgr_release(c) != 0)
			atomic_fetch_add(&release_errors, 1);
	}
	return NULL;
}

static void run(const char *conninfo, int threads, int pool_size, int seconds, int mode)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = conninfo;
	cfg.min_idle = (uint32_t)pool_size;
	cfg.max_size = (uint32_t)pool_size;
	pgr_pool *p;
	int rc = pgr_pool_create(&cfg, &p);
	CHECK(rc == 0, "create: %s", pgr_strerror(rc));
	CHECK(wait_idle(p, (uint32_t)pool_size, 10000), "pool never filled");
	pgr_stats before = stats(p);
	atomic_store(&max_wait_ns, 0);
	atomic_store(&double_holds, 0);
	atomic_store(&release_errors, 0);
	pthread_t th[64];
	struct worker w[64];
	int64_t until = now_ms() + seconds * 1000;
	for (int i = 0; i < threads; i++) {
		w[i] = (struct worker){.id = i, .p = p, .until_ms = until, .mode = mode};
		pthread_create(&th[i], NULL, worker_main, &w[i]);
	}
	uint64_t ok = 0, errors = 0;
	for (int i = 0; i < threads; i++) {
		pthread_join(th[i], NULL);
		ok += w[i].ok;
		errors += w[i].errors;
	}
	bool back = wait_idle(p, (uint32_t)pool_size, 5000);
	pgr_stats after = stats(p);
	int64_t max_wait_ms = atomic_load(&max_wait_ns) / 1000000;
	printf("%d threads, pool %d, %d s: %llu checkouts, %llu waits, %llu steals, %llu handoffs, "
	       "%llu rollbacks, %llu timeouts, longest wait %lld ms\n",
	       threads, pool_size, seconds, (unsigned long long)ok,
	       (unsigned long long)(after.waits - before.waits),
	       (unsigned long long)(after.steals - before.steals),
	       (unsigned long long)(after.handoffs - before.handoffs),
	       (unsigned long long)after.rollbacks, (unsigned long long)after.timeouts,
	       (long long)max_wait_ms);
	CHECK(atomic_load(&double_holds) == 0, "%llu connections handed to a second caller",
	      (unsigned long long)atomic_load(&double_holds));
	CHECK(atomic_load(&release_errors) == 0, "%llu releases failed",
	      (unsigned long long)atomic_load(&release_errors));
	CHECK(errors == 0, "%llu errors", (unsigned long long)errors);
	/* More threads than connections: callers queued and were served, by a hand-off or,
	 * nudged awake, from a shard (the waiting policy decides which). */
	CHECK(after.waits > before.waits, "contended, yet %llu waits",
	      (unsigned long long)(after.waits - before.waits));
	CHECK(max_wait_ms < MAX_WAIT_MS, "a caller waited %lld ms (bound %d ms)",
	      (long long)max_wait_ms, MAX_WAIT_MS);
	CHECK(ok > (uint64_t)threads * 10, "only %llu checkouts", (unsigned long long)ok);
	CHECK(back, "lost connections: idle=%u size=%u in_use=%u", after.idle, after.size,
	      after.in_use);
	CHECK(after.size == before.size, "size %u -> %u", before.size, after.size);
	CHECK(after.in_use == 0 && after.waiting == 0, "in_use=%u waiting=%u", after.in_use,
	      after.waiting);
	/* Every successful checkout counted once: the inner try-acquires count too. */
	CHECK(after.acquires - before.acquires >= ok, "acquires %llu < %llu",
	      (unsigned long long)(after.acquires - before.acquires), (unsigned long long)ok);
	CHECK(after.acquired_immediately + after.waits == after.acquires,
	      "immediate %llu + waits %llu != acquires %llu",
	      (unsigned long long)after.acquired_immediately, (unsigned long long)after.waits,
	      (unsigned long long)after.acquires);
	CHECK(after.closes == 0, "%llu connections closed", (unsigned long long)after.closes);
	pgr_pool_destroy(p);
}

int main(void)
{
	const char *ci = getenv("PGR_TEST_CONNINFO");
	if (!ci || !*ci) {
		fprintf(stderr, "PGR_TEST_CONNINFO is not set: run through ./run.sh test\n");
		printf("0 passed, 1 failed\n");
		return 1;
	}
	struct {
		int threads, pool, seconds, mode;
	} cases[] = {{8, 3, 4, 1}, {8, 3, 3, 0}, {16, 8, 3, 0}, {2, 1, 2, 0}};
	int n = (int)(sizeof(cases) / sizeof(cases[0])), failed = 0;
	for (int i = 0; i < n; i++) {
		int before = failures;
		run(ci, cases[i].threads, cases[i].pool, cases[i].seconds, cases[i].mode);
		failed += failures != before;
	}
	printf("%d passed, %d failed\n", n - failed, failed);
	return failed ? 1 : 0;
}
