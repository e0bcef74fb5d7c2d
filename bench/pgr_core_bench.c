/* SPDX-License-Identifier: PostgreSQL */
/*
 * pgr_core_bench: scaling of the checkout core alone, with placeholder connections and no
 * server, so it runs on any machine (a many-core box without PostgreSQL included).
 *
 * Side by side in one run, same threads, same loop:
 *   pgring      the real pool (shards, stealing, futex FIFO) over placeholder connections
 *   mutex       BASELINE: textbook mutex + condvar pool over the same number of handles
 *   ck_ring     BASELINE: ConcurrencyKit's mpmc ring of handles, spinning (sched_yield) when
 *               empty: what "just use a lock-free ring" gives (a preempted
 *               producer stalls every later one)
 *   pgr_nocache ABLATION: pgring with its per-CPU caches off (src/percpu.h), every take and
 *               return a locked instruction on a shard bitmap
 * Configurations: "fit" (as many connections as threads, nothing held) and "scarce" (half as
 * many connections as threads, each held ~1 us), for each thread count.
 * Acquire latency is sampled on every 8th acquire (two clock reads would otherwise distort a
 * 20 ns operation); throughput comes from the whole run's wall time.
 *
 * --oversub T/C/H: T threads on C connections, each checkout held H us; besides the acquire
 * wait it times release, and reports each checkout's whole time in the pool (acquire wait +
 * release) and context switches per checkout: the mutex pool queues callers in release.
 *
 * Output: a table with ratios against the baselines, and one JSON line per configuration.
 */
#include <ck_ring.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "hist.h"
#include "placeholder.h"
#include "pool.h"

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void spin_ns(uint64_t ns)
{
	if (!ns)
		return;
	uint64_t end = now_ns() + ns;
	while (now_ns() < end)
		;
}

/* ---- baseline: mutex + condvar ---- */

struct mpool {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	void **stack;
	uint32_t n, waiters;
};

static void *mpool_create(uint32_t conns)
{
	struct mpool *m = calloc(1, sizeof(*m));
	pthread_mutex_init(&m->mu, NULL);
	pthread_condattr_t a;
	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
	pthread_cond_init(&m->cv, &a);
	m->stack = calloc(conns, sizeof(void *));
	for (uint32_t i = 0; i < conns; i++)
		m->stack[m->n++] = (void *)(uintptr_t)(i + 1);
	return m;
}

static void *mpool_acquire(void *pool)
{
	struct mpool *m = pool;
	pthread_mutex_lock(&m->mu);
	while (m->n == 0) {
		m->waiters++;
		pthread_cond_wait(&m->cv, &m->mu);
		m->waiters--;
	}
	void *h = m->stack[--m->n];
	pthread_mutex_unlock(&m->mu);
	return h;
}

static void mpool_release(void *pool, void *h)
{
	struct mpool *m = pool;
	pthread_mutex_lock(&m->mu);
	m->stack[m->n++] = h;
	bool wake = m->waiters > 0;
	pthread_mutex_unlock(&m->mu);
	if (wake)
		pthread_cond_signal(&m->cv);
}

static void mpool_destroy(void *pool)
{
	struct mpool *m = pool;
	free(m->stack);
	free(m);
}

/* ---- baseline: ck_ring mpmc ---- */

struct rpool {
	ck_ring_t ring;
	ck_ring_buffer_t *buf;
};

static void *rpool_create(uint32_t conns)
{
	struct rpool *r = calloc(1, sizeof(*r));
	unsigned size = 4;
	while (size < conns + 1)
		size <<= 1;
	r->buf = calloc(size, sizeof(ck_ring_buffer_t));
	ck_ring_init(&r->ring, size);
	for (uint32_t i = 0; i < conns; i++)
		ck_ring_enqueue_mpmc(&r->ring, r->buf, (void *)(uintptr_t)(i + 1));
	return r;
}

