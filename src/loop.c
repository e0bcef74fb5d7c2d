/* SPDX-License-Identifier: PostgreSQL */
/*
 * Async checkout and queries on a ring the caller owns (pgr_loop).
 *
 * A loop never blocks: an acquire that finds no idle connection takes a waiter slot in the
 * pool's FIFO (the same one blocking callers use, so a release serves both in arrival order)
 * and arms IORING_OP_FUTEX_WAIT on the slot's futex word, linked to an absolute timeout. A
 * release on any thread grants the slot and does a FUTEX_WAKE, which completes the wait on the
 * loop's ring.
 *
 * Why a futex wait and not a MSG_RING grant: the grant already ends in a futex wake (for
 * blocking waiters), so a futex wait needs nothing from the releaser that knows about rings,
 * and one wake reaches either kind of waiter. The kernel quirks (PITFALLS.md 5) are handled
 * here: the words are shared futexes (no FUTEX2_PRIVATE), because a private wait armed while
 * the process was single-threaded is never woken on 6.16+; the linked timeout completes with
 * res=1, not -ETIME, so results are read from the waiter's state, never from res; and a slot
 * is not reused until both CQEs of its wait are reaped, since a stale wait on a reused word
 * would swallow the next waiter's wake.
 *
 * The same ring carries the network work a loop's checkouts need: a pre-ping of a connection
 * taken idle, a query or a pipeline, and the ROLLBACK / reset_sql of pgr_loop_release. Each is a
 * one-shot POLL_ADD on the connection's socket linked to the operation's deadline, driven by
 * the same exec state machine (exec_start ... exec_finish).
 *
 * Everything here runs on the loop's thread. Operation records live in a fixed array made at
 * pgr_loop_create; nothing is allocated per operation (a cancel of a timed-out query excepted).
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <linux/futex.h>

#include "pool.h"

enum {
	K_FUTEX = 1,
	K_ALTO,
	K_POLL,
	K_QLTO,
	K_CANCEL
};
enum {
	OP_FREE = 0,
	OP_ACQUIRE,
	OP_QUERY,
	OP_RESET
};
/* What an op's network exchange is for (exec_finish dispatches on it). */
enum {
	PH_WAIT = 0, /* acquire: waiting in the FIFO */
	PH_QUERY,    /* pgr_loop_query */
	PH_PING,     /* acquire: pre-ping of the connection it took */
	PH_ROLLBACK, /* return: ROLLBACK, then reset_sql if set */
	PH_RESET,    /* return: reset_sql */
	PH_PIPELINE  /* pgr_loop_pipeline */
};

#define FUTEX2_SIZE_U32_      0x02 /* futex2 flags; no FUTEX2_PRIVATE: see the file comment */
#define IORING_OP_FUTEX_WAIT_ 51

struct op {
	uint8_t kind;
	uint8_t armed;
	uint8_t done;  /* callback delivered; the record waits for its CQEs */
	uint8_t phase; /* PH_* */
	uint16_t inflight;
	uint16_t gen;
	uint32_t wi; /* waiter slot (acquire) */
	uint32_t next_free;
	int64_t t0_ns;
	int64_t deadline_ns;
	struct __kernel_timespec ts;
	pgr_loop_acquire_cb acb;
	pgr_loop_query_cb qcb;
	pgr_loop_pipeline_cb pcb;
	void *arg;
	struct pgr_conn *conn;
	PGresult *res;
	PGresult *pres[PGR_PIPELINE_MAX]; /* pipeline: one result per statement */
	uint8_t pn, pi;                   /* pipeline: statements, the one being read */
};

struct pgr_loop {
	pgr_pool *pool;
	struct io_uring *ring;
	struct op *ops;
	uint32_t nops;
	uint32_t free_head;
	uint32_t pending;
	int destroying;
};

static inline uint64_t ud(pgr_loop *l, struct op *o, unsigned kind)
{
	uint64_t idx = (uint64_t)(o - l->ops);
	return (PGR_LOOP_UD_TAG << 48) | ((uint64_t)o->gen << 32) | (idx << 8) | kind;
}

