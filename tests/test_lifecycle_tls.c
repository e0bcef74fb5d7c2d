/* SPDX-License-Identifier: PostgreSQL */
/*
 * TLS (sslmode=verify-full against the test CA), against the real server: connects go through
 * the manager's io_uring path, and the manager's own statements (pre-ping, ROLLBACK on return)
 * read answers that span many TLS records, which is where bytes OpenSSL already decrypted but
 * nobody asked for yet could leave a poll waiting forever (src/pq.c, pgr__tls_pending).
 */
#include <errno.h>
#include <string.h>

#include "test_lifecycle.h"

enum {
	NOTIFIES = 120,
	PAYLOAD = 7000
};

static pgr_pool *tls_pool(const char *app, uint32_t size)
{
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_env("PGR_TEST_CONNINFO_TLS"), app, NULL, &ci);
	cfg.min_idle = cfg.max_size = size;
	cfg.ping_after_idle_ms = 0; /* every checkout pings through the manager */
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	return p;
}

/* Send NOTIFIES notifications of PAYLOAD bytes on channel ch from the admin connection. */
static void notify_many(PGconn *admin, const char *ch)
{
	char sql[256];
	snprintf(sql, sizeof(sql),
	         "select pg_notify('%s', lpad(i::text, %d, 'x')) from generate_series(1, %d) i", ch,
	         PAYLOAD, NOTIFIES);
	tu_exec(admin, sql);
}

/* The notifications queued on pg, in order and whole. */
static void expect_notifies(PGconn *pg, const char *ch)
{
	int n = 0;
	PGnotify *nt;
	while ((nt = PQnotifies(pg)) != NULL) {
		n++;
		cr_assert_str_eq(nt->relname, ch);
		cr_assert_eq(strlen(nt->extra), PAYLOAD, "notification %d cut to %zu bytes", n,
		             strlen(nt->extra));
		cr_assert_eq(atoi(nt->extra + strspn(nt->extra, "x")), n,
		             "notification out of order");
		PQfreemem(nt);
	}
	cr_assert_eq(n, NOTIFIES, "%d of %d notifications arrived", n, NOTIFIES);
}

static void expect_clean(pgr_pool *p)
{
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.pings_failed, 0);
	cr_assert_eq(s.resets_failed, 0);
	cr_assert_eq(s.closes, 0, "a connection was closed (%llu ping_failed, %llu reset_failed)",
	             (unsigned long long)s.closes_by_reason[PGR_CLOSE_PING_FAILED],
	             (unsigned long long)s.closes_by_reason[PGR_CLOSE_RESET_FAILED]);
	cr_assert_eq(s.connects_failed, 0);
}

Test(lifecycle, tls_connections_connect_and_run_large_queries, .timeout = 60)
{
	pgr_pool *p = tls_pool("lc_tls", 2);
	cr_assert_eq(tu_stats(p).connects_ok, 2);
	static const int sizes[] = {100 * 1024, 300 * 1024, 1024 * 1024};
	for (int k = 0; k < 2; k++) {
		pgr_conn *c[2];
		for (int i = 0; i < 2; i++) {
			cr_assert_eq(pgr_acquire(p, 5000, &c[i]), 0);
			PGconn *pg = pgr_conn_pg(c[i]);
			cr_assert(PQsslInUse(pg));
			PGresult *r =
			    PQexec(pg, "select ssl from pg_stat_ssl where pid = pg_backend_pid()");
			cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQerrorMessage(pg));
			cr_assert_str_eq(PQgetvalue(r, 0, 0), "t", "the server sees no TLS");
			PQclear(r);
			for (size_t j = 0; j < sizeof(sizes) / sizeof(sizes[0]); j++) {
				char sql[96];
				snprintf(sql, sizeof(sql), "select repeat('x', %d) || 'end'",
				         sizes[j]);
				r = PQexec(pg, sql);
				cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s",
				             PQerrorMessage(pg));
				cr_assert_eq(PQgetlength(r, 0, 0), sizes[j] + 3);
				cr_assert_str_eq(PQgetvalue(r, 0, 0) + sizes[j], "end");
				PQclear(r);
			}
		}
		for (int i = 0; i < 2; i++)
			pgr_release(c[i]);
	}
	/* The second round at least (a connection just opened may skip its first pre-ping). */
	cr_assert_geq(tu_stats(p).pings, 2);
	expect_clean(p);
	pgr_pool_destroy(p);
}

Test(lifecycle, tls_pre_ping_reads_a_large_backlog, .timeout = 60)
{
	PGconn *admin = tu_admin();
	pgr_pool *p = tls_pool("lc_tls_ping", 1);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	int pid = PQbackendPID(pgr_conn_pg(c));
	tu_exec(pgr_conn_pg(c), "listen lc_tls_ping");
	pgr_release(c);

	/* ~840 KB of notifications pile up on the idle connection's socket. */
	uint64_t pings0 = tu_stats(p).pings;
	notify_many(admin, "lc_tls_ping");
	/* The pre-ping's answer comes after all of them: the manager reads them all over TLS. */
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	cr_assert_eq(PQbackendPID(pgr_conn_pg(c)), pid, "the connection was replaced");
	cr_assert_eq(tu_stats(p).pings, pings0 + 1);
	expect_notifies(pgr_conn_pg(c), "lc_tls_ping");
	cr_assert(lc_ok(pgr_conn_pg(c), "unlisten *"));
	pgr_release(c);
	expect_clean(p);
	pgr_pool_destroy(p);
	PQfinish(admin);
}

Test(lifecycle, tls_rollback_on_return_reads_a_large_backlog, .timeout = 60)
{
	PGconn *admin = tu_admin();
	pgr_pool *p = tls_pool("lc_tls_rollback", 1);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	int pid = PQbackendPID(pgr_conn_pg(c));
	PGconn *pg = pgr_conn_pg(c);
	tu_exec(pg, "listen lc_tls_rb");
	tu_exec(pg, "begin");
	PGresult *r = PQexec(pg, "select repeat('y', 1048576)");
	cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK);
	PQclear(r);
	/*
	 * Delivered to a listener only between transactions: the server sends them right before
	 * the ReadyForQuery that ends the manager's ROLLBACK.
	 */
	notify_many(admin, "lc_tls_rb");
	cr_assert_eq(PQtransactionStatus(pg), PQTRANS_INTRANS);
	pgr_release(c);

	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	pg = pgr_conn_pg(c);
	cr_assert_eq(PQbackendPID(pg), pid, "the connection was replaced");
	cr_assert_eq(PQtransactionStatus(pg), PQTRANS_IDLE);
	cr_assert_eq(tu_stats(p).rollbacks, 1);
	expect_notifies(pg, "lc_tls_rb");
	cr_assert(lc_ok(pg, "unlisten *"));
	pgr_release(c);
	expect_clean(p);
	pgr_pool_destroy(p);
	PQfinish(admin);
}
