/* SPDX-License-Identifier: PostgreSQL */
/*
 * pgr_bench: pgring beside its baselines, same harness, same threads, same run.
 *
 * Sections
 *   checkout       acquire + release, no query: ops/s, ns/op and acquire latency percentiles,
 *                  with the pool as large as the thread count ("checkout") and with fewer
 *                  connections than threads, each checkout holding its connection for a fixed
 *                  busy-wait ("checkout_hold").
 *   e2e            checkout + query + release: `SELECT 1` ("select1") and a primary-key lookup
 *                  ("lookup") through pgring (blocking threads, and its async API on one event
 *                  loop), a dedicated connection per thread, connect per query, and PgBouncer
 *                  in transaction mode.
 *   peers          in both sections, the pools people use in other languages (HikariCP,
 *                  psycopg_pool, SQLAlchemy's QueuePool, node-postgres), each in a child
 *                  process of its own runtime running the same loop (peers.c).
 *
 * Method
 *   A configuration's --duration is split into --rounds rounds in which the pools take turns
 *   (forward, then backward), so that drift and the scheduler's placement of threads and
 *   server backends fall on every pool alike. Each round creates a fresh pool, waits until all
 *   its connections are open, starts the worker threads on a barrier, runs an uncounted
 *   warm-up, then counts. Throughput is the operations that finished inside the counted windows
 *   over their wall time; nothing is timed per operation for it. Latency comes from per-thread
 *   log-linear histograms (src/hist.h) merged after the run. In the checkout section without
 *   hold, reading the clock (about 25 ns here, twice per sample) would cost more than the
 *   checkout itself, so only a random 1 in --sample checkouts is timed; in every other
 *   configuration each operation is timed.
 *
 * Output: one table per section (stdout), a targets summary, then one JSON line per
 * configuration; with --json only the JSON lines. Progress goes to stderr.
 */
#include <errno.h>
#include <getopt.h>

#include "bench_exec.h"
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench.h"
#include "hist.h"

#define MAX_THREADS   256
#define MAX_RESULTS   512
#define P999_LIMIT_NS 20000 /* target: p999 acquire latency, 8 threads, connections free */
#define CPQ_MAX_SECS                                                                               \
	1.0 /* connect per query: short, it takes milliseconds and loads the server                \
	     */

enum {
	PHASE_WARMUP = 0,
	PHASE_MEASURE,
	PHASE_STOP
};
enum {
	ST_OK = 0,
	ST_SKIPPED,
	ST_FAILED
};

/* ---------------------------------------------------------------- options */

static struct {
	bool json;
	double duration_s;
	double warmup_s;
	unsigned threads[32];
	unsigned n_threads; /* 0: each section's default */
	unsigned sample;    /* power of two */
	unsigned hold_us;
	unsigned rounds;
	const char *conninfo;
	bool only_section; /* some --only named a section */
	bool sec_checkout, sec_e2e, sec_exec;
	bool only_pool; /* some --only named a pool */
	bool pool_on[32];
	bool long_run;     /* --long */
	bool duration_set; /* --duration given */
	/* The extra rows (the runners: peers and pgring's async rows) get less time by default,
	 * so that the default run stays near 3 minutes. */
	double extra_duration_s; /* counted seconds per configuration */
	unsigned extra_rounds;   /* rounds they run in (at most --rounds) */
	bool extra_duration_set, extra_rounds_set;
} opt = {.duration_s = 2.0,
         .warmup_s = 0.1,
         .sample = 64,
         .hold_us = 5,
         .rounds = 8,
         .extra_duration_s = 1.0,
         .extra_rounds = 4};

/* Every pool the bench knows, in table order. drv NULL: not built into this binary. */
enum {
	P_PGRING,
	P_PGRING_BARE, /* histograms off: what observability costs */
	P_PGRING_LEAK, /* leak tracking on */
	P_MUTEX,
	P_ZDB,
	P_LOOP,      /* pgring's async API, one loop thread */
	P_LOOP_PIPE, /* the same with pipelines */
	P_HIKARI,    /* peers: each in a child process */
	P_PSYCOPG,
	P_SQLA,
	P_NODE,
	P_CPQ,
	P_DEDICATED,
	P_PGBOUNCER,
	P_COUNT
};
/* A pool runs on the harness's threads (drv) or runs its rounds itself (runner). */
static const struct pool_info {
	const char *name;
	const char *alias;
	const bench_driver *drv;
	const char *missing; /* why drv is NULL */
	const bench_runner *runner;
	bool peer; /* another language's pool (--only peers) */
} pools[P_COUNT] = {
    [P_PGRING] = {"pgring", NULL, &bench_driver_pgring, NULL},
    [P_PGRING_BARE] = {"pgring_bare", NULL, &bench_driver_pgring_bare, NULL},
    [P_PGRING_LEAK] = {"pgring_leak", NULL, &bench_driver_pgring_leak, NULL},
    [P_MUTEX] = {"mutex_condvar", "mutex", &bench_driver_mutex, NULL},
#ifdef PGR_HAVE_ZDB
    [P_ZDB] = {"libzdb", "zdb", &bench_driver_zdb, NULL},
#else
    [P_ZDB] = {"libzdb", "zdb", NULL, "not built (libzdb-dev not found at configure time)"},
#endif
    [P_LOOP] = {"pgring_loop", "loop", NULL, NULL, &bench_runner_loop, false},
    [P_LOOP_PIPE] = {"pgring_loop_pipe", "loop_pipe", NULL, NULL, &bench_runner_loop_pipe, false},
    [P_HIKARI] = {"hikaricp", "hikari", NULL, NULL, &bench_runner_hikaricp, true},
    [P_PSYCOPG] = {"psycopg_pool", "psycopg", NULL, NULL, &bench_runner_psycopg_pool, true},
    [P_SQLA] = {"sqlalchemy", "sqla", NULL, NULL, &bench_runner_sqlalchemy, true},
    [P_NODE] = {"node_pg", "node", NULL, NULL, &bench_runner_node_pg, true},
    [P_CPQ] = {"connect_per_query", "cpq", &bench_driver_cpq, NULL},
    [P_DEDICATED] = {"dedicated", NULL, &bench_driver_dedicated, NULL},
    [P_PGBOUNCER] = {"pgbouncer", NULL, &bench_driver_pgbouncer, NULL},
};