static struct op *op_alloc(pgr_loop *l, int kind)
{
	if (l->free_head == PGR__NONE || l->destroying)
		return NULL;
	struct op *o = &l->ops[l->free_head];
	l->free_head = o->next_free;
	uint16_t gen = o->gen;
	memset(o, 0, sizeof(*o));
	o->gen = (uint16_t)(gen + 1);
	o->kind = (uint8_t)kind;
	o->t0_ns = pgr__mono_ns();
	l->pending++;
	return o;
}

static void op_free(pgr_loop *l, struct op *o)
{
	o->kind = OP_FREE;
	o->next_free = l->free_head;
	l->free_head = (uint32_t)(o - l->ops);
	l->pending--;
}

/*
 * Two SQEs for a linked pair, or NULL. Never submits: the caller may hold a half-prepared SQE of
 * its own, and submitting is the loop's business; a full SQ ring is reported as -EBUSY.
 */
static struct io_uring_sqe *get_pair(pgr_loop *l)
{
	if (io_uring_sq_space_left(l->ring) < 2)
		return NULL;
	return io_uring_get_sqe(l->ring);
}

static void set_deadline(struct op *o, int64_t timeout_ms)
{
	/* No deadline: a year is "never" for a query and keeps one code path. */
	int64_t ms = timeout_ms < 0 ? 365LL * 24 * 3600 * 1000 : timeout_ms;
	o->deadline_ns = o->t0_ns + ms * 1000000;
}

static void link_timeout(pgr_loop *l, struct op *o, unsigned kind)
{
	o->ts.tv_sec = o->deadline_ns / 1000000000;
	o->ts.tv_nsec = o->deadline_ns % 1000000000;
	struct io_uring_sqe *s = io_uring_get_sqe(l->ring);
	io_uring_prep_link_timeout(s, &o->ts, IORING_TIMEOUT_ABS);
	io_uring_sqe_set_data64(s, ud(l, o, kind));
	o->inflight += 2;
	o->armed = 1;
}

/* ---- acquire ---- */

static int arm_futex(pgr_loop *l, struct op *o)
{
	struct pgr__waiter *w = &l->pool->waiters[o->wi];
	if (io_uring_sq_space_left(l->ring) < 2)
		return -EBUSY;
	/* Announce the park first; if the state moved on there is nothing to wait for. */
	if (!pgr__waiter_park(w))
		return -EALREADY;
	struct io_uring_sqe *s = get_pair(l);
	if (!s)
		return -EBUSY;
	o->gen++;
	memset(s, 0, sizeof(*s));
	s->opcode = IORING_OP_FUTEX_WAIT_;
	s->fd = FUTEX2_SIZE_U32_;
	s->addr = (uint64_t)(uintptr_t)&w->state;
	s->off = PGR__W_SLEEPING;
	s->addr3 = FUTEX_BITSET_MATCH_ANY;
	s->flags = IOSQE_IO_LINK;
	io_uring_sqe_set_data64(s, ud(l, o, K_FUTEX));
	link_timeout(l, o, K_ALTO);
	return 0;
}

static void deliver_acquire(pgr_loop *l, struct op *o, int err, struct pgr_conn *c)
{
	pgr_loop_acquire_cb cb = o->acb;
	void *arg = o->arg;
	o->done = 1;
	if (o->inflight == 0)
		op_free(l, o);
	cb(l, err, c, arg);
}

/* Queue (again) and either take a connection found meanwhile or arm the wait. */
static void acquire_wait(pgr_loop *l, struct op *o);

static void acquire_settle(pgr_loop *l, struct op *o, struct pgr_conn *mine)
{
	pgr_pool *p = l->pool;
	struct pgr_conn *granted;
	unsigned s = pgr__wq_settle(p, o->wi, &granted);
	pgr__wq_free(p, o->wi);
	int rc;
	if (l->destroying) {
		if (mine)
			pgr__publish(p, mine);
		if (granted)
			pgr__publish(p, granted);
		deliver_acquire(l, o, -ECANCELED, NULL);
		return;
	}
	struct pgr_conn *c = pgr__wq_outcome(p, s, mine, granted, &rc);
	int64_t now = pgr__mono_ns();
	if (c) {
		pgr__checked_out(c, now - o->t0_ns, NULL, 0, NULL);
		deliver_acquire(l, o, 0, c);
		return;
	}
	if (rc == -EAGAIN && now < o->deadline_ns) {
		acquire_wait(l, o);
		return;
	}
	if (rc == -ETIMEDOUT || rc == -EAGAIN)
		rc = pgr__timeout_error(p, (now - o->t0_ns) / 1000000);
	deliver_acquire(l, o, rc, NULL);
}

