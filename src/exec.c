/* SPDX-License-Identifier: PostgreSQL */
/*
 * pgr_loop_exec: autocommit statements pipelined over connections a pgr_loop holds (exec.h).
 *
 * What it owns. Per loop, made at the first pgr_loop_exec and sized by the pool's config: a
 * fixed array of statement records (exec_max_pending: the loop's bound on statements queued or
 * in flight), and up to exec_max_conns connection records, each with a FIFO of what was sent on
 * it. A connection taken for exec is in state PGR__LOOP, in pipeline mode, and every statement
 * on it ends in its own sync point: an error aborts only its own statement, and results come
 * back in the order sent, each to its own callback.
 *
 * Grouped sync points (exec_sync_group > 1). Plain DML and queries sent on one connection in
 * one dispatch share a sync point, up to the group's size: one commit and one ReadyForQuery for
 * them. The group is one implicit transaction, so its results are held until its sync point;
 * when a statement failed, the others never took effect and are queued again, each to be sent
 * with a sync point of its own (exec_conn.c, group_done). Independence is kept for the caller
 * at the price of running those statements twice on the server.
 *
 * Dispatch. A statement goes to the held connection with the fewest statements in flight that
 * is below exec_pipeline_depth; when every one is at the depth (or none is held), another is
 * taken through pgr_loop_acquire: without waiting while some are held (the pool's idle ones
 * only), waiting in the pool's FIFO when none is usable. What finds no connection waits in the
 * loop's queue, in arrival order, under its own deadline.
 *
 * Writes. A statement is not sent by pgr_loop_exec itself: it waits in the loop's queue until
 * the end of the loop's turn, marked by a NOP on the ring (one per loop, armed by the first
 * statement after the last write) that completes at the caller's next submit. Then everything
 * queued is dispatched at once. libpq 15's PQpipelineSync writes to the socket on every call, and
 * on loopback each write delivers at once and wakes the backend, which on a small machine takes
 * the CPU from the loop: a connection given two or more statements in one turn is corked
 * (TCP_CORK) from its second one to the end of the turn, so the backend is woken once per batch
 * rather than once per statement. What a full socket buffer leaves in libpq is written when the
 * connection's poll reports it writable.
 *
 * Deadlines. One timer (IORING_OP_TIMEOUT, absolute) serves every deadline of the engine: the
 * earliest of the statements' deadlines and of the held connections' idle-release times. A
 * statement past its deadline is answered -ETIMEDOUT at once, whether queued or in flight. A
 * connection whose statements in flight have all been answered that way is cancelled and
 * closed: a cancel hits whatever runs at that instant, and by then that can only be a statement
 * whose caller has given up. Statements behind a timed-out one on its connection keep running
 * under their own deadlines and are never re-sent (the server may have started them); nothing
 * new is sent to a connection while a timed-out statement is still in flight on it.
 *
 * Faults. A connection that fails answers exactly the statements sent on it with -EIO (the
 * first carries the server's error when there was one) and goes to the manager to be closed;
 * queued statements go to other connections.
 *
 * Everything here runs on the loop's thread, like the rest of pgr_loop. Callbacks are delivered
 * from a list after the libpq reading is done, never from inside it, so a callback may call
 * pgr_loop_exec again.
 *
 * This file holds the statements' side: their records, the loop's queue, delivery, the timer
 * and the flush NOP, dispatch and the batch's end, and the entry points. exec_conn.c holds the
 * connections' side (exec_conn.h).
 */
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "exec_conn.h"

/* ==== statement records ==== */

static struct xstmt *stmt_alloc(struct pgr__exec *x)
{
	if (x->free_head == XNONE)
		return NULL;
	struct xstmt *s = &x->st[x->free_head];
	x->free_head = s->next;
	char *buf = s->buf;
	size_t cap = s->cap;
	memset(s, 0, sizeof(*s));
	s->buf = buf;
	s->cap = cap;
	s->used = 1;
	s->next = s->prev = XNONE;
	x->nused++;
	return s;
}

void pgr__exec_stmt_release(struct pgr__exec *x, struct xstmt *s)
{
	if (s->in_fifo || s->cb_pending || s->queued)
		return;
	PQclear(s->res);
	s->res = NULL;
	s->used = 0;
	s->next = x->free_head;
	x->free_head = (uint32_t)(s - x->st);
	x->nused--;
}

/* Copy text and parameters into the record's own buffer (grown only when a statement is
 * larger than any before it on this record). */