static void usage(FILE *f)
{
	fprintf(
	    f,
	    "usage: pgr_bench [options]\n"
	    "  --conninfo STR    libpq conninfo of the server (default: $PGR_TEST_CONNINFO)\n"
	    "  --duration S      counted seconds per configuration (default 2, --long 4;\n"
	    "                    connect per query runs at most %.0f s)\n"
	    "  --extra-duration S counted seconds per configuration for the peers and the\n"
	    "                    pgring_loop rows (default 1; --long: as --duration)\n"
	    "  --extra-rounds N  rounds they run in (default 4; --long: as --rounds)\n"
	    "  --long            4 s per configuration, the extra rows as long as the others,\n"
	    "                    and the peers in checkout_hold too\n"
	    "  --threads LIST    thread counts, e.g. 1,2,8 (default: checkout 1,2,8; e2e 1,4,16)\n"
	    "  --only LIST       sections (checkout, e2e, exec) and/or pools (pgring, "
	    "pgring_bare,\n"
	    "                    pgring_leak, mutex_condvar, libzdb, pgring_loop,\n"
	    "                    pgring_loop_pipe, hikaricp, psycopg_pool, sqlalchemy, node_pg,\n"
	    "                    connect_per_query, dedicated, pgbouncer; `peers` for the four\n"
	    "                    peers); repeatable\n"
	    "  --json            print only the JSON lines\n"
	    "  --sample N        time 1 in N checkouts in the no-hold checkout runs (default 64;\n"
	    "                    1 times every one, and adds two clock reads to each)\n"
	    "  --hold-us N       hold time in the checkout_hold runs (default 5)\n"
	    "  --rounds N        split each configuration's time into N rounds, pools taking\n"
	    "                    turns, a fresh pool each round (default 8)\n"
	    "  --warmup S        uncounted seconds before each round (default 0.1)\n"
	    "Environment: PGR_TEST_CONNINFO, PGR_BENCH_PGBOUNCER_CONNINFO (PgBouncer in\n"
	    "transaction mode; its rows are skipped when unset); for the peers\n"
	    "PGR_BENCH_PEERS_DIR, PGR_BENCH_JAVA, PGR_BENCH_JAVA_CP, PGR_BENCH_PYTHON,\n"
	    "PGR_BENCH_NODE, PGR_BENCH_NODE_PATH (see bench/README.md).\n",
	    CPQ_MAX_SECS);
}

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("pgr_bench: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(2);
}

static void parse_only(char *list)
{
	for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
		if (!strcmp(tok, "checkout")) {
			opt.only_section = opt.sec_checkout = true;
			continue;
		}
		if (!strcmp(tok, "exec")) { /* bench_exec.c */
			opt.only_section = opt.sec_exec = true;
			continue;
		}
		if (!strcmp(tok, "e2e")) {
			opt.only_section = opt.sec_e2e = true;
			continue;
		}
		if (!strcmp(tok, "peers")) {
			for (int i = 0; i < P_COUNT; i++)
				if (pools[i].peer)
					opt.only_pool = opt.pool_on[i] = true;
			continue;
		}
		int i;
		for (i = 0; i < P_COUNT; i++)
			if (!strcmp(tok, pools[i].name) ||
			    (pools[i].alias && !strcmp(tok, pools[i].alias)))
				break;
		if (i == P_COUNT)
			die("--only: unknown section or pool '%s'", tok);
		opt.only_pool = opt.pool_on[i] = true;
	}
}

static void parse_threads(char *list)
{
	opt.n_threads = 0;
	for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
		char *end;
		long v = strtol(tok, &end, 10);
		if (*end || v < 1 || v > MAX_THREADS)
			die("--threads: '%s' is not a thread count in 1..%d", tok, MAX_THREADS);
		if (opt.n_threads == sizeof opt.threads / sizeof opt.threads[0])
			die("--threads: too many values");
		opt.threads[opt.n_threads++] = (unsigned)v;
	}
	if (!opt.n_threads)
		die("--threads: empty list");
}

static double parse_secs(const char *flag, const char *s, double min)
{
	char *end;
	double v = strtod(s, &end);
	if (*end || !(v >= min) || v > 3600)
		die("%s: '%s' is not a number of seconds (>= %g)", flag, s, min);
	return v;
}

