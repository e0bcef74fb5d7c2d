/* SPDX-License-Identifier: PostgreSQL */
/*
 * pgr_bench section "exec": the keyed lookup on one io_uring loop thread, on the same two
 * connections, through
 *   - pgr_loop_acquire + pgr_loop_query + pgr_loop_release per statement (a checkout per query),
 *   - pgr_loop_exec unprepared, and prepared, at 1 / 4 / 16 statements in flight per connection,
 * beside pgbench against the same server in the same run (-M extended and -M prepared, one
 * statement per transaction, and pipelined with \startpipeline at the same depths): the
 * server's own ceiling for this lookup. Latency is per statement, from the call to its callback.
 *
 * pgbench's pipeline ends in one sync point per transaction of `depth` statements, while
 * pgr_loop_exec ends every statement in its own (that is what keeps them independent), and the
 * server then commits and flushes once per statement. pgbench 15 cannot sync inside a pipeline,
 * so a hand-written libpq loop with a sync point per statement (libpq_sync_each) shows the
 * ceiling for independent statements beside it, and pgr_loop_exec with exec_sync_group = depth
 * (statements sent together share one sync point; a failed one's group-mates are re-sent alone)
 * runs at pgbench's depths beside both. CPU time per statement is given for the client
 * (this process, or pgbench) and for the whole machine (all processes, steal excluded): on a
 * small shared VM they say more than queries/s, which swing with the time stolen.
 */
#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "bench_exec.h"
#include "pgring.h"

#define ROWS    10000
#define CONNS   2
#define MAXSLOT 64
#define LOOKUP  "SELECT name FROM pgr_bench_exec_users WHERE id = $1"

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* CPU seconds: this process (or its waited-for children), and the machine's busy time. */
struct cpu {
	double self, children, machine;
};

static double tv_s(struct timeval t)
{
	return (double)t.tv_sec + (double)t.tv_usec / 1e6;
}

static void cpu_sample(struct cpu *c)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	c->self = tv_s(ru.ru_utime) + tv_s(ru.ru_stime);
	getrusage(RUSAGE_CHILDREN, &ru);
	c->children = tv_s(ru.ru_utime) + tv_s(ru.ru_stime);
	c->machine = -1;
	FILE *f = fopen("/proc/stat", "r");
	unsigned long long u, n, sy, id, io, irq, sirq;
	if (f && fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu", &u, &n, &sy, &id, &io, &irq,
	                &sirq) == 7)
		c->machine = (double)(u + n + sy + irq + sirq) / (double)sysconf(_SC_CLK_TCK);
	if (f)
		fclose(f);
}

struct run;
struct slot {
	struct run *r;
	int64_t t0;
	pgr_conn *conn;
	char id[16];
};

struct run {
	pgr_loop *loop;
	bool checkout; /* acquire + query + release */
	int64_t warm_end, end;
	uint64_t done, errors;
	int64_t *lat;
	size_t nlat, cap;
	uint32_t seed;
	int inflight;
	struct slot slots[MAXSLOT];
};

static void start(struct slot *s);

static void finish(struct slot *s, bool ok)
{
	struct run *r = s->r;
	int64_t t = now_ns();
	r->inflight--;
	if (t >= r->warm_end && t < r->end) {
		if (!ok)
			r->errors++;
		r->done++;
		if (r->nlat < r->cap)
			r->lat[r->nlat++] = t - s->t0;
	}
	if (t < r->end)
		start(s);
}

static bool res_ok(int err, PGresult *res)
{
	bool ok = !err && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
	PQclear(res);
	return ok;
}

static void on_exec(pgr_loop *l, int err, PGresult *res, void *arg)
{
	(void)l;
	finish(arg, res_ok(err, res));
}

static void on_query(pgr_loop *l, int err, PGresult *res, void *arg)
{
	struct slot *s = arg;
	bool ok = res_ok(err, res);
	pgr_loop_release(l, s->conn);
	finish(s, ok);
}

static void on_acquire(pgr_loop *l, int err, pgr_conn *c, void *arg)
{
	struct slot *s = arg;
	if (err) {
		finish(s, false);
		return;
	}
	s->conn = c;
	const char *pv[1] = {s->id};
	if (pgr_loop_query(l, c, LOOKUP, 1, pv, 5000, on_query, s)) {
		pgr_loop_release(l, c);
		finish(s, false);
	}
}