static int stmt_copy(struct xstmt *s, const char *sql, int nparams, const char *const *params)
{
	s->nparams = nparams;
	return pgr__stmt_copy(&s->buf, &s->cap, sql, nparams, params, &s->sql, &s->pv);
}

/* ---- the loop's queue (doubly linked, arrival order) ---- */

void pgr__exec_q_push(struct pgr__exec *x, struct xstmt *s, bool front)
{
	uint32_t i = (uint32_t)(s - x->st);
	s->queued = 1;
	if (front) {
		s->prev = XNONE;
		s->next = x->q_head;
		if (x->q_head != XNONE)
			x->st[x->q_head].prev = i;
		else
			x->q_tail = i;
		x->q_head = i;
	} else {
		s->next = XNONE;
		s->prev = x->q_tail;
		if (x->q_tail != XNONE)
			x->st[x->q_tail].next = i;
		else
			x->q_head = i;
		x->q_tail = i;
	}
	x->q_len++;
}

static void q_remove(struct pgr__exec *x, struct xstmt *s)
{
	if (s->prev != XNONE)
		x->st[s->prev].next = s->next;
	else
		x->q_head = s->next;
	if (s->next != XNONE)
		x->st[s->next].prev = s->prev;
	else
		x->q_tail = s->prev;
	s->next = s->prev = XNONE;
	s->queued = 0;
	x->q_len--;
}

/* ---- answers: collected here, delivered by pgr__exec_deliver() outside libpq reading ---- */

void pgr__exec_answer(struct pgr__exec *x, struct xstmt *s, int err)
{
	s->err = err;
	s->cb_pending = 1;
	s->next = XNONE;
	uint32_t i = (uint32_t)(s - x->st);
	if (x->d_tail == XNONE)
		x->d_head = i;
	else
		x->st[x->d_tail].next = i;
	x->d_tail = i;
}

void pgr__exec_deliver(struct pgr__exec *x)
{
	if (x->delivering)
		return;
	x->delivering = 1;
	while (x->d_head != XNONE) {
		struct xstmt *s = &x->st[x->d_head];
		x->d_head = s->next;
		if (x->d_head == XNONE)
			x->d_tail = XNONE;
		s->next = XNONE;
		pgr_loop_exec_cb cb = s->cb;
		void *arg = s->arg;
		int err = s->err;
		PGresult *res = s->res;
		s->res = NULL;
		s->cb_pending = 0;
		pgr__exec_stmt_release(x, s);
		cb(x->loop, err, res, arg);
	}
	x->delivering = 0;
}

void pgr__exec_fail_queued(struct pgr__exec *x, int err)
{
	while (x->q_head != XNONE) {
		struct xstmt *s = &x->st[x->q_head];
		q_remove(x, s);
		pgr__exec_answer(x, s, err);
	}
}

/* ==== SQEs: the timer and the flush NOP ==== */

/*
 * One timer at a time: an earlier deadline moves the armed one (IORING_TIMEOUT_UPDATE) rather
 * than adding another, so a loop's destroy never waits for a stale far-off timer. An update
 * that finds the timer already fired fails with -ENOENT; that timer's CQE re-arms anyway.
 */
static bool timer_arm_now(struct pgr__exec *x, int64_t at)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(x->ring);
	if (!sqe)
		return false;
	if (x->timer_out) {
		pgr__ns_to_kts(at, &x->ts_update);
		io_uring_prep_timeout_update(sqe, &x->ts_update, xud(PGR__XK_TIMER, 0, 0),
		                             IORING_TIMEOUT_ABS);
		io_uring_sqe_set_data64(sqe, xud(PGR__XK_CANCEL, 0xffffff, 0));
	} else {
		pgr__ns_to_kts(at, &x->ts);
		io_uring_prep_timeout(sqe, &x->ts, 0, IORING_TIMEOUT_ABS);
		io_uring_sqe_set_data64(sqe, xud(PGR__XK_TIMER, 0, 0));
		x->timer_out = 1;
	}
	x->aux_cqes++;
	x->timer_at = at;
	return true;
}

/* Make sure the timer fires no later than at. */
void pgr__exec_timer_need(struct pgr__exec *x, int64_t at)
{
	if (at == INT64_MAX || at >= x->timer_at)
		return;
	if (x->want_timer) {
		if (at < x->want_timer_at)
			x->want_timer_at = at;
		return;
	}
	if (!timer_arm_now(x, at)) {
		x->want_timer = 1;
		x->want_timer_at = at;
		x->nwant++;
	}
}

