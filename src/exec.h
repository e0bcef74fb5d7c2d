/* SPDX-License-Identifier: PostgreSQL */
/*
 * pgr_loop_exec: statements on the pool without a checkout, pipelined over the connections a
 * pgr_loop holds for them, and the per-connection prepared-statement cache they (and, when
 * configured, pgr_loop_query) use.
 *
 * The exec engine is a part of a pgr_loop (one per loop, made at its first pgr_loop_exec) and
 * runs only on the loop's thread. loop.c routes the CQEs whose kind is PGR__XK_* here, calls
 * pgr__exec_flush from its own backlog flush, counts pgr__exec_pending into pgr_loop_pending,
 * and lets pgr__exec_destroy finish before it frees the loop.
 *
 * The prepared-statement cache lives in the connection slot (struct pgr_conn.pcache): it is
 * written only by the slot's owner, like every other non-atomic field of the slot, and dies
 * with the libpq connection (finish_close) or with a reset_sql run on it.
 */
#ifndef PGR_EXEC_H
#define PGR_EXEC_H

#include <stdbool.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "pgring.h"

struct pgr_conn;
struct pgr__exec;
struct io_uring;

/* user_data kinds of the exec engine; loop.c's own kinds are below 16. */
enum {
	PGR__XK_POLL = 16, /* a connection's one-shot poll */
	PGR__XK_TIMER,     /* the engine's deadline / idle-release timer */
	PGR__XK_FLUSH,     /* a NOP: write what was queued since, in one send per connection */
	PGR__XK_CANCEL,    /* an ASYNC_CANCEL or TIMEOUT_REMOVE of the engine */
};

/* ---- loop.c, for the exec engine ---- */
struct io_uring *pgr__loop_ring(pgr_loop *l);
pgr_pool *pgr__loop_pool(pgr_loop *l);
struct pgr__exec **pgr__loop_exec(pgr_loop *l);
bool pgr__loop_destroying(const pgr_loop *l);
/* Around every public pgr_loop_* call: a callback may call pgr_loop_destroy, which then only
 * marks the loop, and the outermost call frees it on its way out (loop.c). */
void pgr__loop_enter(pgr_loop *l);
void pgr__loop_leave(pgr_loop *l);
/* PostgreSQL 15's cancel blocks: it runs on a short-lived detached thread. */
void pgr__cancel_in_background(PGconn *pg);

/* ---- exec.c, for loop.c ---- */
void pgr__exec_cqe(struct pgr__exec *x, uint64_t user_data, int res);
/* Prepare the engine's SQEs that found the SQ full; returns how many still wait. */
uint32_t pgr__exec_flush(struct pgr__exec *x);
/* Statements not yet answered plus CQEs owed. */
uint32_t pgr__exec_pending(const struct pgr__exec *x);
/* First call: fail what is queued, cancel what is armed. 0 once nothing is owed, with the
 * engine freed when may_free (else pgr__exec_free frees it later: the engine is still on the
 * stack under a callback); -EBUSY before (keep driving the ring and call again). */
int pgr__exec_destroy(struct pgr__exec *x, bool may_free);
void pgr__exec_free(struct pgr__exec *x);

/* ---- the prepared-statement cache (exec.c), for every owner of a slot ---- */
struct pgr__pcache;
/*
 * What to send for sql on c: *name_id 0 = unnamed (extended protocol, parsed every time);
 * otherwise execute statement "pgr_<hex name_id>", preparing it first when *prepare is set.
 * *evicted: a name this call dropped from the cache (send DEALLOCATE for it), or 0.
 * Returns false when the cache cannot be used (off, or out of memory: unnamed then).
 */
bool pgr__pcache_decide(struct pgr_conn *c, const char *sql, uint64_t *name_id, bool *prepare,
                        uint64_t *evicted);
/* The server no longer knows name_id (or its plan went stale): forget it; the text's next use
 * prepares it again. */
void pgr__pcache_drop(struct pgr_conn *c, uint64_t name_id);
/* reset_sql ran (DISCARD ALL drops every prepared statement): forget the names. */
void pgr__pcache_forget(struct pgr_conn *c);
/* The libpq connection is gone: free the cache. */
void pgr__pcache_free(struct pgr_conn *c);
void pgr__pcache_name(uint64_t name_id, char *buf, size_t len);
/* A statement executed by name failed in a way that a fresh prepare fixes: the plan's result
 * type changed (0A000) or the name is unknown (26000, e.g. after DISCARD ALL by a holder). */
bool pgr__pcache_retryable(const PGresult *r);

/* What pgr__pcache_send put in the pipeline. */
struct pgr__pcache_sent {
	uint64_t name_id;    /* executed by this name; 0: unnamed */
	uint8_t prepared;    /* a Prepare of name_id went first */
	uint8_t nstmt;       /* statements in the pipeline, 0: none (sent unnamed, no pipeline) */
	uint8_t first;       /* index of the statement's own first (Prepare or Execute) */
	uint8_t extra_syncs; /* sync points before the statement's own (the DEALLOCATEs) */
};
/*
 * Send sql on the idle, checked-out connection c through its cache (pgr_loop_query): below the
 * threshold unnamed as usual; otherwise in pipeline mode, each DEALLOCATE (stale: a name to
 * drop first, or 0; and what the cache evicts) in a group of its own so that its failure
 * cannot abort the statement, then Prepare if due and Execute by name, then a sync point.
 * Returns 0 (sent), or -1 when libpq refused (the connection is unusable: in pipeline mode
 * with part of it queued).
 */
int pgr__pcache_send(struct pgr_conn *c, const char *sql, int nparams, const char *const *pv,
                     uint64_t stale, struct pgr__pcache_sent *out);
/* Copy a statement's text and parameters into *buf (grown only when it is larger than any
 * before): 0 or -ENOMEM. */
int pgr__stmt_copy(char **buf, size_t *cap, const char *sql, int nparams, const char *const *params,
                   const char **sql_out, const char *const **pv_out);

#endif
