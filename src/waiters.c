/* SPDX-License-Identifier: PostgreSQL */
/*
 * The waiter FIFO and the waiting policy: callers that found no idle connection.
 *
 * A caller that finds no idle connection (checkout.c) parks in a FIFO of pool-owned waiter
 * slots, each with its own futex word; a returning connection is granted to the oldest waiter
 * directly or, under the waiting policy below, left for whoever runs first while the oldest
 * waiter is nudged to compete. The FIFO is guarded by a mutex: only callers about to sleep, and
 * releasers that grant a connection or find the oldest waiter awake, ever take it; a release
 * that only nudges a sleeping head does it lock-free (pgr__release_to_waiters). Blocking
 * callers and pgr_loop waiters share the FIFO, so one release serves both in arrival order.
 *
 * No lost wake-up: a waiter closes the per-CPU caches' gate (percpu.h), increments nwaiters and
 * then re-scans the shards; a releaser sets its bit and then reads nwaiters. All four accesses
 * are seq_cst, so at least one side sees the other (Dekker), and a releaser that sees a waiter
 * after publishing runs pgr__pump.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "pool.h"

/* ---- waiter FIFO (under wq_lock) ---- */

/*
 * seq_cst: a release that served the queue without wq_lock put its connection in a shard and
 * then read this hint (pgr__release_to_waiters). Whoever changes the head stores the hint and
 * then looks at the shards (pass_turn_locked): one of the two sees the other, so a new head is
 * never left asleep beside a connection put there for the old one.
 */
static void set_head(pgr_pool *p, uint32_t i)
{
	p->wq_head = i;
	atomic_store_explicit(&p->wq_head_hint, i, memory_order_seq_cst);
}

static void wq_unlink(pgr_pool *p, uint32_t i)
{
	struct pgr__waiter *w = &p->waiters[i];
	if (w->prev != PGR__NONE)
		p->waiters[w->prev].next = w->next;
	else
		set_head(p, w->next);
	if (w->next != PGR__NONE)
		p->waiters[w->next].prev = w->prev;
	else
		p->wq_tail = w->prev;
	w->next = w->prev = PGR__NONE;
}

static void wq_free_slot(pgr_pool *p, uint32_t i)
{
	struct pgr__waiter *w = &p->waiters[i];
	atomic_store_explicit(&w->state, PGR__W_FREE, memory_order_relaxed);
	w->next = p->wq_free;
	p->wq_free = i;
}

/*
 * Grant c to the oldest waiter; returns its index or NONE. Caller holds wq_lock. *wake says
 * whether the waiter may be asleep: a waiter still spinning sees GRANTED by itself, which saves
 * the releaser a FUTEX_WAKE (a system call, ~1 us).
 */
static uint32_t wq_grant_locked(pgr_pool *p, struct pgr_conn *c, bool *wake)
{
	uint32_t i = p->wq_head;
	if (i == PGR__NONE)
		return PGR__NONE;
	struct pgr__waiter *w = &p->waiters[i];
	wq_unlink(p, i);
	atomic_fetch_sub_explicit(&p->nwaiters, 1, memory_order_relaxed);
	w->conn = c->id;
	pgr__conn_move(c, PGR__GRANTED);
	/*
	 * release: the waiter's acquire load of GRANTED sees the connection's every field. The
	 * exchange pairs with the waiter's CAS WAITING -> SLEEPING: exactly one of them sees the
	 * other, so a waiter that goes to sleep is always woken.
	 */
	*wake = atomic_exchange_explicit(&w->state, PGR__W_GRANTED, memory_order_acq_rel) ==
	        PGR__W_SLEEPING;
	return i;
}

