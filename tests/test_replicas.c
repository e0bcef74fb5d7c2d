/* SPDX-License-Identifier: PostgreSQL */
/*
 * Read pools over two streaming standbys (scripts/pg_replica.sh): the replication-lag bound
 * (max_replica_lag_ms) with one standby's replay paused while the primary writes, and
 * rebalancing onto a standby that comes back after being down. Each test prints its measured
 * figures (cr_log_info, --verbose).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "replset.h"
#include "testutil.h"

/* ---- a writer on the primary: WAL for a paused standby to fall behind on ---- */

struct writer {
	PGconn *pg;
	pthread_t t;
	_Atomic int stop;
};

static void *write_loop(void *arg)
{
	struct writer *w = arg;
	while (!atomic_load(&w->stop)) {
		PGresult *r = PQexec(w->pg, "insert into lagw values (1)");
		PQclear(r);
		tu_sleep_ms(10);
	}
	return NULL;
}

static void writer_start(struct writer *w, struct rs *r)
{
	memset(w, 0, sizeof(*w));
	w->pg = rs_connect(r, 0);
	pthread_create(&w->t, NULL, write_loop, w);
}

static void writer_stop(struct writer *w)
{
	atomic_store(&w->stop, 1);
	pthread_join(w->t, NULL);
	PQfinish(w->pg);
}

/*
 * Check out every connection that is idle and may be handed out (timeout 0: nothing waits,
 * nothing is connected for the sweep), count them per port, and give them back.
 */
struct sweep {
	int on[3]; /* by node: 1 standby1, 2 standby2 */
	int n;
};

static struct sweep sweep(pgr_pool *p, struct rs *r)
{
	struct sweep s = {0};
	pgr_conn *c[8];
	while (s.n < 8 && pgr_acquire(p, 0, &c[s.n]) == 0) {
		int port = atoi(PQport(pgr_conn_pg(c[s.n])));
		for (int k = 1; k <= 2; k++)
			s.on[k] += port == r->port[k];
		s.n++;
	}
	for (int i = 0; i < s.n; i++)
		pgr_release(c[i]);
	return s;
}

Test(replicas, a_lagging_standby_is_not_used_until_it_catches_up, .timeout = 100, .fini = rs_fini)
{
	struct rs r;
	rs_start(&r, 2, false);
	PGconn *a = rs_connect(&r, 0);
	tu_exec(a, "create table lagw(v int)");
	PQfinish(a);
	int nodes[] = {1, 2};
	char *ci = rs_conninfo(&r, nodes, 2, "standby");
	pgr_config cfg;
	rs_standby_pool_config(&cfg, ci);
	cfg.connect_timeout_ms = 2000;
	cfg.max_replica_lag_ms = 500;
	cfg.replica_lag_interval_ms = 100;
	cfg.replica_lag_grace_ms = 1000;
	cfg.rebalance_interval_ms = 200;
	pgr_pool *p = tu_pool(&cfg);
	struct sweep s;
	cr_assert(TU_WAIT_UNTIL((s = sweep(p, &r)).on[1] == 3 && s.on[2] == 3, 10000),
	          "no 3/3 spread to begin with: %d / %d", s.on[1], s.on[2]);

	/* standby1 stops replaying while the primary writes. */
	rs_node(&r, "pause", "standby1");
	struct writer w;
	writer_start(&w, &r);
	int64_t t0 = tu_now_ms(), last_on1 = t0, window_end = t0 + 4500;
	long sweeps = 0, served = 0;
	while (tu_now_ms() < window_end) {
		s = sweep(p, &r);
		if (s.on[1])
			last_on1 = tu_now_ms();
		served += s.on[2];
		sweeps++;
		tu_sleep_ms(20);
	}
	int64_t stop_ms = last_on1 - t0;
	pgr_stats st = tu_stats(p);
	cr_log_info("lag bound 500 ms (measured every 100 ms): standby1 paused; its connections "
	            "stopped being handed out %lld ms after the pause; %ld sweeps, %ld checkouts "
	            "on standby2 meanwhile; replica_lag closes %llu",
	            (long long)stop_ms, sweeps, served,
	            (unsigned long long)st.closes_by_reason[PGR_CLOSE_REPLICA_LAG]);
	/*
	 * Seen within the bound plus two measurement intervals (the first measurement that finds
	 * WAL not yet replayed starts the clock); 1.5 s on top covers a loaded machine. The rest
	 * of the window (about 2 s) proves it stays so, across the grace period's closes and the
	 * reconnects that probe standby1 again.
	 */
	cr_assert_lt(stop_ms, 500 + 200 + 1500, "standby1 was still used %lld ms after the pause",
	             (long long)stop_ms);
	cr_assert_gt(served, 0, "standby2 served nothing meanwhile");
	/* Past the grace period with standby2 fit: the held connections were closed. */
	cr_assert_gt(st.closes_by_reason[PGR_CLOSE_REPLICA_LAG], 0);
	cr_assert(TU_WAIT_UNTIL((s = sweep(p, &r)).on[2] >= 5 && s.on[1] == 0, 5000),
	          "the pool did not move to standby2: %d / %d", s.on[1], s.on[2]);

	rs_node(&r, "resume", "standby1");
	int64_t t1 = tu_now_ms();
	bool back = TU_WAIT_UNTIL((s = sweep(p, &r)).on[1] > 0, 8000);
	int64_t back_ms = tu_now_ms() - t1;
	bool even = TU_WAIT_UNTIL((s = sweep(p, &r)).on[1] == 3 && s.on[2] == 3, 8000);
	int64_t even_ms = tu_now_ms() - t1;
	writer_stop(&w);
	cr_log_info("standby1 resumed: first checkout on it after %lld ms, spread %d / %d after "
	            "%lld ms",
	            (long long)back_ms, s.on[1], s.on[2], (long long)even_ms);
	cr_assert(back, "traffic never came back to standby1");
	cr_assert(even, "the spread did not even out again: %d / %d", s.on[1], s.on[2]);
	pgr_pool_destroy(p);
	free(ci);
	rs_stop(&r);
}

