/* SPDX-License-Identifier: PostgreSQL */
/*
 * pgring's async API on one event loop: what the loop buys against blocking threads.
 *
 *   pgring_loop       N chains on one thread: pgr_loop_acquire, pgr_loop_query, then
 *                     pgr_loop_release, and the chain starts over
 *   pgring_loop_pipe  the same, but each checkout sends BENCH_PIPELINE_DEPTH statements in one
 *                     pgr_loop_pipeline round trip; every statement counts as a query
 *
 * N is the configuration's thread count, the pool has as many connections (as the blocking
 * pgring row has), configured like the pgring driver. The loop is the caller's own io_uring
 * ring, driven by the main thread; a chain starts its next checkout from the release's
 * callback, so the loop is never idle while a chain can run.
 *
 * Method: the round's window is [start, start + secs) on the clock, with the warm-up before
 * it; a checkout counts when its release happens inside the window, and its latency is acquire
 * + query (or pipeline) + release, every one timed. Queries run without a deadline, as PQexec
 * does on the blocking rows; the acquire has the harness's BENCH_ACQUIRE_TIMEOUT_MS.
 *
 * The SQL matches the threaded rows except that `SELECT 1` goes through PQsendQueryParams (the
 * extended protocol: pgr_loop_query has no simple-protocol form), where the threaded rows'
 * PQexec uses the simple one; the lookup is the same PQexecParams-style statement on both.
 */
#include <errno.h>
#include <liburing.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "pgring.h"

/* Past the window's end, chains still in flight get this long to finish before the round is
 * declared stuck (a query on loopback takes well under a millisecond). */
#define DRAIN_TIMEOUT_NS 15000000000ull

typedef struct loop_run loop_run;

typedef struct chain {
	loop_run *lr;
	pgr_conn *conn;
	uint64_t t0;
	bool busy; /* a checkout is in flight; otherwise the main loop restarts the chain */
	char id[BENCH_PIPELINE_DEPTH][16];
	const char *vals[BENCH_PIPELINE_DEPTH][1];
} chain;

struct loop_run {
	pgr_loop *loop;
	int query;
	int depth; /* 0: pgr_loop_query; else statements per pgr_loop_pipeline */
	uint64_t win_start, win_end;
	bool stopping;
	unsigned busy;
	uint64_t ops, errors, rng;
	pgr__hist hist; /* one writer: the loop's thread */
};

static uint64_t next_rand(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static void start_chain(chain *ch);

/* A checkout is over (released, or failed): count it if it ended inside the window. */
static void finish(chain *ch, bool ok, unsigned queries, bool again)
{
	loop_run *lr = ch->lr;
	uint64_t now = bench_now_ns();
	if (now >= lr->win_start && now < lr->win_end) {
		if (ok) {
			lr->ops += queries;
			pgr__hist_add(&lr->hist, now - ch->t0);
		} else {
			lr->errors++;
		}
	}
	ch->busy = false;
	lr->busy--;
	/* After a failure the main loop restarts the chain on its next turn, so that a call that
	 * fails at once cannot recurse. */
	if (ok && again)
		start_chain(ch);
}

static void on_query(pgr_loop *loop, int err, PGresult *res, void *arg)
{
	chain *ch = arg;
	bool ok = err == 0 && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
	PQclear(res);
	ok = pgr_loop_release(loop, ch->conn) == 0 && ok;
	finish(ch, ok, 1, true);
}

static void on_pipeline(pgr_loop *loop, int err, PGresult **results, int n, void *arg)
{
	chain *ch = arg;
	bool ok = err == 0 && n == ch->lr->depth;
	for (int i = 0; i < n; i++) {
		ok = ok && PQresultStatus(results[i]) == PGRES_TUPLES_OK &&
		     PQntuples(results[i]) == 1;
		PQclear(results[i]);
	}
	ok = pgr_loop_release(loop, ch->conn) == 0 && ok;
	finish(ch, ok, (unsigned)ch->lr->depth, true);
}

static void on_acquired(pgr_loop *loop, int err, pgr_conn *conn, void *arg)
{
	chain *ch = arg;
	loop_run *lr = ch->lr;
	if (err) {
		finish(ch, false, 0, false);
		return;
	}
	ch->conn = conn;
	bool lookup = lr->query == BENCH_Q_LOOKUP;
	const char *sql = lookup ? BENCH_LOOKUP_SQL : "SELECT 1";
	int n = lr->depth ? lr->depth : 1;
	for (int i = 0; lookup && i < n; i++) {
		snprintf(ch->id[i], sizeof ch->id[i], "%u",
		         (unsigned)(next_rand(&lr->rng) % BENCH_LOOKUP_ROWS) + 1);
		ch->vals[i][0] = ch->id[i];
	}
	int rc;
	if (!lr->depth) {
		rc = pgr_loop_query(loop, conn, sql, lookup ? 1 : 0, lookup ? ch->vals[0] : NULL,
		                    -1, on_query, ch);
	} else {
		const char *sqls[BENCH_PIPELINE_DEPTH];
		int nparams[BENCH_PIPELINE_DEPTH];
		const char *const *params[BENCH_PIPELINE_DEPTH];
		for (int i = 0; i < n; i++) {
			sqls[i] = sql;
			nparams[i] = lookup ? 1 : 0;
			params[i] = lookup ? ch->vals[i] : NULL;
		}
		rc = pgr_loop_pipeline(loop, conn, n, sqls, nparams, params, -1, on_pipeline, ch);
	}
	if (rc != 0) { /* callback not called */
		pgr_loop_release(loop, conn);
		finish(ch, false, 0, false);
	}
}

static void start_chain(chain *ch)
{
	loop_run *lr = ch->lr;
	if (lr->stopping)
		return;
	ch->busy = true;
	lr->busy++;
	ch->t0 = bench_now_ns();
	int rc = pgr_loop_acquire(lr->loop, BENCH_ACQUIRE_TIMEOUT_MS, on_acquired, ch);
	if (rc != 0) { /* callback not called; -EBUSY: the SQ ring is full until the next submit */
		ch->busy = false;
		lr->busy--;
		uint64_t now = bench_now_ns();
		if (rc != -EBUSY && now >= lr->win_start && now < lr->win_end)
			lr->errors++;
	}
}

/* Submit, wait up to 1 ms for a completion, hand pgring its CQEs. */
static int turn(struct io_uring *ring, pgr_loop *loop)
{
	struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = 1000000};
	struct io_uring_cqe *cqe;
	int rc = io_uring_submit_and_wait_timeout(ring, &cqe, 1, &ts, NULL);
	if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EBUSY)
		return rc;
	unsigned head, n = 0;
	int foreign = 0;
	io_uring_for_each_cqe (ring, head, cqe) {
		if (!pgr_loop_handle_cqe(loop, cqe))
			foreign++; /* nothing but pgring's SQEs goes on this ring */
		n++;
	}
	io_uring_cq_advance(ring, n);
	return foreign ? -EPROTO : 0;
}