/*
 * The waiting policy, when a connection comes back and callers wait.
 *
 * A strict FIFO hand-off wakes a parked thread for every release, and the connection sits
 * unused for the wake-up (~10 us to run on a busy 2-CPU machine) while the releasing thread,
 * still running, finds nothing and parks in its turn: with more threads than connections that
 * halves throughput. So, as the Linux kernel's mutex does: a returned connection goes to the
 * oldest waiter directly only when that costs no wake-up (the waiter is spinning) or when that
 * waiter has starved; otherwise it goes to a shard, where whoever runs first may take it, and
 * the oldest waiter is nudged awake to compete for it. The queue keeps its order (only the head
 * is ever nudged or granted), and once the head has starved it is served next.
 *
 * When the head has starved: it has waited PGR__STARVE_NS (1 ms), or PGR__STARVE_PER_WAITER_NS
 * (200 us) for each caller waiting when it queued (itself included), whichever is longer. Each
 * starvation hand-off to a sleeping
 * waiter costs a context switch, and the connection stays unused until that waiter gets a CPU,
 * while the thread that would have taken it parks. With a fixed threshold, W waiters each
 * served once per threshold make W such hand-offs per threshold: 48 waiters (64 threads on 16
 * connections) at 1 ms was 48,000 a second, 0.2 context switches per checkout, and took
 * throughput to 0.7x a barging mutex pool's on 2 CPUs. Scaled with the queue, starvation
 * hand-offs stay under about 5,000 a second however long the queue grows, and a caller's wait
 * stays bounded by the queue's length when it came times 200 us (at least 1 ms), plus the
 * time the callers ahead of it take to be served and the scheduler to give it a CPU.
 */
static int64_t starve_ns(const struct pgr__waiter *w)
{
	/* Its place when it queued, not the queue now: callers that came later do not push the
	 * bound of one that came earlier. */
	int64_t scaled = (int64_t)atomic_load_explicit(&w->pos, memory_order_relaxed) *
	                 PGR__STARVE_PER_WAITER_NS;
	return scaled > PGR__STARVE_NS ? scaled : PGR__STARVE_NS;
}

/*
 * The policy: whether the head w, in state s, is handed a returned connection rather than left
 * to compete for it. An awake head (spinning, or scanning the shards) costs no wake-up. A precise
 * clock here: only returns that find callers waiting get this far.
 */
static bool head_due(const struct pgr__waiter *w, uint32_t s)
{
	return s == PGR__W_WAITING ||
	       pgr__mono_ns() - atomic_load_explicit(&w->since_ns, memory_order_relaxed) >=
	           starve_ns(w);
}

static bool grant_due(pgr_pool *p)
{
	uint32_t i = p->wq_head;
	if (i == PGR__NONE)
		return false;
	struct pgr__waiter *w = &p->waiters[i];
	/*
	 * seq_cst: after a connection went to a shard (pump_locked), this load and the waiter's
	 * NUDGED -> WAITING (pgr__waiter_resume) followed by its shard scan are a Dekker pair:
	 * either the waiter finds the connection or this sees it awake and grants.
	 */
	return head_due(w, atomic_load_explicit(&w->state, memory_order_seq_cst));
}

/*
 * Whether any shard holds an idle connection. seq_cst: the other half of the pair set_head
 * describes (a release puts, then reads the head; a head change stores, then reads the shards).
 */
static bool shards_hold_idle(pgr_pool *p)
{
	for (uint32_t sh = 0; sh < p->nshards; sh++)
		for (uint32_t i = 0; i < p->nwords; i++)
			if (atomic_load_explicit(&pgr__shard_words(p, sh)[i], memory_order_seq_cst))
				return true;
	return false;
}

/* Wake the oldest waiter to look again. Caller holds wq_lock; returns the slot to wake. */
static uint32_t nudge_locked(pgr_pool *p)
{
	uint32_t i = p->wq_head;
	if (i == PGR__NONE)
		return PGR__NONE;
	/* A plain look first: the head is often nudged already, and a failed CAS would still take
	 * its line from the CPU that reads it next. */
	if (atomic_load_explicit(&p->waiters[i].state, memory_order_relaxed) != PGR__W_SLEEPING)
		return PGR__NONE;
	uint32_t expect = PGR__W_SLEEPING;
	/* Pairs with the waiter's park CAS: a waiter that went to sleep is woken exactly once. */
	if (atomic_compare_exchange_strong_explicit(&p->waiters[i].state, &expect, PGR__W_NUDGED,
	                                            memory_order_acq_rel, memory_order_relaxed))
		return i;
	return PGR__NONE;
}

