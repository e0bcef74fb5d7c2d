/* SPDX-License-Identifier: PostgreSQL */
/*
 * Faults on a pgr_loop, against the real server on a real ring: no fault may cost a healthy
 * connection. Stalled backends (SIGSTOP on the backend pid), acquires that give up before their
 * ping, a caller that keeps its SQ ring full, drains and loop destroys in the middle of work.
 */
#include <errno.h>
#include <liburing.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

struct env {
	struct io_uring ring;
	pgr_pool *pool;
	pgr_loop *loop;
	struct tu_events ev;
	bool fill_sq; /* keep the SQ ring full between turns, as a busy caller would */
	uint64_t nops_done;
	uint64_t foreign;
};

static void env_init(struct env *e, unsigned ring_entries, pgr_config *cfg)
{
	memset(e, 0, sizeof(*e));
	cr_assert_eq(io_uring_queue_init(ring_entries, &e->ring, 0), 0);
	tu_events_init(&e->ev);
	cfg->on_event = tu_events_cb;
	cfg->user_data = &e->ev;
	e->pool = tu_pool(cfg);
	cr_assert_eq(pgr_loop_create(e->pool, &e->ring, 0, &e->loop), 0);
}

static void fill_sq(struct env *e)
{
	struct io_uring_sqe *s;
	while ((s = io_uring_get_sqe(&e->ring)) != NULL) {
		io_uring_prep_nop(s);
		io_uring_sqe_set_data64(s, 0x1234);
	}
}

/*
 * One turn of a caller's loop. With fill_sq the caller refills its SQ before it hands pgring
 * its CQEs, so every re-arm pgring makes there finds the ring full; it calls pgr_loop_flush
 * right after each submit, as the header asks.
 */
static void turn(struct env *e, int64_t wait_ms)
{
	struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = wait_ms * 1000000};
	struct io_uring_cqe *cqe;
	io_uring_submit_and_wait_timeout(&e->ring, &cqe, 1, &ts, NULL);
	pgr_loop_flush(e->loop);
	if (e->fill_sq)
		fill_sq(e);
	unsigned head, n = 0;
	io_uring_for_each_cqe (&e->ring, head, cqe) {
		if (!pgr_loop_handle_cqe(e->loop, cqe)) {
			if (io_uring_cqe_get_data64(cqe) == 0x1234)
				e->nops_done++;
			else
				e->foreign++;
		}
		n++;
	}
	io_uring_cq_advance(&e->ring, n);
}

static void env_fini(struct env *e)
{
	e->fill_sq = false;
	int64_t dl = tu_now_ms() + 5000;
	int rc;
	while ((rc = pgr_loop_destroy(e->loop)) == -EBUSY) {
		cr_assert_lt(tu_now_ms(), dl, "loop never drained");
		turn(e, 5);
	}
	cr_assert_eq(rc, 0);
	cr_assert_eq(pgr_pool_destroy(e->pool), 0);
	io_uring_queue_exit(&e->ring);
}

struct acq {
	int calls, err;
	pgr_conn *conn;
	int64_t at_ms;
};

static void on_acq(pgr_loop *l, int err, pgr_conn *c, void *arg)
{
	struct acq *a = arg;
	a->calls++;
	a->err = err;
	a->conn = c;
	a->at_ms = tu_now_ms();
}

static int backend_pid(pgr_conn *c)
{
	return PQbackendPID(pgr_conn_pg(c));
}

static uint64_t closes(pgr_pool *p)
{
	return tu_stats(p).closes;
}

/* Take every idle connection once (blocking API) to learn the backends' pids. */
static int pool_pids(pgr_pool *p, int *pids, int n)
{
	pgr_conn *c[8];
	for (int i = 0; i < n; i++) {
		cr_assert_eq(pgr_acquire(p, 2000, &c[i]), 0);
		pids[i] = backend_pid(c[i]);
	}
	for (int i = 0; i < n; i++)
		cr_assert_eq(pgr_release(c[i]), 0);
	return n;
}

static void base_cfg(pgr_config *cfg, uint32_t size)
{
	pgr_config_init(cfg);
	cfg->conninfo = tu_conninfo();
	cfg->max_size = size;
	cfg->min_idle = size;
	cfg->idle_timeout_ms = 0;
}

