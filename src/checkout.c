/* SPDX-License-Identifier: PostgreSQL */
/*
 * The checkout path: per-CPU caches, idle shards, work stealing, validation, release.
 *
 * The connection last returned on a CPU waits in that CPU's cache (percpu.h), taken and
 * refilled with a restartable sequence and no locked instruction. The others are bits. Each
 * shard owns a bitmap with one bit per connection slot; a set bit means "this slot is idle and
 * parked in this shard". Taking one is a CAS that clears a bit; returning one is a fetch_or
 * that sets it. Why bitmaps and not ck_ring: ck_ring's mpmc enqueue makes every producer wait
 * until earlier producers commit, so a producer preempted between reserve and commit stalls all
 * others (measured: 41 us per op with 8 threads on 2 cores). A bitmap CAS never waits for
 * another thread: a failed CAS means someone else made progress. Bits are taken lowest-first,
 * so load concentrates on the low slots and surplus connections stay idle long enough to be
 * retired by idle_timeout (the effect LIFO reuse gives pgbouncer).
 *
 * A caller that finds nothing idle waits in the FIFO of waiters.c, which also holds the waiting
 * policy and the no-lost-wake-up argument.
 */
#include <errno.h>
#include <stdarg.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "pool.h"
#include "replica.h"
#include "role.h"

/* ---- CPU and futex ---- */

