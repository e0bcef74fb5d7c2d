/* SPDX-License-Identifier: PostgreSQL */
/*
 * Deadlines of the manager's own statements, against the real server: a backend stopped with
 * SIGSTOP (the tests run as the cluster's owner or root) accepts bytes and never answers, so
 * a pre-ping past ping_timeout_ms must close its connection as ping_failed, and a ROLLBACK or
 * reset_sql past reset_timeout_ms as reset_failed, each while the caller gets a healthy
 * connection within its own deadline.
 *
 * A stopped backend must never outlive the test, or the cluster's shutdown would wait for it:
 * stall() forks a watchdog that sends SIGCONT after a fixed time whatever happens to the test
 * process, and every test also sends it itself as soon as it is done.
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pool.h" /* the manager's request stack and stop flag, to set up the interleaving */
#include "test_lifecycle.h"

/*
 * Slack above a deadline: the linked io_uring timeout fires on time in the kernel; what comes
 * late is the manager thread's trip back onto a CPU, once to start the statement after the
 * caller's request and once to handle the timeout's completion, a few 4 ms scheduler quanta
 * each on a busy 2-CPU machine. 40 ms leaves room for ten.
 */
#define LATE_MS 40

enum {
	STALL_GUARD_MS = 20000 /* longer than any test here runs with a stalled backend */
};

static pid_t stall_guard;

/* SIGSTOP pid, with a watchdog process that sends SIGCONT after STALL_GUARD_MS regardless. */
static void stall(int pid)
{
	pid_t g = fork();
	cr_assert(g >= 0, "fork: %s", strerror(errno));
	if (g == 0) {
		/* Only async-signal-safe calls in the child of a threaded process. */
		struct timespec ts = {.tv_sec = STALL_GUARD_MS / 1000,
		                      .tv_nsec = (STALL_GUARD_MS % 1000) * 1000000L};
		while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
			;
		kill(pid, SIGCONT);
		_exit(0);
	}
	stall_guard = g;
	cr_assert_eq(kill(pid, SIGSTOP), 0, "SIGSTOP %d: %s", pid, strerror(errno));
}

static void unstall(int pid)
{
	kill(pid, SIGCONT);
	if (stall_guard > 0) {
		kill(stall_guard, SIGKILL);
		waitpid(stall_guard, NULL, 0);
		stall_guard = 0;
	}
}

/* One connection, pid learnt through a checkout; it is idle again when this returns. */
static pgr_pool *one_conn(const char *app, struct lc_events *ev, int64_t ping_after_ms,
                          const char *reset_sql, int *pid)
{
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, ev, &ci);
	cfg.min_idle = cfg.max_size = 1;
	cfg.ping_after_idle_ms = ping_after_ms;
	cfg.ping_timeout_ms = 300;
	cfg.reset_timeout_ms = 300;
	cfg.reset_sql = reset_sql;
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	*pid = PQbackendPID(pgr_conn_pg(c));
	cr_assert_eq(pgr_release(c), 0);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).idle == 1, 5000));
	return p;
}

/* The slot's close: reason and time, within [from + deadline, from + deadline + LATE_MS]. */
static void expect_closed_at(struct lc_events *ev, const char *reason, int64_t from,
                             int64_t deadline_ms)
{
	struct lc_ev e;
	cr_assert(TU_WAIT_UNTIL(
	              lc_events_first(ev, PGR_EV_CONN_CLOSED, NULL, UINT32_MAX, 0, &e, NULL), 5000),
	          "the stalled connection was never closed");
	cr_assert_str_eq(e.reason, reason);
	/* The statement starts after `from`, so its deadline cannot pass before this. */
	cr_assert_geq(e.t_ms - from, deadline_ms, "closed %lld ms after the request",
	              (long long)(e.t_ms - from));
	cr_assert_lt(e.t_ms - from, deadline_ms + LATE_MS, "closed %lld ms after the request",
	             (long long)(e.t_ms - from));
}