static void parse_args(int argc, char **argv)
{
	static const struct option lo[] = {
	    {"conninfo", required_argument, NULL, 'c'},
	    {"duration", required_argument, NULL, 'd'},
	    {"threads", required_argument, NULL, 't'},
	    {"only", required_argument, NULL, 'o'},
	    {"json", no_argument, NULL, 'j'},
	    {"sample", required_argument, NULL, 's'},
	    {"hold-us", required_argument, NULL, 'H'},
	    {"warmup", required_argument, NULL, 'w'},
	    {"rounds", required_argument, NULL, 'r'},
	    {"extra-duration", required_argument, NULL, 'D'},
	    {"extra-rounds", required_argument, NULL, 'R'},
	    {"long", no_argument, NULL, 'L'},
	    {"help", no_argument, NULL, 'h'},
	    {NULL, 0, NULL, 0},
	};
	int c;
	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 'c':
			opt.conninfo = optarg;
			break;
		case 'd':
			opt.duration_s = parse_secs("--duration", optarg, 0.05);
			opt.duration_set = true;
			break;
		case 'D':
			opt.extra_duration_s = parse_secs("--extra-duration", optarg, 0.05);
			opt.extra_duration_set = true;
			break;
		case 'R': {
			long v = strtol(optarg, NULL, 10);
			if (v < 1 || v > 100)
				die("--extra-rounds: expected 1..100");
			opt.extra_rounds = (unsigned)v;
			opt.extra_rounds_set = true;
			break;
		}
		case 'L':
			opt.long_run = true;
			break;
		case 'w':
			opt.warmup_s = parse_secs("--warmup", optarg, 0);
			break;
		case 't':
			parse_threads(optarg);
			break;
		case 'o':
			parse_only(optarg);
			break;
		case 'j':
			opt.json = true;
			break;
		case 's': {
			long v = strtol(optarg, NULL, 10);
			if (v < 1 || v > (1L << 20))
				die("--sample: expected 1..1048576");
			unsigned p = 1;
			while (p < (unsigned)v)
				p <<= 1;
			opt.sample = p;
			break;
		}
		case 'H': {
			long v = strtol(optarg, NULL, 10);
			if (v < 1 || v > 1000000)
				die("--hold-us: expected 1..1000000");
			opt.hold_us = (unsigned)v;
			break;
		}
		case 'r': {
			long v = strtol(optarg, NULL, 10);
			if (v < 1 || v > 100)
				die("--rounds: expected 1..100");
			opt.rounds = (unsigned)v;
			break;
		}
		case 'h':
			usage(stdout);
			exit(0);
		default:
			usage(stderr);
			exit(2);
		}
	}
	if (optind < argc)
		die("unexpected argument '%s' (see --help)", argv[optind]);
	if (!opt.only_section)
		opt.sec_checkout = opt.sec_e2e = opt.sec_exec = true;
	if (opt.long_run) {
		if (!opt.duration_set)
			opt.duration_s = 4.0;
		if (!opt.extra_duration_set)
			opt.extra_duration_s = opt.duration_s;
		if (!opt.extra_rounds_set)
			opt.extra_rounds = opt.rounds;
	}
	if (opt.extra_rounds > opt.rounds)
		opt.extra_rounds = opt.rounds;
	if (!opt.only_pool)
		for (int i = 0; i < P_COUNT; i++)
			opt.pool_on[i] = true;
}

/* ----------------------------------------------------------------- results */

typedef struct result {
	const char *bench; /* checkout, checkout_hold, select1, lookup */
	const char *pool;
	unsigned threads, conns;
	uint64_t hold_ns;
	int status;
	char note[600];   /* skip or failure reason */
	const char *impl; /* runners: what ran (versions), or NULL */
	double secs;      /* counted wall time */
	uint64_t ops, errors;
	double ops_per_s, ns_per_op;
	unsigned sample_every;
	pgr__hist_snap *snap; /* latencies of all rounds, merged */
	pgr_hist_summary lat;
	/* Latencies at or below the bucket bounds around P999_LIMIT_NS, to judge the p999 target
	 * exactly where the bucket holding the limit makes the percentile ambiguous. */
	uint64_t n_le_below, n_le_above;
} result;

static result results[MAX_RESULTS];
static unsigned n_results;

static result *new_result(const char *bench, const char *pool, unsigned threads, unsigned conns,
                          uint64_t hold_ns)
{
	if (n_results == MAX_RESULTS)
		die("too many configurations");
	result *r = &results[n_results++];
	memset(r, 0, sizeof *r);
	r->bench = bench;
	r->pool = pool;
	r->threads = threads;
	r->conns = conns;
	r->hold_ns = hold_ns;
	return r;
}

static const result *find_result(const char *bench, const char *pool, unsigned threads,
                                 unsigned conns)
{
	for (unsigned i = 0; i < n_results; i++) {
		const result *r = &results[i];
		if (!strcmp(r->bench, bench) && !strcmp(r->pool, pool) && r->threads == threads &&
		    r->conns == conns)
			return r;
	}
	return NULL;
}

static const char *fmt_ops(double v, char *buf, size_t n);
static const char *fmt_ns(double ns, char *buf, size_t n);

/* --------------------------------------------------------------- the run */

