/* SPDX-License-Identifier: PostgreSQL */
/*
 * The statements side of a loop: pgr_loop_query and pgr_loop_pipeline on a connection the
 * caller holds, the delivery of their results, and pgr_loop_query's path through the
 * prepared-statement cache (prepare_loop_query), with its one transparent re-send when a cached
 * plan went stale.
 *
 * Everything here runs on the loop's thread, on a connection the caller holds (PGR__IN_USE).
 * Its qbusy flag (the holder's, pool.h) is set while a statement is in flight, so that a
 * release or a second statement meanwhile is refused as misuse. The overview is at the top of
 * loop.c.
 */
#include <errno.h>
#include <string.h>

#include "loop_op.h"

/* ---- the end of a statement: delivery, and the cache's one re-send ---- */

static void deliver_query(pgr_loop *l, struct op *o, int err)
{
	pgr_loop_query_cb cb = o->qcb;
	void *arg = o->arg;
	PGresult *res = o->res; /* on -EIO it may say why; the callback owns it */
	o->res = NULL;
	atomic_store_explicit(&o->conn->qbusy, 0, memory_order_relaxed);
	op_finish(l, o);
	cb(l, err, res, arg);
}

void pgr__loop_pipeline_done(pgr_loop *l, struct op *o, int err)
{
	pgr_loop_pipeline_cb cb = o->pcb;
	void *arg = o->arg;
	int n = o->pq.nstmt;
	PGresult *res[PGR_PIPELINE_MAX];
	for (int i = 0; i < n; i++) {
		res[i] = err ? NULL : o->pres[i];
		if (err)
			PQclear(o->pres[i]);
		o->pres[i] = NULL;
	}
	atomic_store_explicit(&o->conn->qbusy, 0, memory_order_relaxed);
	op_finish(l, o);
	cb(l, err, res, n, arg);
}

static void query_sent(struct op *o, const struct pgr__pcache_sent *s)
{
	o->q_name = s->name_id;
	o->q_prep = s->prepared;
	o->q_prep_failed = 0;
	o->q_first = s->first;
}

/*
 * A statement executed by a cached name came back with a stale plan (0A000) or an unknown name
 * (26000): forget the name, and when it ran in autocommit (its failure rolled back nothing else)
 * send it again, prepared afresh, once, under the same deadline. In a transaction block the
 * error goes to the caller, whose transaction it aborted; the text's next use prepares again.
 */
static bool query_retry(pgr_loop *l, struct op *o)
{
	struct pgr_conn *c = o->conn;
	if (!o->q_name)
		return false;
	if (o->q_prep_failed) {
		pgr__pcache_drop(c, o->q_name);
		return false;
	}
	if (!pgr__pcache_retryable(o->res))
		return false;
	const char *ss = PQresultErrorField(o->res, PG_DIAG_SQLSTATE);
	uint64_t stale = ss && strcmp(ss, "0A000") == 0 ? o->q_name : 0; /* still on the server */
	pgr__pcache_drop(c, o->q_name);
	if (!o->q_retry || PQtransactionStatus(c->pg) != PQTRANS_IDLE)
		return false;
	o->q_retry = 0;
	PQclear(o->res);
	o->res = NULL;
	struct pgr__pcache_sent s;
	if (pgr__pcache_send(c, o->q_sql, o->q_nparams, o->q_pv, stale, &s) != 0) {
		atomic_store_explicit(&c->server_error, 1, memory_order_relaxed);
		deliver_query(l, o, -EIO);
		return true;
	}
	query_sent(o, &s);
	o->pq = (struct pgr__pq){.pg = c->pg,
	                         .sink = pgr__loop_result_sink,
	                         .pipeline = s.nstmt > 0,
	                         .nstmt = s.nstmt,
	                         .extra_syncs = s.extra_syncs};
	drive(l, o, 0);
	return true;
}

