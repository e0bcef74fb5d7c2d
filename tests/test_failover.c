/* SPDX-License-Identifier: PostgreSQL */
/*
 * A primary with streaming standbys (scripts/pg_replica.sh, started and removed by each test):
 * failover under write load, switchover, role changes seen without a round trip, and connects
 * spread over replicas. Each test prints its measured figures (cr_log_info, --verbose).
 */
#include <errno.h>
#include <libgen.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "replset.h"
#include "testutil.h"

/* ---- writers ---- */

#define WRITERS    4
#define MAX_WRITES 200000

struct writes {
	pgr_pool *p;
	_Atomic int stop;
	_Atomic long next_id;
	/* per write id: 1 = acknowledged, 2 = failed */
	_Atomic uint8_t outcome[MAX_WRITES];
	_Atomic long ok, failed, ro_errors, dead_port_checkouts;
	_Atomic int64_t first_fail_ms, last_fail_ms, first_ok_after_ms;
	_Atomic int64_t ok_after_since_ms; /* set by the test: record the first success after */
	_Atomic int dead_port;             /* checkouts landing here after dead_since count */
	_Atomic int64_t dead_since_ms;
	_Atomic int last_ok_port;
	_Atomic int64_t
	    max_write_ms; /* longest write, acquire included: the outage a caller feels */
};

static void *writer(void *arg)
{
	struct writes *W = arg;
	while (!atomic_load(&W->stop)) {
		long id = atomic_fetch_add(&W->next_id, 1);
		if (id >= MAX_WRITES)
			break;
		int64_t t0 = tu_now_ms();
		pgr_conn *c;
		int rc = pgr_acquire(W->p, 1000, &c);
		bool ok = false;
		if (rc == 0) {
			PGconn *pg = pgr_conn_pg(c);
			int port = atoi(PQport(pg));
			int64_t since = atomic_load(&W->dead_since_ms);
			if (since && t0 >= since && port == atomic_load(&W->dead_port))
				atomic_fetch_add(&W->dead_port_checkouts, 1);
			char sql[96];
			snprintf(sql, sizeof(sql), "insert into w(id) values (%ld)", id);
			PGresult *r = PQexec(pg, sql);
			ok = PQresultStatus(r) == PGRES_COMMAND_OK;
			const char *ss = PQresultErrorField(r, PG_DIAG_SQLSTATE);
			if (!ok && ss && strcmp(ss, "25006") == 0)
				atomic_fetch_add(&W->ro_errors, 1);
			PQclear(r);
			if (ok)
				atomic_store(&W->last_ok_port, port);
			pgr_release(c);
		}
		int64_t t1 = tu_now_ms();
		int64_t prev = atomic_load(&W->max_write_ms);
		while (t1 - t0 > prev &&
		       !atomic_compare_exchange_weak(&W->max_write_ms, &prev, t1 - t0))
			;
		atomic_store(&W->outcome[id], ok ? 1 : 2);
		if (ok) {
			atomic_fetch_add(&W->ok, 1);
			int64_t since = atomic_load(&W->ok_after_since_ms);
			int64_t zero = 0;
			if (since && t0 >= since)
				atomic_compare_exchange_strong(&W->first_ok_after_ms, &zero, t1);
		} else {
			atomic_fetch_add(&W->failed, 1);
			int64_t zero = 0;
			atomic_compare_exchange_strong(&W->first_fail_ms, &zero, t0);
			atomic_store(&W->last_fail_ms, t1);
			tu_sleep_ms(5); /* a failing server: do not spin */
		}
		tu_sleep_ms(1);
	}
	return NULL;
}

static pgr_pool *failover_pool(const char *ci, struct tu_events *ev)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = 2;
	cfg.max_size = 4;
	cfg.backoff_min_ms = 50;
	cfg.backoff_max_ms = 500;
	cfg.connect_timeout_ms = 2000;
	cfg.check_after_idle_ms = 0;
	cfg.on_event = tu_events_cb;
	cfg.user_data = ev;
	return tu_pool(&cfg);
}

