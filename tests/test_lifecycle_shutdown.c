/* SPDX-License-Identifier: PostgreSQL */
/*
 * The end of a pool, against the real server: waiters blocked in pgr_acquire get -ESHUTDOWN
 * promptly, pgr_pool_drain waits for checked-out connections up to its deadline, connections
 * returned during the drain are closed as pool_closing, and after destroy the server holds
 * none of the pool's connections. The ASan build runs these for leaks.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include <stdatomic.h>
#include <string.h>

#include "test_lifecycle.h"

struct waiter {
	pgr_pool *p;
	int rc;
	int64_t returned_ms;
};

static void *waiter_main(void *arg)
{
	struct waiter *w = arg;
	pgr_conn *c = NULL;
	w->rc = pgr_acquire(w->p, 20000, &c);
	w->returned_ms = tu_now_ms();
	if (w->rc == 0)
		pgr_release(c); /* not expected: the test fails on rc below */
	return NULL;
}

static pgr_pool *pool_for(const char *app, uint32_t min_idle, uint32_t max_size,
                          struct lc_events *ev)
{
	pgr_config cfg;
	char *ci;
	lc_config(&cfg, tu_conninfo(), app, ev, &ci);
	cfg.min_idle = min_idle;
	cfg.max_size = max_size;
	pgr_pool *p = tu_pool(&cfg);
	free(ci);
	return p;
}

static void expect_server_forgot(PGconn *admin, const char *app)
{
	cr_assert(TU_WAIT_UNTIL(tu_count_app(admin, app) == 0, 5000),
	          "%ld connections of the pool still on the server after destroy",
	          tu_count_app(admin, app));
}

enum {
	WAITERS = 3
};

/* Hold the only connection and park WAITERS callers behind it. */
static pgr_conn *park_waiters(pgr_pool *p, pthread_t *th, struct waiter *w)
{
	pgr_conn *held;
	cr_assert_eq(pgr_acquire(p, 5000, &held), 0);
	for (int i = 0; i < WAITERS; i++) {
		w[i] = (struct waiter){.p = p, .rc = 1};
		pthread_create(&th[i], NULL, waiter_main, &w[i]);
	}
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).waiting == WAITERS, 5000), "waiters did not park");
	return held;
}

static void expect_shutdown_promptly(pthread_t *th, struct waiter *w, int64_t t0)
{
	for (int i = 0; i < WAITERS; i++) {
		pthread_join(th[i], NULL);
		cr_assert_eq(w[i].rc, -ESHUTDOWN, "waiter %d: rc %d (%s)", i, w[i].rc,
		             pgr_strerror(w[i].rc));
		cr_assert_leq(w[i].returned_ms - t0, 1000,
		              "waiter %d returned %lld ms after shutdown", i,
		              (long long)(w[i].returned_ms - t0));
	}
}

Test(lifecycle, drain_wakes_blocked_waiters_with_eshutdown, .timeout = 30)
{
	const char *app = "lc_drain_waiters";
	PGconn *admin = tu_admin();
	pgr_pool *p = pool_for(app, 1, 1, NULL);
	pthread_t th[WAITERS];
	struct waiter w[WAITERS];
	pgr_conn *held = park_waiters(p, th, w);
	(void)held;

	int64_t t0 = tu_now_ms();
	cr_assert_eq(pgr_pool_drain(p, 0), -ETIMEDOUT, "one connection is still checked out");
	expect_shutdown_promptly(th, w, t0);
	/* New callers are turned away too. */
	pgr_conn *c = NULL;
	cr_assert_eq(pgr_acquire(p, 1000, &c), -ESHUTDOWN);
	cr_assert_eq(pgr_try_acquire(p, &c), -ESHUTDOWN);
	pgr_pool_destroy(p); /* closes the held connection under its holder */
	expect_server_forgot(admin, app);
	PQfinish(admin);
}

Test(lifecycle, destroy_wakes_blocked_waiters_with_eshutdown, .timeout = 30)
{
	const char *app = "lc_destroy_waiters";
	PGconn *admin = tu_admin();
	pgr_pool *p = pool_for(app, 1, 1, NULL);
	pthread_t th[WAITERS];
	struct waiter w[WAITERS];
	pgr_conn *held = park_waiters(p, th, w);
	(void)held;

	int64_t t0 = tu_now_ms();
	pgr_pool_destroy(p);
	cr_assert_leq(tu_now_ms() - t0, 1000, "destroy took %lld ms",
	              (long long)(tu_now_ms() - t0));
	expect_shutdown_promptly(th, w, t0);
	expect_server_forgot(admin, app);
	PQfinish(admin);
}