/* rseq's cpu_id costs ~0.5 ns against ~2.5 ns for sched_getcpu; it is only a hint. */
static inline unsigned cur_shard(pgr_pool *p)
{
	int c;
	if (__rseq_size > 0) {
		struct rseq *rs =
		    (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
		c = (int)__atomic_load_n(&rs->cpu_id, __ATOMIC_RELAXED);
		if (c < 0)
			c = sched_getcpu();
	} else {
		c = sched_getcpu();
	}
	if (likely((unsigned)c < PGR__MAX_CPUS))
		return p->cpu_shard[c];
	return (unsigned)(c < 0 ? 0 : c) % p->nshards;
}

/* ---- shards ---- */

static int shard_take_mt(pgr_pool *p, unsigned s)
{
	_Atomic uint64_t *w = pgr__shard_words(p, s);
	for (uint32_t i = 0; i < p->nwords; i++) {
		/* seq_cst: this load is the waiter's half of the Dekker pair (waiters.c, file
		 * comment). */
		uint64_t v = atomic_load_explicit(&w[i], memory_order_seq_cst);
		while (v) {
			uint64_t bit = v & (~v + 1);
			/*
			 * Acquires the slot from the fetch_or that published it; seq_cst (free on
			 * x86, where a locked cmpxchg is a full barrier) keeps a failed CAS's
			 * reload in the Dekker order too.
			 */
			if (atomic_compare_exchange_weak_explicit(
			        &w[i], &v, v & ~bit, memory_order_seq_cst, memory_order_seq_cst))
				return (int)(i * 64 + (uint32_t)__builtin_ctzll(bit));
		}
	}
	return -1;
}

/* ---- per-CPU caches (percpu.h) ---- */

/* A sequence interrupted this many times in a row gives way to the shards. */
#define PCPU_TRIES 4

static inline struct pgr_conn *pcpu_take(pgr_pool *p)
{
	for (int i = 0; i < PCPU_TRIES; i++) {
		uint32_t id = pgr__pcpu_pop(p->pcpu, p->npcpu, &p->pcpu_gate);
		if (likely(id < p->cap))
			return &p->conns[id];
		if (id != PGR__PCPU_ABORT)
			break;
	}
	return NULL;
}

/* c's owner parks it in the calling CPU's cache; false: it goes the atomic way. */
static inline bool pcpu_put(pgr_pool *p, struct pgr_conn *c)
{
	atomic_store_explicit(&c->home_shard, PGR__HOME_PCPU, memory_order_relaxed);
	pgr__conn_move(c, PGR__IDLE);
	for (int i = 0; i < PCPU_TRIES; i++) {
		uint32_t r = pgr__pcpu_push(p->pcpu, p->npcpu, &p->pcpu_gate, c->id);
		if (likely(r == 0))
			return true;
		if (r != PGR__PCPU_ABORT)
			break;
	}
	return false;
}

/*
 * Move every cached connection into the shards. Only a thread that closed the gate calls this,
 * after the fence: no sequence can commit meanwhile, and every commit before it is visible.
 * Like a release, it reads nwaiters after publishing (the Dekker pair, waiters.c): a
 * waiter that counted itself in before these connections reached the shards is served.
 */
static void pcpu_flush(pgr_pool *p)
{
	bool moved = false;
	for (uint32_t cpu = 0; cpu < p->npcpu_alloc; cpu++) {
		if (atomic_load_explicit(&p->pcpu[cpu].id, memory_order_relaxed) == PGR__PCPU_EMPTY)
			continue;
		/* acquire: the owner's writes to the connection before its commit (see pcpu_push;
		 * the fence made them visible). */
		uint32_t id = atomic_exchange_explicit(&p->pcpu[cpu].id, PGR__PCPU_EMPTY,
		                                       memory_order_acquire);
		if (id < p->cap) {
			pgr__shard_put(p, &p->conns[id]);
			moved = true;
		}
	}
	if (moved && atomic_load_explicit(&p->nwaiters, memory_order_seq_cst) > 0)
		pgr__pump(p);
}

/*
 * Close the gate (percpu.h): from here until gate_open, no sequence commits and the caches are
 * empty. The first closer since the gate was open pays the fence and the flush; it marks the
 * gate fenced only after both, so a later closer that sees the mark knows the caches are empty.
 */
void pgr__gate_close(pgr_pool *p)
{
	if (p->npcpu_alloc == 0)
		return;
	uint64_t v = atomic_fetch_add_explicit(&p->pcpu_gate, PGR__GATE_ONE, memory_order_seq_cst);
	if ((v + PGR__GATE_ONE) & PGR__GATE_FENCED)
		return;
	pgr__percpu_fence();
	pcpu_flush(p);
	atomic_fetch_or_explicit(&p->pcpu_gate, PGR__GATE_FENCED, memory_order_seq_cst);
}

/* The last one out clears the fenced mark with the count, in one step. */
void pgr__gate_open(pgr_pool *p)
{
	if (p->npcpu_alloc == 0)
		return;
	uint64_t v = atomic_load_explicit(&p->pcpu_gate, memory_order_relaxed);
	for (;;) {
		if (v < PGR__GATE_ONE)
			return; /* never closed: nothing to open (not reached by balanced use) */
		uint64_t n = v / PGR__GATE_ONE == 1 ? 0 : v - PGR__GATE_ONE;
		if (atomic_compare_exchange_weak_explicit(
		        &p->pcpu_gate, &v, n, memory_order_seq_cst, memory_order_relaxed))
			return;
	}
}

void pgr__pool_set_percpu(pgr_pool *p, bool on)
{
	if (!on && p->npcpu) {
		/* A gate closed for good: what is cached goes to the shards, and a sequence that
		 * still reads the old npcpu finds the gate closed. */
		pgr__gate_close(p);
		p->npcpu = 0;
	} else if (on && !p->npcpu && p->npcpu_alloc) {
		p->npcpu = p->npcpu_alloc;
		pgr__gate_open(p);
	}
}

bool pgr__pool_percpu(const pgr_pool *p)
{
	return p->npcpu != 0;
}

/* The calling CPU's cache, then its own shard, then the others in a fixed rotation from the
 * next one. */
static struct pgr_conn *take_any(pgr_pool *p, bool *stolen)
{
	if (p->npcpu) {
		struct pgr_conn *c = pcpu_take(p);
		if (c) {
			*stolen = false;
			return c;
		}
	}
	unsigned home = cur_shard(p);
	int id = shard_take_mt(p, home);
	if (likely(id >= 0)) {
		*stolen = false;
		return &p->conns[id];
	}
	for (unsigned k = 1; k < p->nshards; k++) {
		unsigned s = home + k;
		if (s >= p->nshards)
			s -= p->nshards;
		id = shard_take_mt(p, s);
		if (id >= 0) {
			*stolen = true;
			return &p->conns[id];
		}
	}
	return NULL;
}

void pgr__shard_put(pgr_pool *p, struct pgr_conn *c)
{
	unsigned s = cur_shard(p);
	atomic_store_explicit(&c->home_shard, s, memory_order_relaxed);
	pgr__conn_move(c, PGR__IDLE);
	/* seq_cst: release for the next owner's acquire CAS, and the releaser's half of Dekker. */
	atomic_fetch_or_explicit(&pgr__shard_words(p, s)[c->id / 64], 1ull << (c->id % 64),
	                         memory_order_seq_cst);
}

static int claim_in_shard(pgr_pool *p, struct pgr_conn *c)
{
	unsigned s = atomic_load_explicit(&c->home_shard, memory_order_relaxed);
	if (s >= p->nshards)
		return 0; /* in a cache, or on its way to one: not claimable now */
	_Atomic uint64_t *w = &pgr__shard_words(p, s)[c->id / 64];
	uint64_t bit = 1ull << (c->id % 64);
	uint64_t v = atomic_load_explicit(w, memory_order_relaxed);
	while (v & bit) {
		if (atomic_compare_exchange_weak_explicit(w, &v, v & ~bit, memory_order_acquire,
		                                          memory_order_relaxed))
			return 1;
	}
	return 0;
}

int pgr__claim_idle(pgr_pool *p, struct pgr_conn *c)
{
	if (atomic_load_explicit(&c->home_shard, memory_order_relaxed) != PGR__HOME_PCPU)
		return claim_in_shard(p, c);
	/* In a CPU's cache (as far as a relaxed read can tell): closing the gate moves it to a
	 * shard, unless a caller took it meanwhile. */
	pgr__gate_close(p);
	int rc = claim_in_shard(p, c);
	pgr__gate_open(p);
	return rc;
}

uint32_t pgr__idle_count(pgr_pool *p)
{
	uint32_t n = 0;
	for (uint32_t cpu = 0; cpu < p->npcpu_alloc; cpu++)
		n +=
		    atomic_load_explicit(&p->pcpu[cpu].id, memory_order_relaxed) != PGR__PCPU_EMPTY;
	for (uint32_t s = 0; s < p->nshards; s++)
		for (uint32_t i = 0; i < p->nwords; i++)
			n += (uint32_t)__builtin_popcountll(
			    atomic_load_explicit(&pgr__shard_words(p, s)[i], memory_order_relaxed));
	return n;
}

/* ---- publish ---- */

static inline __attribute__((always_inline)) void publish(pgr_pool *p, struct pgr_conn *c,
                                                          bool cache)
{
	if (atomic_load_explicit(&p->nwaiters, memory_order_relaxed) > 0 &&
	    pgr__release_to_waiters(p, c))
		return;
	/* A commit to the cache means the gate was open, so no caller was asleep (a waiter closes
	 * the gate before it parks, and its flush finds this connection): nothing to pump. */
	if (cache && p->npcpu &&
	    pgr__now_ms(p) >= atomic_load_explicit(&p->pcpu_calm_ms, memory_order_relaxed) &&
	    pcpu_put(p, c))
		return;
	pgr__shard_put(p, c);
	if (unlikely(atomic_load_explicit(&p->nwaiters, memory_order_seq_cst) > 0))
		pgr__pump(p);
}

/* The manager's and the loops' own returns (a connect, a ping, a rollback): to a shard, where
 * any CPU takes it without a fence; the CPU the manager ran on says nothing of who wants it. */
void pgr__publish(pgr_pool *p, struct pgr_conn *c)
{
	publish(p, c, false);
}

/* A holder's return: the CPU that used it is the likeliest to want it next. */
void pgr__publish_cached(pgr_pool *p, struct pgr_conn *c)
{
	publish(p, c, true);
}

struct pgr_conn *pgr__take_any(pgr_pool *p, bool *stolen)
{
	return take_any(p, stolen);
}

/* ---- acquire ---- */

/* Zero-round-trip liveness check: a killed backend leaves FATAL + EOF on an idle socket. */
static int socket_event(struct pgr_conn *c)
{
	struct pollfd pfd = {.fd = PQsocket(c->pg), .events = POLLIN | POLLRDHUP};
	if (pfd.fd < 0)
		return POLLHUP;
	if (poll(&pfd, 1, 0) <= 0)
		return 0;
	return pfd.revents ? pfd.revents : 0;
}

/*
 * Decide whether an idle connection just taken may go to the caller. Returns true to hand it
 * out; otherwise the connection has been passed to the manager (retire, ping or check) and the
 * caller keeps looking. No I/O here beyond one zero-timeout poll on long-idle sockets.
 *
 * ping_here: the caller (an io_uring loop) pings on its own ring, so a connection that needs a
 * pre-ping is handed back with *ping_here set instead of going to the manager.
 */
static bool validate_ex(pgr_pool *p, struct pgr_conn *c, bool *ping_here)
{
	int64_t now = pgr__now_ms(p);
	if (unlikely(now >= atomic_load_explicit(&c->expire_ms, memory_order_relaxed))) {
		pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_MAX_LIFETIME);
		return false;
	}
	/* Its standby lags past max_replica_lag_ms: the manager keeps it until it catches up. */
	if (pgr__replica_lagging(p, c)) {
		pgr__manager_push(p, c, PGR__REQ_HOLD, 0);
		return false;
	}
	int64_t idle = now - atomic_load_explicit(&c->idle_since_ms, memory_order_relaxed);
	/*
	 * The hot path's clock lags the coarse clock by up to a tick while the runtime ticks it,
	 * and a return stamped from the coarse clock (the ticking had stopped) can look up to a
	 * tick in the future to a checkout that reads the ticked value: 0 idle, not less, or a
	 * ping_after_idle_ms of 0 would skip its ping.
	 */
	if (idle < 0)
		idle = 0;
	/*
	 * Just connected or pinged for a waiting caller: skip the ping, never the zero-cost socket
	 * check (the coarse clock can make an older connection look 0 ms idle).
	 */
	bool fresh = atomic_load_explicit(&c->fresh, memory_order_relaxed);
	if (unlikely(fresh))
		atomic_store_explicit(&c->fresh, 0, memory_order_relaxed);
	bool recent = fresh && idle <= 2 * PGR__TICK_MS;
	int64_t ping_after = p->cfg.ping_after_idle_ms;
	if (!recent && ping_after >= 0 && idle >= ping_after) {
		if (ping_here) {
			*ping_here = true;
			return true;
		}
		pgr__manager_push(p, c, PGR__REQ_PING, 0);
		return false;
	}
	if (unlikely(fresh) || idle >= p->cfg.check_after_idle_ms) {
		int ev = socket_event(c);
		if (unlikely(ev)) {
			if (ev & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) {
				atomic_fetch_add_explicit(&p->c_checks_failed, 1,
				                          memory_order_relaxed);
				pgr__manager_push(p, c, PGR__REQ_RETIRE, PGR_CLOSE_BROKEN);
			} else {
				/* Readable but open: a NOTIFY or a FATAL still in flight. Let the
				 * manager read it. */
				pgr__manager_push(p, c, PGR__REQ_CHECK, 0);
			}
			return false;
		}
	}
	return true;
}

