/* SPDX-License-Identifier: PostgreSQL */
/*
 * The connections of the pgr_loop_exec engine (exec_conn.h): taken from the pool for a loop,
 * put in pipeline mode, and given back when idle or retired when they fail. Each has a FIFO of
 * what was sent on it (statement records, or XNONE for the pool's own DEALLOCATE); the results
 * read from libpq go to the FIFO's head, and each sync point read ends the head's statement.
 * Runs on the loop's thread only (the overview is at the top of exec.c).
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "exec_conn.h"
#include "role.h"

/* ==== SQEs: polls and their cancels ==== */

static bool poll_arm_now(struct xconn *xc)
{
	struct pgr__exec *x = xc->x;
	int fd = PQsocket(xc->c->pg);
	if (fd < 0)
		return true; /* the next step reports the failure */
	struct io_uring_sqe *sqe = io_uring_get_sqe(x->ring);
	if (!sqe)
		return false;
	xc->gen++;
	io_uring_prep_poll_add(sqe, fd, (unsigned)xc->events);
	io_uring_sqe_set_data64(sqe, xud(PGR__XK_POLL, (uint32_t)(xc - x->xc), xc->gen));
	xc->cqes++;
	xc->armed = 1;
	return true;
}

static void poll_need(struct xconn *xc, short events)
{
	if (xc->armed || xc->want_poll)
		return;
	xc->events = events;
	if (!poll_arm_now(xc)) {
		xc->want_poll = 1;
		xc->x->nwant++;
	}
}

static bool cancel_arm_now(struct xconn *xc)
{
	struct pgr__exec *x = xc->x;
	struct io_uring_sqe *sqe = io_uring_get_sqe(x->ring);
	if (!sqe)
		return false;
	uint32_t idx = (uint32_t)(xc - x->xc);
	io_uring_prep_cancel64(sqe, xud(PGR__XK_POLL, idx, xc->gen), 0);
	io_uring_sqe_set_data64(sqe, xud(PGR__XK_CANCEL, idx, 0));
	xc->cqes++;
	xc->cancel_sent = 1;
	return true;
}

static void cancel_need(struct xconn *xc)
{
	if (!xc->armed || xc->cancel_sent || xc->want_cancel)
		return;
	if (!cancel_arm_now(xc)) {
		xc->want_cancel = 1;
		xc->x->nwant++;
	}
}

void pgr__xconn_arm_wanted(struct xconn *xc)
{
	struct pgr__exec *x = xc->x;
	if (xc->want_poll && poll_arm_now(xc)) {
		xc->want_poll = 0;
		x->nwant--;
	}
	if (xc->want_cancel && (!xc->armed || cancel_arm_now(xc))) {
		xc->want_cancel = 0;
		x->nwant--;
	}
}

/* ==== holding a connection ==== */

static void fifo_fail(struct xconn *xc, int err);

/* Hold the connection's writes in the kernel until uncorked, or let them go. */
void pgr__xconn_cork(struct xconn *xc, int on)
{
	int fd = PQsocket(xc->c->pg);
	bool ok = fd >= 0 && setsockopt(fd, IPPROTO_TCP, TCP_CORK, &on, sizeof(on)) == 0;
	xc->corked = (uint8_t)(on && ok);
}

static void conn_free(struct xconn *xc)
{
	struct pgr__exec *x = xc->x;
	if (xc->want_poll) {
		xc->want_poll = 0;
		x->nwant--;
	}
	xc->c = NULL;
	xc->state = C_FREE;
	xc->dirty = 0;
	x->nheld--;
}

/* Hand the connection to the manager to be closed (its poll is no longer in flight). */
void pgr__xconn_retire_now(struct xconn *xc)
{
	if (xc->corked)
		pgr__xconn_cork(xc, 0);
	pgr__manager_push(xc->x->pool, xc->c, PGR__REQ_RETIRE, xc->retire_reason);
	conn_free(xc);
}

