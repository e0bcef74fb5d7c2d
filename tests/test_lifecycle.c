/* SPDX-License-Identifier: PostgreSQL */
/*
 * A connection's health across checkouts, against the real server: backends killed while
 * their connections sat idle, connections returned inside a (failed) transaction, reset_sql on
 * return, and retirement after errors that mean the server is no longer what was wanted.
 * Retirement by time (lifetime, idle timeout, keepalive) is in test_lifecycle_retire.c, server
 * outages in test_lifecycle_outage.c, drain/destroy in test_lifecycle_shutdown.c.
 */
#include <errno.h>
#include <string.h>

#include "test_lifecycle.h"

/* Kill every backend of app and wait until the server has forgotten them. */
static int kill_all(PGconn *admin, const char *app, int *pids)
{
	int n = lc_app_pids(admin, app, pids, LC_MAX_PIDS);
	for (int i = 0; i < n; i++)
		lc_terminate(admin, pids[i]);
	cr_assert(TU_WAIT_UNTIL(tu_count_app(admin, app) == 0, 10000),
	          "terminated backends still in pg_stat_activity");
	return n;
}

/* Check out all n connections at once, each must run a query; returns them in out. */
static void acquire_each_and_query(pgr_pool *p, int n, const int *dead, int ndead, pgr_conn **out)
{
	for (int i = 0; i < n; i++) {
		int rc = pgr_acquire(p, 10000, &out[i]);
		cr_assert_eq(rc, 0, "acquire %d after the kill: %s", i, pgr_strerror(rc));
		PGconn *pg = pgr_conn_pg(out[i]);
		PGresult *r = PQexec(pg, "select 1");
		cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK,
		             "connection %d handed out after its backend was killed: %s", i,
		             PQerrorMessage(pg));
		PQclear(r);
		cr_assert_not(lc_in(dead, ndead, PQbackendPID(pg)),
		              "connection %d still talks to killed backend %d", i,
		              PQbackendPID(pg));
	}
}

Test(lifecycle, idle_connections_with_killed_backends_are_replaced_at_checkout, .timeout = 60)
{
	enum {
		N = 4
	};
	const char *app = "lc_kill_idle";
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, NULL, &ci);
	cfg.min_idle = cfg.max_size = N;
	/* Defaults otherwise: no pre-ping (30 s), zero-round-trip socket check after 1 ms idle. */
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	PGconn *admin = tu_admin();
	cr_assert(TU_WAIT_UNTIL(tu_count_app(admin, app) == N, 5000));

	/* The pool was just filled and nobody has used it yet when the server kills them all. */
	int dead[LC_MAX_PIDS];
	int ndead = kill_all(admin, app, dead);
	cr_assert_eq(ndead, N);

	pgr_conn *c[N];
	acquire_each_and_query(p, N, dead, ndead, c);
	for (int i = 0; i < N; i++)
		pgr_release(c[i]);
	/* Every dead socket was found by the check and closed as broken, none handed out. */
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).closes_by_reason[PGR_CLOSE_BROKEN] == N, 5000),
	          "broken closes: %llu",
	          (unsigned long long)tu_stats(p).closes_by_reason[PGR_CLOSE_BROKEN]);
	cr_assert_geq(tu_stats(p).checks_failed, N);
	PQfinish(admin);
	pgr_pool_destroy(p);
}

Test(lifecycle, killed_backends_are_replaced_with_pre_ping_always, .timeout = 60)
{
	enum {
		N = 4
	};
	const char *app = "lc_kill_preping";
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, NULL, &ci);
	cfg.min_idle = cfg.max_size = N;
	cfg.ping_after_idle_ms = 0; /* pre-ping on every checkout */
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	PGconn *admin = tu_admin();
	cr_assert(TU_WAIT_UNTIL(tu_count_app(admin, app) == N, 5000));

	/* A pool in service: every connection has been checked out and returned once. */
	pgr_conn *c[N];
	for (int i = 0; i < N; i++)
		cr_assert_eq(pgr_acquire(p, 5000, &c[i]), 0);
	for (int i = 0; i < N; i++)
		pgr_release(c[i]);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).idle == N, 5000));
	uint64_t pings0 = tu_stats(p).pings;

	int dead[LC_MAX_PIDS];
	int ndead = kill_all(admin, app, dead);
	cr_assert_eq(ndead, N);
	acquire_each_and_query(p, N, dead, ndead, c);
	for (int i = 0; i < N; i++)
		pgr_release(c[i]);

	/* Each dead connection failed its ping and was closed for it. */
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.pings_failed, N, "pings_failed=%llu", (unsigned long long)s.pings_failed);
	cr_assert_geq(s.pings - pings0, N);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).closes_by_reason[PGR_CLOSE_PING_FAILED] == N, 5000));
	PQfinish(admin);
	pgr_pool_destroy(p);
}