bool pgr__validate(pgr_pool *p, struct pgr_conn *c)
{
	return validate_ex(p, c, NULL);
}

static inline pgr_conn *checked_out(struct pgr_conn *c, const char *file, int line,
                                    const char *func)
{
	uint32_t lease = atomic_load_explicit(&c->lease, memory_order_relaxed) + 1;
	/* release: a leak scan that reads this lease (acquire) then sees the slot no longer in
	 * the previous holder's IN_USE. The lease first, then the checkout's time and site: the
	 * scan reads them between two reads of the lease and drops what changed meanwhile (a
	 * seqlock; on x86 neither the store nor the fence costs an instruction). */
	atomic_store_explicit(&c->lease, lease, memory_order_release);
	atomic_thread_fence(memory_order_release);
	atomic_store_explicit(&c->acquired_ms, pgr__now_ms(c->pool), memory_order_relaxed);
	/* Where it was acquired matters only to leak reports. */
	if (c->pool->cfg.leak_threshold_ms) {
		atomic_store_explicit(&c->acq_file, file, memory_order_relaxed);
		atomic_store_explicit(&c->acq_func, func, memory_order_relaxed);
		atomic_store_explicit(&c->acq_line, line, memory_order_relaxed);
	}
	/* All of it before IN_USE, with release: a misuse check that sees IN_USE (acquire) sees
	 * this lease too, so an old holder's handle can never pass for the new one's. */
	pgr__conn_move_rel(c, PGR__IN_USE);
	return pgr__handle(c, lease);
}