/* A query's phase ended: a stale cached plan may be sent again, else the caller hears. */
void pgr__loop_query_done(pgr_loop *l, struct op *o, int err)
{
	if (!err && query_retry(l, o))
		return;
	deliver_query(l, o, err);
}

/* ---- queries and pipelines on a checked-out connection ---- */

/* The checks every call on a holder's connection makes. */
static int conn_check(pgr_loop *l, pgr_conn *h, const char *what, struct pgr_conn **out)
{
	struct pgr_conn *c = pgr__slot(h);
	if (!c)
		return -EINVAL;
	if (c->pool != l->pool)
		return pgr__misuse(l->pool, PGR__NONE, -EINVAL,
		                   "misuse: %s with a connection of another pool", what);
	if (atomic_load_explicit(&c->state, memory_order_acquire) != PGR__IN_USE ||
	    !pgr__handle_current(h, c))
		return pgr__misuse(l->pool, c->id, -PGR_E_NOT_OWNED,
		                   "misuse: %s on connection %u, which this handle does not hold",
		                   what, c->id);
	if (atomic_load_explicit(&c->qbusy, memory_order_relaxed))
		return pgr__misuse(l->pool, c->id, -EBUSY,
		                   "misuse: %s on connection %u while another is in flight on it",
		                   what, c->id);
	*out = c;
	return 0;
}

/* What a call on a holder's connection does first: the pool and loop are usable, the
 * connection passes conn_check, and what waits in the backlog gets its SQEs. */
static int user_call_begin(pgr_loop *l, pgr_conn *h, const char *what, struct pgr_conn **out)
{
	int rc = pgr__pool_usable(l->pool);
	if (rc)
		return rc;
	if (l->destroying)
		return -ESHUTDOWN;
	if ((rc = conn_check(l, h, what, out)) != 0)
		return rc;
	pgr__loop_flush(l);
	return 0;
}

/*
 * A user's statement(s) are sent: mark the connection busy (a release now is refused) and drive
 * the phase under the caller's deadline (< 0: none). nstmt > 0: a pipeline of that many.
 */
static void user_phase_start(pgr_loop *l, struct op *o, struct pgr_conn *c, int phase,
                             int64_t timeout_ms, uint8_t nstmt, uint8_t extra_syncs)
{
	atomic_store_explicit(&c->qbusy, 1, memory_order_relaxed);
	o->conn = c;
	o->phase = (uint8_t)phase;
	o->deadline_ns =
	    timeout_ms < 0 ? INT64_MAX : pgr__sat_add(o->t0_ns, pgr__ms_to_ns(timeout_ms));
	o->phase_deadline_ns = o->deadline_ns;
	o->pq = (struct pgr__pq){.pg = c->pg,
	                         .sink = pgr__loop_result_sink,
	                         .pipeline = nstmt > 0,
	                         .nstmt = nstmt,
	                         .extra_syncs = extra_syncs};
	drive(l, o, 0);
}

static int loop_query(pgr_loop *l, pgr_conn *h, const char *sql, int nparams,
                      const char *const *params, int64_t timeout_ms, pgr_loop_query_cb cb,
                      void *arg)
{
	struct pgr_conn *c;
	int rc = user_call_begin(l, h, "pgr_loop_query", &c);
	if (rc)
		return rc;
	struct op *o = op_alloc(l, OP_QUERY);
	if (!o)
		return -EBUSY;
	if (PQsetnonblocking(c->pg, 1) != 0) {
		op_free(l, o);
		return -EIO;
	}
	struct pgr__pcache_sent s = {0};
	bool sent;
	PGTransactionStatusType ts = PQtransactionStatus(c->pg);
	if (l->pool->cfg.prepare_loop_query && l->pool->cfg.prepare_threshold >= 0 &&
	    (ts == PQTRANS_IDLE || ts == PQTRANS_INTRANS)) {
		/* In autocommit a stale plan is re-sent transparently, which needs the text and
		 * parameters after the caller's have gone: copied into the record's own buffer. */
		if (ts == PQTRANS_IDLE) {
			if (pgr__stmt_copy(&o->q_buf, &o->q_cap, sql, nparams, params, &o->q_sql,
			                   &o->q_pv)) {
				op_free(l, o);
				return -ENOMEM;
			}
			o->q_nparams = nparams;
			o->q_retry = 1;
			sql = o->q_sql;
			params = o->q_pv;
		}
		sent = pgr__pcache_send(c, sql, nparams, params, 0, &s) == 0;
		if (!sent && PQpipelineStatus(c->pg) != PQ_PIPELINE_OFF)
			atomic_store_explicit(&c->server_error, 1, memory_order_relaxed);
		query_sent(o, &s);
	} else {
		sent = PQsendQueryParams(c->pg, sql, nparams, NULL, params, NULL, NULL, 0);
	}
	if (!sent) {
		op_free(l, o);
		return -EIO;
	}
	o->qcb = cb;
	o->arg = arg;
	user_phase_start(l, o, c, PH_QUERY, timeout_ms, s.nstmt, s.extra_syncs);
	return 0;
}