/*
 * Serve the queue from idle shards; caller holds wq_lock. Heads due a grant get one (woken
 * here if asleep); a sleeping head that is not due is nudged if a shard holds a connection for
 * it to take: its slot is returned, to wake once the lock is dropped.
 */
static uint32_t pump_locked(pgr_pool *p)
{
	while (p->wq_head != PGR__NONE) {
		if (!grant_due(p))
			return shards_hold_idle(p) ? nudge_locked(p) : PGR__NONE;
		bool stolen, wake = false;
		struct pgr_conn *c = pgr__take_any(p, &stolen);
		if (!c)
			break;
		/* Counted while it is still ours: once granted, the waiter may return it. */
		pgr__inc(&c->n_handoffs);
		uint32_t i = wq_grant_locked(p, c, &wake);
		if (wake)
			pgr__futex_wake1(&p->waiters[i].state);
	}
	return PGR__NONE;
}

/*
 * The head changed (caller holds wq_lock): a release may have put a connection in a shard for
 * the old head without the lock, after it last looked at the hint. Serve the new head.
 */
static uint32_t pass_turn_locked(pgr_pool *p)
{
	if (p->wq_head != PGR__NONE && shards_hold_idle(p))
		return pump_locked(p);
	return PGR__NONE;
}

/*
 * A connection went to a shard while callers wait, without wq_lock: make sure the head takes
 * its chance. A head already nudged needs nothing: it scans the shards after NUDGED -> WAITING,
 * which comes after this look (seq_cst on both sides), so it finds the connection. A sleeping
 * one is nudged. An awake head may have scanned before the put and be about to park, and a
 * head on its way out leaves the next one to serve: both go through wq_lock (pgr__pump).
 *
 * The hint may be stale, or its slot reused: whoever changed the head stored the hint and then
 * looked at the shards (pass_turn_locked), so the new head is served either way, and a nudge
 * that lands on a reused slot is a spurious wake-up, which waiters tolerate. seen: the head the
 * return judged not due; a different one is judged again (it may have starved).
 */
static void serve_head(pgr_pool *p, uint32_t seen)
{
	for (;;) {
		uint32_t h = atomic_load_explicit(&p->wq_head_hint, memory_order_seq_cst);
		if (h == PGR__NONE)
			return; /* a caller that queues from now on scans after counting itself */
		struct pgr__waiter *w = &p->waiters[h];
		uint32_t s = atomic_load_explicit(&w->state, memory_order_seq_cst);
		if (h != seen && head_due(w, s))
			break;
		if (s == PGR__W_NUDGED)
			return;
		if (s != PGR__W_SLEEPING)
			break;
		uint32_t expect = PGR__W_SLEEPING;
		if (atomic_compare_exchange_strong_explicit(&w->state, &expect, PGR__W_NUDGED,
		                                            memory_order_seq_cst,
		                                            memory_order_seq_cst)) {
			pgr__futex_wake1(&w->state);
			return;
		}
	}
	pgr__pump(p);
}

/*
 * A connection comes back while callers wait: c (owned by the caller) goes to the oldest
 * waiter if the policy says so; otherwise to a shard, and the oldest waiter is nudged to
 * compete for it. Returns false, having done nothing, only when the queue turned out empty:
 * the caller returns c as if nobody waited.
 *
 * With more threads than connections nearly every return finds callers waiting, so the common
 * case, a head asleep or already nudged and not due a grant, takes no lock: every return taking
 * wq_lock moved its cache line between CPUs on each return, ~300 ns (measured on 2 vCPUs),
 * more than the rest of a return and an acquire together. Only a grant, an awake head and a
 * changing head take the lock.
 *
 * No lost wake-up under the lock: c reaches the shard under wq_lock, so a caller that queues
 * later (under the lock) finds it in its re-scan. The head is looked at again after the put
 * (pump_locked), not only before: a head nudged earlier may have woken meanwhile, scanned the
 * shards before c was there and be about to park again, which no nudge would undo; seen awake
 * (WAITING) after the put, it is granted. Without the lock: serve_head.
 */
