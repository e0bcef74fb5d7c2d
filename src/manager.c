/* SPDX-License-Identifier: PostgreSQL */
/*
 * The manager of one pool. It owns every network step of a connection except the caller's own
 * queries: connect, ping, rollback, reset, liveness check and close; it keeps min_idle, opens
 * connections for waiters, retires connections past their lifetime or idle timeout, pings idle
 * ones in the background and reports leaks. It runs on its runtime (runtime.c): the pool's own
 * (one thread and ring per pool, the default) or one shared by many pools.
 *
 * Concurrency: callers hand slots to the manager through a lock-free stack (push by CAS, the
 * manager takes the whole stack with one exchange, so there is no ABA) and poke the runtime.
 * Everything below that is manager-only state, touched only inside the runtime's rounds.
 *
 * Tickless: each round returns the next time this pool has something due (pgr__mgr_round),
 * and the runtime sleeps until the earliest of its pools'. Network operations of one
 * connection (connect, exec, check, close) are in conn_io.c. user_data carries (generation,
 * pool index, slot, tag), never a pointer.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "manager.h"
#include "replica.h"

/* ---- requests from callers ---- */

/* Mark the pool for the runtime's next round and wake the runtime, once per round. */
void pgr__manager_wake(pgr_pool *p)
{
	if (!atomic_exchange_explicit(&p->mgr_poke, 1, memory_order_acq_rel) && p->rt)
		pgr__runtime_wake(p->rt);
}

void pgr__manager_push(pgr_pool *p, struct pgr_conn *c, enum pgr__req req, int reason)
{
	/* The state changes before the push gives the slot away: from here on the manager owns
	 * it, and a second release by the old holder is refused by its state. */
	pgr__conn_move(c, PGR__MANAGED);
	c->req = (uint8_t)req;
	if (req == PGR__REQ_FINISH)
		c->req_arg = (uint8_t)reason; /* the request whose statement is in flight */
	else
		c->close_reason = (uint8_t)reason;
	uint32_t head = atomic_load_explicit(&p->req_head, memory_order_relaxed);
	do {
		atomic_store_explicit(&c->req_next, head, memory_order_relaxed);
		/* release: the manager's acquire exchange sees the slot as its owner left it. */
	} while (!atomic_compare_exchange_weak_explicit(
	    &p->req_head, &head, c->id, memory_order_release, memory_order_relaxed));
	pgr__manager_wake(p);
}

static void take_requests(pgr_pool *p)
{
	uint32_t id = atomic_exchange_explicit(&p->req_head, PGR__NONE, memory_order_acquire);
	while (id != PGR__NONE) {
		struct pgr_conn *c = &p->conns[id];
		id = atomic_load_explicit(&c->req_next, memory_order_relaxed);
		switch (c->req) {
		case PGR__REQ_ROLLBACK:
			pgr__mgr_start_exec(p, c, "ROLLBACK", p->cfg.reset_timeout_ms,
			                    PGR__REQ_ROLLBACK);
			break;
		case PGR__REQ_RESET:
			pgr__mgr_start_exec(p, c, p->cfg.reset_sql, p->cfg.reset_timeout_ms,
			                    PGR__REQ_RESET);
			break;
		case PGR__REQ_PING:
			pgr__mgr_start_exec(p, c, "", p->cfg.ping_timeout_ms, PGR__REQ_PING);
			break;
		case PGR__REQ_CHECK:
			pgr__mgr_check(p, c);
			break;
		case PGR__REQ_HOLD:
			pgr__replica_hold(p, c);
			break;
		case PGR__REQ_FINISH:
			pgr__mgr_start_exec(p, c, NULL,
			                    c->req_arg == PGR__REQ_PING ? p->cfg.ping_timeout_ms
			                                                : p->cfg.reset_timeout_ms,
			                    c->req_arg);
			break;
		default:
			pgr__mgr_close(p, c, c->close_reason);
			break;
		}
	}
}

/* ---- completions ---- */

/* A CQE of one of this pool's connections (the runtime dispatches on the pool index). */
void pgr__mgr_cqe(pgr_pool *p, uint64_t ud, int res)
{
	unsigned t = ud & 0xff;
	uint32_t id = (uint32_t)(ud >> 8) & 0xffffff;
	uint16_t gen = (uint16_t)(ud >> 48);
	if (id >= p->cap)
		return;
	struct pgr_conn *c = &p->conns[id];
	c->inflight--;
	p->mgr_dirty = true;
	if (t != TAG_POLL || gen != (uint16_t)c->io_gen)
		return; /* link timeouts and cancels only balance inflight */
	c->armed = 0;
	pgr__mgr_poll_done(p, c, res);
}

