/* SPDX-License-Identifier: PostgreSQL */
/*
 * The records of a pgr_loop, shared by its three files: loop.c (the loop itself: records, the
 * SQ backlog, arming, CQE dispatch, the end of a phase, create / destroy), loop_acquire.c
 * (acquire, its futex wait, the pre-ping, release with ROLLBACK / reset_sql) and loop_query.c
 * (pgr_loop_query, pgr_loop_pipeline). The overview is at the top of loop.c.
 *
 * Everything here is touched only by the loop's thread; nothing is atomic but the fields of the
 * pool and of struct pgr_conn that the pool shares. The small helpers every operation goes
 * through are inline here: an operation's start and its every poll step cross files.
 */
#ifndef PGR_LOOP_OP_H
#define PGR_LOOP_OP_H

#include <errno.h>
#include <poll.h> /* want_events and pgr__pq_events() speak POLLIN / POLLOUT */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include <libpq-fe.h>

#include "exec.h"
#include "pool.h"

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
	uint8_t
	    free_deferred; /* pgr_loop_destroy succeeded under a callback: freed on the way out */
	uint32_t depth;    /* public pgr_loop_* calls on the stack (callbacks nest them) */
	struct pgr__exec *exec; /* pgr_loop_exec's engine, made at its first use (exec.c) */
};

/* ---- loop.c, for both sides ---- */

uint32_t pgr__loop_flush(pgr_loop *l);
void pgr__loop_arm_futex(pgr_loop *l, struct op *o);
void pgr__loop_arm_poll(pgr_loop *l, struct op *o, short events);
void pgr__loop_phase_done(pgr_loop *l, struct op *o, int err);
void pgr__loop_result_sink(struct pgr__pq *x, int stmt, PGresult *r);

/* ---- loop_acquire.c, for loop.c: the acquire's wait, the ping, rollback / reset ---- */

void pgr__loop_acquire_settle(pgr_loop *l, struct op *o, struct pgr_conn *mine);
void pgr__loop_acquire_cqe(pgr_loop *l, struct op *o);
void pgr__loop_ping_done(pgr_loop *l, struct op *o, int err);
void pgr__loop_reset_done(pgr_loop *l, struct op *o, int err);
void pgr__loop_ping_cancelled(pgr_loop *l, struct op *o);
void pgr__loop_reset_cancelled(pgr_loop *l, struct op *o);

/* ---- loop_query.c, for loop.c: the end of a query or a pipeline ---- */

void pgr__loop_query_done(pgr_loop *l, struct op *o, int err);
void pgr__loop_pipeline_done(pgr_loop *l, struct op *o, int err);

/* ---- the records ---- */

static inline struct op *op_alloc(pgr_loop *l, int kind)
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

static inline void op_free(pgr_loop *l, struct op *o)
{
	o->kind = OP_FREE;
	o->next_free = l->free_head;
	l->free_head = (uint32_t)(o - l->ops);
	l->pending--;
}

/* The operation has nothing left to do; its record goes once its CQEs are reaped. */
static inline void op_finish(pgr_loop *l, struct op *o)
{
	o->done = 1;
	o->detached = 0;
	if (o->inflight == 0 && o->want == W_NONE)
		op_free(l, o);
}

static inline bool is_error(const PGresult *r)
{
	ExecStatusType st = PQresultStatus(r);
	return st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE;
}

/* One step of the libpq engine on o's connection: the phase ends, or its next poll is armed. */
static inline void drive(pgr_loop *l, struct op *o, int revents)
{
	enum pgr__pq_want w = pgr__pq_step(&o->pq, revents);
	if (w == PGR__PQ_DONE)
		pgr__loop_phase_done(l, o, 0);
	else if (w == PGR__PQ_ERROR)
		pgr__loop_phase_done(l, o, -EIO);
	else
		pgr__loop_arm_poll(l, o, pgr__pq_events(w));
}

#endif
