/* SPDX-License-Identifier: PostgreSQL */
/*
 * Replica health: the replication-lag bound (max_replica_lag_ms) and rebalancing over the hosts
 * of a multi-host conninfo (rebalance_interval_ms).
 *
 * Lag. Every replica_lag_interval_ms the manager runs one statement on an idle connection of
 * each host (a connection it holds back for lag if there is one) and reads the standby's WAL
 * receive and replay positions. It keeps a few (time, receive position) samples per host, on its
 * own monotonic clock: the lag is the time since the standby had received WAL that it has still
 * not replayed. That is a lower bound of the true lag (the WAL was committed before it was
 * received) that needs no clock shared with the primary and does not grow while the primary
 * writes nothing, unlike now() - pg_last_xact_replay_timestamp(). A host past the bound gets its
 * bit in pgr_pool.lag_mask: checkout hands its connections to the manager instead of to the
 * caller (no round trip, one load), the manager holds them, closes them after
 * replica_lag_grace_ms when another host can take their place, and hands them out again once a
 * measurement finds the host within the bound.
 *
 * Rebalance. A pool that rotates its connects over hosts (role.h) counts its connections per
 * host every rebalance_interval_ms; when the busiest host has two more than the least busy one
 * (one that is not lagging and not known to be down), it closes one idle connection of the
 * busiest and connects again starting at the least busy. A connect that lands elsewhere means
 * that host is still down: it is left alone for a while, doubling up to 16 intervals.
 *
 * Manager-only, apart from lag_mask (written by the manager, read relaxed at checkout) and
 * pgr__replica_lagging.
 */
#ifndef PGR_REPLICA_H
#define PGR_REPLICA_H

#include <stdbool.h>

#include "pool.h"

/* op_after of a lag measurement (the other values are enum pgr__req and AFTER_KEEPALIVE). */
enum {
	AFTER_LAG = 101
};

/* At create, after the conninfo is parsed: 0, or -ENOMEM. */
int pgr__replica_init(pgr_pool *p);
void pgr__replica_free(pgr_pool *p);

/*
 * Checkout: is c's standby held back for lag, or due a measurement that found all its
 * connections checked out? Two relaxed loads of one line while nothing lags.
 */
static inline bool pgr__replica_lagging(pgr_pool *p, const struct pgr_conn *c)
{
	uint64_t m = atomic_load_explicit(&p->lag_mask, memory_order_relaxed) |
	             atomic_load_explicit(&p->probe_mask, memory_order_relaxed);
	return unlikely(m != 0) && c->host < 64 && (m >> c->host & 1);
}

/* A connect finished (c is open, not published yet). True when the manager measures its
 * standby's lag first (c is then busy and published later); false: publish it. */
bool pgr__replica_connected(pgr_pool *p, struct pgr_conn *c);
/* A connect failed. */
void pgr__replica_connect_failed(pgr_pool *p, struct pgr_conn *c);
/* c is closing for reason: a role change makes its host no rebalancing target. */
void pgr__replica_closed(pgr_pool *p, const struct pgr_conn *c, int reason);
/* The result of a lag statement (the exec's result sink). */
void pgr__replica_sample(struct pgr_conn *c, const PGresult *r);
/* A lag statement ended (ok: it ran): decide c's fate (publish, hold, close). */
void pgr__replica_measured(pgr_pool *p, struct pgr_conn *c, bool ok);
/* Keep a manager-owned connection out of use while its standby lags; or, when its host is due
 * a measurement that found no idle connection (probe_mask), measure its standby through it. */
void pgr__replica_hold(pgr_pool *p, struct pgr_conn *c);
/* This round's lag measurements, held connections and rebalancing; returns when next due. */
int64_t pgr__replica_round(pgr_pool *p, int64_t now);

#endif