/* ---- periodic work ---- */

static inline int64_t earliest(int64_t a, int64_t b)
{
	return a < b ? a : b;
}

struct leak_site {
	const char *file, *func;
	int line;
};

static void report_leak(pgr_pool *p, struct pgr_conn *c, int64_t held, struct leak_site site)
{
	const pgr_config *cfg = &p->cfg;
	atomic_fetch_add_explicit(&p->c_leaks, 1, memory_order_relaxed);
	if (!cfg->on_event)
		return;
	char msg[512];
	const char *file = site.file, *func = site.func;
	int line = site.line;
	snprintf(msg, sizeof(msg),
	         "connection %u held for %lld ms (leak_threshold_ms %lld), acquired at %s:%d (%s)",
	         c->id, (long long)held, (long long)cfg->leak_threshold_ms, file ? file : "?", line,
	         func ? func : "?");
	pgr_event ev = {.type = PGR_EV_LEAK_SUSPECTED,
	                .message = msg,
	                .conn_id = c->id,
	                .held_ms = held,
	                .file = file,
	                .line = line,
	                .func = func,
	                .pool = cfg->name};
	cfg->on_event(&ev, cfg->user_data);
}

/*
 * Retire, ping and report what is due now, and return when the next thing will be. For an idle
 * connection that is its own deadlines; for one a caller holds, the earliest moment its return
 * could make something due (its lifetime, now + idle_timeout, now + keepalive: a release does
 * not wake the manager) and its leak threshold.
 */
