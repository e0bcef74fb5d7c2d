/* SPDX-License-Identifier: PostgreSQL */
/*
 * pgr_bench internals: the pool-driver interface the harness measures through.
 *
 * Every pool under test (pgring and each baseline) is a bench_driver: a small vtable that
 * creates a pool of `conns` connections for `threads` worker threads, checks a connection out
 * (returning an opaque handle plus the PGconn* to query on), returns it, and destroys the pool.
 * The harness calls every driver the same way, from the same threads, with the same loop, so
 * the indirect call and the timing code cost every pool the same.
 *
 * Concurrency: create and destroy run on the main thread; acquire and release run on the worker
 * threads, concurrently, and must be thread-safe. `tid` (0..threads-1) is the calling worker's
 * index, for drivers that keep per-thread state (a dedicated connection per thread).
 */
#ifndef PGR_BENCH_H
#define PGR_BENCH_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <libpq-fe.h>

/* Where the server is: the libpq conninfo plus its parts, for drivers that need a URL. */
typedef struct bench_target {
	const char *conninfo;  /* libpq conninfo of the server */
	const char *pgbouncer; /* conninfo of PgBouncer (transaction mode), or NULL */
	char host[256];        /* PQhost of a live connection (an address or a socket dir) */
	char port[16];
	char user[128];
	char password[128]; /* empty when the conninfo has none */
	char dbname[128];
} bench_target;

/* What a pool is created for. */
typedef struct bench_pool_opts {
	uint32_t conns;   /* connections the pool holds (opened before measuring) */
	uint32_t threads; /* worker threads that will use it */
	int no_ping;      /* checkout section: no liveness round trip at checkout (pgring:
	                     ping_after_idle_ms = -1); drivers that never ping ignore it */
} bench_pool_opts;

/* A checked-out connection: the driver's handle and the libpq connection (NULL for drivers
 * that do not expose one, such as libzdb's Connection_T). */
typedef struct bench_conn {
	void *h;
	PGconn *pg;
} bench_conn;

typedef struct bench_driver {
	const char *name; /* pool column in the table and "pool" in JSON */
	/* true when acquire hands back a PGconn* (needed by the end-to-end section) */
	int has_pg;
	/*
	 * Open a pool of o->conns connections for o->threads workers; return only once they are
	 * all open and idle, so that no connect is measured. Returns 0 and sets *pool, or a
	 * negative errno with a human reason in err; -ENOENT means "not available here" (the
	 * harness prints the row as skipped, with err as the reason, instead of failed).
	 */
	int (*create)(const bench_target *t, const bench_pool_opts *o, void **pool, char *err,
	              size_t errlen);
	/* Check out a connection, waiting as long as the pool needs (bounded by a generous
	 * deadline). Returns 0 or a negative errno; an error is counted, not fatal. */
	int (*acquire)(void *pool, unsigned tid, bench_conn *out);
	void (*release)(void *pool, unsigned tid, bench_conn *c);
	void (*destroy)(void *pool);
} bench_driver;

/* Deadline for one checkout: far above any latency a pool should show, so hitting it means a
 * stuck pool, which the run reports as errors instead of hanging. */
#define BENCH_ACQUIRE_TIMEOUT_MS 10000

/* Deadline for a pool to open all its connections after create. */
#define BENCH_FILL_TIMEOUT_MS 20000

extern const bench_driver bench_driver_pgring;
extern const bench_driver bench_driver_pgring_bare;
extern const bench_driver bench_driver_pgring_leak;
extern const bench_driver bench_driver_mutex;
extern const bench_driver bench_driver_cpq;
extern const bench_driver bench_driver_dedicated;
extern const bench_driver bench_driver_pgbouncer;
#ifdef PGR_HAVE_ZDB
extern const bench_driver bench_driver_zdb;
#endif

static inline uint64_t bench_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Open one blocking libpq connection; on failure fill err and return NULL. */
PGconn *bench_connect(const char *conninfo, char *err, size_t errlen);

#endif
