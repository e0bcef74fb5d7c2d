/* SPDX-License-Identifier: PostgreSQL */
/*
 * pgr_idle_bench: what idle pools cost, for many pools in one process (a pool per tenant
 * database, a pool per core), with one shared runtime and with a runtime per pool.
 *
 * For 1, 10, 100 and 1000 pools (--pools), each configuration in a fresh child process so that
 * no run inherits another's freed memory or threads:
 *   empty   pools with min_idle 0 (no connection): resident memory of the first pool and of
 *           each further one;
 *   idle    pools with min_idle 1, every one with its connection open: the same memory
 *           figures, then a window (--window) in which nothing is due (no lifetime, idle
 *           timeout, keepalive or leak threshold falls in it): pgring's threads
 *           (/proc/self/task), the runtimes' rounds (wake-ups), the context switches of
 *           pgring's threads (/proc/self/task/N/status), and CPU time (getrusage; the main
 *           thread sleeps through the window, so all of it is pgring's);
 *   busy    the checkout cost (ns per pgr_acquire + pgr_release, one thread, no query) of one
 *           pool alone on a shared runtime, then with N-1 idle pools on the same runtime, then
 *           alone again after they are destroyed; rounds interleave so that drift falls on both.
 *
 * Memory is VmRSS from /proc/self/status. The child first opens and closes one plain libpq
 * connection, so libpq's and OpenSSL's one-time set-up is not charged to the first pool.
 *
 * With many pools the server needs as many connections: the cluster of ./run.sh allows 300, so
 * the idle pools connect through PgBouncer ($PGR_BENCH_PGBOUNCER_CONNINFO; ./run.sh bench --idle
 * starts it with max_client_conn 2500). Without PgBouncer, configurations above --direct-max
 * pools run with min_idle 0 and say so in their note.
 *
 * Output: two tables and one JSON line per configuration (with --json only the JSON lines).
 * Progress goes to stderr.
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "pool.h"

#define MAX_SIZES 16
#define ROUNDS    7

struct opts {
	uint32_t sizes[MAX_SIZES];
	int nsizes;
	double window_s;
	uint32_t direct_max;
	uint32_t checkout_ops;
	const char *conninfo;
	const char *pgbouncer;
	bool json;
	bool busy;
};

/* What a child sends back through its pipe. */
struct result {
	char phase[8]; /* "empty", "idle", "busy" */
	char mode[8];  /* "shared", "own" */
	uint32_t pools;
	uint32_t min_idle;
	int ok;
	char note[160];
	/* memory, kB */
	long rss_base_kb;
	long rss_first_kb;      /* the first pool (and, shared, the runtime) */
	double rss_per_pool_kb; /* each further pool */
	double rss_avg_kb;      /* (all pools - base) / pools */
	/* idle window */
	double window_s;
	int threads;
	uint64_t wakeups;
	double wakeups_per_s;
	double ctxsw_per_s;
	double cpu_pct;
	/* busy */
	double alone_ns[2 * ROUNDS];
	int nalone;
	double with_ns[ROUNDS];
	int nwith;
	/* what the runtime did meanwhile: its rounds (the clock ticks while checkouts read it)
	 * and the CPU of every thread but the measuring one, per second */
	double rt_rounds_per_s[2]; /* [0] alone (first set), [1] with the idle pools */
	double rt_cpu_pct[2];
};

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static long status_kb(const char *path, const char *key)
{
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	char line[256];
	long v = -1;
	size_t kl = strlen(key);
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, key, kl) == 0) {
			v = strtol(line + kl, NULL, 10);
			break;
		}
	fclose(f);
	return v;
}

static long rss_kb(void)
{
	return status_kb("/proc/self/status", "VmRSS:");
}

/* Threads other than the main one, and their context switches (voluntary + involuntary). */
static int other_threads(uint64_t *ctxsw)
{
	DIR *d = opendir("/proc/self/task");
	if (!d)
		return -1;
	int n = 0;
	uint64_t sum = 0;
	pid_t me = getpid();
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.' || atoi(e->d_name) == me)
			continue;
		char path[300];
		snprintf(path, sizeof(path), "/proc/self/task/%s/status", e->d_name);
		long v = status_kb(path, "voluntary_ctxt_switches:");
		long nv = status_kb(path, "nonvoluntary_ctxt_switches:");
		sum += (uint64_t)(v > 0 ? v : 0) + (uint64_t)(nv > 0 ? nv : 0);
		n++;
	}
	closedir(d);
	if (ctxsw)
		*ctxsw = sum;
	return n;
}