bool pgr__release_to_waiters(pgr_pool *p, struct pgr_conn *c)
{
	uint32_t h = atomic_load_explicit(&p->wq_head_hint, memory_order_seq_cst);
	if (h == PGR__NONE)
		return false;
	/* A stale hint only sends this return down the locked path, or past it: both are safe
	 * (serve_head). */
	struct pgr__waiter *hw = &p->waiters[h];
	/* acquire: a SLEEPING or NUDGED read here comes from the waiter's park (a release), so
	 * the since_ns and pos read next are the ones it stored when it queued. */
	uint32_t hs = atomic_load_explicit(&hw->state, memory_order_acquire);
	if ((hs == PGR__W_SLEEPING || hs == PGR__W_NUDGED) && !head_due(hw, hs)) {
		pgr__shard_put(p, c);
		serve_head(p, h);
		return true;
	}

	bool wake = false;
	uint32_t i = PGR__NONE, nudged = PGR__NONE;
	pthread_mutex_lock(&p->wq_lock);
	if (p->wq_head == PGR__NONE) {
		pthread_mutex_unlock(&p->wq_lock);
		return false;
	}
	if (grant_due(p)) {
		pgr__inc(&c->n_handoffs);
		i = wq_grant_locked(p, c, &wake);
		nudged = pass_turn_locked(p);
	} else {
		pgr__shard_put(p, c);
		nudged = pump_locked(p);
	}
	pthread_mutex_unlock(&p->wq_lock);
	/* A late wake of a slot already reused is a spurious wake-up: waiters re-check state. */
	if (wake)
		pgr__futex_wake1(&p->waiters[i].state);
	if (nudged != PGR__NONE)
		pgr__futex_wake1(&p->waiters[nudged].state);
	return true;
}

/*
 * Serve waiters from idle shards: after a connection went to a shard with callers waiting
 * (it raced with a waiter's arrival, or a cache flush moved it there). Heads that are due a
 * grant get one; a sleeping head is nudged to take its chance.
 */
void pgr__pump(pgr_pool *p)
{
	pthread_mutex_lock(&p->wq_lock);
	uint32_t nudged = pump_locked(p);
	pthread_mutex_unlock(&p->wq_lock);
	if (nudged != PGR__NONE)
		pgr__futex_wake1(&p->waiters[nudged].state);
}

void pgr__waiters_shutdown(pgr_pool *p)
{
	pthread_mutex_lock(&p->wq_lock);
	while (p->wq_head != PGR__NONE) {
		uint32_t i = p->wq_head;
		wq_unlink(p, i);
		atomic_fetch_sub_explicit(&p->nwaiters, 1, memory_order_relaxed);
		atomic_store_explicit(&p->waiters[i].state, PGR__W_SHUTDOWN, memory_order_release);
		pgr__futex_wake1(&p->waiters[i].state);
	}
	pthread_mutex_unlock(&p->wq_lock);
}

/*
 * A waiter that is about to park announces it: WAITING -> SLEEPING. Fails (returns false) when
 * the state moved on (granted, shut down): then it must not sleep.
 */
bool pgr__waiter_park(struct pgr__waiter *w)
{
	uint32_t expect = PGR__W_WAITING;
	return atomic_compare_exchange_strong_explicit(&w->state, &expect, PGR__W_SLEEPING,
	                                               memory_order_acq_rel,
	                                               memory_order_acquire) ||
	       expect == PGR__W_SLEEPING;
}

static inline bool still_queued(uint32_t s)
{
	return s == PGR__W_WAITING || s == PGR__W_SLEEPING || s == PGR__W_NUDGED;
}

bool pgr__waiter_resume(struct pgr__waiter *w)
{
	uint32_t expect = PGR__W_NUDGED;
	/* seq_cst: the waiter's half of the Dekker pair with grant_due (the scan follows). */
	return atomic_compare_exchange_strong_explicit(&w->state, &expect, PGR__W_WAITING,
	                                               memory_order_seq_cst, memory_order_seq_cst);
}

