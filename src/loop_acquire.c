/* SPDX-License-Identifier: PostgreSQL */
/*
 * The acquire side of a loop: pgr_loop_acquire (a connection now, a loop-side pre-ping, or a
 * waiter slot in the pool's FIFO with IORING_OP_FUTEX_WAIT armed on its word), the completion
 * of that wait, and pgr_loop_release, whose ROLLBACK or reset_sql runs on the loop's ring.
 *
 * Everything here runs on the loop's thread. What crosses threads is the pool's: the waiter
 * slot (granted by a release on any thread, pgr__wq_* and pgr__waiter_*), the idle shards and
 * caches (pgr__fast_take*, pgr__publish), and the manager's request queue. The overview of
 * waits, phases and deadlines is at the top of loop.c.
 */
#include <errno.h>

#include "loop_op.h"
#include "role.h"

static int64_t deadline_after(int64_t ms)
{
	return pgr__deadline_ns(ms);
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

void pgr__loop_acquire_settle(pgr_loop *l, struct op *o, struct pgr_conn *mine)
{
	pgr_pool *p = l->pool;
	struct pgr_conn *granted;
	unsigned s = pgr__wq_settle(p, o->wi, &granted);
	/* Settled only with no wait out (pgr__loop_acquire_cqe waits for both CQEs): the slot is
	 * free. */
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

/* Queue o as a waiter. Returns the enqueue's error (-PGR_E_TOO_MANY_WAITERS, -ESHUTDOWN) with
 * o untouched, for the caller to report: returned by pgr_loop_acquire itself, through the
 * callback once the acquire is under way. */
static int acquire_queue(pgr_loop *l, struct op *o)
{
	o->phase = PH_WAIT;
	pgr__clock_kick(l->pool->rt);
	int rc = pgr__wq_enqueue(l->pool, &o->wi, true);
	if (rc)
		return rc;
	struct pgr_conn *mine = pgr__fast_take(l->pool);
	if (mine)
		pgr__loop_acquire_settle(l, o, mine);
	else
		pgr__loop_arm_futex(l, o);
	return 0;
}

static void acquire_wait(pgr_loop *l, struct op *o)
{
	int rc = acquire_queue(l, o);
	if (rc)
		deliver_acquire(l, o, rc, NULL);
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

static int loop_acquire(pgr_loop *l, int64_t timeout_ms, pgr_loop_acquire_cb cb, void *arg)
{
	pgr_pool *p = l->pool;
	int rc = pgr__pool_usable(p);
	if (rc)
		return rc;
	if (l->destroying || atomic_load_explicit(&p->closing, memory_order_relaxed))
		return -ESHUTDOWN;
	pgr__loop_flush(l);
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
	if (c) {
		start_ping(l, o, c);
		return 0;
	}
	rc = acquire_queue(l, o);
	if (rc)
		op_finish(l, o); /* refused before it began: no callback */
	return rc;
}

int pgr_loop_acquire(pgr_loop *l, int64_t timeout_ms, pgr_loop_acquire_cb cb, void *arg)
{
	if (!l || !cb)
		return -EINVAL;
	pgr__loop_enter(l);
	int rc = loop_acquire(l, timeout_ms, cb, arg);
	pgr__loop_leave(l);
	return rc;
}

/* A CQE of an acquire's futex wait. Acts once both CQEs of the wait are in. */
void pgr__loop_acquire_cqe(pgr_loop *l, struct op *o)
{
	if (--o->futex_out > 0)
		return;
	o->armed = 0;
	struct pgr__waiter *w = &l->pool->waiters[o->wi];
	unsigned s = atomic_load_explicit(&w->state, memory_order_acquire);
	int64_t now = pgr__mono_ns();
	if (s == PGR__W_SLEEPING && !l->destroying && now < o->deadline_ns) {
		/*
		 * A spurious wake-up (a late wake meant for the slot's earlier waiter). Awake again
		 * until the wait is re-armed: the SQ may be full and the re-arm wait in the
		 * backlog, and a waiter left SLEEPING meanwhile would be nudged with no wait to
		 * end, then fail its park (it expects WAITING) as if shut down. WAITING, a return
		 * grants it instead; the park then finds GRANTED.
		 */
		uint32_t expect = PGR__W_SLEEPING;
		if (atomic_compare_exchange_strong_explicit(&w->state, &expect, PGR__W_WAITING,
		                                            memory_order_seq_cst,
		                                            memory_order_seq_cst)) {
			pgr__loop_arm_futex(l, o);
			return;
		}
		s = expect; /* nudged, granted or shut down meanwhile: as below */
	}
	if (s == PGR__W_NUDGED && !l->destroying && pgr__waiter_resume(w)) {
		/* A connection went idle: take it if it is still there, else wait again. */
		struct pgr_conn *mine = pgr__fast_take(l->pool);
		if (mine || now >= o->deadline_ns)
			pgr__loop_acquire_settle(l, o, mine);
		else
			pgr__loop_arm_futex(l, o);
		return;
	}
	pgr__loop_acquire_settle(l, o, NULL);
}

/* ---- the pool's own statements: ping, ROLLBACK, reset_sql ---- */

/* Start a statement of the pool's own (ping, ROLLBACK, reset_sql) on o->conn. */
static void exec_start(pgr_loop *l, struct op *o, const char *sql, int phase, int64_t timeout_ms)
{
	o->phase = (uint8_t)phase;
	PQclear(o->res);
	o->res = NULL;
	o->phase_deadline_ns = deadline_after(timeout_ms);
	o->pq = (struct pgr__pq){.pg = o->conn->pg, .sink = pgr__loop_result_sink};
	if (!pgr__pq_send_simple(o->conn->pg, sql)) {
		pgr__loop_phase_done(l, o, -EIO);
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

/* A pre-ping ended: the connection goes to the acquire, back to the pool (the acquire has its
 * answer), or out (it failed, or its server changed role) while the acquire tries again. */
void pgr__loop_ping_done(pgr_loop *l, struct op *o, int err)
{
	bool ok = exec_ok(o, err);
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
		/* The hot path's clock, as every idle_since_ms: a CLOCK_MONOTONIC stamp runs up to
		 * a tick ahead of it. */
		atomic_store_explicit(&c->idle_since_ms, pgr__now_ms(p), memory_order_relaxed);
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

/* A ROLLBACK or reset_sql ended: a good ROLLBACK is followed by reset_sql when set; then the
 * connection goes back to the pool, or out if either failed. */
void pgr__loop_reset_done(pgr_loop *l, struct op *o, int err)
{
	bool ok = exec_ok(o, err);
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
	int reason;
	if (!ok)
		pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_RESET_FAILED);
	else if (pgr__surplus(p, c, &reason)) /* the callers waiting at the return have left */
		pgr__manager_push(p, c, PGR__REQ_RETIRE, reason);
	else
		give_back(p, c);
}

/*
 * pgr_loop_destroy cancelled a ping in flight: the acquire (unless it already has its answer)
 * hears -ECANCELED, and the manager reads the ping's answer and puts the connection back.
 */
void pgr__loop_ping_cancelled(pgr_loop *l, struct op *o)
{
	struct pgr_conn *c = o->conn;
	o->conn = NULL;
	pgr__manager_push(l->pool, c, PGR__REQ_FINISH, PGR__REQ_PING);
	if (o->detached || o->done)
		op_finish(l, o);
	else
		deliver_acquire(l, o, -ECANCELED, NULL);
}

/* pgr_loop_destroy cancelled a ROLLBACK or reset_sql in flight: the manager finishes it. */
void pgr__loop_reset_cancelled(pgr_loop *l, struct op *o)
{
	struct pgr_conn *c = o->conn;
	o->conn = NULL;
	pgr__manager_push(l->pool, c, PGR__REQ_FINISH,
	                  o->phase == PH_ROLLBACK ? PGR__REQ_ROLLBACK : PGR__REQ_RESET);
	op_finish(l, o);
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

static int loop_release(pgr_loop *l, pgr_conn *h)
{
	struct pgr_conn *c = pgr__slot(h);
	if (c->pool != l->pool)
		return pgr__misuse(l->pool, PGR__NONE, -EINVAL,
		                   "misuse: pgr_loop_release of a connection of another pool");
	int rc = pgr__return_check(h, "release", &c);
	if (rc)
		return rc;
	pgr__loop_flush(l);
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

int pgr_loop_release(pgr_loop *l, pgr_conn *h)
{
	if (!l || !h)
		return -EINVAL;
	pgr__loop_enter(l);
	int rc = loop_release(l, h);
	pgr__loop_leave(l);
	return rc;
}
