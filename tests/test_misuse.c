/* SPDX-License-Identifier: PostgreSQL */
/*
 * Misuse of the API, extreme values and fork: refused with a clear error, reported, and never
 * a corrupted pool, a shared connection, a crash or a leaked secret. Against the real server.
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pool.h"
#include "testutil.h"

static pgr_pool *small_pool(struct tu_events *ev, uint32_t size)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.max_size = size;
	cfg.min_idle = size;
	if (ev) {
		tu_events_init(ev);
		cfg.on_event = tu_events_cb;
		cfg.user_data = ev;
	}
	return tu_pool(&cfg);
}

static long select_value(pgr_conn *c, const char *sql)
{
	PGresult *r = PQexec(pgr_conn_pg(c), sql);
	cr_assert_eq(PQresultStatus(r), PGRES_TUPLES_OK, "%s", PQresultErrorMessage(r));
	long v = atol(PQgetvalue(r, 0, 0));
	PQclear(r);
	return v;
}

Test(misuse, double_release_and_release_after_discard_are_refused, .timeout = 30)
{
	struct tu_events ev;
	pgr_pool *p = small_pool(&ev, 2);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
	cr_assert_eq(pgr_release(c), 0);
	cr_assert_eq(pgr_release(c), -PGR_E_NOT_OWNED);
	cr_assert_eq(pgr_discard(c), -PGR_E_NOT_OWNED);
	cr_assert_eq(pgr_conn_pg(c), NULL, "a released handle must not reach the connection");

	cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
	cr_assert_eq(pgr_discard(c), 0);
	cr_assert_eq(pgr_discard(c), -PGR_E_NOT_OWNED);
	cr_assert_eq(pgr_release(c), -PGR_E_NOT_OWNED);
	cr_assert_eq(tu_events_count(&ev, PGR_EV_MISUSE), 4);
	int i = tu_events_find(&ev, PGR_EV_MISUSE, "release");
	cr_assert_geq(i, 0);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).closes_by_reason[PGR_CLOSE_DISCARDED] == 1, 3000));
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).idle == 2, 3000), "pool not whole again");
	pgr_stats st = tu_stats(p);
	cr_assert_eq(st.in_use, 0);
	cr_assert_eq(st.size, 2);
	pgr_pool_destroy(p);
}

/* The case that used to push one slot to the manager twice: the first release hands it over
 * for a rollback, the second came while the slot still looked checked out. */
Test(misuse, second_release_while_the_manager_rolls_back_is_refused, .timeout = 30)
{
	struct tu_events ev;
	pgr_pool *p = small_pool(&ev, 1);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
	PQclear(PQexec(pgr_conn_pg(c), "begin"));
	cr_assert_eq(pgr_release(c), 0);
	cr_assert_eq(pgr_release(c), -PGR_E_NOT_OWNED);
	cr_assert_eq(pgr_discard(c), -PGR_E_NOT_OWNED);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).rollbacks == 1 && tu_stats(p).idle == 1, 3000));
	cr_assert_eq(tu_stats(p).closes, 0);
	pgr_pool_destroy(p);
}

Test(misuse, a_stale_handle_cannot_touch_the_next_holders_connection, .timeout = 30)
{
	struct tu_events ev;
	pgr_pool *p = small_pool(&ev, 1);
	pgr_conn *old, *cur;
	cr_assert_eq(pgr_acquire(p, 2000, &old), 0);
	cr_assert_eq(pgr_release(old), 0);
	cr_assert_eq(pgr_acquire(p, 2000, &cur), 0);
	cr_assert_eq(pgr_conn_id(old), pgr_conn_id(cur), "one slot: the same connection");
	/* The old holder's late release must not take it from the new one. */
	cr_assert_eq(pgr_release(old), -PGR_E_NOT_OWNED);
	cr_assert_eq(pgr_conn_pg(old), NULL);
	cr_assert_eq(tu_stats(p).in_use, 1);
	cr_assert_eq(select_value(cur, "select 41 + 1"), 42);
	pgr_conn *other;
	cr_assert_eq(pgr_acquire(p, 50, &other), -ETIMEDOUT, "the connection was handed out twice");
	cr_assert_eq(pgr_release(cur), 0);
	pgr_pool_destroy(p);
}