static void acquire_wait(pgr_loop *l, struct op *o)
{
	int rc = pgr__wq_enqueue(l->pool, &o->wi);
	if (rc) {
		deliver_acquire(l, o, rc, NULL);
		return;
	}
	struct pgr_conn *mine = pgr__fast_take(l->pool);
	if (mine || arm_futex(l, o) != 0) {
		/* No wait armed: settle at once (a full SQ ring counts as a timeout-free failure).
		 */
		acquire_settle(l, o, mine);
	}
}

static void start_ping(pgr_loop *l, struct op *o, struct pgr_conn *c);

/*
 * Take an idle connection for o, or wait for one. A connection that needs its pre-ping gets it
 * here, on the loop's ring, before the callback sees it.
 */
static void acquire_retry(pgr_loop *l, struct op *o)
{
	pgr_pool *p = l->pool;
	bool ping;
	struct pgr_conn *c = pgr__fast_take_ping(p, &ping);
	int64_t now = pgr__mono_ns();
	if (c && ping) {
		start_ping(l, o, c);
	} else if (c) {
		pgr__checked_out(c, now - o->t0_ns, NULL, 0, NULL);
		deliver_acquire(l, o, 0, c);
	} else if (now >= o->deadline_ns) {
		deliver_acquire(l, o, pgr__timeout_error(p, (now - o->t0_ns) / 1000000), NULL);
	} else {
		acquire_wait(l, o);
	}
}

int pgr_loop_acquire(pgr_loop *l, int64_t timeout_ms, pgr_loop_acquire_cb cb, void *arg)
{
	if (!l || !cb)
		return -EINVAL;
	pgr_pool *p = l->pool;
	if (l->destroying || atomic_load_explicit(&p->closing, memory_order_relaxed))
		return -ESHUTDOWN;
	bool ping;
	struct pgr_conn *c = pgr__fast_take_ping(p, &ping);
	if (c && !ping) {
		pgr__checked_out(c, -1, NULL, 0, NULL);
		cb(l, 0, c, arg);
		return 0;
	}
	if (timeout_ms < 0)
		timeout_ms = p->cfg.acquire_timeout_ms;
	if (!c && timeout_ms == 0)
		return -EAGAIN;
	struct op *o = NULL;
	if (io_uring_sq_space_left(l->ring) >= 2)
		o = op_alloc(l, OP_ACQUIRE);
	if (!o) {
		if (c) /* no room to ping it here: the manager pings it */
			pgr__manager_push(p, c, PGR__REQ_PING, 0);
		return -EBUSY;
	}
	o->acb = cb;
	o->arg = arg;
	set_deadline(o, timeout_ms);
	if (c) {
		start_ping(l, o, c);
		return 0;
	}
	int rc = pgr__wq_enqueue(p, &o->wi);
	if (rc) {
		op_free(l, o);
		return rc;
	}
	struct pgr_conn *mine = pgr__fast_take(p);
	if (mine || arm_futex(l, o) != 0)
		acquire_settle(l, o, mine);
	return 0;
}

static void acquire_cqe(pgr_loop *l, struct op *o)
{
	/* Act only once both CQEs of the wait are in: the slot may not be reused before. */
	if (o->inflight > 0)
		return;
	o->armed = 0;
	struct pgr__waiter *w = &l->pool->waiters[o->wi];
	unsigned s = atomic_load_explicit(&w->state, memory_order_acquire);
	if (s == PGR__W_SLEEPING && !l->destroying && pgr__mono_ns() < o->deadline_ns &&
	    arm_futex(l, o) == 0)
		return; /* spurious wake-up (a late wake meant for a slot's earlier waiter) */
	acquire_settle(l, o, NULL);
}

/* ---- queries ---- */