static inline uint64_t xorshift64(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

typedef struct run run;

/* One per worker thread, on its own cache lines: the histogram and counters are written only
 * by their thread and read by the main thread after join. */
typedef struct worker {
	pgr__hist hist;
	uint64_t ops, errors;
	uint64_t rng;
	unsigned tid;
	run *run;
	pthread_t th;
} __attribute__((aligned(64))) worker;

struct run {
	const bench_driver *drv;
	void *pool;
	int query;
	uint64_t hold_ns;
	uint64_t sample_mask; /* an op is timed when (rng & mask) == 0 */
	pthread_barrier_t barrier;
	/* Written by the main thread twice per run, read by every worker once per operation: on
	 * its own line so that nothing else written there invalidates the workers' copies. */
	_Alignas(64) _Atomic int phase;
	char pad[64 - sizeof(int)];
};

static int run_query(PGconn *pg, int q, uint64_t *rng)
{
	PGresult *res;
	if (q == BENCH_Q_SELECT1) {
		res = PQexec(pg, "SELECT 1");
	} else {
		char id[16];
		snprintf(id, sizeof id, "%u", (unsigned)(xorshift64(rng) % BENCH_LOOKUP_ROWS) + 1);
		const char *vals[1] = {id};
		res = PQexecParams(pg, BENCH_LOOKUP_SQL, 1, NULL, vals, NULL, NULL, 0);
	}
	int ok = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
	PQclear(res);
	return ok ? 0 : -EIO;
}

static void *worker_main(void *arg)
{
	worker *w = arg;
	run *r = w->run;
	const bench_driver *drv = r->drv;
	void *pool = r->pool;
	const unsigned tid = w->tid;
	const uint64_t mask = r->sample_mask, hold_ns = r->hold_ns;
	const int query = r->query;
	uint64_t ops = 0, errors = 0, rng = w->rng;

	pthread_barrier_wait(&r->barrier);
	int ph = atomic_load_explicit(&r->phase, memory_order_relaxed);
	while (ph != PHASE_STOP) {
		const bool timed = (xorshift64(&rng) & mask) == 0;
		uint64_t t0 = timed ? bench_now_ns() : 0, lat = 0;
		bench_conn c;
		int rc = drv->acquire(pool, tid, &c);
		if (rc != 0) {
			ph = atomic_load_explicit(&r->phase, memory_order_relaxed);
			errors += ph == PHASE_MEASURE;
			/* a failing connect is fast; do not turn it into a hot loop on the server
			 */
			nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
			continue;
		}
		if (!query && (timed || hold_ns)) {
			uint64_t t1 = bench_now_ns();
			lat = t1 - t0;
			if (hold_ns) /* busy: a sleep would hand the CPU to a contender */
				while (bench_now_ns() - t1 < hold_ns)
					;
		}
		if (query)
			rc = run_query(c.pg, query, &rng);
		drv->release(pool, tid, &c);
		if (timed && query)
			lat = bench_now_ns() - t0;
		/* Count what finished inside the window: ops that straddle its start and its end
		 * balance out, and an op is never counted without its latency. */
		ph = atomic_load_explicit(&r->phase, memory_order_relaxed);
		if (ph == PHASE_MEASURE) {
			if (rc != 0) {
				errors++;
			} else {
				ops++;
				if (timed)
					pgr__hist_add(&w->hist, lat);
			}
		}
	}
	w->ops = ops;
	w->errors = errors;
	return NULL;
}

static void sleep_until(uint64_t t_ns)
{
	struct timespec ts = {.tv_sec = (time_t)(t_ns / 1000000000u),
	                      .tv_nsec = (long)(t_ns % 1000000000u)};
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

/* One round of a pool that runs its rounds itself (a peer, the async loop); as measure_round. */
static int runner_round(result *r, const bench_runner *rn, const bench_target *tgt, int query,
                        double secs, double warmup_s)
{
	bench_round br = {
	    .query = query,
	    .threads = r->threads,
	    .conns = r->conns,
	    .hold_ns = r->hold_ns,
	    .warmup_s = warmup_s,
	    .secs = secs,
	    .sample_every = r->sample_every,
	    .snap = r->snap,
	};
	char err[sizeof r->note] = "";
	int rc = rn->round(rn, tgt, &br, err, sizeof err);
	if (rc != 0) {
		snprintf(r->note, sizeof r->note, "%s", err[0] ? err : strerror(-rc));
		return rc;
	}
	r->ops += br.ops;
	r->errors += br.errors;
	r->secs += br.secs_counted;
	return 0;
}

/*
 * One round of one pool on one configuration: create the pool, run the threads through the
 * warm-up and the counted window, destroy the pool, and add the counts and the latencies to r.
 * Returns 0, or the create error (with r->note filled).
 */
static int measure_round(result *r, const bench_driver *drv, const bench_target *tgt, int query,
                         double secs, double warmup_s)
{
	bench_pool_opts po = {.conns = r->conns, .threads = r->threads, .no_ping = !query};
	void *pool = NULL;
	char err[256] = "";
	int rc = drv->create(tgt, &po, &pool, err, sizeof err);
	if (rc != 0) {
		snprintf(r->note, sizeof r->note, "%s", err[0] ? err : strerror(-rc));
		return rc;
	}

	run *rn = aligned_alloc(64, sizeof *rn);
	worker *ws = aligned_alloc(64, sizeof *ws * r->threads);
	if (!rn || !ws)
		die("out of memory");
	memset(rn, 0, sizeof *rn);
	memset(ws, 0, sizeof *ws * r->threads);
	rn->drv = drv;
	rn->pool = pool;
	rn->query = query;
	rn->hold_ns = r->hold_ns;
	rn->sample_mask = r->sample_every - 1;
	atomic_init(&rn->phase, PHASE_WARMUP);
	pthread_barrier_init(&rn->barrier, NULL, r->threads + 1);
	uint64_t seed = bench_now_ns() | 1;
	for (unsigned i = 0; i < r->threads; i++) {
		ws[i].tid = i;
		ws[i].run = rn;
		ws[i].rng = xorshift64(&seed) | 1;
		if (pthread_create(&ws[i].th, NULL, worker_main, &ws[i]) != 0)
			die("pthread_create failed at thread %u", i);
	}
	pthread_barrier_wait(&rn->barrier);
	sleep_until(bench_now_ns() + (uint64_t)(warmup_s * 1e9));
	/* Relaxed: phase is only a flag; the workers' counts are read after pthread_join, which
	 * orders them. */
	uint64_t t0 = bench_now_ns();
	atomic_store_explicit(&rn->phase, PHASE_MEASURE, memory_order_relaxed);
	sleep_until(t0 + (uint64_t)(secs * 1e9));
	atomic_store_explicit(&rn->phase, PHASE_STOP, memory_order_relaxed);
	uint64_t t1 = bench_now_ns();
	for (unsigned i = 0; i < r->threads; i++)
		pthread_join(ws[i].th, NULL);
	drv->destroy(pool);

	for (unsigned i = 0; i < r->threads; i++) {
		r->ops += ws[i].ops;
		r->errors += ws[i].errors;
		pgr__hist_snap_merge(r->snap, &ws[i].hist);
	}
	r->secs += (double)(t1 - t0) / 1e9;
	pthread_barrier_destroy(&rn->barrier);
	free(ws);
	free(rn);
	return 0;
}

/* --------------------------------------------------------------- output */

static const char *fmt_ops(double v, char *buf, size_t n)
{
	if (v >= 1e6)
		snprintf(buf, n, "%.2fM", v / 1e6);
	else if (v >= 1e3)
		snprintf(buf, n, "%.1fk", v / 1e3);
	else
		snprintf(buf, n, "%.0f", v);
	return buf;
}

static const char *fmt_ns(double ns, char *buf, size_t n)
{
	if (ns < 1e3)
		snprintf(buf, n, "%.0fns", ns);
	else if (ns < 1e6)
		snprintf(buf, n, "%.*fus", ns < 1e4 ? 2 : 1, ns / 1e3);
	else if (ns < 1e9)
		snprintf(buf, n, "%.*fms", ns < 1e7 ? 2 : 1, ns / 1e6);
	else
		snprintf(buf, n, "%.2fs", ns / 1e9);
	return buf;
}

static const char *fmt_ratio(double v, char *buf, size_t n)
{
	if (v >= 100)
		snprintf(buf, n, "%.0fx", v);
	else if (v >= 10)
		snprintf(buf, n, "%.1fx", v);
	else if (v >= 0.01)
		snprintf(buf, n, "%.2fx", v);
	else
		snprintf(buf, n, "%.1ex", v);
	return buf;
}

static void print_row(const result *r, bool checkout)
{
	char cfg[48];
	if (r->hold_ns)
		snprintf(cfg, sizeof cfg, "%u/%u/%lluus", r->threads, r->conns,
		         (unsigned long long)(r->hold_ns / 1000));
	else
		snprintf(cfg, sizeof cfg, "%u/%u", r->threads, r->conns);
	if (r->status != ST_OK) {
		printf("%-12s %-18s %s%s\n", cfg, r->pool, r->status == ST_FAILED ? "FAILED: " : "",
		       r->note);
		return;
	}
	char ops[16], nsop[16], p50[16], p90[16], p99[16], p999[16], mx[16];
	fmt_ops(r->ops_per_s, ops, sizeof ops);
	fmt_ns(r->ns_per_op, nsop, sizeof nsop);
	fmt_ns((double)r->lat.p50_ns, p50, sizeof p50);
	fmt_ns((double)r->lat.p90_ns, p90, sizeof p90);
	fmt_ns((double)r->lat.p99_ns, p99, sizeof p99);
	fmt_ns((double)r->lat.p999_ns, p999, sizeof p999);
	fmt_ns((double)r->lat.max_ns, mx, sizeof mx);

	char ratio[64] = "", x1[24], x2[24];
	const result *pg = find_result(r->bench, "pgring", r->threads, r->conns);
	if (strcmp(r->pool, "pgring") != 0) {
		if (!pg || pg->status != ST_OK)
			snprintf(ratio, sizeof ratio, "n/a");
		else if (r->threads == 1 && checkout)
			snprintf(ratio, sizeof ratio, "%-8s ns/op %s",
			         fmt_ratio(pg->ops_per_s / r->ops_per_s, x1, sizeof x1),
			         fmt_ratio(pg->ns_per_op / r->ns_per_op, x2, sizeof x2));
		else
			snprintf(ratio, sizeof ratio, "%s",
			         fmt_ratio(pg->ops_per_s / r->ops_per_s, x1, sizeof x1));
	}
	if (checkout)
		printf("%-12s %-18s %9s %8s %8s %8s %8s %8s %8s  %s", cfg, r->pool, ops, nsop, p50,
		       p90, p99, p999, mx, ratio);
	else
		printf("%-12s %-18s %9s %8s %8s %8s %8s  %s", cfg, r->pool, ops, p50, p99, p999, mx,
		       ratio);
	if (r->errors)
		printf("  (%llu errors)", (unsigned long long)r->errors);
	putchar('\n');
}

static void print_checkout_table(void)
{
	printf("\n== checkout: acquire + release, no query ==\n"
	       "config = threads/conns[/hold]; ns/op = wall time / ops (aggregate); latency = one "
	       "acquire, 1 in %u timed (every one with hold)\n"
	       "pgring: min_idle = max_size = conns, ping_after_idle_ms = -1, other settings "
	       "default\n"
	       "threads: the harness's threads; a peer's threads in its runtime (Python: under the "
	       "GIL); node_pg: async chains on one event loop\n",
	       opt.sample);
	printf("%-12s %-18s %9s %8s %8s %8s %8s %8s %8s  %s\n", "config", "pool", "ops/s", "ns/op",
	       "p50", "p90", "p99", "p999", "max", "pgring/this (ops/s; ns/op at 1 thread)");
	const char *last = NULL;
	unsigned lt = 0, lc = 0;
	for (unsigned i = 0; i < n_results; i++) {
		const result *r = &results[i];
		if (strncmp(r->bench, "checkout", 8) != 0)
			continue;
		if (last && (strcmp(last, r->bench) || lt != r->threads || lc != r->conns))
			putchar('\n');
		last = r->bench, lt = r->threads, lc = r->conns;
		print_row(r, true);
	}
}

static void print_e2e_table(const char *bench, const char *title)
{
	printf("\n== end to end: %s ==\n"
	       "config = threads/conns; latency = acquire + query + release, every query timed\n"
	       "pgring_loop: threads = async chains on one loop thread (pgr_loop_acquire, "
	       "pgr_loop_query, pgr_loop_release); pgring_loop_pipe: the same with %d statements "
	       "per pgr_loop_pipeline, each counted as a query, latency per checkout; node_pg: "
	       "async chains on one event loop\n",
	       title, BENCH_PIPELINE_DEPTH);
	printf("%-12s %-18s %9s %8s %8s %8s %8s  %s\n", "config", "pool", "qps", "p50", "p99",
	       "p999", "max", "pgring/this (qps)");
	unsigned lt = 0;
	for (unsigned i = 0; i < n_results; i++) {
		const result *r = &results[i];
		if (strcmp(r->bench, bench) != 0)
			continue;
		if (lt && lt != r->threads)
			putchar('\n');
		lt = r->threads;
		print_row(r, false);
	}
}

/* Compare pgring with a baseline on one configuration; print one target line. */
static void target_of(const char *what, const char *bench, const char *pool, const char *base,
                      unsigned threads, unsigned conns, bool by_ns, double want)
{
	const result *pg = find_result(bench, pool, threads, conns);
	const result *b = find_result(bench, base, threads, conns);
	if (!pg || !b)
		return;
	if (pg->status != ST_OK || b->status != ST_OK) {
		printf("  %-58s n/a (%s)\n", what,
		       pg->status != ST_OK ? "pgring did not run" : "baseline did not run");
		return;
	}
	double v = by_ns ? pg->ns_per_op / b->ns_per_op : pg->ops_per_s / b->ops_per_s;
	bool ok = by_ns ? v <= want : v >= want;
	printf("  %-58s %7.2fx  %s %.2fx  %s\n", what, v, by_ns ? "<=" : ">=", want,
	       ok ? "PASS" : "FAIL");
}

static void target(const char *what, const char *bench, const char *base, unsigned threads,
                   unsigned conns, bool by_ns, double want)
{
	target_of(what, bench, "pgring", base, threads, conns, by_ns, want);
}

static void print_targets(void)
{
	printf("\n== targets ==\n");
	char what[128];
	bool any = false;
	for (unsigned i = 0; i < n_results; i++) {
		const result *r = &results[i];
		if (strcmp(r->pool, "pgring") != 0)
			continue;
		any = true;
		if (!strcmp(r->bench, "checkout")) {
			/* Metrics and leak tracking on may cost at most 10% of a checkout. */
			snprintf(what, sizeof what, "checkout %u/%u: ns/op leak+metrics vs bare",
			         r->threads, r->conns);
			target_of(what, r->bench, "pgring_leak", "pgring_bare", r->threads,
			          r->conns, true, 1.10);
			if (r->threads == 1) {
				snprintf(what, sizeof what,
				         "checkout %u/%u: ns/op vs mutex_condvar", r->threads,
				         r->conns);
				target(what, r->bench, "mutex_condvar", r->threads, r->conns, true,
				       0.5);
			} else {
				snprintf(what, sizeof what,
				         "checkout %u/%u: ops/s vs mutex_condvar", r->threads,
				         r->conns);
				target(what, r->bench, "mutex_condvar", r->threads, r->conns, false,
				       5);
				snprintf(what, sizeof what, "checkout %u/%u: ops/s vs libzdb",
				         r->threads, r->conns);
				target(what, r->bench, "libzdb", r->threads, r->conns, false, 15);
			}
			if (r->threads >= 8 && r->status == ST_OK) {
				/* The histogram bucket holding 20 us spans 16.4-20.5 us: PASS
				 * when 99.9% of the samples lie below it, FAIL when fewer
				 * than 99.9% lie at or below its top, and say so when the 99.9th
				 * sample falls inside it. */
				char v[16];
				double need = 0.999 * (double)r->lat.count;
				const char *verdict = "UNSURE (in the 16-20us bucket)";
				if ((double)r->n_le_below >= need)
					verdict = "PASS";
				else if ((double)r->n_le_above < need)
					verdict = "FAIL";
				snprintf(what, sizeof what,
				         "checkout %u/%u: pgring p999 acquire < 20us", r->threads,
				         r->conns);
				printf("  %-58s %8s  %s\n", what,
				       fmt_ns((double)r->lat.p999_ns, v, sizeof v), verdict);
			}
		} else if (!strcmp(r->bench, "select1") || !strcmp(r->bench, "lookup")) {
			snprintf(what, sizeof what, "%s %u/%u: qps vs dedicated", r->bench,
			         r->threads, r->conns);
			target(what, r->bench, "dedicated", r->threads, r->conns, false, 0.95);
			snprintf(what, sizeof what, "%s %u/%u: qps vs connect_per_query", r->bench,
			         r->threads, r->conns);
			target(what, r->bench, "connect_per_query", r->threads, r->conns, false,
			       100);
		}
	}
	if (!any)
		printf("  none: pgring did not run (see --only)\n");
}

static void json_str(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\')
			printf("\\%c", ch);
		else if (ch < 0x20)
			printf("\\u%04x", ch);
		else
			putchar(ch);
	}
	putchar('"');
}

static void print_json(const result *r)
{
	printf("{\"bench\":");
	json_str(r->bench);
	printf(",\"pool\":");
	json_str(r->pool);
	printf(",\"threads\":%u,\"conns\":%u,\"hold_ns\":%llu", r->threads, r->conns,
	       (unsigned long long)r->hold_ns);
	if (r->status != ST_OK) {
		printf(",\"ops_per_s\":null,\"ns_per_op\":null,\"p50_ns\":null,\"p90_ns\":null,"
		       "\"p99_ns\":null,\"p999_ns\":null,\"max_ns\":null,\"%s\":",
		       r->status == ST_SKIPPED ? "skipped" : "error");
		/* The table's "skipped (why)" is just "why" here. */
		size_t n = strlen(r->note);
		if (r->status == ST_SKIPPED && !strncmp(r->note, "skipped (", 9) && n > 10 &&
		    r->note[n - 1] == ')') {
			char why[sizeof r->note];
			snprintf(why, sizeof why, "%.*s", (int)(n - 10), r->note + 9);
			json_str(why);
		} else {
			json_str(r->note);
		}
		printf("}\n");
		return;
	}
	printf(",\"ops_per_s\":%.1f,\"ns_per_op\":%.2f,\"p50_ns\":%llu,\"p90_ns\":%llu,"
	       "\"p99_ns\":%llu,\"p999_ns\":%llu,\"max_ns\":%llu,\"mean_ns\":%.1f,\"ops\":%llu,"
	       "\"errors\":%llu,\"secs\":%.3f,\"samples\":%llu,\"sample_every\":%u",
	       r->ops_per_s, r->ns_per_op, (unsigned long long)r->lat.p50_ns,
	       (unsigned long long)r->lat.p90_ns, (unsigned long long)r->lat.p99_ns,
	       (unsigned long long)r->lat.p999_ns, (unsigned long long)r->lat.max_ns,
	       r->lat.count ? (double)r->lat.sum_ns / (double)r->lat.count : 0.0,
	       (unsigned long long)r->ops, (unsigned long long)r->errors, r->secs,
	       (unsigned long long)r->lat.count, r->sample_every);
	const result *pg = find_result(r->bench, "pgring", r->threads, r->conns);
	if (strcmp(r->pool, "pgring") != 0 && pg && pg->status == ST_OK)
		printf(",\"pgring_ratio\":%.3f", pg->ops_per_s / r->ops_per_s);
	if (r->impl) {
		printf(",\"impl\":");
		json_str(r->impl);
	}
	printf("}\n");
}

/* ----------------------------------------------------------------- setup */

static void copy_str(char *dst, size_t n, const char *src)
{
	snprintf(dst, n, "%s", src ? src : "");
}

static PGconn *setup_target(bench_target *t)
{
	char err[512];
	PGconn *pg = bench_connect(t->conninfo, err, sizeof err);
	if (!pg)
		die("cannot connect to the server (%s): %s", t->conninfo, err);
	copy_str(t->host, sizeof t->host, PQhost(pg));
	copy_str(t->port, sizeof t->port, PQport(pg));
	copy_str(t->user, sizeof t->user, PQuser(pg));
	copy_str(t->password, sizeof t->password, PQpass(pg));
	copy_str(t->dbname, sizeof t->dbname, PQdb(pg));
	t->ssl = PQsslInUse(pg);
	return pg;
}

static void exec_or_die(PGconn *pg, const char *sql)
{
	PGresult *res = PQexec(pg, sql);
	ExecStatusType st = PQresultStatus(res);
	if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
		die("%s: %s", sql, PQerrorMessage(pg));
	PQclear(res);
}

static bool pool_wanted(int p)
{
	return opt.pool_on[p];
}

/*
 * Run one configuration for every wanted pool in `order`. The counted time is split into
 * opt.rounds rounds; in each round every pool runs once with a fresh pool and fresh threads,
 * forward in even rounds and backward in odd ones, so that drift over time (caches, the
 * scheduler's placement of client threads and server backends) falls on every pool alike.
 * The runners (the peers, pgring's async rows) run in opt.extra_rounds of the rounds, spread
 * evenly over them, for opt.extra_duration_s in all (the default run would take a minute or
 * two more otherwise).
 */
static void bench_config(const bench_target *tgt, const int *order, unsigned n_order,
                         const char *bench, unsigned threads, unsigned conns, uint64_t hold_ns,
                         int query)
{
	result *rs[P_COUNT];
	int ps[P_COUNT];
	unsigned n = 0;
	for (unsigned k = 0; k < n_order; k++) {
		int p = order[k];
		if (!pool_wanted(p))
			continue;
		result *r = new_result(bench, pools[p].name, threads, conns, hold_ns);
		if (!pools[p].drv && !pools[p].runner) {
			r->status = ST_SKIPPED;
			snprintf(r->note, sizeof r->note, "%s", pools[p].missing);
			continue;
		}
		bool cpq = p == P_CPQ;
		r->sample_every = (query || hold_ns || cpq) ? 1 : opt.sample;
		r->snap = malloc(sizeof *r->snap);
		if (!r->snap)
			die("out of memory");
		pgr__hist_snap_clear(r->snap);
		rs[n] = r;
		ps[n++] = p;
	}
	if (!n)
		return;
	fprintf(stderr, "pgr_bench: %s threads=%u conns=%u%s ...\n", bench, threads, conns,
	        hold_ns ? " (hold)" : "");

	for (unsigned round = 0; round < opt.rounds; round++) {
		for (unsigned j = 0; j < n; j++) {
			unsigned k = round % 2 ? n - 1 - j : j;
			result *r = rs[k];
			const struct pool_info *pi = &pools[ps[k]];
			if (r->status != ST_OK)
				continue;
			bool cpq = ps[k] == P_CPQ;
			double secs = opt.duration_s;
			unsigned rounds = opt.rounds;
			if (pi->runner) {
				secs = opt.extra_duration_s;
				rounds = opt.extra_rounds;
				/* Round k is one of the runner's when k * rounds / opt.rounds
				 * steps to the next integer at k + 1. */
				if ((round * rounds) / opt.rounds ==
				    ((round + 1) * rounds) / opt.rounds)
					continue;
			}
			if (cpq && secs > CPQ_MAX_SECS)
				secs = CPQ_MAX_SECS;
			double warm = opt.warmup_s;
			if (cpq && warm > 0.05)
				warm = 0.05;
			int rc = pi->runner
			             ? runner_round(r, pi->runner, tgt, query, secs / rounds, warm)
			             : measure_round(r, pi->drv, tgt, query, secs / rounds, warm);
			if (rc != 0)
				r->status = rc == -ENOENT ? ST_SKIPPED : ST_FAILED;
		}
	}

	for (unsigned k = 0; k < n; k++) {
		result *r = rs[k];
		char a[32], b[32];
		if (r->status == ST_OK && r->ops == 0) {
			/* A peer's failure is the peer's (or its driver's): reported, not fatal. */
			bool peer = pools[ps[k]].peer;
			r->status = peer ? ST_SKIPPED : ST_FAILED;
			snprintf(r->note, sizeof r->note,
			         "%sno operation completed (%llu errors)%s",
			         peer ? "skipped (failed: " : "", (unsigned long long)r->errors,
			         peer ? ")" : "");
		}
		if (r->status == ST_OK) {
			pgr__hist_snap_summary(r->snap, &r->lat);
			unsigned lb = pgr__hist_bucket(P999_LIMIT_NS);
			r->n_le_below =
			    pgr__hist_snap_count_le(r->snap, pgr__hist_bucket_lo(lb) - 1);
			r->n_le_above = pgr__hist_snap_count_le(r->snap, pgr__hist_bucket_hi(lb));
			r->ops_per_s = (double)r->ops / r->secs;
			r->ns_per_op = r->secs * 1e9 / (double)r->ops;
			fprintf(stderr, "pgr_bench:   %-18s %9s/s  p50 %s%s\n", r->pool,
			        fmt_ops(r->ops_per_s, a, sizeof a),
			        fmt_ns((double)r->lat.p50_ns, b, sizeof b),
			        r->errors ? "  (with errors)" : "");
		} else {
			fprintf(stderr, "pgr_bench:   %-18s %s%s\n", r->pool,
			        r->status == ST_FAILED ? "FAILED: " : "", r->note);
		}
		free(r->snap);
		r->snap = NULL;
	}
}

/* The runners' descriptions (versions), one line each, for the table and the JSON lines. */
static void note_runners(void)
{
	for (unsigned i = 0; i < n_results; i++) {
		result *r = &results[i];
		for (int p = 0; p < P_COUNT; p++)
			if (pools[p].runner && pools[p].runner->describe &&
			    !strcmp(r->pool, pools[p].name))
				r->impl = pools[p].runner->describe(pools[p].runner);
	}
}

static void print_peers(void)
{
	bool any = false;
	for (int p = 0; p < P_COUNT; p++) {
		if (!pools[p].peer || !pool_wanted(p))
			continue;
		const char *d = pools[p].runner->describe(pools[p].runner);
		const char *why = NULL;
		for (unsigned i = 0; !d && !why && i < n_results; i++)
			if (!strcmp(results[i].pool, pools[p].name) && results[i].status != ST_OK)
				why = results[i].note;
		if (!d && !why)
			continue;
		if (!any)
			printf("\n== peers (each in a child process of its own runtime; see "
			       "bench/README.md) ==\n");
		any = true;
		printf("  %-14s %s\n", pools[p].name, d ? d : why);
	}
}

int main(int argc, char **argv)
{
	parse_args(argc, argv);
	bench_target tgt;
	memset(&tgt, 0, sizeof tgt);
	tgt.conninfo = opt.conninfo ? opt.conninfo : getenv("PGR_TEST_CONNINFO");
	if (!tgt.conninfo || !*tgt.conninfo)
		die("no server: set PGR_TEST_CONNINFO or pass --conninfo (./run.sh bench does both "
		    "the server and the environment)");
	tgt.pgbouncer = getenv("PGR_BENCH_PGBOUNCER_CONNINFO");
	if (tgt.pgbouncer && !*tgt.pgbouncer)
		tgt.pgbouncer = NULL;
	PGconn *setup = setup_target(&tgt);
	setvbuf(stdout, NULL, _IOLBF, 0);
	/* A peer that dies leaves a pipe with no reader; the write then fails with EPIPE. */
	signal(SIGPIPE, SIG_IGN);

	if (opt.sec_checkout) {
		static const unsigned def[] = {1, 2, 8};
		const unsigned *th = opt.n_threads ? opt.threads : def;
		unsigned nt = opt.n_threads ? opt.n_threads : 3;
		static const int order[] = {P_PGRING, P_PGRING_BARE, P_PGRING_LEAK, P_MUTEX, P_ZDB,
		                            P_HIKARI, P_PSYCOPG,     P_SQLA,        P_NODE,  P_CPQ};
		/* The peers wait and hand off in the hold runs only with --long: the section is
		 * about pgring's waiting policy against the C pools, and time is short. */
		static const int hold_order[] = {P_PGRING,  P_MUTEX, P_ZDB, P_HIKARI,
		                                 P_PSYCOPG, P_SQLA,  P_NODE};
		unsigned n_hold = opt.long_run ? 7 : 3;
		for (unsigned i = 0; i < nt; i++)
			bench_config(&tgt, order, 10, "checkout", th[i], th[i], 0, BENCH_Q_NONE);
		/* Fewer connections than threads, each checkout held: contention, no connect-per-
		 * query (it has no connections to run short of). */
		uint64_t hold_ns = (uint64_t)opt.hold_us * 1000u;
		for (unsigned i = 0; i < nt; i++)
			if (th[i] >= 2)
				bench_config(&tgt, hold_order, n_hold, "checkout_hold", th[i],
				             th[i] / 2, hold_ns, BENCH_Q_NONE);
	}

	bool e2e = false;
	for (int p = 0; p < P_COUNT; p++)
		e2e |= opt.sec_e2e && pool_wanted(p) &&
		       (p == P_PGRING || pools[p].runner || p >= P_CPQ);
	if (e2e) {
		exec_or_die(setup, "SET client_min_messages = warning"); /* no NOTICE from DROP */
		exec_or_die(setup, "DROP TABLE IF EXISTS pgr_bench_users");
		exec_or_die(setup, "CREATE TABLE pgr_bench_users (id int PRIMARY KEY, name text)");
		char sql[160];
		snprintf(sql, sizeof sql,
		         "INSERT INTO pgr_bench_users SELECT g, 'user ' || g FROM "
		         "generate_series(1, %d) g",
		         BENCH_LOOKUP_ROWS);
		exec_or_die(setup, sql);
		exec_or_die(setup, "ANALYZE pgr_bench_users");

		static const unsigned def[] = {1, 4, 16};
		const unsigned *th = opt.n_threads ? opt.threads : def;
		unsigned nt = opt.n_threads ? opt.n_threads : 3;
		static const int order[] = {P_PGRING, P_LOOP,     P_LOOP_PIPE, P_DEDICATED,
		                            P_HIKARI, P_PSYCOPG,  P_SQLA,      P_NODE,
		                            P_CPQ,    P_PGBOUNCER};
		static const struct {
			const char *bench;
			int q;
		} qs[] = {{"select1", BENCH_Q_SELECT1}, {"lookup", BENCH_Q_LOOKUP}};
		for (unsigned q = 0; q < 2; q++)
			for (unsigned i = 0; i < nt; i++)
				bench_config(&tgt, order, 10, qs[q].bench, th[i], th[i], 0,
				             qs[q].q);
		exec_or_die(setup, "DROP TABLE IF EXISTS pgr_bench_users");
	}
	PQfinish(setup);
	for (int p = 0; p < P_COUNT; p++)
		if (pools[p].runner && pools[p].runner->shutdown)
			pools[p].runner->shutdown(pools[p].runner);
	note_runners();

	if (!opt.json) {
		print_peers();
		if (opt.sec_checkout)
			print_checkout_table();
		if (e2e) {
			print_e2e_table("select1", "SELECT 1");
			print_e2e_table("lookup", "SELECT name FROM pgr_bench_users WHERE id = $1");
		}
		print_targets();
		printf("\n");
	}
	for (unsigned i = 0; i < n_results; i++)
		print_json(&results[i]);
	if (opt.sec_exec && bench_exec_run(tgt.conninfo, opt.duration_s, opt.json))
		return 1;

	for (unsigned i = 0; i < n_results; i++)
		if (results[i].status == ST_FAILED)
			return 1;
	return 0;
}