Test(misuse, null_arguments_get_einval_or_nothing_never_a_crash, .timeout = 30)
{
	pgr_conn *c = (pgr_conn *)0x1;
	cr_assert_eq(pgr_acquire(NULL, 0, &c), -EINVAL);
	cr_assert_eq(pgr_try_acquire(NULL, &c), -EINVAL);
	cr_assert_eq(pgr_release(NULL), -EINVAL);
	cr_assert_eq(pgr_discard(NULL), -EINVAL);
	cr_assert_eq(pgr_conn_pg(NULL), NULL);
	cr_assert_eq(pgr_conn_id(NULL), UINT32_MAX);
	cr_assert_eq(pgr_pool_drain(NULL, 0), -EINVAL);
	cr_assert_eq(pgr_pool_destroy(NULL), -EINVAL);
	cr_assert_eq(pgr_pool_create(NULL, NULL), -EINVAL);
	pgr_pool *p = NULL;
	cr_assert_eq(pgr_pool_create(NULL, &p), -EINVAL);
	cr_assert_null(p);
	pgr_stats st;
	cr_assert_eq(pgr_pool_stats(NULL, &st), -EINVAL);
	pgr_hist_summary hs;
	pgr_pool_histogram(NULL, PGR_HIST_HOLD, &hs);
	cr_assert_eq(hs.count, 0);
	char buf[8] = "x";
	cr_assert_eq(pgr_pool_prometheus(NULL, buf, sizeof(buf)), 0);
	cr_assert_eq(buf[0], 0);
	cr_assert_eq(pgr_pool_last_error(NULL, buf, sizeof(buf)), 0);
	cr_assert_eq(pgr_pool_fd(NULL), -EINVAL);
	cr_assert_eq(pgr_pool_run(NULL), -EINVAL);
	cr_assert_eq(pgr_loop_create(NULL, NULL, 0, NULL), -EINVAL);
	cr_assert_eq(pgr_loop_destroy(NULL), 0);
	cr_assert_eq(pgr_loop_pending(NULL), 0);
	cr_assert_eq(pgr_loop_flush(NULL), 0);
	struct tu_events ev;
	p = small_pool(&ev, 1);
	cr_assert_eq(pgr_acquire(p, 0, NULL), -EINVAL);
	cr_assert_eq(pgr_pool_stats(p, NULL), -EINVAL);
	pgr_pool_histogram(p, PGR_HIST_HOLD, NULL);
	cr_assert_eq(pgr_pool_prometheus(p, NULL, 0) > 0, true, "size query with NULL, 0");
	cr_assert_eq(pgr_pool_destroy(p), 0);
}