Test(replicas, connections_move_back_to_a_standby_that_returns, .timeout = 100, .fini = rs_fini)
{
	struct rs r;
	rs_start(&r, 2, false);
	int nodes[] = {1, 2};
	char *ci = rs_conninfo(&r, nodes, 2, "standby");
	pgr_config cfg;
	rs_standby_pool_config(&cfg, ci);
	cfg.connect_timeout_ms = 2000;
	cfg.rebalance_interval_ms = 200;
	/* The default lifetime (30 min): only rebalancing can bring connections back. */
	pgr_pool *p = tu_pool(&cfg);
	int ports[6];
	rs_pool_ports(p, 6, ports);
	int a = rs_count_port(ports, 6, r.port[1]), b = rs_count_port(ports, 6, r.port[2]);
	cr_assert(a == 3 && b == 3, "spread %d / %d", a, b);
	rs_node(&r, "server-stop", "standby2");
	cr_assert(TU_WAIT_UNTIL(({
		                        rs_pool_ports(p, 6, ports);
		                        rs_count_port(ports, 6, r.port[1]) == 6;
	                        }),
	                        10000));
	/* Down for a while: aimed connects land on standby1 and back off. */
	uint64_t rb0 = tu_stats(p).closes_by_reason[PGR_CLOSE_REBALANCE];
	tu_sleep_ms(2000);
	uint64_t rb_down = tu_stats(p).closes_by_reason[PGR_CLOSE_REBALANCE] - rb0;
	rs_node(&r, "server-start", "standby2");
	int64_t t0 = tu_now_ms();
	bool even = TU_WAIT_UNTIL(({
		                          rs_pool_ports(p, 6, ports);
		                          rs_count_port(ports, 6, r.port[2]) == 3;
	                          }),
	                          6000);
	int64_t took = tu_now_ms() - t0;
	a = rs_count_port(ports, 6, r.port[1]);
	b = rs_count_port(ports, 6, r.port[2]);
	pgr_stats st = tu_stats(p);
	cr_log_info("rebalance: 3/3, 6/0 with standby2 down (%llu rebalance attempts in 2 s while "
	            "down), %d/%d %lld ms after it came back; rebalance closes %llu",
	            (unsigned long long)rb_down, a, b, (long long)took,
	            (unsigned long long)st.closes_by_reason[PGR_CLOSE_REBALANCE]);
	cr_assert(even, "spread %d / %d after %lld ms", a, b, (long long)took);
	/* Backing off a host that stays down: a few attempts, not one per interval. */
	cr_assert_leq(rb_down, 6);
	pgr_pool_destroy(p);
	free(ci);
	rs_stop(&r);
}

/*
 * A busy pool: the lagging standby's connection is never idle when the manager looks for one
 * to measure it on, because each return is followed at once by another checkout. The next
 * checkout must hand it to the manager to be measured instead of serving stale reads forever.
 */