/*
 * Nothing in this CPU's cache or in any shard, but another CPU's cache may hold one: close and
 * reopen the gate, which moves every cached connection to a shard (one membarrier: the price of
 * a steal from a cache, paid only when the shards are empty). Returns whether it found any.
 */
static __attribute__((noinline)) bool pcpu_steal(pgr_pool *p)
{
	bool any = false;
	for (uint32_t cpu = 0; cpu < p->npcpu && !any; cpu++)
		any =
		    atomic_load_explicit(&p->pcpu[cpu].id, memory_order_relaxed) != PGR__PCPU_EMPTY;
	if (!any)
		return false;
	pgr__gate_close(p);
	pgr__gate_open(p);
	/* Connections that change CPUs at this rate are better left in the shards for a while:
	 * two threads on two CPUs passing one connection back and forth would otherwise pay a
	 * fence for every pass. */
	atomic_store_explicit(&p->pcpu_calm_ms, pgr__now_ms(p) + PGR__PCPU_CALM_MS,
	                      memory_order_relaxed);
	return true;
}

/*
 * The lock-free part: the caches and the idle shards. ping: NULL, or (an io_uring loop, which
 * pings on its own ring) where to say that the connection needs a pre-ping (validate_ex).
 */
static inline __attribute__((always_inline)) struct pgr_conn *fast_take_ex(pgr_pool *p, bool *ping)
{
	bool stolen;
	struct pgr_conn *c;
	bool flushed = false;
	for (;;) {
		while ((c = take_any(p, &stolen)) != NULL) {
			if (likely(validate_ex(p, c, ping))) {
				if (stolen || flushed)
					pgr__inc(&c->n_steals);
				return c;
			}
		}
		if (flushed || !p->npcpu || !pcpu_steal(p))
			return NULL;
		flushed = true;
	}
}