Test(misuse, a_forked_child_cannot_use_the_parents_pool, .timeout = 30)
{
	pgr_pool *p = small_pool(NULL, 1);
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
	int pid = PQbackendPID(pgr_conn_pg(c));
	cr_assert_eq(pgr_release(c), 0);
	cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
	pid_t child = fork();
	cr_assert_geq(child, 0);
	if (child == 0) {
		/* In the child: every call refuses, and destroy sends nothing (no Terminate). */
		int bad = 0;
		pgr_conn *x;
		bad |= pgr_acquire(p, 100, &x) != -PGR_E_FORKED;
		bad |= (pgr_try_acquire(p, &x) != -PGR_E_FORKED) << 1;
		bad |= (pgr_release(c) != -PGR_E_FORKED) << 2;
		bad |= (pgr_discard(c) != -PGR_E_FORKED) << 3;
		bad |= (pgr_pool_drain(p, 10) != -PGR_E_FORKED) << 4;
		bad |= (pgr_pool_destroy(p) != 0) << 5;
		_exit(bad);
	}
	int status;
	cr_assert_eq(waitpid(child, &status, 0), child);
	cr_assert(WIFEXITED(status), "child crashed (signal %d)", WTERMSIG(status));
	cr_assert_eq(WEXITSTATUS(status), 0, "child's calls were not refused: mask %#x",
	             WEXITSTATUS(status));
	/* The parent's session is untouched: same backend, still answering. */
	cr_assert_eq(PQbackendPID(pgr_conn_pg(c)), pid);
	cr_assert_eq(select_value(c, "select 6 * 7"), 42);
	cr_assert_eq(pgr_release(c), 0);
	cr_assert_eq(tu_stats(p).closes, 0);
	pgr_pool_destroy(p);
}

/*
 * A runtime is the parent's as much as its pools are: its ring's memory is shared across
 * fork, so a pool the child attached to it would drive the parent's ring (and crash the
 * parent's next round), and with a thread it would attach to a thread that does not exist.
 */
Test(misuse, a_forked_child_cannot_create_a_pool_on_the_parents_runtime, .timeout = 30)
{
	for (int threaded = 0; threaded < 2; threaded++) {
		pgr_runtime *rt;
		cr_assert_eq(pgr_runtime_create(threaded, &rt), 0);
		pgr_config cfg;
		pgr_config_init(&cfg);
		cfg.conninfo = tu_conninfo();
		cfg.max_size = 1;
		cfg.min_idle = 1;
		cfg.runtime = rt;
		pgr_pool *p;
		cr_assert_eq(pgr_pool_create(&cfg, &p), 0);
		for (int i = 0; i < 1000 && tu_stats(p).idle < 1; i++) {
			if (!threaded)
				pgr_runtime_run(rt);
			tu_sleep_ms(5);
		}
		cr_assert_eq(tu_stats(p).idle, 1);
		pid_t child = fork();
		cr_assert_geq(child, 0);
		if (child == 0) {
			pgr_pool *q = NULL;
			int rc = pgr_pool_create(&cfg, &q);
			_exit(rc == -PGR_E_FORKED && q == NULL ? 0 : 1);
		}
		int status;
		cr_assert_eq(waitpid(child, &status, 0), child);
		cr_assert(WIFEXITED(status), "child crashed (signal %d)", WTERMSIG(status));
		cr_assert_eq(WEXITSTATUS(status), 0,
		             "threaded %d: the child created a pool on the parent's runtime",
		             threaded);
		/* The parent's runtime and pool go on as before. */
		for (int i = 0; i < 20; i++) {
			if (!threaded)
				pgr_runtime_run(rt);
			tu_sleep_ms(2);
		}
		pgr_conn *c;
		cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
		cr_assert_eq(select_value(c, "select 6 * 7"), 42);
		cr_assert_eq(pgr_release(c), 0);
		cr_assert_eq(pgr_pool_destroy(p), 0);
		cr_assert_eq(pgr_runtime_destroy(rt), 0);
	}
}

