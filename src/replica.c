/* SPDX-License-Identifier: PostgreSQL */
/* Replication-lag bound and rebalancing over hosts (replica.h). Manager-only. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "manager.h"
#include "replica.h"
#include "role.h"

/*
 * One row: in recovery, WAL received, WAL replayed (bytes from 0/0; -1 when unknown, e.g. on a
 * primary or with no WAL receiver), and the replay timestamp's age (the fallback when there is
 * no receiver: a standby restoring from an archive).
 */
static const char lag_sql[] =
    "SELECT pg_is_in_recovery()::int, "
    "coalesce((pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::bigint, -1), "
    "coalesce((pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint, -1), "
    "coalesce((extract(epoch from now() - pg_last_xact_replay_timestamp()) * 1000)::bigint, -1)";

/* (time, receive position) samples kept per host; see record(). */
#define NSAMPLES 16

struct host {
	int64_t next_probe_ms;
	int64_t measured_ms; /* last measurement; 0 = never */
	int64_t lag_ms;      /* its estimate */
	int64_t lagging_since_ms;
	uint32_t nsamples;
	int64_t at_ms[NSAMPLES]; /* oldest first */
	int64_t recv[NSAMPLES];
	bool probing;
	/* The last statement's row, written by its result sink. */
	bool s_ok;
	int64_t s_recovery, s_recv, s_replay, s_ts_ms;
	/* Rebalancing: a connect aimed here landed elsewhere; leave the host until then. */
	int64_t down_until_ms, down_backoff_ms;
	uint32_t count; /* connections on it, counted by the round */
	/* A connection of this pool has landed here since the host last changed role: only such
	 * a host is worth moving connections to. A connect aimed at the primary of a
	 * prefer-standby pool (listed as its fallback) lands on a standby every time, and would
	 * otherwise close and reopen a connection every few intervals for as long as it runs. */
	bool served;
};

struct pgr__replica {
	uint32_t n;
	int64_t next_rebalance_ms;
	uint32_t rb_slot;   /* the connect a rebalance started, or PGR__NONE */
	uint32_t rb_target; /* the host it aims at */
	struct host h[];
};

static bool lag_on(const pgr_pool *p)
{
	return p->cfg.max_replica_lag_ms > 0;
}

static bool rebalance_on(const pgr_pool *p)
{
	return pgr__hosts_rotating(p) && p->cfg.rebalance_interval_ms > 0;
}

int pgr__replica_init(pgr_pool *p)
{
	p->replica = NULL;
	if (!lag_on(p) && !rebalance_on(p))
		return 0;
	uint32_t n = pgr__hosts_count(p);
	/* Hosts past 64 have no lag_mask bit: never measured, never held back (README). */
	if (n > 64)
		n = 64;
	struct pgr__replica *r = calloc(1, sizeof(*r) + n * sizeof(struct host));
	if (!r)
		return -ENOMEM;
	r->n = n;
	r->rb_slot = PGR__NONE;
	p->replica = r;
	return 0;
}

void pgr__replica_free(pgr_pool *p)
{
	free(p->replica);
	p->replica = NULL;
}

static struct host *host_of(pgr_pool *p, const struct pgr_conn *c)
{
	struct pgr__replica *r = p->replica;
	return r && c->host < r->n ? &r->h[c->host] : NULL;
}

static bool bit(const pgr_pool *p, uint32_t h)
{
	return h < 64 && (atomic_load_explicit(&p->lag_mask, memory_order_relaxed) >> h & 1);
}

/* Host h is due a measurement that found every connection of it checked out (probe_mask). */
static bool probe_wanted(const pgr_pool *p, uint32_t h)
{
	return h < 64 && (atomic_load_explicit(&p->probe_mask, memory_order_relaxed) >> h & 1);
}

static void set_probe_wanted(pgr_pool *p, uint32_t h, bool on)
{
	if (h >= 64)
		return;
	uint64_t m = 1ull << h;
	if (on)
		atomic_fetch_or_explicit(&p->probe_mask, m, memory_order_relaxed);
	else
		atomic_fetch_and_explicit(&p->probe_mask, ~m, memory_order_relaxed);
}