/*
 * Close a held connection. Its poll must complete before the manager may PQfinish it (an
 * armed poll keeps the socket open and its CQE would name a freed connection): cancel it and
 * finish when its CQE comes.
 */
void pgr__xconn_retire(struct xconn *xc, int reason, bool cancel_query)
{
	fifo_fail(xc, -EIO); /* left only timed-out ones, whose records go now */
	if (cancel_query)
		pgr__cancel_in_background(xc->c->pg);
	xc->state = C_RETIRING;
	xc->retire_reason = reason;
	if (xc->armed) {
		cancel_need(xc);
		return;
	}
	pgr__xconn_retire_now(xc);
}

/* Give an idle held connection back to the pool. */
void pgr__xconn_release(struct xconn *xc)
{
	struct pgr__exec *x = xc->x;
	struct pgr_conn *c = xc->c;
	pgr_pool *p = x->pool;
	PGconn *pg = c->pg;
	if (xc->armed) /* cannot be: an idle connection has nothing to wait for */
		return;
	if (xc->corked) /* the next holder's writes must not wait for a turn that never ends */
		pgr__xconn_cork(xc, 0);
	if (PQpipelineStatus(pg) != PQ_PIPELINE_OFF && PQexitPipelineMode(pg) != 1) {
		pgr__xconn_retire(xc, PGR_CLOSE_ACTIVE_QUERY, false);
		return;
	}
	atomic_store_explicit(&c->idle_since_ms, pgr__now_ms(p), memory_order_relaxed);
	if (atomic_load_explicit(&p->closing, memory_order_relaxed)) {
		pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_POOL_CLOSING);
	} else if (atomic_load_explicit(&c->server_error, memory_order_relaxed)) {
		pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_SERVER_ERROR);
	} else if (PQstatus(pg) != CONNECTION_OK) {
		pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_BROKEN);
	} else if (!pgr__role_ok(p, pg)) {
		pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_ROLE_CHANGED);
	} else if (PQtransactionStatus(pg) != PQTRANS_IDLE) {
		/* A statement opened a transaction the refusal could not see: roll it back. */
		pgr__manager_push(p, c, PGR__REQ_ROLLBACK, 0);
	} else {
		pgr__publish(p, c);
	}
	conn_free(xc);
}

/* Empty the FIFO: what is still live is answered err (-EIO carries libpq's words). */
static void fifo_fail(struct xconn *xc, int err)
{
	struct pgr__exec *x = xc->x;
	PGconn *pg = xc->c->pg;
	while (xc->fn) {
		uint32_t si = xc->fifo[xc->fhead];
		xc->fhead = (xc->fhead + 1) % x->fifo_cap;
		xc->fn--;
		if (si == XNONE)
			continue;
		struct xstmt *s = &x->st[si];
		s->in_fifo = 0;
		if (s->abandoned) {
			xc->nabandoned--;
			pgr__exec_stmt_release(x, s);
			continue;
		}
		xc->nlive--;
		if (err != -EIO) {
			PQclear(s->res);
			s->res = NULL;
		} else if (!s->res || !is_error(s->res)) {
			/* Carries libpq's words on the failure (PQresultErrorMessage). */
			PQclear(s->res);
			s->res = PQmakeEmptyPGresult(pg, PGRES_FATAL_ERROR);
		}
		pgr__exec_answer(x, s, err);
	}
	xc->pq.syncs = 0;
	xc->gopen = xc->gcur = 0;
	xc->gerr = XNONE;
}

/* The connection failed: exactly what was sent on it is answered -EIO. */
void pgr__xconn_fail(struct xconn *xc)
{
	fifo_fail(xc, -EIO);
	int reason = atomic_load_explicit(&xc->c->server_error, memory_order_relaxed)
	                 ? PGR_CLOSE_SERVER_ERROR
	                 : PGR_CLOSE_BROKEN;
	pgr__xconn_retire(xc, reason, false);
}