static void start(struct slot *s)
{
	struct run *r = s->r;
	r->seed = r->seed * 1103515245u + 12345u;
	snprintf(s->id, sizeof s->id, "%u", 1 + (r->seed >> 8) % ROWS);
	s->t0 = now_ns();
	r->inflight++;
	const char *pv[1] = {s->id};
	int rc = r->checkout ? pgr_loop_acquire(r->loop, 5000, on_acquire, s)
	                     : pgr_loop_exec(r->loop, LOOKUP, 1, pv, 5000, on_exec, s);
	if (rc) {
		r->inflight--;
		r->errors++;
	}
}

static void turn(struct io_uring *ring, pgr_loop *l)
{
	struct io_uring_cqe *cqe;
	struct __kernel_timespec ts = {.tv_nsec = 10000000};
	io_uring_submit_and_wait_timeout(ring, &cqe, 1, &ts, NULL);
	unsigned head, n = 0;
	io_uring_for_each_cqe (ring, head, cqe) {
		pgr_loop_handle_cqe(l, cqe);
		n++;
	}
	io_uring_cq_advance(ring, n);
}

static int cmp64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return x < y ? -1 : x > y;
}

struct row {
	char mode[48];
	int depth;
	double qps;
	double p50_us, p99_us;                /* < 0: not measured */
	double cpu_client_us, cpu_machine_us; /* per statement; < 0: not measured */
	uint64_t errors;
	char note[96];
};

static struct row rows[32];
static int nrows;

/* One loop-thread run of a mode; threshold: prepare_threshold (-1 never, 0 at once); group:
 * exec_sync_group (1: a sync point per statement). */
static void run_mode(const char *conninfo, const char *mode, bool checkout, int threshold,
                     int depth, int group, double dur_s)
{
	struct row *w = &rows[nrows++];
	snprintf(w->mode, sizeof w->mode, "%s", mode);
	w->depth = depth;
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = conninfo;
	cfg.name = "bench_exec";
	cfg.max_size = CONNS;
	cfg.min_idle = CONNS;
	cfg.exec_max_conns = CONNS;
	cfg.exec_pipeline_depth = (uint32_t)depth;
	cfg.prepare_threshold = threshold;
	cfg.exec_sync_group = (uint32_t)group;
	cfg.ping_after_idle_ms = -1;
	pgr_pool *pool;
	struct io_uring ring;
	if (pgr_pool_create(&cfg, &pool) || io_uring_queue_init(256, &ring, 0)) {
		snprintf(w->note, sizeof w->note, "setup failed");
		w->qps = -1;
		return;
	}
	pgr_stats st;
	for (int i = 0; i < 500; i++) {
		pgr_pool_stats(pool, &st);
		if (st.idle >= CONNS)
			break;
		usleep(10000);
	}
	pgr_loop *l;
	pgr_loop_create(pool, &ring, 0, &l);
	struct run *r = calloc(1, sizeof *r);
	r->loop = l;
	r->checkout = checkout;
	r->cap = 1u << 22;
	r->lat = malloc(r->cap * sizeof(int64_t));
	r->seed = 42;
	int64_t t0 = now_ns();
	r->warm_end = t0 + 200000000;
	r->end = r->warm_end + (int64_t)(dur_s * 1e9);
	int n = checkout ? CONNS : depth * CONNS;
	for (int i = 0; i < n && i < MAXSLOT; i++) {
		r->slots[i].r = r;
		start(&r->slots[i]);
	}
	struct cpu c0 = {0}, c1 = {0};
	bool s0 = false, s1 = false;
	for (;;) {
		int64_t t = now_ns();
		if (!s0 && t >= r->warm_end) {
			cpu_sample(&c0);
			s0 = true;
		}
		if (!s1 && t >= r->end) {
			cpu_sample(&c1);
			s1 = true;
		}
		if (r->inflight <= 0 && t >= r->end)
			break;
		turn(&ring, l);
	}
	w->qps = (double)r->done / dur_s;
	w->cpu_client_us = r->done ? (c1.self - c0.self) * 1e6 / (double)r->done : -1;
	w->cpu_machine_us =
	    r->done && c0.machine >= 0 ? (c1.machine - c0.machine) * 1e6 / (double)r->done : -1;
	w->errors = r->errors;
	qsort(r->lat, r->nlat, sizeof(int64_t), cmp64);
	w->p50_us = r->nlat ? (double)r->lat[r->nlat / 2] / 1e3 : -1;
	w->p99_us = r->nlat ? (double)r->lat[r->nlat * 99 / 100] / 1e3 : -1;
	while (pgr_loop_destroy(l) == -EBUSY)
		turn(&ring, l);
	pgr_pool_destroy(pool);
	io_uring_queue_exit(&ring);
	free(r->lat);
	free(r);
}

