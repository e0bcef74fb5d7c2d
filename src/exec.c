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
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include "exec.h"
#include "pool.h"
#include "role.h"

#define XNONE UINT32_MAX

struct xstmt {
	uint32_t next, prev; /* queue links; next alone: free list or delivery list */
	uint8_t used;
	uint8_t queued;      /* in the loop's queue, not sent */
	uint8_t in_fifo;     /* sent: in a connection's FIFO until its sync point is read */
	uint8_t cb_pending;  /* in the delivery list */
	uint8_t abandoned;   /* answered (deadline, destroy) while in flight: results discarded */
	uint8_t retried;     /* re-sent once after a stale or unknown prepared statement */
	uint8_t prep_groups; /* result groups before its own: 1 when a Prepare went with it */
	uint8_t groups_seen;
	uint8_t prep_failed;
	int nparams;
	int err;
	uint32_t conn;    /* connection record it was sent on */
	uint64_t name_id; /* prepared statement it was executed by, 0 = unnamed */
	int64_t deadline_ns;
	pgr_loop_exec_cb cb;
	void *arg;
	PGresult *res;
	const char *sql;       /* into buf */
	const char *const *pv; /* into buf */
	char *buf;             /* the copy of text and parameters, kept for reuse */
	size_t cap;
};

enum {
	C_FREE = 0,
	C_READY,
	C_CANCELLING, /* everything in flight was answered: cancel each statement as it starts */
	C_RETIRING,   /* its poll is being cancelled; then the manager closes it */
};

struct xconn {
	struct pgr__exec *x;
	struct pgr_conn *c; /* NULL: the record is free once cqes is 0 */
	uint8_t state;
	uint8_t armed;
	uint8_t want_poll; /* a poll waits for SQ room */
	uint8_t want_cancel;
	uint8_t cancel_sent;
	uint8_t dirty; /* statements in libpq's buffer not written yet */
	uint8_t in_step;
	uint8_t tcp;    /* TCP_CORK applies */
	uint8_t corked; /* until the end of the batch (end_batch) */
	short events;
	uint16_t gen;
	uint16_t cqes; /* CQEs owed */
	uint32_t fhead, fn;
	uint32_t nlive, nabandoned;
	uint32_t syncs_read;
	uint32_t turn; /* the batch it was last sent a statement in */
	uint32_t plan; /* end_batch: statements in flight once the queue is dispatched */
	int retire_reason;
	int64_t cancel_deadline_ns; /* C_CANCELLING: close it anyway then */
	int64_t idle_since_ns;
	struct pgr__pq pq;
	uint32_t *fifo; /* statement index, or XNONE for the pool's own (DEALLOCATE) */
};

struct pgr__exec {
	pgr_loop *loop;
	pgr_pool *pool;
	struct io_uring *ring;
	struct xstmt *st;
	uint32_t nst, free_head, nused;
	uint32_t q_head, q_tail, q_len;
	uint32_t d_head, d_tail;
	struct xconn *xc;
	uint32_t nxc, nheld;
	uint32_t depth, fifo_cap;
	uint8_t acquiring, delivering, dispatching, redo, destroying;
	uint8_t flush_armed, want_flush;
	uint8_t in_flush; /* end_batch runs: what is sent now is written now */
	uint8_t in_cqe;   /* handling one of its CQEs: end_batch follows */
	uint32_t turn;    /* counts batches */
	uint8_t want_timer;
	uint8_t timer_out; /* the one timer is in flight */
	uint8_t timer_cancel_sent;
	uint32_t nwant;    /* arms waiting for SQ room */
	uint32_t aux_cqes; /* timer, flush NOP and their cancels */
	int64_t timer_at;  /* the armed timer's deadline, INT64_MAX when none */
	int64_t want_timer_at;
	struct __kernel_timespec ts, ts_update;
};

static inline uint64_t xud(unsigned kind, uint32_t idx, uint16_t gen)
{
	return (PGR_LOOP_UD_TAG << 48) | ((uint64_t)gen << 32) | ((uint64_t)idx << 8) | kind;
}

static bool is_error(const PGresult *r)
{
	ExecStatusType st = PQresultStatus(r);
	return st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE;
}

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

static void stmt_release(struct pgr__exec *x, struct xstmt *s)
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

static void q_push(struct pgr__exec *x, struct xstmt *s, bool front)
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