/* Errors that say the server is going away or is not what the pool wants any more. */
static void note_server_error(struct pgr_conn *c, const PGresult *r)
{
	const char *ss = PQresultErrorField(r, PG_DIAG_SQLSTATE);
	if (ss && (strncmp(ss, "57P", 3) == 0 || strcmp(ss, "25006") == 0))
		atomic_store_explicit(&c->server_error, 1, memory_order_relaxed);
}

static void send_dealloc(struct xconn *xc, uint64_t name);

static inline uint32_t fifo_at(const struct xconn *xc, uint32_t k)
{
	return xc->fifo[(xc->fhead + k) % xc->x->fifo_cap];
}

/* Whether a sync point follows the FIFO's entry k (a DEALLOCATE always has its own). */
static bool ends_group(const struct xconn *xc, uint32_t k)
{
	uint32_t si = fifo_at(xc, k);
	return si == XNONE || xc->x->st[si].sync_end;
}

/*
 * Errors that grouping itself can cause, never the statement's own doing alone: a deadlock
 * (the group holds every lock it took until its sync point) and a serialization failure (under
 * default_transaction_isolation above read committed the group shares one snapshot). The whole
 * group runs again, one statement per sync point, as it would have without grouping.
 */
static bool group_caused(const PGresult *r)
{
	const char *ss = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
	return ss && (strcmp(ss, "40P01") == 0 || strcmp(ss, "40001") == 0);
}

/*
 * A statement whose result is final: answered, or re-sent once when its prepared statement was
 * stale or unknown. True when it goes back to the queue (the caller puts it there).
 */
static bool stmt_finish(struct xconn *xc, struct xstmt *s)
{
	struct pgr__exec *x = xc->x;
	if (s->name_id && !s->retried && !s->prep_failed && pgr__pcache_retryable(s->res)) {
		const char *ss = PQresultErrorField(s->res, PG_DIAG_SQLSTATE);
		bool exists = ss && strcmp(ss, "0A000") == 0;
		pgr__pcache_drop(xc->c, s->name_id);
		if (exists)
			send_dealloc(xc, s->name_id);
		PQclear(s->res);
		s->res = NULL;
		s->retried = 1;
		return true;
	}
	pgr__exec_answer(x, s, 0);
	return false;
}

/*
 * The sync point of the group at the head of the FIFO was read: its statements are final. A
 * group of one (grouping off, a statement sent alone, a DEALLOCATE) is answered as it is. A
 * larger group ran in one implicit transaction: when every statement succeeded it committed and
 * all are answered, in order; when one failed, the server rolled back those before it and
 * aborted those after it, so none of them took effect: that one is answered with its error and
 * every other goes back to the front of the queue, in order, to run again with a sync point of
 * its own and the rest of its deadline.
 */
static void group_done(struct xconn *xc)
{
	struct pgr__exec *x = xc->x;
	uint32_t n = 0;
	while (n < xc->fn && !ends_group(xc, n++))
		;
	bool failed = n > 1 && xc->gerr != XNONE;
	uint32_t culprit = xc->gerr;
	if (failed && culprit < n) {
		uint32_t si = fifo_at(xc, culprit);
		if (si != XNONE && !x->st[si].abandoned && group_caused(x->st[si].res))
			culprit = XNONE; /* nobody's own error: all run again */
	}
	xc->gcur = 0;
	xc->gerr = XNONE;
	xc->syncs_read++;
	bool requeue = false;
	for (uint32_t k = 0; k < n; k++) {
		uint32_t si = fifo_at(xc, k);
		if (si == XNONE)
			continue;
		struct xstmt *s = &x->st[si];
		s->in_fifo = 0;
		s->requeue = 0;
		if (s->abandoned) {
			xc->nabandoned--;
			pgr__exec_stmt_release(x, s);
			continue;
		}
		xc->nlive--;
		/* Its Prepare failed or was aborted: the server has no such name. */
		if (s->name_id && s->prep_failed)
			pgr__pcache_drop(xc->c, s->name_id);
		if (failed && k != culprit) {
			PQclear(s->res);
			s->res = NULL;
			s->solo = 1;
			s->requeue = 1;
		} else {
			s->requeue = stmt_finish(xc, s);
		}
		requeue |= s->requeue;
	}
	/* Back to the front of the queue in their order: they are the oldest waiting. */
	for (uint32_t k = n; requeue && k-- > 0;) {
		uint32_t si = fifo_at(xc, k);
		if (si != XNONE && x->st[si].requeue) {
			x->st[si].requeue = 0;
			pgr__exec_q_push(x, &x->st[si], true);
		}
	}
	xc->fhead = (xc->fhead + n) % x->fifo_cap;
	xc->fn -= n;
	if (requeue) {
		x->redo = 1;
		/* Read by end_batch after its dispatch (in_flush), nothing may follow to send them
		 * when no answer was delivered: the flush NOP does. */
		if (!x->in_cqe || x->in_flush)
			pgr__exec_flush_need(x);
	}
}