static struct pgr_conn *fast_take(pgr_pool *p)
{
	return fast_take_ex(p, NULL);
}

struct pgr_conn *pgr__fast_take(pgr_pool *p)
{
	return fast_take(p);
}

struct pgr_conn *pgr__fast_take_ping(pgr_pool *p, bool *ping)
{
	*ping = false;
	return fast_take_ex(p, ping);
}

pgr_conn *pgr__checked_out(struct pgr_conn *c, int64_t waited_ns, const char *file, int line,
                           const char *func)
{
	if (waited_ns < 0) {
		pgr__inc(&c->n_immediate);
	} else {
		pgr__inc(&c->n_waits);
		if (c->pool->cfg.metrics)
			pgr__hist_add(&c->hist[PGR_HIST_ACQUIRE_WAIT], (uint64_t)waited_ns);
	}
	return checked_out(c, file, line, func);
}

static int acquire_wait(pgr_pool *p, int64_t timeout_ms, pgr_conn **out, const char *file, int line,
                        const char *func);

int pgr_acquire_at(pgr_pool *p, int64_t timeout_ms, pgr_conn **out, const char *file, int line,
                   const char *func)
{
	if (unlikely(!p || !out))
		return -EINVAL;
	*out = NULL;
	if (unlikely(pgr__forked(p->fork_epoch)))
		return -PGR_E_FORKED;
	if (unlikely(atomic_load_explicit(&p->closing, memory_order_relaxed)))
		return -ESHUTDOWN;
	struct pgr_conn *c = fast_take(p);
	if (likely(c != NULL)) {
		pgr__inc(&c->n_immediate);
		*out = checked_out(c, file, line, func);
		return 0;
	}
	return acquire_wait(p, timeout_ms, out, file, line, func);
}