static int64_t maintain(pgr_pool *p, int64_t now)
{
	bool closing = atomic_load_explicit(&p->closing, memory_order_relaxed);
	uint32_t open = atomic_load_explicit(&p->nopen, memory_order_relaxed);
	const pgr_config *cfg = &p->cfg;
	uint64_t lim = pgr__limits(p);
	uint32_t min_idle = pgr__lim_min_idle(lim), total = pgr__lim_total(lim);
	int64_t due = INT64_MAX;
	bool idle_timeout = cfg->idle_timeout_ms > 0;
	for (uint32_t i = 0; i < p->cap; i++) {
		struct pgr_conn *c = &p->conns[i];
		unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
		if (st == PGR__IDLE) {
			int64_t idle_since =
			    atomic_load_explicit(&c->idle_since_ms, memory_order_relaxed);
			int64_t expire = atomic_load_explicit(&c->expire_ms, memory_order_relaxed);
			int64_t idle_due = idle_timeout && open > min_idle
			                       ? pgr__sat_add(idle_since, cfg->idle_timeout_ms)
			                       : INT64_MAX;
			int64_t last_ka =
			    idle_since > c->last_keepalive_ms ? idle_since : c->last_keepalive_ms;
			int64_t ka_due = cfg->keepalive_interval_ms > 0
			                     ? pgr__sat_add(last_ka, cfg->keepalive_interval_ms)
			                     : INT64_MAX;
			int reason = -1;
			bool ping = false;
			if (closing)
				reason = PGR_CLOSE_POOL_CLOSING;
			else if (open > total)
				reason = PGR_CLOSE_RESIZED; /* pgr_pool_resize lowered the limit */
			else if (now >= expire)
				reason = PGR_CLOSE_MAX_LIFETIME;
			else if (now >= idle_due)
				reason = PGR_CLOSE_IDLE_TIMEOUT;
			else if (now >= ka_due)
				ping = true;
			if (reason < 0 && !ping) {
				due = earliest(due, earliest(expire, earliest(idle_due, ka_due)));
				/* A caller may take it any moment: its leak report could be due
				 * a threshold from now. */
				if (cfg->leak_threshold_ms > 0)
					due = earliest(due,
					               pgr__sat_add(now, cfg->leak_threshold_ms));
				continue;
			}
			if (!pgr__claim_idle(p, c)) {
				/* A caller took it meanwhile: look again soon. */
				due = earliest(due, now + PGR__TICK_MS);
				continue;
			}
			pgr__conn_move(c, PGR__MANAGED);
			if (ping) {
				pgr__mgr_start_exec(p, c, "", cfg->ping_timeout_ms,
				                    AFTER_KEEPALIVE);
			} else {
				if (reason == PGR_CLOSE_IDLE_TIMEOUT || reason == PGR_CLOSE_RESIZED)
					open--;
				pgr__mgr_close(p, c, reason);
			}
			/*
			 * The action may already be over (a ping answered at once, a close with
			 * nothing in flight), and then no completion comes to make the pool dirty:
			 * look again in a moment, or this connection's next due time is lost.
			 */
			due = earliest(due, now + 1);
		} else if (st == PGR__IN_USE || st == PGR__GRANTED || st == PGR__LOOP) {
			/* Returned before it expires, it expires idle: be awake for that. */
			due = earliest(due,
			               atomic_load_explicit(&c->expire_ms, memory_order_relaxed));
			if (idle_timeout)
				due = earliest(due, pgr__sat_add(now, cfg->idle_timeout_ms));
			if (cfg->keepalive_interval_ms > 0)
				due = earliest(due, pgr__sat_add(now, cfg->keepalive_interval_ms));
			if (st != PGR__IN_USE || cfg->leak_threshold_ms <= 0)
				continue;
			/*
			 * This checkout's lease, time and site, read as a seqlock against the
			 * holder's checked_out: a checkout that began meanwhile changes the lease,
			 * and then nothing is reported this round (a report of the previous
			 * checkout's time under the new one's sequence would hide a real leak).
			 */
			uint32_t lease = atomic_load_explicit(&c->lease, memory_order_acquire);
			/* IN_USE after that lease: the checkout that took it has stored its time
			 * and site (it stores IN_USE last, with release). */
			if (atomic_load_explicit(&c->state, memory_order_acquire) != PGR__IN_USE) {
				due = earliest(due, now + PGR__TICK_MS);
				continue;
			}
			int64_t acquired =
			    atomic_load_explicit(&c->acquired_ms, memory_order_relaxed);
			struct leak_site site = {
			    atomic_load_explicit(&c->acq_file, memory_order_relaxed),
			    atomic_load_explicit(&c->acq_func, memory_order_relaxed),
			    atomic_load_explicit(&c->acq_line, memory_order_relaxed)};
			atomic_thread_fence(memory_order_acquire);
			if (atomic_load_explicit(&c->lease, memory_order_relaxed) != lease) {
				due = earliest(due, now + PGR__TICK_MS);
				continue;
			}
			/* + 1 so that 0 means "never reported". */
			uint64_t seq = (uint64_t)lease + 1;
			if (seq == c->leak_seq_reported) {
				/* Reported: the holder may return it and a new checkout leak it
				 * again, which no release wakes the manager for. */
				due = earliest(due, pgr__sat_add(now, cfg->leak_threshold_ms));
				continue;
			}
			int64_t held = now - acquired;
			if (held < cfg->leak_threshold_ms) {
				due = earliest(due, pgr__sat_add(acquired, cfg->leak_threshold_ms));
				continue;
			}
			c->leak_seq_reported = seq;
			report_leak(p, c, held, site);
			due = earliest(due, pgr__sat_add(now, cfg->leak_threshold_ms));
		}
	}
	return due;
}

/*
 * Open connections for waiters, for min_idle and for try_acquire callers, within limits.
 * Returns when to try again if a backoff holds back a connect that is wanted.
 */
