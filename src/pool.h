/* SPDX-License-Identifier: PostgreSQL */
/*
 * Internal structures of a pool.
 *
 * Ownership is the concurrency rule of this library: at any instant a connection slot has
 * exactly one owner, and only the owner writes its non-atomic fields.
 *   - an idle shard (its bit is set in one shard's bitmap): nobody may touch it until a CAS
 *     clears the bit, which makes the clearing thread the owner;
 *   - a holder (a caller between acquire and release);
 *   - the manager thread (connecting, pinging, rolling back, closing), after it pulled the slot
 *     from its request stack or cleared its idle bit;
 *   - a waiter, between the grant and the moment it returns the connection to its caller.
 * Ownership moves with release/acquire ordering (bitmap CAS, request-stack CAS, waiter grant),
 * so the next owner sees every write of the previous one. Fields that other threads read
 * without owning the slot (stats, leak scan, validation hints) are relaxed atomics, written
 * with plain load+store by the owner: a reader may see a stale value, never a torn one.
 */
#ifndef PGR_POOL_H
#define PGR_POOL_H

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include <liburing.h>

#include "hist.h"
#include "percpu.h"
#include "pgring.h"
#include "pq.h"
#include "runtime.h"
#include "sys.h"

#define PGR__CACHELINE  64
#define PGR__ALIGNED    __attribute__((aligned(PGR__CACHELINE)))
#define PGR__MAX_CONNS  4096u
#define PGR__MAX_SHARDS 64u
#define PGR__MAX_CPUS   1024u /* cpu -> shard table; larger ids fall back to a modulo */
#define PGR__NONE       UINT32_MAX
#define PGR__HOME_PCPU  UINT32_MAX /* home_shard of a connection in a per-CPU cache */

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/*
 * A connection slot's life. One state, one owner: drain, maintenance and the misuse check read
 * the state and know who may touch the slot. Transitions are checked by pgr__conn_move.
 */
enum pgr__state {
	PGR__FREE = 0,   /* slot unused */
	PGR__CONNECTING, /* manager: connect in progress */
	PGR__IDLE,       /* in a shard (its bit set); for an instant also the caller that cleared
	                    the bit and is validating it */
	PGR__GRANTED,    /* handed to a waiter by a release; the waiter owns it until checkout */
	PGR__IN_USE,     /* a holder has it */
	PGR__LOOP,       /* a pgr_loop owns it: pre-ping at checkout, rollback or reset at return */
	PGR__MANAGED,    /* the manager owns it: a queued request, ping, check, rollback, reset */
	PGR__CLOSING,    /* manager: io cancelled, waiting for CQEs before PQfinish */
	PGR__STATES,
};

/* What the checkout core decides a returned connection needs; its callers carry it out. */
enum pgr__verdict {
	PGR__V_PUBLISH = 0, /* healthy and idle: to a waiter or a shard */
	PGR__V_RETIRE,      /* close, with a reason */
	PGR__V_ROLLBACK,    /* returned inside a transaction */
	PGR__V_RESET,       /* reset_sql */
};

/* What the manager is asked to do with a slot handed to it. */
enum pgr__req {
	PGR__REQ_NONE = 0,
	PGR__REQ_ROLLBACK, /* returned inside a transaction */
	PGR__REQ_RESET,    /* reset_sql on return */
	PGR__REQ_PING,     /* pre-ping at checkout */
	PGR__REQ_CHECK,    /* socket readable while idle: consume and re-check */
	PGR__REQ_RETIRE,   /* close with c->close_reason */
	PGR__REQ_FINISH,   /* a loop gave up mid-statement: read its results, then as req_arg */
	PGR__REQ_HOLD,     /* its standby lags past max_replica_lag_ms: keep it out of use */
};

/* The manager's current network operation on a slot. */
enum pgr__op {
	PGR__OP_NONE = 0,
	PGR__OP_CONNECT,
	PGR__OP_EXEC, /* ping (""), ROLLBACK or reset_sql */
};

struct pgr_conn {
	/* Read-mostly identity. */
	pgr_pool *pool;
	uint32_t id;
	/* Checkout number (owner-written at checkout): its low 16 bits tag the handle a holder
	 * gets, so a handle kept past its release is told apart from the next holder's. */
	_Atomic uint32_t lease;
	_Atomic uint8_t qbusy; /* a pgr_loop query or pipeline is in flight on it (holder's) */

