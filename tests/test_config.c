/* SPDX-License-Identifier: PostgreSQL */
/* Config validation: each bad field is refused with -EINVAL and an event that names it. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

static struct tu_events ev;

static pgr_config base(void)
{
	pgr_config c;
	pgr_config_init(&c);
	c.conninfo = "host=127.0.0.1 port=1 dbname=x";
	tu_events_init(&ev);
	c.on_event = tu_events_cb;
	c.user_data = &ev;
	return c;
}

static void expect_rejected(pgr_config *c, const char *field)
{
	pgr_pool *p = (pgr_pool *)0x1;
	int rc = pgr_pool_create(c, &p);
	cr_assert_eq(rc, -EINVAL, "field %s: rc=%d", field, rc);
	cr_assert_null(p, "no pool may be returned on error");
	cr_assert_eq(tu_events_count(&ev, PGR_EV_CONFIG_ERROR), 1);
	int i = tu_events_find(&ev, PGR_EV_CONFIG_ERROR, field);
	cr_assert_geq(i, 0, "config error event does not name %s", field);
	cr_assert_str_eq(ev.field[i], field);
}

Test(config, defaults_are_filled_in)
{
	pgr_config c;
	memset(&c, 0x5a, sizeof(c));
	pgr_config_init(&c);
	/* Every default the README's configuration table documents. */
	cr_assert_null(c.conninfo);
	cr_assert_str_eq(c.name, "default");
	cr_assert_eq(c.min_idle, 0);
	cr_assert_eq(c.max_size, 10);
	cr_assert_eq(c.max_overflow, 0);
	cr_assert_eq(c.max_waiters, 1024);
	cr_assert_eq(c.max_connecting, 4);
	cr_assert_eq(c.shards, 0, "0 = one shard per CPU");
	cr_assert_eq(c.acquire_timeout_ms, 30000);
	cr_assert_eq(c.connect_timeout_ms, 10000);
	cr_assert_eq(c.max_lifetime_ms, 1800000);
	cr_assert_eq(c.lifetime_jitter_ms, 0);
	cr_assert_eq(c.idle_timeout_ms, 600000);
	cr_assert_eq(c.ping_after_idle_ms, 30000);
	cr_assert_eq(c.check_after_idle_ms, 1);
	cr_assert_eq(c.ping_timeout_ms, 5000);
	cr_assert_eq(c.reset_timeout_ms, 5000);
	cr_assert_eq(c.keepalive_interval_ms, 0);
	cr_assert_eq(c.leak_threshold_ms, 0);
	cr_assert_eq(c.backoff_min_ms, 100);
	cr_assert_eq(c.backoff_max_ms, 10000);
	cr_assert_eq(c.tcp_user_timeout_ms, 30000);
	cr_assert_null(c.reset_sql);
	cr_assert(c.metrics);
	cr_assert(c.manager_thread);
	cr_assert_null(c.on_connect);
	cr_assert_null(c.on_event);
	cr_assert_null(c.user_data);
	cr_assert_eq(c.max_replica_lag_ms, 0, "lag bound off");
	cr_assert_eq(c.replica_lag_interval_ms, 1000);
	cr_assert_eq(c.replica_lag_grace_ms, 10000);
	cr_assert_eq(c.rebalance_interval_ms, 5000);
	cr_assert_not(c.pooler_keeps_prepared, "behind a pooler, no names unless asked");
}

Test(config, null_conninfo_rejected)
{
	pgr_config c = base();
	c.conninfo = NULL;
	expect_rejected(&c, "conninfo");
}

Test(config, unparsable_conninfo_rejected_with_libpq_message)
{
	pgr_config c = base();
	c.conninfo = "host=127.0.0.1 bogus_option=1";
	expect_rejected(&c, "conninfo");
	cr_assert(tu_events_find(&ev, PGR_EV_CONFIG_ERROR, "bogus_option") >= 0,
	          "message should quote libpq's complaint: %s", ev.msg[0]);
}

Test(config, zero_max_size_rejected)
{
	pgr_config c = base();
	c.max_size = 0;
	expect_rejected(&c, "max_size");
}

Test(config, min_idle_above_max_size_rejected)
{
	pgr_config c = base();
	c.max_size = 2;
	c.min_idle = 3;
	expect_rejected(&c, "min_idle");
}

Test(config, too_many_connections_rejected)
{
	pgr_config c = base();
	c.max_size = 4000;
	c.max_overflow = 200;
	expect_rejected(&c, "max_overflow");
}

Test(config, negative_acquire_timeout_rejected)
{
	pgr_config c = base();
	c.acquire_timeout_ms = -5;
	expect_rejected(&c, "acquire_timeout_ms");
}