static void *rpool_acquire(void *pool)
{
	struct rpool *r = pool;
	void *h;
	while (!ck_ring_dequeue_mpmc(&r->ring, r->buf, &h))
		sched_yield();
	return h;
}

static void rpool_release(void *pool, void *h)
{
	struct rpool *r = pool;
	while (!ck_ring_enqueue_mpmc(&r->ring, r->buf, h))
		sched_yield();
}

static void rpool_destroy(void *pool)
{
	struct rpool *r = pool;
	free(r->buf);
	free(r);
}

/* ---- pgring over placeholder connections ---- */

static void *pgr_create_fake(uint32_t conns)
{
	pgr_config cfg;
	pgr__fake_config(&cfg, conns);
	cfg.max_waiters = 4096;
	pgr_pool *p;
	/* No manager: placeholders need no network, and this runs where io_uring may not. */
	if (pgr__pool_create_fake(&cfg, &p) != 0) {
		fprintf(stderr, "pgr_core_bench: cannot create the pool\n");
		exit(1);
	}
	return p;
}

/* Ablation: the same pool with its per-CPU caches off (the atomic path every shard takes). */
static void *pgr_create_fake_nocache(uint32_t conns)
{
	pgr_pool *p = pgr_create_fake(conns);
	pgr__pool_set_percpu(p, false);
	return p;
}

static void *pgr_acq(void *pool)
{
	pgr_conn *c;
	int rc = pgr_acquire((pgr_pool *)pool, 10000, &c);
	if (rc) {
		fprintf(stderr, "pgr_core_bench: acquire: %s\n", pgr_strerror(rc));
		exit(1);
	}
	return c;
}

static void pgr_rel(void *pool, void *h)
{
	pgr_release((pgr_conn *)h);
}

static void pgr_destroy_fake(void *pool)
{
	pgr_pool_destroy((pgr_pool *)pool);
}

static double ratio(uint64_t a, uint64_t b)
{
	return (double)a / (double)(b ? b : 1);
}

/* Whether name is in the comma-separated list (NULL: every pool); the mutex pool always runs:
 * the ratios are against it. */
static bool wanted(const char *list, const char *name)
{
	if (!list || !strcmp(name, "mutex"))
		return true;
	size_t n = strlen(name);
	for (const char *s = list; (s = strstr(s, name)) != NULL; s += n)
		if ((s == list || s[-1] == ',') && (s[n] == ',' || s[n] == 0))
			return true;
	return false;
}

struct driver {
	const char *name;
	void *(*create)(uint32_t conns);
	void *(*acquire)(void *pool);
	void (*release)(void *pool, void *h);
	void (*destroy)(void *pool);
};

static const struct driver drivers[] = {
    {"pgring", pgr_create_fake, pgr_acq, pgr_rel, pgr_destroy_fake},
    {"mutex", mpool_create, mpool_acquire, mpool_release, mpool_destroy},
    {"ck_ring", rpool_create, rpool_acquire, rpool_release, rpool_destroy},
    {"pgr_nocache", pgr_create_fake_nocache, pgr_acq, pgr_rel, pgr_destroy_fake},
};
#define NDRIVERS (sizeof(drivers) / sizeof(drivers[0]))

struct worker {
	const struct driver *d;
	void *pool;
	uint64_t hold_ns;
	uint64_t sample_mask; /* time acquires whose count & mask == 0 */
	uint64_t last_wait;
	_Atomic int *go;
	_Atomic int *stop;
	uint64_t ops;
	pgr__hist hist;      /* acquire waits */
	pgr__hist pool_hist; /* with a hold: acquire wait + release, per checkout */
} __attribute__((aligned(64)));

