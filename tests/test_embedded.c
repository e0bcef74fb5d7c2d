/* SPDX-License-Identifier: PostgreSQL */
/*
 * The manager driven by the caller's event loop (cfg.manager_thread = 0): no pool thread, the
 * pool's network work runs inside pgr_pool_run on the loop's thread, woken through
 * pgr_pool_fd polled on the caller's own io_uring ring.
 */
#include <dirent.h>
#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <string.h>

#include "testutil.h"

static int count_threads(void)
{
	DIR *d = opendir("/proc/self/task");
	cr_assert(d);
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL)
		n += e->d_name[0] != '.';
	closedir(d);
	return n;
}

#define UD_POOL_FD 0x1000u /* the loop's own user_data for the POLL_ADD on pgr_pool_fd */

struct eloop {
	struct io_uring ring;
	pgr_pool *pool;
	pgr_loop *loop;
	int runs;
};

static void arm_pool_fd(struct eloop *e)
{
	struct io_uring_sqe *s = io_uring_get_sqe(&e->ring);
	cr_assert(s);
	io_uring_prep_poll_add(s, pgr_pool_fd(e->pool), POLLIN);
	io_uring_sqe_set_data64(s, UD_POOL_FD);
}

static void turn(struct eloop *e)
{
	struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = 20000000};
	struct io_uring_cqe *cqe;
	io_uring_submit_and_wait_timeout(&e->ring, &cqe, 1, &ts, NULL);
	unsigned head, n = 0;
	bool rearm = false;
	io_uring_for_each_cqe (&e->ring, head, cqe) {
		n++;
		if (pgr_loop_handle_cqe(e->loop, cqe))
			continue;
		cr_assert_eq(io_uring_cqe_get_data64(cqe), UD_POOL_FD, "unknown CQE");
		rearm = true;
	}
	io_uring_cq_advance(&e->ring, n);
	if (rearm) {
		cr_assert_eq(pgr_pool_run(e->pool), 0);
		e->runs++;
		arm_pool_fd(e);
	}
}

static void eloop_init(struct eloop *e, uint32_t size)
{
	memset(e, 0, sizeof(*e));
	cr_assert_eq(io_uring_queue_init(64, &e->ring, 0), 0);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = size;
	cfg.max_size = size;
	cfg.manager_thread = false;
	cr_assert_eq(pgr_pool_create(&cfg, &e->pool), 0);
	cr_assert_geq(pgr_pool_fd(e->pool), 0);
	cr_assert_eq(pgr_loop_create(e->pool, &e->ring, 0, &e->loop), 0);
	arm_pool_fd(e);
}

Test(embedded, manager_thread_0_starts_no_thread, .timeout = 30)
{
	int before = count_threads();
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = cfg.max_size = 1;
	cfg.manager_thread = false;
	pgr_pool *p;
	cr_assert_eq(pgr_pool_create(&cfg, &p), 0);
	cr_assert_eq(count_threads(), before, "a thread was started");
	/* Nothing happens unless the caller runs the manager. */
	struct pollfd pfd = {.fd = pgr_pool_fd(p), .events = POLLIN};
	int64_t dl = tu_now_ms() + 5000;
	while (tu_stats(p).idle < 1 && tu_now_ms() < dl) {
		poll(&pfd, 1, 50);
		cr_assert_eq(pgr_pool_run(p), 0);
	}
	cr_assert_eq(tu_stats(p).idle, 1);
	pgr_pool_destroy(p);
	cr_assert_eq(count_threads(), before);
}

Test(embedded, pool_fd_and_run_refuse_a_pool_with_a_manager_thread, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.max_size = 1;
	pgr_pool *p;
	cr_assert_eq(pgr_pool_create(&cfg, &p), 0);
	cr_assert_eq(pgr_pool_fd(p), -EINVAL);
	cr_assert_eq(pgr_pool_run(p), -EINVAL);
	pgr_pool_destroy(p);
}