/* ---- rebalance outcome ---- */

static void aimed_connect_done(pgr_pool *p, struct pgr_conn *c, bool landed)
{
	struct pgr__replica *r = p->replica;
	if (!r || r->rb_slot != c->id)
		return;
	r->rb_slot = PGR__NONE;
	struct host *t = &r->h[r->rb_target];
	int64_t now = pgr__now_ms(p), iv = p->cfg.rebalance_interval_ms;
	if (landed) {
		/* Look again at once: a returning host takes one connection per step. */
		t->down_backoff_ms = 0;
		r->next_rebalance_ms = now;
		return;
	}
	t->down_backoff_ms = t->down_backoff_ms ? t->down_backoff_ms * 2 : iv;
	if (t->down_backoff_ms > 16 * iv)
		t->down_backoff_ms = 16 * iv;
	t->down_until_ms = pgr__sat_add(now, t->down_backoff_ms);
}

void pgr__replica_connect_failed(pgr_pool *p, struct pgr_conn *c)
{
	aimed_connect_done(p, c, false);
}

void pgr__replica_closed(pgr_pool *p, const struct pgr_conn *c, int reason)
{
	struct host *h = p->replica ? host_of(p, c) : NULL;
	/* Promoted, or turned read-only: no longer what this pool wants until a connect lands
	 * there again. */
	if (h && reason == PGR_CLOSE_ROLE_CHANGED)
		h->served = false;
}

/* ---- lag ---- */

static void start_probe(pgr_pool *p, struct pgr_conn *c, struct host *h)
{
	set_probe_wanted(p, c->host, false);
	h->probing = true;
	h->s_ok = false;
	pgr__mgr_start_exec(p, c, lag_sql, p->cfg.ping_timeout_ms, AFTER_LAG);
}

bool pgr__replica_connected(pgr_pool *p, struct pgr_conn *c)
{
	uint32_t idx = pgr__hosts_index(p, c->pg);
	c->host = (uint8_t)(idx < 255 ? idx : 255);
	c->held_since_ms = 0;
	struct pgr__replica *r = p->replica;
	if (!r)
		return false;
	aimed_connect_done(p, c, r->rb_slot == c->id && c->host == r->rb_target);
	struct host *h = host_of(p, c);
	if (h)
		h->served = true;
	if (!lag_on(p) || !h || h->probing)
		return false;
	/* A host nobody measured lately (new, or all its connections closed for lag) could hand
	 * out stale reads before the next round: measure it through this connection first. */
	int64_t now = pgr__now_ms(p);
	if (h->measured_ms && now - h->measured_ms <= p->cfg.replica_lag_interval_ms)
		return false;
	start_probe(p, c, h);
	return true;
}

void pgr__replica_sample(struct pgr_conn *c, const PGresult *r)
{
	struct host *h = host_of(c->pool, c);
	if (!h || PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1 || PQnfields(r) != 4)
		return;
	h->s_recovery = atoll(PQgetvalue(r, 0, 0));
	h->s_recv = atoll(PQgetvalue(r, 0, 1));
	h->s_replay = atoll(PQgetvalue(r, 0, 2));
	h->s_ts_ms = atoll(PQgetvalue(r, 0, 3));
	h->s_ok = true;
}

/*
 * The lag estimate from one row. Each measurement records when the standby had received how
 * much; the lag is the age of the oldest record whose WAL is still not replayed (0 when none
 * is). When the samples are full the second oldest goes, never the oldest: the estimate stays
 * a lower bound however long the standby lags.
 */