static void *worker_main(void *a)
{
	struct worker *w = a;
	while (!atomic_load_explicit(w->go, memory_order_acquire))
		;
	uint64_t ops = 0;
	while (!atomic_load_explicit(w->stop, memory_order_relaxed)) {
		void *h;
		if ((ops & w->sample_mask) == 0) {
			uint64_t t0 = now_ns();
			h = w->d->acquire(w->pool);
			w->last_wait = now_ns() - t0;
			pgr__hist_add(&w->hist, w->last_wait);
		} else {
			h = w->d->acquire(w->pool);
		}
		spin_ns(w->hold_ns);
		if (w->hold_ns) {
			/*
			 * A release can block too (the mutex pool's takes its lock, and a thread
			 * woken there waits for a CPU inside it): with threads outnumbering CPUs,
			 * a pool that queues callers in release shows a short acquire wait only
			 * because the queueing moved. The time a checkout spends in the pool is
			 * both, counted per checkout.
			 */
			uint64_t t1 = now_ns();
			w->d->release(w->pool, h);
			uint64_t t2 = now_ns();
			pgr__hist_add(&w->pool_hist, t2 - t1 + w->last_wait);
		} else {
			w->d->release(w->pool, h);
		}
		ops++;
	}
	w->ops = ops;
	return NULL;
}

struct result {
	double ops_per_s, ns_per_op;
	uint64_t p50, p99, p999, max;
	uint64_t pool_p999, pool_max; /* acquire + release, with a hold */
	double csw_per_op;            /* context switches (both kinds) per checkout */
};

static struct result run_one(const struct driver *d, unsigned threads, uint32_t conns,
                             uint64_t hold_ns, double seconds)
{
	void *pool = d->create(conns);
	struct worker *w = aligned_alloc(64, sizeof(struct worker) * threads);
	memset(w, 0, sizeof(struct worker) * threads);
	pthread_t th[256];
	_Atomic int go = 0, stop = 0;
	for (unsigned i = 0; i < threads; i++) {
		w[i].d = d;
		w[i].pool = pool;
		w[i].hold_ns = hold_ns;
		/* With a hold every acquire is timed (the clock is small beside it): the longest
		 * wait, where starvation shows, must not be sampled away. */
		w[i].sample_mask = hold_ns ? 0 : 7;
		w[i].go = &go;
		w[i].stop = &stop;
		pthread_create(&th[i], NULL, worker_main, &w[i]);
	}
	struct rusage ru0, ru1;
	getrusage(RUSAGE_SELF, &ru0);
	uint64_t t0 = now_ns();
	atomic_store(&go, 1);
	struct timespec ts = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
	nanosleep(&ts, NULL);
	atomic_store(&stop, 1);
	uint64_t ops = 0;
	pgr__hist_snap s, ps;
	pgr__hist_snap_clear(&s);
	pgr__hist_snap_clear(&ps);
	for (unsigned i = 0; i < threads; i++) {
		pthread_join(th[i], NULL);
		ops += w[i].ops;
		pgr__hist_snap_merge(&s, &w[i].hist);
		pgr__hist_snap_merge(&ps, &w[i].pool_hist);
	}
	uint64_t el = now_ns() - t0;
	getrusage(RUSAGE_SELF, &ru1);
	double csw = (double)(ru1.ru_nvcsw - ru0.ru_nvcsw + ru1.ru_nivcsw - ru0.ru_nivcsw);
	struct result r = {
	    .ops_per_s = (double)ops * 1e9 / (double)el,
	    .ns_per_op = (double)el / (double)(ops ? ops : 1),
	    .p50 = pgr__hist_snap_quantile(&s, 0.5),
	    .p99 = pgr__hist_snap_quantile(&s, 0.99),
	    .p999 = pgr__hist_snap_quantile(&s, 0.999),
	    .max = s.max_ns,
	    .pool_p999 = pgr__hist_snap_quantile(&ps, 0.999),
	    .pool_max = ps.max_ns,
	    .csw_per_op = csw / (double)(ops ? ops : 1),
	};
	free(w);
	d->destroy(pool);
	return r;
}