/*
 * Spin briefly before parking: a connection returned within a few microseconds is then taken
 * without a futex sleep and wake (~10 us each way, measured on 2 vCPUs). Only the first waiters
 * spin (half the CPUs, at least one), so on an oversubscribed machine spinners do not starve the
 * holders they wait for: with 8 threads on 4 connections and 2 CPUs this took throughput from
 * 0.15x to 0.4x of a barging mutex pool, and from 0.46x to 1.1x with 2 threads on 1.
 *
 * And only while every holder and waiter can be on a CPU at once (connections open plus
 * callers waiting at most the CPUs), as the kernel's mutex spins only while the owner runs: past
 * that, some holder is likely preempted, and a spinner burns the CPU it needs to finish and
 * return the connection. On 2 CPUs (pgr_core_bench, 1 us holds) this took 4 threads on 2
 * connections from 0.66-0.70x the mutex pool's throughput to 1.04-1.16x, and 8 on 4 from
 * 0.86-0.88x to 0.94-0.95x; 2 threads on 1 connection still spin.
 */
static bool spin_for_grant(pgr_pool *p, struct pgr__waiter *w)
{
	/* Only waiters near the head can expect a grant soon; the rest park at once. */
	if (p->spin_iters == 0 ||
	    atomic_load_explicit(&w->pos, memory_order_relaxed) > p->spin_positions)
		return false;
	if (atomic_load_explicit(&p->nopen, memory_order_relaxed) +
	        atomic_load_explicit(&p->nwaiters, memory_order_relaxed) >
	    p->spin_busy_max)
		return false;
	for (uint32_t i = 0; i < p->spin_iters; i++) {
		if (atomic_load_explicit(&w->state, memory_order_acquire) != PGR__W_WAITING)
			return true;
		__builtin_ia32_pause();
	}
	return false;
}

int pgr__timeout_error(pgr_pool *p, int64_t waited_ms)
{
	atomic_fetch_add_explicit(&p->c_timeouts, 1, memory_order_relaxed);
	pgr_stats st;
	pgr_pool_stats(p, &st);
	bool failing = atomic_load_explicit(&p->connect_failing, memory_order_relaxed);
	char msg[768], last[512] = "";
	if (failing)
		pgr_pool_last_error(p, last, sizeof(last));
	snprintf(msg, sizeof(msg),
	         "acquire timed out after %lld ms: size=%u/%u in_use=%u idle=%u waiting=%u "
	         "connecting=%u%s%s",
	         (long long)waited_ms, st.size, st.max_size + st.max_overflow, st.in_use, st.idle,
	         st.waiting, st.connecting, failing ? "; last connect error: " : "",
	         failing ? last : "");
	pgr__emit(p, PGR_EV_ACQUIRE_TIMEOUT, msg, NULL, NULL, PGR__NONE);
	if (!failing)
		pgr__set_last_error(p, msg);
	return failing ? -PGR_E_CONNECT_FAILED : -ETIMEDOUT;
}

/*
 * Queue a waiter at the tail of the FIFO. Returns its slot in *wi, or -ESHUTDOWN, or
 * -PGR_E_TOO_MANY_WAITERS. Shared by blocking and io_uring waiters, so one release serves both
 * in arrival order.
 */