static bool flush_arm_now(struct pgr__exec *x)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(x->ring);
	if (!sqe)
		return false;
	io_uring_prep_nop(sqe);
	io_uring_sqe_set_data64(sqe, xud(PGR__XK_FLUSH, 0, 0));
	x->aux_cqes++;
	x->flush_armed = 1;
	return true;
}

void pgr__exec_flush_need(struct pgr__exec *x)
{
	if (x->flush_armed || x->want_flush)
		return;
	if (!flush_arm_now(x)) {
		x->want_flush = 1;
		x->nwant++;
	}
}

uint32_t pgr__exec_flush(struct pgr__exec *x)
{
	if (!x || !x->nwant)
		return 0;
	if (x->want_timer && timer_arm_now(x, x->want_timer_at)) {
		x->want_timer = 0;
		x->nwant--;
	}
	if (x->want_flush && flush_arm_now(x)) {
		x->want_flush = 0;
		x->nwant--;
	}
	for (uint32_t i = 0; i < x->nxc && x->nwant; i++)
		pgr__xconn_arm_wanted(&x->xc[i]);
	return x->nwant;
}

void pgr__exec_dispatch(struct pgr__exec *x)
{
	if (x->dispatching) {
		x->redo = 1;
		return;
	}
	x->dispatching = 1;
	do {
		x->redo = 0;
		while (x->q_head != XNONE && !x->destroying) {
			bool any;
			struct xconn *xc = pgr__xconn_pick(x, &any);
			if (!xc) {
				pgr__xconn_take(x, any);
				break;
			}
			struct xstmt *s = &x->st[x->q_head];
			q_remove(x, s);
			if (!pgr__xconn_send(xc, s))
				pgr__xconn_fail(xc);
		}
	} while (x->redo);
	/* A group spans one dispatch at most: what was sent now is answered without waiting for
	 * statements that may never come. */
	for (uint32_t i = 0; i < x->nxc; i++) {
		struct xconn *xc = &x->xc[i];
		if (xc->c && xc->gopen && !pgr__xconn_close_group(xc))
			pgr__xconn_fail(xc);
	}
	x->dispatching = 0;
}

/* ---- the timer: deadlines and idle release ---- */

static void tick(struct pgr__exec *x)
{
	int64_t now = pgr__mono_ns();
	pgr_pool *p = x->pool;
	bool closing = atomic_load_explicit(&p->closing, memory_order_relaxed);
	int64_t next = INT64_MAX;
	for (uint32_t i = 0; i < x->nst; i++) {
		struct xstmt *s = &x->st[i];
		if (!s->used || s->abandoned || s->cb_pending || s->deadline_ns == INT64_MAX)
			continue;
		if (s->deadline_ns > now) {
			if (s->deadline_ns < next)
				next = s->deadline_ns;
			continue;
		}
		if (s->queued) {
			q_remove(x, s);
			pgr__exec_answer(x, s, -ETIMEDOUT);
		} else if (s->in_fifo) {
			s->abandoned = 1;
			PQclear(s->res);
			s->res = NULL;
			x->xc[s->conn].nlive--;
			x->xc[s->conn].nabandoned++;
			pgr__exec_answer(x, s, -ETIMEDOUT);
		}
	}
	if (closing)
		pgr__exec_fail_queued(x, -ESHUTDOWN);
	int64_t idle_ns = pgr__ms_to_ns(p->cfg.exec_idle_release_ms);
	for (uint32_t k = 0; k < x->nxc; k++) {
		struct xconn *xc = &x->xc[k];
		if (xc->c && xc->state == C_CANCELLING) {
			if (xc->cancel_deadline_ns <= now)
				pgr__xconn_retire(xc, PGR_CLOSE_ACTIVE_QUERY, false);
			else if (xc->cancel_deadline_ns < next)
				next = xc->cancel_deadline_ns;
			continue;
		}
		if (!xc->c || xc->state != C_READY)
			continue;
		if (xc->nabandoned && !xc->nlive) {
			/* Everything in flight here was answered -ETIMEDOUT. */
			pgr__xconn_cancel_drain(xc);
			continue;
		}
		if (xc->fn || xc->dirty)
			continue;
		int64_t at = pgr__sat_add(xc->idle_since_ns, idle_ns);
		if (closing || at <= now)
			pgr__xconn_release(xc);
		else if (at < next)
			next = at;
	}
	pgr__exec_timer_need(x, next);
}

