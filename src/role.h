/* SPDX-License-Identifier: PostgreSQL */
/*
 * Server roles: what a pool's conninfo asks for (target_session_attrs) and whether a connection's
 * server still has it. libpq checks the role once, at connect; a server can change it later (a
 * standby promoted, a primary turned read-only for a switchover). PostgreSQL 14+ reports
 * in_hot_standby and default_transaction_read_only to the client whenever they change, and
 * libpq keeps the latest values, so the check reads what libpq already has: no round trip.
 *
 * Read-only after create; pgr__role_ok reads only the connection its caller owns.
 */
#ifndef PGR_ROLE_H
#define PGR_ROLE_H

#include <stdbool.h>

#include "pool.h"

/* What target_session_attrs asks for; PGR__ROLE_ANY needs no check. */
enum pgr__role {
	PGR__ROLE_ANY = 0,    /* any, or absent */
	PGR__ROLE_READ_WRITE, /* read-write: not in recovery, and default_transaction_read_only off
	                       */
	PGR__ROLE_PRIMARY,    /* primary: not in recovery */
	PGR__ROLE_READ_ONLY,  /* read-only: in recovery, or default_transaction_read_only on */
	PGR__ROLE_STANDBY,    /* standby: in recovery */
	/* prefer-standby takes a primary when no standby answers, so any server is acceptable
	 * once connected: it is PGR__ROLE_ANY here. */
};

/* The role a pool's parsed conninfo asks for (config.c, once at create). */
enum pgr__role pgr__role_parse(const char *target_session_attrs);

/* Does pg's server still have the pool's role? True when the server does not report it. */
bool pgr__role_check(enum pgr__role want, PGconn *pg);

/*
 * Host lists, for every pool whose conninfo names several hosts. Connects start at the first
 * (past one that stalled lately: pgr__hosts_stalled), except in replica pools:
 *
 * Spreading connects over several replicas. libpq 15 has no load_balance_hosts: it tries the
 * hosts of a multi-host conninfo in order, so every connection of a read-only or standby pool
 * would land on the first standby. A pool whose target_session_attrs is read-only, standby or
 * prefer-standby and whose conninfo lists several hosts starts each connect at the next host
 * instead (round robin, the later ones following in order as fallbacks). Manager-only after
 * create.
 */
struct pgr__hosts;
/* At create, after the keyword arrays are built: 0, or -ENOMEM. */
int pgr__hosts_init(pgr_pool *p, const char *target_session_attrs);
void pgr__hosts_free(pgr_pool *p);
/* Around one PQconnectStartParams: point the host lists at the next rotation, then back. */
void pgr__hosts_rotate(pgr_pool *p);
void pgr__hosts_restore(pgr_pool *p);

/* Hosts in the list (1 without rotation). */
uint32_t pgr__hosts_count(const pgr_pool *p);
/* The next connect starts at host (a rebalance toward it). */
void pgr__hosts_aim(pgr_pool *p, uint32_t host);
/* The index of the host pg reached, 0 without rotation, UINT32_MAX when it cannot tell. */
uint32_t pgr__hosts_index(const pgr_pool *p, PGconn *pg);
/* Whether connects rotate over the hosts (a replica pool). */
bool pgr__hosts_rotating(const pgr_pool *p);
/*
 * A connect timed out on the host pg was trying (any multi-host pool). libpq moves to the next
 * host by itself only when one refuses or fails, never when one stalls: a blackholed server
 * would hold every connect for connect_timeout_ms and then fail it, however many hosts follow.
 * Marks the host in *tried (the hosts this connect has stalled on), keeps it from starting
 * connects for PGR__HOST_AVOID_MS, and returns the host to start again at (aimed), or
 * UINT32_MAX when every host has stalled this connect or pg's host is unknown.
 */
uint32_t pgr__hosts_stalled(pgr_pool *p, PGconn *pg, uint64_t *tried);
#define PGR__HOST_AVOID_MS 30000

/* The cheap form for the return path: one byte compare when the pool asks for no role. */
static inline bool pgr__role_ok(const pgr_pool *p, PGconn *pg)
{
	return likely(p->role == PGR__ROLE_ANY) || pgr__role_check((enum pgr__role)p->role, pg);
}

#endif
