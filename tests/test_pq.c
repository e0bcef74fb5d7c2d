/* SPDX-License-Identifier: PostgreSQL */
/*
 * The libpq engine (src/pq.c) on its own, driven with poll(2) instead of io_uring, against the
 * real server: what both drivers (the manager and pgr_loop) rely on.
 */
#include <poll.h>
#include <stdlib.h>
#include <string.h>

#include "pq.h"
#include "testutil.h"

struct sink {
	struct pgr__pq x;
	int n[4];
	ExecStatusType last[4];
	long value[4];
	long rows;
};

static void sink_fn(struct pgr__pq *x, int stmt, PGresult *r)
{
	struct sink *s = (struct sink *)x;
	cr_assert_lt(stmt, 4);
	s->n[stmt]++;
	s->last[stmt] = PQresultStatus(r);
	if (PQresultStatus(r) == PGRES_TUPLES_OK) {
		s->rows += PQntuples(r);
		if (PQntuples(r) > 0)
			s->value[stmt] = atol(PQgetvalue(r, 0, 0));
	}
	PQclear(r);
}

/* Drive one exchange to its end with poll(2); returns the final want. */
static enum pgr__pq_want run(struct sink *s, int timeout_ms)
{
	enum pgr__pq_want w = pgr__pq_step(&s->x, 0);
	int64_t dl = tu_now_ms() + timeout_ms;
	while (w == PGR__PQ_READ || w == PGR__PQ_RW) {
		struct pollfd pfd = {.fd = PQsocket(s->x.pg), .events = pgr__pq_events(w)};
		int left = (int)(dl - tu_now_ms());
		cr_assert_gt(left, 0, "the engine never finished");
		int r = poll(&pfd, 1, left);
		cr_assert_geq(r, 0);
		if (r == 0)
			continue;
		w = pgr__pq_step(&s->x, pfd.revents);
	}
	return w;
}

static PGconn *conn(const char *ci)
{
	PGconn *pg = PQconnectdb(ci);
	cr_assert_eq(PQstatus(pg), CONNECTION_OK, "%s", PQerrorMessage(pg));
	return pg;
}

Test(pq, one_statement_ends_idle_with_its_result, .timeout = 30)
{
	PGconn *pg = conn(tu_conninfo());
	struct sink s = {.x = {.pg = pg, .sink = sink_fn}};
	cr_assert(pgr__pq_send_simple(pg, "select 40 + 2"));
	cr_assert_eq(PQisnonblocking(pg), 1, "the engine drives nonblocking connections");
	cr_assert_eq(run(&s, 5000), PGR__PQ_DONE);
	cr_assert_eq(s.n[0], 1);
	cr_assert_eq(s.value[0], 42);
	cr_assert_eq(PQtransactionStatus(pg), PQTRANS_IDLE);
	PQfinish(pg);
}

Test(pq, an_error_is_a_result_not_a_failure, .timeout = 30)
{
	PGconn *pg = conn(tu_conninfo());
	struct sink s = {.x = {.pg = pg, .sink = sink_fn}};
	cr_assert(pgr__pq_send_simple(pg, "select 1/0"));
	cr_assert_eq(run(&s, 5000), PGR__PQ_DONE);
	cr_assert_eq(s.last[0], PGRES_FATAL_ERROR);
	/* The empty query (the ping) answers PGRES_EMPTY_QUERY. */
	memset(s.n, 0, sizeof(s.n));
	cr_assert(pgr__pq_send_simple(pg, ""));
	cr_assert_eq(run(&s, 5000), PGR__PQ_DONE);
	cr_assert_eq(s.last[0], PGRES_EMPTY_QUERY);
	PQfinish(pg);
}

Test(pq, a_large_result_over_many_reads_and_over_tls, .timeout = 60)
{
	const char *cis[2] = {tu_conninfo(), tu_env("PGR_TEST_CONNINFO_TLS")};
	for (int k = 0; k < 2; k++) {
		PGconn *pg = conn(cis[k]);
		if (k == 1)
			cr_assert(PQsslInUse(pg), "the TLS conninfo did not give TLS");
		struct sink s = {.x = {.pg = pg, .sink = sink_fn}};
		cr_assert(pgr__pq_send_simple(
		    pg, "select g, repeat('x', 1000) from generate_series(1, 20000) g"));
		cr_assert_eq(run(&s, 20000), PGR__PQ_DONE);
		cr_assert_eq(s.rows, 20000, "rows=%ld (tls=%d)", s.rows, k);
		PQfinish(pg);
	}
}

Test(pq, a_pipeline_gives_each_statement_its_results_and_leaves_pipeline_mode, .timeout = 30)
{
	PGconn *pg = conn(tu_conninfo());
	cr_assert_eq(PQsetnonblocking(pg, 1), 0);
	cr_assert_eq(PQenterPipelineMode(pg), 1);
	const char *sql[3] = {"select 1", "select 1/0", "select 3"};
	for (int i = 0; i < 3; i++)
		cr_assert_eq(PQsendQueryParams(pg, sql[i], 0, NULL, NULL, NULL, NULL, 0), 1);
	cr_assert_eq(PQpipelineSync(pg), 1);
	struct sink s = {.x = {.pg = pg, .sink = sink_fn, .pipeline = 1, .nstmt = 3}};
	cr_assert_eq(run(&s, 5000), PGR__PQ_DONE);
	cr_assert_eq(s.value[0], 1);
	cr_assert_eq(s.last[1], PGRES_FATAL_ERROR);
	cr_assert_eq(s.last[2], PGRES_PIPELINE_ABORTED, "after a failure the rest is aborted");
	cr_assert_eq(PQpipelineStatus(pg), PQ_PIPELINE_OFF);
	PQfinish(pg);
}

Test(pq, a_dead_backend_is_an_error, .timeout = 30)
{
	PGconn *pg = conn(tu_conninfo());
	PGconn *admin = tu_admin();
	char sql[96];
	snprintf(sql, sizeof(sql), "select pg_terminate_backend(%d)", PQbackendPID(pg));
	tu_exec(admin, sql);
	tu_sleep_ms(50);
	struct sink s = {.x = {.pg = pg, .sink = sink_fn}};
	enum pgr__pq_want w = PGR__PQ_ERROR;
	if (pgr__pq_send_simple(pg, "select 1"))
		w = run(&s, 5000);
	cr_assert(w == PGR__PQ_ERROR || (w == PGR__PQ_DONE && s.last[0] == PGRES_FATAL_ERROR),
	          "w=%d", w);
	cr_assert_neq(PQstatus(pg), CONNECTION_OK);
	PQfinish(pg);
	PQfinish(admin);
}