/*
 * Which connections will get more than one sync point from the queue (dispatch gives each
 * statement to the least loaded one below the depth, and up to exec_sync_group of them share a
 * sync point): cork those before their first write. Only for a few connections; with more, a
 * connection is corked at its second sync point in the batch (exec_conn.c, before_sync).
 */
static void plan_corks(struct pgr__exec *x)
{
	struct xconn *use[16];
	uint32_t n = 0;
	if (x->q_len < 2)
		return;
	for (uint32_t i = 0; i < x->nxc; i++) {
		struct xconn *xc = &x->xc[i];
		if (!xc->c || xc->state != C_READY || xc->nabandoned)
			continue;
		if (n == 16)
			return;
		xc->plan = xc->nlive;
		use[n++] = xc;
	}
	for (uint32_t k = 0; k < x->q_len; k++) {
		struct xconn *best = NULL;
		for (uint32_t i = 0; i < n; i++)
			if (use[i]->plan < x->depth && (!best || use[i]->plan < best->plan))
				best = use[i];
		if (!best)
			break;
		best->plan++;
	}
	for (uint32_t i = 0; i < n; i++)
		if (use[i]->tcp && !use[i]->corked && use[i]->plan - use[i]->nlive > x->group)
			pgr__xconn_cork(use[i], 1);
}

/*
 * The end of a batch: after each of the engine's CQEs (the callbacks it ran may have queued
 * statements) and when the flush NOP completes (statements queued from outside them). Send
 * everything queued, then let the writes go. A connection whose poll is armed for results needs
 * no reading here: once libpq has written everything, nothing else is left for the step.
 */
static void end_batch(struct pgr__exec *x)
{
	x->turn++;
	x->in_flush = 1;
	if (!x->destroying && x->q_head != XNONE) {
		plan_corks(x);
		pgr__exec_dispatch(x);
	}
	for (uint32_t i = 0; i < x->nxc; i++) {
		struct xconn *xc = &x->xc[i];
		if (!xc->c)
			continue;
		if (xc->corked)
			pgr__xconn_cork(xc, 0);
		if (!xc->dirty)
			continue;
		if (xc->armed && PQflush(xc->c->pg) == 0) {
			xc->dirty = 0;
			continue;
		}
		pgr__xconn_kick(xc, 0);
	}
	x->in_flush = 0;
}

/* ==== entry points ==== */

void pgr__exec_cqe(struct pgr__exec *x, uint64_t u, int res)
{
	if (!x)
		return;
	unsigned kind = u & 0xff;
	uint32_t idx = (uint32_t)(u >> 8) & 0xffffff;
	uint16_t gen = (uint16_t)(u >> 32);
	x->in_cqe++;
	switch (kind) {
	case PGR__XK_TIMER:
		x->aux_cqes--;
		x->timer_out = 0;
		x->timer_at = INT64_MAX;
		if (res != -ECANCELED)
			tick(x);
		break;
	case PGR__XK_FLUSH: /* end_batch below does the work */
		x->aux_cqes--;
		x->flush_armed = 0;
		break;
	case PGR__XK_CANCEL:
		if (idx < x->nxc)
			x->xc[idx].cqes--;
		else
			x->aux_cqes--;
		break;
	case PGR__XK_POLL: {
		if (idx >= x->nxc)
			break;
		struct xconn *xc = &x->xc[idx];
		xc->cqes--;
		if (!xc->c || gen != xc->gen || !xc->armed)
			break;
		xc->armed = 0;
		if (xc->want_cancel) {
			xc->want_cancel = 0;
			x->nwant--;
		}
		if (xc->state == C_RETIRING) {
			pgr__xconn_retire_now(xc);
			break;
		}
		if (x->destroying && xc->state != C_CANCELLING)
			break;
		pgr__xconn_kick(xc, res < 0 ? POLLERR : res);
		break;
	}
	default:
		break;
	}
	/* Answers first: their callbacks may queue statements, which go in this batch. */
	do {
		pgr__exec_deliver(x);
		end_batch(x);
	} while (x->d_head != XNONE);
	x->in_cqe--;
}

uint32_t pgr__exec_pending(const struct pgr__exec *x)
{
	if (!x)
		return 0;
	uint32_t n = x->nused + x->aux_cqes + x->nheld;
	for (uint32_t i = 0; i < x->nxc; i++)
		n += x->xc[i].cqes;
	return n;
}