	/* Owner-written; others read relaxed (see the file comment). */
	_Atomic uint32_t state;
	PGconn *pg;
	_Atomic int64_t expire_ms;     /* born + lifetime - jitter; INT64_MAX when unlimited */
	_Atomic int64_t idle_since_ms; /* set on every return to a shard */
	_Atomic int64_t acquired_ms;   /* set on every checkout */
	const char *_Atomic acq_file;
	const char *_Atomic acq_func;
	_Atomic int acq_line;
	_Atomic uint32_t home_shard;  /* shard whose bitmap holds it while idle, or
	                                 PGR__HOME_PCPU: a per-CPU cache (percpu.h) */
	_Atomic uint8_t fresh;        /* validated by the manager; skip the next pre-ping */
	_Atomic uint8_t server_error; /* saw FATAL / 57P0x / 25006: never reuse */
	uint8_t uncounted;            /* already taken out of nopen by an overflow return */
	uint64_t hosts_tried;         /* manager-only: hosts this connect stalled on (role.h) */
	uint8_t host; /* index of its server in the conninfo's host list (replica.h); set at
	                 connect by the manager, read at checkout by the next owners */
	struct pgr__pcache *pcache; /* prepared statements of this libpq connection (exec.h);
	                               owner-only, freed with the connection */

	/* Per-slot counters and histograms: single writer (the owner), merged on read. hist: this
	 * slot's PGR_HIST_KINDS histograms in the pool's lazily backed array (pgr_pool.hists), set
	 * at create and never moved; next to n_immediate, whose line every checkout writes, so
	 * that reaching the histograms costs no extra cache line. */
	pgr__hist *hist;
	_Atomic uint64_t n_immediate; /* checkouts = n_immediate + n_waits */
	_Atomic uint64_t n_steals;
	_Atomic uint64_t n_handoffs;
	_Atomic uint64_t n_waits;

	/* Request stack link (multi-producer push, manager pops all). */
	_Atomic uint32_t req_next;
	uint8_t req;          /* enum pgr__req, written by the pusher before the push */
	uint8_t close_reason; /* enum pgr_close_reason for PGR__REQ_RETIRE */

	/* Manager-only. */
	uint8_t op;       /* enum pgr__op */
	uint8_t op_after; /* EXEC: enum pgr__req that started it */
	uint8_t armed;    /* a POLL_ADD is in flight */
	uint8_t exec_failed;
	uint8_t req_arg; /* PGR__REQ_FINISH: the request whose statement is still being read */
	struct pgr__pq pq;
	uint16_t inflight;          /* SQEs submitted and not yet reaped */
	uint32_t io_gen;            /* tags the current poll; stale CQEs are ignored */
	uint64_t leak_seq_reported; /* lease of the last leak report + 1 */
	int64_t op_start_ns;
	int64_t op_deadline_ns;
	struct __kernel_timespec ts;
	int64_t last_keepalive_ms;
	int64_t held_since_ms; /* held back because its standby lags (replica.c); 0 = not */
} PGR__ALIGNED;

/* A slot's histograms, a whole number of cache lines: two slots' owners never share a line. */
struct pgr__conn_hists {
	pgr__hist h[PGR_HIST_KINDS];
} PGR__ALIGNED;

/*
 * What a returned connection looks like, as the core needs to know it. Behind an ops pointer so
 * that the core's stress tests can run placeholder connections with no server (tests/).
 */
enum pgr__rstate {
	PGR__RS_IDLE = 0, /* no transaction, nothing pending */
	PGR__RS_INTRANS,  /* in a transaction block, or a failed one */
	PGR__RS_ACTIVE,   /* a query or pipeline still running */
	PGR__RS_BROKEN,   /* the connection is bad */
	PGR__RS_PIPELINE, /* left in pipeline mode with nothing pending: leaving it resets it */
};
struct pgr__conn_ops {
	enum pgr__rstate (*return_state)(struct pgr_conn *c);
};
extern const struct pgr__conn_ops pgr__libpq_ops;