static void sink(struct pgr__pq *pq, int stmt, PGresult *r)
{
	(void)stmt;
	struct xconn *xc = (struct xconn *)((char *)pq - offsetof(struct xconn, pq));
	struct pgr__exec *x = xc->x;
	if (!xc->fn) {
		PQclear(r);
		return;
	}
	if (r && PQresultStatus(r) == PGRES_PIPELINE_SYNC) {
		PQclear(r);
		group_done(xc);
		return;
	}
	/*
	 * Results go to the statement at gcur, the first of the head group whose results have not
	 * ended. Once every one has ended, what comes before the sync point (an error raised at
	 * commit, e.g. by a deferred constraint) belongs to the group as a whole: to its last
	 * statement, and to none of them alone when there are several (gerr past them all).
	 */
	uint32_t at = xc->gcur;
	bool tail = at > 0 && ends_group(xc, at - 1);
	if (tail)
		at--;
	else if (at >= xc->fn) {
		PQclear(r); /* cannot be: more results than statements sent */
		return;
	}
	uint32_t si = fifo_at(xc, at);
	struct xstmt *s = si == XNONE ? NULL : &x->st[si];
	if (!r) {
		/* One query's results ended: its Prepare's, or its own (the next one's follow). */
		if (!tail && (!s || ++s->groups_seen > s->prep_groups))
			xc->gcur++;
		return;
	}
	if (is_error(r)) {
		note_server_error(xc->c, r);
		if (xc->gerr == XNONE)
			xc->gerr = tail ? xc->gcur : at;
	}
	if (!s || s->abandoned) {
		PQclear(r);
		return;
	}
	if (s->res && is_error(s->res)) {
		PQclear(r); /* the first error tells the story */
		return;
	}
	if (s->groups_seen < s->prep_groups) {
		/* The Prepare sent with it: only its failure matters (an aborted one never ran). */
		if (is_error(r) || PQresultStatus(r) == PGRES_PIPELINE_ABORTED) {
			s->prep_failed = 1;
			PQclear(s->res);
			s->res = r;
		} else {
			PQclear(r);
		}
		return;
	}
	PQclear(s->res);
	s->res = r;
}

static void fifo_push(struct xconn *xc, uint32_t si)
{
	struct pgr__exec *x = xc->x;
	xc->fifo[(xc->fhead + xc->fn) % x->fifo_cap] = si;
	xc->fn++;
	xc->dirty = 1;
}

/*
 * libpq writes at each sync point. The connection's second write in one dispatch and those after
 * it are held (TCP_CORK) until the batch ends (end_batch), so the backend is woken once per batch
 * rather than once per sync point.
 */
static void before_sync(struct xconn *xc)
{
	struct pgr__exec *x = xc->x;
	if (!x->dispatching)
		return; /* a DEALLOCATE sent while reading: written by the read's own step */
	if (xc->turn != x->turn)
		xc->turn = x->turn;
	else if (xc->tcp && !xc->corked)
		pgr__xconn_cork(xc, 1);
}