/* ---- answers: collected here, delivered by deliver() outside libpq reading ---- */

static void answer(struct pgr__exec *x, struct xstmt *s, int err)
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

static void deliver(struct pgr__exec *x)
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
		stmt_release(x, s);
		cb(x->loop, err, res, arg);
	}
	x->delivering = 0;
}

static void fail_queued(struct pgr__exec *x, int err)
{
	while (x->q_head != XNONE) {
		struct xstmt *s = &x->st[x->q_head];
		q_remove(x, s);
		answer(x, s, err);
	}
}

/* ==== SQEs: the timer, the flush NOP, polls, cancels ==== */

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
static void timer_need(struct pgr__exec *x, int64_t at)
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

static void flush_need(struct pgr__exec *x)
{
	if (x->flush_armed || x->want_flush)
		return;
	if (!flush_arm_now(x)) {
		x->want_flush = 1;
		x->nwant++;
	}
}

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
	for (uint32_t i = 0; i < x->nxc && x->nwant; i++) {
		struct xconn *xc = &x->xc[i];
		if (xc->want_poll && poll_arm_now(xc)) {
			xc->want_poll = 0;
			x->nwant--;
		}
		if (xc->want_cancel && (!xc->armed || cancel_arm_now(xc))) {
			xc->want_cancel = 0;
			x->nwant--;
		}
	}
	return x->nwant;
}

/* ==== connections ==== */

static void conn_kick(struct xconn *xc, int revents);
static void dispatch(struct pgr__exec *x);
static void fifo_fail(struct xconn *xc, int err);

/* Hold the connection's writes in the kernel until uncorked, or let them go. */
static void cork(struct xconn *xc, int on)
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
static void conn_retire_now(struct xconn *xc)
{
	if (xc->corked)
		cork(xc, 0);
	pgr__manager_push(xc->x->pool, xc->c, PGR__REQ_RETIRE, xc->retire_reason);
	conn_free(xc);
}

/*
 * Close a held connection. Its poll must complete before the manager may PQfinish it (an
 * armed poll keeps the socket open and its CQE would name a freed connection): cancel it and
 * finish when its CQE comes.
 */
static void conn_retire(struct xconn *xc, int reason, bool cancel_query)
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
	conn_retire_now(xc);
}

/* Give an idle held connection back to the pool. */
static void conn_release(struct xconn *xc)
{
	struct pgr__exec *x = xc->x;
	struct pgr_conn *c = xc->c;
	pgr_pool *p = x->pool;
	PGconn *pg = c->pg;
	if (xc->armed) /* cannot be: an idle connection has nothing to wait for */
		return;
	if (xc->corked) /* the next holder's writes must not wait for a turn that never ends */
		cork(xc, 0);
	if (PQpipelineStatus(pg) != PQ_PIPELINE_OFF && PQexitPipelineMode(pg) != 1) {
		conn_retire(xc, PGR_CLOSE_ACTIVE_QUERY, false);
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
			stmt_release(x, s);
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
		answer(x, s, err);
	}
	xc->pq.syncs = 0;
}

/* The connection failed: exactly what was sent on it is answered -EIO. */
static void conn_fail(struct xconn *xc)
{
	fifo_fail(xc, -EIO);
	int reason = atomic_load_explicit(&xc->c->server_error, memory_order_relaxed)
	                 ? PGR_CLOSE_SERVER_ERROR
	                 : PGR_CLOSE_BROKEN;
	conn_retire(xc, reason, false);
}

/* Errors that say the server is going away or is not what the pool wants any more. */
static void note_server_error(struct pgr_conn *c, const PGresult *r)
{
	const char *ss = PQresultErrorField(r, PG_DIAG_SQLSTATE);
	if (ss && (strncmp(ss, "57P", 3) == 0 || strcmp(ss, "25006") == 0))
		atomic_store_explicit(&c->server_error, 1, memory_order_relaxed);
}

static void send_dealloc(struct xconn *xc, uint64_t name);