int main(int argc, char **argv)
{
	unsigned threads_list[32];
	int nthreads = 0;
	double seconds = 1.0;
	int json_only = 0;
	const char *only = NULL;
	char *oversub = NULL;
	const char *pools = NULL; /* --pools a,b: the oversub rows to run (mutex always) */
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--duration") && i + 1 < argc) {
			seconds = atof(argv[++i]);
		} else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
			char *s = argv[++i], *tok;
			while ((tok = strsep(&s, ",")) && nthreads < 32)
				threads_list[nthreads++] = (unsigned)atoi(tok);
		} else if (!strcmp(argv[i], "--json")) {
			json_only = 1;
		} else if (!strcmp(argv[i], "--only") && i + 1 < argc) {
			only = argv[++i];
		} else if (!strcmp(argv[i], "--oversub") && i + 1 < argc) {
			oversub = argv[++i];
		} else if (!strcmp(argv[i], "--pools") && i + 1 < argc) {
			pools = argv[++i];
		} else {
			fprintf(stderr,
			        "usage: pgr_core_bench [--duration S] [--threads 1,2,8] "
			        "[--only fit|scarce] [--oversub T/C/H_US,...] [--pools a,b] "
			        "[--json]\n");
			return 2;
		}
	}
	if (oversub) {
		/*
		 * Threads outnumbering connections, each checkout held H us: the waiting policy's
		 * throughput and its tail (p999 and the longest wait, where starvation shows),
		 * against the mutex pool, which lets the running thread barge. Two tails: the
		 * acquire wait alone, and the checkout's whole time in the pool (acquire wait +
		 * release), since a pool may queue its callers in release instead.
		 */
		printf("pgr_core_bench: %ld CPUs, %.1f s per configuration, oversubscribed\n"
		       "acquire: the acquire wait; in pool: acquire wait + release, per checkout; "
		       "csw/op: context switches per checkout\n\n"
		       "%-12s %-11s %9s %7s %9s %9s %9s %9s %10s %6s %6s %6s %6s %6s\n"
		       "%-12s %-11s %9s %7s %9s %9s %9s %9s %10s %6s %6s %6s %6s %6s\n",
		       ncpu, seconds, "", "", "", "", "acquire", "acquire", "in pool", "in pool",
		       "", "x", "x acq", "x acq", "x pool", "x pool", "thr/conn/us", "pool",
		       "ops/s", "csw/op", "p99_ns", "p999_ns", "max_ns", "p999_ns", "max_ns", "ops",
		       "p999", "max", "p999", "max");
		char *tok;
		while ((tok = strsep(&oversub, ","))) {
			unsigned t = 0, c = 0, h = 0;
			if (sscanf(tok, "%u/%u/%u", &t, &c, &h) != 3 || !t || !c || t > 256) {
				fprintf(stderr,
				        "--oversub: expected THREADS/CONNS/HOLD_US, got %s\n", tok);
				return 2;
			}
			struct result r[NDRIVERS];
			for (unsigned d = 0; d < NDRIVERS; d++)
				if (d != 2 &&
				    wanted(pools, drivers[d].name)) /* ck_ring spins:
				                                         no waiting policy */
					r[d] = run_one(&drivers[d], t, c, (uint64_t)h * 1000u,
					               seconds);
			for (unsigned d = 0; d < NDRIVERS; d++) {
				if (d == 2 || !wanted(pools, drivers[d].name))
					continue;
				const struct result *x = &r[d], *m = &r[1];
				printf(
				    "%-12s %-11s %9.0f %7.3f %9llu %9llu %9llu %9llu %10llu %6.2f "
				    "%6.2f %6.2f %6.2f %6.2f\n",
				    tok, drivers[d].name, x->ops_per_s, x->csw_per_op,
				    (unsigned long long)x->p99, (unsigned long long)x->p999,
				    (unsigned long long)x->max, (unsigned long long)x->pool_p999,
				    (unsigned long long)x->pool_max, x->ops_per_s / m->ops_per_s,
				    ratio(x->p999, m->p999), ratio(x->max, m->max),
				    ratio(x->pool_p999, m->pool_p999),
				    ratio(x->pool_max, m->pool_max));
				fprintf(
				    stderr,
				    "{\"bench\":\"core_oversub\",\"pool\":\"%s\",\"threads\":%u,"
				    "\"conns\":%u,\"hold_ns\":%u,\"ops_per_s\":%.0f,\"p999_ns\":%"
				    "llu,\"max_ns\":%llu,\"pool_p999_ns\":%llu,\"pool_max_ns\":%"
				    "llu,\"csw_per_op\":%.4f,\"cpus\":%ld}\n",
				    drivers[d].name, t, c, h * 1000u, x->ops_per_s,
				    (unsigned long long)x->p999, (unsigned long long)x->max,
				    (unsigned long long)x->pool_p999,
				    (unsigned long long)x->pool_max, x->csw_per_op, ncpu);
			}
			fflush(stdout);
		}
		return 0;
	}
	if (!nthreads) {
		unsigned def[] = {1, 2, 4, 8, 16, 32, 64};
		for (unsigned i = 0; i < sizeof(def) / sizeof(def[0]); i++)
			if (def[i] <= (unsigned)(ncpu * 4) || def[i] <= 8)
				threads_list[nthreads++] = def[i];
	}
	if (!json_only)
		printf("pgr_core_bench: %ld CPUs, %.1f s per configuration, placeholder "
		       "connections\n\n"
		       "%-7s %4s %5s %-11s %12s %9s %9s %9s %9s %10s %8s %8s\n",
		       ncpu, seconds, "mode", "thr", "conns", "pool", "ops/s", "ns/op", "p50_ns",
		       "p99_ns", "p999_ns", "max_ns", "x mutex", "x ckring");
	for (int mode = 0; mode < 2; mode++) {
		const char *mname = mode == 0 ? "fit" : "scarce";
		if (only && strcmp(only, mname))
			continue;
		for (int ti = 0; ti < nthreads; ti++) {
			unsigned t = threads_list[ti];
			uint32_t conns = mode == 0 ? t : (t / 2 ? t / 2 : 1);
			uint64_t hold = mode == 0 ? 0 : 1000;
			struct result r[NDRIVERS];
			for (unsigned d = 0; d < NDRIVERS; d++)
				r[d] = run_one(&drivers[d], t, conns, hold, seconds);
			for (unsigned d = 0; d < NDRIVERS; d++) {
				printf("{\"bench\":\"core_%s\",\"pool\":\"%s\",\"threads\":%u,"
				       "\"conns\":%u,"
				       "\"hold_ns\":%llu,\"ops_per_s\":%.0f,\"ns_per_op\":%.1f,"
				       "\"p50_ns\":%llu,"
				       "\"p99_ns\":%llu,\"p999_ns\":%llu,\"max_ns\":%llu,\"cpus\":%"
				       "ld}\n",
				       mname, drivers[d].name, t, conns, (unsigned long long)hold,
				       r[d].ops_per_s, r[d].ns_per_op, (unsigned long long)r[d].p50,
				       (unsigned long long)r[d].p99, (unsigned long long)r[d].p999,
				       (unsigned long long)r[d].max, ncpu);
				if (json_only)
					continue;
			}
			if (!json_only)
				for (unsigned d = 0; d < NDRIVERS; d++)
					printf("%-7s %4u %5u %-11s %12.0f %9.1f %9llu %9llu %9llu "
					       "%10llu %8.2f %8.2f\n",
					       mname, t, conns, drivers[d].name, r[d].ops_per_s,
					       r[d].ns_per_op, (unsigned long long)r[d].p50,
					       (unsigned long long)r[d].p99,
					       (unsigned long long)r[d].p999,
					       (unsigned long long)r[d].max,
					       r[d].ops_per_s / r[1].ops_per_s,
					       r[d].ops_per_s / r[2].ops_per_s);
			fflush(stdout);
		}
	}
	return 0;
}
