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
 * and one wake reaches either kind of waiter. Kernel behaviour this relies on: the words are
 * shared futexes (sys.h says why); a FUTEX_WAIT has no timeout of its own, and its linked
 * timeout completes with res=1 rather than -ETIME, so the outcome is read from the waiter's
 * state, never from res; and a waiter slot is not reused until both CQEs of its wait are
 * reaped, since a stale wait on a reused word would swallow the next waiter's wake.
 *
 * The same ring carries the network work a loop's checkouts need: a pre-ping of a connection
 * taken idle, a query or a pipeline, and the ROLLBACK / reset_sql of pgr_loop_release, each
 * driven by the libpq engine (pq.h) with one-shot POLL_ADDs linked to the phase's deadline.
 *
 * Phases. An operation moves through phases (wait for a grant, ping, query, rollback, reset);
 * each arm bumps the operation's generation, which every user_data carries, so a CQE of an
 * earlier phase is only counted, never acted on. Each phase has its own deadline: a pre-ping
 * runs under ping_timeout_ms, not under what is left of its acquire; if the acquire's deadline
 * comes first, the caller gets -ETIMEDOUT and the ping finishes in the background (the
 * connection goes back to the pool, or is retired only if the ping itself failed).
 *
 * A full SQ is the caller's back-pressure, never a fault: an arm that finds no room is queued
 * on the loop (the backlog) and prepared at the start of the next pgring call on the loop.
 *
 * Everything here runs on the loop's thread. Operation records live in a fixed array made at
 * pgr_loop_create; nothing is allocated per operation (a cancel of a timed-out query excepted).
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <linux/futex.h>

#include "exec.h"
#include "pool.h"
#include "role.h"

enum {
	K_FUTEX = 1, /* the futex wait of an acquire */
	K_ALTO,      /* its linked timeout */
	K_POLL,      /* the poll of a ping, query, pipeline, rollback or reset */
	K_PLTO,      /* its linked timeout */
	K_CANCEL,    /* an ASYNC_CANCEL sent by pgr_loop_destroy */
};
enum {
	OP_FREE = 0,
	OP_ACQUIRE,
	OP_QUERY,
	OP_RESET,
};
enum {
	PH_WAIT = 0, /* acquire: waiting in the FIFO */
	PH_PING,     /* acquire: pre-ping of the connection it took */
	PH_QUERY,    /* pgr_loop_query */
	PH_PIPELINE, /* pgr_loop_pipeline */
	PH_ROLLBACK, /* return: ROLLBACK, then reset_sql if set */
	PH_RESET,    /* return: reset_sql */
};
/* What a queued (backlogged) arm will prepare once the SQ has room. */
enum {
	W_NONE = 0,
	W_FUTEX,
	W_POLL,
};

#define FUTEX2_SIZE_U32_      0x02 /* futex2 flags; no FUTEX2_PRIVATE: see sys.h */
#define IORING_OP_FUTEX_WAIT_ 51   /* liburing 2.3 has no helper for it */

struct op {
	uint8_t kind;
	uint8_t phase;
	uint8_t armed;       /* the current phase's SQE pair is in flight */
	uint8_t done;        /* nothing left to do: the record waits for its CQEs to be reaped */
	uint8_t detached;    /* acquire: the caller has its answer; a ping finishes unobserved */
	uint8_t want;        /* W_*: an arm waiting in the backlog for SQ room */
	uint8_t cancel_sent; /* pgr_loop_destroy cancelled the armed pair */
	uint8_t futex_out;   /* CQEs of the armed futex wait not yet reaped (0..2) */
	uint16_t inflight;   /* CQEs owed, every phase together */
	uint16_t gen;
	short want_events;
	uint32_t wi; /* waiter slot (acquire) */
	uint32_t next_free;
	uint32_t next_bl; /* backlog link */
	int64_t t0_ns;
	int64_t deadline_ns;       /* the operation's: acquire, query or pipeline */
	int64_t phase_deadline_ns; /* the current phase's (== deadline_ns for a query) */
	struct __kernel_timespec ts;
	pgr_loop_acquire_cb acb;
	pgr_loop_query_cb qcb;
	pgr_loop_pipeline_cb pcb;
	void *arg;
	struct pgr_conn *conn;
	struct pgr__pq pq;
	PGresult *res;
	PGresult *pres[PGR_PIPELINE_MAX]; /* pipeline: one result per statement */
	/* pgr_loop_query through the prepared-statement cache (prepare_loop_query). */
	uint64_t q_name;       /* executed by this name; 0: unnamed */
	uint8_t q_prep;        /* its Prepare went first */
	uint8_t q_prep_failed; /* and failed: the name does not exist */
	uint8_t q_first;       /* pipeline index of the statement's first part */
	uint8_t q_retry;       /* may be re-sent once (autocommit; text and parameters copied) */
	int q_nparams;
	const char *q_sql;       /* into q_buf */
	const char *const *q_pv; /* into q_buf */
	char *q_buf;             /* kept across uses of the record: no allocation once grown */
	size_t q_cap;
};

