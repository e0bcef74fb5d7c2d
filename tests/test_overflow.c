/* SPDX-License-Identifier: PostgreSQL */
/* max_overflow with SQLAlchemy's semantics, checked on the server's side too. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>

#include "testutil.h"

Test(overflow, burst_above_max_size_then_overflow_closed_on_return, .timeout = 60)
{
	const char *app = "pgr_t_overflow";
	char *ci = tu_conninfo_app(tu_conninfo(), app);
	PGconn *admin = tu_admin();
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = 2;
	cfg.max_size = 2;
	cfg.max_overflow = 2;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *c[4];
	for (int i = 0; i < 4; i++)
		cr_assert_eq(pgr_acquire(p, 5000, &c[i]), 0, "acquire %d of max_size+max_overflow",
		             i);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.size, 4);
	cr_assert_eq(s.in_use, 4);
	cr_assert_eq(s.overflow_in_use, 2);
	cr_assert_eq(tu_count_app(admin, app), 4);
	/* The next one waits, and times out: the limit holds. */
	pgr_conn *x;
	cr_assert_eq(pgr_acquire(p, 200, &x), -ETIMEDOUT);
	cr_assert_leq(tu_count_app(admin, app), 4, "server sees more than max_size+max_overflow");
	for (int i = 0; i < 4; i++)
		pgr_release(c[i]);
	/* Overflow connections close on return while the pool already holds max_size. */
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).size == 2, 5000), "size=%u", tu_stats(p).size);
	s = tu_stats(p);
	cr_assert_eq(s.closes_by_reason[PGR_CLOSE_OVERFLOW], 2);
	cr_assert_eq(s.overflow_in_use, 0);
	cr_assert_eq(s.idle, 2);
	cr_assert(TU_WAIT_UNTIL(tu_count_app(admin, app) == 2, 5000));
	pgr_pool_destroy(p);
	cr_assert(TU_WAIT_UNTIL(tu_count_app(admin, app) == 0, 5000), "connections left open");
	PQfinish(admin);
	free(ci);
}

/* The overflow rule holds for a connection returned inside a transaction (or a failed one)
 * too: rolled back and kept, it would stay idle above max_size until idle_timeout_ms, and
 * forever with idle_timeout_ms 0. */
Test(overflow, overflow_connection_returned_in_a_transaction_is_closed_not_rolled_back_and_kept,
     .timeout = 30)
{
	const char *app = "pgr_t_overflow_tx";
	char *ci = tu_conninfo_app(tu_conninfo(), app);
	PGconn *admin = tu_admin();
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.max_size = 1;
	cfg.max_overflow = 2;
	cfg.idle_timeout_ms = 0; /* nothing else would ever close the surplus */
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *c[3];
	for (int i = 0; i < 3; i++)
		cr_assert_eq(pgr_acquire(p, 5000, &c[i]), 0, "acquire %d", i);
	cr_assert_eq(tu_stats(p).overflow_in_use, 2);
	PQclear(PQexec(pgr_conn_pg(c[1]), "begin"));
	PQclear(PQexec(pgr_conn_pg(c[2]), "begin; select 1/0"));
	cr_assert_eq(PQtransactionStatus(pgr_conn_pg(c[1])), PQTRANS_INTRANS);
	cr_assert_eq(PQtransactionStatus(pgr_conn_pg(c[2])), PQTRANS_INERROR);
	for (int i = 0; i < 3; i++)
		cr_assert_eq(pgr_release(c[i]), 0);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).closes_by_reason[PGR_CLOSE_OVERFLOW] == 2, 3000),
	          "overflow closes=%llu",
	          (unsigned long long)tu_stats(p).closes_by_reason[PGR_CLOSE_OVERFLOW]);
	/* Give a rollback time to put a surplus connection back, then look. */
	tu_sleep_ms(300);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.size, 1, "size=%u idle=%u above max_size 1", s.size, s.idle);
	cr_assert_eq(s.idle, 1);
	cr_assert(TU_WAIT_UNTIL(tu_count_app(admin, app) == 1, 5000), "server sees %ld",
	          tu_count_app(admin, app));
	/* What stays is usable and not in a transaction. */
	pgr_conn *x;
	cr_assert_eq(pgr_acquire(p, 2000, &x), 0);
	cr_assert_eq(PQtransactionStatus(pgr_conn_pg(x)), PQTRANS_IDLE);
	cr_assert_eq(pgr_release(x), 0);
	pgr_pool_destroy(p);
	PQfinish(admin);
	free(ci);
}

struct timed_acquire {
	pgr_pool *p;
	int rc;
};

static void *acquire_300ms(void *a)
{
	struct timed_acquire *t = a;
	pgr_conn *c;
	t->rc = pgr_acquire(t->p, 300, &c);
	if (t->rc == 0)
		pgr_release(c);
	return NULL;
}

/* A caller waited when the overflow connection came back inside a transaction, so it was
 * rolled back for that caller; the caller gave up before the ROLLBACK ended (the backend is
 * stopped meanwhile). Nobody waits any more: the connection goes, as a plain return would. */