int pgr__wq_enqueue(pgr_pool *p, uint32_t *wi_out, bool gate)
{
	/* Before counting itself in nwaiters (percpu.h): the caches are empty while it sleeps,
	 * and every release reads nwaiters. Held until pgr__wq_free. A blocking caller closes
	 * it later, only if it is about to sleep (pgr__slow_acquire). */
	if (gate)
		pgr__gate_close(p);
	pthread_mutex_lock(&p->wq_lock);
	if (atomic_load_explicit(&p->closing, memory_order_relaxed)) {
		pthread_mutex_unlock(&p->wq_lock);
		if (gate)
			pgr__gate_open(p);
		return -ESHUTDOWN;
	}
	uint32_t wi = p->wq_free;
	if (wi != PGR__NONE)
		p->wq_free = p->waiters[wi].next;
	else if (p->wq_fresh < p->nwaiter_slots)
		wi = p->wq_fresh++; /* first use: may fault its page in, once, here off the fast
		                       path */
	if (wi == PGR__NONE) {
		pthread_mutex_unlock(&p->wq_lock);
		if (gate)
			pgr__gate_open(p);
		atomic_fetch_add_explicit(&p->c_rejected, 1, memory_order_relaxed);
		pgr__emitf(p, PGR_EV_WAITER_REJECTED, PGR__NONE,
		           "acquire rejected: %u callers already waiting (max_waiters)",
		           p->nwaiter_slots);
		return -PGR_E_TOO_MANY_WAITERS;
	}
	struct pgr__waiter *w = &p->waiters[wi];
	w->gen++;
	w->conn = PGR__NONE;
	w->gated = gate;
	atomic_store_explicit(&w->since_ns, pgr__mono_ns(), memory_order_relaxed);
	w->next = PGR__NONE;
	w->prev = p->wq_tail;
	if (p->wq_tail != PGR__NONE)
		p->waiters[p->wq_tail].next = wi;
	else
		set_head(p, wi);
	p->wq_tail = wi;
	atomic_store_explicit(&w->state, PGR__W_WAITING, memory_order_relaxed);
	/* seq_cst: the waiter's half of the Dekker pair with pgr__publish. */
	uint32_t nw = atomic_fetch_add_explicit(&p->nwaiters, 1, memory_order_seq_cst) + 1;
	atomic_store_explicit(&w->pos, nw, memory_order_relaxed);
	pthread_mutex_unlock(&p->wq_lock);

	uint32_t total = pgr__lim_total(pgr__limits(p));
	if (nw == 1 && atomic_load_explicit(&p->nopen, memory_order_relaxed) >= total)
		pgr__emitf(p, PGR_EV_POOL_EXHAUSTED, PGR__NONE,
		           "pool exhausted: all %u connections in use, a caller waits", total);
	/* The manager opens connections for waiters that in-flight connects do not cover. */
	if (atomic_load_explicit(&p->nopen, memory_order_relaxed) < total)
		pgr__manager_wake(p);
	*wi_out = wi;
	return 0;
}

/*
 * Settle a waiter that stops waiting (it found a connection itself, its deadline passed, or its
 * state changed). Returns the state it ended in: WAITING (it was still queued and is now
 * cancelled), GRANTED (*granted set), or SHUTDOWN. The slot is not freed: an io_uring waiter
 * may still have a futex wait on it in flight (pgr__wq_free).
 */
unsigned pgr__wq_settle(pgr_pool *p, uint32_t wi, struct pgr_conn **granted)
{
	struct pgr__waiter *w = &p->waiters[wi];
	uint32_t nudged = PGR__NONE;
	pthread_mutex_lock(&p->wq_lock);
	unsigned s = atomic_load_explicit(&w->state, memory_order_acquire);
	if (still_queued(s)) {
		wq_unlink(p, wi);
		atomic_fetch_sub_explicit(&p->nwaiters, 1, memory_order_relaxed);
		atomic_store_explicit(&w->state, PGR__W_CANCELLED, memory_order_relaxed);
		/*
		 * Pass the turn on. Only the head is nudged, and a head already nudged takes no
		 * second nudge, so two returns before it runs leave one connection idle with the
		 * next waiter asleep; and a nudged head that times out leaves its connection too.
		 * Whoever leaves the queue without a grant serves the next head if a shard holds
		 * a connection.
		 */
		nudged = pass_turn_locked(p);
	}
	pthread_mutex_unlock(&p->wq_lock);
	if (nudged != PGR__NONE)
		pgr__futex_wake1(&p->waiters[nudged].state);
	*granted = s == PGR__W_GRANTED ? &p->conns[w->conn] : NULL;
	return s;
}