struct pgr_loop {
	pgr_pool *pool;
	struct io_uring *ring;
	struct op *ops;
	uint32_t nops;
	uint32_t free_head;
	uint32_t pending;
	uint32_t bl_head, bl_tail, bl_len; /* the backlog, FIFO */
	uint8_t destroying;                /* set by the first pgr_loop_destroy, never cleared */
	uint8_t flushing;
	struct pgr__exec *exec; /* pgr_loop_exec's engine, made at its first use (exec.c) */
};

struct io_uring *pgr__loop_ring(pgr_loop *l)
{
	return l->ring;
}
pgr_pool *pgr__loop_pool(pgr_loop *l)
{
	return l->pool;
}
struct pgr__exec **pgr__loop_exec(pgr_loop *l)
{
	return &l->exec;
}
bool pgr__loop_destroying(const pgr_loop *l)
{
	return l->destroying;
}

static inline uint64_t ud(pgr_loop *l, struct op *o, unsigned kind)
{
	uint64_t idx = (uint64_t)(o - l->ops);
	return (PGR_LOOP_UD_TAG << 48) | ((uint64_t)o->gen << 32) | (idx << 8) | kind;
}

static struct op *op_alloc(pgr_loop *l, int kind)
{
	if (l->free_head == PGR__NONE)
		return NULL;
	struct op *o = &l->ops[l->free_head];
	l->free_head = o->next_free;
	uint16_t gen = o->gen;
	char *q_buf = o->q_buf;
	size_t q_cap = o->q_cap;
	memset(o, 0, sizeof(*o));
	o->gen = gen;
	o->q_buf = q_buf;
	o->q_cap = q_cap;
	o->kind = (uint8_t)kind;
	o->next_bl = PGR__NONE;
	o->t0_ns = pgr__mono_ns();
	o->deadline_ns = INT64_MAX;
	o->phase_deadline_ns = INT64_MAX;
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

/* The operation has nothing left to do; its record goes once its CQEs are reaped. */
static void op_finish(pgr_loop *l, struct op *o)
{
	o->done = 1;
	o->detached = 0;
	if (o->inflight == 0 && o->want == W_NONE)
		op_free(l, o);
}

static int64_t deadline_after(int64_t ms)
{
	return pgr__deadline_ns(ms);
}

/* ---- the backlog: arms that found the SQ full ---- */

static void bl_push(pgr_loop *l, struct op *o, int want)
{
	o->want = (uint8_t)want;
	o->next_bl = PGR__NONE;
	uint32_t i = (uint32_t)(o - l->ops);
	if (l->bl_tail == PGR__NONE)
		l->bl_head = i;
	else
		l->ops[l->bl_tail].next_bl = i;
	l->bl_tail = i;
	l->bl_len++;
}

static void bl_remove(pgr_loop *l, struct op *o)
{
	uint32_t i = (uint32_t)(o - l->ops), prev = PGR__NONE;
	for (uint32_t k = l->bl_head; k != PGR__NONE; prev = k, k = l->ops[k].next_bl) {
		if (k != i)
			continue;
		if (prev == PGR__NONE)
			l->bl_head = o->next_bl;
		else
			l->ops[prev].next_bl = o->next_bl;
		if (l->bl_tail == i)
			l->bl_tail = prev;
		l->bl_len--;
		break;
	}
	o->next_bl = PGR__NONE;
	o->want = W_NONE;
}

static void acquire_settle(pgr_loop *l, struct op *o, struct pgr_conn *mine);
static void phase_done(pgr_loop *l, struct op *o, int err);

/*
 * Prepare the wait of an acquire now. Returns false when the SQ has no room for the pair (the
 * caller queues it). The park (WAITING -> SLEEPING) comes only once the SQEs are certain: a
 * waiter that announced sleep must have a wait armed, or a grant's wake would be lost.
 */
static bool futex_arm_now(pgr_loop *l, struct op *o)
{
	if (io_uring_sq_space_left(l->ring) < 2)
		return false;
	struct pgr__waiter *w = &l->pool->waiters[o->wi];
	if (!pgr__waiter_park(w)) {
		/* Granted or shut down meanwhile: nothing to wait for. */
		acquire_settle(l, o, NULL);
		return true;
	}
	struct io_uring_sqe *s = io_uring_get_sqe(l->ring);
	if (!s) /* cannot happen: room for two was checked */
		return false;
	o->gen++;
	memset(s, 0, sizeof(*s));
	s->opcode = IORING_OP_FUTEX_WAIT_;
	s->fd = FUTEX2_SIZE_U32_;
	s->addr = (uint64_t)(uintptr_t)&w->state;
	s->off = PGR__W_SLEEPING;
	s->addr3 = FUTEX_BITSET_MATCH_ANY;
	s->flags = IOSQE_IO_LINK;
	io_uring_sqe_set_data64(s, ud(l, o, K_FUTEX));
	pgr__ns_to_kts(o->deadline_ns, &o->ts);
	s = io_uring_get_sqe(l->ring);
	io_uring_prep_link_timeout(s, &o->ts, IORING_TIMEOUT_ABS);
	io_uring_sqe_set_data64(s, ud(l, o, K_ALTO));
	o->inflight += 2;
	o->futex_out = 2;
	o->armed = 1;
	return true;
}

/* The poll of the current phase, bounded by the nearer of the phase's and the caller's
 * deadline (a detached ping answers to its own deadline only). */
static bool poll_arm_now(pgr_loop *l, struct op *o)
{
	if (io_uring_sq_space_left(l->ring) < 2)
		return false;
	int fd = PQsocket(o->conn->pg);
	if (fd < 0) {
		phase_done(l, o, -EIO);
		return true;
	}
	o->gen++;
	struct io_uring_sqe *s = io_uring_get_sqe(l->ring);
	io_uring_prep_poll_add(s, fd, (unsigned)o->want_events);
	s->flags |= IOSQE_IO_LINK;
	io_uring_sqe_set_data64(s, ud(l, o, K_POLL));
	int64_t dl = o->phase_deadline_ns;
	if (!o->detached && o->deadline_ns < dl)
		dl = o->deadline_ns;
	pgr__ns_to_kts(dl, &o->ts);
	s = io_uring_get_sqe(l->ring);
	io_uring_prep_link_timeout(s, &o->ts, IORING_TIMEOUT_ABS);
	io_uring_sqe_set_data64(s, ud(l, o, K_PLTO));
	o->inflight += 2;
	o->armed = 1;
	return true;
}

static void arm_futex(pgr_loop *l, struct op *o)
{
	if (l->bl_len || !futex_arm_now(l, o))
		bl_push(l, o, W_FUTEX);
}

static void arm_poll(pgr_loop *l, struct op *o, short events)
{
	o->want_events = events;
	if (l->bl_len || !poll_arm_now(l, o))
		bl_push(l, o, W_POLL);
}

/* Prepare what waits in the backlog, in order, while the SQ has room. */
static uint32_t flush(pgr_loop *l)
{
	if (l->flushing)
		return l->bl_len;
	l->flushing = 1;
	while (l->bl_head != PGR__NONE) {
		struct op *o = &l->ops[l->bl_head];
		int want = o->want;
		bl_remove(l, o);
		bool ok = want == W_FUTEX ? futex_arm_now(l, o) : poll_arm_now(l, o);
		if (!ok) {
			/* Still full: back to the head, order kept. */
			o->want = (uint8_t)want;
			o->next_bl = l->bl_head;
			l->bl_head = (uint32_t)(o - l->ops);
			if (l->bl_tail == PGR__NONE)
				l->bl_tail = l->bl_head;
			l->bl_len++;
			break;
		}
		if (o->done && o->inflight == 0 && o->kind != OP_FREE)
			op_free(l, o);
	}
	l->flushing = 0;
	/* The exec engine's arms come after the loop's own, which were waiting longer. */
	return l->bl_len + (l->bl_len ? 0 : pgr__exec_flush(l->exec));
}

/* ---- acquire ---- */

static void deliver_acquire(pgr_loop *l, struct op *o, int err, pgr_conn *h)
{
	pgr_loop_acquire_cb cb = o->acb;
	void *arg = o->arg;
	op_finish(l, o);
	cb(l, err, h, arg);
}

static void acquire_wait(pgr_loop *l, struct op *o);
static void start_ping(pgr_loop *l, struct op *o, struct pgr_conn *c);

static void acquire_settle(pgr_loop *l, struct op *o, struct pgr_conn *mine)
{
	pgr_pool *p = l->pool;
	struct pgr_conn *granted;
	unsigned s = pgr__wq_settle(p, o->wi, &granted);
	/* Settled only with no wait out (acquire_cqe waits for both CQEs): the slot is free. */
	o->armed = 0;
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
		deliver_acquire(l, o, 0, pgr__checked_out(c, now - o->t0_ns, NULL, 0, NULL));
		return;
	}
	if (rc == -EAGAIN && now < o->deadline_ns) {
		acquire_wait(l, o);
		return;
	}
	if (rc == -ETIMEDOUT || rc == -EAGAIN)
		rc = pgr__timeout_error(p, (now - o->t0_ns) / PGR__NS_PER_MS);
	deliver_acquire(l, o, rc, NULL);
}