/* The sync point of the statement at the head of the FIFO was read. */
static void head_done(struct xconn *xc)
{
	struct pgr__exec *x = xc->x;
	uint32_t si = xc->fifo[xc->fhead];
	xc->fhead = (xc->fhead + 1) % x->fifo_cap;
	xc->fn--;
	xc->syncs_read++;
	if (si == XNONE)
		return;
	struct xstmt *s = &x->st[si];
	s->in_fifo = 0;
	if (s->abandoned) {
		xc->nabandoned--;
		stmt_release(x, s);
		return;
	}
	xc->nlive--;
	if (s->name_id && s->prep_failed)
		pgr__pcache_drop(xc->c,
		                 s->name_id); /* the Prepare failed: the name does not exist */
	if (s->name_id && !s->retried && !s->prep_failed && pgr__pcache_retryable(s->res)) {
		const char *ss = PQresultErrorField(s->res, PG_DIAG_SQLSTATE);
		bool exists = ss && strcmp(ss, "0A000") == 0;
		pgr__pcache_drop(xc->c, s->name_id);
		if (exists)
			send_dealloc(xc, s->name_id);
		PQclear(s->res);
		s->res = NULL;
		s->retried = 1;
		q_push(x, s, true); /* first in line: it is the oldest waiting */
		x->redo = 1;
		if (!x->in_cqe)
			flush_need(x);
		return;
	}
	answer(x, s, 0);
}

static void sink(struct pgr__pq *pq, int stmt, PGresult *r)
{
	struct xconn *xc = (struct xconn *)((char *)pq - offsetof(struct xconn, pq));
	struct pgr__exec *x = xc->x;
	if (!xc->fn) {
		PQclear(r);
		return;
	}
	uint32_t si = xc->fifo[xc->fhead];
	struct xstmt *s = si == XNONE ? NULL : &x->st[si];
	if (!r) {
		if (s && stmt < 0)
			s->groups_seen++;
		return;
	}
	if (PQresultStatus(r) == PGRES_PIPELINE_SYNC) {
		PQclear(r);
		head_done(xc);
		return;
	}
	if (is_error(r))
		note_server_error(xc->c, r);
	if (!s || s->abandoned) {
		PQclear(r);
		return;
	}
	if (s->res && is_error(s->res)) {
		PQclear(r); /* the first error tells the story */
		return;
	}
	if (s->groups_seen < s->prep_groups) {
		/* The Prepare sent with it: only its error matters. */
		if (is_error(r)) {
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
	xc->pq.syncs++;
	xc->dirty = 1;
}

static void send_dealloc(struct xconn *xc, uint64_t name)
{
	if (xc->fn + 1 > xc->x->fifo_cap)
		return; /* no room: the name stays until the connection closes */
	char sql[48], nm[24];
	pgr__pcache_name(name, nm, sizeof(nm));
	snprintf(sql, sizeof(sql), "DEALLOCATE %s", nm);
	PGconn *pg = xc->c->pg;
	if (!PQsendQueryParams(pg, sql, 0, NULL, NULL, NULL, NULL, 0) || !PQpipelineSync(pg))
		return; /* the next step sees the failure */
	fifo_push(xc, XNONE);
	if (!xc->x->in_flush)
		flush_need(xc->x);
}

/* Put s into xc's pipeline. False when libpq refused it (the connection failed). */
static bool send_stmt(struct xconn *xc, struct xstmt *s)
{
	struct pgr__exec *x = xc->x;
	PGconn *pg = xc->c->pg;
	uint64_t name = 0, evicted = 0;
	bool prep = false;
	/* Its second statement in this batch: hold the writes until the batch ends (end_batch). */
	if (xc->turn != x->turn)
		xc->turn = x->turn;
	else if (xc->tcp && !xc->corked)
		cork(xc, 1);
	pgr__pcache_decide(xc->c, s->sql, &name, &prep, &evicted);
	if (evicted)
		send_dealloc(xc, evicted);
	s->name_id = name;
	s->prep_groups = prep ? 1 : 0;
	s->groups_seen = 0;
	s->prep_failed = 0;
	s->in_fifo = 1;
	s->conn = (uint32_t)(xc - x->xc);
	xc->nlive++;
	fifo_push(xc, (uint32_t)(s - x->st));
	if (!x->in_flush)
		flush_need(x);
	bool ok;
	if (name) {
		char nm[24];
		pgr__pcache_name(name, nm, sizeof(nm));
		ok = (!prep || PQsendPrepare(pg, nm, s->sql, s->nparams, NULL)) &&
		     PQsendQueryPrepared(pg, nm, s->nparams, s->pv, NULL, NULL, 0);
	} else {
		ok = PQsendQueryParams(pg, s->sql, s->nparams, NULL, s->pv, NULL, NULL, 0);
	}
	return ok && PQpipelineSync(pg);
}

/* Read what came, write what waits; arm the poll the engine asks for. */
static void conn_kick(struct xconn *xc, int revents)
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
			conn_retire(xc, PGR_CLOSE_ACTIVE_QUERY, false);
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
			conn_release(xc);
			break;
		}
		if (x->pool->cfg.exec_idle_release_ms >= 0)
			timer_need(x,
			           pgr__sat_add(xc->idle_since_ns,
			                        pgr__ms_to_ns(x->pool->cfg.exec_idle_release_ms)));
		break;
	case PGR__PQ_ERROR:
		conn_fail(xc);
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

static struct xconn *pick(struct pgr__exec *x, bool *any_usable)
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
				conn_retire(xc, PGR_CLOSE_BROKEN, false);
				continue;
			}
		}
		best = xc;
	}
	return best;
}