/* ---- rollback and reset on return ---- */

static pgr_pool *one_conn_pool(const char *app, const char *reset_sql)
{
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, NULL, &ci);
	cfg.min_idle = cfg.max_size = 1;
	cfg.reset_sql = reset_sql;
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	return p;
}

static void expect_idle_and_pid(pgr_conn *c, int pid)
{
	PGconn *pg = pgr_conn_pg(c);
	cr_assert_eq(PQtransactionStatus(pg), PQTRANS_IDLE, "checked out in transaction state %d",
	             (int)PQtransactionStatus(pg));
	cr_assert_eq(PQbackendPID(pg), pid, "the connection was replaced, not rolled back");
}

Test(lifecycle, connection_returned_in_transaction_comes_back_rolled_back, .timeout = 30)
{
	PGconn *admin = tu_admin();
	tu_exec(admin, "set client_min_messages = warning");
	tu_exec(admin, "drop table if exists lc_rollback");
	tu_exec(admin, "create table lc_rollback (id int)");
	pgr_pool *p = one_conn_pool("lc_rollback", NULL);

	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	int pid = PQbackendPID(pgr_conn_pg(c));
	tu_exec(pgr_conn_pg(c), "begin");
	tu_exec(pgr_conn_pg(c), "insert into lc_rollback values (1)");
	cr_assert_eq(PQtransactionStatus(pgr_conn_pg(c)), PQTRANS_INTRANS);
	pgr_release(c);

	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	expect_idle_and_pid(c, pid);
	cr_assert_eq(tu_query_long(pgr_conn_pg(c), "select count(*) from lc_rollback"), 0,
	             "the returned transaction's insert is visible");
	pgr_release(c);
	cr_assert_eq(tu_query_long(admin, "select count(*) from lc_rollback"), 0);

	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.rollbacks, 1);
	cr_assert_eq(s.closes, 0);
	cr_assert_eq(s.resets_failed, 0);
	pgr_pool_destroy(p);
	tu_exec(admin, "drop table lc_rollback");
	PQfinish(admin);
}

Test(lifecycle, connection_returned_in_failed_transaction_comes_back_rolled_back, .timeout = 30)
{
	PGconn *admin = tu_admin();
	tu_exec(admin, "set client_min_messages = warning");
	tu_exec(admin, "drop table if exists lc_rollback_err");
	tu_exec(admin, "create table lc_rollback_err (id int)");
	pgr_pool *p = one_conn_pool("lc_rollback_err", NULL);

	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	int pid = PQbackendPID(pgr_conn_pg(c));
	PGconn *pg = pgr_conn_pg(c);
	tu_exec(pg, "begin");
	tu_exec(pg, "insert into lc_rollback_err values (1)");
	char ss[8];
	cr_assert_str_eq(lc_sqlstate(pg, "select 1/0", ss, sizeof(ss)), "22012");
	cr_assert_eq(PQtransactionStatus(pg), PQTRANS_INERROR);
	pgr_release(c);

	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	expect_idle_and_pid(c, pid);
	/* Not 25P02 (current transaction is aborted): the session is usable again. */
	cr_assert_eq(tu_query_long(pgr_conn_pg(c), "select count(*) from lc_rollback_err"), 0);
	pgr_release(c);

	/* Twice more, to see the counter follow every such return. */
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
		tu_exec(pgr_conn_pg(c), "begin");
		lc_sqlstate(pgr_conn_pg(c), "select 1/0", ss, sizeof(ss));
		pgr_release(c);
	}
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	expect_idle_and_pid(c, pid);
	pgr_release(c);

	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.rollbacks, 3);
	cr_assert_eq(s.closes, 0);
	cr_assert_eq(tu_query_long(admin, "select count(*) from lc_rollback_err"), 0);
	pgr_pool_destroy(p);
	tu_exec(admin, "drop table lc_rollback_err");
	PQfinish(admin);
}