static int64_t grow(pgr_pool *p, int64_t now)
{
	if (atomic_load_explicit(&p->closing, memory_order_relaxed))
		return INT64_MAX;
	/* While the server fails, probe with one connect at a time: no storm. */
	uint32_t limit = p->consecutive_failures ? 1 : p->cfg.max_connecting;
	uint64_t lim = pgr__limits(p);
	uint32_t min_idle = pgr__lim_min_idle(lim), max_size = pgr__lim_max_size(lim);
	uint32_t total = pgr__lim_total(lim);
	uint32_t idle = pgr__idle_count(p);
	if (idle < min_idle) {
		/*
		 * Connections the manager holds for a keepalive ping, a check or a rollback are on
		 * their way back to idle: counting them keeps min_idle from opening one connection
		 * too many (which idle_timeout then closes again) every time a ping is in flight.
		 */
		for (uint32_t i = 0; i < p->cap; i++)
			idle += atomic_load_explicit(&p->conns[i].state, memory_order_relaxed) ==
			        PGR__MANAGED;
	}
	for (;;) {
		uint32_t connecting = atomic_load_explicit(&p->nconnecting, memory_order_relaxed);
		uint32_t open = atomic_load_explicit(&p->nopen, memory_order_relaxed);
		uint32_t waiting = atomic_load_explicit(&p->nwaiters, memory_order_relaxed);
		bool for_waiters = waiting > connecting && open < total;
		bool for_min = idle + connecting < min_idle && open < max_size;
		bool for_try =
		    atomic_load_explicit(&p->demand, memory_order_relaxed) > 0 && open < max_size;
		if (!for_waiters && !for_min && !for_try)
			return INT64_MAX;
		if (connecting >= limit)
			return INT64_MAX; /* a connect's completion makes the pool dirty */
		if (now < p->next_connect_ms)
			return p->next_connect_ms;
		if (for_try && !for_waiters && !for_min)
			atomic_store_explicit(&p->demand, 0, memory_order_relaxed);
		struct pgr_conn *c = pgr__mgr_free_slot(p);
		if (!c)
			return INT64_MAX;
		pgr__mgr_start_connect(p, c);
		if (p->consecutive_failures)
			return INT64_MAX;
	}
}

/*
 * Everything the manager owns is closed. Slots that holders, waiters granted a connection or
 * pgr_loops own are theirs: the manager cannot close them, and waiting for them would make a
 * stop wait on an event loop that may never run again (destroy closes them at the end).
 */
static bool all_closed(pgr_pool *p)
{
	for (uint32_t i = 0; i < p->cap; i++) {
		struct pgr_conn *c = &p->conns[i];
		unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
		bool others = st == PGR__IN_USE || st == PGR__GRANTED || st == PGR__LOOP;
		if ((st != PGR__FREE && !others) || c->inflight)
			return false;
	}
	return true;
}

/* Stop: close everything the manager can reach; in-use connections stay with their holders. */
static void shutdown_all(pgr_pool *p)
{
	for (uint32_t i = 0; i < p->cap; i++) {
		struct pgr_conn *c = &p->conns[i];
		unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
		if (st == PGR__IDLE) {
			if (pgr__claim_idle(p, c))
				pgr__mgr_close(p, c, PGR_CLOSE_POOL_CLOSING);
		} else if (st == PGR__CONNECTING) {
			if (c->armed) {
				pgr__mgr_cancel_poll(p, c);
				atomic_fetch_sub_explicit(&p->nconnecting, 1, memory_order_relaxed);
				pgr__conn_move(c, PGR__CLOSING);
				c->close_reason = PGR_CLOSE_POOL_CLOSING;
			}
		} else if (st == PGR__MANAGED) {
			/*
			 * Only what the manager works on: an exec in flight, or a connection held
			 * back for lag (replica.c). A caller's push (a release, a pre-ping, a
			 * check) makes a slot MANAGED before take_requests has it: closed here, it
			 * would leave a request for a closed slot on the stack, which the next
			 * round's take_requests would carry out on a FREE slot. The caller's push
			 * poked the manager: that round takes it, and a round after closes it.
			 */
			if (c->op != PGR__OP_NONE || c->held_since_ms)
				pgr__mgr_close(p, c, PGR_CLOSE_POOL_CLOSING);
		}
	}
}

/*
 * This pool's part of a runtime round. Returns the next time it has something due (INT64_MAX:
 * nothing until a poke or a completion), or -1 once a stop has closed everything the manager
 * can reach (the runtime then detaches the pool).
 */
int64_t pgr__mgr_round(pgr_pool *p, int64_t now)
{
	bool poked = atomic_exchange_explicit(&p->mgr_poke, 0, memory_order_acq_rel);
	if (poked)
		take_requests(p);
	if (atomic_load_explicit(&p->mgr_stop, memory_order_acquire)) {
		shutdown_all(p);
		return all_closed(p) ? -1 : now + PGR__TICK_MS;
	}
	if (!poked && !p->mgr_dirty && now < p->next_due_ms)
		return p->next_due_ms;
	p->mgr_dirty = false;
	int64_t due = maintain(p, now);
	due = earliest(due, pgr__replica_round(p, now));
	due = earliest(due, grow(p, now));
	/*
	 * An operation this round started can end inside it, with no completion to come: a ping
	 * whose answer was already readable when it was sent, a connect refused at once (name
	 * resolution). maintain and grow counted that slot as busy, so their due times miss it:
	 * take another turn at once, or a keepalive or a retry would wait for an unrelated wake.
	 */
	if (p->mgr_dirty)
		due = now;
	p->next_due_ms = due;
	return due;
}