int pgr_loop_query(pgr_loop *l, pgr_conn *h, const char *sql, int nparams,
                   const char *const *params, int64_t timeout_ms, pgr_loop_query_cb cb, void *arg)
{
	if (!l || !h || !sql || !cb || nparams < 0 || (nparams > 0 && !params))
		return -EINVAL;
	pgr__loop_enter(l);
	int rc = loop_query(l, h, sql, nparams, params, timeout_ms, cb, arg);
	pgr__loop_leave(l);
	return rc;
}

static int loop_pipeline(pgr_loop *l, pgr_conn *h, int n, const char *const *sql,
                         const int *nparams, const char *const *const *params, int64_t timeout_ms,
                         pgr_loop_pipeline_cb cb, void *arg)
{
	struct pgr_conn *c;
	int rc = user_call_begin(l, h, "pgr_loop_pipeline", &c);
	if (rc)
		return rc;
	if (PQtransactionStatus(c->pg) == PQTRANS_ACTIVE)
		return -EIO;
	struct op *o = op_alloc(l, OP_QUERY);
	if (!o)
		return -EBUSY;
	if (PQsetnonblocking(c->pg, 1) != 0 || !PQenterPipelineMode(c->pg)) {
		op_free(l, o);
		return -EIO;
	}
	for (int i = 0; i < n; i++) {
		int np = nparams ? nparams[i] : 0;
		const char *const *pv = params ? params[i] : NULL;
		if (!PQsendQueryParams(c->pg, sql[i], np, NULL, pv, NULL, NULL, 0)) {
			/* Half a pipeline is queued: the connection cannot be trusted again. */
			atomic_store_explicit(&c->server_error, 1, memory_order_relaxed);
			op_free(l, o);
			return -EIO;
		}
	}
	if (!PQpipelineSync(c->pg)) {
		atomic_store_explicit(&c->server_error, 1, memory_order_relaxed);
		op_free(l, o);
		return -EIO;
	}
	o->pcb = cb;
	o->arg = arg;
	user_phase_start(l, o, c, PH_PIPELINE, timeout_ms, (uint8_t)n, 0);
	return 0;
}

int pgr_loop_pipeline(pgr_loop *l, pgr_conn *h, int n, const char *const *sql, const int *nparams,
                      const char *const *const *params, int64_t timeout_ms, pgr_loop_pipeline_cb cb,
                      void *arg)
{
	if (!l || !h || !sql || !cb || n < 1 || n > PGR_PIPELINE_MAX)
		return -EINVAL;
	for (int i = 0; i < n; i++)
		if (!sql[i] || (nparams && nparams[i] < 0) ||
		    (nparams && nparams[i] > 0 && (!params || !params[i])))
			return -EINVAL;
	pgr__loop_enter(l);
	int rc = loop_pipeline(l, h, n, sql, nparams, params, timeout_ms, cb, arg);
	pgr__loop_leave(l);
	return rc;
}