Test(config, zero_connect_timeout_rejected)
{
	pgr_config c = base();
	c.connect_timeout_ms = 0;
	expect_rejected(&c, "connect_timeout_ms");
}

Test(config, negative_max_lifetime_rejected)
{
	pgr_config c = base();
	c.max_lifetime_ms = -1;
	expect_rejected(&c, "max_lifetime_ms");
}

Test(config, jitter_not_below_lifetime_rejected)
{
	pgr_config c = base();
	c.max_lifetime_ms = 1000;
	c.lifetime_jitter_ms = 1000;
	expect_rejected(&c, "lifetime_jitter_ms");
}

Test(config, negative_idle_timeout_rejected)
{
	pgr_config c = base();
	c.idle_timeout_ms = -1;
	expect_rejected(&c, "idle_timeout_ms");
}

Test(config, ping_after_idle_below_minus_one_rejected)
{
	pgr_config c = base();
	c.ping_after_idle_ms = -2;
	expect_rejected(&c, "ping_after_idle_ms");
}

Test(config, zero_ping_timeout_rejected)
{
	pgr_config c = base();
	c.ping_timeout_ms = 0;
	expect_rejected(&c, "ping_timeout_ms");
}

Test(config, negative_leak_threshold_rejected)
{
	pgr_config c = base();
	c.leak_threshold_ms = -1;
	expect_rejected(&c, "leak_threshold_ms");
}

Test(config, negative_keepalive_rejected)
{
	pgr_config c = base();
	c.keepalive_interval_ms = -1;
	expect_rejected(&c, "keepalive_interval_ms");
}

Test(config, backoff_max_below_min_rejected)
{
	pgr_config c = base();
	c.backoff_min_ms = 500;
	c.backoff_max_ms = 100;
	expect_rejected(&c, "backoff_max_ms");
}

Test(config, zero_max_connecting_rejected)
{
	pgr_config c = base();
	c.max_connecting = 0;
	expect_rejected(&c, "max_connecting");
}

Test(config, too_many_shards_rejected)
{
	pgr_config c = base();
	c.shards = 65;
	expect_rejected(&c, "shards");
}

Test(config, empty_reset_sql_rejected)
{
	pgr_config c = base();
	c.reset_sql = "";
	expect_rejected(&c, "reset_sql");
}

Test(config, null_arguments_rejected)
{
	pgr_pool *p;
	cr_assert_eq(pgr_pool_create(NULL, &p), -EINVAL);
	pgr_config c = base();
	cr_assert_eq(pgr_pool_create(&c, NULL), -EINVAL);
	pgr_conn *conn;
	cr_assert_eq(pgr_acquire(NULL, 0, &conn), -EINVAL);
}

Test(config, config_is_copied_at_create, .timeout = 30)
{
	char conninfo[256];
	snprintf(conninfo, sizeof(conninfo), "%s", tu_conninfo());
	char name[] = "copied";
	pgr_config c;
	pgr_config_init(&c);
	c.conninfo = conninfo;
	c.name = name;
	c.min_idle = c.max_size = 1;
	pgr_pool *p = tu_pool(&c);
	/* The caller's buffers may be reused at once. */
	memset(conninfo, 'x', sizeof(conninfo) - 1);
	memset(name, 'y', sizeof(name) - 1);
	pgr_conn *conn;
	cr_assert_eq(pgr_acquire(p, 2000, &conn), 0);
	pgr_discard(conn); /* forces a new connect with the copied conninfo */
	cr_assert_eq(pgr_acquire(p, 5000, &conn), 0);
	pgr_release(conn);
	char buf[8192];
	pgr_pool_prometheus(p, buf, sizeof(buf));
	cr_assert(strstr(buf, "pool=\"copied\""), "pool label lost");
	pgr_pool_destroy(p);
}

Test(config, strerror_names_every_code)
{
	cr_assert(strstr(pgr_strerror(-ETIMEDOUT), "timed out"));
	cr_assert(strstr(pgr_strerror(-ESHUTDOWN), "shutting down"));
	cr_assert_str_neq(pgr_strerror(-PGR_E_TOO_MANY_WAITERS),
	                  pgr_strerror(-PGR_E_CONNECT_FAILED));
	for (int e = PGR_E_BASE; e <= PGR_E_LAST; e++)
		cr_assert_null(strstr(pgr_strerror(-e), "unknown"), "code %d unnamed", e);
}

Test(config, negative_lifetime_jitter_rejected, .timeout = 10)
{
	pgr_config c = base();
	c.lifetime_jitter_ms = -1;
	expect_rejected(&c, "lifetime_jitter_ms");
}