Test(loop_faults, zero_timeout_with_pings_due_returns_eagain_and_closes_nothing, .timeout = 30)
{
	struct env e;
	pgr_config cfg;
	base_cfg(&cfg, 3);
	cfg.ping_after_idle_ms = 0; /* every checkout needs a round trip */
	env_init(&e, 64, &cfg);
	int pids[3];
	pool_pids(e.pool, pids, 3); /* none is fresh now: each needs its pre-ping */
	struct acq a = {0};
	cr_assert_eq(pgr_loop_acquire(e.loop, 0, on_acq, &a), -EAGAIN,
	             "timeout 0 must mean: only what needs no round trip");
	cr_assert_eq(a.calls, 0, "a refused call must not call back");
	/* The manager pinged them and put them back: nothing was closed. */
	cr_assert(TU_WAIT_UNTIL(tu_stats(e.pool).idle == 3, 3000), "idle=%u",
	          tu_stats(e.pool).idle);
	cr_assert_eq(closes(e.pool), 0, "closes=%lu", (unsigned long)closes(e.pool));
	cr_assert_eq(tu_stats(e.pool).pings_failed, 0);
	cr_assert_geq(tu_stats(e.pool).pings, 3);
	/*
	 * Just pinged, they need no round trip now: timeout 0 gets one at once. "Just" is two
	 * manager ticks: a test thread that lost its CPU for longer (a loaded machine, the
	 * sanitizers) finds them due again, gets -EAGAIN and has them pinged once more, so it
	 * tries again after that, a bounded number of times.
	 */
	int rc = -EAGAIN;
	for (int i = 0; i < 20 && rc == -EAGAIN; i++) {
		rc = pgr_loop_acquire(e.loop, 0, on_acq, &a);
		if (rc == -EAGAIN)
			cr_assert(TU_WAIT_UNTIL(tu_stats(e.pool).idle == 3, 3000));
	}
	cr_assert_eq(rc, 0, "timeout 0 never found a just-pinged connection: %s", pgr_strerror(rc));
	cr_assert_eq(a.calls, 1);
	cr_assert_eq(a.err, 0);
	cr_assert_eq(pgr_release(a.conn), 0);
	a.calls = 0;
	pool_pids(e.pool, pids, 3);
	/* And a real deadline gets one, pinged on the loop. */
	cr_assert_eq(pgr_loop_acquire(e.loop, 2000, on_acq, &a), 0);
	while (!a.calls)
		turn(&e, 10);
	cr_assert_eq(a.err, 0);
	cr_assert_eq(pgr_release(a.conn), 0);
	env_fini(&e);
}

Test(loop_faults, a_stalled_backend_costs_only_its_own_connection, .timeout = 60)
{
	struct env e;
	pgr_config cfg;
	base_cfg(&cfg, 3);
	cfg.ping_after_idle_ms = 0;
	cfg.ping_timeout_ms = 300;
	env_init(&e, 64, &cfg);
	int pids[3];
	pool_pids(e.pool, pids, 3);
	cr_assert_eq(kill(pids[0], SIGSTOP), 0);
	/* Every acquire succeeds with a live connection; the stalled one fails its own ping. */
	for (int i = 0; i < 6; i++) {
		struct acq a = {0};
		cr_assert_eq(pgr_loop_acquire(e.loop, 5000, on_acq, &a), 0);
		int64_t dl = tu_now_ms() + 5000;
		while (!a.calls && tu_now_ms() < dl)
			turn(&e, 10);
		cr_assert_eq(a.calls, 1);
		cr_assert_eq(a.err, 0, "acquire %d: %s", i, pgr_strerror(a.err));
		cr_assert_neq(backend_pid(a.conn), pids[0], "the stalled backend was handed out");
		cr_assert_eq(pgr_release(a.conn), 0);
	}
	kill(pids[0], SIGCONT);
	pgr_stats st = tu_stats(e.pool);
	cr_assert_leq(st.closes_by_reason[PGR_CLOSE_PING_FAILED], 1);
	cr_assert_eq(st.closes, st.closes_by_reason[PGR_CLOSE_PING_FAILED],
	             "only the stalled connection may be closed");
	env_fini(&e);
}