Test(lifecycle, drain_times_out_while_a_connection_is_still_out, .timeout = 30)
{
	enum {
		DRAIN_MS = 300
	};
	const char *app = "lc_drain_timeout";
	struct lc_events *ev = lc_events_new();
	PGconn *admin = tu_admin();
	pgr_pool *p = pool_for(app, 2, 2, ev);
	pgr_conn *held;
	cr_assert_eq(pgr_acquire(p, 5000, &held), 0);
	uint32_t id = pgr_conn_id(held);

	int64_t t0 = tu_now_ms();
	int rc = pgr_pool_drain(p, DRAIN_MS);
	int64_t took = tu_now_ms() - t0;
	cr_assert_eq(rc, -ETIMEDOUT, "rc %d (%s)", rc, pgr_strerror(rc));
	cr_assert_geq(took, DRAIN_MS - 2, "drain gave up after %lld ms", (long long)took);
	/*
	 * Past its deadline the drain stops waiting within its 1 ms poll, then the manager closes
	 * the idle connection (cancel its poll, reap, PQfinish: well under a millisecond) and
	 * stops: a few thread wake-ups, a few 4 ms scheduler quanta each on a busy 2-CPU machine.
	 */
	cr_log_info("drain took %lld ms for a %d ms deadline", (long long)took, DRAIN_MS);
	cr_assert_lt(took, DRAIN_MS + 40, "drain took %lld ms", (long long)took);
	/* The idle one is closed already; the held one is still the holder's. */
	cr_assert_eq(tu_stats(p).closes_by_reason[PGR_CLOSE_POOL_CLOSING], 1);
	cr_assert_eq(lc_events_count(ev, PGR_EV_CONN_CLOSED, NULL, id), 0);
	cr_assert(lc_ok(pgr_conn_pg(held), "select 1"), "held connection closed by the drain");

	pgr_pool_destroy(p);
	cr_assert_eq(lc_events_count(ev, PGR_EV_CONN_CLOSED, "pool_closing", id), 1);
	cr_assert(lc_events_find_msg(ev, PGR_EV_CONN_CLOSED, "closed while checked out"));
	expect_server_forgot(admin, app);
	lc_events_free(ev);
	PQfinish(admin);
}

/* Returned after the drain's deadline: the manager has stopped, so it stays open until destroy,
 * whose close event must not claim it was still checked out. */
Test(lifecycle, a_connection_returned_past_the_drain_deadline_is_closed_at_destroy, .timeout = 30)
{
	const char *app = "lc_drain_late";
	struct lc_events *ev = lc_events_new();
	PGconn *admin = tu_admin();
	pgr_pool *p = pool_for(app, 1, 1, ev);
	pgr_conn *held;
	cr_assert_eq(pgr_acquire(p, 5000, &held), 0);
	cr_assert_eq(pgr_pool_drain(p, 50), -ETIMEDOUT);
	cr_assert_eq(pgr_release(held), 0);
	cr_assert_eq(pgr_pool_destroy(p), 0);
	cr_assert_eq(lc_events_count(ev, PGR_EV_CONN_CLOSED, "pool_closing", UINT32_MAX), 1);
	cr_assert(lc_events_find_msg(ev, PGR_EV_CONN_CLOSED, "after its return past the drain"),
	          "the close event does not say the connection had come back");
	cr_assert(!lc_events_find_msg(ev, PGR_EV_CONN_CLOSED, "while checked out"));
	expect_server_forgot(admin, app);
	lc_events_free(ev);
	PQfinish(admin);
}

struct late_release {
	pgr_conn *c[2];
	int64_t delay_ms;
	int64_t released_ms;
};

static void *late_release_main(void *arg)
{
	struct late_release *r = arg;
	tu_sleep_ms(r->delay_ms);
	r->released_ms = tu_now_ms();
	pgr_release(r->c[0]);
	pgr_release(r->c[1]);
	return NULL;
}

