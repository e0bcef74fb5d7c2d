/* SPDX-License-Identifier: PostgreSQL */
/*
 * Internal interface between the manager's loop (manager.c) and the network operations of one
 * connection (conn_io.c). Manager-only: called on the manager's thread, or by pgr_pool_run's
 * caller when the pool has no manager thread.
 */
#ifndef PGR_MANAGER_H
#define PGR_MANAGER_H

#include "pool.h"

/* user_data of a pool's SQEs on its runtime's ring:
 * (generation & 0xffff) << 48 | pool index << 32 | slot << 8 | tag. */
enum {
	TAG_POLL = 1, /* the one poll of a connection */
	TAG_LTO,      /* its linked timeout */
	TAG_CANCEL,   /* an ASYNC_CANCEL of it */
};

/* op_after of a background keepalive ping (the other values are enum pgr__req). */
enum {
	AFTER_KEEPALIVE = 100
};

static inline uint64_t pgr__mgr_tag(const pgr_pool *p, uint32_t id, uint32_t gen, unsigned t)
{
	return ((uint64_t)(gen & 0xffff) << 48) | ((uint64_t)p->rt_index << 32) |
	       ((uint64_t)id << 8) | t;
}

/* An SQE, with at least need free (a linked pair is never split across a submit). */
struct io_uring_sqe *pgr__mgr_get_sqe(pgr_pool *p, unsigned need);
void pgr__mgr_cancel_poll(pgr_pool *p, struct pgr_conn *c);
/* Close c with a reason (enum pgr_close_reason); waits for its poll first if one is out. */
void pgr__mgr_close(pgr_pool *p, struct pgr_conn *c, int reason);
struct pgr_conn *pgr__mgr_free_slot(pgr_pool *p);
void pgr__mgr_start_connect(pgr_pool *p, struct pgr_conn *c);
/* Run sql on c (ping "", ROLLBACK, reset_sql); after: what to do when it ends. */
void pgr__mgr_start_exec(pgr_pool *p, struct pgr_conn *c, const char *sql, int64_t timeout_ms,
                         int after);
/* An idle socket was readable: read it and decide (close, ping, or back to the pool). */
void pgr__mgr_check(pgr_pool *p, struct pgr_conn *c);
void pgr__mgr_poll_done(pgr_pool *p, struct pgr_conn *c, int res);

#endif