/* A parked caller. Lives in the pool's fixed waiter array, never on a stack. */
enum pgr__wstate {
	PGR__W_FREE = 0,
	PGR__W_WAITING, /* queued, not asleep (spinning): a grant needs no FUTEX_WAKE */
	PGR__W_GRANTED,
	PGR__W_CANCELLED,
	PGR__W_SHUTDOWN,
	PGR__W_SLEEPING, /* queued, parked or about to park on the word: a grant must wake it */
	PGR__W_NUDGED,   /* queued, woken without a grant: a connection went idle, look again */
};

/*
 * Once the oldest waiter has waited PGR__STARVE_NS, or PGR__STARVE_PER_WAITER_NS per caller
 * waiting when it queued if that is longer, returned connections go to it (a hand-off) instead
 * of to whoever runs first (see pgr__publish and waiters.c).
 */
#define PGR__STARVE_NS            1000000
#define PGR__STARVE_PER_WAITER_NS 200000

/* After a connection was stolen from another CPU's cache (a fence), releases leave the caches
 * alone this long. */
#define PGR__PCPU_CALM_MS 10

struct pgr__waiter {
	_Atomic uint32_t state; /* the futex word; shared (not PRIVATE): see futex_wait */
	uint32_t conn;          /* granted slot, valid once state == GRANTED */
	uint32_t next, prev;    /* FIFO links, under wq_lock */
	uint32_t gen;
	_Atomic uint32_t pos;     /* place in the queue at arrival (1 = head); read by releasers */
	bool gated;               /* holds the caches' gate (percpu.h); the waiter's own */
	_Atomic int64_t since_ns; /* when it queued (CLOCK_MONOTONIC; read by releasers) */
} PGR__ALIGNED;

struct pgr_pool {
	/* Read-mostly: configuration and derived constants. */
	pgr_config cfg;
	char *conninfo_copy, *name_copy, *reset_sql_copy;
	const char **kw; /* conninfo as keywords/values, keepalive defaults added */
	const char **val;
	char *password; /* to scrub from messages */
	/* What set cfg.connect_timeout_ms, for messages: the field, or the conninfo's
	 * connect_timeout / PGCONNECT_TIMEOUT when shorter (config.c). */
	const char *connect_timeout_src;
	uint32_t cap; /* slots allocated at create: cfg.max_capacity, the resize bound */
	uint32_t nshards;
	uint8_t role;             /* enum pgr__role (role.h): what target_session_attrs asks for */
	_Atomic uint8_t pooler;   /* enum pgr_pooler (pooler.h): manager-written, read relaxed */
	struct pgr__hosts *hosts; /* host rotation of a replica pool (role.h), or NULL */
	struct pgr__replica *replica; /* lag and rebalance state (replica.h), manager-only; NULL
	                                 when the pool measures no lag and never rebalances */
	uint32_t nwords;              /* 64-bit words per shard bitmap */
	uint32_t shard_stride;        /* words between shards, padded to a cache line */
	uint32_t spin_iters;          /* pause loops a waiter spins before parking (0 on one CPU) */
	uint32_t spin_positions;      /* waiters that far from the head or closer spin */
	uint32_t spin_busy_max;       /* no spinning while more threads hold or wait (CPUs) */
	uint8_t cpu_shard[PGR__MAX_CPUS]; /* no division on the checkout path */
	struct pgr_conn *conns;
	struct pgr__conn_hists *hists; /* cap sets, lazily backed (see pgr_conn.hist) */
	const struct pgr__conn_ops *ops;
	_Atomic uint64_t *bits; /* nshards * shard_stride words */
	struct pgr__pcpu *pcpu; /* npcpu per-CPU caches (percpu.h) */
	uint32_t npcpu;         /* 0: the caches are off and every idle connection is in a shard */
	uint32_t npcpu_alloc;   /* caches allocated (pgr__pool_set_percpu can turn them off) */