static void on_acquire(pgr_loop *l, int err, pgr_conn *h, void *arg);

/* Every held connection is at its depth (or none is held): take one more. */
static void take_conn(struct pgr__exec *x, bool any_usable)
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
			fail_queued(x, rc);
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
			fail_queued(x, err);
		dispatch(x);
		deliver(x);
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
		conn_retire_now(xc);
	}
	/* Called from take_conn inside dispatch (an idle one was there): dispatch goes on. */
	if (x->dispatching) {
		x->redo = 1;
		return;
	}
	dispatch(x);
	deliver(x);
}

static void dispatch(struct pgr__exec *x)
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
			struct xconn *xc = pick(x, &any);
			if (!xc) {
				take_conn(x, any);
				break;
			}
			struct xstmt *s = &x->st[x->q_head];
			q_remove(x, s);
			if (!send_stmt(xc, s))
				conn_fail(xc);
		}
	} while (x->redo);
	x->dispatching = 0;
}

/*
 * Everything in flight on xc was answered (deadline, destroy): stop the server's work. A cancel
 * stops only the statement running at that instant, and the pipelined ones behind it would run
 * next, so a cancel goes out again each time a sync point is read, until nothing is left; then
 * the connection is closed (a late cancel must never reach a statement of a later user). The
 * whole drain is bounded by reset_timeout_ms.
 */
static void conn_cancel_drain(struct xconn *xc)
{
	struct pgr__exec *x = xc->x;
	xc->state = C_CANCELLING;
	xc->cancel_deadline_ns = pgr__deadline_ns(x->pool->cfg.reset_timeout_ms);
	timer_need(x, xc->cancel_deadline_ns);
	pgr__cancel_in_background(xc->c->pg);
	/* Reading is what moves the drain on: make sure a poll is armed. */
	if (!xc->armed && !xc->want_poll)
		conn_kick(xc, 0);
}

/* Answer every live statement in flight on xc with err; they stay in the FIFO, abandoned. */
static void fifo_abandon(struct xconn *xc, int err)
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
		answer(x, s, err);
	}
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
			answer(x, s, -ETIMEDOUT);
		} else if (s->in_fifo) {
			s->abandoned = 1;
			PQclear(s->res);
			s->res = NULL;
			x->xc[s->conn].nlive--;
			x->xc[s->conn].nabandoned++;
			answer(x, s, -ETIMEDOUT);
		}
	}
	if (closing)
		fail_queued(x, -ESHUTDOWN);
	int64_t idle_ns = pgr__ms_to_ns(p->cfg.exec_idle_release_ms);
	for (uint32_t k = 0; k < x->nxc; k++) {
		struct xconn *xc = &x->xc[k];
		if (xc->c && xc->state == C_CANCELLING) {
			if (xc->cancel_deadline_ns <= now)
				conn_retire(xc, PGR_CLOSE_ACTIVE_QUERY, false);
			else if (xc->cancel_deadline_ns < next)
				next = xc->cancel_deadline_ns;
			continue;
		}
		if (!xc->c || xc->state != C_READY)
			continue;
		if (xc->nabandoned && !xc->nlive) {
			/* Everything in flight here was answered -ETIMEDOUT. */
			conn_cancel_drain(xc);
			continue;
		}
		if (xc->fn || xc->dirty)
			continue;
		int64_t at = pgr__sat_add(xc->idle_since_ns, idle_ns);
		if (closing || at <= now)
			conn_release(xc);
		else if (at < next)
			next = at;
	}
	timer_need(x, next);
}