void pgr__wq_free(pgr_pool *p, uint32_t wi)
{
	pthread_mutex_lock(&p->wq_lock);
	bool gated = p->waiters[wi].gated;
	wq_free_slot(p, wi);
	pthread_mutex_unlock(&p->wq_lock);
	if (gated)
		pgr__gate_open(p);
}

/*
 * What a settled waiter does with its outcome. mine: what it took itself; granted: what a
 * release handed it. Returns the connection to hand out (validated), or NULL with *rc set:
 * -EAGAIN means "queue again" (a grant failed validation), others are final.
 */
struct pgr_conn *pgr__wq_outcome(pgr_pool *p, unsigned s, struct pgr_conn *mine,
                                 struct pgr_conn *granted, int *rc)
{
	*rc = 0;
	if (s == PGR__W_SHUTDOWN) {
		if (mine)
			pgr__publish(p, mine);
		*rc = -ESHUTDOWN;
		return NULL;
	}
	if (granted) {
		if (mine) {
			/* Took one itself and was granted another: the spare goes back. */
			pgr__publish(p, granted);
			return mine;
		}
		if (pgr__validate(p, granted))
			return granted;
		*rc = -EAGAIN;
		return NULL;
	}
	if (!mine)
		*rc = -ETIMEDOUT;
	return mine;
}

int pgr__slow_acquire(pgr_pool *p, int64_t timeout_ms, struct pgr_conn **out)
{
	int64_t t0 = pgr__mono_ns();
	int64_t deadline = pgr__sat_add(t0, pgr__ms_to_ns(timeout_ms));
	for (;;) {
		uint32_t wi;
		int rc = pgr__wq_enqueue(p, &wi, false);
		if (rc)
			return rc;
		struct pgr__waiter *w = &p->waiters[wi];
		struct pgr_conn *mine = pgr__fast_take(p);
		bool timed_out = false;
		while (!mine && !timed_out) {
			/* Spinning or parking ends when the state leaves WAITING: granted, shut
			 * down, or (parked) nudged to look again. */
			if (spin_for_grant(p, w))
				break;
			if (!w->gated) {
				/*
				 * About to sleep: close the caches' gate (percpu.h), so that from
				 * here on every release goes where a sleeper is served. A spinning
				 * waiter needs no gate: a release that missed it and went to a
				 * cache is found here, by the gate's flush, before it sleeps.
				 */
				pgr__gate_close(p);
				w->gated = true;
				if (atomic_load_explicit(&w->state, memory_order_acquire) !=
				    PGR__W_WAITING)
					break;
				if ((mine = pgr__fast_take(p)) != NULL)
					break;
			}
			if (!pgr__waiter_park(w))
				break;
			while (atomic_load_explicit(&w->state, memory_order_acquire) ==
			       PGR__W_SLEEPING) {
				if (pgr__futex_wait_abs(&w->state, PGR__W_SLEEPING, deadline) ==
				    -ETIMEDOUT) {
					timed_out = true;
					break;
				}
			}
			if (atomic_load_explicit(&w->state, memory_order_acquire) !=
			        PGR__W_NUDGED ||
			    !pgr__waiter_resume(w))
				break;
			mine = pgr__fast_take(p);
			timed_out = !mine && pgr__mono_ns() >= deadline;
		}
		struct pgr_conn *granted;
		unsigned s = pgr__wq_settle(p, wi, &granted);
		pgr__wq_free(p, wi);
		struct pgr_conn *c = pgr__wq_outcome(p, s, mine, granted, &rc);
		if (c) {
			pgr__inc(&c->n_waits);
			if (p->cfg.metrics)
				pgr__hist_add(&c->hist[PGR_HIST_ACQUIRE_WAIT],
				              (uint64_t)(pgr__mono_ns() - t0));
			*out = c;
			return 0;
		}
		int64_t now = pgr__mono_ns();
		if (rc == -ETIMEDOUT || (rc == -EAGAIN && now >= deadline))
			return pgr__timeout_error(p, (now - t0) / PGR__NS_PER_MS);
		if (rc != -EAGAIN)
			return rc;
		/* The grant was stale and went to the manager: queue again, same deadline. */
	}
}