static void show(PGconn *pg, const char *name, char *buf, size_t len)
{
	char sql[128];
	snprintf(sql, sizeof(sql), "show %s", name);
	PGresult *r = PQexec(pg, sql);
	cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(pg));
	snprintf(buf, len, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
}

Test(lifecycle, reset_sql_runs_on_every_return, .timeout = 30)
{
	const char *app = "lc_reset";
	pgr_pool *p = one_conn_pool(app, "DISCARD ALL");
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	int pid = PQbackendPID(pgr_conn_pg(c));
	char wm[64];
	show(pgr_conn_pg(c), "work_mem", wm, sizeof(wm));

	enum {
		ROUNDS = 5
	};
	for (int i = 0; i < ROUNDS; i++) {
		PGconn *pg = pgr_conn_pg(c);
		/* Session state a previous borrower must not leak to the next one. */
		tu_exec(pg, "set application_name = 'lc_reset_changed'");
		tu_exec(pg, "set work_mem = '7MB'");
		tu_exec(pg, "prepare lc_stmt as select 1");
		tu_exec(pg, "create temp table lc_tmp (x int)");
		pgr_release(c);

		cr_assert_eq(pgr_acquire(p, 5000, &c), 0, "round %d", i);
		pg = pgr_conn_pg(c);
		expect_idle_and_pid(c, pid);
		char v[64];
		show(pg, "application_name", v, sizeof(v));
		cr_assert_str_eq(v, app, "round %d: application_name survived the return", i);
		show(pg, "work_mem", v, sizeof(v));
		cr_assert_str_eq(v, wm, "round %d: work_mem survived the return", i);
		cr_assert_eq(tu_query_long(pg, "select count(*) from pg_prepared_statements"), 0,
		             "round %d: prepared statement survived the return", i);
		cr_assert_eq(tu_query_long(pg,
		                           "select count(*) from pg_class where relname = 'lc_tmp' "
		                           "and relpersistence = 't'"),
		             0, "round %d: temp table survived the return", i);
		cr_assert_eq(tu_stats(p).resets, (uint64_t)i + 1);
	}
	pgr_release(c);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).resets == ROUNDS + 1, 5000));

	/* Inside a transaction: ROLLBACK first (DISCARD ALL cannot run in one), then the reset. */
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	tu_exec(pgr_conn_pg(c), "begin");
	tu_exec(pgr_conn_pg(c), "prepare lc_stmt2 as select 2");
	tu_exec(pgr_conn_pg(c), "set work_mem = '9MB'");
	pgr_release(c);
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	expect_idle_and_pid(c, pid);
	char v[64];
	show(pgr_conn_pg(c), "work_mem", v, sizeof(v));
	cr_assert_str_eq(v, wm);
	/* PREPARE is not transactional: only the reset removes it. */
	cr_assert_eq(tu_query_long(pgr_conn_pg(c), "select count(*) from pg_prepared_statements"),
	             0);
	pgr_release(c);

	cr_assert(TU_WAIT_UNTIL(tu_stats(p).resets == ROUNDS + 3, 5000), "resets=%llu",
	          (unsigned long long)tu_stats(p).resets);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.rollbacks, 1);
	cr_assert_eq(s.resets_failed, 0);
	cr_assert_eq(s.closes, 0);
	pgr_pool_destroy(p);
}

/* ---- retirement on server errors ---- */