Test(misuse, every_millisecond_field_means_what_it_says_up_to_int64_max, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.max_size = 1;
	cfg.min_idle = 1;
	cfg.acquire_timeout_ms = INT64_MAX;
	cfg.connect_timeout_ms = INT64_MAX;
	cfg.max_lifetime_ms = INT64_MAX;
	cfg.lifetime_jitter_ms = INT64_MAX - 1;
	cfg.idle_timeout_ms = INT64_MAX;
	cfg.ping_after_idle_ms = 0; /* every checkout pings, under ping_timeout_ms */
	cfg.check_after_idle_ms = INT64_MAX;
	cfg.ping_timeout_ms = INT64_MAX;
	cfg.reset_timeout_ms = INT64_MAX;
	cfg.keepalive_interval_ms = INT64_MAX;
	cfg.leak_threshold_ms = INT64_MAX;
	cfg.backoff_min_ms = INT64_MAX;
	cfg.backoff_max_ms = INT64_MAX;
	cfg.tcp_user_timeout_ms = INT_MAX;
	pgr_pool *p = tu_pool(&cfg);
	for (int i = 0; i < 3; i++) {
		pgr_conn *c;
		cr_assert_eq(pgr_acquire(p, INT64_MAX, &c), 0, "checkout %d", i);
		cr_assert_eq(select_value(c, "select 1"), 1);
		PQclear(PQexec(pgr_conn_pg(c), "begin")); /* a rollback under reset_timeout_ms */
		cr_assert_eq(pgr_release(c), 0);
	}
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).rollbacks == 3 && tu_stats(p).idle == 1, 3000));
	pgr_stats st = tu_stats(p);
	cr_assert_eq(st.closes, 0, "a huge value broke something: %lu closes",
	             (unsigned long)st.closes);
	cr_assert_eq(st.pings_failed, 0);
	cr_assert_eq(st.leaks, 0);
	/* A waiter with an effectively infinite deadline waits, and is served. */
	pgr_conn *held, *c;
	cr_assert_eq(pgr_acquire(p, 1000, &held), 0);
	int64_t t0 = tu_now_ms();
	cr_assert_eq(pgr_acquire(p, 1, &c), -ETIMEDOUT);
	cr_assert_lt(tu_now_ms() - t0, 100, "1 ms took %ld ms", (long)(tu_now_ms() - t0));
	cr_assert_eq(pgr_release(held), 0);
	pgr_pool_destroy(p);
}

Test(misuse, values_libpq_cannot_take_are_refused_naming_the_field, .timeout = 30)
{
	struct tu_events ev;
	tu_events_init(&ev);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.on_event = tu_events_cb;
	cfg.user_data = &ev;
	cfg.tcp_user_timeout_ms = (int64_t)INT_MAX + 1;
	pgr_pool *p = NULL;
	cr_assert_eq(pgr_pool_create(&cfg, &p), -EINVAL);
	cr_assert_null(p);
	int i = tu_events_find(&ev, PGR_EV_CONFIG_ERROR, NULL);
	cr_assert_geq(i, 0);
	cr_assert_str_eq(ev.field[i], "tcp_user_timeout_ms");
}

Test(misuse, a_connection_is_handed_out_as_a_fresh_one_is, .timeout = 30)
{
	struct tu_events ev;
	pgr_pool *p = small_pool(&ev, 1);
	pgr_conn *c;
	/* Left in pipeline mode with nothing pending: it leaves it. */
	cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
	cr_assert_eq(PQenterPipelineMode(pgr_conn_pg(c)), 1);
	cr_assert_eq(pgr_release(c), 0);
	cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
	cr_assert_eq(PQpipelineStatus(pgr_conn_pg(c)), PQ_PIPELINE_OFF);
	/* Left in blocking mode inside a transaction: pgring's rollback switches it back to
	 * nonblocking before it sends (the manager never blocks), and it is handed out so. */
	cr_assert_eq(PQsetnonblocking(pgr_conn_pg(c), 0), 0);
	PQclear(PQexec(pgr_conn_pg(c), "begin"));
	cr_assert_eq(pgr_release(c), 0);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).rollbacks == 1 && tu_stats(p).idle == 1, 3000));
	cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
	cr_assert_eq(PQisnonblocking(pgr_conn_pg(c)), 1);
	cr_assert_eq(PQtransactionStatus(pgr_conn_pg(c)), PQTRANS_IDLE);
	cr_assert_eq(tu_stats(p).closes, 0);
	/* Left in pipeline mode with a statement pending: it cannot be reused. */
	PGconn *pg = pgr_conn_pg(c);
	cr_assert_eq(PQenterPipelineMode(pg), 1);
	cr_assert_eq(PQsendQueryParams(pg, "select 1", 0, NULL, NULL, NULL, NULL, 0), 1);
	cr_assert_eq(pgr_release(c), 0);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).closes == 1, 3000));
	cr_assert_eq(tu_stats(p).closes_by_reason[PGR_CLOSE_ACTIVE_QUERY], 1);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).idle == 1, 3000));
	cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
	cr_assert_eq(PQpipelineStatus(pgr_conn_pg(c)), PQ_PIPELINE_OFF);
	cr_assert_eq(pgr_release(c), 0);
	pgr_pool_destroy(p);
}