static void deliver_query(pgr_loop *l, struct op *o, int err)
{
	pgr_loop_query_cb cb = o->qcb;
	void *arg = o->arg;
	PGresult *res = o->res;
	o->res = NULL;
	o->done = 1;
	if (o->inflight == 0)
		op_free(l, o);
	cb(l, err, res, arg);
}

static int arm_poll(pgr_loop *l, struct op *o, unsigned events)
{
	int fd = PQsocket(o->conn->pg);
	if (fd < 0)
		return -EBADF;
	struct io_uring_sqe *s = get_pair(l);
	if (!s)
		return -EBUSY;
	o->gen++;
	io_uring_prep_poll_add(s, fd, events);
	s->flags |= IOSQE_IO_LINK;
	io_uring_sqe_set_data64(s, ud(l, o, K_POLL));
	link_timeout(l, o, K_QLTO);
	return 0;
}

static bool is_error(const PGresult *r)
{
	ExecStatusType st = PQresultStatus(r);
	return st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE;
}

/* Keep the last result, unless an earlier one was an error: the first error tells the story. */
static void keep_result(struct op *o, PGresult *r)
{
	if (o->res && is_error(o->res)) {
		PQclear(r);
		return;
	}
	PQclear(o->res);
	o->res = r;
}

static void exec_finish(pgr_loop *l, struct op *o, int err);

static void query_read(pgr_loop *l, struct op *o)
{
	PGconn *pg = o->conn->pg;
	for (;;) {
		if (!PQconsumeInput(pg)) {
			exec_finish(l, o, -EIO);
			return;
		}
		while (!PQisBusy(pg)) {
			PGresult *r = PQgetResult(pg);
			if (!r) {
				exec_finish(l, o, 0);
				return;
			}
			keep_result(o, r);
		}
		if (pgr__tls_pending(pg))
			continue;
		break;
	}
	if (arm_poll(l, o, POLLIN) < 0)
		exec_finish(l, o, -EIO);
}

static void pipeline_read(pgr_loop *l, struct op *o);

static void query_step(pgr_loop *l, struct op *o, int revents)
{
	PGconn *pg = o->conn->pg;
	int f = PQflush(pg);
	if (f < 0) {
		exec_finish(l, o, -EIO);
		return;
	}
	if (f == 1) {
		if ((revents & POLLIN) && !PQconsumeInput(pg)) {
			exec_finish(l, o, -EIO);
			return;
		}
		if (arm_poll(l, o, POLLOUT | POLLIN) < 0)
			exec_finish(l, o, -EIO);
		return;
	}
	if (o->phase == PH_PIPELINE)
		pipeline_read(l, o);
	else
		query_read(l, o);
}

static void *cancel_main(void *a)
{
	char err[256];
	PQcancel((PGcancel *)a, err, sizeof(err));
	PQfreeCancel((PGcancel *)a);
	return NULL;
}

/*
 * PostgreSQL 15's cancel connects, sends and waits for the server to hang up (~45 ms on
 * loopback): it runs on a short-lived detached thread, never on the loop. The connection stays
 * PQTRANS_ACTIVE, so its release closes it ("active_query") rather than reusing it.
 */
static void cancel_in_background(PGconn *pg)
{
	PGcancel *pc = PQgetCancel(pg);
	if (!pc)
		return;
	pthread_t t;
	pthread_attr_t at;
	pthread_attr_init(&at);
	pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &at, cancel_main, pc) != 0)
		PQfreeCancel(pc);
	pthread_attr_destroy(&at);
}

int pgr_loop_query(pgr_loop *l, pgr_conn *c, const char *sql, int nparams,
                   const char *const *params, int64_t timeout_ms, pgr_loop_query_cb cb, void *arg)
{
	if (!l || !c || !sql || !cb || nparams < 0 || c->pool != l->pool)
		return -EINVAL;
	if (atomic_load_explicit(&c->state, memory_order_relaxed) != PGR__IN_USE)
		return -EINVAL;
	if (l->destroying)
		return -ESHUTDOWN;
	if (io_uring_sq_space_left(l->ring) < 2)
		return -EBUSY;
	struct op *o = op_alloc(l, OP_QUERY);
	if (!o)
		return -EBUSY;
	if (!PQsendQueryParams(c->pg, sql, nparams, NULL, params, NULL, NULL, 0)) {
		op_free(l, o);
		return -EIO;
	}
	o->conn = c;
	o->qcb = cb;
	o->arg = arg;
	o->phase = PH_QUERY;
	set_deadline(o, timeout_ms);
	query_step(l, o, 0);
	return 0;
}

