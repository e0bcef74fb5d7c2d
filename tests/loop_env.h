/* SPDX-License-Identifier: PostgreSQL */
/*
 * A pool with a pgr_loop on a ring of the test's own, for the tests of statements on a loop
 * (test_loop_exec, test_pooler): set-up, turning the ring, waiting for results, tear-down.
 * Header-only, like test_lifecycle.h: each test binary is one translation unit.
 */
#ifndef PGR_TEST_LOOP_ENV_H
#define PGR_TEST_LOOP_ENV_H

#include <errno.h>
#include <liburing.h>
#include <stdlib.h>
#include <string.h>

#include "test_lifecycle.h"

struct env {
	struct io_uring ring;
	pgr_pool *pool;
	pgr_loop *loop;
	struct lc_events *ev;
	char *conninfo;
	const char *app;
};

/* What a statement's callback saw. */
struct res {
	int done;
	int err;
	ExecStatusType st;
	char sqlstate[6];
	char val[64];
	int ncols;
	int64_t t_ms;
	int order; /* position among completions since env_open */
};

static int completions;

static inline void on_res(pgr_loop *l, int err, PGresult *r, void *arg)
{
	(void)l;
	struct res *x = arg;
	x->done = 1;
	x->err = err;
	x->t_ms = tu_now_ms();
	x->order = completions++;
	x->st = r ? PQresultStatus(r) : PGRES_EMPTY_QUERY;
	const char *ss = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
	snprintf(x->sqlstate, sizeof(x->sqlstate), "%s", ss ? ss : "");
	if (r && x->st == PGRES_TUPLES_OK && PQntuples(r) > 0)
		snprintf(x->val, sizeof(x->val), "%s", PQgetvalue(r, 0, 0));
	x->ncols = r ? PQnfields(r) : 0;
	PQclear(r);
}

typedef void (*cfg_fn)(pgr_config *cfg);

/* A pool on conninfo base (application_name app) with max_size connections, tweak applied
 * last, and a loop on a ring of ring_entries. */
static inline void env_open(struct env *e, const char *base, const char *app, unsigned ring_entries,
                            uint32_t max_size, cfg_fn tweak)
{
	memset(e, 0, sizeof(*e));
	completions = 0;
	cr_assert_eq(io_uring_queue_init(ring_entries, &e->ring, 0), 0);
	e->ev = lc_events_new();
	e->app = app;
	pgr_config cfg;
	lc_config(&cfg, base, app, e->ev, &e->conninfo);
	cfg.max_size = max_size;
	if (tweak)
		tweak(&cfg);
	e->pool = tu_pool(&cfg);
	cr_assert_eq(pgr_loop_create(e->pool, &e->ring, 0, &e->loop), 0);
}

/* One turn of the ring: submit, wait up to 5 ms, hand every CQE to the loop (all are its). */
static inline void turn(struct env *e)
{
	struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = 5000000};
	struct io_uring_cqe *cqe;
	io_uring_submit_and_wait_timeout(&e->ring, &cqe, 1, &ts, NULL);
	unsigned head, n = 0;
	io_uring_for_each_cqe (&e->ring, head, cqe) {
		cr_assert(pgr_loop_handle_cqe(e->loop, cqe), "a CQE that is not pgring's");
		n++;
	}
	io_uring_cq_advance(&e->ring, n);
}

/* Turn until every res is done, or fail after ms. */
static inline void wait_all(struct env *e, struct res *r, int n, int64_t ms)
{
	int64_t dl = tu_now_ms() + ms;
	for (;;) {
		int k = 0;
		for (int i = 0; i < n; i++)
			k += r[i].done;
		if (k == n)
			return;
		cr_assert_lt(tu_now_ms(), dl, "only %d of %d statements answered", k, n);
		turn(e);
	}
}

static inline void env_fini(struct env *e)
{
	int64_t dl = tu_now_ms() + 5000;
	while (pgr_loop_destroy(e->loop) == -EBUSY) {
		cr_assert_lt(tu_now_ms(), dl, "loop never drained");
		turn(e);
	}
	cr_assert_eq(pgr_pool_destroy(e->pool), 0);
	io_uring_queue_exit(&e->ring);
	lc_events_free(e->ev);
	free(e->conninfo);
}

#endif