/* Every acknowledged write is on `node`; returns how many ids it holds. */
static long check_acknowledged(struct rs *r, int node, struct writes *W)
{
	PGconn *c = rs_connect(r, node);
	PGresult *res = PQexec(c, "select id from w");
	cr_assert_eq(PQresultStatus(res), PGRES_TUPLES_OK, "%s", PQerrorMessage(c));
	static uint8_t present[MAX_WRITES];
	memset(present, 0, sizeof(present));
	long n = PQntuples(res);
	for (long i = 0; i < n; i++) {
		long id = atol(PQgetvalue(res, (int)i, 0));
		if (id >= 0 && id < MAX_WRITES)
			present[id] = 1;
	}
	PQclear(res);
	PQfinish(c);
	long lost = 0, upto = atomic_load(&W->next_id);
	for (long id = 0; id < upto && id < MAX_WRITES; id++)
		if (atomic_load(&W->outcome[id]) == 1 && !present[id])
			lost++;
	cr_assert_eq(lost, 0, "%ld acknowledged commits are not on the new primary", lost);
	return n;
}

static void writers_run(struct writes *W, pthread_t *t)
{
	for (int i = 0; i < WRITERS; i++)
		pthread_create(&t[i], NULL, writer, W);
}

static void writers_stop(struct writes *W, pthread_t *t)
{
	atomic_store(&W->stop, 1);
	for (int i = 0; i < WRITERS; i++)
		pthread_join(t[i], NULL);
}

Test(failover, killed_primary_and_promoted_standby_lose_no_acknowledged_commit, .timeout = 90,
     .fini = rs_fini)
{
	struct rs r;
	rs_start(&r, 1, true);
	PGconn *a = rs_connect(&r, 0);
	tu_exec(a, "create table w(id bigint primary key)");
	PQfinish(a);
	int nodes[] = {0, 1};
	char *ci = rs_conninfo(&r, nodes, 2, "read-write");
	struct tu_events ev;
	tu_events_init(&ev);
	static struct writes W;
	memset(&W, 0, sizeof(W));
	W.p = failover_pool(ci, &ev);
	pthread_t t[WRITERS];
	writers_run(&W, t);
	tu_sleep_ms(1000);
	long before = atomic_load(&W.ok);
	rs_node(&r, "kill", "primary");
	int64_t killed = tu_now_ms();
	atomic_store(&W.dead_port, r.port[0]);
	atomic_store(&W.dead_since_ms, killed);
	/* A promotion a little later, as a failover manager would decide it. */
	tu_sleep_ms(300);
	rs_node(&r, "promote", "standby1");
	int64_t promoted = tu_now_ms();
	atomic_store(&W.ok_after_since_ms, promoted);
	bool resumed = TU_WAIT_UNTIL(atomic_load(&W.first_ok_after_ms) != 0, 10000);
	tu_sleep_ms(500);
	writers_stop(&W, t);
	cr_assert(resumed, "writes did not resume after the promotion");
	int64_t resume_ms = atomic_load(&W.first_ok_after_ms) - promoted;
	int64_t outage = atomic_load(&W.last_fail_ms) - atomic_load(&W.first_fail_ms);
	long held = check_acknowledged(&r, 1, &W);
	cr_log_info(
	    "kill+promote (sync): %ld writes acknowledged (%ld before the kill), %ld failed, "
	    "outage %lld ms (first to last failed write; promotion %lld ms after the kill), "
	    "writes resumed %lld ms after the promotion, %ld rows on the new primary, "
	    "0 acknowledged commits lost, %ld checkouts of the dead host after the kill, "
	    "longest write %lld ms",
	    atomic_load(&W.ok), before, atomic_load(&W.failed), (long long)outage,
	    (long long)(promoted - killed), (long long)resume_ms, held,
	    atomic_load(&W.dead_port_checkouts), (long long)atomic_load(&W.max_write_ms));
	/*
	 * The pool retries a failing server after a backoff of at most backoff_max_ms (500 ms),
	 * and one connect on loopback takes milliseconds; 1 s on top covers a loaded machine.
	 */
	cr_assert_lt(resume_ms, 500 + 1000, "writes resumed %lld ms after the promotion",
	             (long long)resume_ms);
	cr_assert_eq(atomic_load(&W.dead_port_checkouts), 0,
	             "connections to the killed primary were handed out after its death");
	cr_assert_eq(atomic_load(&W.last_ok_port), r.port[1]);
	pgr_pool_destroy(W.p);
	free(ci);
	rs_stop(&r);
}