static void read_only_error_retires(const char *app, const char *make_read_only)
{
	PGconn *admin = tu_admin();
	tu_exec(admin, "set client_min_messages = warning");
	tu_exec(admin, "create table if not exists lc_ro (x int)");
	struct lc_events *ev = lc_events_new();
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, ev, &ci);
	cfg.min_idle = cfg.max_size = 1;
	pgr_pool *p = tu_pool(&cfg);
	free(ci);

	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	PGconn *pg = pgr_conn_pg(c);
	int pid = PQbackendPID(pg);
	uint32_t id = pgr_conn_id(c);
	tu_exec(pg, make_read_only);
	char ss[8];
	cr_assert_str_eq(lc_sqlstate(pg, "insert into lc_ro values (1)", ss, sizeof(ss)), "25006");
	cr_assert_eq(PQtransactionStatus(pg), PQTRANS_IDLE);
	pgr_release(c);

	/* Never reused: the next checkout talks to another backend, which is writable. */
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	cr_assert_neq(PQbackendPID(pgr_conn_pg(c)), pid, "a read-only connection was reused");
	cr_assert(lc_ok(pgr_conn_pg(c), "insert into lc_ro values (2)"),
	          "the new connection is not writable: %s", PQerrorMessage(pgr_conn_pg(c)));
	pgr_release(c);
	cr_assert_eq(tu_stats(p).closes_by_reason[PGR_CLOSE_SERVER_ERROR], 1);
	cr_assert_eq(lc_events_count(ev, PGR_EV_CONN_CLOSED, "server_error", id), 1);
	cr_assert(TU_WAIT_UNTIL(!lc_pid_alive(admin, pid), 5000), "retired backend still there");
	pgr_pool_destroy(p);
	lc_events_free(ev);
	tu_exec(admin, "delete from lc_ro");
	PQfinish(admin);
}

Test(lifecycle, connection_that_saw_read_only_error_is_not_reused, .timeout = 30)
{
	read_only_error_retires("lc_ro_session",
	                        "set session characteristics as transaction read only");
}

Test(lifecycle, connection_with_default_read_only_is_not_reused, .timeout = 30)
{
	read_only_error_retires("lc_ro_default", "set default_transaction_read_only = on");
}

Test(lifecycle, connection_terminated_while_checked_out_is_not_reused, .timeout = 30)
{
	const char *app = "lc_kill_busy";
	struct lc_events *ev = lc_events_new();
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, ev, &ci);
	cfg.min_idle = cfg.max_size = 1;
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	PGconn *admin = tu_admin();

	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	PGconn *pg = pgr_conn_pg(c);
	int pid = PQbackendPID(pg);
	uint32_t id = pgr_conn_id(c);
	lc_terminate(admin, pid);
	cr_assert(TU_WAIT_UNTIL(!lc_pid_alive(admin, pid), 5000));
	char ss[8];
	lc_sqlstate(pg, "select 1", ss, sizeof(ss));
	/* 57P01 when libpq reads the FATAL, empty when it only sees the closed socket. */
	cr_assert(strcmp(ss, "57P01") == 0 || PQstatus(pg) == CONNECTION_BAD,
	          "query on a terminated backend: sqlstate '%s', status %d", ss, (int)PQstatus(pg));
	pgr_release(c);

	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	cr_assert_neq(PQbackendPID(pgr_conn_pg(c)), pid, "the terminated connection was reused");
	cr_assert(lc_ok(pgr_conn_pg(c), "select 1"));
	pgr_release(c);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(
	    s.closes_by_reason[PGR_CLOSE_BROKEN] + s.closes_by_reason[PGR_CLOSE_SERVER_ERROR], 1);
	cr_assert_eq(lc_events_count(ev, PGR_EV_CONN_CLOSED, "broken", id) +
	                 lc_events_count(ev, PGR_EV_CONN_CLOSED, "server_error", id),
	             1);
	pgr_pool_destroy(p);
	lc_events_free(ev);
	PQfinish(admin);
}

/*
 * An error with one of the SQLSTATEs that mean "this server is going away" (57P01 admin
 * shutdown, 57P02 crash shutdown, 57P03 cannot connect now), raised by a statement so that
 * the session itself stays healthy: only the pool's retirement rule can keep it from being
 * reused.
 */