bool pgr__xconn_close_group(struct xconn *xc)
{
	if (!xc->gopen)
		return true;
	before_sync(xc);
	/* The open group's statements are the FIFO's last gopen entries, none a DEALLOCATE. */
	xc->x->st[fifo_at(xc, xc->fn - 1)].sync_end = 1;
	xc->gopen = 0;
	xc->pq.syncs++;
	return PQpipelineSync(xc->c->pg) == 1;
}

static void send_dealloc(struct xconn *xc, uint64_t name)
{
	if (xc->fn + 1 > xc->x->fifo_cap)
		return; /* no room: the name stays until the connection closes */
	/* In a group of its own: its failure must not abort a statement. */
	if (!pgr__xconn_close_group(xc))
		return; /* the next step sees the failure */
	before_sync(xc);
	char sql[48], nm[24];
	pgr__pcache_name(name, nm, sizeof(nm));
	snprintf(sql, sizeof(sql), "DEALLOCATE %s", nm);
	PGconn *pg = xc->c->pg;
	if (!PQsendQueryParams(pg, sql, 0, NULL, NULL, NULL, NULL, 0) || !PQpipelineSync(pg))
		return; /* the next step sees the failure */
	fifo_push(xc, XNONE);
	xc->pq.syncs++;
	if (!xc->x->in_flush)
		pgr__exec_flush_need(xc->x);
}

/* Put s into xc's pipeline. False when libpq refused it (the connection failed). */
bool pgr__xconn_send(struct xconn *xc, struct xstmt *s)
{
	struct pgr__exec *x = xc->x;
	PGconn *pg = xc->c->pg;
	uint64_t name = 0, evicted = 0;
	bool prep = false;
	/* Shares a sync point with the statements sent after it (exec_sync_group), or has its own
	 * and ends the open group first. */
	bool grouped = x->group > 1 && s->groupable && !s->solo;
	if (!grouped && !pgr__xconn_close_group(xc))
		return false;
	pgr__pcache_decide(xc->c, s->sql, &name, &prep, &evicted);
	if (evicted)
		send_dealloc(xc, evicted);
	s->sync_end = 0;
	s->name_id = name;
	s->prep_groups = prep ? 1 : 0;
	s->groups_seen = 0;
	s->prep_failed = 0;
	s->in_fifo = 1;
	s->conn = (uint32_t)(xc - x->xc);
	xc->nlive++;
	fifo_push(xc, (uint32_t)(s - x->st));
	if (!x->in_flush)
		pgr__exec_flush_need(x);
	bool ok;
	if (name) {
		char nm[24];
		pgr__pcache_name(name, nm, sizeof(nm));
		ok = (!prep || PQsendPrepare(pg, nm, s->sql, s->nparams, NULL)) &&
		     PQsendQueryPrepared(pg, nm, s->nparams, s->pv, NULL, NULL, 0);
	} else {
		ok = PQsendQueryParams(pg, s->sql, s->nparams, NULL, s->pv, NULL, NULL, 0);
	}
	xc->gopen++;
	if (!ok)
		return false;
	return grouped && xc->gopen < x->group ? true : pgr__xconn_close_group(xc);
}

/* Read what came, write what waits; arm the poll the engine asks for. */
void pgr__xconn_kick(struct xconn *xc, int revents)
{
	struct pgr__exec *x = xc->x;
	if ((xc->state != C_READY && xc->state != C_CANCELLING) || xc->in_step)
		return;
	uint32_t synced = xc->syncs_read;
	xc->in_step = 1;
	xc->dirty = 0;
	enum pgr__pq_want w = pgr__pq_stream_step(&xc->pq, revents);
	/* A DEALLOCATE sent while reading sits in libpq's buffer: write it too. */
	if (xc->dirty && (w == PGR__PQ_READ || w == PGR__PQ_DONE)) {
		xc->dirty = 0;
		w = pgr__pq_stream_step(&xc->pq, 0);
	}
	xc->in_step = 0;
	if (xc->state == C_CANCELLING && w != PGR__PQ_ERROR) {
		if (!xc->fn) {
			pgr__xconn_retire(xc, PGR_CLOSE_ACTIVE_QUERY, false);
			return;
		}
		/* The statement behind the cancelled one has started (or is about to): it was
		 * answered already, so it is cancelled too. */
		if (xc->syncs_read != synced)
			pgr__cancel_in_background(xc->c->pg);
	}
	switch (w) {
	case PGR__PQ_DONE:
		xc->idle_since_ns = pgr__mono_ns();
		if (atomic_load_explicit(&x->pool->closing, memory_order_relaxed)) {
			/* The pool drains: it waits for this connection. */
			pgr__xconn_release(xc);
			break;
		}
		if (x->pool->cfg.exec_idle_release_ms >= 0)
			pgr__exec_timer_need(
			    x, pgr__sat_add(xc->idle_since_ns,
			                    pgr__ms_to_ns(x->pool->cfg.exec_idle_release_ms)));
		break;
	case PGR__PQ_ERROR:
		pgr__xconn_fail(xc);
		break;
	default:
		poll_need(xc, pgr__pq_events(w));
		break;
	}
}