static void acquire_wait(pgr_loop *l, struct op *o)
{
	o->phase = PH_WAIT;
	pgr__clock_kick(l->pool->rt);
	int rc = pgr__wq_enqueue(l->pool, &o->wi, true);
	if (rc) {
		deliver_acquire(l, o, rc, NULL);
		return;
	}
	struct pgr_conn *mine = pgr__fast_take(l->pool);
	if (mine)
		acquire_settle(l, o, mine);
	else
		arm_futex(l, o);
}

/*
 * Take an idle connection for o, or wait for one; the deadline is looked at before anything is
 * taken, so a late retry never takes (and pings) a connection it cannot hand out.
 */
static void acquire_retry(pgr_loop *l, struct op *o)
{
	pgr_pool *p = l->pool;
	int64_t now = pgr__mono_ns();
	if (now >= o->deadline_ns) {
		deliver_acquire(l, o, pgr__timeout_error(p, (now - o->t0_ns) / PGR__NS_PER_MS),
		                NULL);
		return;
	}
	bool ping;
	struct pgr_conn *c = pgr__fast_take_ping(p, &ping);
	if (c && ping)
		start_ping(l, o, c);
	else if (c)
		deliver_acquire(l, o, 0, pgr__checked_out(c, now - o->t0_ns, NULL, 0, NULL));
	else
		acquire_wait(l, o);
}