/* ---- the pool's side of the runtime ---- */

int pgr_pool_fd(pgr_pool *p)
{
	int rc = pgr__pool_usable(p);
	if (rc)
		return rc;
	if (!p->rt || p->rt->threaded)
		return -EINVAL;
	return p->rt->notify_fd;
}

int pgr_pool_run(pgr_pool *p)
{
	int rc = pgr__pool_usable(p);
	if (rc)
		return rc;
	if (!p->rt)
		return -ESHUTDOWN;
	if (p->rt->threaded)
		return -EINVAL;
	/* Drained: the runtime stays until the pool's memory goes, but the manager has stopped. */
	if (atomic_load_explicit(&p->mgr_detached, memory_order_acquire))
		return -ESHUTDOWN;
	return pgr_runtime_run(p->rt);
}

int pgr__manager_start(pgr_pool *p)
{
	p->rng = (uint64_t)pgr__mono_ns() ^ (uint64_t)(uintptr_t)p ^ 0x9e3779b97f4a7c15ull;
	pgr_runtime *rt = p->cfg.runtime;
	/*
	 * A runtime the parent of this forked process created: its ring's memory is shared with
	 * the parent's, and attaching would drive it (and its thread does not exist here).
	 */
	if (rt && pgr__forked(rt->fork_epoch))
		return -PGR_E_FORKED;
	if (!rt) {
		unsigned entries = 64;
		while (entries < 2 * p->cap + 16 && entries < 4096)
			entries <<= 1;
		int r = pgr__runtime_new(p->cfg.manager_thread, true, entries, &rt);
		if (r)
			return r;
	}
	p->clock = &rt->clock;
	int r = pgr__runtime_attach(rt, p);
	if (r) {
		if (!p->cfg.runtime)
			pgr__runtime_free(rt);
		p->clock = &p->own_clock;
		return r;
	}
	return 0;
}

/* External mode: the caller's thread (drain/destroy run there) turns the crank meanwhile. */
void pgr__manager_poke(pgr_pool *p)
{
	if (p->rt && !p->rt->threaded)
		pgr__runtime_round(p->rt, false);
}

/*
 * Close what the manager holds and detach the pool from its runtime. Bounded: every close
 * waits at most for its poll's cancel CQE; 5 s is far beyond that and keeps a wedged kernel
 * from hanging the caller.
 */
void pgr__manager_stop(pgr_pool *p)
{
	pgr_runtime *rt = p->rt;
	if (!rt)
		return;
	atomic_store_explicit(&p->mgr_stop, 1, memory_order_release);
	pgr__manager_wake(p);
	int64_t deadline = pgr__mono_ns() + 5 * PGR__NS_PER_S;
	while (!atomic_load_explicit(&p->mgr_detached, memory_order_acquire) &&
	       pgr__mono_ns() < deadline) {
		if (rt->threaded)
			usleep(200);
		else
			pgr__runtime_round(rt, false);
	}
	if (!atomic_load_explicit(&p->mgr_detached, memory_order_acquire))
		pgr__runtime_detach(rt, p); /* given up on: its slots are freed by destroy */
	                                    /*
	                                     * The runtime itself stays until the pool's memory goes (pgr__manager_release): callers of
	                                     * a drained pool still read its clock and may poke it, and neither may touch freed memory.
	                                     */
}

/* The pool's memory is about to go: let go of the runtime (freeing a private one). */
void pgr__manager_release(pgr_pool *p)
{
	pgr_runtime *rt = p->rt;
	if (!rt)
		return;
	p->rt = NULL;
	p->clock = &p->own_clock;
	atomic_fetch_sub_explicit(&rt->nattached, 1, memory_order_release);
	if (rt->owned)
		pgr__runtime_free(rt);
}

/* A forked child's copy: no thread to join, and the ring must not be driven (sys.h). */
void pgr__manager_forget(pgr_pool *p)
{
	pgr_runtime *rt = p->rt;
	p->rt = NULL;
	if (rt && rt->owned)
		pgr__runtime_free(rt);
}
