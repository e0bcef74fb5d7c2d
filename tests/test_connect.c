/* SPDX-License-Identifier: PostgreSQL */
/* Connect failures and authentication, against a real server and a dead port. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "testutil.h"

Test(connect, dead_port_fails_acquire_with_clear_error_and_does_not_spin, .timeout = 60)
{
	char conninfo[256];
	snprintf(conninfo, sizeof(conninfo),
	         "host=127.0.0.1 port=%d user=x dbname=x sslmode=disable", tu_dead_port());
	struct tu_events ev;
	tu_events_init(&ev);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = conninfo;
	cfg.max_size = 4;
	cfg.min_idle = 4;
	cfg.backoff_min_ms = 100;
	cfg.backoff_max_ms = 400;
	cfg.on_event = tu_events_cb;
	cfg.user_data = &ev;
	pgr_pool *p;
	cr_assert_eq(pgr_pool_create(&cfg, &p), 0);
	pgr_conn *c = NULL;
	int64_t t0 = tu_now_ms();
	int rc = pgr_acquire(p, 1000, &c);
	int64_t took = tu_now_ms() - t0;
	cr_assert_eq(rc, -PGR_E_CONNECT_FAILED, "rc=%d (%s)", rc, pgr_strerror(rc));
	/* An absolute futex deadline: never early; late by a few 4 ms scheduler quanta at most
	 * on a busy 2-CPU machine (40 ms leaves room for ten). */
	cr_assert(took >= 1000 - 1 && took < 1000 + 40, "took %lld ms for a 1000 ms deadline",
	          (long long)took);
	char err[512];
	pgr_pool_last_error(p, err, sizeof(err));
	cr_assert(strstr(err, "refused"), "last error should carry libpq's reason: %s", err);
	cr_assert_geq(tu_events_find(&ev, PGR_EV_CONNECT_FAILED, "refused"), 0);
	cr_assert_geq(tu_events_find(&ev, PGR_EV_ACQUIRE_TIMEOUT, "refused"), 0,
	              "the timeout event should name the connect error");
	/*
	 * ~1.2 s of a dead server with backoff 100 ms doubling to 400 ms and one probe at a time:
	 * attempts at about 0, 50-100, 150-300, 350-700, 550-1100 ms ... a handful, not thousands.
	 */
	tu_sleep_ms(200);
	pgr_stats s = tu_stats(p);
	cr_assert_geq(s.connects_failed, 2);
	cr_assert_leq(s.connects_failed, 12, "%llu connect attempts in ~1.2 s: connect storm",
	              (unsigned long long)s.connects_failed);
	cr_assert_eq(s.connects_ok, 0);
	cr_assert_eq(s.size, 0);
	pgr_pool_destroy(p);
}

Test(connect, try_acquire_opens_a_connection_in_the_background, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.max_size = 2;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *c;
	cr_assert_eq(pgr_try_acquire(p, &c), -EAGAIN);
	cr_assert(TU_WAIT_UNTIL(pgr_try_acquire(p, &c) == 0, 5000));
	pgr_release(c);
	cr_assert_leq(tu_stats(p).size, 2);
	pgr_pool_destroy(p);
}

Test(connect, scram_password_connects, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_env("PGR_TEST_CONNINFO_SCRAM");
	cfg.min_idle = cfg.max_size = 1;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
	PGresult *r = PQexec(pgr_conn_pg(c), "select current_user");
	cr_assert_str_eq(PQgetvalue(r, 0, 0), "pgr_scram");
	PQclear(r);
	pgr_release(c);
	pgr_pool_destroy(p);
}

Test(connect, wrong_password_event_names_auth_failure_without_password, .timeout = 30)
{
	const char *good = tu_env("PGR_TEST_CONNINFO_SCRAM");
	const char *pw = tu_env("PGR_TEST_PASSWORD");
	/* Same conninfo, a wrong password that is easy to spot if it leaks. */
	char bad[512];
	const char *at = strstr(good, pw);
	cr_assert(at);
	snprintf(bad, sizeof(bad), "%.*sWrongSecret-4242%s", (int)(at - good), good,
	         at + strlen(pw));
	struct tu_events ev;
	tu_events_init(&ev);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = bad;
	cfg.max_size = 1;
	cfg.on_event = tu_events_cb;
	cfg.user_data = &ev;
	pgr_pool *p;
	cr_assert_eq(pgr_pool_create(&cfg, &p), 0);
	pgr_conn *c;
	int rc = pgr_acquire(p, 500, &c);
	cr_assert_eq(rc, -PGR_E_CONNECT_FAILED, "rc=%d (%s)", rc, pgr_strerror(rc));
	cr_assert(TU_WAIT_UNTIL(tu_events_count(&ev, PGR_EV_CONNECT_FAILED) >= 1, 3000));
	int i = tu_events_find(&ev, PGR_EV_CONNECT_FAILED, "password authentication failed");
	cr_assert_geq(i, 0, "connect-failed event should name the auth failure: %s", ev.msg[0]);
	pthread_mutex_lock(&ev.lock);
	for (int k = 0; k < ev.n; k++)
		cr_assert_null(strstr(ev.msg[k], "WrongSecret-4242"), "password leaked: %s",
		               ev.msg[k]);
	pthread_mutex_unlock(&ev.lock);
	char err[512];
	pgr_pool_last_error(p, err, sizeof(err));
	cr_assert_null(strstr(err, "WrongSecret-4242"));
	pgr_pool_destroy(p);
}