	/* Read on every checkout, written rarely (drain). */
	struct pgr__clock *clock PGR__ALIGNED; /* the runtime's; own_clock once detached */
	_Atomic int closing;
	/* Bit h set: host h of the conninfo lags past max_replica_lag_ms, and its connections
	 * are not handed out. Written by the manager only; 0 whenever the bound is off, so the
	 * checkout's look at it is one load of a line it reads anyway. */
	_Atomic uint64_t lag_mask;
	/* Bit h set: host h is due a lag measurement and the manager found none of its
	 * connections idle to run it on (all checked out): the next checkout of one hands it to
	 * the manager to be measured first. Manager-set, cleared when the measurement starts; 0
	 * whenever the bound is off. */
	_Atomic uint64_t probe_mask;
	/* min_idle, max_size, max_overflow as pgr_pool_resize last set them, packed so that a
	 * reader never sees half of a resize (resize.c); cfg keeps the values given at create. */
	_Atomic uint64_t limits;

	/* Written by waiters and releasers; its own line. The per-CPU caches' gate (percpu.h)
	 * changes when waiting starts and ends, like nwaiters, and releasers read both. */
	_Atomic uint32_t nwaiters PGR__ALIGNED;
	/* The FIFO's head (a slot index, or PGR__NONE) for releases that serve the queue without
	 * wq_lock (waiters.c); written under the lock whenever the head changes. */
	_Atomic uint32_t wq_head_hint;
	_Atomic uint64_t pcpu_gate;
	_Atomic int64_t pcpu_calm_ms; /* releases skip the caches until then (a steal from a
	                                 cache happened: checkout.c, pcpu_steal) */

	/* Slot accounting, written on connect/close and by growing waiters. */
	_Atomic uint32_t nopen PGR__ALIGNED; /* reserved slots: connecting + open */
	_Atomic uint32_t nconnecting;
	_Atomic uint32_t req_head; /* request stack of slot ids */
	_Atomic uint32_t demand;   /* try_acquire found nothing: open one */
	_Atomic uint32_t nblocked; /* callers inside the blocking slow path */

	/*
	 * Waiter FIFO: the slow path, guarded by a mutex (a caller here is about to sleep). The
	 * slots are lazily backed (pgr__lazy_zalloc) and handed out in index order the first time
	 * (wq_fresh), then recycled through wq_free: a pool pays for as many slots as callers ever
	 * waited at once, a 4 KB page per 64, not for max_waiters.
	 */
	pthread_mutex_t wq_lock PGR__ALIGNED;
	struct pgr__waiter *waiters;
	uint32_t wq_head, wq_tail, wq_free;
	uint32_t wq_fresh; /* slots from here on were never used */
	uint32_t nwaiter_slots;

	/* Pool-level counters for events that are not a slot's (relaxed). */
	_Atomic uint64_t c_timeouts PGR__ALIGNED;
	_Atomic uint64_t c_rejected;
	_Atomic uint64_t c_connects_ok;
	_Atomic uint64_t c_connects_failed;
	_Atomic uint64_t c_pings;
	_Atomic uint64_t c_pings_failed;
	_Atomic uint64_t c_checks_failed;
	_Atomic uint64_t c_rollbacks;
	_Atomic uint64_t c_resets;
	_Atomic uint64_t c_resets_failed;
	_Atomic uint64_t c_leaks;
	_Atomic uint64_t
	    c_loop_execs; /* pings, rollbacks, resets run on a pgr_loop's ring (tests) */
	_Atomic uint64_t c_closes[PGR_CLOSE_REASONS];
	_Atomic int connect_failing;

	pthread_mutex_t err_lock;
	char last_error[512];

	/* Manager: its runtime, and state only the runtime's rounds touch. */
	pgr_runtime *rt;
	uint16_t rt_index;         /* the pool's index in its runtime (in user_data) */
	_Atomic uint32_t mgr_poke; /* requests or waiters arrived: take a turn */
	_Atomic int mgr_stop;      /* drain: close what the manager holds, then detach */
	_Atomic int mgr_detached;  /* the runtime let the pool go */
	bool mgr_dirty;            /* a completion changed something: recompute what is due */
	int64_t next_due_ms;
	struct pgr__clock own_clock; /* before attach and after detach: always read directly */
	uint64_t rng;
	uint32_t consecutive_failures;
	int64_t backoff_ms;
	int64_t next_connect_ms;
	_Atomic int drained;
	uint32_t fork_epoch;     /* see sys.h: a forked child must not use the pool */
	_Atomic uint32_t nloops; /* pgr_loops bound to the pool: destroy refuses while any live */
};