/* A connection idle for a while is checked with no round trip before it gets a statement:
 * a backend killed while idle shows as a readable socket. */
static bool conn_idle_ok(struct xconn *xc, int64_t now)
{
	int64_t after = xc->x->pool->cfg.check_after_idle_ms;
	if (xc->fn || after < 0 || now - xc->idle_since_ns < pgr__ms_to_ns(after))
		return true;
	struct pollfd pfd = {.fd = PQsocket(xc->c->pg), .events = POLLIN | POLLRDHUP};
	if (pfd.fd < 0)
		return false;
	if (poll(&pfd, 1, 0) == 0)
		return true;
	return PQconsumeInput(xc->c->pg) && PQstatus(xc->c->pg) == CONNECTION_OK &&
	       !(pfd.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

struct xconn *pgr__xconn_pick(struct pgr__exec *x, bool *any_usable)
{
	struct xconn *best = NULL;
	int64_t now = 0;
	*any_usable = false;
	for (uint32_t i = 0; i < x->nxc; i++) {
		struct xconn *xc = &x->xc[i];
		/* A connection with a timed-out statement in flight takes nothing new. */
		if (!xc->c || xc->state != C_READY || xc->nabandoned)
			continue;
		*any_usable = true;
		if (xc->nlive >= x->depth || xc->fn + 2 > x->fifo_cap)
			continue;
		if (best && xc->nlive >= best->nlive)
			continue;
		if (!xc->fn) {
			if (!now)
				now = pgr__mono_ns();
			if (!conn_idle_ok(xc, now)) {
				atomic_fetch_add_explicit(&x->pool->c_checks_failed, 1,
				                          memory_order_relaxed);
				pgr__xconn_retire(xc, PGR_CLOSE_BROKEN, false);
				continue;
			}
		}
		best = xc;
	}
	return best;
}

static void on_acquire(pgr_loop *l, int err, pgr_conn *h, void *arg);

/* Every held connection is at its depth (or none is held): take one more. */
void pgr__xconn_take(struct pgr__exec *x, bool any_usable)
{
	pgr_pool *p = x->pool;
	if (x->acquiring || x->destroying || x->nheld >= x->nxc ||
	    atomic_load_explicit(&p->closing, memory_order_relaxed))
		return;
	/*
	 * Wait in the pool's FIFO (the manager opens one if the pool may grow), for as long as the
	 * oldest queued statement may wait. Meanwhile a held connection that gets room serves the
	 * queue; a connection that arrives after the queue emptied is given back when idle.
	 */
	int64_t tmo = p->cfg.acquire_timeout_ms;
	int64_t dl = x->q_head != XNONE ? x->st[x->q_head].deadline_ns : INT64_MAX;
	if (dl != INT64_MAX) {
		int64_t left = (dl - pgr__mono_ns() + PGR__NS_PER_MS - 1) / PGR__NS_PER_MS;
		tmo = left < 1 ? 1 : left < tmo ? left : tmo;
	}
	x->acquiring = 1;
	int rc = pgr_loop_acquire(x->loop, tmo, on_acquire, x);
	if (rc) {
		x->acquiring = 0;
		if (rc != -EAGAIN && !any_usable && x->nheld == 0)
			pgr__exec_fail_queued(x, rc);
	}
}

static void on_acquire(pgr_loop *l, int err, pgr_conn *h, void *arg)
{
	(void)l;
	struct pgr__exec *x = arg;
	x->acquiring = 0;
	if (err) {
		/* No connection within the time the oldest statement had: what waits with no
		 * connection to go to hears why. */
		if (x->nheld == 0)
			pgr__exec_fail_queued(x, err);
		pgr__exec_dispatch(x);
		pgr__exec_deliver(x);
		return;
	}
	struct pgr_conn *c = pgr__slot(h);
	pgr__conn_move(c, PGR__LOOP);
	struct xconn *xc = NULL;
	for (uint32_t i = 0; i < x->nxc && !xc; i++)
		if (!x->xc[i].c && x->xc[i].cqes == 0)
			xc = &x->xc[i];
	if (!xc || x->destroying) {
		pgr__publish(x->pool, c);
		return;
	}
	uint32_t *fifo = xc->fifo;
	uint16_t gen = xc->gen;
	memset(xc, 0, sizeof(*xc));
	xc->fifo = fifo;
	xc->gen = gen;
	xc->x = x;
	xc->c = c;
	xc->state = C_READY;
	xc->gerr = XNONE;
	xc->idle_since_ns = pgr__mono_ns();
	xc->pq = (struct pgr__pq){.pg = c->pg, .sink = sink};
	struct sockaddr_storage sa;
	socklen_t salen = sizeof(sa);
	int fd = PQsocket(c->pg);
	xc->tcp = fd >= 0 && getsockname(fd, (struct sockaddr *)&sa, &salen) == 0 &&
	          (sa.ss_family == AF_INET || sa.ss_family == AF_INET6);
	x->nheld++;
	if (PQsetnonblocking(c->pg, 1) != 0 || PQenterPipelineMode(c->pg) != 1) {
		xc->retire_reason = PGR_CLOSE_BROKEN;
		pgr__xconn_retire_now(xc);
	}
	/* Called from take_conn inside dispatch (an idle one was there): dispatch goes on. */
	if (x->dispatching) {
		x->redo = 1;
		return;
	}
	pgr__exec_dispatch(x);
	pgr__exec_deliver(x);
}

/*
 * Everything in flight on xc was answered (deadline, destroy): stop the server's work. A cancel
 * stops only the statement running at that instant, and the pipelined ones behind it would run
 * next, so a cancel goes out again each time a sync point is read, until nothing is left; then
 * the connection is closed (a late cancel must never reach a statement of a later user). The
 * whole drain is bounded by reset_timeout_ms.
 */
void pgr__xconn_cancel_drain(struct xconn *xc)
{
	struct pgr__exec *x = xc->x;
	xc->state = C_CANCELLING;
	xc->cancel_deadline_ns = pgr__deadline_ns(x->pool->cfg.reset_timeout_ms);
	pgr__exec_timer_need(x, xc->cancel_deadline_ns);
	pgr__cancel_in_background(xc->c->pg);
	/* Reading is what moves the drain on: make sure a poll is armed. */
	if (!xc->armed && !xc->want_poll)
		pgr__xconn_kick(xc, 0);
}

/* Answer every live statement in flight on xc with err; they stay in the FIFO, abandoned. */
void pgr__xconn_abandon(struct xconn *xc, int err)
{
	struct pgr__exec *x = xc->x;
	for (uint32_t j = 0; j < xc->fn; j++) {
		uint32_t si = xc->fifo[(xc->fhead + j) % x->fifo_cap];
		if (si == XNONE || x->st[si].abandoned)
			continue;
		struct xstmt *s = &x->st[si];
		s->abandoned = 1;
		PQclear(s->res);
		s->res = NULL;
		xc->nlive--;
		xc->nabandoned++;
		pgr__exec_answer(x, s, err);
	}
}