static int64_t estimate(struct host *h, int64_t now)
{
	if (!h->s_recovery) {
		h->nsamples = 0;
		return 0; /* a primary (prefer-standby fallback, or promoted) */
	}
	if (h->s_recv < 0 || h->s_replay < 0) /* no WAL receiver: the timestamp is all there is */
		return h->s_ts_ms > 0 ? h->s_ts_ms : 0;
	uint32_t k = 0;
	while (k < h->nsamples && h->recv[k] <= h->s_replay)
		k++;
	memmove(h->at_ms, h->at_ms + k, (h->nsamples - k) * sizeof(int64_t));
	memmove(h->recv, h->recv + k, (h->nsamples - k) * sizeof(int64_t));
	h->nsamples -= k;
	if (h->s_recv > h->s_replay) {
		if (h->nsamples == NSAMPLES) {
			memmove(h->at_ms + 1, h->at_ms + 2, (NSAMPLES - 2) * sizeof(int64_t));
			memmove(h->recv + 1, h->recv + 2, (NSAMPLES - 2) * sizeof(int64_t));
			h->nsamples--;
		}
		h->at_ms[h->nsamples] = now;
		h->recv[h->nsamples] = h->s_recv;
		h->nsamples++;
	}
	return h->nsamples ? now - h->at_ms[0] : 0;
}

static void set_bit(pgr_pool *p, uint32_t h, bool on)
{
	if (h >= 64)
		return;
	uint64_t m = 1ull << h;
	/* Manager-only writer; a checkout that reads the old value hands out one more
	 * connection, or holds back one more, for the moment the store takes to be seen. */
	if (on)
		atomic_fetch_or_explicit(&p->lag_mask, m, memory_order_relaxed);
	else
		atomic_fetch_and_explicit(&p->lag_mask, ~m, memory_order_relaxed);
}

static void publish(pgr_pool *p, struct pgr_conn *c)
{
	c->op = PGR__OP_NONE;
	c->held_since_ms = 0;
	if (atomic_load_explicit(&p->closing, memory_order_relaxed))
		pgr__mgr_close(p, c, PGR_CLOSE_POOL_CLOSING);
	else
		pgr__publish(p, c);
}

void pgr__replica_hold(pgr_pool *p, struct pgr_conn *c)
{
	c->op = PGR__OP_NONE;
	if (!c->held_since_ms)
		c->held_since_ms = pgr__now_ms(p);
	p->mgr_dirty = true; /* its grace period is due some time: recompute */
	/* Checked out while its host was due a measurement that found no idle connection (a busy
	 * pool): measure through this one, which pgr__replica_measured then publishes or holds. */
	struct host *h = host_of(p, c);
	if (h && !h->probing && probe_wanted(p, c->host))
		start_probe(p, c, h);
}

void pgr__replica_measured(pgr_pool *p, struct pgr_conn *c, bool ok)
{
	struct host *h = host_of(p, c);
	if (!h) {
		if (ok)
			publish(p, c);
		else
			pgr__mgr_close(p, c, PGR_CLOSE_PING_FAILED);
		return;
	}
	h->probing = false;
	if (!ok) {
		pgr__mgr_close(p, c, PGR_CLOSE_PING_FAILED);
		return;
	}
	if (!pgr__role_ok(p, c->pg)) {
		pgr__mgr_close(p, c, PGR_CLOSE_ROLE_CHANGED);
		return;
	}
	int64_t now = pgr__now_ms(p);
	if (h->s_ok) {
		h->s_ok = false;
		h->measured_ms = now;
		h->lag_ms = estimate(h, now);
		bool lagging = h->lag_ms > p->cfg.max_replica_lag_ms;
		if (lagging && !bit(p, c->host))
			h->lagging_since_ms = now;
		set_bit(p, c->host, lagging);
	}
	if (bit(p, c->host))
		pgr__replica_hold(p, c);
	else
		publish(p, c);
}

/* ---- the round ---- */

static inline int64_t earliest(int64_t a, int64_t b)
{
	return a < b ? a : b;
}

static bool open_state(unsigned st)
{
	return st == PGR__IDLE || st == PGR__IN_USE || st == PGR__GRANTED || st == PGR__LOOP ||
	       st == PGR__MANAGED;
}