Test(loop_faults, an_acquire_deadline_shorter_than_the_ping_never_costs_the_connection,
     .timeout = 30)
{
	struct env e;
	pgr_config cfg;
	base_cfg(&cfg, 1);
	cfg.ping_after_idle_ms = 0;
	cfg.ping_timeout_ms = 3000;
	env_init(&e, 64, &cfg);
	int pid;
	pool_pids(e.pool, &pid, 1);
	cr_assert_eq(kill(pid, SIGSTOP), 0);
	struct acq a = {0};
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pgr_loop_acquire(e.loop, 200, on_acq, &a), 0);
	while (!a.calls && tu_now_ms() - t0 < 3000)
		turn(&e, 5);
	kill(pid, SIGCONT);
	cr_assert_eq(a.calls, 1);
	cr_assert_eq(a.err, -ETIMEDOUT, "err=%s", pgr_strerror(a.err));
	/* The acquire's deadline, not the ping's: 200 ms + a 10 ms loop turn + scheduling. */
	cr_assert_geq(a.at_ms - t0, 195);
	cr_assert_lt(a.at_ms - t0, 200 + 150, "answered after %ld ms", (long)(a.at_ms - t0));
	/* The ping finishes in the background once the backend runs again: connection kept. */
	cr_assert(TU_WAIT_UNTIL((turn(&e, 5), tu_stats(e.pool).idle == 1), 3000), "idle=%u",
	          tu_stats(e.pool).idle);
	cr_assert_eq(closes(e.pool), 0);
	struct acq b = {0};
	cr_assert_eq(pgr_loop_acquire(e.loop, 2000, on_acq, &b), 0);
	while (!b.calls)
		turn(&e, 5);
	cr_assert_eq(b.err, 0);
	cr_assert_eq(backend_pid(b.conn), pid, "same backend, still healthy");
	cr_assert_eq(pgr_release(b.conn), 0);
	env_fini(&e);
}

struct q {
	int calls, err, value;
};

static void on_q(pgr_loop *l, int err, PGresult *res, void *arg)
{
	struct q *q = arg;
	q->calls++;
	q->err = err;
	if (res && PQresultStatus(res) == PGRES_TUPLES_OK)
		q->value = atoi(PQgetvalue(res, 0, 0));
	PQclear(res);
}

Test(loop_faults, a_full_sq_ring_is_back_pressure_never_a_failure, .timeout = 30)
{
	struct env e;
	pgr_config cfg;
	base_cfg(&cfg, 1);
	env_init(&e, 8, &cfg);
	struct acq a = {0}, b = {0};
	cr_assert_eq(pgr_loop_acquire(e.loop, 2000, on_acq, &a), 0);
	while (!a.calls)
		turn(&e, 5);
	cr_assert_eq(a.err, 0);
	e.fill_sq = true;
	fill_sq(&e);
	/* SQ full: the query is sent, its poll queued; the second acquire waits, its futex wait
	 * queued. Neither call may fail. */
	struct q q = {0};
	cr_assert_eq(pgr_loop_query(e.loop, a.conn, "select 40 + 2 from pg_sleep(0.05)", 0, NULL,
	                            5000, on_q, &q),
	             0);
	cr_assert_eq(pgr_loop_acquire(e.loop, 5000, on_acq, &b), 0);
	cr_assert_gt(pgr_loop_flush(e.loop), 0, "nothing was queued: the test did not fill the SQ");
	int64_t dl = tu_now_ms() + 5000;
	while (!q.calls && tu_now_ms() < dl)
		turn(&e, 5);
	cr_assert_eq(q.calls, 1);
	cr_assert_eq(q.err, 0, "query: %s", pgr_strerror(q.err));
	cr_assert_eq(q.value, 42);
	cr_assert_eq(b.calls, 0);
	cr_assert_eq(pgr_release(a.conn), 0);
	while (!b.calls && tu_now_ms() < dl)
		turn(&e, 5);
	cr_assert_eq(b.calls, 1);
	cr_assert_eq(b.err, 0, "waiter: %s", pgr_strerror(b.err));
	/* A rollback on return, with the SQ still kept full. */
	struct q q2 = {0};
	cr_assert_eq(pgr_loop_query(e.loop, b.conn, "begin", 0, NULL, 5000, on_q, &q2), 0);
	while (!q2.calls && tu_now_ms() < dl)
		turn(&e, 5);
	cr_assert_eq(q2.err, 0);
	cr_assert_eq(pgr_loop_release(e.loop, b.conn), 0);
	cr_assert(TU_WAIT_UNTIL((turn(&e, 5), tu_stats(e.pool).idle == 1), 3000));
	cr_assert_eq(closes(e.pool), 0, "a full SQ closed a healthy connection");
	cr_assert_eq(tu_stats(e.pool).rollbacks, 1);
	cr_assert_gt(e.nops_done, 0);
	cr_assert_eq(e.foreign, 0);
	env_fini(&e);
}