/* The backend the pool gave up on goes away once it runs again and reads the EOF. */
static void expect_backend_gone(int pid)
{
	PGconn *admin = tu_admin();
	cr_assert(TU_WAIT_UNTIL(!lc_pid_alive(admin, pid), 5000),
	          "the abandoned backend %d is still there: the pool kept its socket", pid);
	PQfinish(admin);
}

Test(lifecycle, pre_ping_past_ping_timeout_closes_the_connection_as_ping_failed, .timeout = 60)
{
	struct lc_events *ev = lc_events_new();
	int pid;
	pgr_pool *p = one_conn("lc_stall_ping", ev, 0 /* ping at every checkout */, NULL, &pid);

	stall(pid);
	int64_t t0 = tu_now_ms();
	pgr_conn *c;
	int rc = pgr_acquire(p, 5000, &c);
	int64_t took = tu_now_ms() - t0;
	int got = rc == 0 ? PQbackendPID(pgr_conn_pg(c)) : 0;
	unstall(pid);
	cr_assert_eq(rc, 0, "acquire: %s", pgr_strerror(rc));
	/* The caller waited for the ping's deadline and a new connection, not for the stall. */
	cr_assert_neq(got, pid, "the stalled backend was handed out");
	cr_assert(lc_ok(pgr_conn_pg(c), "select 1"));
	cr_assert_geq(took, 300, "served after %lld ms: the ping cannot have timed out",
	              (long long)took);
	expect_closed_at(ev, "ping_failed", t0, 300);
	pgr_release(c);

	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.pings_failed, 1);
	cr_assert_eq(s.closes, 1);
	cr_assert_eq(s.closes_by_reason[PGR_CLOSE_PING_FAILED], 1);
	expect_backend_gone(pid);
	pgr_pool_destroy(p);
	lc_events_free(ev);
}

/* Hold the connection (in a transaction when in_tx), stall its backend, return it. */
static void return_to_a_stalled_backend(const char *app, const char *reset_sql, bool in_tx)
{
	struct lc_events *ev = lc_events_new();
	int pid;
	pgr_pool *p = one_conn(app, ev, -1 /* no pre-ping */, reset_sql, &pid);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	cr_assert_eq(PQbackendPID(pgr_conn_pg(c)), pid);
	if (in_tx)
		tu_exec(pgr_conn_pg(c), "begin");
	uint64_t rollbacks0 = tu_stats(p).rollbacks, resets0 = tu_stats(p).resets;

	stall(pid);
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pgr_release(c), 0);
	/* The next caller gets a new connection once the old one is given up. */
	int rc = pgr_acquire(p, 5000, &c);
	int64_t took = tu_now_ms() - t0;
	int got = rc == 0 ? PQbackendPID(pgr_conn_pg(c)) : 0;
	unstall(pid);
	cr_assert_eq(rc, 0, "acquire: %s", pgr_strerror(rc));
	cr_assert_neq(got, pid, "the stalled backend was handed out");
	cr_assert_eq(PQtransactionStatus(pgr_conn_pg(c)), PQTRANS_IDLE);
	cr_assert(lc_ok(pgr_conn_pg(c), "select 1"));
	cr_assert_geq(took, 300, "served after %lld ms", (long long)took);
	expect_closed_at(ev, "reset_failed", t0, 300);
	pgr_release(c);

	cr_assert(TU_WAIT_UNTIL(tu_stats(p).idle == 1, 5000));
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.resets_failed, 1);
	cr_assert_eq(s.rollbacks, rollbacks0, "a ROLLBACK that never ran counted as done");
	/* The new connection's own return ran reset_sql once, when there is one. */
	cr_assert_eq(s.resets, resets0 + (reset_sql ? 1 : 0));
	cr_assert_eq(s.closes, 1);
	cr_assert_eq(s.closes_by_reason[PGR_CLOSE_RESET_FAILED], 1);
	expect_backend_gone(pid);
	pgr_pool_destroy(p);
	lc_events_free(ev);
}