static double cpu_s(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void sleep_s(double s)
{
	struct timespec ts = {.tv_sec = (time_t)s,
	                      .tv_nsec = (long)((s - (double)(time_t)s) * 1e9)};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* Rounds run by the runtimes of these pools (a shared runtime counted once). */
static uint64_t wakeups(pgr_runtime *shared, pgr_pool **pools, uint32_t n)
{
	if (shared)
		return atomic_load(&shared->wakeups);
	uint64_t sum = 0;
	for (uint32_t i = 0; i < n; i++)
		if (pools[i] && pools[i]->rt)
			sum += atomic_load(&pools[i]->rt->wakeups);
	return sum;
}

/* Wait until every pool has min_idle idle connections; false past the deadline. */
static bool wait_open(pgr_pool **pools, uint32_t n, uint32_t min_idle, double timeout_s)
{
	double deadline = now_s() + timeout_s;
	for (uint32_t i = 0; i < n;) {
		pgr_stats st;
		pgr_pool_stats(pools[i], &st);
		if (st.idle >= min_idle) {
			i++;
			continue;
		}
		if (now_s() > deadline)
			return false;
		sleep_s(0.01);
	}
	return true;
}

static int create_pools(const char *conninfo, pgr_runtime *rt, uint32_t min_idle, uint32_t max_size,
                        pgr_pool **pools, uint32_t from, uint32_t to, char *note, size_t nl)
{
	for (uint32_t i = from; i < to; i++) {
		pgr_config cfg;
		pgr_config_init(&cfg);
		cfg.conninfo = conninfo;
		cfg.name = "idle";
		cfg.min_idle = min_idle;
		cfg.max_size = max_size;
		cfg.runtime = rt;
		int rc = pgr_pool_create(&cfg, &pools[i]);
		if (rc) {
			snprintf(note, nl, "pool %u: %s", i, pgr_strerror(rc));
			return rc;
		}
	}
	return 0;
}

static void destroy_pools(pgr_pool **pools, uint32_t from, uint32_t to)
{
	for (uint32_t i = from; i < to; i++)
		if (pools[i]) {
			pgr_pool_destroy(pools[i]);
			pools[i] = NULL;
		}
}

/* One libpq connection opened and closed: libpq's and OpenSSL's set-up happens here. */
static void warm_libpq(const char *conninfo)
{
	PGconn *c = PQconnectdb(conninfo);
	PQfinish(c);
}

static const char *target(const struct opts *o, uint32_t n, uint32_t *min_idle, char *note,
                          size_t nl)
{
	*min_idle = 1;
	if (o->pgbouncer)
		return o->pgbouncer;
	if (n > o->direct_max) {
		*min_idle = 0;
		snprintf(note, nl,
		         "no PgBouncer: min_idle 0 (more pools than the server's "
		         "connections)");
	}
	return o->conninfo;
}

/* empty / idle: memory of n pools, then (idle) the window. */
static void child_pools(const struct opts *o, struct result *r, bool idle)
{
	uint32_t min_idle = 0;
	const char *ci = idle ? target(o, r->pools, &min_idle, r->note, sizeof(r->note))
	                      : (o->pgbouncer ? o->pgbouncer : o->conninfo);
	r->min_idle = min_idle;
	warm_libpq(ci);
	pgr_pool **pools = calloc(r->pools, sizeof(*pools));
	pgr_runtime *rt = NULL;
	r->rss_base_kb = rss_kb();
	bool shared = strcmp(r->mode, "shared") == 0;
	if (shared && pgr_runtime_create(true, &rt) != 0) {
		snprintf(r->note, sizeof(r->note), "pgr_runtime_create failed");
		return;
	}
	if (create_pools(ci, rt, min_idle, 10, pools, 0, 1, r->note, sizeof(r->note)))
		goto out;
	if (min_idle && !wait_open(pools, 1, min_idle, 30)) {
		snprintf(r->note, sizeof(r->note), "the first pool did not open its connection");
		goto out;
	}
	sleep_s(0.05);
	long rss1 = rss_kb();
	r->rss_first_kb = rss1 - r->rss_base_kb;
	if (create_pools(ci, rt, min_idle, 10, pools, 1, r->pools, r->note, sizeof(r->note)))
		goto out;
	if (min_idle && !wait_open(pools, r->pools, min_idle, 120)) {
		snprintf(r->note, sizeof(r->note), "not every pool opened its connection in 120 s");
		goto out;
	}
	/* Let the last connects' completions and the hot-path clock settle. */
	sleep_s(idle ? 1.0 : 0.2);
	long rss = rss_kb();
	r->rss_per_pool_kb = r->pools > 1 ? (double)(rss - rss1) / (r->pools - 1) : 0;
	r->rss_avg_kb = (double)(rss - r->rss_base_kb) / r->pools;
	if (idle) {
		uint64_t cs0, cs1;
		r->threads = other_threads(&cs0);
		uint64_t w0 = wakeups(rt, pools, r->pools);
		double c0 = cpu_s(), t0 = now_s();
		sleep_s(o->window_s);
		double t1 = now_s(), c1 = cpu_s();
		uint64_t w1 = wakeups(rt, pools, r->pools);
		int th = other_threads(&cs1);
		r->window_s = t1 - t0;
		r->wakeups = w1 - w0;
		r->wakeups_per_s = (double)(w1 - w0) / r->window_s;
		r->ctxsw_per_s = (double)(cs1 - cs0) / r->window_s;
		r->cpu_pct = 100.0 * (c1 - c0) / r->window_s;
		if (th != r->threads)
			snprintf(r->note, sizeof(r->note),
			         "threads changed in the window: %d -> %d", r->threads, th);
	}
	r->ok = 1;
out:
	destroy_pools(pools, 0, r->pools);
	if (rt)
		pgr_runtime_destroy(rt);
	free(pools);
}

/* ns per acquire + release on one pool, one thread. */
static double checkout_ns(pgr_pool *p, uint32_t ops)
{
	double t0 = now_s();
	for (uint32_t i = 0; i < ops; i++) {
		pgr_conn *c;
		if (pgr_acquire(p, 1000, &c) != 0)
			return -1;
		pgr_release(c);
	}
	return (now_s() - t0) * 1e9 / ops;
}

static double thread_cpu_s(void)
{
	struct rusage ru;
	getrusage(RUSAGE_THREAD, &ru);
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* ROUNDS checkout rounds into ns[]; the runtime's rounds and the other threads' CPU meanwhile. */
static void busy_rounds(pgr_runtime *rt, pgr_pool *p, uint32_t ops, double *ns, int *n,
                        double *rounds_per_s, double *cpu_pct)
{
	uint64_t w0 = atomic_load(&rt->wakeups);
	double t0 = now_s(), other0 = cpu_s() - thread_cpu_s();
	for (int i = 0; i < ROUNDS; i++)
		ns[(*n)++] = checkout_ns(p, ops);
	double t = now_s() - t0, other = cpu_s() - thread_cpu_s() - other0;
	*rounds_per_s = (double)(atomic_load(&rt->wakeups) - w0) / t;
	*cpu_pct = 100.0 * other / t;
}

static void child_busy(const struct opts *o, struct result *r)
{
	uint32_t min_idle;
	const char *ci = target(o, r->pools, &min_idle, r->note, sizeof(r->note));
	r->min_idle = min_idle;
	pgr_pool **pools = calloc(r->pools, sizeof(*pools));
	pgr_runtime *rt = NULL;
	if (pgr_runtime_create(true, &rt) != 0) {
		snprintf(r->note, sizeof(r->note), "pgr_runtime_create failed");
		free(pools);
		return;
	}
	/* The busy pool talks to the server itself, like pgr_bench's checkout section. */
	if (create_pools(o->conninfo, rt, 1, 1, pools, 0, 1, r->note, sizeof(r->note)))
		goto out;
	if (!wait_open(pools, 1, 1, 30)) {
		snprintf(r->note, sizeof(r->note), "the busy pool did not open its connection");
		goto out;
	}
	checkout_ns(pools[0], o->checkout_ops / 4); /* warm-up */
	busy_rounds(rt, pools[0], o->checkout_ops, r->alone_ns, &r->nalone, &r->rt_rounds_per_s[0],
	            &r->rt_cpu_pct[0]);
	if (create_pools(ci, rt, min_idle, 10, pools, 1, r->pools, r->note, sizeof(r->note)))
		goto out;
	if (min_idle && !wait_open(pools + 1, r->pools - 1, min_idle, 120)) {
		snprintf(r->note, sizeof(r->note), "not every idle pool opened its connection");
		goto out;
	}
	sleep_s(0.5);
	checkout_ns(pools[0], o->checkout_ops / 4);
	busy_rounds(rt, pools[0], o->checkout_ops, r->with_ns, &r->nwith, &r->rt_rounds_per_s[1],
	            &r->rt_cpu_pct[1]);
	destroy_pools(pools, 1, r->pools);
	checkout_ns(pools[0], o->checkout_ops / 4);
	double rps, cpu;
	busy_rounds(rt, pools[0], o->checkout_ops, r->alone_ns, &r->nalone, &rps, &cpu);
	r->ok = 1;
	for (int i = 0; i < r->nalone; i++)
		r->ok &= r->alone_ns[i] > 0;
	for (int i = 0; i < r->nwith; i++)
		r->ok &= r->with_ns[i] > 0;
	if (!r->ok)
		snprintf(r->note, sizeof(r->note), "an acquire failed");
out:
	destroy_pools(pools, 0, r->pools);
	pgr_runtime_destroy(rt);
	free(pools);
}

static int run_child(const struct opts *o, const char *phase, const char *mode, uint32_t n,
                     struct result *r)
{
	memset(r, 0, sizeof(*r));
	snprintf(r->phase, sizeof(r->phase), "%s", phase);
	snprintf(r->mode, sizeof(r->mode), "%s", mode);
	r->pools = n;
	int fds[2];
	if (pipe(fds) != 0)
		return -errno;
	fflush(NULL);
	pid_t pid = fork();
	if (pid < 0)
		return -errno;
	if (pid == 0) {
		close(fds[0]);
		if (strcmp(phase, "busy") == 0)
			child_busy(o, r);
		else
			child_pools(o, r, strcmp(phase, "idle") == 0);
		ssize_t w = write(fds[1], r, sizeof(*r));
		_exit(w == (ssize_t)sizeof(*r) ? 0 : 1);
	}
	close(fds[1]);
	size_t got = 0;
	while (got < sizeof(*r)) {
		ssize_t k = read(fds[0], (char *)r + got, sizeof(*r) - got);
		if (k <= 0)
			break;
		got += (size_t)k;
	}
	close(fds[0]);
	int st;
	waitpid(pid, &st, 0);
	if (got != sizeof(*r)) {
		r->ok = 0;
		snprintf(r->note, sizeof(r->note), "child died (status %d)", st);
	}
	return 0;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double median(const double *v, int n)
{
	double s[2 * ROUNDS];
	memcpy(s, v, sizeof(double) * (size_t)n);
	qsort(s, (size_t)n, sizeof(double), cmp_d);
	return n ? (n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2) : 0;
}

static double minimum(const double *v, int n)
{
	double m = n ? v[0] : 0;
	for (int i = 1; i < n; i++)
		m = v[i] < m ? v[i] : m;
	return m;
}

static double maximum(const double *v, int n)
{
	double m = n ? v[0] : 0;
	for (int i = 1; i < n; i++)
		m = v[i] > m ? v[i] : m;
	return m;
}

static void print_json(const struct result *r)
{
	printf(
	    "{\"bench\":\"idle\",\"phase\":\"%s\",\"runtime\":\"%s\",\"pools\":%u,\"min_idle\":%u,"
	    "\"ok\":%s",
	    r->phase, r->mode, r->pools, r->min_idle, r->ok ? "true" : "false");
	if (strcmp(r->phase, "busy") == 0) {
		printf(",\"checkout_ns_alone_median\":%.1f,\"checkout_ns_alone_min\":%.1f,"
		       "\"checkout_ns_alone_max\":%.1f,\"checkout_ns_with_idle_median\":%.1f,"
		       "\"checkout_ns_with_idle_min\":%.1f,\"checkout_ns_with_idle_max\":%.1f",
		       median(r->alone_ns, r->nalone), minimum(r->alone_ns, r->nalone),
		       maximum(r->alone_ns, r->nalone), median(r->with_ns, r->nwith),
		       minimum(r->with_ns, r->nwith), maximum(r->with_ns, r->nwith));
		printf(
		    ",\"runtime_rounds_per_s_alone\":%.1f,\"runtime_rounds_per_s_with_idle\":%.1f,"
		    "\"runtime_cpu_pct_alone\":%.3f,\"runtime_cpu_pct_with_idle\":%.3f",
		    r->rt_rounds_per_s[0], r->rt_rounds_per_s[1], r->rt_cpu_pct[0],
		    r->rt_cpu_pct[1]);
	} else {
		printf(",\"rss_first_pool_kb\":%ld,\"rss_per_pool_kb\":%.1f,\"rss_avg_kb\":%.1f",
		       r->rss_first_kb, r->rss_per_pool_kb, r->rss_avg_kb);
		if (strcmp(r->phase, "idle") == 0)
			printf(",\"window_s\":%.2f,\"threads\":%d,\"wakeups\":%llu,"
			       "\"wakeups_per_s\":%.2f,\"ctxsw_per_s\":%.2f,\"cpu_pct\":%.3f",
			       r->window_s, r->threads, (unsigned long long)r->wakeups,
			       r->wakeups_per_s, r->ctxsw_per_s, r->cpu_pct);
	}
	if (r->note[0])
		printf(",\"note\":\"%s\"", r->note);
	printf("}\n");
}

static int parse_sizes(struct opts *o, const char *s)
{
	o->nsizes = 0;
	char *copy = strdup(s), *save = NULL;
	for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		long v = strtol(t, NULL, 10);
		if (v < 1 || v > (long)PGR__MAX_POOLS || o->nsizes == MAX_SIZES) {
			free(copy);
			return -1;
		}
		o->sizes[o->nsizes++] = (uint32_t)v;
	}
	free(copy);
	return o->nsizes ? 0 : -1;
}

static void usage(void)
{
	fprintf(stderr,
	        "usage: pgr_idle_bench [options]\n"
	        "  --pools LIST      pool counts (default 1,10,100,1000)\n"
	        "  --window S        idle window in seconds (default 10)\n"
	        "  --ops N           checkouts per busy round (default 200000)\n"
	        "  --direct-max N    without PgBouncer, more pools than this run min_idle 0 "
	        "(default 250)\n"
	        "  --no-busy         skip the checkout rows\n"
	        "  --conninfo STR    the server (default $PGR_TEST_CONNINFO)\n"
	        "  --json            print only the JSON lines\n"
	        "Environment: PGR_BENCH_PGBOUNCER_CONNINFO (PgBouncer for the idle pools)\n");
	exit(2);
}

int main(int argc, char **argv)
{
	struct opts o = {.window_s = 10, .direct_max = 250, .checkout_ops = 200000, .busy = true};
	parse_sizes(&o, "1,10,100,1000");
	static const struct option lo[] = {{"pools", required_argument, NULL, 'p'},
	                                   {"window", required_argument, NULL, 'w'},
	                                   {"ops", required_argument, NULL, 'o'},
	                                   {"direct-max", required_argument, NULL, 'd'},
	                                   {"no-busy", no_argument, NULL, 'n'},
	                                   {"conninfo", required_argument, NULL, 'c'},
	                                   {"json", no_argument, NULL, 'j'},
	                                   {"help", no_argument, NULL, 'h'},
	                                   {NULL, 0, NULL, 0}};
	int ch;
	while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (ch) {
		case 'p':
			if (parse_sizes(&o, optarg))
				usage();
			break;
		case 'w':
			o.window_s = atof(optarg);
			if (!(o.window_s > 0))
				usage();
			break;
		case 'o':
			o.checkout_ops = (uint32_t)strtoul(optarg, NULL, 10);
			if (!o.checkout_ops)
				usage();
			break;
		case 'd':
			o.direct_max = (uint32_t)strtoul(optarg, NULL, 10);
			break;
		case 'n':
			o.busy = false;
			break;
		case 'c':
			o.conninfo = optarg;
			break;
		case 'j':
			o.json = true;
			break;
		default:
			usage();
		}
	}
	if (!o.conninfo)
		o.conninfo = getenv("PGR_TEST_CONNINFO");
	o.pgbouncer = getenv("PGR_BENCH_PGBOUNCER_CONNINFO");
	if (o.pgbouncer && !o.pgbouncer[0])
		o.pgbouncer = NULL;
	if (!o.conninfo) {
		fprintf(stderr, "pgr_idle_bench: no server: set PGR_TEST_CONNINFO or --conninfo\n");
		return 2;
	}
	PGconn *probe = PQconnectdb(o.conninfo);
	if (PQstatus(probe) != CONNECTION_OK) {
		fprintf(stderr, "pgr_idle_bench: cannot connect: %s", PQerrorMessage(probe));
		PQfinish(probe);
		return 2;
	}
	PQfinish(probe);
	/* A pool with its own runtime holds a ring, an eventfd and a socket. */
	struct rlimit nofile;
	if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
		nofile.rlim_cur = nofile.rlim_max;
		setrlimit(RLIMIT_NOFILE, &nofile);
	}

	struct result res[4 * MAX_SIZES * 2 + MAX_SIZES];
	int nres = 0, failed = 0;
	static const char *const modes[] = {"shared", "own"};
	static const char *const phases[] = {"empty", "idle"};
	for (int s = 0; s < o.nsizes; s++)
		for (int m = 0; m < 2; m++)
			for (int ph = 0; ph < 2; ph++) {
				fprintf(stderr, "pgr_idle_bench: %s, %u pools, %s runtime\n",
				        phases[ph], o.sizes[s], modes[m]);
				struct result *r = &res[nres++];
				run_child(&o, phases[ph], modes[m], o.sizes[s], r);
				failed += !r->ok;
			}
	for (int s = 0; o.busy && s < o.nsizes; s++) {
		if (o.sizes[s] < 2)
			continue;
		fprintf(stderr, "pgr_idle_bench: busy pool beside %u idle pools\n", o.sizes[s] - 1);
		struct result *r = &res[nres++];
		run_child(&o, "busy", "shared", o.sizes[s], r);
		failed += !r->ok;
	}

	if (!o.json) {
		printf("\nIdle pools (min_idle 1 unless noted; window %.0f s, nothing due in it)\n",
		       o.window_s);
		printf("%-6s %-7s %8s %10s %9s %8s %10s %12s %12s %12s\n", "pools", "runtime",
		       "threads", "wakeups/s", "ctxsw/s", "cpu %", "first kB", "empty kB/pool",
		       "idle kB/pool", "idle avg kB");
		for (int i = 0; i < nres; i++) {
			const struct result *r = &res[i], *e = NULL;
			if (strcmp(r->phase, "idle") != 0)
				continue;
			for (int k = 0; k < nres; k++)
				if (strcmp(res[k].phase, "empty") == 0 &&
				    res[k].pools == r->pools && strcmp(res[k].mode, r->mode) == 0)
					e = &res[k];
			printf("%-6u %-7s %8d %10.2f %9.2f %8.3f %10ld %12.1f %12.1f %12.1f%s%s\n",
			       r->pools, r->mode, r->threads, r->wakeups_per_s, r->ctxsw_per_s,
			       r->cpu_pct, r->rss_first_kb, e ? e->rss_per_pool_kb : 0,
			       r->rss_per_pool_kb, r->rss_avg_kb, r->note[0] ? "  " : "",
			       r->ok ? r->note : "FAILED");
		}
		if (o.busy) {
			printf(
			    "\nCheckout of one busy pool (ns per acquire+release, 1 thread, %u ops "
			    "x %d rounds): alone on a shared runtime vs beside idle pools on it\n",
			    o.checkout_ops, ROUNDS);
			printf("%-12s %14s %18s %14s %18s %8s %16s %16s\n", "idle pools",
			       "alone median", "alone [min, max]", "with median", "with [min, max]",
			       "ratio", "rt rounds/s", "rt cpu %");
			for (int i = 0; i < nres; i++) {
				const struct result *r = &res[i];
				if (strcmp(r->phase, "busy") != 0)
					continue;
				double a = median(r->alone_ns, r->nalone),
				       w = median(r->with_ns, r->nwith);
				printf(
				    "%-12u %14.1f   [%6.1f, %6.1f] %14.1f   [%6.1f, %6.1f] %8.3f "
				    "%7.0f -> %-6.0f %7.2f -> %-6.2f%s%s\n",
				    r->pools - 1, a, minimum(r->alone_ns, r->nalone),
				    maximum(r->alone_ns, r->nalone), w,
				    minimum(r->with_ns, r->nwith), maximum(r->with_ns, r->nwith),
				    a > 0 ? w / a : 0, r->rt_rounds_per_s[0], r->rt_rounds_per_s[1],
				    r->rt_cpu_pct[0], r->rt_cpu_pct[1], r->ok ? "" : "  FAILED ",
				    r->note);
			}
		}
		printf("\n");
	}
	for (int i = 0; i < nres; i++)
		print_json(&res[i]);
	return failed ? 1 : 0;
}
