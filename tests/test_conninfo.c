/* SPDX-License-Identifier: PostgreSQL */
/*
 * What the pool adds to the caller's conninfo, seen where it takes effect (the socket's
 * options, the server's view of the session), and connections over the unix socket.
 * Also the return of a connection with a query still running (closed as active_query).
 */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>

#include "testutil.h"

static int sockopt(PGconn *pg, int level, int name)
{
	int v = -1;
	socklen_t len = sizeof(v);
	cr_assert_eq(getsockopt(PQsocket(pg), level, name, &v, &len), 0);
	return v;
}

static const char *conninfo_value(PGconn *pg, const char *key, char *buf, size_t len)
{
	PQconninfoOption *o = PQconninfo(pg);
	cr_assert(o);
	buf[0] = 0;
	for (PQconninfoOption *i = o; i->keyword; i++)
		if (!strcmp(i->keyword, key) && i->val)
			snprintf(buf, len, "%s", i->val);
	PQconninfoFree(o);
	return buf;
}

static pgr_pool *one_conn(const char *conninfo)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = conninfo;
	cfg.min_idle = cfg.max_size = 1;
	return tu_pool(&cfg);
}

Test(conninfo, defaults_are_added_to_the_conninfo_and_reach_the_socket, .timeout = 30)
{
	pgr_pool *p = one_conn(tu_conninfo());
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
	PGconn *pg = pgr_conn_pg(c);
	/* keepalives=1, idle 30 s, interval 10 s, count 3; TCP_USER_TIMEOUT = 30000 ms. */
	cr_assert_eq(sockopt(pg, SOL_SOCKET, SO_KEEPALIVE), 1);
	cr_assert_eq(sockopt(pg, IPPROTO_TCP, TCP_KEEPIDLE), 30);
	cr_assert_eq(sockopt(pg, IPPROTO_TCP, TCP_KEEPINTVL), 10);
	cr_assert_eq(sockopt(pg, IPPROTO_TCP, TCP_KEEPCNT), 3);
	cr_assert_eq(sockopt(pg, IPPROTO_TCP, TCP_USER_TIMEOUT), 30000);
	char v[64];
	cr_assert_str_eq(conninfo_value(pg, "gssencmode", v, sizeof(v)), "disable");
	PGresult *r = PQexec(pg, "show application_name");
	cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK);
	cr_assert_str_eq(PQgetvalue(r, 0, 0), "pgring");
	PQclear(r);
	pgr_release(c);
	pgr_pool_destroy(p);
}

Test(conninfo, settings_in_the_conninfo_win_over_the_added_defaults, .timeout = 30)
{
	char ci[512];
	snprintf(ci, sizeof(ci),
	         "%s keepalives_idle=41 keepalives_interval=7 keepalives_count=5 "
	         "tcp_user_timeout=12345 application_name=mine",
	         tu_conninfo());
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = cfg.max_size = 1;
	cfg.tcp_user_timeout_ms = 999; /* the conninfo's tcp_user_timeout wins */
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
	PGconn *pg = pgr_conn_pg(c);
	cr_assert_eq(sockopt(pg, IPPROTO_TCP, TCP_KEEPIDLE), 41);
	cr_assert_eq(sockopt(pg, IPPROTO_TCP, TCP_KEEPINTVL), 7);
	cr_assert_eq(sockopt(pg, IPPROTO_TCP, TCP_KEEPCNT), 5);
	cr_assert_eq(sockopt(pg, IPPROTO_TCP, TCP_USER_TIMEOUT), 12345);
	PGresult *r = PQexec(pg, "show application_name");
	cr_assert_str_eq(PQgetvalue(r, 0, 0), "mine");
	PQclear(r);
	pgr_release(c);
	pgr_pool_destroy(p);
}

Test(conninfo, tcp_user_timeout_ms_reaches_the_socket, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = cfg.max_size = 1;
	cfg.tcp_user_timeout_ms = 4321;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
	cr_assert_eq(sockopt(pgr_conn_pg(c), IPPROTO_TCP, TCP_USER_TIMEOUT), 4321);
	pgr_release(c);
	pgr_pool_destroy(p);
}

Test(conninfo, unix_socket_conninfo_connects_and_serves_queries, .timeout = 30)
{
	pgr_pool *p = one_conn(tu_env("PGR_TEST_CONNINFO_UNIX"));
	PGconn *admin = tu_admin();
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
	PGconn *pg = pgr_conn_pg(c);
	cr_assert_eq(tu_query_long(pg, "select 41 + 1"), 42);
	/* The server sees a unix-socket client: no client address. */
	char sql[160];
	snprintf(sql, sizeof(sql),
	         "select count(*) from pg_stat_activity where pid = %d and client_addr is null",
	         PQbackendPID(pg));
	cr_assert_eq(tu_query_long(admin, sql), 1, "backend %d is not on the unix socket",
	             PQbackendPID(pg));
	pgr_release(c);
	cr_assert_eq(pgr_acquire(p, 1000, &c), 0, "the unix-socket connection was not reused");
	pgr_release(c);
	cr_assert_eq(tu_stats(p).connects_ok, 1);
	PQfinish(admin);
	pgr_pool_destroy(p);
}

Test(conninfo, connection_returned_with_a_query_running_is_closed_as_active_query, .timeout = 30)
{
	pgr_pool *p = one_conn(tu_conninfo());
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 1000, &c), 0);
	PGconn *pg = pgr_conn_pg(c);
	int pid = PQbackendPID(pg);
	cr_assert_eq(PQsendQuery(pg, "select pg_sleep(30)"), 1);
	cr_assert_eq(PQtransactionStatus(pg), PQTRANS_ACTIVE);
	cr_assert_eq(pgr_release(c), 0);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).closes_by_reason[PGR_CLOSE_ACTIVE_QUERY] == 1, 5000),
	          "not closed as active_query: closes=%llu",
	          (unsigned long long)tu_stats(p).closes);
	/* Never handed out again: the next checkout is another backend. */
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	cr_assert_neq(PQbackendPID(pgr_conn_pg(c)), pid);
	cr_assert_eq(tu_query_long(pgr_conn_pg(c), "select 1"), 1);
	pgr_release(c);
	cr_assert_eq(tu_stats(p).closes, 1, "closed for another reason too");
	pgr_pool_destroy(p);
}