Test(lifecycle, drain_returns_when_connections_come_back_and_closes_them, .timeout = 30)
{
	const char *app = "lc_drain_back";
	struct lc_events *ev = lc_events_new();
	PGconn *admin = tu_admin();
	pgr_pool *p = pool_for(app, 3, 3, ev);
	struct late_release r = {.delay_ms = 200};
	for (int i = 0; i < 2; i++)
		cr_assert_eq(pgr_acquire(p, 5000, &r.c[i]), 0);
	uint32_t ids[2] = {pgr_conn_id(r.c[0]), pgr_conn_id(r.c[1])};
	pthread_t th;
	pthread_create(&th, NULL, late_release_main, &r);

	int rc = pgr_pool_drain(p, 10000);
	int64_t t1 = tu_now_ms();
	pthread_join(th, NULL);
	cr_assert_eq(rc, 0, "rc %d (%s)", rc, pgr_strerror(rc));
	cr_assert_geq(t1, r.released_ms, "drain returned before the connections came back");
	/*
	 * Measured from the last return, not from the hold: the drain sees it within its 1 ms
	 * poll, then the manager closes three connections and stops (as above: 40 ms).
	 */
	cr_log_info("drain returned %lld ms after the last release",
	            (long long)(t1 - r.released_ms));
	cr_assert_lt(t1 - r.released_ms, 40,
	             "drain returned %lld ms after the connections came back",
	             (long long)(t1 - r.released_ms));
	/* Returned during the drain: closed, as pool_closing, after their return. */
	for (int i = 0; i < 2; i++) {
		struct lc_ev e;
		cr_assert(lc_events_first(ev, PGR_EV_CONN_CLOSED, NULL, ids[i], 0, &e, NULL),
		          "connection %u returned during the drain was not closed", ids[i]);
		cr_assert_str_eq(e.reason, "pool_closing");
		cr_assert_geq(e.t_ms, r.released_ms);
	}
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.closes_by_reason[PGR_CLOSE_POOL_CLOSING], 3);
	cr_assert_eq(s.closes, 3);
	cr_assert_eq(s.size, 0);
	pgr_pool_destroy(p);
	expect_server_forgot(admin, app);
	lc_events_free(ev);
	PQfinish(admin);
}

Test(lifecycle, destroy_during_rollback_closes_everything, .timeout = 30)
{
	const char *app = "lc_destroy_busy";
	PGconn *admin = tu_admin();
	pgr_pool *p = pool_for(app, 3, 3, NULL);
	pgr_conn *c[3];
	for (int i = 0; i < 3; i++)
		cr_assert_eq(pgr_acquire(p, 5000, &c[i]), 0);
	tu_exec(pgr_conn_pg(c[0]), "begin");
	tu_exec(pgr_conn_pg(c[0]), "select pg_sleep(0.05)");
	pgr_release(c[0]); /* ROLLBACK in flight on the manager */
	pgr_release(c[1]); /* idle */
	/* c[2] stays checked out */
	int64_t t0 = tu_now_ms();
	pgr_pool_destroy(p);
	cr_assert_leq(tu_now_ms() - t0, 2000, "destroy took %lld ms",
	              (long long)(tu_now_ms() - t0));
	expect_server_forgot(admin, app);
	PQfinish(admin);
}

/*
 * A drain that cancels connects still in flight (min_idle's, to a listener that never answers)
 * closes no connection: none of them opened, so there is no PGR_EV_CONN_CLOSED and no close
 * counted, and closes never exceed connects_ok.
 */
Test(lifecycle, drain_of_connects_in_flight_reports_no_close, .timeout = 30)
{
	int ls = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t len = sizeof(sa);
	cr_assert(ls >= 0 && bind(ls, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
	          listen(ls, 16) == 0 && getsockname(ls, (struct sockaddr *)&sa, &len) == 0);
	char ci[128];
	snprintf(ci, sizeof(ci), "host=127.0.0.1 port=%d dbname=none sslmode=disable",
	         ntohs(sa.sin_port));
	struct lc_events *ev = lc_events_new();
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = 4;
	cfg.max_size = 4;
	cfg.on_event = lc_events_cb;
	cfg.user_data = ev;
	pgr_pool *p = NULL;
	cr_assert_eq(pgr_pool_create(&cfg, &p), 0);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).connecting == 4, 5000), "connects did not start");
	cr_assert_eq(pgr_pool_drain(p, 0), 0);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.connects_ok, 0);
	cr_assert_eq(s.closes, 0, "%llu closes of connections that never opened",
	             (unsigned long long)s.closes);
	cr_assert_eq(lc_events_count(ev, PGR_EV_CONN_CLOSED, NULL, UINT32_MAX), 0,
	             "%d PGR_EV_CONN_CLOSED without a PGR_EV_CONN_OPENED",
	             lc_events_count(ev, PGR_EV_CONN_CLOSED, NULL, UINT32_MAX));
	cr_assert_eq(s.size, 0);
	cr_assert_eq(s.connecting, 0);
	pgr_pool_destroy(p);
	lc_events_free(ev);
	close(ls);
}