int pgr_loop_acquire(pgr_loop *l, int64_t timeout_ms, pgr_loop_acquire_cb cb, void *arg)
{
	if (!l || !cb)
		return -EINVAL;
	pgr_pool *p = l->pool;
	int rc = pgr__pool_usable(p);
	if (rc)
		return rc;
	if (l->destroying || atomic_load_explicit(&p->closing, memory_order_relaxed))
		return -ESHUTDOWN;
	flush(l);
	if (timeout_ms < 0)
		timeout_ms = p->cfg.acquire_timeout_ms;
	bool ping;
	struct pgr_conn *c = pgr__fast_take_ping(p, &ping);
	if (timeout_ms == 0) {
		/* Only what is idle and needs no round trip. One that needs its pre-ping goes
		 * to the manager, which pings it and puts it back: never closed for our haste. */
		while (c && ping) {
			pgr__manager_push(p, c, PGR__REQ_PING, 0);
			c = pgr__fast_take_ping(p, &ping);
		}
		if (!c) {
			if (atomic_load_explicit(&p->nopen, memory_order_relaxed) <
			        pgr__lim_max_size(pgr__limits(p)) &&
			    !atomic_exchange_explicit(&p->demand, 1, memory_order_relaxed))
				pgr__manager_wake(p);
			return -EAGAIN;
		}
	}
	if (c && !ping) {
		cb(l, 0, pgr__checked_out(c, -1, NULL, 0, NULL), arg);
		return 0;
	}
	struct op *o = op_alloc(l, OP_ACQUIRE);
	if (!o) {
		if (c) /* no record to ping it here: the manager pings it */
			pgr__manager_push(p, c, PGR__REQ_PING, 0);
		return -EBUSY;
	}
	o->acb = cb;
	o->arg = arg;
	o->deadline_ns = pgr__sat_add(o->t0_ns, pgr__ms_to_ns(timeout_ms));
	if (c)
		start_ping(l, o, c);
	else
		acquire_wait(l, o);
	return 0;
}

