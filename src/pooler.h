/* SPDX-License-Identifier: PostgreSQL */
/*
 * Is a connection pooler (PgBouncer, ...) between the pool and the server? In transaction
 * pooling each transaction may run on another server connection, so a statement prepared by
 * name on one transaction is missing in the next (26000), or worse, the name was prepared by
 * another client of the pooler on that server and runs the wrong statement. The prepared cache
 * (exec.h) therefore uses names only once the pool knows that no pooler is there, or when the
 * config says the pooler keeps prepared statements (pooler_keeps_prepared).
 *
 * Detection. A pooler answers the client's startup itself and hands it key data of its own
 * making (PgBouncer: random bytes), so PQbackendPID() is not the pid of the backend that runs
 * the statements. Free check first, at every connect: a pid that is not positive is no
 * process id, so a pooler made it up. Otherwise, while the pool does not know yet, the manager
 * runs "SELECT pg_backend_pid()" on the new connection before handing it out (bounded by
 * ping_timeout_ms) and compares: a mismatch means a pooler. Once known, connects cost nothing
 * more. The first answer decides for the pool; a detection is sticky (a pooler found later
 * turns names off for every connection), "none" is never taken back by a later match.
 *
 * Until the pool knows, names are not used (as with a pooler); no connection is handed out
 * before its own check answered, so in practice callers never see the unknown state.
 *
 * Concurrency: pgr_pool.pooler is written by the manager only and read relaxed by anyone (the
 * loops' exec engines, pgr_pool_stats): a reader that sees the old value prepares, or does
 * not, one statement early or late, and no connection is handed out before the value it
 * needs is stored.
 */
#ifndef PGR_POOLER_H
#define PGR_POOLER_H

#include <stdbool.h>
#include <stdint.h>

#include "pool.h"

/* op_after of the check (the other values are enum pgr__req, AFTER_KEEPALIVE, AFTER_LAG). */
enum {
	AFTER_POOLER = 102
};

/*
 * The prepare threshold in force on p's connections: cfg.prepare_threshold once the pool knows
 * no pooler is in front (or the config says the pooler keeps prepared statements), else -1
 * (never). Any thread; one relaxed load.
 */
static inline int32_t pgr__prepare_threshold(const pgr_pool *p)
{
	if (p->cfg.pooler_keeps_prepared)
		return p->cfg.prepare_threshold;
	return atomic_load_explicit(&p->pooler, memory_order_relaxed) == PGR_POOLER_NONE
	           ? p->cfg.prepare_threshold
	           : -1;
}

/* A connect finished (c open, not published). True when the manager checks for a pooler
 * first (c is then busy, and pgr__pooler_checked carries on); false: carry on now. */
bool pgr__pooler_connected(pgr_pool *p, struct pgr_conn *c);
/* A result of the check (the exec's result sink). */
void pgr__pooler_sample(struct pgr_conn *c, const PGresult *r);
/* The check ended (ok: it ran): record what it found, then publish c or close it. */
void pgr__pooler_checked(pgr_pool *p, struct pgr_conn *c, bool ok);

#endif
