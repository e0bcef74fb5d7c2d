/* SPDX-License-Identifier: PostgreSQL */
/* Detection of a connection pooler in front of the server (pooler.h). Manager-only. */
#include <stdlib.h>
#include <string.h>

#include "manager.h"
#include "pooler.h"
#include "replica.h"

/* Record what a connection showed; a detection is reported once, with what it turns off. */
static void record(pgr_pool *p, struct pgr_conn *c, bool pooler, const char *why)
{
	unsigned now = atomic_load_explicit(&p->pooler, memory_order_relaxed);
	if (now == PGR_POOLER_DETECTED || (now == PGR_POOLER_NONE && !pooler))
		return;
	if (!pooler) {
		atomic_store_explicit(&p->pooler, PGR_POOLER_NONE, memory_order_relaxed);
		return;
	}
	atomic_store_explicit(&p->pooler, PGR_POOLER_DETECTED, memory_order_relaxed);
	const char *off = p->cfg.pooler_keeps_prepared ? "kept (pooler_keeps_prepared is set)"
	                  : p->cfg.prepare_threshold < 0
	                      ? "off already (prepare_threshold -1)"
	                      : "turned off: statements go unnamed (set pooler_keeps_prepared "
	                        "if the pooler keeps them, e.g. PgBouncer 1.21+ with "
	                        "max_prepared_statements)";
	pgr__emitf(p, PGR_EV_POOLER_DETECTED, c->id,
	           "connection pooler detected in front of the server (%s): named prepared "
	           "statements %s",
	           why, off);
}

/* Carry on from where connected() left c: the lag check of a replica pool, or publish. */
static void carry_on(pgr_pool *p, struct pgr_conn *c)
{
	c->op = PGR__OP_NONE;
	if (atomic_load_explicit(&p->closing, memory_order_relaxed)) {
		pgr__mgr_close(p, c, PGR_CLOSE_POOL_CLOSING);
		return;
	}
	if (pgr__replica_connected(p, c))
		return;
	pgr__publish(p, c);
}

bool pgr__pooler_connected(pgr_pool *p, struct pgr_conn *c)
{
	/* Free, at every connect: PostgreSQL's backends have positive pids. */
	if (PQbackendPID(c->pg) <= 0)
		record(p, c, true, "its backend pid is not a process id");
	if (atomic_load_explicit(&p->pooler, memory_order_relaxed) != PGR_POOLER_UNKNOWN)
		return false;
	/*
	 * Until it is handed out it still counts as a connect in flight: grow() would otherwise
	 * open another connection for the waiter this one is about to serve. (A drain that closes
	 * it meanwhile leaves the count up; a draining pool never grows again.)
	 */
	atomic_fetch_add_explicit(&p->nconnecting, 1, memory_order_relaxed);
	pgr__mgr_start_exec(p, c, "SELECT pg_backend_pid()", p->cfg.ping_timeout_ms, AFTER_POOLER);
	return true;
}

void pgr__pooler_sample(struct pgr_conn *c, const PGresult *r)
{
	if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1 || PQnfields(r) != 1)
		return;
	long pid = strtol(PQgetvalue(r, 0, 0), NULL, 10);
	record(c->pool, c, pid != PQbackendPID(c->pg),
	       "the backend that runs its statements is not the one it was given at connect");
}

void pgr__pooler_checked(pgr_pool *p, struct pgr_conn *c, bool ok)
{
	atomic_fetch_sub_explicit(&p->nconnecting, 1, memory_order_relaxed);
	if (!ok) {
		/*
		 * A broken connection tells nothing: close it, the next connect checks again. One
		 * that is fine but refused the statement is not a plain PostgreSQL session (a
		 * pooler or proxy answering it): assume the worst, and keep the connection.
		 */
		bool usable = PQstatus(c->pg) == CONNECTION_OK &&
		              PQtransactionStatus(c->pg) == PQTRANS_IDLE &&
		              !atomic_load_explicit(&c->server_error, memory_order_relaxed);
		if (!usable) {
			pgr__mgr_close(p, c, PGR_CLOSE_PING_FAILED);
			return;
		}
		record(p, c, true, "it refused SELECT pg_backend_pid()");
	}
	carry_on(p, c);
}