/* A held connection: hand it out again, close it, or say when to look again. */
static int64_t held(pgr_pool *p, struct pgr_conn *c, int64_t now, bool others_fit)
{
	struct host *h = host_of(p, c);
	int64_t expire = atomic_load_explicit(&c->expire_ms, memory_order_relaxed);
	uint64_t lim = pgr__limits(p);
	if (atomic_load_explicit(&p->closing, memory_order_relaxed)) {
		pgr__mgr_close(p, c, PGR_CLOSE_POOL_CLOSING);
	} else if (atomic_load_explicit(&p->nopen, memory_order_relaxed) > pgr__lim_total(lim)) {
		pgr__mgr_close(p, c, PGR_CLOSE_RESIZED);
	} else if (now >= expire) {
		pgr__mgr_close(p, c, PGR_CLOSE_MAX_LIFETIME);
	} else if (!h || !bit(p, c->host)) {
		/* Its host's measurement runs (on another connection): hand it out only once that
		 * answered; the answer makes the pool dirty. */
		if (h && h->probing)
			return expire;
		publish(p, c);
	} else {
		/*
		 * Each connection gets the whole grace from when it was held, not only from when
		 * the host began to lag: one that reconnected to the lagging host (every other host
		 * down) is kept a grace period before it goes again, so there is no connect storm.
		 */
		int64_t from =
		    h->lagging_since_ms > c->held_since_ms ? h->lagging_since_ms : c->held_since_ms;
		int64_t due = pgr__sat_add(from, p->cfg.replica_lag_grace_ms);
		/* With no other host fit to take its place a close would only reconnect here. */
		if (!others_fit)
			return expire;
		if (now < due)
			return earliest(due, expire);
		pgr__mgr_close(p, c, PGR_CLOSE_REPLICA_LAG);
	}
	return now + 1; /* closed or published: counts changed */
}

static int64_t rebalance(pgr_pool *p, int64_t now)
{
	struct pgr__replica *r = p->replica;
	int64_t iv = p->cfg.rebalance_interval_ms;
	if (!rebalance_on(p) || atomic_load_explicit(&p->closing, memory_order_relaxed))
		return INT64_MAX;
	if (r->rb_slot != PGR__NONE) {
		/* Its connect still runs; a slot closed under it (a drain) ends the wait. */
		if (atomic_load_explicit(&p->conns[r->rb_slot].state, memory_order_relaxed) ==
		    PGR__CONNECTING)
			return INT64_MAX; /* its completion makes the pool dirty */
		r->rb_slot = PGR__NONE;
	}
	if (now < r->next_rebalance_ms)
		return r->next_rebalance_ms;
	/* Only a steady pool: no connect in flight, no backoff after failures. */
	if (atomic_load_explicit(&p->nconnecting, memory_order_relaxed) > 0)
		return INT64_MAX;
	if (now < p->next_connect_ms)
		return p->next_connect_ms;
	r->next_rebalance_ms = pgr__sat_add(now, iv);
	uint32_t lo = PGR__NONE, hi = PGR__NONE;
	for (uint32_t i = 0; i < r->n; i++) {
		struct host *h = &r->h[i];
		if (bit(p, i) || now < h->down_until_ms)
			continue;
		if (h->served && (lo == PGR__NONE || h->count < r->h[lo].count))
			lo = i;
		if (hi == PGR__NONE || h->count > r->h[hi].count)
			hi = i;
	}
	if (lo == PGR__NONE || r->h[hi].count < r->h[lo].count + 2)
		return r->next_rebalance_ms;
	/* An idle connection of the busiest host: never one a caller holds. */
	for (uint32_t i = 0; i < p->cap; i++) {
		struct pgr_conn *c = &p->conns[i];
		if (c->host != hi ||
		    atomic_load_explicit(&c->state, memory_order_relaxed) != PGR__IDLE ||
		    !pgr__claim_idle(p, c))
			continue;
		pgr__conn_move(c, PGR__MANAGED);
		pgr__mgr_close(p, c, PGR_CLOSE_REBALANCE);
		struct pgr_conn *n = pgr__mgr_free_slot(p);
		if (n) {
			r->rb_slot = n->id;
			r->rb_target = lo;
			pgr__hosts_aim(p, lo);
			pgr__mgr_start_connect(p, n);
		}
		return now + 1;
	}
	return r->next_rebalance_ms;
}