Test(overflow, overflow_connection_whose_waiter_left_during_its_rollback_is_closed, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.max_size = 1;
	cfg.max_overflow = 1;
	cfg.idle_timeout_ms = 0; /* nothing else would ever close the surplus */
	cfg.reset_timeout_ms = 10000;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *base, *extra;
	cr_assert_eq(pgr_acquire(p, 5000, &base), 0);
	cr_assert_eq(pgr_acquire(p, 5000, &extra), 0);
	cr_assert_eq(tu_stats(p).overflow_in_use, 1);
	PQclear(PQexec(pgr_conn_pg(extra), "begin"));
	int pid = PQbackendPID(pgr_conn_pg(extra));
	struct timed_acquire w = {.p = p, .rc = 1};
	pthread_t t;
	pthread_create(&t, NULL, acquire_300ms, &w);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).waiting == 1, 5000));
	cr_assert_eq(kill(pid, SIGSTOP), 0);
	cr_assert_eq(pgr_release(extra), 0); /* a waiter: rolled back for it */
	pthread_join(t, NULL);
	cr_assert_eq(w.rc, -ETIMEDOUT, "%s", pgr_strerror(w.rc));
	cr_assert_eq(kill(pid, SIGCONT), 0);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).rollbacks == 1, 5000), "the rollback never ended");
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).closes_by_reason[PGR_CLOSE_OVERFLOW] == 1, 3000),
	          "size=%u idle=%u: the surplus stayed", tu_stats(p).size, tu_stats(p).idle);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.size, 1, "size=%u above max_size 1", s.size);
	cr_assert_eq(s.idle, 0);
	cr_assert_eq(pgr_release(base), 0);
	pgr_pool_destroy(p);
}

struct hammer {
	pgr_pool *p;
	int iters;
	int errors;
};

static void *hammer_main(void *a)
{
	struct hammer *h = a;
	for (int i = 0; i < h->iters; i++) {
		pgr_conn *c;
		if (pgr_acquire(h->p, 10000, &c) != 0) {
			h->errors++;
			continue;
		}
		PGresult *r = PQexec(pgr_conn_pg(c), "select pg_sleep(0.002)");
		if (PQresultStatus(r) != PGRES_TUPLES_OK)
			h->errors++;
		PQclear(r);
		pgr_release(c);
	}
	return NULL;
}

Test(overflow, server_never_sees_more_than_the_limit_under_load, .timeout = 120)
{
	const char *app = "pgr_t_overflow_load";
	char *ci = tu_conninfo_app(tu_conninfo(), app);
	PGconn *admin = tu_admin();
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = ci;
	cfg.min_idle = 1;
	cfg.max_size = 2;
	cfg.max_overflow = 1;
	pgr_pool *p = tu_pool(&cfg);
	enum {
		T = 8
	};
	pthread_t th[T];
	struct hammer h[T];
	for (int i = 0; i < T; i++) {
		h[i] = (struct hammer){.p = p, .iters = 60};
		pthread_create(&th[i], NULL, hammer_main, &h[i]);
	}
	long peak = 0;
	bool running = true;
	while (running) {
		long n = tu_count_app(admin, app);
		if (n > peak)
			peak = n;
		cr_assert_leq(tu_stats(p).size, 3);
		running = tu_stats(p).acquires < (uint64_t)T * 60;
		tu_sleep_ms(5);
	}
	for (int i = 0; i < T; i++) {
		pthread_join(th[i], NULL);
		cr_assert_eq(h[i].errors, 0);
	}
	cr_assert_leq(peak, 3, "server saw %ld connections, limit is 3", peak);
	cr_assert_geq(peak, 2);
	pgr_pool_destroy(p);
	PQfinish(admin);
	free(ci);
}

struct waiter {
	pgr_pool *p;
	int rc;
	int pid;
	pgr_conn *c;
};

static void *waiter_main(void *a)
{
	struct waiter *w = a;
	w->rc = pgr_acquire(w->p, 5000, &w->c);
	if (w->rc == 0)
		w->pid = PQbackendPID(pgr_conn_pg(w->c));
	return NULL;
}

/*
 * The overflow rule closes a connection returned above max_size only when nobody waits: with
 * a caller waiting, the returned overflow connection goes to it as it is, with no close and no
 * new connect.
 */
Test(overflow, overflow_connection_returned_while_a_caller_waits_goes_to_that_caller, .timeout = 30)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = 1;
	cfg.max_size = 1;
	cfg.max_overflow = 1;
	pgr_pool *p = tu_pool(&cfg);
	pgr_conn *base, *over;
	cr_assert_eq(pgr_acquire(p, 5000, &base), 0);
	cr_assert_eq(pgr_acquire(p, 5000, &over), 0);
	cr_assert_eq(tu_stats(p).overflow_in_use, 1);
	int over_pid = PQbackendPID(pgr_conn_pg(over));
	uint64_t connects0 = tu_stats(p).connects_ok;

	struct waiter w = {.p = p, .rc = 1};
	pthread_t th;
	cr_assert_eq(pthread_create(&th, NULL, waiter_main, &w), 0);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).waiting == 1, 5000));
	cr_assert_eq(pgr_release(over), 0);
	pthread_join(th, NULL);
	cr_assert_eq(w.rc, 0, "waiter: %s", pgr_strerror(w.rc));
	cr_assert_eq(w.pid, over_pid, "the waiter got backend %d, not the returned %d", w.pid,
	             over_pid);
	pgr_stats s = tu_stats(p);
	cr_assert_eq(s.closes, 0, "the overflow connection was closed with a caller waiting");
	cr_assert_eq(s.connects_ok, connects0, "a new connection was opened for the waiter");
	cr_assert_geq(s.handoffs, 1);
	cr_assert_eq(s.size, 2);

	/* Nobody waits now: the surplus one closes on return, as overflow. */
	cr_assert_eq(pgr_release(w.c), 0);
	cr_assert_eq(pgr_release(base), 0);
	cr_assert(TU_WAIT_UNTIL(tu_stats(p).size == 1, 5000), "size=%u", tu_stats(p).size);
	cr_assert_eq(tu_stats(p).closes_by_reason[PGR_CLOSE_OVERFLOW], 1);
	pgr_pool_destroy(p);
}