/* pgbench with `depth` lookups per transaction (pipelined when depth > 1); -1 if unavailable. */
static void run_pgbench(const char *conninfo, const char *mode, const char *proto, int depth,
                        double dur_s)
{
	struct row *w = &rows[nrows++];
	snprintf(w->mode, sizeof w->mode, "%s", mode);
	w->depth = depth;
	w->p50_us = w->p99_us = -1;
	w->cpu_client_us = w->cpu_machine_us = -1;
	w->qps = -1;
	char path[] = "/tmp/pgr_bench_exec_XXXXXX";
	int fd = mkstemp(path);
	if (fd < 0)
		return;
	FILE *f = fdopen(fd, "w");
	for (int i = 0; i < depth; i++)
		fprintf(f, "\\set id%d random(1, %d)\n", i, ROWS);
	if (depth > 1)
		fprintf(f, "\\startpipeline\n");
	for (int i = 0; i < depth; i++)
		fprintf(f, "SELECT name FROM pgr_bench_exec_users WHERE id = :id%d;\n", i);
	if (depth > 1)
		fprintf(f, "\\endpipeline\n");
	fclose(f);
	char cmd[1024];
	snprintf(cmd, sizeof cmd,
	         "pgbench -n -M %s -c %d -j 1 -T %d -f %s \"%s\" 2>&1 | sed -n 's/^tps = "
	         "\\([0-9.]*\\).*/\\1/p'",
	         proto, CONNS, (int)(dur_s < 1 ? 1 : dur_s + 0.5), path, conninfo);
	struct cpu c0, c1;
	cpu_sample(&c0);
	FILE *p = popen(cmd, "r");
	double tps = 0;
	bool ok = p && fscanf(p, "%lf", &tps) == 1 && tps > 0;
	if (p)
		pclose(p);
	cpu_sample(&c1);
	if (ok) {
		/* pgbench's own count covers -T seconds; its CPU time includes its two connects. */
		double n = tps * depth * (double)(int)(dur_s < 1 ? 1 : dur_s + 0.5);
		w->qps = tps * depth;
		w->cpu_client_us = (c1.children - c0.children) * 1e6 / n;
		if (c0.machine >= 0)
			w->cpu_machine_us = (c1.machine - c0.machine) * 1e6 / n;
	} else {
		snprintf(w->note, sizeof w->note, "pgbench failed or not installed");
	}
	unlink(path);
}

/*
 * The reference for independent statements: libpq alone, in pipeline mode, every statement
 * prepared and followed by its own sync point, `depth` in flight on each connection, a new one
 * sent as each answer's sync point is read, one thread polling both sockets with poll(2).
 */