/* Out of line so that the fast path above keeps a small frame. */
static __attribute__((noinline)) int acquire_wait(pgr_pool *p, int64_t timeout_ms, pgr_conn **out,
                                                  const char *file, int line, const char *func)
{
	struct pgr_conn *c = NULL;
	if (timeout_ms < 0)
		timeout_ms = p->cfg.acquire_timeout_ms;
	if (timeout_ms == 0) {
		if (atomic_load_explicit(&p->nopen, memory_order_relaxed) <
		        pgr__lim_max_size(pgr__limits(p)) &&
		    !atomic_exchange_explicit(&p->demand, 1, memory_order_relaxed))
			pgr__manager_wake(p);
		return -EAGAIN;
	}
	/* Counted so that pgr_pool_destroy frees nothing while a woken waiter still runs here. */
	atomic_fetch_add_explicit(&p->nblocked, 1, memory_order_seq_cst);
	pgr__clock_kick(p->rt);
	int rc = pgr__slow_acquire(p, timeout_ms, &c);
	if (rc == 0)
		*out = checked_out(c, file, line, func);
	atomic_fetch_sub_explicit(&p->nblocked, 1, memory_order_release);
	return rc;
}

int pgr_acquire(pgr_pool *p, int64_t timeout_ms, pgr_conn **out)
{
	return pgr_acquire_at(p, timeout_ms, out, NULL, 0, NULL);
}

int pgr_try_acquire(pgr_pool *p, pgr_conn **out)
{
	return pgr_acquire_at(p, 0, out, NULL, 0, NULL);
}

/* ---- return ---- */