static void sqlstate_retires(const char *app, const char *code)
{
	struct lc_events *ev = lc_events_new();
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, ev, &ci);
	cfg.min_idle = cfg.max_size = 1;
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	PGconn *admin = tu_admin();

	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	PGconn *pg = pgr_conn_pg(c);
	int pid = PQbackendPID(pg);
	uint32_t id = pgr_conn_id(c);
	char sql[160], ss[8];
	snprintf(sql, sizeof(sql), "do $$ begin raise exception using errcode = '%s'; end $$",
	         code);
	cr_assert_str_eq(lc_sqlstate(pg, sql, ss, sizeof(ss)), code);
	/* Nothing else is wrong with it: idle, open, answering. */
	cr_assert_eq(PQtransactionStatus(pg), PQTRANS_IDLE);
	cr_assert(lc_ok(pg, "select 1"));
	pgr_release(c);

	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	cr_assert_neq(PQbackendPID(pgr_conn_pg(c)), pid, "a connection that saw %s was reused",
	              code);
	cr_assert(lc_ok(pgr_conn_pg(c), "select 1"));
	pgr_release(c);
	cr_assert_eq(tu_stats(p).closes, 1);
	cr_assert_eq(tu_stats(p).closes_by_reason[PGR_CLOSE_SERVER_ERROR], 1);
	cr_assert_eq(lc_events_count(ev, PGR_EV_CONN_CLOSED, "server_error", id), 1);
	cr_assert(TU_WAIT_UNTIL(!lc_pid_alive(admin, pid), 5000), "retired backend still there");
	pgr_pool_destroy(p);
	lc_events_free(ev);
	PQfinish(admin);
}

Test(lifecycle, connection_that_saw_admin_shutdown_57P01_is_not_reused, .timeout = 30)
{
	sqlstate_retires("lc_57p01", "57P01");
}

Test(lifecycle, connection_that_saw_crash_shutdown_57P02_is_not_reused, .timeout = 30)
{
	sqlstate_retires("lc_57p02", "57P02");
}

Test(lifecycle, connection_that_saw_cannot_connect_now_57P03_is_not_reused, .timeout = 30)
{
	sqlstate_retires("lc_57p03", "57P03");
}

/*
 * A FATAL whose SQLSTATE is in no list: idle_session_timeout ends the session with FATAL 57P05
 * while the holder sits idle, and the next statement reads it as its result. The close must
 * say server_error (the severity was seen), not only broken (the socket died after it).
 */
Test(lifecycle, connection_that_saw_a_fatal_error_is_retired_as_server_error, .timeout = 30)
{
	const char *app = "lc_fatal";
	struct lc_events *ev = lc_events_new();
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, ev, &ci);
	cfg.min_idle = cfg.max_size = 1;
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	PGconn *admin = tu_admin();

	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	PGconn *pg = pgr_conn_pg(c);
	int pid = PQbackendPID(pg);
	uint32_t id = pgr_conn_id(c);
	tu_exec(pg, "set idle_session_timeout = 50");
	cr_assert(TU_WAIT_UNTIL(!lc_pid_alive(admin, pid), 5000),
	          "idle_session_timeout did not end the session");
	/* Result by result: PQexec would keep only the last one, libpq's "server closed". */
	cr_assert(PQsendQuery(pg, "select 1"));
	bool fatal = false;
	PGresult *r;
	while ((r = PQgetResult(pg)) != NULL) {
		const char *sev = PQresultErrorField(r, PG_DIAG_SEVERITY_NONLOCALIZED);
		fatal |= sev && !strcmp(sev, "FATAL");
		PQclear(r);
	}
	cr_assert(fatal, "the statement did not see the FATAL");
	pgr_release(c);

	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	cr_assert_neq(PQbackendPID(pgr_conn_pg(c)), pid);
	cr_assert(lc_ok(pgr_conn_pg(c), "select 1"));
	pgr_release(c);
	struct lc_ev e;
	cr_assert(lc_events_first(ev, PGR_EV_CONN_CLOSED, NULL, id, 0, &e, NULL));
	cr_assert_str_eq(e.reason, "server_error", "closed as %s", e.reason);
	cr_assert_eq(tu_stats(p).closes, 1);
	pgr_pool_destroy(p);
	lc_events_free(ev);
	PQfinish(admin);
}