/* pgr_pool_create refuses conninfo, and no event it reports carries secret. */
static void refused_without_leak(const char *conninfo, const char *secret)
{
	struct tu_events ev;
	tu_events_init(&ev);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = conninfo;
	cfg.on_event = tu_events_cb;
	cfg.user_data = &ev;
	pgr_pool *p = NULL;
	cr_assert_eq(pgr_pool_create(&cfg, &p), -EINVAL, "accepted: %s", conninfo);
	cr_assert_geq(ev.n, 1);
	for (int i = 0; i < ev.n; i++)
		cr_assert_null(strstr(ev.msg[i], secret), "leaked: %s", ev.msg[i]);
}

/* libpq echoes a whole URI, password included, in some of its parse errors. */
Test(misuse, a_conninfo_that_fails_to_parse_never_leaks_its_password, .timeout = 30)
{
	const char *bad[] = {
	    "postgresql://alice:Sup3rS3cretPw@[::1:5432/db",
	    "postgresql://alice:Sup3rS3cretPw@localhost:5432/db?nosuchoption=1",
	    "host=localhost password=Sup3rS3cretPw nosuchoption=1",
	    "host=localhost password='Sup3rS3cretPw",
	};
	for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++)
		refused_without_leak(bad[k], "Sup3rS3cret");
	/* The URI form is echoed by libpq: without scrubbing this test would see it. */
	char *err = NULL;
	PQconninfoOption *o = PQconninfoParse(bad[0], &err);
	cr_assert_null(o);
	cr_assert_not_null(strstr(err, "Sup3rS3cret"), "libpq no longer echoes it: %s", err);
	PQfreemem(err);
}

/*
 * Some parse errors echo a lone token of the URI, not the URI: a password with a '%' that is
 * not a valid escape (a literal '%' the operator did not encode) comes back whole, with nothing
 * around it to recognise it by. And a long URI echoed whole is cut to the event's length: the
 * cut must not fall between the password and the '@' that marks it.
 */
Test(misuse, a_uri_whose_password_libpq_echoes_alone_or_cut_never_leaks_it, .timeout = 30)
{
	static char long_user[600];
	char uri[sizeof(long_user) + 64];
	const char *bad[] = {
	    "postgresql://alice:Sup3rS3cret%zzPw@localhost/db",
	    "postgresql://alice:Sup3rS3cret%00Pw@localhost/db",
	    "postgres://alice@localhost/db?password=Sup3rS3cret%zzPw",
	    "postgresql://alice@localhost/db?sslmode=disable&p%61ssword=Sup3rS3cret%zzPw",
	    uri,
	};
	for (int cut = 200; cut < 400; cut++) {
		memset(long_user, 'u', (size_t)cut);
		long_user[cut] = 0;
		snprintf(uri, sizeof(uri), "postgresql://%s:Sup3rS3cretPw@[::1", long_user);
		for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
			if (cut > 200 && k + 1 < sizeof(bad) / sizeof(bad[0]))
				continue; /* the fixed ones once */
			refused_without_leak(bad[k], "Sup3rS3c");
		}
	}
	/* libpq echoes the lone token: without the fix this test would see it. */
	char *err = NULL;
	PQconninfoOption *o = PQconninfoParse(bad[0], &err);
	cr_assert_null(o);
	cr_assert_not_null(strstr(err, "Sup3rS3cret%zzPw"), "libpq no longer echoes it: %s", err);
	PQfreemem(err);
}