Test(loop_faults, drain_with_a_loop_ping_in_flight_ends_at_its_deadline, .timeout = 30)
{
	struct env e;
	pgr_config cfg;
	base_cfg(&cfg, 1);
	cfg.ping_after_idle_ms = 0;
	cfg.ping_timeout_ms = 5000;
	env_init(&e, 64, &cfg);
	int pid;
	pool_pids(e.pool, &pid, 1);
	cr_assert_eq(kill(pid, SIGSTOP), 0);
	struct acq a = {0};
	cr_assert_eq(pgr_loop_acquire(e.loop, 4000, on_acq, &a), 0);
	turn(&e, 5); /* the ping is on the wire, its connection the loop's */
	int64_t t0 = tu_now_ms();
	int rc = pgr_pool_drain(e.pool, 300);
	int64_t took = tu_now_ms() - t0;
	cr_assert_eq(rc, -ETIMEDOUT, "the loop still holds it: %s", pgr_strerror(rc));
	/* 300 ms, plus the manager's closing of what it holds (one cancel round trip each). */
	cr_assert_lt(took, 300 + 200, "drain took %ld ms", (long)took);
	cr_assert_eq(pgr_pool_destroy(e.pool), -EBUSY, "destroy must refuse while a loop is bound");
	cr_assert_gt(tu_events_count(&e.ev, PGR_EV_MISUSE), 0);
	kill(pid, SIGCONT);
	e.fill_sq = false;
	int64_t dl = tu_now_ms() + 5000;
	while ((rc = pgr_loop_destroy(e.loop)) == -EBUSY && tu_now_ms() < dl)
		turn(&e, 5);
	cr_assert_eq(rc, 0);
	cr_assert_eq(a.calls, 1);
	cr_assert(a.err == -ECANCELED || a.err == -ESHUTDOWN || a.err == 0, "err=%s",
	          pgr_strerror(a.err));
	if (a.err == 0)
		pgr_release(a.conn);
	cr_assert_eq(pgr_pool_destroy(e.pool), 0);
	io_uring_queue_exit(&e.ring);
}

Test(loop_faults, destroy_that_finds_the_sq_full_stays_destroying, .timeout = 30)
{
	struct env e;
	pgr_config cfg;
	base_cfg(&cfg, 1);
	env_init(&e, 8, &cfg);
	pgr_conn *held;
	cr_assert_eq(pgr_acquire(e.pool, 2000, &held), 0);
	struct acq w[3] = {{0}};
	for (int i = 0; i < 3; i++)
		cr_assert_eq(pgr_loop_acquire(e.loop, 10000, on_acq, &w[i]), 0);
	turn(&e, 5); /* three futex waits armed */
	fill_sq(&e);
	cr_assert_eq(pgr_loop_destroy(e.loop), -EBUSY);
	/* Still destroying: no new work is accepted, however many times destroy was refused. */
	struct acq late = {0};
	cr_assert_eq(pgr_loop_acquire(e.loop, 1000, on_acq, &late), -ESHUTDOWN);
	int64_t dl = tu_now_ms() + 5000;
	int rc;
	while ((rc = pgr_loop_destroy(e.loop)) == -EBUSY && tu_now_ms() < dl)
		turn(&e, 5);
	cr_assert_eq(rc, 0);
	for (int i = 0; i < 3; i++) {
		cr_assert_eq(w[i].calls, 1);
		cr_assert_eq(w[i].err, -ECANCELED, "waiter %d: %s (a cancel is not a timeout)", i,
		             pgr_strerror(w[i].err));
	}
	cr_assert_eq(late.calls, 0);
	cr_assert_eq(tu_stats(e.pool).timeouts, 0);
	cr_assert_eq(pgr_release(held), 0);
	cr_assert_eq(pgr_pool_destroy(e.pool), 0);
	io_uring_queue_exit(&e.ring);
}