/* A CQE of an acquire's futex wait. Acts once both CQEs of the wait are in. */
static void acquire_cqe(pgr_loop *l, struct op *o)
{
	if (--o->futex_out > 0)
		return;
	o->armed = 0;
	struct pgr__waiter *w = &l->pool->waiters[o->wi];
	unsigned s = atomic_load_explicit(&w->state, memory_order_acquire);
	int64_t now = pgr__mono_ns();
	if (s == PGR__W_SLEEPING && !l->destroying && now < o->deadline_ns) {
		/* A spurious wake-up (a late wake meant for the slot's earlier waiter). */
		arm_futex(l, o);
		return;
	}
	if (s == PGR__W_NUDGED && !l->destroying && pgr__waiter_resume(w)) {
		/* A connection went idle: take it if it is still there, else wait again. */
		struct pgr_conn *mine = pgr__fast_take(l->pool);
		if (mine || now >= o->deadline_ns)
			acquire_settle(l, o, mine);
		else
			arm_futex(l, o);
		return;
	}
	acquire_settle(l, o, NULL);
}

/* ---- the engine's phases: ping, query, pipeline, rollback, reset ---- */

static void result_sink(struct pgr__pq *x, int stmt, PGresult *r);

static bool is_error(const PGresult *r)
{
	ExecStatusType st = PQresultStatus(r);
	return st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE;
}

/* Keep a statement's last result, or its first error: the first error tells the story. */
static void result_sink(struct pgr__pq *x, int stmt, PGresult *r)
{
	struct op *o = (struct op *)((char *)x - offsetof(struct op, pq));
	PGresult **slot =
	    o->phase == PH_PIPELINE ? &o->pres[stmt < PGR_PIPELINE_MAX ? stmt : 0] : &o->res;
	if (o->phase == PH_PIPELINE && stmt >= o->pq.nstmt) {
		PQclear(r);
		return;
	}
	if (o->phase == PH_QUERY && o->q_name) {
		/* The cache's pipeline: DEALLOCATEs (before q_first) are the pool's own; of the
		 * Prepare only an error counts. */
		if (stmt < o->q_first) {
			PQclear(r);
			return;
		}
		if (o->q_prep && stmt == o->q_first && is_error(r))
			o->q_prep_failed = 1;
	}
	if (*slot && is_error(*slot)) {
		PQclear(r);
		return;
	}
	PQclear(*slot);
	*slot = r;
}

static void drive(pgr_loop *l, struct op *o, int revents)
{
	enum pgr__pq_want w = pgr__pq_step(&o->pq, revents);
	if (w == PGR__PQ_DONE)
		phase_done(l, o, 0);
	else if (w == PGR__PQ_ERROR)
		phase_done(l, o, -EIO);
	else
		arm_poll(l, o, pgr__pq_events(w));
}

/* Start a statement of the pool's own (ping, ROLLBACK, reset_sql) on o->conn. */
static void exec_start(pgr_loop *l, struct op *o, const char *sql, int phase, int64_t timeout_ms)
{
	o->phase = (uint8_t)phase;
	PQclear(o->res);
	o->res = NULL;
	o->phase_deadline_ns = deadline_after(timeout_ms);
	o->pq = (struct pgr__pq){.pg = o->conn->pg, .sink = result_sink};
	if (!pgr__pq_send_simple(o->conn->pg, sql)) {
		phase_done(l, o, -EIO);
		return;
	}
	atomic_fetch_add_explicit(&l->pool->c_loop_execs, 1, memory_order_relaxed);
	drive(l, o, 0);
}

static void start_ping(pgr_loop *l, struct op *o, struct pgr_conn *c)
{
	pgr__conn_move(c, PGR__LOOP);
	o->conn = c;
	exec_start(l, o, "", PH_PING, l->pool->cfg.ping_timeout_ms);
}

/* Did a ping / rollback / reset leave the connection healthy and idle? */
static bool exec_ok(struct op *o, int err)
{
	return err == 0 && (!o->res || !is_error(o->res)) &&
	       PQtransactionStatus(o->conn->pg) == PQTRANS_IDLE &&
	       !atomic_load_explicit(&o->conn->server_error, memory_order_relaxed);
}