static void run_libpq(const char *conninfo, int depth, double dur_s)
{
	struct row *w = &rows[nrows++];
	snprintf(w->mode, sizeof w->mode, "libpq_sync_each");
	w->depth = depth;
	w->p50_us = w->p99_us = -1;
	w->cpu_client_us = w->cpu_machine_us = -1;
	w->qps = -1;
	PGconn *c[CONNS] = {0};
	uint32_t seed = 42;
	uint64_t done = 0, errors = 0;
	bool ok = true;
	for (int i = 0; i < CONNS && ok; i++) {
		c[i] = PQconnectdb(conninfo);
		PGresult *r =
		    PQstatus(c[i]) == CONNECTION_OK ? PQprepare(c[i], "l", LOOKUP, 1, NULL) : NULL;
		ok = r && PQresultStatus(r) == PGRES_COMMAND_OK && PQsetnonblocking(c[i], 1) == 0 &&
		     PQenterPipelineMode(c[i]) == 1;
		PQclear(r);
	}
	int64_t t0 = now_ns(), warm_end = t0 + 200000000, end = warm_end + (int64_t)(dur_s * 1e9);
	struct cpu c0 = {0}, c1 = {0};
	bool s0 = false;
	for (int i = 0; i < CONNS && ok; i++)
		for (int k = 0; k < depth && ok; k++) {
			char id[16];
			seed = seed * 1103515245u + 12345u;
			snprintf(id, sizeof id, "%u", 1 + (seed >> 8) % ROWS);
			const char *pv[1] = {id};
			ok = PQsendQueryPrepared(c[i], "l", 1, pv, NULL, NULL, 0) &&
			     PQpipelineSync(c[i]);
		}
	while (ok) {
		int64_t t = now_ns();
		if (!s0 && t >= warm_end) {
			cpu_sample(&c0);
			s0 = true;
		}
		if (t >= end)
			break;
		struct pollfd pf[CONNS];
		for (int i = 0; i < CONNS; i++)
			pf[i] = (struct pollfd){
			    .fd = PQsocket(c[i]),
			    .events = (short)(POLLIN | (PQflush(c[i]) ? POLLOUT : 0))};
		if (poll(pf, CONNS, 100) < 0)
			break;
		for (int i = 0; i < CONNS && ok; i++) {
			if (!pf[i].revents)
				continue;
			if (!PQconsumeInput(c[i])) {
				ok = false;
				break;
			}
			while (ok && !PQisBusy(c[i])) {
				PGresult *r = PQgetResult(c[i]);
				if (!r)
					continue; /* the end of one statement's results */
				ExecStatusType st = PQresultStatus(r);
				PQclear(r);
				if (st == PGRES_TUPLES_OK)
					continue;
				if (st != PGRES_PIPELINE_SYNC) {
					errors++;
					continue;
				}
				if (t >= warm_end)
					done++;
				char id[16];
				seed = seed * 1103515245u + 12345u;
				snprintf(id, sizeof id, "%u", 1 + (seed >> 8) % ROWS);
				const char *pv[1] = {id};
				ok = PQsendQueryPrepared(c[i], "l", 1, pv, NULL, NULL, 0) &&
				     PQpipelineSync(c[i]);
			}
		}
	}
	cpu_sample(&c1);
	for (int i = 0; i < CONNS; i++)
		PQfinish(c[i]);
	if (!ok || !done) {
		snprintf(w->note, sizeof w->note, "libpq reference failed");
		return;
	}
	w->qps = (double)done / dur_s;
	w->errors = errors;
	w->cpu_client_us = (c1.self - c0.self) * 1e6 / (double)done;
	if (c0.machine >= 0)
		w->cpu_machine_us = (c1.machine - c0.machine) * 1e6 / (double)done;
}

static int exec_sql(PGconn *c, const char *sql)
{
	PGresult *r = PQexec(c, sql);
	int ok = PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK;
	PQclear(r);
	return ok ? 0 : -1;
}