/* ---- shared helpers ---- */

/* The limits in force (resize.c): one relaxed load, decoded. */
#define PGR__LIM_BITS 16
static inline uint64_t pgr__limits_pack(uint32_t min_idle, uint32_t max_size, uint32_t overflow)
{
	return (uint64_t)min_idle | (uint64_t)max_size << PGR__LIM_BITS |
	       (uint64_t)overflow << (2 * PGR__LIM_BITS);
}
static inline uint64_t pgr__limits(const pgr_pool *p)
{
	return atomic_load_explicit(&p->limits, memory_order_relaxed);
}
static inline uint32_t pgr__lim_min_idle(uint64_t l)
{
	return (uint32_t)(l & 0xffffu);
}
static inline uint32_t pgr__lim_max_size(uint64_t l)
{
	return (uint32_t)(l >> PGR__LIM_BITS & 0xffffu);
}
static inline uint32_t pgr__lim_max_overflow(uint64_t l)
{
	return (uint32_t)(l >> 2 * PGR__LIM_BITS & 0xffffu);
}
/* max_size + max_overflow: the most connections open at once, never above p->cap. */
static inline uint32_t pgr__lim_total(uint64_t l)
{
	return pgr__lim_max_size(l) + pgr__lim_max_overflow(l);
}

static inline int64_t pgr__now_ms(pgr_pool *p)
{
	return pgr__clock_now(p->clock);
}

/* Owner-only increment of a slot counter (see the file comment). */
static inline void pgr__inc(_Atomic uint64_t *c)
{
	atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1,
	                      memory_order_relaxed);
}

static inline _Atomic uint64_t *pgr__shard_words(pgr_pool *p, uint32_t s)
{
	return p->bits + (size_t)s * p->shard_stride;
}

/*
 * Handles. A holder's pgr_conn * is the slot's address with the checkout's lease number in the
 * top 16 bits (user-space addresses on x86-64 and arm64 leave them zero; pool_create checks).
 * Every public entry point that takes a handle untags it and compares the tag with the slot's
 * lease: a handle used after its release is refused even when the slot is checked out again.
 */
#define PGR__TAG_SHIFT 48
#define PGR__ADDR_MASK ((UINT64_C(1) << PGR__TAG_SHIFT) - 1)
static inline pgr_conn *pgr__handle(struct pgr_conn *c, uint32_t lease)
{
	return (pgr_conn *)((uintptr_t)c | ((uintptr_t)(lease & 0xffffu) << PGR__TAG_SHIFT));
}
static inline struct pgr_conn *pgr__slot(const pgr_conn *h)
{
	return (struct pgr_conn *)((uintptr_t)h & PGR__ADDR_MASK);
}
static inline bool pgr__handle_current(const pgr_conn *h, const struct pgr_conn *c)
{
	return ((uintptr_t)h >> PGR__TAG_SHIFT) ==
	       (atomic_load_explicit(&c->lease, memory_order_relaxed) & 0xffffu);
}