/* The statement's first keyword (after blanks, comments and opening parentheses); *n: its
 * length, 0 when the text starts with no word. */
static const char *first_keyword(const char *sql, size_t *n)
{
	const char *p = sql;
	for (;;) {
		while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == '(')
			p++;
		if (p[0] == '-' && p[1] == '-') {
			while (*p && *p != '\n')
				p++;
		} else if (p[0] == '/' && p[1] == '*') {
			const char *e = strstr(p + 2, "*/");
			p = e ? e + 2 : p + strlen(p);
		} else {
			break;
		}
	}
	size_t k = 0;
	while ((p[k] >= 'a' && p[k] <= 'z') || (p[k] >= 'A' && p[k] <= 'Z'))
		k++;
	*n = k;
	return p;
}

static const char *keyword_in(const char *p, size_t n, const char *const *kw, size_t nkw)
{
	for (size_t i = 0; i < nkw; i++)
		if (strlen(kw[i]) == n && strncasecmp(p, kw[i], n) == 0)
			return kw[i];
	return NULL;
}

/* Refuse what breaks the autocommit rule where the text shows it (its first keyword). */
static const char *refused_keyword(const char *p, size_t n)
{
	static const char *const kw[] = {
	    "BEGIN",   "START",   "COMMIT", "END",   "ROLLBACK", "ABORT",      "SAVEPOINT",
	    "RELEASE", "PREPARE", "SET",    "RESET", "DISCARD",  "LISTEN",     "UNLISTEN",
	    "DECLARE", "FETCH",   "MOVE",   "CLOSE", "COPY",     "DEALLOCATE", "LOCK",
	};
	return keyword_in(p, n, kw, sizeof(kw) / sizeof(kw[0]));
}

/*
 * Whether a statement may share a sync point with others (exec_sync_group): only plain DML and
 * queries. Everything else is sent with a sync point of its own, which keeps out what cannot run
 * in a transaction block (VACUUM, CREATE DATABASE, CREATE INDEX CONCURRENTLY, ALTER SYSTEM, a
 * CALL that commits) without a list of them that would always be incomplete.
 */
static bool groupable_keyword(const char *p, size_t n)
{
	static const char *const kw[] = {
	    "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "WITH", "VALUES", "TABLE",
	};
	return keyword_in(p, n, kw, sizeof(kw) / sizeof(kw[0])) != NULL;
}

static struct pgr__exec *exec_create(pgr_loop *l)
{
	pgr_pool *p = pgr__loop_pool(l);
	const pgr_config *cfg = &p->cfg;
	struct pgr__exec *x = calloc(1, sizeof(*x));
	if (!x)
		return NULL;
	x->loop = l;
	x->pool = p;
	x->ring = pgr__loop_ring(l);
	x->depth = cfg->exec_pipeline_depth ? cfg->exec_pipeline_depth : 16;
	x->group = cfg->exec_sync_group ? cfg->exec_sync_group : 1;
	/* Room for depth statements, a DEALLOCATE each, and the re-send of a stale one. */
	x->fifo_cap = 2 * x->depth + 2;
	x->nst = cfg->exec_max_pending ? cfg->exec_max_pending : 256;
	x->nxc = cfg->exec_max_conns ? cfg->exec_max_conns : 4;
	if (x->nxc > p->cap)
		x->nxc = p->cap;
	x->st = calloc(x->nst, sizeof(*x->st));
	x->xc = calloc(x->nxc, sizeof(*x->xc));
	uint32_t *fifos = calloc((size_t)x->nxc * x->fifo_cap, sizeof(uint32_t));
	if (!x->st || !x->xc || !fifos) {
		free(x->st);
		free(x->xc);
		free(fifos);
		free(x);
		return NULL;
	}
	for (uint32_t i = 0; i < x->nst; i++)
		x->st[i].next = i + 1 < x->nst ? i + 1 : XNONE;
	for (uint32_t i = 0; i < x->nxc; i++) {
		x->xc[i].x = x;
		x->xc[i].fifo = fifos + (size_t)i * x->fifo_cap;
	}
	x->free_head = 0;
	x->q_head = x->q_tail = x->d_head = x->d_tail = XNONE;
	x->timer_at = INT64_MAX;
	x->turn = 1;
	return x;
}

void pgr__exec_free(struct pgr__exec *x)
{
	for (uint32_t i = 0; i < x->nst; i++) {
		PQclear(x->st[i].res);
		free(x->st[i].buf);
	}
	free(x->xc[0].fifo);
	free(x->st);
	free(x->xc);
	free(x);
}