Test(embedded, pool_run_says_eshutdown_once_drain_stopped_the_manager, .timeout = 30)
{
	for (int shared = 0; shared < 2; shared++) {
		pgr_runtime *rt = NULL;
		pgr_config cfg;
		pgr_config_init(&cfg);
		cfg.conninfo = tu_conninfo();
		cfg.min_idle = cfg.max_size = 1;
		cfg.manager_thread = false;
		if (shared) {
			cr_assert_eq(pgr_runtime_create(false, &rt), 0);
			cfg.runtime = rt;
		}
		pgr_pool *p;
		cr_assert_eq(pgr_pool_create(&cfg, &p), 0);
		struct pollfd pfd = {.fd = pgr_pool_fd(p), .events = POLLIN};
		int64_t dl = tu_now_ms() + 5000;
		while (tu_stats(p).idle < 1 && tu_now_ms() < dl) {
			poll(&pfd, 1, 50);
			cr_assert_eq(pgr_pool_run(p), 0);
		}
		cr_assert_eq(tu_stats(p).idle, 1);
		cr_assert_eq(pgr_pool_drain(p, 1000), 0);
		/* A loop that polls until the pool says it is done can stop now. */
		cr_assert_eq(pgr_pool_run(p), -ESHUTDOWN, "shared runtime %d", shared);
		cr_assert_eq(pgr_pool_destroy(p), 0);
		if (rt)
			cr_assert_eq(pgr_runtime_destroy(rt), 0);
	}
}

struct job {
	struct eloop *e;
	pgr_conn *conn;
	int done, err, value;
	char param[16];
	bool begin_only;
};

static void on_result(pgr_loop *l, int err, PGresult *res, void *arg)
{
	struct job *j = arg;
	j->err = err;
	if (!err && PQresultStatus(res) == PGRES_TUPLES_OK)
		j->value = atoi(PQgetvalue(res, 0, 0));
	else if (!err && PQresultStatus(res) != PGRES_COMMAND_OK)
		j->err = -EIO;
	PQclear(res);
	pgr_release(j->conn); /* may need a rollback: the manager does it in pgr_pool_run */
	j->done = 1;
}

static void on_conn(pgr_loop *l, int err, pgr_conn *c, void *arg)
{
	struct job *j = arg;
	if (err) {
		j->err = err;
		j->done = 1;
		return;
	}
	j->conn = c;
	cr_assert_eq(PQtransactionStatus(pgr_conn_pg(c)), PQTRANS_IDLE, "handed out dirty");
	if (j->begin_only) {
		cr_assert_eq(pgr_loop_query(l, c, "begin", 0, NULL, 5000, on_result, j), 0);
		return;
	}
	const char *params[1] = {j->param};
	cr_assert_eq(pgr_loop_query(l, c, "select $1::int + 1", 1, params, 5000, on_result, j), 0);
}

Test(embedded, async_queries_connects_and_rollbacks_run_on_the_loop_thread, .timeout = 60)
{
	static struct eloop e;
	int threads_before = count_threads();
	eloop_init(&e, 2);
	enum {
		N = 200
	};
	static struct job jobs[N];
	for (int i = 0; i < N; i++) {
		jobs[i] = (struct job){.e = &e, .value = -1, .begin_only = i % 10 == 3};
		snprintf(jobs[i].param, sizeof jobs[i].param, "%d", i);
	}
	/* Four in flight on a pool of two: waiting, connects, rollbacks all go through the loop. */
	int next = 0, done = 0;
	int64_t dl = tu_now_ms() + 30000;
	while (done < N && tu_now_ms() < dl) {
		while (next < N && next - done < 4) {
			cr_assert_eq(pgr_loop_acquire(e.loop, 10000, on_conn, &jobs[next]), 0);
			next++;
		}
		turn(&e);
		done = 0;
		for (int i = 0; i < next; i++)
			done += jobs[i].done;
	}
	cr_assert_eq(done, N);
	for (int i = 0; i < N; i++) {
		cr_assert_eq(jobs[i].err, 0, "job %d: %s", i, pgr_strerror(jobs[i].err));
		if (!jobs[i].begin_only)
			cr_assert_eq(jobs[i].value, i + 1);
	}
	cr_assert_eq(count_threads(), threads_before, "a pool thread appeared");
	cr_assert_gt(e.runs, 0);
	/* The rollbacks ran inside pgr_pool_run: wait for the last ones, driving the loop. */
	dl = tu_now_ms() + 5000;
	while (tu_stats(e.pool).rollbacks < N / 10 && tu_now_ms() < dl)
		turn(&e);
	pgr_stats s = tu_stats(e.pool);
	cr_assert_eq(s.rollbacks, N / 10);
	cr_assert_eq(s.connects_ok, 2);
	cr_assert_eq(s.closes, 0);
	cr_assert_eq(pgr_loop_destroy(e.loop), 0);
	pgr_pool_destroy(e.pool); /* from the loop thread: it runs the manager while it drains */
	io_uring_queue_exit(&e.ring);
}