/* A healthy connection the loop owns goes back to the pool (or out, if the pool closes). */
static void give_back(pgr_pool *p, struct pgr_conn *c)
{
	if (atomic_load_explicit(&p->closing, memory_order_relaxed))
		pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_POOL_CLOSING);
	else
		pgr__publish(p, c);
}

static void ping_done(pgr_loop *l, struct op *o, bool ok)
{
	pgr_pool *p = l->pool;
	struct pgr_conn *c = o->conn;
	o->conn = NULL;
	PQclear(o->res);
	o->res = NULL;
	atomic_fetch_add_explicit(&p->c_pings, 1, memory_order_relaxed);
	int64_t now = pgr__mono_ns();
	if (ok && !pgr__role_ok(p, c->pg)) {
		/* Alive, but its server changed role: the caller gets another one. */
		pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_ROLE_CHANGED);
		if (o->detached || o->done)
			op_finish(l, o);
		else if (l->destroying)
			deliver_acquire(l, o, -ECANCELED, NULL);
		else
			acquire_retry(l, o);
		return;
	}
	if (ok) {
		atomic_store_explicit(&c->idle_since_ms, now / PGR__NS_PER_MS,
		                      memory_order_relaxed);
		if (o->detached || o->done) {
			atomic_store_explicit(&c->fresh, 1, memory_order_relaxed);
			give_back(p, c);
			op_finish(l, o);
			return;
		}
		deliver_acquire(l, o, 0, pgr__checked_out(c, now - o->t0_ns, NULL, 0, NULL));
		return;
	}
	/* Only a connection that failed its own check is closed. */
	atomic_fetch_add_explicit(&p->c_pings_failed, 1, memory_order_relaxed);
	pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_PING_FAILED);
	if (o->detached || o->done)
		op_finish(l, o);
	else if (l->destroying)
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
		if (p->cfg.reset_sql && !l->destroying) {
			exec_start(l, o, p->cfg.reset_sql, PH_RESET, p->cfg.reset_timeout_ms);
			return;
		}
		if (p->cfg.reset_sql) {
			/* Destroying: the manager runs reset_sql instead. */
			o->conn = NULL;
			op_finish(l, o);
			pgr__manager_push(p, c, PGR__REQ_RESET, 0);
			return;
		}
	} else if (ok) {
		atomic_fetch_add_explicit(&p->c_resets, 1, memory_order_relaxed);
		pgr__pcache_forget(c); /* reset_sql may have dropped its prepared statements */
	} else {
		atomic_fetch_add_explicit(&p->c_resets_failed, 1, memory_order_relaxed);
	}
	o->conn = NULL;
	op_finish(l, o);
	if (!ok)
		pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_RESET_FAILED);
	else
		give_back(p, c);
}

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

static void deliver_pipeline(pgr_loop *l, struct op *o, int err)
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
	                         .sink = result_sink,
	                         .pipeline = s.nstmt > 0,
	                         .nstmt = s.nstmt,
	                         .extra_syncs = s.extra_syncs};
	drive(l, o, 0);
	return true;
}