/*
 * libpq never echoes a password, so a wrong password alone cannot show that scrubbing works.
 * Here the server echoes it: the password is also the name of a database that does not exist
 * (trust authentication ignores the password), and the FATAL names that database.
 */
Test(connect, password_echoed_by_the_server_is_scrubbed_from_events_and_last_error, .timeout = 30)
{
	const char *secret = "pgrSecret4242";
	char ci[512];
	snprintf(ci, sizeof(ci), "%s dbname=%s password=%s", tu_conninfo(), secret, secret);
	struct tu_events ev;
	tu_events_init(&ev);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.max_size = 1;
	cfg.on_event = tu_events_cb;
	cfg.user_data = &ev;
	pgr_pool *p;
	cr_assert_eq(pgr_pool_create(&cfg, &p), 0);
	pgr_conn *c;
	int rc = pgr_acquire(p, 2000, &c);
	cr_assert_eq(rc, -PGR_E_CONNECT_FAILED, "rc=%d (%s)", rc, pgr_strerror(rc));
	cr_assert(TU_WAIT_UNTIL(tu_events_count(&ev, PGR_EV_CONNECT_FAILED) >= 1, 3000));
	/* The server's message made it through, with the secret masked where it stood. */
	int i = tu_events_find(&ev, PGR_EV_CONNECT_FAILED, "does not exist");
	cr_assert_geq(i, 0, "connect-failed event should carry the server's FATAL: %s", ev.msg[0]);
	cr_assert(strstr(ev.msg[i], "*************"), "no mask where the secret was: %s",
	          ev.msg[i]);
	pthread_mutex_lock(&ev.lock);
	for (int k = 0; k < ev.n; k++)
		cr_assert_null(strstr(ev.msg[k], secret), "password leaked: %s", ev.msg[k]);
	pthread_mutex_unlock(&ev.lock);
	char err[512];
	pgr_pool_last_error(p, err, sizeof(err));
	cr_assert(strstr(err, "does not exist"), "last error: %s", err);
	cr_assert_null(strstr(err, secret), "password leaked in the last error: %s", err);
	pgr_pool_destroy(p);
}

static int set_app_name(PGconn *pg, void *ud)
{
	(*(int *)ud)++;
	PGresult *r = PQexec(pg, "set application_name = 'from_on_connect'");
	int ok = PQresultStatus(r) == PGRES_COMMAND_OK;
	PQclear(r);
	return ok ? 0 : -1;
}

static int refuse(PGconn *pg, void *ud)
{
	(void)pg;
	(*(int *)ud)++;
	return -1;
}

Test(connect, on_connect_refusal_fails_the_connect, .timeout = 30)
{
	struct tu_events ev;
	tu_events_init(&ev);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.max_size = 1;
	int calls = 0;
	cfg.on_connect = refuse;
	cfg.user_data = &calls;
	pgr_pool *p;
	cr_assert_eq(pgr_pool_create(&cfg, &p), 0);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 300, &c), -PGR_E_CONNECT_FAILED);
	cr_assert_geq(calls, 1);
	cr_assert_geq(tu_stats(p).connects_failed, 1);
	cr_assert_eq(tu_stats(p).size, 0);
	pgr_pool_destroy(p);
}

Test(connect, on_connect_runs_before_hand_out, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = cfg.max_size = 1;
	int calls = 0;
	cfg.on_connect = set_app_name;
	cfg.user_data = &calls;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
	PGresult *r = PQexec(pgr_conn_pg(c), "show application_name");
	cr_assert_str_eq(PQgetvalue(r, 0, 0), "from_on_connect");
	PQclear(r);
	pgr_release(c);
	cr_assert_eq(calls, 1);
	pgr_pool_destroy(p);
}