int pgr__misuse(pgr_pool *p, uint32_t conn_id, int err, const char *fmt, ...)
{
	char msg[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	pgr__set_last_error(p, msg);
	pgr__emit(p, PGR_EV_MISUSE, msg, NULL, NULL, conn_id);
	return err;
}

/*
 * Every build type checks, and a refused call changes nothing: the misuse is the caller's bug,
 * and turning it into a connection shared by two holders (or an abort in production) would make
 * it everybody's.
 */
static inline __attribute__((always_inline)) int return_check(pgr_conn *h, const char *what,
                                                              struct pgr_conn **out)
{
	struct pgr_conn *c = pgr__slot(h);
	if (unlikely(!c))
		return -EINVAL;
	pgr_pool *p = c->pool;
	if (unlikely(pgr__forked(p->fork_epoch)))
		return -PGR_E_FORKED;
	/* acquire: pairs with checked_out's release, so the lease read next is the holder's. */
	if (unlikely(atomic_load_explicit(&c->state, memory_order_acquire) != PGR__IN_USE ||
	             !pgr__handle_current(h, c)))
		return pgr__misuse(p, c->id, -PGR_E_NOT_OWNED,
		                   "misuse: %s of connection %u, which this handle does not hold "
		                   "(released or discarded already, or a handle from an earlier "
		                   "checkout)",
		                   what, c->id);
	if (unlikely(atomic_load_explicit(&c->qbusy, memory_order_relaxed)))
		return pgr__misuse(p, c->id, -EBUSY,
		                   "misuse: %s of connection %u while a loop query on it is in "
		                   "flight; the connection stays checked out",
		                   what, c->id);
	*out = c;
	return 0;
}

static enum pgr__rstate libpq_return_state(struct pgr_conn *c);

/*
 * SQLAlchemy's overflow rule: above max_size and nobody to hand it to, it goes; above
 * max_size + max_overflow (a resize lowered them) it goes even with callers waiting. The slot
 * leaves nopen here, by CAS, so that concurrent returns retire only the surplus and not every
 * connection that comes back before the manager has closed the first. Applied on return, and
 * again when a return's rollback or reset ends (the callers waiting then may have left).
 */
bool pgr__surplus(pgr_pool *p, struct pgr_conn *c, int *reason)
{
	uint32_t open = atomic_load_explicit(&p->nopen, memory_order_relaxed);
	uint64_t lim = pgr__limits(p);
	while (unlikely(open > pgr__lim_max_size(lim)) &&
	       (open > pgr__lim_total(lim) ||
	        atomic_load_explicit(&p->nwaiters, memory_order_relaxed) == 0)) {
		if (atomic_compare_exchange_weak_explicit(
		        &p->nopen, &open, open - 1, memory_order_relaxed, memory_order_relaxed)) {
			c->uncounted = 1;
			*reason =
			    open > pgr__lim_total(lim) ? PGR_CLOSE_RESIZED : PGR_CLOSE_OVERFLOW;
			return true;
		}
	}
	return false;
}

static inline __attribute__((always_inline)) enum pgr__verdict
return_verdict(struct pgr_conn *c, bool discard, int *reason)
{
	pgr_pool *p = c->pool;
	int64_t now = pgr__now_ms(p);
	if (likely(p->cfg.metrics)) {
		int64_t held = now - atomic_load_explicit(&c->acquired_ms, memory_order_relaxed);
		pgr__hist_add(&c->hist[PGR_HIST_HOLD], held > 0 ? (uint64_t)held * 1000000u : 0);
	}
	atomic_store_explicit(&c->idle_since_ms, now, memory_order_relaxed);

	if (unlikely(discard)) {
		*reason = PGR_CLOSE_DISCARDED;
		return PGR__V_RETIRE;
	}
	if (unlikely(atomic_load_explicit(&p->closing, memory_order_relaxed))) {
		*reason = PGR_CLOSE_POOL_CLOSING;
		return PGR__V_RETIRE;
	}
	if (unlikely(atomic_load_explicit(&c->server_error, memory_order_relaxed))) {
		*reason = PGR_CLOSE_SERVER_ERROR;
		return PGR__V_RETIRE;
	}
	if (unlikely(!pgr__role_ok(p, c->pg))) {
		*reason = PGR_CLOSE_ROLE_CHANGED;
		return PGR__V_RETIRE;
	}
	/* A direct call for the libpq connections every real pool has (placeholders: tests). */
	enum pgr__rstate rs =
	    likely(p->ops == &pgr__libpq_ops) ? libpq_return_state(c) : p->ops->return_state(c);
	/* Inside a transaction: rolled back, unless the checks below retire it anyway (past its
	 * lifetime, or overflow with nobody waiting; closing the session rolls it back too). */
	bool rollback = false;
	if (unlikely(rs != PGR__RS_IDLE)) {
		switch (rs) {
		case PGR__RS_INTRANS:
			rollback = true;
			break;
		case PGR__RS_ACTIVE:
			*reason = PGR_CLOSE_ACTIVE_QUERY;
			return PGR__V_RETIRE;
		case PGR__RS_PIPELINE:
			/* The holder left pipeline mode on with nothing pending: leaving it is all
			 * the reset it needs; failing that, the connection goes. */
			if (PQexitPipelineMode(c->pg) == 1)
				break;
			*reason = PGR_CLOSE_ACTIVE_QUERY;
			return PGR__V_RETIRE;
		default:
			*reason = PGR_CLOSE_BROKEN;
			return PGR__V_RETIRE;
		}
	}
	if (unlikely(now >= atomic_load_explicit(&c->expire_ms, memory_order_relaxed))) {
		*reason = PGR_CLOSE_MAX_LIFETIME;
		return PGR__V_RETIRE;
	}
	/* The common case, at or below max_size, stays inline. */
	if (unlikely(atomic_load_explicit(&p->nopen, memory_order_relaxed) >
	             pgr__lim_max_size(pgr__limits(p))) &&
	    pgr__surplus(p, c, reason))
		return PGR__V_RETIRE;
	if (unlikely(rollback))
		return PGR__V_ROLLBACK;
	if (unlikely(p->cfg.reset_sql != NULL))
		return PGR__V_RESET;
	return PGR__V_PUBLISH;
}

/* What libpq says of a returned connection: one call on the common path. */
static inline enum pgr__rstate libpq_return_state(struct pgr_conn *c)
{
	/* A bad connection reports PQTRANS_UNKNOWN, so this one call answers both questions. */
	PGTransactionStatusType ts = PQtransactionStatus(c->pg);
	if (likely(ts == PQTRANS_IDLE)) {
		if (unlikely(PQpipelineStatus(c->pg) != PQ_PIPELINE_OFF))
			return PGR__RS_PIPELINE;
		/*
		 * The blocking mode is not looked at here: a third libpq call on every return
		 * costs more than the whole lock-free part of it. pgring's own I/O sets
		 * nonblocking mode before it sends anything, and the README says a holder that
		 * switches to blocking mode hands the connection on that way.
		 */
		return PGR__RS_IDLE;
	}
	if (ts == PQTRANS_UNKNOWN || PQstatus(c->pg) != CONNECTION_OK)
		return PGR__RS_BROKEN;
	if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR)
		return PGR__RS_INTRANS;
	return ts == PQTRANS_ACTIVE ? PGR__RS_ACTIVE : PGR__RS_BROKEN;
}