static int loop_round_depth(const bench_target *t, bench_round *r, int depth, char *err,
                            size_t errlen)
{
	bench_pool_opts po = {.conns = r->conns, .threads = r->threads, .no_ping = !r->query};
	void *pool = NULL;
	int rc = bench_driver_pgring.create(t, &po, &pool, err, errlen);
	if (rc != 0)
		return rc;

	struct io_uring ring;
	rc = io_uring_queue_init(256, &ring, 0);
	if (rc < 0) {
		snprintf(err, errlen, "io_uring_queue_init: %s", strerror(-rc));
		bench_driver_pgring.destroy(pool);
		return rc;
	}
	loop_run *lr = calloc(1, sizeof *lr);
	chain *chains = calloc(r->threads, sizeof *chains);
	if (!lr || !chains) {
		free(lr);
		free(chains);
		io_uring_queue_exit(&ring);
		bench_driver_pgring.destroy(pool);
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	rc = pgr_loop_create(pool, &ring, 0, &lr->loop);
	if (rc != 0) {
		snprintf(err, errlen, "pgr_loop_create: %s", pgr_strerror(rc));
		goto out;
	}
	lr->query = r->query;
	lr->depth = depth;
	lr->rng = bench_now_ns() | 1;
	lr->win_start = bench_now_ns() + (uint64_t)(r->warmup_s * 1e9);
	lr->win_end = lr->win_start + (uint64_t)(r->secs * 1e9);
	for (unsigned i = 0; i < r->threads; i++) {
		chains[i].lr = lr;
		start_chain(&chains[i]);
	}
	for (;;) {
		uint64_t now = bench_now_ns();
		if (now >= lr->win_end)
			lr->stopping = true;
		if (lr->stopping && lr->busy == 0)
			break;
		if (now >= lr->win_end + DRAIN_TIMEOUT_NS) {
			snprintf(err, errlen,
			         "%u checkouts did not complete within %llu s of the end", lr->busy,
			         DRAIN_TIMEOUT_NS / 1000000000ull);
			rc = -ETIMEDOUT;
			break;
		}
		for (unsigned i = 0; i < r->threads; i++)
			if (!chains[i].busy)
				start_chain(&chains[i]);
		rc = turn(&ring, lr->loop);
		if (rc != 0) {
			snprintf(err, errlen, "event loop: %s", strerror(-rc));
			break;
		}
	}
	/* pgr_loop_destroy cancels what is left and says -EBUSY until every CQE is reaped. */
	uint64_t deadline = bench_now_ns() + DRAIN_TIMEOUT_NS;
	while (pgr_loop_destroy(lr->loop) == -EBUSY) {
		if (bench_now_ns() > deadline) {
			/* Freeing the ring under pending operations is unsafe: stop here. */
			fprintf(stderr, "pgr_bench: pgr_loop_destroy still busy after %llu s\n",
			        DRAIN_TIMEOUT_NS / 1000000000ull);
			abort();
		}
		turn(&ring, lr->loop);
	}
	if (rc == 0) {
		r->ops += lr->ops;
		r->errors += lr->errors;
		r->secs_counted += (double)(lr->win_end - lr->win_start) / 1e9;
		pgr__hist_snap_merge(r->snap, &lr->hist);
	}
out:
	io_uring_queue_exit(&ring);
	bench_driver_pgring.destroy(pool);
	free(chains);
	free(lr);
	return rc;
}

static int loop_round(const bench_runner *self, const bench_target *t, bench_round *r, char *err,
                      size_t errlen)
{
	(void)self;
	return loop_round_depth(t, r, 0, err, errlen);
}

static int loop_pipe_round(const bench_runner *self, const bench_target *t, bench_round *r,
                           char *err, size_t errlen)
{
	(void)self;
	return loop_round_depth(t, r, BENCH_PIPELINE_DEPTH, err, errlen);
}

const bench_runner bench_runner_loop = {
    .name = "pgring_loop",
    .round = loop_round,
};

const bench_runner bench_runner_loop_pipe = {
    .name = "pgring_loop_pipe",
    .round = loop_pipe_round,
};