Test(failover, switchover_retires_connections_that_hit_a_read_only_server, .timeout = 90,
     .fini = rs_fini)
{
	struct rs r;
	rs_start(&r, 1, false);
	PGconn *a = rs_connect(&r, 0);
	tu_exec(a, "create table w(id bigint primary key)");
	int nodes[] = {0, 1};
	char *ci = rs_conninfo(&r, nodes, 2, "read-write");
	struct tu_events ev;
	tu_events_init(&ev);
	static struct writes W;
	memset(&W, 0, sizeof(W));
	W.p = failover_pool(ci, &ev);
	pthread_t t[WRITERS];
	writers_run(&W, t);
	tu_sleep_ms(1000);
	rs_node(&r, "read-only", "primary on");
	int64_t ro = tu_now_ms();
	/*
	 * Backends apply a reload when their next command arrives, and SIGHUP reaches them late
	 * on a loaded machine: commits go on for a moment after the reload. Wait until none has
	 * been acknowledged for 300 ms, so the LSN below is the old primary's last commit.
	 */
	long last_ok = -1;
	int64_t quiet_since = tu_now_ms();
	while (tu_now_ms() - quiet_since < 300 && tu_now_ms() - ro < 10000) {
		long now_ok = atomic_load(&W.ok);
		if (now_ok != last_ok) {
			last_ok = now_ok;
			quiet_since = tu_now_ms();
		}
		tu_sleep_ms(10);
	}
	/* The standby replays up to the read-only primary's last commit, then takes over. */
	PGconn *s = rs_connect(&r, 1);
	char lsn[64];
	/*
	 * The insert position, not the write position: the throwaway cluster runs with
	 * synchronous_commit = off, so a commit can be acknowledged before its WAL is written,
	 * and pg_current_wal_lsn() would leave such commits out of the catch-up.
	 */
	PGresult *res = PQexec(a, "select pg_current_wal_insert_lsn()");
	snprintf(lsn, sizeof(lsn), "%s", PQgetvalue(res, 0, 0));
	PQclear(res);
	char q[160];
	snprintf(q, sizeof(q), "select (pg_last_wal_replay_lsn() >= '%s')::int", lsn);
	cr_assert(TU_WAIT_UNTIL(tu_query_long(s, q) == 1, 10000), "standby did not catch up");
	PQfinish(s);
	rs_node(&r, "promote", "standby1");
	int64_t promoted = tu_now_ms();
	atomic_store(&W.ok_after_since_ms, promoted);
	bool resumed = TU_WAIT_UNTIL(atomic_load(&W.first_ok_after_ms) != 0, 10000);
	tu_sleep_ms(500);
	writers_stop(&W, t);
	cr_assert(resumed, "writes did not resume after the promotion");
	pgr_stats st = tu_stats(W.p);
	int64_t outage = atomic_load(&W.last_fail_ms) - atomic_load(&W.first_fail_ms);
	long held = check_acknowledged(&r, 1, &W);
	cr_log_info("switchover: %ld writes acknowledged, %ld failed (%ld with 25006), outage "
	            "%lld ms (promotion %lld ms after read-only), writes resumed %lld ms after the "
	            "promotion; closes: server_error %llu role_changed %llu; %ld rows on the new "
	            "primary; longest write %lld ms",
	            atomic_load(&W.ok), atomic_load(&W.failed), atomic_load(&W.ro_errors),
	            (long long)outage, (long long)(promoted - ro),
	            (long long)(atomic_load(&W.first_ok_after_ms) - promoted),
	            (unsigned long long)st.closes_by_reason[PGR_CLOSE_SERVER_ERROR],
	            (unsigned long long)st.closes_by_reason[PGR_CLOSE_ROLE_CHANGED], held,
	            (long long)atomic_load(&W.max_write_ms));
	/* Each connection that hit 25006 was retired for it, and none was used again. */
	cr_assert_eq(st.closes_by_reason[PGR_CLOSE_SERVER_ERROR],
	             (uint64_t)atomic_load(&W.ro_errors));
	cr_assert_gt(atomic_load(&W.ro_errors), 0, "no writer ran into the read-only primary");
	cr_assert_eq(atomic_load(&W.last_ok_port), r.port[1],
	             "new writes did not land on the new primary");
	PQfinish(a);
	pgr_pool_destroy(W.p);
	free(ci);
	rs_stop(&r);
}