int bench_exec_run(const char *conninfo, double dur_s, bool json)
{
	PGconn *c = PQconnectdb(conninfo);
	if (PQstatus(c) != CONNECTION_OK) {
		fprintf(stderr, "pgr_bench exec: %s", PQerrorMessage(c));
		PQfinish(c);
		return -1;
	}
	char sql[200];
	snprintf(sql, sizeof sql,
	         "INSERT INTO pgr_bench_exec_users SELECT g, 'user ' || g FROM "
	         "generate_series(1, %d) g",
	         ROWS);
	if (exec_sql(c, "SET client_min_messages = warning") ||
	    exec_sql(c, "DROP TABLE IF EXISTS pgr_bench_exec_users") ||
	    exec_sql(c, "CREATE TABLE pgr_bench_exec_users (id int PRIMARY KEY, name text)") ||
	    exec_sql(c, sql) || exec_sql(c, "ANALYZE pgr_bench_exec_users")) {
		fprintf(stderr, "pgr_bench exec: setup failed: %s", PQerrorMessage(c));
		PQfinish(c);
		return -1;
	}
	nrows = 0;
	fprintf(stderr, "pgr_bench: exec section (one loop thread, %d connections)\n", CONNS);
	run_mode(conninfo, "loop_query_per_checkout", true, -1, 1, 1, dur_s);
	run_mode(conninfo, "loop_exec_unprepared", false, -1, 1, 1, dur_s);
	run_mode(conninfo, "loop_exec_unprepared", false, -1, 16, 1, dur_s);
	run_pgbench(conninfo, "pgbench_extended", "extended", 1, dur_s);
	/*
	 * At each depth side by side, so that they see the same machine: pgr_loop_exec with a sync
	 * point per statement, and (above depth 1) with up to `depth` statements per sync point
	 * (exec_sync_group), as pgbench's pipeline has; pgbench; libpq with a sync per statement.
	 */
	static const int depths[] = {1, 4, 16};
	int at[3], grp[3], pgb[3], ref[3];
	for (int i = 0; i < 3; i++) {
		at[i] = nrows;
		run_mode(conninfo, "loop_exec_prepared", false, 0, depths[i], 1, dur_s);
		grp[i] = -1;
		if (depths[i] > 1) {
			grp[i] = nrows;
			run_mode(conninfo, "loop_exec_prepared_grouped", false, 0, depths[i],
			         depths[i], dur_s);
		}
		pgb[i] = nrows;
		run_pgbench(conninfo, "pgbench_prepared", "prepared", depths[i], dur_s);
		ref[i] = nrows;
		run_libpq(conninfo, depths[i], dur_s);
	}
	exec_sql(c, "DROP TABLE IF EXISTS pgr_bench_exec_users");
	PQfinish(c);

	double base = rows[0].qps;
	if (!json) {
		printf("\n## exec: SELECT name FROM users WHERE id = $1, one loop thread, %d "
		       "connections\n\n",
		       CONNS);
		printf("| mode | in flight per conn | queries/s | x checkout path | p50 | p99 | "
		       "CPU us/stmt client | CPU us/stmt machine |\n");
		printf("|---|---|---|---|---|---|---|---|\n");
		for (int i = 0; i < nrows; i++) {
			struct row *w = &rows[i];
			if (w->qps < 0) {
				printf("| %s | %d | %s | | | | | |\n", w->mode, w->depth, w->note);
				continue;
			}
			char p50[24] = "-", p99[24] = "-", cc[24] = "-", cm[24] = "-";
			if (w->p50_us >= 0) {
				snprintf(p50, sizeof p50, "%.0f us", w->p50_us);
				snprintf(p99, sizeof p99, "%.0f us", w->p99_us);
			}
			if (w->cpu_client_us >= 0)
				snprintf(cc, sizeof cc, "%.1f", w->cpu_client_us);
			if (w->cpu_machine_us >= 0)
				snprintf(cm, sizeof cm, "%.1f", w->cpu_machine_us);
			printf("| %s | %d | %.0f | %.2f | %s | %s | %s | %s |%s\n", w->mode,
			       w->depth, w->qps, base > 0 ? w->qps / base : 0, p50, p99, cc, cm,
			       w->errors ? " (with errors)" : "");
		}
		/* The targets, stated beside the numbers. */
		printf("\n");
		for (int i = 0; i < 3; i++) {
			double mine = rows[at[i]].qps, pq = rows[pgb[i]].qps, rq = rows[ref[i]].qps;
			printf(
			    "loop_exec prepared, %d in flight: %.2fx the checkout path, %.0f%% of "
			    "pgbench -M prepared pipelined, %.0f%% of libpq with a sync per "
			    "statement\n",
			    depths[i], base > 0 ? mine / base : 0, pq > 0 ? 100.0 * mine / pq : 0,
			    rq > 0 ? 100.0 * mine / rq : 0);
			if (grp[i] >= 0) {
				double g = rows[grp[i]].qps;
				printf(
				    "loop_exec prepared, %d in flight, exec_sync_group %d: %.2fx "
				    "the checkout path, %.0f%% of pgbench -M prepared pipelined\n",
				    depths[i], depths[i], base > 0 ? g / base : 0,
				    pq > 0 ? 100.0 * g / pq : 0);
			}
		}
	}
	for (int i = 0; i < nrows; i++) {
		struct row *w = &rows[i];
		printf("{\"bench\":\"exec_lookup\",\"mode\":\"%s\",\"depth\":%d,\"conns\":%d,"
		       "\"threads\":1,\"qps\":%.1f,\"p50_us\":%.1f,\"p99_us\":%.1f,"
		       "\"cpu_client_us\":%.2f,\"cpu_machine_us\":%.2f,\"errors\":%llu}\n",
		       w->mode, w->depth, CONNS, w->qps, w->p50_us, w->p99_us, w->cpu_client_us,
		       w->cpu_machine_us, (unsigned long long)w->errors);
	}
	return 0;
}