Test(replicas, a_standby_whose_connections_are_always_checked_out_is_still_measured, .timeout = 100,
     .fini = rs_fini)
{
	struct rs r;
	rs_start(&r, 2, false);
	PGconn *a = rs_connect(&r, 0);
	tu_exec(a, "create table lagw(v int)");
	PQfinish(a);
	int nodes[] = {1, 2};
	char *ci = rs_conninfo(&r, nodes, 2, "standby");
	pgr_config cfg;
	rs_standby_pool_config(&cfg, ci);
	cfg.min_idle = 2;
	cfg.max_size = 2;
	cfg.connect_timeout_ms = 2000;
	cfg.max_replica_lag_ms = 300;
	cfg.replica_lag_interval_ms = 100;
	cfg.replica_lag_grace_ms = 60000; /* held, not closed, for the whole test */
	cfg.rebalance_interval_ms = 0;
	pgr_pool *p = tu_pool(&cfg);
	struct sweep s;
	cr_assert(TU_WAIT_UNTIL((s = sweep(p, &r)).on[1] == 1 && s.on[2] == 1, 10000),
	          "no 1/1 spread to begin with: %d / %d", s.on[1], s.on[2]);
	/* The standby2 connection stays out; the standby1 one goes back and out again. */
	pgr_conn *c[2], *c1 = NULL, *c2 = NULL;
	for (int i = 0; i < 2; i++) {
		cr_assert_eq(pgr_acquire(p, 1000, &c[i]), 0);
		if (atoi(PQport(pgr_conn_pg(c[i]))) == r.port[1])
			c1 = c[i];
		else
			c2 = c[i];
	}
	cr_assert(c1 && c2);

	rs_node(&r, "pause", "standby1");
	struct writer w;
	writer_start(&w, &r);
	/* Seen within the bound plus two intervals; 1 s on top for a loaded machine. */
	int64_t t0 = tu_now_ms(), late_from = t0 + 300 + 200 + 1000, end = late_from + 1500;
	long on1 = 0, late = 0;
	while (tu_now_ms() < end) {
		if (c1) {
			PQclear(PQexec(pgr_conn_pg(c1), "select 1"));
			pgr_release(c1);
			c1 = NULL;
		}
		if (pgr_acquire(p, 100, &c1) != 0) {
			c1 = NULL;
			continue;
		}
		if (atoi(PQport(pgr_conn_pg(c1))) != r.port[1])
			continue;
		on1++;
		late += tu_now_ms() >= late_from;
	}
	cr_log_info("standby1 paused: %ld checkouts on it, %ld of them %lld ms or more after the "
	            "pause",
	            on1, late, (long long)(late_from - t0));
	cr_assert_eq(late, 0,
	             "standby1 was handed out %ld times %lld ms and more after its replay "
	             "paused (max_replica_lag_ms 300)",
	             late, (long long)(late_from - t0));
	if (c1)
		pgr_release(c1);
	pgr_release(c2);
	writer_stop(&w);
	rs_node(&r, "resume", "standby1");
	pgr_pool_destroy(p);
	free(ci);
	rs_stop(&r);
}

/*
 * The primary listed as a prefer-standby pool's fallback never gets a connection while the
 * standby is up: libpq passes over it for the standby. Rebalancing must not count it as the
 * least busy host, or it closes and reopens a connection every few intervals for nothing.
 */
Test(replicas, a_fallback_primary_that_never_served_the_pool_draws_no_rebalancing, .timeout = 100,
     .fini = rs_fini)
{
	struct rs r;
	rs_start(&r, 1, false);
	int nodes[] = {0, 1};
	char *ci = rs_conninfo(&r, nodes, 2, "prefer-standby");
	pgr_config cfg;
	rs_standby_pool_config(&cfg, ci);
	cfg.min_idle = 4;
	cfg.max_size = 4;
	cfg.rebalance_interval_ms = 100;
	pgr_pool *p = tu_pool(&cfg);
	int ports[4];
	rs_pool_ports(p, 4, ports);
	cr_assert_eq(rs_count_port(ports, 4, r.port[1]), 4, "not all on the standby");
	tu_sleep_ms(2500);
	pgr_stats st = tu_stats(p);
	cr_assert_eq(st.closes_by_reason[PGR_CLOSE_REBALANCE], 0,
	             "%llu rebalance closes in 2.5 s with nothing changing",
	             (unsigned long long)st.closes_by_reason[PGR_CLOSE_REBALANCE]);
	rs_pool_ports(p, 4, ports);
	cr_assert_eq(rs_count_port(ports, 4, r.port[1]), 4);
	pgr_pool_destroy(p);
	free(ci);
	rs_stop(&r);
}