static void phase_done(pgr_loop *l, struct op *o, int err)
{
	switch (o->phase) {
	case PH_QUERY:
		if (!err && query_retry(l, o))
			return;
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
void pgr__cancel_in_background(PGconn *pg)
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

/*
 * pgr_loop_destroy cancelled the phase in flight. The caller hears -ECANCELED; a connection
 * the loop owned mid-statement goes to the manager, which reads the statement's answer and
 * puts the connection back (a loop's end is no reason to lose a healthy connection).
 */
static void phase_cancelled(pgr_loop *l, struct op *o)
{
	pgr_pool *p = l->pool;
	struct pgr_conn *c = o->conn;
	switch (o->phase) {
	case PH_QUERY:
	case PH_PIPELINE:
		phase_done(l, o, -ECANCELED);
		return;
	case PH_PING:
		o->conn = NULL;
		pgr__manager_push(p, c, PGR__REQ_FINISH, PGR__REQ_PING);
		if (o->detached || o->done)
			op_finish(l, o);
		else
			deliver_acquire(l, o, -ECANCELED, NULL);
		return;
	default:
		o->conn = NULL;
		pgr__manager_push(p, c, PGR__REQ_FINISH,
		                  o->phase == PH_ROLLBACK ? PGR__REQ_ROLLBACK : PGR__REQ_RESET);
		op_finish(l, o);
		return;
	}
}

/* The poll of a phase completed: res is its revents, or -ECANCELED (deadline or destroy). */
static void poll_cqe(pgr_loop *l, struct op *o, int res)
{
	o->armed = 0;
	if (o->cancel_sent || l->destroying) {
		phase_cancelled(l, o);
		return;
	}
	if (res != -ECANCELED) {
		drive(l, o, res < 0 ? POLLERR : res);
		return;
	}
	/* A linked deadline fired: the phase's own, or only the caller's. */
	int64_t now = pgr__mono_ns();
	if (now < o->phase_deadline_ns && o->phase == PH_PING && !o->detached) {
		/* The acquire gave up first: answer it, let the ping finish on its own time. */
		pgr_loop_acquire_cb cb = o->acb;
		void *arg = o->arg;
		o->detached = 1;
		int err = pgr__timeout_error(l->pool, (now - o->t0_ns) / PGR__NS_PER_MS);
		arm_poll(l, o, o->want_events);
		cb(l, err, NULL, arg);
		return;
	}
	if (now < o->phase_deadline_ns && o->phase != PH_PING) {
		/* The timer fired early (it cannot, with one deadline): re-arm rather than fail. */
		arm_poll(l, o, o->want_events);
		return;
	}
	/* The phase's deadline. A user's statement is cancelled on the server; a ping or a
	 * rollback that timed out condemns its connection. */
	if (o->phase == PH_QUERY || o->phase == PH_PIPELINE)
		pgr__cancel_in_background(o->conn->pg);
	PQclear(o->res);
	o->res = NULL;
	phase_done(l, o, -ETIMEDOUT);
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
	flush(l);
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
	                         .sink = result_sink,
	                         .pipeline = nstmt > 0,
	                         .nstmt = nstmt,
	                         .extra_syncs = extra_syncs};
	drive(l, o, 0);
}

int pgr_loop_query(pgr_loop *l, pgr_conn *h, const char *sql, int nparams,
                   const char *const *params, int64_t timeout_ms, pgr_loop_query_cb cb, void *arg)
{
	if (!l || !h || !sql || !cb || nparams < 0 || (nparams > 0 && !params))
		return -EINVAL;
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

/* ---- return: rollback / reset_sql on the loop's ring ---- */

static bool loop_reset(pgr_loop *l, struct pgr_conn *c, enum pgr__verdict v)
{
	if (l->destroying)
		return false;
	struct op *o = op_alloc(l, OP_RESET);
	if (!o)
		return false;
	pgr__conn_move(c, PGR__LOOP);
	o->conn = c;
	bool rollback = v == PGR__V_ROLLBACK;
	exec_start(l, o, rollback ? "ROLLBACK" : l->pool->cfg.reset_sql,
	           rollback ? PH_ROLLBACK : PH_RESET, l->pool->cfg.reset_timeout_ms);
	return true;
}

int pgr_loop_release(pgr_loop *l, pgr_conn *h)
{
	if (!l || !h)
		return -EINVAL;
	struct pgr_conn *c = pgr__slot(h);
	if (c->pool != l->pool)
		return pgr__misuse(l->pool, PGR__NONE, -EINVAL,
		                   "misuse: pgr_loop_release of a connection of another pool");
	int rc = pgr__return_check(h, "release", &c);
	if (rc)
		return rc;
	flush(l);
	int reason = 0;
	enum pgr__verdict v = pgr__return_verdict(c, false, &reason);
	pgr_pool *p = l->pool;
	if (v == PGR__V_PUBLISH)
		pgr__publish_cached(p, c);
	else if (v == PGR__V_RETIRE)
		pgr__manager_push(p, c, PGR__REQ_RETIRE, reason);
	else if (!loop_reset(l, c, v))
		pgr__manager_push(p, c, v == PGR__V_ROLLBACK ? PGR__REQ_ROLLBACK : PGR__REQ_RESET,
		                  0);
	return 0;
}

/* ---- the loop ---- */

int pgr_loop_handle_cqe(pgr_loop *l, const struct io_uring_cqe *cqe)
{
	if (!l || !cqe)
		return 0;
	uint64_t u = io_uring_cqe_get_data64(cqe);
	if (!pgr_loop_owns(u))
		return 0;
	uint32_t idx = (uint32_t)(u >> 8) & 0xffffff;
	unsigned kind = u & 0xff;
	uint16_t gen = (uint16_t)(u >> 32);
	if (kind >= PGR__XK_POLL) {
		pgr__exec_cqe(l->exec, u, cqe->res);
		flush(l);
		return 1;
	}
	if (idx >= l->nops)
		return 1;
	struct op *o = &l->ops[idx];
	if (o->kind == OP_FREE)
		return 1;
	o->inflight--;
	bool current = gen == o->gen;
	if (kind == K_FUTEX || kind == K_ALTO) {
		if (current && o->futex_out)
			acquire_cqe(l, o);
	} else if (kind == K_POLL && current && o->armed && !o->done) {
		poll_cqe(l, o, cqe->res);
	}
	/* Linked timeouts, cancels and CQEs of earlier phases are only counted. */
	if (o->kind != OP_FREE && o->done && o->inflight == 0 && o->want == W_NONE)
		op_free(l, o);
	flush(l);
	return 1;
}

uint32_t pgr_loop_flush(pgr_loop *l)
{
	return l ? flush(l) : 0;
}

int pgr_loop_create(pgr_pool *p, struct io_uring *ring, uint32_t max_ops, pgr_loop **out)
{
	if (!out)
		return -EINVAL;
	*out = NULL;
	if (!ring)
		return -EINVAL;
	int rc = pgr__pool_usable(p);
	if (rc)
		return rc;
	if (max_ops == 0)
		max_ops = 1024;
	if (max_ops > 0xffffff)
		return -EINVAL;
	/*
	 * Probe once: without IORING_OP_FUTEX_WAIT (kernels before 6.7) every async wait would
	 * fail at once and an acquire would spin until its deadline. Refuse clearly instead.
	 */
	struct io_uring_probe *probe = io_uring_get_probe_ring(ring);
	bool futex_ok = probe && io_uring_opcode_supported(probe, IORING_OP_FUTEX_WAIT_);
	if (probe)
		io_uring_free_probe(probe);
	if (!futex_ok) {
		pgr__emitf(p, PGR_EV_CONFIG_ERROR, PGR__NONE,
		           "pgr_loop_create: this kernel's io_uring has no FUTEX_WAIT (Linux 6.7+ "
		           "needed for async waits)");
		return -PGR_E_UNSUPPORTED;
	}
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
	l->bl_head = l->bl_tail = PGR__NONE;
	atomic_fetch_add_explicit(&p->nloops, 1, memory_order_relaxed);
	*out = l;
	return 0;
}

uint32_t pgr_loop_pending(const pgr_loop *l)
{
	return l ? l->pending + pgr__exec_pending(l->exec) : 0;
}

/*
 * First call: mark the loop (for good), finish what waits in the backlog, send a cancel for
 * every armed phase. Each call after: the cancels that found no SQE, then the count. Free once
 * nothing is owed.
 */
int pgr_loop_destroy(pgr_loop *l)
{
	if (!l)
		return 0;
	l->destroying = 1;
	/* First: its statements are answered and its acquire (an op below) is cancelled. */
	int xrc = 0;
	if (l->exec && (xrc = pgr__exec_destroy(l->exec)) == 0)
		l->exec = NULL;
	for (uint32_t i = 0; i < l->nops; i++) {
		struct op *o = &l->ops[i];
		if (o->kind == OP_FREE || o->done)
			continue;
		if (o->want != W_NONE) {
			/* Nothing armed: finish it here. */
			int want = o->want;
			bl_remove(l, o);
			if (want == W_FUTEX)
				acquire_settle(l, o, NULL);
			else
				phase_cancelled(l, o);
			continue;
		}
		if (!o->armed || o->cancel_sent)
			continue;
		struct io_uring_sqe *s = io_uring_get_sqe(l->ring);
		if (!s)
			return -EBUSY; /* the SQ is full: the next call sends the rest */
		bool futex = o->phase == PH_WAIT;
		io_uring_prep_cancel64(s, ud(l, o, futex ? K_FUTEX : K_POLL), 0);
		io_uring_sqe_set_data64(s, ud(l, o, K_CANCEL));
		o->inflight++;
		o->cancel_sent = 1;
	}
	if (l->pending || xrc)
		return -EBUSY;
	atomic_fetch_sub_explicit(&l->pool->nloops, 1, memory_order_release);
	for (uint32_t i = 0; i < l->nops; i++)
		free(l->ops[i].q_buf);
	free(l->ops);
	free(l);
	return 0;
}