/* A listener that completes TCP handshakes (the kernel does, from its backlog) and never says a
 * word: a blackholed or stopped server as a client sees it. Returns its port; *fd to close. */
static int silent_listener(int *fd)
{
	int s = socket(AF_INET, SOCK_STREAM, 0);
	cr_assert_geq(s, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	cr_assert_eq(bind(s, (struct sockaddr *)&a, sizeof(a)), 0);
	cr_assert_eq(listen(s, 64), 0);
	socklen_t len = sizeof(a);
	cr_assert_eq(getsockname(s, (struct sockaddr *)&a, &len), 0);
	*fd = s;
	return ntohs(a.sin_port);
}

/*
 * The first host of a multi-host conninfo stalls: libpq leaves a host only when it refuses or
 * fails, so every connect would wait connect_timeout_ms there and fail, however many hosts
 * follow. The pool moves on to the next host after the timeout, and then starts its connects
 * past the stalled one for a while.
 */
Test(connect, a_stalled_first_host_gives_way_to_the_next, .timeout = 60)
{
	int fd;
	int silent = silent_listener(&fd);
	char conninfo[512];
	snprintf(conninfo, sizeof(conninfo),
	         "host=127.0.0.1,%s port=%d,%s user=pgr_trust dbname=postgres sslmode=disable",
	         tu_env("PGR_TEST_HOST"), silent, tu_env("PGR_TEST_PORT"));
	struct tu_events ev;
	tu_events_init(&ev);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = conninfo;
	cfg.min_idle = 0;
	cfg.max_size = 2;
	cfg.connect_timeout_ms = 1500;
	cfg.on_event = tu_events_cb;
	cfg.user_data = &ev;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *a, *b;
	int rc = pgr_acquire(p, 10000, &a);
	cr_assert_eq(rc, 0, "%s", pgr_strerror(rc));
	cr_assert_str_eq(PQport(pgr_conn_pg(a)), tu_env("PGR_TEST_PORT"));
	cr_assert_geq(tu_events_find(&ev, PGR_EV_CONNECT_FAILED, "trying the next host"), 0,
	              "the stall was not reported");
	/* The next connect starts past the stalled host: no second wait of connect_timeout_ms. */
	int64_t t0 = tu_now_ms();
	rc = pgr_acquire(p, 10000, &b);
	int64_t took = tu_now_ms() - t0;
	cr_assert_eq(rc, 0, "%s", pgr_strerror(rc));
	cr_assert_str_eq(PQport(pgr_conn_pg(b)), tu_env("PGR_TEST_PORT"));
	cr_assert_lt(took, 1200, "the second connect took %lld ms: it waited on the stalled host",
	             (long long)took);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.connects_ok, 2);
	cr_assert_eq(s.connects_failed, 1, "one stall, counted once");
	pgr_release(a);
	pgr_release(b);
	pgr_pool_destroy(p);
	close(fd);
}

/*
 * connect_timeout in the conninfo bounds a connect as it does in libpq, even though libpq reads
 * it only in its blocking connect: a host that never answers fails after 2 s, not after the
 * 10 s connect_timeout_ms default, and the failure names the setting that bounded it.
 */
Test(connect, the_conninfo_connect_timeout_bounds_a_connect_to_a_silent_host, .timeout = 60)
{
	int fd;
	int silent = silent_listener(&fd);
	char conninfo[256];
	snprintf(conninfo, sizeof(conninfo),
	         "host=127.0.0.1 port=%d user=pgr_trust dbname=postgres sslmode=disable "
	         "connect_timeout=2",
	         silent);
	struct tu_events ev;
	tu_events_init(&ev);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = conninfo;
	cfg.min_idle = 1;
	cfg.max_size = 1;
	cfg.on_event = tu_events_cb;
	cfg.user_data = &ev;
	int64_t t0 = tu_now_ms();
	pgr_pool *p = NULL;
	cr_assert_eq(pgr_pool_create(&cfg, &p), 0);
	cr_assert(TU_WAIT_UNTIL(tu_events_count(&ev, PGR_EV_CONNECT_FAILED) > 0, 9000),
	          "no connect failure within 9 s: connect_timeout=2 was not applied");
	int64_t took = tu_now_ms() - t0;
	int i =
	    tu_events_find(&ev, PGR_EV_CONNECT_FAILED, "after 2000 ms (conninfo connect_timeout)");
	cr_assert_geq(i, 0, "the failure does not name the conninfo's connect_timeout: %s",
	              ev.msg[0]);
	cr_assert_geq(took, 1900, "failed after %lld ms, before its 2 s bound", (long long)took);
	pgr_pool_destroy(p);
	close(fd);
}