/* ---- roles seen without a round trip ---- */

Test(roles, a_pinged_connection_to_a_read_only_primary_is_never_handed_out, .timeout = 90,
     .fini = rs_fini)
{
	struct rs r;
	rs_start(&r, 1, false);
	PGconn *a = rs_connect(&r, 0);
	tu_exec(a, "create table w(id bigint primary key)");
	PQfinish(a);
	int nodes[] = {0, 1};
	char *ci = rs_conninfo(&r, nodes, 2, "read-write");
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = 3;
	cfg.max_size = 3;
	cfg.ping_after_idle_ms = 0; /* pre-ping every checkout */
	cfg.backoff_min_ms = 50;
	cfg.backoff_max_ms = 200;
	pgr_pool *p = tu_pool(&cfg);
	rs_node(&r, "read-only", "primary on");
	/*
	 * A backend applies the reload when its next command arrives, but only once the
	 * postmaster's SIGHUP has reached it, which on a loaded machine takes a while: until then
	 * no ping can see the change. Wait for a new session to see it, then for the signal to
	 * reach the pool's idle backends (they are idle, so it is a matter of delivery).
	 */
	PGconn *probe = rs_connect(&r, 0);
	cr_assert(TU_WAIT_UNTIL(tu_query_long(probe,
	                                      "select (current_setting("
	                                      "'default_transaction_read_only') = 'on')::int") == 1,
	                        5000),
	          "the primary never turned read-only");
	PQfinish(probe);
	tu_sleep_ms(300);
	long ro_errors = 0, timeouts = 0;
	for (int i = 0; i < 20; i++) {
		pgr_conn *c;
		int rc = pgr_acquire(p, 100, &c);
		if (rc) {
			timeouts++;
			continue;
		}
		char sql[64];
		snprintf(sql, sizeof(sql), "insert into w(id) values (%d)", i);
		PGresult *res = PQexec(pgr_conn_pg(c), sql);
		const char *ss = PQresultErrorField(res, PG_DIAG_SQLSTATE);
		if (ss && strcmp(ss, "25006") == 0)
			ro_errors++;
		PQclear(res);
		pgr_release(c);
	}
	pgr_stats st = tu_stats(p);
	cr_log_info("read-write pool after read-only: %ld 25006 seen, %ld checkouts timed out, "
	            "role_changed closes %llu",
	            ro_errors, timeouts,
	            (unsigned long long)st.closes_by_reason[PGR_CLOSE_ROLE_CHANGED]);
	cr_assert_eq(ro_errors, 0, "a caller got a connection to the read-only server");
	cr_assert_eq(st.closes_by_reason[PGR_CLOSE_ROLE_CHANGED], 3);
	/* No read-write server is left until the promotion; then the pool recovers. */
	rs_node(&r, "promote", "standby1");
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 5000, &c), 0);
	cr_assert_eq(atoi(PQport(pgr_conn_pg(c))), r.port[1]);
	pgr_release(c);
	pgr_pool_destroy(p);
	free(ci);
	rs_stop(&r);
}