const struct pgr__conn_ops pgr__libpq_ops = {.return_state = libpq_return_state};

/* The same checks for the loop's release path (loop_acquire.c); release() below inlines them. */
int pgr__return_check(pgr_conn *h, const char *what, struct pgr_conn **out)
{
	return return_check(h, what, out);
}

enum pgr__verdict pgr__return_verdict(struct pgr_conn *c, bool discard, int *reason)
{
	return return_verdict(c, discard, reason);
}

static int release(pgr_conn *h, bool discard)
{
	struct pgr_conn *c = NULL;
	int rc = return_check(h, discard ? "discard" : "release", &c);
	if (unlikely(rc))
		return rc;
	int reason = 0;
	enum pgr__verdict v = return_verdict(c, discard, &reason);
	if (likely(v == PGR__V_PUBLISH))
		publish(c->pool, c, true);
	else if (v == PGR__V_RETIRE)
		pgr__manager_push(c->pool, c, PGR__REQ_RETIRE, reason);
	else
		pgr__manager_push(c->pool, c,
		                  v == PGR__V_ROLLBACK ? PGR__REQ_ROLLBACK : PGR__REQ_RESET, 0);
	return 0;
}

int pgr_release(pgr_conn *h)
{
	return release(h, false);
}

int pgr_discard(pgr_conn *h)
{
	return release(h, true);
}

void pgr__conn_cleanup(pgr_conn **c)
{
	if (c && *c) {
		pgr_release(*c);
		*c = NULL;
	}
}

PGconn *pgr_conn_pg(pgr_conn *h)
{
	struct pgr_conn *c = pgr__slot(h);
	if (!c || atomic_load_explicit(&c->state, memory_order_acquire) != PGR__IN_USE ||
	    !pgr__handle_current(h, c))
		return NULL;
	return c->pg;
}

uint32_t pgr_conn_id(const pgr_conn *h)
{
	const struct pgr_conn *c = pgr__slot(h);
	return c ? c->id : PGR__NONE;
}