/*
 * Which connections will get two statements or more from the queue (dispatch gives each to the
 * least loaded one below the depth): cork those before their first one goes. Only for a few
 * connections; with more, a connection is corked at its second statement (send_stmt).
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
		if (use[i]->tcp && !use[i]->corked && use[i]->plan >= use[i]->nlive + 2)
			cork(use[i], 1);
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
		dispatch(x);
	}
	for (uint32_t i = 0; i < x->nxc; i++) {
		struct xconn *xc = &x->xc[i];
		if (!xc->c)
			continue;
		if (xc->corked)
			cork(xc, 0);
		if (!xc->dirty)
			continue;
		if (xc->armed && PQflush(xc->c->pg) == 0) {
			xc->dirty = 0;
			continue;
		}
		conn_kick(xc, 0);
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
			conn_retire_now(xc);
			break;
		}
		if (x->destroying && xc->state != C_CANCELLING)
			break;
		conn_kick(xc, res < 0 ? POLLERR : res);
		break;
	}
	default:
		break;
	}
	/* Answers first: their callbacks may queue statements, which go in this batch. */
	do {
		deliver(x);
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

/* Refuse what breaks the autocommit rule where the text shows it (its first keyword). */
static const char *refused_keyword(const char *sql)
{
	static const char *const kw[] = {
	    "BEGIN",   "START",   "COMMIT", "END",   "ROLLBACK", "ABORT",      "SAVEPOINT",
	    "RELEASE", "PREPARE", "SET",    "RESET", "DISCARD",  "LISTEN",     "UNLISTEN",
	    "DECLARE", "FETCH",   "MOVE",   "CLOSE", "COPY",     "DEALLOCATE", "LOCK",
	};
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
	size_t n = 0;
	while ((p[n] >= 'a' && p[n] <= 'z') || (p[n] >= 'A' && p[n] <= 'Z'))
		n++;
	for (size_t i = 0; i < sizeof(kw) / sizeof(kw[0]); i++)
		if (strlen(kw[i]) == n && strncasecmp(p, kw[i], n) == 0)
			return kw[i];
	return NULL;
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

static void exec_free(struct pgr__exec *x)
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

int pgr_loop_exec(pgr_loop *l, const char *sql, int nparams, const char *const *params,
                  int64_t timeout_ms, pgr_loop_exec_cb cb, void *arg)
{
	if (!l || !sql || !cb || nparams < 0 || nparams > 65535 || (nparams > 0 && !params))
		return -EINVAL;
	pgr_pool *p = pgr__loop_pool(l);
	int rc = pgr__pool_usable(p);
	if (rc)
		return rc;
	if (pgr__loop_destroying(l) || atomic_load_explicit(&p->closing, memory_order_relaxed))
		return -ESHUTDOWN;
	const char *kw = refused_keyword(sql);
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
		stmt_release(x, s);
		return -ENOMEM;
	}
	s->cb = cb;
	s->arg = arg;
	s->deadline_ns =
	    timeout_ms < 0 ? INT64_MAX : pgr__sat_add(pgr__mono_ns(), pgr__ms_to_ns(timeout_ms));
	q_push(x, s, false);
	timer_need(x, s->deadline_ns);
	/* Sent at the end of the batch, with whatever else comes in it: when the engine's own
	 * callback runs, at its end; otherwise when the flush NOP completes at the next submit. */
	if (!x->in_cqe)
		flush_need(x);
	return 0;
}

int pgr__exec_destroy(struct pgr__exec *x)
{
	if (!x)
		return 0;
	if (!x->destroying) {
		x->destroying = 1;
		fail_queued(x, -ECANCELED);
		for (uint32_t k = 0; k < x->nxc; k++) {
			struct xconn *xc = &x->xc[k];
			if (!xc->c || xc->state != C_READY)
				continue;
			/* What is in flight is answered now; the server's work is cancelled and
			 * the connection closed (see conn_cancel_drain). */
			if (xc->fn) {
				fifo_abandon(xc, -ECANCELED);
				conn_cancel_drain(xc);
			} else {
				conn_release(xc);
			}
		}
		deliver(x);
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
	if (pgr__exec_pending(x))
		return -EBUSY;
	exec_free(x);
	return 0;
}