Test(loop_faults, a_huge_timeout_means_forever_not_now, .timeout = 30)
{
	struct env e;
	pgr_config cfg;
	base_cfg(&cfg, 1);
	env_init(&e, 64, &cfg);
	pgr_conn *held;
	cr_assert_eq(pgr_acquire(e.pool, 2000, &held), 0);
	struct acq a = {0};
	cr_assert_eq(pgr_loop_acquire(e.loop, INT64_MAX, on_acq, &a), 0);
	int64_t t0 = tu_now_ms();
	while (tu_now_ms() - t0 < 150)
		turn(&e, 5);
	cr_assert_eq(a.calls, 0, "INT64_MAX timed out: %s", pgr_strerror(a.err));
	cr_assert_eq(pgr_release(held), 0);
	while (!a.calls && tu_now_ms() - t0 < 3000)
		turn(&e, 5);
	cr_assert_eq(a.err, 0);
	struct q q = {0};
	cr_assert_eq(pgr_loop_query(e.loop, a.conn, "select 7", 0, NULL, INT64_MAX, on_q, &q), 0);
	while (!q.calls && tu_now_ms() - t0 < 3000)
		turn(&e, 5);
	cr_assert_eq(q.err, 0);
	cr_assert_eq(q.value, 7);
	cr_assert_eq(pgr_loop_release(e.loop, a.conn), 0);
	env_fini(&e);
}

Test(loop_faults, misuse_on_a_loop_is_refused_and_reported, .timeout = 30)
{
	struct env e;
	pgr_config cfg;
	base_cfg(&cfg, 1);
	env_init(&e, 64, &cfg);
	pgr_config cfg2;
	base_cfg(&cfg2, 1);
	pgr_pool *other = tu_pool(&cfg2);
	pgr_conn *foreign;
	cr_assert_eq(pgr_acquire(other, 2000, &foreign), 0);
	struct q q = {0};
	cr_assert_eq(pgr_loop_query(e.loop, foreign, "select 1", 0, NULL, 1000, on_q, &q), -EINVAL);
	cr_assert_eq(pgr_loop_release(e.loop, foreign), -EINVAL);
	cr_assert_eq(pgr_release(foreign), 0, "the refused calls must leave it checked out");

	struct acq a = {0};
	cr_assert_eq(pgr_loop_acquire(e.loop, 2000, on_acq, &a), 0);
	while (!a.calls)
		turn(&e, 5);
	cr_assert_eq(
	    pgr_loop_query(e.loop, a.conn, "select 5 from pg_sleep(0.05)", 0, NULL, 5000, on_q, &q),
	    0);
	/* A second statement, a release and a discard while the query is in flight. */
	struct q q2 = {0};
	cr_assert_eq(pgr_loop_query(e.loop, a.conn, "select 1", 0, NULL, 1000, on_q, &q2), -EBUSY);
	cr_assert_eq(pgr_release(a.conn), -EBUSY);
	cr_assert_eq(pgr_discard(a.conn), -EBUSY);
	cr_assert_eq(pgr_loop_release(e.loop, a.conn), -EBUSY);
	while (!q.calls)
		turn(&e, 5);
	cr_assert_eq(q.err, 0);
	cr_assert_eq(q.value, 5, "the query was disturbed by the refused calls");
	cr_assert_eq(q2.calls, 0);
	cr_assert_eq(pgr_loop_release(e.loop, a.conn), 0);
	cr_assert_eq(pgr_loop_release(e.loop, a.conn), -PGR_E_NOT_OWNED);
	cr_assert_eq(pgr_loop_query(e.loop, a.conn, "select 1", 0, NULL, 1000, on_q, &q2),
	             -PGR_E_NOT_OWNED);
	cr_assert_geq(tu_events_count(&e.ev, PGR_EV_MISUSE), 6);
	cr_assert_eq(closes(e.pool), 0);
	cr_assert_eq(pgr_loop_query(NULL, a.conn, "x", 0, NULL, 0, on_q, &q2), -EINVAL);
	cr_assert_eq(pgr_loop_acquire(NULL, 0, on_acq, &a), -EINVAL);
	cr_assert_eq(pgr_loop_acquire(e.loop, 0, NULL, &a), -EINVAL);
	cr_assert_eq(pgr_loop_release(e.loop, NULL), -EINVAL);
	cr_assert_eq(pgr_loop_handle_cqe(NULL, NULL), 0);
	pgr_pool_destroy(other);
	env_fini(&e);
}