Test(config, negative_check_after_idle_rejected, .timeout = 10)
{
	pgr_config c = base();
	c.check_after_idle_ms = -1;
	expect_rejected(&c, "check_after_idle_ms");
}

Test(config, zero_reset_timeout_rejected, .timeout = 10)
{
	pgr_config c = base();
	c.reset_timeout_ms = 0;
	expect_rejected(&c, "reset_timeout_ms");
}

Test(config, zero_backoff_min_rejected, .timeout = 10)
{
	pgr_config c = base();
	c.backoff_min_ms = 0;
	expect_rejected(&c, "backoff_min_ms");
}

Test(config, negative_tcp_user_timeout_rejected, .timeout = 10)
{
	pgr_config c = base();
	c.tcp_user_timeout_ms = -1;
	expect_rejected(&c, "tcp_user_timeout_ms");
}

Test(config, replica_fields_rejected_when_negative_or_inconsistent, .timeout = 10)
{
	pgr_config c = base();
	c.max_replica_lag_ms = -1;
	expect_rejected(&c, "max_replica_lag_ms");
	c = base();
	c.max_replica_lag_ms = 100;
	c.replica_lag_interval_ms = 0;
	expect_rejected(&c, "replica_lag_interval_ms");
	c = base();
	c.replica_lag_grace_ms = -1;
	expect_rejected(&c, "replica_lag_grace_ms");
	c = base();
	c.rebalance_interval_ms = -5;
	expect_rejected(&c, "rebalance_interval_ms");
}

Test(config, prepare_loop_query_other_than_zero_or_one_rejected, .timeout = 10)
{
	pgr_config c = base();
	c.prepare_loop_query = 2;
	expect_rejected(&c, "prepare_loop_query");
}

Test(config, exec_sync_group_above_1024_rejected, .timeout = 10)
{
	pgr_config c = base();
	c.exec_sync_group = 1025;
	expect_rejected(&c, "exec_sync_group");
}

/* libpq would refuse these in a blocking connect; the pool connects asynchronously, where
 * libpq does not look at them, so it refuses them itself at create. */
Test(config, connect_timeout_in_the_conninfo_that_is_not_whole_seconds_rejected, .timeout = 10)
{
	pgr_config c = base();
	c.conninfo = "host=127.0.0.1 port=1 dbname=x connect_timeout=2s";
	expect_rejected(&c, "conninfo connect_timeout");
	cr_assert(tu_events_find(&ev, PGR_EV_CONFIG_ERROR, "\"2s\"") >= 0, "%s", ev.msg[0]);
	/* Blanks alone, and whole numbers past an int, are refused by libpq too. */
	const char *bad[] = {"host=127.0.0.1 port=1 dbname=x connect_timeout=' '",
	                     "host=127.0.0.1 port=1 dbname=x connect_timeout=2147483648",
	                     "host=127.0.0.1 port=1 dbname=x connect_timeout=-2147483649"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		c = base();
		c.conninfo = bad[i];
		expect_rejected(&c, "conninfo connect_timeout");
	}
	/* Blanks around digits, a sign, 0 and negatives (no bound) are what libpq accepts. */
	const char *good[] = {"host=127.0.0.1 port=1 dbname=x connect_timeout=' 3 '",
	                      "host=127.0.0.1 port=1 dbname=x connect_timeout=+3",
	                      "host=127.0.0.1 port=1 dbname=x connect_timeout=0",
	                      "host=127.0.0.1 port=1 dbname=x connect_timeout=-1",
	                      "host=127.0.0.1 port=1 dbname=x connect_timeout=2147483647"};
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		c = base();
		c.conninfo = good[i];
		pgr_pool *p = NULL;
		cr_assert_eq(pgr_pool_create(&c, &p), 0, "%s refused", good[i]);
		pgr_pool_destroy(p);
	}
}

Test(config, pgconnect_timeout_that_is_not_whole_seconds_rejected, .timeout = 10)
{
	pgr_config c = base();
	setenv("PGCONNECT_TIMEOUT", "soon", 1);
	expect_rejected(&c, "PGCONNECT_TIMEOUT");
	/* The conninfo's own value takes precedence, as in libpq. */
	pgr_config d = base();
	d.conninfo = "host=127.0.0.1 port=1 dbname=x connect_timeout=5";
	d.min_idle = 0;
	pgr_pool *p = NULL;
	cr_assert_eq(pgr_pool_create(&d, &p), 0);
	pgr_pool_destroy(p);
	unsetenv("PGCONNECT_TIMEOUT");
}