/* A CQE of an op's network exchange (query, pre-ping, rollback/reset). */
static void exec_cqe(pgr_loop *l, struct op *o, unsigned kind, uint16_t gen, int res)
{
	if (kind != K_POLL || gen != o->gen)
		return; /* its linked timeout, a cancel, or a stale CQE: only counted */
	o->armed = 0;
	if (l->destroying) {
		exec_finish(l, o, -ECANCELED);
		return;
	}
	if (res == -ECANCELED) {
		/* The linked deadline fired. A user's query is cancelled on the server; a ping or
		 * a rollback that timed out condemns its connection, which is closed instead. */
		if (o->phase == PH_QUERY || o->phase == PH_PIPELINE)
			cancel_in_background(o->conn->pg);
		PQclear(o->res);
		o->res = NULL;
		exec_finish(l, o, -ETIMEDOUT);
		return;
	}
	query_step(l, o, res < 0 ? POLLERR : res);
}

/* Send sql on o->conn and drive it on the loop's ring; exec_finish runs at the end. */
static int exec_start(pgr_loop *l, struct op *o, const char *sql, int phase, int64_t timeout_ms)
{
	o->phase = (uint8_t)phase;
	PQclear(o->res);
	o->res = NULL;
	int64_t dl = pgr__mono_ns() + timeout_ms * 1000000;
	if (phase != PH_PING || dl < o->deadline_ns)
		o->deadline_ns = dl; /* a pre-ping never outlives its acquire's deadline */
	if (!PQsendQuery(o->conn->pg, sql))
		return -EIO;
	atomic_fetch_add_explicit(&l->pool->c_loop_execs, 1, memory_order_relaxed);
	query_step(l, o, 0);
	return 0;
}

/* Did a ping / rollback / reset leave the connection healthy and idle? */
static bool exec_ok(struct op *o, int err)
{
	return err == 0 && (!o->res || !is_error(o->res)) &&
	       PQtransactionStatus(o->conn->pg) == PQTRANS_IDLE &&
	       !atomic_load_explicit(&o->conn->server_error, memory_order_relaxed);
}

/* ---- pipelines: several statements, one round trip ---- */

static void deliver_pipeline(pgr_loop *l, struct op *o, int err)
{
	pgr_loop_pipeline_cb cb = o->pcb;
	void *arg = o->arg;
	int n = o->pn;
	PGresult *res[PGR_PIPELINE_MAX];
	for (int i = 0; i < n; i++) {
		res[i] = err ? NULL : o->pres[i];
		if (err)
			PQclear(o->pres[i]);
		o->pres[i] = NULL;
	}
	o->done = 1;
	if (o->inflight == 0)
		op_free(l, o);
	cb(l, err, res, n, arg);
}

/*
 * Pipeline results arrive as: each statement's results, then NULL; after the last statement,
 * PGRES_PIPELINE_SYNC (not followed by NULL). A failed statement makes the ones after it
 * PGRES_PIPELINE_ABORTED.
 */
static void pipeline_read(pgr_loop *l, struct op *o)
{
	PGconn *pg = o->conn->pg;
	for (;;) {
		if (!PQconsumeInput(pg)) {
			exec_finish(l, o, -EIO);
			return;
		}
		while (!PQisBusy(pg)) {
			PGresult *r = PQgetResult(pg);
			if (!r) {
				o->pi++; /* end of one statement's results */
				continue;
			}
			if (PQresultStatus(r) == PGRES_PIPELINE_SYNC) {
				PQclear(r);
				int ok = o->pi == o->pn && PQexitPipelineMode(pg);
				exec_finish(l, o, ok ? 0 : -EIO);
				return;
			}
			if (o->pi >= o->pn) {
				PQclear(r);
				continue;
			}
			/* Keep a statement's last result, or its first error. */
			PGresult **slot = &o->pres[o->pi];
			if (*slot && is_error(*slot)) {
				PQclear(r);
			} else {
				PQclear(*slot);
				*slot = r;
			}
		}
		if (pgr__tls_pending(pg))
			continue;
		break;
	}
	if (arm_poll(l, o, POLLIN) < 0)
		exec_finish(l, o, -EIO);
}

