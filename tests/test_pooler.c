/* SPDX-License-Identifier: PostgreSQL */
/*
 * A pooler in front of the server: the pool detects PgBouncer (transaction mode) and then never
 * prepares statements by name; against the server itself it detects none and prepares as
 * configured. The PgBouncer tests need PGR_BENCH_PGBOUNCER_CONNINFO (run.sh start_pgbouncer
 * exports it; ./run.sh test runs this suite in its PgBouncer and mutants stages). Without it
 * they are skipped, unless PGR_TEST_NEED_PGBOUNCER=1 (the mutants stage), where they fail.
 */
#include <errno.h>
#include <liburing.h>
#include <stdlib.h>
#include <string.h>

#include "loop_env.h"

static const char *pgbouncer(void)
{
	const char *ci = getenv("PGR_BENCH_PGBOUNCER_CONNINFO");
	if (ci && *ci)
		return ci;
	const char *need = getenv("PGR_TEST_NEED_PGBOUNCER");
	cr_assert(!need || strcmp(need, "1") != 0,
	          "PGR_BENCH_PGBOUNCER_CONNINFO is not set: start PgBouncer first (run.sh "
	          "start_pgbouncer)");
	cr_skip_test("PGR_BENCH_PGBOUNCER_CONNINFO is not set (./run.sh test sets it in its "
	             "PgBouncer stage)");
	return NULL;
}

/* A pool with the default config (one exec connection, so that its cache is one cache). */
static void one_exec_conn(pgr_config *cfg)
{
	cfg->exec_max_conns = 1;
}

static void env_init(struct env *e, const char *base, const char *app)
{
	env_open(e, base, app, 64, 2, one_exec_conn);
}

static void exec1(struct env *e, const char *sql, const char *p1, struct res *r)
{
	const char *pv[1] = {p1};
	int rc = pgr_loop_exec(e->loop, sql, p1 ? 1 : 0, p1 ? pv : NULL, 5000, on_res, r);
	cr_assert_eq(rc, 0, "pgr_loop_exec(%s): %s", sql, pgr_strerror(rc));
}

/* Run sql with $1 = i, expect add + i back. */
static void run_expect(struct env *e, const char *sql, int i, int add)
{
	char p[16], want[16];
	snprintf(p, sizeof(p), "%d", i);
	snprintf(want, sizeof(want), "%d", add + i);
	struct res r = {0};
	exec1(e, sql, p, &r);
	wait_all(e, &r, 1, 10000);
	cr_assert_eq(r.err, 0, "%s: %s", sql, pgr_strerror(r.err));
	cr_assert_eq(r.st, PGRES_TUPLES_OK, "%s (use %d): sqlstate %s", sql, i + 1, r.sqlstate);
	cr_assert_str_eq(r.val, want, "%s (use %d) answered another statement's result", sql,
	                 i + 1);
}

static uint32_t pooler_of(struct env *e)
{
	return tu_stats(e->pool).pooler;
}

/* Is a statement with this text prepared on the loop's (one) connection? */
static bool prepared(struct env *e, const char *text)
{
	struct res r = {0};
	exec1(e, "select count(*) from pg_prepared_statements where statement = $1", text, &r);
	wait_all(e, &r, 1, 10000);
	cr_assert_eq(r.st, PGRES_TUPLES_OK);
	return atoi(r.val) > 0;
}

Test(pooler, direct_server_is_no_pooler_and_a_text_is_prepared_after_the_threshold, .timeout = 30)
{
	struct env e;
	env_init(&e, tu_conninfo(), "pgr_pooler_direct");
	const char *t = "select $1::int + 1000";
	for (int i = 0; i < 20; i++)
		run_expect(&e, t, i, 1000);
	cr_assert_eq(pooler_of(&e), PGR_POOLER_NONE);
	cr_assert(prepared(&e, t), "not prepared after 20 uses with prepare_threshold 5");
	cr_assert_eq(lc_events_count(e.ev, PGR_EV_POOLER_DETECTED, NULL, UINT32_MAX), 0);
	env_fini(&e);
}

/*
 * Two pools (two PgBouncer clients) run their own text in turns, 20 uses each, then 20 at
 * once (pipelined). Were names used, both would prepare "pgr_1" on the server connection
 * PgBouncer lends them in turn: the second prepare fails (42P05) or a pool executes the
 * other's statement; a statement may also land where its name is unknown (26000). The
 * detection is asserted directly too: it must not rest on the lucky order of server
 * connections.
 */
Test(pooler, pgbouncer_is_detected_and_nothing_is_prepared_by_name, .timeout = 60)
{
	const char *ci = pgbouncer();
	struct env a, b;
	env_init(&a, ci, "pgr_pooler_a");
	env_init(&b, ci, "pgr_pooler_b");
	const char *ta = "select $1::int + 1000", *tb = "select $1::int + 2000";
	for (int i = 0; i < 20; i++) {
		run_expect(&a, ta, i, 1000);
		run_expect(&b, tb, i, 2000);
	}
	struct res r[20] = {0};
	char p[20][16];
	for (int i = 0; i < 20; i++) {
		snprintf(p[i], sizeof(p[i]), "%d", i);
		exec1(&a, ta, p[i], &r[i]);
	}
	wait_all(&a, r, 20, 10000);
	for (int i = 0; i < 20; i++) {
		cr_assert_eq(r[i].st, PGRES_TUPLES_OK, "pipelined %d: sqlstate %s", i,
		             r[i].sqlstate);
		cr_assert_eq(atoi(r[i].val), 1000 + i);
	}
	cr_assert_eq(pooler_of(&a), PGR_POOLER_DETECTED, "PgBouncer not detected");
	cr_assert_eq(pooler_of(&b), PGR_POOLER_DETECTED, "PgBouncer not detected");
	cr_assert_eq(lc_events_count(a.ev, PGR_EV_POOLER_DETECTED, NULL, UINT32_MAX), 1,
	             "the detection is reported once");
	cr_assert(lc_events_find_msg(a.ev, PGR_EV_POOLER_DETECTED, "turned off"));
	env_fini(&b);
	env_fini(&a);
}