/*
 * A keyword=value conninfo whose password holds a blank the operator did not quote: libpq reads
 * the first word as the password and echoes the next one alone ('missing "=" after "word"',
 * 'invalid connection option "word"'), with nothing around it to recognise it by.
 */
Test(misuse, a_password_with_an_unquoted_blank_is_never_echoed_by_a_parse_error, .timeout = 30)
{
	const char *bad[] = {
	    "host=localhost user=alice password=first Sup3rS3cretPw dbname=db",
	    "host=localhost password=first Sup3rS3cretPw",
	    "password = 'x' host=localhost sslpassword=first Sup3rS3cretPw=2 dbname=db",
	    "password=first\\ two Sup3rS3cretPw=2",
	};
	for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++)
		refused_without_leak(bad[k], "Sup3rS3c");
	/* libpq echoes the lone word: without the fix this test would see it. */
	char *err = NULL;
	PQconninfoOption *o = PQconninfoParse(bad[0], &err);
	cr_assert_null(o);
	cr_assert_not_null(strstr(err, "Sup3rS3cretPw"), "libpq no longer echoes it: %s", err);
	PQfreemem(err);
	/* A word that is not after a secret keeps libpq's message as it was. */
	struct tu_events ev;
	tu_events_init(&ev);
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = "host=localhost nosuchoption=1 password=x";
	cfg.on_event = tu_events_cb;
	cfg.user_data = &ev;
	pgr_pool *p = NULL;
	cr_assert_eq(pgr_pool_create(&cfg, &p), -EINVAL);
	cr_assert_geq(tu_events_find(&ev, PGR_EV_CONFIG_ERROR, "\"nosuchoption\""), 0);
}

/* The exposition stays valid text for any name a user can pass: quotes, backslashes, newlines
 * and bytes that are not UTF-8. promtool is the judge. */
Test(misuse, any_pool_name_gives_a_valid_exposition, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.max_size = 1;
	cfg.name = "we\"ird\\na\nme \xff\xc3\x28 \xe2\x82\xac";
	pgr_pool *p = tu_pool(&cfg);
	static char text[65536];
	size_t n = pgr_pool_prometheus(p, text, sizeof(text));
	cr_assert_lt(n, sizeof(text));
	cr_assert_null(strchr(text, '\xff'), "a raw non-UTF-8 byte reached the exposition");
	cr_assert_not_null(strstr(text, "\xe2\x82\xac"), "valid UTF-8 must pass unchanged");
	char path[] = "/tmp/pgring-prom-name-XXXXXX";
	int fd = mkstemp(path);
	cr_assert_geq(fd, 0);
	cr_assert_eq(write(fd, text, n), (ssize_t)n);
	close(fd);
	char cmd[256];
	snprintf(cmd, sizeof(cmd), "promtool check metrics < %s >/dev/null 2>&1", path);
	int st = system(cmd);
	unlink(path);
	cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "promtool rejected the exposition");
	pgr_pool_destroy(p);
}

/*
 * The last line of defence, under every event and last error: a URI's password is masked even
 * where the pool does not know the password (a message from a path that parses nothing), with
 * the text around it kept.
 */
Test(misuse, any_reported_text_loses_a_uri_password, .timeout = 10)
{
	char m[] = "echo: postgresql://alice:Sup3rS3cretPw@db.example:5432/app?x=1 (end)";
	pgr__scrub(NULL, m);
	cr_assert_null(strstr(m, "Sup3rS3c"), "leaked: %s", m);
	cr_assert(strstr(m, "postgresql://alice:") && strstr(m, "@db.example:5432/app"),
	          "the rest of the text went too: %s", m);
}