int pgr_loop_pipeline(pgr_loop *l, pgr_conn *c, int n, const char *const *sql, const int *nparams,
                      const char *const *const *params, int64_t timeout_ms, pgr_loop_pipeline_cb cb,
                      void *arg)
{
	if (!l || !c || !sql || !cb || n < 1 || n > PGR_PIPELINE_MAX || c->pool != l->pool)
		return -EINVAL;
	if (atomic_load_explicit(&c->state, memory_order_relaxed) != PGR__IN_USE)
		return -EINVAL;
	if (l->destroying)
		return -ESHUTDOWN;
	if (io_uring_sq_space_left(l->ring) < 2)
		return -EBUSY;
	if (PQtransactionStatus(c->pg) == PQTRANS_ACTIVE || !PQenterPipelineMode(c->pg))
		return -EIO;
	struct op *o = op_alloc(l, OP_QUERY);
	if (!o) {
		PQexitPipelineMode(c->pg);
		return -EBUSY;
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
	o->conn = c;
	o->pcb = cb;
	o->arg = arg;
	o->pn = (uint8_t)n;
	o->phase = PH_PIPELINE;
	set_deadline(o, timeout_ms);
	query_step(l, o, 0);
	return 0;
}

/* ---- pings at checkout and rollbacks/resets at return, on the loop's ring ---- */

static void start_ping(pgr_loop *l, struct op *o, struct pgr_conn *c)
{
	o->conn = c;
	if (exec_start(l, o, "", PH_PING, l->pool->cfg.ping_timeout_ms) != 0)
		exec_finish(l, o, -EIO);
}

static void ping_done(pgr_loop *l, struct op *o, bool ok)
{
	pgr_pool *p = l->pool;
	struct pgr_conn *c = o->conn;
	o->conn = NULL;
	PQclear(o->res);
	o->res = NULL;
	o->phase = PH_WAIT;
	atomic_fetch_add_explicit(&p->c_pings, 1, memory_order_relaxed);
	if (ok) {
		int64_t now = pgr__mono_ns();
		atomic_store_explicit(&c->idle_since_ms, now / 1000000, memory_order_relaxed);
		pgr__checked_out(c, now - o->t0_ns, NULL, 0, NULL);
		deliver_acquire(l, o, 0, c);
		return;
	}
	atomic_fetch_add_explicit(&p->c_pings_failed, 1, memory_order_relaxed);
	pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_PING_FAILED);
	if (l->destroying)
		deliver_acquire(l, o, -ECANCELED, NULL);
	else
		acquire_retry(l, o); /* the caller never sees the dead one */
}

static void reset_done(pgr_loop *l, struct op *o, bool ok)
{
	pgr_pool *p = l->pool;
	struct pgr_conn *c = o->conn;
	PQclear(o->res);
	o->res = NULL;
	if (ok && o->phase == PH_ROLLBACK) {
		atomic_fetch_add_explicit(&p->c_rollbacks, 1, memory_order_relaxed);
		if (p->cfg.reset_sql) {
			if (exec_start(l, o, p->cfg.reset_sql, PH_RESET, p->cfg.reset_timeout_ms) !=
			    0)
				exec_finish(l, o, -EIO);
			return;
		}
	} else if (ok) {
		atomic_fetch_add_explicit(&p->c_resets, 1, memory_order_relaxed);
	} else {
		atomic_fetch_add_explicit(&p->c_resets_failed, 1, memory_order_relaxed);
	}
	o->conn = NULL;
	o->done = 1;
	if (o->inflight == 0)
		op_free(l, o);
	if (!ok)
		pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_RESET_FAILED);
	else if (atomic_load_explicit(&p->closing, memory_order_relaxed))
		pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_POOL_CLOSING);
	else
		pgr__publish(p, c);
}