Test(lifecycle, rollback_past_reset_timeout_closes_the_connection_as_reset_failed, .timeout = 60)
{
	return_to_a_stalled_backend("lc_stall_rollback", NULL, true);
}

Test(lifecycle, reset_sql_past_reset_timeout_closes_the_connection_as_reset_failed, .timeout = 60)
{
	return_to_a_stalled_backend("lc_stall_reset", "DISCARD ALL", false);
}

/*
 * A caller's push to the manager (a pre-ping, a check, a release) that lands in a stopping
 * round after the round took the requests and before it closed what it holds: the slot is
 * MANAGED but still on the request stack. That round must leave it to the next one's
 * take_requests; closed there, it left a request for a FREE slot behind, and the next round
 * aborted the process (illegal move FREE -> MANAGED) carrying it out. Seen with threads
 * granted connections while pgr_pool_destroy ran (ping_after_idle_ms 0); set up here by hand:
 * the manager runs only in pgr_pool_run, the push's poke is withheld until the stopping round
 * has passed, and a ROLLBACK stalled on a stopped backend keeps the stop from ending in it.
 */
Test(lifecycle, a_request_pushed_during_the_managers_stop_is_carried_out_not_closed_under_it,
     .timeout = 60)
{
	const char *app = "lc_stop_push";
	struct lc_events *ev = lc_events_new();
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, ev, &ci);
	cfg.min_idle = cfg.max_size = 2;
	cfg.ping_after_idle_ms = -1;
	cfg.manager_thread = false;
	pgr_pool *p;
	cr_assert_eq(pgr_pool_create(&cfg, &p), 0);
	free(ci);
	int64_t end = tu_now_ms() + 5000;
	while (tu_stats(p).idle < 2 && tu_now_ms() < end) {
		pgr_pool_run(p);
		tu_sleep_ms(1);
	}
	cr_assert_eq(tu_stats(p).idle, 2, "the pool never connected");
	pgr_conn *a, *b;
	cr_assert_eq(pgr_try_acquire(p, &a), 0);
	cr_assert_eq(pgr_try_acquire(p, &b), 0);
	/* b: returned inside a transaction to a stopped backend; its ROLLBACK stays in flight. */
	tu_exec(pgr_conn_pg(b), "begin");
	int pid = PQbackendPID(pgr_conn_pg(b));
	stall(pid);
	cr_assert_eq(pgr_release(b), 0);
	pgr_pool_run(p);
	/* a: handed to the manager for a ping, as a checkout's pre-ping does; poke not seen. */
	pgr__manager_push(p, pgr__slot(a), PGR__REQ_PING, 0);
	atomic_store(&p->mgr_poke, 0);
	/* The stopping round, which has not taken a's request. */
	atomic_store(&p->mgr_stop, 1);
	pgr_pool_run(p);
	/* The poke arrives: the next round takes the request (and aborted here before). */
	atomic_store(&p->mgr_poke, 1);
	pgr_pool_run(p);
	unstall(pid);
	end = tu_now_ms() + 5000;
	while (!atomic_load(&p->mgr_detached) && tu_now_ms() < end) {
		pgr_pool_run(p);
		tu_sleep_ms(1);
	}
	cr_assert(atomic_load(&p->mgr_detached), "the manager never finished its stop");
	pgr_stats st = tu_stats(p);
	cr_assert_eq(st.size, 0, "size=%u after the stop", st.size);
	cr_assert_eq(st.closes_by_reason[PGR_CLOSE_POOL_CLOSING], 2);
	cr_assert_eq(lc_events_count(ev, PGR_EV_CONN_CLOSED, "pool_closing", UINT32_MAX), 2);
	cr_assert_eq(pgr_pool_destroy(p), 0);
	lc_events_free(ev);
}
