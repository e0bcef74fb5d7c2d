/* SPDX-License-Identifier: PostgreSQL */
/* pgr_loop_exec against the real server: pipelining, deadlines, faults, back-pressure, the
 * prepared-statement cache, drain and destroy. */
#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "loop_env.h"

static void env_init(struct env *e, const char *app, cfg_fn tweak)
{
	env_open(e, tu_conninfo(), app, 256, 4, tweak);
}

static void exec1(struct env *e, const char *sql, const char *p1, int64_t tmo, struct res *r)
{
	const char *pv[1] = {p1};
	int rc = pgr_loop_exec(e->loop, sql, p1 ? 1 : 0, p1 ? pv : NULL, tmo, on_res, r);
	cr_assert_eq(rc, 0, "pgr_loop_exec(%s): %s", sql, pgr_strerror(rc));
}

/* ---- ordering and independence ---- */

static void one_conn(pgr_config *cfg)
{
	cfg->exec_max_conns = 1;
	cfg->exec_pipeline_depth = 64;
}

Test(loop_exec, results_come_back_in_the_order_sent_on_one_connection, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_order", one_conn);
	enum {
		N = 100
	};
	static struct res r[N];
	memset(r, 0, sizeof(r));
	char p[N][12];
	for (int i = 0; i < N; i++) {
		snprintf(p[i], sizeof(p[i]), "%d", i);
		exec1(&e, "select $1::int", p[i], 10000, &r[i]);
	}
	wait_all(&e, r, N, 10000);
	for (int i = 0; i < N; i++) {
		cr_assert_eq(r[i].err, 0);
		cr_assert_eq(atoi(r[i].val), i);
		cr_assert_eq(r[i].order, i, "statement %d answered at position %d", i, r[i].order);
	}
	env_fini(&e);
}

/* Statements sent together are corked until their batch ends: none may wait for the kernel's
 * own flush of a corked socket (200 ms), in batches issued from outside the engine's callbacks
 * or from inside them. */
struct chain {
	int issued, done, bad;
};

static void on_chain(pgr_loop *l, int err, PGresult *r, void *arg)
{
	struct chain *c = arg;
	c->done++;
	if (err || PQresultStatus(r) != PGRES_TUPLES_OK)
		c->bad++;
	PQclear(r);
	if (c->issued < 400) {
		c->issued++;
		cr_assert_eq(pgr_loop_exec(l, "select 1", 0, NULL, 10000, on_chain, c), 0);
	}
}

Test(loop_exec, statements_sent_together_are_never_held_back_in_the_socket, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_cork", one_conn);
	struct chain c = {.issued = 400}; /* the rounds: callbacks send nothing more */
	int64_t t0 = tu_now_ms();
	for (int round = 0; round < 10; round++) {
		int goal = c.done + 8;
		for (int i = 0; i < 8; i++)
			cr_assert_eq(
			    pgr_loop_exec(e.loop, "select 1", 0, NULL, 10000, on_chain, &c), 0);
		while (c.done < goal)
			turn(&e);
	}
	/* Then a chain: every answer's callback sends the next, eight in flight. */
	c.issued = 8;
	c.done = 0;
	for (int i = 0; i < 8; i++)
		cr_assert_eq(pgr_loop_exec(e.loop, "select 1", 0, NULL, 10000, on_chain, &c), 0);
	while (c.done < 400)
		turn(&e);
	int64_t ms = tu_now_ms() - t0;
	cr_assert_eq(c.bad, 0);
	/* 480 statements; a batch held for 200 ms each time would take many seconds. */
	cr_assert_lt(ms, 3000, "480 short statements took %lld ms", (long long)ms);
	env_fini(&e);
}

Test(loop_exec, an_error_fails_only_its_own_statement_in_the_pipeline, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_indep", one_conn);
	struct res r[3] = {0};
	exec1(&e, "select $1::int", "1", 10000, &r[0]);
	exec1(&e, "select 1 / $1::int", "0", 10000, &r[1]);
	exec1(&e, "select $1::int", "3", 10000, &r[2]);
	wait_all(&e, r, 3, 10000);
	cr_assert_eq(r[0].err, 0);
	cr_assert_str_eq(r[0].val, "1");
	cr_assert_eq(r[1].err, 0, "an SQL error is a result, not a transport error");
	cr_assert_eq(r[1].st, PGRES_FATAL_ERROR);
	cr_assert_str_eq(r[1].sqlstate, "22012");
	cr_assert_eq(r[2].err, 0);
	cr_assert_eq(r[2].st, PGRES_TUPLES_OK, "the statement after an error was aborted");
	cr_assert_str_eq(r[2].val, "3");
	env_fini(&e);
}

