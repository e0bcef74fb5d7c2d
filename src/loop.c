/* SPDX-License-Identifier: PostgreSQL */
/*
 * Async checkout and queries on a ring the caller owns (pgr_loop).
 *
 * This file is the loop itself: its operation records, the SQ backlog, arming a phase's SQE
 * pair, the dispatch of the caller's CQEs, the end of a phase, and create / destroy. The two
 * sides that start operations live apart: loop_acquire.c (async acquire, its wait on a futex
 * word, the pre-ping, and release with its ROLLBACK / reset_sql) and loop_query.c
 * (pgr_loop_query and pgr_loop_pipeline). What the three share is in loop_op.h.
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
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <linux/futex.h>

#include "loop_op.h"

#define FUTEX2_SIZE_U32_      0x02 /* futex2 flags; no FUTEX2_PRIVATE: see sys.h */
#define IORING_OP_FUTEX_WAIT_ 51   /* liburing 2.3 has no helper for it */

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
		pgr__loop_acquire_settle(l, o, NULL);
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
		pgr__loop_phase_done(l, o, -EIO);
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

void pgr__loop_arm_futex(pgr_loop *l, struct op *o)
{
	if (l->bl_len || !futex_arm_now(l, o))
		bl_push(l, o, W_FUTEX);
}

void pgr__loop_arm_poll(pgr_loop *l, struct op *o, short events)
{
	o->want_events = events;
	if (l->bl_len || !poll_arm_now(l, o))
		bl_push(l, o, W_POLL);
}

/* Prepare what waits in the backlog, in order, while the SQ has room. */
uint32_t pgr__loop_flush(pgr_loop *l)
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

/* ---- the end of a phase: results, completion, cancel ---- */

/* Keep a statement's last result, or its first error: the first error tells the story. */
void pgr__loop_result_sink(struct pgr__pq *x, int stmt, PGresult *r)
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

/* The phase ended (err 0: the engine read everything): its side decides what comes next. */
void pgr__loop_phase_done(pgr_loop *l, struct op *o, int err)
{
	switch (o->phase) {
	case PH_QUERY:
		pgr__loop_query_done(l, o, err);
		return;
	case PH_PIPELINE:
		pgr__loop_pipeline_done(l, o, err);
		return;
	case PH_PING:
		pgr__loop_ping_done(l, o, err);
		return;
	default:
		pgr__loop_reset_done(l, o, err);
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
	switch (o->phase) {
	case PH_QUERY:
	case PH_PIPELINE:
		pgr__loop_phase_done(l, o, -ECANCELED);
		return;
	case PH_PING:
		pgr__loop_ping_cancelled(l, o);
		return;
	default:
		pgr__loop_reset_cancelled(l, o);
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
		pgr__loop_arm_poll(l, o, o->want_events);
		cb(l, err, NULL, arg);
		return;
	}
	if (now < o->phase_deadline_ns && o->phase != PH_PING) {
		/* The timer fired early (it cannot, with one deadline): re-arm rather than fail. */
		pgr__loop_arm_poll(l, o, o->want_events);
		return;
	}
	/* The phase's deadline. A user's statement is cancelled on the server; a ping or a
	 * rollback that timed out condemns its connection. */
	if (o->phase == PH_QUERY || o->phase == PH_PIPELINE)
		pgr__cancel_in_background(o->conn->pg);
	PQclear(o->res);
	o->res = NULL;
	pgr__loop_phase_done(l, o, -ETIMEDOUT);
}

/* ---- the loop ---- */

static void handle_cqe(pgr_loop *l, uint64_t u, int res)
{
	uint32_t idx = (uint32_t)(u >> 8) & 0xffffff;
	unsigned kind = u & 0xff;
	uint16_t gen = (uint16_t)(u >> 32);
	if (kind >= PGR__XK_POLL) {
		pgr__exec_cqe(l->exec, u, res);
		pgr__loop_flush(l);
		return;
	}
	if (idx >= l->nops)
		return;
	struct op *o = &l->ops[idx];
	if (o->kind == OP_FREE)
		return;
	o->inflight--;
	bool current = gen == o->gen;
	if (kind == K_FUTEX || kind == K_ALTO) {
		if (current && o->futex_out)
			pgr__loop_acquire_cqe(l, o);
	} else if (kind == K_POLL && current && o->armed && !o->done) {
		poll_cqe(l, o, res);
	}
	/* Linked timeouts, cancels and CQEs of earlier phases are only counted. */
	if (o->kind != OP_FREE && o->done && o->inflight == 0 && o->want == W_NONE)
		op_free(l, o);
	pgr__loop_flush(l);
}

int pgr_loop_handle_cqe(pgr_loop *l, const struct io_uring_cqe *cqe)
{
	if (!l || !cqe)
		return 0;
	uint64_t u = io_uring_cqe_get_data64(cqe);
	if (!pgr_loop_owns(u))
		return 0;
	pgr__loop_enter(l);
	handle_cqe(l, u, cqe->res);
	pgr__loop_leave(l);
	return 1;
}

uint32_t pgr_loop_flush(pgr_loop *l)
{
	if (!l)
		return 0;
	pgr__loop_enter(l);
	uint32_t n = pgr__loop_flush(l);
	pgr__loop_leave(l);
	return n;
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
static void loop_free(pgr_loop *l)
{
	if (l->exec)
		pgr__exec_free(l->exec);
	atomic_fetch_sub_explicit(&l->pool->nloops, 1, memory_order_release);
	for (uint32_t i = 0; i < l->nops; i++)
		free(l->ops[i].q_buf);
	free(l->ops);
	free(l);
}

/*
 * A callback may call pgr_loop_destroy (or any call that runs callbacks) while a pgr_loop_* call
 * is still on the stack below it; that call goes on using the loop after the callback returns.
 * So a destroy that succeeds there only marks the loop, and the outermost call frees it.
 */
void pgr__loop_enter(pgr_loop *l)
{
	l->depth++;
}

void pgr__loop_leave(pgr_loop *l)
{
	if (--l->depth == 0 && l->free_deferred)
		loop_free(l);
}

static int loop_destroy(pgr_loop *l)
{
	l->destroying = 1;
	/* First: its statements are answered and its acquire (an op below) is cancelled. The
	 * engine is freed with the loop when a call below this one may still be inside it. */
	int xrc = 0;
	if (l->exec && (xrc = pgr__exec_destroy(l->exec, l->depth == 1)) == 0 && l->depth == 1)
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
				pgr__loop_acquire_settle(l, o, NULL);
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
	return 0;
}

int pgr_loop_destroy(pgr_loop *l)
{
	if (!l)
		return 0;
	if (l->free_deferred)
		return 0; /* destroyed already, under a callback still on the stack */
	pgr__loop_enter(l);
	int rc = loop_destroy(l);
	if (rc == 0)
		l->free_deferred = 1;
	pgr__loop_leave(l);
	return rc;
}