Test(roles, a_standby_pool_leaves_a_promoted_standby_for_another, .timeout = 90, .fini = rs_fini)
{
	struct rs r;
	rs_start(&r, 2, false);
	int nodes[] = {1, 2};
	char *ci = rs_conninfo(&r, nodes, 2, "standby");
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = 4;
	cfg.max_size = 4;
	cfg.keepalive_interval_ms = 100;
	cfg.ping_after_idle_ms = -1;
	pgr_pool *p = tu_pool(&cfg);
	int ports[4];
	rs_pool_ports(p, 4, ports);
	int on1 = rs_count_port(ports, 4, r.port[1]);
	cr_assert_gt(on1, 0, "no connection on standby1 to begin with");
	rs_node(&r, "promote", "standby1");
	int64_t t0 = tu_now_ms();
	/* Keepalive pings carry in_hot_standby=off from the promoted server: retired, and the
	 * reconnects skip it (libpq's target_session_attrs). */
	bool moved =
	    TU_WAIT_UNTIL(tu_stats(p).closes_by_reason[PGR_CLOSE_ROLE_CHANGED] >= (uint64_t)on1 &&
	                      tu_stats(p).idle == 4,
	                  5000);
	int64_t took = tu_now_ms() - t0;
	cr_assert(moved, "role_changed closes %llu of %d",
	          (unsigned long long)tu_stats(p).closes_by_reason[PGR_CLOSE_ROLE_CHANGED], on1);
	rs_pool_ports(p, 4, ports);
	cr_log_info("standby pool: %d connections left the promoted standby within %lld ms "
	            "(keepalive 100 ms)",
	            on1, (long long)took);
	cr_assert_eq(rs_count_port(ports, 4, r.port[2]), 4,
	             "connections still on the promoted server");
	pgr_pool_destroy(p);
	free(ci);
	rs_stop(&r);
}

/* ---- replicas ---- */

Test(replicas, connections_spread_over_the_standbys_and_come_back_to_a_returning_one, .timeout = 90,
     .fini = rs_fini)
{
	struct rs r;
	rs_start(&r, 2, false);
	int nodes[] = {1, 2};
	char *ci = rs_conninfo(&r, nodes, 2, "read-only");
	pgr_config cfg;
	rs_standby_pool_config(&cfg, ci);
	/* Connections are replaced within about a second: how traffic finds a returning one. */
	cfg.max_lifetime_ms = 1000;
	cfg.lifetime_jitter_ms = 500;
	pgr_pool *p = tu_pool(&cfg);
	int ports[6];
	rs_pool_ports(p, 6, ports);
	int a = rs_count_port(ports, 6, r.port[1]), b = rs_count_port(ports, 6, r.port[2]);
	cr_log_info("spread over two standbys: %d / %d", a, b);
	cr_assert_eq(a, 3);
	cr_assert_eq(b, 3);
	/* standby2 goes down: its connections fail over to standby1. */
	rs_node(&r, "server-stop", "standby2");
	int64_t t0 = tu_now_ms();
	cr_assert(TU_WAIT_UNTIL(({
		                        rs_pool_ports(p, 6, ports);
		                        rs_count_port(ports, 6, r.port[1]) == 6;
	                        }),
	                        10000));
	int64_t gone = tu_now_ms() - t0;
	rs_node(&r, "server-start", "standby2");
	t0 = tu_now_ms();
	/* Replaced connections start their connect at the next host in turn: about half of them
	 * go back. One lifetime (1 s) replaces every connection; 2 s more covers backoff and a
	 * loaded machine. */
	bool back = TU_WAIT_UNTIL(({
		                          rs_pool_ports(p, 6, ports);
		                          rs_count_port(ports, 6, r.port[2]) >= 2;
	                          }),
	                          3000);
	int64_t returned = tu_now_ms() - t0;
	cr_log_info("standby2 down: all 6 on standby1 within %lld ms; back up: %d on standby2 "
	            "after %lld ms (max_lifetime_ms 1000)",
	            (long long)gone, rs_count_port(ports, 6, r.port[2]), (long long)returned);
	cr_assert(back, "connections did not come back to the returning standby");
	pgr_pool_destroy(p);
	free(ci);
	rs_stop(&r);
}