Test(loop_exec, transaction_control_and_session_state_are_refused, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_refuse", NULL);
	struct res r = {0};
	const char *bad[] = {
	    "BEGIN",      "  /* x */ start transaction", "-- c\ncommit", "set search_path = x",
	    "listen foo", "copy t from stdin",           "DISCARD ALL"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		cr_assert_eq(pgr_loop_exec(e.loop, bad[i], 0, NULL, 1000, on_res, &r), -EINVAL,
		             "%s", bad[i]);
	cr_assert_eq(r.done, 0);
	cr_assert(lc_events_find_msg(e.ev, PGR_EV_MISUSE, "refuses BEGIN"));
	/* A word that merely starts like one is not refused. */
	exec1(&e, "select 'begin' as settings", NULL, 5000, &r);
	wait_all(&e, &r, 1, 5000);
	cr_assert_eq(r.err, 0);
	cr_assert_str_eq(r.val, "begin");
	env_fini(&e);
}

/* ---- deadlines ---- */

static void two_conns(pgr_config *cfg)
{
	cfg->exec_max_conns = 2;
	cfg->exec_pipeline_depth = 4;
}

Test(loop_exec, deadline_fails_the_slow_statement_and_those_behind_keep_their_own, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_dl", two_conns);
	struct res r[4] = {0};
	int64_t t0 = tu_now_ms();
	exec1(&e, "select pg_sleep($1::float8)", "1.5", 200, &r[0]); /* times out */
	exec1(&e, "select $1::int", "2", 10000, &r[1]);              /* behind it, same conn */
	exec1(&e, "select $1::int", "3", 500,
	      &r[2]); /* behind it, deadline before the sleep ends */
	wait_all(&e, r, 1, 5000);
	/* Slack: the engine's timer fires at the deadline; a loop turn is at most 5 ms. */
	cr_assert_eq(r[0].err, -ETIMEDOUT);
	cr_assert_geq(r[0].t_ms - t0, 200);
	cr_assert_lt(r[0].t_ms - t0, 450);
	/* Nothing new goes behind the timed-out statement: this one takes another connection. */
	exec1(&e, "select $1::int", "4", 10000, &r[3]);
	wait_all(&e, &r[3], 1, 5000);
	cr_assert_eq(r[3].err, 0);
	cr_assert_lt(r[3].t_ms - t0, 1200, "waited behind the slow statement");
	wait_all(&e, r, 4, 5000);
	cr_assert_eq(r[2].err, -ETIMEDOUT);
	cr_assert_geq(r[2].t_ms - t0, 500);
	cr_assert_lt(r[2].t_ms - t0, 1200);
	/* Its own deadline was later than the sleep: it ran, after the sleep. */
	cr_assert_eq(r[1].err, 0);
	cr_assert_str_eq(r[1].val, "2");
	cr_assert_geq(r[1].t_ms - t0, 1400);
	env_fini(&e);
}

static void one_slot(pgr_config *cfg)
{
	cfg->max_size = 1;
	cfg->exec_max_conns = 1;
}

Test(loop_exec, statement_waiting_for_a_connection_times_out_at_its_deadline, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_wait", one_slot);
	pgr_conn *held;
	cr_assert_eq(pgr_acquire(e.pool, 5000, &held), 0);
	struct res r = {0};
	int64_t t0 = tu_now_ms();
	exec1(&e, "select 1", NULL, 300, &r);
	wait_all(&e, &r, 1, 5000);
	cr_assert_eq(r.err, -ETIMEDOUT, "err %s", pgr_strerror(r.err));
	cr_assert_geq(r.t_ms - t0, 290); /* the acquire's deadline is rounded up to a ms */
	cr_assert_lt(r.t_ms - t0, 800);
	cr_assert_eq(pgr_release(held), 0);
	struct res r2 = {0};
	exec1(&e, "select 2", NULL, 5000, &r2);
	wait_all(&e, &r2, 1, 5000);
	cr_assert_eq(r2.err, 0);
	env_fini(&e);
}

/* ---- faults ---- */

static void depth2_one_conn(pgr_config *cfg)
{
	cfg->exec_max_conns = 1;
	cfg->exec_pipeline_depth = 2;
}

Test(loop_exec, killed_backend_fails_exactly_the_statements_in_flight_on_it, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_kill", depth2_one_conn);
	PGconn *admin = tu_admin();
	struct res r[4] = {0};
	exec1(&e, "select pg_sleep($1::float8)", "5", 10000, &r[0]);
	exec1(&e, "select $1::int", "2", 10000, &r[1]);
	/* Depth 2 on one connection: these two wait in the loop, not sent. */
	exec1(&e, "select $1::int", "3", 10000, &r[2]);
	exec1(&e, "select $1::int", "4", 10000, &r[3]);
	int pids[LC_MAX_PIDS];
	int64_t dl = tu_now_ms() + 5000;
	while (lc_app_pids(admin, e.app, pids, LC_MAX_PIDS) < 1) {
		cr_assert_lt(tu_now_ms(), dl);
		turn(&e);
	}
	for (int i = 0; i < 20; i++)
		turn(&e); /* the sleep is running */
	cr_assert_eq(lc_app_pids(admin, e.app, pids, LC_MAX_PIDS), 1);
	lc_terminate(admin, pids[0]);
	wait_all(&e, r, 4, 8000);
	cr_assert_eq(r[0].err, -EIO);
	cr_assert_eq(r[1].err, -EIO);
	cr_assert_eq(r[2].err, 0, "a statement not sent was failed: %s", pgr_strerror(r[2].err));
	cr_assert_str_eq(r[2].val, "3");
	cr_assert_eq(r[3].err, 0);
	cr_assert_str_eq(r[3].val, "4");
	PQfinish(admin);
	env_fini(&e);
}

/* ---- back-pressure ---- */

static void small_bounds(pgr_config *cfg)
{
	cfg->exec_max_conns = 2;
	cfg->exec_pipeline_depth = 2;
	cfg->exec_max_pending = 6;
}

Test(loop_exec, another_connection_is_taken_only_at_depth_and_the_bounds_hold, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_bounds", small_bounds);
	struct res r[7] = {0};
	/* Each answers with the backend that ran it. */
	for (int i = 0; i < 6; i++)
		exec1(&e, "select pg_backend_pid() from pg_sleep($1::float8)", "0.2", 10000, &r[i]);
	cr_assert_eq(pgr_loop_exec(e.loop, "select 1", 0, NULL, 1000, on_res, &r[6]), -EBUSY,
	             "the loop's bound (exec_max_pending) was not kept");
	wait_all(&e, r, 6, 5000);
	int distinct[6], nd = 0;
	for (int i = 0; i < 6; i++) {
		cr_assert_eq(r[i].err, 0);
		int pid = atoi(r[i].val);
		if (!lc_in(distinct, nd, pid))
			distinct[nd++] = pid;
	}
	cr_assert_str_eq(r[0].val, r[1].val, "a second connection was taken below the depth");
	cr_assert_str_neq(r[0].val, r[2].val, "no other connection was taken at the depth");
	cr_assert_eq(nd, 2, "%d connections used, exec_max_conns is 2", nd);
	/* Room again. */
	exec1(&e, "select 7", NULL, 5000, &r[6]);
	wait_all(&e, &r[6], 1, 5000);
	cr_assert_eq(r[6].err, 0);
	env_fini(&e);
}

/* ---- the prepared-statement cache ---- */

static void prep2(pgr_config *cfg)
{
	cfg->exec_max_conns = 1;
	cfg->prepare_threshold = 2;
}

/* Is a statement with this text prepared on the loop's connection? (asked on it) */
static bool prepared(struct env *e, const char *text)
{
	struct res r = {0};
	exec1(e, "select count(*) from pg_prepared_statements where statement = $1", text, 5000,
	      &r);
	wait_all(e, &r, 1, 5000);
	cr_assert_eq(r.err, 0);
	cr_assert_eq(r.st, PGRES_TUPLES_OK);
	return atoi(r.val) > 0;
}

static void run(struct env *e, const char *sql, const char *p1)
{
	struct res r = {0};
	exec1(e, sql, p1, 5000, &r);
	wait_all(e, &r, 1, 5000);
	cr_assert_eq(r.err, 0);
	cr_assert_eq(r.st, PGRES_TUPLES_OK, "%s: %s", sql, r.sqlstate);
}

Test(loop_exec, a_text_is_prepared_after_threshold_uses, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_thr", prep2);
	const char *t = "select $1::int + 40";
	run(&e, t, "1");
	run(&e, t, "2");
	cr_assert_not(prepared(&e, t), "prepared before its threshold");
	run(&e, t, "3");
	cr_assert(prepared(&e, t), "not prepared at use threshold + 1");
	run(&e, t, "4"); /* executed by name */
	env_fini(&e);
}

static void prep_never(pgr_config *cfg)
{
	cfg->exec_max_conns = 1;
	cfg->prepare_threshold = -1;
}

Test(loop_exec, threshold_minus_one_never_prepares, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_never", prep_never);
	for (int i = 0; i < 10; i++)
		run(&e, "select $1::int + 41", "1");
	cr_assert_not(prepared(&e, "select $1::int + 41"));
	env_fini(&e);
}

static void prep_lru(pgr_config *cfg)
{
	cfg->exec_max_conns = 1;
	cfg->prepare_threshold = 0;
	cfg->prepare_cache_size = 3;
}

Test(loop_exec, lru_eviction_deallocates_the_evicted_statement, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_lru", prep_lru);
	run(&e, "select $1::int + 1", "1");
	run(&e, "select $1::int + 2", "1");
	run(&e, "select $1::int + 3", "1");
	/* The check's own text takes the third... fourth place: the oldest (+ 1) goes. */
	cr_assert_not(prepared(&e, "select $1::int + 1"), "evicted statement still prepared");
	cr_assert(prepared(&e, "select $1::int + 3"));
	env_fini(&e);
}

static void prep_at_once(pgr_config *cfg)
{
	cfg->exec_max_conns = 1;
	cfg->prepare_threshold = 0;
}

Test(loop_exec, changed_result_type_re_prepares_transparently, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_0a000", prep_at_once);
	PGconn *admin = tu_admin();
	tu_exec(admin, "drop table if exists pgr_exec_alter");
	tu_exec(admin, "create table pgr_exec_alter (a int)");
	tu_exec(admin, "insert into pgr_exec_alter values (1)");
	const char *t = "select * from pgr_exec_alter";
	run(&e, t, NULL);
	cr_assert(prepared(&e, t));
	tu_exec(admin, "alter table pgr_exec_alter add column b int default 7");
	struct res r = {0};
	exec1(&e, t, NULL, 5000, &r);
	wait_all(&e, &r, 1, 5000);
	cr_assert_eq(r.err, 0);
	cr_assert_eq(r.st, PGRES_TUPLES_OK, "0A000 reached the caller: %s", r.sqlstate);
	cr_assert_eq(r.ncols, 2);
	tu_exec(admin, "drop table pgr_exec_alter");
	PQfinish(admin);
	env_fini(&e);
}

static void prep_reset(pgr_config *cfg)
{
	cfg->max_size = 1;
	cfg->exec_max_conns = 1;
	cfg->prepare_threshold = 0;
	cfg->exec_idle_release_ms = 0;
	cfg->reset_sql = "DISCARD ALL";
}

Test(loop_exec, cache_survives_a_discard_by_a_holder_and_a_reset, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_reset", prep_reset);
	const char *t = "select $1::int + 100";
	run(&e, t, "1");
	cr_assert(prepared(&e, t));
	/* The loop gives the connection back when idle; a holder drops every statement behind
	 * the cache's back (the pool sees nothing). */
	pgr_conn *h;
	int64_t dl = tu_now_ms() + 5000;
	while (pgr_try_acquire(e.pool, &h) != 0) {
		cr_assert_lt(tu_now_ms(), dl, "the loop kept its idle connection");
		turn(&e);
	}
	tu_exec(pgr_conn_pg(h), "DEALLOCATE ALL");
	/* Released with reset_sql = DISCARD ALL, run by the manager: the cache forgets. */
	cr_assert_eq(pgr_release(h), 0);
	run(&e, t, "2"); /* after the reset: prepared afresh */
	cr_assert(prepared(&e, t));
	/* Now only behind the cache's back: a 26000 the engine answers by preparing again. */
	while (pgr_try_acquire(e.pool, &h) != 0) {
		cr_assert_lt(tu_now_ms(), dl + 5000);
		turn(&e);
	}
	cr_assert_eq(pgr_loop_release(e.loop, h), 0);
	env_fini(&e);
}

/* ---- the cache through pgr_loop_query on a checked-out connection ---- */

static void on_acq(pgr_loop *l, int err, pgr_conn *h, void *arg)
{
	(void)l;
	cr_assert_eq(err, 0, "acquire: %s", pgr_strerror(err));
	*(pgr_conn **)arg = h;
}

static pgr_conn *acquire1(struct env *e)
{
	pgr_conn *h = NULL;
	cr_assert_eq(pgr_loop_acquire(e->loop, 5000, on_acq, &h), 0);
	int64_t dl = tu_now_ms() + 5000;
	while (!h) {
		cr_assert_lt(tu_now_ms(), dl, "no connection");
		turn(e);
	}
	return h;
}

static void q1(struct env *e, pgr_conn *h, const char *sql, const char *p1, struct res *r)
{
	const char *pv[1] = {p1};
	memset(r, 0, sizeof(*r));
	int rc = pgr_loop_query(e->loop, h, sql, p1 ? 1 : 0, p1 ? pv : NULL, 5000, on_res, r);
	cr_assert_eq(rc, 0, "pgr_loop_query(%s): %s", sql, pgr_strerror(rc));
	wait_all(e, r, 1, 5000);
}

static bool q_prepared(struct env *e, pgr_conn *h, const char *text)
{
	struct res r;
	q1(e, h, "select count(*) from pg_prepared_statements where statement = $1", text, &r);
	cr_assert_eq(r.err, 0);
	cr_assert_eq(r.st, PGRES_TUPLES_OK, "%s", r.sqlstate);
	return atoi(r.val) > 0;
}

static void q_ok(struct env *e, pgr_conn *h, const char *sql, const char *p1, int ncols)
{
	struct res r;
	q1(e, h, sql, p1, &r);
	cr_assert_eq(r.err, 0, "%s: %s", sql, pgr_strerror(r.err));
	cr_assert(r.st == PGRES_TUPLES_OK || r.st == PGRES_COMMAND_OK, "%s: %s %s", sql,
	          PQresStatus(r.st), r.sqlstate);
	if (ncols >= 0)
		cr_assert_eq(r.ncols, ncols, "%s: %d columns", sql, r.ncols);
}

static void q_prep2(pgr_config *cfg)
{
	cfg->max_size = 1;
	cfg->prepare_threshold = 2;
	cfg->prepare_loop_query = 1;
}

Test(loop_exec, loop_query_prepares_a_text_after_threshold_uses_when_enabled, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_qthr", q_prep2);
	pgr_conn *h = acquire1(&e);
	const char *t = "select $1::int + 50";
	q_ok(&e, h, t, "1", 1);
	q_ok(&e, h, t, "2", 1);
	cr_assert_not(q_prepared(&e, h, t), "prepared before its threshold");
	q_ok(&e, h, t, "3", 1);
	cr_assert(q_prepared(&e, h, t), "not prepared at use threshold + 1");
	struct res r;
	q1(&e, h, t, "4", &r); /* executed by name */
	cr_assert_str_eq(r.val, "54");
	cr_assert_eq(pgr_loop_release(e.loop, h), 0);
	env_fini(&e);
}

static void q_off(pgr_config *cfg)
{
	cfg->max_size = 1;
	cfg->prepare_threshold = 0;
}

Test(loop_exec, loop_query_never_prepares_unless_enabled, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_qoff", q_off);
	pgr_conn *h = acquire1(&e);
	for (int i = 0; i < 5; i++)
		q_ok(&e, h, "select $1::int + 51", "1", 1);
	cr_assert_not(q_prepared(&e, h, "select $1::int + 51"));
	cr_assert_eq(pgr_loop_release(e.loop, h), 0);
	env_fini(&e);
}

static void q_at_once(pgr_config *cfg)
{
	cfg->max_size = 1;
	cfg->prepare_threshold = 0;
	cfg->prepare_loop_query = 1;
	cfg->prepare_cache_size = 4;
}

Test(loop_exec, loop_query_re_prepares_after_alter_table_and_a_discard, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_q0a000", q_at_once);
	pgr_conn *h = acquire1(&e);
	q_ok(&e, h, "drop table if exists pgr_exec_qalter", NULL, -1);
	q_ok(&e, h, "create table pgr_exec_qalter (a int)", NULL, -1);
	q_ok(&e, h, "insert into pgr_exec_qalter values (1)", NULL, -1);
	const char *t = "select * from pgr_exec_qalter";
	q_ok(&e, h, t, NULL, 1);
	cr_assert(q_prepared(&e, h, t));
	/* Autocommit: the stale plan (0A000) is prepared again and the statement re-sent. */
	q_ok(&e, h, "alter table pgr_exec_qalter add column b int default 7", NULL, -1);
	q_ok(&e, h, t, NULL, 2);
	/* Inside a transaction block the 0A000 aborted the caller's transaction: it is theirs. */
	q_ok(&e, h, "alter table pgr_exec_qalter add column c int", NULL, -1);
	q_ok(&e, h, "begin", NULL, -1);
	struct res r;
	q1(&e, h, t, NULL, &r);
	cr_assert_eq(r.err, 0);
	cr_assert_eq(r.st, PGRES_FATAL_ERROR, "re-sent inside a transaction block");
	cr_assert_str_eq(r.sqlstate, "0A000");
	q_ok(&e, h, "rollback", NULL, -1);
	q_ok(&e, h, t, NULL, 3); /* prepared afresh at its next use */
	/* The holder drops every statement behind the cache's back: 26000, prepared again. */
	q_ok(&e, h, "deallocate all", NULL, -1);
	q_ok(&e, h, t, NULL, 3);
	/* Evicted names are deallocated even when the text is executed unnamed meanwhile. */
	for (int i = 0; i < 6; i++) {
		char sql[64];
		snprintf(sql, sizeof(sql), "select $1::int + %d", 60 + i);
		q_ok(&e, h, sql, "1", 1);
	}
	struct res n;
	q1(&e, h, "select count(*) from pg_prepared_statements", NULL, &n);
	cr_assert_leq(atoi(n.val), 4, "%s statements prepared with a cache of 4", n.val);
	q_ok(&e, h, "drop table pgr_exec_qalter", NULL, -1);
	cr_assert_eq(pgr_loop_release(e.loop, h), 0);
	env_fini(&e);
}

static void q_reset(pgr_config *cfg)
{
	cfg->max_size = 1;
	cfg->prepare_threshold = 0;
	cfg->prepare_loop_query = 1;
	cfg->reset_sql = "DISCARD ALL";
}

Test(loop_exec, loop_query_cache_forgets_what_reset_sql_dropped, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_qreset", q_reset);
	pgr_conn *h = acquire1(&e);
	const char *t = "select $1::int + 70";
	q_ok(&e, h, t, "1", 1);
	cr_assert(q_prepared(&e, h, t));
	cr_assert_eq(pgr_loop_release(e.loop, h), 0); /* DISCARD ALL on the loop's ring */
	h = acquire1(&e);
	cr_assert_not(q_prepared(&e, h, t), "reset_sql did not run");
	/* Had the cache not forgotten, this would be a 26000 (retried unseen): the server log
	 * would show it; what the caller sees is that the text is prepared again at once. */
	q_ok(&e, h, t, "2", 1);
	cr_assert(q_prepared(&e, h, t), "the cache did not prepare the text again");
	cr_assert_eq(pgr_loop_release(e.loop, h), 0);
	env_fini(&e);
}

/* ---- drain and destroy ---- */

static void run_until_sent(struct env *e)
{
	struct res r = {0};
	exec1(e, "select 1", NULL, 5000, &r);
	wait_all(e, &r, 1, 5000);
	cr_assert_eq(r.err, 0);
}

struct drain_arg {
	pgr_pool *pool;
	int rc;
	int64_t ms;
};

static void *drain_main(void *a)
{
	struct drain_arg *d = a;
	int64_t t0 = tu_now_ms();
	d->rc = pgr_pool_drain(d->pool, 5000);
	d->ms = tu_now_ms() - t0;
	return NULL;
}

Test(loop_exec, drain_lets_statements_in_flight_finish_and_takes_the_connections_back,
     .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_drain", two_conns);
	struct res r[4] = {0};
	run_until_sent(&e); /* a connection held: what follows is sent at once */
	for (int i = 0; i < 4; i++)
		exec1(&e, "select pg_sleep($1::float8), 1", "0.3", 10000, &r[i]);
	for (int i = 0; i < 5; i++)
		turn(&e);
	struct drain_arg d = {.pool = e.pool, .rc = 1};
	pthread_t t;
	pthread_create(&t, NULL, drain_main, &d);
	wait_all(&e, r, 4, 5000);
	for (int i = 0; i < 4; i++)
		cr_assert_eq(r[i].err, 0, "statement %d: %s", i, pgr_strerror(r[i].err));
	int64_t dl = tu_now_ms() + 6000;
	while (d.rc == 1) {
		cr_assert_lt(tu_now_ms(), dl, "drain hangs on the loop's connections");
		turn(&e);
	}
	pthread_join(t, NULL);
	cr_assert_eq(d.rc, 0);
	cr_assert_lt(d.ms, 2000);
	struct res x = {0};
	cr_assert_eq(pgr_loop_exec(e.loop, "select 1", 0, NULL, 100, on_res, &x), -ESHUTDOWN);
	env_fini(&e);
}

Test(loop_exec, destroy_cancels_statements_in_flight_and_stops_them_on_the_server, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_destroy", two_conns);
	PGconn *admin = tu_admin();
	struct res r[3] = {0};
	for (int i = 0; i < 3; i++)
		exec1(&e, "select pg_sleep($1::float8)", "20", 30000, &r[i]);
	int pids[LC_MAX_PIDS];
	int64_t dl = tu_now_ms() + 5000;
	while (lc_app_pids(admin, e.app, pids, LC_MAX_PIDS) < 1) {
		cr_assert_lt(tu_now_ms(), dl);
		turn(&e);
	}
	int64_t t0 = tu_now_ms();
	while (pgr_loop_destroy(e.loop) == -EBUSY) {
		cr_assert_lt(tu_now_ms() - t0, 3000, "destroy waits for the statements");
		turn(&e);
	}
	for (int i = 0; i < 3; i++)
		cr_assert_eq(r[i].err, -ECANCELED);
	/* The sleeps were cancelled and the connections closed. */
	char q[256];
	snprintf(q, sizeof(q),
	         "select count(*) from pg_stat_activity where application_name = '%s' and "
	         "state = 'active'",
	         e.app);
	while (tu_query_long(admin, q) > 0) {
		cr_assert_lt(tu_now_ms() - t0, 5000, "the server still runs the statements");
		tu_sleep_ms(20);
	}
	cr_assert_eq(pgr_pool_destroy(e.pool), 0);
	io_uring_queue_exit(&e.ring);
	lc_events_free(e.ev);
	free(e.conninfo);
	PQfinish(admin);
}

/* ---- grouped sync points (exec_sync_group) ---- */

static void grouped8(pgr_config *cfg)
{
	cfg->exec_max_conns = 1;
	cfg->exec_pipeline_depth = 64;
	cfg->exec_sync_group = 8;
}

/* Statements that share a sync point run in one transaction: txid_current() tells them. */
static int distinct_txids(struct res *r, int n)
{
	int d = 0;
	for (int i = 0; i < n; i++) {
		bool seen = false;
		for (int j = 0; j < i && !seen; j++)
			seen = strcmp(r[i].val, r[j].val) == 0;
		d += !seen;
	}
	return d;
}

Test(loop_exec, grouping_is_off_by_default_and_each_statement_commits_alone, .timeout = 30)
{
	pgr_config def;
	pgr_config_init(&def);
	cr_assert_eq(def.exec_sync_group, 1);
	struct env e;
	env_init(&e, "pgr_exec_nogroup", one_conn);
	static struct res r[16];
	memset(r, 0, sizeof(r));
	for (int i = 0; i < 16; i++)
		exec1(&e, "select txid_current()::text", NULL, 10000, &r[i]);
	wait_all(&e, r, 16, 10000);
	cr_assert_eq(distinct_txids(r, 16), 16, "statements shared a transaction");
	env_fini(&e);
}

Test(loop_exec, grouped_statements_share_a_sync_point_and_come_back_in_order, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_grporder", grouped8);
	enum {
		N = 64
	};
	static struct res r[N], t[16];
	memset(r, 0, sizeof(r));
	memset(t, 0, sizeof(t));
	char p[N][12];
	for (int i = 0; i < N; i++) {
		snprintf(p[i], sizeof(p[i]), "%d", i);
		exec1(&e, "select $1::int", p[i], 10000, &r[i]);
	}
	wait_all(&e, r, N, 10000);
	for (int i = 0; i < N; i++) {
		cr_assert_eq(r[i].err, 0);
		cr_assert_eq(atoi(r[i].val), i);
		cr_assert_eq(r[i].order, i, "statement %d answered at position %d", i, r[i].order);
	}
	/* Sixteen sent in one turn: two groups of eight. */
	for (int i = 0; i < 16; i++)
		exec1(&e, "select txid_current()::text", NULL, 10000, &t[i]);
	wait_all(&e, t, 16, 10000);
	cr_assert_eq(distinct_txids(t, 16), 2, "%d transactions for two groups of 8",
	             distinct_txids(t, 16));
	env_fini(&e);
}

Test(loop_exec, a_failing_statement_in_a_group_fails_alone_and_the_others_commit_once,
     .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_grpfail", grouped8);
	PGconn *admin = tu_admin();
	tu_exec(admin, "drop table if exists pgr_exec_grp");
	tu_exec(admin, "drop table if exists pgr_exec_grpn");
	tu_exec(admin, "create table pgr_exec_grp (id int primary key)");
	tu_exec(admin, "create table pgr_exec_grpn (n int)");
	tu_exec(admin, "insert into pgr_exec_grpn values (0)");
	/* Ids 4, 13, 22... exist already: those inserts fail (23505), one or two per group. */
	tu_exec(admin, "insert into pgr_exec_grp select g from generate_series(4, 64, 9) g");
	long before = tu_query_long(admin, "select count(*) from pgr_exec_grp");
	enum {
		N = 64
	};
	static struct res r[N], u[8];
	memset(r, 0, sizeof(r));
	memset(u, 0, sizeof(u));
	char p[N][12];
	for (int round = 0; round < 2; round++) {
		/* The first round below the prepare threshold, the second prepared: an aborted
		 * Prepare must not leave a name the server does not know. */
		for (int i = round * N / 2; i < (round + 1) * N / 2; i++) {
			snprintf(p[i], sizeof(p[i]), "%d", i + 1);
			exec1(&e, "insert into pgr_exec_grp values ($1::int)", p[i], 10000, &r[i]);
		}
		wait_all(&e, r, (round + 1) * N / 2, 10000);
	}
	int failed = 0;
	for (int i = 0; i < N; i++) {
		int id = i + 1;
		cr_assert_eq(r[i].err, 0);
		if ((id - 4) % 9 == 0) {
			cr_assert_eq(r[i].st, PGRES_FATAL_ERROR, "insert of id %d", id);
			cr_assert_str_eq(r[i].sqlstate, "23505");
			failed++;
		} else {
			cr_assert_eq(r[i].st, PGRES_COMMAND_OK, "insert of id %d: %s %s", id,
			             PQresStatus(r[i].st), r[i].sqlstate);
		}
	}
	cr_assert_eq(tu_query_long(admin, "select count(*) from pgr_exec_grp"), N,
	             "rows lost or added");
	cr_assert_eq(before + (N - failed), N);
	/* Increments in one group, one failing in the middle: each other one counted once. */
	for (int i = 0; i < 8; i++)
		exec1(&e, "update pgr_exec_grpn set n = n + 1 / $1::int", i == 3 ? "0" : "1", 10000,
		      &u[i]);
	wait_all(&e, u, 8, 10000);
	for (int i = 0; i < 8; i++) {
		cr_assert_eq(u[i].err, 0);
		cr_assert_eq(u[i].st, i == 3 ? PGRES_FATAL_ERROR : PGRES_COMMAND_OK,
		             "update %d: %s", i, PQresStatus(u[i].st));
	}
	cr_assert_str_eq(u[3].sqlstate, "22012");
	cr_assert_eq(tu_query_long(admin, "select n from pgr_exec_grpn"), 7);
	tu_exec(admin, "drop table pgr_exec_grp");
	tu_exec(admin, "drop table pgr_exec_grpn");
	PQfinish(admin);
	env_fini(&e);
}

Test(loop_exec, statements_that_cannot_run_in_a_transaction_block_are_never_grouped, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_grpalone", grouped8);
	PGconn *admin = tu_admin();
	tu_exec(admin, "drop table if exists pgr_exec_grpvac");
	tu_exec(admin, "create table pgr_exec_grpvac (a int)");
	struct res r[4] = {0};
	exec1(&e, "select $1::int", "1", 10000, &r[0]);
	exec1(&e, "vacuum pgr_exec_grpvac", NULL, 10000, &r[1]);
	exec1(&e, "select $1::int", "3", 10000, &r[2]);
	exec1(&e, "/* c */ (values ($1::int))", "4", 10000, &r[3]);
	wait_all(&e, r, 4, 10000);
	for (int i = 0; i < 4; i++)
		cr_assert_eq(r[i].err, 0);
	cr_assert_eq(r[1].st, PGRES_COMMAND_OK, "vacuum: %s %s", PQresStatus(r[1].st),
	             r[1].sqlstate);
	cr_assert_str_eq(r[2].val, "3");
	cr_assert_str_eq(r[3].val, "4");
	tu_exec(admin, "drop table pgr_exec_grpvac");
	PQfinish(admin);
	env_fini(&e);
}

static void grouped_depth4(pgr_config *cfg)
{
	cfg->exec_max_conns = 1;
	cfg->exec_pipeline_depth = 4;
	cfg->exec_sync_group = 4;
}

Test(loop_exec, killed_backend_fails_exactly_the_grouped_statements_in_flight, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_grpkill", grouped_depth4);
	PGconn *admin = tu_admin();
	struct res r[6] = {0};
	exec1(&e, "select $1::int", "1", 10000, &r[0]);
	exec1(&e, "select pg_sleep($1::float8)", "5", 10000, &r[1]);
	exec1(&e, "select $1::int", "3", 10000, &r[2]);
	exec1(&e, "select $1::int", "4", 10000, &r[3]);
	/* Depth 4 on one connection: these wait in the loop, not sent. */
	exec1(&e, "select $1::int", "5", 10000, &r[4]);
	exec1(&e, "select $1::int", "6", 10000, &r[5]);
	int pids[LC_MAX_PIDS];
	int64_t dl = tu_now_ms() + 5000;
	while (lc_app_pids(admin, e.app, pids, LC_MAX_PIDS) < 1) {
		cr_assert_lt(tu_now_ms(), dl);
		turn(&e);
	}
	for (int i = 0; i < 20; i++)
		turn(&e); /* the sleep is running */
	cr_assert_eq(r[0].done, 0, "a grouped result came before its sync point");
	cr_assert_eq(lc_app_pids(admin, e.app, pids, LC_MAX_PIDS), 1);
	lc_terminate(admin, pids[0]);
	wait_all(&e, r, 6, 8000);
	for (int i = 0; i < 4; i++)
		cr_assert_eq(r[i].err, -EIO, "statement %d in flight: %s", i,
		             pgr_strerror(r[i].err));
	cr_assert_eq(r[4].err, 0, "a statement not sent was failed: %s", pgr_strerror(r[4].err));
	cr_assert_str_eq(r[4].val, "5");
	cr_assert_eq(r[5].err, 0);
	cr_assert_str_eq(r[5].val, "6");
	PQfinish(admin);
	env_fini(&e);
}

static void grouped_one_conn4(pgr_config *cfg)
{
	cfg->exec_max_conns = 1;
	cfg->exec_pipeline_depth = 4;
	cfg->exec_sync_group = 4;
}

Test(loop_exec, grouped_statements_keep_their_own_deadlines, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_grpdl", grouped_one_conn4);
	struct res r[3] = {0};
	int64_t t0 = tu_now_ms();
	exec1(&e, "select $1::int", "1", 10000, &r[0]);
	exec1(&e, "select pg_sleep($1::float8)", "1.5", 200, &r[1]); /* times out */
	exec1(&e, "select $1::int", "3", 10000, &r[2]);
	wait_all(&e, &r[1], 1, 5000);
	cr_assert_eq(r[1].err, -ETIMEDOUT);
	cr_assert_geq(r[1].t_ms - t0, 200);
	cr_assert_lt(r[1].t_ms - t0, 450);
	wait_all(&e, r, 3, 5000);
	/* The others ran and committed with the group, and were answered at its sync point. */
	for (int i = 0; i < 3; i += 2) {
		cr_assert_eq(r[i].err, 0);
		cr_assert_geq(r[i].t_ms - t0, 1400, "answered before the group's sync point");
	}
	cr_assert_str_eq(r[0].val, "1");
	cr_assert_str_eq(r[2].val, "3");
	/* A timed-out statement in a group that another one fails: the failing one hears its
	 * error, the timed-out one nothing more, the others run again and succeed. */
	struct res s[4] = {0};
	t0 = tu_now_ms();
	exec1(&e, "select $1::int", "1", 10000, &s[0]);
	exec1(&e, "select pg_sleep($1::float8)", "0.5", 100, &s[1]);
	exec1(&e, "select 1 / $1::int", "0", 10000, &s[2]);
	exec1(&e, "select $1::int", "4", 10000, &s[3]);
	wait_all(&e, s, 4, 5000);
	cr_assert_eq(s[1].err, -ETIMEDOUT);
	cr_assert_eq(s[2].err, 0);
	cr_assert_str_eq(s[2].sqlstate, "22012");
	cr_assert_eq(s[0].err, 0);
	cr_assert_str_eq(s[0].val, "1");
	cr_assert_eq(s[3].err, 0);
	cr_assert_str_eq(s[3].val, "4");
	env_fini(&e);
}

/* Wait for the admin connection's query sent with PQsendQuery, turning the loop meanwhile. */
static void admin_wait(struct env *e, PGconn *admin, const char *what)
{
	int64_t dl = tu_now_ms() + 10000;
	for (;;) {
		cr_assert(PQconsumeInput(admin), "%s: %s", what, PQerrorMessage(admin));
		if (!PQisBusy(admin))
			break;
		cr_assert_lt(tu_now_ms(), dl, "%s never finished", what);
		turn(e);
	}
	PGresult *r;
	while ((r = PQgetResult(admin)) != NULL) {
		cr_assert_eq(PQresultStatus(r), PGRES_COMMAND_OK, "%s: %s", what,
		             PQresultErrorMessage(r));
		PQclear(r);
	}
}

Test(loop_exec, a_deadlock_caused_by_grouping_runs_the_whole_group_again, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_grpdead", grouped8);
	PGconn *admin = tu_admin();
	PGconn *other = tu_admin();
	tu_exec(admin, "drop table if exists pgr_exec_grpdl");
	tu_exec(admin, "create table pgr_exec_grpdl (id int primary key, v int)");
	tu_exec(admin, "insert into pgr_exec_grpdl values (1, 0), (2, 0)");
	/* Another session holds row 2; the group locks row 1, then waits for row 2. That session
	 * looks for deadlocks only after 10 s, so that the group's backend (1 s) finds this one. */
	tu_exec(other, "set deadlock_timeout = '10s'");
	tu_exec(other, "begin");
	tu_exec(other, "update pgr_exec_grpdl set v = v + 1 where id = 2");
	struct res r[3] = {0};
	exec1(&e, "update pgr_exec_grpdl set v = v + 1 where id = $1::int", "1", 20000, &r[0]);
	exec1(&e, "update pgr_exec_grpdl set v = v + 1 where id = $1::int", "2", 20000, &r[1]);
	exec1(&e, "select $1::int", "3", 20000, &r[2]);
	char q[200];
	snprintf(q, sizeof(q),
	         "select count(*) from pg_stat_activity where application_name = '%s' and "
	         "wait_event_type = 'Lock'",
	         e.app);
	int64_t dl = tu_now_ms() + 5000;
	while (tu_query_long(admin, q) < 1) {
		cr_assert_lt(tu_now_ms(), dl, "the group never waited for row 2");
		turn(&e);
	}
	/* Row 1 from the other side: a deadlock only because the group still holds row 1; the
	 * group's backend finds the cycle and fails it (40P01). */
	cr_assert(PQsendQuery(other, "update pgr_exec_grpdl set v = v + 1 where id = 1"));
	admin_wait(&e, other, "the other session's update of row 1");
	cr_assert_eq(r[1].done, 0, "%s %s", PQresStatus(r[1].st), r[1].sqlstate);
	cr_assert(PQsendQuery(other, "commit"));
	admin_wait(&e, other, "commit");
	wait_all(&e, r, 3, 10000);
	for (int i = 0; i < 3; i++) {
		cr_assert_eq(r[i].err, 0);
		cr_assert_neq(r[i].st, PGRES_FATAL_ERROR, "statement %d: %s", i, r[i].sqlstate);
	}
	cr_assert_str_eq(r[2].val, "3");
	cr_assert_eq(tu_query_long(admin, "select sum(v) from pgr_exec_grpdl"), 4);
	tu_exec(admin, "drop table pgr_exec_grpdl");
	PQfinish(other);
	PQfinish(admin);
	env_fini(&e);
}

Test(loop_exec, an_error_at_a_groups_commit_runs_every_statement_again_alone, .timeout = 30)
{
	struct env e;
	env_init(&e, "pgr_exec_grpdefer", grouped8);
	PGconn *admin = tu_admin();
	tu_exec(admin, "drop table if exists pgr_exec_grpdef");
	/* A deferred unique constraint: a duplicate fails at commit, after every statement ran. */
	tu_exec(admin, "create table pgr_exec_grpdef (id int, unique (id) deferrable initially "
	               "deferred)");
	tu_exec(admin, "insert into pgr_exec_grpdef values (5)");
	struct res r[8] = {0};
	char p[8][12];
	for (int i = 0; i < 8; i++) {
		snprintf(p[i], sizeof(p[i]), "%d", i + 1);
		exec1(&e, "insert into pgr_exec_grpdef values ($1::int)", p[i], 10000, &r[i]);
	}
	wait_all(&e, r, 8, 10000);
	for (int i = 0; i < 8; i++) {
		cr_assert_eq(r[i].err, 0);
		if (i == 4) {
			cr_assert_eq(r[i].st, PGRES_FATAL_ERROR);
			cr_assert_str_eq(r[i].sqlstate, "23505");
		} else {
			cr_assert_eq(r[i].st, PGRES_COMMAND_OK, "insert %d: %s %s", i + 1,
			             PQresStatus(r[i].st), r[i].sqlstate);
		}
	}
	cr_assert_eq(tu_query_long(admin, "select count(*) from pgr_exec_grpdef"), 8);
	tu_exec(admin, "drop table pgr_exec_grpdef");
	PQfinish(admin);
	env_fini(&e);
}