int64_t pgr__replica_round(pgr_pool *p, int64_t now)
{
	struct pgr__replica *r = p->replica;
	if (!r)
		return INT64_MAX;
	int64_t due = INT64_MAX;
	bool lag = lag_on(p);
	for (uint32_t i = 0; i < r->n; i++)
		r->h[i].count = 0;
	uint64_t mask = atomic_load_explicit(&p->lag_mask, memory_order_relaxed);
	/* Some host is measured and fit: closing a lagging host's connection moves it there. */
	uint64_t all = r->n >= 64 ? ~0ull : (1ull << r->n) - 1;
	bool others_fit = r->n > 1 && (mask & all) != all;
	for (uint32_t i = 0; i < p->cap; i++) {
		struct pgr_conn *c = &p->conns[i];
		unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
		if (!open_state(st))
			continue;
		struct host *h = host_of(p, c);
		if (h)
			h->count++;
		if (!lag || !h)
			continue;
		if (st == PGR__IDLE && bit(p, c->host)) {
			/* Idle on a lagging host: take it out before a checkout must skip it. */
			if (pgr__claim_idle(p, c)) {
				pgr__conn_move(c, PGR__MANAGED);
				pgr__replica_hold(p, c);
				st = PGR__MANAGED;
			}
		}
		if (st == PGR__MANAGED && c->held_since_ms && c->op == PGR__OP_NONE)
			due = earliest(due, held(p, c, now, others_fit));
	}
	if (lag) {
		int64_t iv = p->cfg.replica_lag_interval_ms;
		for (uint32_t k = 0; k < r->n; k++) {
			struct host *h = &r->h[k];
			/*
			 * A lagging host whose connections are all gone (closed after their grace)
			 * cannot be measured: after a grace period its mark is dropped, so that a
			 * connect may go there again, and is measured before it is handed out.
			 */
			if (bit(p, k) && !h->count && !h->probing &&
			    now - h->measured_ms >= p->cfg.replica_lag_grace_ms) {
				set_bit(p, k, false);
				h->measured_ms = 0;
			}
			if (h->probing)
				continue;
			if (now < h->next_probe_ms) {
				due = earliest(due, h->next_probe_ms);
				continue;
			}
			h->next_probe_ms = pgr__sat_add(now, iv);
			due = earliest(due, h->next_probe_ms);
			/* A held connection first (it serves nobody), else an idle one. */
			struct pgr_conn *pick = NULL;
			for (uint32_t i = 0; i < p->cap && !pick; i++) {
				struct pgr_conn *c = &p->conns[i];
				if (c->host == k && c->held_since_ms && c->op == PGR__OP_NONE &&
				    atomic_load_explicit(&c->state, memory_order_relaxed) ==
				        PGR__MANAGED)
					pick = c;
			}
			for (uint32_t i = 0; i < p->cap && !pick; i++) {
				struct pgr_conn *c = &p->conns[i];
				if (c->host == k &&
				    atomic_load_explicit(&c->state, memory_order_relaxed) ==
				        PGR__IDLE &&
				    pgr__claim_idle(p, c)) {
					pgr__conn_move(c, PGR__MANAGED);
					pick = c;
				}
			}
			if (pick)
				start_probe(p, pick, h);
			else if (h->count)
				/* Every connection of it is checked out, and in a busy pool each
				 * one comes back only to be taken again at once: the next checkout
				 * of one hands it here to be measured first (pgr__replica_hold). */
				set_probe_wanted(p, k, true);
		}
	}
	return earliest(due, rebalance(p, now));
}