/* A query's callback that gives the connection back and destroys the loop, as a program whose
 * last statement ends its loop does. */
struct last {
	int calls, err, destroy_rc;
	pgr_conn *conn;
};

static void on_last(pgr_loop *l, int err, PGresult *res, void *arg)
{
	struct last *x = arg;
	PQclear(res);
	x->calls++;
	x->err = err;
	cr_assert_eq(pgr_loop_release(l, x->conn), 0);
	x->destroy_rc = pgr_loop_destroy(l);
}

Test(loop_faults, destroy_from_a_callback_frees_the_loop_after_the_call_under_it, .timeout = 30)
{
	struct env e;
	pgr_config cfg;
	base_cfg(&cfg, 1);
	env_init(&e, 64, &cfg);
	struct acq a = {0};
	cr_assert_eq(pgr_loop_acquire(e.loop, 2000, on_acq, &a), 0);
	int64_t dl = tu_now_ms() + 5000;
	while (!a.calls && tu_now_ms() < dl)
		turn(&e, 5);
	cr_assert_eq(a.err, 0);
	/* Its deadline passes: the callback runs from pgr_loop_handle_cqe with nothing else owed,
	 * so its pgr_loop_destroy succeeds there, under the handle_cqe that must not touch the loop
	 * after. */
	struct last x = {.conn = a.conn, .destroy_rc = 1};
	cr_assert_eq(pgr_loop_query(e.loop, a.conn, "select pg_sleep(5)", 0, NULL, 50, on_last, &x),
	             0);
	bool freed = false;
	while (!freed && tu_now_ms() < dl) {
		struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = 5000000};
		struct io_uring_cqe *cqe;
		io_uring_submit_and_wait_timeout(&e.ring, &cqe, 1, &ts, NULL);
		while (!freed && io_uring_peek_cqe(&e.ring, &cqe) == 0) {
			cr_assert(pgr_loop_handle_cqe(e.loop, cqe));
			io_uring_cqe_seen(&e.ring, cqe);
			freed = x.destroy_rc == 0;
			if (x.calls && !freed)
				freed = (x.destroy_rc = pgr_loop_destroy(e.loop)) == 0;
		}
	}
	cr_assert(freed, "the loop was never freed");
	cr_assert_eq(x.calls, 1);
	cr_assert_eq(x.err, -ETIMEDOUT);
	/* The loop is gone: the pool has no loop bound, and loses no connection slot for it. */
	cr_assert_eq(pgr_pool_destroy(e.pool), 0);
	io_uring_queue_exit(&e.ring);
}

Test(loop_faults, destroy_outwaits_the_exec_engines_own_acquire, .timeout = 30)
{
	struct env e;
	pgr_config cfg;
	base_cfg(&cfg, 1);
	env_init(&e, 64, &cfg);
	pgr_conn *held;
	cr_assert_eq(pgr_acquire(e.pool, 2000, &held), 0);
	/* The engine waits for a connection: an acquire of the loop's whose callback is the
	 * engine's. */
	struct q q = {0};
	cr_assert_eq(pgr_loop_exec(e.loop, "select 1", 0, NULL, 5000, on_q, &q), 0);
	for (int i = 0; i < 5; i++)
		turn(&e, 5);
	/* Destroy, reaping one CQE between calls: the engine may not be freed before the
	 * cancelled acquire has answered it. */
	int64_t dl = tu_now_ms() + 5000;
	int rc;
	while ((rc = pgr_loop_destroy(e.loop)) == -EBUSY && tu_now_ms() < dl) {
		struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = 5000000};
		struct io_uring_cqe *cqe;
		io_uring_submit_and_wait_timeout(&e.ring, &cqe, 1, &ts, NULL);
		if (io_uring_peek_cqe(&e.ring, &cqe) == 0) {
			cr_assert(pgr_loop_handle_cqe(e.loop, cqe));
			io_uring_cqe_seen(&e.ring, cqe);
		}
	}
	cr_assert_eq(rc, 0);
	cr_assert_eq(q.calls, 1);
	cr_assert_eq(q.err, -ECANCELED);
	cr_assert_eq(pgr_release(held), 0);
	cr_assert_eq(pgr_pool_destroy(e.pool), 0);
	io_uring_queue_exit(&e.ring);
}