/* Legal moves of enum pgr__state; anything else is a bug in the pool and aborts. */
#define PGR__B(s) (1u << (s))
/* Where an owner hands a healthy connection on: a shard or a waiter (pgr__publish). */
#define PGR__PUBLISHED (PGR__B(PGR__IDLE) | PGR__B(PGR__GRANTED))
static const uint16_t pgr__legal[PGR__STATES] = {
    [PGR__FREE] = PGR__B(PGR__CONNECTING),
    /* CONNECTING -> MANAGED: a lag-bounded pool measures a new connection's standby first. */
    [PGR__CONNECTING] =
        PGR__PUBLISHED | PGR__B(PGR__FREE) | PGR__B(PGR__MANAGED) | PGR__B(PGR__CLOSING),
    /* IDLE -> GRANTED: the pump takes a connection from a shard for a waiter. */
    /* IDLE -> IDLE: a caller that took it puts it back untouched (drain began meanwhile). */
    [PGR__IDLE] = PGR__PUBLISHED | PGR__B(PGR__IN_USE) | PGR__B(PGR__LOOP) | PGR__B(PGR__MANAGED) |
                  PGR__B(PGR__CLOSING),
    /* GRANTED -> published: a waiter that found one itself gives the spare back. */
    [PGR__GRANTED] =
        PGR__PUBLISHED | PGR__B(PGR__IN_USE) | PGR__B(PGR__LOOP) | PGR__B(PGR__MANAGED),
    [PGR__IN_USE] = PGR__PUBLISHED | PGR__B(PGR__LOOP) | PGR__B(PGR__MANAGED),
    /* LOOP -> IN_USE: a pre-ping on the loop passed and the connection goes to its caller. */
    [PGR__LOOP] = PGR__PUBLISHED | PGR__B(PGR__IN_USE) | PGR__B(PGR__LOOP) | PGR__B(PGR__MANAGED),
    /* MANAGED -> MANAGED: a rollback followed by reset_sql. */
    [PGR__MANAGED] = PGR__PUBLISHED | PGR__B(PGR__MANAGED) | PGR__B(PGR__CLOSING),
    [PGR__CLOSING] = PGR__B(PGR__FREE),
};
void pgr__conn_bad_move(struct pgr_conn *c, unsigned from, unsigned to);
/* The one transition function: only the slot's owner calls it. */
static inline void pgr__conn_move(struct pgr_conn *c, unsigned to)
{
	unsigned cur = atomic_load_explicit(&c->state, memory_order_relaxed);
	if (unlikely(cur >= PGR__STATES || !(pgr__legal[cur] & PGR__B(to))))
		pgr__conn_bad_move(c, cur, to);
	atomic_store_explicit(&c->state, to, memory_order_relaxed);
}
/* The same, publishing what the owner wrote before it (see checked_out). */
static inline void pgr__conn_move_rel(struct pgr_conn *c, unsigned to)
{
	unsigned cur = atomic_load_explicit(&c->state, memory_order_relaxed);
	if (unlikely(cur >= PGR__STATES || !(pgr__legal[cur] & PGR__B(to))))
		pgr__conn_bad_move(c, cur, to);
	atomic_store_explicit(&c->state, to, memory_order_release);
}

/* config.c */
int pgr__config_import(pgr_pool *p, const pgr_config *cfg, pgr_config *out);
int pgr__config_validate(pgr_pool *p, const pgr_config *cfg);
int pgr__config_copy(pgr_pool *p, const pgr_config *cfg);
void pgr__config_free(pgr_pool *p);

/* events (pool.c) */
void pgr__emit(pgr_pool *p, enum pgr_event_type type, const char *msg, const char *reason,
               const char *field, uint32_t conn_id);