static int loop_exec(pgr_loop *l, const char *sql, int nparams, const char *const *params,
                     int64_t timeout_ms, pgr_loop_exec_cb cb, void *arg)
{
	pgr_pool *p = pgr__loop_pool(l);
	int rc = pgr__pool_usable(p);
	if (rc)
		return rc;
	if (pgr__loop_destroying(l) || atomic_load_explicit(&p->closing, memory_order_relaxed))
		return -ESHUTDOWN;
	size_t kwlen;
	const char *kwp = first_keyword(sql, &kwlen);
	const char *kw = refused_keyword(kwp, kwlen);
	if (kw)
		return pgr__misuse(
		    p, PGR__NONE, -EINVAL,
		    "misuse: pgr_loop_exec refuses %s: transactions and session state "
		    "need a checked-out connection (pgr_loop_acquire)",
		    kw);
	struct pgr__exec **xp = pgr__loop_exec(l);
	if (!*xp && !(*xp = exec_create(l)))
		return -ENOMEM;
	struct pgr__exec *x = *xp;
	pgr_loop_flush(l);
	struct xstmt *s = stmt_alloc(x);
	if (!s)
		return -EBUSY;
	if (stmt_copy(s, sql, nparams, params)) {
		pgr__exec_stmt_release(x, s);
		return -ENOMEM;
	}
	s->cb = cb;
	s->arg = arg;
	s->groupable = groupable_keyword(kwp, kwlen);
	s->deadline_ns =
	    timeout_ms < 0 ? INT64_MAX : pgr__sat_add(pgr__mono_ns(), pgr__ms_to_ns(timeout_ms));
	pgr__exec_q_push(x, s, false);
	pgr__exec_timer_need(x, s->deadline_ns);
	/* Sent at the end of the batch, with whatever else comes in it: when the engine's own
	 * callback runs, at its end; otherwise when the flush NOP completes at the next submit. */
	if (!x->in_cqe)
		pgr__exec_flush_need(x);
	return 0;
}

int pgr_loop_exec(pgr_loop *l, const char *sql, int nparams, const char *const *params,
                  int64_t timeout_ms, pgr_loop_exec_cb cb, void *arg)
{
	if (!l || !sql || !cb || nparams < 0 || nparams > 65535 || (nparams > 0 && !params))
		return -EINVAL;
	pgr__loop_enter(l);
	int rc = loop_exec(l, sql, nparams, params, timeout_ms, cb, arg);
	pgr__loop_leave(l);
	return rc;
}

int pgr__exec_destroy(struct pgr__exec *x, bool may_free)
{
	if (!x)
		return 0;
	if (!x->destroying) {
		x->destroying = 1;
		pgr__exec_fail_queued(x, -ECANCELED);
		for (uint32_t k = 0; k < x->nxc; k++) {
			struct xconn *xc = &x->xc[k];
			if (!xc->c || xc->state != C_READY)
				continue;
			/* What is in flight is answered now; the server's work is cancelled and
			 * the connection closed (see conn_cancel_drain). */
			if (xc->fn) {
				pgr__xconn_abandon(xc, -ECANCELED);
				pgr__xconn_cancel_drain(xc);
			} else {
				pgr__xconn_release(xc);
			}
		}
		pgr__exec_deliver(x);
	}
	/* Once no connection is held, cancel the timer; the flush NOP completes on its own at the
	 * next submit. */
	if (x->timer_out && !x->timer_cancel_sent && !x->nheld) {
		struct io_uring_sqe *sqe = io_uring_get_sqe(x->ring);
		if (sqe) {
			io_uring_prep_timeout_remove(sqe, xud(PGR__XK_TIMER, 0, 0), 0);
			io_uring_sqe_set_data64(sqe, xud(PGR__XK_CANCEL, 0xffffff, 0));
			x->aux_cqes++;
			x->timer_cancel_sent = 1;
		}
	}
	if (x->want_timer) {
		x->want_timer = 0;
		x->nwant--;
	}
	if (x->want_flush) {
		x->want_flush = 0;
		x->nwant--;
	}
	pgr__exec_flush(x);
	/* The engine's own acquire is an operation of the loop whose callback gets x: the loop
	 * cancels it, and x must outlive that callback. */
	if (pgr__exec_pending(x) || x->acquiring)
		return -EBUSY;
	if (may_free)
		pgr__exec_free(x);
	return 0;
}
