/* SPDX-License-Identifier: PostgreSQL */
/*
 * The records of the pgr_loop_exec engine, shared by its two halves: exec.c (statements: the
 * loop's queue, delivery, the timer, dispatch, the entry points) and exec_conn.c (the
 * connections it holds: taking, releasing and retiring them, the FIFO of what was sent on each,
 * sending, reading results, corking, cancelling). The overview is at the top of exec.c.
 *
 * Everything here is touched only by the loop's thread; nothing is atomic but the fields of
 * struct pgr_conn that the pool shares.
 */
#ifndef PGR_EXEC_CONN_H
#define PGR_EXEC_CONN_H

#include <stdbool.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "exec.h"
#include "pool.h"

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
	uint8_t groupable; /* its first keyword lets it share a sync point (exec_sync_group) */
	uint8_t solo;      /* re-sent from a failed group: with a sync point of its own */
	uint8_t sync_end;  /* sent: a sync point follows it (the last of its group) */
	uint8_t requeue;   /* group_done: goes back to the queue */
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
	uint32_t gopen; /* statements sent since the last sync point (the open group) */
	uint32_t gcur;  /* head group: statements whose results have ended */
	uint32_t gerr;  /* head group: where the first error was read, XNONE: none */
	uint32_t turn;  /* the batch it was last sent a statement in */
	uint32_t plan;  /* end_batch: statements in flight once the queue is dispatched */
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
	uint32_t group; /* statements per sync point at most (exec_sync_group); 1: each its own */
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

static inline bool is_error(const PGresult *r)
{
	ExecStatusType st = PQresultStatus(r);
	return st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE;
}

/* ---- exec.c, for exec_conn.c ---- */
void pgr__exec_stmt_release(struct pgr__exec *x, struct xstmt *s);
/* Put s in the loop's queue: at its end, or first in line (a re-send: it is the oldest). */
void pgr__exec_q_push(struct pgr__exec *x, struct xstmt *s, bool front);
/* Answer s with err; its callback runs from pgr__exec_deliver, outside libpq reading. */
void pgr__exec_answer(struct pgr__exec *x, struct xstmt *s, int err);
void pgr__exec_deliver(struct pgr__exec *x);
void pgr__exec_fail_queued(struct pgr__exec *x, int err);
/* Make sure the engine's timer fires no later than at. */
void pgr__exec_timer_need(struct pgr__exec *x, int64_t at);
/* Arm the flush NOP: what was queued is sent at the end of the loop's turn. */
void pgr__exec_flush_need(struct pgr__exec *x);
/* Send what the loop's queue holds to the held connections, taking one more when needed. */
void pgr__exec_dispatch(struct pgr__exec *x);

/* ---- exec_conn.c, for exec.c ---- */
/* Arm the poll or the poll's cancel that found the SQ full. */
void pgr__xconn_arm_wanted(struct xconn *xc);
/* Hold the connection's writes in the kernel (TCP_CORK) until uncorked, or let them go. */
void pgr__xconn_cork(struct xconn *xc, int on);
/* Hand the connection to the manager to be closed; its poll is no longer in flight. */
void pgr__xconn_retire_now(struct xconn *xc);
void pgr__xconn_retire(struct xconn *xc, int reason, bool cancel_query);
/* Give an idle held connection back to the pool. */
void pgr__xconn_release(struct xconn *xc);
/* The connection failed: exactly what was sent on it is answered -EIO. */
void pgr__xconn_fail(struct xconn *xc);
/* Put s into xc's pipeline: in the open group, or with a sync point of its own. False when
 * libpq refused it (the connection failed). */
bool pgr__xconn_send(struct xconn *xc, struct xstmt *s);
/* End xc's open group, if any, with a sync point. False when libpq refused it. */
bool pgr__xconn_close_group(struct xconn *xc);
/* Read what came, write what waits; arm the poll the connection needs. */
void pgr__xconn_kick(struct xconn *xc, int revents);
/* The held connection to send the next statement on (NULL: none below the depth); *any_usable:
 * some connection could take statements at all. */
struct xconn *pgr__xconn_pick(struct pgr__exec *x, bool *any_usable);
/* Every held connection is at its depth (or none is held): take one more from the pool. */
void pgr__xconn_take(struct pgr__exec *x, bool any_usable);
/* Everything in flight on xc was answered: cancel the server's work, then close it. */
void pgr__xconn_cancel_drain(struct xconn *xc);
/* Answer every live statement in flight on xc with err; they stay in the FIFO, abandoned. */
void pgr__xconn_abandon(struct xconn *xc, int err);

#endif
