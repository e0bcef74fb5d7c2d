/* SPDX-License-Identifier: PostgreSQL */
/*
 * pgr_bench internals: the two interfaces the harness measures pools through.
 *
 * bench_driver: most pools (pgring and the C baselines) are a small vtable that creates a pool
 * of `conns` connections for `threads` worker threads, checks a connection out (returning an
 * opaque handle plus the PGconn* to query on), returns it, and destroys the pool. The harness
 * calls every driver the same way, from the same threads, with the same loop, so the indirect
 * call and the timing code cost every pool the same.
 *
 * bench_runner: a pool that cannot run on the harness's threads runs a whole round itself,
 * following the same method (fresh pool, all connections open before the clock starts, an
 * uncounted warm-up, then a counted window in which an operation counts when it finishes inside
 * it): the peers, each in a child process of its own runtime (peers.c), and pgring's async
 * loop API on one thread (driver_loop.c).
 *
 * Concurrency: create, destroy and runner rounds run on the main thread; acquire and release
 * run on the worker threads, concurrently, and must be thread-safe. `tid` (0..threads-1) is the
 * calling worker's index, for drivers that keep per-thread state (a dedicated connection per
 * thread).
 */
#ifndef PGR_BENCH_H
#define PGR_BENCH_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <libpq-fe.h>

#include "hist.h"

/* What the loop runs between acquire and release. */
enum {
	BENCH_Q_NONE = 0, /* checkout sections: nothing */
	BENCH_Q_SELECT1,  /* SELECT 1 */
	BENCH_Q_LOOKUP    /* BENCH_LOOKUP_SQL with a random id in 1..BENCH_LOOKUP_ROWS */
};
#define BENCH_LOOKUP_ROWS 10000
#define BENCH_LOOKUP_SQL  "SELECT name FROM pgr_bench_users WHERE id = $1"

/* Where the server is: the libpq conninfo plus its parts, for drivers that need a URL. */
typedef struct bench_target {
	const char *conninfo;  /* libpq conninfo of the server */
	const char *pgbouncer; /* conninfo of PgBouncer (transaction mode), or NULL */
	char host[256];        /* PQhost of a live connection (an address or a socket dir) */
	char port[16];
	char user[128];
	char password[128]; /* empty when the conninfo has none */
	char dbname[128];
	int ssl; /* the connection used TLS (peers connect the same way) */
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

/*
 * One round of a bench_runner: what to run (set by the harness) and what it measured (added
 * to by the runner, so that the rounds of a configuration accumulate).
 */
typedef struct bench_round {
	int query;             /* BENCH_Q_* */
	unsigned threads;      /* worker threads, or concurrent chains on one event loop */
	unsigned conns;        /* connections in the pool, all open before the warm-up */
	uint64_t hold_ns;      /* checkout sections: busy-wait this long holding the connection */
	double warmup_s;       /* uncounted seconds before the window */
	double secs;           /* the counted window */
	unsigned sample_every; /* time 1 in this many operations (a power of two) */
	uint64_t ops, errors;  /* finished inside the window */
	double secs_counted;   /* the window's wall time */
	pgr__hist_snap *snap;  /* latencies, same buckets as the threaded runs */
} bench_round;

typedef struct bench_runner {
	const char *name;
	/*
	 * Run one round. Returns 0; -ENOENT when the pool is not available here or failed (err
	 * says why; its rows read "skipped (why)"); another negative errno when it failed in a way
	 * that is pgr_bench's or pgring's fault (its rows read FAILED).
	 */
	int (*round)(const struct bench_runner *self, const bench_target *t, bench_round *r,
	             char *err, size_t errlen);
	/* One line naming what ran (versions), or NULL when it has not run. */
	const char *(*describe)(const struct bench_runner *self);
	/* End what the runner keeps between rounds (a child process); may be NULL. */
	void (*shutdown)(const struct bench_runner *self);
	void *ctx;
} bench_runner;

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

/* pgring's async API: N chains of acquire, query (or a pipeline), release on one loop. */
extern const bench_runner bench_runner_loop;
extern const bench_runner bench_runner_loop_pipe;
#define BENCH_PIPELINE_DEPTH 10 /* statements per pipeline in pgring_loop_pipe */

/* The peers: other languages' pools, each in a child process (peers.c). */
extern const bench_runner bench_runner_hikaricp;
extern const bench_runner bench_runner_psycopg_pool;
extern const bench_runner bench_runner_sqlalchemy;
extern const bench_runner bench_runner_node_pg;

static inline uint64_t bench_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Open one blocking libpq connection; on failure fill err and return NULL. */
PGconn *bench_connect(const char *conninfo, char *err, size_t errlen);

#endif