static void exec_finish(pgr_loop *l, struct op *o, int err)
{
	switch (o->phase) {
	case PH_QUERY:
		deliver_query(l, o, err);
		return;
	case PH_PIPELINE:
		deliver_pipeline(l, o, err);
		return;
	case PH_PING:
		ping_done(l, o, exec_ok(o, err));
		return;
	default:
		reset_done(l, o, exec_ok(o, err));
		return;
	}
}

bool pgr__loop_reset(pgr_loop *l, struct pgr_conn *c, int req)
{
	if (!l || l->destroying || c->pool != l->pool || io_uring_sq_space_left(l->ring) < 2)
		return false;
	struct op *o = op_alloc(l, OP_RESET);
	if (!o)
		return false;
	o->conn = c;
	bool rollback = req == PGR__REQ_ROLLBACK;
	const char *sql = rollback ? "ROLLBACK" : l->pool->cfg.reset_sql;
	int64_t timeout_ms = l->pool->cfg.reset_timeout_ms;
	if (exec_start(l, o, sql, rollback ? PH_ROLLBACK : PH_RESET, timeout_ms) != 0)
		exec_finish(l, o, -EIO);
	return true;
}

int pgr_loop_release(pgr_loop *l, pgr_conn *c)
{
	if (!l || !c)
		return -EINVAL;
	return pgr__release(c, false, l);
}

/* ---- the loop ---- */

int pgr_loop_handle_cqe(pgr_loop *l, const struct io_uring_cqe *cqe)
{
	uint64_t u = io_uring_cqe_get_data64(cqe);
	if (!pgr_loop_owns(u))
		return 0;
	uint32_t idx = (uint32_t)(u >> 8) & 0xffffff;
	unsigned kind = u & 0xff;
	uint16_t gen = (uint16_t)(u >> 32);
	if (idx >= l->nops)
		return 1;
	struct op *o = &l->ops[idx];
	if (o->kind == OP_FREE)
		return 1;
	o->inflight--;
	if (o->done) {
		if (o->inflight == 0)
			op_free(l, o);
		return 1;
	}
	if (o->kind == OP_ACQUIRE && o->phase == PH_WAIT)
		acquire_cqe(l, o);
	else
		exec_cqe(l, o, kind, gen, cqe->res);
	return 1;
}

int pgr_loop_create(pgr_pool *p, struct io_uring *ring, uint32_t max_ops, pgr_loop **out)
{
	if (!p || !ring || !out)
		return -EINVAL;
	if (max_ops == 0)
		max_ops = 1024;
	if (max_ops > 0xffffff)
		return -EINVAL;
	pgr_loop *l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->ops = calloc(max_ops, sizeof(struct op));
	if (!l->ops) {
		free(l);
		return -ENOMEM;
	}
	l->pool = p;
	l->ring = ring;
	l->nops = max_ops;
	for (uint32_t i = 0; i < max_ops; i++)
		l->ops[i].next_free = i + 1 < max_ops ? i + 1 : PGR__NONE;
	l->free_head = 0;
	*out = l;
	return 0;
}

uint32_t pgr_loop_pending(const pgr_loop *l)
{
	return l ? l->pending : 0;
}

int pgr_loop_destroy(pgr_loop *l)
{
	if (!l)
		return 0;
	if (!l->destroying) {
		l->destroying = 1;
		for (uint32_t i = 0; i < l->nops; i++) {
			struct op *o = &l->ops[i];
			if (o->kind == OP_FREE || !o->armed || o->done)
				continue;
			struct io_uring_sqe *s = io_uring_get_sqe(l->ring);
			if (!s) {
				l->destroying =
				    0; /* not every cancel is out: the next call tries again */
				return -EBUSY;
			}
			bool futex = o->kind == OP_ACQUIRE && o->phase == PH_WAIT;
			io_uring_prep_cancel64(s, ud(l, o, futex ? K_FUTEX : K_POLL), 0);
			io_uring_sqe_set_data64(s, ud(l, o, K_CANCEL));
			o->inflight++;
			o->armed =
			    0; /* its cancel is out; a retried destroy must not cancel it twice */
		}
	}
	if (l->pending)
		return -EBUSY;
	free(l->ops);
	free(l);
	return 0;
}