void pgr__emitf(pgr_pool *p, enum pgr_event_type type, uint32_t conn_id, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void pgr__set_last_error(pgr_pool *p, const char *msg);
void pgr__scrub(const pgr_pool *p, char *msg);

/* checkout.c */
void pgr__publish(pgr_pool *p, struct pgr_conn *c); /* owner hands an idle conn to the pool */
void pgr__publish_cached(pgr_pool *p, struct pgr_conn *c); /* the same from a holder's release */
int pgr__claim_idle(pgr_pool *p, struct pgr_conn *c);      /* manager takes a known-idle conn */
void pgr__waiters_shutdown(pgr_pool *p);
uint32_t pgr__idle_count(pgr_pool *p);
/* Per-CPU caches on or off (percpu.h), for tests and benchmarks: call before the pool is used
 * by other threads. Turning them on works only where pool_create could set them up. */
void pgr__pool_set_percpu(pgr_pool *p, bool on);
bool pgr__pool_percpu(const pgr_pool *p);
bool pgr__waiter_park(struct pgr__waiter *w);
/* A nudged waiter resumes looking: NUDGED -> WAITING. False when the state moved on meanwhile
 * (granted, shut down). */
bool pgr__waiter_resume(struct pgr__waiter *w);
/* gate: close the per-CPU caches' gate now (a loop's waiter, which sleeps at once); a blocking
 * waiter closes it before it parks. */
int pgr__wq_enqueue(pgr_pool *p, uint32_t *wi, bool gate);
unsigned pgr__wq_settle(pgr_pool *p, uint32_t wi, struct pgr_conn **granted);
void pgr__wq_free(pgr_pool *p, uint32_t wi);
struct pgr_conn *pgr__wq_outcome(pgr_pool *p, unsigned s, struct pgr_conn *mine,
                                 struct pgr_conn *granted, int *rc);
struct pgr_conn *pgr__fast_take(pgr_pool *p);
/* Like pgr__fast_take; a connection that needs a pre-ping comes back with *ping set. */
struct pgr_conn *pgr__fast_take_ping(pgr_pool *p, bool *ping);
/* A validated connection goes to its caller; returns the holder's handle. waited_ns < 0: an
 * immediate checkout. */
pgr_conn *pgr__checked_out(struct pgr_conn *c, int64_t waited_ns, const char *file, int line,
                           const char *func);
/* The misuse check of every call that gives a connection back: 0 and *out = the slot, or a
 * negative error (reported as PGR_EV_MISUSE); what = "release", "discard". */
int pgr__return_check(pgr_conn *h, const char *what, struct pgr_conn **out);
/* What a returned connection needs (the caller carries it out). *reason for RETIRE. */
enum pgr__verdict pgr__return_verdict(struct pgr_conn *c, bool discard, int *reason);
/* Report a misuse (PGR_EV_MISUSE); returns err. */
int pgr__misuse(pgr_pool *p, uint32_t conn_id, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
int pgr__timeout_error(pgr_pool *p, int64_t waited_ms);

/* Between the checkout path (checkout.c) and the waiter FIFO (waiters.c). */
/* The per-CPU caches' gate (percpu.h): closed from close to the matching open. */
void pgr__gate_close(pgr_pool *p);
void pgr__gate_open(pgr_pool *p);
/* An idle connection from the caller's cache or a shard, unvalidated; *stolen if from another
 * shard. */
struct pgr_conn *pgr__take_any(pgr_pool *p, bool *stolen);
/* The checks of an idle connection before it is handed out: false when it went to the manager. */
bool pgr__validate(pgr_pool *p, struct pgr_conn *c);
/* Whether c, just returned (or done with its return's rollback or reset), is above the pool's
 * size with nobody to take it: then it has left nopen, *reason says why, and it must close. */
bool pgr__surplus(pgr_pool *p, struct pgr_conn *c, int *reason);
/* Make c idle in the caller's CPU's shard (no waiter is served: see pgr__pump). */
void pgr__shard_put(pgr_pool *p, struct pgr_conn *c);
/* Return c while callers wait: to the oldest waiter if the waiting policy says so, else to a
 * shard with that waiter nudged. False (nothing done) when nobody waits after all. */
bool pgr__release_to_waiters(pgr_pool *p, struct pgr_conn *c);
/* Serve waiters from the shards after a connection went there with callers waiting. */
void pgr__pump(pgr_pool *p);
/* A blocking caller's wait for a connection, until its deadline. */
int pgr__slow_acquire(pgr_pool *p, int64_t timeout_ms, struct pgr_conn **out);
/* Cheap guard for public entry points: the pool exists in this process. */
static inline int pgr__pool_usable(const pgr_pool *p)
{
	if (unlikely(!p))
		return -EINVAL;
	if (unlikely(pgr__forked(p->fork_epoch)))
		return -PGR_E_FORKED;
	return 0;
}

/* pool.c: a pool without a manager (no io_uring), for placeholder connections (tests/). */
int pgr__pool_create_nomgr(const pgr_config *cfg, pgr_pool **out);

/* manager.c */
int pgr__manager_start(pgr_pool *p);
void pgr__manager_stop(pgr_pool *p);
void pgr__manager_forget(pgr_pool *p);
void pgr__manager_release(pgr_pool *p);
/* runtime.c / manager.c: the runtime's side of one pool */
int64_t pgr__mgr_round(pgr_pool *p, int64_t now);
void pgr__mgr_cqe(pgr_pool *p, uint64_t ud, int res);
void pgr__runtime_detach(pgr_runtime *rt, pgr_pool *p);
void pgr__manager_poke(pgr_pool *p);
void pgr__manager_wake(pgr_pool *p);
void pgr__manager_push(pgr_pool *p, struct pgr_conn *c, enum pgr__req req, int reason);

#endif
